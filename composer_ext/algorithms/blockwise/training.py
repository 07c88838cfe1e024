"""Train student blocks one at a time against the teacher's own activations, with per-block checkpoints.

Each block trains on its own: ``MSE(student_block(h_in), h_out)`` over the dataset, where ``(h_in, h_out)``
is the frozen teacher's input to and output of that block (see
:mod:`composer_ext.algorithms.blockwise.activations`). Everything that decides a block's result (its
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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from composer_ext.algorithms.blockwise.activations import ActivationCache, TeacherActivations
from composer_ext.algorithms.blockwise.activations import autocast as autocast_to
from composer_ext.algorithms.blockwise.activations import estimate_activation_bytes
from composer_ext.algorithms.blockwise.discovery import BlockTrace, get_submodule, trace_blocks
from composer_ext.algorithms.blockwise.student import block_seed
from composer_ext.storage import atomic_write_bytes, atomic_write_json

__all__ = ['BlockResult', 'BlockTrainingSpec', 'block_folder', 'dataset_fingerprint', 'teacher_fingerprint',
           'train_block', 'train_blocks']

log = logging.getLogger(__name__)

_SCHEDULES = ('cosine', 'linear', 'constant')
_ACTIVATIONS = ('on_the_fly', 'disk', 'auto')
_PRECISIONS = ('fp32', 'amp_bf16', 'amp_fp16')
StepHook = Callable[[str, int, float], None]


def _positive_int(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f'{name}={value!r} is invalid. Fix: use an int >= {minimum}.')


@dataclass
class BlockTrainingSpec:
    """How every student block trains (the same for all blocks; each gets its own seed).

    Args:
        epochs: Passes over the dataset per block.
        batch_size: Samples per step (per block; each rank trains its own blocks on the whole dataset).
        optimizer: An optimizer section ``{'name': <composer_ext.registry.optimizers name>, **kwargs}``.
        lr_schedule: ``'cosine'`` (to 0), ``'linear'`` (to 0) or ``'constant'``, over all steps of the block.
        warmup_steps: Linear warmup steps before the schedule.
        activations: ``'on_the_fly'`` (teacher prefix every step), ``'disk'`` (one teacher pass, cached on
            disk) or ``'auto'`` (disk when ``epochs > 1`` and the block's cache fits ``cache_max_bytes``).
        cache_max_bytes: Largest cache per block that ``'auto'`` writes.
        cache_dtype: ``'float32'`` or ``'float16'`` (half the disk, rounded targets).
        keep_cache: Keep a block's cache after it finished (default: delete it).
        checkpoint_interval: Steps between in-progress checkpoints (``0``: only at epoch ends).
        log_interval: Steps per point of the loss curve (the mean training MSE over those steps).
        val_samples: Held-out samples for the validation MSE (before training and after every epoch).
        num_workers: DataLoader workers for on-the-fly batches.
        precision: ``'fp32'``, ``'amp_bf16'`` or ``'amp_fp16'``; ``None``: bf16 autocast on GPU, fp32 on CPU.

    Example:
        >>> BlockTrainingSpec(epochs=2, optimizer={'name': 'adam', 'lr': 1e-3}).epochs
        2
    """

    epochs: int = 1
    batch_size: int = 128
    optimizer: dict = field(default_factory=lambda: {'name': 'adam', 'lr': 3e-3})
    lr_schedule: str = 'cosine'
    warmup_steps: int = 0
    activations: str = 'on_the_fly'
    cache_max_bytes: float = 2e9
    cache_dtype: str = 'float32'
    keep_cache: bool = False
    checkpoint_interval: int = 100
    log_interval: int = 10
    val_samples: int = 512
    num_workers: int = 0
    precision: Optional[str] = None

    def __post_init__(self):
        from composer_ext import registry
        from composer_ext.config import ConfigError, validate_arguments

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
    rank: Optional[int] = None

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


def _precision(spec: BlockTrainingSpec, device: torch.device) -> tuple[Optional[torch.dtype], bool]:
    precision = spec.precision or ('amp_bf16' if device.type == 'cuda' else 'fp32')
    return {'fp32': (None, False), 'amp_bf16': (torch.bfloat16, False), 'amp_fp16': (torch.float16, True)}[precision]


def _mismatch(found: dict, wanted: dict) -> list[str]:
    return sorted(k for k in set(found) | set(wanted) if found.get(k) != wanted.get(k))


def _check_fingerprint(file: Path, found: dict, wanted: dict) -> None:
    if found != wanted:
        raise ValueError(f'{file} was written by a different configuration (differs in {_mismatch(found, wanted)}). '
                         f'Fix: use a new output folder for this configuration, or delete {file.parent} to retrain '
                         f'this block.')


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
                teacher_hash: Optional[str] = None, extra_seconds: float = 0.0) -> BlockResult:
    """Train the student block at ``path`` (inside ``student``) to reproduce the teacher block's output.

    The teacher is frozen (eval mode, no gradients); only the student block's parameters are updated. The
    block is trained in place inside ``student`` and checkpointed under ``<folder>/<path>/``; calling this
    again on a finished block loads its weights and returns the stored result (``status='done'``).

    Args:
        teacher: The trained network, on the device to train on.
        student: The student network from :func:`~composer_ext.algorithms.blockwise.make_student`.
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
    teacher_block = get_submodule(teacher, path)
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
    }
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
                      directory, fingerprint, steps_per_epoch, total_steps, extra_seconds)
    finally:
        torch.set_rng_state(outer_rng)  # the block's own RNG stream lives in its checkpoint, not in the caller's


def _train(teacher, block, path, dataset, spec, seed, val_dataset, cache, on_step, progress, device, directory,
           fingerprint, steps_per_epoch, total_steps, extra_seconds) -> BlockResult:
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
            'seconds': state['seconds'] + (time.perf_counter() - started),
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
        val_history=state['val_history'])
    atomic_write_bytes(weights_file, _to_bytes({'fingerprint': fingerprint, 'block': block.state_dict()}))
    atomic_write_json(done_file, result.to_dict())
    checkpoint_file.unlink(missing_ok=True)
    return result


def train_blocks(teacher: nn.Module, student: nn.Module, paths: Sequence[str], dataset: Any,
                 spec: Optional[BlockTrainingSpec] = None, folder: str | Path = 'blocks', seed: int = 0,
                 val_dataset: Any = None, traces: Optional[dict[str, BlockTrace]] = None,
                 on_step: Optional[StepHook] = None, progress: bool = False,
                 cache_folder: Optional[str | Path] = None) -> list[BlockResult]:
    """Train several blocks one after the other (what one rank does), skipping finished ones.

    With ``spec.activations`` ``'disk'`` (or ``'auto'`` choosing it), an unfinished block's teacher
    activations are cached under ``cache_folder`` (default ``<folder>/../activations``) right before the block
    trains, and the cache is deleted when it is done (unless ``spec.keep_cache``): the disk holds one block's
    cache at a time, and the caching time counts in that block's ``seconds``.

    Returns:
        One :class:`BlockResult` per path, in the order given.
    """
    spec = spec or BlockTrainingSpec()
    paths = list(paths)
    if not paths:
        return []
    teacher.requires_grad_(False)
    teacher_hash = teacher_fingerprint(teacher)
    if traces is None or any(p not in traces for p in paths):
        example = torch.utils.data.default_collate([dataset[i] for i in range(min(2, len(dataset)))])
        from composer_ext.algorithms.blockwise.activations import batch_to_device
        traces = trace_blocks(teacher, paths, batch_to_device(example, next(teacher.parameters()).device))
    root = Path(cache_folder) if cache_folder is not None else Path(folder).parent / 'activations'
    device = next(teacher.parameters()).device
    data_hash = None
    results = []
    for path in paths:
        cache, caching_seconds = None, 0.0
        if _use_disk(spec, traces[path], len(dataset)) and not (block_folder(folder, path) / 'result.json').exists():
            started = time.perf_counter()
            data_hash = data_hash or dataset_fingerprint(dataset)
            fingerprint = {'path': path, 'teacher': teacher_hash, 'dataset': data_hash, 'dtype': spec.cache_dtype}
            cache = ActivationCache.build({path: root / path}, teacher, traces, dataset, spec.batch_size,
                                          {path: fingerprint}, dtype=spec.cache_dtype, num_workers=spec.num_workers,
                                          autocast_dtype=_precision(spec, device)[0], progress=progress)[path]
            caching_seconds = time.perf_counter() - started
        result = train_block(teacher, student, path, dataset, spec, folder, seed, val_dataset, cache, on_step,
                             progress, teacher_hash, extra_seconds=caching_seconds)
        if cache is not None and not spec.keep_cache:
            cache.remove()
        results.append(result)
    return results


def _use_disk(spec: BlockTrainingSpec, trace: BlockTrace, num_samples: int) -> bool:
    if spec.activations == 'disk':
        return True
    if spec.activations == 'on_the_fly':
        return False
    return spec.epochs > 1 and estimate_activation_bytes(trace, num_samples, spec.cache_dtype) <= spec.cache_max_bytes
