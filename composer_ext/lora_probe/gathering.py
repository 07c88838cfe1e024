"""Full weights of the probed modules on rank 0, gathered one FSDP unit (FSDP1) or one parameter (FSDP2) at a time.

Under DDP (or a single process) nothing is gathered: every rank has the full weights. FSDP1 gathers with
``summon_full_params(rank0_only=True)``, so only rank 0 holds a unit's full weights; FSDP2's
``DTensor.full_tensor()`` is an all-gather that builds each full parameter on every rank, so every rank briefly
holds one full parameter (the largest probed matrix bounds the extra memory). Every method that reads weights is
collective: call it on every rank, in the same order. (The tracker reads FSDP2 modules through :meth:`tensors`
instead and keeps their initial weights per shard: see :mod:`composer_ext.lora_probe.tracker`.)
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sequence

import torch
from composer.utils import dist
from torch import nn

from composer_ext.core.sharding import reshard
from composer_ext.core.unwrap import unwrap_parallel
from composer_ext.lora_probe.discovery import ProbedModule

__all__ = ['WeightGatherer']


def _fsdp1_class():
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:
        return None
    return FullyShardedDataParallel


def _dtensor_class():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return None
    return DTensor


class WeightGatherer:
    """Full tensors of the probed modules' parameters on rank 0, gathering one FSDP unit (or parameter) at a time.

    Args:
        model: The model the modules belong to (DDP is looked through; FSDP1 units and FSDP2 DTensors are gathered).
    """

    def __init__(self, model: nn.Module):
        model = unwrap_parallel(model)
        self.model = model
        self.fsdp = _fsdp1_class()
        self.dtensor = _dtensor_class()
        self.modules = dict(model.named_modules())

    def owner(self, holder_path: str) -> Optional[nn.Module]:
        """The innermost FSDP1 instance that holds (flattens) the parameters of the module at ``holder_path``."""
        if self.fsdp is None:
            return None
        parts = holder_path.split('.') if holder_path else []
        owner = self.model if isinstance(self.model, self.fsdp) else None
        for i in range(1, len(parts) + 1):
            module = self.modules.get('.'.join(parts[:i]))
            if isinstance(module, self.fsdp):
                owner = module
        return owner

    def roots(self) -> list[nn.Module]:
        if self.fsdp is None:
            return []
        return [m for m in self.fsdp.fsdp_modules(self.model, root_only=True)]

    def ensure_initialised(self) -> None:
        """Run FSDP1's lazy root initialisation, so gathering an inner unit first cannot make it the root."""
        roots = self.roots()
        if not roots:
            return
        try:
            from torch.distributed.fsdp._runtime_utils import _lazy_init
        except ImportError:
            _lazy_init = None
        for root in roots:
            if _lazy_init is not None:
                _lazy_init(root, root)
            else:  # a no-op gather of the root's own parameters also initialises it
                with self.fsdp.summon_full_params(root, recurse=False, writeback=False):
                    pass

    def group(self, probed: Sequence[ProbedModule]) -> list[tuple[list[nn.Module], list[ProbedModule]]]:
        """Consecutive modules that share their FSDP1 units, with those units, so each unit is gathered once per
        pass: ``[(units, modules), ...]`` in the order of ``probed``."""
        groups: list[tuple[list[nn.Module], list[ProbedModule]]] = []
        for entry in probed:
            owners: list[nn.Module] = []
            for holder_path, _, _ in entry.tensors.values():
                owner = self.owner(holder_path)
                if owner is not None and all(owner is not o for o in owners):
                    owners.append(owner)
            if groups and [id(o) for o in groups[-1][0]] == [id(o) for o in owners]:
                groups[-1][1].append(entry)
            else:
                groups.append((owners, [entry]))
        return groups

    @contextlib.contextmanager
    def unsharded(self, units: Sequence[nn.Module]) -> Iterator[None]:
        """Hold the full parameters of the FSDP1 ``units`` (rank 0 only) for the duration of the block."""
        with contextlib.ExitStack() as stack:
            for unit in units:
                stack.enter_context(self.fsdp.summon_full_params(unit, recurse=False, writeback=False,
                                                                 rank0_only=True))
            yield

    def reshard(self) -> None:
        """FSDP2: back to sharded parameters (the root stays unsharded after a forward pass, e.g. an evaluation)."""
        reshard(self.model)

    def tensors(self, entry: ProbedModule) -> dict[str, torch.Tensor]:
        """``role -> tensor`` of ``entry`` as the model holds it (an FSDP2 ``DTensor`` stays sharded)."""
        return {role: holder[attribute] if isinstance(holder, nn.ParameterDict) else getattr(holder, attribute)
                for role, (_, holder, attribute) in entry.tensors.items()}

    def read(self, entry: ProbedModule) -> Optional[dict[str, torch.Tensor]]:
        """``role -> full tensor`` on rank 0 (None on other ranks, after taking part in any collective)."""
        values = {}
        for role, (_, holder, attribute) in entry.tensors.items():
            tensor = holder[attribute] if isinstance(holder, nn.ParameterDict) else getattr(holder, attribute)
            if self.dtensor is not None and isinstance(tensor, self.dtensor):
                tensor = tensor.full_tensor()  # FSDP2: a collective on every rank
            values[role] = tensor.detach()
        return values if dist.get_global_rank() == 0 else None
