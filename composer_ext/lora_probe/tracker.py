"""ΔW = W(now) − W(at capture) of the probed modules, and its spectra: :class:`DeltaWTracker`, the measuring core of
:class:`composer_ext.lora_probe.callback.LoRAProbe`, usable on its own.

For a peft LoRA layer ΔW is the update ``scaling · B·A`` from the adapter factors (never merged into the model; its
singular values come from the factors); for any other layer it is the difference from a copy of its initial
weight, kept on rank 0 (``baseline_device``, CPU by default). Spectra are computed on rank 0 from full weights
(:class:`composer_ext.lora_probe.gathering.WeightGatherer`) one module at a time and broadcast to every rank.
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from composer.utils import dist
from torch import nn

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

    def _entries(self) -> Iterator[tuple[ProbedModule, Optional[dict[str, torch.Tensor]]]]:
        self._gatherer.ensure_initialised()
        for units, entries in self._groups:
            with self._gatherer.unsharded(units):  # one gather per FSDP unit, shared by its modules
                for entry in entries:
                    yield entry, self._gatherer.read(entry)

    def capture(self) -> int:
        """Copy the initial weights (rank 0); returns the bytes kept (0 on other ranks)."""
        baseline: dict[str, dict[str, torch.Tensor]] = {}
        for entry, values in self._entries():
            if values is None:
                continue
            target = None if self.baseline_device == 'same' else torch.device('cpu')
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
        with torch.no_grad():
            for entry, values in self._entries():
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

    def state_dict(self) -> dict[str, Any]:
        return {'modules': self.names, 'captured': self.captured, 'baseline': self.baseline}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state.get('modules', [])) != self.names:
            raise ValueError(f'the checkpoint probed the modules {state.get("modules")}, this run probes '
                             f'{self.names}. Fix: resume with the same model and modules= as the original run.')
        self.captured = bool(state.get('captured'))
        # Only rank 0 computes spectra; other ranks drop the copy they were handed.
        self.baseline = dict(state.get('baseline') or {}) if dist.get_global_rank() == 0 else {}
        if self.captured and dist.get_global_rank() == 0 and set(self.baseline) != set(self.names):
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
