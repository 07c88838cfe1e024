"""A small GPT built from a ``transformers`` GPT-2 config, wrapped as a Composer ``HuggingFaceModel``."""

from __future__ import annotations

from typing import Optional

from composer_ext.data.tokenizer import load_tokenizer

__all__ = ['small_gpt']


def small_gpt(
    n_layer: int = 2,
    n_embd: int = 128,
    n_head: int = 4,
    n_positions: int = 128,
    dropout: float = 0.0,
    tokenizer=None,
    vocab_size: Optional[int] = None,
):
    """A GPT-2-architecture causal LM with random weights, sized to train on a CPU.

    The defaults (2 layers, width 128, 128 positions, vocabulary 4096) give about 0.9M parameters and
    roughly 12k tokens/s of training on 2 CPU cores.

    Args:
        n_layer: Transformer blocks.
        n_embd: Hidden width (a multiple of ``n_head``).
        n_head: Attention heads.
        n_positions: Longest sequence.
        dropout: Residual, embedding and attention dropout.
        tokenizer: A ``transformers`` tokenizer; the embedded corpus tokenizer when None.
        vocab_size: Vocabulary size; ``len(tokenizer)`` when None.

    Returns:
        composer.models.HuggingFaceModel: with ``LanguageCrossEntropy`` and ``LanguagePerplexity`` metrics.

    Example:
        .. code-block:: python

            from composer_ext.models import small_gpt
            model = small_gpt(n_layer=2)          # uses the embedded corpus tokenizer
    """
    from composer.metrics.nlp import LanguageCrossEntropy, LanguagePerplexity
    from composer.models import HuggingFaceModel
    from transformers import GPT2Config, GPT2LMHeadModel

    for name, value in (('n_layer', n_layer), ('n_embd', n_embd), ('n_head', n_head), ('n_positions', n_positions)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f'{name}={value!r} is invalid. Fix: use a positive int.')
    if n_embd % n_head:
        raise ValueError(f'n_embd={n_embd} is not a multiple of n_head={n_head}. Fix: make n_embd divisible by n_head.')
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f'dropout={dropout!r} is outside [0, 1). Fix: use e.g. 0.0 or 0.1.')
    if tokenizer is None:
        tokenizer = load_tokenizer()
    vocab_size = vocab_size or len(tokenizer)
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = GPT2LMHeadModel(config)
    # transformers infers the loss from the class name, which for GPT2LMHeadModel fails with a warning.
    model.loss_type = 'ForCausalLM'
    metrics = [LanguageCrossEntropy(ignore_index=-100), LanguagePerplexity(ignore_index=-100)]
    return HuggingFaceModel(model, tokenizer=tokenizer, use_logits=True, metrics=metrics, shift_labels=True)
