"""Provenance hashes: content digests that say what a result was computed from (ids, files, configs, weights).

Every digest is SHA-256 over bytes that depend only on the content (never on paths, object ids or the
install location), so two machines that hold the same content compute the same digest.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Iterable, Mapping, Union

import numpy as np
import torch

__all__ = ['bytes_sha256', 'chunks_sha256', 'file_sha256', 'ids_sha256', 'json_sha256', 'stable_fraction',
           'tensors_sha256']

_CHUNK = 1 << 20


def bytes_sha256(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def chunks_sha256(chunks: Iterable[bytes]) -> str:
    """Hex SHA-256 of the concatenation of ``chunks``, fed one at a time (never all in memory at once).

    Equal to ``bytes_sha256(b''.join(chunks))``: a caller that serialises its content as a stream of parts (a
    model's weights tensor by tensor) keeps the digest it computed before with ``hashlib.sha256().update``.
    """
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


def ids_sha256(ids: Any) -> str:
    """Hex SHA-256 of a sequence of sample ids, as contiguous int64 (so the dtype the ids came in does not matter).

    Example:
        >>> ids_sha256([1, 2, 3]) == ids_sha256(np.array([1, 2, 3], dtype=np.int32))
        True
    """
    return bytes_sha256(np.ascontiguousarray(ids, dtype=np.int64).tobytes())


def json_sha256(obj: Any) -> str:
    """Hex SHA-256 of ``obj`` as canonical JSON (sorted keys), for configs and records."""
    return bytes_sha256(json.dumps(obj, sort_keys=True).encode())


def stable_fraction(text: str) -> float:
    """A number in [0, 1) fixed by ``text``: the first 8 bytes of its SHA-1, the same on every machine and run.

    For seeded-by-content choices (the corpus's document order and train/val split). SHA-1, not SHA-256, because
    corpora built before keep their documents: the choice must not move.
    """
    return int.from_bytes(hashlib.sha1(text.encode()).digest()[:8], 'big') / 2**64


def file_sha256(path: Union[str, os.PathLike]) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, 'rb') as file:
        for chunk in iter(lambda: file.read(_CHUNK), b''):
            digest.update(chunk)
    return digest.hexdigest()


def tensors_sha256(tensors: Mapping[str, torch.Tensor], separator: str = ':') -> str:
    """Hex SHA-256 of a state dict: every tensor's name, dtype, shape and bytes, in sorted name order.

    Exact (bytes, not a float sum): two weights that differ in any bit give different digests. ``separator``
    joins name, dtype and shape; score indexes record model fingerprints made with ``'|'``, so they pass it to
    keep comparing equal with indexes written before.
    """
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name]
        if not isinstance(tensor, torch.Tensor):
            continue
        tensor = tensor.detach()
        if hasattr(tensor, 'full_tensor'):  # a DTensor shard: hash the whole tensor
            tensor = tensor.full_tensor()
        tensor = tensor.cpu().contiguous()
        digest.update(f'{name}{separator}{tensor.dtype}{separator}{tuple(tensor.shape)}{separator}'.encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b'')
    return digest.hexdigest()
