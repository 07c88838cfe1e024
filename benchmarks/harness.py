"""Shared benchmark harness: time variants side by side, interleaved, and report min/median and ratios.

Interleaving (A B, B A, A B, ...) puts every variant under the same machine conditions (thermal state,
background load, caches), so a ratio measured in one run is meaningful even on a noisy machine, where
absolute times are not. Every bench prints one JSON object on stdout.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from typing import Callable, Optional

__all__ = ['time_variants', 'compare', 'ratio', 'emit', 'environment']


def environment() -> dict:
    """Where the numbers were measured (so a reader can tell a CPU run from a GPU run)."""
    import torch
    return {
        'python': platform.python_version(),
        'torch': torch.__version__,
        'cpu_threads': torch.get_num_threads(),
        'cuda': torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        'machine': platform.machine(),
    }


def time_variants(variants: dict[str, Callable[[], object]], repeats: int = 5, warmup: int = 1,
                  setup: Optional[Callable[[str], None]] = None) -> dict[str, dict]:
    """Time each zero-argument callable ``repeats`` times, interleaved, after ``warmup`` untimed calls each.

    The order alternates every round (forward, then reversed) so no variant always runs first.
    ``setup(name)``, if given, runs untimed before each timed call.

    Returns:
        ``{name: {'min': s, 'median': s, 'times': [s, ...], 'cpu_min': s, 'cpu_median': s, 'cpu_times': [...]}}``:
        wall seconds, and the process's CPU seconds (``time.process_time``: all its threads). With one torch thread
        and no worker processes the CPU seconds are the wall time of a dedicated core, which other jobs on the
        machine barely move; compare the two to see how much the wall times were disturbed.
    """
    if not variants:
        raise ValueError('variants is empty. Fix: pass at least one name -> callable.')
    if repeats < 1 or warmup < 0:
        raise ValueError(f'repeats={repeats} must be >= 1 and warmup={warmup} >= 0.')
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            if setup:
                setup(name)
            variants[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        for name in (names if round_index % 2 == 0 else names[::-1]):
            if setup:
                setup(name)
            start, start_cpu = time.perf_counter(), time.process_time()
            variants[name]()
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return {name: {'min': min(t), 'median': statistics.median(t), 'times': t, 'cpu_min': min(cpu[name]),
                   'cpu_median': statistics.median(cpu[name]), 'cpu_times': cpu[name]} for name, t in times.items()}


def ratio(results: dict[str, dict], numerator: str, denominator: str, clock: str = 'wall') -> dict[str, float]:
    """``numerator / denominator`` of both the min and the median times (``clock``: ``'wall'`` or ``'cpu'``)."""
    if clock not in ('wall', 'cpu'):
        raise ValueError(f"clock={clock!r} is not 'wall' or 'cpu'. Fix: pass one of them.")
    prefix = '' if clock == 'wall' else 'cpu_'
    return {
        'min': results[numerator][f'{prefix}min'] / results[denominator][f'{prefix}min'],
        'median': results[numerator][f'{prefix}median'] / results[denominator][f'{prefix}median'],
    }


def compare(baseline: Callable[[], object], candidate: Callable[[], object], repeats: int = 5,
            warmup: int = 1) -> dict:
    """Time two variants interleaved; ``ratio`` is candidate time / baseline time (< 1: candidate faster)."""
    results = time_variants({'baseline': baseline, 'candidate': candidate}, repeats=repeats, warmup=warmup)
    return {**results, 'ratio': ratio(results, 'candidate', 'baseline')}


def emit(result: dict, stream=sys.stdout) -> None:
    """Print ``result`` (plus the environment) as one JSON object."""
    print(json.dumps({**result, 'environment': environment()}, indent=2, sort_keys=True, default=float),
          file=stream, flush=True)
