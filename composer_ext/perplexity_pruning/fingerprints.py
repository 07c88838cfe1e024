"""Fingerprints of what a score depends on: the reference model's weights and the tokenizer's ids.

A score index records both (``meta.json``): ``composer-ext score`` resumes only an index of the same model and
tokenizer, and the ``selected_text`` dataloader refuses to train with a tokenizer other than the one the
scores were computed with.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from composer_ext.core.provenance import json_sha256, tensors_sha256

__all__ = ['model_fingerprint', 'tokenizer_fingerprint']


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """SHA-256 of what decides a tokenizer's ids: vocabulary, merges, normalisation and special tokens."""
    backend = getattr(tokenizer, 'backend_tokenizer', None)
    if backend is not None:
        payload: Any = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ('truncation', 'padding')}
    else:
        payload = sorted(tokenizer.get_vocab().items())
    return json_sha256(payload)


def model_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of a model's state dict (names, dtypes, shapes and values).

    The ``'|'`` separator is the one score indexes have always recorded: another would make every existing
    index read as scored by a different model.
    """
    return tensors_sha256(model.state_dict(), separator='|')
