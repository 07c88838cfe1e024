"""Class-wise bias of a model relative to a reference model: CEV and SDE ("Measure Twice, Cut Once").

For every class ``c`` (one-vs-rest, from each model's confusion matrix) the false positive and false negative
rates ``FPR_c = FP/(FP+TN)`` and ``FNR_c = FN/(FN+TP)`` of the compared model are taken relative to the
reference model's: ``ΔFPR_c = (FPR_c - FPR_c^ref) / FPR_c^ref`` (and the same for FNR). Each class is then a
point ``(ΔFPR_c, ΔFNR_c)``:

* **CEV** (Combined Error Variance) is the mean squared distance of the class points from their centroid:
  how unevenly the classes' error rates moved;
* **SDE** (Symmetric Distance Error) is the mean ``|ΔFPR_c - ΔFNR_c|``: how far the classes moved towards false
  positives or towards false negatives.

Both are 0 when the two models make the same per-class errors. SDE averages over the classes whose two Δ are both
kept (see below); CEV's two components each average over their own kept classes. ``variant='nas'`` (the default) is the
definition of the IEEE NAS 2022 paper and its demo code (fractions); ``variant='simon'`` reproduces the
*Simon Says* tables (Δ in percent, CEV halved, SDE divided by √2, i.e. CEV_simon = 5000·CEV_nas and
SDE_simon = 100/√2·SDE_nas).

Left-out (masked) class rates:

* a rate with no samples to define it is left out in both modes: ``FNR_c`` when the samples hold no sample of class
  ``c``, ``FPR_c`` when they hold no sample of any other class. It is 0/0, not a zero rate; with ``eps`` it would
  get Δ = 0 and pull the component's mean towards 0. ``n_unsupported`` counts these.
* a zero reference rate makes Δ undefined. With ``eps=None`` such a class is left out of that component (its
  terms, its mean and its N); with ``eps > 0``, ``eps`` is added to both models' rates instead.

Every left-out (class, rate) pair is counted in ``n_masked`` and reported with a :class:`ZeroRateWarning`. CEV and
SDE are never infinite. A mean over no class is ``nan``, not 0 (which would read as "no bias"): CEV is ``nan`` when
either component has no class left, SDE when no class has both rates left; e.g. both are ``nan`` for a perfect
reference (every reference rate is 0) with ``eps=None``, or for empty input. The warning says so.

:class:`ClassBias` is the streaming, DDP-reducible torchmetrics form, with percentile bootstrap confidence
intervals.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ['BiasResult', 'ClassBias', 'ZeroRateWarning', 'VARIANTS', 'cev_sde', 'cev_sde_from_confusion',
           'confusion_matrix']

VARIANTS = ('nas', 'simon')
MIN_EPS = 1e-12  # the smallest smoothing constant that keeps CEV finite
# Largest class count whose (target, reference, prediction) joint histogram (C**3 cells) ClassBias keeps for the
# exact cell bootstrap; above it the bootstrap weights samples online.
_MAX_JOINT_CLASSES = 128


class ZeroRateWarning(UserWarning):
    """A class rate was left out of CEV/SDE: a zero reference rate (``eps=None``), or no samples to define it."""


@dataclass(frozen=True)
class BiasResult:
    """CEV and SDE of a model against a reference, with the per-class detail they come from.

    Attributes:
        cev: Combined Error Variance; ``nan`` when a component (FPR or FNR) has no class left to compare.
        sde: Symmetric Distance Error; ``nan`` when no class has both rates left.
        n_masked: How many (class, rate) pairs were left out: a zero reference rate (``eps=None`` only) or no
            samples to define the rate (both modes; also counted in ``n_unsupported``). ``n_masked == 2 * C``
            (every rate left out, e.g. a perfect reference with ``eps=None``) means CEV and SDE are ``nan``.
        delta_fpr: Per-class relative FPR change, shape ``(C,)`` (float64; percent for ``variant='simon'``).
            ``nan`` where the class was masked.
        delta_fnr: Per-class relative FNR change, as ``delta_fpr``.
        fpr, fnr: Per-class rates of the compared model.
        ref_fpr, ref_fnr: Per-class rates of the reference model.
        masked_fpr, masked_fnr: Boolean masks of the classes left out of each component (SDE uses the classes
            kept in both).
        variant: ``'nas'`` or ``'simon'``.
        eps: The smoothing constant, or ``None`` (masking).
        n_unsupported: How many of the ``n_masked`` pairs had no samples to define the rate (FNR of a class absent
            from the samples, FPR when only one class is present).
    """

    cev: float
    sde: float
    n_masked: int
    delta_fpr: Tensor
    delta_fnr: Tensor
    fpr: Tensor
    fnr: Tensor
    ref_fpr: Tensor
    ref_fnr: Tensor
    masked_fpr: Tensor
    masked_fnr: Tensor
    variant: str = 'nas'
    eps: Optional[float] = None
    n_unsupported: int = 0

    def as_dict(self) -> dict[str, Any]:
        """Plain Python values (lists, floats, ``None`` for masked Δ and for a ``nan`` CEV/SDE), e.g. for JSON."""

        def value(v: float) -> Optional[float]:
            return None if math.isnan(v) else v

        def values(t: Tensor) -> list:
            return [value(v) for v in t.tolist()]

        return {
            'cev': value(self.cev), 'sde': value(self.sde), 'n_masked': self.n_masked,
            'n_unsupported': self.n_unsupported, 'variant': self.variant, 'eps': self.eps,
            'delta_fpr': values(self.delta_fpr), 'delta_fnr': values(self.delta_fnr),
            'fpr': self.fpr.tolist(), 'fnr': self.fnr.tolist(), 'ref_fpr': self.ref_fpr.tolist(),
            'ref_fnr': self.ref_fnr.tolist(),
        }


# --- validation -------------------------------------------------------------------------------------------


def _check_num_classes(num_classes: Any) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f'num_classes={num_classes!r} is invalid. Fix: pass the number of classes as an int >= 2.')
    return num_classes


def _check_variant(variant: Any) -> str:
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r} is unknown. Fix: use 'nas' (fractions; the NAS-2022 definition) or "
                         f"'simon' (percent, CEV/2, SDE/√2; the Simon Says tables).")
    return variant


def _check_eps(eps: Any) -> Optional[float]:
    if eps is None:
        return None
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        problem = 'is negative' if isinstance(eps, (int, float)) and not isinstance(eps, bool) and eps < 0 else \
            'is not a positive finite number'
        raise ValueError(f'eps={eps!r} {problem}. Fix: pass eps=None to leave zero-rate classes out, or a small '
                         f'positive value such as eps=1e-6 to add to both models\' rates.')
    if eps < MIN_EPS:
        # Δ can reach 1/eps and CEV squares it: below this bound float64 overflows to inf (the authors' 1e-150
        # already gives values near 1e300 that mean nothing).
        raise ValueError(f'eps={eps!r} is below {MIN_EPS:g}, where a zero reference rate turns Δ into ~1/eps and CEV '
                         f'into ~1/eps² (inf in float64). Fix: use eps >= {MIN_EPS:g} (e.g. 1e-6), or eps=None to '
                         f'leave zero-rate classes out.')
    return float(eps)


def _as_tensor(x: Any, name: str) -> Tensor:
    if isinstance(x, Tensor):
        return x
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    raise TypeError(f'{name} is a {type(x).__name__}; expected a torch.Tensor (or numpy array) of class indices '
                    f'(N,) or scores (N, num_classes). Fix: pass e.g. torch.as_tensor({name}).')


def _labels(x: Any, name: str, num_classes: int, allow_scores: bool = True, validate: bool = True) -> Tensor:
    """Class indices ``(N,)`` from indices or from scores ``(N, C)`` (argmaxed)."""
    x = _as_tensor(x, name)
    if x.ndim == 2 and allow_scores:
        if x.shape[1] != num_classes:
            raise ValueError(f'{name} has shape {tuple(x.shape)}: {x.shape[1]} scores per sample, but '
                             f'num_classes={num_classes}. Fix: pass logits/probabilities of shape (N, {num_classes}) '
                             f'or class indices of shape (N,).')
        if x.is_floating_point() and validate and not bool(torch.isfinite(x).all()):
            bad = int((~torch.isfinite(x)).any(1).sum())
            raise ValueError(f'{name} contains nan or inf scores ({bad} of {x.shape[0]} samples), so their argmax is '
                             f'meaningless. Fix: check the model outputs (a diverged model, fp16 overflow), or pass '
                             f'class indices.')
        return x.argmax(dim=1)
    if x.ndim != 1:
        shapes = '(N,) class indices' + (f' or (N, {num_classes}) scores' if allow_scores else '')
        raise ValueError(f'{name} has shape {tuple(x.shape)}. Fix: pass {shapes}.')
    if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise TypeError(f'{name} is a 1-D {x.dtype} tensor; class indices must be integers. Fix: pass '
                        f'{name}.long(), or scores of shape (N, {num_classes}).')
    if validate and x.numel():
        low, high = int(x.min()), int(x.max())
        if low < 0 or high >= num_classes:
            bad = low if low < 0 else high
            raise ValueError(f'{name} contains the label {bad}, outside [0, num_classes={num_classes}). Fix: use '
                             f'labels 0..{num_classes - 1}, or raise num_classes.')
    return x.long()


def _three_labels(target: Any, ref_preds: Any, preds: Any, num_classes: int,
                  validate: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    target = _labels(target, 'target', num_classes, allow_scores=False, validate=validate)
    ref_preds = _labels(ref_preds, 'ref_preds', num_classes, validate=validate)
    preds = _labels(preds, 'preds', num_classes, validate=validate)
    if not len(target) == len(ref_preds) == len(preds):
        raise ValueError(f'target, ref_preds and preds must describe the same samples, but they have '
                         f'{len(target)}, {len(ref_preds)} and {len(preds)} samples. Fix: pass the two models\' '
                         f'predictions on the same inputs as target.')
    devices = {target.device, ref_preds.device, preds.device}
    if len(devices) > 1:
        raise ValueError(f'target, ref_preds and preds are on different devices ({sorted(map(str, devices))}). '
                         f'Fix: move them to one device.')
    return target, ref_preds, preds


# --- the statistic ----------------------------------------------------------------------------------------


def _confusion(target: Tensor, preds: Tensor, num_classes: int) -> Tensor:
    """:func:`confusion_matrix` of indices already validated (the per-batch path)."""
    return torch.bincount(target * num_classes + preds, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes)


def confusion_matrix(target: Tensor, preds: Tensor, num_classes: int) -> Tensor:
    """``(C, C)`` int64 counts, rows = true class, columns = predicted class.

    Args:
        target: True class indices, shape ``(N,)``.
        preds: Predicted class indices ``(N,)`` or scores ``(N, num_classes)`` (argmaxed).
        num_classes: The number of classes ``C``.

    Raises:
        TypeError, ValueError: labels that are not class indices in ``[0, num_classes)``, or sample counts or
        devices that differ.

    Example:
        >>> import torch
        >>> confusion_matrix(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]), 2).tolist()
        [[1, 0], [1, 1]]
    """
    num_classes = _check_num_classes(num_classes)
    target = _labels(target, 'target', num_classes, allow_scores=False)
    preds = _labels(preds, 'preds', num_classes)
    if len(target) != len(preds) or target.device != preds.device:
        raise ValueError(f'target ({len(target)} samples on {target.device}) and preds ({len(preds)} samples on '
                         f'{preds.device}) must describe the same samples on one device. Fix: pass the predictions '
                         f'on the inputs whose labels are target.')
    return _confusion(target, preds, num_classes)


def _counts_from_confusion(confmat: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    confmat = confmat.double()
    tp = confmat.diagonal(dim1=-2, dim2=-1)
    fp = confmat.sum(-2) - tp
    fn = confmat.sum(-1) - tp
    tn = confmat.sum((-2, -1)).unsqueeze(-1) - tp - fp - fn
    return tp, fp, fn, tn


def _rate(errors: Tensor, correct: Tensor) -> Tensor:
    total = errors + correct
    return torch.where(total > 0, errors / total.clamp_min(1e-300), torch.zeros_like(total))


def _relative_change(rate: Tensor, ref_rate: Tensor, eps: Optional[float],
                     supported: Tensor) -> tuple[Tensor, Tensor]:
    """Δ and its validity mask: rates without samples (``supported`` False) are always masked; then ``eps`` is added
    to both rates, or (``eps=None``) zero reference rates are masked. Masked entries of Δ are ``nan``."""
    if eps is not None:
        valid = supported
        delta = ((rate + eps) - (ref_rate + eps)) / (ref_rate + eps)
    else:
        valid = supported & (ref_rate > 0)
        delta = (rate - ref_rate) / torch.where(valid, ref_rate, torch.ones_like(ref_rate))
    return torch.where(valid, delta, torch.full_like(rate, float('nan'))), valid


def _masked_mean(values: Tensor, valid: Tensor) -> Tensor:
    """The mean over the valid entries; ``nan`` where there is none (nothing to compare is not a 0)."""
    count = valid.sum(-1)
    total = torch.where(valid, values, torch.zeros_like(values)).sum(-1)
    mean = total / count.clamp_min(1)
    return torch.where(count > 0, mean, torch.full_like(mean, float('nan')))


def _statistic(model_counts: tuple[Tensor, ...], ref_counts: tuple[Tensor, ...], variant: str,
               eps: Optional[float]) -> dict[str, Tensor]:
    """CEV, SDE and the per-class detail from (tp, fp, fn, tn) of both models; batched over leading dims."""
    tp, fp, fn, tn = model_counts
    rtp, rfp, rfn, rtn = ref_counts
    fpr, fnr = _rate(fp, tn), _rate(fn, tp)
    ref_fpr, ref_fnr = _rate(rfp, rtn), _rate(rfn, rtp)
    # A rate needs samples: FNR_c those of class c, FPR_c those of the other classes. Both models are counted on the
    # same samples, so the reference's counts decide for both.
    support_fpr, support_fnr = (rfp + rtn) > 0, (rfn + rtp) > 0
    delta_fpr, valid_fpr = _relative_change(fpr, ref_fpr, eps, support_fpr)
    delta_fnr, valid_fnr = _relative_change(fnr, ref_fnr, eps, support_fnr)
    if variant == 'simon':
        delta_fpr, delta_fnr = delta_fpr * 100.0, delta_fnr * 100.0
    spread_fpr = _masked_mean((delta_fpr - _masked_mean(delta_fpr, valid_fpr).unsqueeze(-1)) ** 2, valid_fpr)
    spread_fnr = _masked_mean((delta_fnr - _masked_mean(delta_fnr, valid_fnr).unsqueeze(-1)) ** 2, valid_fnr)
    cev = spread_fpr + spread_fnr
    both = valid_fpr & valid_fnr  # SDE compares a class's two Δ: only classes with both kept
    sde = _masked_mean((delta_fpr - delta_fnr).abs(), both)
    if variant == 'simon':
        cev, sde = cev / 2.0, sde / math.sqrt(2.0)
    return {
        'cev': cev, 'sde': sde, 'n_masked': (~valid_fpr).sum(-1) + (~valid_fnr).sum(-1),
        'n_unsupported': (~support_fpr).sum(-1) + (~support_fnr).sum(-1), 'unsupported_fpr': ~support_fpr,
        'unsupported_fnr': ~support_fnr,
        'delta_fpr': delta_fpr, 'delta_fnr': delta_fnr, 'fpr': fpr, 'fnr': fnr, 'ref_fpr': ref_fpr,
        'ref_fnr': ref_fnr, 'masked_fpr': ~valid_fpr, 'masked_fnr': ~valid_fnr,
    }


def _listed(mask: Tensor) -> str:
    classes = torch.nonzero(mask).flatten().tolist()
    return str(classes) if len(classes) <= 10 else f'[{", ".join(map(str, classes[:10]))}, ...]'


def _warn_masked(stats: dict[str, Tensor], where: str, stacklevel: int) -> None:
    """One :class:`ZeroRateWarning` naming the left-out class rates, by cause, each with its fix."""
    sentences = []
    zero = [(name, stats[f'masked_{name.lower()}'] & ~stats[f'unsupported_{name.lower()}']) for name in ('FPR', 'FNR')]
    if any(bool(mask.any()) for _, mask in zero):
        parts = '; '.join(f'{name} of classes {_listed(mask)}' for name, mask in zero if bool(mask.any()))
        sentences.append(f'zero reference rate: {parts}. Fix: pass eps>0 (e.g. eps=1e-6) to add eps to both models\' '
                         f'rates instead.')
    unsupported = [(name, stats[f'unsupported_{name.lower()}']) for name in ('FPR', 'FNR')]
    if any(bool(mask.any()) for _, mask in unsupported):
        parts = '; '.join(f'{name} of classes {_listed(mask)}' for name, mask in unsupported if bool(mask.any()))
        sentences.append(f'no samples to define the rate (FNR: no sample of the class; FPR: no sample of another '
                         f'class): {parts}. Fix: evaluate on samples of every class (an undefined rate is left out '
                         f'whatever eps).')
    cev_nan, sde_nan = bool(torch.isnan(stats['cev'])), bool(torch.isnan(stats['sde']))
    if cev_nan and sde_nan:
        sentences.append('CEV and SDE are NaN: no class rate is left to compare (not 0, which would mean no bias).')
    elif cev_nan:
        sentences.append('CEV is NaN: the FPR or the FNR component has no class left to compare.')
    elif sde_nan:
        sentences.append('SDE is NaN: no class has both rates left to compare.')
    warnings.warn(f'{where}: {int(stats["n_masked"])} class rate(s) were left out of CEV/SDE and counted in n_masked. '
                  + ' '.join(f'Left out for a {s}' if s.startswith('zero') else
                             s if s.startswith(('CEV', 'SDE')) else f'Left out for having {s}'
                             for s in sentences), ZeroRateWarning, stacklevel=stacklevel)


def _result(stats: dict[str, Tensor], variant: str, eps: Optional[float]) -> BiasResult:
    cpu = {k: v.detach().cpu() for k, v in stats.items()}
    return BiasResult(cev=float(cpu['cev']), sde=float(cpu['sde']), n_masked=int(cpu['n_masked']),
                      n_unsupported=int(cpu['n_unsupported']),
                      delta_fpr=cpu['delta_fpr'], delta_fnr=cpu['delta_fnr'], fpr=cpu['fpr'], fnr=cpu['fnr'],
                      ref_fpr=cpu['ref_fpr'], ref_fnr=cpu['ref_fnr'], masked_fpr=cpu['masked_fpr'],
                      masked_fnr=cpu['masked_fnr'], variant=variant, eps=eps)


def cev_sde_from_confusion(ref_confmat: Tensor, confmat: Tensor, variant: str = 'nas',
                           eps: Optional[float] = None) -> BiasResult:
    """CEV and SDE from the two models' ``(C, C)`` confusion matrices (rows = true class) on the same samples.

    Args:
        ref_confmat: The reference model's confusion matrix.
        confmat: The compared model's confusion matrix.
        variant: ``'nas'`` or ``'simon'`` (see :func:`cev_sde`).
        eps: ``None`` (mask zero reference rates) or a positive smoothing constant.

    Example:
        >>> import torch
        >>> ref = torch.tensor([[8, 2], [1, 9]]); new = torch.tensor([[6, 4], [1, 9]])
        >>> round(cev_sde_from_confusion(ref, new).sde, 4)
        1.0
    """
    variant, eps = _check_variant(variant), _check_eps(eps)
    ref_confmat, confmat = _as_tensor(ref_confmat, 'ref_confmat'), _as_tensor(confmat, 'confmat')
    if ref_confmat.ndim != 2 or ref_confmat.shape[0] != ref_confmat.shape[1] or ref_confmat.shape != confmat.shape:
        raise ValueError(f'ref_confmat {tuple(ref_confmat.shape)} and confmat {tuple(confmat.shape)} must be square '
                         f'(C, C) matrices of the same shape. Fix: count both models on the same classes.')
    _check_num_classes(int(confmat.shape[0]))
    for name, matrix in (('ref_confmat', ref_confmat), ('confmat', confmat)):
        if bool((matrix < 0).any()):
            raise ValueError(f'{name} has negative counts (min {matrix.min().item()}). Fix: pass sample counts >= 0, '
                             f'e.g. from composer_ext.fairness.bias.confusion_matrix(target, preds, num_classes).')
    if not torch.equal(ref_confmat.sum(1), confmat.sum(1).to(ref_confmat.dtype)):
        raise ValueError(f'the row sums (samples per true class) differ: ref_confmat {ref_confmat.sum(1).tolist()} vs '
                         f'confmat {confmat.sum(1).tolist()}. Fix: count both models on the same samples.')
    stats = _statistic(_counts_from_confusion(confmat), _counts_from_confusion(ref_confmat), variant, eps)
    if int(stats['n_masked']):
        _warn_masked(stats, 'cev_sde_from_confusion', stacklevel=3)
    return _result(stats, variant, eps)


def cev_sde(target: Tensor, ref_preds: Tensor, preds: Tensor, num_classes: int, variant: str = 'nas',
            eps: Optional[float] = None) -> BiasResult:
    """CEV and SDE of ``preds`` relative to ``ref_preds`` on the same samples, whose true labels are ``target``.

    Args:
        target: True class indices, shape ``(N,)``.
        ref_preds: The reference model's predictions: class indices ``(N,)`` or scores ``(N, num_classes)``
            (logits or probabilities; argmaxed).
        preds: The compared model's predictions, same forms.
        num_classes: The number of classes ``C``.
        variant: ``'nas'`` (default): Δ as fractions, CEV = (1/N) Σ_c [(ΔFPR_c - mean)² + (ΔFNR_c - mean)²],
            SDE = (1/N) Σ_c |ΔFPR_c - ΔFNR_c|, each sum and N over the classes kept (for SDE: kept in both
            rates). ``'simon'``: Δ in percent, CEV halved, SDE divided by √2.
        eps: ``None`` (default): a class whose reference FPR (or FNR) is 0 is left out of that component's terms,
            mean and N, counted in ``n_masked``, with a :class:`ZeroRateWarning`. A positive float: added to both
            models' rates. In both modes a rate with no samples to define it (FNR of a class absent from
            ``target``) is left out and counted the same way (and in ``n_unsupported``).

    Returns:
        A :class:`BiasResult` (``.cev``, ``.sde``, ``.n_masked``, ``.delta_fpr``, ``.delta_fnr``, ...). CEV is
        ``nan`` when a component has no class left, SDE when no class has both rates left (a perfect reference
        with ``eps=None``, empty input): nothing to compare, which is not "no bias".

    Raises:
        ValueError: on sample counts that differ, labels outside ``[0, num_classes)``, an unknown variant, or eps <= 0.

    Example:
        >>> import torch
        >>> y = torch.tensor([0, 0, 1, 1, 2, 2])
        >>> cev_sde(y, y, y, num_classes=3, eps=1e-6).cev
        0.0
    """
    num_classes = _check_num_classes(num_classes)
    variant, eps = _check_variant(variant), _check_eps(eps)
    target, ref_preds, preds = _three_labels(target, ref_preds, preds, num_classes)
    stats = _statistic(_counts_from_confusion(_confusion(target, preds, num_classes)),
                       _counts_from_confusion(_confusion(target, ref_preds, num_classes)), variant, eps)
    if int(stats['n_masked']):
        _warn_masked(stats, 'cev_sde', stacklevel=3)
    return _result(stats, variant, eps)


# --- bootstrap --------------------------------------------------------------------------------------------


def _scatter(values: Tensor, index: Tensor, num_classes: int) -> Tensor:
    """``out[b, c] = Σ_k values[b, k] [index[k] == c]`` for values ``(B, K)``."""
    out = torch.zeros(values.shape[0], num_classes, dtype=values.dtype, device=values.device)
    return out.index_add_(1, index, values)


def _counts_from_weights(weights: Tensor, target: Tensor, preds: Tensor, num_classes: int) -> tuple[Tensor, ...]:
    """Weighted (tp, fp, fn, tn) per replicate: ``weights`` (B, K) over items with labels ``target``/``preds``."""
    hit = (preds == target).to(weights.dtype)
    tp = _scatter(weights * hit, target, num_classes)
    fn = _scatter(weights * (1 - hit), target, num_classes)
    fp = _scatter(weights * (1 - hit), preds, num_classes)
    tn = weights.sum(1, keepdim=True) - tp - fn - fp
    return tp, fp, fn, tn


def _replicate_rows(total: int, per_row: int, budget: int = 1 << 22) -> int:
    return max(1, min(total, budget // max(per_row, 1)))


class ClassBias(Metric):
    """Streaming CEV and SDE of a model against a reference model, DDP-reducible, with bootstrap CIs.

    ``update(target, ref_preds, preds)`` takes true labels and the two models' predictions on the same inputs
    (class indices or ``(N, C)`` scores) and accumulates both ``(C, C)`` confusion matrices; ``compute()`` (after
    torchmetrics' sum-reduction over ranks) returns ``{'cev', 'sde', 'n_masked'}`` and, with
    ``num_bootstraps > 0``, the percentile confidence bounds ``cev_ci_low/high`` and ``sde_ci_low/high``.
    :attr:`last_result` holds the full :class:`BiasResult` (per-class Δ) of the last ``compute()`` and
    :attr:`last_confmats` its ``(confmat, ref_confmat)``, summed over ranks.

    Calling the metric (``metric(target, ref_preds, preds)``, torchmetrics' ``forward``) accumulates the batch like
    ``update`` and returns the batch's own ``{'cev', 'sde', 'n_masked'}``: cheaply, without bootstrap, warning or
    cross-rank sync, and leaving :attr:`last_result`/:attr:`last_confmats` to ``compute()``. CEV/SDE of one batch
    is a noisy number; the value to report is ``compute()`` over the whole evaluation set.

    The bootstrap is the Poisson bootstrap (each sample weighted by an independent Poisson(1) count). For
    ``num_classes <= 128`` it is evaluated exactly on the joint histogram of (true, reference, predicted)
    labels, which is what the statistic depends on: a replicate draws Poisson(n) for each occupied cell, so it
    costs O(cells) rather than O(samples) and the intervals are identical on 1 or N ranks for a given ``seed``.
    For more classes it weights samples online as they arrive (state ``(B, 2, 3, C)``). A replicate whose CEV or SDE
    is ``nan`` (nothing left to compare in that resample) is left out of that interval; when the statistic itself is
    ``nan`` (e.g. a perfect reference with ``eps=None``) so are its bounds.

    Args:
        num_classes: Number of classes ``C``.
        variant: ``'nas'`` (default) or ``'simon'``; see :func:`cev_sde`.
        eps: ``None`` (mask zero reference rates) or a positive smoothing constant; see :func:`cev_sde`.
        num_bootstraps: Bootstrap replicates for the confidence intervals (0 disables them).
        confidence_level: Coverage of the percentile interval, in (0, 1).
        seed: Seed of the bootstrap draws (the same seed gives the same intervals).
        warn_masked: Warn (:class:`ZeroRateWarning`) when ``eps=None`` leaves classes out; the count is always
            returned as ``n_masked``.
        validate_args: Check labels and shapes on every update (a device sync); disable for speed once checked.
        kwargs: Passed to :class:`torchmetrics.Metric` (e.g. ``process_group``, ``sync_on_compute``;
            ``dist_sync_on_step=True`` is refused).

    Example:
        >>> import torch
        >>> metric = ClassBias(num_classes=3, eps=1e-6, num_bootstraps=100)
        >>> y = torch.tensor([0, 1, 2, 0, 1, 2])
        >>> metric.update(y, y, torch.tensor([0, 1, 2, 0, 2, 2]))
        >>> sorted(metric.compute())
        ['cev', 'cev_ci_high', 'cev_ci_low', 'n_masked', 'sde', 'sde_ci_high', 'sde_ci_low']
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, num_classes: int, variant: str = 'nas', eps: Optional[float] = None,
                 num_bootstraps: int = 1000, confidence_level: float = 0.95, seed: int = 0, warn_masked: bool = True,
                 validate_args: bool = True, **kwargs: Any):
        if kwargs.get('dist_sync_on_step'):
            raise ValueError(f"dist_sync_on_step={kwargs['dist_sync_on_step']!r} is not supported: ClassBias is "
                             f'computed once over the whole (rank-summed) evaluation set. Fix: leave '
                             f'dist_sync_on_step=False and call compute() at the end.')
        super().__init__(**kwargs)
        self.num_classes = _check_num_classes(num_classes)
        self.variant = _check_variant(variant)
        self.eps = _check_eps(eps)
        if isinstance(num_bootstraps, bool) or not isinstance(num_bootstraps, int) or num_bootstraps < 0 or \
                num_bootstraps == 1:
            raise ValueError(f'num_bootstraps={num_bootstraps!r} is invalid. Fix: use 0 (no intervals) or an int >= 2, '
                             f'e.g. 1000.')
        if isinstance(confidence_level, bool) or not isinstance(confidence_level, (int, float)) or \
                not 0 < confidence_level < 1:
            raise ValueError(f'confidence_level={confidence_level!r} is outside (0, 1). Fix: use e.g. 0.95.')
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f'seed={seed!r} must be an int. Fix: e.g. seed=0.')
        self.num_bootstraps, self.confidence_level, self.seed = num_bootstraps, float(confidence_level), seed
        self.warn_masked, self.validate_args = bool(warn_masked), bool(validate_args)
        self.last_result: Optional[BiasResult] = None
        # The confusion matrices the last compute() used: summed over ranks (the states go back to this rank's
        # own counts once compute() returns).
        self.last_confmats: Optional[tuple[Tensor, Tensor]] = None
        c = self.num_classes
        self.add_state('confmat', torch.zeros(c, c, dtype=torch.long), dist_reduce_fx='sum')
        self.add_state('ref_confmat', torch.zeros(c, c, dtype=torch.long), dist_reduce_fx='sum')
        self.bootstrap_method = 'none'
        if num_bootstraps:
            if c <= _MAX_JOINT_CLASSES:
                self.bootstrap_method = 'cells'
                self.add_state('joint', torch.zeros(c ** 3, dtype=torch.long), dist_reduce_fx='sum')
            else:
                self.bootstrap_method = 'online'
                self.add_state('boot_counts', torch.zeros(num_bootstraps, 2, 3, c, dtype=torch.float64),
                               dist_reduce_fx='sum')
                self.add_state('boot_total', torch.zeros(num_bootstraps, dtype=torch.float64), dist_reduce_fx='sum')
        self._generator: Optional[torch.Generator] = None

    def update(self, target: Tensor, ref_preds: Tensor, preds: Tensor) -> None:  # type: ignore[override]
        """Add a batch: true labels, reference predictions and compared predictions of the same samples."""
        c = self.num_classes
        target, ref_preds, preds = _three_labels(target, ref_preds, preds, c, validate=self.validate_args)
        self.confmat += _confusion(target, preds, c)
        self.ref_confmat += _confusion(target, ref_preds, c)
        if self.bootstrap_method == 'cells':
            cells = (target * c + ref_preds) * c + preds
            self.joint.index_add_(0, cells, torch.ones_like(cells))
        elif self.bootstrap_method == 'online':
            self._update_online(target, ref_preds, preds)

    def forward(self, target: Tensor, ref_preds: Tensor, preds: Tensor) -> dict[str, Tensor]:  # type: ignore[override]
        """Accumulate the batch (as :meth:`update`) and return its own ``{'cev', 'sde', 'n_masked'}``, cheaply.

        torchmetrics' default ``forward`` would reset the states, ``compute()`` the batch and merge back: that
        would run the bootstrap and may warn on every batch, overwrite :attr:`last_result`/:attr:`last_confmats`
        with the batch's values and reset the online bootstrap's generator. Here the batch value comes from the
        batch's two confusion matrices only.
        """
        if self._is_synced:
            raise RuntimeError('ClassBias is synced (inside sync_context or after sync()); forward would mix the '
                               'ranks\' states. Fix: call unsync() first.')
        # The batch's confusion matrices are what update() adds: the labels are checked once, in update().
        confmat, ref_confmat = self.confmat.clone(), self.ref_confmat.clone()
        self.update(target, ref_preds, preds)
        stats = _statistic(_counts_from_confusion(self.confmat - confmat),
                           _counts_from_confusion(self.ref_confmat - ref_confmat), self.variant, self.eps)
        self._forward_cache = {'cev': stats['cev'], 'sde': stats['sde'], 'n_masked': stats['n_masked']}
        return self._forward_cache

    def _update_online(self, target: Tensor, ref_preds: Tensor, preds: Tensor) -> None:
        if self._generator is None or self._generator.device != target.device:
            rank = torch.distributed.get_rank() if torch.distributed.is_available() and \
                torch.distributed.is_initialized() else 0
            self._generator = torch.Generator(device=target.device)
            self._generator.manual_seed(self.seed * 1_000_003 + rank)
        rows = _replicate_rows(self.num_bootstraps, len(target))
        for start in range(0, self.num_bootstraps, rows):
            stop = min(start + rows, self.num_bootstraps)
            ones = torch.ones(stop - start, len(target), dtype=torch.float64, device=target.device)
            weights = torch.poisson(ones, generator=self._generator)
            for model, labels in ((0, preds), (1, ref_preds)):
                tp, fp, fn, _ = _counts_from_weights(weights, target, labels, self.num_classes)
                self.boot_counts[start:stop, model] += torch.stack((tp, fp, fn), dim=1)
            self.boot_total[start:stop] += weights.sum(1)

    def reset(self) -> None:
        super().reset()
        self._generator = None

    def _replicates(self) -> dict[str, Tensor]:
        """CEV and SDE of every bootstrap replicate, shape ``(B,)`` each."""
        c, b = self.num_classes, self.num_bootstraps
        if self.bootstrap_method == 'online':
            counts, total = self.boot_counts, self.boot_total.unsqueeze(-1)

            def four(model: int) -> tuple[Tensor, ...]:
                tp, fp, fn = counts[:, model, 0], counts[:, model, 1], counts[:, model, 2]
                return tp, fp, fn, total - tp - fp - fn

            stats = _statistic(four(0), four(1), self.variant, self.eps)
            return {'cev': stats['cev'], 'sde': stats['sde']}
        cells = torch.nonzero(self.joint).flatten()
        counts = self.joint[cells].double()
        target, ref_preds, preds = cells // (c * c), (cells // c) % c, cells % c
        generator = torch.Generator(device=counts.device)
        generator.manual_seed(self.seed)
        out: dict[str, list[Tensor]] = {'cev': [], 'sde': []}
        rows = _replicate_rows(b, len(cells))
        for start in range(0, b, rows):
            weights = torch.poisson(counts.expand(min(rows, b - start), -1).contiguous(), generator=generator)
            stats = _statistic(_counts_from_weights(weights, target, preds, c),
                               _counts_from_weights(weights, target, ref_preds, c), self.variant, self.eps)
            out['cev'].append(stats['cev'])
            out['sde'].append(stats['sde'])
        return {k: torch.cat(v) for k, v in out.items()}

    def compute(self) -> dict[str, Tensor]:
        """``{'cev', 'sde', 'n_masked'}`` (+ ``{cev,sde}_ci_{low,high}`` with bootstraps), float64 tensors.

        CEV/SDE (and their bounds) are ``nan`` when there is nothing to compare; see :func:`cev_sde`.
        """
        stats = _statistic(_counts_from_confusion(self.confmat), _counts_from_confusion(self.ref_confmat),
                           self.variant, self.eps)
        if self.warn_masked and int(stats['n_masked']):
            _warn_masked(stats, 'ClassBias', stacklevel=4)
        self.last_result = _result(stats, self.variant, self.eps)
        self.last_confmats = (self.confmat.detach().clone(), self.ref_confmat.detach().clone())
        out = {'cev': stats['cev'], 'sde': stats['sde'], 'n_masked': stats['n_masked']}
        if self.bootstrap_method != 'none':
            replicates = self._replicates()
            alpha = (1.0 - self.confidence_level) / 2
            q = torch.tensor([alpha, 1.0 - alpha], dtype=torch.float64, device=replicates['cev'].device)
            for name, values in replicates.items():
                # A replicate with nothing to compare (nan) is left out; all nan (nan statistic): nan bounds.
                low, high = torch.nanquantile(values, q)
                out[f'{name}_ci_low'], out[f'{name}_ci_high'] = low, high
        return out

    def __repr__(self) -> str:
        return (f'ClassBias(num_classes={self.num_classes}, variant={self.variant!r}, eps={self.eps!r}, '
                f'num_bootstraps={self.num_bootstraps}, confidence_level={self.confidence_level}, seed={self.seed}, '
                f'warn_masked={self.warn_masked}, validate_args={self.validate_args})')

