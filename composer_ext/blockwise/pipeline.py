"""The whole method on ``torch.distributed``: teacher -> parallel block training -> stitch -> finetune -> report.

:func:`run_blockwise` runs on every rank of a job started by Composer's launcher
(``composer -n N -m composer_ext.cli blockwise CONFIG.yaml``) or as a single process (one rank: the sequential
baseline). Stages, each resumable:

``teacher``
    Loads the teacher from its Composer checkpoint; with ``teacher.run``, first trains it with that
    ``composer-ext run`` config (a normal Composer run on all ranks, resumed if interrupted); see
    :mod:`~composer_ext.blockwise.teacher`.
``blocks``
    Rank 0 reads which blocks are finished, in progress (and how far) or untouched, and plans the activation
    caches against the free disk; every rank receives that plan and computes the same cost-balanced
    assignment of the *unfinished* blocks (an in-progress block weighs only its remaining steps; see
    :mod:`~composer_ext.blockwise.scheduling`), then trains its own blocks with no communication,
    each block checkpointing on its own. The per-rank busy times, the parallel wall time and the seconds of
    every block trained in the session are gathered to rank 0 (``block_stage_w<N>.json`` per world size N,
    and ``block_stage.json``: the latest session that trained blocks).
``stitch``
    Assembles the student from the block checkpoints and measures teacher, solo-swap and stitched
    accuracies, sharded over the ranks (``stitch.json``).
``finetune``
    Trains the stitched student end to end as a normal Composer run (DDP over the ranks, autoresumed),
    optionally with :class:`composer_ext.algorithms.KnowledgeDistillation` from the teacher
    (``finetune.json``, ``student.pt``).
``report``
    Rank 0 writes ``report.json`` and ``report.png``.
"""

from __future__ import annotations

import copy
import io
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from composer import Trainer
from composer.core import DataSpec, Evaluator
from composer.utils import dist, reproducibility
from torch import nn

from composer_ext import registry
from composer_ext.blockwise.activations import TeacherActivations
from composer_ext.blockwise.activations import autocast as autocast_to
from composer_ext.blockwise.activations import batch_to_device
from composer_ext.blockwise.cache_plan import format_bytes, plan_activation_cache, require_cache_fits
from composer_ext.blockwise.config import BlockwiseConfig
from composer_ext.blockwise.discovery import count_macs, find_blocks, get_submodule, set_submodule, trace_blocks
from composer_ext.blockwise.report import write_report
from composer_ext.blockwise.scheduling import assign_blocks, block_costs, unfinished_costs
from composer_ext.blockwise.spec import BlockTrainingSpec, amp_settings
from composer_ext.blockwise.stitching import evaluate_accuracy, load_student, stitch
from composer_ext.blockwise.student import make_student
from composer_ext.blockwise.teacher import build_teacher
from composer_ext.blockwise.training import block_folder, block_progress, train_blocks
from composer_ext.config import ConfigError
from composer_ext.core.checkpoints import load_checkpoint
from composer_ext.distillation import KnowledgeDistillation
from composer_ext.runner import RunConfig, RunContext, final_eval_metrics, resolve_device, resolve_precision
from composer_ext.storage import atomic_write_bytes, atomic_write_json

__all__ = ['STAGES', 'profile_costs', 'run_blockwise', 'stage_file']

STAGES = ('teacher', 'blocks', 'stitch', 'finetune', 'report')


def _rank_zero() -> bool:
    return dist.get_global_rank() == 0


def _say(stream, message: str) -> None:
    if _rank_zero():
        print(message, file=stream, flush=True)


def _threads(setting: Any, device: str) -> int:
    if setting == 'auto':
        if device == 'gpu':
            return torch.get_num_threads()
        return max(1, (os.cpu_count() or 1) // max(1, dist.get_local_world_size()))
    return int(setting)



def _dataset(config: BlockwiseConfig, section: dict, key: str, device: str) -> Any:
    context = RunContext(config=RunConfig(max_duration=1, model={}, train_loader={}, source=config.source),
                         device=device)
    built = context.build_dataloader(section, key)
    loader = built.dataloader if isinstance(built, DataSpec) else built
    dataset = getattr(loader, 'dataset', None)
    if dataset is None or isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, '__len__'):
        raise ConfigError(config.source, key, f'the {section.get("name")!r} dataloader has no map-style dataset, '
                          f'which block training and exact evaluation index by sample.',
                          'use a dataloader over a map-style dataset (e.g. name: image).')
    return dataset


def _synchronize(device: torch.device) -> None:
    if device.type == 'cuda':  # CUDA runs asynchronously: time the work, not its launch
        torch.cuda.synchronize(device)


def profile_costs(teacher: nn.Module, student: nn.Module, paths: Sequence[str], dataset: Any,
                  spec: BlockTrainingSpec, steps: int = 5,
                  cached: Optional[dict[str, bool]] = None) -> dict[str, float]:
    """Measured seconds per block: ``steps`` timed steps (after one warm-up), scaled to the whole block training.

    The teacher prefix (producing the block's input and target) and the student block's training step are
    timed apart, so a block whose activations are cached on disk (``cached[path]``) pays the prefix once
    instead of once per epoch. Both run under the autocast of block training (``spec.precision``). The
    blocks are split round-robin over the ranks, profiled concurrently, and the timings all-gathered, so
    every rank returns the same costs.
    """
    rank, world = dist.get_global_rank(), dist.get_world_size()
    cached = cached or {}
    device = next(teacher.parameters()).device
    autocast_dtype = amp_settings(spec, device)[0]
    samples = [dataset[i] for i in range(min(spec.batch_size, len(dataset)))]
    batch = batch_to_device(torch.utils.data.default_collate(samples), device)
    timings = {}
    for path in list(paths)[rank::world]:
        block = copy.deepcopy(get_submodule(student, path)).to(device).train()
        optimizer = torch.optim.SGD(block.parameters(), lr=0.0)
        taps = TeacherActivations(teacher, [path], autocast_dtype=autocast_dtype)
        prefix = train = 0.0
        for step in range(steps + 1):
            _synchronize(device)
            started = time.perf_counter()
            inputs, targets = taps(batch)[path]
            _synchronize(device)
            middle = time.perf_counter()
            with autocast_to(device, autocast_dtype):
                outputs = block(inputs)
            loss = nn.functional.mse_loss(outputs.float(), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            _synchronize(device)
            if step:  # the first step warms up
                prefix, train = prefix + middle - started, train + time.perf_counter() - middle
        timings[path] = (prefix / steps, train / steps)
    merged: dict[str, tuple[float, float]] = {}
    for part in dist.all_gather_object(timings):
        merged.update(part)
    steps_per_epoch = len(dataset) // spec.batch_size
    return {path: steps_per_epoch * ((1 if cached.get(path) else spec.epochs) * merged[path][0] +
                                     spec.epochs * merged[path][1]) for path in paths}


def stage_file(output: Path, world_size: int) -> Path:
    """The block-stage summary of the runs at ``world_size`` ranks: ``<output>/block_stage_w<N>.json``."""
    return Path(output) / f'block_stage_w{world_size}.json'


def _plan(config, paths, traces, dataset) -> tuple[dict[str, float], dict]:
    """Rank 0 reads the block progress and the free disk; every rank gets the same answer (one broadcast)."""
    spec = config.block_training
    payload: list[Any] = [None]
    if dist.get_global_rank() == 0:
        total_steps = len(dataset) // spec.batch_size * spec.epochs
        remaining = block_progress(config.output / 'blocks', paths, total_steps)
        todo = {p: traces[p] for p in paths if remaining[p] > 0}
        plan = plan_activation_cache(spec, todo, len(dataset), config.output / 'activations',
                                     ranks=max(1, min(dist.get_world_size(), len(todo)))) if todo else {}
        payload = [(remaining, plan)]
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(payload, src=0)
    return payload[0]


def _blocks_stage(config, teacher, student, paths, traces, student_traces, dataset, eval_dataset, stream) -> dict:
    rank, world = dist.get_global_rank(), dist.get_world_size()
    spec = config.block_training
    remaining, plan = _plan(config, paths, traces, dataset)
    done = [p for p in paths if remaining[p] == 0]
    todo = [p for p in paths if remaining[p] > 0]
    if not todo:
        _say(stream, f'[blockwise] all {len(paths)} blocks are finished; nothing to train (the block-stage '
                     f'timings of the sessions that trained them are kept)')
        return {'world_size': world, 'trained_this_session': {str(r): [] for r in range(world)},
                'skipped_done': sorted(done), 'wall_seconds': 0.0, 'written': False}
    try:
        require_cache_fits(plan, spec, config.output / 'activations')  # on every rank: all fail together
    except ValueError as err:
        raise ConfigError(config.source, 'block_training.activations', str(err), '') from None
    _say(stream, '[blockwise] teacher activations: ' + '; '.join(
        f'{p.removeprefix("module.")} {format_bytes(d.estimate_bytes)} '
        f'{"disk cache" if d.use_disk else "on the fly"} ({d.reason})' for p, d in plan.items()))
    cached = {p: plan[p].use_disk for p in todo}
    if config.schedule.cost == 'profile':
        full = profile_costs(teacher, student, todo, dataset, spec, config.schedule.profile_steps, cached)
    else:
        full = block_costs({p: traces[p] for p in todo}, student_traces, config.schedule.cost, spec.epochs, cached)
    costs = unfinished_costs(full, remaining)  # a resumed run is balanced over the work that is left
    with warnings.catch_warnings():
        if rank != 0:
            warnings.simplefilter('ignore', UserWarning)  # the idle-ranks warning, once per job
        assignment = assign_blocks(costs, world, method=config.schedule.partition)
    mine = assignment.ranks[rank]
    resumed = [p for p in todo if remaining[p] < 1]
    _say(stream, f'[blockwise] {len(todo)} block(s) to train ({len(done)} finished, {len(resumed)} resumed) on '
                 f'{world} rank(s) by {config.schedule.cost} cost, {assignment.method} partition (predicted load '
                 f'balance {assignment.efficiency:.3f}): ' +
         '; '.join(f'rank {r}: {", ".join(p.removeprefix("module.") for p in ps) or "idle"}'
                   for r, ps in enumerate(assignment.ranks)))
    dist.barrier()
    started = time.perf_counter()
    results = train_blocks(teacher, student, mine, dataset, spec, folder=config.output / 'blocks', seed=config.seed,
                           val_dataset=eval_dataset, traces=traces, progress=config.progress_bar and rank == 0,
                           cache_folder=config.output / 'activations', cache_plan=plan, rank=rank)
    busy = time.perf_counter() - started
    gathered = dist.all_gather_object({'rank': rank, 'busy': busy, 'results': [r.to_dict() for r in results]})
    wall = time.perf_counter() - started
    gathered = sorted(gathered, key=lambda g: g['rank'])
    busy_times = [part['busy'] for part in gathered]
    session_seconds = {r['path']: r['session_seconds'] for part in gathered for r in part['results']}
    block_sum = sum(session_seconds.values())
    summary = {
        'world_size': world, 'threads_per_rank': torch.get_num_threads(), 'cost_model': config.schedule.cost,
        'partition': config.schedule.partition, 'assignment': assignment.to_dict(),
        'remaining_fraction': {p: remaining[p] for p in todo},
        'rank_busy_seconds': busy_times, 'wall_seconds': wall,
        'trained_this_session': {str(part['rank']): [r['path'] for r in part['results']] for part in gathered},
        'resumed': resumed, 'skipped_done': sorted(done),
        # Every block trained in this session, from scratch: the wall time is the whole block stage.
        'complete': not done and not resumed,
        'block_seconds_this_session': session_seconds, 'block_seconds_sum': block_sum,
        'sequential_over_parallel_estimate': block_sum / wall if wall > 0 else None,
        'load_balance_efficiency': (sum(busy_times) / len(busy_times) / max(busy_times)) if max(busy_times) > 0
        else None,
        'activations': {p: d.to_dict() for p, d in plan.items()},
        'written': True,
    }
    if rank == 0:
        previous = _read(stage_file(config.output, world))
        if previous is not None:  # earlier sessions at this world size (e.g. before a kill), kept for the record
            summary['previous_sessions'] = previous.pop('previous_sessions', []) + [previous]
        atomic_write_json(stage_file(config.output, world), summary)
        atomic_write_json(config.output / 'block_stage.json', summary)
        for part in gathered:
            for result in part['results']:
                _say(stream, f'[blockwise] rank {part["rank"]} {result["status"]:>8} {result["path"]}: '
                             f'{result["steps"]} steps, val MSE {result["val_mse"]}, relative '
                             f'{result["val_relative_mse"]}, {result["session_seconds"]:.1f}s this session')
    dist.barrier()
    return summary


def _stitched(teacher, config, paths, example, rejected) -> nn.Module:
    model = load_student(teacher, config.output / 'blocks', paths, example_input=example, seed=config.seed)
    for path in rejected:
        set_submodule(model, path, copy.deepcopy(get_submodule(teacher, path)))
    return model.to(next(teacher.parameters()).device).requires_grad_(True)


def _finetune_stage(config, teacher, model, eval_dataset, device, stream) -> dict:
    section = config.finetune
    marker = config.output / 'finetune.json'
    if marker.exists():
        # weights_only: student.pt is the finetuned student's state_dict, written below
        model.load_state_dict(load_checkpoint(config.output / 'student.pt', weights_only=True,
                                              what='finetuned student'))
        return json.loads(marker.read_text())
    run_name = f'{config.run_name}-finetune'
    run_config = RunConfig(max_duration=section.max_duration, model={}, train_loader=section.train_loader,
                           run_name=run_name, seed=config.seed, source=config.source)
    context = RunContext(config=run_config, device=device, model=model)
    train_loader = context.build_dataloader(section.train_loader, 'finetune.train_loader')
    eval_loader = context.build_dataloader(config.eval_data, 'eval_data')
    optimizer = context.build(registry.optimizers, section.optimizer, 'finetune.optimizer',
                              params=model.parameters()) if section.optimizer else None
    scheduler = context.build(registry.schedulers, section.scheduler, 'finetune.scheduler') if section.scheduler \
        else None
    named = {}
    for key, reg in (('algorithms', registry.algorithms), ('callbacks', registry.callbacks),
                     ('loggers', registry.loggers)):
        named[key] = [context.call(reg, name, kwargs or {}, f'finetune.{key}.{name}')
                      for name, kwargs in (getattr(section, key) or {}).items()]
    if section.kd is not None:
        named['algorithms'].append(KnowledgeDistillation(teachers=[copy.deepcopy(teacher)], **section.kd))
    _say(stream, f'[blockwise] finetuning the stitched student for {section.max_duration}'
                 + (' with KnowledgeDistillation from the teacher' if section.kd is not None else ''))
    started = time.perf_counter()
    trainer = Trainer(
        model=model, train_dataloader=train_loader, eval_dataloader=Evaluator(label='eval', dataloader=eval_loader),
        eval_interval=section.eval_interval, max_duration=section.max_duration, optimizers=optimizer,
        schedulers=scheduler, step_schedulers_every_batch=section.step_schedulers_every_batch,
        algorithms=named['algorithms'], callbacks=named['callbacks'], loggers=named['loggers'], run_name=run_name,
        seed=config.seed, device=device, precision=resolve_precision(section.precision, device),
        save_folder=str(config.output / 'finetune' / 'checkpoints'), save_interval=section.save_interval,
        autoresume=True, progress_bar=config.progress_bar, dist_timeout=config.dist_timeout)
    trainer.fit()
    metrics = final_eval_metrics(trainer.state)
    batches = int(trainer.state.timestamp.batch.value)
    trainer.close()
    seconds = time.perf_counter() - started
    accuracy = evaluate_accuracy(model, eval_dataset, config.stitch.batch_size)
    result = {'accuracy': accuracy, 'composer_eval_metrics': metrics, 'batches': batches, 'seconds': seconds,
              'kd': section.kd}
    if _rank_zero():
        buffer = io.BytesIO()
        torch.save(model.state_dict(), buffer)
        atomic_write_bytes(config.output / 'student.pt', buffer.getvalue())
        atomic_write_json(marker, result)
    dist.barrier()
    return result


def _read(path: Path) -> Optional[dict]:
    return json.loads(path.read_text()) if path.exists() else None


def _wallclock(output: Path, stage: dict, blocks: dict) -> dict:
    """Block-stage wall-clock: the latest session's parallel wall vs the block time it covered, and, when a
    1-rank and an N-rank session each trained every block from scratch, their measured wall times."""
    wall = stage.get('wall_seconds')
    block_sum = stage.get('block_seconds_sum')
    if block_sum is None:  # a summary written before per-session block times were recorded
        block_sum = sum(b['seconds'] or 0.0 for b in blocks.values())
    by_world = {}
    for file in sorted(output.glob('block_stage_w*.json')):
        saved = _read(file) or {}
        if 'world_size' in saved:
            by_world[saved['world_size']] = {
                k: saved.get(k) for k in ('wall_seconds', 'complete', 'block_seconds_sum', 'rank_busy_seconds',
                                          'load_balance_efficiency', 'threads_per_rank', 'cost_model', 'partition')}
            by_world[saved['world_size']]['sessions'] = 1 + len(saved.get('previous_sessions', []))
    measured = None
    parallel = [n for n in sorted(by_world) if n > 1 and by_world[n]['complete']]
    if 1 in by_world and by_world[1]['complete'] and parallel:
        n = parallel[-1]
        sequential_wall, parallel_wall = by_world[1]['wall_seconds'], by_world[n]['wall_seconds']
        measured = {'sequential_wall_seconds': sequential_wall, 'parallel_wall_seconds': parallel_wall,
                    'parallel_world_size': n, 'speedup': sequential_wall / parallel_wall if parallel_wall else None}
    return {
        'block_stage_wall_seconds': wall, 'world_size': stage.get('world_size'),
        'rank_busy_seconds': stage.get('rank_busy_seconds'),
        'block_seconds_sum': block_sum, 'sequential_over_parallel': block_sum / wall if wall else None,
        'block_seconds_all_sessions': sum(b['seconds'] or 0.0 for b in blocks.values()),
        'load_balance_efficiency': stage.get('load_balance_efficiency'),
        'predicted_load_balance_efficiency': stage.get('assignment', {}).get('efficiency'),
        'threads_per_rank': stage.get('threads_per_rank'), 'cost_model': stage.get('cost_model'),
        'partition': stage.get('assignment', {}).get('method'), 'complete': stage.get('complete'),
        'trained_this_session': stage.get('trained_this_session'), 'resumed': stage.get('resumed'),
        'skipped_done': stage.get('skipped_done'), 'by_world_size': {str(n): v for n, v in by_world.items()},
        'measured_sequential_vs_parallel': measured,
        'note': 'block_stage_wall_seconds and block_seconds_sum cover the latest block-stage session that trained '
                'blocks (block_seconds_sum: the seconds its blocks took, what one worker would spend on them one '
                'after another), so sequential_over_parallel is an estimate; measured_sequential_vs_parallel '
                'compares real 1-rank and N-rank sessions that each trained every block from scratch '
                '(block_stage_w<N>.json; e.g. run 1 rank, delete blocks/, run N ranks).',
    }


def _report(config, paths, traces, student_traces, teacher, student, example, teacher_info) -> dict:
    stage = _read(config.output / 'block_stage.json') or {}
    stitched = _read(config.output / 'stitch.json') or {}
    finetuned = _read(config.output / 'finetune.json') or {}
    assignment = stage.get('assignment', {})
    costs = assignment.get('costs', {})
    blocks = {}
    for path in paths:
        result = _read(block_folder(config.output / 'blocks', path) / 'result.json') or {}
        student_block = get_submodule(student, path)
        blocks[path] = {
            # The rank that finished the block (from its result), not the latest assignment: a block finished
            # in an earlier session is not assigned again.
            'rank': result.get('rank'), 'cost': costs.get(path), 'post_activation': traces[path].post_activation,
            'teacher_params': traces[path].params, 'student_params': sum(p.numel() for p in student_block.parameters()),
            'teacher_macs': traces[path].macs, 'student_macs': student_traces[path].macs,
            'input_shape': list(traces[path].input_shape), 'output_shape': list(traces[path].output_shape),
            'steps': result.get('steps'), 'seconds': result.get('seconds'), 'train_mse': result.get('train_mse'),
            'val_mse': result.get('val_mse'), 'val_relative_mse': result.get('val_relative_mse'),
            'initial_val_mse': result.get('initial_val_mse'), 'activations': result.get('activations'),
            'solo_accuracy': stitched.get('solo_accuracy', {}).get(path),
            'solo_drop': stitched.get('solo_drop', {}).get(path),
            'accepted': path in stitched.get('accepted', []) if stitched else None,
            'history': result.get('history', []), 'val_history': result.get('val_history', []),
        }
    teacher_params = sum(p.numel() for p in teacher.parameters())
    student_params = sum(p.numel() for p in student.parameters())
    teacher_macs, student_macs = count_macs(teacher, example), count_macs(student, example)
    accuracy = {'teacher': stitched.get('teacher_accuracy'), 'stitched': stitched.get('stitched_accuracy'),
                'finetuned': finetuned.get('accuracy')}
    if accuracy['teacher'] is not None and accuracy['finetuned'] is not None:
        accuracy['finetuned_minus_teacher_points'] = 100 * (accuracy['finetuned'] - accuracy['teacher'])
    return {
        'run_name': config.run_name, 'config': config.source, 'world_size': stage.get('world_size'),
        'teacher': {'params': teacher_params, 'macs_per_sample': teacher_macs, **teacher_info},
        'student': {'params': student_params, 'macs_per_sample': student_macs},
        'compression': {'params_ratio': teacher_params / student_params, 'flops_ratio': teacher_macs / student_macs},
        'accuracy': accuracy,
        'stitch': {k: stitched.get(k) for k in ('accepted', 'rejected', 'max_solo_drop', 'eval_samples')},
        'finetune': {k: finetuned.get(k) for k in ('batches', 'seconds', 'kd', 'composer_eval_metrics')},
        'wallclock': _wallclock(config.output, stage, blocks),
        'activations': stage.get('activations'),
        'blocks': blocks,
    }


def run_blockwise(config: BlockwiseConfig, stages: Sequence[str] = STAGES, stream=sys.stdout) -> dict:
    """Run the chosen stages of parallel blockwise distillation on this rank; return the report (rank 0 writes it).

    Args:
        config: A validated config (:func:`~composer_ext.blockwise.config.load_blockwise_config`).
        stages: Any of :data:`STAGES`, run in pipeline order; a later stage reuses an earlier stage's files.
        stream: Where rank 0 prints progress lines.

    Returns:
        The report dict (also written to ``<output_folder>/report.json`` when ``'report'`` is a stage).
    """
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise ValueError(f'stages={list(stages)!r} has unknown stages {unknown}. Fix: choose from {list(STAGES)}.')
    device = resolve_device(config.device)
    dist.initialize_dist(device, timeout=config.dist_timeout)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(_threads(config.threads_per_rank, device))
    try:
        return _run(config, tuple(stages), device, stream)
    finally:
        torch.set_num_threads(previous_threads)


def _run(config: BlockwiseConfig, stages: tuple, device: str, stream) -> dict:
    reproducibility.seed_all(config.seed)
    config.output.mkdir(parents=True, exist_ok=True)

    teacher, teacher_info = build_teacher(config, device, train='teacher' in stages, stream=stream)
    dataset = _dataset(config, config.data, 'data', device)
    eval_dataset = _dataset(config, config.eval_data, 'eval_data', device)
    example = batch_to_device(torch.utils.data.default_collate([dataset[i] for i in range(2)]),
                              next(teacher.parameters()).device)
    try:
        paths = find_blocks(teacher, config.blocks)
    except ValueError as err:
        raise ConfigError(config.source, 'blocks', str(err), '') from None
    student = make_student(teacher, paths, example_input=example, seed=config.seed)
    traces = trace_blocks(teacher, paths, example)
    student_traces = trace_blocks(student, paths, example)

    if 'blocks' in stages:
        _blocks_stage(config, teacher, student, paths, traces, student_traces, dataset, eval_dataset, stream)
    stitched_model = None
    if 'stitch' in stages:
        result = stitch(teacher, config.output / 'blocks', eval_dataset, paths, config.stitch.max_solo_drop,
                        config.stitch.eval_samples, config.stitch.batch_size, example_input=example, seed=config.seed,
                        progress=config.progress_bar and _rank_zero())
        stitched_model = result.model
        summary = result.to_dict()
        summary['teacher_full_accuracy'] = evaluate_accuracy(teacher, eval_dataset, config.stitch.batch_size)
        summary['stitched_full_accuracy'] = evaluate_accuracy(stitched_model, eval_dataset, config.stitch.batch_size)
        if _rank_zero():
            atomic_write_json(config.output / 'stitch.json', summary)
        _say(stream, f'[blockwise] stitched {len(result.accepted)}/{len(paths)} blocks (rejected: {result.rejected}); '
                     f'accuracy teacher {summary["teacher_full_accuracy"]:.4f}, stitched '
                     f'{summary["stitched_full_accuracy"]:.4f}; solo drops '
                     + ', '.join(f'{p.removeprefix("module.")} {100 * d:+.2f}' for p, d in result.solo_drop.items()))
        dist.barrier()
    if 'finetune' in stages and config.finetune is not None:
        if stitched_model is None:
            saved = _read(config.output / 'stitch.json')
            if saved is None:
                raise ConfigError(config.source, 'finetune', f'{config.output / "stitch.json"} is missing: the stitch '
                                  f'stage has not run.', 'run the stitch stage first (--stage stitch, or all).')
            stitched_model = _stitched(teacher, config, paths, example, saved['rejected'])
        finetuned = _finetune_stage(config, teacher, stitched_model, eval_dataset, device, stream)
        _say(stream, f'[blockwise] finetuned student accuracy {finetuned["accuracy"]:.4f}')
    stitch_saved = _read(config.output / 'stitch.json') or {}
    if stitched_model is None and stitch_saved:
        stitched_model = _stitched(teacher, config, paths, example, stitch_saved['rejected'])
    report = _report(config, paths, traces, student_traces, teacher, stitched_model or student, example,
                     teacher_info)
    for key in ('teacher', 'stitched'):
        if stitch_saved.get(f'{key}_full_accuracy') is not None:
            report['accuracy'][key] = stitch_saved[f'{key}_full_accuracy']
    if report['accuracy'].get('teacher') is not None and report['accuracy'].get('finetuned') is not None:
        report['accuracy']['finetuned_minus_teacher_points'] = 100 * (report['accuracy']['finetuned'] -
                                                                      report['accuracy']['teacher'])
    if 'report' in stages and _rank_zero():
        json_path, png_path = write_report(report, config.output)
        _say(stream, f'[blockwise] report: {json_path} {png_path}')
    dist.barrier()
    return report

