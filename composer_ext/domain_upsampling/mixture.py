"""A dataset that follows a mixture schedule over per-domain datasets, and the DataLoader that reads it.

:class:`MixtureDataset` follows a :class:`~composer_ext.domain_upsampling.schedule.MixtureSchedule` over
per-domain datasets (Streaming ``StreamingDataset`` s over MDS shards, or any map-style dataset). Which domain
serves global sample position ``g`` is decided by the schedule placed on sample positions
(:class:`~composer_ext.domain_upsampling.plan.SamplePlan`), a pure function of ``(seed, g)``. Within a domain,
the ``k``-th draw reads entry ``k`` of the pass's order: for a Streaming domain, Streaming's own shard-local
shuffle of that epoch (:class:`~composer_ext.domain_upsampling.shard_order.ShardOrder`), so that remote shards are
fetched about once per pass and ahead of use; for a map-style domain, a seeded permutation. On several nodes, a
Streaming domain's draws are counted per node and each node reads its own part of the pass's order (whole
canonical-node spans, split over the nodes as Streaming splits an epoch), so the nodes read disjoint samples from
disjoint shards; map-style domains keep one count over all nodes.

Resumption goes through Composer's own dataset-checkpoint path: the Trainer saves
``dataset.state_dict(num_samples, from_beginning)`` with every checkpoint and calls ``load_state_dict`` on
resume, after which the dataset continues at exactly the next sample an uninterrupted run would have served.

Epochs: each pass over the dataset serves the next epoch. The dataset keeps that count itself when it is read in
the main process; DataLoader workers read a copy, so with workers the epoch is set from the main process by
:class:`MixtureDataLoader` (what ``build_mixture_dataloader`` returns), by
:class:`~composer_ext.algorithms.DomainUpsampling`, or by calling :meth:`MixtureDataset.set_epoch`; a worker
that would silently serve the same epoch again raises instead.

Language-model batches: :func:`build_mixture_dataspec` is the one builder of the ``text_mixture`` dataloader of
both front ends (``composer-ext run``: :func:`build_mixture_dataloader`; llm-foundry:
:func:`~composer_ext.domain_upsampling.foundry_loader.build_text_mixture_dataloader`). It tokenizes each domain's
``text`` with the run's tokenizer (:class:`DomainTokens`; a ``tokens`` column is used only when that tokenizer
wrote it, :func:`tokens_written_by`).
"""

from __future__ import annotations

import numbers
import zlib
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from composer.core import DataSpec, Time, TimeUnit
from composer.utils import dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from composer_ext.data.corpus import corpus_domains, ensure_corpus
from composer_ext.data.mds import MDSDataset  # re-exported: the per-domain reader of build_mixture_dataloader
from composer_ext.data.sharding import per_rank_batch_size
from composer_ext.data.text import LMCollator
from composer_ext.domain_upsampling.plan import SAMPLING, SamplePlan
from composer_ext.domain_upsampling.schedule import MixtureSchedule
from composer_ext.domain_upsampling.shard_order import ShardFetcher, ShardOrder, streaming_dataset_of

__all__ = ['PROBE_SAMPLES', 'DomainTokens', 'MDSDataset', 'MixtureDataLoader', 'MixtureDataset',
           'build_mixture_dataloader', 'build_mixture_dataspec', 'count_lm_tokens', 'encode_text', 'tokens_written_by']

_CHUNK = 1 << 14  # global positions assigned per vectorised step
_MAX_ANCHORS = 64
_MAX_WORKERS = 256  # DataLoader workers per dataset whose passes are tracked in shared memory
_SYNC_SLOTS = 4  # shared-memory fields before the per-worker slots: ticket, epoch, start, version
_IN_FLIGHT_BATCHES = 2  # batches per reader read at the same time (a DataLoader worker holds prefetch_factor=2)


# --- the dataset ------------------------------------------------------------------------------------------


def _domain_size(dataset: Any) -> int:
    """Samples in a domain dataset (a StreamingDataset's ``len`` is per rank; its ``num_samples`` is all)."""
    try:
        from streaming import StreamingDataset
        if isinstance(dataset, StreamingDataset):
            return int(dataset.num_samples)
    except ImportError:  # pragma: no cover - streaming is a dependency
        pass
    return len(dataset)


def _world() -> tuple[int, int]:
    return dist.get_global_rank(), dist.get_world_size()


def _local_world_size() -> int:
    """Ranks per node: Composer's LOCAL_WORLD_SIZE; when a process group was set up without it, 1, as Streaming's
    ``World`` reads it."""
    try:
        return int(dist.get_local_world_size())
    except dist.MissingEnvironmentError:
        return 1


class MixtureDataset(IterableDataset):
    """Samples from per-domain datasets in the proportions a :class:`MixtureSchedule` gives over training.

    Global sample position ``g`` (counted over the whole run, across epochs) is served by the domain that
    ``(seed, g)`` picks under the schedule's weights at ``g``; within a domain, the ``k``-th draw of a pass over its
    data reads entry ``k`` of that pass's order, which is redrawn on every pass. Samples are yielded unchanged.

    Streaming domains (a ``StreamingDataset``, or a wrapper holding one as ``.dataset``) are read in Streaming's
    own epoch order: its shard-local shuffle (the dataset's ``shuffle_algo``, ``py1e`` by default, and
    ``shuffle_block_size``), so consecutive draws stay within a window of a few shards and, with a remote and a
    ``cache_limit``, each shard is downloaded about once per pass of the node reading it. Each reading process (the
    main one or a DataLoader worker) fetches the shards of its upcoming draws ahead through Streaming's
    ``prepare_shard`` (``prefetch_shards`` per domain); waits are bounded (``shard_timeout``), and a shard left
    half-downloaded by a process that died (a pass dropped mid-download) is fetched again rather than waited on
    forever. A ``cache_limit`` too small for the shuffle window plus the draws in flight and the prefetch is refused at
    construction (and by :class:`MixtureDataLoader` for its ``num_workers``). When ``shuffle_block_size`` is unset
    and a ``cache_limit`` is set, the window takes half of the shards the cache holds. Map-style domains are read
    in a seeded permutation.

    Distributed: rank ``r`` of ``W`` takes positions ``r, r + W, r + 2W, ...`` of each epoch, so the ranks'
    samples are disjoint. DataLoader workers split a rank's batches round-robin (pass ``batch_size``), keeping the
    order of ``num_workers=0``. Which domain serves each position never depends on the number of nodes.

    Per node (Streaming domains): with ``N = world_size / local_world_size`` physical nodes (rank ``r`` is on node
    ``r // local_world_size``, as Streaming's ``World`` has it), the draws of a Streaming domain are counted per
    node, over the positions of the node's ranks, and draw ``k`` of node ``n`` reads entry ``k % P_n`` of node
    ``n``'s part of pass ``k // P_n`` (``P_n`` samples): its canonical nodes ``n, n + N, ...`` of the pass's order,
    whole, as Streaming partitions an epoch over physical nodes
    (:func:`~composer_ext.domain_upsampling.shard_order.node_spans`). The nodes therefore read disjoint samples from
    disjoint shards (but for a shard cut at a canonical-node boundary) into their own caches, and a node's pass
    reads each sample of its part exactly once. Parts differ by at most ``num_canonical_nodes / N`` samples, so
    the nodes' passes drift apart by that much (Streaming instead repeats a sample of a short part); which
    samples a node reads, and when a domain's pass ends, is per node. A domain's ``num_canonical_nodes`` must be a
    multiple of ``N`` (unset counts as ``N``). On one node the part is the whole order and the counts are global, so
    a global batch holds the same samples on 1 or N processes of one node; on several nodes it does only for
    map-style domains, which keep one global count and permutation.

    Epochs: each pass (``iter(dataset)``) serves the next epoch after a pass that handed out its whole epoch. A
    pass stopped before the end of its epoch is served again from its start, as a DataLoader over a sampler
    would be (Composer then skips the batches it already trained, e.g. on a second ``fit()``), or, after
    :meth:`load_state_dict`, continued after its last sample (Composer does not skip batches after a resume).
    :meth:`set_epoch` overrides the count for the next pass. DataLoader workers read a *copy* of the dataset, so
    they take the epoch from the main process through a small shared-memory block: read the dataset with
    :class:`MixtureDataLoader` (which counts the batches it hands out), attach
    :class:`~composer_ext.algorithms.DomainUpsampling`, or call :meth:`set_epoch` before every epoch. A worker
    asked for a pass that nothing set raises ``ValueError`` rather than repeat the previous epoch.

    Resumption: Composer calls :meth:`state_dict` with every checkpoint and :meth:`load_state_dict` on resume;
    the next pass continues at the following sample. The state holds the per-domain draws over all nodes
    (``draws``) and per node (``node_draws``, ``num_nodes``), so each node continues its own count, also after a
    schedule changed. :meth:`load_state_dict` refuses (``ValueError``) a state written with another seed, epoch
    length, sampling, shuffle or other domains, since the run would not continue the same sequence, and, when a
    domain is a Streaming one, a state written on another number of nodes (each node's part and count would
    change; a state without ``node_draws`` counts as one node).

    Args:
        domains: Domain name -> dataset: a Streaming ``StreamingDataset`` (read by global index) or any
            map-style dataset (``len`` and ``__getitem__``).
        schedule: The mixture over training. Its ``start`` is placed on sample positions against one epoch
            of ``num_samples`` until :meth:`bind` places it on the run (DomainUpsampling does at ``FIT_START``).
        num_samples: Global samples per epoch (all ranks together).
        seed: Seed of the domain choices and of the within-domain order.
        shuffle: Read each domain in a seeded shuffle (else in index order).
        sampling: ``'stratified'`` (low-discrepancy: over any window of 5,000 samples the achieved fractions
            stay within about 0.2 percentage points of the schedule) or ``'random'`` (independent draws, which
            stray by about 2 points over such windows). Stratified choices are a seed-rotated golden-ratio
            sequence, so two seeds give domain patterns that are nearly shifts of one another (the samples
            within each domain still come in a different seeded order); use ``'random'`` where the domain
            pattern itself must vary with the seed.
        batch_size: Samples per rank per batch. Needed with DataLoader workers; also trims an epoch to whole
            global batches so that epoch boundaries match the Trainer's.
        prefetch_shards: Shards of each Streaming domain fetched ahead of the one being read, per reading process
            (of this node's part).
        shard_timeout: Seconds a Streaming shard may take to become ready before
            :class:`~composer_ext.domain_upsampling.shard_order.ShardTimeoutError` is raised.

    Example:
        .. code-block:: python

            from streaming import StreamingDataset
            from composer_ext.data import MixtureDataset, MixtureSchedule, ensure_corpus
            corpus = ensure_corpus()
            domains = {d: StreamingDataset(local=str(corpus.path(d)), batch_size=8) for d in ('prose', 'math')}
            schedule = MixtureSchedule({'prose': 0.7, 'math': 0.3}, {'prose': 0.3, 'math': 0.7}, start='0.8dur')
            dataset = MixtureDataset(domains, schedule, num_samples=1000, batch_size=8)
            sample = next(iter(dataset))          # a dict with text, tokens, domain, uid
    """

    def __init__(self, domains: Mapping[str, Any], schedule: MixtureSchedule, num_samples: int, seed: int = 0,
                 shuffle: bool = True, sampling: Literal['stratified', 'random'] = 'stratified',
                 batch_size: Optional[int] = None, prefetch_shards: int = 2, shard_timeout: float = 300.0):
        if not isinstance(domains, Mapping) or not domains:
            raise ValueError(f'domains={domains!r} is not a non-empty mapping of name -> dataset. Fix: pass e.g. '
                             f"{{'code': code_dataset, 'prose': prose_dataset}}.")
        for name, dataset in domains.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f'domains has the key {name!r}, which is not a domain name. Fix: use strings.')
            if not hasattr(dataset, '__getitem__') or not hasattr(dataset, '__len__'):
                raise TypeError(f'domains[{name!r}] is a {type(dataset).__name__}, which has no random access. Fix: '
                                f'pass a map-style dataset (len and __getitem__) or a Streaming StreamingDataset.')
        if not isinstance(schedule, MixtureSchedule):
            raise TypeError(f'schedule={schedule!r} is not a MixtureSchedule. Fix: pass MixtureSchedule(base, target, '
                            f'start=...) (or MixtureSchedule.constant(weights) for a fixed mix).')
        for name, value, low in (('num_samples', num_samples, 1), ('seed', seed, 0)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f'{name}={value!r} is a {type(value).__name__}, not an int. Fix: use an int >= {low}.')
            if value < low:
                raise ValueError(f'{name}={value!r} is invalid. Fix: use an int >= {low}.')
        if not isinstance(shuffle, bool):
            raise TypeError(f'shuffle={shuffle!r} is not a bool. Fix: pass True or False.')
        if sampling not in SAMPLING:
            raise ValueError(f'sampling={sampling!r} is not a sampling mode. Fix: use one of {list(SAMPLING)}.')
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral)):
            raise TypeError(f'batch_size={batch_size!r} is a {type(batch_size).__name__}, not an int. Fix: use a '
                            f'positive int (samples per rank per batch) or None.')
        if batch_size is not None and batch_size < 1:
            raise ValueError(f'batch_size={batch_size!r} is invalid. Fix: use a positive int (samples per rank per '
                             f'batch) or None.')
        if isinstance(prefetch_shards, bool) or not isinstance(prefetch_shards, numbers.Integral) or prefetch_shards < 0:
            raise ValueError(f'prefetch_shards={prefetch_shards!r} is invalid. Fix: use an int >= 0 (e.g. 2).')
        if isinstance(shard_timeout, bool) or not isinstance(shard_timeout, numbers.Real) or not shard_timeout > 0:
            raise ValueError(f'shard_timeout={shard_timeout!r} is invalid. Fix: use a number of seconds > 0 (e.g. '
                             f'300).')
        self.prefetch_shards = int(prefetch_shards)
        self.shard_timeout = float(shard_timeout)
        self.datasets = dict(domains)
        self.domain_names = tuple(self.datasets)
        self.sizes = np.array([_domain_size(d) for d in self.datasets.values()], dtype=np.int64)
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.sampling = sampling
        self.batch_size = None if batch_size is None else int(batch_size)
        self.rank, self.world_size = _world()
        self.local_world_size = _local_world_size()
        if self.local_world_size < 1 or self.world_size % self.local_world_size:
            raise ValueError(f'the world size ({self.world_size}) is not a whole number of nodes of local_world_size='
                             f'{self.local_world_size} (LOCAL_WORLD_SIZE) ranks. Fix: launch the same number of ranks '
                             f'on every node (composer -n RANKS_PER_NODE).')
        # Streaming's World: the node of global rank r is r // local_world_size.
        self.num_nodes = self.world_size // self.local_world_size
        self.node = self.rank // self.local_world_size
        unit = self.world_size * (self.batch_size or 1)
        self.samples_per_epoch = (self.num_samples // unit) * unit
        if self.samples_per_epoch == 0:
            raise ValueError(f'num_samples={num_samples} is less than one global batch ({unit} samples: '
                             f'{self.world_size} rank(s) x batch_size={self.batch_size or 1}). Fix: raise num_samples '
                             f'to at least {unit}.')
        self.check_schedule(schedule)
        self.schedule = schedule
        # Streaming domains: Streaming's shard-local order, and per shard the process preparing it (shared with
        # DataLoader workers, so that a shard left PREPARING by a dead worker is recognised and fetched again).
        self._orders: dict[int, ShardOrder] = {}
        self._owners: dict[int, torch.Tensor] = {}
        for index, (name, dataset) in enumerate(self.datasets.items()):
            streaming = streaming_dataset_of(dataset)
            if streaming is not None and self.sizes[index] == streaming.num_samples:
                self._orders[index] = ShardOrder(streaming, name, self.seed, self.shuffle, self.in_flight(0),
                                                 self.prefetch_shards, self.node, self.num_nodes)
                self._owners[index] = torch.zeros(streaming.num_shards, dtype=torch.int64).share_memory_()
        self._bound: Optional[tuple[MixtureSchedule, int]] = None
        self._plan: Optional[SamplePlan] = None
        # position -> draws per node and domain ((num_nodes, domains) counts) before it; their sum over nodes is the
        # global count. Anchors are computed under the current plan; facts were served (from a checkpoint, or before a
        # new schedule was bound), and outlive schedule changes.
        self._anchors: dict[int, np.ndarray] = {}
        self._facts: dict[int, np.ndarray] = {}
        # Passes. What the next pass serves lives in shared memory, which DataLoader workers (who read a copy of
        # this object) share with the main process: [ticket of the armed pass, its epoch, its first sample, the
        # version of the plan and facts, then per worker the last ticket it served].
        self._sync = torch.zeros(_SYNC_SLOTS + _MAX_WORKERS, dtype=torch.int64).share_memory_()
        self._sync[0] = 1  # pass 1 (epoch 0 from sample 0) is armed
        self._ticket = 1  # the armed ticket when this copy was made (a worker's copy is made with its DataLoader pass)
        self._worker_passes = 0  # passes served by this copy in a DataLoader worker (> 1: persistent workers)
        self._version = 0
        self._pass: Optional[list[int]] = None  # [epoch, first sample, samples handed out] of the pass begun here
        self._continue_partial = False  # set by load_state_dict: Composer will not skip batches of a stopped pass
        self._permutations: dict[int, tuple[int, np.ndarray]] = {}

    # -- the schedule on positions --

    def check_schedule(self, schedule: MixtureSchedule) -> None:
        """``ValueError`` unless every domain the schedule ever draws from has data here, and every dataset
        here is named by the schedule."""
        for mix_name, mix in (('target', schedule.target), ('base', schedule.base)):
            for domain, weight in mix.items():
                if weight <= 0:
                    continue
                if domain not in self.datasets:
                    raise ValueError(f'the {mix_name} mix gives {domain!r} weight {weight:g}, but domains has no '
                                     f'dataset named {domain!r} (it has {list(self.domain_names)}). Fix: add its data '
                                     f'to domains, or set its weight to 0 (normalize=True rescales the rest).')
                size = int(self.sizes[self.domain_names.index(domain)])
                if size == 0:
                    raise ValueError(f'the {mix_name} mix gives {domain!r} weight {weight:g}, but domains[{domain!r}] '
                                     f'has no samples. Fix: point it at a non-empty dataset, or set its weight to 0.')
        unknown = [d for d in self.domain_names if d not in schedule.domains]
        if unknown:
            raise ValueError(f'domains has datasets {unknown} that the schedule does not name (it names '
                             f'{list(schedule.domains)}). Fix: give them a weight (0 to leave them out) in the '
                             f'schedule, or drop them from domains.')

    @property
    def global_batch_size(self) -> Optional[int]:
        return None if self.batch_size is None else self.batch_size * self.world_size

    def in_flight(self, num_workers: int) -> int:
        """Draws of one domain that the readers of a node may read at the same time (at most; all ranks of the
        node, ``num_workers`` DataLoader workers each, a few batches each)."""
        return self.local_world_size * (self.batch_size or 1) * max(1, int(num_workers)) * _IN_FLIGHT_BATCHES

    def check_readers(self, num_workers: int) -> None:
        """``ValueError`` unless every Streaming domain's ``cache_limit`` holds its shuffle window, the draws in
        flight with ``num_workers`` DataLoader workers, and the shards fetched ahead."""
        for order in self._orders.values():
            order.check(self.in_flight(num_workers))

    def bind(self, schedule: MixtureSchedule, total_samples: int, served: int = 0) -> None:
        """Follow ``schedule`` over a run of ``total_samples`` global samples (replacing the schedule given at
        construction). ``DomainUpsampling`` calls this at ``FIT_START`` with the Trainer's ``max_duration``.

        ``served``: global positions already trained on under the previous schedule (a second ``fit``); their
        per-domain draws are kept, so the new schedule continues each domain where it stopped.
        """
        if isinstance(total_samples, bool) or not isinstance(total_samples, numbers.Integral) or total_samples < 1:
            raise ValueError(f'total_samples={total_samples!r} is invalid. Fix: use a positive int.')
        if isinstance(served, bool) or not isinstance(served, numbers.Integral) or served < 0:
            raise ValueError(f'served={served!r} is invalid. Fix: use an int >= 0.')
        self.check_schedule(schedule)
        if served > 0 and (self._plan is not None or any(p <= served for p in self._facts)):
            self._facts[int(served)] = self.node_draws_at(int(served))
        self.schedule = schedule
        self._bound = (schedule, int(total_samples))
        self._set_plan(self._make_plan())
        self._bump_version()

    def _make_plan(self) -> SamplePlan:
        schedule, total = self._bound if self._bound is not None else (self.schedule, self.samples_per_epoch)
        if not schedule.is_resolved:
            try:
                schedule = schedule.resolve(Time(total, TimeUnit.SAMPLE), samples_per_batch=self.global_batch_size,
                                            samples_per_epoch=self.samples_per_epoch)
            except ValueError as err:
                raise ValueError(f'{err} (MixtureDataset places the schedule on one epoch of {total} samples unless '
                                 f'DomainUpsampling binds it to the run; attach DomainUpsampling, which resolves '
                                 f"times from the Trainer's max_duration, or use 'dur'/'sp' times.)") from None
        return SamplePlan(schedule, self.domain_names, total, self.global_batch_size, self.seed, self.sampling)

    def _set_plan(self, plan: SamplePlan) -> None:
        if self._plan is None or plan.key != self._plan.key:
            self._anchors = {}
        self._plan = plan

    @property
    def plan(self) -> SamplePlan:
        """The schedule placed on sample positions (built on first use)."""
        if self._plan is None:
            self._set_plan(self._make_plan())
        assert self._plan is not None
        return self._plan

    def domain_of(self, positions: Union[int, Sequence[int], np.ndarray]) -> np.ndarray:
        """Index into :attr:`domain_names` of the domain serving each global sample position."""
        positions = np.atleast_1d(np.asarray(positions, dtype=np.int64))
        if positions.size and positions.min() < 0:
            raise ValueError(f'positions must be >= 0, got {int(positions.min())}.')
        return self.plan.assign(positions)

    def target_fractions(self, begin: int, end: int) -> np.ndarray:
        """The schedule's mean weight per domain over global positions [begin, end)."""
        if end <= begin:
            return np.zeros(len(self.domain_names))
        positions = np.arange(begin, end, dtype=np.int64)
        return self.plan.weights(positions).mean(axis=0)

    def node_of(self, positions: np.ndarray) -> np.ndarray:
        """The node whose rank serves each global position (an epoch is whole global batches, so the rank of
        position ``g`` is ``g % world_size``)."""
        return (np.asarray(positions, dtype=np.int64) % self.world_size) // self.local_world_size

    def _count(self, begin: int, end: int, counts: np.ndarray) -> np.ndarray:
        counts = counts.copy()
        plan, domains = self.plan, len(self.domain_names)
        for low in range(begin, end, _CHUNK * 4):
            positions = np.arange(low, min(end, low + _CHUNK * 4), dtype=np.int64)
            if self.num_nodes == 1:
                counts[0] += np.bincount(plan.assign(positions), minlength=domains)
            else:
                cells = self.node_of(positions) * domains + plan.assign(positions)
                counts += np.bincount(cells, minlength=self.num_nodes * domains).reshape(self.num_nodes, domains)
        return counts

    def node_draws_at(self, position: int) -> np.ndarray:
        """Samples drawn from each domain at global positions before ``position`` by each node's ranks: an array of
        shape ``(num_nodes, domains)`` whose sum over nodes is :meth:`draws_at`. A Streaming domain's reads on node
        ``n`` follow row ``n``."""
        position = int(position)
        candidates = [(p, c) for table in (self._anchors, self._facts) for p, c in table.items() if p <= position]
        zero = np.zeros((self.num_nodes, len(self.domain_names)), np.int64)
        begin, counts = max(candidates, key=lambda pc: pc[0], default=(0, zero))
        if begin == position:
            return counts.copy()
        counts = self._count(begin, position, counts)
        if len(self._anchors) >= _MAX_ANCHORS:
            self._anchors.pop(min(self._anchors))
        self._anchors[position] = counts
        return counts.copy()

    def draws_at(self, position: int) -> np.ndarray:
        """Samples drawn from each domain at global positions before ``position`` (over the whole run, all nodes)."""
        return self.node_draws_at(position).sum(axis=0)

    def passes_at(self, position: int) -> np.ndarray:
        """Passes over each domain's data at ``position`` (draws / samples; 1.0 = every sample read once)."""
        return self.draws_at(position) / np.maximum(self.sizes, 1)

    # -- epochs and resumption --

    def set_epoch(self, epoch: int, sample_in_epoch: int = 0) -> None:
        """Make the next pass serve ``epoch`` from global sample ``sample_in_epoch`` on (in DataLoader workers too)."""
        for name, value in (('epoch', epoch), ('sample_in_epoch', sample_in_epoch)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f'{name}={value!r} is a {type(value).__name__}, not an int. Fix: use an int >= 0.')
            if value < 0:
                raise ValueError(f'{name}={value!r} is invalid. Fix: use an int >= 0.')
        if sample_in_epoch % self.world_size:
            raise ValueError(f'sample_in_epoch={sample_in_epoch} is not a multiple of the world size '
                             f'({self.world_size}). Fix: resume at a global batch boundary.')
        self._arm(int(epoch), int(sample_in_epoch))

    def _shared(self) -> torch.Tensor:
        if not self._sync.is_shared():  # a deep copy or an unpickled copy owns private memory: share it again
            self._sync.share_memory_()
        return self._sync

    def _arm(self, epoch: int, start: int) -> None:
        sync = self._shared()
        sync[1], sync[2] = epoch, start
        sync[0] += 1  # a new ticket: every worker may serve this pass once
        self._ticket = int(sync[0])
        self._pass = None

    def _bump_version(self) -> None:
        """Mark the plan or the facts as changed, so that a worker holding an older copy refuses to serve."""
        self._version += 1
        self._shared()[3] = self._version

    def _finished(self, start: int, handed: int) -> bool:
        return start + handed * self.world_size >= self.samples_per_epoch

    def _last_pass(self) -> Optional[tuple[int, int, Optional[int]]]:
        """(epoch, first sample, samples handed out on this rank) of the pass begun since the last arming, if any;
        ``None`` for the samples when DataLoader workers served it and nothing in this process counted them."""
        if self._pass is not None:
            return self._pass[0], self._pass[1], self._pass[2]
        sync = self._sync
        if int(sync[_SYNC_SLOTS]) >= int(sync[0]):  # worker 0 served the armed pass (a plain DataLoader)
            return int(sync[1]), int(sync[2]), None
        return None

    def _upcoming(self) -> tuple[int, int]:
        """(epoch, first sample) of the next pass."""
        last = self._last_pass()
        if last is None:
            return int(self._sync[1]), int(self._sync[2])
        epoch, start, handed = last
        if handed is None or self._finished(start, handed):
            return epoch + 1, 0
        if self._continue_partial:  # resumed through load_state_dict: Composer does not skip, so continue
            return epoch, start + handed * self.world_size
        return epoch, start  # Composer skips the batches it already trained, as with any dataloader

    def _begin_pass(self) -> tuple[int, int]:
        """Start the next pass in this (main) process and count its samples here."""
        epoch, start = self._upcoming()
        self._arm(epoch, start)
        self._pass = [epoch, start, 0]
        return epoch, start

    def _hand_out(self, samples: int) -> None:
        if self._pass is not None:
            self._pass[2] += samples

    def _worker_pass(self, worker_id: int, workers: int) -> Optional[tuple[int, int]]:
        """The (epoch, first sample) the main process armed for this pass of DataLoader worker ``worker_id``;
        ``None`` for a worker of an abandoned DataLoader pass that starts only after the next pass was armed."""
        if workers > _MAX_WORKERS:
            raise ValueError(f'MixtureDataset is read by {workers} DataLoader workers; it tracks at most '
                             f'{_MAX_WORKERS}. Fix: use num_workers <= {_MAX_WORKERS}.')
        sync = self._sync
        self._worker_passes += 1
        if self._worker_passes == 1 and self._ticket != int(sync[0]):
            # This copy was made for a pass that the main process has moved on from (its iterator was dropped
            # and is still shutting down): serve nothing, and leave the new pass to its own workers.
            return None
        if int(sync[3]) != self._version:
            raise ValueError('a DataLoader worker holds a copy of this MixtureDataset from before its schedule or '
                             'state changed (persistent_workers=True keeps the copies of the first pass), so it '
                             'would serve the old mixture. Fix: use persistent_workers=False.')
        ticket, slot = int(sync[0]), _SYNC_SLOTS + worker_id
        if int(sync[slot]) >= ticket:
            raise ValueError(f'MixtureDataset is read by DataLoader workers and a new pass began, but nothing set its '
                             f'epoch since the last pass (a worker reads a copy and cannot count epochs), so it would '
                             f'serve epoch {int(sync[1])} again. Fix: read it with MixtureDataLoader(dataset, ...) '
                             f'(build_mixture_dataloader does), attach DomainUpsampling to the Trainer, or call '
                             f'dataset.set_epoch(epoch) before every epoch.')
        sync[slot] = ticket
        return int(sync[1]), int(sync[2])

    def _position_after(self, sample_in_epoch: int) -> tuple[int, int]:
        """(epoch, sample_in_epoch) of the sample after ``sample_in_epoch`` samples of the epoch in progress."""
        last = self._last_pass()
        if last is None:
            epoch = int(self._sync[1])
        else:
            epoch, start, handed = last
            # Composer reports 0 samples once an epoch is over (it saves at EPOCH_CHECKPOINT, after the epoch's
            # last batch, and never between the start of a pass and its first batch): that is the next epoch.
            if sample_in_epoch == 0 and (handed is None or self._finished(start, handed)):
                epoch += 1
        if sample_in_epoch > self.samples_per_epoch:
            raise ValueError(f'num_samples={sample_in_epoch} is more than an epoch ({self.samples_per_epoch} samples). '
                             f'Fix: pass the samples consumed in the current epoch.')
        # A fully consumed epoch stays (epoch, samples_per_epoch): its pass yields nothing, and the next one is the
        # next epoch, as the Trainer (which saved mid-epoch) expects.
        return epoch, sample_in_epoch

    def _identity(self) -> dict[str, Any]:
        """What a resumed dataset must share with the one that saved the state to continue its sequence."""
        identity = {'seed': self.seed, 'samples_per_epoch': self.samples_per_epoch, 'sampling': self.sampling,
                    'shuffle': self.shuffle,
                    'domains': {name: int(size) for name, size in zip(self.domain_names, self.sizes.tolist())}}
        if self._orders:
            identity['shard_order'] = {self.domain_names[d]: [o.algo, o.block, o.canonical_nodes]
                                       for d, o in self._orders.items()}
        return identity

    def state_dict(self, num_samples: int, from_beginning: bool) -> dict[str, Any]:
        """The position after ``num_samples`` samples of the current epoch (Composer's dataset-state hook).

        ``from_beginning``: ``num_samples`` counts from the start of the epoch (Composer's call) rather than from
        the first sample of the current pass (a resumed pass starts mid-epoch).
        """
        last = self._last_pass()
        pass_start = last[1] if last is not None else int(self._sync[2])
        epoch, sample_in_epoch = self._position_after(int(num_samples) + (0 if from_beginning else pass_start))
        position = epoch * self.samples_per_epoch + sample_in_epoch
        node_draws = self.node_draws_at(position)
        return {
            'epoch': int(epoch),
            'sample_in_epoch': sample_in_epoch,
            'position': int(position),
            'draws': {name: int(count) for name, count in zip(self.domain_names, node_draws.sum(axis=0))},
            'num_nodes': self.num_nodes,
            'node_draws': [{name: int(count) for name, count in zip(self.domain_names, row)} for row in node_draws],
            **self._identity(),
        }

    def load_state_dict(self, obj: Mapping[str, Any]) -> None:
        """Resume at the position :meth:`state_dict` recorded; the next pass continues from there.

        Each node continues its own per-domain draw count (``node_draws``). A state written on another number of
        nodes is refused when a domain is a Streaming one (the nodes' parts and counts would not continue); with
        map-style domains only, it is loaded (they read by the global count, ``draws``) and its per-node counts,
        which nothing reads, are dropped.

        Raises:
            ValueError: the state lacks a field, or was written by a dataset with another seed, epoch length
                (``samples_per_epoch``), sampling, shuffle, or other domains (names, order or sizes), or on another
                number of nodes (with Streaming domains; a state without ``node_draws`` was written on one node).
        """
        if not isinstance(obj, Mapping):
            raise TypeError(f'the dataset state is a {type(obj).__name__}, not a mapping. Fix: pass what '
                            f'MixtureDataset.state_dict returned.')
        missing = [k for k in ('epoch', 'sample_in_epoch', 'position', 'draws') if k not in obj]
        if missing:
            raise ValueError(f'the dataset state lacks {missing}; it was not written by MixtureDataset.state_dict. '
                             f'Fix: resume from a checkpoint of a run over a MixtureDataset.')
        saved_nodes = self._saved_nodes(obj)
        if saved_nodes != self.num_nodes and self._orders:
            streaming = [self.domain_names[d] for d in self._orders]
            raise ValueError(
                f"the checkpoint's dataset state was written on num_nodes={saved_nodes} node(s), but this run has "
                f'{self.num_nodes} node(s) (world_size={self.world_size} / local_world_size={self.local_world_size}). '
                f'Each node reads its own part of every Streaming domain ({streaming}) and continues its own draw '
                f'count, so on {self.num_nodes} node(s) the resumed run would not continue the same samples. Fix: '
                f'resume on {saved_nodes} node(s) (world_size / local_world_size = {saved_nodes}, any ranks per '
                f"node), or leave the data position out of the resume (load_ignore_keys=['state/dataset_state']).")
        saved = {key: obj[key] for key in self._identity() if key in obj}
        saved.setdefault('domain_names', list(obj['draws']))  # the draws name the domains in order
        current = {**self._identity(), 'domain_names': list(self.domain_names)}
        fixes = {
            'seed': f"build the MixtureDataset (train_loader.seed) with seed={saved.get('seed')!r}",
            'samples_per_epoch': 'use the num_samples and global batch size of the run that saved it (an epoch is '
                                 'num_samples trimmed to whole global batches)',
            'sampling': f"pass sampling={saved.get('sampling')!r}",
            'shuffle': f"pass shuffle={saved.get('shuffle')!r}",
            'domains': 'give the dataset the same domains, with the same data, as the run that saved it',
            'domain_names': 'give the dataset the same domains, in the same order, as the run that saved it',
            'shard_order': 'give each Streaming domain the shuffle_algo, shuffle_block_size, num_canonical_nodes '
                           '(and, when shuffle_block_size is unset, the cache_limit) of the run that saved it',
        }
        for key in ('domain_names', 'domains', 'seed', 'samples_per_epoch', 'sampling', 'shuffle', 'shard_order'):
            if key in saved and saved[key] != current[key]:
                raise ValueError(f'the checkpoint\'s dataset state has {key}={saved[key]!r}, but this MixtureDataset '
                                 f'has {key}={current[key]!r}, so the resumed run would not continue the same sample '
                                 f'sequence. Fix: {fixes[key]}.')
        self.set_epoch(int(obj['epoch']), int(obj['sample_in_epoch']))
        draws = np.array([int(obj['draws'][name]) for name in self.domain_names], dtype=np.int64)
        if 'node_draws' in obj and saved_nodes == self.num_nodes:
            node_draws = np.array([[int(row[name]) for name in self.domain_names] for row in obj['node_draws']],
                                  dtype=np.int64)
            if (node_draws.sum(axis=0) != draws).any():
                raise ValueError(f"the dataset state's node_draws {obj['node_draws']} do not add up to its draws "
                                 f"{obj['draws']}; it was not written by MixtureDataset.state_dict. Fix: resume from "
                                 f'an unmodified checkpoint.')
        else:  # one node before per-node counts existed, or map-style domains only (read by the global count)
            node_draws = np.zeros((self.num_nodes, len(self.domain_names)), dtype=np.int64)
            node_draws[0] = draws
        self._facts = {int(obj['position']): node_draws}
        # Counts computed before this state arrived continued another history of draws: later positions must be
        # counted on from the loaded draws, never from such a stale count.
        self._anchors = {}
        self._continue_partial = True
        self._bump_version()

    @staticmethod
    def _saved_nodes(obj: Mapping[str, Any]) -> int:
        """The number of nodes a state was written on (1 for a state from before per-node counts)."""
        if 'node_draws' not in obj:
            return 1
        rows, nodes = obj['node_draws'], obj.get('num_nodes')
        if (not isinstance(rows, (list, tuple)) or not rows or isinstance(nodes, bool)
                or not isinstance(nodes, numbers.Integral) or nodes != len(rows)):
            raise ValueError(f"the dataset state has num_nodes={nodes!r} and node_draws={rows!r}, not one row of "
                             f'counts per node; it was not written by MixtureDataset.state_dict. Fix: resume from an '
                             f'unmodified checkpoint.')
        return int(nodes)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._shared()  # a DataLoader worker's copy arrives shared; a plain copy gets its own shared block
        for owners in self._owners.values():
            if not owners.is_shared():
                owners.share_memory_()

    # -- iteration --

    def __len__(self) -> int:
        """Samples per epoch on this rank."""
        return self.samples_per_epoch // self.world_size

    def _permutation(self, domain: int, pass_index: int) -> np.ndarray:
        cached = self._permutations.get(domain)
        if cached is None or cached[0] != pass_index:
            salt = zlib.crc32(self.domain_names[domain].encode())
            order = np.random.default_rng([self.seed, salt, pass_index]).permutation(int(self.sizes[domain]))
            self._permutations[domain] = cached = (pass_index, order)
        return cached[1]

    def _indices(self, domain: int, draws: np.ndarray) -> np.ndarray:
        """The sample index each draw of ``domain`` reads: draw ``k`` reads entry ``k`` of its pass's order (of a
        Streaming domain: this node's draw ``k`` and this node's part of the order)."""
        order = self._orders.get(domain)
        size = order.part_size if order is not None else int(self.sizes[domain])
        passes, offsets = np.divmod(draws, size)
        if order is None and not self.shuffle:
            return offsets
        indices = np.empty_like(offsets)
        for pass_index in np.unique(passes).tolist():
            mask = passes == pass_index
            sequence = order.part(pass_index) if order is not None else self._permutation(domain, pass_index)
            indices[mask] = sequence[offsets[mask]]
        return indices

    def __iter__(self):
        """One pass: this rank's samples of the next epoch (see the class docstring for which epoch)."""
        rank, world = _world()
        if (rank, world) != (self.rank, self.world_size):
            raise RuntimeError(f'this MixtureDataset was built for rank {self.rank} of {self.world_size} but is '
                               f'iterated on rank {rank} of {world}. Fix: build it after the process group is set up.')
        worker = get_worker_info()
        if worker is None:
            epoch, start = self._begin_pass()
            return self._serve(epoch, start, 1, 0, self._pass)
        return self._serve_in_worker(worker.id, worker.num_workers)

    def _serve_in_worker(self, worker_id: int, workers: int):
        # A generator, so that the checks run at the first fetch: PyTorch forwards errors raised while fetching to
        # the main process, but a persistent worker dies without a message on errors raised by iter() itself.
        if workers > 1 and self.batch_size is None:
            raise ValueError(f'MixtureDataset is read by {workers} DataLoader workers but has no batch_size, so it '
                             f'cannot split batches between them in order. Fix: pass batch_size= (samples per rank '
                             f'per batch, the DataLoader batch_size).')
        armed = self._worker_pass(worker_id, workers)
        if armed is not None:
            yield from self._serve(armed[0], armed[1], workers, worker_id, None)

    def _serve(self, epoch: int, start: int, workers: int, worker_id: int, record: Optional[list[int]]):
        fetcher = ShardFetcher(self._orders, self._owners, self.shard_timeout) if self._orders else None
        try:
            yield from self._serve_fetched(epoch, start, workers, worker_id, record, fetcher)
        finally:
            if fetcher is not None:
                fetcher.close()

    def _serve_fetched(self, epoch: int, start: int, workers: int, worker_id: int, record: Optional[list[int]],
                       fetcher: Optional[ShardFetcher]):
        rank, world = self.rank, self.world_size
        plan = self.plan
        per_rank_batch = self.batch_size or 1
        epoch_base = epoch * self.samples_per_epoch
        node_counts = self.node_draws_at(epoch_base + start)
        counts = node_counts.sum(axis=0)  # global: map-style domains
        own = node_counts[self.node]  # this node's: Streaming domains (the same as the global ones on one node)
        chunk = max(world, (_CHUNK // world) * world)
        for low in range(start, self.samples_per_epoch, chunk):
            high = min(self.samples_per_epoch, low + chunk)
            in_epoch = np.arange(low, high, dtype=np.int64)
            domains = plan.assign(in_epoch + epoch_base)
            on_node = self.node_of(in_epoch) == self.node if self.num_nodes > 1 else None
            draws = np.empty_like(in_epoch)  # positions of other nodes keep garbage: this rank never reads them
            for d in range(len(self.domain_names)):
                mask = domains == d
                n = int(mask.sum())
                if n:
                    if d in self._orders:
                        mask = mask if on_node is None else mask & on_node
                        m = int(mask.sum())
                        draws[mask] = own[d] + np.arange(m)
                        own[d] += m
                    else:
                        draws[mask] = counts[d] + np.arange(n)
                    counts[d] += n
            mine = in_epoch % world == rank
            if workers > 1:
                # Batches are dealt to workers round-robin from the first batch of this pass, which PyTorch reads
                # from worker 0 (also when the pass resumes mid-epoch).
                mine &= (((in_epoch - start) // world) // per_rank_batch) % workers == worker_id
            domains, draws = domains[mine], draws[mine]
            indices = np.empty_like(draws)
            shards = np.full_like(draws, -1)
            for d in np.unique(domains).tolist():
                mask = domains == d
                indices[mask] = self._indices(d, draws[mask])
                if d in self._orders:
                    shards[mask] = self._orders[d].shard_of(indices[mask])
            if fetcher is not None:
                fetcher.extend(domains, shards)
            datasets = [self.datasets[name] for name in self.domain_names]
            for d, index, shard in zip(domains.tolist(), indices.tolist(), shards.tolist()):
                if shard >= 0:
                    fetcher.ready(d, shard)  # type: ignore[union-attr]
                elif fetcher is not None:
                    fetcher.skip()
                sample = datasets[d][index]
                if record is not None:
                    record[2] += 1
                yield sample

    def __repr__(self) -> str:
        datasets = ', '.join(f'{n!r}: <{type(d).__name__} of {s} samples>'
                             for n, d, s in zip(self.domain_names, self.datasets.values(), self.sizes.tolist()))
        return (f'MixtureDataset(domains={{{datasets}}}, schedule={self.schedule!r}, num_samples={self.num_samples}, '
                f'seed={self.seed}, shuffle={self.shuffle}, sampling={self.sampling!r}, batch_size={self.batch_size})')


# --- a DataLoader that keeps the epochs of DataLoader workers ------------------------------------------------


class MixtureDataLoader(DataLoader):
    """A ``DataLoader`` over a :class:`MixtureDataset` that keeps each pass on the right epoch with workers.

    DataLoader workers read a copy of the dataset and cannot count epochs. This loader counts, in the main
    process, the batches it hands out and tells the workers which epoch (and first sample) each pass serves,
    with the rules of a dataset read in the main process: the next epoch after a complete pass, the same epoch
    again after a pass stopped early (Composer skips the batches it trained, e.g. on a second ``fit()``), and the
    continuation of a stopped pass after ``load_state_dict`` (Composer does not skip then). With
    ``num_workers=0`` it behaves exactly like a ``DataLoader``.

    Args:
        dataset: The :class:`MixtureDataset`.
        batch_size: Samples per rank per batch; with workers it must equal the dataset's ``batch_size`` (the
            workers deal whole batches round-robin).
        **kwargs: Any other ``DataLoader`` argument.

    Example:
        .. code-block:: python

            from composer_ext.data import MixtureSchedule, ensure_corpus
            from composer_ext.domain_upsampling.mixture import MDSDataset, MixtureDataLoader, MixtureDataset
            corpus = ensure_corpus()
            domains = {d: MDSDataset(corpus.path(d)) for d in ('prose', 'math')}
            dataset = MixtureDataset(domains, MixtureSchedule.constant({'prose': 0.5, 'math': 0.5}),
                                     num_samples=64, batch_size=8)
            loader = MixtureDataLoader(dataset, batch_size=8, num_workers=2, collate_fn=list)
            first, second = list(loader), list(loader)    # epoch 0, then epoch 1
    """

    def __init__(self, dataset: MixtureDataset, batch_size: Optional[int] = 1, **kwargs: Any):
        if not isinstance(dataset, MixtureDataset):
            raise TypeError(f'dataset={dataset!r} is a {type(dataset).__name__}, not a MixtureDataset. Fix: pass a '
                            f'MixtureDataset, or use a plain torch DataLoader for other datasets.')
        if kwargs.get('num_workers', 0) and batch_size != dataset.batch_size:
            raise ValueError(f"batch_size={batch_size!r} differs from the dataset's batch_size="
                             f"{dataset.batch_size!r}, but the workers deal the dataset's batches round-robin. Fix: "
                             f'build the MixtureDataset with batch_size={batch_size!r} (samples per rank per batch).')
        dataset.check_readers(int(kwargs.get('num_workers', 0) or 0))
        super().__init__(dataset, batch_size=batch_size, **kwargs)

    def __iter__(self):
        if self.num_workers == 0:
            return super().__iter__()  # the dataset counts its own passes in this process
        return self._counted()

    def _counted(self):
        dataset = self.dataset
        assert isinstance(dataset, MixtureDataset)
        dataset._begin_pass()  # decide the pass here, and arm it for the workers through shared memory
        rows = self.batch_size or 1
        for batch in super().__iter__():
            dataset._hand_out(rows)  # counted when handed over: a stopped pass knows how far the Trainer got
            yield batch


# --- LM rows of one domain, in the run's tokenizer -----------------------------------------------------------

PROBE_SAMPLES = 8  # samples per domain whose stored tokens are compared with the run's tokenizer


def encode_text(tokenizer: Any, text: str, max_length: Optional[int] = None) -> list[int]:
    """``text`` in ``tokenizer``'s ids, with the special tokens the tokenizer adds itself (e.g. a BOS), as
    ``tokenizer(text)`` gives them; cut to the first ``max_length`` ids when given."""
    if max_length is None:
        return list(tokenizer(text, add_special_tokens=True, verbose=False)['input_ids'])
    return list(tokenizer(text, add_special_tokens=True, truncation=True, max_length=max_length,
                          verbose=False)['input_ids'])


def tokens_written_by(dataset: Any, tokenizer: Any, probes: int = PROBE_SAMPLES) -> bool:
    """Whether ``dataset``'s ``tokens`` column holds ``tokenizer``'s encoding of its ``text`` column.

    The rule: the first ``probes`` samples are read, and the column counts as written by the tokenizer only if
    every one of them has a ``tokens`` array equal, id for id, to :func:`encode_text` of its ``text``, and at least
    one of those texts is non-empty. Any difference (another vocabulary, another merge table, a BOS the tokenizer
    adds and the column lacks) means the text is tokenized instead. Reading a few samples is cheap and needs no
    record of which tokenizer wrote the data.

    Example:
        .. code-block:: python

            from composer_ext.data import ensure_corpus
            from composer_ext.data.mds import MDSDataset
            corpus = ensure_corpus()
            tokens_written_by(MDSDataset(corpus.path('math')), corpus.load_tokenizer())    # True
    """
    checked = 0
    for index in range(min(int(probes), _domain_size(dataset))):
        sample = dataset[index]
        tokens, text = sample.get('tokens'), sample.get('text')
        if not isinstance(text, str) or not isinstance(tokens, (np.ndarray, list, tuple)):
            return False
        if np.asarray(tokens).ravel().tolist() != encode_text(tokenizer, text):
            return False
        checked += bool(text)
    return checked > 0


class DomainTokens:
    """One domain's samples as language-model rows in the run's tokenizer: ``{'tokens', 'domain', 'uid'}``.

    Each sample's ``text`` is tokenized with ``tokenizer`` (cut to ``max_seq_len``). Its stored ``tokens`` column
    is used instead only when :func:`tokens_written_by` finds that this tokenizer wrote it, so both give the same
    rows. ``domain`` is the mixture's name for the domain (not a column of the data), which is what
    :class:`~composer_ext.algorithms.DomainUpsampling` counts by; ``uid`` is passed on when the data has it.

    Args:
        dataset: The domain's samples (map-style or a Streaming ``StreamingDataset``), with a ``text`` column.
        name: The domain's name in the mixture.
        tokenizer: The run's tokenizer (a Hugging Face tokenizer).
        max_seq_len: Most tokens kept per sample.

    Example:
        .. code-block:: python

            from composer_ext.data import ensure_corpus
            from composer_ext.data.mds import MDSDataset
            corpus = ensure_corpus()
            rows = DomainTokens(MDSDataset(corpus.path('math')), 'math', corpus.load_tokenizer(), max_seq_len=64)
            rows.use_tokens, rows[0]['domain']    # (True, 'math'): the corpus tokenizer wrote the tokens column
    """

    def __init__(self, dataset: Any, name: str, tokenizer: Any, max_seq_len: int):
        if not isinstance(name, str) or not name:
            raise ValueError(f'name={name!r} is not a domain name. Fix: use a non-empty string.')
        if tokenizer is None or not callable(tokenizer):
            raise ValueError(f'tokenizer={tokenizer!r} is not a tokenizer. Fix: pass the run\'s Hugging Face '
                             f'tokenizer.')
        if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, numbers.Integral) or max_seq_len < 2:
            raise ValueError(f'max_seq_len={max_seq_len!r} is invalid. Fix: use an int >= 2.')
        if not hasattr(dataset, '__getitem__') or not hasattr(dataset, '__len__'):
            raise TypeError(f'the dataset of domain {name!r} is a {type(dataset).__name__}, which has no random '
                            f'access. Fix: pass a map-style dataset or a Streaming StreamingDataset.')
        self.dataset, self.name, self.tokenizer, self.max_seq_len = dataset, name, tokenizer, int(max_seq_len)
        self.size = _domain_size(dataset)
        if self.size:
            first = dataset[0]
            if not isinstance(first, Mapping) or not isinstance(first.get('text'), str):
                columns = sorted(first) if isinstance(first, Mapping) else type(first).__name__
                raise ValueError(f'domain {name!r} has no text column (its samples have {columns}), so its samples '
                                 f"cannot be tokenized with the run's tokenizer, nor a tokens column checked against "
                                 f'it. Fix: write the data with a text column (streaming.MDSWriter columns '
                                 f"{{'text': 'str', ...}}); a tokens column next to it is used when the run's "
                                 f'tokenizer wrote it.')
        self.use_tokens = tokens_written_by(dataset, tokenizer)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.dataset[index]
        if self.use_tokens:
            tokens = np.asarray(sample['tokens']).ravel()[:self.max_seq_len].astype(np.int64)
        else:
            tokens = np.asarray(encode_text(self.tokenizer, sample['text'], self.max_seq_len), dtype=np.int64)
        row: dict[str, Any] = {'tokens': tokens, 'domain': self.name}
        if 'uid' in sample:
            row['uid'] = sample['uid']
        return row

    def __repr__(self) -> str:
        return (f'DomainTokens(<{type(self.dataset).__name__} of {self.size} samples>, {self.name!r}, '
                f'tokenizer=<{type(self.tokenizer).__name__}>, max_seq_len={self.max_seq_len})')


def count_lm_tokens(batch: Mapping[str, Any]) -> dict[str, int]:
    """Tokens in an LM batch for Composer: ``total`` real (``attention_mask``) tokens and ``loss_generating``
    ones (labels after the first position that are not ``-100``), as llm-foundry's loaders count them, so that
    ``accumulate_train_batch_on_tokens`` weighs microbatches by the tokens that carry loss."""
    labels = batch['labels']
    return {'total': int(batch['attention_mask'].sum().item()),
            'loss_generating': int((labels[..., 1:] != -100).sum().item())}


# --- the one builder of both front ends ----------------------------------------------------------------------


def build_mixture_dataspec(
    datasets: Mapping[str, Any],
    tokenizer: Any,
    device_batch_size: int,
    max_seq_len: int,
    weights: Optional[Mapping[str, float]] = None,
    normalize: bool = False,
    num_samples: Optional[int] = None,
    seed: int = 0,
    shuffle: bool = True,
    sampling: Literal['stratified', 'random'] = 'stratified',
    num_workers: int = 0,
    drop_last: bool = True,
    **loader_kwargs: Any,
) -> DataSpec:
    """A Composer ``DataSpec`` of LM batches from a :class:`MixtureDataset` over per-domain datasets.

    What both ``text_mixture`` front ends build: :func:`build_mixture_dataloader` (``composer-ext run``, per-domain
    ``MDSDataset`` s and the corpus tokenizer) and
    :func:`~composer_ext.domain_upsampling.foundry_loader.build_text_mixture_dataloader` (llm-foundry, per-domain
    Streaming ``StreamingDataset`` s and the run's tokenizer). Each domain becomes :class:`DomainTokens` (text
    tokenized with ``tokenizer``; a ``tokens`` column only when that tokenizer wrote it). Batches are
    ``input_ids`` (padded to ``max_seq_len``, an EOS appended to samples that have room), ``attention_mask``,
    ``labels`` (``-100`` on padding), and the rows' ``domain`` (and ``uid``) lists. The mix is fixed (``weights``,
    default: in proportion to each domain's samples) until :class:`~composer_ext.algorithms.DomainUpsampling`
    installs its schedule at ``FIT_START``. The loader is a :class:`MixtureDataLoader`.

    Args:
        datasets: Domain name -> its samples (map-style or Streaming ``StreamingDataset``, with a ``text`` column).
        tokenizer: The tokenizer of the model being trained.
        device_batch_size: Samples per rank per batch.
        max_seq_len: Tokens per row.
        weights: Domain -> sampling weight (every domain named); default: the natural mix.
        normalize: Rescale ``weights`` to sum to 1.
        num_samples: Global samples per epoch (trimmed to whole global batches); default: all domains' samples.
        seed: Seed of the domain choices and of the within-domain order.
        shuffle: Read each domain in a seeded permutation (else in index order).
        sampling: ``'stratified'`` or ``'random'`` domain choices (see :class:`MixtureDataset`).
        num_workers: DataLoader worker processes.
        drop_last: Passed to the DataLoader (an epoch is whole global batches anyway).
        **loader_kwargs: Other ``DataLoader`` arguments (``pin_memory``, ``prefetch_factor``, ...).

    Example:
        .. code-block:: python

            from composer_ext.data import ensure_corpus
            from composer_ext.data.mds import MDSDataset
            corpus = ensure_corpus()
            spec = build_mixture_dataspec({d: MDSDataset(corpus.path(d)) for d in ('math', 'code')},
                                          corpus.load_tokenizer(), device_batch_size=8, max_seq_len=64)
            batch = next(iter(spec.dataloader))   # input_ids (8, 64), attention_mask, labels, domain, uid
    """
    if not isinstance(datasets, Mapping) or not datasets:
        raise ValueError(f'datasets={datasets!r} is not a non-empty mapping of domain -> dataset. Fix: pass e.g. '
                         f"{{'code': code_dataset, 'math': math_dataset}}.")
    if isinstance(num_workers, bool) or not isinstance(num_workers, numbers.Integral) or num_workers < 0:
        raise ValueError(f'num_workers={num_workers!r} is invalid. Fix: use an int >= 0.')
    domains = {name: DomainTokens(dataset, name, tokenizer, max_seq_len) for name, dataset in datasets.items()}
    sizes = {name: len(rows) for name, rows in domains.items()}
    total = sum(sizes.values())
    if weights is None:
        if total == 0:
            raise ValueError(f'every domain is empty ({sizes}). Fix: point the domains at data.')
        schedule = MixtureSchedule.constant({name: size / total for name, size in sizes.items()}, normalize=True)
    else:
        schedule = MixtureSchedule.constant(dict(weights), normalize=normalize)
    dataset = MixtureDataset(domains, schedule, num_samples=total if num_samples is None else num_samples, seed=seed,
                             shuffle=shuffle, sampling=sampling, batch_size=device_batch_size)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collator = LMCollator(0 if pad is None else pad, int(max_seq_len), tokenizer.eos_token_id)
    loader = MixtureDataLoader(dataset, batch_size=device_batch_size, num_workers=int(num_workers),
                               drop_last=drop_last, collate_fn=collator, **loader_kwargs)
    return DataSpec(loader, get_num_tokens_in_batch=count_lm_tokens)


# --- composer-ext run's YAML dataloader over the embedded corpus ------------------------------------------------


def build_mixture_dataloader(
    batch_size: int,
    domains: Union[str, Sequence[str], None] = None,
    weights: Optional[dict] = None,
    num_samples: Optional[int] = None,
    local: Optional[dict] = None,
    split: str = 'train',
    seq_len: int = 128,
    seed: int = 0,
    shuffle: bool = True,
    sampling: Literal['stratified', 'random'] = 'stratified',
    normalize: bool = False,
    num_workers: int = 0,
):
    """A Composer ``DataSpec`` of LM batches from a :class:`MixtureDataset` over per-domain MDS directories.

    ``composer-ext run``'s ``text_mixture``: each domain is read by an :class:`MDSDataset` (memory-mapped MDS shards)
    and tokenized with the corpus tokenizer, through :func:`build_mixture_dataspec` (the builder llm-foundry's
    ``text_mixture`` uses too). The mix is fixed (``weights``) unless a
    :class:`~composer_ext.algorithms.DomainUpsampling` algorithm installs its schedule at ``FIT_START``. The
    loader is a :class:`MixtureDataLoader`, so every epoch serves new samples with or without workers.

    Args:
        batch_size: The GLOBAL batch size (split evenly over ranks).
        domains: Embedded corpus domains (``'all'``, a name or a list); the default when ``local`` is unset.
        weights: Domain -> sampling weight; default: in proportion to each domain's samples (the natural mix).
        num_samples: Global samples per epoch; default: the domains' samples together. Trimmed to whole
            global batches.
        local: Your own data instead: domain name -> MDS directory with a ``text`` column (its ``tokens``
            column is used when the corpus tokenizer wrote it, see :func:`tokens_written_by`).
        split: ``train`` or ``val`` of the embedded corpus.
        seq_len: Tokens per row.
        seed: Seed of the domain choices and the within-domain order.
        shuffle: Read each domain in a seeded permutation.
        sampling: ``'stratified'`` or ``'random'`` domain choices (see :class:`MixtureDataset`).
        normalize: Rescale ``weights`` to sum to 1.
        num_workers: DataLoader worker processes.
    """
    per_rank = per_rank_batch_size(batch_size)
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f'num_workers={num_workers!r} is invalid. Fix: use an int >= 0.')
    corpus = ensure_corpus()
    if local is not None:
        if domains is not None:
            raise ValueError('Give either domains= (embedded corpus) or local= (your own MDS directories), not both.')
        if not isinstance(local, Mapping) or not local:
            raise ValueError(f'local={local!r} is not a mapping of domain -> MDS directory. Fix: pass e.g. '
                             f"{{'code': '/data/code/train'}}.")
        directories = {str(name): Path(path) for name, path in local.items()}
        for name, path in directories.items():
            if not (path / 'index.json').exists():
                raise ValueError(f'local[{name!r}]={str(path)!r} is not an MDS directory (no index.json). Fix: point '
                                 f'it at a directory written by streaming.MDSWriter.')
    else:
        directories = {d: corpus.path(d, split) for d in corpus_domains(corpus, domains or 'all')}
    return build_mixture_dataspec({name: MDSDataset(path) for name, path in directories.items()},
                                  corpus.load_tokenizer(), per_rank, seq_len, weights=weights, normalize=normalize,
                                  num_samples=num_samples, seed=seed, shuffle=shuffle, sampling=sampling,
                                  num_workers=num_workers)
