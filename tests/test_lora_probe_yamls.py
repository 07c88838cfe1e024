"""yamls/lora_probe: every file loads, and pretrain -> full/LoRA finetunes -> `composer-ext report lora` runs."""

import csv
import json
import subprocess
import warnings

import pytest

from composer_ext.cli import main as cli_main
from composer_ext.config import ConfigError, load_config
from composer_ext.runner import run
from tests.conftest import ROOT, composer_ext_cmd

YAMLS = ROOT / 'yamls' / 'lora_probe'


@pytest.mark.parametrize('name', ['pretrain', 'full', 'lora'])
def test_every_yaml_loads_and_validates(name):
    config = load_config(YAMLS / f'{name}.yaml')
    assert config.max_duration
    if name != 'pretrain':
        probe = config.callbacks['lora_probe']
        assert probe['source_evals']['domains'] == 'prose' and probe['target_evals']['domains'] == 'code'
        assert config.train_loader['domains'] == 'code'
        assert config.model['checkpoint'] == 'runs/lora_probe/pretrain/checkpoints/latest-rank0.pt'


def test_lora_yaml_overrides_name_the_paper_configurations():
    for r in (16, 256):
        for targets in ('attention', 'mlp', 'all'):
            config = load_config(YAMLS / 'lora.yaml', (f'model.lora.r={r}', f'model.lora.targets={targets}'))
            assert config.run_name == f'ft_lora_r{r}_{targets}'
            assert config.model['lora'] == {'r': r, 'targets': targets, 'dropout': 0.05}


def test_a_bad_probe_argument_is_a_config_error():
    with pytest.raises(ConfigError, match=r'callbacks\.lora_probe\.energy: expected float'):
        load_config(YAMLS / 'full.yaml', ('callbacks.lora_probe.energy=high',))
    with pytest.raises(ConfigError, match=r"callbacks\.lora_probe\.modules: expected str or list"):
        load_config(YAMLS / 'full.yaml', ('callbacks.lora_probe.modules=3',))


def _probe_overrides(root):
    # One small evaluation batch per probe: the test checks the wiring, not the numbers.
    return [f'variables.root={root}', 'max_duration=4ba', 'scheduler.t_warmup=1ba', 'callbacks.lora_probe.every=2ba',
            'callbacks.lora_probe.spectrum_every=2ba', 'callbacks.lora_probe.source_evals.subset_num_batches=1',
            'callbacks.lora_probe.target_evals.subset_num_batches=1', 'callbacks.lora_probe.source_evals.batch_size=8',
            'callbacks.lora_probe.target_evals.batch_size=8', 'log_to_console=false']


@pytest.mark.slow  # three real runs and the report (~1 minute); the probe itself is covered by test_lora_probe*.py
def test_pretrain_then_full_and_lora_finetunes_then_report(corpus, cli_env, tmp_path, capsys):
    root = tmp_path / 'lora_probe'
    pretrain = run(str(YAMLS / 'pretrain.yaml'), (f'variables.root={root}', 'max_duration=4ba', 'save_interval=4ba',
                                                  'scheduler.t_warmup=1ba', 'eval_loaders.0.subset_num_batches=1',
                                                  'log_to_console=false'))
    pretrain.trainer.close()
    assert (root / 'pretrain' / 'checkpoints' / 'latest-rank0.pt').exists()

    # Full finetuning through the CLI, LoRA r=16 in-process.
    proc = subprocess.run(composer_ext_cmd() + ['run', str(YAMLS / 'full.yaml'), *_probe_overrides(root)], cwd=ROOT,
                          env=cli_env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'Traceback' not in proc.stderr and 'Warning' not in proc.stderr, proc.stderr[-3000:]
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # the recommended configuration warns about nothing
        lora = run(str(YAMLS / 'lora.yaml'), tuple(_probe_overrides(root)))
    lora.trainer.close()

    full_json = json.loads((root / 'ft_full' / 'lora_probe.json').read_text())
    lora_json = json.loads((root / 'ft_lora_r16_all' / 'lora_probe.json').read_text())
    assert [r['batch'] for r in full_json['history']] == [0, 2, 4]
    assert full_json['adapter']['kind'] == 'full' and lora_json['adapter'] == {
        'kind': 'lora', 'r': 16, 'alpha': 32.0, 'trainable_params': lora_json['adapter']['trainable_params'],
        'total_params': lora_json['adapter']['total_params']}
    # The finetunes start from the pretrained weights: both report the same baseline.
    assert full_json['baseline_metrics'] == lora_json['baseline_metrics']
    assert set(full_json['modules']) == set(lora_json['modules']) and len(lora_json['modules']) == 8
    for stats in lora_json['history'][-1]['spectrum'].values():
        assert stats['rank_at_energy'] <= 16
    assert full_json['history'][-1]['spectrum_summary']['rank_at_energy/mean'] > 16

    # The report through the CLI's entry point, in this process (a subprocess only adds an interpreter start; the
    # subprocess path of the CLI is exercised by the full.yaml run above).
    out = tmp_path / 'report'
    capsys.readouterr()
    assert cli_main(['report', 'lora', str(root), '--out', str(out)]) == 0
    printed = capsys.readouterr().out
    assert '| ft_full | full |' in printed and '| ft_lora_r16_all | LoRA r=16 all |' in printed
    assert (out / 'pareto.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    rows = list(csv.DictReader((out / 'table.csv').open()))
    assert [row['run'] for row in rows] == ['ft_full', 'ft_lora_r16_all']
    assert float(rows[0]['ΔW rank@90% mean']) > float(rows[1]['ΔW rank@90% max'])
    assert (out / 'table.md').read_text().startswith('| run | method |')


def test_report_errors_exit_2_with_the_fix(tmp_path, capsys):
    from composer_ext.cli import main  # in process: the exit status and stderr of `composer-ext report lora`
    assert main(['report', 'lora', str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"RUN_DIR: '{tmp_path}' holds no lora_probe.json. Fix: pass the save_folder" in err
    assert 'Traceback' not in err
    (tmp_path / 'lora_probe.json').write_text('{"format": "something else"}')
    assert main(['report', 'lora', str(tmp_path)]) == 2
    assert 'is not a LoRAProbe history' in capsys.readouterr().err
