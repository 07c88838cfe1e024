"""Model unwrapping: from what the Trainer holds to the module a technique measures.

Composer wraps a model at most in ``DistributedDataParallel`` (and ``torch.compile``'s ``OptimizedModule``);
FSDP (v1 and v2) shards the model's submodules in place, so the top-level ``ComposerModel`` is never an FSDP
wrapper and sharded parameters are handled where they are read (see the LoRA probe's gatherer), not here.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

__all__ = ['unwrap_huggingface', 'unwrap_parallel']


def _compiled_class() -> Any:
    try:
        from torch._dynamo.eval_frame import OptimizedModule
    except ImportError:  # a torch without dynamo
        return None
    return OptimizedModule


def unwrap_parallel(model: Any) -> Any:
    """``model`` without its DDP / DataParallel / ``torch.compile`` wrappers, however deeply nested.

    Example:
        >>> import torch.nn as nn
        >>> inner = nn.Linear(2, 2)
        >>> unwrap_parallel(nn.DataParallel(inner)) is inner
        True
    """
    compiled = _compiled_class()
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif compiled is not None and isinstance(model, compiled):
            model = model._orig_mod
        else:
            return model


def unwrap_huggingface(model: Any) -> Any:
    """The ``transformers`` model inside a Composer ``HuggingFaceModel`` (parallel wrappers removed first).

    A peft ``PeftModel`` is returned as it is (its LoRA layers are what a probe measures; use
    ``get_base_model()`` for the base); anything that is not a ``HuggingFaceModel`` is returned unwrapped of DDP.
    """
    from composer.models import HuggingFaceModel  # heavy (imports transformers); only callers that need it pay
    model = unwrap_parallel(model)
    return model.model if isinstance(model, HuggingFaceModel) else model
