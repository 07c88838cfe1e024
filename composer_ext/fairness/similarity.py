"""How similar two models are on the same inputs: prediction agreement, churn, output KL and linear CKA.

Prediction-level measures compare the two models' outputs sample by sample:

* :func:`top1_agreement`: the fraction of inputs on which both models predict the same class;
* :func:`churn`: the fraction on which the prediction changed (Milani Fard et al. 2016), ``1 - agreement``;
* :func:`negative_flip_rate`: the fraction the reference got right and the model gets wrong (Yan et al. 2021);
* :func:`output_kl`: the mean ``KL(p_ref || p_model)`` of the softmax outputs, in nats.

Representation-level similarity is linear CKA (Kornblith et al. 2019) of two layers' activations. The metric
form uses the unbiased minibatch estimator of Nguyen, Raghu & Kornblith (2021): per minibatch the unbiased
HSIC estimator (Song et al. 2012) of the linear kernels, summed over minibatches (and ranks), then
``CKA = Σ HSIC(X, Y) / sqrt(Σ HSIC(X, X) · Σ HSIC(Y, Y))``. It is 1 for a model against itself and invariant
to orthogonal transforms and isotropic scaling of either representation. Activations of any shape are
flattened per sample, centred per minibatch (HSIC does not change) and multiplied in float64.

The denominator rule: with both self-HSIC sums positive, CKA is the formula above; a representation with no
variation at all (self-HSIC exactly 0, e.g. a layer pruned to zero) gives 0; a negative self-HSIC sum (the
unbiased estimator of a non-negative quantity came out negative: too few or too small minibatches) or no usable
minibatch at all (every one had fewer than 4 samples and was skipped) gives ``nan``, not a number in [-1, 1] that
means nothing.

Every function has a torchmetrics twin that streams over batches and reduces over DDP ranks: :class:`Agreement`,
:class:`Churn`, :class:`NegativeFlipRate`, :class:`OutputKL`, :class:`LinearCKA`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

__all__ = ['Agreement', 'Churn', 'LinearCKA', 'NegativeFlipRate', 'OutputKL', 'churn', 'hsic', 'linear_cka',
           'negative_flip_rate', 'output_kl', 'top1_agreement']


def _tensor(x: Any, name: str) -> Tensor:
    if isinstance(x, Tensor):
        return x
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    raise TypeError(f'{name} is a {type(x).__name__}; expected a torch.Tensor. Fix: pass torch.as_tensor({name}).')


def _labels(x: Any, name: str) -> Tensor:
    """Class indices ``(N,)`` from indices or scores ``(N, C)``."""
    x = _tensor(x, name)
    if x.ndim == 2:
        return x.argmax(dim=1)
    if x.ndim != 1:
        raise ValueError(f'{name} has shape {tuple(x.shape)}. Fix: pass class indices (N,) or scores (N, C).')
    if x.is_floating_point() or x.dtype == torch.bool:
        raise TypeError(f'{name} is a 1-D {x.dtype} tensor; class indices must be integers. Fix: pass {name}.long() '
                        f'or scores of shape (N, C).')
    return x


def _same_samples(**tensors: Tensor) -> None:
    sizes = {name: len(t) for name, t in tensors.items()}
    if len(set(sizes.values())) > 1:
        listed = ', '.join(f'{name} has {n}' for name, n in sizes.items())
        raise ValueError(f'the inputs must describe the same samples, but {listed} samples. Fix: evaluate both '
                         f'models on the same batch.')
    scored = [(name, t.shape[1]) for name, t in tensors.items() if t.ndim == 2]
    if len({c for _, c in scored}) > 1:
        raise ValueError(f'the score tensors have different numbers of classes ({dict(scored)}). Fix: compare models '
                         f'with the same output classes.')


def _pair_labels(ref_preds: Any, preds: Any) -> tuple[Tensor, Tensor]:
    ref_preds, preds = _tensor(ref_preds, 'ref_preds'), _tensor(preds, 'preds')
    _same_samples(ref_preds=ref_preds, preds=preds)
    return _labels(ref_preds, 'ref_preds'), _labels(preds, 'preds')


# Per-sample hits of the prediction-level measures, arguments checked: the functions average them, the metrics
# sum them over batches and ranks.


def _agreements(ref_preds: Any, preds: Any) -> Tensor:
    ref_preds, preds = _pair_labels(ref_preds, preds)
    return ref_preds == preds


def _negative_flips(target: Any, ref_preds: Any, preds: Any) -> Tensor:
    target = _labels(_tensor(target, 'target'), 'target')
    ref_preds, preds = _pair_labels(ref_preds, preds)
    _same_samples(target=target, preds=preds)
    return (ref_preds == target) & (preds != target)


def _fraction(hits: Tensor) -> Tensor:
    return hits.double().mean() if len(hits) else torch.tensor(float('nan'), dtype=torch.float64)


def top1_agreement(ref_preds: Tensor, preds: Tensor) -> Tensor:
    """Fraction of samples on which the two models' top-1 predictions agree.

    Args:
        ref_preds: Reference predictions: class indices ``(N,)`` or scores ``(N, C)``.
        preds: Compared predictions, same forms.

    Example:
        >>> import torch
        >>> float(top1_agreement(torch.tensor([0, 1, 2, 2]), torch.tensor([0, 1, 1, 2])))
        0.75
    """
    return _fraction(_agreements(ref_preds, preds))


def churn(ref_preds: Tensor, preds: Tensor) -> Tensor:
    """Fraction of samples whose top-1 prediction changed from the reference (``1 - top1_agreement``).

    Example:
        >>> import torch
        >>> float(churn(torch.tensor([0, 1, 2, 2]), torch.tensor([0, 1, 1, 2])))
        0.25
    """
    return 1.0 - top1_agreement(ref_preds, preds)


def negative_flip_rate(target: Tensor, ref_preds: Tensor, preds: Tensor) -> Tensor:
    """Fraction of samples the reference classifies correctly and the compared model does not.

    Example:
        >>> import torch
        >>> y = torch.tensor([0, 1, 2, 2])
        >>> float(negative_flip_rate(y, torch.tensor([0, 1, 2, 0]), torch.tensor([0, 2, 2, 2])))
        0.25
    """
    return _fraction(_negative_flips(target, ref_preds, preds))


def _check_temperature(temperature: Any) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0 or \
            not math.isfinite(temperature):
        raise ValueError(f'temperature={temperature!r} is invalid. Fix: use a positive number, e.g. 1.0.')
    return float(temperature)


def _kl_terms(ref_logits: Any, logits: Any, temperature: float) -> Tensor:
    ref_logits, logits = _tensor(ref_logits, 'ref_logits'), _tensor(logits, 'logits')
    if ref_logits.ndim != 2 or ref_logits.shape != logits.shape:
        raise ValueError(f'ref_logits {tuple(ref_logits.shape)} and logits {tuple(logits.shape)} must both be (N, C) '
                         f'logits of the same shape. Fix: pass both models\' raw outputs on the same batch.')
    log_ref = F.log_softmax(ref_logits.double() / temperature, dim=1)
    log_model = F.log_softmax(logits.double() / temperature, dim=1)
    return (log_ref.exp() * (log_ref - log_model)).sum(dim=1)


def output_kl(ref_logits: Tensor, logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Mean over samples of ``KL(softmax(ref_logits / T) || softmax(logits / T))``, in nats.

    Args:
        ref_logits: Reference logits ``(N, C)``.
        logits: Compared logits ``(N, C)``.
        temperature: Softmax temperature ``T``.

    Example:
        >>> import torch
        >>> float(output_kl(torch.zeros(2, 3), torch.zeros(2, 3)))
        0.0
    """
    return _kl_terms(ref_logits, logits, _check_temperature(temperature)).mean()


def _check_unbiased(unbiased: Any) -> bool:
    if not isinstance(unbiased, bool):
        raise TypeError(f'unbiased={unbiased!r} must be a bool. Fix: unbiased=True (default) or False.')
    return unbiased


def _features(x: Any, name: str) -> Tensor:
    x = _tensor(x, name)
    if x.ndim < 2:
        raise ValueError(f'{name} has shape {tuple(x.shape)}. Fix: pass activations (N, ...) with one row per sample.')
    x = x.reshape(x.shape[0], -1)
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) or not x.is_floating_point() else x


def _gram(x: Tensor) -> Tensor:
    """The linear kernel ``x xᵀ`` of the per-batch centred features, in float64.

    float64 before the product: a float32 Gram matrix of wide activations loses the digits that the unbiased
    estimator's differences of large sums depend on. Centring leaves every HSIC estimator unchanged (it only
    adds terms that the estimators cancel) and makes a constant column exactly 0 instead of float rounding noise
    of either sign, so a representation with no variation has self-HSIC exactly 0.
    """
    x = x.double()
    centred = x - x.mean(0, keepdim=True)
    # The mean of equal values can differ from them in the last bit: such columns are constant, make them exactly 0.
    constant = centred.abs().amax(0) <= 1e-12 * x.abs().amax(0)
    centred[:, constant] = 0.0
    return centred @ centred.T


def hsic(k: Tensor, l: Tensor, unbiased: bool = True) -> Tensor:
    """HSIC of two ``(n, n)`` kernel matrices: the unbiased estimator (Song et al. 2012; needs n >= 4), or the
    biased ``tr(KHLH) / (n-1)²``.

    A value within rounding of 0 (below 1e-10 of ``||K||_F ||L||_F``, the size of the sums it is the difference
    of) is returned as exactly 0, so that the sign of rounding noise cannot decide between CKA's 0 and nan.
    """
    n = k.shape[0]
    if unbiased:
        if n < 4:
            raise ValueError(f'the unbiased HSIC estimator needs at least 4 samples, got n={n}. Fix: use larger '
                             f'batches, or unbiased=False.')
        k = k - torch.diag_embed(k.diagonal())
        l = l - torch.diag_embed(l.diagonal())
        k_rows, l_rows = k.sum(0), l.sum(0)
        value = (k * l).sum() + k_rows.sum() * l_rows.sum() / ((n - 1) * (n - 2)) - 2.0 * (k_rows @ l_rows) / (n - 2)
        denominator = n * (n - 3)
    else:
        centre = torch.eye(n, dtype=k.dtype, device=k.device) - 1.0 / n
        value = ((centre @ k @ centre) * l).sum()
        denominator = (n - 1) ** 2
    scale = (k * k).sum().sqrt() * (l * l).sum().sqrt()
    value = torch.where(value.abs() <= 1e-10 * scale, torch.zeros_like(value), value)
    return value / denominator


def _hsic_terms(x: Tensor, y: Tensor, unbiased: bool) -> tuple[Tensor, Tensor, Tensor]:
    k, l = _gram(x), _gram(y)
    return hsic(k, l, unbiased), hsic(k, k, unbiased), hsic(l, l, unbiased)


def _cka(xy: Tensor, xx: Tensor, yy: Tensor) -> Tensor:
    """CKA from (summed) HSIC estimates, with the denominator rule of the module docstring."""
    positive = (xx > 0) & (yy > 0)
    value = xy / (xx.clamp_min(1e-300).sqrt() * yy.clamp_min(1e-300).sqrt())
    # A constant representation (e.g. a layer pruned to zero) has no similarity structure: 0, not nan. Two negative
    # estimates would give a positive product and a number that looks like a CKA: nan instead.
    no_variation = ((xx == 0) & (yy >= 0)) | ((yy == 0) & (xx >= 0))
    return torch.where(positive, value, torch.where(no_variation, torch.zeros_like(xy),
                                                    torch.full_like(xy, float('nan'))))


def _pair_features(x: Any, y: Any) -> tuple[Tensor, Tensor]:
    x, y = _features(x, 'x'), _features(y, 'y')
    if x.shape[0] != y.shape[0]:
        raise ValueError(f'x has {x.shape[0]} samples and y has {y.shape[0]}. Fix: pass both models\' activations on '
                         f'the same inputs.')
    return x, y.to(x.dtype) if y.dtype != x.dtype else y


def linear_cka(x: Tensor, y: Tensor, unbiased: bool = True) -> Tensor:
    """Linear CKA of two representations of the same ``n`` inputs (``(n, ...)`` each, flattened per sample).

    Args:
        x: Activations of the first model/layer.
        y: Activations of the second model/layer (any width).
        unbiased: Use the unbiased HSIC estimator (default; needs n >= 4) or the biased one (the classic CKA).

    Example:
        >>> import torch
        >>> x = torch.randn(32, 8)
        >>> round(float(linear_cka(x, 3.0 * x)), 6)
        1.0
    """
    unbiased = _check_unbiased(unbiased)
    x, y = _pair_features(x, y)
    return _cka(*_hsic_terms(x, y, unbiased))


# --- torchmetrics twins -----------------------------------------------------------------------------------


class _FractionMetric(Metric):
    is_differentiable = False
    full_state_update = False

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.add_state('hits', torch.zeros((), dtype=torch.float64), dist_reduce_fx='sum')
        self.add_state('total', torch.zeros((), dtype=torch.float64), dist_reduce_fx='sum')

    def _add(self, hits: Tensor) -> None:
        self.hits += hits.sum()
        self.total += len(hits)

    def compute(self) -> Tensor:
        return self.hits / self.total if self.total > 0 else torch.tensor(float('nan'), dtype=torch.float64)

    def __repr__(self) -> str:
        return f'{type(self).__name__}()'


# Agreement and Churn are deliberate twins (churn = 1 - agreement): each is its own metric, with its own
# higher_is_better, so that a Trainer logs and compares it the right way round.
class Agreement(_FractionMetric):
    """Streaming :func:`top1_agreement`: ``update(ref_preds, preds)``.

    Example:
        >>> import torch
        >>> metric = Agreement()
        >>> metric.update(torch.tensor([0, 1]), torch.tensor([0, 2]))
        >>> float(metric.compute())
        0.5
    """

    higher_is_better = True

    def update(self, ref_preds: Tensor, preds: Tensor) -> None:  # type: ignore[override]
        self._add(_agreements(ref_preds, preds))


# The deliberate twin of Agreement (see there).
class Churn(_FractionMetric):
    """Streaming :func:`churn`: ``update(ref_preds, preds)``.

    Example:
        >>> import torch
        >>> metric = Churn()
        >>> metric.update(torch.tensor([0, 1]), torch.tensor([0, 2]))
        >>> float(metric.compute())
        0.5
    """

    higher_is_better = False

    def update(self, ref_preds: Tensor, preds: Tensor) -> None:  # type: ignore[override]
        self._add(~_agreements(ref_preds, preds))


class NegativeFlipRate(_FractionMetric):
    """Streaming :func:`negative_flip_rate`: ``update(target, ref_preds, preds)``.

    Example:
        >>> import torch
        >>> metric = NegativeFlipRate()
        >>> metric.update(torch.tensor([0, 1]), torch.tensor([0, 1]), torch.tensor([0, 2]))
        >>> float(metric.compute())
        0.5
    """

    higher_is_better = False

    def update(self, target: Tensor, ref_preds: Tensor, preds: Tensor) -> None:  # type: ignore[override]
        self._add(_negative_flips(target, ref_preds, preds))


class OutputKL(Metric):
    """Streaming :func:`output_kl`: ``update(ref_logits, logits)``; mean ``KL(p_ref || p_model)`` in nats.

    Args:
        temperature: Softmax temperature.

    Example:
        >>> import torch
        >>> metric = OutputKL()
        >>> metric.update(torch.zeros(4, 3), torch.zeros(4, 3))
        >>> float(metric.compute())
        0.0
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, temperature: float = 1.0, **kwargs: Any):
        super().__init__(**kwargs)
        self.temperature = _check_temperature(temperature)
        self.add_state('kl_sum', torch.zeros((), dtype=torch.float64), dist_reduce_fx='sum')
        self.add_state('total', torch.zeros((), dtype=torch.float64), dist_reduce_fx='sum')

    def update(self, ref_logits: Tensor, logits: Tensor) -> None:  # type: ignore[override]
        terms = _kl_terms(ref_logits, logits, self.temperature)
        self.kl_sum += terms.sum()
        self.total += terms.numel()

    def compute(self) -> Tensor:
        return self.kl_sum / self.total if self.total > 0 else torch.tensor(float('nan'), dtype=torch.float64)

    def __repr__(self) -> str:
        return f'OutputKL(temperature={self.temperature})'


class LinearCKA(Metric):
    """Linear CKA accumulated over minibatches (and ranks) with the unbiased minibatch estimator.

    ``update(x, y)`` takes two representations of the same minibatch (``(n, ...)`` each, n >= 4 for the
    unbiased estimator, n >= 2 for the biased one; smaller batches are skipped and counted in the summed state
    ``skipped_batches``, used ones in ``batches``); ``compute()`` returns
    ``Σ HSIC(X_i, Y_i) / sqrt(Σ HSIC(X_i, X_i) · Σ HSIC(Y_i, Y_i))`` with the module's denominator rule: 0 for a
    representation without variation, ``nan`` for a negative self-HSIC sum or when every batch was skipped.
    :attr:`last_skipped_batches` is the count over all ranks at the last ``compute()``. Gram matrices are
    ``n x n``, so the cost per batch is O(n² d) whatever the layer width. The value depends on the batch size
    (smaller batches give a noisier but still unbiased HSIC estimate), not on how batches are spread over ranks.

    Args:
        unbiased: Unbiased HSIC (default) or the biased estimator.

    Example:
        >>> import torch
        >>> metric = LinearCKA()
        >>> x = torch.randn(16, 5)
        >>> metric.update(x, 2 * x)
        >>> round(float(metric.compute()), 6)
        1.0
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, unbiased: bool = True, **kwargs: Any):
        super().__init__(**kwargs)
        self.unbiased = _check_unbiased(unbiased)
        for name in ('hsic_xy', 'hsic_xx', 'hsic_yy'):
            self.add_state(name, torch.zeros((), dtype=torch.float64), dist_reduce_fx='sum')
        # Summed over ranks like the HSIC sums, so that compute() knows whether any rank had a usable batch.
        self.add_state('batches', torch.zeros((), dtype=torch.long), dist_reduce_fx='sum')
        self.add_state('skipped_batches', torch.zeros((), dtype=torch.long), dist_reduce_fx='sum')
        self.last_skipped_batches = 0

    def update(self, x: Tensor, y: Tensor) -> None:  # type: ignore[override]
        x, y = _pair_features(x, y)
        if x.shape[0] < (4 if self.unbiased else 2):
            self.skipped_batches += 1
            return
        xy, xx, yy = _hsic_terms(x, y, self.unbiased)
        self.hsic_xy += xy
        self.hsic_xx += xx
        self.hsic_yy += yy
        self.batches += 1

    def compute(self) -> Tensor:
        self.last_skipped_batches = int(self.skipped_batches)
        if int(self.batches) == 0:
            return torch.full_like(self.hsic_xy, float('nan'))
        return _cka(self.hsic_xy, self.hsic_xx, self.hsic_yy)

    def __repr__(self) -> str:
        return f'LinearCKA(unbiased={self.unbiased})'

