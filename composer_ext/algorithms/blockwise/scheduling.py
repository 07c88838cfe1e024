"""Assign blocks to ranks by cost with longest-processing-time-first (LPT) bin packing.

Block training times are very uneven (in the paper's VGG16, a block near the input took 3.6x as long as one
near the output), so a round-robin split leaves ranks idle. :func:`block_costs` estimates every block's cost
with one of three models:

* ``'params_x_activation'``: the teacher block's parameters x its output activation size (the issue's
  cost); cheap and shape-only, but blind to the teacher prefix that every step recomputes.
* ``'flops'`` (default): the multiply-accumulates a block's training really runs per sample: the teacher
  forward up to the block's end (to produce its input and target; once per epoch on the fly, once in
  total with a disk cache) plus 3x the student block's forward (forward + backward).
* ``'profile'``: measured seconds of a few training steps of every block (the ranks profile disjoint
  blocks and share the timings), for when FLOPs mispredict the hardware.

:func:`assign_blocks` then gives each block, most expensive first, to the least-loaded rank (ties go to the
lower rank, so every rank computes the same assignment). LPT is within 4/3 of the optimal makespan.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Optional

from composer_ext.algorithms.blockwise.discovery import BlockTrace

__all__ = ['COST_MODELS', 'Assignment', 'assign_blocks', 'block_costs']

COST_MODELS = ('flops', 'params_x_activation', 'profile')


def block_costs(teacher_traces: dict[str, BlockTrace], student_traces: Optional[dict[str, BlockTrace]] = None,
                cost: str = 'flops', epochs: int = 1, cached: Optional[dict[str, bool]] = None) -> dict[str, float]:
    """Estimated training cost of every block (arbitrary units, comparable across blocks).

    Args:
        teacher_traces: The teacher's block traces (:func:`~composer_ext.algorithms.blockwise.discovery.trace_blocks`).
        student_traces: The student's block traces (needed for ``'flops'``).
        cost: ``'flops'`` or ``'params_x_activation'`` (``'profile'`` is measured by the pipeline).
        epochs: Passes over the data per block.
        cached: ``{path: True}`` for blocks whose teacher activations are cached on disk (the prefix then
            runs once, not once per epoch).

    Example:
        >>> from composer_ext.algorithms.blockwise.discovery import BlockTrace
        >>> traces = {'a': BlockTrace('a', 0, (8, 4, 4), (8, 4, 4), True, params=100)}
        >>> block_costs(traces, cost='params_x_activation')
        {'a': 12800.0}
    """
    if cost not in ('flops', 'params_x_activation'):
        raise ValueError(f"cost={cost!r} cannot be computed from traces. Fix: use 'flops' or 'params_x_activation' "
                         f"('profile' is measured by run_blockwise).")
    if cost == 'params_x_activation':
        return {path: float(trace.params * trace.output_numel) for path, trace in teacher_traces.items()}
    if student_traces is None:
        raise ValueError("cost='flops' needs student_traces (the student's block traces). Fix: pass them, or use "
                         "cost='params_x_activation'.")
    cached = cached or {}
    return {path: float((1 if cached.get(path) else epochs) * trace.prefix_macs +
                        epochs * 3 * student_traces[path].macs)
            for path, trace in teacher_traces.items()}


@dataclass
class Assignment:
    """Which rank trains which blocks, and the predicted load of every rank."""

    ranks: list[list[str]]
    loads: list[float]
    costs: dict[str, float] = field(default_factory=dict)

    @property
    def efficiency(self) -> float:
        """Predicted load balance: mean rank load / max rank load (1.0 is perfect)."""
        peak = max(self.loads) if self.loads else 0.0
        return sum(self.loads) / len(self.loads) / peak if peak > 0 else 1.0

    def rank_of(self, path: str) -> int:
        return next(rank for rank, paths in enumerate(self.ranks) if path in paths)

    def to_dict(self) -> dict:
        return {'ranks': self.ranks, 'loads': self.loads, 'costs': self.costs, 'efficiency': self.efficiency}


def assign_blocks(costs: dict[str, float], world_size: int) -> Assignment:
    """LPT bin packing of blocks onto ``world_size`` ranks; warns (and leaves ranks idle) with fewer blocks.

    Args:
        costs: ``{path: cost}`` (any non-negative numbers).
        world_size: Number of ranks.

    Example:
        >>> assign_blocks({'a': 5, 'b': 4, 'c': 3, 'd': 3, 'e': 3}, 2).ranks
        [['a', 'd'], ['b', 'c', 'e']]
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f'world_size={world_size!r} is invalid. Fix: use a positive int.')
    if not costs:
        raise ValueError('costs is empty: there are no blocks to assign. Fix: pass {block path: cost}.')
    bad = {p: c for p, c in costs.items() if isinstance(c, bool) or not isinstance(c, (int, float)) or c < 0}
    if bad:
        raise ValueError(f'costs {bad} are not non-negative numbers. Fix: give every block a cost >= 0.')
    if world_size > len(costs):
        warnings.warn(f'{world_size} ranks but only {len(costs)} blocks: ranks {list(range(len(costs), world_size))} '
                      f'will be idle during block training. Fix: launch at most {len(costs)} ranks (composer -n '
                      f'{len(costs)}), or split the model into more blocks.', UserWarning, stacklevel=2)
    order = list(costs)
    ranks: list[list[str]] = [[] for _ in range(world_size)]
    loads = [0.0] * world_size
    for path in sorted(order, key=lambda p: (-costs[p], order.index(p))):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        ranks[rank].append(path)
        loads[rank] += float(costs[path])
    return Assignment(ranks=ranks, loads=loads, costs={p: float(c) for p, c in costs.items()})
