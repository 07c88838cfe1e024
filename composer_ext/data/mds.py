"""Random access by global sample id to a local MDS directory (as written by Streaming's ``MDSWriter``).

The offline pruning stages (reference split, scoring, selection) address samples by their **global sample
id**: the position of the sample in the MDS directory, counting shards in ``index.json`` order. This module
maps ids to shards, reads whole shards for scoring, and fingerprints a directory so that a score index or a
selection can tell whether it still describes the data it is applied to.

Two fingerprints, of different cost:

- :attr:`MDSDataset.index_fingerprint`: SHA-256 of the canonical ``index.json`` (shard names, sample
  counts, byte sizes, column names and encodings). Instant; catches added, removed or resized shards.
- :meth:`MDSDataset.content_fingerprint`: the index fingerprint plus the SHA-256 of every shard file.
  Reads all data once; the scorer computes it as a side effect of reading the shards.
"""

from __future__ import annotations

import hashlib
import json
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator, Union

import numpy as np

__all__ = ['MDSDataset', 'mds_index_fingerprint']


def _canonical_index(index: dict) -> bytes:
    shards = []
    for shard in index['shards']:
        raw = shard.get('raw_data') or {}
        zipped = shard.get('zip_data') or {}
        shards.append({
            'format': shard.get('format'),
            'column_names': shard.get('column_names'),
            'column_encodings': shard.get('column_encodings'),
            'samples': shard['samples'],
            'raw': [raw.get('basename'), raw.get('bytes')],
            'zip': [zipped.get('basename'), zipped.get('bytes')],
            'compression': shard.get('compression'),
        })
    return json.dumps(shards, sort_keys=True).encode()


def mds_index_fingerprint(path: Union[str, Path]) -> str:
    """SHA-256 of the canonical ``index.json`` of the MDS directory ``path`` (see the module docstring)."""
    return MDSDataset(path).index_fingerprint


class MDSDataset:
    """A map-style view of a local MDS directory: ``dataset[sample_id]`` -> the sample dict.

    Args:
        path: A directory with an ``index.json`` written by ``streaming.MDSWriter`` (a merged index whose
            shard names contain subdirectories works too). Shards may be compressed; random access into a
            compressed shard decompresses the whole shard (the last one is cached).

    Example:
        .. code-block:: python

            from composer_ext.data import ensure_corpus
            from composer_ext.data.mds import MDSDataset
            data = MDSDataset(ensure_corpus().path('code', 'train'))
            sample = data[0]                       # {'text': ..., 'tokens': ..., 'domain': 'code', 'uid': ...}
            first, last = data.shard_range(0)      # global ids of shard 0
    """

    def __init__(self, path: Union[str, Path]):
        if isinstance(path, MDSDataset):
            path = path.path
        if not isinstance(path, (str, Path)):
            raise TypeError(f'path={path!r} is not a path. Fix: pass the directory of an MDS dataset.')
        self.path = Path(path).expanduser().resolve()
        index_file = self.path / 'index.json'
        if not index_file.is_file():
            raise ValueError(f'path={str(path)!r} is not an MDS directory (no index.json). Fix: pass a directory '
                             f'written by streaming.MDSWriter, e.g. composer_ext.data.ensure_corpus().path("code").')
        try:
            self.index = json.loads(index_file.read_text())
            shards = self.index['shards']
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f'{index_file} is not a valid MDS index ({err}). Fix: rewrite the dataset with '
                             f'streaming.MDSWriter.') from None
        if not shards:
            raise ValueError(f'{index_file} lists no shards. Fix: write at least one sample with MDSWriter.')
        bad = sorted({s.get('format') for s in shards} - {'mds'})
        if bad:
            raise ValueError(f'{index_file} has shards of format {bad}; only MDS shards are supported. '
                             f'Fix: convert the dataset with streaming.MDSWriter.')
        from streaming.base.format import reader_from_json
        self._readers = [reader_from_json(str(self.path), None, shard) for shard in shards]
        counts = np.array([int(s['samples']) for s in shards], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(counts)])
        self._cache: tuple[int, bytes] | None = None

    # --- shape -------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def num_shards(self) -> int:
        return len(self._readers)

    @property
    def columns(self) -> dict[str, str]:
        """Column name -> MDS encoding (of the first shard)."""
        shard = self.index['shards'][0]
        return dict(zip(shard['column_names'], shard['column_encodings']))

    def shard_range(self, shard: int) -> tuple[int, int]:
        """Global ids ``[start, end)`` of ``shard``'s samples."""
        self._check_shard(shard)
        return int(self._starts[shard]), int(self._starts[shard + 1])

    def shard_of(self, sample_id: int) -> int:
        return int(np.searchsorted(self._starts, sample_id, side='right') - 1)

    def shard_file(self, shard: int) -> Path:
        """The file that holds ``shard`` on disk (the raw file, or the compressed one when only it exists)."""
        self._check_shard(shard)
        reader = self._readers[shard]
        raw = self.path / reader.raw_data.basename
        if raw.exists() or reader.zip_data is None:
            return raw
        return self.path / reader.zip_data.basename

    # --- fingerprints -----------------------------------------------------------------------------------

    @cached_property
    def index_fingerprint(self) -> str:
        return hashlib.sha256(_canonical_index(self.index)).hexdigest()

    def shard_sha256(self, shard: int) -> str:
        return hashlib.sha256(self.shard_file(shard).read_bytes()).hexdigest()

    def content_fingerprint(self, shard_hashes: list[str] | None = None) -> str:
        """SHA-256 of the index fingerprint and every shard file's SHA-256 (hashed here unless given)."""
        hashes = shard_hashes if shard_hashes is not None else [self.shard_sha256(s) for s in range(self.num_shards)]
        if len(hashes) != self.num_shards:
            raise ValueError(f'shard_hashes has {len(hashes)} entries for {self.num_shards} shards.')
        return hashlib.sha256(json.dumps([self.index_fingerprint, list(hashes)]).encode()).hexdigest()

    # --- reading ----------------------------------------------------------------------------------------

    def _check_shard(self, shard: int) -> None:
        if isinstance(shard, bool) or not isinstance(shard, (int, np.integer)) or not 0 <= shard < self.num_shards:
            raise IndexError(f'shard={shard!r} is out of range: {self.path} has {self.num_shards} shards.')

    def _shard_bytes(self, shard: int) -> bytes:
        reader = self._readers[shard]
        raw = self.path / reader.raw_data.basename
        if raw.exists():
            return raw.read_bytes()
        if reader.zip_data is None:
            raise FileNotFoundError(f'shard file {raw} is missing. Fix: restore the MDS directory {self.path}.')
        from streaming.base.compression import decompress
        return decompress(reader.compression, (self.path / reader.zip_data.basename).read_bytes())

    def read_shard(self, shard: int) -> tuple[list[dict[str, Any]], str]:
        """All samples of ``shard`` in order, and the SHA-256 of its file (one read of the file)."""
        self._check_shard(shard)
        reader = self._readers[shard]
        data = self.shard_file(shard).read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if not (self.path / reader.raw_data.basename).exists():
            from streaming.base.compression import decompress
            data = decompress(reader.compression, data)
        count = reader.samples
        offsets = np.frombuffer(data, np.uint32, count + 1, offset=4)
        samples = [reader.decode_sample(data[offsets[i]:offsets[i + 1]]) for i in range(count)]
        return samples, digest

    def __getitem__(self, sample_id: int) -> dict[str, Any]:
        if isinstance(sample_id, bool) or not isinstance(sample_id, (int, np.integer)):
            raise TypeError(f'sample_id={sample_id!r} is not an int. Fix: index with a global sample id.')
        sample_id = int(sample_id)
        if sample_id < 0:
            sample_id += len(self)
        if not 0 <= sample_id < len(self):
            raise IndexError(f'sample_id={sample_id} is out of range: {self.path} has {len(self)} samples.')
        shard = self.shard_of(sample_id)
        local = sample_id - int(self._starts[shard])
        reader = self._readers[shard]
        if (self.path / reader.raw_data.basename).exists():
            return reader.get_item(local)
        if self._cache is None or self._cache[0] != shard:
            self._cache = (shard, self._shard_bytes(shard))
        data = self._cache[1]
        begin, end = np.frombuffer(data, np.uint32, 2, offset=4 + 4 * local)
        return reader.decode_sample(data[begin:end])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for shard in range(self.num_shards):
            yield from self.read_shard(shard)[0]

    def column(self, name: str) -> list:
        """Every sample's value of column ``name`` (reads all shards)."""
        if name not in self.columns:
            raise KeyError(f'column {name!r} is not in {self.path} (columns: {sorted(self.columns)}).')
        return [sample[name] for sample in self]

    def __reduce__(self):  # DataLoader workers and spawned ranks rebuild the view from the path
        return (MDSDataset, (str(self.path),))

    def __repr__(self) -> str:
        return f'MDSDataset({str(self.path)!r})'
