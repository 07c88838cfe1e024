"""The mixture schedule: per-domain sampling weights that change over training.

:class:`MixtureSchedule` says which share of the samples each domain gets as training progresses: a ``base``
mix, a ``target`` (upsampled) mix, and when and how fast to move from one to the other (the technique of
Blakeney et al. 2024, *Does your data spark joy?*, where the target mix serves the last 10-20% of training).
Times are parsed by :func:`composer_ext.core.timing.parse_time` (one policy on units for every technique).

Times in tokens (``'9e9tok'``) are placed on sample positions with a fixed ``tokens_per_sample``. That is exact
for packed samples (every sample is ``seq_len`` tokens) and an approximation for unpacked data, whose samples
vary in length: there the switch lands where the *average* sample length says, not at the exact token count.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Literal, Mapping, Optional, Union

import numpy as np
from composer.core import Time, TimeUnit

from composer_ext.core.timing import parse_time

__all__ = ['MixtureSchedule', 'RAMPS', 'TimeLike', 'ramp_alpha', 'whole_batches']

RAMPS = ('step', 'linear', 'cosine')
_WEIGHT_TOLERANCE = 1e-6

TimeLike = Union[Time, str, int]


# --- times ------------------------------------------------------------------------------------------------


def _time_str(time: Optional[Time]) -> Optional[str]:
    return None if time is None else str(time)


def _to_samples(time: Time, name: str, max_duration: Time, samples_per_batch: Optional[int],
                samples_per_epoch: Optional[int], tokens_per_sample: Optional[float]) -> float:
    """``time`` in samples; ``ValueError`` naming what is missing when the unit cannot be converted."""
    unit = time.unit
    if unit == TimeUnit.SAMPLE:
        return float(time.value)
    # unit -> (its name, samples per batch / samples per epoch / tokens per sample, what is missing, its fix)
    conversions = {
        TimeUnit.BATCH: ('batches', samples_per_batch, 'no samples_per_batch was given',
                         'pass samples_per_batch= (the global batch size)'),
        TimeUnit.EPOCH: ('epochs', samples_per_epoch, 'no samples_per_epoch was given', 'pass samples_per_epoch='),
        TimeUnit.TOKEN: ('tokens', tokens_per_sample, 'no token count was given',
                         'pass tokens_per_sample= (the tokens in one sample, e.g. the sequence length of packed '
                         'samples; a fixed count, so approximate for unpacked samples)'),
    }
    if unit in conversions:
        unit_name, per_unit, missing, fix = conversions[unit]
        if per_unit is None:
            raise ValueError(f'{name}={str(time)!r} is in {unit_name} but max_duration={str(max_duration)!r} is in '
                             f'{max_duration.unit.value!r}, and {missing} to convert between them. Fix: {fix}, or '
                             f"give {name} in the unit of max_duration or in 'dur'.")
        return float(time.value) / per_unit if unit == TimeUnit.TOKEN else float(time.value) * per_unit
    raise ValueError(f'{name}={str(time)!r} cannot be converted to samples. Fix: use ba, sp, tok, ep or dur.')


# --- the schedule -----------------------------------------------------------------------------------------


def _check_weights(weights: Any, name: str, normalize: bool) -> dict[str, float]:
    if not isinstance(weights, Mapping):
        raise TypeError(f'{name}={weights!r} is a {type(weights).__name__}, not a mapping of domain -> weight. Fix: '
                        f"pass e.g. {name}={{'code': 0.5, 'prose': 0.5}}.")
    if not weights:
        raise ValueError(f'{name}={weights!r} is not a non-empty mapping of domain -> weight. Fix: pass e.g. '
                         f"{name}={{'code': 0.5, 'prose': 0.5}}.")
    checked = {}
    for domain, weight in weights.items():
        if not isinstance(domain, str) or not domain:
            wrong_type = not isinstance(domain, str)  # a non-string key is a TypeError, an empty name a ValueError
            problem = f'a {type(domain).__name__}, not a domain name' if wrong_type else 'which is not a domain name'
            raise (TypeError if wrong_type else ValueError)(f'{name} has the key {domain!r}, {problem}. Fix: use '
                                                            f'non-empty strings as keys.')
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
            raise TypeError(f'{name}[{domain!r}]={weight!r} is a {type(weight).__name__}, not a number. Fix: give '
                            f'every domain a number >= 0, e.g. {name}[{domain!r}]=0.5.')
        if not math.isfinite(float(weight)):
            raise ValueError(f'{name}[{domain!r}]={weight!r} is not a finite number. Fix: give every domain a '
                             f'weight >= 0.')
        if weight < 0:
            raise ValueError(f'{name}[{domain!r}]={weight!r} is negative. Fix: give every domain a weight >= 0 '
                             f'(0 leaves the domain out).')
        checked[domain] = float(weight)
    total = math.fsum(checked.values())
    if total <= 0:
        raise ValueError(f'{name}={weights!r} has no positive weight. Fix: give at least one domain a weight > 0.')
    if normalize:
        return {d: w / total for d, w in checked.items()}
    if abs(total - 1.0) > _WEIGHT_TOLERANCE:
        raise ValueError(f'{name} weights sum to {total:.6g}, not 1 ({name}={weights!r}). Fix: make them sum to 1, '
                         f'or pass normalize=True to rescale them.')
    return checked


class MixtureSchedule:
    """Per-domain sampling weights as a function of training progress: a base mix, then a target mix.

    Before ``start`` the weights are ``base``; from ``start`` on they move to ``target``, at once (``'step'``,
    the paper's setting) or over ``ramp_duration`` (``'linear'`` or ``'cosine'``). A domain missing from one
    of the two mixes has weight 0 there.

    Args:
        base: Domain -> weight before the switch (the pretraining mix). Weights are >= 0 and sum to 1.
        target: Domain -> weight after the switch (the upsampled mix).
        start: When the switch begins: a Composer ``Time``, an int (batches), or a time string (``'0.9dur'``,
            ``'90000ba'``, ``'9e9tok'``). Non-``dur`` times are placed on the run by :meth:`resolve`
            (:class:`~composer_ext.algorithms.DomainUpsampling` does that at ``FIT_START``).
        ramp: ``'step'``, ``'linear'`` or ``'cosine'``.
        ramp_duration: How long a ``linear``/``cosine`` ramp takes (a time, like ``start``); ``None`` ramps
            until the end of training. Not used by ``'step'``.
        normalize: Rescale ``base`` and ``target`` to sum to 1 instead of requiring it.

    Example:
        .. code-block:: python

            from composer_ext.data import MixtureSchedule
            schedule = MixtureSchedule(base={'prose': 0.7, 'math': 0.3}, target={'prose': 0.3, 'math': 0.7},
                                       start='0.8dur')
            schedule.weights(0.5)    # {'prose': 0.7, 'math': 0.3}
            schedule.weights(0.9)    # {'prose': 0.3, 'math': 0.7}
    """

    def __init__(self, base: Mapping[str, float], target: Mapping[str, float], start: TimeLike = '0.9dur',
                 ramp: Literal['step', 'linear', 'cosine'] = 'step', ramp_duration: Optional[TimeLike] = None,
                 normalize: bool = False):
        if not isinstance(normalize, bool):
            raise TypeError(f'normalize={normalize!r} is not a bool. Fix: pass True or False.')
        base_weights = _check_weights(base, 'base', normalize)
        target_weights = _check_weights(target, 'target', normalize)
        domains = list(base_weights) + [d for d in target_weights if d not in base_weights]
        self.base = {d: base_weights.get(d, 0.0) for d in domains}
        self.target = {d: target_weights.get(d, 0.0) for d in domains}
        self.start = parse_time(start, 'start', '0.9dur')
        if ramp not in RAMPS:
            raise ValueError(f'ramp={ramp!r} is not a ramp. Fix: use one of {list(RAMPS)}.')
        self.ramp = ramp
        if ramp == 'step' and ramp_duration is not None:
            raise ValueError(f"ramp_duration={ramp_duration!r} is only used by the 'linear' and 'cosine' ramps, but "
                             f"ramp='step'. Fix: drop ramp_duration, or choose ramp='linear'.")
        self.ramp_duration = None if ramp_duration is None else parse_time(ramp_duration, 'ramp_duration', '0.1dur')
        if self.start.unit == TimeUnit.DURATION and self.ramp_duration is not None and \
                self.ramp_duration.unit == TimeUnit.DURATION and self.start.value + self.ramp_duration.value > 1 + 1e-9:
            raise ValueError(f'start={str(self.start)!r} + ramp_duration={str(self.ramp_duration)!r} ends after the '
                             f'end of training. Fix: choose a ramp_duration <= {1 - self.start.value:g}dur or an '
                             f'earlier start.')
        self.normalize = normalize

    @classmethod
    def constant(cls, weights: Mapping[str, float], normalize: bool = False) -> 'MixtureSchedule':
        """A schedule that never changes: ``weights`` for the whole run."""
        return cls(base=weights, target=weights, start='1dur', normalize=normalize)

    @property
    def domains(self) -> tuple[str, ...]:
        """Every domain named by the base or the target mix, base order first."""
        return tuple(self.base)

    @property
    def is_resolved(self) -> bool:
        """Whether ``start`` and ``ramp_duration`` are fractions of training (so :meth:`weights` works)."""
        return self.start.unit == TimeUnit.DURATION and (self.ramp_duration is None or
                                                         self.ramp_duration.unit == TimeUnit.DURATION)

    def fractions(self) -> tuple[float, float]:
        """``(start, ramp length)`` as fractions of training (ramp length 0 for ``'step'``); needs a resolved
        schedule (:attr:`is_resolved`)."""
        if not self.is_resolved:
            raise ValueError(f'start={str(self.start)!r} (ramp_duration={_time_str(self.ramp_duration)!r}) is not a '
                             f'fraction of training, so the weights at a fraction of training need max_duration. '
                             f'Fix: call schedule.resolve(max_duration, ...) first (DomainUpsampling does this at '
                             f"FIT_START), or give start in 'dur'.")
        start = float(self.start.value)
        if self.ramp == 'step':
            return start, 0.0
        ramp = 1.0 - start if self.ramp_duration is None else float(self.ramp_duration.value)
        return start, ramp

    def alpha(self, progress: float) -> float:
        """How far the mix has moved from ``base`` (0) to ``target`` (1) at ``progress`` in [0, 1]."""
        progress = _check_progress(progress)
        start, ramp = self.fractions()
        return float(ramp_alpha(np.array([progress]), start, ramp, self.ramp)[0])

    def weights(self, progress: float) -> dict[str, float]:
        """The mix at a fraction ``progress`` in [0, 1] of training: domain -> weight (sums to 1)."""
        alpha = self.alpha(progress)
        return {d: (1.0 - alpha) * self.base[d] + alpha * self.target[d] for d in self.domains}

    def resolve(self, max_duration: TimeLike, samples_per_batch: Optional[int] = None,
                samples_per_epoch: Optional[int] = None,
                tokens_per_sample: Optional[float] = None) -> 'MixtureSchedule':
        """This schedule with ``start`` and ``ramp_duration`` as fractions of a run of ``max_duration``.

        Times in the unit of ``max_duration`` convert directly; others go through samples, which needs the
        global batch size (``ba``), the samples per epoch (``ep``) or the tokens in one sample (``tok``).
        ``tokens_per_sample`` is one fixed number: exact for packed samples, an approximation (the switch lands
        at the average sample length's estimate) for unpacked samples of varying length.

        Raises:
            ValueError: a unit that cannot be converted with what was given, or a start (or ramp end) after
                the end of training.
        """
        max_duration = parse_time(max_duration, 'max_duration', '1000ba')
        if max_duration.unit == TimeUnit.DURATION or max_duration.value <= 0:
            raise ValueError(f'max_duration={str(max_duration)!r} is not a length of training. Fix: pass the run\'s '
                             f"max_duration, e.g. '1000ba'.")
        for name, value in (('samples_per_batch', samples_per_batch), ('samples_per_epoch', samples_per_epoch)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1):
                raise ValueError(f'{name}={value!r} is invalid. Fix: use a positive int (or None).')
        if tokens_per_sample is not None and (isinstance(tokens_per_sample, bool) or
                                              not isinstance(tokens_per_sample, numbers.Real) or
                                              tokens_per_sample <= 0):
            raise ValueError(f'tokens_per_sample={tokens_per_sample!r} is invalid. Fix: use a positive number '
                             f'(or None).')
        context = (max_duration, samples_per_batch, samples_per_epoch, tokens_per_sample)

        def fraction(time: Time, name: str) -> float:
            if time.unit == TimeUnit.DURATION:
                return float(time.value)
            if time.unit == max_duration.unit:
                return float(time.value) / float(max_duration.value)
            return _to_samples(time, name, *context) / _to_samples(max_duration, 'max_duration', *context)

        start = fraction(self.start, 'start')
        if start > 1 + 1e-12:
            raise ValueError(f'start={str(self.start)!r} is after the end of training (max_duration='
                             f"{str(max_duration)!r}). Fix: choose a start before max_duration, e.g. '0.9dur'.")
        ramp_duration = None
        if self.ramp_duration is not None:
            ramp = fraction(self.ramp_duration, 'ramp_duration')
            if start + ramp > 1 + 1e-9:
                raise ValueError(f'start={str(self.start)!r} + ramp_duration={str(self.ramp_duration)!r} ends after '
                                 f'the end of training (max_duration={str(max_duration)!r}). Fix: shorten the ramp '
                                 f'or start earlier.')
            ramp_duration = Time(ramp, TimeUnit.DURATION)
        return MixtureSchedule(self.base, self.target, start=Time(min(start, 1.0), TimeUnit.DURATION), ramp=self.ramp,
                               ramp_duration=ramp_duration, normalize=self.normalize)

    def with_start(self, start: TimeLike) -> 'MixtureSchedule':
        """A copy that switches at ``start`` instead."""
        return MixtureSchedule(self.base, self.target, start=start, ramp=self.ramp, ramp_duration=self.ramp_duration,
                               normalize=self.normalize)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MixtureSchedule):
            return NotImplemented
        return (self.base, self.target, self.start, self.ramp, self.ramp_duration) == \
            (other.base, other.target, other.start, other.ramp, other.ramp_duration)

    def __hash__(self) -> int:
        return hash((tuple(self.base.items()), tuple(self.target.items()), str(self.start), self.ramp,
                     _time_str(self.ramp_duration)))

    def __repr__(self) -> str:
        return (f'MixtureSchedule(base={self.base!r}, target={self.target!r}, start={str(self.start)!r}, '
                f'ramp={self.ramp!r}, ramp_duration={_time_str(self.ramp_duration)!r}, normalize={self.normalize!r})')


def _check_progress(progress: Any) -> float:
    if isinstance(progress, bool) or not isinstance(progress, numbers.Real) or not 0.0 <= float(progress) <= 1.0:
        raise ValueError(f'progress={progress!r} is not a fraction of training. Fix: pass a number in [0, 1].')
    return float(progress)


def ramp_alpha(x: np.ndarray, start: float, length: float, ramp: str) -> np.ndarray:
    """The ramp's position (0 = base, 1 = target) at points ``x``, in the same units as ``start``/``length``."""
    if ramp == 'step' or length <= 0:
        return (x >= start).astype(np.float64)
    t = np.clip((x - start) / length, 0.0, 1.0)
    if ramp == 'linear':
        return t
    return 0.5 * (1.0 - np.cos(np.pi * t))



def whole_batches(batches: float) -> int:
    """A fractional batch count as whole batches: rounded down, unless within float error of the next batch.

    Like Composer's own ``dur`` conversion (which places LR milestones), so that the data switch and an LR
    milestone at the same fraction land on the same batch.
    """
    nearest = round(batches)
    return int(nearest) if abs(batches - nearest) < 1e-6 else int(math.floor(batches))
