"""The tiny reproduction (slow): a student distilled from 3 random teachers during the first half of training
reaches the target test accuracy in fewer steps than the same student without distillation.

Not a ``reproduction`` test (CI does not check this claim): the 3 teachers alone take 10-25 minutes on 2 CPU cores
from scratch, and at a size that fits CI (teachers of 1 epoch, 0.80-0.85 test accuracy; students of 300 steps) the
effect was within one 25-step evaluation of noise and changed sign with the target (seed 1: KD 225 vs baseline 250
steps to 0.75, but 200 vs 150 to 0.74), so no threshold held reliably. Run it by hand: ``pytest -m slow``.
"""

from __future__ import annotations

import json
import shutil

import pytest

from tests.conftest import ROOT, load_example



@pytest.mark.slow
@pytest.mark.timeout(3 * 3600)  # the 3 teachers take 10-25 minutes on 2 CPU cores when runs/distillation has none
def test_kd_student_reaches_the_target_accuracy_in_fewer_steps_than_the_baseline(tmp_path):
    module = load_example('distillation')
    # Training the 3 teachers takes 10-25 minutes on 2 CPU cores: start from those of a previous reproduction when
    # there are any. The script still checks each one (YAML hash, samples, epochs) and retrains any that differ.
    for name in module.TEACHERS:
        cached = ROOT / 'runs' / 'distillation' / name
        if (cached / 'done.json').exists():
            shutil.copytree(cached, tmp_path / name, symlinks=True)
    # The script's defaults (600 steps, lr 0.02, target 0.80) for its first seed; measured: baseline 500 steps,
    # KD 300 (examples/distillation/README.md).
    assert module.main(['--out', str(tmp_path), '--seeds', '0']) == 0
    results = json.loads((tmp_path / 'results.json').read_text())
    summary = results['summary']
    assert summary['target_accuracy'] == 0.80
    (baseline,), (kd,) = summary['steps_to_target']['baseline'], summary['steps_to_target']['kd']
    assert kd is not None, f'the KD student never reached the target: {summary}'
    assert baseline is None or kd < baseline, f'KD took {kd} steps, the baseline {baseline}'
    counts = results['runs']['kd'][0]['teacher_counts']
    assert len(counts) == 3 and all(c > 0 for c in counts)  # every teacher of the pool served some steps
    assert sum(counts) == 300  # one teacher per step during the first 50% of 600 steps, none after


def test_summary_of_hand_made_curves():
    """The summary's arithmetic on known curves (fast: no training)."""
    module = load_example('distillation')

    def run(curve):
        return {'curve': curve, 'train_seconds': [(step, step / 10) for step, _ in curve],
                'final_accuracy': curve[-1][1], 'seconds': 1.0}

    runs = {'baseline': [run([(25, 0.5), (50, 0.7), (75, 0.8), (100, 0.82)]),
                         run([(25, 0.6), (50, 0.81), (75, 0.8), (100, 0.8)])],
            'kd': [run([(25, 0.7), (50, 0.8), (75, 0.85), (100, 0.85)]),
                   run([(25, 0.81), (50, 0.8), (75, 0.79), (100, 0.79)])]}
    summary = module.summarize(runs, target=0.8)
    assert summary['steps_to_target'] == {'baseline': [75, 50], 'kd': [50, 25]}
    assert summary['speedup_mean_steps'] == pytest.approx((75 + 50) / (50 + 25))
    assert summary['speedup_per_seed'] == [1.5, 2.0]
    assert summary['train_seconds_to_target'] == {'baseline': [7.5, 5.0], 'kd': [5.0, 2.5]}
    # Each seed against its own baseline's final accuracy (0.82 and 0.80): the second KD run ends below 0.80 but got
    # there at step 25.
    assert summary['steps_to_baseline_final'] == {'baseline': [100, 50], 'kd': [75, 25]}
    assert summary['speedup_to_baseline_final_per_seed'] == [pytest.approx(100 / 75), 2.0]
    assert summary['speedup_mean_steps_by_target']['0.8'] == summary['speedup_mean_steps']
    assert summary['speedup_mean_steps_by_target']['0.85'] is None  # no baseline reaches 0.85
    runs['kd'][1] = run([(25, 0.5), (50, 0.6), (75, 0.7), (100, 0.75)])
    assert module.summarize(runs, target=0.8)['speedup_mean_steps'] is None  # a run that never gets there: no ratio
