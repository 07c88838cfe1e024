"""`composer-ext run`: the quickstart, the CLI, checkpoints, and the same YAML under Composer's launcher."""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from composer_ext.config import load_config
from composer_ext.testing import KillAt, Killed
from composer_ext.runner import build_trainer, resolve_device, resolve_precision, run
from tests.conftest import ROOT, composer_ext_cmd

QUICK = ['max_duration=6ba', 'eval_interval=3ba', 'eval_loaders.0.subset_num_batches=1']
DOMAIN_ROWS = ('code', 'dialogue', 'legal', 'math', 'prose', 'technical')


def _assert_per_domain_table(stdout: str) -> None:
    table = stdout.split('Final eval metrics')[1]
    assert 'LanguageCrossEntropy' in table
    for domain in DOMAIN_ROWS:
        row = next(line for line in table.splitlines() if line.startswith(domain))
        assert 2.0 < float(row.split()[1]) < 9.0  # cross-entropy in nats, near log(4096)=8.3 after a few steps


@pytest.mark.slow  # the 2-process test below runs the same YAML and checks the same table (one interpreter start less)
def test_quickstart_prints_per_domain_eval_loss(corpus, cli_env):
    proc = subprocess.run(composer_ext_cmd() + ['run', 'yamls/quickstart.yaml', *QUICK], cwd=ROOT, env=cli_env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_per_domain_table(proc.stdout)
    assert 'Traceback' not in proc.stderr


@pytest.mark.distributed
def test_quickstart_under_composer_launcher_with_two_processes(corpus, cli_env, tmp_path):
    launcher = Path(sys.executable).with_name('composer')
    proc = subprocess.run([str(launcher), '-n', '2', '--stderr', str(tmp_path / 'rank{rank}.err'), '-m',
                           'composer_ext.cli', 'run', 'yamls/quickstart.yaml', *QUICK, 'max_duration=4ba'],
                          cwd=ROOT, env=cli_env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert 'Final eval metrics (quickstart, 4 batches)' in proc.stdout
    _assert_per_domain_table(proc.stdout)
    assert (tmp_path / 'rank1.err').exists()
    assert 'Traceback' not in proc.stderr + (tmp_path / 'rank1.err').read_text()  # rank 0 writes to the launcher's


def test_help_lists_subcommands(cli_env):
    proc = subprocess.run(composer_ext_cmd() + ['--help'], cwd=ROOT, env=cli_env, capture_output=True, text=True)
    assert proc.returncode == 0
    assert 'run' in proc.stdout and 'Train from a YAML config' in proc.stdout


def test_config_errors_exit_2_without_traceback(cli_env, tmp_path):
    bad = tmp_path / 'bad.yaml'
    bad.write_text('max_duration: 1ba\nmodel: {name: small_vgg}\ntrain_loader: {name: image, dataset: digits, '
                   'batch_size: 8}\nalgorithms: {no_such_algo: {}}\n')
    proc = subprocess.run(composer_ext_cmd() + ['run', str(bad)], cwd=ROOT, env=cli_env, capture_output=True,
                          text=True)
    assert proc.returncode == 2
    assert f'{bad}: algorithms.no_such_algo: unknown algorithm' in proc.stderr
    assert 'Traceback' not in proc.stderr


def _digits_yaml(tmp_path: Path, extra: str = '') -> Path:
    path = tmp_path / 'digits.yaml'
    path.write_text(textwrap.dedent(f"""
        run_name: digits
        max_duration: 8ba
        seed: 3
        model: {{name: small_vgg, widths: [8, 16]}}
        train_loader: {{name: image, dataset: digits, batch_size: 32}}
        eval_loaders: [{{name: image, dataset: digits, split: test, batch_size: 64, shuffle: false,
                        label: test}}]
        eval_interval: 4ba
        optimizer: {{name: decoupled_sgdw, lr: 0.05, momentum: 0.9}}
        scheduler: {{name: linear_decay, alpha_f: 0.1}}
        progress_bar: false
        {extra}
    """))
    return path


def _weights(result):
    return {k: v.clone() for k, v in result.trainer.state.model.state_dict().items()}


def test_resume_from_checkpoint_matches_uninterrupted_run(tmp_path):
    full = run(str(_digits_yaml(tmp_path)))
    assert set(full.eval_metrics) == {'metrics/test/MulticlassAccuracy', 'metrics/test/CrossEntropy'}
    reference = _weights(full)
    full.trainer.close()

    # Interrupted: the same 8-batch run, killed after the checkpoint at batch 4.
    interrupted = build_trainer(load_config(_digits_yaml(tmp_path), (f'save_folder={tmp_path}/ckpt',
                                                                     'save_interval=4ba')))
    interrupted.engine.state.callbacks.append(KillAt(4))
    with pytest.raises(Killed):
        interrupted.fit()
    interrupted.close()
    resumed = run(str(_digits_yaml(tmp_path)), (f'load_path={tmp_path}/ckpt/ep0-ba4-rank0.pt',))
    assert resumed.trainer.state.timestamp.batch.value == 8
    for key, value in _weights(resumed).items():
        assert torch.equal(value, reference[key]), key
    resumed.trainer.close()


def test_autoresume_continues_a_stopped_run(tmp_path):
    folder = tmp_path / 'auto'
    first = build_trainer(load_config(_digits_yaml(tmp_path), (f'save_folder={folder}', 'save_interval=2ba',
                                                               'autoresume=true')))
    first.engine.state.callbacks.append(KillAt(4))
    with pytest.raises(Killed):
        first.fit()
    first.close()
    second = run(str(_digits_yaml(tmp_path)), (f'save_folder={folder}', 'save_interval=2ba', 'autoresume=true'))
    assert second.trainer.state.timestamp.batch.value == 8
    second.trainer.close()


def test_device_and_precision_defaults():
    expected = 'gpu' if torch.cuda.is_available() else 'cpu'
    assert resolve_device('auto') == expected and resolve_device('cpu') == 'cpu'
    assert resolve_precision(None, 'gpu') == 'amp_bf16' and resolve_precision(None, 'cpu') == 'fp32'
