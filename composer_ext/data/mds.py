"""Random access by global sample id to a local MDS directory (as written by Streaming's ``MDSWriter``).

The offline pruning stages (reference split, scoring, selection) address samples by their **global sample
id**: the position of the sample in the MDS directory, counting shards in ``index.json`` order. This module
maps ids to shards, reads whole shards for scoring, and fingerprints a directory so that a score index or a
selection can tell whether it still describes the data it is applied to. The same class is the per-domain
reader of :class:`~composer_ext.domain_upsampling.mixture.MixtureDataset`
(``composer_ext.domain_upsampling.mixture.MDSDataset`` is it).

Two fingerprints, of different cost:

- :attr:`MDSDataset.index_fingerprint`: SHA-256 of the canonical ``index.json`` (shard names, sample
  counts, byte sizes, column names and encodings). Instant; catches added, removed or resized shards.
- :meth:`MDSDataset.content_fingerprint`: the index fingerprint plus the SHA-256 of every shard file.
  Reads all data once; the scorer computes it as a side effect of reading the shards.
"""

from __future__ import annotations

import collections
import json
import mmap
import numbers
import os
import struct
import weakref
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator, Union

import numpy as np

from composer_ext.core.provenance import bytes_sha256, file_sha256, json_sha256

__all__ = ['DAMAGED_FIX', 'DECODE_ERRORS', 'MDSDataset', 'damaged_shard', 'mds_index_fingerprint']

# Every open memory map holds a file descriptor (CPython's mmap keeps a dup of the file's). Datasets can outlive
# their use by far (Composer's Engine keeps each Trainer's state, dataloaders included, until the process exits), so
# a process that builds many Trainers over MDS data (``composer-ext ablate``, a test suite) would collect one
# descriptor per shard ever read and hit the open-file limit. The maps of all MDSDatasets in a process are
# therefore capped together: past the cap, the oldest map is closed (and reopened if its shard is read again).
MAX_OPEN_SHARD_MAPS = int(os.environ.get('COMPOSER_EXT_MAX_OPEN_SHARD_MAPS', '256'))
_open_maps: collections.deque = collections.deque()  # (weakref to dataset, shard, map) in opening order
# What Streaming's column decoders raise on bytes that are not what was written (bad UTF-8, a wrong length).
DECODE_ERRORS = (ValueError, IndexError, KeyError, TypeError, OverflowError, struct.error)


def _register_map(dataset: 'MDSDataset', shard: int, data: mmap.mmap) -> None:
    _open_maps.append((weakref.ref(dataset), shard, data))
    while len(_open_maps) > max(MAX_OPEN_SHARD_MAPS, 1):
        ref, old_shard, old_data = _open_maps.popleft()
        owner = ref()
        if owner is not None and owner._maps.get(old_shard, (None,))[0] is old_data:
            del owner._maps[old_shard]
        old_data.close()  # samples are decoded from copied bytes, so nothing still points into the map


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


DAMAGED_FIX = ('Fix: if it is in the composer_ext corpus cache, run `composer-ext data build --repair`; otherwise '
               'rewrite the dataset with streaming.MDSWriter.')


def damaged_shard(where: Path, problem: str) -> ValueError:
    """The error for a shard file whose bytes are not a valid MDS shard (truncated, overwritten)."""
    return ValueError(f'{where} is damaged: {problem}. {DAMAGED_FIX}')


def _offsets(data: Any, samples: int, where: Path) -> np.ndarray:
    """The ``samples + 1`` sample offsets at the head of an MDS shard (after its uint32 sample count), checked."""
    size = len(data)
    if size < 4:
        raise damaged_shard(where, f'it holds {size} bytes, too few for an MDS shard')
    count = int(np.frombuffer(data, np.uint32, 1)[0])
    if count != samples:
        raise ValueError(f'{where} holds {count} samples but index.json says {samples}. Fix: rewrite the dataset '
                         f'with streaming.MDSWriter (the shard and the index are from different writes); in the '
                         f'composer_ext corpus cache, run `composer-ext data build --repair`.')
    head = 4 * (count + 2)
    if size < head:
        raise damaged_shard(where, f'it holds {size} bytes, fewer than its offset table of {count} samples needs')
    offsets = np.frombuffer(data, np.uint32, count + 1, offset=4).astype(np.int64)
    if offsets[0] < head or offsets[-1] != size or (np.diff(offsets) < 0).any():
        raise damaged_shard(where, f'its sample offsets do not fit its {size} bytes (truncated or overwritten)')
    return offsets


class MDSDataset:
    """A map-style view of a local MDS directory: ``dataset[sample_id]`` -> the sample dict.

    Raw (uncompressed) shards are memory-mapped on first access, and their offset tables kept, so random
    access costs one slice and one decode; no shared memory, process group or download machinery is involved,
    so any number of these can live in one process. Compressed shards (only the ``.zstd``/... file present)
    are decompressed whole on access; the last one is cached. Pickling (DataLoader workers, spawned ranks)
    sends only the path: each process maps its own shards.

    Args:
        path: A directory with an ``index.json`` written by ``streaming.MDSWriter`` (a merged index whose
            shard names contain subdirectories works too).
        allow_unsafe_types: Read columns of unsafe encodings (``pkl``: unpickling runs arbitrary code). Off
            by default, as in Streaming; such a directory is refused with a ``ValueError``.

    Example:
        .. code-block:: python

            from composer_ext.data import ensure_corpus
            from composer_ext.data.mds import MDSDataset
            data = MDSDataset(ensure_corpus().path('code', 'train'))
            sample = data[0]                       # {'text': ..., 'tokens': ..., 'domain': 'code', 'uid': ...}
            first, last = data.shard_range(0)      # global ids of shard 0
    """

    def __init__(self, path: Union[str, Path], allow_unsafe_types: bool = False):
        if isinstance(path, MDSDataset):
            path = path.path
        if not isinstance(path, (str, Path)):
            raise TypeError(f'path={path!r} is not a path. Fix: pass the directory of an MDS dataset.')
        if not isinstance(allow_unsafe_types, bool):
            raise TypeError(f'allow_unsafe_types={allow_unsafe_types!r} is not a bool. Fix: pass True or False.')
        self.path = Path(path).expanduser().resolve()
        self.allow_unsafe_types = allow_unsafe_types
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
        bad = sorted({str(s.get('format')) for s in shards} - {'mds'})
        if bad:
            raise ValueError(f'{index_file} has shards of format {bad}; only MDS shards are supported. '
                             f'Fix: convert the dataset with streaming.MDSWriter, or read it with a StreamingDataset.')
        from streaming.base.format import reader_from_json
        self._readers = [reader_from_json(str(self.path), None, shard) for shard in shards]
        self._raw = []
        for reader in self._readers:
            self._check_safe(reader)
            raw = (self.path / reader.raw_data.basename).is_file()
            if not raw and (reader.zip_data is None or not (self.path / reader.zip_data.basename).is_file()):
                raise ValueError(f'shard file {self.path / reader.raw_data.basename} is missing (and no compressed '
                                 f'copy). Fix: restore the MDS directory {self.path}, or read a remote dataset with '
                                 f'a StreamingDataset.')
            self._raw.append(raw)
        counts = np.array([int(s['samples']) for s in shards], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(counts)])
        self._ends = self._starts[1:]
        self._first = self._starts.tolist()  # plain ints: the per-sample path avoids numpy scalars
        self._size = int(self._starts[-1])
        self._maps: dict[int, tuple[Any, np.ndarray]] = {}  # raw shard -> (mmap, offsets); never pickled
        self._cache: tuple[int, bytes, np.ndarray] | None = None  # the last decompressed shard

    def _check_safe(self, reader: Any) -> None:
        try:
            reader.validate(self.allow_unsafe_types)
        except ValueError:
            from streaming.base.format.mds.encodings import is_mds_encoding_safe
            unsafe = {name: encoding for name, encoding in zip(reader.column_names, reader.column_encodings)
                      if not is_mds_encoding_safe(encoding)}
            raise ValueError(f'{self.path} has columns of unsafe encodings {unsafe} (reading them unpickles, which '
                             f'can run arbitrary code). Fix: pass allow_unsafe_types=True only if you trust this '
                             f'data, or rewrite those columns with a safe encoding.') from None

    # --- shape -------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._size

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
        return int(np.searchsorted(self._ends, sample_id, side='right'))

    def shard_file(self, shard: int) -> Path:
        """The file that holds ``shard`` on disk (the raw file, or the compressed one when only it exists)."""
        self._check_shard(shard)
        reader = self._readers[shard]
        return self.path / (reader.raw_data.basename if self._raw[shard] else reader.zip_data.basename)

    # --- fingerprints -----------------------------------------------------------------------------------

    @cached_property
    def index_fingerprint(self) -> str:
        return bytes_sha256(_canonical_index(self.index))

    def shard_sha256(self, shard: int) -> str:
        return file_sha256(self.shard_file(shard))

    def content_fingerprint(self, shard_hashes: list[str] | None = None) -> str:
        """SHA-256 of the index fingerprint and every shard file's SHA-256 (hashed here unless given)."""
        hashes = shard_hashes if shard_hashes is not None else [self.shard_sha256(s) for s in range(self.num_shards)]
        if len(hashes) != self.num_shards:
            raise ValueError(f'shard_hashes has {len(hashes)} entries for {self.num_shards} shards.')
        # a list of strings: sorted keys change nothing, so the digest equals the one recorded before json_sha256
        return json_sha256([self.index_fingerprint, list(hashes)])

    # --- reading ----------------------------------------------------------------------------------------

    def _check_shard(self, shard: int) -> None:
        if isinstance(shard, bool) or not isinstance(shard, (int, np.integer)) or not 0 <= shard < self.num_shards:
            raise IndexError(f'shard={shard!r} is out of range: {self.path} has {self.num_shards} shards.')

    def _decompressed(self, shard: int, data: bytes) -> bytes:
        from streaming.base.compression import decompress
        return decompress(self._readers[shard].compression, data)

    def _shard_view(self, shard: int) -> tuple[Any, np.ndarray]:
        """``(buffer, offsets)`` of ``shard``: a kept memory map for raw shards, the cached decompression else."""
        view = self._maps.get(shard)
        if view is not None:
            return view
        reader = self._readers[shard]
        if self._raw[shard]:
            where = self.path / reader.raw_data.basename
            with open(where, 'rb') as handle:  # the map stays valid after the file is closed
                data = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
            view = self._maps[shard] = (data, _offsets(data, reader.samples, where))
            _register_map(self, shard, data)
            return view
        if self._cache is None or self._cache[0] != shard:
            where = self.path / reader.zip_data.basename
            data = self._decompressed(shard, where.read_bytes())
            self._cache = (shard, data, _offsets(data, reader.samples, where))
        return self._cache[1], self._cache[2]

    def read_shard(self, shard: int) -> tuple[list[dict[str, Any]], str]:
        """All samples of ``shard`` in order, and the SHA-256 of its file (one read of the file)."""
        self._check_shard(shard)
        reader = self._readers[shard]
        where = self.shard_file(shard)
        data = where.read_bytes()
        digest = bytes_sha256(data)
        if not self._raw[shard]:
            data = self._decompressed(shard, data)
        offsets = _offsets(data, reader.samples, where)
        try:
            samples = [reader.decode_sample(data[offsets[i]:offsets[i + 1]]) for i in range(reader.samples)]
        except DECODE_ERRORS as err:
            raise damaged_shard(where, f'a sample does not decode ({type(err).__name__}: {err})') from None
        return samples, digest

    def __getitem__(self, index: int) -> dict[str, Any]:
        if type(index) is not int:  # the common case skips the slower ABC check
            if isinstance(index, bool) or not isinstance(index, numbers.Integral):
                raise TypeError(f'index={index!r} is not an int. Fix: index with a global sample id.')
            index = int(index)
        sample_id = index + self._size if index < 0 else index
        if not 0 <= sample_id < self._size:
            raise IndexError(f'index={index} is out of range for {self._size} samples of {self.path}. Fix: use a '
                             f'global sample id in [0, {self._size}).')
        shard = int(self._ends.searchsorted(sample_id, side='right'))
        view = self._maps.get(shard) or self._shard_view(shard)
        local = sample_id - self._first[shard]
        offsets = view[1]
        try:
            return self._readers[shard].decode_sample(view[0][offsets[local]:offsets[local + 1]])
        except DECODE_ERRORS as err:
            raise damaged_shard(self.shard_file(shard),
                                f'sample {index} does not decode ({type(err).__name__}: {err})') from None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for shard in range(self.num_shards):
            yield from self.read_shard(shard)[0]

    def column(self, name: str) -> list:
        """Every sample's value of column ``name`` (reads all shards)."""
        if name not in self.columns:
            raise KeyError(f'column {name!r} is not in {self.path} (columns: {sorted(self.columns)}).')
        return [sample[name] for sample in self]

    def __reduce__(self):  # memory maps stay in their process: a copy is rebuilt from the path and maps its own
        return (MDSDataset, (str(self.path), self.allow_unsafe_types))

    def __repr__(self) -> str:
        unsafe = ', allow_unsafe_types=True' if self.allow_unsafe_types else ''
        return f'MDSDataset({str(self.path)!r}{unsafe})'
