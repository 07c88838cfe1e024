"""Time arguments: one parser, one policy on units, one resolver for windows and one for intervals.

Every technique's time argument (a window bound such as ``start``/``end``, a ramp length, a logging or probing
interval) goes through :func:`parse_time` or :func:`parse_interval`, so all accept the same things: a Composer
``Time``, an int (batches) or a time string (``'0.8dur'``, ``'500ba'``, ``'2ep'``, ``'5000sp'``, ``'1e9tok'``).
The units are the same everywhere (:data:`TIME_UNITS`): wall-clock seconds and iterations are refused, because
neither can place a training event reproducibly (a resumed run would put it elsewhere).

At ``FIT_START`` a bound is put on the run's time axis with :func:`resolve_bound` (``dur`` becomes
``max_duration``'s unit; epochs become batches where the epoch length is known), and an interval with
:class:`Interval`.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Optional

from composer.core import Event, State, Time, TimeUnit

__all__ = ['TIME_UNITS', 'Interval', 'is_time', 'parse_interval', 'parse_time', 'reached', 'resolve_bound',
           'time_string', 'trainer_time']

# The one policy: the units a time argument may use, for every technique.
TIME_UNITS = (TimeUnit.BATCH, TimeUnit.EPOCH, TimeUnit.SAMPLE, TimeUnit.TOKEN, TimeUnit.DURATION)
_UNIT_NAMES = "'ba', 'ep', 'sp', 'tok' or 'dur'"


def time_string(time: Time) -> str:
    """The canonical time string of ``time`` (``'0.5dur'``, ``'100ba'``): what ``Time.from_timestring`` reads back."""
    value = time.value
    if isinstance(value, float):  # '2dur', not '2.0dur'; repr where the short form would not read back exactly
        text = f'{value:g}' if float(f'{value:g}') == value else repr(value)
    else:
        text = str(value)
    return f'{text}{time.unit.value}'


def _parse(value: Any, name: str, example: str) -> Time:
    """Type, syntax and unit checks shared by bounds and intervals."""
    if isinstance(value, Time):
        time = value
    elif isinstance(value, bool) or value is None:
        raise TypeError(f'{name}={value!r} is not a time. Fix: pass a Composer Time, an int (batches) or a time '
                        f'string such as {example!r}.')
    elif isinstance(value, numbers.Integral):
        time = Time(int(value), TimeUnit.BATCH)
    elif isinstance(value, str):
        try:
            time = Time.from_timestring(value)
        except ValueError:
            raise ValueError(f'{name}={value!r} is not a Composer time string. Fix: use e.g. "{example}", "500ba", '
                             f'"2ep", "5000sp", "1e9tok" or "0.5dur".') from None
    else:
        raise TypeError(f'{name}={value!r} is a {type(value).__name__}, not a time. Fix: pass a Composer Time, an '
                        f'int (batches) or a time string such as {example!r}.')
    if time.unit not in TIME_UNITS:
        unit = time.unit.value
        raise ValueError(f'{name}={time_string(time)!r} is in {unit!r}: time arguments accept {_UNIT_NAMES}, and this '
                         f'one has unit {unit!r} (seconds and iterations cannot place a training event the same way '
                         f'on resume). Fix: use {_UNIT_NAMES}, e.g. {example!r}.')
    if not math.isfinite(float(time.value)):
        raise ValueError(f'{name}={time_string(time)!r} is not finite. Fix: use a finite time, e.g. {example!r}.')
    return time


def parse_time(value: Any, name: str, example: str = '0.5dur', past_end: str = 'is after the end of training') -> Time:
    """A point in training (a window bound, a ramp length) as a Composer ``Time``.

    Args:
        value: A ``Time``, an int (batches) or a time string.
        name: The argument's name, for the error message.
        example: A valid value to suggest in the error message.
        past_end: How the message says that a ``dur`` time is past ``1dur`` (a technique whose documented messages
            word it otherwise keeps its wording, e.g. ``'is beyond the end of training'``).

    Raises:
        TypeError: not a time at all. ValueError: a bad string, a refused unit, a negative time, or more than
        ``1dur``. Each message names the argument, the value and the fix.

    Example:
        >>> parse_time('0.8dur', 'start')
        Time(0.8, TimeUnit.DURATION)
        >>> parse_time(500, 'end')
        Time(500, TimeUnit.BATCH)
    """
    time = _parse(value, name, example)
    if time.value < 0:
        raise ValueError(f'{name}={time_string(time)!r} is negative. Fix: use a time >= 0, e.g. {example!r}.')
    if time.unit == TimeUnit.DURATION and time.value > 1:
        raise ValueError(f'{name}={time_string(time)!r} {past_end} (1dur). Fix: use a fraction of '
                         f'training in [0, 1], e.g. {example!r}.')
    return time


def parse_interval(value: Any, name: str, example: str = '100ba') -> Optional[Time]:
    """A positive interval (how often something happens) as a Composer ``Time``, or None for "never".

    Example:
        >>> parse_interval('2ep', 'every')
        Time(2, TimeUnit.EPOCH)
    """
    if value is None:
        return None
    time = _parse(value, name, example)
    if not time.value > 0 or (time.unit == TimeUnit.DURATION and time.value > 1):
        raise ValueError(f'{name}={time_string(time)!r} must be positive (and at most 1dur). Fix: use e.g. '
                         f'"{example}" or "0.1dur".')
    return time


def trainer_time(value: Any, name: str) -> Time:
    """A Trainer-level time field (``max_duration``, ``eval_interval``, ``save_interval``) as Composer reads it.

    The same parser and units as :func:`parse_time`, with one difference that is Composer's, not ours: the
    Trainer reads a bare int in these fields as epochs, so an int here is epochs.

    Example:
        >>> trainer_time(3, 'max_duration')
        Time(3, TimeUnit.EPOCH)
    """
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return Time(int(value), TimeUnit.EPOCH)
    return _parse(value, name, '1000ba')


def is_time(value: Any) -> bool:
    """Whether ``value`` is something :func:`parse_time` reads (used by the YAML validator)."""
    try:
        _parse(value, 'value', '0.5dur')
    except (TypeError, ValueError):
        return False
    return True


def resolve_bound(time: Time, state: State) -> tuple[float, TimeUnit]:
    """A point in training as ``(value, unit)`` on the run's own axis, to compare with ``state.timestamp``.

    ``dur`` becomes ``max_duration``'s unit, and epochs become batches where the epoch length is known (so
    ``0.5dur`` of an epoch-based run falls mid-epoch, and bounds in epochs, batches and ``dur`` compare).
    """
    value, unit = float(time.value), time.unit
    if unit == TimeUnit.DURATION:
        max_duration = state.max_duration
        if max_duration is None:
            raise ValueError(f'{time_string(time)!r} is a fraction of the duration, but the Trainer has no '
                             f"max_duration. Fix: set max_duration, or give the time in batches, e.g. '100ba'.")
        value, unit = value * float(max_duration.value), max_duration.unit
    if unit == TimeUnit.EPOCH and state.dataloader_len is not None:
        value, unit = value * int(state.dataloader_len), TimeUnit.BATCH
    return value, unit


def reached(bound: tuple[float, TimeUnit], state: State) -> bool:
    """Whether the run's current timestamp is at or past a bound from :func:`resolve_bound`."""
    value, unit = bound
    return float(state.timestamp.get(unit).value) >= value


class Interval:
    """When an interval is due: ``dur`` is resolved against ``max_duration`` at ``FIT_START``, then every crossing
    of a multiple of the interval (on ``BATCH_END``; on ``EPOCH_END`` for epoch intervals) is due.

    Args:
        interval: From :func:`parse_interval` (None: never due).
        name: The argument it came from, for error messages.
    """

    def __init__(self, interval: Optional[Time], name: str):
        self.interval = interval
        self.name = name
        self.resolved: Optional[Time] = None

    def resolve(self, state: State) -> None:
        interval = self.interval
        if interval is None or interval.unit != TimeUnit.DURATION:
            self.resolved = interval
            return
        shown = repr(time_string(interval))
        max_duration = state.max_duration
        if max_duration is None:
            raise ValueError(f'{self.name}={shown} is a fraction of the duration, but the Trainer has no max_duration. '
                             f'Fix: set max_duration, or use e.g. {self.name}="100ba".')
        unit, total = max_duration.unit, max_duration.value
        if unit == TimeUnit.EPOCH:
            if state.dataloader_len is None:
                raise ValueError(f'{self.name}={shown} with max_duration={time_string(max_duration)!r} needs a sized '
                                 f'train dataloader to count batches. Fix: use a batch interval such as '
                                 f'{self.name}="100ba".')
            unit, total = TimeUnit.BATCH, total * int(state.dataloader_len)
        self.resolved = Time(max(1, math.ceil(interval.value * total)), unit)

    def due(self, state: State, event: Event) -> bool:
        interval = self.resolved
        if interval is None:
            return False
        if interval.unit == TimeUnit.EPOCH:
            return event == Event.EPOCH_END and int(state.timestamp.epoch) % int(interval.value) == 0
        if event != Event.BATCH_END:
            return False
        now = state.timestamp.get(interval.unit).value
        before = state.previous_timestamp.get(interval.unit).value if state.previous_timestamp is not None else 0
        return math.floor(now / interval.value) != math.floor(before / interval.value)
