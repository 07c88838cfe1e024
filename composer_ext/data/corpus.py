"""The embedded multi-domain text corpus: built once from installed packages into MDS shards.

Layout under ``$COMPOSER_EXT_CACHE/corpus/<name>/``::

    manifest.json            sources, bytes/tokens/documents/samples per domain and split, content hash
    tokenizer/               byte-level BPE (a ``transformers`` tokenizer directory)
    <domain>/train/          MDS shards written by Streaming's MDSWriter
    <domain>/val/

Every MDS sample has the columns ``text`` (str), ``tokens`` (uint16 token ids of ``text``, no special
tokens), ``domain`` (str) and ``uid`` (str, ``<domain>/<document key>#<chunk>``, unique in the corpus).
A sample is a run of whole paragraphs of one document holding at most ``chunk_tokens`` tokens.

The build is a pure function of the installed sources and the :class:`CorpusConfig`: two builds on one
machine produce byte-identical shards and the same manifest hash. Documents go to train or val by a hash
of their key, so no document is split across the two.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from composer_ext.data.sources import DOMAINS, Document, iter_documents, source_info
from composer_ext.storage import atomic_dir, atomic_write_json, cache_root, file_lock

__all__ = [
    'Corpus',
    'CorpusConfig',
    'MDS_COLUMNS',
    'build_corpus',
    'chunk_document',
    'ensure_corpus',
    'manifest_hash',
]

BUILDER_VERSION = 1
SPLITS = ('train', 'val')
MDS_COLUMNS = {'text': 'str', 'tokens': 'ndarray:uint16', 'domain': 'str', 'uid': 'str'}


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
        payload = json.dumps({'builder': BUILDER_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()

    def cache_name(self) -> str:
        return f'v{BUILDER_VERSION}' if self == CorpusConfig() else f'v{BUILDER_VERSION}-{self.fingerprint()[:10]}'


class Corpus:
    """A built corpus on disk: its paths, manifest and tokenizer."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        manifest_path = self.root / 'manifest.json'
        if not manifest_path.exists():
            raise FileNotFoundError(f'{self.root} is not a built corpus (no manifest.json). '
                                    f'Fix: build it with composer_ext.data.ensure_corpus().')
        self.manifest = json.loads(manifest_path.read_text())

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
        from composer_ext.data.tokenizer import load_tokenizer
        return load_tokenizer(self.tokenizer_dir)

    def __repr__(self) -> str:
        return f'Corpus({str(self.root)!r})'


def manifest_hash(manifest: dict) -> str:
    """SHA-256 of the manifest's canonical JSON (without its own ``manifest_hash`` field)."""
    body = {k: v for k, v in manifest.items() if k != 'manifest_hash'}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _stable_unit(text: str) -> float:
    """A number in [0, 1) fixed by ``text`` (the same on every machine and Python run)."""
    return int.from_bytes(hashlib.sha1(text.encode()).digest()[:8], 'big') / 2**64


def _select_documents(domain: str, docs: list[Document], max_bytes: int) -> list[Document]:
    """Documents in a fixed pseudo-random order until ``max_bytes``; returned in their original order."""
    order = sorted(range(len(docs)), key=lambda i: _stable_unit(f'{domain}/{docs[i].key}'))
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
    return 'val' if _stable_unit(f'split/{domain}/{key}') < val_fraction else 'train'


def _file_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob('*')) if p.is_file() and p.name != 'manifest.json'
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

    from composer_ext.data.tokenizer import train_tokenizer

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

                def samples(docs=documents[domain][split], domain=domain):
                    for doc in docs:
                        for i, chunk in enumerate(chunk_document(doc.text, tokenizer, config.chunk_tokens)):
                            yield f'{domain}/{doc.key}#{i}', chunk
                        bar.update(1)

                stats[domain][split] = _write_split(tmp / domain / split, domain, samples(), tokenizer,
                                                    config.shard_bytes)
        bar.close()

        files = _file_hashes(tmp)
        manifest = {
            'builder_version': BUILDER_VERSION,
            'config': dataclasses.asdict(config),
            'config_fingerprint': config.fingerprint(),
            'tokenizer': {'vocab_size': len(tokenizer), 'eos_token': tokenizer.eos_token,
                          'pad_token': tokenizer.pad_token, 'tokenizer_json_sha256': files['tokenizer/tokenizer.json']},
            'domains': {
                domain: {
                    'sources': dataclasses.asdict(source_info(domain)),
                    **{split: stats[domain][split] for split in SPLITS},
                    'bytes': sum(stats[domain][s]['bytes'] for s in SPLITS),
                    'tokens': sum(stats[domain][s]['tokens'] for s in SPLITS),
                    'documents': sum(stats[domain][s]['documents'] for s in SPLITS),
                } for domain in config.domains
            },
            'files': files,
            'content_hash': hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest(),
        }
        manifest['manifest_hash'] = manifest_hash(manifest)
        atomic_write_json(tmp / 'manifest.json', manifest)
    return Corpus(root)


def ensure_corpus(config: CorpusConfig | None = None, cache_dir: str | Path | None = None,
                  progress: bool = True) -> Corpus:
    """Return the cached corpus for ``config``, building it first if it is not there yet.

    Safe to call from every rank of a job and from concurrent jobs: one builds under a file lock while the
    others wait, then all read the same directory. A killed build leaves nothing behind.
    """
    config = config or CorpusConfig()
    base = Path(cache_dir) if cache_dir is not None else cache_root()
    root = base / 'corpus' / config.cache_name()
    if (root / 'manifest.json').exists():
        return Corpus(root)
    with file_lock(base / 'corpus' / f'.{config.cache_name()}.lock'):
        if not (root / 'manifest.json').exists():
            build_corpus(root, config, progress=progress)
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
