"""Open a Streaming ``StreamingDataset`` safely when several jobs share a machine.

Streaming picks a free machine-wide shared-memory prefix (``/000123_locals``) by looking, then creating: two jobs
that open a dataset at the same moment can pick the same one, and the later creation fails with
``FileExistsError`` (or, for a job's other ranks, "shared memory prefix ... was not registered by local leader").
:func:`open_streaming_dataset` makes each node's local leader hold a machine-wide file lock while it opens the
dataset, so our jobs take prefixes one after another; a collision with a job that does not take the lock (another
library's ``StreamingDataset``) is retried where that is safe (one rank per machine). Every place that opens a
``StreamingDataset`` for training or evaluation goes through it.
"""

from __future__ import annotations

import contextlib
import copy
import tempfile
import time
from pathlib import Path
from typing import Any

from composer_ext.storage import file_lock

__all__ = ['PREFIX_LOCK', 'open_streaming_dataset']

# One lock per machine, like the shared memory it guards (/tmp and /dev/shm belong to the same machine).
PREFIX_LOCK = Path(tempfile.gettempdir()) / 'composer_ext-streaming-prefix.lock'


def _local_ranks() -> tuple[bool, int]:
    """(is this process its node's local leader, how many ranks share this node)."""
    from streaming.base.world import World  # streaming: heavy, imported by the modules that read data only

    world = World.detect()
    return world.is_local_leader, world.ranks_per_node


def open_streaming_dataset(attempts: int = 4, **kwargs: Any):
    """``StreamingDataset(**kwargs)``, opened without racing other jobs on the machine for a shared-memory prefix.

    Args:
        attempts: How many times a single-rank job tries when a job outside the lock took the same prefix (>= 1).
            A multi-rank job cannot retry (its other ranks already looked the prefix up), so it raises at once.
        **kwargs: ``StreamingDataset`` arguments, passed unchanged.

    Raises:
        FileExistsError: when every attempt collided.
    """
    from streaming import StreamingDataset  # streaming: heavy, imported by the modules that read data only

    if not isinstance(attempts, int) or isinstance(attempts, bool) or attempts < 1:
        raise ValueError(f'attempts={attempts!r} is invalid. Fix: use an int >= 1.')
    leader, ranks_per_node = _local_ranks()
    tries = attempts if ranks_per_node == 1 else 1
    # Only the local leader creates the prefix; the other ranks must not wait for the lock (the leader holding it
    # waits for them at Streaming's barriers).
    streams = kwargs.get('streams')
    with file_lock(PREFIX_LOCK) if leader else contextlib.nullcontext():
        for attempt in range(tries):
            if streams is not None:
                # StreamingDataset writes the weights onto the Stream objects it is given (all three of proportion,
                # repeat and choose), and refuses streams that carry more than one: every attempt gets fresh copies.
                kwargs['streams'] = [copy.deepcopy(stream) for stream in streams]
            try:
                return StreamingDataset(**kwargs)
            except FileExistsError:
                if attempt == tries - 1:
                    raise
                time.sleep(0.1 * (attempt + 1))  # let the other job finish registering its prefix
    raise AssertionError('unreachable')
