"""Exact magnitude ranking over sharded weights: a distributed k-th value, without gathering any whole tensor.

The ranking that :func:`composer_ext.fairness.magnitude_pruning.compute_masks` needs is "the longest prefix of the
scores sorted ascending, ties broken by position, whose total size fits a budget" (a size is 1 for a single weight,
the number of weights for a filter). Under FSDP2 each rank holds only some rows of every layer, so no rank can
sort. This module finds the same prefix from the shards:

1. Every float32 score becomes an integer key with the same order (:func:`order_keys`).
2. Bisection on the key range: each step ``all_reduce`` s one number per group, the total size of the scores whose
   key is at most the midpoint; 32 steps end at the key ``v`` of the first score that does not fit. Exact: it is an
   integer search, no float threshold is ever compared.
3. Everything below ``v`` is selected. The ties at ``v`` are taken in global position order - layer by layer, and
   inside a layer rank by rank (``Shard(0)`` gives rank ``r`` the rows after those of rank ``r - 1``), then by
   local position - until the budget is spent: one ``all_gather`` of the tie sizes per (layer, rank) tells every
   rank how much of the budget the ties before its own have used.

Tie rule (identical in the unsharded ``torch.argsort(stable=True)`` path): equal scores are taken in the order of
their position in the concatenation of the layers' flattened (whole) weights.

Collectives: ``1 + 32 + 1`` per call, each a few numbers per group, whatever the model size.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as torch_dist

__all__ = ['KEY_BITS', 'key_to_value', 'order_keys', 'select_lowest_sharded', 'sharded_kth_value']

KEY_BITS = 32  # float32 scores: a 32-bit key space, so the bisection takes 32 steps


def order_keys(values: torch.Tensor) -> torch.Tensor:
    """int64 keys with the order of the float32 ``values`` (``-0.0`` counts as ``+0.0``, as ``torch.sort`` does).

    Example:
        >>> import torch
        >>> keys = order_keys(torch.tensor([-1.0, 0.0, -0.0, 0.5, float('inf')]))
        >>> [int(k) for k in torch.argsort(keys, stable=True)]
        [0, 1, 2, 3, 4]
        >>> bool(keys[1] == keys[2])
        True
    """
    values = values.detach().float() + 0.0  # -0.0 + 0.0 == +0.0: one key for the two zeros
    bits = values.view(torch.int32).to(torch.int64)
    return torch.where(bits >= 0, bits, -(bits + 2 ** 31) - 1)


def key_to_value(key: int) -> float:
    """The float32 value whose :func:`order_keys` key is ``key``.

    Example:
        >>> key_to_value(int(order_keys(torch.tensor([-2.5]))[0]))
        -2.5
    """
    bits = key if key >= 0 else -key - 1 - 2 ** 31
    return float(torch.tensor([bits], dtype=torch.int32).view(torch.float32)[0])


def _world() -> tuple[int, int]:
    if torch_dist.is_available() and torch_dist.is_initialized():
        return torch_dist.get_rank(), torch_dist.get_world_size()
    return 0, 1


def _all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if _world()[1] > 1:
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
    return tensor


def _all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """``[world_size, *tensor.shape]``: every rank's ``tensor``, in rank order."""
    world_size = _world()[1]
    if world_size == 1:
        return tensor.unsqueeze(0)
    parts = [torch.empty_like(tensor) for _ in range(world_size)]
    torch_dist.all_gather(parts, tensor)
    return torch.stack(parts)


def _first_unfitting_keys(keys, sizes, budget: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor,
                                                                              torch.Tensor]:
    """Per group: whether everything fits, the key of the first sorted score that does not, and the size below it."""
    n_groups = len(keys)

    def fitting(limit: torch.Tensor) -> torch.Tensor:  # per group: total size of the scores with key <= limit[g]
        totals = torch.zeros(n_groups, dtype=torch.float64, device=device)
        for g in range(n_groups):
            for key, size in zip(keys[g], sizes[g]):
                totals[g] += size[key <= limit[g]].sum()
        return _all_reduce_sum(totals).cpu()

    # Invariant: fitting(low) <= budget < fitting(high). Keys lie in [-2**31, 2**31 - 1].
    low = torch.full((n_groups,), -2 ** 31 - 1, dtype=torch.int64)
    high = torch.full((n_groups,), 2 ** 31 - 1, dtype=torch.int64)
    everything = fitting(high) <= budget
    for _ in range(KEY_BITS + 1):
        if bool(((high - low) <= 1).all()):
            break
        middle = torch.div(low + high, 2, rounding_mode='floor')
        fits = fitting(middle) <= budget
        low, high = torch.where(fits, middle, low), torch.where(fits, high, middle)
    return everything, high, fitting(low)


def select_lowest_sharded(groups: Sequence[Sequence[torch.Tensor]], sizes: Sequence[Sequence[torch.Tensor]],
                          budgets: Sequence[float]) -> list[list[torch.Tensor]]:
    """For each group, which local scores are in the lowest prefix (ascending, ties by position) within its budget.

    A collective: every rank calls it with its own shards, the same number of groups and of pieces per group, and
    the same budgets. With one process (or no process group) it is the unsharded selection.

    Args:
        groups: ``groups[g][p]``: this rank's scores (1-d float32) of piece ``p`` (a layer) of group ``g``, in the
            piece's local order; pieces are ordered as in the unsharded concatenation.
        sizes: The same shapes as ``groups``: what each score costs of the budget (float64, positive).
        budgets: Per group, the largest total size to select (a prefix is taken while its total is ``<= budget``).

    Returns:
        ``selected[g][p]``: a bool tensor shaped as ``groups[g][p]``.

    Example:
        >>> import torch
        >>> scores = [[torch.tensor([0.5, 0.1]), torch.tensor([0.1, 0.2, 0.0])]]
        >>> sizes = [[torch.ones(2), torch.ones(3)]]
        >>> [part.tolist() for part in select_lowest_sharded(scores, sizes, [2.0])[0]]
        [[False, True], [False, False, True]]
    """
    rank, world_size = _world()
    if not (len(groups) == len(sizes) == len(budgets)):
        raise ValueError(f'groups, sizes and budgets have lengths {len(groups)}, {len(sizes)}, {len(budgets)}. Fix: '
                         f'pass one entry per group in each.')
    device = next((s.device for pieces in groups for s in pieces), torch.device('cpu'))
    keys = [[order_keys(scores.flatten()) for scores in pieces] for pieces in groups]
    sizes = [[size.flatten().double() for size in pieces] for pieces in sizes]
    budget = torch.tensor([float(b) for b in budgets], dtype=torch.float64)
    everything, first, below = _first_unfitting_keys(keys, sizes, budget, device)
    selected: list[list[torch.Tensor]] = []
    for g in range(len(groups)):
        if bool(everything[g]):  # the same on every rank (reduced totals): no collective is skipped unevenly
            selected.append([torch.ones_like(key, dtype=torch.bool) for key in keys[g]])
            continue
        tie_sizes = torch.tensor([float(size[key == first[g]].sum()) for key, size in zip(keys[g], sizes[g])],
                                 dtype=torch.float64, device=device)
        per_rank = _all_gather(tie_sizes).cpu()  # [world_size, pieces]: the ties' sizes per (rank, piece)
        taken = float(below[g])  # exact integers when sizes are integers, as the unsharded cumulative sum
        limit = float(budget[g])
        stopped = False
        pieces = []
        for p, (key, size) in enumerate(zip(keys[g], sizes[g])):
            chosen = key < first[g]
            tie = key == first[g]
            for r in range(world_size):
                block = float(per_rank[r, p])
                if stopped or block == 0:
                    continue
                if taken + block <= limit:  # every tie of this (piece, rank) fits
                    if r == rank:
                        chosen = chosen | tie
                    taken += block
                    continue
                if r == rank:  # the budget ends inside this rank's ties: the local prefix of them that fits
                    cumulative = taken + torch.cumsum(torch.where(tie, size, torch.zeros_like(size)), 0)
                    chosen = chosen | (tie & (cumulative <= limit))
                stopped = True
            pieces.append(chosen)
        selected.append(pieces)
    return selected


def sharded_kth_value(local_values: torch.Tensor, k: int) -> float:
    """The ``k``-th smallest (1-based, as ``torch.kthvalue``) of the concatenation of every rank's ``local_values``.

    A collective (every rank calls it with its own values; shards may differ in size, or be empty). Exact: the
    bisection of :func:`select_lowest_sharded` with unit sizes and budget ``k - 1`` ends at the key of the ``k``-th
    smallest value; no value is gathered.

    Example:
        >>> import torch
        >>> sharded_kth_value(torch.tensor([3.0, 1.0, 2.0, 1.0]), 3)
        2.0
    """
    values = local_values.detach().float().flatten()
    total = int(_all_reduce_sum(torch.tensor([float(values.numel())], dtype=torch.float64))[0])
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= total:
        raise ValueError(f'k={k!r} is outside [1, {total}] (the number of values on all ranks). Fix: choose k in '
                         f'that range.')
    keys = [[order_keys(values)]]
    _, first, _ = _first_unfitting_keys(keys, [[torch.ones_like(values, dtype=torch.float64)]],
                                        torch.tensor([float(k - 1)], dtype=torch.float64), values.device)
    return key_to_value(int(first[0]))
