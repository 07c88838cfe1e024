"""CEV/SDE fairness: ClassBias vs fairlearn MetricFrame, and the eval overhead of BiasProbe.

1. ``class_bias``: per-class FPR and FNR of two models (a reference and a compared model) over the same
   ``--predictions`` labelled samples. Ours: ``ClassBias`` fed in batches of ``--batch-size`` (update + compute,
   which also yields CEV and SDE), without and with ``--bootstraps`` bootstrap replicates. Baseline: fairlearn's
   ``MetricFrame`` with ``false_positive_rate``/``false_negative_rate``, one-vs-rest for every class, the model as
   the sensitive feature (fairlearn rates are binary, so a multiclass comparison needs one frame per class).
   The bench checks that both give the same rates. fairlearn (0.15) converts every column element by element in
   Python, about a minute per million rows and class, so it runs ``--fairlearn-repeats`` times (default 1) without
   a warm-up, and the rates it returned in the timed call are the ones checked.
2. ``bias_probe``: ``Trainer.eval()`` of the reproduction's CNN on ``--eval-samples`` Fashion-MNIST test images with
   ``BiasProbe`` (reference forward, CEV/SDE with bootstrap CIs, agreement/churn/KL, CKA on two layers and the
   logits) vs the same eval without it. As in the reproduction, the reference is the CNN trained for
   ``--train-batches`` batches and the probed model its one-shot magnitude-pruned copy (``--sparsity``). The
   probes use ``eps=1e-6``, so no class rate is left out even where the reference's rate is 0 and the probe
   always does its full work (the JSON reports ``n_masked`` and any warning raised while timing: none).

Prints one JSON object; ratios < 1 mean ours is faster. ``--help`` lists the sizes.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402


def _predictions(n: int, num_classes: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    target = rng.integers(0, num_classes, n)

    def noisy(accuracy: float) -> np.ndarray:
        return np.where(rng.random(n) < accuracy, target, rng.integers(0, num_classes, n))

    return target, noisy(0.9), noisy(0.8)


def bench_class_bias(args) -> dict:
    from fairlearn.metrics import MetricFrame, false_negative_rate, false_positive_rate

    from composer_ext.metrics import ClassBias

    target, ref, model = _predictions(args.predictions, args.classes)
    t, r, m = (torch.from_numpy(a) for a in (target, ref, model))
    both_true = np.concatenate([target, target])
    both_pred = np.concatenate([ref, model])
    which = np.repeat(np.array(['reference', 'model']), len(target))

    def ours(bootstraps: int):
        def call():
            metric = ClassBias(args.classes, num_bootstraps=bootstraps, validate_args=True)
            for start in range(0, len(t), args.batch_size):
                stop = start + args.batch_size
                metric.update(t[start:stop], r[start:stop], m[start:stop])
            metric.compute()
            return metric
        return call

    def fairlearn():
        rates = {}
        for c in range(args.classes):
            frame = MetricFrame(metrics={'fpr': false_positive_rate, 'fnr': false_negative_rate},
                                y_true=(both_true == c).astype(int), y_pred=(both_pred == c).astype(int),
                                sensitive_features=which)
            rates[c] = frame.by_group
        return rates

    results = harness.time_variants({'class_bias': ours(0), 'class_bias_bootstrap': ours(args.bootstraps)},
                                    repeats=args.repeats, warmup=1)
    outputs = []
    results.update(harness.time_variants({'fairlearn': lambda: outputs.append(fairlearn())},
                                         repeats=args.fairlearn_repeats, warmup=0))
    metric, rates = ours(0)(), outputs[-1]
    result = metric.last_result
    difference = max(max(abs(rates[c].loc['model', 'fpr'] - float(result.fpr[c])),
                         abs(rates[c].loc['model', 'fnr'] - float(result.fnr[c])),
                         abs(rates[c].loc['reference', 'fpr'] - float(result.ref_fpr[c])),
                         abs(rates[c].loc['reference', 'fnr'] - float(result.ref_fnr[c]))) for c in range(args.classes))
    return {
        'times_s': {k: {'min': v['min'], 'median': v['median']} for k, v in results.items()},
        'ratio_class_bias_vs_fairlearn': harness.ratio(results, 'class_bias', 'fairlearn'),
        'ratio_class_bias_bootstrap_vs_fairlearn': harness.ratio(results, 'class_bias_bootstrap', 'fairlearn'),
        'max_abs_rate_difference': difference,
        'predictions': args.predictions, 'classes': args.classes, 'batch_size': args.batch_size,
        'bootstraps': args.bootstraps, 'repeats': args.repeats, 'fairlearn_repeats': args.fairlearn_repeats,
    }


def _trained_reference(args):
    """The CNN briefly trained on Fashion-MNIST: it predicts every class, so no reference rate is 0."""
    from composer import Trainer
    from composer.optim import DecoupledSGDW

    from composer_ext.data import build_image_dataloader
    from composer_ext.models import small_vgg

    torch.manual_seed(0)
    model = small_vgg(widths=[16, 32, 64], convs_per_stage=1)
    trainer = Trainer(model=model, train_dataloader=build_image_dataloader('fashion_mnist', 128, seed=0),
                      optimizers=DecoupledSGDW(model.parameters(), lr=0.05, momentum=0.9),
                      max_duration=f'{args.train_batches}ba', progress_bar=False, log_to_console=False, seed=0)
    trainer.fit()
    trainer.close()
    return model


def bench_bias_probe(args) -> dict:
    from composer import Trainer
    from composer.core import Evaluator
    from composer.optim import DecoupledSGDW

    from composer_ext.callbacks import BiasProbe
    from composer_ext.data import build_image_dataloader
    from composer_ext.fairness.magnitude_pruning import compute_masks, prunable_layers

    reference = _trained_reference(args)
    model = copy.deepcopy(reference)  # the probed model: the reference pruned, as in the reproduction
    layers = dict(prunable_layers(model))
    weights = {name: module.weight for name, module in layers.items()}
    with torch.no_grad():
        for name, mask in compute_masks(weights, args.sparsity).items():
            weights[name].masked_fill_(~mask, 0)

    def trainer(callbacks):
        loader = build_image_dataloader('fashion_mnist', args.eval_batch_size, split='test', shuffle=False,
                                        drop_last=False, num_samples=args.eval_samples)
        return Trainer(model=model, eval_dataloader=Evaluator(label='test', dataloader=loader),
                       optimizers=DecoupledSGDW(model.parameters(), lr=0.0), callbacks=callbacks,
                       progress_bar=False, log_to_console=False)

    # eps > 0: no class rate is ever left out (a briefly trained reference can have an FPR of exactly 0), so the
    # probe always does its full work and the timing does not depend on the data.
    probe = BiasProbe(reference, 'test', layers=['module.features.2', 'module.features.4'],
                      num_bootstraps=args.bootstraps, eps=1e-6)
    plain = trainer([])
    probed = trainer([probe])
    prediction_only = trainer([BiasProbe(reference, 'test', num_bootstraps=args.bootstraps, eps=1e-6)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        results = harness.time_variants({'plain_eval': plain.eval, 'bias_probe_eval': probed.eval,
                                         'bias_probe_no_layer_cka_eval': prediction_only.eval},
                                        repeats=args.repeats, warmup=1)
    for t in (plain, probed, prediction_only):
        t.close()
    record = probe.records[-1]
    return {
        'times_s': {k: {'min': v['min'], 'median': v['median']} for k, v in results.items()},
        'ratio_bias_probe_vs_plain_eval': harness.ratio(results, 'bias_probe_eval', 'plain_eval'),
        'ratio_bias_probe_no_layer_cka_vs_plain_eval': harness.ratio(results, 'bias_probe_no_layer_cka_eval',
                                                                     'plain_eval'),
        'eval_samples': args.eval_samples, 'eval_batch_size': args.eval_batch_size,
        'reference_accuracy': record['metrics']['reference_accuracy'], 'accuracy': record['metrics']['accuracy'],
        'cev': record['metrics']['cev'], 'n_masked': record['metrics']['n_masked'],
        'warnings': sorted({f'{w.category.__name__}: {w.message}' for w in caught}),
        'probe': 'reference forward + CEV/SDE (bootstrap CIs) + agreement/churn/KL + CKA (logits, 2 conv layers)',
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--predictions', type=int, default=1_000_000, help='labelled samples per model')
    parser.add_argument('--classes', type=int, default=10)
    parser.add_argument('--batch-size', type=int, default=10_000, help='samples per ClassBias.update')
    parser.add_argument('--bootstraps', type=int, default=1000, help='bootstrap replicates (ClassBias, BiasProbe)')
    parser.add_argument('--eval-samples', type=int, default=2000, help='Fashion-MNIST test images per eval')
    parser.add_argument('--eval-batch-size', type=int, default=250)
    parser.add_argument('--train-batches', type=int, default=200,
                        help='training batches (of 128) of the reference CNN of the bias_probe part')
    parser.add_argument('--sparsity', type=float, default=0.5,
                        help='magnitude sparsity of the probed copy (one-shot, not finetuned: 0.9 leaves ~35%% '
                             'accuracy)')
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--fairlearn-repeats', type=int, default=1,
                        help='timed fairlearn runs (each takes minutes at the default --predictions)')
    parser.add_argument('--only', choices=('class_bias', 'bias_probe'), default=None, help='run one part')
    args = parser.parse_args(argv)
    out = {}
    if args.only in (None, 'class_bias'):
        out['class_bias'] = bench_class_bias(args)
    if args.only in (None, 'bias_probe'):
        out['bias_probe'] = bench_bias_probe(args)
    harness.emit(out)
    return 0


if __name__ == '__main__':
    sys.exit(main())
