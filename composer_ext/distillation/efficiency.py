"""The paper's efficiency measure: how many steps a run needs to reach a target quality."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

__all__ = ['steps_to_target']


def steps_to_target(curve: Sequence[tuple[int, float]], target: float, higher_is_better: bool = True) -> Optional[int]:
    """The first step of an evaluation curve ``[(step, value), ...]`` whose value reaches ``target`` (None if never).

    This is the paper's efficiency measure: a distilled run's speed-up is ``steps_to_target(baseline) /
    steps_to_target(distilled)`` for a fixed target quality.

    Example:
        >>> steps_to_target([(25, 0.61), (50, 0.72), (75, 0.80)], target=0.7)
        50
    """
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not math.isfinite(target):
        raise ValueError(f'target={target!r} must be a finite number. Fix: e.g. target=0.8 for an accuracy.')
    for step, value in sorted(curve):
        if (value >= target) if higher_is_better else (value <= target):
            return int(step)
    return None
