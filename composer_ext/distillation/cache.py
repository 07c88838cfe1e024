"""The teacher-output cache ("Reuse"): each teacher's logits per sample id, written once, read by later epochs and runs.

A teacher is frozen, so its output on a sample is a function of its weights, the sample and the input transform. The
cache stores that output once (fp16; the full logits, or the top-k logits plus one bucket for the rest) and every
later epoch, seed sweep or hyperparameter sweep with the same teachers and data reads it instead of running the
teacher. It is exact where it claims to be:

* the directory's identity (``meta.json``) is the ordered list of the teachers' weight digests (SHA-256 of the bytes,
  :func:`composer_ext.core.provenance.tensors_sha256`), the dataset's content fingerprint, the declared input
  transform, the encoding (``top_k``, and the temperature the rest bucket is computed at) and the precision the
  teachers run in; a run whose identity differs is refused (:class:`TeacherCacheError`, naming what differs);
* every entry records a digest of the sample's input bytes: a read whose input differs (inputs augmented per epoch)
  is refused rather than served another sample's output;
* a run that writes the cache uses the same encoded-then-decoded logits as a run that reads it, so the loss of a
  step does not depend on whether its entries came from disk.

Layout::

    DIR/
      meta.json                                  the identity (written once, compared by every later run)
      teacher-<i>/chunk-r<rank>-<ns>.npz         entries of teacher i, written atomically by one rank: ids,
                                                 input digests, fp16 values (+ int32 indices, fp16 rest for top-k)

Chunks are written with :func:`composer_ext.storage.atomic_write_bytes` (a killed writer leaves complete chunks
and a temporary file that the next run removes), each rank writes only its own chunk files (ranks see disjoint
samples), and a sample id already on disk is never written again, so a run killed while writing resumes without
losing or duplicating an entry (the entries not yet flushed are recomputed).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from composer.utils import dist

from composer_ext.core.provenance import bytes_sha256
from composer_ext.storage import atomic_write_bytes, atomic_write_json, file_lock, npz_bytes

__all__ = ['CACHE_FORMAT', 'TeacherCacheError', 'TeacherOutputCache', 'decode_logits', 'encode_logits',
           'input_digests']

CACHE_FORMAT = 'composer_ext.teacher_cache/v1'
_STALE_TMP_SECONDS = 600  # a temporary chunk older than this was left by a killed writer (a live one renames it)


class TeacherCacheError(ValueError):
    """A teacher-output cache that describes other teachers, other data, another encoding, or other inputs."""


def encode_logits(logits: torch.Tensor, top_k: Optional[int], temperature: float) -> dict[str, torch.Tensor]:
    """The stored form of a batch of logits ``(batch, classes)``: fp16 ``values`` (all classes, or the top ``k``),
    and for top-k the int32 ``indices`` of those classes and one fp16 ``rest`` logit per sample.

    ``rest`` is the logit that, given to each of the ``C - k`` other classes, keeps their total probability at
    ``temperature``: ``rest = T·(logsumexp(z_rest / T) − log(C − k))``, so the softmax at ``T`` of the decoded logits
    has the teacher's top-k probabilities exactly (up to fp16) and spreads the rest evenly.

    Example:
        >>> encoded = encode_logits(torch.tensor([[2.0, 0.0, 1.0, 0.0]]), top_k=2, temperature=1.0)
        >>> encoded['indices'].tolist(), encoded['rest'].tolist()
        ([[0, 2]], [0.0])
    """
    logits = logits.detach().float()
    if top_k is None:
        return {'values': logits.half()}
    values, indices = logits.topk(top_k, dim=-1)
    rest_logits = logits.scatter(-1, indices, float('-inf'))
    rest = temperature * (torch.logsumexp(rest_logits / temperature, dim=-1) - math.log(logits.shape[-1] - top_k))
    return {'values': values.half(), 'indices': indices.int(), 'rest': rest.half()}


def decode_logits(encoded: dict[str, torch.Tensor], num_classes: int) -> torch.Tensor:
    """Float32 logits ``(batch, num_classes)`` from :func:`encode_logits`'s form (on the tensors' device).

    Example:
        >>> decode_logits(encode_logits(torch.tensor([[2.0, 0.0, 1.0, 0.0]]), 2, 1.0), 4).tolist()
        [[2.0, 0.0, 1.0, 0.0]]
    """
    values = encoded['values'].float()
    if 'indices' not in encoded:
        return values
    logits = encoded['rest'].float()[:, None].expand(values.shape[0], num_classes).clone()
    return logits.scatter_(-1, encoded['indices'].long(), values)


def input_digests(inputs: Any) -> np.ndarray:
    """One uint64 per sample: the first 8 bytes of the SHA-256 of the sample's input bytes (every tensor of a
    tuple/dict, in order), so a cache read can check that it serves the input that was cached."""
    tensors = [t for t in (inputs.values() if isinstance(inputs, dict) else
                           inputs if isinstance(inputs, (tuple, list)) else [inputs]) if isinstance(t, torch.Tensor)]
    rows = [t.detach().cpu().contiguous().reshape(t.shape[0], -1).view(torch.uint8).numpy() for t in tensors]
    data = rows[0] if len(rows) == 1 else np.concatenate(rows, axis=1)
    return np.array([int(bytes_sha256(row.tobytes())[:16], 16) for row in data], dtype=np.uint64)


class _Store:
    """One teacher's entries in memory: growable arrays and an id -> row map (a numpy array over the ids)."""

    def __init__(self):
        self.rows = 0
        self.arrays: dict[str, np.ndarray] = {}
        self.position = np.full(0, -1, dtype=np.int64)

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        """Rows of ``ids`` (-1 where absent)."""
        out = np.full(len(ids), -1, dtype=np.int64)
        known = ids < len(self.position)
        out[known] = self.position[ids[known]]
        return out

    def add(self, entries: dict[str, np.ndarray]) -> None:
        """Append entries whose ids are not present yet (the caller filters)."""
        count = len(entries['ids'])
        if count == 0:
            return
        need = self.rows + count
        if not self.arrays or need > len(self.arrays['ids']):
            capacity = max(need, 2 * (len(self.arrays['ids']) if self.arrays else 0), 256)
            grown = {}
            for name, array in entries.items():
                grown[name] = np.empty((capacity,) + array.shape[1:], dtype=array.dtype)
                if self.arrays:
                    grown[name][:self.rows] = self.arrays[name][:self.rows]
            self.arrays = grown
        for name, array in entries.items():
            self.arrays[name][self.rows:need] = array
        top = int(entries['ids'].max()) + 1
        if top > len(self.position):
            position = np.full(max(top, 2 * len(self.position)), -1, dtype=np.int64)
            position[:len(self.position)] = self.position
            self.position = position
        self.position[entries['ids']] = np.arange(self.rows, need)
        self.rows = need

    def take(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        return {name: array[rows] for name, array in self.arrays.items()}


class TeacherOutputCache:
    """The teacher-output cache of one :class:`~composer_ext.distillation.KnowledgeDistillation` (see the module doc).

    Args:
        path: The cache directory (created if missing).
        top_k: Store the top ``k`` logits and one bucket for the rest; None stores all logits.
        flush_every: Write a chunk once this many new entries of a teacher are buffered (they are also written at
            every epoch end and at the end of fit).

    Example:
        >>> import tempfile
        >>> cache = TeacherOutputCache(tempfile.mkdtemp(), top_k=None)
        >>> cache.open({'teachers': ['ab'], 'data': 'cd'}, num_teachers=1)
        >>> cache.add(0, np.array([3, 5]), np.array([1, 2], dtype=np.uint64),
        ...           encode_logits(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), None, 1.0))
        2
        >>> cache.lookup(0, np.array([5, 4])).tolist()
        [1, -1]
    """

    def __init__(self, path: Union[str, os.PathLike], top_k: Optional[int] = None, flush_every: int = 4096):
        self.path = Path(path)
        self.top_k = top_k
        self.flush_every = flush_every
        self.identity: Optional[dict] = None
        self._stores: list[_Store] = []
        self._pending: list[list[dict[str, np.ndarray]]] = []
        self._loaded: set[str] = set()
        self.entries_written = 0
        self.chunks_written = 0

    def __repr__(self) -> str:
        return f'TeacherOutputCache({str(self.path)!r}, top_k={self.top_k!r})'

    # -- identity ---------------------------------------------------------------------------------------------

    def open(self, identity: dict[str, Any], num_teachers: int) -> None:
        """Create ``meta.json`` or refuse a directory written for another identity; then load every chunk.

        Raises:
            TeacherCacheError: naming the first thing that differs and the fix.
        """
        identity = {'format': CACHE_FORMAT, **identity}
        meta_file = self.path / 'meta.json'
        if self.path.exists() and not self.path.is_dir():
            raise TeacherCacheError(f'cache={str(self.path)!r} is a file, not a directory. Fix: pass a directory '
                                    f'path for the teacher-output cache.')
        with file_lock(self.path / '.lock'):
            if meta_file.exists():
                self._compare(json.loads(meta_file.read_text())['identity'], identity)
            else:
                others = [p.name for p in self.path.iterdir() if not p.name.startswith('.')]
                if others:
                    raise TeacherCacheError(f'cache={str(self.path)!r} exists, is not empty ({sorted(others)[:3]}) and '
                                            f'is not a teacher-output cache. Fix: pass a new or empty directory.')
                atomic_write_json(meta_file, {'identity': identity, 'created': time.time()})
            for teacher in range(num_teachers):
                directory = self.path / f'teacher-{teacher}'
                directory.mkdir(parents=True, exist_ok=True)
                now = time.time()
                for stale in directory.glob('.*.tmp-*'):  # left by a writer killed mid-write
                    if now - stale.stat().st_mtime > _STALE_TMP_SECONDS:
                        stale.unlink(missing_ok=True)
        if self.identity != identity:  # a new identity (or the first open): start from what is on disk
            self._stores = [_Store() for _ in range(num_teachers)]
            self._pending = [[] for _ in range(num_teachers)]
            self._loaded = set()
        self.identity = identity
        self.refresh()

    def _compare(self, old: dict, new: dict) -> None:
        where = f'cache={str(self.path)!r}'
        fix = f'Fix: pass a new cache directory, or delete {str(self.path)!r} to rebuild it for this run.'
        old_teachers, new_teachers = old.get('teachers') or [], new.get('teachers') or []
        if len(old_teachers) != len(new_teachers):
            raise TeacherCacheError(f'{where} holds outputs of {len(old_teachers)} teachers; this run has '
                                    f'{len(new_teachers)}. {fix}')
        for i, (before, now) in enumerate(zip(old_teachers, new_teachers)):
            if before != now:
                raise TeacherCacheError(f'{where} holds outputs of other weights for teachers[{i}]: SHA-256 '
                                        f'{str(before)[:12]} there, {str(now)[:12]} now (a changed teacher). {fix}')
        if old.get('data') != new.get('data'):
            raise TeacherCacheError(f'{where} was written for other data: dataset fingerprint '
                                    f'{str(old.get("data"))[:12]} there, {str(new.get("data"))[:12]} now (another '
                                    f'dataset, subset or normalization). {fix}')
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                raise TeacherCacheError(f'{where} was written with {key}={old.get(key)!r}, this run has '
                                        f'{key}={new.get(key)!r}. {fix}')

    # -- reading ----------------------------------------------------------------------------------------------

    def refresh(self) -> int:
        """Load the chunks written since the last call (by this or other ranks and runs); returns how many."""
        loaded = 0
        for teacher, store in enumerate(self._stores):
            directory = self.path / f'teacher-{teacher}'
            for chunk in sorted(directory.glob('chunk-*.npz')):
                if chunk.name in self._loaded:
                    continue
                with np.load(chunk, allow_pickle=False) as npz:
                    entries = {name: npz[name] for name in npz.files}
                self._loaded.add(chunk.name)
                self._add_new(teacher, entries, check=True)
                loaded += 1
        return loaded

    def _add_new(self, teacher: int, entries: dict[str, np.ndarray], check: bool) -> dict[str, np.ndarray]:
        """Add the entries whose ids are new; return them. ``check``: refuse a known id with another input digest."""
        store = self._stores[teacher]
        rows = store.lookup(entries['ids'])
        known = rows >= 0
        if check and known.any():
            stored = store.arrays['digests'][rows[known]]
            bad = np.flatnonzero(stored != entries['digests'][known])
            if len(bad):
                sample = int(entries['ids'][known][bad[0]])
                raise TeacherCacheError(f'cache={str(self.path)!r} holds two different inputs for sample id {sample} '
                                        f'(teacher-{teacher}): the sample ids do not name fixed inputs. Fix: pass a '
                                        f'new cache directory and a dataset whose ids name fixed samples.')
        # (a repeated id inside one batch, e.g. the distributed sampler's padding, is kept once)
        _, first = np.unique(entries['ids'], return_index=True)
        new = np.sort(first[~known[first]])
        fresh = {name: array[new] for name, array in entries.items()}
        store.add(fresh)
        return fresh

    def lookup(self, teacher: int, ids: np.ndarray) -> np.ndarray:
        """Rows of ``ids`` in teacher ``teacher``'s entries (-1 where not cached)."""
        return self._stores[teacher].lookup(ids)

    def read(self, teacher: int, rows: np.ndarray, digests: Optional[np.ndarray], ids: np.ndarray,
             device: torch.device, num_classes: int) -> torch.Tensor:
        """Decoded float32 logits of ``rows`` on ``device``; with ``digests``, refuse inputs other than the cached.

        Raises:
            TeacherCacheError: an input differs from the one cached under its id (augmented per epoch).
        """
        entries = self._stores[teacher].take(rows)
        if digests is not None:
            bad = np.flatnonzero(entries['digests'] != digests)
            if len(bad):
                raise TeacherCacheError(
                    f'the input of sample id {int(ids[bad[0]])} differs from the one cached in '
                    f'cache={str(self.path)!r} ({len(bad)} of {len(ids)} samples of this batch): the inputs are '
                    f'transformed differently from when they were cached, e.g. augmented per epoch. A teacher output '
                    f'cache is exact only for fixed inputs. Fix: remove the per-epoch augmentation (or seed it so that '
                    f'every epoch and run sees the same inputs, and name it with cache_transform=...), or use '
                    f'cache=None (live teachers).')
        tensors = {name: torch.from_numpy(entries[name]).to(device, non_blocking=True)
                   for name in ('values', 'indices', 'rest') if name in entries}
        return decode_logits(tensors, num_classes)

    # -- writing ----------------------------------------------------------------------------------------------

    def add(self, teacher: int, ids: np.ndarray, digests: np.ndarray, encoded: dict[str, torch.Tensor]) -> int:
        """Buffer the entries of ``ids`` that are not cached yet (readable at once, written at the next flush);
        returns how many were new."""
        entries = {'ids': np.asarray(ids, dtype=np.int64), 'digests': np.asarray(digests, dtype=np.uint64)}
        entries.update({name: tensor.detach().cpu().numpy() for name, tensor in encoded.items()})
        fresh = self._add_new(teacher, entries, check=False)
        if len(fresh['ids']):
            self._pending[teacher].append(fresh)
            if sum(len(part['ids']) for part in self._pending[teacher]) >= self.flush_every:
                self._flush_teacher(teacher)
        return len(fresh['ids'])

    def flush(self) -> None:
        """Write every buffered entry (one chunk per teacher that has any)."""
        for teacher in range(len(self._pending)):
            self._flush_teacher(teacher)

    def _flush_teacher(self, teacher: int) -> None:
        parts = self._pending[teacher]
        if not parts:
            return
        arrays = {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
        # The rank in the name keeps ranks' files apart; the time and pid keep runs apart.
        name = f'chunk-r{dist.get_global_rank()}-{time.time_ns()}-{os.getpid()}.npz'
        atomic_write_bytes(self.path / f'teacher-{teacher}' / name, npz_bytes(arrays))
        self._loaded.add(name)
        self._pending[teacher] = []
        self.entries_written += len(arrays['ids'])
        self.chunks_written += 1

    def num_entries(self, teacher: int) -> int:
        """Entries of teacher ``teacher`` known to this process (on disk or buffered)."""
        return self._stores[teacher].rows
