"""Blockwise distillation: per-block training, kill-and-resume, activation cache, LPT scheduling, stitching."""

import copy
import itertools
import json
import random
import warnings

import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from composer_ext.blockwise import (ActivationCache, BlockCheckpointMismatchError, BlockTrainingSpec,
                                               assign_blocks, block_costs, block_progress, estimate_activation_bytes,
                                               evaluate_accuracy, find_blocks, load_student, make_student,
                                               plan_activation_cache, stitch, trace_blocks, train_blocks,
                                               unfinished_costs)
from composer_ext.blockwise.discovery import BlockTrace
from composer_ext.blockwise.stitching import MissingBlockCheckpointError, StitchResult
from composer_ext.blockwise.cache_plan import require_cache_fits
from composer_ext.data import digits
from composer_ext.models import small_vgg
from composer_ext.testing import Killed

SPEC = dict(epochs=2, batch_size=64, optimizer={'name': 'adam', 'lr': 1e-2}, checkpoint_interval=5, log_interval=4,
            val_samples=128)

pytestmark = pytest.mark.usefixtures('one_torch_thread')




def trained_digits_teacher(seed: int = 0) -> nn.Module:
    """A small VGG trained for two epochs on digits (train split)."""
    torch.manual_seed(seed)
    teacher = small_vgg(widths=[8, 16])
    optimizer = torch.optim.Adam(teacher.parameters(), lr=3e-3)
    loader = torch.utils.data.DataLoader(digits('train'), batch_size=64, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))
    teacher.train()
    for _ in range(2):
        for batch in loader:
            loss = teacher.loss(teacher(batch), batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return teacher.eval()


@pytest.fixture(scope='module')
def teacher():
    return trained_digits_teacher()


@pytest.fixture(scope='module')
def data():
    return digits('train'), digits('test')


@pytest.fixture(scope='module')
def reference(teacher, data, tmp_path_factory):
    """An uninterrupted block training of every block (seed 0)."""
    train, test = data
    folder = tmp_path_factory.mktemp('reference') / 'blocks'
    student = make_student(teacher, seed=0)
    results = train_blocks(teacher, student, find_blocks(teacher), train, BlockTrainingSpec(**SPEC), folder, seed=0,
                           val_dataset=test)
    return folder, student, results


def _block_weights(student, path):
    return {k: v.clone() for k, v in student.get_submodule(path).state_dict().items()}


def test_block_training_lowers_the_block_mse(reference):
    _, _, results = reference
    assert [r.status for r in results] == ['trained'] * 3
    for result in results:
        assert result.steps == 2 * (1437 // 64)
        assert result.val_mse < 0.7 * result.initial_val_mse, result.path
        assert result.history[-1][1] < 0.7 * result.history[0][1], result.path
        assert 0 < result.val_relative_mse < 1.0  # better than predicting each channel's mean
        assert [v[0] for v in result.val_history] == [0, 22, 44]


def test_kill_and_resume_trains_only_the_unfinished_blocks_and_matches_an_uninterrupted_run(reference, teacher,
                                                                                              data, tmp_path):
    folder_ref, student_ref, results_ref = reference
    train, test = data
    paths = find_blocks(teacher)
    folder = tmp_path / 'blocks'

    def kill_in_second_block(path, step, loss):
        if path == paths[1] and step == 10:
            raise Killed(f'killed at {path} step {step}')

    with pytest.raises(Killed):
        train_blocks(teacher, make_student(teacher, seed=0), paths, train, BlockTrainingSpec(**SPEC), folder,
                     seed=0, val_dataset=test, on_step=kill_in_second_block)
    assert (folder / paths[0] / 'result.json').exists()
    assert (folder / paths[1] / 'checkpoint.pt').exists() and not (folder / paths[1] / 'result.json').exists()
    assert not (folder / paths[2]).exists()
    finished_at = (folder / paths[0] / 'block.pt').stat().st_mtime_ns
    # What a resumed pipeline balances: only the unfinished blocks, the killed one by its remaining steps.
    total = 2 * (1437 // 64)
    remaining = block_progress(folder, paths, total)
    assert remaining == {paths[0]: 0.0, paths[1]: (total - 10) / total, paths[2]: 1.0}
    assert unfinished_costs({p: 1.0 for p in paths}, remaining) == {paths[1]: (total - 10) / total, paths[2]: 1.0}

    steps = {path: [] for path in paths}
    student = make_student(teacher, seed=0)
    results = train_blocks(teacher, student, paths, train, BlockTrainingSpec(**SPEC), folder, seed=0,
                           val_dataset=test, on_step=lambda path, step, loss: steps[path].append(step))
    assert [r.status for r in results] == ['done', 'resumed', 'trained']
    assert [r.rank for r in results] == [0, 0, 0]  # the rank that finished each block (0: not distributed)
    assert steps[paths[0]] == [] and steps[paths[1]][0] == 11 and steps[paths[2]][0] == 1
    assert (folder / paths[0] / 'block.pt').stat().st_mtime_ns == finished_at
    for path, result, expected in zip(paths, results, results_ref):
        reference_weights = _block_weights(student_ref, path)
        for key, value in _block_weights(student, path).items():
            assert torch.equal(value, reference_weights[key]), (path, key)
        assert result.history == expected.history and result.val_history == expected.val_history
    assert not (folder / paths[1] / 'checkpoint.pt').exists()


def test_a_checkpoint_from_another_configuration_is_refused(reference, teacher, data):
    folder, _, _ = reference
    train, test = data
    with pytest.raises(ValueError, match=r"written by a different configuration \(differs in \['seed'\]\).*Fix: use "
                       r'a new output folder'):
        train_blocks(teacher, make_student(teacher, seed=0), find_blocks(teacher)[:1], train,
                     BlockTrainingSpec(**SPEC), folder, seed=1, val_dataset=test)


def test_disk_cache_has_the_estimated_size_and_trains_like_on_the_fly(reference, teacher, data, tmp_path):
    _, _, results_ref = reference
    train, test = data
    paths = find_blocks(teacher)
    spec = BlockTrainingSpec(**{**SPEC, 'activations': 'disk', 'keep_cache': True})
    student = make_student(teacher, seed=0)
    results = train_blocks(teacher, student, paths, train, spec, tmp_path / 'blocks', seed=0, val_dataset=test,
                           cache_folder=tmp_path / 'cache')
    example = torch.utils.data.default_collate([train[0], train[1]])
    traces = trace_blocks(teacher, paths, example)
    for path, result, expected in zip(paths, results, results_ref):
        assert result.activations == 'disk'
        arrays = [np.load(tmp_path / 'cache' / path / f'{kind}.npy', mmap_mode='r') for kind in ('inputs', 'outputs')]
        assert sum(a.nbytes for a in arrays) == estimate_activation_bytes(traces[path], len(train))
        assert result.val_mse == pytest.approx(expected.val_mse, rel=0.05)
    inputs, targets = ActivationCache(tmp_path / 'cache' / paths[0]).batch(torch.tensor([5, 1, 3]), torch.device('cpu'))
    from composer_ext.blockwise import TeacherActivations
    direct = TeacherActivations(teacher, [paths[0]])(torch.utils.data.default_collate([train[i] for i in (5, 1, 3)]))
    assert torch.allclose(inputs, direct[paths[0]][0], atol=1e-5)
    assert torch.allclose(targets, direct[paths[0]][1], atol=1e-5)
    # Without keep_cache, a block's cache is deleted once the block is finished.
    train_blocks(teacher, make_student(teacher, seed=0), paths[:1], train,
                 BlockTrainingSpec(**{**SPEC, 'activations': 'disk', 'epochs': 1}), tmp_path / 'b2', seed=0,
                 cache_folder=tmp_path / 'c2')
    assert not (tmp_path / 'c2' / paths[0]).exists()


def test_lpt_and_exact_assignment_costs_and_idle_ranks():
    assignment = assign_blocks({'a': 5, 'b': 4, 'c': 3, 'd': 3, 'e': 3}, 2, method='lpt')
    assert assignment.ranks == [['a', 'd'], ['b', 'c', 'e']] and assignment.loads == [8.0, 10.0]
    assert assignment.efficiency == pytest.approx(9 / 10) and assignment.method == 'lpt' and not assignment.optimal
    exact = assign_blocks({'a': 5, 'b': 4, 'c': 3, 'd': 3, 'e': 3}, 2)  # 'auto': exact for few blocks
    assert exact.ranks == [['a', 'b'], ['c', 'd', 'e']] and exact.loads == [9.0, 9.0]
    assert exact.method == 'exact' and exact.optimal and exact.efficiency == 1.0
    # The reviewer's small_vgg[16,32,64] FLOP costs: LPT is capped at 25.4 / 14.1 = 1.80x, the optimum 1.89x.
    flops = {'f1': 2.86, 'f3': 3.21, 'f4': 5.40, 'f6': 5.88, 'f7': 8.03}
    assert assign_blocks(flops, 2, method='lpt').makespan == pytest.approx(8.03 + 3.21 + 2.86)
    assert sorted(assign_blocks(flops, 2).loads) == pytest.approx([2.86 + 3.21 + 5.88, 8.03 + 5.40])
    assert assign_blocks({'a': 1, 'b': 1}, 1).ranks == [['a', 'b']]
    with pytest.warns(UserWarning, match=r'3 ranks but only 2 blocks: ranks \[2\] will be idle.*Fix'):
        idle = assign_blocks({'a': 2, 'b': 1}, 3)
    assert idle.ranks == [['a'], ['b'], []]
    with pytest.raises(ValueError, match=r"costs \{'a': -1\} are not non-negative"):
        assign_blocks({'a': -1}, 2)
    with pytest.raises(ValueError, match=r'world_size=0 is invalid'):
        assign_blocks({'a': 1}, 0)
    with pytest.raises(ValueError, match=r"method='greedy' is unknown. Fix: use one of \['auto', 'exact', 'lpt'\]"):
        assign_blocks({'a': 1}, 1, method='greedy')
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assign_blocks({'a': 1, 'b': 1}, 2)  # no warning when every rank has work


def _brute_force_makespan(costs: list, world_size: int) -> float:
    """The minimum makespan over all world_size ** len(costs) assignments."""
    best = float('inf')
    for choice in itertools.product(range(world_size), repeat=len(costs)):
        loads = [0.0] * world_size
        for value, rank in zip(costs, choice):
            loads[rank] += value
        best = min(best, max(loads))
    return best


def test_exact_partition_matches_brute_force_on_random_cases():
    rng = random.Random(0)
    beaten = 0
    for case in range(150):
        n, world = rng.randint(1, 7), rng.randint(1, 4)
        costs = {f'b{i}': rng.randint(0, 12) if case % 2 else rng.uniform(0, 10) for i in range(n)}
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', UserWarning)  # more ranks than blocks in some cases
            exact, lpt = assign_blocks(costs, world), assign_blocks(costs, world, method='lpt')
        assert sorted(p for paths in exact.ranks for p in paths) == sorted(costs)  # a partition of the blocks
        for paths, load in zip(exact.ranks, exact.loads):
            assert load == pytest.approx(sum(costs[p] for p in paths))
        assert exact.makespan == pytest.approx(_brute_force_makespan(list(costs.values()), world), abs=1e-9)
        assert exact.optimal and exact.makespan <= lpt.makespan + 1e-9
        beaten += exact.makespan < lpt.makespan - 1e-9
    assert beaten > 0  # the exact search does find better partitions than LPT
    many = {f'b{i}': float(i % 7 + 1) for i in range(30)}  # beyond EXACT_MAX_BLOCKS: LPT
    assert assign_blocks(many, 3).method == 'lpt'


def test_block_costs_match_hand_computed_macs():
    teacher = small_vgg(widths=[8, 16])
    student = make_student(teacher, seed=0)
    example = torch.randn(2, 1, 8, 8)
    paths = ['module.features.1']
    teacher_traces, student_traces = trace_blocks(teacher, paths, example), trace_blocks(student, paths, example)
    # features.0: conv 1->8 on 8x8 = 8*8*8 * 1*9; features.1: conv 8->8 = 8*8*8 * 8*9.
    assert teacher_traces[paths[0]].macs == 36864 and teacher_traces[paths[0]].prefix_macs == 4608 + 36864
    # Student: depthwise 8 channels (8*8*8 * 9) + pointwise 8->8 (8*8*8 * 8).
    assert student_traces[paths[0]].macs == 4608 + 4096
    assert block_costs(teacher_traces, student_traces, 'flops', epochs=2) == {paths[0]: 2 * 41472 + 2 * 3 * 8704}
    assert block_costs(teacher_traces, student_traces, 'flops', epochs=2, cached={paths[0]: True}) == \
        {paths[0]: 41472 + 2 * 3 * 8704}
    assert block_costs(teacher_traces, cost='params_x_activation') == {paths[0]: (8 * 8 * 9 + 16) * 8 * 8 * 8}


def test_stitching_refuses_a_missing_block_checkpoint(reference, teacher, data, tmp_path):
    folder, _, _ = reference
    partial = tmp_path / 'blocks'
    paths = find_blocks(teacher)
    import shutil
    shutil.copytree(folder / paths[0], partial / paths[0])
    (partial / paths[1]).mkdir(parents=True)
    (partial / paths[1] / 'checkpoint.pt').write_bytes(b'')
    with pytest.raises(MissingBlockCheckpointError, match=rf"2 of 3 blocks have no finished checkpoint: "
                       rf"'{paths[1]}' \(.*block.pt is missing; the block is in progress.*'{paths[2]}' .*was never "
                       rf'trained.*Fix: train them first') as info:
        stitch(teacher, partial, data[1])
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, ValueError)


def test_stitch_measures_solo_drops_and_keeps_teacher_blocks_above_the_threshold(reference, teacher, data):
    folder, student_ref, _ = reference
    test = data[1]
    result = stitch(teacher, folder, test, max_solo_drop=1.0)
    assert isinstance(result, StitchResult) and result.accepted == find_blocks(teacher) and not result.rejected
    assert result.teacher_accuracy == evaluate_accuracy(teacher, test) > 0.8
    assert result.stitched_accuracy == evaluate_accuracy(result.model, test)
    for path, accuracy in result.solo_accuracy.items():
        swapped = copy.deepcopy(teacher)
        from composer_ext.blockwise.discovery import set_submodule
        set_submodule(swapped, path, copy.deepcopy(student_ref.get_submodule(path)))
        assert accuracy == evaluate_accuracy(swapped, test)
    strict = stitch(teacher, folder, test, max_solo_drop=0.0)
    assert strict.rejected == [p for p, d in strict.solo_drop.items() if d > 0] and strict.rejected
    for path in strict.rejected:  # a rejected block stays the teacher's block, with the teacher's weights
        kept = strict.model.get_submodule(path)
        assert all(torch.equal(a, b) for a, b in zip(kept.state_dict().values(),
                                                     teacher.get_submodule(path).state_dict().values()))
    loaded = load_student(teacher, folder)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), result.model.state_dict().values()))
    assert json.loads(json.dumps(result.to_dict()))['accepted'] == result.accepted
    with pytest.raises(ValueError, match=r'max_solo_drop=15 is not a fraction in \[0, 1\]'):
        stitch(teacher, folder, test, max_solo_drop=15)


def test_stitch_finetune_with_knowledge_distillation_and_report_stages(reference, teacher, tmp_path):
    """The pipeline's later stages on existing block checkpoints: stitch, a Composer finetune with
    composer_ext's KnowledgeDistillation from the teacher (it logs kd/* metrics), and the report."""
    import shutil

    from composer_ext.blockwise import load_blockwise_config, run_blockwise

    folder, _, _ = reference
    shutil.copytree(folder, tmp_path / 'out' / 'blocks')
    torch.save(teacher.state_dict(), tmp_path / 'teacher.pt')
    config = tmp_path / 'blockwise.yaml'
    config.write_text(f"""
run_name: kd
output_folder: {tmp_path}/out
teacher: {{model: {{name: small_vgg, widths: [8, 16]}}, checkpoint: {tmp_path}/teacher.pt}}
data: {{name: image, dataset: digits, batch_size: 64}}
eval_data: {{name: image, dataset: digits, split: test, batch_size: 359, shuffle: false, drop_last: false}}
stitch: {{max_solo_drop: 1.0, batch_size: 100}}
finetune:
  max_duration: 4ba
  train_loader: {{name: image, dataset: digits, batch_size: 32}}
  optimizer: {{name: decoupled_sgdw, lr: 0.01, momentum: 0.9}}
  kd: {{kd_weight: 0.9, ce_weight: 0.1, temperature: 4.0, end: 1.0dur}}
  loggers: {{file: {{filename: {tmp_path}/finetune-log.txt}}}}
  eval_interval: 4ba
progress_bar: false
threads_per_rank: 1
""")
    report = run_blockwise(load_blockwise_config(config), ('teacher', 'stitch', 'finetune', 'report'))
    log = (tmp_path / 'finetune-log.txt').read_text()
    assert 'kd/loss' in log and 'kd/active' in log
    finetune = json.loads((tmp_path / 'out' / 'finetune.json').read_text())
    assert finetune['batches'] == 4 and finetune['kd']['kd_weight'] == 0.9
    saved = json.loads((tmp_path / 'out' / 'report.json').read_text())
    assert saved['accuracy'] == report['accuracy']
    assert saved['accuracy']['finetuned'] == finetune['accuracy']
    assert saved['accuracy']['teacher'] == evaluate_accuracy(teacher, digits('test'))
    assert saved['stitch']['accepted'] == find_blocks(teacher)
    assert saved['compression']['params_ratio'] > 1.5
    student = torch.load(tmp_path / 'out' / 'student.pt', weights_only=False)
    assert any('depthwise' in key for key in student)


def test_a_resumed_run_is_balanced_over_the_unfinished_blocks_only():
    costs = {'a': 5.0, 'b': 5.0, 'c': 5.0, 'd': 5.0}
    remaining = {'a': 0.0, 'b': 1.0, 'c': 0.0, 'd': 1.0}  # the kill came after rank 0 finished a and c
    stale = assign_blocks(costs, 2)  # balancing all blocks, then skipping the finished ones ...
    assert [[p for p in paths if remaining[p]] for paths in stale.ranks] == [[], ['b', 'd']]  # ... idles rank 0
    fresh = assign_blocks(unfinished_costs(costs, remaining), 2)
    assert sorted(map(sorted, fresh.ranks)) == [['b'], ['d']] and fresh.loads == [5.0, 5.0]
    # An in-progress block weighs its remaining steps: 'x' (90% done) joins the lighter rank.
    partial = unfinished_costs({'x': 10.0, 'y': 6.0, 'z': 5.0}, {'x': 0.1, 'y': 1.0, 'z': 1.0})
    assert partial == {'x': pytest.approx(1.0), 'y': 6.0, 'z': 5.0}
    assert sorted(map(sorted, assign_blocks(partial, 2).ranks)) == [['x', 'z'], ['y']]
    with pytest.raises(ValueError, match=r"remaining has no entry for blocks \['z'\]"):
        unfinished_costs({'z': 1.0}, {})
    with pytest.raises(ValueError, match=r"remaining fractions \{'z': 1.5\} are not in \[0, 1\]"):
        unfinished_costs({'z': 1.0}, {'z': 1.5})


def test_stitching_refuses_blocks_trained_against_another_teacher(reference, teacher, data):
    folder, _, _ = reference
    other = copy.deepcopy(teacher)
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)  # e.g. a retrained teacher: same architecture, other weights
    path = find_blocks(teacher)[0]
    with pytest.raises(BlockCheckpointMismatchError, match=rf"block '{path}' in {folder} was trained against a "
                       rf'different teacher.*Fix: stitch with the teacher the blocks were trained against') as info:
        stitch(other, folder, data[1])
    assert isinstance(info.value, ValueError)
    saved = torch.load(folder / path / 'block.pt', weights_only=False)
    assert saved['fingerprint']['precision'] == 'fp32'  # the resolved precision (precision=None on CPU)


def test_bad_block_paths_fail_up_front_with_close_names(teacher, data, tmp_path):
    example = torch.utils.data.default_collate([data[0][0], data[0][1]])
    with pytest.raises(ValueError, match=r"paths: the model has no module 'module.features.9'.*Fix: use a path"):
        trace_blocks(teacher, ['module.features.9'], example)
    with pytest.raises(ValueError, match=r"paths: the model has no module 'module.feature.1'. Did you mean "
                       r"'module.features.1'.*Fix"):
        train_blocks(teacher, make_student(teacher, seed=0), [find_blocks(teacher)[0], 'module.feature.1'], data[0],
                     BlockTrainingSpec(**SPEC), tmp_path / 'blocks')
    assert not (tmp_path / 'blocks').exists()  # nothing was trained before the bad path was found
    with pytest.raises(ValueError, match=r"paths='module.features.1' is not a list of module paths"):
        trace_blocks(teacher, 'module.features.1', example)


def _usage(free: int) -> SimpleNamespace:
    """What shutil.disk_usage returns, with ``free`` bytes free."""
    return SimpleNamespace(total=10 * free, used=9 * free, free=free)


def test_activation_cache_plan_follows_the_free_disk_and_the_rank_count(monkeypatch, tmp_path):
    traces = {'a': BlockTrace('a', 0, (4, 8, 8), (8, 8, 8), True), 'b': BlockTrace('b', 1, (8, 8, 8), (8, 8, 8), True)}
    size = 1000 * (256 + 512) * 4
    assert estimate_activation_bytes(traces['a'], 1000) == size
    auto = BlockTrainingSpec(epochs=2, activations='auto')
    monkeypatch.setattr(shutil, 'disk_usage', lambda path: _usage(10 * size))
    plan = plan_activation_cache(auto, traces, 1000, tmp_path / 'not' / 'yet')  # measured on the nearest parent
    assert plan['a'].use_disk and plan['a'].fits and plan['a'].estimate_bytes == size
    assert plan['a'].free_bytes == 10 * size and 'fits cache_max_bytes' in plan['a'].reason
    monkeypatch.setattr(shutil, 'disk_usage', lambda path: _usage(int(1.5 * size)))
    assert plan_activation_cache(auto, traces, 1000, tmp_path, ranks=1)['a'].use_disk
    crowded = plan_activation_cache(auto, traces, 1000, tmp_path, ranks=2)  # 2 ranks may build a cache at once
    assert not crowded['a'].use_disk and not crowded['a'].fits
    assert 'not enough free disk (2 rank(s) x' in crowded['a'].reason
    kept = plan_activation_cache(BlockTrainingSpec(epochs=2, activations='auto', keep_cache=True), traces, 1000,
                                 tmp_path)  # kept caches accumulate: the second no longer fits
    assert kept['a'].use_disk and not kept['b'].use_disk
    (tmp_path / 'b').mkdir()
    (tmp_path / 'b' / 'meta.json').write_text('{}')  # a cache already on disk needs no new space
    assert plan_activation_cache(auto, traces, 1000, tmp_path, ranks=2)['b'].use_disk
    assert not plan_activation_cache(BlockTrainingSpec(epochs=1, activations='auto'), traces, 1000,
                                     tmp_path)['a'].use_disk
    small = BlockTrainingSpec(epochs=2, activations='auto', cache_max_bytes=size - 1)
    assert 'cache_max_bytes' in plan_activation_cache(small, traces, 1000, tmp_path)['a'].reason
    disk = BlockTrainingSpec(epochs=2, activations='disk')
    monkeypatch.setattr(shutil, 'disk_usage', lambda path: _usage(size // 2))
    plan = plan_activation_cache(disk, traces, 1000, tmp_path / 'cache', ranks=2)
    assert plan['a'].use_disk and not plan['a'].fits
    with pytest.raises(ValueError, match=r"activations='disk': the teacher activation cache of block 'b' needs "
                       r"4.1 MB \(4096000 bytes\), and 2 rank\(s\) may build such caches at once, but only 1.5 MB "
                       r"are free under .*cache \(2 block\(s\) do not fit: \['a', 'b'\]\). Fix: free disk space"
                       r".*activations='auto'"):
        require_cache_fits(plan, disk, tmp_path / 'cache')
    with pytest.raises(ValueError, match=r'ranks=0 is invalid'):
        plan_activation_cache(auto, traces, 1000, tmp_path, ranks=0)


def test_disk_mode_refuses_to_start_when_the_cache_cannot_fit(monkeypatch, teacher, data, tmp_path):
    monkeypatch.setattr(shutil, 'disk_usage', lambda path: _usage(1000))
    with pytest.raises(ValueError, match=r"activations='disk': the teacher activation cache of block "
                       r"'module.features.1' needs"):
        train_blocks(teacher, make_student(teacher, seed=0), find_blocks(teacher), data[0],
                     BlockTrainingSpec(**{**SPEC, 'activations': 'disk'}), tmp_path / 'blocks')
    assert not (tmp_path / 'blocks').exists()


def test_report_wallclock_compares_measured_sequential_and_parallel_sessions(tmp_path):
    from composer_ext.blockwise.pipeline import _wallclock
    from composer_ext.storage import atomic_write_json

    blocks = {'a': {'seconds': 30.0}, 'b': {'seconds': 12.0}}
    latest = {'world_size': 2, 'wall_seconds': 5.0, 'block_seconds_sum': 9.0, 'complete': False,
              'assignment': {'efficiency': 0.9, 'method': 'exact'}}
    wall = _wallclock(tmp_path, latest, blocks)
    # The estimate uses this session's block seconds, not the blocks' totals over all sessions.
    assert wall['sequential_over_parallel'] == pytest.approx(9.0 / 5.0) and wall['block_seconds_all_sessions'] == 42.0
    assert wall['measured_sequential_vs_parallel'] is None and wall['partition'] == 'exact'
    atomic_write_json(tmp_path / 'block_stage_w1.json', {'world_size': 1, 'wall_seconds': 40.0, 'complete': True})
    atomic_write_json(tmp_path / 'block_stage_w2.json', {'world_size': 2, 'wall_seconds': 5.0, 'complete': False})
    assert _wallclock(tmp_path, latest, blocks)['measured_sequential_vs_parallel'] is None  # w2 was resumed
    atomic_write_json(tmp_path / 'block_stage_w2.json', {'world_size': 2, 'wall_seconds': 22.0, 'complete': True,
                                                          'previous_sessions': [{'world_size': 2}]})
    wall = _wallclock(tmp_path, latest, blocks)
    assert wall['measured_sequential_vs_parallel'] == {'sequential_wall_seconds': 40.0, 'parallel_wall_seconds': 22.0,
                                                       'parallel_world_size': 2, 'speedup': pytest.approx(40 / 22)}
    assert wall['by_world_size']['2']['sessions'] == 2 and wall['by_world_size']['1']['complete']
