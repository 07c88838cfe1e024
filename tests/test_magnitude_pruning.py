"""MagnitudePruning: the cubic schedule, masks that stay applied, mask selection, exact resume, errors."""

import copy

import pytest
import torch
from composer import Trainer
from composer.core import Callback, Time
from composer.loggers import InMemoryLogger
from composer.optim import DecoupledSGDW

from composer_ext.algorithms import MagnitudePruning
from composer_ext.fairness.magnitude_pruning import agp_sparsity, compute_masks
from composer_ext.data import build_image_dataloader
from composer_ext.models import small_vgg
from composer_ext.testing import KillAt, Killed


def _model(seed=0):
    torch.manual_seed(seed)
    return small_vgg(num_classes=10, widths=[8, 16])


def _trainer(model, algorithms, max_duration='12ba', callbacks=(), loggers=(), batch_size=32, **kwargs):
    return Trainer(model=model, train_dataloader=build_image_dataloader('digits', batch_size, seed=1),
                   optimizers=DecoupledSGDW(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4),
                   max_duration=max_duration, algorithms=list(algorithms), callbacks=list(callbacks),
                   loggers=list(loggers), progress_bar=False, seed=1, **kwargs)


def test_agp_schedule_is_the_cubic_formula():
    s_i, s_f, t0, t1 = 0.05, 0.9, 10, 110
    for t in (10, 25, 60, 99, 110):
        expected = s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0)) ** 3
        assert agp_sparsity(t, t0, t1, s_i, s_f) == pytest.approx(expected, abs=1e-15)
    assert agp_sparsity(5, t0, t1, s_i, s_f) == 0.0  # before the window
    assert agp_sparsity(500, t0, t1, s_i, s_f) == s_f  # after it: fixed
    assert agp_sparsity(60, t0, t1, 0.0, 0.8, 'linear') == pytest.approx(0.4)
    assert agp_sparsity(10, t0, t1, 0.0, 0.8, 'one_shot') == 0.8


class _CheckMasks(Callback):
    """After every optimizer step (BATCH_END runs algorithms first, then callbacks) pruned weights must be 0."""

    def __init__(self, algorithm):
        self.algorithm, self.checked = algorithm, 0

    def batch_end(self, state, logger):
        for name, module in self.algorithm._layers:
            mask = self.algorithm.masks.get(f'{name}.weight')
            if mask is not None:
                assert torch.all(module.weight[~mask] == 0), name
                self.checked += int((~mask).sum())


def test_logged_sparsity_follows_the_schedule_and_masks_stay_applied():
    model = _model()
    pruning = MagnitudePruning(0.8, start='2ba', end='10ba', interval='2ba', initial_sparsity=0.1)
    logger, check = InMemoryLogger(), _CheckMasks(pruning)
    _trainer(model, [pruning], callbacks=[check], loggers=[logger]).fit()
    logged = [value for _, value in logger.data['pruning/target_sparsity']]
    expected = [0.8 + (0.1 - 0.8) * (1 - (t - 2) / 8) ** 3 for t in (2, 4, 6, 8, 10)]
    assert logged == pytest.approx(expected, abs=1e-12)
    measured = [value for _, value in logger.data['pruning/sparsity']]
    assert measured == pytest.approx(expected, abs=1e-3)  # exact up to rounding to whole weights
    assert check.checked > 0
    assert pruning.sparsity() == pytest.approx(0.8, abs=1e-3)
    # The classifier is not pruned; the momentum/weight-decay optimizer never revives a pruned weight.
    assert all(not name.endswith('classifier') for name, _ in pruning._layers)
    assert model.module.classifier.weight.ne(0).all()


def test_masks_select_smallest_magnitudes_globally_or_per_layer():
    g = torch.Generator().manual_seed(0)
    weights = {'a': torch.randn(4, 3, 3, 3, generator=g), 'b': 5 * torch.randn(8, 4, generator=g)}
    global_masks = compute_masks(weights, 0.5)
    pruned = torch.cat([w[~global_masks[n]].abs() for n, w in weights.items()])
    kept = torch.cat([w[global_masks[n]].abs() for n, w in weights.items()])
    assert pruned.numel() == 70 and pruned.max() <= kept.min()
    assert (~global_masks['a']).sum() > (~global_masks['b']).sum()  # global: the small-magnitude layer loses more
    layer_masks = compute_masks(weights, 0.5, scope='layer')
    assert int((~layer_masks['a']).sum()) == 54 and int((~layer_masks['b']).sum()) == 16
    filters = compute_masks(weights, 0.5, structure='filter', scope='layer')
    rows = filters['a'].reshape(4, -1)
    assert all(bool(row.all()) or not bool(row.any()) for row in rows) and int((~rows.any(1)).sum()) == 2
    # Masks only grow: once pruned, a weight stays pruned even if another is now smaller.
    grown = dict(weights)
    grown['a'] = weights['a'].clone()
    grown['a'][~global_masks['a']] = 100.0
    again = compute_masks(grown, 0.6, masks=global_masks)
    assert all(bool((~again[n])[~global_masks[n]].all()) for n in weights)


def test_filter_pruning_zeroes_whole_filters_and_their_bias():
    from composer.models import ComposerClassifier
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(288, 10))
    model = ComposerClassifier(net, num_classes=10)
    pruning = MagnitudePruning(0.5, start=0, end=0, schedule='one_shot', structure='filter', scope='layer')
    _trainer(model, [pruning], max_duration='3ba').fit()
    conv = net[0]
    dead = conv.weight.reshape(8, -1).eq(0).all(1)
    assert int(dead.sum()) == 4 and torch.all(conv.bias[dead] == 0) and torch.all(conv.bias[~dead] != 0)
    assert net[3].weight.ne(0).all()  # the output layer stays dense


def _run(tmp_path, name, kill=None, load_path=None, max_duration='12ba'):
    model = _model()
    pruning = MagnitudePruning(0.75, start='1ba', end='9ba', interval='2ba')
    logger = InMemoryLogger()
    callbacks = [KillAt(kill)] if kill else []
    trainer = _trainer(model, [pruning], max_duration=max_duration, callbacks=callbacks, loggers=[logger],
                       save_folder=str(tmp_path / name), save_interval='5ba', load_path=load_path)
    return trainer, pruning, logger


def test_resume_after_a_kill_matches_the_uninterrupted_run(tmp_path):
    full, full_pruning, full_log = _run(tmp_path, 'full')
    full.fit()
    interrupted, _, _ = _run(tmp_path, 'killed', kill=5)
    with pytest.raises(Killed):
        interrupted.fit()
    interrupted.close()
    checkpoint = tmp_path / 'killed' / 'ep0-ba5-rank0.pt'
    saved = torch.load(checkpoint, weights_only=False)['state']['algorithms']
    assert saved[0][0] == 'MagnitudePruning' and saved[0][1]['masks']
    resumed, resumed_pruning, resumed_log = _run(tmp_path, 'resumed', load_path=str(checkpoint))
    resumed.fit()
    assert resumed.state.timestamp.batch.value == 12
    for key, value in full.state.model.state_dict().items():
        assert torch.equal(value, resumed.state.model.state_dict()[key]), key
    for key, mask in full_pruning.masks.items():
        assert torch.equal(mask.cpu(), resumed_pruning.masks[key].cpu()), key
    after = [(ts.batch.value, v) for ts, v in full_log.data['pruning/target_sparsity'] if ts.batch.value > 5]
    assert after == [(ts.batch.value, v) for ts, v in resumed_log.data['pruning/target_sparsity']]
    full.close()
    resumed.close()


def test_fit_twice_and_repr_rebuilds():
    model = _model()
    pruning = MagnitudePruning(0.5, start=0, end=Time.from_timestring('4ba'), interval=1)
    trainer = _trainer(model, [pruning], max_duration='4ba')
    trainer.fit()
    masks = {k: v.clone() for k, v in pruning.masks.items()}
    trainer.fit(duration='2ba')  # a second FIT_START: the masks persist and stay applied
    assert all(torch.equal(masks[k], pruning.masks[k]) for k in masks)
    assert pruning.sparsity() == pytest.approx(0.5, abs=1e-3)
    rebuilt = eval(repr(pruning), {'MagnitudePruning': MagnitudePruning})
    assert repr(rebuilt) == repr(pruning)
    assert repr(pruning).startswith("MagnitudePruning(target_sparsity=0.5, start=0, end='4ba'")
    trainer.close()
    trainer.close()


def test_epoch_and_duration_times_resolve_to_batches():
    model = _model()
    pruning = MagnitudePruning(0.5, start='0dur', end='1ep', interval='0.25dur')
    _trainer(model, [pruning], max_duration='2ep', batch_size=256).fit()
    batches_per_epoch = 1437 // 256  # digits train split, drop_last
    assert pruning._window == ('ba', 0.0, float(batches_per_epoch), float(round(0.5 * batches_per_epoch)))
    assert pruning.sparsity() == pytest.approx(0.5, abs=1e-3)


@pytest.mark.parametrize('kwargs,error,match', [
    (dict(target_sparsity=1.0), ValueError, r'target_sparsity=1.0 is outside \[0, 1\)'),
    (dict(target_sparsity=0.5, initial_sparsity=0.6), ValueError, r'initial_sparsity=0.6 is above'),
    (dict(target_sparsity=0.5, start='0.5dur', end='0.2dur'), ValueError, r"end='0.2dur' is not after start='0.5dur'"),
    (dict(target_sparsity=0.5, schedule='cosine'), ValueError, r"schedule='cosine' is unknown.*'cubic'"),
    (dict(target_sparsity=0.5, structure='channel'), ValueError, r"structure='channel' is unknown"),
    (dict(target_sparsity=0.5, scope='model'), ValueError, r"scope='model' is unknown"),
    (dict(target_sparsity=0.5, start='soon'), ValueError, r"start='soon' is not a Composer time string"),
    (dict(target_sparsity=0.5, end='2dur'), ValueError, r"end='2dur' is beyond the end of training"),
    (dict(target_sparsity=0.5, interval=0), ValueError, r'interval=0 is zero'),
    (dict(target_sparsity=0.5, exclude='fc'), TypeError, r"exclude='fc' must be a list"),
    (dict(target_sparsity=0.5, prune_output_layer='yes'), TypeError,
     r"prune_output_layer='yes' is a str, not a bool. Fix: pass False"),
])
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        MagnitudePruning(**kwargs)


def test_mixed_units_that_cannot_be_aligned_fail_at_fit_start():
    model = _model()
    pruning = MagnitudePruning(0.5, start='0ba', end='1000sp')
    with pytest.raises(ValueError, match='cannot be put on one time axis'):
        _trainer(model, [pruning], max_duration='4ba').fit()


def test_composes_with_knowledge_distillation():
    from composer_ext.algorithms import KnowledgeDistillation
    teacher = _model(seed=3)
    _trainer(teacher, [], max_duration='6ba').fit()
    dense = {k: v.clone() for k, v in teacher.state_dict().items()}
    base = copy.deepcopy(teacher)  # the students' start (KD freezes the teacher module itself)

    def prune(with_kd):
        student = copy.deepcopy(base)
        pruning = MagnitudePruning(0.9, start=0, end='4ba', interval=1)
        distillation = KnowledgeDistillation([teacher], kd_weight=0.9, ce_weight=0.1, end='1dur',
                                             unload_after_window=False)
        logger = InMemoryLogger()
        _trainer(student, [pruning, distillation] if with_kd else [pruning], max_duration='6ba',
                 loggers=[logger]).fit()
        return student, pruning, distillation, logger

    student, pruning, distillation, logger = prune(with_kd=True)
    assert pruning.sparsity() == pytest.approx(0.9, abs=1e-3)
    assert any(key.startswith('kd/') for key in logger.data)
    # The teacher KD used is the dense model itself, neither pruned nor trained by the student's optimizer.
    assert distillation.teachers[0] is teacher
    assert all(torch.equal(value, dense[key]) for key, value in teacher.state_dict().items())
    from composer_ext.fairness.probe import weight_sparsity
    assert weight_sparsity(teacher) == 0.0 and weight_sparsity(student) > 0.8
    # Distillation changed training: same data, same seed, same masks schedule, other weights.
    plain, plain_pruning, _, plain_logger = prune(with_kd=False)
    assert not any(key.startswith('kd/') for key in plain_logger.data)
    assert all(p.requires_grad for p in plain.parameters())
    assert plain_pruning.sparsity() == pytest.approx(0.9, abs=1e-3)
    differences = [float((a - b).abs().max()) for a, b in zip(student.parameters(), plain.parameters())]
    assert max(differences) > 1e-3


def test_state_dict_keeps_composer_entries_and_round_trips():
    # Composer's Algorithm.state_dict() holds {'repr': ...}: checkpoint loading reads it back (KeyError: 'repr'
    # when a subclass drops it).
    pruning = MagnitudePruning(0.6, start='1ba', end='0.5dur', interval='2ba', structure='filter', scope='layer')
    g = torch.Generator().manual_seed(0)
    weights = {'a.weight': torch.randn(4, 3, generator=g), 'b.weight': torch.randn(6, 2, 3, 3, generator=g)}
    pruning.masks = compute_masks(weights, 0.5, 'filter', 'layer')
    state = pruning.state_dict()
    assert state['repr'] == repr(pruning) and set(state) == {'repr', 'masks'}
    rebuilt = eval(state['repr'], {'MagnitudePruning': MagnitudePruning})
    assert rebuilt.target_sparsity == 0.6 and rebuilt.structure == 'filter' and rebuilt.scope == 'layer'
    rebuilt.load_state_dict(state)
    again = rebuilt.state_dict()
    assert again['repr'] == state['repr'] and set(again['masks']) == {'a.weight', 'b.weight'}
    assert all(torch.equal(again['masks'][k], state['masks'][k]) for k in state['masks'])
    assert int((~again['masks']['a.weight']).sum()) == 6  # 2 of the 4 rows of a pruned whole: a real mask
