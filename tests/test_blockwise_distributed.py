"""Blockwise distillation on 2 gloo ranks with a single block: rank 1 idles, warns nobody twice, and nothing hangs."""

import json
import warnings

import pytest
import torch

from composer_ext.testing import run_distributed

BLOCK = 'module.features.1'


def _train_one_block_on_every_rank(config_path: str) -> dict:
    """Run the teacher and blocks stages on this rank; return the idle-rank warnings it raised and its view."""
    from composer.utils import dist

    from composer_ext.blockwise import load_blockwise_config, run_blockwise

    config = load_blockwise_config(config_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        report = run_blockwise(config, ('teacher', 'blocks'))
    idle = [str(w.message) for w in caught if 'will be idle' in str(w.message)]
    return {'rank': dist.get_global_rank(), 'idle_warnings': idle,
            'trained': report['wallclock']['trained_this_session']}


@pytest.mark.distributed
def test_more_ranks_than_blocks_leaves_rank_1_idle_with_one_warning(tmp_path):
    from composer_ext.models import small_vgg

    torch.manual_seed(0)
    torch.save(small_vgg(widths=[8, 16]).state_dict(), tmp_path / 'teacher.pt')
    config = tmp_path / 'one_block.yaml'
    config.write_text(f"""
run_name: one-block
output_folder: {tmp_path}/out
teacher: {{model: {{name: small_vgg, widths: [8, 16]}}, checkpoint: {tmp_path}/teacher.pt}}
blocks: [{BLOCK}]
data: {{name: image, dataset: digits, batch_size: 64}}
eval_data: {{name: image, dataset: digits, split: test, batch_size: 64, shuffle: false, drop_last: false}}
block_training: {{epochs: 1, val_samples: 0, checkpoint_interval: 0}}
progress_bar: false
threads_per_rank: 1
dist_timeout: 120
""")
    ranks = run_distributed(_train_one_block_on_every_rank, world_size=2, args=(str(config),), timeout=800)
    assert [r['rank'] for r in ranks] == [0, 1]
    assert len(ranks[0]['idle_warnings']) == 1 and not ranks[1]['idle_warnings']  # once per job, from rank 0
    assert ranks[0]['idle_warnings'][0].startswith('2 ranks but only 1 blocks: ranks [1] will be idle')
    assert 'Fix: launch at most 1 ranks' in ranks[0]['idle_warnings'][0]
    stage = json.loads((tmp_path / 'out' / 'block_stage_w2.json').read_text())
    assert stage['trained_this_session'] == {'0': [BLOCK], '1': []} and stage['assignment']['ranks'] == [[BLOCK], []]
    assert ranks[0]['trained'] == ranks[1]['trained'] == stage['trained_this_session']
    assert len(stage['rank_busy_seconds']) == 2 and stage['complete']
    result = json.loads((tmp_path / 'out' / 'blocks' / BLOCK / 'result.json').read_text())
    assert result['rank'] == 0 and result['steps'] == 1437 // 64
