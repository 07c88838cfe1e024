"""How every student block trains: :class:`BlockTrainingSpec`, validated on construction, and its precision.

The same settings hold for every block (each block gets its own seed from the run seed and its path; see
:mod:`composer_ext.blockwise.training`). Counts that are natural as Composer times accept them: ``epochs``
in ``'ep'`` and ``checkpoint_interval`` in ``'ba'``, parsed by :func:`composer_ext.core.timing.parse_time`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from composer.core import Time, TimeUnit

from composer_ext import registry
from composer_ext.config import ConfigError, validate_arguments
from composer_ext.core.timing import parse_time

__all__ = ['BlockTrainingSpec', 'amp_settings', 'resolved_precision']

_SCHEDULES = ('cosine', 'linear', 'constant')
_ACTIVATIONS = ('on_the_fly', 'disk', 'auto')
_PRECISIONS = ('fp32', 'amp_bf16', 'amp_fp16')


def _positive_int(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f'{name}={value!r} is invalid. Fix: use an int >= {minimum}.')


def _time_count(name: str, value: Any, unit: TimeUnit, example: str) -> Any:
    """A time in ``unit`` (``'2ep'``, or a ``Time``) as its int count; anything else is returned unchanged (an int
    is already a count; :func:`_positive_int` checks it)."""
    if not isinstance(value, (str, Time)):
        return value
    try:
        time = parse_time(value, name, example)
    except (TypeError, ValueError):  # a bad string or a refused unit: what this count needs is one message
        time = None
    if time is None or time.unit != unit:
        raise ValueError(f'{name}={value!r} is not a count of {unit.value!r}. Fix: use an int or a time string such as '
                         f'{example!r}.')
    return int(time.value)


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
            :func:`~composer_ext.blockwise.cache_plan.plan_activation_cache`).
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
        self.epochs = _time_count('epochs', self.epochs, TimeUnit.EPOCH, '2ep')
        self.checkpoint_interval = _time_count('checkpoint_interval', self.checkpoint_interval, TimeUnit.BATCH, '50ba')
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


def resolved_precision(spec: BlockTrainingSpec, device: torch.device) -> str:
    """``spec.precision``, or its default on ``device`` (``'amp_bf16'`` on GPU, ``'fp32'`` elsewhere)."""
    return spec.precision or ('amp_bf16' if device.type == 'cuda' else 'fp32')


def amp_settings(spec: BlockTrainingSpec, device: torch.device) -> tuple[Optional[torch.dtype], bool]:
    """The autocast dtype of ``spec``'s precision on ``device`` (``None``: full precision) and whether the loss
    needs a ``GradScaler`` (fp16 only)."""
    precision = resolved_precision(spec, device)
    return {'fp32': (None, False), 'amp_bf16': (torch.bfloat16, False), 'amp_fp16': (torch.float16, True)}[precision]
