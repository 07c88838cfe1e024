"""The break-even study's arithmetic (examples/distillation/break_even.py): target, speed-ups, cache build, sweep."""

from __future__ import annotations

import math
import time
from types import SimpleNamespace

import pytest

from tests.conftest import load_example


@pytest.fixture(scope='module')
def study():
    return load_example('distillation', 'break_even')


def _run(curve, cpu, wall=None):
    return {'curve': curve, 'cpu_seconds': cpu, 'wall_seconds': wall or cpu, 'final_accuracy': curve[-1][1]}


COSTS = {'teachers': {'vgg6': {'flops_ratio': 0.58, 'forward_per_student_step': 0.37},
                      'vgg20x2_10ep': {'flops_ratio': 22.5, 'forward_per_student_step': 2.5},
                      'vgg20x2': {'flops_ratio': 22.5, 'forward_per_student_step': 2.5}}}


def _runs():
    steps = [25, 50, 75]
    return {
        # finals 0.846 and 0.8437: the target is 0.8437 rounded down to 0.005 = 0.840, reached at step 75 by both
        'baseline': [_run(list(zip(steps, [0.70, 0.80, 0.846])), list(zip(steps, [10.0, 20.0, 30.0]))),
                     _run(list(zip(steps, [0.70, 0.83, 0.8437])), list(zip(steps, [12.0, 23.0, 34.0])))],
        # step 50 on both seeds, at 40 and 44 s: 32 / 42 in seconds, 75 / 50 in steps
        'kd:vgg6': [_run(list(zip(steps, [0.75, 0.841, 0.85])), list(zip(steps, [20.0, 40.0, 50.0]))),
                    _run(list(zip(steps, [0.80, 0.845, 0.86])), list(zip(steps, [22.0, 44.0, 55.0])))],
        # the same curves from the cache: 20 s each, 32 / 20
        'kd:vgg6+cache': [_run(list(zip(steps, [0.75, 0.841, 0.85])), list(zip(steps, [10.0, 20.0, 30.0]))),
                          _run(list(zip(steps, [0.80, 0.845, 0.86])), list(zip(steps, [10.0, 20.0, 30.0])))],
        # seed 1 never reaches 0.84: no ratio, 1 of 2 reached
        'kd:vgg20x2': [_run(list(zip(steps, [0.80, 0.84, 0.85])), list(zip(steps, [5.0, 9.0, 13.0]))),
                       _run(list(zip(steps, [0.80, 0.83, 0.839])), list(zip(steps, [5.0, 9.0, 13.0])))],
        # a teacher trained longer at the same cost ratio as vgg20x2 (plotted as a marker of its own)
        'kd:vgg20x2_10ep': [_run(list(zip(steps, [0.84, 0.85, 0.86])), list(zip(steps, [5.0, 9.0, 13.0]))),
                            _run(list(zip(steps, [0.84, 0.85, 0.86])), list(zip(steps, [5.0, 9.0, 13.0])))],
    }


def test_summary_speedups_by_hand(study):
    summary = study.summarize(None, _runs(), {'vgg6': 10.0}, COSTS, 'cpu')
    assert summary['target_accuracy'] == pytest.approx(0.84)
    arms = summary['arms']
    assert arms['baseline']['steps_to_target'] == [75, 75] and arms['baseline']['speedup_seconds'] == 1.0
    live = arms['kd:vgg6']
    assert live['steps_to_target'] == [50, 50] and live['seconds_to_target'] == [40.0, 44.0]
    assert live['speedup_steps'] == pytest.approx(1.5)
    assert live['speedup_seconds'] == pytest.approx(32 / 42)
    assert live['cost']['flops_ratio'] == 0.58
    cached = arms['kd:vgg6+cache']
    assert cached['speedup_seconds'] == pytest.approx(32 / 20)
    assert cached['cache_build_seconds'] == 10.0
    assert cached['speedup_seconds_build_amortized'] == pytest.approx(32 / 25)  # 10 s over the 2 runs
    assert cached['speedup_seconds_build_in_one_run'] == pytest.approx(32 / 30)
    missed = arms['kd:vgg20x2']
    assert missed['reached'] == 1 and missed['steps_to_target'] == [50, None]
    assert missed['speedup_seconds'] is None and missed['speedup_steps'] is None
    assert arms['baseline']['train_seconds_mean'] == pytest.approx(32.0)  # seconds at the last evaluation


def test_summary_reads_the_chosen_clock(study):
    runs = _runs()
    for run in runs['kd:vgg6']:
        run['wall_seconds'] = [(b, 2 * s) for b, s in run['cpu_seconds']]
    wall = study.summarize(None, runs, {}, COSTS, 'wall')['arms']['kd:vgg6']
    assert wall['seconds_to_target'] == [80.0, 88.0]
    assert wall['speedup_seconds'] == pytest.approx(32 / 84)


def test_sweep_widens_once_past_the_edge_and_picks_the_best_mean(study, monkeypatch):
    finals = {0.02: 0.80, 0.05: 0.84, 0.1: 0.86, 0.2: 0.85, 0.4: 0.70}
    calls = []

    def fake_run(out, arm, seed, lr, **kwargs):
        calls.append((lr, seed))
        return {'final_accuracy': finals[lr] + 0.001 * seed}

    monkeypatch.setattr(study, 'run_student', fake_run)
    result = study.sweep(None, 'baseline', [0.02, 0.05, 0.1], [0, 1], lambda message: None)
    assert result['best_lr'] == 0.1  # 0.1 sat at the edge: 0.2 was tried and lost
    assert sorted({lr for lr, _ in calls}) == [0.02, 0.05, 0.1, 0.2]
    assert result['final_accuracy_mean']['0.2'] == pytest.approx(0.8505)

    finals.update({0.2: 0.90, 0.4: 0.95})  # still rising at the edge: one widening only (max_widen=1)
    calls.clear()
    result = study.sweep(None, 'kd', [0.05, 0.1], [0], lambda message: None, max_widen=1)
    assert result['best_lr'] == 0.2 and sorted({lr for lr, _ in calls}) == [0.05, 0.1, 0.2]


def test_train_clock_leaves_evaluation_out(study):
    clock = study.TrainClock()
    state = SimpleNamespace(timestamp=SimpleNamespace(batch=0))
    clock.fit_start(state, None)
    time.sleep(0.05)
    state.timestamp.batch = 25
    clock.eval_start(state, None)
    time.sleep(0.3)  # evaluation: not training time
    clock.eval_end(state, None)
    time.sleep(0.05)
    state.timestamp.batch = 50
    clock.eval_start(state, None)
    (first, _, wall_first), (second, _, wall_second) = clock.points
    assert (first, second) == (25, 50)
    assert 0.04 <= wall_first < 0.2 and 0.09 <= wall_second < 0.3, clock.points
    assert all(cpu < 0.1 for _, cpu, _ in clock.points)  # sleeping costs no CPU time


def test_plot_writes_a_png(study, tmp_path):
    runs = _runs()
    summary = study.summarize(None, runs, {'vgg6': 10.0}, COSTS, 'cpu')
    study.plot(summary, runs, tmp_path / 'plot.png')
    assert (tmp_path / 'plot.png').stat().st_size > 10_000
    assert not math.isnan(summary['arms']['kd:vgg6']['speedup_seconds'])


def test_speedups_at_lower_targets(study):
    arms = study.summarize(None, _runs(), {}, COSTS, 'cpu')['arms']
    # at 0.75 the baseline needs step 50 (0.80) on both seeds (20 and 23 s), kd:vgg6 steps 25 and 25 (20 and 22 s)
    assert arms['kd:vgg6']['speedup_by_target']['0.75'] == {'steps': pytest.approx(2.0),
                                                            'seconds': pytest.approx(43 / 42)}
    assert arms['kd:vgg20x2']['speedup_by_target']['0.84'] == {'steps': None, 'seconds': None}
    assert set(arms['baseline']['speedup_by_target']) == {f'{round(0.70 + 0.01 * i, 2):g}' for i in range(15)}
