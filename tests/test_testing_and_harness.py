"""The 2-process gloo helper and the benchmark harness."""

import sys

import pytest
import torch

from composer_ext.testing import DistributedTestError, run_distributed
from tests.conftest import ROOT


def _rank_and_sum(offset):
    from composer.utils import dist
    value = torch.tensor([dist.get_global_rank() + offset], dtype=torch.float)
    dist.all_reduce(value)
    return dist.get_global_rank(), dist.get_world_size(), float(value)


def _fails_on_rank_one():
    from composer.utils import dist
    if dist.get_global_rank() == 1:
        raise RuntimeError('boom on rank one')
    return 'ok'


@pytest.mark.distributed
def test_run_distributed_returns_results_in_rank_order():
    assert run_distributed(_rank_and_sum, world_size=2, args=(10,)) == [(0, 2, 21.0), (1, 2, 21.0)]


@pytest.mark.distributed
def test_run_distributed_reports_the_failing_rank():
    with pytest.raises(DistributedTestError, match=r'(?s)rank 1 of 2 failed.*boom on rank one'):
        run_distributed(_fails_on_rank_one, world_size=2, timeout=300)


def test_harness_interleaves_and_computes_ratios():
    sys.path.insert(0, str(ROOT / 'benchmarks'))
    from harness import compare, time_variants

    order = []
    results = time_variants({'a': lambda: order.append('a'), 'b': lambda: order.append('b')}, repeats=3, warmup=1)
    assert order == ['a', 'b', 'a', 'b', 'b', 'a', 'a', 'b']  # warmup, then forward/reversed/forward
    assert set(results['a']) == {'min', 'median', 'times', 'cpu_min', 'cpu_median', 'cpu_times'}
    assert len(results['a']['times']) == len(results['a']['cpu_times']) == 3

    import time
    out = compare(lambda: time.sleep(0.002), lambda: time.sleep(0.02), repeats=3, warmup=0)
    assert out['ratio']['min'] > 3 and out['ratio']['median'] > 3
    # the CPU clock: sleeping costs no CPU time, spinning does
    from harness import ratio

    def spin(seconds):  # burns `seconds` of this process's CPU time, however loaded the machine is
        end = time.process_time() + seconds
        while time.process_time() < end:
            pass

    # process time counts every thread of this process: threads left running by earlier tests add the same
    # noise to both variants, so the assertion is on the difference, not on an absolute bound for 'sleep'
    # (measured: such threads took 35% of a core in a CI run, so the sleeping variant showed 0.035 CPU-s per 0.1 s)
    timed = time_variants({'sleep': lambda: time.sleep(0.2), 'spin': lambda: spin(0.2)}, repeats=3, warmup=0)
    assert timed['spin']['cpu_median'] >= 0.2
    assert timed['spin']['cpu_median'] - timed['sleep']['cpu_median'] > 0.06
    assert ratio(timed, 'spin', 'sleep', clock='cpu')['median'] > 1.4
    with pytest.raises(ValueError, match="clock='gpu'"):
        ratio(timed, 'spin', 'sleep', clock='gpu')
    with pytest.raises(ValueError, match='variants is empty'):
        time_variants({})
