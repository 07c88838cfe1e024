"""Domain upsampling, data side: MixtureSchedule (weights, resolution, errors) and MixtureDataset (fractions,
determinism, disjoint ranks, workers, resumption, errors) on the embedded corpus."""

import itertools
import math

import numpy as np
import pytest
from torch.utils.data import DataLoader

from composer_ext.domain_upsampling.mixture import MixtureDataLoader, MixtureDataset, build_mixture_dataloader
from composer_ext.domain_upsampling.schedule import MixtureSchedule
from composer_ext.testing import run_distributed

DOMAINS = ('code', 'dialogue', 'legal', 'math', 'prose', 'technical')
BASE = {'code': 0.2, 'dialogue': 0.15, 'legal': 0.15, 'math': 0.2, 'prose': 0.2, 'technical': 0.1}
TARGET = {'code': 0.1, 'dialogue': 0.1, 'legal': 0.1, 'math': 0.5, 'prose': 0.1, 'technical': 0.1}


def _streaming(corpus, domains=DOMAINS):
    from streaming import StreamingDataset
    return {d: StreamingDataset(local=str(corpus.path(d)), batch_size=8, shuffle=False) for d in domains}


@pytest.fixture(scope='module')
def domains(corpus):
    return _streaming(corpus)


# --- MixtureSchedule --------------------------------------------------------------------------------------


def test_step_schedule_switches_at_start():
    schedule = MixtureSchedule(BASE, TARGET, start='0.8dur')
    assert schedule.weights(0.0) == BASE and schedule.weights(0.79) == BASE
    assert schedule.weights(0.8) == pytest.approx(TARGET) and schedule.weights(1.0) == pytest.approx(TARGET)
    assert schedule.alpha(0.5) == 0.0 and schedule.alpha(0.9) == 1.0


def test_linear_and_cosine_ramps_hand_computed():
    linear = MixtureSchedule({'a': 1.0}, {'b': 1.0}, start='0.5dur', ramp='linear', ramp_duration='0.2dur')
    assert linear.alpha(0.5) == 0.0 and linear.alpha(0.6) == pytest.approx(0.5)
    assert linear.alpha(0.7) == pytest.approx(1)
    assert linear.alpha(0.75) == 1.0
    assert linear.weights(0.55) == pytest.approx({'a': 0.75, 'b': 0.25})
    cosine = MixtureSchedule({'a': 1.0}, {'b': 1.0}, start='0.5dur', ramp='cosine', ramp_duration='0.2dur')
    assert cosine.alpha(0.55) == pytest.approx(0.5 * (1 - math.cos(math.pi * 0.25)))
    assert cosine.alpha(0.6) == pytest.approx(0.5)
    to_end = MixtureSchedule({'a': 1.0}, {'b': 1.0}, start='0.6dur', ramp='linear')  # ramps until the end
    assert to_end.alpha(0.8) == pytest.approx(0.5) and to_end.alpha(1.0) == 1.0


def test_normalize_and_missing_domains_are_zero():
    schedule = MixtureSchedule({'a': 3, 'b': 1}, {'c': 2}, start='0.5dur', normalize=True)
    assert schedule.domains == ('a', 'b', 'c')
    assert schedule.base == {'a': 0.75, 'b': 0.25, 'c': 0.0}
    assert schedule.target == {'a': 0.0, 'b': 0.0, 'c': 1.0}


@pytest.mark.parametrize('start,max_duration,extra,fraction', [
    ('0.9dur', '600ba', {}, 0.9),
    ('480ba', '600ba', {}, 0.8),
    ('480ba', '9600sp', {'samples_per_batch': 16}, 0.8),
    ('7680sp', '600ba', {'samples_per_batch': 16}, 0.8),
    ('9e5tok', '1e6tok', {}, 0.9),
    ('9e5tok', '1000ba', {'samples_per_batch': 8, 'tokens_per_sample': 125}, 0.9),
    ('1ep', '2ep', {}, 0.5),
    ('1ep', '400ba', {'samples_per_batch': 10, 'samples_per_epoch': 3000}, 0.75),
])
def test_resolve_places_start_on_the_run(start, max_duration, extra, fraction):
    resolved = MixtureSchedule(BASE, TARGET, start=start).resolve(max_duration, **extra)
    assert resolved.is_resolved and resolved.start.value == pytest.approx(fraction)
    assert resolved.weights(fraction) == pytest.approx(TARGET)


def test_resolve_ramp_duration():
    resolved = MixtureSchedule(BASE, TARGET, start='400ba', ramp='cosine', ramp_duration='100ba').resolve('500ba')
    assert (resolved.start.value, resolved.ramp_duration.value) == pytest.approx((0.8, 0.2))


def test_repr_rebuilds_and_equality():
    schedule = MixtureSchedule(BASE, TARGET, start='0.85dur', ramp='linear', ramp_duration='0.1dur')
    rebuilt = eval(repr(schedule))
    assert rebuilt == schedule and hash(rebuilt) == hash(schedule)
    assert MixtureSchedule.constant(BASE) == eval(repr(MixtureSchedule.constant(BASE)))
    assert schedule != MixtureSchedule(BASE, TARGET, start='0.8dur', ramp='linear', ramp_duration='0.1dur')


@pytest.mark.parametrize('kwargs,match', [
    ({'base': {'a': -0.1, 'b': 1.1}}, r"base\['a'\]=-0.1 is negative"),
    ({'target': {'a': 0.5, 'b': 0.4}}, r'target weights sum to 0.9, not 1 .*normalize=True'),
    ({'base': {'a': 0.0}, 'normalize': True}, r'base=.* has no positive weight'),
    ({'base': {}}, r'base=\{\} is not a non-empty mapping'),
    ({'base': {'a': float('nan')}}, r"base\['a'\]=nan is not a finite number"),
    ({'start': '1.5dur'}, r"start='1.5dur' is after the end of training"),
    ({'start': 'soon'}, r"start='soon' is not a Composer time string"),
    ({'start': '-5ba'}, r"start='-5ba' is negative"),
    ({'start': '10sec'}, r"start='10sec' is in 'sec'"),
    ({'ramp': 'exp'}, r"ramp='exp' is not a ramp.*'step', 'linear', 'cosine'"),
    ({'ramp_duration': '0.1dur'}, r"ramp_duration='0.1dur' is only used by the 'linear' and 'cosine' ramps"),
    ({'start': '0.9dur', 'ramp': 'linear', 'ramp_duration': '0.2dur'}, r'ends after the end of training'),
])
def test_schedule_bad_input(kwargs, match):
    arguments = {'base': {'a': 0.5, 'b': 0.5}, 'target': {'a': 0.2, 'b': 0.8}, **kwargs}
    with pytest.raises(ValueError, match=match):
        MixtureSchedule(**arguments)


@pytest.mark.parametrize('kwargs,match', [
    ({'base': {'a': 'half', 'b': 0.5}}, r"base\['a'\]='half' is a str, not a number. Fix: .*base\['a'\]=0.5"),
    ({'target': {'a': None, 'b': 1.0}}, r"target\['a'\]=None is a NoneType, not a number"),
    ({'base': {'a': True}}, r"base\['a'\]=True is a bool, not a number"),
    ({'base': [('a', 1.0)]}, r"base=\[\('a', 1.0\)\] is a list, not a mapping of domain -> weight"),
    ({'base': {1: 1.0}}, r'base has the key 1, a int, not a domain name'),
    ({'start': 0.5}, r"start=0.5 is a float, not a time. Fix: .*'0.9dur'"),
])
def test_schedule_wrong_types_raise_type_error(kwargs, match):
    arguments = {'base': {'a': 0.5, 'b': 0.5}, 'target': {'a': 0.2, 'b': 0.8}, **kwargs}
    with pytest.raises(TypeError, match=match):
        MixtureSchedule(**arguments)


@pytest.mark.parametrize('ramp', ['linear', 'cosine'])
def test_projected_draws_of_a_ramp_hand_computed_without_numpy_2(monkeypatch, domains, ramp):
    # Base 'math' only, target 'prose' only, the ramp over the second half of 1000 samples: the mean alpha is
    # 1/4 for both ramps (a linear ramp averages 1/2 over its half, and so does 0.5 * (1 - cos(pi t))).
    monkeypatch.delattr(np, 'trapezoid', raising=False)  # numpy 1.x has no np.trapezoid
    schedule = MixtureSchedule({'math': 1.0, 'prose': 0.0}, {'prose': 1.0}, start='0.5dur', ramp=ramp)
    dataset = MixtureDataset({'math': domains['math'], 'prose': domains['prose']}, schedule, num_samples=1000)
    assert dataset.plan.expected_draws(0, 1000) == pytest.approx([750, 250], rel=1e-6)
    assert dataset.plan.expected_draws(500, 1000) == pytest.approx([250, 250], rel=1e-6)
    served = np.bincount(dataset.domain_of(np.arange(1000)), minlength=2)
    assert served == pytest.approx([750, 250], abs=2)  # the real draws follow the projection


@pytest.mark.parametrize('start,max_duration,extra,match', [
    ('700ba', '600ba', {}, r"start='700ba' is after the end of training \(max_duration='600ba'\)"),
    ('9e9tok', '600ba', {'samples_per_batch': 16},
     r"start='9000000000tok' is in tokens .* no token count .* Fix: pass tokens_per_sample="),
    ('480ba', '1e6tok', {}, r"start='480ba' is in batches .* no samples_per_batch"),
    ('1ep', '600ba', {'samples_per_batch': 16}, r"start='1ep' is in epochs .* no samples_per_epoch"),
])
def test_resolve_bad_input(start, max_duration, extra, match):
    with pytest.raises(ValueError, match=match):
        MixtureSchedule(BASE, TARGET, start=start).resolve(max_duration, **extra)


def test_weights_need_a_resolved_schedule_and_valid_progress():
    with pytest.raises(ValueError, match=r"start='480ba' .* not a fraction of training.* Fix: call schedule.resolve"):
        MixtureSchedule(BASE, TARGET, start='480ba').weights(0.5)
    with pytest.raises(ValueError, match=r'progress=1.2 is not a fraction of training'):
        MixtureSchedule(BASE, TARGET).weights(1.2)


# --- MixtureDataset ---------------------------------------------------------------------------------------


def _max_window_error(domain_ids: np.ndarray, targets: np.ndarray, window: int = 5000) -> float:
    """Largest |achieved - target| fraction of any domain over EVERY window of ``window`` samples or more (every
    start; lengths window, 1.5x, 2x, 3x, 4x as far as the sequence reaches)."""
    onehot = np.eye(targets.shape[1])[domain_ids]
    gap = np.vstack([np.zeros(targets.shape[1]), np.cumsum(onehot - targets, axis=0)])  # achieved - target so far
    worst = 0.0
    for length in sorted({int(window * f) for f in (1, 1.5, 2, 3, 4)}):
        if length <= len(domain_ids):
            worst = max(worst, float(np.abs(gap[length:] - gap[:-length]).max()) / length)
    return worst


@pytest.mark.parametrize('ramp,ramp_duration', [('step', None), ('linear', '0.3dur')])
def test_achieved_fractions_track_the_schedule_over_any_window(domains, ramp, ramp_duration):
    schedule = MixtureSchedule(BASE, TARGET, start='0.5dur', ramp=ramp, ramp_duration=ramp_duration)
    dataset = MixtureDataset(domains, schedule, num_samples=24_000, seed=5)
    served = np.array([dataset.domain_names.index(sample['domain']) for sample in dataset])
    assert len(served) == 24_000
    targets = dataset.plan.weights(np.arange(24_000))
    assert _max_window_error(served, targets) < 0.02  # the bar; stratified choices are far inside it
    assert _max_window_error(served, targets, window=1000) < 0.005
    math_index = dataset.domain_names.index('math')
    assert (served[:12_000] == math_index).mean() == pytest.approx(0.2, abs=0.002)
    if ramp == 'step':
        assert (served[12_000:] == math_index).mean() == pytest.approx(0.5, abs=0.002)


def test_random_sampling_is_independent_draws(domains):
    dataset = MixtureDataset(domains, MixtureSchedule.constant(BASE), num_samples=6000, sampling='random')
    served = dataset.domain_of(np.arange(6000))
    stratified = MixtureDataset(domains, MixtureSchedule.constant(BASE), num_samples=6000).domain_of(np.arange(6000))
    assert not np.array_equal(served, stratified)
    assert np.bincount(served, minlength=6) / 6000 == pytest.approx(list(BASE.values()), abs=0.02)


def test_the_sequence_is_a_pure_function_of_seed_and_position(domains):
    schedule = MixtureSchedule(BASE, TARGET, start='0.5dur')
    first = [s['uid'] for s in MixtureDataset(domains, schedule, num_samples=400, seed=1)]
    again = [s['uid'] for s in MixtureDataset(domains, schedule, num_samples=400, seed=1)]
    other = [s['uid'] for s in MixtureDataset(domains, schedule, num_samples=400, seed=2)]
    assert first == again and first != other
    dataset = MixtureDataset(domains, schedule, num_samples=400, seed=1)
    assert [dataset.domain_names[d] for d in dataset.domain_of(range(400))] == [u.split('/')[0] for u in first]
    assert len(set(first)) == 400  # no domain is exhausted, so no sample repeats


def test_samples_are_yielded_unchanged(domains):
    small = {'math': [domains['math'][i] for i in range(20)], 'prose': [domains['prose'][i] for i in range(20)]}
    dataset = MixtureDataset(small, MixtureSchedule.constant({'math': 0.5, 'prose': 0.5}), num_samples=30)
    for sample in dataset:
        assert any(sample is original for original in small[sample['domain']])


def test_each_pass_reads_every_sample_once_before_repeating(domains):
    small = {'math': [domains['math'][i] for i in range(7)], 'prose': [domains['prose'][i] for i in range(5)]}
    dataset = MixtureDataset(small, MixtureSchedule.constant({'math': 0.5, 'prose': 0.5}), num_samples=70, seed=3)
    uids = [s['uid'] for s in dataset if s['domain'] == 'math']
    assert abs(len(uids) - 35) <= 1
    for p in range(len(uids) // 7):
        assert sorted(uids[7 * p:7 * p + 7]) == sorted(x['uid'] for x in small['math'])
    assert uids[:7] != uids[7:14]  # a fresh permutation on every pass
    assert dataset.passes_at(70).tolist() == [len(uids) / 7, (70 - len(uids)) / 5]


def _uids(rows):
    return [r['uid'] for r in rows]


@pytest.mark.filterwarnings('ignore:This DataLoader will create 3 worker processes:UserWarning')  # 2-core machines
def test_dataloader_workers_keep_the_order(domains):
    schedule = MixtureSchedule(BASE, TARGET, start='0.5dur')

    def make():
        return MixtureDataset(domains, schedule, num_samples=96, seed=4, batch_size=8)

    single = list(DataLoader(make(), batch_size=8, collate_fn=_uids))
    parallel = list(DataLoader(make(), batch_size=8, collate_fn=_uids, num_workers=2))
    assert len(single) == 12 and parallel == single
    # Resumed at an odd batch: PyTorch reads worker 0 first, so worker 0 must hold the first batch of the pass.
    for workers, batch in ((2, 3), (3, 5)):
        resumed = make()
        resumed.set_epoch(0, batch * 8)
        assert list(DataLoader(resumed, batch_size=8, collate_fn=_uids, num_workers=workers)) == single[batch:]


def test_epochs_with_dataloader_workers(domains):
    schedule = MixtureSchedule(BASE, TARGET, start='0.5dur')

    def make():
        return MixtureDataset(domains, schedule, num_samples=48, seed=4, batch_size=8)

    reference = make()
    epochs = [list(DataLoader(reference, batch_size=8, collate_fn=_uids)) for _ in range(3)]
    assert epochs[0] != epochs[1] != epochs[2]
    # MixtureDataLoader counts the passes in the main process: each epoch is new, as without workers.
    dataset = make()
    loader = MixtureDataLoader(dataset, batch_size=8, collate_fn=_uids, num_workers=2)
    assert list(loader) == epochs[0] and list(loader) == epochs[1]
    assert dataset.state_dict(0, True)['epoch'] == 2 and dataset.state_dict(48, True)['epoch'] == 1
    # A pass stopped early is served again (Composer skips what it trained), unless resumed from a state.
    iterator = iter(loader)
    assert [next(iterator) for _ in range(2)] == epochs[2][:2]
    del iterator
    assert list(loader) == epochs[2]
    resumed = make()
    resumed.load_state_dict(dataset.state_dict(16, True))  # epoch 2 after its first 2 batches
    continued = MixtureDataLoader(resumed, batch_size=8, collate_fn=_uids, num_workers=2)
    iterator = iter(continued)
    assert next(iterator) == epochs[2][2]
    del iterator
    assert list(continued) == epochs[2][3:]
    # A plain DataLoader's workers cannot count epochs: the second pass refuses instead of repeating epoch 0.
    plain = DataLoader(make(), batch_size=8, collate_fn=_uids, num_workers=2)
    assert list(plain) == epochs[0]
    with pytest.raises(ValueError, match=r'nothing set its epoch since the last pass .* serve epoch 0 again. Fix: .*'
                       r'MixtureDataLoader'):
        list(plain)
    plain.dataset.set_epoch(1)
    assert list(plain) == epochs[1]  # setting the epoch (as DomainUpsampling does) is enough
    # Persistent workers read the epoch from shared memory too, and refuse a schedule installed after they started.
    kept = MixtureDataLoader(make(), batch_size=8, collate_fn=_uids, num_workers=2, persistent_workers=True)
    assert list(kept) == epochs[0] and list(kept) == epochs[1]
    kept.dataset.bind(MixtureSchedule(BASE, TARGET, start='0.25dur'), total_samples=96)
    with pytest.raises(ValueError, match=r'holds a copy of this MixtureDataset from before .* Fix: use '
                       r'persistent_workers=False'):
        list(kept)
    with pytest.raises(ValueError, match=r"batch_size=4 differs from the dataset's batch_size=8"):
        MixtureDataLoader(make(), batch_size=4, num_workers=2)
    with pytest.raises(TypeError, match=r'dataset=.* is a list, not a MixtureDataset'):
        MixtureDataLoader([1, 2], batch_size=1)


def test_resume_from_state_dict_continues_exactly(domains):
    schedule = MixtureSchedule(BASE, TARGET, start='0.5dur')

    def make():
        return MixtureDataset(domains, schedule, num_samples=400, seed=9, batch_size=8)

    reference = make()
    epochs = [[s['uid'] for s in reference] for _ in range(2)]
    assert epochs[0] != epochs[1]
    for consumed in (96, 200, 304):  # before the switch (200), at it, after it
        first = make()
        iterator = iter(first)
        seen = [next(iterator)['uid'] for _ in range(consumed)]
        assert seen == epochs[0][:consumed]
        state = first.state_dict(consumed, True)
        assert state['position'] == consumed and sum(state['draws'].values()) == consumed
        resumed = make()
        resumed.load_state_dict(state)
        assert [s['uid'] for s in resumed] == epochs[0][consumed:]
        assert [s['uid'] for s in resumed] == epochs[1]  # the next __iter__ is the next epoch
    # A checkpoint right at an epoch boundary (Composer reports 0 samples into the new epoch).
    finished = make()
    list(finished)
    boundary = make()
    boundary.load_state_dict(finished.state_dict(0, True))
    assert [s['uid'] for s in boundary] == epochs[1]


def test_resume_after_a_schedule_change_continues_each_domain_from_the_saved_draws(domains):
    # Positions 16-31 are drawn under `early` (after its switch: math-heavy); `late` places them before its switch.
    # A resumed dataset follows `late`, so only the saved per-domain draws tell it how far each domain was read.
    early, late = (MixtureSchedule(BASE, TARGET, start=s) for s in ('0.125dur', '0.75dur'))

    def make():
        return MixtureDataset(domains, MixtureSchedule.constant(BASE), num_samples=128, seed=5, batch_size=8)

    run = make()
    run.bind(early, total_samples=128)
    first = [s['uid'] for s in itertools.islice(run, 32)]  # a pass stopped after 32 samples (4 batches)
    run.bind(late, total_samples=128, served=32)  # a second fit: the schedule changes mid-run
    run.set_epoch(0, 32)
    iterator = iter(run)
    middle = [next(iterator)['uid'] for _ in range(24)]
    state = run.state_dict(56, True)
    rest = [s['uid'] for s in iterator]
    next_epoch = [s['uid'] for s in run]
    assert len(first) == 32 and len(rest) == 128 - 56 and len(next_epoch) == 128
    assert sum(u.startswith('math/') for u in first[16:]) >= 6  # 16 samples at 0.5 math under `early`
    late_only = make()
    late_only.bind(late, total_samples=128)
    assert state['position'] == 56 and list(state['draws'].values()) == list(run.draws_at(56))
    assert list(state['draws'].values()) != list(late_only.draws_at(56))  # the draws differ from `late` alone
    for bind_first in (False, True):  # Composer loads the state before FIT_START binds; either order works
        resumed = make()
        if bind_first:
            resumed.bind(late, total_samples=128)
            resumed.draws_at(120)  # counted from 0 under `late` (e.g. by a state_dict() before the resume)
        resumed.load_state_dict(state)
        if not bind_first:
            resumed.bind(late, total_samples=128, served=56)  # as DomainUpsampling does at FIT_START
        assert [s['uid'] for s in resumed] == rest
        assert [s['uid'] for s in resumed] == next_epoch  # counted on from the loaded draws, not the earlier count
    assert len(set(first + middle + rest)) == 128  # no domain sample was read twice across the change


def test_load_state_dict_refuses_a_state_of_other_settings(domains):
    schedule = MixtureSchedule(BASE, TARGET, start='0.5dur')
    state = MixtureDataset(domains, schedule, num_samples=400, seed=9, batch_size=8).state_dict(96, True)
    cases = [
        ({'seed': 10}, r'dataset state has seed=9, but this MixtureDataset has seed=10, .* Fix: build the '
                       r'MixtureDataset \(train_loader.seed\) with seed=9'),
        ({'num_samples': 800}, r'has samples_per_epoch=400, but this MixtureDataset has samples_per_epoch=800'),
        ({'sampling': 'random'}, r"has sampling='stratified', but .* sampling='random'"),
        ({'shuffle': False}, r'has shuffle=True, but .* shuffle=False'),
    ]
    for change, match in cases:
        arguments = {'num_samples': 400, 'seed': 9, 'batch_size': 8, **change}
        with pytest.raises(ValueError, match=match):
            MixtureDataset(domains, schedule, **arguments).load_state_dict(state)
    fewer = {**domains, 'math': [domains['math'][i] for i in range(50)]}
    with pytest.raises(ValueError, match=r"has domains=\{.*'math': 12285.*\}, but this MixtureDataset has "
                       r"domains=\{.*'math': 50.*\}.* Fix: give the dataset the same domains"):
        MixtureDataset(fewer, schedule, num_samples=400, seed=9, batch_size=8).load_state_dict(state)
    reordered = {d: domains[d] for d in reversed(DOMAINS)}
    with pytest.raises(ValueError, match=r"has domain_names=\['code', .*\], but this MixtureDataset has "
                       r"domain_names=\['technical', .*in the same order"):
        MixtureDataset(reordered, schedule, num_samples=400, seed=9, batch_size=8).load_state_dict(state)
    with pytest.raises(ValueError, match=r"the dataset state lacks \['position', 'draws'\]"):
        MixtureDataset(domains, schedule, num_samples=400, seed=9).load_state_dict({'epoch': 0, 'sample_in_epoch': 0})


def test_bind_places_the_schedule_on_the_run(domains):
    schedule = MixtureSchedule(BASE, TARGET, start='480ba')
    dataset = MixtureDataset(domains, MixtureSchedule.constant(BASE), num_samples=100_000, batch_size=16)
    dataset.bind(schedule, total_samples=600 * 16)
    assert dataset.plan.start_sample == 480 * 16
    assert dataset.target_fractions(480 * 16 - 160, 480 * 16) == pytest.approx(list(BASE.values()))
    assert dataset.target_fractions(480 * 16, 480 * 16 + 160) == pytest.approx(list(TARGET.values()))
    assert dataset.schedule is schedule


def test_dataset_bad_input(domains, corpus):
    with pytest.raises(ValueError, match=r"the target mix gives 'poetry' weight 0.5, but domains has no dataset named "
                       r"'poetry'"):
        MixtureDataset(domains, MixtureSchedule(BASE, {'poetry': 0.5, 'math': 0.5}), num_samples=100)
    empty = {**domains, 'math': []}
    with pytest.raises(ValueError, match=r"the target mix gives 'math' weight 0.5, but domains\['math'\] has no "
                       r'samples'):
        MixtureDataset(empty, MixtureSchedule(BASE, TARGET), num_samples=100)
    with pytest.raises(ValueError, match=r"domains has datasets \['technical'\] that the schedule does not name"):
        MixtureDataset(domains, MixtureSchedule.constant({d: w for d, w in BASE.items() if d != 'technical'},
                                                         normalize=True), num_samples=100)
    with pytest.raises(ValueError, match=r'num_samples=4 is less than one global batch \(8 samples'):
        MixtureDataset(domains, MixtureSchedule.constant(BASE), num_samples=4, batch_size=8)
    with pytest.raises(ValueError, match=r'num_samples=0 is invalid'):
        MixtureDataset(domains, MixtureSchedule.constant(BASE), num_samples=0)
    with pytest.raises(TypeError, match=r"num_samples='100' is a str, not an int"):
        MixtureDataset(domains, MixtureSchedule.constant(BASE), num_samples='100')
    with pytest.raises(TypeError, match=r'batch_size=8.0 is a float, not an int'):
        MixtureDataset(domains, MixtureSchedule.constant(BASE), num_samples=100, batch_size=8.0)
    with pytest.raises(TypeError, match=r'schedule=.* is not a MixtureSchedule'):
        MixtureDataset(domains, BASE, num_samples=100)
    with pytest.raises(ValueError, match=r"sampling='sobol' is not a sampling mode"):
        MixtureDataset(domains, MixtureSchedule.constant(BASE), num_samples=100, sampling='sobol')
    with pytest.raises(ValueError, match=r"start='480ba' is in batches .*attach DomainUpsampling"):
        MixtureDataset(domains, MixtureSchedule(BASE, TARGET, start='480ba'), num_samples=100).plan
    no_batch = MixtureDataset(domains, MixtureSchedule.constant(BASE), num_samples=100)
    with pytest.raises(ValueError, match=r'read by 2 DataLoader workers but has no batch_size'):
        list(DataLoader(no_batch, batch_size=4, num_workers=2, collate_fn=list))


def test_text_mixture_dataloader_batches(corpus):
    spec = build_mixture_dataloader(batch_size=8, domains=['math', 'prose'], weights={'math': 3, 'prose': 1},
                                    normalize=True, num_samples=800, seq_len=64)
    batches = list(spec.dataloader)
    assert len(batches) == 100 and batches[0]['input_ids'].shape == (8, 64)
    served = [d for b in batches for d in b['domain']]
    assert served.count('math') / len(served) == pytest.approx(0.75, abs=0.01)
    assert spec.get_num_tokens_in_batch(batches[0]) == int(batches[0]['attention_mask'].sum())
    natural = build_mixture_dataloader(batch_size=8, domains='all', seq_len=64).dataloader.dataset
    assert natural.schedule.base['prose'] == pytest.approx(13395 / 59551, abs=1e-3)
    with pytest.raises(ValueError, match=r'weights sum to 4, not 1'):
        build_mixture_dataloader(batch_size=8, domains=['math', 'prose'], weights={'math': 3, 'prose': 1})


# --- two gloo ranks ---------------------------------------------------------------------------------------


def _rank_samples(num_samples: int) -> dict:
    from composer.utils import dist

    from composer_ext.data import ensure_corpus

    corpus = ensure_corpus()
    schedule = MixtureSchedule(BASE, TARGET, start='0.5dur')
    dataset = MixtureDataset(_streaming(corpus), schedule, num_samples=num_samples, seed=5, batch_size=8)
    served = [(s['uid'], s['domain']) for s in dataset]
    return {'rank': dist.get_global_rank(), 'served': served, 'length': len(dataset)}


@pytest.mark.distributed
def test_two_ranks_get_disjoint_samples_that_interleave_to_the_single_process_sequence(domains):
    num_samples = 20_000
    ranks = run_distributed(_rank_samples, world_size=2, args=(num_samples,), timeout=600)
    single = MixtureDataset(domains, MixtureSchedule(BASE, TARGET, start='0.5dur'), num_samples=num_samples, seed=5,
                            batch_size=16)
    reference = [(s['uid'], s['domain']) for s in single]
    zero, one = ranks[0]['served'], ranks[1]['served']
    assert ranks[0]['length'] == ranks[1]['length'] == len(zero) == len(one) == num_samples // 2
    assert not {u for u, _ in zero} & {u for u, _ in one}
    assert [x for pair in zip(zero, one) for x in pair] == reference
    targets = single.plan.weights(np.arange(num_samples))
    for rank, served in ((0, zero), (1, one)):
        ids = np.array([single.domain_names.index(d) for _, d in served])
        assert _max_window_error(ids, targets[rank::2]) < 0.02


# --- MDSDataset -------------------------------------------------------------------------------------------


def test_mds_dataset_reads_what_streaming_reads(corpus, domains):
    from composer_ext.domain_upsampling.mixture import MDSDataset
    math = MDSDataset(corpus.path('math'))
    reference = domains['math']
    assert len(math) == reference.num_samples == 12285
    for index in (0, 1, 2215, 2216, 7000, len(math) - 1):  # both sides of a shard boundary, and the last
        ours, theirs = math[index], reference[index]
        assert ours.keys() == theirs.keys() and ours['uid'] == theirs['uid'] and ours['text'] == theirs['text']
        assert np.array_equal(ours['tokens'], theirs['tokens']) and ours['tokens'].dtype == np.uint16
    with pytest.raises(IndexError, match=r'index=12285 is out of range for 12285 samples'):
        math[12285]
    with pytest.raises(ValueError, match=r'is not an MDS directory \(no index.json\)'):
        MDSDataset(corpus.root)
    import pickle
    assert pickle.loads(pickle.dumps(math))[5]['uid'] == math[5]['uid']


def test_mds_datasets_share_a_cap_on_open_shard_maps(corpus, monkeypatch):
    # Past the cap, the oldest map (of whichever dataset) is closed; reading its shard again reopens it.
    import collections

    from composer_ext.data import mds
    monkeypatch.setattr(mds, 'MAX_OPEN_SHARD_MAPS', 2)
    monkeypatch.setattr(mds, '_open_maps', collections.deque())
    first, second = mds.MDSDataset(corpus.path('code')), mds.MDSDataset(corpus.path('code'))
    ids = list(range(0, len(first), 97)) + list(range(len(first) - 1, 0, -97))  # every shard, both directions
    expected = [first[i]['uid'] for i in ids]
    assert [second[i]['uid'] for i in ids] == expected and first.num_shards > 2
    assert len(mds._open_maps) == 2 and len(first._maps) + len(second._maps) == 2
