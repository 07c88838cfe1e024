"""Blockwise block-to-rank assignment: the exact search proves optimality only when it finishes within its budget."""

import random
import re

import pytest

from composer_ext.blockwise import assign_blocks

# Hand-checked: the costs total 39 and the subset sums of {9, 9, 7, 7, 7} are 0, 7, 9, 14, 16, 18, 21, 23, 25, 30, 32,
# 39, so no rank can hold 19 or 20: the best makespan is 21 ({9, 9} | {7, 7, 7}), above the lower bound
# max(9, 39 / 2) = 19.5, which the search therefore cannot stop at: only a finished search proves 21 optimal.
# LPT gives 9+7+7 | 9+7 = 23.
UNEVEN = {'a': 9, 'b': 9, 'c': 7, 'd': 7, 'e': 7}


def test_a_finished_exact_search_is_optimal_with_the_hand_checked_makespan():
    lpt = assign_blocks(UNEVEN, 2, method='lpt')
    assert lpt.ranks == [['a', 'c', 'e'], ['b', 'd']] and lpt.makespan == 23.0 and not lpt.optimal
    exact = assign_blocks(UNEVEN, 2)
    assert exact.method == 'exact' and exact.optimal
    assert exact.ranks == [['a', 'b'], ['c', 'd', 'e']] and exact.loads == [18.0, 21.0] and exact.makespan == 21.0


def test_an_exact_search_that_runs_out_of_budget_is_not_optimal():
    seen = [(a.makespan, a.optimal) for a in (assign_blocks(UNEVEN, 2, method='exact', node_budget=budget)
                                              for budget in range(1, 41))]
    assert seen[0] == (23.0, False)  # one node proves nothing: the LPT partition is kept, not claimed optimal
    assert (21.0, False) in seen  # the optimum found, but the budget ran out before the search could prove it
    assert seen[-1] == (21.0, True)  # enough nodes: the search finishes
    proven = [optimal for _, optimal in seen]
    assert proven == sorted(proven)  # once a budget suffices, every larger one does too
    assert all(makespan == 21.0 for makespan, optimal in seen if optimal)
    # 20 blocks of uneven float costs: the default budget cannot finish the search (no partition reaches the lower
    # bound, so only an exhaustive search could prove one optimal). The best partition found is returned: never
    # worse than LPT, never better than the bound, and not claimed optimal.
    rng = random.Random(0)
    costs = {f'b{i}': rng.uniform(1, 10) for i in range(20)}
    for world_size in (2, 3):
        exact, lpt = assign_blocks(costs, world_size), assign_blocks(costs, world_size, method='lpt')
        assert exact.method == 'exact' and not exact.optimal
        lower = max(max(costs.values()), sum(costs.values()) / world_size)
        assert lower < exact.makespan <= lpt.makespan
        assert sorted(p for paths in exact.ranks for p in paths) == sorted(costs)


@pytest.mark.parametrize('node_budget', [0, -5, 2.5, True, '100'])
def test_node_budget_must_be_a_positive_int(node_budget):
    with pytest.raises(ValueError, match=re.escape(f'node_budget={node_budget!r} is invalid. Fix: use a positive int')):
        assign_blocks(UNEVEN, 2, node_budget=node_budget)
