"""The distillation loss, as plain functions on tensors: the functional core of :class:`KnowledgeDistillation`.

* :func:`kd_loss` -- ``T² · KL(p_teacher ‖ p_student)`` (or MSE on logits), mean over the kept positions; a list
  of teacher logits is an ensemble whose probabilities (default) or logits are averaged.
* :func:`check_kd_loss_arguments`, :func:`check_teacher_logits` -- the checks :func:`kd_loss` makes, for the
  Algorithm to make at construction and per teacher (one check, one message).
* :func:`distillation_mask` -- which positions carry a label (``labels != ignore_index``, shifted for causal LMs).
* :func:`output_width` -- the output width of a model (its logits are read by
  :func:`composer_ext.core.forward.extract_logits`).
* :func:`scalar_loss`, :func:`mix_loss` -- the student's loss as Composer totals it; ``ce_weight * loss +
  kd_weight * kd`` in the structure of Composer's loss.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from composer_ext.core.unwrap import unwrap_huggingface

__all__ = [
    'ENSEMBLE_AVERAGES',
    'LOSSES',
    'check_kd_loss_arguments',
    'check_teacher_logits',
    'distillation_mask',
    'kd_loss',
    'mix_loss',
    'normalized_weights',
    'output_width',
    'scalar_loss',
]

LOSSES = ('kl', 'mse')
ENSEMBLE_AVERAGES = ('probs', 'logits')


def output_width(model: nn.Module) -> Optional[int]:
    """The number of output classes (or vocabulary size) of a model, or None when it cannot be told statically.

    Knows Composer classifiers (``num_classes``), HuggingFace and llm-foundry models (their output embeddings, a
    ``Linear`` or a tied ``Embedding``, or ``config.vocab_size``/``num_labels``), and modules whose head is a
    ``Linear`` named ``classifier``, ``fc``, ``head`` or ``lm_head``.

    Example:
        >>> output_width(nn.Sequential()) is None
        True
    """
    model = unwrap_huggingface(model)
    num_classes = getattr(model, 'num_classes', None)
    if isinstance(num_classes, int) and not isinstance(num_classes, bool):
        return num_classes
    get_output_embeddings = getattr(model, 'get_output_embeddings', None)
    if callable(get_output_embeddings):
        try:
            embeddings = get_output_embeddings()
        except (NotImplementedError, AttributeError):
            embeddings = None
        if isinstance(embeddings, nn.Linear):
            return embeddings.out_features
        if isinstance(embeddings, nn.Embedding):  # tied input/output embeddings (llm-foundry's MPT)
            return embeddings.num_embeddings
    config = getattr(model, 'config', None)
    if config is not None and getattr(config, 'vocab_size', None) and hasattr(model, 'lm_head'):
        return int(config.vocab_size)
    inner = getattr(model, 'module', None)  # ComposerClassifier wraps its network in `.module`
    for candidate in (model, inner):
        if not isinstance(candidate, nn.Module):
            continue
        for name in ('classifier', 'fc', 'head', 'lm_head'):
            head = getattr(candidate, name, None)
            if isinstance(head, nn.Linear):
                return head.out_features
    return None


def distillation_mask(labels: Optional[torch.Tensor], logits_shape: Sequence[int], shift_labels: bool = False,
                      ignore_index: int = -100) -> Optional[torch.Tensor]:
    """The positions of ``logits`` that carry a label, as a bool tensor of shape ``logits_shape[:-1]``.

    For a causal LM (``shift_labels=True``) the logits at position ``t`` predict the label at ``t + 1``, so
    position ``t`` is kept when ``labels[..., t + 1] != ignore_index`` and the last position is dropped (this is
    how HuggingFace and Composer compute the causal-LM loss). For a masked LM or a classifier, position ``t`` is
    kept when ``labels[..., t] != ignore_index``. Returns None (keep everything) when ``labels`` is None, not an
    integer tensor (soft labels, e.g. after MixUp), or not shaped like the logits' leading dimensions.

    Example:
        >>> labels = torch.tensor([[5, 6, -100]])
        >>> distillation_mask(labels, (1, 3, 10), shift_labels=True)
        tensor([[ True, False, False]])
    """
    if labels is None or not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point or \
            labels.dtype == torch.bool or tuple(labels.shape) != tuple(logits_shape[:-1]):
        return None
    if not shift_labels:
        return labels != ignore_index
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[..., :-1] = labels[..., 1:] != ignore_index
    return mask


def check_kd_loss_arguments(temperature: Any, loss: Any, ensemble_average: Any) -> None:
    """Refuse a loss, temperature or ensemble average that :func:`kd_loss` cannot use (each message has the fix).

    Example:
        >>> check_kd_loss_arguments(4.0, 'kl', 'probs')
    """
    if loss not in LOSSES:
        raise ValueError(f'loss={loss!r} is not a distillation loss. Fix: use one of {list(LOSSES)}.')
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or \
            not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f'temperature={temperature!r} must be a positive number. Fix: use e.g. temperature=4.0.')
    if ensemble_average not in ENSEMBLE_AVERAGES:
        raise ValueError(f'ensemble_average={ensemble_average!r} is not an ensemble average. Fix: use one of '
                         f'{list(ENSEMBLE_AVERAGES)}.')


def check_teacher_logits(teacher_logits: torch.Tensor, student_logits: torch.Tensor, teacher: str) -> None:
    """Refuse teacher logits that cannot be compared with the student's; ``teacher`` names the teacher.

    Example:
        >>> check_teacher_logits(torch.zeros(2, 3), torch.zeros(2, 3), 'teachers[0]')
    """
    if teacher_logits.shape == student_logits.shape:
        return
    width, student_width = teacher_logits.shape[-1] if teacher_logits.dim() else None, student_logits.shape[-1]
    shapes = f'(teacher logits: {tuple(teacher_logits.shape)}, student logits: {tuple(student_logits.shape)})'
    if width != student_width:
        raise ValueError(f'{teacher} has output width {width} but the student has {student_width} (classes or '
                         f"vocabulary) {shapes}. Fix: distil only from teachers with the student's classes/vocabulary "
                         f'(the same tokenizer and num_classes).')
    raise ValueError(f"{teacher} returned logits of another shape than the student's {shapes}. Fix: make the teacher "
                     f'see the same inputs as the student (see teacher_forward).')


def normalized_weights(weights: Optional[Sequence[float]], n: int, name: str) -> list[float]:
    """Weights of ``n`` teachers that sum to 1 (uniform when None); ``name`` is the argument, for the message.

    Example:
        >>> normalized_weights([1, 3], 2, 'teacher_weights')
        [0.25, 0.75]
    """
    if weights is None:
        return [1.0 / n] * n
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise ValueError(f'{name}={weights!r} has {len(weights)} entries for {n} teachers. Fix: give one weight '
                         f'per teacher.')
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f'{name}={weights!r} must be finite, >= 0 and not all 0. Fix: e.g. [1.0] * {n}.')
    total = sum(weights)
    return [w / total for w in weights]


def _masked_mean(values: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    if mask is None:
        return values.mean()
    if mask.shape != values.shape:
        raise ValueError(f'mask has shape {tuple(mask.shape)} but the logits have {tuple(values.shape)} positions. '
                         f'Fix: pass a mask shaped like the logits without the last dimension.')
    kept = values[mask.to(values.device)]
    if kept.numel() == 0:
        return values.sum() * 0.0  # no labelled position: a zero that keeps the graph (and device, dtype)
    return kept.mean()


def kd_loss(student_logits: torch.Tensor, teacher_logits: Union[torch.Tensor, Sequence[torch.Tensor]],
            temperature: float = 4.0, loss: str = 'kl', mask: Optional[torch.Tensor] = None,
            teacher_weights: Optional[Sequence[float]] = None, ensemble_average: str = 'probs') -> torch.Tensor:
    """The distillation loss of a student against one teacher or an ensemble, averaged over kept positions.

    ``kl``: ``T² · KL(p_teacher ‖ p_student)`` with ``p = softmax(logits / T)`` over the last dimension, summed
    over classes and averaged over positions (samples, or tokens where ``mask`` is True). The teacher is the
    target distribution; gradients flow only into the student. With several teachers, ``p_teacher`` is the
    (weighted) mean of their probabilities (``ensemble_average='probs'``, a mixture of the teachers' predictions), or
    the softmax of the (weighted) mean of their logits (``ensemble_average='logits'``, a geometric mean of their
    probabilities: sharper where the teachers agree).

    ``mse``: the mean squared error between raw logits (no temperature), averaged over classes and kept
    positions; with several teachers, against the (weighted) mean of their logits.

    Computed in float32 whatever the logits' dtype.

    Args:
        student_logits: ``(..., C)`` logits of the student (with grad).
        teacher_logits: ``(..., C)`` logits of one teacher, or a list of them (an ensemble).
        temperature: ``T > 0``.
        loss: ``'kl'`` or ``'mse'``.
        mask: Optional bool tensor of shape ``student_logits.shape[:-1]``: the positions to average over.
        teacher_weights: Optional non-negative weights of the ensemble members (default: uniform).
        ensemble_average: ``'probs'`` or ``'logits'``: what a KL ensemble averages (MSE always averages logits).

    Returns:
        A scalar tensor.

    Example:
        >>> student, teacher = torch.randn(8, 10, requires_grad=True), torch.randn(8, 10)
        >>> kd_loss(student, teacher, temperature=2.0).backward()
    """
    check_kd_loss_arguments(temperature, loss, ensemble_average)
    teachers = [teacher_logits] if isinstance(teacher_logits, torch.Tensor) else list(teacher_logits)
    if not teachers:
        raise ValueError('teacher_logits is empty. Fix: pass one tensor or a non-empty list of tensors.')
    for i, logits in enumerate(teachers):
        check_teacher_logits(logits, student_logits, f'teacher_logits[{i}]')
    weights = normalized_weights(teacher_weights, len(teachers), 'teacher_weights')
    student = student_logits.float()
    if loss == 'mse':
        target = sum(w * t.detach().float() for w, t in zip(weights, teachers))
        return _masked_mean(((student - target)**2).mean(-1), mask)
    log_p_student = F.log_softmax(student / temperature, dim=-1)
    if ensemble_average == 'logits' and len(teachers) > 1:
        mean_logits = sum(w * t.detach().float() for w, t in zip(weights, teachers))
        teachers, weights = [mean_logits], [1.0]
    log_p_teacher = [F.log_softmax(t.detach().float() / temperature, dim=-1) for t in teachers]
    if len(log_p_teacher) == 1:
        log_p_target = log_p_teacher[0]
    else:  # log of the weighted mean of probabilities, computed stably
        log_w = torch.tensor([math.log(w) if w > 0 else -math.inf for w in weights], device=student.device)
        stacked = torch.stack(log_p_teacher) + log_w.view(-1, *([1] * student.dim()))
        log_p_target = torch.logsumexp(stacked, dim=0)
    per_position = F.kl_div(log_p_student, log_p_target, reduction='none', log_target=True).sum(-1)
    return _masked_mean(per_position, mask) * (temperature**2)


def scalar_loss(loss: Any) -> torch.Tensor:
    """The total of a loss as Composer computes it: ``loss['total']``, else the sum of the means.

    Example:
        >>> scalar_loss({'a': torch.tensor(1.0), 'b': torch.tensor(2.0)})
        tensor(3.)
    """
    if isinstance(loss, Mapping):
        if 'total' in loss:
            return loss['total'].mean()
        return sum(v.mean() for v in loss.values())
    if isinstance(loss, (tuple, list)):
        return sum(v.mean() for v in loss)
    return loss.mean()


def mix_loss(loss: Any, kd: torch.Tensor, ce_weight: float, kd_weight: float) -> Any:
    """``ce_weight * loss + kd_weight * kd``, keeping the structure of Composer's loss (tensor, tuple or dict).

    Example:
        >>> mix_loss(torch.tensor(2.0), torch.tensor(1.0), ce_weight=0.1, kd_weight=0.9)
        tensor(1.1000)
    """
    if isinstance(loss, Mapping):
        mixed = {k: ce_weight * v for k, v in loss.items()}
        mixed['kd'] = kd_weight * kd
        if 'total' in loss:
            mixed['total'] = ce_weight * loss['total'] + kd_weight * kd
        return mixed
    if isinstance(loss, (tuple, list)):
        return tuple(ce_weight * v for v in loss) + (kd_weight * kd,)
    return ce_weight * loss + kd_weight * kd
