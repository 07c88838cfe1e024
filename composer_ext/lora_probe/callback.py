"""LoRAProbe: how much a finetune learns, how much it forgets, and how high-rank its weight update is, live.

"LoRA Learns Less and Forgets Less" (Biderman et al. 2024) found that LoRA learns less on the target domain
than full finetuning but keeps more of the source domain, and that full finetuning learns weight updates ΔW
whose rank is 10-100x that of typical LoRA configurations. :class:`LoRAProbe` measures both during your own
finetune, for LoRA (peft) and full finetuning alike:

* **Learning and forgetting.** At ``FIT_START`` it evaluates the ``target_evals`` (the domain being learned) and
  the ``source_evals`` (the domain that must not be forgotten); every ``every`` it evaluates them again and logs
  the change from the start: learning = target improvement, forgetting = source degradation (signed so that
  positive means "learned" / "forgot", whatever the metric's direction).
* **The spectrum of ΔW.** Every ``spectrum_every``, for each probed module, ΔW = W(now) − W(at FIT_START): for a
  peft LoRA layer the update ``scaling · B·A`` from the adapter weights (never merged into the model; its
  singular values come from the factors), for any other layer the difference from a copy of its initial weight
  (CPU by default). Per module and aggregated: the rank needed for ``energy`` of the squared singular values,
  the entropy-based effective rank, spectral, Frobenius norms and stable rank
  (:func:`composer_ext.metrics.delta_w_spectrum`).

The probe observes and never steers: its evaluations run under ``torch.no_grad`` in eval mode and restore every
random generator afterwards, so a run with the probe trains bit for bit like a run without it.

Distributed: evaluations run on every rank over its shard and the metrics are reduced across ranks
(torchmetrics); spectra are computed on rank 0 from full weights gathered one FSDP unit (FSDP1) or one
parameter (FSDP2) at a time, never the whole model at once, and the results are broadcast so every rank holds
the same history. Under DDP nothing is gathered (every rank has the full weights). FSDP1 gathers with
``summon_full_params(rank0_only=True)``, so only rank 0 holds a unit's full weights; FSDP2's
``DTensor.full_tensor()`` is an all-gather that builds each full parameter on every rank, so every rank briefly
holds one full parameter (the largest probed matrix bounds the extra memory; it is freed before the next one).

Memory: full finetuning keeps one copy of the probed modules' initial weights on rank 0 (``baseline_device``,
CPU by default): ``sum(numel × element size)`` of those weights, logged once as ``lora_probe/baseline_bytes``
(4 bytes × 0.4 M = 1.6 MB for the small GPT of ``yamls/lora_probe``; 2 GB for 0.5 B fp32 projection weights).
LoRA layers keep only their initial adapter factors (the size of the adapter). The copy is part of the
checkpointed state (each checkpoint grows by it), so a resumed run measures ΔW from the original start.

What is written: with ``save_folder``, rank 0 rewrites ``<save_folder>/lora_probe.json`` atomically after every
probe (run name, settings, baselines, the full history). ``composer-ext report lora RUN_DIR...`` reads those
files; a RUN_DIR is any directory that contains one (searched recursively).

Logged keys (``logger.log_metrics``, step = batch):

* ``lora_probe/{source,target}/<label>/<metric>``: the metric now;
* ``lora_probe/learning/<label>/<metric>``, ``lora_probe/forgetting/<label>/<metric>``: the change from the start;
* ``lora_probe/learning``, ``lora_probe/forgetting``: the mean over target (source) evaluators of the primary
  metric (the first of ``metric_names``; by default the first metric every evaluator follows);
* ``lora_probe/delta_w/<module>/<stat>`` (``rank_at_energy``, ``effective_rank``, ``spectral_norm``,
  ``frobenius_norm``, ``stable_rank``; with ``log_modules=True``) and the aggregates
  ``lora_probe/delta_w/rank_at_energy/{mean,max,min}``, ``.../rank_fraction/mean``, ``.../effective_rank/mean``,
  ``.../stable_rank/mean``, ``.../spectral_norm/max``, ``.../frobenius_norm/total``.
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from composer.core import Callback, Evaluator, Event, State, Time, TimeUnit
from composer.core.data_spec import ensure_data_spec
from composer.core.precision import get_precision_context
from composer.loggers import Logger
from composer.utils import dist
from composer.utils.misc import model_eval_mode
from torch import nn

from composer_ext.lora_probe.spectrum import DeltaWSpectrum, singular_values, spectrum_from_singular_values
from composer_ext.storage import atomic_write_json

__all__ = ['DeltaWTracker', 'LoRAProbe', 'ProbedModule', 'build_lora_probe', 'find_probed_modules']

FORMAT = 'composer_ext.lora_probe/1'
HISTORY_FILE = 'lora_probe.json'
SPECTRUM_STATS = ('rank_at_energy', 'effective_rank', 'spectral_norm', 'frobenius_norm', 'stable_rank')
_INTERVAL_UNITS = (TimeUnit.BATCH, TimeUnit.EPOCH, TimeUnit.SAMPLE, TimeUnit.TOKEN, TimeUnit.DURATION)
_WRAPPER_PARTS = frozenset({'_fsdp_wrapped_module', '_checkpoint_wrapped_module', '_orig_mod'})
_LOWER_IS_BETTER = re.compile(r'loss|entropy|perplexity|error|mse|mae|bpb|bits', re.IGNORECASE)
_HIGHER_IS_BETTER = re.compile(r'accuracy|acc\b|f1|auroc|auc|precision|recall|score|iou|bleu|rouge', re.IGNORECASE)

EvaluatorsLike = Union[Evaluator, Any, Sequence[Any], None]


# --- time -------------------------------------------------------------------------------------------------


def _parse_interval(value: Any, name: str) -> Optional[Time]:
    """A positive Composer time (int = batches, time string, or Time), or None to probe only at start and end."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise TypeError(f'{name}={value!r} is not a time. Fix: use e.g. {name}="100ba", "1ep", "0.1dur" or an int '
                        f'(batches), or None.')
    if isinstance(value, int):
        value = Time(value, TimeUnit.BATCH)
    elif isinstance(value, str):
        try:
            value = Time.from_timestring(value)
        except ValueError:
            raise ValueError(f'{name}={value!r} is not a Composer time string. Fix: use e.g. "100ba", "2ep", '
                             f'"1e6tok", "5000sp" or "0.1dur".') from None
    if not isinstance(value, Time):
        raise TypeError(f'{name}={value!r} is a {type(value).__name__}. Fix: use a time string such as "100ba", an '
                        f'int (batches), a composer Time, or None.')
    if value.unit not in _INTERVAL_UNITS:
        raise ValueError(f'{name}={value!r} has unit {value.unit.value!r}. Fix: use batches, epochs, samples, tokens '
                         f'or a fraction of the duration, e.g. "100ba" or "0.1dur".')
    if not value.value > 0 or (value.unit == TimeUnit.DURATION and value.value > 1):
        raise ValueError(f'{name}={value!r} must be positive (and at most 1dur). Fix: use e.g. "100ba" or "0.1dur".')
    return value


def _time_repr(value: Optional[Time]) -> str:
    if value is None:
        return 'None'
    number = value.value
    text = f'{number:g}' if isinstance(number, float) else str(number)
    return repr(f'{text}{value.unit.value}')


class _Schedule:
    """When an interval is due: ``dur`` resolved against ``max_duration`` at FIT_START; threshold crossings."""

    def __init__(self, interval: Optional[Time], name: str):
        self.interval = interval
        self.name = name  # the argument it came from, for error messages
        self.resolved: Optional[Time] = None

    def resolve(self, state: State) -> None:
        interval = self.interval
        if interval is None:
            self.resolved = None
            return
        if interval.unit == TimeUnit.DURATION:
            max_duration = state.max_duration
            if max_duration is None:
                raise ValueError(f'{self.name}={_time_repr(interval)} is a fraction of the duration, but the Trainer '
                                 f'has no max_duration. Fix: set max_duration, or use e.g. {self.name}="100ba".')
            unit, total = max_duration.unit, max_duration.value
            if unit == TimeUnit.EPOCH:
                if state.dataloader_len is None:
                    raise ValueError(f'{self.name}={_time_repr(interval)} with max_duration='
                                     f'{_time_repr(max_duration)} needs a sized train dataloader to count batches. '
                                     f'Fix: use a batch interval such as {self.name}="100ba".')
                unit, total = TimeUnit.BATCH, total * int(state.dataloader_len)
            self.resolved = Time(max(1, math.ceil(interval.value * total)), unit)
        else:
            self.resolved = interval

    def due(self, state: State, event: Event) -> bool:
        interval = self.resolved
        if interval is None:
            return False
        if interval.unit == TimeUnit.EPOCH:
            return event == Event.EPOCH_END and int(state.timestamp.epoch) % int(interval.value) == 0
        if event != Event.BATCH_END:
            return False
        now = state.timestamp.get(interval.unit).value
        before = state.previous_timestamp.get(interval.unit).value if state.previous_timestamp is not None else 0
        return math.floor(now / interval.value) != math.floor(before / interval.value)


# --- modules ------------------------------------------------------------------------------------------------


def _lora_layer_class():
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # peft is a dependency, but the probe works without it
        return None
    return LoraLayer


def _conv1d_class():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


@dataclass
class ProbedModule:
    """One module whose update ΔW the probe measures.

    Attributes:
        name: The module's name with wrapper parts removed (DDP ``module.``, FSDP ``_fsdp_wrapped_module.``,
            peft ``base_model.model.``), so a LoRA run and a full run name the same layer alike.
        path: The module's name in the model as given.
        module: The module (a peft ``LoraLayer`` for ``kind='lora'``).
        kind: ``'lora'`` (ΔW from the adapter factors) or ``'full'`` (ΔW from a copy of the initial weight).
        shape: ΔW's shape as (out features, in features [x kernel]).
    """

    name: str
    path: str
    module: nn.Module
    kind: str
    shape: tuple
    tensors: dict = field(default_factory=dict, repr=False)  # role -> (holder path, holder module, attribute)


def _clean(path: str) -> str:
    return '.'.join(p for p in path.split('.') if p not in _WRAPPER_PARTS)


def _canonical_names(model: nn.Module) -> dict[str, str]:
    """``path -> canonical name`` of every module (wrapper parts and peft's ``base_model.model`` removed)."""
    try:
        from peft import PeftModel
    except ImportError:
        PeftModel = ()  # noqa: N806
    paths = {path: _clean(path) for path, _ in model.named_modules()}
    prefixes = []
    for path, module in model.named_modules():
        if PeftModel and isinstance(module, PeftModel):
            clean = paths[path]
            prefixes.append(((clean + '.' if clean else '') + 'base_model.model', clean))
    names = {}
    for path, clean in paths.items():
        for prefix, replacement in sorted(prefixes, key=lambda p: -len(p[0])):
            if clean == prefix or clean.startswith(prefix + '.'):
                clean = replacement + clean[len(prefix):]
                clean = clean.lstrip('.')
                break
        names[path] = clean
    return names


def _weight_shape(module: nn.Module, weight: torch.Tensor) -> tuple:
    """ΔW's (out, in...) shape, from the layer's attributes: under FSDP the weight may be a flat shard."""
    conv1d = _conv1d_class()
    if conv1d is not None and isinstance(module, conv1d):
        return (int(module.nf), int(module.nx))  # Conv1D stores its weight as (in, out)
    if isinstance(module, nn.Linear):
        return (int(module.out_features), int(module.in_features))
    if isinstance(module, nn.modules.conv._ConvNd):
        return (int(module.out_channels), int(module.in_channels // module.groups * np.prod(module.kernel_size)))
    if isinstance(module, nn.Embedding):
        return (int(module.num_embeddings), int(module.embedding_dim))
    if weight.dim() < 2:
        raise ValueError(f'cannot tell the matrix shape of a {type(module).__name__} whose weight has shape '
                         f'{tuple(weight.shape)}. Fix: exclude it with modules=[...].')
    return (int(weight.shape[0]), int(np.prod(weight.shape[1:])))


def _ties_to_embedding(model: nn.Module) -> set[int]:
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}


def _lora_tensors(path: str, module: nn.Module, name: str) -> tuple[dict, tuple]:
    """The tensors (A, B per active adapter, and the base weight) and ΔW's shape of a peft LoRA layer."""
    adapters = [a for a in module.active_adapters if a in module.lora_A or a in module.lora_embedding_A]
    if not adapters:
        raise ValueError(f'module {name!r} is a LoRA layer with no active adapter. Fix: activate an adapter or '
                         f'exclude the module with modules=[...].')
    tensors = {}
    for adapter in adapters:
        if getattr(module, 'use_dora', {}).get(adapter, False):
            raise ValueError(f'module {name!r} uses DoRA (adapter {adapter!r}), whose update is not scaling·B·A. '
                             f'Fix: probe plain LoRA adapters, or exclude the module with modules=[...].')
        if adapter in module.lora_A:
            tensors[f'A:{adapter}'] = (f'{path}.lora_A.{adapter}', module.lora_A[adapter], 'weight')
            tensors[f'B:{adapter}'] = (f'{path}.lora_B.{adapter}', module.lora_B[adapter], 'weight')
        else:
            tensors[f'EA:{adapter}'] = (f'{path}.lora_embedding_A', module.lora_embedding_A, adapter)
            tensors[f'EB:{adapter}'] = (f'{path}.lora_embedding_B', module.lora_embedding_B, adapter)
    base = module.get_base_layer()
    if base.weight.requires_grad:  # a frozen base weight cannot move: neither gathered nor copied
        tensors['base'] = (f'{path}.base_layer', base, 'weight')
    return tensors, _weight_shape(base, base.weight)


def _module_patterns(modules: Any) -> Optional[list[str]]:
    """The ``modules`` patterns (None for ``'auto'``), each checked to compile as a regular expression."""
    if isinstance(modules, str) and modules:
        patterns = None if modules == 'auto' else [modules]
    elif isinstance(modules, Sequence) and not isinstance(modules, str) and modules and \
            all(isinstance(p, str) and p for p in modules):
        patterns = list(modules)
    else:
        raise ValueError(f"modules={modules!r} is invalid. Fix: use 'auto', a regular expression, or a non-empty list "
                         f"of them, e.g. modules=['attn.c_attn', r'.*\\.mlp\\..*'].")
    for pattern in patterns or []:
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(f'modules pattern {pattern!r} is not a regular expression ({err}). Fix: escape special '
                             f'characters, e.g. {re.escape(pattern)!r}.') from None
    return patterns


def find_probed_modules(model: nn.Module, modules: Union[str, Sequence[str]] = 'auto') -> list[ProbedModule]:
    """The modules a :class:`LoRAProbe` measures, in model order.

    Args:
        model: The model (a Composer model; DDP, FSDP and peft wrappers are looked through).
        modules: ``'auto'``: every peft LoRA layer if the model has any, else every trainable ``nn.Linear``,
            ``transformers`` ``Conv1D`` and convolution whose weight is not tied to an embedding. Otherwise a
            regular expression or a list of them; a module is probed when a pattern matches its canonical name
            fully (``re.fullmatch``) or is a dotted suffix of it (``'attn.c_attn'`` matches ``...h.0.attn.c_attn``).

    Raises:
        ValueError: a pattern that matches no module (the message lists candidate names).
    """
    patterns = _module_patterns(modules)
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    names = _canonical_names(model)
    lora_layer = _lora_layer_class()
    conv1d = _conv1d_class()
    full_types = tuple(t for t in (nn.Linear, conv1d, nn.modules.conv._ConvNd) if t is not None)
    tied = _ties_to_embedding(model)
    inside_lora: list[str] = []
    candidates: list[ProbedModule] = []
    for path, module in model.named_modules():
        if any(path.startswith(prefix + '.') for prefix in inside_lora):
            continue  # base_layer, lora_A/lora_B of a LoRA layer: measured through the layer
        if lora_layer is not None and isinstance(module, lora_layer):
            inside_lora.append(path)
            tensors, shape = _lora_tensors(path, module, names[path])
            candidates.append(ProbedModule(names[path], path, module, 'lora', shape, tensors))
        elif isinstance(module, full_types) and isinstance(getattr(module, 'weight', None), torch.Tensor) \
                and id(module.weight) not in tied:
            tensors = {'weight': (path, module, 'weight')}
            candidates.append(ProbedModule(names[path], path, module, 'full', _weight_shape(module, module.weight),
                                           tensors))
    if patterns is None:
        lora = [c for c in candidates if c.kind == 'lora']
        chosen = lora or [c for c in candidates if c.module.weight.requires_grad]
        if not chosen:
            raise ValueError("modules='auto' found no LoRA layer and no trainable Linear/Conv1D/convolution weight in "
                             'the model. Fix: pass modules=[...] naming the layers to probe.')
        return chosen
    chosen_ids: set[int] = set()
    for pattern in patterns:
        hits = [c for c in candidates if re.fullmatch(pattern, c.name) or c.name.endswith('.' + pattern)
                or c.name == pattern]
        if not hits:
            examples = [c.name for c in candidates][:6]
            raise ValueError(f'modules pattern {pattern!r} matches no probe-able module. Fix: use a regular expression '
                             f'or a dotted suffix of one of the {len(candidates)} candidate names, e.g. {examples}.')
        chosen_ids.update(id(c) for c in hits)
    return [c for c in candidates if id(c) in chosen_ids]


# --- full weights (gathered under FSDP), one unit at a time ---------------------------------------------------------


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


class _Gatherer:
    """Full tensors of a module's parameters on rank 0, gathering one FSDP unit (or parameter) at a time."""

    def __init__(self, model: nn.Module):
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
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

    def group(self, probed: Sequence[ProbedModule]) -> list[tuple[tuple, list[ProbedModule]]]:
        """Consecutive modules that share their FSDP units, so each unit is gathered once per pass."""
        groups: list[tuple[tuple, list[ProbedModule]]] = []
        for entry in probed:
            owners = []
            for holder_path, _, _ in entry.tensors.values():
                owner = self.owner(holder_path)
                if owner is not None and all(owner is not o for o in owners):
                    owners.append(owner)
            key = tuple(id(o) for o in owners)
            if groups and groups[-1][0] == key:
                groups[-1][1].append(entry)
            else:
                groups.append((key, [entry]))
            entry._owners = owners  # type: ignore[attr-defined]
        return groups

    @contextlib.contextmanager
    def unsharded(self, entry: ProbedModule) -> Iterator[None]:
        """Hold the full parameters of ``entry``'s FSDP1 units (rank 0 only) for the duration of the block."""
        with contextlib.ExitStack() as stack:
            for owner in getattr(entry, '_owners', []):
                stack.enter_context(self.fsdp.summon_full_params(owner, recurse=False, writeback=False,
                                                                 rank0_only=True))
            yield

    def read(self, entry: ProbedModule) -> Optional[dict[str, torch.Tensor]]:
        """``role -> full tensor`` on rank 0 (None on other ranks, after taking part in any collective)."""
        values = {}
        for role, (_, holder, attribute) in entry.tensors.items():
            tensor = holder[attribute] if isinstance(holder, nn.ParameterDict) else getattr(holder, attribute)
            if self.dtensor is not None and isinstance(tensor, self.dtensor):
                tensor = tensor.full_tensor()  # FSDP2: a collective on every rank
            values[role] = tensor.detach()
        return values if dist.get_global_rank() == 0 else None


# --- ΔW ----------------------------------------------------------------------------------------------------


def _as_matrix(entry: ProbedModule, holder: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """A weight as ΔW's (out, in...) matrix: transposed for Conv1D, flattened for convolutions."""
    conv1d = _conv1d_class()
    if conv1d is not None and isinstance(holder, conv1d):
        return weight.T
    return weight.reshape(weight.shape[0], -1)


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
    """ΔW = W(now) − W(at capture) of a model's probed modules, and their spectra (the core of :class:`LoRAProbe`).

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

            from composer_ext.lora_probe.callback import DeltaWTracker
            tracker = DeltaWTracker(model, modules='auto')
            tracker.capture()                  # W(start)
            ...                                # train
            spectra = tracker.spectra()        # {module name: DeltaWSpectrum} on every rank
    """

    def __init__(self, model: nn.Module, modules: Union[str, Sequence[str]] = 'auto', energy: float = 0.9,
                 baseline_device: str = 'cpu', dtype: torch.dtype = torch.float32):
        from composer_ext.lora_probe.spectrum import _check_energy
        self.energy = _check_energy(energy)
        if baseline_device not in ('cpu', 'same'):
            raise ValueError(f"baseline_device={baseline_device!r} is invalid. Fix: use 'cpu' (default) or 'same'.")
        self.baseline_device = baseline_device
        self.dtype = dtype
        self.modules = modules
        self.probed = find_probed_modules(model, modules)
        self._gatherer = _Gatherer(model)
        self._groups = self._gatherer.group(self.probed)
        self.baseline: dict[str, dict[str, torch.Tensor]] = {}
        self.captured = False

    @property
    def names(self) -> list[str]:
        return [entry.name for entry in self.probed]

    def _entries(self) -> Iterator[tuple[ProbedModule, Optional[dict[str, torch.Tensor]]]]:
        self._gatherer.ensure_initialised()
        for _, entries in self._groups:
            with self._gatherer.unsharded(entries[0]):  # one gather per FSDP unit, shared by its modules
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
            return _as_matrix(entry, entry.module, now.to(self.dtype) - start.to(self.dtype))
        device = next(iter(values.values())).device
        lefts, rights = _lora_factors(entry, values, baseline, self.dtype, device)
        if 'base' in baseline:  # a trainable base weight moves too: ΔW is dense
            base = entry.tensors['base'][1]
            delta = _as_matrix(entry, base, values['base'].to(self.dtype) - baseline['base'].to(device, self.dtype))
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


# --- evaluation ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _preserved_rng() -> Iterator[None]:
    """Restore Python, NumPy, torch and CUDA generators afterwards: the probe must not change training."""
    python_state, numpy_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


# torchmetrics' own per-instance wrappers and cross-rank sync settings: they do not change what update() adds.
_SYNC_ATTRIBUTES = frozenset({'update', 'compute', 'process_group', 'dist_sync_fn', 'distributed_available_fn'})


def _update_config(obj: Any) -> Optional[dict]:
    """The settings that shape ``obj``'s (a metric's or its submodule's) update, or None if they cannot be compared.

    Public plain-value attributes (``ignore_index``, ``reduction``, ...) and, recursively, submodules (a loss
    module) with their type and buffers, as values that compare with ``==``. Any other public attribute (a tensor,
    a list of class weights) makes the metric incomparable, so it never shares its update.
    """
    config: dict[str, Any] = {}
    for key, value in vars(obj).items():
        if key.startswith('_') or key in getattr(obj, '_defaults', {}) or key in _SYNC_ATTRIBUTES:
            continue
        if value is not None and not isinstance(value, (bool, int, float, str)):
            return None
        config[key] = value
    for name, module in getattr(obj, '_modules', {}).items():
        sub = _update_config(module)
        if sub is None:
            return None
        buffers = {k: None if b is None else (str(b.dtype), tuple(b.shape), b.detach().cpu().flatten().tolist())
                   for k, b in module._buffers.items()}
        config[f'{name}.'] = (type(module), sub, buffers)
    return config


def _same_update(leader: Any, follower: Any) -> bool:
    """Whether ``follower`` would accumulate exactly the states of ``leader`` (e.g. LanguagePerplexity, a subclass
    of LanguageCrossEntropy that only changes ``compute``): same update function, same states, same settings."""
    if type(leader).update is not type(follower).update or leader._defaults.keys() != follower._defaults.keys():
        return False
    config = _update_config(leader)
    return config is not None and config == _update_config(follower)


def _shared_updates(metrics: dict[str, Any]) -> dict[str, Optional[str]]:
    """Per metric name, the name of an earlier metric whose accumulated states it can copy (None: update it).

    An LM evaluator usually follows LanguageCrossEntropy and LanguagePerplexity, two views of one sum of token
    losses; updating both computes the cross-entropy over the vocabulary twice per batch (a fifth of the probe's
    evaluation time). Shared metrics are updated once and the states copied before ``compute``.
    """
    leaders: dict[str, Optional[str]] = {}
    for name, metric in metrics.items():
        leaders[name] = next((other for other, lead in leaders.items()
                              if lead is None and _same_update(metrics[other], metric)), None)
    return leaders


def _copy_states(source: Any, target: Any) -> None:
    """Give ``target`` the accumulated states of ``source`` (same state names), as if it had seen the same updates."""
    for key in source._defaults:
        value = getattr(source, key)
        setattr(target, key, [v.clone() for v in value] if isinstance(value, list) else value.clone())
    target._update_count = source._update_count
    target._computed = None


def _as_evaluators(value: EvaluatorsLike, role: str) -> list[Evaluator]:
    if value is None:
        return []
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    evaluators = []
    for i, item in enumerate(items):
        if isinstance(item, Evaluator):
            evaluators.append(item)
            continue
        if isinstance(item, (str, bytes, dict)) or not (hasattr(item, '__iter__') or hasattr(item, 'dataloader')):
            raise TypeError(f'{role}_evals[{i}] is a {type(item).__name__}. Fix: pass composer Evaluators, DataLoaders '
                            f'or DataSpecs (in YAML: dataloader sections).')
        label = role if len(items) == 1 else f'{role}_{i}'
        evaluators.append(Evaluator(label=label, dataloader=ensure_data_spec(item)))
    return evaluators


def _direction(name: str, metric: Any, overrides: dict[str, bool]) -> bool:
    if name in overrides:
        return bool(overrides[name])
    declared = getattr(metric, 'higher_is_better', None)
    if declared is not None:
        return bool(declared)
    if _LOWER_IS_BETTER.search(name):
        return False
    if _HIGHER_IS_BETTER.search(name):
        return True
    raise ValueError(f'cannot tell whether a higher {name!r} is better (the metric does not declare '
                     f'higher_is_better). Fix: pass higher_is_better={{{name!r}: True}} (or False) to LoRAProbe.')


def _unwrap_ddp(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


class LoRAProbe(Callback):
    """Log learning (target improvement), forgetting (source degradation) and the spectrum of ΔW during a finetune.

    Args:
        source_evals: Composer ``Evaluator`` s (or DataLoaders / DataSpecs) of the domain the model must not
            forget. May be empty.
        target_evals: Evaluators of the domain being learned. May be empty.
        every: How often to evaluate them (a Composer time: ``'100ba'``, ``'1ep'``, ``'0.1dur'``, an int for
            batches; None: only at the start and the end). Always also at ``FIT_START`` (the baseline) and
            ``FIT_END``.
        spectrum_every: How often to compute the spectra of ΔW (also at ``FIT_END``; None: only then).
        energy: Share of the squared singular values that ``rank_at_energy`` must explain, in (0, 1].
        modules: ``'auto'`` (peft LoRA layers if any, else every trainable Linear/Conv1D/convolution not tied to
            an embedding), a regular expression, or a list of them (see :func:`find_probed_modules`).
        metric_names: The metrics to follow (the first is the primary one, averaged into
            ``lora_probe/learning`` and ``lora_probe/forgetting``); default: each evaluator's own metrics
            (all of the model's eval metrics when it names none), and the primary one is then the first metric of
            the first evaluator that every evaluator follows (a ``ValueError`` at Trainer construction when the
            evaluators share none). Every evaluator must provide them.
        higher_is_better: ``{metric name: bool}`` for metrics that do not declare a direction; otherwise read
            from the metric (``higher_is_better``) or its name (loss/entropy/perplexity: lower is better).
        save_folder: Directory for ``lora_probe.json`` (rank 0, rewritten atomically after every probe);
            ``{run_name}`` is replaced by the run's name. None: nothing is written.
        log_modules: Also log every module's statistics (not only the aggregates).
        baseline_device: Where full-finetuning initial weights are kept: ``'cpu'`` or ``'same'`` (the weights'
            device).
        eval_subset_num_batches: Batches per evaluation for evaluators that do not set ``subset_num_batches``
            (-1: the whole dataloader).

    The probe's state belongs to one run: a new ``Trainer`` on another model starts it afresh (baselines and
    history are reset at ``Event.INIT``; a checkpoint that Trainer loads restores its own). ``__repr__`` rebuilds
    the probe only from plain arguments: evaluators appear as a placeholder (``<2 Evaluators: 'prose', 'code'>``).

    Tested under: single process; DDP on 2 gloo ranks (the Trainer and callback end to end); FSDP1 and FSDP2 on 2
    gloo ranks at the level of :class:`DeltaWTracker` (the gathering and spectra this callback uses). A Composer
    ``Trainer`` with ``parallelism_config={'fsdp': {...}}`` is not tested end to end here: Composer 0.32.1 wraps
    FSDP modules with ``device_id=torch.cuda.current_device()``, which needs a GPU, and the test machines have
    none.

    Example:
        .. code-block:: python

            from composer import Trainer
            from composer_ext.callbacks import LoRAProbe
            from composer_ext.data.text import build_text_evaluators

            probe = LoRAProbe(source_evals=build_text_evaluators(32, domains='prose', subset_num_batches=8),
                              target_evals=build_text_evaluators(32, domains='code', subset_num_batches=8),
                              every='100ba', spectrum_every='500ba', save_folder='runs/{run_name}/lora_probe')
            trainer = Trainer(model=model, train_dataloader=code_loader, max_duration='1000ba', callbacks=[probe])
    """

    def __init__(
        self,
        source_evals: EvaluatorsLike,
        target_evals: EvaluatorsLike,
        every: Union[str, int, Time, None] = '100ba',
        spectrum_every: Union[str, int, Time, None] = '500ba',
        energy: float = 0.9,
        modules: Union[str, Sequence[str]] = 'auto',
        *,
        metric_names: Optional[Sequence[str]] = None,
        higher_is_better: Optional[dict[str, bool]] = None,
        save_folder: Optional[str] = None,
        log_modules: bool = True,
        baseline_device: str = 'cpu',
        eval_subset_num_batches: int = -1,
    ):
        from composer_ext.lora_probe.spectrum import _check_energy
        self.source_evals = _as_evaluators(source_evals, 'source')
        self.target_evals = _as_evaluators(target_evals, 'target')
        labels = [e.label for e in self.source_evals + self.target_evals]
        duplicates = sorted({label for label in labels if labels.count(label) > 1})
        if duplicates:
            raise ValueError(f'the evaluator labels {duplicates} are used more than once (source: '
                             f'{[e.label for e in self.source_evals]}, target: '
                             f'{[e.label for e in self.target_evals]}). '
                             f'Fix: give every source and target evaluator its own label.')
        self.every = _parse_interval(every, 'every')
        self.spectrum_every = _parse_interval(spectrum_every, 'spectrum_every')
        self.energy = _check_energy(energy)
        _module_patterns(modules)  # a malformed pattern fails here, not at the first fit
        self.modules = modules if isinstance(modules, str) else list(modules)
        if metric_names is not None:
            if isinstance(metric_names, str) or not metric_names or \
                    not all(isinstance(m, str) and m for m in metric_names):
                raise ValueError(f"metric_names={metric_names!r} is invalid. Fix: pass a non-empty list of metric "
                                 f"names, e.g. ['LanguageCrossEntropy'], or None for each evaluator's own.")
            metric_names = list(metric_names)
        self.metric_names = metric_names
        if higher_is_better is not None and (not isinstance(higher_is_better, dict) or
                                             not all(isinstance(v, bool) for v in higher_is_better.values())):
            raise ValueError(f"higher_is_better={higher_is_better!r} is invalid. Fix: pass a dict of metric name -> "
                             f"bool, e.g. {{'LanguageCrossEntropy': False}}.")
        self.higher_is_better = dict(higher_is_better or {})
        if save_folder is not None and (not isinstance(save_folder, str) or not save_folder):
            raise ValueError(f"save_folder={save_folder!r} is invalid. Fix: pass a directory such as "
                             f"'runs/{{run_name}}/lora_probe', or None.")
        self.save_folder = save_folder
        self.log_modules = bool(log_modules)
        if baseline_device not in ('cpu', 'same'):
            raise ValueError(f"baseline_device={baseline_device!r} is invalid. Fix: use 'cpu' (default) or 'same'.")
        self.baseline_device = baseline_device
        if isinstance(eval_subset_num_batches, bool) or not isinstance(eval_subset_num_batches, int) or \
                eval_subset_num_batches == 0 or eval_subset_num_batches < -1:
            raise ValueError(f'eval_subset_num_batches={eval_subset_num_batches!r} is invalid. Fix: use a positive '
                             f'int, or -1 for whole dataloaders.')
        self.eval_subset_num_batches = eval_subset_num_batches

        self._eval_schedule = _Schedule(self.every, 'every')
        self._spectrum_schedule = _Schedule(self.spectrum_every, 'spectrum_every')
        self.tracker: Optional[DeltaWTracker] = None
        self._metrics: dict[str, dict[str, Any]] = {}
        self._leaders: dict[str, dict[str, Optional[str]]] = {}  # per evaluator: metric -> metric it copies
        self._directions: dict[str, bool] = {}
        self.primary_metric: Optional[str] = None
        self.baseline_metrics: Optional[dict[str, dict[str, float]]] = None
        self.history: list[dict[str, Any]] = []
        self._pending_tracker_state: Optional[dict] = None
        self._model_id: Optional[int] = None
        self._spectrum_seconds: Optional[float] = None

    # -- set-up -----------------------------------------------------------------------------------------------

    def _resolve_metrics(self, model: nn.Module) -> None:
        """Per evaluator, copies of the model's eval metrics it asks for; errors name a missing metric."""
        get_metrics = getattr(model, 'get_metrics', None)
        available = dict(get_metrics(is_train=False)) if callable(get_metrics) else {}
        metrics: dict[str, dict[str, Any]] = {}
        primary = self.metric_names[0] if self.metric_names else None
        for evaluator in self.source_evals + self.target_evals:
            own = list(evaluator.metric_names or available)
            unknown = [name for name in own if name not in available]
            if unknown:
                raise ValueError(f'evaluator {evaluator.label!r} asks for the metric(s) {unknown}, which the model '
                                 f'does not provide (it has {sorted(available)}). Fix: use metric_names the model '
                                 f'computes.')
            wanted = self.metric_names or own
            missing = [name for name in wanted if name not in own]
            if missing:
                raise ValueError(f'evaluator {evaluator.label!r} has no metric {missing[0]!r} (its metrics: {own}; the '
                                 f"model's: {sorted(available)}). Fix: choose metric_names among them, or give the "
                                 f'evaluator metric_names that include {missing[0]!r}.')
            if not wanted:
                raise ValueError(f'evaluator {evaluator.label!r} has no metric to follow (the model has no eval '
                                 f'metrics). Fix: give the model eval metrics, or pass metric_names=[...].')
            metrics[evaluator.label] = {name: copy.deepcopy(available[name]) for name in wanted}
            self._leaders[evaluator.label] = _shared_updates(metrics[evaluator.label])
            for name in wanted:
                self._directions[name] = _direction(name, available[name], self.higher_is_better)
        if primary is None and metrics:
            primary = self._shared_primary(metrics)
        self._metrics = metrics
        self.primary_metric = primary

    def _shared_primary(self, metrics: dict[str, dict[str, Any]]) -> str:
        """The first metric of the first evaluator that every evaluator follows (learning and forgetting average it).

        Evaluators may follow different metrics (``Evaluator(metric_names=...)``); the primary metric must be
        common to all of them, or the means ``lora_probe/learning`` and ``lora_probe/forgetting`` (and the
        report) would compare different quantities.
        """
        followed = {label: list(names) for label, names in metrics.items()}
        first_label, first = next(iter(followed.items()))
        for name in first:
            if all(name in names for names in followed.values()):
                return name
        lacking = [label for label, names in followed.items() if first[0] not in names]
        raise ValueError(f'the evaluators follow no common metric, so learning and forgetting cannot be averaged: '
                         f'{followed} (evaluator {lacking[0]!r} lacks {first[0]!r}, the first metric of '
                         f'{first_label!r}). Fix: let every evaluator compute one common metric (its '
                         f'Evaluator(metric_names=[...]) must include it) and pass it first in LoRAProbe(metric_names='
                         f'[...]), e.g. metric_names=[{first[0]!r}].')

    def _set_up(self, state: State) -> None:
        model = _unwrap_ddp(state.model)
        if self._model_id == id(model) and self.tracker is not None:
            return
        self._resolve_metrics(model)
        self.tracker = DeltaWTracker(model, self.modules, self.energy, baseline_device=self.baseline_device)
        if self._pending_tracker_state is not None:
            self.tracker.load_state_dict(self._pending_tracker_state)
            self._pending_tracker_state = None
        self._model_id = id(model)

    def init(self, state: State, logger: Logger) -> None:
        model = _unwrap_ddp(state.model)
        if self._model_id is not None and self._model_id != id(model):
            # The probe is reused by a new Trainer on another model: a new run, measured from its own start. (A
            # checkpoint loaded by that Trainer restores the original baselines after INIT, in load_state_dict.)
            self._reset()
        # Fail at Trainer construction, not after the first batch: bad module patterns, missing metrics.
        self._resolve_metrics(model)
        find_probed_modules(model, self.modules)

    def _reset(self) -> None:
        """Forget the previous run: baselines, history, and the tracker bound to the previous model."""
        self.tracker = None
        self._metrics, self._directions = {}, {}
        self.primary_metric = None
        self.baseline_metrics = None
        self.history = []
        self._pending_tracker_state = None
        self._model_id = None
        self._spectrum_seconds = None

    # -- events -----------------------------------------------------------------------------------------------

    def fit_start(self, state: State, logger: Logger) -> None:
        self._set_up(state)
        self._eval_schedule.resolve(state)
        self._spectrum_schedule.resolve(state)
        assert self.tracker is not None
        record = None
        if self.baseline_metrics is None:
            values = self._evaluate(state)
            self.baseline_metrics = values
            record = self._record(state)
            self._add_metrics(record, values)
        if not self.tracker.captured:
            # After the evaluation: under FSDP its forward pass has initialised the root before we gather.
            baseline_bytes = self.tracker.capture()
            logger.log_metrics({'lora_probe/baseline_bytes': baseline_bytes,
                                'lora_probe/modules': len(self.tracker.probed)}, step=int(state.timestamp.batch))
        if record is not None:
            self._commit(state, logger, record)

    def batch_end(self, state: State, logger: Logger) -> None:
        self._probe(state, logger, Event.BATCH_END)

    def epoch_end(self, state: State, logger: Logger) -> None:
        self._probe(state, logger, Event.EPOCH_END)

    def fit_end(self, state: State, logger: Logger) -> None:
        batch = int(state.timestamp.batch)
        record = self._record(state)
        if 'metrics' not in record and (self.source_evals or self.target_evals):
            self._add_metrics(record, self._evaluate(state))
        if 'spectrum' not in record and batch > 0:
            self._add_spectrum(record)
        self._commit(state, logger, record)

    def _probe(self, state: State, logger: Logger, event: Event) -> None:
        evaluate = self._eval_schedule.due(state, event) and bool(self.source_evals or self.target_evals)
        spectrum = self._spectrum_schedule.due(state, event)
        if not (evaluate or spectrum):
            return
        record = self._record(state)
        if evaluate and 'metrics' not in record:
            self._add_metrics(record, self._evaluate(state))
        if spectrum and 'spectrum' not in record:
            self._add_spectrum(record)
        self._commit(state, logger, record)

    # -- measuring --------------------------------------------------------------------------------------------

    def _evaluate(self, state: State) -> dict[str, dict[str, float]]:
        """Every evaluator's metrics (reduced over ranks) with the current weights, without side effects."""
        model = _unwrap_ddp(state.model)
        values: dict[str, dict[str, float]] = {}
        with _preserved_rng(), torch.no_grad(), model_eval_mode(state.model):
            for evaluator in self.source_evals + self.target_evals:
                metrics = self._metrics[evaluator.label]
                for name, metric in metrics.items():
                    metrics[name] = state.device.module_to_device(metric)
                    metric.reset()
                leaders = self._leaders[evaluator.label]
                updated = [metric for name, metric in metrics.items() if leaders[name] is None]
                spec = evaluator.dataloader
                limit = evaluator.subset_num_batches
                if limit is None or limit < 0:
                    limit = self.eval_subset_num_batches
                limit = self._agreed_num_batches(spec, limit, state)
                microbatch = evaluator.device_eval_microbatch_size
                for index, batch in enumerate(spec.dataloader):
                    if 0 <= limit <= index:
                        break
                    batch = spec.batch_transforms(batch)
                    # Split only a batch larger than the microbatch (a smaller last batch makes Composer warn).
                    split = isinstance(microbatch, int) and spec.get_num_samples_in_batch(batch) > microbatch
                    pieces = spec.split_batch(batch, microbatch) if split else [batch]
                    for piece in pieces:
                        piece = spec.microbatch_transforms(state.device.batch_to_device(piece))
                        with get_precision_context(state.precision, state.precision_config, fp8_autocast_enabled=False):
                            outputs = model.eval_forward(piece)
                        with get_precision_context(state.precision, state.precision_config):
                            for metric in updated:
                                model.update_metric(piece, outputs, metric)
                for name, metric in metrics.items():  # before any compute() and reset() below
                    if leaders[name] is not None:
                        _copy_states(metrics[leaders[name]], metric)
                values[evaluator.label] = {}
                for name, metric in metrics.items():
                    result = metric.compute()  # torchmetrics reduces over ranks here
                    if isinstance(result, torch.Tensor) and result.numel() != 1 or isinstance(result, dict):
                        raise ValueError(f'metric {name!r} of evaluator {evaluator.label!r} is not a scalar. Fix: pass '
                                         f'metric_names with scalar metrics only.')
                    values[evaluator.label][name] = float(result)
                    metric.reset()
        return values

    @staticmethod
    def _agreed_num_batches(spec, limit: int, state: State) -> int:
        """All ranks run the same number of forward passes (needed under FSDP): the minimum over ranks."""
        try:
            length = len(spec.dataloader)
        except TypeError:
            return limit
        count = length if limit < 0 else min(limit, length)
        if dist.get_world_size() > 1:
            tensor = state.device.tensor_to_device(torch.tensor([count], dtype=torch.int64))
            dist.all_reduce(tensor, reduce_operation='MIN')
            count = int(tensor.item())
        return count

    def _record(self, state: State) -> dict[str, Any]:
        """The history record of the current batch (the last one, refreshed at EPOCH_END, or a new one)."""
        timestamp = state.timestamp
        now = {'batch': int(timestamp.batch), 'sample': int(timestamp.sample), 'token': int(timestamp.token),
               'epoch': int(timestamp.epoch)}
        if self.history and self.history[-1]['batch'] == now['batch']:
            self.history[-1].update(now)
            return self.history[-1]
        self.history.append(now)
        return now

    def _add_metrics(self, record: dict[str, Any], values: dict[str, dict[str, float]]) -> None:
        assert self.baseline_metrics is not None
        source = {e.label for e in self.source_evals}
        record['metrics'] = {'source': {k: v for k, v in values.items() if k in source},
                             'target': {k: v for k, v in values.items() if k not in source}}
        learning: dict[str, dict[str, float]] = {}
        forgetting: dict[str, dict[str, float]] = {}
        for label, metrics in values.items():
            for name, value in metrics.items():
                gain = value - self.baseline_metrics[label][name]
                improvement = gain if self._directions[name] else -gain
                if label in source:
                    forgetting.setdefault(label, {})[name] = -improvement
                else:
                    learning.setdefault(label, {})[name] = improvement
        record['learning'], record['forgetting'] = learning, forgetting
        primary = self.primary_metric
        record['learning_mean'] = float(np.mean([m[primary] for m in learning.values()])) if learning else None
        record['forgetting_mean'] = float(np.mean([m[primary] for m in forgetting.values()])) if forgetting else None

    def _add_spectrum(self, record: dict[str, Any]) -> None:
        assert self.tracker is not None
        start = time.perf_counter()
        spectra = self.tracker.spectra()
        record['spectrum'] = {name: {k: s[k] for k in SPECTRUM_STATS} for name, s in spectra.items()}
        record['spectrum_summary'] = summarize_spectra(spectra)
        # Wall-clock is logged, not recorded: the history must be identical across an interrupted run.
        self._spectrum_seconds = time.perf_counter() - start

    def _commit(self, state: State, logger: Logger, record: dict[str, Any]) -> None:
        values = self._loggable(record)
        if self._spectrum_seconds is not None:
            values['lora_probe/spectrum_seconds'] = self._spectrum_seconds
            self._spectrum_seconds = None
        logger.log_metrics(values, step=record['batch'])
        self._write(state)

    def _loggable(self, record: dict[str, Any]) -> dict[str, float]:
        values: dict[str, float] = {}
        for role, by_label in record.get('metrics', {}).items():
            for label, metrics in by_label.items():
                for name, value in metrics.items():
                    values[f'lora_probe/{role}/{label}/{name}'] = value
        for kind in ('learning', 'forgetting'):
            for label, metrics in record.get(kind, {}).items():
                for name, value in metrics.items():
                    values[f'lora_probe/{kind}/{label}/{name}'] = value
            if record.get(f'{kind}_mean') is not None:
                values[f'lora_probe/{kind}'] = record[f'{kind}_mean']
        if self.log_modules:
            for module, stats in record.get('spectrum', {}).items():
                for stat, value in stats.items():
                    values[f'lora_probe/delta_w/{module}/{stat}'] = value
        for key, value in record.get('spectrum_summary', {}).items():
            values[f'lora_probe/delta_w/{key}'] = value
        return values

    # -- output -----------------------------------------------------------------------------------------------

    def history_path(self, state: State) -> Optional[Path]:
        """Where ``lora_probe.json`` is written for this run (None without ``save_folder``)."""
        if self.save_folder is None:
            return None
        return Path(self.save_folder.replace('{run_name}', str(state.run_name))) / HISTORY_FILE

    def summary(self, state: Optional[State] = None) -> dict[str, Any]:
        """Everything ``lora_probe.json`` holds: settings, modules, baselines and the history."""
        tracker = self.tracker
        adapter: dict[str, Any] = {'kind': 'full'}
        model = _unwrap_ddp(state.model) if state is not None else None
        if tracker is not None and any(p.kind == 'lora' for p in tracker.probed):
            module = next(p.module for p in tracker.probed if p.kind == 'lora')
            adapter_name = module.active_adapters[0]
            adapter = {'kind': 'lora', 'r': int(module.r[adapter_name]),
                       'alpha': float(module.lora_alpha[adapter_name])}
        if model is not None:
            parameters = list(model.parameters())
            adapter['trainable_params'] = int(sum(p.numel() for p in parameters if p.requires_grad))
            adapter['total_params'] = int(sum(p.numel() for p in parameters))
        return {
            'format': FORMAT,
            'run_name': None if state is None else str(state.run_name),
            'settings': {'every': _time_repr(self.every).strip("'"), 'spectrum_every':
                         _time_repr(self.spectrum_every).strip("'"), 'energy': self.energy, 'modules': self.modules},
            'adapter': adapter,
            'primary_metric': self.primary_metric,
            'higher_is_better': dict(self._directions),
            'evaluators': {'source': [e.label for e in self.source_evals],
                           'target': [e.label for e in self.target_evals]},
            'modules': {p.name: {'kind': p.kind, 'shape': list(p.shape)} for p in tracker.probed} if tracker else {},
            'baseline_bytes': tracker.baseline_bytes if tracker else 0,
            'baseline_metrics': self.baseline_metrics,
            'history': self.history,
        }

    def _write(self, state: State) -> None:
        path = self.history_path(state)
        if path is None or dist.get_global_rank() != 0:
            return
        atomic_write_json(path, self.summary(state))

    # -- checkpointing ----------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        tracker_state = self.tracker.state_dict() if self.tracker is not None else self._pending_tracker_state
        return {'version': 1, 'baseline_metrics': copy.deepcopy(self.baseline_metrics),
                'history': copy.deepcopy(self.history), 'tracker': tracker_state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get('version') != 1:
            raise ValueError(f'unknown LoRAProbe state version {state.get("version")!r}. Fix: resume with the '
                             f'composer_ext version that wrote the checkpoint.')
        self.baseline_metrics = copy.deepcopy(state['baseline_metrics'])
        self.history = copy.deepcopy(state['history'])
        tracker_state = state.get('tracker')
        if self.tracker is not None and tracker_state is not None:
            self.tracker.load_state_dict(tracker_state)
        else:
            self._pending_tracker_state = tracker_state  # applied when the model is known (FIT_START)

    def __repr__(self) -> str:
        """Rebuilds the probe with ``eval`` when it has no evaluators (plain arguments only).

        Evaluators hold dataloaders, which have no source form: they are written as a placeholder such as
        ``<2 Evaluators: 'prose', 'code'>``, which ``eval`` rejects (a SyntaxError) rather than silently building
        a probe that measures something else. Rebuild such a probe with its evaluators passed again.
        """
        return (f'LoRAProbe(source_evals={_evaluators_repr(self.source_evals)}, '
                f'target_evals={_evaluators_repr(self.target_evals)}, every={_time_repr(self.every)}, '
                f'spectrum_every={_time_repr(self.spectrum_every)}, energy={self.energy!r}, modules={self.modules!r}, '
                f'metric_names={self.metric_names!r}, higher_is_better={self.higher_is_better or None!r}, '
                f'save_folder={self.save_folder!r}, log_modules={self.log_modules!r}, '
                f'baseline_device={self.baseline_device!r}, eval_subset_num_batches={self.eval_subset_num_batches!r})')


def _evaluators_repr(evaluators: Sequence[Evaluator]) -> str:
    """``[]`` (which rebuilds), or a placeholder naming the evaluators (which deliberately does not)."""
    if not evaluators:
        return '[]'
    labels = ', '.join(repr(e.label) for e in evaluators)
    return f'<{len(evaluators)} Evaluator{"s" if len(evaluators) > 1 else ""}: {labels}>'


def _build_evaluators(context: Any, sections: Union[dict, list], role: str) -> list[Evaluator]:
    items = sections if isinstance(sections, list) else [sections]
    evaluators: list[Evaluator] = []
    for i, section in enumerate(items):
        key = f'callbacks.lora_probe.{role}_evals' + (f'[{i}]' if isinstance(sections, list) else '')
        if not isinstance(section, dict):
            raise ValueError(f'{key} is {section!r}. Fix: write a dataloader section such as '
                             f'{{name: text_evaluators, domains: prose, batch_size: 32}}.')
        label = section.get('label')
        built = context.build_dataloader({k: v for k, v in section.items() if k != 'label'}, key)
        if isinstance(built, list):
            evaluators.extend(built)
        else:
            default = role if len(items) == 1 else f'{role}_{i}'
            evaluators.append(Evaluator(label=label or default, dataloader=built))
    return evaluators


def build_lora_probe(
    context: Any,
    source_evals: Union[dict, list],
    target_evals: Union[dict, list],
    every: Union[str, int, None] = '100ba',
    spectrum_every: Union[str, int, None] = '500ba',
    energy: float = 0.9,
    modules: Union[str, list] = 'auto',
    metric_names: Optional[list] = None,
    higher_is_better: Optional[dict] = None,
    save_folder: Optional[str] = None,
    log_modules: bool = True,
    baseline_device: str = 'cpu',
    eval_subset_num_batches: int = -1,
) -> LoRAProbe:
    """YAML builder of :class:`LoRAProbe` (``callbacks: {lora_probe: {...}}``): evaluators from dataloader sections.

    ``source_evals`` / ``target_evals`` are a dataloader section or a list of them, as in ``eval_loaders``:
    a ``*_evaluators`` builder (e.g. ``text_evaluators``) gives one evaluator per domain, labelled by domain; any
    other dataloader becomes one evaluator labelled by the section's ``label`` (default ``source`` / ``target``).

    Example:
        .. code-block:: yaml

            callbacks:
              lora_probe:
                source_evals: {name: text_evaluators, domains: prose, batch_size: 32, subset_num_batches: 8}
                target_evals: {name: text_evaluators, domains: code, batch_size: 32, subset_num_batches: 8}
                every: 50ba
                spectrum_every: 100ba
                save_folder: runs/lora_probe/{run_name}
    """
    return LoRAProbe(_build_evaluators(context, source_evals, 'source'), _build_evaluators(context, target_evals,
                                                                                          'target'),
                     every=every, spectrum_every=spectrum_every, energy=energy, modules=modules,
                     metric_names=metric_names, higher_is_better=higher_is_better, save_folder=save_folder,
                     log_modules=log_modules, baseline_device=baseline_device,
                     eval_subset_num_batches=eval_subset_num_batches)
