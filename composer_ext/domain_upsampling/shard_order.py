"""Reading a Streaming domain in Streaming's own shard-local order: the order, the cache check, the shard fetcher.

:class:`~composer_ext.domain_upsampling.mixture.MixtureDataset` decides which domain serves each global position;
this module decides which sample of a Streaming domain its ``k``-th draw reads, and gets that sample's shard in
time. The ``k``-th draw of a pass reads entry ``k`` of the pass's order from Streaming's own shuffle
(``streaming.base.shuffle.get_shuffle`` with the dataset's ``shuffle_algo``, ``py1e`` by default, and
``shuffle_block_size``), so consecutive draws of a domain stay inside a window of a few shards, and every shard is
fetched about once per pass (instead of once per draw, as a random permutation over the whole domain does).

Per node: with ``N`` physical nodes (``world_size / local_world_size``; the node of global rank ``r`` is
``r // local_world_size``, Streaming's ``World`` rule), each node reads its own part of every pass's order, split
as Streaming splits a shuffled epoch (``streaming.base.partition.orig`` and the shuffles' ``divide_spans``): canonical
node ``c`` of ``C`` holds entries ``[c * S // C, (c + 1) * S // C)`` of the order (``S`` samples), the shuffle keeps
each canonical node's samples inside its own shards, and physical node ``n`` holds canonical nodes ``n, n + N,
n + 2N, ...``. A node's part (:func:`node_spans`, :attr:`ShardOrder.part_size`, :meth:`ShardOrder.part`) is
those whole spans, concatenated in canonical-node order, so the nodes' parts are disjoint, cover the order once,
and touch disjoint shards except a shard that the shuffle cut at a canonical-node boundary (at most one per
boundary; Streaming shares it the same way). Draws are counted per node: draw ``k`` of node ``n`` reads entry
``k % part_size`` of node ``n``'s part of pass ``k // part_size``. ``C`` must be a multiple of ``N`` (an unset
``num_canonical_nodes`` counts as ``N``, so one node reads the whole order exactly as before); Streaming's other case,
fewer canonical than physical nodes, stripes single samples of one canonical node over several nodes (each of
them then downloads all its shards) and is refused. Parts differ in size by at most ``C / N`` samples (the spans by
one); Streaming pads a short span by repeating its last sample, here each node's pass is its own part exactly
(no sample lost or repeated within a node's pass), so a node with a shorter part starts its next pass a few draws
earlier. The cache check and the prefetch work on what one node reads: its draws in flight (its ranks' DataLoader
workers) and the shards of its own part.

Fetching goes through Streaming's own ``prepare_shard`` (its download, eviction, cache accounting and shared shard
states), with two additions: a thread per reading process fetches the shards of its upcoming draws ahead (the
plan is pure, so the draws are known), and every wait is bounded. Streaming's wait on a shard that another process
is preparing has no timeout, so a process that died mid-download (a DataLoader pass dropped while its workers were
downloading) would hang the next pass. Here each download records its process id in shared memory: a shard left
``PREPARING`` by a dead process is reset and fetched again, and a shard that is not ready after ``timeout`` seconds
raises :class:`ShardTimeoutError`.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
import zlib
from collections import deque
from typing import Any, Optional

import numpy as np
import torch
from filelock import FileLock  # Streaming's own cache lock type
from streaming import StreamingDataset
from streaming.base.shuffle import get_shuffle

__all__ = ['ShardFetcher', 'ShardOrder', 'ShardTimeoutError', 'node_spans', 'streaming_dataset_of']

TICK = 0.002  # seconds between looks at a shard's state
# The longest the fetcher sleeps with its prefetch full before it looks again by itself (it is woken as soon as the
# reader passes its oldest fetched read; this only bounds the cost of a wake-up missed by a bug).
IDLE_WAIT = 1.0
_NEVER = sys.maxsize
_REMOTE, _PREPARING, _LOCAL = 1, 2, 3  # streaming.base.dataset._ShardState (0 is INVALID)
_EXTENT = {'py1e': 1.25, 'py1s': 2.0, 'py1b': 2.0, 'py1br': 2.0, 'py2s': 2.0}  # window / shuffle_block_size


class ShardTimeoutError(TimeoutError):
    """A shard of a Streaming domain did not become ready in time (raised instead of waiting forever)."""


def streaming_dataset_of(dataset: Any) -> Optional[StreamingDataset]:
    """The ``StreamingDataset`` a domain reads (itself, or the one a wrapper such as ``DomainTokens`` holds)."""
    if isinstance(dataset, StreamingDataset):
        return dataset
    inner = getattr(dataset, 'dataset', None)
    return inner if isinstance(inner, StreamingDataset) else None


def _default_block(canonical_nodes: int) -> int:
    return max(4_000_000 // canonical_nodes, 1 << 18)  # StreamingDataset._set_shuffle_block_size's rule


def node_spans(num_samples: int, canonical_nodes: int, node: int, num_nodes: int) -> list[tuple[int, int]]:
    """The ``(begin, end)`` spans of a pass's order that physical node ``node`` of ``num_nodes`` reads.

    Canonical node ``c`` holds ``[c * num_samples // canonical_nodes, (c + 1) * num_samples // canonical_nodes)``
    (Streaming's ``get_partitions_orig`` rows and its shuffles' ``divide_spans``), and physical node ``node`` holds
    canonical nodes ``node, node + num_nodes, ...`` (``get_partitions_orig`` with ``canonical_nodes`` a multiple of
    ``num_nodes``).

    Example:
        >>> node_spans(10, 4, 1, 2)
        [(2, 5), (7, 10)]
        >>> node_spans(10, 4, 0, 1)
        [(0, 2), (2, 5), (5, 7), (7, 10)]
    """
    for name, value, low in (('num_samples', num_samples, 0), ('canonical_nodes', canonical_nodes, 1),
                             ('num_nodes', num_nodes, 1), ('node', node, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f'{name}={value!r} is invalid. Fix: use an int >= {low}.')
    if node >= num_nodes:
        raise ValueError(f'node={node!r} is not below num_nodes={num_nodes!r}. Fix: use 0 <= node < num_nodes.')
    if canonical_nodes % num_nodes:
        raise ValueError(f'canonical_nodes={canonical_nodes!r} is not a multiple of num_nodes={num_nodes!r}. Fix: '
                         f'use a multiple of the number of physical nodes.')
    return [(c * num_samples // canonical_nodes, (c + 1) * num_samples // canonical_nodes)
            for c in range(node, canonical_nodes, num_nodes)]


class ShardOrder:
    """One Streaming domain's order of reading on one node: draw ``k`` of pass ``p`` -> sample index, shard-local.

    :meth:`order` is the whole pass (Streaming's shuffle of that epoch); :meth:`part` is the node's own part of
    it (``part_size`` entries, the canonical-node spans of :func:`node_spans`), which the node's draws read. On one
    node the part is the whole order.

    Args:
        dataset: The domain's ``StreamingDataset`` (its ``shuffle_algo``, ``shuffle_block_size``,
            ``num_canonical_nodes`` and ``cache_limit`` are used).
        name: The domain's name (for messages, and salted into the seed).
        seed: The mixture's seed.
        shuffle: Shuffle shard-locally (else read in index order, shard after shard).
        in_flight: Draws of this domain read at the same time by all readers of this node (their spread).
        prefetch: Shards fetched ahead of the shard being read.
        node: This physical node (global rank // local world size).
        num_nodes: Physical nodes of the run (world size / local world size).

    Raises:
        ValueError: the dataset's ``cache_limit`` cannot hold the shuffle window, the draws in flight and the
            shards fetched ahead; or its ``num_canonical_nodes`` is not a multiple of ``num_nodes``; or a node's
            part would be empty (fewer samples than canonical nodes).
    """

    def __init__(self, dataset: StreamingDataset, name: str, seed: int, shuffle: bool, in_flight: int,
                 prefetch: int, node: int = 0, num_nodes: int = 1):
        self.dataset, self.name, self.shuffle, self.prefetch = dataset, name, bool(shuffle), int(prefetch)
        self.shard_sizes = np.asarray(dataset.samples_per_shard, dtype=np.int64)
        self.shard_offsets = np.asarray(dataset.sample_offset_per_shard, dtype=np.int64)
        self.algo = dataset.shuffle_algo
        self.node, self.num_nodes = int(node), int(num_nodes)
        # Unset: one canonical node per physical node, so that one node keeps the order it always had (Streaming's
        # own default, 64 per node for the py1* shuffles, would change it).
        self.canonical_nodes = int(dataset.num_canonical_nodes or self.num_nodes)
        if self.canonical_nodes % self.num_nodes:
            raise ValueError(
                f'domains[{name!r}] has num_canonical_nodes={self.canonical_nodes}, which is not a multiple of the '
                f'{self.num_nodes} physical nodes of this run (world_size / local_world_size), so its canonical '
                f'nodes cannot be split whole over the nodes: nodes would share (and each download) the same shards. '
                f'Fix: set num_canonical_nodes (the StreamingDataset argument) to a multiple of {self.num_nodes}, '
                f'e.g. {self.num_nodes} or {64 * self.num_nodes}, or leave it unset ({self.num_nodes}).')
        total = int(self.shard_sizes.sum())
        self.spans = node_spans(total, self.canonical_nodes, self.node, self.num_nodes)
        self.part_size = sum(end - begin for begin, end in self.spans)
        if self.part_size == 0:
            raise ValueError(f'domains[{name!r}] has {total} samples, too few for num_canonical_nodes='
                             f'{self.canonical_nodes}: node {self.node} of {self.num_nodes} would read none. Fix: '
                             f'lower num_canonical_nodes (a multiple of {self.num_nodes}) or add data.')
        self.seed = int((int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (1 << 31))
        self.cache_limit = dataset.cache_limit or None
        # A typical shard (the median: the last shard of a stream is usually a short one).
        self.typical_samples = typical = max(1, int(np.median(self.shard_sizes)))
        self.max_shard_samples = int(self.shard_sizes.max())
        self.block = dataset.shuffle_block_size
        if self.block is None:
            self.block = _default_block(self.canonical_nodes)
            if self.cache_limit and self.shuffle and self.algo in _EXTENT:
                # Left to us: a window that uses half of the shards the cache holds, so that the draws in flight
                # and the shards fetched ahead (and more DataLoader workers) fit in the other half.
                budget = self.cache_shards() // 2
                self.block = min(self.block, max(math.ceil(self.max_shard_samples / 0.75) + 1,
                                                 int(budget * typical / _EXTENT[self.algo])))
        self.block = int(self.block)
        self._order: Optional[tuple[int, np.ndarray]] = None
        self._part: Optional[tuple[int, np.ndarray]] = None
        self.check(in_flight)

    def cache_shards(self) -> int:
        """Shards of the largest size the cache holds (next to the index); a large number without a limit."""
        if not self.cache_limit:
            return 1 << 62
        largest = max(int(shard.get_max_size()) for shard in self.dataset.shards)
        index = sum(int(stream.get_index_size()) for stream in self.dataset.streams)
        return max(0, (int(self.cache_limit) - index) // largest)

    def needed_shards(self, in_flight: int) -> int:
        """Shards that must be in this node's cache together: the shuffle window, the draws in flight on this node,
        those fetched ahead (a node reads its own part, whose window is the same as that of the whole order)."""
        if not self.shuffle:
            window = 0.0
        elif self.algo in _EXTENT:
            window = _EXTENT[self.algo] * self.block
        else:  # 'naive' shuffles the whole domain: every shard may be needed at once
            return len(self.shard_sizes)
        return min(len(self.shard_sizes), math.ceil((window + in_flight) / self.typical_samples) + 1 + self.prefetch)

    def check(self, in_flight: int) -> None:
        """``ValueError`` unless the cache holds :meth:`needed_shards` for ``in_flight`` draws in flight."""
        if not self.cache_limit:
            return
        held, needed = self.cache_shards(), self.needed_shards(in_flight)
        if needed > held:
            largest = max(int(shard.get_max_size()) for shard in self.dataset.shards)
            index = sum(int(stream.get_index_size()) for stream in self.dataset.streams)
            raise ValueError(
                f'domains[{self.name!r}] has cache_limit={self.cache_limit} bytes, which holds {held} of its shards '
                f'(up to {largest} bytes each), but reading it in shard order needs {needed} at once: the shuffle '
                f'window (shuffle_algo={self.algo!r}, shuffle_block_size={self.block} samples), {in_flight} draws in '
                f"flight over this node's ranks, workers and batches, and prefetch_shards={self.prefetch} fetched "
                f'ahead, so shards would be evicted before they are read. Fix: raise cache_limit to at least '
                f'{needed * largest + index} bytes, or lower shuffle_block_size (the StreamingDataset argument), '
                f'prefetch_shards, the batch size or num_workers.')

    def order(self, pass_index: int) -> np.ndarray:
        """Sample indices of the domain in the order of pass ``pass_index`` (Streaming's shuffle for that epoch)."""
        if self._order is None or self._order[0] != pass_index:
            if self.shuffle:
                order = get_shuffle(self.algo, self.shard_sizes, self.canonical_nodes, self.seed, int(pass_index),
                                    self.block)
            else:
                order = np.arange(int(self.shard_sizes.sum()), dtype=np.int64)
            self._order = (int(pass_index), np.asarray(order, dtype=np.int64))
        return self._order[1]

    def part(self, pass_index: int) -> np.ndarray:
        """This node's part of :meth:`order` (``part_size`` sample indices): its canonical-node spans, in order."""
        if self.num_nodes == 1:
            return self.order(pass_index)
        if self._part is None or self._part[0] != pass_index:
            order = self.order(pass_index)
            self._part = (int(pass_index), np.concatenate([order[begin:end] for begin, end in self.spans]))
        return self._part[1]

    def shard_of(self, indices: np.ndarray) -> np.ndarray:
        """The shard holding each sample index."""
        return np.searchsorted(self.shard_offsets, indices, side='right') - 1

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, '_order': None, '_part': None}  # rebuilt on use; a worker need not receive them


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped) holds its pid but will never finish a download
        with open(f'/proc/{pid}/stat') as stat:
            return stat.read().rsplit(')', 1)[1].split()[0] != 'Z'
    except (OSError, IndexError):
        return True


class ShardFetcher:
    """Gets the shards of one reading process's upcoming draws ready: ahead of use, and with bounded waits.

    The reading process tells it its upcoming reads (:meth:`extend`), then calls :meth:`ready` before each read.
    A daemon thread fetches, in order of first need, the shards of upcoming reads, at most ``prefetch`` shards per
    domain ahead of the reads so far; :meth:`ready` waits for a shard to be local, fetches it itself if nobody
    is, resets a shard left ``PREPARING`` by a process that died, and raises :class:`ShardTimeoutError` when a
    shard is not ready within ``timeout`` seconds.

    Args:
        orders: Domain index -> its :class:`ShardOrder`.
        owners: Domain index -> shared int64 tensor (one per shard): the process id preparing the shard, or 0.
        timeout: Seconds a shard may take to become ready.
    """

    def __init__(self, orders: dict[int, ShardOrder], owners: dict[int, torch.Tensor], timeout: float):
        self.orders, self.owners, self.timeout = orders, owners, float(timeout)
        self.pid = os.getpid()
        self._needs: deque = deque()  # (read index, domain, shard) in order of first need
        # Per domain, the shards queued lately (a bounded, insertion-ordered set): a shard is queued at its first
        # need, and again only once it has dropped out of the window.
        self._seen: dict[int, dict[int, None]] = {d: {} for d in orders}
        self._recent = {d: 2 * order.needed_shards(0) + 8 for d, order in orders.items()}
        self._reads = 0  # reads queued
        self._position = 0  # reads done
        self._error: Optional[BaseException] = None
        self._stop = threading.Event()
        self._more = threading.Event()
        # The fetcher waits on `_advanced` while its prefetch is full; the reader sets it once its position reaches
        # `_wake_at`. A reader that stops (an iterator kept but not advanced) then costs no CPU, where polling every
        # TICK woke the thread 500 times a second.
        self._advanced = threading.Event()
        self._wake_at = _NEVER
        self._thread = threading.Thread(target=self._run, name='mixture-shard-prefetch', daemon=True)
        self._thread.start()

    # -- the reading process --

    def extend(self, domains: np.ndarray, shards: np.ndarray) -> None:
        """Queue the next reads: their domains and shards (-1 for a read that needs no shard)."""
        needs = []
        for offset, (d, s) in enumerate(zip(domains.tolist(), shards.tolist())):
            if s < 0:
                continue
            seen = self._seen[d]
            if s in seen:
                continue
            seen[s] = None
            if len(seen) > self._recent[d]:
                del seen[next(iter(seen))]
            needs.append((self._reads + offset, d, s))
        self._reads += len(domains)
        self._needs.extend(needs)
        self._more.set()

    def ready(self, domain: int, shard: int) -> None:
        """Return once ``shard`` of ``domain`` is local; count one read."""
        self._advance()
        states = self.orders[domain].dataset._shard_states
        if states[shard] == _LOCAL:
            return
        self._wait(domain, shard)

    def skip(self) -> None:
        """Count one read that needs no shard (a map-style domain)."""
        self._advance()

    def close(self) -> None:
        self._stop.set()
        self._more.set()
        self._advanced.set()

    def _advance(self) -> None:
        """Count one read, waking the fetcher if it sleeps until this position."""
        self._position += 1
        if self._position >= self._wake_at:
            self._wake_at = _NEVER
            self._advanced.set()

    # -- fetching --

    def _lock(self, dataset: StreamingDataset):
        if not hasattr(dataset, '_cache_filelock'):
            dataset._cache_filelock = FileLock(dataset._cache_filelock_path)
        return dataset._cache_filelock

    def _prepare(self, domain: int, shard: int) -> None:
        """Fetch ``shard`` through Streaming's ``prepare_shard`` unless another process is on it."""
        dataset, owners = self.orders[domain].dataset, self.owners[domain]
        if dataset._shard_states[shard] == _PREPARING:
            return
        owners[shard] = self.pid
        try:
            dataset.prepare_shard(shard, blocking=False)
        except BaseException as error:  # leave no shard PREPARING behind a failed download
            self._reset(domain, shard, only_if_owner=self.pid)
            self._error = error
            raise
        finally:
            if int(owners[shard]) == self.pid:
                owners[shard] = 0

    def _reset(self, domain: int, shard: int, only_if_owner: Optional[int] = None) -> bool:
        """Put a shard stuck in ``PREPARING`` back to remote (removing partial files); True if it did."""
        dataset, owners = self.orders[domain].dataset, self.owners[domain]
        with self._lock(dataset):
            if dataset._shard_states[shard] != _PREPARING:
                return False
            if only_if_owner is not None and int(owners[shard]) not in (only_if_owner, 0):
                return False
            stream = dataset.streams[dataset.stream_per_shard[shard]]
            for raw_info, zip_info in dataset.shards[shard].file_pairs:
                for info in (raw_info, zip_info):
                    if info is not None:
                        for suffix in ('', '.tmp'):
                            path = os.path.join(stream.local, stream.split, info.basename + suffix)
                            if os.path.isfile(path):
                                os.remove(path)
            owners[shard] = 0
            dataset._shard_states[shard] = _REMOTE
        return True

    def _wait(self, domain: int, shard: int) -> None:
        order = self.orders[domain]
        dataset, owners = order.dataset, self.owners[domain]
        deadline = time.monotonic() + self.timeout
        helper: Optional[threading.Thread] = None
        while True:
            if self._error is not None:
                raise RuntimeError(f'fetching a shard of domain {order.name!r} failed: {self._error}') from self._error
            state = dataset._shard_states[shard]
            if state == _LOCAL:
                return
            if state == _REMOTE and (helper is None or not helper.is_alive()):
                # Nobody is fetching it (not fetched ahead yet, or evicted since): fetch it in a thread, so that
                # this wait stays bounded even if the download never returns.
                helper = threading.Thread(target=self._prepare_quietly, args=(domain, shard), daemon=True)
                helper.start()
            elif state == _PREPARING:
                owner = int(owners[shard])
                if owner and owner != self.pid and not _alive(owner):
                    self._reset(domain, shard, only_if_owner=owner)  # its downloader died: fetch it again
                    continue
            if time.monotonic() > deadline:
                basename = dataset.shards[shard].file_pairs[0][0].basename
                raise ShardTimeoutError(
                    f'shard {shard} ({basename}) of domain {order.name!r} did not become ready within '
                    f'shard_timeout={self.timeout:g} s (its state: {["invalid", "remote", "preparing", "local"][int(state)]}). '
                    f'Fix: check that the remote is reachable and holds the shard; on a slow remote raise '
                    f'shard_timeout (MixtureDataset argument).')
            time.sleep(TICK)

    def _prepare_quietly(self, domain: int, shard: int) -> None:
        try:
            self._prepare(domain, shard)
        except BaseException:  # recorded in self._error; the waiting read raises it
            pass

    def _run(self) -> None:
        ahead: dict[int, deque] = {d: deque() for d in self.orders}
        while not self._stop.is_set():
            if not self._needs:
                self._more.wait(0.05)
                self._more.clear()
                continue
            position = self._position
            for queue in ahead.values():
                while queue and queue[0] < position:
                    queue.popleft()
            read, domain, shard = self._needs[0]
            if read < position:
                # The reader got to this shard first (ready() fetched it if it had to). Fetching it now could bring
                # back a shard that was read to its end and evicted since: a download nobody needs, which evicts one
                # that is needed (seen as 1.2-1.7x the shards of a pass with 2 fast DataLoader workers).
                self._needs.popleft()
                continue
            if len(ahead[domain]) >= self.orders[domain].prefetch:
                # Sleep until the reader passes the oldest read fetched ahead for this domain (its slot frees then).
                # The order matters: announce, then look at the position again, so a read in between is not missed.
                self._advanced.clear()
                self._wake_at = ahead[domain][0] + 1
                if self._position < self._wake_at:
                    self._advanced.wait(IDLE_WAIT)
                self._wake_at = _NEVER
                continue
            self._needs.popleft()
            ahead[domain].append(read)
            dataset = self.orders[domain].dataset
            if dataset._shard_states[shard] != _REMOTE:
                continue
            try:
                self._prepare(domain, shard)
            except BaseException:  # recorded in self._error; the next read that waits raises it
                return
