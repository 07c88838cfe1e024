"""Domain upsampling over remote Streaming shards: MixtureDataset reads each domain in Streaming's shard-local order,
fetches ahead, refuses a cache too small for its window, and never hangs on a pass dropped mid-download.

The remote is simulated: small MDS shards written from the embedded corpus into a local directory given as
``remote``, a fresh ``local`` cache per test holding about 10% of each domain. Downloads are counted by wrapping
Streaming's real download call (``Stream._download_file``) so that each call appends a line to a file (which
DataLoader workers and gloo ranks write too).

Several nodes are simulated by gloo processes that are each a node of their own (one rank per node) with their own
cache directory: each node reads its own part of every Streaming domain (Streaming's split of an epoch over physical
nodes), downloads only its own shards, and resumes its own draw counts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Optional

import numpy as np
import pytest

from composer_ext.domain_upsampling.mixture import MixtureDataLoader, MixtureDataset
from composer_ext.domain_upsampling.schedule import MixtureSchedule
from composer_ext.testing import run_distributed

DOMAINS = ('code', 'math', 'prose')
SAMPLES = 1600  # per domain
SHARD_BYTES = 7_000  # about 20 samples per shard, 80-odd shards per domain
BASE = {'code': 0.4, 'math': 0.3, 'prose': 0.3}
TARGET = {'code': 0.2, 'math': 0.6, 'prose': 0.2}
BATCH = 4


def write_remote(root: Path, samples: int = SAMPLES, shard_bytes: int = SHARD_BYTES) -> dict:
    """Per-domain MDS directories of small shards under ``root`` (the simulated remote); returns its layout."""
    from streaming import MDSWriter

    from composer_ext.data import ensure_corpus
    from composer_ext.data.mds import MDSDataset

    corpus = ensure_corpus()
    layout = {}
    for domain in DOMAINS:
        source = MDSDataset(corpus.path(domain, 'train'))
        with MDSWriter(out=str(root / domain), columns={'text': 'str', 'tokens': 'ndarray:uint16', 'uid': 'str'},
                       size_limit=shard_bytes) as writer:
            for index in range(samples):
                row = source[index]
                # Cut to a fixed size, so that shards hold about the same number of samples.
                writer.write({'text': row['text'][:200].ljust(200), 'tokens': row['tokens'][:48], 'uid': row['uid']})
        index = json.loads((root / domain / 'index.json').read_text())
        sizes = [shard['samples'] for shard in index['shards']]
        layout[domain] = {'shard_of_uid': {}, 'bytes': sum(s['raw_data']['bytes'] for s in index['shards']),
                          'shards': len(sizes), 'index_bytes': (root / domain / 'index.json').stat().st_size}
        offsets = np.cumsum([0] + sizes)
        for i in range(samples):
            layout[domain]['shard_of_uid'][source[i]['uid']] = int(np.searchsorted(offsets, i, side='right') - 1)
    return layout


def count_downloads(log: Path) -> None:
    """Wrap Streaming's real download call so that every shard download appends its file name to ``log``."""
    from streaming.base.stream import Stream

    if getattr(Stream._download_file, 'counted_into', None) == str(log):
        return
    real = getattr(Stream._download_file, 'real', Stream._download_file)

    def download_file(self, from_basename, to_basename=None):
        local = real(self, from_basename, to_basename)
        if from_basename.startswith('shard.'):
            with open(log, 'a') as out:
                out.write(f'{self.remote}/{from_basename}\n')
        return local

    download_file.real, download_file.counted_into = real, str(log)
    Stream._download_file = download_file


def open_domains(remote: Path, cache: Path, layout: dict, cache_fraction: float = 0.1, **kwargs) -> dict:
    from streaming import StreamingDataset

    domains = {}
    for domain in DOMAINS:
        limit = int(cache_fraction * layout[domain]['bytes']) + layout[domain]['index_bytes']
        domains[domain] = StreamingDataset(remote=str(remote / domain), local=str(cache / domain), batch_size=BATCH,
                                           shuffle=False, cache_limit=limit, **kwargs)
    return domains


def distinct_shards(rows: list, layout: dict) -> int:
    return len({(row['domain'], layout[row['domain']]['shard_of_uid'][row['uid']]) for row in rows})


def downloads(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


class _Named:
    """A domain dataset that adds its domain's name to each sample (as DomainTokens does), holding the
    StreamingDataset as ``.dataset``."""

    def __init__(self, dataset, name):
        self.dataset, self.name = dataset, name

    def __len__(self):
        return self.dataset.num_samples

    def __getitem__(self, index):
        return {**self.dataset[index], 'domain': self.name}


def mixture(domains: dict, num_samples: int, batch_size: int = BATCH, **kwargs) -> MixtureDataset:
    return MixtureDataset({d: _Named(ds, d) for d, ds in domains.items()},
                          MixtureSchedule(BASE, TARGET, start='0.5dur'), num_samples=num_samples, seed=3,
                          batch_size=batch_size, **kwargs)


@pytest.fixture(scope='module')
def remote(tmp_path_factory):
    root = tmp_path_factory.mktemp('remote')
    return root, write_remote(root)


# --- downloads per pass -----------------------------------------------------------------------------------


@pytest.mark.parametrize('num_workers', [0, 2])
def test_reads_in_shard_order_download_each_shard_about_once(remote, tmp_path, num_workers):
    root, layout = remote
    log = tmp_path / 'downloads.log'
    count_downloads(log)
    dataset = mixture(open_domains(root, tmp_path / 'cache', layout), num_samples=3600)
    loader = MixtureDataLoader(dataset, batch_size=BATCH, num_workers=num_workers, collate_fn=list)
    rows = [row for batch in loader for row in batch]
    assert len(rows) == 3600
    needed = distinct_shards(rows, layout)
    # About 75% of each domain's samples are read, in shard order: the shards of a pass, once each.
    assert needed > 0.6 * sum(layout[d]['shards'] for d in DOMAINS)
    assert downloads(log) <= 1.2 * needed, (downloads(log), needed)
    # The same samples as a fresh copy read in the main process: the order does not depend on the workers.
    again = mixture(open_domains(root, tmp_path / 'cache2', layout), num_samples=3600)
    assert [r['uid'] for r in again] == [r['uid'] for r in rows]


def _rank_reads(root: str, cache: str, layout: dict, log: str) -> dict:
    from composer.utils import dist

    count_downloads(Path(log))
    dataset = mixture(open_domains(Path(root), Path(cache), layout), num_samples=3000)
    rows = []
    for batch in MixtureDataLoader(dataset, batch_size=BATCH, num_workers=0, collate_fn=list):
        rows += batch
        dist.barrier()  # the ranks of a training run stay in step (each step's gradients are reduced together)
    return {'rank': dist.get_global_rank(), 'rows': [(r['domain'], r['uid']) for r in rows]}


@pytest.mark.distributed
def test_two_ranks_read_disjoint_samples_and_share_the_node_cache(remote, tmp_path):
    root, layout = remote
    log = tmp_path / 'downloads.log'
    ranks = run_distributed(_rank_reads, world_size=2, args=(str(root), str(tmp_path / 'cache'), layout, str(log)),
                            timeout=600)
    zero, one = ranks[0]['rows'], ranks[1]['rows']
    assert len(zero) == len(one) == 1500
    assert not {u for _, u in zero} & {u for _, u in one}  # every domain is still in its first pass
    rows = [{'domain': d, 'uid': u} for d, u in zero + one]
    needed = distinct_shards(rows, layout)
    assert downloads(log) <= 1.2 * needed, (downloads(log), needed)
    # The global sequence is the single-process one (ranks interleave), as for local data.
    # One process with the global batch of the two ranks (the switch lands on a global batch boundary).
    single = mixture(open_domains(root, tmp_path / 'single', layout), num_samples=3000, batch_size=2 * BATCH)
    assert [x for pair in zip(zero, one) for x in pair] == [(r['domain'], r['uid']) for r in single]


def test_the_fetcher_skips_a_shard_whose_read_the_reader_has_passed(remote, tmp_path, monkeypatch):
    """A need the reader got to first is dropped, not fetched late: with fast DataLoader workers the fetcher lagged
    and brought back shards read to their end and evicted since (1.2-1.7x the shards of a pass)."""
    import threading

    from composer_ext.domain_upsampling import shard_order

    root, layout = remote
    log = tmp_path / 'downloads.log'
    count_downloads(log)
    dataset = mixture(open_domains(root, tmp_path / 'cache', layout), num_samples=400)
    with monkeypatch.context() as patch:  # build the fetcher without its thread, to run it once the reader has moved
        patch.setattr(threading.Thread, 'start', lambda self: None)
        fetcher = shard_order.ShardFetcher(dataset._orders, dataset._owners, timeout=60)
    passed, ahead = 3, 9  # two shards of domain 0 that nobody has fetched
    states = dataset._orders[0].dataset._shard_states
    assert states[passed] == states[ahead] == shard_order._REMOTE
    fetcher.extend(np.array([0, 0]), np.array([passed, ahead]))
    fetcher._position = 1  # the reader is past read 0 (the first read of shard `passed`)
    thread = threading.Thread(target=fetcher._run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while states[ahead] != shard_order._LOCAL and time.monotonic() < deadline:
        time.sleep(0.01)
    fetcher.close()
    thread.join(5)
    assert states[ahead] == shard_order._LOCAL  # the upcoming read's shard is fetched ahead
    assert states[passed] == shard_order._REMOTE and downloads(log) == 1, log.read_text()


def test_a_suspended_reader_leaves_its_fetcher_asleep(remote, tmp_path):
    """An iterator kept but not advanced (a paused training loop, a pass abandoned without being closed) must cost
    nothing: with its prefetch full the fetcher sleeps until the reader moves (it polled every 2 ms, ~950 wake-ups
    in 2 s), and wakes when the reader does move."""
    import threading

    def wake_ups(thread) -> int:
        status = Path(f'/proc/self/task/{thread.native_id}/status').read_text()
        return int(status.split('voluntary_ctxt_switches:')[1].split()[0])

    root, layout = remote
    dataset = mixture(open_domains(root, tmp_path / 'cache', layout), num_samples=3600)
    rows = iter(dataset)
    taken = [next(rows) for _ in range(200)]
    fetchers = [t for t in threading.enumerate() if t.name == 'mixture-shard-prefetch' and t.is_alive()]
    deadline = time.monotonic() + 30  # until the fetcher has filled its prefetch and waits
    before = wake_ups(fetchers[-1])
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = wake_ups(fetchers[-1])
        if now - before <= 2:
            break
        before = now
    before = wake_ups(fetchers[-1])
    time.sleep(2)
    assert wake_ups(fetchers[-1]) - before <= 5
    taken += list(rows)  # the pass completes once the reader moves again, with the samples of an unpaused one
    again = mixture(open_domains(root, tmp_path / 'cache2', layout), num_samples=3600)
    assert [r['uid'] for r in taken] == [r['uid'] for r in again]


# --- resumption -------------------------------------------------------------------------------------------


def test_resume_after_the_switch_with_a_changed_schedule_continues_each_domain(remote, tmp_path):
    from composer_ext.data.mds import MDSDataset

    root, layout = remote
    total, stop = 3000, 2000  # the switch is at 1500: stop after it
    full = mixture(open_domains(root, tmp_path / 'full', layout), num_samples=total)
    uninterrupted = [r['uid'] for r in full]
    first = mixture(open_domains(root, tmp_path / 'first', layout), num_samples=total)
    served = [r['uid'] for _, r in zip(range(stop), first)]
    assert served == uninterrupted[:stop]
    state = first.state_dict(stop, from_beginning=True)
    resumed = mixture(open_domains(root, tmp_path / 'resumed', layout), num_samples=total)
    resumed.load_state_dict(state)
    assert [r['uid'] for r in resumed] == uninterrupted[stop:]
    # A changed schedule after the resume: each domain continues Streaming's order of its pass from the saved draw
    # count, so no sample of the first part comes again before its domain's pass is over.
    changed = mixture(open_domains(root, tmp_path / 'changed', layout), num_samples=total)
    changed.load_state_dict(state)
    changed.bind(MixtureSchedule(BASE, {'code': 0.8, 'math': 0.1, 'prose': 0.1}, start='0.5dur'), total)
    rest = list(changed)
    assert len(rest) == total - stop
    assert sum(r['domain'] == 'code' for r in rest) > 0.7 * len(rest)
    assert not {r['uid'] for r in rest} & set(served)
    for index, domain in enumerate(DOMAINS):
        mine = [r['uid'] for r in rest if r['domain'] == domain]
        start = state['draws'][domain]
        assert start + len(mine) <= SAMPLES  # still the first pass of the domain
        order = changed._orders[index].order(0)[start:start + len(mine)]
        source = MDSDataset(root / domain)
        assert mine == [source[int(i)]['uid'] for i in order]


# --- a cache too small, a pass dropped mid-download, a shard that never comes --------------------------------


def test_a_cache_too_small_for_the_window_is_refused_at_construction(remote, tmp_path):
    root, layout = remote
    domains = open_domains(root, tmp_path / 'cache', layout, cache_fraction=0.1, shuffle_block_size=2000)
    with pytest.raises(ValueError, match=r"domains\['code'\] has cache_limit=.* Fix: raise cache_limit to at least"):
        mixture(domains, num_samples=400)
    fits = mixture(open_domains(root, tmp_path / 'small', layout), num_samples=400)
    with pytest.raises(ValueError, match=r'draws in flight .* Fix: raise cache_limit'):
        MixtureDataLoader(fits, batch_size=BATCH, num_workers=16)


_ABANDON = textwrap.dedent('''
    import sys, time
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from streaming.base.stream import Stream
    import test_domain_upsampling_streaming as t
    from composer_ext.domain_upsampling.mixture import MixtureDataLoader

    root, cache, layout = Path({root!r}), Path({cache!r}), t.json.loads(Path({layout!r}).read_text())
    real = Stream._download_file
    def slow(self, *args, **kwargs):  # 1 s per shard: a pass is dropped while its workers download
        time.sleep(1.0)
        return real(self, *args, **kwargs)
    Stream._download_file = slow
    dataset = t.mixture(t.open_domains(root, cache, layout), num_samples=400)
    loader = MixtureDataLoader(dataset, batch_size=t.BATCH, num_workers=2, collate_fn=list)
    it = iter(loader)
    next(it)
    time.sleep(0.5)
    del it  # dropped mid-download: its workers are shut down while downloading
    Stream._download_file = real
    start = time.time()
    rows = [row for batch in loader for row in batch]
    print('SECOND_PASS', len(rows), round(time.time() - start, 1))
''')


def test_a_pass_dropped_mid_download_does_not_hang_the_next(remote, tmp_path):
    root, layout = remote
    (tmp_path / 'layout.json').write_text(json.dumps(layout))
    script = _ABANDON.format(tests=str(Path(__file__).parent), root=str(root), cache=str(tmp_path / 'cache'),
                             layout=str(tmp_path / 'layout.json'))
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    done = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    line = [x for x in done.stdout.splitlines() if x.startswith('SECOND_PASS')][0]
    assert int(line.split()[1]) == 400


def test_a_shard_that_never_becomes_ready_raises_after_the_timeout(remote, tmp_path):
    from composer_ext.domain_upsampling.shard_order import ShardTimeoutError

    root, layout = remote
    domains = open_domains(root, tmp_path / 'cache', layout)
    dataset = mixture(domains, num_samples=400, shard_timeout=1.0)
    streaming = domains['math']
    # Another (live) process is preparing every shard of math and never finishes.
    states = streaming._shard_states
    for shard in range(streaming.num_shards):
        if states[shard] == 1:
            states[shard] = 2
    start = time.monotonic()
    with pytest.raises(ShardTimeoutError, match=r"of domain 'math' did not become ready within shard_timeout=1 s"):
        list(dataset)
    assert time.monotonic() - start < 30


# --- several nodes: each reads its own part of every Streaming domain ------------------------------------------
#
# Two gloo processes, each its own node (LOCAL_WORLD_SIZE=1, NODE_RANK=rank) with its own cache directory, as two
# machines would have. Each domain has 1600 samples and no num_canonical_nodes, so 2 canonical nodes (one per node):
# node n reads canonical node n's 800 entries of each pass's order.

NODES_SAMPLES = 4000  # per node 2000 positions: about 900 math draws (a whole pass of its 800, and more), 600 code
NODES_STOP = 2400  # mid-epoch and after the switch (2000); math passes its 800th draw per node after the resume


def _as_node() -> int:
    """Make this gloo process a node of its own (one rank per node, as Composer's launcher on N machines sets it)."""
    from composer.utils import dist

    rank = dist.get_global_rank()
    os.environ.update({'LOCAL_WORLD_SIZE': '1', 'LOCAL_RANK': '0', 'NODE_RANK': str(rank)})
    return rank


def _open_on_own_machine(root: Path, cache: Path, layout: dict) -> dict:
    """``open_domains`` as a node's only process on its own machine does it.

    Separate machines have separate shared memory; the simulated nodes share this machine's. Streaming registers a
    shared-memory prefix by looking for a free one, waiting at a barrier over all ranks, then creating it, so two
    simulated nodes would pick the same prefix and one would fail. Here the nodes open one after the other (the
    machine-wide lock our other jobs take, core.streaming.PREFIX_LOCK) and skip Streaming's barriers meanwhile, which
    on separate machines only wait for the other node.
    """
    from unittest import mock

    import torch.distributed

    from composer_ext.core.streaming import PREFIX_LOCK
    from composer_ext.storage import file_lock

    with file_lock(PREFIX_LOCK), mock.patch.object(torch.distributed, 'barrier', lambda *args, **kwargs: None):
        return open_domains(root, cache, layout)


def _node_reads(root: str, work: str, layout: dict, num_samples: int, stop: Optional[int] = None,
                state: Optional[dict] = None, changed: Optional[dict] = None) -> dict:
    """One node's rows of a 2-node run (from ``state`` when given; ``stop``: global samples to read, then save)."""
    from composer.utils import dist

    node = _as_node()
    log = Path(work) / f'downloads-node{node}.log'
    count_downloads(log)
    dataset = mixture(_open_on_own_machine(Path(root), Path(work) / f'cache-node{node}', layout),
                      num_samples=num_samples)
    assert (dataset.node, dataset.num_nodes) == (node, 2)
    if state is not None:
        dataset.load_state_dict(state)
    if changed is not None:
        dataset.bind(MixtureSchedule(BASE, changed, start='0.5dur'), num_samples)
    rows = []
    for batch in MixtureDataLoader(dataset, batch_size=BATCH, num_workers=0, collate_fn=list):
        rows += batch
        dist.barrier()  # the nodes of a training run stay in step
        if stop is not None and len(rows) * dist.get_world_size() >= stop:
            break
    orders = {dataset.domain_names[d]: [o.algo, o.seed, o.block, o.canonical_nodes, o.part_size]
              for d, o in dataset._orders.items()}
    result = {'node': node, 'rows': [(r['domain'], r['uid']) for r in rows], 'downloads': downloads(log),
              'orders': orders}
    if stop is not None:  # the checkpoint: Composer saves rank 0's dataset state and loads it on every rank
        result['state'] = dataset.state_dict(stop, from_beginning=True)
    if state is not None:  # what each domain's reads continue: this node's part from its saved draw count
        result['continues'] = {}
        for d, order in dataset._orders.items():
            name = dataset.domain_names[d]
            start = state['node_draws'][node][name]
            count = sum(domain == name for domain, _ in result['rows'])
            result['continues'][name] = [int(order.part(k // order.part_size)[k % order.part_size])
                                         for k in range(start, start + count)]
    return result


def _two_nodes(work: Path, remote_root: Path, layout: dict, **kwargs) -> list:
    work.mkdir(parents=True, exist_ok=True)
    return run_distributed(_node_reads, world_size=2, args=(str(remote_root), str(work), layout, NODES_SAMPLES),
                           kwargs=kwargs, timeout=540)


@pytest.fixture(scope='module')
def two_nodes(remote, tmp_path_factory):
    """An uninterrupted 2-node run of NODES_SAMPLES samples from empty caches."""
    root, layout = remote
    return _two_nodes(tmp_path_factory.mktemp('two-nodes'), root, layout)


@pytest.fixture(scope='module')
def two_nodes_stopped(remote, tmp_path_factory):
    """The same run stopped (killed) after NODES_STOP samples, with the dataset state rank 0 saved then."""
    root, layout = remote
    return _two_nodes(tmp_path_factory.mktemp('two-nodes-stopped'), root, layout, stop=NODES_STOP)


def _uids_by_index(root: Path, domain: str) -> list:
    from composer_ext.data.mds import MDSDataset

    source = MDSDataset(root / domain)
    return [source[i]['uid'] for i in range(len(source))]


@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_two_nodes_read_disjoint_parts_that_together_are_each_domain_once(remote, two_nodes):
    from streaming.base.partition import get_partitions
    from streaming.base.shuffle import get_shuffle

    root, layout = remote
    assert [len(node['rows']) for node in two_nodes] == [NODES_SAMPLES // 2] * 2
    passed = []
    for domain in DOMAINS:
        mine = [[uid for d, uid in node['rows'] if d == domain] for node in two_nodes]
        # Every pass of a node reads its own part: the nodes never read the same sample.
        assert not set(mine[0]) & set(mine[1]), domain
        algo, seed, block, canonical, part = two_nodes[0]['orders'][domain]
        assert canonical == 2 and part == SAMPLES // 2 == two_nodes[1]['orders'][domain][4]
        # Streaming's own split of its shuffled epoch over 2 physical nodes: node n's sample ids.
        index = json.loads((root / domain / 'index.json').read_text())
        sizes = np.array([shard['samples'] for shard in index['shards']], dtype=np.int64)
        order = get_shuffle(algo, sizes, canonical, seed, 0, block)
        positions = get_partitions('orig', SAMPLES, canonical, 2, 1, 1, 1)
        uids = _uids_by_index(root, domain)
        for n in range(2):
            first_pass = mine[n][:part]
            assert len(set(first_pass)) == len(first_pass)  # no sample twice within a node's pass
            ids = positions[n].ravel()
            assert set(first_pass) <= {uids[int(i)] for i in order[ids[ids >= 0]]}, (domain, n)
        if all(len(m) >= part for m in mine):  # the pass is over on both nodes: together, the domain once
            passed.append(domain)
            assert sorted(mine[0][:part] + mine[1][:part]) == sorted(uids)
    assert 'math' in passed  # math (about 900 draws per node) completes its pass of 800 on each node


@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_two_nodes_download_their_own_shards_about_once(remote, two_nodes):
    root, layout = remote
    shards = []
    for node in two_nodes:
        rows = [{'domain': d, 'uid': u} for d, u in node['rows']]
        needed = distinct_shards(rows, layout)
        assert node['downloads'] <= 1.2 * needed, (node['node'], node['downloads'], needed)
        shards.append({(r['domain'], layout[r['domain']]['shard_of_uid'][r['uid']]) for r in rows})
    # Disjoint shard sets, but for the shard py1e's split cuts at the boundary of the two canonical nodes of a
    # domain (each holds part of its samples; Streaming's nodes share it too): at most one per domain.
    shared = shards[0] & shards[1]
    for domain in DOMAINS:
        assert len([s for d, s in shared if d == domain]) <= 1, sorted(shared)
    # Together about the shards of one pass, not one per node.
    total = sum(node['downloads'] for node in two_nodes)
    assert total <= 1.2 * len(shards[0] | shards[1]) + len(DOMAINS), (total, len(shards[0] | shards[1]))


@pytest.mark.distributed
@pytest.mark.timeout(900)
def test_two_nodes_killed_and_resumed_mid_epoch_read_the_same_samples(remote, two_nodes, two_nodes_stopped,
                                                                       tmp_path):
    root, layout = remote
    state = two_nodes_stopped[0]['state']
    assert state['num_nodes'] == 2 and 0 < state['sample_in_epoch'] < NODES_SAMPLES
    assert state['draws'] == {d: sum(row[d] for row in state['node_draws']) for d in DOMAINS}
    half = NODES_STOP // 2
    for node, stopped in zip(two_nodes, two_nodes_stopped):
        assert stopped['rows'] == node['rows'][:half]
    resumed = _two_nodes(tmp_path / 'resumed', root, layout, state=state)
    for node, again in zip(two_nodes, resumed):
        assert again['rows'] == node['rows'][half:], again['node']
    # A changed schedule after the resume: each node continues its own part of each domain from its saved count.
    changed = _two_nodes(tmp_path / 'changed', root, layout, state=state,
                         changed={'code': 0.8, 'math': 0.1, 'prose': 0.1})
    for node in changed:
        assert len(node['rows']) == (NODES_SAMPLES - NODES_STOP) // 2
        assert sum(d == 'code' for d, _ in node['rows']) > 0.7 * len(node['rows'])
        for domain in DOMAINS:
            uids = _uids_by_index(root, domain)
            assert [u for d, u in node['rows'] if d == domain] == [uids[i] for i in node['continues'][domain]]
        # code passes its 800 draws on each node: its second pass begins in the same part again.
        assert state['node_draws'][node['node']]['code'] + len(node['continues']['code']) > SAMPLES // 2


@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_a_state_from_another_number_of_nodes_is_refused_with_streaming_domains(remote, two_nodes_stopped,
                                                                                  tmp_path):
    from composer_ext.data.mds import MDSDataset

    root, layout = remote
    state = two_nodes_stopped[0]['state']
    one_node = mixture(open_domains(root, tmp_path / 'cache', layout), num_samples=NODES_SAMPLES)
    assert one_node.num_nodes == 1
    with pytest.raises(ValueError, match=r"written on num_nodes=2 node\(s\), but this run has 1 node\(s\) "
                                         r"\(world_size=1 / local_world_size=1\).* Fix: resume on 2 node\(s\)"):
        one_node.load_state_dict(state)
    # Map-style domains read by the global count: a state from 2 nodes continues them exactly on 1 node, and so
    # does a state from before per-node counts.
    def local_mixture():
        return MixtureDataset({d: MDSDataset(root / d) for d in DOMAINS}, MixtureSchedule(BASE, TARGET, start='0.5dur'),
                              num_samples=NODES_SAMPLES, seed=3, batch_size=BATCH)

    uninterrupted = [r['uid'] for r in local_mixture()]
    for saved in (state, {k: v for k, v in state.items() if k not in ('num_nodes', 'node_draws')}):
        resumed = local_mixture()
        resumed.load_state_dict(saved)
        assert [r['uid'] for r in resumed] == uninterrupted[NODES_STOP:]


@pytest.mark.timeout(120)
def test_node_parts_are_streamings_split_of_an_epoch_over_physical_nodes(remote, tmp_path):
    from streaming.base.partition import get_partitions

    from composer_ext.domain_upsampling.shard_order import ShardOrder, node_spans

    for samples, canonical, nodes in [(1600, 2, 2), (1601, 4, 2), (1603, 6, 3), (97, 8, 4), (1600, 3, 1)]:
        parts = []
        for node in range(nodes):
            spans = node_spans(samples, canonical, node, nodes)
            part = [i for begin, end in spans for i in range(begin, end)]
            ids = get_partitions('orig', samples, canonical, nodes, 1, 1, 1)[node].ravel()
            assert set(part) == set(ids[ids >= 0].tolist()), (samples, canonical, nodes, node)
            assert len(part) == len(set(part))  # Streaming repeats a sample of a short span; a part does not
            parts += part
        assert sorted(parts) == list(range(samples))
    # Fewer canonical nodes than physical ones (or not a multiple) would stripe samples of one canonical node, and
    # so the downloads of its shards, over several nodes: refused.
    root, layout = remote
    domains = open_domains(root, tmp_path / 'cache', layout, num_canonical_nodes=3)
    with pytest.raises(ValueError, match=r"domains\['code'\] has num_canonical_nodes=3, which is not a multiple of "
                                         r'the 2 physical nodes.* Fix: set num_canonical_nodes'):
        ShardOrder(domains['code'], 'code', 0, True, 8, 2, node=1, num_nodes=2)
    order = ShardOrder(domains['code'], 'code', 0, True, 8, 2, node=2, num_nodes=3)
    assert order.part_size == SAMPLES - 2 * SAMPLES // 3
    assert order.part(0).tolist() == order.order(0)[2 * SAMPLES // 3:].tolist()


def test_the_remote_benchmark_runs_at_its_defaults(tmp_path):
    """`benchmarks/bench_domain_upsampling.py` at its default cache fraction (a smaller run): a default that the
    mixture's cache check refuses went unnoticed once."""
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, str(root / 'benchmarks' / 'bench_domain_upsampling.py'), '--samples', '480',
                             '--repeats', '1', '--warmup', '0', '--work', str(tmp_path)],
                            capture_output=True, text=True, timeout=600, cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report['samples'] == 480 and report['setup']['workers'] == 2
    assert report['downloads_per_1k_samples']['mixture'] > 0
    assert report['samples_per_second']['mixture'] > 0 and report['samples_per_second']['streaming_own_order'] > 0
