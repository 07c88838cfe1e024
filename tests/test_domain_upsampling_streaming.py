"""Domain upsampling over remote Streaming shards: MixtureDataset reads each domain in Streaming's shard-local order,
fetches ahead, refuses a cache too small for its window, and never hangs on a pass dropped mid-download.

The remote is simulated: small MDS shards written from the embedded corpus into a local directory given as
``remote``, a fresh ``local`` cache per test holding about 10% of each domain. Downloads are counted by wrapping
Streaming's real download call (``Stream._download_file``) so that each call appends a line to a file (which
DataLoader workers and gloo ranks write too)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

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
