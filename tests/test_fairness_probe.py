"""BiasProbe in a Composer Trainer (exact values, resume, DDP), the fairness YAMLs and `composer-ext report bias`."""

import copy
import json
import math
import warnings

import pytest
import torch
from composer import Trainer
from composer.core import Evaluator
from composer.loggers import InMemoryLogger
from composer.models import ComposerModel
from composer.optim import DecoupledSGDW

from composer_ext.callbacks import BiasProbe
from composer_ext.config import load_config
from composer_ext.data import build_image_dataloader
from composer_ext.metrics import cev_sde
from composer_ext.fairness.bias import ZeroRateWarning
from composer_ext.fairness.similarity import LinearCKA, output_kl, top1_agreement
from composer_ext.models import small_vgg
from composer_ext.testing import KillAt, Killed, run_distributed
from tests.conftest import ROOT

LAYERS = ['module.features.1', 'module.features.4']


def _model(seed=0, train_batches=0):
    torch.manual_seed(seed)
    model = small_vgg(num_classes=10, widths=[8, 16])
    if train_batches:  # a model that predicts every class, so that all class-wise rates are defined
        trainer = Trainer(model=model, train_dataloader=build_image_dataloader('digits', 64, seed=seed),
                          optimizers=DecoupledSGDW(model.parameters(), lr=0.05, momentum=0.9),
                          max_duration=f'{train_batches}ba', progress_bar=False, seed=seed)
        trainer.fit()
        trainer.close()
    return model


@pytest.fixture(scope='module')
def trained():
    return _model(train_batches=40)


def _perturbed(model, seed=1):
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.3 * p.abs().mean() * torch.randn(p.shape, generator=g))
    return other


def _test_loader(batch_size=64):
    return build_image_dataloader('digits', batch_size, split='test', shuffle=False, drop_last=False)


def _eval(model, probe, batch_size=64):
    logger = InMemoryLogger()
    trainer = Trainer(model=model, eval_dataloader=Evaluator(label='test', dataloader=_test_loader(batch_size)),
                      optimizers=DecoupledSGDW(model.parameters(), lr=0.0), callbacks=[probe], loggers=[logger],
                      progress_bar=False)
    trainer.eval()
    values = {key: series[-1][1] for key, series in logger.data.items() if key.startswith(('bias/', 'similarity/'))}
    trainer.close()
    return values


def test_a_model_against_itself_is_unbiased_and_identical(trained):
    model = copy.deepcopy(trained)
    values = _eval(model, BiasProbe(copy.deepcopy(model), 'test', layers=LAYERS, num_bootstraps=100))
    assert values['bias/test/cev'] == 0.0 and values['bias/test/sde'] == 0.0
    assert values['bias/test/cev_ci_high'] == 0.0
    assert values['similarity/test/agreement'] == 1.0 and values['similarity/test/churn'] == 0.0
    assert values['similarity/test/kl'] == pytest.approx(0.0, abs=1e-12)
    for layer in ['logits'] + LAYERS:
        assert values[f'similarity/test/cka/{layer}'] == pytest.approx(1.0, abs=1e-9), layer


def test_probe_values_equal_the_functional_metrics_on_the_whole_eval_set(trained):
    model = copy.deepcopy(trained)
    reference = _perturbed(model)
    values = _eval(model, BiasProbe(reference, 'test', layers={'module.features.4': 'module.features.4'},
                                    num_bootstraps=0, eps=1e-3))
    targets, logits, ref_logits, cka = [], [], [], LinearCKA()
    captured = {}
    hooks = [m.module.features[4].register_forward_hook(lambda mod, i, o, k=k: captured.__setitem__(k, o))
             for k, m in (('model', model), ('ref', reference))]
    model.eval()
    with torch.no_grad():
        for x, y in _test_loader():
            logits.append(model((x, y)))
            ref_logits.append(reference((x, y)))
            targets.append(y)
            cka.update(captured['ref'], captured['model'])
    for hook in hooks:
        hook.remove()
    target, logits, ref_logits = torch.cat(targets), torch.cat(logits), torch.cat(ref_logits)
    expected = cev_sde(target, ref_logits, logits, 10, eps=1e-3)
    assert values['bias/test/cev'] == pytest.approx(expected.cev, rel=1e-12)
    assert values['bias/test/sde'] == pytest.approx(expected.sde, rel=1e-12)
    assert values['bias/test/cev'] > 0.01
    assert values['similarity/test/agreement'] == pytest.approx(float(top1_agreement(ref_logits, logits)))
    assert values['similarity/test/kl'] == pytest.approx(float(output_kl(ref_logits, logits)), rel=1e-6)
    assert values['similarity/test/cka/module.features.4'] == pytest.approx(float(cka.compute()), rel=1e-6)
    assert values['bias/test/accuracy'] == pytest.approx(float((logits.argmax(1) == target).double().mean()))


class _PerfectReference(ComposerModel):
    """A reference that is always right (its logits are the labels, one-hot): every reference error rate is 0."""

    def forward(self, batch):
        return 10.0 * torch.nn.functional.one_hot(batch[1], 10).float()

    def loss(self, outputs, batch):
        raise NotImplementedError('a frozen reference computes no loss')


def _strict_json(text):
    """json.loads that refuses the bare NaN/Infinity tokens Python's json writes (they are not JSON)."""
    def refuse(token):
        raise ValueError(f'{token} is not valid JSON')
    return json.loads(text, parse_constant=refuse)


def test_nothing_to_compare_is_logged_as_nan_written_as_null_and_reported(tmp_path):
    import shutil

    from composer_ext.fairness.report import pool_trials, write_report
    model = _model()
    probe = BiasProbe(_PerfectReference(), 'test', num_bootstraps=20, folder=str(tmp_path / 'a'))
    with pytest.warns(ZeroRateWarning, match='CEV and SDE are NaN'):
        values = _eval(model, probe)
    # A perfect reference with eps=None leaves all 2 x 10 class rates out: NaN is logged (not the 0 of "no bias").
    assert values['bias/test/n_masked'] == 20 and values['bias/test/reference_accuracy'] == 1.0
    for key in ('cev', 'sde', 'cev_ci_low', 'cev_ci_high', 'sde_ci_low', 'sde_ci_high'):
        assert math.isnan(values[f'bias/test/{key}']), key
    # bias_probe.json stays valid JSON: NaN is written as null.
    record = _strict_json((tmp_path / 'a' / 'bias_probe.json').read_text())['records'][-1]
    assert record['metrics']['cev'] is None and record['metrics']['sde_ci_high'] is None
    assert record['per_class']['cev'] is None and record['metrics']['n_masked'] == 20.0
    assert record['metrics']['reference_accuracy'] == 1.0 and record['metrics']['agreement'] == values[
        'similarity/test/agreement']
    # The report reads it back (one run, and two trials pooled) without crashing, and writes valid JSON.
    shutil.copytree(tmp_path / 'a', tmp_path / 'b')
    single = write_report([str(tmp_path / 'a')], str(tmp_path / 'single'))
    assert math.isnan(single['rows'][0]['cev'])
    pooled = pool_trials([str(tmp_path / 'a'), str(tmp_path / 'b')])
    assert pooled[0]['n_trials'] == 2 and math.isnan(pooled[0]['cev']) and math.isnan(pooled[0]['sde_trial_mean'])
    for out, runs in (('single', ['a']), ('pooled', ['a', 'b'])):
        write_report([str(tmp_path / r) for r in runs], str(tmp_path / out))
        summary = _strict_json((tmp_path / out / 'bias_report.json').read_text())
        assert summary['rows'][0]['cev'] is None and summary['rows'][0]['sde'] is None, out
        assert summary['rows'][0]['reference_accuracy'] == 1.0, out
        assert '| nan |' in (tmp_path / out / 'bias_report.md').read_text(), out


def test_other_evaluators_are_left_alone_and_bad_arguments_are_named():
    model = _model()
    probe = BiasProbe(copy.deepcopy(model), 'test', num_bootstraps=0, eps=1e-3)
    logger = InMemoryLogger()
    trainer = Trainer(model=model, eval_dataloader=[Evaluator(label='val', dataloader=_test_loader()),
                                                    Evaluator(label='test', dataloader=_test_loader())],
                      optimizers=DecoupledSGDW(model.parameters(), lr=0.0), callbacks=[probe], loggers=[logger],
                      progress_bar=False)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', ZeroRateWarning)  # an untrained model: most rates are 0
        trainer.eval()
    trainer.close()
    assert 'bias/test/cev' in logger.data and not any(key.startswith('bias/val') for key in logger.data)
    assert [record['eval_label'] for record in probe.records] == ['test']
    with pytest.raises(ValueError, match=r"layers names 'module.features.9'.*e.g. \["):
        _eval(model, BiasProbe(copy.deepcopy(model), 'test', layers=['module.features.9']))
    with pytest.raises(TypeError, match='layers=.module.features.1. is a single string'):
        BiasProbe(model, 'test', layers='module.features.1')
    with pytest.raises(TypeError, match=r'layers is a int \(5\). Fix: pass a list of module names'):
        BiasProbe(model, 'test', layers=5)
    with pytest.raises(TypeError, match=r'layers=\[1\] holds 1, which is not a module name. Fix:'):
        BiasProbe(model, 'test', layers=[1])
    with pytest.raises(TypeError, match=r'folder=3 is a int, not a path. Fix:'):
        BiasProbe(model, 'test', folder=3)
    with pytest.raises(ValueError, match=r'eps=-1 is negative'):
        BiasProbe(model, 'test', eps=-1)
    with pytest.raises(ValueError, match=r"variant='fair' is unknown"):
        BiasProbe(model, 'test', variant='fair')
    with pytest.raises(TypeError, match='reference_model is a str'):
        BiasProbe('teacher.pt', 'test')


def test_an_eval_label_matching_no_evaluator_fails_at_fit_start_and_at_eval():
    model = _model()
    message = r"eval_label='val' is the label of none of the trainer's evaluators \['test'\].*Fix: set eval_label"
    with pytest.raises(ValueError, match=message):
        _eval(model, BiasProbe(copy.deepcopy(model), 'val'))
    trainer = Trainer(model=model, train_dataloader=build_image_dataloader('digits', 64, seed=0),
                      eval_dataloader=Evaluator(label='test', dataloader=_test_loader()),
                      optimizers=DecoupledSGDW(model.parameters(), lr=0.05), max_duration='2ba',
                      callbacks=[BiasProbe(copy.deepcopy(model), 'val')], progress_bar=False)
    with pytest.raises(ValueError, match=message):
        trainer.fit()
    assert int(trainer.state.timestamp.batch) == 0  # before any training
    trainer.close()


def test_fit_twice_second_fit_start_close_twice_and_repr(trained, tmp_path):
    model, reference = copy.deepcopy(trained), _perturbed(trained)
    probe = BiasProbe(reference, 'test', layers={'module.features.1': 'module.features.1'}, num_classes=10,
                      variant='simon', eps=1e-3, num_bootstraps=20, confidence_level=0.9, seed=3, kl_temperature=2.0,
                      folder=str(tmp_path / '{run_name}'), log_per_class=True)
    rebuilt = eval(repr(probe).replace(f'<{type(reference).__name__}>', 'reference'),
                   {'BiasProbe': BiasProbe, 'reference': reference})
    assert repr(rebuilt) == repr(probe)
    assert (rebuilt.layers, rebuilt.eps, rebuilt.folder) == (probe.layers, 1e-3, probe.folder)
    logger = InMemoryLogger()
    trainer = Trainer(model=model, train_dataloader=build_image_dataloader('digits', 64, seed=0),
                      eval_dataloader=Evaluator(label='test', dataloader=_test_loader(128)), eval_interval='2ba',
                      optimizers=DecoupledSGDW(model.parameters(), lr=0.05), max_duration='2ba', run_name='twice',
                      callbacks=[probe], loggers=[logger], progress_bar=False, seed=0)
    trainer.fit()
    trainer.fit(duration='2ba')  # a second FIT_START
    assert [r['batch'] for r in probe.records] == [2, 4] and probe._hooks == []
    written = json.loads((tmp_path / 'twice' / 'bias_probe.json').read_text())['records']
    assert [r['batch'] for r in written] == [2, 4]
    assert written[-1]['settings'] == {'variant': 'simon', 'eps': 1e-3, 'num_bootstraps': 20,
                                       'confidence_level': 0.9, 'seed': 3}
    # The second fit's evaluation measured the model of that time, against the same reference.
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model((x, y)) for x, y in _test_loader()])
        ref_logits = torch.cat([reference((x, y)) for x, y in _test_loader()])
    target = torch.cat([y for _, y in _test_loader()])
    expected = cev_sde(target, ref_logits, logits, 10, variant='simon', eps=1e-3)
    assert written[-1]['metrics']['cev'] == pytest.approx(expected.cev, rel=1e-9)
    assert len(logger.data['bias/test/cev']) == 2 and 'bias/test/delta_fpr/0' in logger.data
    trainer.close()
    trainer.close()
    probe.close(trainer.state, trainer.logger)  # and directly, once more
    assert probe._hooks == [] and not probe._active
def _train(base, tmp_path, name, kill=None, load_path=None):
    from composer_ext.algorithms import MagnitudePruning
    model, reference = copy.deepcopy(base), copy.deepcopy(base)  # prune a copy, probe against the dense model
    probe = BiasProbe(reference, 'test', layers=LAYERS[:1], num_bootstraps=50, folder=str(tmp_path / '{run_name}'))
    trainer = Trainer(model=model, train_dataloader=build_image_dataloader('digits', 64, seed=1),
                      eval_dataloader=Evaluator(label='test', dataloader=_test_loader(128)), eval_interval='2ba',
                      optimizers=DecoupledSGDW(model.parameters(), lr=0.05, momentum=0.9),
                      algorithms=[MagnitudePruning(0.7, start=0, end='4ba', interval=1)],
                      callbacks=[probe] + ([KillAt(kill)] if kill else []), max_duration='6ba', run_name=name,
                      save_folder=str(tmp_path / name / 'ckpt'), save_interval='4ba', load_path=load_path,
                      progress_bar=False, seed=1)
    return trainer, probe


def test_history_file_is_exact_across_a_kill_and_resume(trained, tmp_path):
    full, _ = _train(trained, tmp_path, 'full')
    full.fit()
    full.close()
    killed, _ = _train(trained, tmp_path, 'cut', kill=4)
    with pytest.raises(Killed):
        killed.fit()
    killed.close()
    resumed, probe = _train(trained, tmp_path, 'cut', load_path=str(tmp_path / 'cut' / 'ckpt' / 'ep0-ba4-rank0.pt'))
    resumed.fit()
    resumed.close()
    full_records = json.loads((tmp_path / 'full' / 'bias_probe.json').read_text())['records']
    resumed_records = json.loads((tmp_path / 'cut' / 'bias_probe.json').read_text())['records']
    assert [r['batch'] for r in resumed_records] == [2, 4, 6]
    for a, b in zip(full_records, resumed_records):
        a.pop('run_name'), b.pop('run_name')
        assert a == b
    assert full_records[-1]['target_sparsity'] == 0.7 and full_records[-1]['algorithms'] == ['MagnitudePruning']
    assert full_records[-1]['metrics']['weight_sparsity'] > 0.6
    assert len(probe.records) == 3


def _one_sample_eval(model):
    """Eval on 1 sample: on 2 ranks, rank 1's only batch is DistributedSampler padding (it has 0 real samples)."""
    from composer.utils import dist
    from torch.utils.data import DataLoader, Subset

    dataset = Subset(_test_loader().dataset, [0])
    loader = DataLoader(dataset, batch_size=1, sampler=dist.get_sampler(dataset, shuffle=False, drop_last=False),
                        drop_last=False)
    probe = BiasProbe(copy.deepcopy(model), 'test', layers=LAYERS, num_bootstraps=20, eps=1e-3)
    trainer = Trainer(model=model, eval_dataloader=Evaluator(label='test', dataloader=loader),
                      optimizers=DecoupledSGDW(model.parameters(), lr=0.0), callbacks=[probe], progress_bar=False)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', ZeroRateWarning)  # 9 classes without a sample
        trainer.eval()
    trainer.close()
    return probe.records[-1]


def _ddp_probe_and_pruning(model):
    from composer.utils import dist

    from composer_ext.algorithms import MagnitudePruning
    probe = BiasProbe(_perturbed(model), 'test', layers=LAYERS, num_bootstraps=200, eps=1e-3)
    values = _eval(model, probe, batch_size=64)
    one_sample = _one_sample_eval(model)
    student = _model(seed=5)
    pruning = MagnitudePruning(0.6, start=0, end='3ba', interval=1)
    trainer = Trainer(model=student, train_dataloader=build_image_dataloader('digits', 64, seed=1),
                      optimizers=DecoupledSGDW(student.parameters(), lr=0.05, momentum=0.9), algorithms=[pruning],
                      max_duration='4ba', progress_bar=False, seed=1)
    trainer.fit()
    masks = torch.cat([m.flatten() for m in pruning.masks.values()]).to(torch.uint8)
    gathered = dist.all_gather_object(masks.tolist())
    trainer.close()
    return values, gathered[0] == gathered[1], pruning.sparsity(), probe.records[-1], one_sample


@pytest.mark.distributed
def test_two_ranks_probe_the_same_values_as_one_process_and_prune_alike(trained):
    model = copy.deepcopy(trained)
    single_probe = BiasProbe(_perturbed(model), 'test', layers=LAYERS, num_bootstraps=200, eps=1e-3)
    single = _eval(model, single_probe)
    expected = single_probe.records[-1]
    results = run_distributed(_ddp_probe_and_pruning, world_size=2, args=(copy.deepcopy(trained),), timeout=600)
    for values, masks_agree, sparsity, record, one_sample in results:
        for key in ('cev', 'sde', 'cev_ci_low', 'cev_ci_high', 'sde_ci_low', 'sde_ci_high', 'accuracy'):
            assert values[f'bias/test/{key}'] == pytest.approx(single[f'bias/test/{key}'], rel=1e-12), key
        for key in ('agreement', 'churn', 'negative_flip_rate', 'kl'):
            assert values[f'similarity/test/{key}'] == pytest.approx(single[f'similarity/test/{key}'], rel=1e-9)
        # CKA is a minibatch estimator: 2 ranks see batches of 32 instead of 64, so it is close, not equal.
        assert values['similarity/test/cka/logits'] == pytest.approx(single['similarity/test/cka/logits'], abs=0.05)
        assert masks_agree and sparsity == pytest.approx(0.6, abs=1e-3)
        # The JSON record: the rank-summed confusion matrices and the per-class detail of the whole eval set.
        assert record['num_samples'] == expected['num_samples'] == 359
        assert record['confmat'] == expected['confmat']
        assert record['reference_confmat'] == expected['reference_confmat']
        for key, value in expected['per_class'].items():
            if isinstance(value, (list, float)):
                assert record['per_class'][key] == pytest.approx(value, rel=1e-12, abs=1e-15), key
            else:
                assert record['per_class'][key] == value, key
        # A rank that saw only padding still joins the reduction (no hang) and both report the one real sample.
        assert one_sample['num_samples'] == 1 and sum(map(sum, one_sample['confmat'])) == 1
        assert one_sample['metrics']['accuracy'] in (0.0, 1.0) and one_sample['metrics']['agreement'] == 1.0
        assert math.isnan(one_sample['metrics']['cka/logits'])  # no batch of >= 4 samples
        assert one_sample['cka_skipped_batches']['logits'] == 1  # rank 0's batch; rank 1's padding never reached CKA


# --- YAMLs and the report -------------------------------------------------------------------------------------

YAMLS = sorted((ROOT / 'yamls' / 'fairness').glob('*.yaml'))
TINY = ['train_loader.num_samples=512', 'eval_loaders.0.num_samples=500']


def test_every_fairness_yaml_loads():
    assert {p.name for p in YAMLS} >= {'teacher.yaml', 'prune.yaml', 'prune_kd.yaml'}
    for path in YAMLS:
        config = load_config(path)
        assert config.run_name.startswith('fairness_')
    prune_kd = load_config(ROOT / 'yamls/fairness/prune_kd.yaml', ('variables.sparsity=0.5', 'variables.runs=/x'))
    assert prune_kd.run_name == 'fairness_prune_kd_0.5'
    assert prune_kd.algorithms['magnitude_pruning']['target_sparsity'] == 0.5
    assert set(prune_kd.algorithms) == {'magnitude_pruning', 'knowledge_distillation'}
    teacher = '/x/fairness_teacher/checkpoints/latest-rank0.pt'
    assert prune_kd.load_path == teacher
    assert prune_kd.callbacks['bias_probe']['reference_model']['checkpoint'] == teacher
    assert prune_kd.algorithms['knowledge_distillation']['teachers'][0]['checkpoint'] == teacher


@pytest.fixture(scope='module')
def tiny_reproduction(tmp_path_factory):
    """The reproduction in miniature: a teacher, then prune and prune+KD at two sparsities (real runs)."""
    from composer_ext.runner import run
    root = tmp_path_factory.mktemp('fairness')
    teacher = run(str(ROOT / 'yamls/fairness/teacher.yaml'), (
        f'variables.runs={root}', 'max_duration=6ba', 'eval_interval=6ba', 'save_interval=6ba',
        'scheduler.t_warmup=1ba', *TINY))
    teacher.trainer.close()
    assert (root / 'fairness_teacher' / 'checkpoints' / 'latest-rank0.pt').exists()
    run_dirs = []
    for yaml in ('prune.yaml', 'prune_kd.yaml'):
        for sparsity in (0.5, 0.9):
            result = run(str(ROOT / 'yamls/fairness' / yaml), (
                f'variables.runs={root}', f'variables.sparsity={sparsity}', 'max_duration=4ba', 'eval_interval=4ba',
                'save_folder=null', 'algorithms.magnitude_pruning.interval=1ba',
                'callbacks.bias_probe.num_bootstraps=50', *TINY))
            assert 'metrics/test/MulticlassAccuracy' in result.eval_metrics
            result.trainer.close()
            run_dirs.append(root / result.trainer.state.run_name)
    return root, run_dirs


def test_main_yaml_runs_prune_and_distill_with_the_probe(tiny_reproduction):
    _, run_dirs = tiny_reproduction
    record = json.loads((run_dirs[-1] / 'bias_probe.json').read_text())['records'][-1]
    assert record['run_name'] == 'fairness_prune_kd_0.9' and record['num_samples'] == 500
    assert record['algorithms'] == ['MagnitudePruning', 'KnowledgeDistillation']
    assert record['metrics']['weight_sparsity'] == pytest.approx(int(0.9 * 23184) / 23824, abs=1e-9)  # classifier dense
    assert 0 <= record['metrics']['agreement'] <= 1 and record['metrics']['cev'] >= 0
    assert set(record['metrics']) >= {'cka/logits', 'cka/module.features.2', 'cka/module.features.4', 'kl'}


def test_report_writes_figures_tables_and_correlations(tiny_reproduction):
    from composer_ext.cli import main
    root, run_dirs = tiny_reproduction
    out = root / 'report'
    assert main(['report', 'bias', *map(str, run_dirs), '--out', str(out)]) == 0
    for name in ('delta_scatter.png', 'cev_sde_vs_sparsity.png', 'cev_vs_similarity.png', 'bias_report.csv',
                 'bias_report.md'):
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / 'bias_report.json').read_text())
    assert [(r['group'], r['sparsity']) for r in summary['rows']] == [('prune', 0.5), ('prune', 0.9),
                                                                      ('prune+KD', 0.5), ('prune+KD', 0.9)]
    assert set(summary['pearson_cev']) >= {'agreement', 'kl', 'cka/logits'}
    assert all(r is None or -1 <= r <= 1 for r in summary['pearson_cev'].values())
    assert (out / 'bias_report.md').read_text().count('\n| prune') == 4
    assert main(['report', 'bias', str(root / 'fairness_teacher')]) == 2  # no bias_probe.json: a config error, exit 2


def _fake_run(root, name, sparsity, cev, agreement, algorithms, confidence_level=0.9):
    """A bias_probe.json as BiasProbe writes it (only the fields the report reads)."""
    run_dir = root / name
    run_dir.mkdir()
    metrics = {'cev': cev, 'sde': cev / 2, 'cev_ci_low': cev * 0.8, 'cev_ci_high': cev * 1.2, 'sde_ci_low': cev / 3,
               'sde_ci_high': cev, 'n_masked': 0.0, 'accuracy': 0.8, 'reference_accuracy': 0.9,
               'weight_sparsity': sparsity, 'agreement': agreement, 'kl': 1 - agreement, 'cka/logits': agreement}
    record = {'run_name': name, 'eval_label': 'test', 'batch': 10, 'algorithms': algorithms,
              'target_sparsity': sparsity, 'metrics': metrics,
              'per_class': {'delta_fpr': [0.1 * cev, None, -0.2], 'delta_fnr': [0.3, 0.1, None]},
              'settings': {'confidence_level': confidence_level}}
    (run_dir / 'bias_probe.json').write_text(json.dumps({'records': [record]}))
    return str(run_dir)


def test_report_pearson_interval_label_and_rank_zero_only(tmp_path, monkeypatch, capsys):
    import numpy as np
    from composer.utils import dist

    from composer_ext.cli import main
    from composer_ext.fairness.report import _interval_name, collect_rows, pearson
    xs, ys = [0.1, 0.5, 0.2, 0.9, 0.4], [1.0, 2.5, 0.7, 3.1, 1.9]
    assert pearson(xs, ys) == pytest.approx(float(np.corrcoef(xs, ys)[0, 1]), rel=1e-12)
    assert pearson(xs + [None, 0.3], ys + [5.0, float('nan')]) == pytest.approx(pearson(xs, ys), rel=1e-12)
    assert pearson([1, 1, 1], [1, 2, 3]) is None and pearson([1, 2], [3, 4]) is None
    runs = [_fake_run(tmp_path, f'run{i}', s, c, a, ['MagnitudePruning'] + (['KnowledgeDistillation'] if kd else []))
            for i, (s, c, a, kd) in enumerate([(0.5, 0.1, 0.95, False), (0.9, 0.6, 0.7, False),
                                               (0.5, 0.08, 0.96, True), (0.9, 0.3, 0.85, True)])]
    out = tmp_path / 'report'
    # As rank 1 under `composer -n 2` (set on composer's dist, not RANK: an earlier Trainer in this process may have
    # initialised a 1-process group that RANK would contradict): it checks the inputs, writes and prints nothing.
    monkeypatch.setattr(dist, 'get_global_rank', lambda: 1)
    assert main(['report', 'bias', *runs, '--out', str(out)]) == 0
    assert not out.exists() and capsys.readouterr().out == ''
    assert main(['report', 'bias', runs[0], str(tmp_path / 'missing'), '--out', str(out)]) == 2  # still checked
    monkeypatch.undo()
    assert main(['report', 'bias', *runs, '--out', str(out)]) == 0
    markdown = (out / 'bias_report.md').read_text()
    assert '| cev 90% CI |' in markdown and '95%' not in markdown and markdown in capsys.readouterr().out
    summary = json.loads((out / 'bias_report.json').read_text())
    cevs, agreements = [0.1, 0.6, 0.08, 0.3], [0.95, 0.7, 0.96, 0.85]
    order = [(r['group'], r['sparsity']) for r in summary['rows']]
    assert order == [('prune', 0.5), ('prune', 0.9), ('prune+KD', 0.5), ('prune+KD', 0.9)]
    assert summary['pearson_cev']['agreement'] == pytest.approx(float(np.corrcoef(agreements, cevs)[0, 1]))
    mixed = collect_rows(runs[:1] + [_fake_run(tmp_path, 'other', 0.5, 0.1, 0.9, [], confidence_level=0.95)])
    assert _interval_name(mixed) == 'CI' and _interval_name(mixed[:1]) in ('90% CI', '95% CI')


def _fake_trial(root, name, confmat, reference, sparsity=0.9, settings=None):
    """A bias_probe.json of one trial with its confusion matrices (as BiasProbe records them)."""
    from composer_ext.fairness.bias import cev_sde_from_confusion
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # a zero reference rate is masked on purpose in one trial
        result = cev_sde_from_confusion(torch.tensor(reference), torch.tensor(confmat)).as_dict()
    run_dir = root / name
    run_dir.mkdir()
    metrics = {'cev': result['cev'], 'sde': result['sde'], 'n_masked': 0.0, 'accuracy': 0.5, 'reference_accuracy': 0.6,
               'weight_sparsity': sparsity, 'agreement': 0.7 if 'a' in name else 0.9}
    record = {'run_name': name, 'eval_label': 'test', 'batch': 10, 'algorithms': ['MagnitudePruning'],
              'target_sparsity': sparsity, 'metrics': metrics, 'confmat': confmat, 'reference_confmat': reference,
              'per_class': {'delta_fpr': result['delta_fpr'], 'delta_fnr': result['delta_fnr']},
              'settings': settings or {'variant': 'nas', 'eps': None, 'confidence_level': 0.95}}
    (run_dir / 'bias_probe.json').write_text(json.dumps({'records': [record]}))
    return str(run_dir), result


def test_report_pools_trials_by_summing_confusion_matrices(tmp_path):
    from composer_ext.cli import main
    from composer_ext.fairness.report import pool_trials, write_report
    reference = [[8, 1, 1], [2, 7, 1], [1, 1, 8]]  # the same teacher on the same test set for every trial
    run_a, a = _fake_trial(tmp_path, 'a', [[6, 2, 2], [1, 8, 1], [2, 2, 6]], reference)
    run_b, b = _fake_trial(tmp_path, 'b', [[7, 3, 0], [3, 5, 2], [0, 1, 9]], reference)
    rows = pool_trials([run_a, run_b])
    assert len(rows) == 1 and rows[0]['n_trials'] == 2 and rows[0]['trials'] == ['a', 'b']
    row = rows[0]
    # With one reference, nas Δ is linear in the rate, so the pooled Δ is the mean of the trials' Δ (by hand).
    for key in ('delta_fpr', 'delta_fnr'):
        assert row[key] == pytest.approx([(x + y) / 2 for x, y in zip(a[key], b[key])], rel=1e-12)
    assert row['accuracy'] == pytest.approx((20 + 21) / 60) and row['reference_accuracy'] == pytest.approx(23 / 30)
    assert row['agreement'] == pytest.approx(0.8) and row['cev_ci_low'] is None
    assert row['cev_trial_mean'] == pytest.approx((a['cev'] + b['cev']) / 2)
    assert row['cev_trial_min'] == min(a['cev'], b['cev']) and row['cev'] != row['cev_trial_mean']
    summary = write_report([run_a, run_b], str(tmp_path / 'out'))
    assert summary['pooled'] and len(summary['trial_rows']) == 2
    assert (tmp_path / 'out' / 'bias_report_trials.csv').read_text().count('\n') == 3
    assert 'pooled' in (tmp_path / 'out' / 'bias_report.md').read_text()
    # Trials that cannot be pooled are refused with the reason: other samples, other settings, a run twice.
    run_c, _ = _fake_trial(tmp_path, 'c', [[5, 0, 0], [0, 10, 0], [0, 0, 15]], [[5, 0, 0], [0, 10, 0], [0, 0, 15]])
    run_d, _ = _fake_trial(tmp_path, 'd', reference, reference, settings={'variant': 'simon', 'eps': None})
    for runs in ([run_a, run_c], [run_a, run_d], [run_a, run_a]):
        assert main(['report', 'bias', *runs, '--out', str(tmp_path / 'bad')]) == 2
    assert not (tmp_path / 'bad').exists()
