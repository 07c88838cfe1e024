"""The embedded multi-domain text corpus: built once from installed packages into MDS shards.

Layout under ``$COMPOSER_EXT_CACHE/corpus/<name>/``::

    manifest.json            sources, bytes/tokens/documents/samples per domain and split, every file's SHA-256
    file_stats.json          size, mtime and ctime of every file when it was last found intact (not content)
    tokenizer/               byte-level BPE (a ``transformers`` tokenizer directory)
    <domain>/train/          MDS shards written by Streaming's MDSWriter
    <domain>/val/

Every MDS sample has the columns ``text`` (str), ``tokens`` (uint16 token ids of ``text``, no special
tokens), ``domain`` (str) and ``uid`` (str, ``<domain>/<document key>#<chunk>``, unique in the corpus).
A sample is a run of whole paragraphs of one document holding at most ``chunk_tokens`` tokens.

The build is a pure function of the installed sources and the :class:`CorpusConfig`: two builds on one
machine produce byte-identical shards and the same manifest hash. Documents go to train or val by a hash
of their key, so no document is split across the two. The manifest hash covers content only (the config,
the statistics, every file's SHA-256): where this install keeps its sources (paths, package versions) is
recorded under the manifest's ``install`` key, outside the hash, so two installs with the same content agree.

Integrity: :func:`ensure_corpus` checks a cache on its first use in a process, cheaply: a file whose size, mtime
and ctime are those recorded in ``file_stats.json`` is trusted, any other file is hashed against the manifest.
:func:`verify_corpus` (``composer-ext data verify``) hashes every file; :func:`repair_corpus`
(``composer-ext data build --repair``) rebuilds what is damaged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from composer_ext.config import ConfigError
from composer_ext.core.provenance import file_sha256, json_sha256, stable_fraction
from composer_ext.data.bpe import read_tokenizer, train_tokenizer
from composer_ext.data.sources import DOMAINS, Document, iter_documents, source_info
from composer_ext.storage import (CACHE_ENV, atomic_dir, atomic_write_json, cache_location, cache_root, file_lock,
                                  is_unwritable, umask)

__all__ = [
    'Corpus',
    'CorpusCacheError',
    'CorpusConfig',
    'MANIFEST',
    'MDS_COLUMNS',
    'build_corpus',
    'chunk_document',
    'corpus_root',
    'damage_error',
    'ensure_corpus',
    'manifest_hash',
    'read_manifest',
    'repair_corpus',
    'verify_corpus',
]

BUILDER_VERSION = 1
SPLITS = ('train', 'val')
MDS_COLUMNS = {'text': 'str', 'tokens': 'ndarray:uint16', 'domain': 'str', 'uid': 'str'}
MANIFEST = 'manifest.json'
FILE_STATS = 'file_stats.json'
REPAIR_COMMAND = 'composer-ext data build --repair'
# Manifest keys that describe this install, not the corpus: kept out of the manifest hash.
INSTALL_KEYS = ('install',)


class CorpusCacheError(ConfigError):
    """The corpus cache is damaged or cannot be written; the message names the cache, the file and the fix.

    A :class:`~composer_ext.config.ConfigError`, so that ``composer-ext COMMAND`` reports it as an error (exit 2)
    and the runner passes it on as it is instead of blaming the YAML key whose component first used the corpus.
    """

    def __init__(self, where: str | Path, problem: str, fix: str):
        super().__init__(str(where), '', problem, fix)

    def __reduce__(self):  # picklable (spawned ranks, DataLoader workers) despite the four-argument constructor
        return (CorpusCacheError, (self.source, self.problem, self.fix))


def _repair_fix(root: Path) -> str:
    base = root.parent.parent
    return (f'run `{REPAIR_COMMAND}` with {CACHE_ENV}={base} (it rebuilds what is damaged; for a corpus of a '
            f'non-default CorpusConfig call composer_ext.data.corpus.repair_corpus(config, cache_dir={str(base)!r})).')


@dataclass(frozen=True)
class CorpusConfig:
    """What to build. The defaults give about 17 MB of text (2-3 MB per domain) that builds in about a minute.

    Args:
        domains: Which of the six domains to include.
        max_bytes_per_domain: Cap on a domain's text; documents are picked in a fixed pseudo-random
            order (by a hash of their key) until the cap is reached.
        val_fraction: Share of each domain's documents that go to the ``val`` split.
        chunk_tokens: Most tokens in one sample.
        vocab_size: Size of the byte-level BPE vocabulary.
        shard_bytes: MDS shard size limit (several shards per domain let offline stages split work).
    """

    domains: tuple[str, ...] = DOMAINS
    max_bytes_per_domain: int = 3_000_000
    val_fraction: float = 0.05
    chunk_tokens: int = 128
    vocab_size: int = 4096
    shard_bytes: int = 1 << 20

    def __post_init__(self):
        unknown = [d for d in self.domains if d not in DOMAINS]
        if unknown or not self.domains:
            raise ValueError(f'domains={self.domains!r} has unknown or no domains {unknown}. '
                             f'Fix: choose from {list(DOMAINS)}.')
        if len(set(self.domains)) != len(self.domains):
            raise ValueError(f'domains={self.domains!r} lists a domain twice. Fix: list each domain once.')
        for name, low in (('max_bytes_per_domain', 100_000), ('chunk_tokens', 16), ('shard_bytes', 1 << 14)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise ValueError(f'{name}={value!r} is invalid. Fix: use an int >= {low}.')
        if not 0 < self.val_fraction < 0.5:
            raise ValueError(f'val_fraction={self.val_fraction!r} is outside (0, 0.5). Fix: use e.g. 0.05.')

    def fingerprint(self) -> str:
        return json_sha256({'builder': BUILDER_VERSION, **dataclasses.asdict(self)})

    def cache_name(self) -> str:
        return f'v{BUILDER_VERSION}' if self == CorpusConfig() else f'v{BUILDER_VERSION}-{self.fingerprint()[:10]}'


class Corpus:
    """A built corpus on disk: its paths, manifest and tokenizer."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        manifest_path = self.root / MANIFEST
        if not manifest_path.exists():
            raise FileNotFoundError(f'{self.root} is not a built corpus (no manifest.json). '
                                    f'Fix: build it with composer_ext.data.ensure_corpus().')
        self.manifest = read_manifest(self.root)

    @property
    def domains(self) -> list[str]:
        return list(self.manifest['config']['domains'])

    @property
    def tokenizer_dir(self) -> Path:
        return self.root / 'tokenizer'

    def path(self, domain: str, split: str = 'train') -> Path:
        """The MDS directory of ``domain``'s ``split``."""
        if domain not in self.domains:
            raise ValueError(f'domain={domain!r} is not in this corpus. Fix: use one of {self.domains}.')
        if split not in SPLITS:
            raise ValueError(f'split={split!r} is not a corpus split. Fix: use one of {list(SPLITS)}.')
        return self.root / domain / split

    def load_tokenizer(self):
        return read_tokenizer(self.tokenizer_dir)

    def __repr__(self) -> str:
        return f'Corpus({str(self.root)!r})'


def manifest_hash(manifest: dict) -> str:
    """SHA-256 of the manifest's canonical JSON, without its own ``manifest_hash`` field and the ``install`` record.

    Only content is hashed (config, statistics, package names, every file's SHA-256): where this install keeps
    the sources, and their version strings, are in ``install``, so identical corpora on two installs agree.
    """
    body = {k: v for k, v in manifest.items() if k != 'manifest_hash' and k not in INSTALL_KEYS}
    return json_sha256(body)


def read_manifest(root: str | Path) -> dict:
    """The manifest of the corpus at ``root``, checked: valid JSON, the fields of a manifest, its own hash.

    Raises:
        FileNotFoundError: ``root`` has no manifest.json (not built).
        CorpusCacheError: the manifest is unreadable, garbage or edited; the message gives the repair command.
    """
    root = Path(root)
    try:
        manifest = json.loads((root / MANIFEST).read_bytes())
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CorpusCacheError(root, f'{MANIFEST} is not a readable JSON manifest ({type(err).__name__}: {err}), so '
                               f'the corpus cannot be checked or used.', _repair_fix(root)) from None
    fields = {'config': dict, 'domains': dict, 'files': dict, 'manifest_hash': str}
    if not isinstance(manifest, dict) or any(not isinstance(manifest.get(k), t) for k, t in fields.items()):
        raise CorpusCacheError(root, f'{MANIFEST} lacks the fields of a corpus manifest ({", ".join(fields)}).',
                               _repair_fix(root))
    if manifest_hash(manifest) != manifest['manifest_hash']:
        raise CorpusCacheError(root, f'{MANIFEST} does not match its own manifest_hash (it was edited or damaged).',
                               _repair_fix(root))
    return manifest


def _select_documents(domain: str, docs: list[Document], max_bytes: int) -> list[Document]:
    """Documents in a fixed pseudo-random order until ``max_bytes``; returned in their original order."""
    order = sorted(range(len(docs)), key=lambda i: stable_fraction(f'{domain}/{docs[i].key}'))
    picked, total = [], 0
    for i in order:
        if total >= max_bytes:
            break
        picked.append(i)
        total += len(docs[i].text.encode())
    return [docs[i] for i in sorted(picked)]


_PARAGRAPH_BREAK = re.compile(r'\n\s*\n')


def _backend(tokenizer):
    """The Rust ``tokenizers.Tokenizer`` behind a ``transformers`` fast tokenizer (batch calls are ~50x faster)."""
    return getattr(tokenizer, 'backend_tokenizer', tokenizer)


def _counts(backend, texts: list[str]) -> list[int]:
    return [len(e.ids) for e in backend.encode_batch(texts, add_special_tokens=False)]


def _pack(pieces: list[str], counts: list[int], sep: str, sep_tokens: int, max_tokens: int) -> list[str]:
    """Greedily join consecutive pieces with ``sep`` while the estimated token count fits."""
    chunks, current, size = [], [], 0
    for piece, count in zip(pieces, counts):
        if current and size + sep_tokens + count > max_tokens:
            chunks.append(sep.join(current))
            current, size = [], 0
        size += count + (sep_tokens if current else 0)
        current.append(piece)
    if current:
        chunks.append(sep.join(current))
    return chunks


def _split_at_tokens(backend, text: str, max_tokens: int) -> list[str]:
    offsets = backend.encode(text, add_special_tokens=False).offsets
    cuts = [offsets[i][0] for i in range(max_tokens, len(offsets), max_tokens)]
    bounds = [0] + cuts + [len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:]) if text[a:b].strip()]


def _fit(backend, pieces: list[str], sep: str, max_tokens: int) -> list[str]:
    """Pack ``pieces`` joined by ``sep`` into chunks of at most ``max_tokens`` tokens (exact, verified)."""
    sep_tokens = max(1, len(backend.encode('a' + sep + 'a', add_special_tokens=False).ids) - 2)
    counts = _counts(backend, pieces)
    chunks = _pack(pieces, counts, sep, sep_tokens, max_tokens)
    out = []
    for chunk, count in zip(chunks, _counts(backend, chunks)):
        if count <= max_tokens:
            out.append(chunk)
        elif sep in chunk and len(parts := chunk.split(sep)) > 1:
            # The estimate was off at a join: split this chunk in two and fit each half again.
            half = len(parts) // 2
            out.extend(_fit(backend, [sep.join(parts[:half]), sep.join(parts[half:])], sep, max_tokens))
        elif sep == '\n\n' and '\n' in chunk:
            out.extend(_fit(backend, chunk.split('\n'), '\n', max_tokens))
        else:
            out.extend(_split_at_tokens(backend, chunk, max_tokens))
    return out


def chunk_document(text: str, tokenizer, max_tokens: int) -> list[str]:
    """Split ``text`` into runs of whole paragraphs of at most ``max_tokens`` tokens each.

    Paragraphs longer than ``max_tokens`` are split at lines, then at token boundaries. No text other than
    the blank lines between chunks (and blank lines at a line split) is dropped.
    """
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f'max_tokens={max_tokens!r} is invalid. Fix: use a positive int.')
    paragraphs = [part.strip('\n') for part in _PARAGRAPH_BREAK.split(text) if part.strip()]
    return [c for c in _fit(_backend(tokenizer), paragraphs, '\n\n', max_tokens) if c.strip()] if paragraphs else []


def _split_of(domain: str, key: str, val_fraction: float) -> str:
    return 'val' if stable_fraction(f'split/{domain}/{key}') < val_fraction else 'train'


def _file_hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): file_sha256(p)
        for p in sorted(root.rglob('*')) if p.is_file() and p.name not in (MANIFEST, FILE_STATS)
    }


def _write_split(out: Path, domain: str, samples: Iterator[tuple[str, str]], tokenizer, shard_bytes: int) -> dict:
    from streaming import MDSWriter

    stats = {'samples': 0, 'tokens': 0, 'bytes': 0, 'documents': 0}
    documents = set()
    with MDSWriter(out=str(out), columns=MDS_COLUMNS, compression=None, size_limit=shard_bytes,
                   progress_bar=False) as writer:
        for uid, text in samples:
            ids = _backend(tokenizer).encode(text, add_special_tokens=False).ids
            writer.write({'text': text, 'tokens': np.asarray(ids, dtype=np.uint16), 'domain': domain, 'uid': uid})
            stats['samples'] += 1
            stats['tokens'] += len(ids)
            stats['bytes'] += len(text.encode())
            documents.add(uid.rsplit('#', 1)[0])
    stats['documents'] = len(documents)
    return stats


def build_corpus(root: str | Path, config: CorpusConfig = CorpusConfig(), progress: bool = True) -> Corpus:
    """Build the corpus into ``root`` (atomically: ``root`` appears only when complete).

    Most users want :func:`ensure_corpus`, which builds into the cache once and reuses it.
    """
    from tqdm import tqdm

    if config.vocab_size > np.iinfo(np.uint16).max:
        raise ValueError(f'vocab_size={config.vocab_size} does not fit the uint16 token column. Fix: use <= 65535.')
    root = Path(root)
    with atomic_dir(root) as tmp:
        documents: dict[str, dict[str, list[Document]]] = {}
        for domain in tqdm(config.domains, desc='corpus: reading sources', disable=not progress or None):
            docs = _select_documents(domain, list(iter_documents(domain)), config.max_bytes_per_domain)
            documents[domain] = {split: [] for split in SPLITS}
            for doc in docs:
                documents[domain][_split_of(domain, doc.key, config.val_fraction)].append(doc)

        train_texts = (doc.text for domain in config.domains for doc in documents[domain]['train'])
        tokenizer = train_tokenizer(train_texts, tmp / 'tokenizer', vocab_size=config.vocab_size)

        stats: dict[str, dict[str, dict]] = {}
        bar = tqdm(total=sum(len(d) for by_split in documents.values() for d in by_split.values()),
                   desc='corpus: chunking and writing MDS', disable=not progress or None)
        for domain in config.domains:
            stats[domain] = {}
            for split in SPLITS:

                samples = _split_samples(documents[domain][split], domain, tokenizer, config.chunk_tokens, bar.update)
                stats[domain][split] = _write_split(tmp / domain / split, domain, samples, tokenizer,
                                                    config.shard_bytes)
        bar.close()

        files = _file_hashes(tmp)
        sources = {domain: dataclasses.asdict(source_info(domain)) for domain in config.domains}
        manifest = {
            'builder_version': BUILDER_VERSION,
            'config': dataclasses.asdict(config),
            'config_fingerprint': config.fingerprint(),
            'tokenizer': {'vocab_size': len(tokenizer), 'eos_token': tokenizer.eos_token,
                          'pad_token': tokenizer.pad_token, 'tokenizer_json_sha256': files['tokenizer/tokenizer.json']},
            'domains': {
                domain: {
                    'sources': {'packages': sources[domain]['packages']},
                    **{split: stats[domain][split] for split in SPLITS},
                    'bytes': sum(stats[domain][s]['bytes'] for s in SPLITS),
                    'tokens': sum(stats[domain][s]['tokens'] for s in SPLITS),
                    'documents': sum(stats[domain][s]['documents'] for s in SPLITS),
                } for domain in config.domains
            },
            'files': files,
            'content_hash': json_sha256(files),
            'install': {domain: {k: sources[domain][k] for k in ('paths', 'versions')} for domain in config.domains},
        }
        manifest['manifest_hash'] = manifest_hash(manifest)
        atomic_write_json(tmp / MANIFEST, manifest)
        _record_stats(tmp, manifest, {rel: _stat(tmp / rel) for rel in files})
    return Corpus(root)


def _split_samples(docs: list[Document], domain: str, tokenizer, chunk_tokens: int,
                   on_document=None) -> Iterator[tuple[str, str]]:
    """``(uid, text)`` of every chunk of ``docs``, in order (one split's MDS samples)."""
    for doc in docs:
        for i, chunk in enumerate(chunk_document(doc.text, tokenizer, chunk_tokens)):
            yield f'{domain}/{doc.key}#{i}', chunk
        if on_document is not None:
            on_document(1)


def _split_documents(domain: str, split: str, config: CorpusConfig) -> list[Document]:
    docs = _select_documents(domain, list(iter_documents(domain)), config.max_bytes_per_domain)
    return [doc for doc in docs if _split_of(domain, doc.key, config.val_fraction) == split]


# --- integrity ------------------------------------------------------------------------------------------

# Corpus roots checked in this process (the first-use check runs once per process and root).
_CHECKED: set[str] = set()


def _stat(path: Path) -> list[int]:
    """What changes when a file is written: size, mtime and ctime (ctime cannot be set back by a writer)."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _recorded_stats(root: Path, manifest: dict) -> dict:
    try:
        recorded = json.loads((root / FILE_STATS).read_bytes())
    except (OSError, ValueError):
        return {}
    if not isinstance(recorded, dict) or recorded.get('manifest_hash') != manifest['manifest_hash']:
        return {}
    files = recorded.get('files')
    return files if isinstance(files, dict) else {}


def _record_stats(root: Path, manifest: dict, stats: dict) -> None:
    """Record the files' stats as found intact; skipped where the cache is not ours to write (a shared cache)."""
    try:
        atomic_write_json(root / FILE_STATS, {'manifest_hash': manifest['manifest_hash'], 'files': stats})
    except OSError as err:
        if not is_unwritable(err):
            raise


def verify_corpus(root: str | Path, full: bool = True) -> list[str]:
    """The files of the corpus at ``root`` that do not match the SHA-256 in its manifest (missing ones included).

    Args:
        root: A built corpus directory (``ensure_corpus().root``).
        full: Hash every file. With ``False``, a file whose size, mtime and ctime are those recorded when it was
            last found intact is trusted without reading it (the cheap first-use check).

    Returns:
        The damaged files' paths relative to ``root``, sorted; empty when the corpus is intact (then the stats
        of its files are recorded for the next cheap check).

    Raises:
        CorpusCacheError: the manifest itself is garbage or edited.
    """
    root = Path(root)
    manifest = read_manifest(root)
    recorded = {} if full else _recorded_stats(root, manifest)
    damaged, stats, hashed = [], {}, False
    for rel, digest in sorted(manifest['files'].items()):
        path = root / rel
        try:
            stat = _stat(path)
            if recorded.get(rel) != stat:
                hashed = True
                if file_sha256(path) != digest:
                    damaged.append(rel)
                    continue
        except OSError:
            damaged.append(rel)
            continue
        stats[rel] = stat
    if not damaged and (hashed or not recorded):
        _record_stats(root, manifest, stats)
    return damaged


def damage_error(root: Path, damaged: list[str]) -> CorpusCacheError:
    """The error for a corpus whose files ``damaged`` (from :func:`verify_corpus`) differ from its manifest."""
    shown = ', '.join(damaged[:8]) + (f' and {len(damaged) - 8} more' if len(damaged) > 8 else '')
    return CorpusCacheError(root, f'the corpus cache is damaged: {len(damaged)} file(s) are missing or differ from '
                            f'the SHA-256 in {MANIFEST}: {shown}.', _repair_fix(root))


@contextlib.contextmanager
def _writable(directory: Path) -> Iterator[None]:
    """Turn "cannot write here" (permissions, read-only file system) into an error naming the cache and the fix."""
    try:
        yield
    except OSError as err:
        if not is_unwritable(err):
            raise
        where = err.filename or directory
        raise CorpusCacheError(directory, f'the corpus cache cannot be written ({where}: {os.strerror(err.errno)}).',
                               f'set {CACHE_ENV} to a writable directory (e.g. {CACHE_ENV}=$HOME/.cache/composer_ext), '
                               f'or make {directory} writable.') from None


def _has_install_in_sources(manifest: dict) -> bool:
    """A manifest of the previous format: install paths and versions inside the domains' (hashed) sources."""
    return any(isinstance(entry, dict) and isinstance(entry.get('sources'), dict)
               and ({'paths', 'versions'} & set(entry['sources'])) for entry in manifest['domains'].values())


def _migrate_manifest(root: Path, lock: Path) -> None:
    """Move install paths and versions out of the hashed part of a previous-format manifest (same corpus files)."""
    try:
        with file_lock(lock):
            manifest = read_manifest(root)
            if not _has_install_in_sources(manifest):
                return
            install = {}
            for domain, entry in manifest['domains'].items():
                sources = entry['sources']
                install[domain] = {k: sources.pop(k) for k in ('paths', 'versions') if k in sources}
            manifest['install'] = install
            manifest['manifest_hash'] = manifest_hash(manifest)
            atomic_write_json(root / MANIFEST, manifest)
            if root.stat().st_mode & 0o777 == 0o700:  # built then as a mkdtemp directory: give it a plain mkdir's mode
                os.chmod(root, 0o777 & ~umask())
    except OSError as err:
        if not is_unwritable(err):  # another user's cache: the previous manifest is valid, read it as it is
            raise


def corpus_root(config: CorpusConfig | None = None, cache_dir: str | Path | None = None) -> Path:
    """Where the corpus of ``config`` lives (built or not): ``<cache>/corpus/<config.cache_name()>``."""
    config = config or CorpusConfig()
    if cache_dir is not None:
        return Path(cache_dir) / 'corpus' / config.cache_name()
    with _writable(cache_location()):
        return cache_root() / 'corpus' / config.cache_name()


def _lock_path(root: Path) -> Path:
    return root.parent / f'.{root.name}.lock'


def _check(root: Path, config: CorpusConfig) -> None:
    """The first-use check: the manifest, its config, and the files (cheaply: by recorded stats)."""
    manifest = read_manifest(root)
    if manifest.get('config_fingerprint') != config.fingerprint():
        raise CorpusCacheError(root, f'{MANIFEST} describes a corpus of another CorpusConfig '
                               f'({manifest.get("config")!r}).', _repair_fix(root))
    if _has_install_in_sources(manifest):
        _migrate_manifest(root, _lock_path(root))
    damaged = verify_corpus(root, full=False)
    if damaged:
        raise damage_error(root, damaged)


def repair_corpus(config: CorpusConfig | None = None, cache_dir: str | Path | None = None,
                  progress: bool = True) -> tuple[Corpus, list[str]]:
    """Check every file of the cached corpus and rebuild what is damaged (``composer-ext data build --repair``).

    Damaged MDS splits are rewritten one split at a time from the sources and the cached tokenizer, and swapped in
    only when the rewritten files match the manifest's SHA-256; anything else (the manifest, the tokenizer, a split
    that no longer rebuilds the same, a missing corpus) rebuilds the whole corpus. Both are atomic and run under
    the corpus's file lock, so concurrent readers see the old or the new files, and concurrent builds wait.

    Returns:
        The corpus and the files that were damaged (``['manifest.json']`` when the manifest was; empty if none).
    """
    config = config or CorpusConfig()
    root = corpus_root(config, cache_dir)
    with _writable(root.parent.parent):
        with file_lock(_lock_path(root)):
            try:
                manifest = read_manifest(root)
                if manifest.get('config_fingerprint') != config.fingerprint():
                    raise CorpusCacheError(root, 'another config', '')
                damaged = verify_corpus(root, full=True)
            except (FileNotFoundError, CorpusCacheError):
                manifest, damaged = None, [MANIFEST]
            if damaged:
                splits = _damaged_splits(damaged, config) if manifest is not None else None
                if splits is None or not _rebuild_splits(root, config, manifest, splits):
                    build_corpus(root, config, progress=progress)
                elif verify_corpus(root, full=True):
                    build_corpus(root, config, progress=progress)
        _CHECKED.discard(str(root))
        _check(root, config)
    _CHECKED.add(str(root))
    return Corpus(root), damaged


def _damaged_splits(damaged: list[str], config: CorpusConfig) -> set[tuple[str, str]] | None:
    """The (domain, split) MDS directories holding every damaged file, or None if one is elsewhere."""
    splits = set()
    for rel in damaged:
        parts = rel.split('/')
        if len(parts) < 3 or parts[0] not in config.domains or parts[1] not in SPLITS:
            return None
        splits.add((parts[0], parts[1]))
    return splits


class _SplitMismatch(Exception):
    """A rewritten split differs from the manifest (the sources changed since the build)."""


def _rebuild_splits(root: Path, config: CorpusConfig, manifest: dict, splits: set[tuple[str, str]]) -> bool:
    """Rewrite ``splits`` with the cached tokenizer; True when every one matches the manifest and was swapped in."""
    tokenizer = read_tokenizer(root / 'tokenizer')
    for domain, split in sorted(splits):
        prefix = f'{domain}/{split}/'
        expected = {rel[len(prefix):]: digest for rel, digest in manifest['files'].items() if rel.startswith(prefix)}
        samples = _split_samples(_split_documents(domain, split, config), domain, tokenizer, config.chunk_tokens)
        try:
            with atomic_dir(root / domain / split) as tmp:
                _write_split(tmp, domain, samples, tokenizer, config.shard_bytes)
                if _file_hashes(tmp) != expected:
                    raise _SplitMismatch(prefix)
        except _SplitMismatch:
            return False
    return True


def ensure_corpus(config: CorpusConfig | None = None, cache_dir: str | Path | None = None,
                  progress: bool = True) -> Corpus:
    """Return the cached corpus for ``config``, building it first if it is not there yet.

    Safe to call from every rank of a job and from concurrent jobs: one builds under a file lock while the
    others wait, then all read the same directory. A killed build leaves nothing behind.

    On its first use in a process the cache is checked (see :func:`verify_corpus` with ``full=False``: only
    files whose size or times changed are hashed).

    Raises:
        CorpusCacheError: the cache is damaged (the message names the files and ``composer-ext data build
            --repair``) or cannot be written (set ``COMPOSER_EXT_CACHE`` to a writable directory).
    """
    config = config or CorpusConfig()
    root = corpus_root(config, cache_dir)
    if not (root / MANIFEST).exists():
        with _writable(root.parent.parent):
            with file_lock(_lock_path(root)):
                if not (root / MANIFEST).exists():
                    build_corpus(root, config, progress=progress)
    if str(root) not in _CHECKED:
        _check(root, config)
        _CHECKED.add(str(root))
    return Corpus(root)


def corpus_domains(corpus: Corpus, domains: Sequence[str] | str | None) -> list[str]:
    """Resolve ``'all'``/None/one name/a list of names against the corpus, with a clear error."""
    if domains is None or domains == 'all':
        return corpus.domains
    names = [domains] if isinstance(domains, str) else list(domains)
    unknown = [d for d in names if d not in corpus.domains]
    if unknown or not names:
        raise ValueError(f'domains={domains!r} includes unknown domains {unknown}. '
                         f"Fix: use 'all' or a subset of {corpus.domains}.")
    return names
