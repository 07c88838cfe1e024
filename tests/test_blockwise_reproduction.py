"""The tiny reproduction: examples/blockwise/reproduce.py meets the issue's bar end to end.

A small VGG teacher on Fashion-MNIST becomes a depthwise-separable student with at least 2x fewer parameters
whose finetuned test accuracy is within 3 points of the teacher's. Everything (teacher checkpoints, blocks,
report) goes to a temporary folder, so the run starts from scratch and leaves the repository's runs/ alone.
``pytest -m reproduction`` checks the bar at the scaled-down size (``reproduce.py --ci``; ``.ci/run`` runs it on every
change); the full size (the numbers of examples/blockwise/README.md) stays a ``slow`` test run by hand.
"""

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def _check_report(output, max_gap):
    report = json.loads((output / 'report.json').read_text())
    assert report['teacher']['params'] >= 2 * report['student']['params']
    assert report['compression']['params_ratio'] >= 2.0
    accuracy = report['accuracy']
    assert accuracy['teacher'] - accuracy['finetuned'] <= max_gap, accuracy
    assert accuracy['teacher'] > 0.8  # a real teacher, not a degenerate one that makes the gap trivial
    assert set(report['blocks']) == {f'module.features.{i}' for i in (1, 3, 4, 6, 7)}
    assert (output / 'report.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    return report


@pytest.mark.reproduction
@pytest.mark.slow
@pytest.mark.timeout(3600)  # teacher, 5 blocks, finetune: ~10.8 CPU-minutes (40 min measured at load 10-22)
def test_ci_reproduction_student_is_2x_smaller_and_close_to_the_teacher(tmp_path, cli_env):
    output = tmp_path / 'out'
    command = [sys.executable, 'examples/blockwise/reproduce.py', '--ci', f'output_folder={output}',
               f'teacher.overrides=[save_folder={tmp_path}/teacher]', 'progress_bar=false']
    proc = subprocess.run(command, cwd=ROOT, env=cli_env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert 'bar (>= 2x fewer parameters, within 3 points): MET' in proc.stdout
    # Measured (one run): teacher 84.70%, finetuned student 83.64% (1.06 points below), 4.89x fewer parameters (the
    # stitch rejected features.3, whose solo drop was 26 points, so the student keeps the teacher's block there).
    report = _check_report(output, max_gap=0.03)
    assert report['finetune']['batches'] <= 235  # the scaled finetune: 1 epoch of 30,000 images at batch 128


@pytest.mark.slow
@pytest.mark.timeout(4 * 3600)  # teacher (3 epochs), 5 blocks x 2 epochs and a 2-epoch finetune on 2 CPU cores
def test_reproduction_student_is_2x_smaller_and_within_3_points_of_the_teacher(tmp_path, cli_env):
    output = tmp_path / 'out'
    command = [sys.executable, 'examples/blockwise/reproduce.py', f'output_folder={output}',
               f'teacher.overrides=[save_folder={tmp_path}/teacher]', 'progress_bar=false']
    proc = subprocess.run(command, cwd=ROOT, env=cli_env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert 'bar (>= 2x fewer parameters, within 3 points): MET' in proc.stdout
    _check_report(output, max_gap=0.03)
