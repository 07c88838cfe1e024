"""Domain upsampling: switch the data mixture towards chosen domains for the end of training.

Blakeney et al. 2024 (*Does your data spark joy?*) upsample domain-specific data for the last 10-20% of
pretraining and report large gains (7B, 1T tokens: +6.90 MMLU, +8.26 GSM8K, +6.17 HumanEval). Dropping one
domain from the upsampled mix in that final phase measures the domain's utility at a fraction of the cost of
a full run (``composer-ext ablate``).

:class:`DomainUpsampling` binds a :class:`~composer_ext.data.MixtureSchedule` to the Trainer: at
``FIT_START`` it places the schedule's ``start`` on the run (any Composer time, resolved against
``max_duration``), checks that every domain it draws from has data and that no domain will be read more
often than ``max_repeats`` allows, optionally lines the switch up with the LR cooldown, and installs the
schedule into the train dataloader's :class:`~composer_ext.data.MixtureDataset`. During training it logs
the target and the achieved per-domain fractions of samples and tokens (summed over ranks) every
``log_interval`` batches.

The functional core (:func:`lr_cooldown_start`, :func:`domain_counts`) works on plain arrays and batches.
"""

from __future__ import annotations

import logging
import numbers
import warnings
from typing import Any, Callable, Literal, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from composer.core import Algorithm, DataSpec, Event, State, Time, TimeUnit
from composer.loggers import Logger
from composer.utils import dist

from composer_ext.core.timing import parse_time
from composer_ext.domain_upsampling.mixture import MixtureDataset
from composer_ext.domain_upsampling.schedule import MixtureSchedule, whole_batches

_SCHEDULE_KEYS = frozenset({'base', 'target', 'start', 'ramp', 'ramp_duration', 'normalize'})

__all__ = ['DomainUpsampling', 'build_domain_upsampling', 'domain_counts', 'find_mixture_dataset',
           'lr_cooldown_start']

log = logging.getLogger(__name__)

LR_COOLDOWN_MODES = ('warn', 'align', 'ignore')
REPEAT_MODES = ('warn', 'raise')


# --- functional core --------------------------------------------------------------------------------------


def lr_cooldown_start(probe: Callable[[int], float], total_batches: int, grid_points: int = 2000) -> Optional[float]:
    """Where the final LR decay (the cooldown) of a schedule begins, in batches; ``None`` if it has none.

    ``probe(b)`` is the LR multiplier applied at batch ``b`` (0 <= b <= ``total_batches``). A cooldown is a
    final decay *from a plateau*: the multiplier holds its peak (to float rounding) for at least two consecutive
    batches, then falls to its end value. A smooth decay (linear, cosine, polynomial) starts at the last batch
    on the plateau (a linear decay from batch ``b`` starts at ``b``); a sudden drop (a step, then flat) starts
    at the first batch at the lower value (a step at ``b`` starts at ``b``). Both are exact.

    A decay that leaves its peak at once spans the whole run (cosine or linear decay, with or without warmup):
    it has no separate cooldown to line the upsampling up with, so the result is ``None``, as it is for a
    schedule that does not fall. (For runs beyond ~10^7 batches, a cosine's first steps differ from its peak
    by less than float rounding and can read as a short plateau.)

    Args:
        probe: LR multiplier at a batch.
        total_batches: Length of training in batches.
        grid_points: Batches probed before the start is refined by bisection (all of them if fewer).

    Example:
        .. code-block:: python

            # warmup-stable-decay: constant 1.0, then linear to 0 over the last 20 of 100 batches
            lr_cooldown_start(lambda b: min(1.0, (100 - b) / 20), 100)    # 80.0
            # cosine decay over the whole run: no plateau, so no cooldown
            lr_cooldown_start(lambda b: 0.5 * (1 + math.cos(math.pi * b / 100)), 100)    # None
    """
    if isinstance(total_batches, bool) or not isinstance(total_batches, numbers.Integral):
        raise TypeError(f'total_batches={total_batches!r} is a {type(total_batches).__name__}, not an int. Fix: use '
                        f'a positive int.')
    if total_batches < 1:
        raise ValueError(f'total_batches={total_batches!r} is invalid. Fix: use a positive int.')
    grid = np.unique(np.round(np.linspace(0, total_batches, min(total_batches, grid_points) + 1)).astype(np.int64))
    values = np.array([float(probe(int(b))) for b in grid])
    scale = max(float(np.max(np.abs(values))), 1e-30)
    rounding = 4 * np.finfo(np.float64).eps * scale  # "equal" up to the rounding of the schedule's arithmetic
    k = len(values) - 1
    while k > 0 and values[k - 1] >= values[k] - rounding:  # back to the start of the final non-increasing stretch
        k -= 1
    peak, end = float(values[k]), float(values[-1])
    if peak - end <= 1e-3 * scale:  # it does not really fall
        return None
    floor = peak - rounding
    j = k + int(np.argmax(values[k:] < floor))  # the first grid batch off the peak (j > k: values[k] is the peak)
    low, high = int(grid[j - 1]), int(grid[j])  # probe(low) >= floor > probe(high)
    while high - low > 1:
        mid = (low + high) // 2
        if probe(mid) < floor:
            high = mid
        else:
            low = mid
    # `low` is the last batch on the peak. A plateau needs the batch before it there too (a peak reached by
    # warmup and left at once is no plateau).
    if low == 0 or abs(float(probe(low - 1)) - float(probe(low))) > rounding:
        return None
    after = float(probe(high + 1)) if high < total_batches else float(probe(high))
    if abs(float(probe(high)) - after) <= rounding:  # it dropped at `high` and stayed there: a step
        return float(high)
    return float(low)


def domain_counts(batch: Any, names: Sequence[str]) -> Optional[np.ndarray]:
    """Per-domain ``[samples, tokens]`` (shape ``(2, len(names))``) of an LM batch with a ``domain`` column.

    Tokens are the batch's real (``attention_mask``) tokens per row; rows of domains not in ``names`` are
    ignored. Returns ``None`` when the batch carries no ``domain`` list.
    """
    if not isinstance(batch, Mapping) or not isinstance(batch.get('domain'), (list, tuple)):
        return None
    index = {name: i for i, name in enumerate(names)}
    rows = np.array([index.get(d, -1) for d in batch['domain']], dtype=np.int64)
    mask = batch.get('attention_mask')
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[0] == len(rows):
        tokens = mask.sum(dim=1).detach().cpu().numpy().astype(np.float64)
    else:
        tokens = np.zeros(len(rows))
    known = rows >= 0
    counts = np.zeros((2, len(names)), dtype=np.int64)
    counts[0] = np.bincount(rows[known], minlength=len(names))
    counts[1] = np.round(np.bincount(rows[known], weights=tokens[known], minlength=len(names))).astype(np.int64)
    return counts


def find_mixture_dataset(dataloader: Any) -> Optional[MixtureDataset]:
    """The :class:`MixtureDataset` behind a DataSpec or DataLoader, or ``None``."""
    if isinstance(dataloader, DataSpec):
        dataloader = dataloader.dataloader
    dataset = getattr(dataloader, 'dataset', None)
    return dataset if isinstance(dataset, MixtureDataset) else None


def _composer_lr_probe(state: State, samples_per_batch: int, tokens_per_sample: Optional[float]
                       ) -> Optional[Callable[[int], float]]:
    """``batch -> LR multiplier`` of the Trainer's (Composer) scheduler, evaluated at a hypothetical timestamp."""
    from torch.optim.lr_scheduler import LambdaLR

    function = None
    for scheduler in state.schedulers:
        candidate = scheduler.lr_lambdas[0] if isinstance(scheduler, LambdaLR) else None
        if candidate is not None and 'compile_composer_scheduler' in getattr(candidate, '__qualname__', ''):
            function = candidate
            break
    if function is None:
        return None
    per_epoch = int(state.dataloader_len) if state.dataloader_len is not None else None
    tokens = float(tokens_per_sample or 0)

    def probe(batch: int) -> float:
        epoch, in_epoch = divmod(batch, per_epoch) if per_epoch else (0, batch)
        saved = state.timestamp
        state.timestamp = saved.copy(epoch=epoch, batch=batch, sample=batch * samples_per_batch,
                                     token=int(batch * samples_per_batch * tokens), batch_in_epoch=in_epoch,
                                     sample_in_epoch=in_epoch * samples_per_batch,
                                     token_in_epoch=int(in_epoch * samples_per_batch * tokens))
        try:
            return float(function(0))
        finally:
            state.timestamp = saved

    return probe


# --- the algorithm ----------------------------------------------------------------------------------------


def _check_positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f'{name}={value!r} is a {type(value).__name__}, not a number. Fix: use a positive number.')
    if not value > 0 or not np.isfinite(value):
        raise ValueError(f'{name}={value!r} is invalid. Fix: use a positive number.')
    return float(value)


class DomainUpsampling(Algorithm):
    """Follow a :class:`~composer_ext.data.MixtureSchedule` over training: upsample chosen domains at the end.

    Attach it to a Trainer whose train dataloader reads a :class:`~composer_ext.data.MixtureDataset` (the
    ``text_mixture`` YAML dataloader builds one over the embedded corpus). At ``FIT_START`` the schedule is
    resolved against ``max_duration`` and installed into the dataset; afterwards the dataset serves each
    global sample from the domain the schedule picks, identically on every rank and after a resume.

    Args:
        schedule: The mixture over training: a :class:`~composer_ext.data.MixtureSchedule`, or a mapping of its
            arguments (``{'base': ..., 'target': ..., 'start': '0.9dur'}``, so that an llm-foundry YAML can name
            this class through its entry point); ``None`` uses the dataset's own schedule.
        log_interval: Log target and achieved fractions every this many batches (an int or ``'Nba'``);
            ``None`` logs nothing. Keys: ``mixture/target/<domain>`` (the schedule's mean weight over the
            window), ``mixture/fraction/<domain>`` and ``mixture/token_fraction/<domain>`` (achieved, all
            ranks), ``mixture/passes/<domain>`` (passes over the domain's data so far), ``mixture/alpha``.
        tokens_per_sample: Tokens in one sample, to place ``tok`` times on sample positions (e.g. the
            sequence length of packed samples). Required when ``start``, ``ramp_duration`` or ``max_duration``
            is in tokens. It is one fixed number, so ``tok`` times are exact for packed samples and an
            approximation for unpacked samples of varying length (the switch lands where the average says).
        max_repeats: Most passes allowed over a domain's data (1 = never repeat a sample): a number for every
            domain, or a domain -> number mapping. ``None`` disables the guard.
        on_repeat: ``'warn'`` or ``'raise'`` when a domain is projected (at ``FIT_START``) or found (during
            training) to exceed ``max_repeats``. ``'raise'`` raises ``ValueError`` at ``FIT_START`` (a setting
            to fix before training) and ``RuntimeError`` during training (the projection is an expectation, so
            the real draws can pass the limit by a few samples that it did not foresee).
        lr_cooldown: ``'warn'`` when the upsampling start and the LR cooldown start differ by more than
            ``lr_tolerance`` of training; ``'align'`` moves the start to the cooldown start; ``'ignore'``.
            The cooldown is a final decay from a plateau (see :func:`lr_cooldown_start`): a decay spanning the
            whole run (e.g. cosine after warmup) has none, so it is not warned about (and cannot be aligned).
        lr_tolerance: Allowed gap between the two starts, as a fraction of training.

    Distributed: the per-rank counts behind the achieved fractions are summed over ranks (one all-reduce) only
    when they are logged and in :meth:`state_dict`, which therefore must be called on every rank together, as
    Composer's checkpointing does (it gathers every rank's RNG state in the same step).

    Example:
        .. code-block:: python

            from composer_ext.algorithms import DomainUpsampling
            from composer_ext.data import MixtureSchedule
            schedule = MixtureSchedule(base={'prose': 0.7, 'math': 0.3}, target={'prose': 0.3, 'math': 0.7},
                                       start='0.8dur')
            algorithm = DomainUpsampling(schedule, log_interval=50, max_repeats=4)
            # Trainer(..., train_dataloader=<a DataLoader over a MixtureDataset>, algorithms=[algorithm])
    """

    def __init__(self, schedule: Optional[MixtureSchedule] = None, log_interval: Union[int, str, Time, None] = '50ba',
                 tokens_per_sample: Optional[float] = None,
                 max_repeats: Union[float, Mapping[str, float], None] = None,
                 on_repeat: Literal['warn', 'raise'] = 'warn',
                 lr_cooldown: Literal['warn', 'align', 'ignore'] = 'warn', lr_tolerance: float = 0.05):
        if isinstance(schedule, Mapping):  # a plain mapping, as an llm-foundry YAML gives it
            unknown = sorted(set(schedule) - _SCHEDULE_KEYS)
            if unknown:
                raise TypeError(f'schedule has the unknown keys {unknown}. Fix: use only {sorted(_SCHEDULE_KEYS)}, the '
                                f'arguments of MixtureSchedule.')
            schedule = MixtureSchedule(**schedule)
        if schedule is not None and not isinstance(schedule, MixtureSchedule):
            raise TypeError(f'schedule={schedule!r} is not a MixtureSchedule. Fix: pass MixtureSchedule(base, target, '
                            f"start='0.9dur') (or the same as a mapping), or None to use the dataset's schedule.")
        self.schedule = schedule
        if log_interval is None:
            self.log_interval = None
        else:
            interval = parse_time(log_interval, 'log_interval', '50ba')
            if interval.unit != TimeUnit.BATCH or interval.value < 1:
                raise ValueError(f"log_interval={log_interval!r} is not a number of batches >= 1. Fix: use e.g. 50 or "
                                 f"'50ba' (or None to log nothing).")
            self.log_interval = int(interval.value)
        self.tokens_per_sample = None if tokens_per_sample is None else _check_positive('tokens_per_sample',
                                                                                       tokens_per_sample)
        if max_repeats is None:
            self.max_repeats: Union[float, dict[str, float], None] = None
        elif isinstance(max_repeats, Mapping):
            self.max_repeats = {str(d): _check_positive(f'max_repeats[{d!r}]', v) for d, v in max_repeats.items()}
        else:
            self.max_repeats = _check_positive('max_repeats', max_repeats)
        if on_repeat not in REPEAT_MODES:
            raise ValueError(f'on_repeat={on_repeat!r} is invalid. Fix: use one of {list(REPEAT_MODES)}.')
        self.on_repeat = on_repeat
        if lr_cooldown not in LR_COOLDOWN_MODES:
            raise ValueError(f'lr_cooldown={lr_cooldown!r} is invalid. Fix: use one of {list(LR_COOLDOWN_MODES)}.')
        self.lr_cooldown = lr_cooldown
        if isinstance(lr_tolerance, bool) or not isinstance(lr_tolerance, numbers.Real):
            raise TypeError(f'lr_tolerance={lr_tolerance!r} is a {type(lr_tolerance).__name__}, not a number. Fix: '
                            f'use a fraction of training in (0, 1), e.g. 0.05.')
        if not 0 < lr_tolerance < 1:
            raise ValueError(f'lr_tolerance={lr_tolerance!r} is not a fraction of training in (0, 1). Fix: use e.g. '
                             f'0.05.')
        self.lr_tolerance = float(lr_tolerance)
        # Set at FIT_START.
        self.dataset: Optional[MixtureDataset] = None
        self.resolved: Optional[MixtureSchedule] = None
        self.total_samples: Optional[int] = None
        self.start_sample: Optional[int] = None
        self.lr_cooldown_batch: Optional[float] = None
        # Checkpointed: the current logging window (summed over ranks) and the repetition warnings given.
        self._window_begin: Optional[int] = None
        self._window: Optional[np.ndarray] = None
        self._warned: set[str] = set()
        self._local: Optional[np.ndarray] = None  # this rank's counts since the last reduction over ranks
        self._device: Any = None
        self._restored_window: Optional[tuple[dict, dict]] = None

    # -- Composer interface --

    def match(self, event: Event, state: State) -> bool:
        return event in (Event.FIT_START, Event.EPOCH_START, Event.EPOCH_END, Event.AFTER_DATALOADER, Event.BATCH_END)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.FIT_START:
            self._fit_start(state, logger)
            return
        dataset = self.dataset
        assert dataset is not None, 'FIT_START binds the dataset'
        if event in (Event.EPOCH_START, Event.EPOCH_END):  # EPOCH_END runs after the timestamp moved to the next one
            dataset.set_epoch(int(state.timestamp.epoch), int(state.timestamp.sample_in_epoch))
        elif event == Event.AFTER_DATALOADER:
            if self.log_interval is not None:
                self._count_batch(state)
        elif event == Event.BATCH_END:
            self._batch_end(state, logger)

    # -- FIT_START --

    def _global_batch(self, state: State, dataset: MixtureDataset) -> int:
        if dataset.global_batch_size is not None:
            return dataset.global_batch_size
        loader = state.train_dataloader
        per_rank = getattr(getattr(loader, 'dataloader', loader), 'batch_size', None)
        if not per_rank:
            raise ValueError('DomainUpsampling cannot tell the global batch size: the MixtureDataset has no batch_size '
                             'and the train dataloader has none either. Fix: build MixtureDataset(..., batch_size=<the '
                             'DataLoader batch_size>).')
        return int(per_rank) * dist.get_world_size()

    def _total_samples(self, state: State, dataset: MixtureDataset, samples_per_batch: int) -> int:
        max_duration = state.max_duration
        assert max_duration is not None, 'FIT_START has a max_duration'
        unit, value = max_duration.unit, max_duration.value
        if unit == TimeUnit.SAMPLE:
            return int(value)
        if unit == TimeUnit.BATCH:
            return int(value) * samples_per_batch
        if unit == TimeUnit.EPOCH:
            return int(value) * dataset.samples_per_epoch
        if unit == TimeUnit.TOKEN:
            if self.tokens_per_sample is None:
                raise ValueError(f"max_duration={str(max_duration)!r} is in tokens, so placing the mixture on sample "
                                 f'positions needs a token count per sample, and tokens_per_sample is None. Fix: pass '
                                 f'DomainUpsampling(tokens_per_sample=...) (e.g. the sequence length of packed '
                                 f"samples), or give max_duration in 'ba', 'sp' or 'ep'.")
            return int(round(value / self.tokens_per_sample))
        raise ValueError(f'max_duration={str(max_duration)!r} is in {unit.value!r}, which DomainUpsampling cannot '
                         f"place on samples. Fix: use 'ba', 'sp', 'tok' or 'ep'.")

    def resolve(self, state: State) -> tuple[MixtureSchedule, int]:
        """The schedule placed on this Trainer's run (``start`` as a fraction) and the run's global samples."""
        dataset = find_mixture_dataset(state.train_dataloader)
        if dataset is None:
            raise ValueError(f'DomainUpsampling needs a train dataloader over a composer_ext.data.MixtureDataset, got '
                             f'{type(state.train_dataloader).__name__}. Fix: use the text_mixture dataloader (YAML) or '
                             f'DataLoader(MixtureDataset(...)).')
        schedule = self.schedule or dataset.schedule
        dataset.check_schedule(schedule)
        samples_per_batch = self._global_batch(state, dataset)
        total = self._total_samples(state, dataset, samples_per_batch)
        assert state.max_duration is not None
        resolved = schedule.resolve(state.max_duration, samples_per_batch=samples_per_batch,
                                    samples_per_epoch=dataset.samples_per_epoch,
                                    tokens_per_sample=self.tokens_per_sample)
        return resolved, total

    def _fit_start(self, state: State, logger: Logger) -> None:
        resolved, total = self.resolve(state)
        dataset = find_mixture_dataset(state.train_dataloader)
        assert dataset is not None
        self._check_max_repeats_domains(dataset)
        samples_per_batch = self._global_batch(state, dataset)
        total_batches = max(1, total // samples_per_batch)
        resolved = self._check_lr(state, resolved, samples_per_batch, total_batches)
        dataset.bind(resolved, total, served=self.sample_position(state, dataset))
        # Keep the dataset at the Trainer's position (also on a second fit()), so Composer need not spin it.
        dataset.set_epoch(int(state.timestamp.epoch), int(state.timestamp.sample_in_epoch))
        state.dataset_resumption['train'] = True
        self.dataset, self.resolved, self.total_samples = dataset, resolved, total
        self.start_sample = dataset.plan.start_sample
        position = self.sample_position(state)
        names = dataset.domain_names
        if self._restored_window is not None and self._window_begin is not None:  # resumed from a checkpoint
            samples, tokens = self._restored_window
            self._window = np.array([[samples.get(n, 0) for n in names], [tokens.get(n, 0) for n in names]],
                                    dtype=np.int64)
        elif self._window is None or self._window.shape != (2, len(names)):
            self._window_begin = position
            self._window = np.zeros((2, len(names)), dtype=np.int64)
        self._restored_window = None
        self._local = np.zeros((2, len(dataset.domain_names)), dtype=np.int64)
        self._device = state.device
        self._project_repeats(dataset, position, total)
        logger.log_hyperparameters({
            'mixture/start_sample': self.start_sample,
            'mixture/start_fraction': float(resolved.start.value),
            'mixture/total_samples': total,
            'mixture/ramp': resolved.ramp,
        })

    def _check_lr(self, state: State, resolved: MixtureSchedule, samples_per_batch: int,
                  total_batches: int) -> MixtureSchedule:
        if self.lr_cooldown == 'ignore':
            return resolved
        probe = _composer_lr_probe(state, samples_per_batch, self.tokens_per_sample)
        if probe is None:
            log.info('DomainUpsampling: the LR schedule is not a Composer scheduler; not checking its cooldown.')
            return resolved
        try:
            cooldown = lr_cooldown_start(probe, total_batches)
        except Exception as err:  # a user scheduler that cannot be evaluated at other times: do not guess
            if self.lr_cooldown == 'align':
                raise ValueError(f"lr_cooldown='align' but the LR schedule could not be evaluated over the run "
                                 f"({err}). Fix: set start explicitly and lr_cooldown='warn' or 'ignore'.") from err
            log.info('DomainUpsampling: could not evaluate the LR schedule over the run (%s); not checking it.', err)
            return resolved
        self.lr_cooldown_batch = cooldown
        start_batch = float(whole_batches(float(resolved.start.value) * total_batches))  # as the dataset places it
        if cooldown is None:
            if self.lr_cooldown == 'align':
                raise ValueError("lr_cooldown='align' but the LR schedule has no final decay from a plateau to align "
                                 "with (a decay spanning the whole run, e.g. cosine after warmup, has none). Fix: use "
                                 "a schedule that decays at the end (e.g. warmup, constant, then linear decay or a "
                                 "step), or lr_cooldown='warn'.")
            return resolved
        if self.lr_cooldown == 'align':
            aligned = round(cooldown)
            log.info('DomainUpsampling: upsampling starts at batch %d, the start of the LR cooldown.', aligned)
            return resolved.with_start(Time(aligned / total_batches, TimeUnit.DURATION))
        if abs(cooldown - start_batch) > self.lr_tolerance * total_batches and dist.get_global_rank() == 0:
            peak = probe(int(round(cooldown)) - 1) if cooldown >= 1 else probe(0)
            at_start = probe(min(total_batches, int(round(start_batch))))
            warnings.warn(
                f'DomainUpsampling: the upsampling starts at batch {start_batch:.0f} '
                f'({start_batch / total_batches:.0%} of training) but the LR cooldown starts at batch '
                f'{cooldown:.0f} ({cooldown / total_batches:.0%}); the LR multiplier is {at_start:.3g} (cooldown '
                f'from {peak:.3g}) when the mix changes, so the data switch and the LR annealing are confounded. '
                f"Fix: start the upsampling at the cooldown (start='{cooldown / total_batches:.4g}dur' or "
                f"lr_cooldown='align'), use an LR schedule whose decay begins at the upsampling start, or pass "
                f"lr_cooldown='ignore'.", UserWarning, stacklevel=2)
        return resolved

    def _check_max_repeats_domains(self, dataset: MixtureDataset) -> None:
        if isinstance(self.max_repeats, dict):
            unknown = [d for d in self.max_repeats if d not in dataset.domain_names]
            if unknown:
                raise ValueError(f'max_repeats names domains {unknown} that the dataset does not have (it has '
                                 f'{list(dataset.domain_names)}). Fix: use those names.')

    def _limit(self, domain: str) -> Optional[float]:
        if isinstance(self.max_repeats, dict):
            return self.max_repeats.get(domain)
        return self.max_repeats

    def _repeat_problem(self, domain: str, passes: float, draws: float, size: int, limit: float, when: str) -> str:
        fix = 'lower its weight in the mix, start the upsampling later, add data to it, or raise max_repeats'
        if self.on_repeat == 'raise':
            fix += ", or set on_repeat='warn'"
        return (f'domain {domain!r} {when} {passes:.2f} passes over its data ({draws:.0f} draws of its {size} '
                f'samples), more than max_repeats={limit:g}. Fix: {fix}.')

    def _project_repeats(self, dataset: MixtureDataset, position: int, total: int) -> None:
        if self.max_repeats is None:
            return
        end = max(position, total)
        projected = dataset.draws_at(position) + dataset.plan.expected_draws(position, end)
        for i, domain in enumerate(dataset.domain_names):
            limit, size = self._limit(domain), int(dataset.sizes[i])
            if limit is None or size == 0 or projected[i] <= limit * size * (1 + 1e-9):
                continue
            message = self._repeat_problem(domain, projected[i] / size, projected[i], size, limit,
                                           'is projected to make')
            if self.on_repeat == 'raise':
                raise ValueError(message)
            if domain not in self._warned and dist.get_global_rank() == 0:
                warnings.warn(message, UserWarning, stacklevel=2)
            self._warned.add(domain)

    # -- per batch --

    def sample_position(self, state: State, dataset: Optional[MixtureDataset] = None) -> int:
        """The global sample position (over the run) of the next sample the Trainer will train on."""
        dataset = dataset or self.dataset
        assert dataset is not None
        return int(state.timestamp.epoch) * dataset.samples_per_epoch + int(state.timestamp.sample_in_epoch)

    def _count_batch(self, state: State) -> None:
        dataset = self.dataset
        assert dataset is not None and self._local is not None
        counts = domain_counts(state.batch, dataset.domain_names)
        if counts is None:  # no domain column: the schedule's choice for this rank's positions of the batch
            rows = self._rows(state.batch)
            rank, world = dist.get_global_rank(), dist.get_world_size()
            positions = self.sample_position(state) + rank + world * np.arange(rows, dtype=np.int64)
            counts = np.zeros_like(self._local)
            counts[0] = np.bincount(dataset.domain_of(positions), minlength=len(dataset.domain_names))
        self._local += counts

    @staticmethod
    def _rows(batch: Any) -> int:
        if isinstance(batch, torch.Tensor):
            return int(batch.shape[0])
        values = batch.values() if isinstance(batch, Mapping) else batch
        for value in values:
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                return int(value.shape[0])
        raise ValueError('DomainUpsampling cannot count the rows of the batch (no tensor in it).')

    def _batch_end(self, state: State, logger: Logger) -> None:
        dataset = self.dataset
        assert dataset is not None and self._local is not None and self._window is not None
        position = self.sample_position(state)
        self._check_repeats(dataset, position)
        assert state.max_duration is not None
        batch = int(state.timestamp.batch)
        if self.log_interval is not None and (batch % self.log_interval == 0 or state.timestamp >= state.max_duration):
            self._reduce()  # every rank reaches this batch, so every rank joins the all-reduce
            self._log_window(dataset, position, logger)

    def _reduce(self) -> None:
        """Add every rank's counts since the last reduction to the window (a collective: all ranks call it)."""
        if self._local is None or self._window is None:
            return
        if dist.get_world_size() > 1:
            summed = self._device.tensor_to_device(torch.from_numpy(self._local.copy()))
            dist.all_reduce(summed, reduce_operation='SUM')
            self._window += summed.cpu().numpy()
        else:
            self._window += self._local
        self._local[:] = 0

    def _check_repeats(self, dataset: MixtureDataset, position: int) -> None:
        if self.max_repeats is None:
            return
        draws = dataset.draws_at(position)
        for i, domain in enumerate(dataset.domain_names):
            limit, size = self._limit(domain), int(dataset.sizes[i])
            if limit is None or size == 0 or draws[i] <= limit * size or f'{domain}@run' in self._warned:
                continue
            message = self._repeat_problem(domain, draws[i] / size, draws[i], size, limit, 'has now made')
            if self.on_repeat == 'raise':  # found during training, not a bad argument: RuntimeError (documented)
                raise RuntimeError(message)
            if dist.get_global_rank() == 0:
                warnings.warn(message, UserWarning, stacklevel=2)
            self._warned.add(f'{domain}@run')

    def _log_window(self, dataset: MixtureDataset, position: int, logger: Logger) -> None:
        assert self._window is not None and self._window_begin is not None
        names = dataset.domain_names
        samples, tokens = self._window[0], self._window[1]
        target = dataset.target_fractions(self._window_begin, position)
        passes = dataset.passes_at(position)
        metrics: dict[str, float] = {'mixture/alpha': float(dataset.plan.alpha(np.array([max(0, position - 1)]))[0])}
        for i, name in enumerate(names):
            metrics[f'mixture/target/{name}'] = float(target[i])
            metrics[f'mixture/passes/{name}'] = float(passes[i])
            if samples.sum() > 0:
                metrics[f'mixture/fraction/{name}'] = float(samples[i] / samples.sum())
            if tokens.sum() > 0:
                metrics[f'mixture/token_fraction/{name}'] = float(tokens[i] / tokens.sum())
        logger.log_metrics(metrics)
        self._window_begin = position
        self._window[:] = 0

    # -- checkpointing --

    def state_dict(self) -> dict[str, Any]:
        """The logging window (summed over ranks: call on every rank together, as Composer's checkpointing does)."""
        if self.log_interval is not None:
            self._reduce()
        names = self.dataset.domain_names if self.dataset is not None else ()
        window = self._window if self._window is not None else np.zeros((2, len(names)), dtype=np.int64)
        return {
            'repr': repr(self),
            'window_begin': self._window_begin,
            'window_samples': {n: int(window[0][i]) for i, n in enumerate(names)},
            'window_tokens': {n: int(window[1][i]) for i, n in enumerate(names)},
            'warned': sorted(self._warned),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._warned = set(state.get('warned', ()))
        self._window_begin = state.get('window_begin')
        self._window = None
        self._restored_window = (dict(state.get('window_samples', {})), dict(state.get('window_tokens', {})))

    def __repr__(self) -> str:
        return (f'DomainUpsampling(schedule={self.schedule!r}, log_interval={self.log_interval!r}, '
                f'tokens_per_sample={self.tokens_per_sample!r}, max_repeats={self.max_repeats!r}, '
                f'on_repeat={self.on_repeat!r}, lr_cooldown={self.lr_cooldown!r}, lr_tolerance={self.lr_tolerance!r})')


# --- YAML builder -----------------------------------------------------------------------------------------


def build_domain_upsampling(
    context,
    base: dict,
    target: dict,
    start: Union[str, int, Time] = '0.9dur',
    ramp: Literal['step', 'linear', 'cosine'] = 'step',
    ramp_duration: Union[str, int, Time, None] = None,
    normalize: bool = False,
    log_interval: Union[int, str, Time, None] = '50ba',
    tokens_per_sample: Optional[float] = None,
    max_repeats: Union[float, dict, None] = None,
    on_repeat: Literal['warn', 'raise'] = 'warn',
    lr_cooldown: Literal['warn', 'align', 'ignore'] = 'warn',
    lr_tolerance: float = 0.05,
) -> DomainUpsampling:
    """YAML entry ``algorithms: {domain_upsampling: {base: {...}, target: {...}, start: 0.9dur, ...}}``.

    Builds the :class:`~composer_ext.data.MixtureSchedule` from plain values (``base``, ``target``,
    ``start``, ``ramp``, ``ramp_duration``, ``normalize``) and passes the rest to :class:`DomainUpsampling`.
    """
    del context  # the schedule is installed into the train dataset at FIT_START
    schedule = MixtureSchedule(base=base, target=target, start=start, ramp=ramp, ramp_duration=ramp_duration,
                               normalize=normalize)
    return DomainUpsampling(schedule, log_interval=log_interval, tokens_per_sample=tokens_per_sample,
                            max_repeats=max_repeats, on_repeat=on_repeat, lr_cooldown=lr_cooldown,
                            lr_tolerance=lr_tolerance)
