"""ΔW = W(now) − W(at capture) of the probed modules, and its spectra: :class:`DeltaWTracker`, the measuring core of
:class:`composer_ext.lora_probe.callback.LoRAProbe`, usable on its own.

For a peft LoRA layer ΔW is the update ``scaling · B·A`` from the adapter factors (never merged into the model; its
singular values come from the factors); for any other layer it is the difference from a copy of its initial
weight, kept on rank 0 (``baseline_device``, CPU by default). Spectra are computed on rank 0 from full weights
(:class:`composer_ext.lora_probe.gathering.WeightGatherer`) one module at a time and broadcast to every rank.

Under FSDP2 (``DTensor`` parameters) no rank keeps a whole initial weight: every rank keeps the initial rows of its
own shards (``1 / world_size`` of the whole, up to one row per tensor). A spectrum pass forms ΔW of the local rows
(``W - W0``, shard by shard) and gathers that one module's ΔW (or its LoRA factors, now and at the start) through
:func:`composer_ext.core.sharding.gather`, releasing it before the next module: the extra memory of a pass is the
largest module, never the model (:class:`composer_ext.core.sharding.GatherMeter` measures it).
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from composer.utils import dist
from torch import nn

from composer_ext.core.sharding import gather, is_sharded, local_tensor, shard_like, sharded_like
from composer_ext.lora_probe.discovery import ProbedModule, find_probed_modules, weight_as_matrix
from composer_ext.lora_probe.gathering import WeightGatherer
from composer_ext.lora_probe.spectrum import (DeltaWSpectrum, check_energy, singular_values,
                                              spectrum_from_singular_values)

__all__ = ['BASELINE_DEVICES', 'SPECTRUM_STATS', 'DeltaWTracker', 'check_baseline_device', 'summarize_spectra']

# The per-module statistics the probe records and logs.
SPECTRUM_STATS = ('rank_at_energy', 'effective_rank', 'spectral_norm', 'frobenius_norm', 'stable_rank')
BASELINE_DEVICES = ('cpu', 'same')


def check_baseline_device(baseline_device: Any) -> str:
    """``baseline_device`` (where full-finetuning initial weights are kept), checked: ``'cpu'`` or ``'same'``."""
    if baseline_device not in BASELINE_DEVICES:
        raise ValueError(f"baseline_device={baseline_device!r} is invalid. Fix: use 'cpu' (default) or 'same'.")
    return baseline_device


def _lora_factors(entry: ProbedModule, values: dict, baseline: dict, dtype: torch.dtype,
                  device: torch.device) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``lefts, rights`` with ΔW_adapters = sum_i lefts[i] @ rights[i] (current factors minus initial ones)."""
    lefts, rights = [], []
    module = entry.module
    for role in values:
        if not role.startswith(('A:', 'EA:')):
            continue
        embedding = role.startswith('EA:')
        adapter = role.split(':', 1)[1]
        scaling = float(module.scaling[adapter])
        for source, sign in ((values, 1.0), (baseline, -1.0)):
            a = source[f'EA:{adapter}' if embedding else f'A:{adapter}'].to(device=device, dtype=dtype)
            b = source[f'EB:{adapter}' if embedding else f'B:{adapter}'].to(device=device, dtype=dtype)
            if sign < 0 and not torch.any(b):
                continue  # the usual LoRA start B = 0: the initial product is exactly zero
            if embedding:  # delta (num_embeddings, dim) = (B @ A).T
                lefts.append(sign * scaling * a.T)
                rights.append(b.T)
            else:  # delta (out, in*k) = B @ A, conv kernels flattened
                lefts.append(sign * scaling * b.reshape(b.shape[0], -1))
                rights.append(a.reshape(a.shape[0], -1))
    return lefts, rights


class DeltaWTracker:
    """ΔW = W(now) − W(at capture) of a model's probed modules, and their spectra (the core of ``LoRAProbe``).

    Usable on its own (e.g. on a model you train by hand, also under FSDP). Every method that reads weights
    is collective: call it on every rank, in the same order.

    Args:
        model: The model (DDP/FSDP1/FSDP2/peft-wrapped models are looked through).
        modules: Which modules (see :func:`find_probed_modules`).
        energy: Energy share for ``rank_at_energy``, in (0, 1].
        baseline_device: Where full-finetuning baselines are kept: ``'cpu'`` (default) or ``'same'`` (the
            parameter's device: faster, costs accelerator memory).
        dtype: Dtype of the SVD (float32 by default).

    Example:
        .. code-block:: python

            from composer_ext.lora_probe import DeltaWTracker
            tracker = DeltaWTracker(model, modules='auto')
            tracker.capture()                  # W(start)
            ...                                # train
            spectra = tracker.spectra()        # {module name: DeltaWSpectrum} on every rank
    """

    def __init__(self, model: nn.Module, modules: Union[str, Sequence[str]] = 'auto', energy: float = 0.9,
                 baseline_device: str = 'cpu', dtype: torch.dtype = torch.float32):
        self.energy = check_energy(energy)
        self.baseline_device = check_baseline_device(baseline_device)
        self.dtype = dtype
        self.modules = modules
        self.probed = find_probed_modules(model, modules)
        self._gatherer = WeightGatherer(model)
        self._groups = self._gatherer.group(self.probed)
        self.baseline: dict[str, dict[str, torch.Tensor]] = {}
        self.captured = False

    @property
    def names(self) -> list[str]:
        return [entry.name for entry in self.probed]

    def _entries(self, sharded: Optional[bool] = None) -> Iterator[tuple[ProbedModule, Optional[dict[str,
                                                                                                     torch.Tensor]]]]:
        """Whole tensors (rank 0) of every probed module (``sharded=False``: only those not FSDP2-sharded)."""
        self._gatherer.ensure_initialised()
        for units, entries in self._groups:
            with self._gatherer.unsharded(units):  # one gather per FSDP unit, shared by its modules
                for entry in entries:
                    if sharded is None or self._sharded(entry) == sharded:
                        yield entry, self._gatherer.read(entry)

    def _sharded(self, entry: ProbedModule) -> bool:
        return any(is_sharded(t) for t in self._gatherer.tensors(entry).values())

    def capture(self) -> int:
        """Copy the initial weights (rank 0; under FSDP2 each rank its own shards); returns the bytes kept here."""
        baseline: dict[str, dict[str, torch.Tensor]] = {}
        target = None if self.baseline_device == 'same' else torch.device('cpu')
        self._gatherer.reshard()
        for entry in self.probed:  # FSDP2: no collective, every rank copies the rows it holds
            if self._sharded(entry):
                baseline[entry.name] = {role: local_tensor(tensor).detach().to(target or local_tensor(tensor).device,
                                                                                copy=True)
                                        for role, tensor in self._gatherer.tensors(entry).items()}
        for entry, values in self._entries(sharded=False):
            if values is None:
                continue
            baseline[entry.name] = {role: tensor.detach().to(target or tensor.device, copy=True)
                                    for role, tensor in values.items()}
        self.baseline = baseline
        self.captured = True
        return self.baseline_bytes

    @property
    def baseline_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for kept in self.baseline.values() for t in kept.values())

    def delta(self, entry: ProbedModule, values: dict[str, torch.Tensor]) -> Union[torch.Tensor, tuple]:
        """ΔW of ``entry`` from its full current tensors: a matrix, or a (left, right) pair for LoRA."""
        baseline = self.baseline.get(entry.name)
        if baseline is None:
            raise RuntimeError(f'no baseline for module {entry.name!r}. Fix: call capture() first (on every rank).')
        if self.baseline_device == 'same':
            # A resumed run loads the copy onto the CPU: move it back beside the parameters once, module by module.
            for role, tensor in baseline.items():
                if role in values and tensor.device != values[role].device:
                    baseline[role] = tensor.to(values[role].device)
        if entry.kind == 'full':
            now = values['weight']
            start = baseline['weight'].to(device=now.device)
            return weight_as_matrix(entry.module, now.to(self.dtype) - start.to(self.dtype))
        device = next(iter(values.values())).device
        lefts, rights = _lora_factors(entry, values, baseline, self.dtype, device)
        if 'base' in baseline:  # a trainable base weight moves too: ΔW is dense
            base = entry.tensors['base'][1]
            delta = weight_as_matrix(base, values['base'].to(self.dtype) - baseline['base'].to(device, self.dtype))
            for left, right in zip(lefts, rights):
                delta = delta + left @ right
            return delta
        if not lefts:
            return torch.zeros(entry.shape, dtype=self.dtype, device=device)
        return torch.cat(lefts, dim=1), torch.cat(rights, dim=0)

    def spectra(self) -> dict[str, DeltaWSpectrum]:
        """``{module name: DeltaWSpectrum}``, computed on rank 0 one module at a time and broadcast to all ranks."""
        if not self.captured:
            raise RuntimeError('DeltaWTracker.spectra() before capture(). Fix: call capture() at the start.')
        results: dict[str, DeltaWSpectrum] = {}
        self._gatherer.reshard()
        with torch.no_grad():
            for entry in self.probed:  # FSDP2: one module gathered at a time, in the same order on every rank
                if self._sharded(entry):
                    spectrum = self._sharded_spectrum(entry)
                    if spectrum is not None:
                        results[entry.name] = spectrum
            for entry, values in self._entries(sharded=False):
                if values is None:
                    continue
                delta = self.delta(entry, values)
                sigma = singular_values(delta, dtype=self.dtype)
                results[entry.name] = spectrum_from_singular_values(sigma, self.energy, entry.shape)
                del delta, sigma, values
        if dist.get_world_size() > 1:
            holder = [results]
            dist.broadcast_object_list(holder, src=0)
            results = holder[0]
        return results

    def _sharded_spectrum(self, entry: ProbedModule) -> Optional[DeltaWSpectrum]:
        """The spectrum of an FSDP2 module (rank 0; None elsewhere): ΔW of the local rows, gathered for it only.

        Dense roles (``weight``, a trainable LoRA ``base``) gather ``W - W0`` formed shard by shard; LoRA factors
        gather the current and the initial factors (small: rank × dim).
        """
        start = self.baseline.get(entry.name)
        if start is None:
            raise RuntimeError(f'no baseline for module {entry.name!r}. Fix: call capture() first (on every rank).')
        raw = self._gatherer.tensors(entry)
        dense = [role for role in raw if role in ('weight', 'base')]
        factors = [role for role in raw if role not in dense]
        parts = []
        for role in dense:
            now = local_tensor(raw[role]).detach()
            parts.append(sharded_like(now.to(self.dtype) - start[role].to(now.device, self.dtype), raw[role]))
        for role in factors:
            now = local_tensor(raw[role]).detach()
            parts.append(raw[role].detach())
            parts.append(sharded_like(start[role].to(now.device), raw[role]))
        with gather(*parts) as wholes:
            wholes = list(wholes) if isinstance(wholes, tuple) else [wholes]
            if dist.get_global_rank() != 0:
                return None
            differences = dict(zip(dense, wholes[:len(dense)]))
            current = dict(zip(factors, wholes[len(dense)::2][:len(factors)]))
            initial = dict(zip(factors, wholes[len(dense) + 1::2][:len(factors)]))
            if entry.kind == 'full':
                delta = weight_as_matrix(entry.module, differences['weight'])
            else:
                device = wholes[0].device
                lefts, rights = _lora_factors(entry, current, initial, self.dtype, device)
                if 'base' in differences:  # a trainable base weight moves too: ΔW is dense
                    delta = weight_as_matrix(entry.tensors['base'][1], differences['base'])
                    for left, right in zip(lefts, rights):
                        delta = delta + left @ right
                elif not lefts:
                    delta = torch.zeros(entry.shape, dtype=self.dtype, device=device)
                else:
                    delta = torch.cat(lefts, dim=1), torch.cat(rights, dim=0)
            sigma = singular_values(delta, dtype=self.dtype)
            return spectrum_from_singular_values(sigma, self.energy, entry.shape)

    def baseline_template(self) -> dict[str, dict[str, torch.Tensor]]:
        """FSDP2: ``DTensor`` s shaped as the initial weights (zeros), for a sharded checkpoint to load into."""
        self._gatherer.reshard()
        return {entry.name: {role: sharded_like(torch.zeros_like(local_tensor(t), device='cpu'), t)
                             for role, t in self._gatherer.tensors(entry).items()}
                for entry in self.probed if self._sharded(entry)}

    def state_dict(self, whole: bool = False) -> dict[str, Any]:
        """Under FSDP2 the initial weights are ``DTensor`` s made of each rank's shards (what a sharded checkpoint
        writes), or, with ``whole=True`` (a full checkpoint), gathered one tensor at a time; elsewhere whole
        tensors (rank 0)."""
        baseline = {}
        self._gatherer.reshard()
        for entry in self.probed:
            kept = self.baseline.get(entry.name)
            if kept is None:
                continue
            if self._sharded(entry):
                raw = self._gatherer.tensors(entry)
                kept = {role: sharded_like(tensor, raw[role]) for role, tensor in kept.items()}
                if whole:
                    kept = {role: tensor.full_tensor() for role, tensor in kept.items()}
            baseline[entry.name] = kept
        return {'modules': self.names, 'captured': self.captured, 'baseline': baseline}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state.get('modules', [])) != self.names:
            raise ValueError(f'the checkpoint probed the modules {state.get("modules")}, this run probes '
                             f'{self.names}. Fix: resume with the same model and modules= as the original run.')
        self.captured = bool(state.get('captured'))
        loaded = dict(state.get('baseline') or {})
        baseline = {}
        self._gatherer.reshard()
        for entry in self.probed:
            if entry.name not in loaded:
                continue
            if self._sharded(entry):  # FSDP2: keep this rank's rows (of DTensor shards, or cut from whole tensors)
                raw = self._gatherer.tensors(entry)
                baseline[entry.name] = {role: (local_tensor(tensor) if is_sharded(tensor) else
                                               shard_like(tensor, raw[role])).clone()
                                        for role, tensor in loaded[entry.name].items()}
            elif dist.get_global_rank() == 0:  # only rank 0 computes spectra; other ranks drop the copy
                baseline[entry.name] = loaded[entry.name]
        self.baseline = baseline
        keeps = dist.get_global_rank() == 0 or any(self._sharded(entry) for entry in self.probed)
        if self.captured and keeps and set(self.baseline) != set(self.names):
            raise ValueError('the checkpoint holds no initial weights for some probed modules '
                             f'({sorted(set(self.names) - set(self.baseline))}). Fix: resume from a checkpoint '
                             f'saved by rank 0 with the probe attached from the start.')


def summarize_spectra(spectra: dict[str, DeltaWSpectrum]) -> dict[str, float]:
    """Aggregates over modules: rank@energy mean/max/min, rank fraction, effective/stable rank, norms."""
    if not spectra:
        return {}
    values = list(spectra.values())
    ranks = np.array([s.rank_at_energy for s in values], dtype=np.float64)
    fractions = np.array([s.rank_at_energy / max(1, min(s.shape)) if s.shape else float('nan') for s in values])
    return {
        'rank_at_energy/mean': float(ranks.mean()),
        'rank_at_energy/max': float(ranks.max()),
        'rank_at_energy/min': float(ranks.min()),
        'rank_fraction/mean': float(fractions.mean()),
        'effective_rank/mean': float(np.mean([s.effective_rank for s in values])),
        'stable_rank/mean': float(np.mean([s.stable_rank for s in values])),
        'spectral_norm/max': float(np.max([s.spectral_norm for s in values])),
        'frobenius_norm/total': float(math.sqrt(sum(s.frobenius_norm**2 for s in values))),
    }
