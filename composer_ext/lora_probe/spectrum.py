"""The spectrum of a weight update ΔW: rank for a share of the energy, effective rank, spectral and Frobenius norms.

"LoRA Learns Less and Forgets Less" (Biderman et al. 2024) measures how high-rank a finetuning update is by
the number of singular values needed to explain 90% of its energy (the squared singular values): full
finetuning learns updates 10-100x higher-rank than typical LoRA configurations. :func:`delta_w_spectrum`
computes that, and the entropy-based effective rank of Roy & Vetterli (2007), for one matrix.

A low-rank update can be passed in factored form ``(left, right)`` (ΔW = left @ right, e.g. ``(s·B, A)`` of a
LoRA adapter): its singular values are then computed from two thin QR factorisations and a k×k SVD, exactly
and in O((m + n)·k²) instead of O(m·n·min(m, n)), and without materialising ΔW.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

__all__ = ['DeltaWSpectrum', 'check_energy', 'delta_w_spectrum', 'singular_values', 'spectrum_from_singular_values']

MatrixLike = Union[torch.Tensor, np.ndarray]


@dataclass(frozen=True)
class DeltaWSpectrum:
    """Spectral statistics of one update matrix (also readable as a mapping: ``spectrum['rank_at_energy']``).

    Attributes:
        rank_at_energy: The fewest singular values whose squares hold at least ``energy`` of ``sum(σ²)``
            (0 for a zero matrix).
        effective_rank: ``exp(H(p))`` with ``p_i = σ_i / sum(σ)`` (Roy & Vetterli 2007; 0 for a zero matrix).
        spectral_norm: The largest singular value.
        frobenius_norm: ``sqrt(sum(σ²))``.
        stable_rank: ``frobenius_norm² / spectral_norm²`` (0 for a zero matrix).
        energy: The energy share used for ``rank_at_energy``.
        shape: The matrix shape ``(rows, columns)``.
    """

    rank_at_energy: int
    effective_rank: float
    spectral_norm: float
    frobenius_norm: float
    stable_rank: float
    energy: float
    shape: tuple

    def __getitem__(self, key: str) -> Any:
        return asdict(self)[key]

    def as_dict(self) -> dict[str, Any]:
        """The statistics as a plain dict (JSON-friendly: ``shape`` becomes a list)."""
        values = asdict(self)
        values['shape'] = list(self.shape)
        return values


def check_energy(energy: Any) -> float:
    """``energy`` (the share of the squared singular values ``rank_at_energy`` must explain) as a float in (0, 1].

    Raises:
        ValueError: outside (0, 1] or not a number.
    """
    if isinstance(energy, bool) or not isinstance(energy, (int, float)) or not 0.0 < float(energy) <= 1.0:
        raise ValueError(f'energy={energy!r} is outside (0, 1]. Fix: pass the share of the squared singular values '
                         f'to explain, e.g. energy=0.9.')
    return float(energy)


def _as_tensor(value: Any, name: str) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f'{name} is a {type(value).__name__}. Fix: pass a torch.Tensor or numpy.ndarray matrix, or a '
                        f'(left, right) tuple of them for a factored update left @ right.')
    if value.dim() < 2:
        raise ValueError(f'{name} has shape {tuple(value.shape)}. Fix: pass a matrix (2 or more dimensions; '
                         f'convolution kernels (out, in, kh, kw) are read as (out, in*kh*kw)).')
    if not (value.is_floating_point() or value.is_complex()):
        value = value.double()
    # A conv kernel (out, in, kh, kw) is the matrix (out, in*kh*kw), as LoRA for convolutions sees it.
    return value.reshape(value.shape[0], -1)


def singular_values(delta: Union[MatrixLike, tuple], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The singular values (descending) of ``delta``, or of ``left @ right`` for a pair ``(left, right)``.

    Args:
        delta: A matrix, or a ``(left, right)`` tuple with ``left`` of shape (m, k) and ``right`` of shape (k, n).
        dtype: The floating dtype of the computation (float32 by default; float64 for reference values).

    Returns:
        torch.Tensor: ``min(m, n)`` values for a matrix, ``min(m, n, k)`` for a factored pair (the others are 0),
        on the input's device. Non-finite input gives NaNs.
    """
    if isinstance(delta, tuple):
        if len(delta) != 2:
            raise ValueError(f'delta is a tuple of {len(delta)} items. Fix: pass one matrix or a (left, right) pair.')
        left, right = _as_tensor(delta[0], 'delta[0] (left)'), _as_tensor(delta[1], 'delta[1] (right)')
        if left.shape[1] != right.shape[0]:
            raise ValueError(f'left has shape {tuple(left.shape)} and right {tuple(right.shape)}: the inner sizes '
                             f'differ. '
                             f'Fix: pass left (m, k) and right (k, n) with ΔW = left @ right.')
        left, right = left.to(dtype), right.to(device=left.device, dtype=dtype)
        if not (torch.isfinite(left).all() and torch.isfinite(right).all()):
            return torch.full((min(left.shape[0], right.shape[1], left.shape[1]),), float('nan'), dtype=dtype,
                              device=left.device)
        if left.shape[1] >= min(left.shape[0], right.shape[1]):  # not thin: the product is as cheap
            return torch.linalg.svdvals(left @ right)
        # left = Q1 R1, rightᵀ = Q2 R2  =>  left @ right = Q1 (R1 R2ᵀ) Q2ᵀ, with orthonormal Q1, Q2.
        r_left = torch.linalg.qr(left, mode='r').R
        r_right = torch.linalg.qr(right.T, mode='r').R
        return torch.linalg.svdvals(r_left @ r_right.T)
    matrix = _as_tensor(delta, 'delta').to(dtype)
    if not torch.isfinite(matrix).all():
        return torch.full((min(matrix.shape),), float('nan'), dtype=dtype, device=matrix.device)
    return torch.linalg.svdvals(matrix)


def spectrum_from_singular_values(values: MatrixLike, energy: float = 0.9, shape: Sequence[int] = (),
                                  rtol: Optional[float] = None) -> DeltaWSpectrum:
    """The :class:`DeltaWSpectrum` of a matrix with singular values ``values`` (any order).

    Args:
        values: Non-negative singular values.
        energy: Share of ``sum(σ²)`` that ``rank_at_energy`` must reach, in (0, 1].
        shape: The matrix shape, recorded in the result.
        rtol: Singular values at most ``rtol * max(σ)`` are rounding noise and count as zero (as in
            ``numpy.linalg.matrix_rank``). Default: ``max(shape) * eps`` of ``values``' dtype.
    """
    energy = check_energy(energy)
    values = torch.as_tensor(values).detach()
    if rtol is None:
        eps = torch.finfo(values.dtype).eps if values.is_floating_point() else np.finfo(np.float64).eps
        rtol = max([*shape, values.numel(), 1]) * eps
    sigma = np.sort(np.abs(np.asarray(values.cpu().double(), dtype=np.float64)))[::-1]
    shape = tuple(int(s) for s in shape)
    if sigma.size == 0 or not np.all(np.isfinite(sigma)):
        nan = float('nan') if sigma.size else 0.0
        return DeltaWSpectrum(rank_at_energy=0 if not sigma.size else -1, effective_rank=nan, spectral_norm=nan,
                              frobenius_norm=nan, stable_rank=nan, energy=energy, shape=shape)
    sigma = np.where(sigma > rtol * sigma[0], sigma, 0.0)
    squares = sigma**2
    total = float(squares.sum())
    if total == 0.0:
        return DeltaWSpectrum(0, 0.0, 0.0, 0.0, 0.0, energy, shape)
    cumulative = np.cumsum(squares) / total
    # Rounding can leave the last cumulative share a hair below 1.0; never ask for more than the rank.
    tolerance = 8 * np.finfo(np.float64).eps * sigma.size
    rank = int(np.searchsorted(cumulative, energy - tolerance, side='left')) + 1
    rank = min(rank, int(np.count_nonzero(sigma)))
    p = sigma / sigma.sum()
    p = p[p > 0]
    effective_rank = float(math.exp(-float(np.sum(p * np.log(p)))))
    spectral = float(sigma[0])
    frobenius = math.sqrt(total)
    return DeltaWSpectrum(rank_at_energy=rank, effective_rank=effective_rank, spectral_norm=spectral,
                          frobenius_norm=frobenius, stable_rank=total / spectral**2, energy=energy, shape=shape)


def delta_w_spectrum(delta: Union[MatrixLike, tuple], energy: float = 0.9,
                     dtype: torch.dtype = torch.float32) -> DeltaWSpectrum:
    """Rank at ``energy``, effective rank, spectral and Frobenius norms of one update matrix ΔW.

    Args:
        delta: ΔW as a matrix (``torch.Tensor`` or ``numpy.ndarray``; a conv kernel is read as
            ``(out, in*kh*kw)``), or a factored ``(left, right)`` pair with ΔW = left @ right.
        energy: Share of the squared singular values that ``rank_at_energy`` must explain, in (0, 1].
        dtype: Computation dtype (float32 by default; the singular values are computed on ``delta``'s device).

    Returns:
        DeltaWSpectrum: ``rank_at_energy``, ``effective_rank``, ``spectral_norm``, ``frobenius_norm`` (plus
        ``stable_rank``, ``energy`` and ``shape``). A matrix with NaN/inf gives NaN statistics and
        ``rank_at_energy=-1`` instead of raising, so a diverged run can still be logged.

    Example:
        .. code-block:: python

            import torch
            from composer_ext.metrics import delta_w_spectrum

            u, _ = torch.linalg.qr(torch.randn(64, 8))
            v, _ = torch.linalg.qr(torch.randn(32, 8))
            delta = u @ torch.diag(torch.tensor([8., 4., 2., 1., .5, .2, .1, .1])) @ v.T
            spectrum = delta_w_spectrum(delta, energy=0.9)
            assert spectrum.rank_at_energy == 2   # σ² = 64, 16, 4, ...: 64/85.3 = 75% < 90% <= 80/85.3 = 94%
    """
    energy = check_energy(energy)
    if isinstance(delta, tuple):
        shape = (_as_tensor(delta[0], 'delta[0] (left)').shape[0], _as_tensor(delta[1], 'delta[1] (right)').shape[1]) \
            if len(delta) == 2 else ()
    else:
        shape = tuple(_as_tensor(delta, 'delta').shape)
    with torch.no_grad():
        values = singular_values(delta, dtype=dtype)
    return spectrum_from_singular_values(values, energy=energy, shape=shape)
