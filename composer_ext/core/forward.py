"""Calling a frozen model on a training batch and reading its logits.

A distillation teacher and a fairness reference are both models that are not trained but run on the student's
batches: they must get only the inputs their ``forward`` accepts (never the labels, so no loss is computed), and
their logits must be found in whatever they return. Both techniques call these two functions.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, Optional

import torch
from composer.models import ComposerModel, HuggingFaceModel
from torch import nn

from composer_ext.core.unwrap import unwrap_huggingface

__all__ = ['NOT_INPUTS', 'extract_logits', 'forward_parameters', 'frozen_forward']

# Keys of a dict batch that are never a frozen model's input: the labels (no loss is computed) and the sample id
# (which the teacher-output cache reads).
NOT_INPUTS = frozenset({'labels', 'sample_id'})


def extract_logits(output: Any) -> torch.Tensor:
    """The logits in a model output: a tensor, an object with ``.logits`` (HuggingFace), a dict, or a tuple.

    Example:
        >>> extract_logits(torch.zeros(2, 3)).shape
        torch.Size([2, 3])
    """
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, 'logits', None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, Mapping) and isinstance(output.get('logits'), torch.Tensor):
        return output['logits']
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f'cannot find logits in a model output of type {type(output).__name__}. Fix: return a tensor, '
                    f'a HuggingFace output with `.logits`, a dict with a "logits" key, or a tuple of tensors whose '
                    f'first item is the logits.')


def _script_parameters(module: nn.Module) -> Optional[set]:
    """The argument names of a TorchScript module's ``forward`` (scripted, traced or ``torch.jit.load``-ed), read
    from its compiled schema: ``inspect`` cannot read a loaded archive's signature."""
    if not isinstance(module, torch.jit.ScriptModule):
        return None
    try:
        arguments = module.forward.schema.arguments
    except (AttributeError, RuntimeError):
        return None
    return {argument.name for argument in arguments if argument.name != 'self'} or None


def forward_parameters(module: nn.Module) -> Optional[set]:
    """The names a module's ``forward`` takes by keyword, or None (pass everything) when it names none.

    A ``forward(input_ids, attention_mask=None, **kwargs)`` (most ``transformers`` models) gets only its named
    parameters: a batch's extra keys (``labels``, indices, sample weights) would otherwise land in ``**kwargs`` and
    be passed on to places that reject or misuse them. Only a bare ``forward(**kwargs)`` gets every key. A
    TorchScript module's names come from its compiled schema (a TorchScript ``forward`` has no ``**kwargs``).

    Example:
        >>> class Head(nn.Module):
        ...     def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        ...         return input_ids.float()
        >>> forward_parameters(torch.jit.script(Head()))
        {'input_ids'}
    """
    scripted = _script_parameters(module)
    if scripted is not None:
        return scripted
    try:
        parameters = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return None
    named = {name for name, p in parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return named or None


def frozen_forward(model: nn.Module, batch: Any) -> Any:
    """Run a frozen model (a distillation teacher, a bias reference) on a (micro-)batch: the batch unmodified, no loss.

    A ``HuggingFaceModel`` gets the batch's ``model_forward_args`` without ``labels``; another
    ``ComposerModel`` gets the batch; a plain module (a ``transformers`` model included) gets ``batch[0]`` of a
    tuple/list batch, the batch itself if it is neither a tuple/list nor a dict, or, for a dict batch, the entries
    its ``forward`` names as parameters, except ``labels`` and ``sample_id`` (all other entries if it names none,
    e.g. ``forward(**kwargs)``; extra keys never reach a ``**kwargs`` that sits next to named parameters). A
    TorchScript module's parameters are read from its compiled schema, so a ``forward(input_ids)`` archive gets
    ``input_ids`` and not the batch's ``attention_mask``.

    Example:
        >>> import torch
        >>> frozen_forward(nn.Linear(3, 2), (torch.zeros(4, 3), torch.zeros(4))).shape
        torch.Size([4, 2])
    """
    if isinstance(model, HuggingFaceModel):
        allowed = model.model_forward_args
        return unwrap_huggingface(model)(**{k: v for k, v in batch.items() if k in allowed and k not in NOT_INPUTS})
    if isinstance(model, ComposerModel):
        return model(batch)
    if isinstance(batch, Mapping):
        allowed = forward_parameters(model)
        return model(**{k: v for k, v in batch.items() if k not in NOT_INPUTS and (allowed is None or k in allowed)})
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    return model(batch)
