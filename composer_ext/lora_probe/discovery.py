"""Which modules the LoRA probe measures: peft LoRA layers or trainable weight matrices, named the same way
whether the model is wrapped (DDP, FSDP, activation checkpointing, ``torch.compile``, peft) or not.

* :class:`ProbedModule` -- one module whose update ΔW is measured, and the tensors ΔW is computed from.
* :func:`find_probed_modules` -- the modules chosen by ``'auto'`` or by name patterns (:func:`module_patterns`).
* :func:`weight_shape` / :func:`weight_as_matrix` -- a layer's weight as ΔW's (out, in...) matrix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from composer_ext.core.unwrap import unwrap_parallel

__all__ = ['ProbedModule', 'canonical_name', 'find_probed_modules', 'module_patterns', 'weight_as_matrix',
           'weight_shape']

# Name parts that wrappers insert (FSDP1, activation checkpointing, torch.compile): not part of a layer's name.
_WRAPPER_PARTS = frozenset({'_fsdp_wrapped_module', '_checkpoint_wrapped_module', '_orig_mod'})


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


def _peft_model_class():
    try:
        from peft import PeftModel
    except ImportError:  # peft is a dependency, but the probe works without it
        return None
    return PeftModel


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


def canonical_name(path: str) -> str:
    """A module or parameter name without the parts wrappers insert (``_fsdp_wrapped_module``, ``_orig_mod``...)."""
    return '.'.join(p for p in path.split('.') if p not in _WRAPPER_PARTS)


def _canonical_names(model: nn.Module) -> dict[str, str]:
    """``path -> canonical name`` of every module (wrapper parts and peft's ``base_model.model`` removed)."""
    peft_model = _peft_model_class()
    paths = {path: canonical_name(path) for path, _ in model.named_modules()}
    prefixes = []
    for path, module in model.named_modules():
        if peft_model is not None and isinstance(module, peft_model):
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


def weight_shape(module: nn.Module, weight: torch.Tensor) -> tuple:
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


def weight_as_matrix(holder: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """A weight (or a weight difference) as ΔW's (out, in...) matrix: transposed for Conv1D, flattened for
    convolutions (the layout :func:`weight_shape` describes)."""
    conv1d = _conv1d_class()
    if conv1d is not None and isinstance(holder, conv1d):
        return weight.T
    return weight.reshape(weight.shape[0], -1)


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
    return tensors, weight_shape(base, base.weight)


def module_patterns(modules: Any) -> Optional[list[str]]:
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
    patterns = module_patterns(modules)
    model = unwrap_parallel(model)
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
            candidates.append(ProbedModule(names[path], path, module, 'full', weight_shape(module, module.weight),
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
