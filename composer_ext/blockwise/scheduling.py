"""Assign blocks to ranks by cost: an exact minimum-makespan partition for few blocks, LPT bin packing otherwise.

Block training times are very uneven (in the paper's VGG16, a block near the input took 3.6x as long as one
near the output), so a round-robin split leaves ranks idle. :func:`block_costs` estimates every block's cost
with one of three models:

* ``'params_x_activation'`` (default, the issue's cost): the teacher block's parameters x its output
  activation size; cheap and shape-only, but blind to the teacher prefix that every on-the-fly step
  recomputes, and it weighs wide blocks by their width once more.
* ``'flops'``: the multiply-accumulates a block's training really runs per sample: the teacher forward up to
  the block's end (to produce its input and target; once per epoch on the fly, once in total with a disk
  cache) plus 3x the student block's forward (forward + backward). It tracks time where compute dominates
  (accelerators, wide layers).
* ``'profile'``: measured seconds of a few training steps of every block (the ranks profile disjoint
  blocks and share the timings). Use it when the balance matters: both models above are approximations
  (on one CPU thread, the block times of small_vgg[16, 32, 64] spread far less than their MACs, 2.8x, or
  their parameters x activation, 4x, because norm, ReLU and depthwise work is memory-bound).

:func:`assign_blocks` then partitions the blocks over the ranks so that the most loaded rank is as light as
possible. With a handful of blocks the best split matters (5 blocks on 2 ranks: LPT can be 7% off the
optimum, a speedup of 1.80x instead of 1.89x), and it is cheap to find: up to :data:`EXACT_MAX_BLOCKS`
blocks a branch and bound search (blocks in decreasing cost, ranks with equal loads tried once, branches
pruned as soon as a rank reaches the best makespan found) returns the optimal partition, starting from
the LPT one (if the search runs out of its node budget, the best partition found so far, never worse than
LPT, with ``optimal=False``). Beyond that the assignment is LPT (each block, most expensive first, to the
least-loaded rank; within 4/3 of the optimum). Everything is deterministic (ties go to the lower rank and the
earlier block, the budget counts nodes, not seconds), so every rank computes the same assignment.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Optional

from composer_ext.blockwise.discovery import BlockTrace

__all__ = ['COST_MODELS', 'EXACT_MAX_BLOCKS', 'PARTITION_METHODS', 'Assignment', 'assign_blocks', 'block_costs',
           'unfinished_costs']

COST_MODELS = ('params_x_activation', 'flops', 'profile')
PARTITION_METHODS = ('auto', 'exact', 'lpt')
EXACT_MAX_BLOCKS = 20
_NODE_BUDGET = 20_000  # search nodes (a fraction of a second): bounds the time; the best partition found is kept
_TOLERANCE = 1e-12  # relative: a partition must beat the best one by more than rounding to replace it


def block_costs(teacher_traces: dict[str, BlockTrace], student_traces: Optional[dict[str, BlockTrace]] = None,
                cost: str = 'params_x_activation', epochs: int = 1,
                cached: Optional[dict[str, bool]] = None) -> dict[str, float]:
    """Estimated training cost of every block (arbitrary units, comparable across blocks).

    Args:
        teacher_traces: The teacher's block traces (:func:`~composer_ext.blockwise.discovery.trace_blocks`).
        student_traces: The student's block traces (needed for ``'flops'``).
        cost: ``'params_x_activation'`` or ``'flops'`` (``'profile'`` is measured by the pipeline).
        epochs: Passes over the data per block.
        cached: ``{path: True}`` for blocks whose teacher activations are cached on disk (the prefix then
            runs once, not once per epoch).

    Example:
        >>> from composer_ext.blockwise.discovery import BlockTrace
        >>> traces = {'a': BlockTrace('a', 0, (8, 4, 4), (8, 4, 4), True, params=100)}
        >>> block_costs(traces, cost='params_x_activation')
        {'a': 12800.0}
    """
    if cost not in ('flops', 'params_x_activation'):
        raise ValueError(f"cost={cost!r} cannot be computed from traces. Fix: use 'params_x_activation' or 'flops' "
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


def unfinished_costs(costs: dict[str, float], remaining: dict[str, float]) -> dict[str, float]:
    """The costs of the work left: finished blocks dropped, an in-progress block weighted by its remaining share.

    A resumed run must be balanced over what is left to train; balancing all blocks and then skipping the
    finished ones can leave one rank with every unfinished block.

    Args:
        costs: ``{path: cost}`` of whole block trainings.
        remaining: ``{path: fraction of its steps still to train}`` (0.0 finished, 1.0 untouched), e.g. from
            :func:`~composer_ext.blockwise.training.block_progress`.

    Example:
        >>> unfinished_costs({'a': 4.0, 'b': 4.0, 'c': 2.0}, {'a': 0.0, 'b': 0.25, 'c': 1.0})
        {'b': 1.0, 'c': 2.0}
    """
    missing = sorted(set(costs) - set(remaining))
    if missing:
        raise ValueError(f'remaining has no entry for blocks {missing}. Fix: give every block its remaining fraction '
                         f'(0.0 finished ... 1.0 untouched).')
    bad = {p: remaining[p] for p in costs if isinstance(remaining[p], bool) or
           not isinstance(remaining[p], (int, float)) or not 0 <= remaining[p] <= 1}
    if bad:
        raise ValueError(f'remaining fractions {bad} are not in [0, 1]. Fix: 0.0 for a finished block, 1.0 for an '
                         f'untouched one.')
    return {p: float(c) * float(remaining[p]) for p, c in costs.items() if remaining[p] > 0}


@dataclass
class Assignment:
    """Which rank trains which blocks, and the predicted load of every rank.

    ``method`` is how the partition was found (``'exact'``, ``'lpt'``); ``optimal`` says whether its makespan
    is proven minimal for these costs.
    """

    ranks: list[list[str]]
    loads: list[float]
    costs: dict[str, float] = field(default_factory=dict)
    method: str = 'lpt'
    optimal: bool = False

    @property
    def makespan(self) -> float:
        """The predicted load of the busiest rank."""
        return max(self.loads) if self.loads else 0.0

    @property
    def efficiency(self) -> float:
        """Predicted load balance: mean rank load / max rank load (1.0 is perfect)."""
        peak = self.makespan
        return sum(self.loads) / len(self.loads) / peak if peak > 0 else 1.0

    def rank_of(self, path: str) -> int:
        return next(rank for rank, paths in enumerate(self.ranks) if path in paths)

    def to_dict(self) -> dict:
        return {'ranks': self.ranks, 'loads': self.loads, 'costs': self.costs, 'efficiency': self.efficiency,
                'method': self.method, 'optimal': self.optimal}


def _lpt(values: list[float], world_size: int) -> list[int]:
    """Rank of every item (``values`` sorted in decreasing order): each to the least-loaded rank, ties to the lower."""
    loads = [0.0] * world_size
    choice = []
    for value in values:
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        choice.append(rank)
        loads[rank] += value
    return choice


def _exact(values: list[float], world_size: int, start: list[int], budget: int) -> tuple[list[int], bool]:
    """Branch and bound for the minimum makespan; ``values`` sorted in decreasing order, ``start`` a feasible choice.

    Returns the best choice found and whether it is proven optimal (the search finished within ``budget`` nodes
    or reached the lower bound ``max(largest value, total / world_size)``).
    """
    loads = [0.0] * world_size
    for value, rank in zip(values, start):
        loads[rank] += value
    best = [max(loads), list(start)]
    lower = max(max(values), sum(values) / world_size)
    if best[0] <= lower * (1 + _TOLERANCE):
        return best[1], True
    loads = [0.0] * world_size
    choice = [0] * len(values)
    nodes = [0]

    def search(index: int) -> bool:  # True: stop (the bound is reached or the budget is spent)
        if index == len(values):
            peak = max(loads)
            if peak < best[0] * (1 - _TOLERANCE):
                best[0], best[1] = peak, list(choice)
            return best[0] <= lower * (1 + _TOLERANCE)
        nodes[0] += 1
        if nodes[0] > budget:
            return True
        tried = set()
        for rank in range(world_size):
            if loads[rank] in tried:  # a rank with the same load leads to the same sub-problem
                continue
            tried.add(loads[rank])
            if loads[rank] + values[index] >= best[0] * (1 - _TOLERANCE):
                continue
            loads[rank] += values[index]
            choice[index] = rank
            stop = search(index + 1)
            loads[rank] -= values[index]
            if stop:
                return True
        return False

    search(0)
    return best[1], nodes[0] <= budget or best[0] <= lower * (1 + _TOLERANCE)


def assign_blocks(costs: dict[str, float], world_size: int, method: str = 'auto',
                  node_budget: int = _NODE_BUDGET) -> Assignment:
    """Partition blocks over ``world_size`` ranks minimising the busiest rank's load; warns when ranks will idle.

    Args:
        costs: ``{path: cost}`` (any non-negative numbers).
        world_size: Number of ranks.
        method: ``'auto'`` (exact up to :data:`EXACT_MAX_BLOCKS` blocks, else LPT), ``'exact'`` (branch and
            bound within a node budget, falling back to the best partition found) or ``'lpt'``.
        node_budget: Search nodes the exact search may visit (it counts nodes, not seconds, so every rank
            stops at the same point); when they run out, the best partition found so far is returned with
            ``optimal=False`` unless it reaches the lower bound.

    Returns:
        An :class:`Assignment`; each rank's blocks are listed most expensive first.

    Example:
        >>> assign_blocks({'a': 5, 'b': 4, 'c': 3, 'd': 3, 'e': 3}, 2).ranks
        [['a', 'b'], ['c', 'd', 'e']]
        >>> assign_blocks({'a': 5, 'b': 4, 'c': 3, 'd': 3, 'e': 3}, 2, method='lpt').ranks
        [['a', 'd'], ['b', 'c', 'e']]
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f'world_size={world_size!r} is invalid. Fix: use a positive int.')
    if method not in PARTITION_METHODS:
        raise ValueError(f'method={method!r} is unknown. Fix: use one of {list(PARTITION_METHODS)}.')
    if isinstance(node_budget, bool) or not isinstance(node_budget, int) or node_budget < 1:
        raise ValueError(f'node_budget={node_budget!r} is invalid. Fix: use a positive int (search nodes; the default '
                         f'{_NODE_BUDGET} takes a fraction of a second).')
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
    ordered = sorted(order, key=lambda p: (-costs[p], order.index(p)))
    values = [float(costs[p]) for p in ordered]
    choice = _lpt(values, world_size)
    loads = [0.0] * world_size
    for value, rank in zip(values, choice):
        loads[rank] += value
    used, optimal = 'lpt', max(loads) <= max(max(values), sum(values) / world_size) * (1 + _TOLERANCE)
    if method == 'exact' or (method == 'auto' and len(values) <= EXACT_MAX_BLOCKS):
        choice, optimal = _exact(values, world_size, choice, node_budget)
        used = 'exact'
    ranks: list[list[str]] = [[] for _ in range(world_size)]
    loads = [0.0] * world_size
    for path, value, rank in zip(ordered, values, choice):
        ranks[rank].append(path)
        loads[rank] += value
    return Assignment(ranks=ranks, loads=loads, costs={p: float(c) for p, c in costs.items()}, method=used,
                      optimal=optimal)

