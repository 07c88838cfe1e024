"""LoRA the way "LoRA Learns Less and Forgets Less" recommends it, and a finetuning model built from a checkpoint.

Biderman et al. (2024) compare LoRA with full finetuning on code and math. Their practical advice (§4.6):
target **all** linear layers (All > MLP > Attention), set **α = 2r**, prefer LoRA for instruction finetuning
rather than continued pretraining, and sweep the learning rate per method. :func:`lora_config` builds a
``peft.LoraConfig`` with those defaults, knows the module names of common architectures (``'attention'``,
``'mlp'``, ``'all'``), and warns with :class:`LoRARecommendationWarning` when a configuration deviates.

:func:`small_gpt_from_checkpoint` rebuilds a GPT from a Composer checkpoint (architecture, weights and tokenizer
from the checkpoint) and optionally wraps it with LoRA through Composer's ``HuggingFaceModel(peft_config=...)``:
the finetuning model of ``yamls/lora_probe/full.yaml`` and ``lora.yaml`` (the registered model
``small_gpt_from_checkpoint``).
"""

from __future__ import annotations

import os
import tempfile
import warnings
from typing import Any, Optional, Sequence, Union

from composer.metrics.nlp import LanguageCrossEntropy, LanguagePerplexity
from composer.models import HuggingFaceModel
from composer.utils import get_file

from composer_ext.core.checkpoints import load_checkpoint
from composer_ext.core.unwrap import unwrap_huggingface
from composer_ext.data.tokenizer import load_tokenizer

__all__ = ['LORA_TARGETS', 'LoRARecommendationWarning', 'lora_config', 'lora_target_modules',
           'small_gpt_from_checkpoint']

# Module names (suffixes, as peft matches them) of the attention and MLP projections of common architectures.
LORA_TARGETS: dict[str, dict[str, list[str]]] = {
    'gpt2': {'attention': ['attn.c_attn', 'attn.c_proj'], 'mlp': ['mlp.c_fc', 'mlp.c_proj']},
    'llama': {'attention': ['q_proj', 'k_proj', 'v_proj', 'o_proj'], 'mlp': ['gate_proj', 'up_proj', 'down_proj']},
    'gpt_neox': {'attention': ['attention.query_key_value', 'attention.dense'],
                 'mlp': ['mlp.dense_h_to_4h', 'mlp.dense_4h_to_h']},
    'mpt': {'attention': ['attn.Wqkv', 'attn.out_proj'], 'mlp': ['ffn.up_proj', 'ffn.down_proj']},
}
_ALIASES = {'mistral': 'llama', 'qwen2': 'llama', 'qwen3': 'llama', 'gemma': 'llama', 'gemma2': 'llama'}
# transformers' GPT-2 uses Conv1D layers whose weight is (in, out): peft must be told (fan_in_fan_out).
_FAN_IN_FAN_OUT = {'gpt2'}
_TARGET_KEYWORDS = ('attention', 'mlp', 'all')


class LoRARecommendationWarning(UserWarning):
    """A LoRA configuration deviates from the paper's recommendations (α = 2r, all linear layers)."""


def _architecture_of(model: Any) -> Optional[str]:
    """``config.model_type`` of a Composer ``HuggingFaceModel``, a ``PeftModel`` or a ``PreTrainedModel``."""
    seen = 0
    while model is not None and seen < 5:
        config = getattr(model, 'config', None)
        model_type = getattr(config, 'model_type', None)
        if isinstance(model_type, str):
            return model_type
        model = getattr(model, 'model', None) or getattr(model, 'base_model', None)
        seen += 1
    return None


def lora_target_modules(architecture: str, targets: str = 'all') -> list[str]:
    """peft ``target_modules`` (name suffixes) of ``targets`` in ``architecture``.

    Args:
        architecture: A ``config.model_type`` in :data:`LORA_TARGETS` (or an alias: mistral, qwen2, gemma...).
        targets: ``'attention'``, ``'mlp'`` or ``'all'``.
    """
    key = _ALIASES.get(architecture, architecture)
    if key not in LORA_TARGETS:
        raise ValueError(f'architecture={architecture!r} has no known LoRA module names. Fix: use one of '
                         f'{sorted([*LORA_TARGETS, *_ALIASES])}, or pass targets as a list of module names.')
    if targets not in _TARGET_KEYWORDS:
        raise ValueError(f"targets={targets!r} is not one of {list(_TARGET_KEYWORDS)}. Fix: use 'all' (the paper's "
                         f'recommendation), or pass a list of module names.')
    table = LORA_TARGETS[key]
    return list(table['attention'] + table['mlp'] if targets == 'all' else table[targets])


def lora_config(
    r: int = 16,
    alpha: Optional[float] = None,
    targets: Union[str, Sequence[str]] = 'all',
    dropout: float = 0.05,
    model: Any = None,
    architecture: Optional[str] = None,
    task_type: Optional[str] = 'CAUSAL_LM',
    warn: bool = True,
    **kwargs: Any,
):
    """A ``peft.LoraConfig`` with the recommendations of "LoRA Learns Less and Forgets Less".

    Warns (:class:`LoRARecommendationWarning`) when ``alpha`` is not ``2 * r`` or when only the attention or
    only the MLP projections are adapted (the paper found All > MLP > Attention): ``targets='attention'`` /
    ``'mlp'``, or, when the architecture is known, a list of module names that are all attention (e.g.
    ``['q_proj', 'v_proj']``) or all MLP projections.

    Args:
        r: LoRA rank (the paper uses 16 and 256 on models of width 4096). A rank >= ``min(out, in)`` of a matrix
            can express any update of it: scale r to the model's width (e.g. 4/16/64 at width 128).
        alpha: LoRA α; default ``2 * r`` (the paper's practice; the update is scaled by α / r = 2).
        targets: ``'all'`` (attention and MLP projections), ``'attention'``, ``'mlp'``, or a list of module
            names (peft's suffix matching) that is passed through unchanged.
        dropout: LoRA dropout (``lora_dropout``); the paper's value is not confirmed, 0.05 is common.
        model: A model to read the architecture from (``config.model_type``) and to check the targets against.
        architecture: The architecture when no ``model`` is given (``'gpt2'``, ``'llama'``, ``'gpt_neox'``, ``'mpt'``).
        task_type: peft task type (``'CAUSAL_LM'``; None for a plain ``PeftModel``).
        warn: Warn about deviations from the recommendations.
        **kwargs: Further ``peft.LoraConfig`` arguments (e.g. ``bias``, ``init_lora_weights``, ``use_rslora``).

    Returns:
        peft.LoraConfig

    Example:
        .. code-block:: python

            from composer.models import HuggingFaceModel
            from composer_ext.lora_probe.lora import lora_config
            from composer_ext.models import small_gpt

            base = small_gpt()
            config = lora_config(r=16, model=base)            # alpha=32, attention + MLP projections
            model = HuggingFaceModel(base.model, tokenizer=base.tokenizer, peft_config=config)
    """
    from peft import LoraConfig  # heavy; imported by the one function that builds a config

    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f'r={r!r} is invalid. Fix: use a positive int rank, e.g. r=16 (the paper uses 16 and 256).')
    if alpha is None:
        alpha = 2 * r
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise ValueError(f'alpha={alpha!r} is invalid. Fix: use a positive number; the paper sets alpha = 2 * r = '
                         f'{2 * r}.')
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f'dropout={dropout!r} is outside [0, 1). Fix: use e.g. 0.05 or 0.0.')
    detected = _architecture_of(model) if model is not None else None
    if architecture is None:
        architecture = detected
    elif detected is not None and _ALIASES.get(detected, detected) != _ALIASES.get(architecture, architecture):
        raise ValueError(f'architecture={architecture!r} contradicts the model, whose config.model_type is '
                         f'{detected!r}. Fix: drop architecture= (it is read from the model).')
    if isinstance(targets, str):
        if targets not in _TARGET_KEYWORDS:
            raise ValueError(f"targets={targets!r} is not one of {list(_TARGET_KEYWORDS)}. Fix: use 'all' (the "
                             f'recommendation), or pass a list of module names.')
        if architecture is None:
            raise ValueError(f'targets={targets!r} needs the architecture to name the modules. Fix: pass model=<your '
                             f"model> or architecture='gpt2' / 'llama' / 'gpt_neox' / 'mpt', or a list of module "
                             f'names.')
        target_modules: Union[str, list[str]] = lora_target_modules(architecture, targets)
    elif isinstance(targets, Sequence) and targets and all(isinstance(t, str) and t for t in targets):
        target_modules = list(targets)
    else:
        raise ValueError(f"targets={targets!r} is invalid. Fix: use 'all', 'attention', 'mlp' or a non-empty list of "
                         f'module names.')
    if model is not None:
        names = [name for name, _ in unwrap_huggingface(model).named_modules()]
        if not any(name == t or name.endswith('.' + t) for name in names for t in target_modules):
            raise ValueError(f'targets={targets!r} ({target_modules}) match no module of the model. Fix: pass module '
                             f'names that exist, e.g. {[n for n in names if n.count(".") >= 3][:4]}.')
    if warn:
        if float(alpha) != 2.0 * r:
            warnings.warn(f'lora_config: alpha={alpha!r} with r={r}: the paper sets alpha = 2 * r = {2 * r} (keeping '
                          f'the update scale alpha / r = 2 as the rank changes).', LoRARecommendationWarning,
                          stacklevel=2)
        only = targets if targets in ('attention', 'mlp') else _single_kind(architecture, target_modules)
        if only is not None:
            kind = 'MLP' if only == 'mlp' else only
            listed = '' if isinstance(targets, str) else f' (only {kind} projections of {architecture})'
            warnings.warn(f"lora_config: targets={targets!r}{listed}: the paper found adapting all linear layers "
                          f"best (All > MLP > Attention). Fix: targets='all'.", LoRARecommendationWarning,
                          stacklevel=2)
    options: dict[str, Any] = {'fan_in_fan_out': _ALIASES.get(architecture or '', architecture) in _FAN_IN_FAN_OUT}
    options.update(kwargs)
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=float(dropout), target_modules=target_modules,
                      task_type=task_type, **options)


def _single_kind(architecture: Optional[str], target_modules: Sequence[str]) -> Optional[str]:
    """``'attention'`` or ``'mlp'`` when explicit targets adapt only that kind of projection of a known architecture.

    A target names a known projection when one is a dotted suffix of the other (``'q_proj'``, ``'attn.c_attn'``,
    ``'transformer.h.0.attn.c_attn'``); ``'c_proj'`` of GPT-2 names both kinds. Targets that name no known
    projection (``'lm_head'``) leave the coverage undecided: no warning.
    """
    key = _ALIASES.get(architecture or '', architecture)
    if key not in LORA_TARGETS:
        return None

    def names(target: str, known: str) -> bool:
        return target == known or target.endswith('.' + known) or known.endswith('.' + target)

    covered = {kind for kind, known in LORA_TARGETS[key].items() for t in target_modules for k in known if names(t, k)}
    unknown = [t for t in target_modules if not any(names(t, k) for known in LORA_TARGETS[key].values() for k in known)]
    if len(covered) == 1 and not unknown:
        return next(iter(covered))
    return None


def small_gpt_from_checkpoint(checkpoint: str, lora: Optional[dict] = None, tokenizer: Any = None):
    """A causal LM rebuilt from a Composer checkpoint of a ``HuggingFaceModel``, optionally wrapped with LoRA.

    The architecture (the saved ``transformers`` config) and the weights come from the checkpoint, so the
    finetuning model is exactly the pretrained one. With ``lora``, only the LoRA adapters train (peft via
    Composer's ``HuggingFaceModel(peft_config=...)``); without it, every weight trains (full finetuning).

    Args:
        checkpoint: Path (or Composer-supported URI) of a Composer checkpoint, e.g. the ``latest-rank0.pt`` of the
            pretraining run. Weights-only checkpoints work too.
        lora: Arguments of :func:`lora_config` (``r``, ``alpha``, ``targets``, ``dropout``...); None for full
            finetuning.
        tokenizer: The tokenizer; default: the one saved in the checkpoint, else the embedded corpus tokenizer.

    Returns:
        composer.models.HuggingFaceModel: with ``LanguageCrossEntropy`` and ``LanguagePerplexity`` metrics.

    Example:
        .. code-block:: python

            from composer_ext.lora_probe.lora import small_gpt_from_checkpoint
            model = small_gpt_from_checkpoint('runs/lora_probe/pretrain/checkpoints/latest-rank0.pt', lora={'r': 16})
    """
    if not isinstance(checkpoint, str) or not checkpoint:
        raise ValueError(f'checkpoint={checkpoint!r} is invalid. Fix: pass the path of a Composer checkpoint, e.g. '
                         f"'runs/lora_probe/pretrain/checkpoints/latest-rank0.pt'.")
    if lora is not None and not isinstance(lora, dict):
        raise TypeError(f'lora={lora!r} is not a dict. Fix: pass lora_config arguments, e.g. {{"r": 16, "targets": '
                        f'"all"}}, or None for full finetuning.')
    if '://' not in checkpoint and not os.path.exists(checkpoint):
        raise ValueError(f'checkpoint={checkpoint!r} does not exist. Fix: run the pretraining first (e.g. composer-ext '
                         f'run yamls/lora_probe/pretrain.yaml) or point checkpoint at an existing file.')
    if '://' in checkpoint:  # a remote checkpoint: download it first
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, 'checkpoint.pt')
            get_file(checkpoint, local)
            state_dict = load_checkpoint(local, what='checkpoint')
    else:
        state_dict = load_checkpoint(checkpoint, what='checkpoint')
    try:
        hf_state = state_dict['state']['integrations']['huggingface']
        weights = state_dict['state']['model']
    except (KeyError, TypeError):
        raise ValueError(f'checkpoint={checkpoint!r} is not a Composer checkpoint of a HuggingFaceModel (no '
                         f'state.integrations.huggingface). Fix: pass a checkpoint saved by a Composer Trainer that '
                         f'trained a HuggingFaceModel (e.g. small_gpt).') from None
    if 'peft_config' in hf_state.get('model', {}):
        raise ValueError(f'checkpoint={checkpoint!r} holds a LoRA (peft) model. Fix: finetune from a checkpoint of the '
                         f'base model, or merge the adapter first.')
    hf_model = HuggingFaceModel.load_huggingface_model_from_saved_state(hf_state, state_dict, None, None)
    prefix = 'model.'
    missing, unexpected = hf_model.load_state_dict({k[len(prefix):] if k.startswith(prefix) else k: v
                                                    for k, v in weights.items()}, strict=False)
    # GPT-2's lm_head is tied to the embedding, so it may be absent from (or redundant in) the saved weights.
    missing = [k for k in missing if k != 'lm_head.weight']
    if missing or unexpected:
        raise ValueError(f'checkpoint={checkpoint!r} does not fit its own saved architecture (missing {missing[:4]}, '
                         f'unexpected {unexpected[:4]}). Fix: pass a full checkpoint of the model (not a sharded one).')
    if tokenizer is None:
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer = HuggingFaceModel.load_huggingface_tokenizer_from_saved_state(hf_state, tokenizer_save_dir=tmp)
    if tokenizer is None:
        tokenizer = load_tokenizer()
    # transformers infers the loss from the class name, which for GPT2LMHeadModel fails with a warning.
    hf_model.loss_type = 'ForCausalLM'
    peft_config = lora_config(model=hf_model, **lora) if lora is not None else None
    metrics = [LanguageCrossEntropy(ignore_index=-100), LanguagePerplexity(ignore_index=-100)]
    return HuggingFaceModel(hf_model, tokenizer=tokenizer, use_logits=True, metrics=metrics, shift_labels=True,
                            peft_config=peft_config)
