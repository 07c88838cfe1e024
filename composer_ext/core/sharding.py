"""Sharded (FSDP2 ``DTensor``) parameters: their local shard, and whole tensors gathered one module at a time.

Under Composer's FSDP2 every parameter is a ``torch.distributed.tensor.DTensor`` sharded on dim 0 (``Shard(0)``):
rank ``r`` holds rows ``[r * c, min((r + 1) * c, n))`` with ``c = ceil(n / world_size)`` (the last ranks may hold
fewer rows, or none). Techniques that read weights work on the local shard where they can (:func:`local_tensor`)
and gather a whole tensor only where they must, through :func:`gather` - which reports what it holds to every
active :class:`GatherMeter`, so that a test can prove a pass never held more than one module at a time.

Plain tensors pass through all of these unchanged, so one code path serves unsharded, DDP and FSDP2 runs.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

__all__ = ['GatherMeter', 'gather', 'is_sharded', 'local_tensor', 'reshard', 'shard_like', 'sharded_like']

_METERS: list['GatherMeter'] = []


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (an FSDP2 parameter or gradient, or made by :func:`sharded_like`)."""
    return isinstance(tensor, DTensor)


def reshard(model: torch.nn.Module) -> None:
    """Put every FSDP2 module of ``model`` back into its sharded state (a no-op where it already is, and without FSDP2).

    FSDP2 keeps the root module's parameters unsharded after a forward pass (``reshard_after_forward`` does not
    apply to the root), e.g. after an evaluation; its parameters are then plain whole tensors on every rank. Code
    that works on the local shards calls this first, so that it sees ``DTensor`` s.
    """
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a ``DTensor`` (a view: in-place changes reach the parameter); a plain tensor as it is.

    Example:
        >>> import torch
        >>> local_tensor(torch.ones(2)).tolist()
        [1.0, 1.0]
    """
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def shard_like(whole: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``whole`` (shaped like the full ``reference``), cut as ``reference`` is sharded.

    No communication: every rank holds ``whole`` and keeps its own rows. A plain ``reference`` returns ``whole``.
    """
    if not isinstance(reference, DTensor):
        return whole
    if tuple(whole.shape) != tuple(reference.shape):
        raise ValueError(f'whole has shape {tuple(whole.shape)}, the sharded reference {tuple(reference.shape)}. '
                         f'Fix: pass the whole (unsharded) tensor of the same parameter.')
    return distribute_tensor(whole.to(reference.to_local().device), reference.device_mesh, reference.placements,
                             src_data_rank=None).to_local()


def sharded_like(local: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """A ``DTensor`` made of this rank's ``local`` shard, sharded as ``reference`` (a plain tensor: ``local``).

    Used to save per-rank state (pruning masks, initial weights) in a sharded checkpoint: torch's distributed
    checkpoint writes each rank's shard of a ``DTensor``, where it would keep only one rank's copy of a plain tensor.
    """
    if not isinstance(reference, DTensor):
        return local
    if any(not isinstance(p, Shard) or p.dim != 0 for p in reference.placements):
        raise ValueError(f'reference is placed as {reference.placements}; only Shard(0) (FSDP2) is supported. Fix: '
                         f'shard parameters on dim 0 (FSDP2 does so by default).')
    return DTensor.from_local(local, reference.device_mesh, reference.placements, run_check=False,
                              shape=reference.shape, stride=reference.stride())


class GatherMeter:
    """Records the bytes that :func:`gather` holds at each moment: ``peak_bytes``, and ``sizes`` of every gather.

    Example:
        >>> import torch
        >>> with GatherMeter() as meter:
        ...     with gather(torch.ones(4)) as whole:
        ...         pass
        >>> meter.peak_bytes, meter.sizes
        (0, [])
    """

    def __init__(self):
        self.live_bytes = 0
        self.peak_bytes = 0
        self.sizes: list[int] = []

    def _add(self, size: int) -> None:
        self.live_bytes += size
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        self.sizes.append(size)

    def _remove(self, size: int) -> None:
        self.live_bytes -= size

    def __enter__(self) -> 'GatherMeter':
        _METERS.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _METERS.remove(self)

    def __repr__(self) -> str:
        return 'GatherMeter()'


@contextlib.contextmanager
def gather(*tensors: Optional[torch.Tensor]) -> Iterator:
    """The whole (all-gathered) tensors of sharded ``tensors``, held for the ``with`` block only.

    Plain tensors (and None) are yielded as they are and cost nothing; each gathered ``DTensor`` counts its bytes
    in every active :class:`GatherMeter` until the block ends. A collective: every rank must enter it.
    Yields a single tensor for a single argument, else a tuple.
    """
    wholes, size = [], 0
    for tensor in tensors:
        if isinstance(tensor, DTensor):
            whole = tensor.full_tensor()
            size += whole.numel() * whole.element_size()
        else:
            whole = tensor
        wholes.append(whole)
    for meter in _METERS:
        if size:
            meter._add(size)
    try:
        yield wholes[0] if len(wholes) == 1 else tuple(wholes)
    finally:
        for meter in _METERS:
            if size:
                meter._remove(size)
        wholes.clear()
