"""Benchmark LoRAProbe: training wall-clock with the probe at its default cadence / without it, and spectrum cost.

1. ``probe_overhead``: the small GPT (2 layers, width 128) trained ``--batches`` batches of 16 x 128 tokens on the
   embedded ``code`` domain, without the probe and with ``LoRAProbe(every='100ba', spectrum_every='500ba')`` (the
   defaults) at two evaluation sizes, because the overhead is mostly evaluation and scales with it: the bench's
   own (source (prose) and target (code) evaluators of ``--eval-batches`` x ``--eval-batch-size``, default 4 x 16)
   and the one of ``yamls/lora_probe`` (``--yaml-eval-batches`` x ``--yaml-eval-batch-size``, 8 x 32). Full
   finetuning, so the probe also keeps and differences the initial weights. Each timed call is one whole ``fit()``
   (the probe's baseline evaluation at FIT_START and its final probe at FIT_END included); the Trainers are built
   untimed. Goal: ratio <= 1.05. The default of 1,000 batches runs the default cadence as a training run does (ten
   evaluations, two spectrum passes); the probe's fixed costs (the baseline evaluation at FIT_START and the final
   one at FIT_END) weigh more in shorter runs (``--batches 200``: three evaluations for 200 batches).
   Identical fits differ by up to ~10% in wall-clock on a shared 2-core machine, more than the effect, so
   ``ratio_from_probe_time_in_fit`` also gives the probe's own share of each fit, timed inside the same run (the
   wall-clock of the probe's event handlers): ``fit / (fit - probe)``.
   ``overhead_inputs`` gives, per setting, the inputs of the estimate
   ``probes x eval samples per probe / (3 x batches x train batch)`` (an evaluation forward costs about a third of
   a training step per sample at the same sequence length), so the ratio can be carried to other cadences (the
   YAMLs probe every 50 batches, not 100).
2. ``spectrum``: one spectrum pass (``DeltaWTracker.spectra()``: ΔW and its singular values for every probed
   module) of a wider GPT (``--spectrum-layers`` layers of width ``--spectrum-width``), for full finetuning (dense
   ΔW = W - W0, a full SVD per module) and for LoRA r=16 (ΔW = s·B·A from the factors), in seconds per million
   probed parameters.

    .venv/bin/python benchmarks/bench_lora_probe.py                  # about an hour on 2 idle cores
    .venv/bin/python benchmarks/bench_lora_probe.py --repeats 1 --skip-yaml-eval     # about 15 minutes
    .venv/bin/python benchmarks/bench_lora_probe.py --batches 200 --skip-yaml-eval   # a short run
    .venv/bin/python benchmarks/bench_lora_probe.py --batches 100 --repeats 2 --spectrum-width 256
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / 'benchmarks'))

import harness  # noqa: E402

TRAIN_BATCH = 16      # samples per training batch, as yamls/lora_probe
SEQ_LEN = 128
EVERY = 100           # LoRAProbe's default cadence
SPECTRUM_EVERY = 500
EVALUATORS = 2        # one source (prose) and one target (code)


def _trainer(eval_size, args):
    """A Trainer without the probe (``eval_size=None``) or with it, its evaluators of (batches, batch size)."""
    import torch
    from composer import Trainer
    from composer.optim import DecoupledAdamW

    from composer_ext.callbacks import LoRAProbe
    from composer_ext.data.text import build_text_dataloader, build_text_evaluators
    from composer_ext.models import small_gpt

    torch.manual_seed(0)
    model = small_gpt(n_layer=2, n_embd=128, n_head=4)
    callbacks = []
    if eval_size is not None:
        batches, batch_size = eval_size
        probe = LoRAProbe(
            build_text_evaluators(batch_size, domains='prose', seq_len=SEQ_LEN, subset_num_batches=batches),
            build_text_evaluators(batch_size, domains='code', seq_len=SEQ_LEN, subset_num_batches=batches),
            every=f'{EVERY}ba', spectrum_every=f'{SPECTRUM_EVERY}ba')
        callbacks.append(_timed(probe))
    return Trainer(model=model, train_dataloader=build_text_dataloader(TRAIN_BATCH, domains=['code'], seq_len=SEQ_LEN),
                   max_duration=f'{args.batches}ba', optimizers=DecoupledAdamW(model.parameters(), lr=1e-3),
                   callbacks=callbacks, progress_bar=False, device='gpu' if torch.cuda.is_available() else 'cpu',
                   seed=17)


def _timed(probe):
    """Accumulate the wall-clock of every event the probe handles in ``probe.seconds_in_events``."""
    run_event = probe.run_event

    def timed_run_event(event, state, logger):
        start = time.perf_counter()
        try:
            return run_event(event, state, logger)
        finally:
            probe.seconds_in_events += time.perf_counter() - start

    probe.seconds_in_events = 0.0
    probe.run_event = timed_run_event
    return probe


def overhead_inputs(batches: int, eval_batches: int, eval_batch_size: int, every: int = EVERY) -> dict:
    """The inputs of the evaluation-overhead estimate of one setting, and the estimate itself."""
    eval_samples = EVALUATORS * eval_batches * eval_batch_size
    probes = 1 + math.ceil(batches / every)  # the baseline at FIT_START, every `every`, and FIT_END
    return {'eval_samples_per_probe': eval_samples, 'evaluators': EVALUATORS, 'eval_batches_each': eval_batches,
            'eval_batch_size': eval_batch_size, 'every_batches': every, 'train_batch_samples': TRAIN_BATCH,
            'seq_len': SEQ_LEN, 'batches': batches, 'probes_per_fit': probes,
            'estimated_eval_overhead': probes * eval_samples / (3 * batches * TRAIN_BATCH)}


def probe_overhead(args) -> dict:
    sizes = {'without_probe': None, 'with_probe_bench_eval': (args.eval_batches, args.eval_batch_size)}
    if not args.skip_yaml_eval:
        sizes['with_probe_yaml_eval'] = (args.yaml_eval_batches, args.yaml_eval_batch_size)
    trainers = {}

    def setup(name):
        previous = trainers.pop(name, None)
        if previous is not None:
            previous.close()
        trainers[name] = _trainer(sizes[name], args)

    in_fit: dict[str, list[tuple[float, float]]] = {name: [] for name in sizes if sizes[name] is not None}

    def fit(name):
        trainer = trainers[name]
        probe = next((c for c in trainer.state.callbacks if hasattr(c, 'seconds_in_events')), None)
        if probe is not None:
            probe.seconds_in_events = 0.0  # this fit only
        start = time.perf_counter()
        trainer.fit()
        if probe is not None:
            in_fit[name].append((time.perf_counter() - start, probe.seconds_in_events))

    results = harness.time_variants({name: (lambda name=name: fit(name)) for name in sizes},
                                    repeats=args.repeats, warmup=args.warmup, setup=setup)
    for trainer in trainers.values():
        trainer.close()
    return {
        'ratio_with_over_without_bench_eval': harness.ratio(results, 'with_probe_bench_eval', 'without_probe'),
        'ratio_with_over_without_yaml_eval': (None if args.skip_yaml_eval else
                                              harness.ratio(results, 'with_probe_yaml_eval', 'without_probe')),
        # The probe's own share of each timed fit (its event handlers, timed inside the same run): free of the
        # run-to-run noise of the ratio above (+-10% between identical fits on a shared 2-core machine).
        'ratio_from_probe_time_in_fit': {
            name: {'median': statistics.median(total / (total - probe) for total, probe in pairs),
                   'probe_seconds': [probe for _, probe in pairs], 'fit_seconds': [total for total, _ in pairs]}
            for name, pairs in in_fit.items()},
        'goal': '<= 1.05',
        'seconds': {name: {'min': r['min'], 'median': r['median']} for name, r in results.items()},
        'setting': {'batches': args.batches, 'train_batch': f'{TRAIN_BATCH} x {SEQ_LEN} tokens',
                    'every': f'{EVERY}ba', 'spectrum_every': f'{SPECTRUM_EVERY}ba',
                    'evaluators': '1 source (prose) + 1 target (code)'},
        'overhead_inputs': {
            'bench_eval': overhead_inputs(args.batches, args.eval_batches, args.eval_batch_size),
            'yaml_eval': overhead_inputs(args.batches, args.yaml_eval_batches, args.yaml_eval_batch_size),
            # yamls/lora_probe itself: 300 batches, every 50ba (not timed here; the estimate only).
            'yaml_run_estimate': overhead_inputs(300, args.yaml_eval_batches, args.yaml_eval_batch_size, every=50),
        },
    }


def spectrum_cost(args) -> dict:
    import torch
    from composer.models import HuggingFaceModel

    from composer_ext.lora_probe.tracker import DeltaWTracker
    from composer_ext.lora_probe.lora import lora_config
    from composer_ext.models import small_gpt

    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    out = {}
    for kind in ('full', 'lora_r16'):
        torch.manual_seed(0)
        base = small_gpt(n_layer=args.spectrum_layers, n_embd=args.spectrum_width, n_head=8, n_positions=128)
        model = base if kind == 'full' else HuggingFaceModel(
            base.model, tokenizer=base.tokenizer, peft_config=lora_config(r=16, model=base, dropout=0.0))
        model.to(device)
        tracker = DeltaWTracker(model, 'auto')
        tracker.capture()
        with torch.no_grad():  # a stand-in for training: perturb what would train
            for entry in tracker.probed:
                for role, (_, holder, attribute) in entry.tensors.items():
                    getattr(holder, attribute).add_(torch.randn_like(getattr(holder, attribute)) * 1e-2)
        params = sum(entry.shape[0] * entry.shape[1] for entry in tracker.probed)
        timed = harness.time_variants({'pass': tracker.spectra}, repeats=args.repeats, warmup=1)['pass']
        out[kind] = {'seconds_per_pass': {'min': timed['min'], 'median': timed['median']},
                     'probed_params_millions': params / 1e6,
                     'seconds_per_million_params': {'min': timed['min'] / (params / 1e6),
                                                    'median': timed['median'] / (params / 1e6)},
                     'modules': len(tracker.probed),
                     'shapes': sorted({'x'.join(map(str, e.shape)) for e in tracker.probed})}
    out['setting'] = {'layers': args.spectrum_layers, 'width': args.spectrum_width, 'device': device,
                      'dtype': 'float32'}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--batches', type=int, default=1000,
                        help='training batches per timed fit() (default 1000: ten probes and two spectrum passes)')
    parser.add_argument('--repeats', type=int, default=3, help='interleaved repeats per variant (default 3)')
    parser.add_argument('--warmup', type=int, default=0, help='untimed runs per variant first (default 0)')
    parser.add_argument('--eval-batches', type=int, default=4, help='batches per probe evaluator (default 4)')
    parser.add_argument('--eval-batch-size', type=int, default=16, help='probe evaluation batch size (default 16)')
    parser.add_argument('--yaml-eval-batches', type=int, default=8,
                        help='batches per evaluator of the YAML setting (default 8, as yamls/lora_probe)')
    parser.add_argument('--yaml-eval-batch-size', type=int, default=32,
                        help='evaluation batch size of the YAML setting (default 32, as yamls/lora_probe)')
    parser.add_argument('--skip-yaml-eval', action='store_true',
                        help='time only the bench-sized evaluations (skip the yamls/lora_probe-sized variant)')
    parser.add_argument('--spectrum-layers', type=int, default=4, help='layers of the spectrum-pass GPT (default 4)')
    parser.add_argument('--spectrum-width', type=int, default=512, help='width of the spectrum-pass GPT (default 512)')
    parser.add_argument('--skip-overhead', action='store_true', help='only time the spectrum pass')
    args = parser.parse_args(argv)
    result = {'bench': 'lora_probe'}
    if not args.skip_overhead:
        result['probe_overhead'] = probe_overhead(args)
    result['spectrum'] = spectrum_cost(args)
    harness.emit(result)
    return 0


if __name__ == '__main__':
    sys.exit(main())
