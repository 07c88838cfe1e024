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
import hashlib
import io
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import nn

from composer_ext.blockwise.activations import ActivationCache, TeacherActivations
from composer_ext.blockwise.activations import autocast as autocast_to
from composer_ext.blockwise.activations import estimate_activation_bytes
from composer_ext.blockwise.discovery import BlockTrace, get_submodule, trace_blocks
from composer_ext.blockwise.student import block_seed
from composer_ext.storage import atomic_write_bytes, atomic_write_json

__all__ = ['BlockCheckpointMismatchError', 'BlockResult', 'BlockTrainingSpec', 'CacheDecision', 'block_folder',
           'block_progress', 'dataset_fingerprint', 'plan_activation_cache', 'require_cache_fits',
           'resolved_precision', 'teacher_fingerprint', 'train_block', 'train_blocks']

log = logging.getLogger(__name__)

_SCHEDULES = ('cosine', 'linear', 'constant')
_ACTIVATIONS = ('on_the_fly', 'disk', 'auto')
_PRECISIONS = ('fp32', 'amp_bf16', 'amp_fp16')
StepHook = Callable[[str, int, float], None]


def _positive_int(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f'{name}={value!r} is invalid. Fix: use an int >= {minimum}.')


def _time_count(name: str, value: Any, unit: str, example: str) -> Any:
    """A Composer time string in ``unit`` (e.g. ``'2ep'``) as its int count; anything else is returned unchanged."""
    if not isinstance(value, str):
        return value
    from composer.core import Time
    try:
        parsed = Time.from_timestring(value)
    except ValueError:
        parsed = None
    if parsed is None or parsed.unit.value != unit:
        raise ValueError(f'{name}={value!r} is not a count of {unit!r}. Fix: use an int or a time string such as '
                         f'{example!r}.')
    return int(parsed.value)


class BlockCheckpointMismatchError(ValueError):
    """A block checkpoint was written under a different configuration or teacher (the message names the fix)."""


@dataclass
class BlockTrainingSpec:
    """How every student block trains (the same for all blocks; each gets its own seed).

    Args:
        epochs: Passes over the dataset per block (an int or a Composer time string such as ``'2ep'``).
        batch_size: Samples per step (per block; each rank trains its own blocks on the whole dataset).
        optimizer: An optimizer section ``{'name': <composer_ext.registry.optimizers name>, **kwargs}``.
        lr_schedule: ``'cosine'`` (to 0), ``'linear'`` (to 0) or ``'constant'``, over all steps of the block.
        warmup_steps: Linear warmup steps before the schedule.
        activations: ``'on_the_fly'`` (teacher prefix every step), ``'disk'`` (one teacher pass, cached on
            disk; an error when the cache cannot fit the free disk) or ``'auto'`` (disk when ``epochs > 1``
            and the block's cache fits both ``cache_max_bytes`` and the free disk; see
            :func:`plan_activation_cache`).
        cache_max_bytes: Largest cache per block that ``'auto'`` writes.
        cache_dtype: ``'float32'`` or ``'float16'`` (half the disk, rounded targets).
        keep_cache: Keep a block's cache after it finished (default: delete it).
        checkpoint_interval: Steps between in-progress checkpoints (an int or e.g. ``'50ba'``; ``0``: only at
            epoch ends).
        log_interval: Steps per point of the loss curve (the mean training MSE over those steps).
        val_samples: Held-out samples for the validation MSE (before training and after every epoch).
        num_workers: DataLoader workers for on-the-fly batches.
        precision: ``'fp32'``, ``'amp_bf16'`` or ``'amp_fp16'``; ``None``: bf16 autocast on GPU, fp32 on CPU.

    Example:
        >>> BlockTrainingSpec(epochs=2, optimizer={'name': 'adam', 'lr': 1e-3}).epochs
        2
    """

    epochs: Union[int, str] = 1  # an int after __post_init__
    batch_size: int = 128
    optimizer: dict = field(default_factory=lambda: {'name': 'adam', 'lr': 3e-3})
    lr_schedule: str = 'cosine'
    warmup_steps: int = 0
    activations: str = 'on_the_fly'
    cache_max_bytes: float = 2e9
    cache_dtype: str = 'float32'
    keep_cache: bool = False
    checkpoint_interval: Union[int, str] = 100  # an int after __post_init__
    log_interval: int = 10
    val_samples: int = 512
    num_workers: int = 0
    precision: Optional[str] = None

    def __post_init__(self):
        from composer_ext import registry
        from composer_ext.config import ConfigError, validate_arguments

        self.epochs = _time_count('epochs', self.epochs, 'ep', '2ep')
        self.checkpoint_interval = _time_count('checkpoint_interval', self.checkpoint_interval, 'ba', '50ba')
        _positive_int('epochs', self.epochs)
        _positive_int('batch_size', self.batch_size)
        _positive_int('warmup_steps', self.warmup_steps, 0)
        _positive_int('checkpoint_interval', self.checkpoint_interval, 0)
        _positive_int('log_interval', self.log_interval)
        _positive_int('val_samples', self.val_samples, 0)
        _positive_int('num_workers', self.num_workers, 0)
        if self.lr_schedule not in _SCHEDULES:
            raise ValueError(f'lr_schedule={self.lr_schedule!r} is unknown. Fix: use one of {list(_SCHEDULES)}.')
        if self.activations not in _ACTIVATIONS:
            raise ValueError(f'activations={self.activations!r} is unknown. Fix: use one of {list(_ACTIVATIONS)}.')
        if self.cache_dtype not in ('float32', 'float16'):
            raise ValueError(f"cache_dtype={self.cache_dtype!r} is unknown. Fix: use 'float32' or 'float16'.")
        if isinstance(self.cache_max_bytes, bool) or not isinstance(self.cache_max_bytes, (int, float)) or \
                self.cache_max_bytes < 0:
            raise ValueError(f'cache_max_bytes={self.cache_max_bytes!r} is invalid. Fix: use a number of bytes >= 0, '
                             f'e.g. 2e9.')
        if self.precision is not None and self.precision not in _PRECISIONS:
            raise ValueError(f'precision={self.precision!r} is unknown. Fix: use one of {list(_PRECISIONS)} or None.')
        if not isinstance(self.optimizer, dict) or 'name' not in self.optimizer:
            raise ValueError(f"optimizer={self.optimizer!r} is not an optimizer section. Fix: write e.g. "
                             f"{{'name': 'adam', 'lr': 3e-3}}.")
        name = self.optimizer['name']
        if name not in registry.optimizers:
            raise ValueError(f'optimizer: {registry.optimizers.unknown(name)} Fix: use one of the names above.')
        try:
            validate_arguments(registry.optimizers.get(name), {k: v for k, v in self.optimizer.items() if k != 'name'},
                               '<BlockTrainingSpec>', 'optimizer', f'optimizer {name!r}', exclude=('params',))
        except ConfigError as err:
            raise ValueError(str(err).replace('<BlockTrainingSpec>: ', '')) from None

    def fingerprint(self) -> dict:
        """The settings that change a block's result (not where or how often it is saved)."""
        keep = ('epochs', 'batch_size', 'optimizer', 'lr_schedule', 'warmup_steps', 'log_interval', 'val_samples',
                'precision')
        values = dataclasses.asdict(self)
        values = {k: values[k] for k in keep}
        values['cache_dtype'] = self.cache_dtype  # float16 caching rounds the targets
        return values


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


def teacher_fingerprint(teacher: nn.Module) -> str:
    """SHA-256 of the teacher's state dict (names, shapes, dtypes and bytes), to tie checkpoints to a teacher."""
    digest = hashlib.sha256()
    for name, tensor in teacher.state_dict().items():
        digest.update(name.encode())
        if isinstance(tensor, torch.Tensor):
            value = tensor.detach().cpu().contiguous().reshape(-1)
            digest.update(f'{tuple(value.shape)}{value.dtype}'.encode())
            digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b'')
    return digest.hexdigest()


def dataset_fingerprint(dataset: Any) -> str:
    """The dataset's type and length and a hash of its first, middle and last items (cheap, catches a swap)."""
    digest = hashlib.sha256(f'{type(dataset).__name__}:{len(dataset)}'.encode())
    for index in sorted({0, len(dataset) // 2, len(dataset) - 1}):
        for value in _tensors(dataset[index]):
            digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


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


def _load(path: Path) -> dict:
    return torch.load(path, map_location='cpu', weights_only=False)


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


def resolved_precision(spec: BlockTrainingSpec, device: torch.device) -> str:
    """``spec.precision``, or its default on ``device`` (``'amp_bf16'`` on GPU, ``'fp32'`` elsewhere)."""
    return spec.precision or ('amp_bf16' if device.type == 'cuda' else 'fp32')


def _precision(spec: BlockTrainingSpec, device: torch.device) -> tuple[Optional[torch.dtype], bool]:
    precision = resolved_precision(spec, device)
    return {'fp32': (None, False), 'amp_bf16': (torch.bfloat16, False), 'amp_fp16': (torch.float16, True)}[precision]


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
        'student_block': hashlib.sha256(repr(block).encode()).hexdigest()[:16],
        'precision': resolved_precision(spec, device),  # precision=None means bf16 on GPU, fp32 on CPU
    }
    if rank is None:
        from composer.utils import dist
        rank = dist.get_global_rank()
    done_file, weights_file, checkpoint_file = directory / 'result.json', directory / 'block.pt', \
        directory / 'checkpoint.pt'
    if done_file.exists() and weights_file.exists():
        final = _load(weights_file)
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
    from tqdm.auto import tqdm

    n = len(dataset)
    weights_file, done_file, checkpoint_file = directory / 'block.pt', directory / 'result.json', \
        directory / 'checkpoint.pt'
    autocast, use_scaler = _precision(spec, device)
    taps = TeacherActivations(teacher, [path], autocast_dtype=autocast)
    validation = _Validation(val_dataset, spec.val_samples, spec.batch_size)
    optimizer_section = dict(spec.optimizer)
    from composer_ext import registry
    optimizer = registry.optimizers.get(optimizer_section.pop('name'))(block.parameters(), **optimizer_section)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(spec.lr_schedule, spec.warmup_steps,
                                                                          total_steps))
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    state = {'step': 0, 'epoch': 0, 'batch_in_epoch': 0, 'history': [], 'val_history': [], 'seconds': 0.0,
             'pending': [], 'status': 'trained'}
    if checkpoint_file.exists():
        saved = _load(checkpoint_file)
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


@dataclass
class CacheDecision:
    """Whether one block's teacher activations go to a disk cache, how big that cache is, and why.

    ``fits`` says whether the cache fits the free disk (``free_bytes`` under the cache folder, shared by
    ``ranks`` ranks that may build caches at the same time); with ``activations='disk'`` a cache that does
    not fit is an error (:func:`require_cache_fits`), with ``'auto'`` the block trains on the fly instead.
    """

    path: str
    estimate_bytes: int
    use_disk: bool
    fits: bool
    reason: str
    free_bytes: int
    ranks: int = 1

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _gigabytes(value: float) -> str:
    """A byte count for people: ``'2.01 GB'``, ``'753.0 MB'``, ``'12.5 kB'``."""
    for unit, scale in (('GB', 1e9), ('MB', 1e6)):
        if value >= scale:
            return f'{value / scale:.{2 if unit == "GB" else 1}f} {unit}'
    return f'{value / 1e3:.1f} kB'


def _free_bytes(folder: Path) -> int:
    existing = folder.absolute()
    while not existing.exists() and existing != existing.parent:  # the cache folder is created later
        existing = existing.parent
    return int(shutil.disk_usage(existing).free)


def plan_activation_cache(spec: BlockTrainingSpec, traces: dict[str, BlockTrace], num_samples: int,
                          folder: str | Path, ranks: int = 1,
                          free_bytes: Optional[int] = None) -> dict[str, CacheDecision]:
    """Decide, block by block, whether the teacher activations are cached on disk, against the free disk space.

    A block's cache takes :func:`~composer_ext.blockwise.activations.estimate_activation_bytes`
    (``num_samples x (input + output elements) x bytes per element``). Without ``spec.keep_cache`` every
    rank holds one cache at a time, and all ``ranks`` may build one at the same moment, so a cache fits
    when ``ranks x its size`` is free (a conservative bound: it assumes the ranks share the disk); with
    ``keep_cache`` the caches accumulate, so they fit while their running total is free. A cache already
    complete on disk (a resumed block) needs no new space.

    Args:
        spec: The training settings (``activations``, ``epochs``, ``cache_max_bytes``, ``cache_dtype``,
            ``keep_cache``).
        traces: ``{path: BlockTrace}`` of the blocks to decide, in training order.
        num_samples: Samples in the training dataset.
        folder: The cache root (``<folder>/<path>/`` per block).
        ranks: Ranks that may build caches at the same time on this disk.
        free_bytes: Free bytes to plan with (default: ``shutil.disk_usage`` of ``folder`` or its nearest
            existing parent).

    Returns:
        ``{path: CacheDecision}``.

    Example:
        >>> from composer_ext.blockwise.discovery import BlockTrace
        >>> traces = {'a': BlockTrace('a', 0, (8, 4, 4), (8, 4, 4), True)}
        >>> spec = BlockTrainingSpec(epochs=2, activations='auto')
        >>> plan_activation_cache(spec, traces, 1000, '/tmp/cache', free_bytes=10**9)['a'].use_disk
        True
    """
    if isinstance(ranks, bool) or not isinstance(ranks, int) or ranks < 1:
        raise ValueError(f'ranks={ranks!r} is invalid. Fix: use a positive int (the ranks sharing the disk).')
    folder = Path(folder)
    free = _free_bytes(folder) if free_bytes is None else int(free_bytes)
    decisions = {}
    kept = 0
    for path, trace in traces.items():
        size = estimate_activation_bytes(trace, num_samples, spec.cache_dtype)
        need = 0 if (folder / path / 'meta.json').exists() else size
        fits = kept + need <= free if spec.keep_cache else need * ranks <= free
        shortage = (f'{_gigabytes(kept + need)} of kept caches' if spec.keep_cache else
                    f'{ranks} rank(s) x {_gigabytes(need)}') + f' > {_gigabytes(free)} free under {folder}'
        if spec.activations == 'on_the_fly':
            use_disk, reason = False, "activations='on_the_fly'"
        elif spec.activations == 'disk':
            use_disk = True
            reason = "activations='disk'" + ('' if fits else f' but the cache does not fit ({shortage})')
        elif spec.epochs == 1:
            use_disk, reason = False, 'one epoch: a cache would be read once, so it saves nothing'
        elif size > spec.cache_max_bytes:
            use_disk, reason = False, f'{_gigabytes(size)} > cache_max_bytes={_gigabytes(spec.cache_max_bytes)}'
        elif not fits:
            use_disk, reason = False, f'not enough free disk ({shortage})'
        else:
            use_disk, reason = True, f'fits cache_max_bytes and the free disk ({_gigabytes(free)})'
        if use_disk and spec.keep_cache:
            kept += need
        decisions[path] = CacheDecision(path=path, estimate_bytes=size, use_disk=use_disk, fits=fits, reason=reason,
                                        free_bytes=free, ranks=ranks)
    return decisions


def require_cache_fits(decisions: dict[str, CacheDecision], spec: BlockTrainingSpec, folder: str | Path) -> None:
    """Raise ``ValueError`` when ``activations='disk'`` and a block's cache cannot fit the free disk."""
    if spec.activations != 'disk':
        return
    bad = [d for d in decisions.values() if d.use_disk and not d.fits]
    if bad:
        worst = max(bad, key=lambda d: d.estimate_bytes)
        raise ValueError(
            f"activations='disk': the teacher activation cache of block {worst.path!r} needs "
            f'{_gigabytes(worst.estimate_bytes)} ({worst.estimate_bytes} bytes), and {worst.ranks} rank(s) may '
            f'build such caches at once, but only {_gigabytes(worst.free_bytes)} are free under {folder} '
            f'({len(bad)} block(s) do not fit: {[d.path for d in bad]}). Fix: free disk space or move the output '
            f"folder, set cache_dtype='float16' (half the size) or fewer samples, or use activations='auto' (on "
            f"the fly when a cache does not fit) or 'on_the_fly'.")


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
            step = int(_load(directory / 'checkpoint.pt').get('step', 0))
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
        from composer_ext.blockwise.activations import batch_to_device
        traces = trace_blocks(teacher, paths, batch_to_device(example, device))
    root = Path(cache_folder) if cache_folder is not None else Path(folder).parent / 'activations'
    unfinished = [p for p in paths if not (block_folder(folder, p) / 'result.json').exists()]
    if cache_plan is None or any(p not in cache_plan for p in unfinished):
        cache_plan = plan_activation_cache(spec, {p: traces[p] for p in unfinished}, len(dataset), root)
    require_cache_fits({p: cache_plan[p] for p in unfinished}, spec, root)
    for path in unfinished:
        decision = cache_plan[path]
        log.info('block %s: teacher activations %s (cache estimate %s: %s)', path,
                 'cached on disk' if decision.use_disk else 'on the fly', _gigabytes(decision.estimate_bytes),
                 decision.reason)
    autocast_dtype = _precision(spec, device)[0]
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
