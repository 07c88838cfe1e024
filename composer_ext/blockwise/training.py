"""Train student blocks one at a time against the teacher's own activations, with per-block checkpoints.

Each block trains on its own: ``MSE(student_block(h_in), h_out)`` over the dataset, where ``(h_in, h_out)``
is the frozen teacher's input to and output of that block (see
:mod:`composer_ext.blockwise.activations`). Everything that decides a block's result (its
initialisation, its data order, its optimizer) is seeded from the run seed and the block path, never from
the rank or the order of blocks, so a block trained on rank 1 of a 2-rank job is bit-identical to the same
block trained by a 1-rank (sequential) job.

Every block writes to its own directory ``<folder>/<block path>/`` through :mod:`composer_ext.storage`:

* ``checkpoint.pt`` every ``checkpoint_interval`` steps and at the end of every epoch (block weights,
  optimizer, LR schedule, RNG, position in the epoch, loss history, seconds spent), replaced atomically;
* ``block.pt`` and then ``result.json`` when the block is finished.

A killed run therefore resumes exactly: finished blocks are skipped (their weights are loaded), a block
that was in progress continues from its last checkpoint with the same data order, and untouched blocks
start from scratch. A directory written under a different configuration (teacher weights, seed, training
settings, dataset) is refused rather than silently mixed in.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from composer.utils import dist
from torch import nn
from tqdm.auto import tqdm

from composer_ext import registry
from composer_ext.blockwise.activations import ActivationCache, TeacherActivations
from composer_ext.blockwise.activations import autocast as autocast_to
from composer_ext.blockwise.activations import batch_to_device
from composer_ext.blockwise.cache_plan import (CacheDecision, format_bytes, plan_activation_cache,
                                               require_cache_fits)
from composer_ext.blockwise.discovery import BlockTrace, get_submodule, trace_blocks
from composer_ext.blockwise.spec import BlockTrainingSpec, amp_settings, resolved_precision
from composer_ext.blockwise.student import block_seed
from composer_ext.core.checkpoints import load_checkpoint
from composer_ext.core.provenance import bytes_sha256, chunks_sha256
from composer_ext.storage import atomic_write_bytes, atomic_write_json

__all__ = ['BlockCheckpointMismatchError', 'BlockResult', 'block_folder', 'block_progress', 'dataset_fingerprint',
           'load_block_file', 'teacher_fingerprint', 'train_block', 'train_blocks']

log = logging.getLogger(__name__)

StepHook = Callable[[str, int, float], None]


class BlockCheckpointMismatchError(ValueError):
    """A block checkpoint was written under a different configuration or teacher (the message names the fix)."""


@dataclass
class BlockResult:
    """The outcome of training one block (also the content of its ``result.json``)."""

    path: str
    status: str
    steps: int
    epochs: int
    seconds: float
    session_seconds: float
    train_mse: float
    val_mse: Optional[float]
    val_relative_mse: Optional[float]
    initial_val_mse: Optional[float]
    activations: str
    history: list = field(default_factory=list)
    val_history: list = field(default_factory=list)
    rank: Optional[int] = None  # the rank that finished the block (it may have been started by another one)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> 'BlockResult':
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


def block_folder(folder: str | Path, path: str) -> Path:
    """The directory of one block's checkpoints: ``<folder>/<block path>``."""
    return Path(folder) / path


def _teacher_bytes(teacher: nn.Module) -> Iterator[bytes]:
    for name, tensor in teacher.state_dict().items():
        yield name.encode()
        if isinstance(tensor, torch.Tensor):
            value = tensor.detach().cpu().contiguous().reshape(-1)
            yield f'{tuple(value.shape)}{value.dtype}'.encode()
            yield value.view(torch.uint8).numpy().tobytes() if value.numel() else b''


def teacher_fingerprint(teacher: nn.Module) -> str:
    """SHA-256 of the teacher's state dict (names, flat sizes, dtypes and bytes), to tie checkpoints to a teacher.

    Not :func:`composer_ext.core.provenance.tensors_sha256` (sorted names, full shapes): every block checkpoint
    and activation cache records this digest and is refused when it differs, so its byte layout stays what
    block directories written before hold.
    """
    return chunks_sha256(_teacher_bytes(teacher))


def _dataset_bytes(dataset: Any) -> Iterator[bytes]:
    yield f'{type(dataset).__name__}:{len(dataset)}'.encode()
    for index in sorted({0, len(dataset) // 2, len(dataset) - 1}):
        for value in _tensors(dataset[index]):
            yield value.detach().cpu().contiguous().numpy().tobytes()


def dataset_fingerprint(dataset: Any) -> str:
    """The dataset's type and length and a hash of its first, middle and last items (cheap, catches a swap)."""
    return chunks_sha256(_dataset_bytes(dataset))[:16]


def _tensors(item: Any) -> list[torch.Tensor]:
    if isinstance(item, torch.Tensor):
        return [item]
    if isinstance(item, (tuple, list)):
        return [t for value in item for t in _tensors(value)]
    if isinstance(item, dict):
        return [t for key in sorted(item) for t in _tensors(item[key])]
    return [torch.as_tensor(item)] if isinstance(item, (int, float)) else []


def _to_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def load_block_file(path: Path) -> dict:
    """A block's ``checkpoint.pt`` or ``block.pt``, as this module wrote it.

    ``weights_only=True``: both hold only tensors, containers and plain values (the fingerprint, the block, the
    optimizer, LR schedule and grad scaler state dicts, the RNG state, the loss history).
    """
    return load_checkpoint(path, weights_only=True, what='block checkpoint')


def _lr_factor(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == 'cosine':
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if schedule == 'linear':
            return 1.0 - progress
        return 1.0
    return factor


def _mismatch(found: dict, wanted: dict) -> list[str]:
    return sorted(k for k in set(found) | set(wanted) if found.get(k) != wanted.get(k))


def _check_fingerprint(file: Path, found: dict, wanted: dict) -> None:
    if found != wanted:
        raise BlockCheckpointMismatchError(
            f'{file} was written by a different configuration (differs in {_mismatch(found, wanted)}). Fix: use a '
            f'new output folder for this configuration, or delete {file.parent} to retrain this block.')


class _Validation:
    """MSE and relative MSE (MSE / per-channel variance of the target) of a block on fixed held-out samples."""

    def __init__(self, dataset: Any, samples: int, batch_size: int):
        self.dataset = dataset
        self.count = min(samples, len(dataset)) if dataset is not None else 0
        self.batch_size = batch_size

    def __call__(self, block: nn.Module, taps: TeacherActivations, path: str,
                 autocast: Optional[torch.dtype]) -> Optional[tuple[float, float]]:
        if not self.count:
            return None
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(self.dataset, range(self.count)),
                                             batch_size=self.batch_size, shuffle=False)
        was_training = block.training
        block.eval()
        squared, total, sums, sumsq, elements = 0.0, 0, None, None, 0
        with torch.no_grad():
            for batch in loader:
                inputs, targets = taps(batch)[path]
                with autocast_to(inputs.device, autocast):
                    outputs = block(inputs)
                squared += float(((outputs.float() - targets) ** 2).sum())
                total += targets.numel()
                dims = [d for d in range(targets.dim()) if d != 1] if targets.dim() > 1 else [0]
                s, ss = targets.double().sum(dims), (targets.double() ** 2).sum(dims)
                sums = s if sums is None else sums + s
                sumsq = ss if sumsq is None else sumsq + ss
                elements += targets.numel() // (targets.shape[1] if targets.dim() > 1 else 1)
        block.train(was_training)
        mean = sums / elements
        variance = float((sumsq / elements - mean ** 2).clamp_min(0).mean())
        mse = squared / total
        return mse, mse / max(variance, 1e-12)


def train_block(teacher: nn.Module, student: nn.Module, path: str, dataset: Any,
                spec: Optional[BlockTrainingSpec] = None, folder: str | Path = 'blocks', seed: int = 0,
                val_dataset: Any = None, cache: Optional[ActivationCache] = None,
                on_step: Optional[StepHook] = None, progress: bool = False,
                teacher_hash: Optional[str] = None, extra_seconds: float = 0.0,
                rank: Optional[int] = None) -> BlockResult:
    """Train the student block at ``path`` (inside ``student``) to reproduce the teacher block's output.

    The teacher is frozen (eval mode, no gradients); only the student block's parameters are updated. The
    block is trained in place inside ``student`` and checkpointed under ``<folder>/<path>/``; calling this
    again on a finished block loads its weights and returns the stored result (``status='done'``).

    Args:
        teacher: The trained network, on the device to train on.
        student: The student network from :func:`~composer_ext.blockwise.make_student`.
        path: The block path.
        dataset: A map-style dataset whose items the teacher consumes (e.g. ``(image, label)``); the whole
            dataset is one epoch.
        spec: Training settings (default :class:`BlockTrainingSpec()`).
        folder: The root of the per-block checkpoint directories.
        seed: The run seed; the block's data order and initial state derive from ``(seed, path)``.
        val_dataset: Held-out data for the validation MSE (``spec.val_samples`` samples), or ``None``.
        cache: Read the teacher's activations from this cache instead of running the teacher.
        on_step: ``on_step(path, step, loss)`` after every step (and after that step's checkpoint).
        progress: Show a ``tqdm`` bar.
        teacher_hash: :func:`teacher_fingerprint` of ``teacher`` when already known.
        extra_seconds: Seconds already spent on this block outside this call (building its activation cache),
            added to its reported time.
        rank: The rank training the block, recorded in its result (default: this process's global rank).

    Returns:
        A :class:`BlockResult`.

    Example:
        >>> from composer_ext.data import digits
        >>> from composer_ext.models import small_vgg
        >>> teacher = small_vgg(widths=[8, 16])
        >>> student = make_student(teacher, seed=0)  # doctest: +SKIP
        >>> train_block(teacher, student, 'module.features.1', digits(), folder='/tmp/blocks')  # doctest: +SKIP
    """
    spec = spec or BlockTrainingSpec()
    if not isinstance(spec, BlockTrainingSpec):
        raise TypeError(f'spec={spec!r} is not a BlockTrainingSpec. Fix: pass BlockTrainingSpec(...).')
    teacher_block = get_submodule(teacher, path, argument='path')
    block = get_submodule(student, path, argument='path')
    device = next(teacher_block.parameters()).device
    block.to(device)
    teacher.requires_grad_(False)
    n = len(dataset)
    if n < spec.batch_size:
        raise ValueError(f'the dataset has {n} samples, fewer than batch_size={spec.batch_size}. Fix: use a smaller '
                         f'batch_size or more data.')
    steps_per_epoch = n // spec.batch_size
    total_steps = steps_per_epoch * spec.epochs
    directory = block_folder(folder, path)
    fingerprint = {
        'path': path, 'seed': int(seed), 'spec': spec.fingerprint(), 'num_samples': n,
        'dataset': dataset_fingerprint(dataset), 'teacher': teacher_hash or teacher_fingerprint(teacher),
        'student_block': bytes_sha256(repr(block).encode())[:16],
        'precision': resolved_precision(spec, device),  # precision=None means bf16 on GPU, fp32 on CPU
    }
    if rank is None:
        rank = dist.get_global_rank()
    done_file, weights_file = directory / 'result.json', directory / 'block.pt'
    if done_file.exists() and weights_file.exists():
        final = load_block_file(weights_file)
        _check_fingerprint(weights_file, final['fingerprint'], fingerprint)
        block.load_state_dict(final['block'])
        result = BlockResult.from_dict(json.loads(done_file.read_text()))
        result.status, result.session_seconds = 'done', 0.0
        return result

    outer_rng = torch.get_rng_state()
    try:
        return _train(teacher, block, path, dataset, spec, seed, val_dataset, cache, on_step, progress, device,
                      directory, fingerprint, steps_per_epoch, total_steps, extra_seconds, rank)
    finally:
        torch.set_rng_state(outer_rng)  # the block's own RNG stream lives in its checkpoint, not in the caller's


def _train(teacher, block, path, dataset, spec, seed, val_dataset, cache, on_step, progress, device, directory,
           fingerprint, steps_per_epoch, total_steps, extra_seconds, rank) -> BlockResult:
    n = len(dataset)
    weights_file, done_file, checkpoint_file = directory / 'block.pt', directory / 'result.json', \
        directory / 'checkpoint.pt'
    autocast, use_scaler = amp_settings(spec, device)
    taps = TeacherActivations(teacher, [path], autocast_dtype=autocast)
    validation = _Validation(val_dataset, spec.val_samples, spec.batch_size)
    optimizer_section = dict(spec.optimizer)
    optimizer = registry.optimizers.get(optimizer_section.pop('name'))(block.parameters(), **optimizer_section)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(spec.lr_schedule, spec.warmup_steps,
                                                                          total_steps))
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    state = {'step': 0, 'epoch': 0, 'batch_in_epoch': 0, 'history': [], 'val_history': [], 'seconds': 0.0,
             'pending': [], 'status': 'trained'}
    if checkpoint_file.exists():
        saved = load_block_file(checkpoint_file)
        _check_fingerprint(checkpoint_file, saved['fingerprint'], fingerprint)
        block.load_state_dict(saved['block'])
        optimizer.load_state_dict(saved['optimizer'])
        scheduler.load_state_dict(saved['scheduler'])
        scaler.load_state_dict(saved['scaler'])
        torch.set_rng_state(saved['rng'])
        if saved.get('cuda_rng') is not None and device.type == 'cuda':
            torch.cuda.set_rng_state(saved['cuda_rng'], device)
        state.update({k: saved[k] for k in ('step', 'epoch', 'batch_in_epoch', 'history', 'val_history', 'seconds',
                                            'pending')})
        state['status'] = 'resumed'
        log.info('block %s: resuming at step %d of %d', path, state['step'], total_steps)
    else:
        torch.manual_seed(block_seed(seed, path))  # dropout and any stochastic layer: the same on every rank

    def save_checkpoint() -> None:
        atomic_write_bytes(checkpoint_file, _to_bytes({
            'fingerprint': fingerprint, 'block': block.state_dict(), 'optimizer': optimizer.state_dict(),
            'scheduler': scheduler.state_dict(), 'scaler': scaler.state_dict(), 'rng': torch.get_rng_state(),
            'cuda_rng': torch.cuda.get_rng_state(device) if device.type == 'cuda' else None,
            **{k: state[k] for k in ('step', 'epoch', 'batch_in_epoch', 'history', 'val_history', 'pending')},
            'seconds': state['seconds'] + (time.perf_counter() - started), 'total_steps': total_steps,
        }))

    started = time.perf_counter() - extra_seconds
    if state['step'] == 0 and not state['val_history']:
        measured = validation(block, taps, path, autocast)
        if measured:
            state['val_history'].append([0, *measured])
    bar = tqdm(total=total_steps, initial=state['step'], desc=f'block {path}', disable=not progress, leave=False)
    base_seed = block_seed(seed, path)
    block.train()
    while state['epoch'] < spec.epochs:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(base_seed + state['epoch']))
        batches = order[:steps_per_epoch * spec.batch_size].view(steps_per_epoch, spec.batch_size)
        remaining = batches[state['batch_in_epoch']:]
        if cache is None:
            loader = torch.utils.data.DataLoader(dataset, batch_sampler=remaining.tolist(),
                                                 num_workers=spec.num_workers)
            source = (taps(batch)[path] for batch in loader)
        else:
            source = (cache.batch(indices, device) for indices in remaining)
        for inputs, targets in source:
            with autocast_to(device, autocast):
                outputs = block(inputs)
            loss = nn.functional.mse_loss(outputs.float(), targets)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            state['step'] += 1
            state['batch_in_epoch'] += 1
            state['pending'].append(float(loss))
            if len(state['pending']) == spec.log_interval:
                state['history'].append([state['step'], sum(state['pending']) / len(state['pending'])])
                state['pending'] = []
            bar.update(1)
            if spec.checkpoint_interval and state['step'] % spec.checkpoint_interval == 0 and \
                    state['batch_in_epoch'] < steps_per_epoch:
                save_checkpoint()
            if on_step is not None:
                on_step(path, state['step'], float(loss))
        state['epoch'] += 1
        state['batch_in_epoch'] = 0
        measured = validation(block, taps, path, autocast)
        if measured:
            state['val_history'].append([state['step'], *measured])
        if state['epoch'] < spec.epochs:
            save_checkpoint()
    bar.close()
    if state['pending']:
        state['history'].append([state['step'], sum(state['pending']) / len(state['pending'])])
    session = time.perf_counter() - started
    last_val = state['val_history'][-1] if state['val_history'] else None
    result = BlockResult(
        path=path, status=state['status'], steps=state['step'], epochs=spec.epochs,
        seconds=state['seconds'] + session, session_seconds=session,
        train_mse=state['history'][-1][1] if state['history'] else float('nan'),
        val_mse=last_val[1] if last_val else None, val_relative_mse=last_val[2] if last_val else None,
        initial_val_mse=state['val_history'][0][1] if state['val_history'] else None,
        activations='disk' if cache is not None else 'on_the_fly', history=state['history'],
        val_history=state['val_history'], rank=rank)
    atomic_write_bytes(weights_file, _to_bytes({'fingerprint': fingerprint, 'block': block.state_dict()}))
    atomic_write_json(done_file, result.to_dict())
    checkpoint_file.unlink(missing_ok=True)
    return result


def block_progress(folder: str | Path, paths: Sequence[str], total_steps: int) -> dict[str, float]:
    """The fraction of every block's training still to do: 0.0 finished, 1.0 not started, else from its checkpoint.

    Args:
        folder: The block checkpoint root.
        paths: The block paths.
        total_steps: Steps of a whole block training (``len(dataset) // batch_size * epochs``).
    """
    remaining = {}
    for path in paths:
        directory = block_folder(folder, path)
        if (directory / 'result.json').exists() and (directory / 'block.pt').exists():
            remaining[path] = 0.0
        elif (directory / 'checkpoint.pt').exists():
            step = int(load_block_file(directory / 'checkpoint.pt').get('step', 0))
            remaining[path] = min(1.0, max(0.0, (total_steps - step) / max(1, total_steps)))
        else:
            remaining[path] = 1.0
    return remaining


def train_blocks(teacher: nn.Module, student: nn.Module, paths: Sequence[str], dataset: Any,
                 spec: Optional[BlockTrainingSpec] = None, folder: str | Path = 'blocks', seed: int = 0,
                 val_dataset: Any = None, traces: Optional[dict[str, BlockTrace]] = None,
                 on_step: Optional[StepHook] = None, progress: bool = False,
                 cache_folder: Optional[str | Path] = None, cache_plan: Optional[dict[str, CacheDecision]] = None,
                 rank: Optional[int] = None) -> list[BlockResult]:
    """Train several blocks one after the other (what one rank does), skipping finished ones.

    With ``spec.activations`` ``'disk'`` (or ``'auto'`` choosing it), an unfinished block's teacher
    activations are cached under ``cache_folder`` (default ``<folder>/../activations``) right before the block
    trains, and the cache is deleted when it is done (unless ``spec.keep_cache``): the disk holds one block's
    cache at a time, and the caching time counts in that block's ``seconds``. Which blocks are cached is
    decided once, up front, by :func:`plan_activation_cache` (or given as ``cache_plan``, as the pipeline
    does after planning for all ranks); every decision is logged.

    Args:
        paths: Block paths, each a module of both ``teacher`` and ``student`` (checked first).
        cache_plan: Precomputed cache decisions (default: plan here for one rank).
        rank: Recorded in every block's result (default: this process's global rank).
        teacher, student, dataset, spec, folder, seed, val_dataset, on_step, progress: As for :func:`train_block`.
        traces: The teacher's traces of ``paths`` (default: traced here on two samples).

    Returns:
        One :class:`BlockResult` per path, in the order given.

    Raises:
        ValueError: a path that is not a module of the teacher or the student (the message lists close
            names), or ``activations='disk'`` with a cache that cannot fit the free disk.
    """
    spec = spec or BlockTrainingSpec()
    if not isinstance(spec, BlockTrainingSpec):
        raise TypeError(f'spec={spec!r} is not a BlockTrainingSpec. Fix: pass BlockTrainingSpec(...).')
    paths = list(paths)
    if not paths:
        return []
    for path in paths:
        get_submodule(teacher, path, argument='paths')
        get_submodule(student, path, argument='paths (in the student)')
    teacher.requires_grad_(False)
    teacher_hash = teacher_fingerprint(teacher)
    device = next(teacher.parameters()).device
    if traces is None or any(p not in traces for p in paths):
        example = torch.utils.data.default_collate([dataset[i] for i in range(min(2, len(dataset)))])
        traces = trace_blocks(teacher, paths, batch_to_device(example, device))
    root = Path(cache_folder) if cache_folder is not None else Path(folder).parent / 'activations'
    unfinished = [p for p in paths if not (block_folder(folder, p) / 'result.json').exists()]
    if cache_plan is None or any(p not in cache_plan for p in unfinished):
        cache_plan = plan_activation_cache(spec, {p: traces[p] for p in unfinished}, len(dataset), root)
    require_cache_fits({p: cache_plan[p] for p in unfinished}, spec, root)
    for path in unfinished:
        decision = cache_plan[path]
        log.info('block %s: teacher activations %s (cache estimate %s: %s)', path,
                 'cached on disk' if decision.use_disk else 'on the fly', format_bytes(decision.estimate_bytes),
                 decision.reason)
    autocast_dtype = amp_settings(spec, device)[0]
    data_hash = None
    results = []
    for path in paths:
        cache, caching_seconds = None, 0.0
        if path in unfinished and cache_plan[path].use_disk:
            started = time.perf_counter()
            data_hash = data_hash or dataset_fingerprint(dataset)
            fingerprint = {'path': path, 'teacher': teacher_hash, 'dataset': data_hash, 'dtype': spec.cache_dtype,
                           'precision': resolved_precision(spec, device)}
            cache = ActivationCache.build({path: root / path}, teacher, traces, dataset, spec.batch_size,
                                          {path: fingerprint}, dtype=spec.cache_dtype, num_workers=spec.num_workers,
                                          autocast_dtype=autocast_dtype, progress=progress)[path]
            caching_seconds = time.perf_counter() - started
        result = train_block(teacher, student, path, dataset, spec, folder, seed, val_dataset, cache, on_step,
                             progress, teacher_hash, extra_seconds=caching_seconds, rank=rank)
        if cache is not None and not spec.keep_cache:
            cache.remove()
        results.append(result)
    return results
