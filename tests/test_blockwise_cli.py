"""`composer-ext blockwise`: the YAMLs, config errors, and the main YAML under Composer's launcher on 2 ranks."""

import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from composer_ext.blockwise import load_blockwise_config, run_blockwise
from composer_ext.config import ConfigError, load_config
from tests.conftest import ROOT, composer_ext_cmd

YAMLS = sorted((ROOT / 'yamls' / 'blockwise').glob('*.yaml'))
VGG_BLOCKS = [f'module.features.{i}' for i in (1, 3, 4, 6, 7)]


def tiny_overrides(tmp_path: Path) -> list[str]:
    """vgg.yaml shrunk to seconds: a 3-batch teacher, 512 training samples, one epoch per block, 3 finetune batches."""
    teacher = (f'[max_duration=3ba,save_folder={tmp_path}/teacher,train_loader.num_samples=512,'
               f'eval_loaders.0.num_samples=500,progress_bar=false]')
    return [f'output_folder={tmp_path}/out', f'teacher.overrides={teacher}', 'data.num_samples=512',
            'eval_data.num_samples=500', 'block_training.epochs=1', 'block_training.val_samples=100',
            'block_training.checkpoint_interval=2', 'stitch.eval_samples=200', 'stitch.batch_size=100',
            'finetune.max_duration=3ba', 'finetune.train_loader.num_samples=512', 'progress_bar=false',
            'threads_per_rank=1']


@pytest.mark.parametrize('path', YAMLS, ids=[p.name for p in YAMLS])
def test_every_blockwise_yaml_loads(path):
    if path.name.startswith('teacher_'):
        config = load_config(path)
        assert config.save_folder and config.run_name
    else:
        config = load_blockwise_config(path)
        assert config.teacher.run and (ROOT / config.teacher.run).exists()
        assert config.finetune is not None and config.block_training.batch_size == config.data['batch_size']
    assert len(YAMLS) >= 4


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / 'bad.yaml'
    path.write_text(textwrap.dedent(text))
    return path


BASE = """
teacher: {model: {name: small_vgg, widths: [8, 16]}, checkpoint: teacher.pt}
data: {name: image, dataset: digits, batch_size: 64}
eval_data: {name: image, dataset: digits, split: test, batch_size: 40, shuffle: false, drop_last: false}
"""


@pytest.mark.parametrize('extra,key,message', [
    ('block_trainig: {}', 'block_trainig',
     r"unknown top-level key 'block_trainig'. Fix: did you mean 'block_training'"),
    ('block_training: {epochs: 0}', 'block_training.epochs', r'epochs=0 is invalid'),
    ('block_training: {batch_size: 8}', 'block_training.batch_size', r'the block batch size is data.batch_size'),
    ('block_training: {optimizer: {name: adamx}}', 'block_training.optimizer.name', r"unknown optimizer 'adamx'"),
    ('schedule: {cost: random}', 'schedule.cost',
     r"unknown cost model 'random'. Fix: use one of params_x_activation, flops, profile"),
    ('schedule: {partition: greedy}', 'schedule.partition', r"unknown partition method 'greedy'. Fix: use one of auto"),
    ('stitch: {max_solo_drop: 15}', 'stitch.max_solo_drop', r'15 is not a fraction'),
    ('blocks: features', 'blocks', r"expected 'auto' or a non-empty list"),
    ('finetune: {max_duration: 2 epochs, train_loader: {name: image, dataset: digits, batch_size: 8}}',
     'finetune.max_duration', r"'2 epochs' is not a Composer time"),
    ('finetune: {max_duration: 2ep}', 'finetune', r"required key\(s\) \['train_loader'\] are missing"),
    ('threads_per_rank: 0', 'threads_per_rank', r'expected auto or a positive int'),
])
def test_config_errors_name_the_file_the_key_and_the_fix(tmp_path, extra, key, message):
    path = _write(tmp_path, BASE + extra + '\n')
    with pytest.raises(ConfigError, match=message) as info:
        load_blockwise_config(path)
    assert info.value.source == str(path) and info.value.key == key
    assert 'Fix:' in str(info.value)


def test_teacher_section_errors(tmp_path):
    path = _write(tmp_path, BASE.replace('teacher: {model: {name: small_vgg, widths: [8, 16]}, checkpoint: teacher.pt}',
                                         'teacher: {model: {name: small_vgg}}'))
    with pytest.raises(ConfigError, match=r'teacher.checkpoint: teacher.model needs a checkpoint'):
        load_blockwise_config(path)
    with pytest.raises(ConfigError, match=r"teacher.model.widthz: model 'small_vgg' has no argument 'widthz'"):
        load_blockwise_config(_write(tmp_path, BASE.replace('widths', 'widthz')))


def test_missing_teacher_checkpoint_and_bad_block_path_exit_2_with_the_fix(tmp_path, capsys):
    # In process (the exit status and stderr of `composer-ext blockwise`, without paying a fresh import per case;
    # tests/test_runner.py checks a config error in a real subprocess).
    from composer_ext.cli import main
    from composer_ext.models import small_vgg
    path = _write(tmp_path, BASE)
    assert main(['blockwise', str(path), f'teacher.checkpoint={tmp_path}/none.pt']) == 2
    err = capsys.readouterr().err
    assert f'{path}: teacher.checkpoint: the teacher checkpoint {tmp_path}/none.pt does not exist' in err
    assert 'Traceback' not in err
    torch.save(small_vgg(widths=[8, 16]).state_dict(), tmp_path / 'teacher.pt')
    assert main(['blockwise', str(path), f'teacher.checkpoint={tmp_path}/teacher.pt', "blocks=[module.features.9]",
                 f'output_folder={tmp_path}/out']) == 2
    err = capsys.readouterr().err
    assert f"{path}: blocks: blocks: the model has no module 'module.features.9'" in err
    assert 'Traceback' not in err
    assert main(['blockwise', str(path), f'teacher.checkpoint={tmp_path}/teacher.pt', f'output_folder={tmp_path}/out',
                 '--stage', 'stitch']) == 2
    err = capsys.readouterr().err
    assert (f"{path}: stitch: cannot stitch: 3 of 3 blocks have no finished checkpoint: 'module.features.1' "
            f"({tmp_path}/out/blocks/module.features.1/block.pt is missing; the block was never trained)") in err
    assert 'Fix: train them first' in err and 'Traceback' not in err


@pytest.mark.distributed
def test_main_yaml_on_two_ranks_trains_disjoint_blocks_like_the_sequential_run(tmp_path, cli_env):
    """The whole pipeline of yamls/blockwise/vgg.yaml (shrunk) under `composer -n 2`; then a 1-rank rerun of the
    block stage skips every finished block (and keeps the 2-rank timings), and a fresh 1-rank run trains
    bit-identical blocks."""
    launcher = Path(sys.executable).with_name('composer')
    command = [str(launcher), '-n', '2', '--stdout', str(tmp_path / 'rank{rank}.out'), '--stderr',
               str(tmp_path / 'rank{rank}.err'), '-m', 'composer_ext.cli', 'blockwise', 'yamls/blockwise/vgg.yaml',
               *tiny_overrides(tmp_path)]
    proc = subprocess.run(command, cwd=ROOT, env=cli_env, capture_output=True, text=True, timeout=900)
    logs = ''.join(p.read_text()[-3000:] for p in sorted(tmp_path.glob('rank*')))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:] + logs
    out = tmp_path / 'out'
    stage = json.loads((out / 'block_stage.json').read_text())
    assert stage['world_size'] == 2 and stage == json.loads((out / 'block_stage_w2.json').read_text())
    assert stage['complete'] and stage['assignment']['method'] == 'exact' and stage['cost_model'] == \
        'params_x_activation'
    trained = stage['trained_this_session']
    assert set(trained) == {'0', '1'} and trained['0'] and trained['1']
    assert not set(trained['0']) & set(trained['1'])                        # disjoint
    assert sorted(trained['0'] + trained['1']) == sorted(VGG_BLOCKS)        # union is every block
    assert [sorted(r) for r in stage['assignment']['ranks']] == [sorted(trained['0']), sorted(trained['1'])]
    report = json.loads((out / 'report.json').read_text())
    assert (out / 'report.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert report['world_size'] == 2 and set(report['blocks']) == set(VGG_BLOCKS)
    assert report['compression']['params_ratio'] > 2 and report['compression']['flops_ratio'] > 2
    for key in ('teacher', 'stitched', 'finetuned'):
        assert 0.0 <= report['accuracy'][key] <= 1.0
    assert report['finetune']['batches'] == 3
    for path, block in report['blocks'].items():
        assert block['steps'] == 4 and block['history'] and path in trained[str(block['rank'])]
    wall = report['wallclock']
    assert wall['block_seconds_sum'] == pytest.approx(sum(stage['block_seconds_this_session'].values()))
    assert wall['sequential_over_parallel'] == pytest.approx(wall['block_seconds_sum'] / stage['wall_seconds'])
    assert wall['measured_sequential_vs_parallel'] is None and wall['by_world_size']['2']['complete']
    for path in VGG_BLOCKS:  # one epoch per block: a disk cache would be read once, so every block runs on the fly
        decision = report['activations'][path]
        assert decision['estimate_bytes'] > 0 and not decision['use_disk'] and 'one epoch' in decision['reason']
    assert '[blockwise] teacher activations: features.1 ' in proc.stdout
    assert 'Final eval metrics (blockwise-teacher-vgg, 3 batches)' in proc.stdout  # rank 0 prints to the launcher
    assert '[blockwise] report:' in proc.stdout and '[blockwise]' not in (tmp_path / 'rank1.out').read_text()

    # The same command on one rank: every block is finished, so none is trained again.
    config = load_blockwise_config(ROOT / 'yamls/blockwise/vgg.yaml', tiny_overrides(tmp_path))
    printed = io.StringIO()
    rerun = run_blockwise(config, ('teacher', 'blocks'), stream=printed)
    assert '[blockwise] all 5 blocks are finished; nothing to train' in printed.getvalue()
    assert json.loads((out / 'block_stage.json').read_text()) == stage  # the 2-rank timings are kept ...
    assert not (out / 'block_stage_w1.json').exists()
    assert rerun['world_size'] == 2 and rerun['wallclock'] == wall  # ... and the report still describes them

    # A fresh sequential run (one rank trains all blocks) gives the same weights, block for block.
    sequential = load_blockwise_config(ROOT / 'yamls/blockwise/vgg.yaml',
                                       tiny_overrides(tmp_path) + [f'output_folder={tmp_path}/sequential'])
    run_blockwise(sequential, ('teacher', 'blocks'))
    alone_stage = json.loads((tmp_path / 'sequential/block_stage_w1.json').read_text())
    assert alone_stage['trained_this_session'] == {'0': alone_stage['assignment']['ranks'][0]}
    assert sorted(alone_stage['trained_this_session']['0']) == sorted(VGG_BLOCKS) and alone_stage['complete']
    for path in VGG_BLOCKS:
        parallel = torch.load(out / 'blocks' / path / 'block.pt', weights_only=False)['block']
        alone = torch.load(tmp_path / 'sequential' / 'blocks' / path / 'block.pt', weights_only=False)['block']
        assert parallel.keys() == alone.keys()
        for key in parallel:
            assert torch.equal(parallel[key], alone[key]), (path, key)
