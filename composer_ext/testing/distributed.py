"""Run a function on N gloo processes with Composer's ``dist`` initialised, and collect per-rank results.

This is how tests check what must agree across ranks (the same teacher per step, disjoint data shards,
reduced metrics) without a cluster::

    def body(value):                     # a module-level function (it is pickled into each process)
        from composer.utils import dist
        return dist.all_reduce_sum(value) # any picklable result

    results = run_distributed(body, world_size=2, args=(1,))   # [result of rank 0, result of rank 1]

The processes get the standard ``torch.distributed`` environment (``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``/``MASTER_PORT``...), exactly as Composer's launcher sets it, plus the caller's environment
variables, working directory and ``sys.path`` at the time of the call. They are started with ``forkserver``
(default) or ``spawn``: a fork server imports torch and Composer once per session and forks every rank from
that clean process (never from the caller, whose OpenMP threads must not be forked), so a 2-rank test starts
in a second or two instead of re-importing everything in each rank.
"""

from __future__ import annotations

import importlib
import os
import queue as queue_module
import socket
import sys
import traceback
from typing import Any, Callable, Optional, Sequence

__all__ = ['DistributedTestError', 'run_distributed']


class DistributedTestError(AssertionError):
    """A rank raised (its traceback is in the message), or the processes did not finish in time."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


# What the fork server imports once, so that its ranks start without importing them again.
_PRELOAD = ['torch', 'torch.distributed', 'composer', 'composer.utils.dist', 'composer_ext']


def _resolve(reference: tuple[str, str]) -> Callable:
    module, qualname = reference
    target: Any = importlib.import_module(module)
    for part in qualname.split('.'):
        target = getattr(target, part)
    return target


def _worker(rank: int, world_size: int, port: int, fn: Any, args: Sequence, kwargs: dict, env: dict,
            threads: int, results, caller: Optional[dict] = None) -> None:
    if caller is not None:
        # A forked rank starts from the fork server's state: take the caller's environment, directory and path.
        os.environ.clear()
        os.environ.update(caller['environ'])
        os.chdir(caller['cwd'])
        sys.path[:] = caller['sys_path']
    os.environ.update(env)
    os.environ.update({
        'RANK': str(rank), 'LOCAL_RANK': str(rank), 'WORLD_SIZE': str(world_size),
        'LOCAL_WORLD_SIZE': str(world_size), 'NODE_RANK': '0', 'MASTER_ADDR': '127.0.0.1', 'MASTER_PORT': str(port),
    })
    try:
        import torch
        torch.set_num_threads(threads)
        from composer.utils import dist
        # Collectives wait up to 10 minutes: on a loaded 2-core machine one rank can lag the other by minutes.
        dist.initialize_dist('cpu', timeout=600)
        if isinstance(fn, tuple):
            fn = _resolve(fn)
        value = fn(*args, **kwargs)
        results.put((rank, True, value))
    except BaseException:  # report every failure, including SystemExit, to the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        import torch.distributed
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def run_distributed(fn: Callable, world_size: int = 2, args: Sequence = (), kwargs: Optional[dict] = None,
                    timeout: float = 800.0, env: Optional[dict] = None, threads_per_rank: int = 1,
                    start_method: str = 'forkserver') -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` gloo ranks; return the ranks' return values in rank order.

    Args:
        fn: A picklable (module-level) function; it runs after ``composer.utils.dist.initialize_dist('cpu')``.
        world_size: Number of processes.
        args, kwargs: Passed to ``fn`` on every rank (picklable).
        timeout: Seconds to wait for all ranks (800 by default: 7 s of work can take minutes on a loaded
            2-core machine; below the 900 s pytest timeout so the ranks' own error is what gets reported).
        env: Extra environment variables for the processes.
        threads_per_rank: ``torch`` intra-op threads per process (1 avoids oversubscribing small machines).
        start_method: ``'forkserver'`` (default; fast, see the module docstring) or ``'spawn'`` (a fresh
            interpreter per rank).

    Raises:
        DistributedTestError: with the failing rank's traceback, or on timeout.
    """
    import torch.multiprocessing as mp

    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f'world_size={world_size!r} is invalid. Fix: use a positive int.')
    if start_method not in ('forkserver', 'spawn'):
        raise ValueError(f"start_method={start_method!r} is invalid. Fix: use 'forkserver' (default) or 'spawn'.")
    context = mp.get_context(start_method)
    caller = None
    if start_method == 'forkserver':
        context.set_forkserver_preload(_PRELOAD)
        caller = {'environ': dict(os.environ), 'cwd': os.getcwd(), 'sys_path': list(sys.path)}
        # The function travels by name and is imported after the caller's sys.path is in place (the fork server's
        # path is the one of its start).
        if getattr(fn, '__module__', None) and '<' not in getattr(fn, '__qualname__', '<'):
            fn = (fn.__module__, fn.__qualname__)
    results = context.Queue()
    port = _free_port()
    processes = [
        context.Process(target=_worker, args=(rank, world_size, port, fn, tuple(args), dict(kwargs or {}),
                                              dict(env or {}), threads_per_rank, results, caller), daemon=False)
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    outcomes: dict[int, tuple[bool, Any]] = {}
    try:
        while len(outcomes) < world_size:
            try:
                rank, ok, value = results.get(timeout=timeout)
            except queue_module.Empty:
                raise DistributedTestError(f'{world_size - len(outcomes)} rank(s) did not finish within {timeout}s '
                                           f'(finished: {sorted(outcomes)}).') from None
            outcomes[rank] = (ok, value)
            if not ok:
                break  # the others may now hang in a collective; stop them below
    finally:
        for process in processes:
            process.join(timeout=10 if len(outcomes) == world_size else 1)
            if process.is_alive():
                process.kill()
                process.join()
    failed = {rank: value for rank, (ok, value) in outcomes.items() if not ok}
    if failed:
        rank = min(failed)
        raise DistributedTestError(f'rank {rank} of {world_size} failed:\n{failed[rank]}')
    return [outcomes[rank][1] for rank in range(world_size)]
