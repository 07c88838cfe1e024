"""A mixture schedule placed on global sample positions: which domain serves position ``g``.

Which domain serves global sample position ``g`` is a pure function of ``(seed, g)`` and the schedule placed on
sample positions, so every rank, every dataloader worker and every resumed run agrees on it without
communication. Domain choices are *stratified* by default (a low-discrepancy sequence through the inverse CDF
of the weights), so the achieved per-domain fractions track the schedule to a few samples over any window
instead of drifting like independent draws would.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from composer_ext.domain_upsampling.schedule import MixtureSchedule, ramp_alpha, whole_batches

__all__ = ['SAMPLING', 'SamplePlan']

SAMPLING = ('stratified', 'random')

_PHI = np.uint64(0x9E3779B97F4A7C15)  # 2^64 / golden ratio: the Weyl step of a low-discrepancy sequence
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    z = x + _PHI
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def _unit_floats(bits: np.ndarray) -> np.ndarray:
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


class SamplePlan:
    """A schedule placed on global sample positions: which domain serves position ``g`` (pure in seed, g).

    :class:`~composer_ext.domain_upsampling.mixture.MixtureDataset` builds it (``dataset.plan``) from arguments it
    has checked; the algorithm and the tests read it (``start_sample``, :meth:`alpha`, :meth:`expected_draws`).

    Args:
        schedule: A resolved schedule (``start`` and ``ramp_duration`` in ``dur``).
        domains: The dataset's domain order; :meth:`assign` returns indices into it.
        total_samples: Global samples in the run the schedule is placed on.
        samples_per_batch: The global batch size (the switch lands on a batch boundary), or None.
        seed: Seed of the domain choices.
        sampling: ``'stratified'`` or ``'random'`` (see :data:`SAMPLING`).
    """

    def __init__(self, schedule: MixtureSchedule, domains: Sequence[str], total_samples: int,
                 samples_per_batch: Optional[int], seed: int, sampling: str):
        if not schedule.is_resolved:
            raise ValueError(f'{schedule!r} is not resolved to fractions of training.')
        start, ramp = schedule.fractions()
        self.schedule = schedule
        self.total_samples = int(total_samples)
        unit = samples_per_batch or 1
        # Switch on a batch boundary, so every step is entirely before or after a 'step' switch; like Composer's
        # own 'dur' conversion (which places LR milestones), round down unless within float error of a batch.
        self.start_sample = whole_batches(start * (self.total_samples // unit)) * unit
        self.ramp_samples = 0 if schedule.ramp == 'step' else int(round(ramp * self.total_samples))
        self.base = np.array([schedule.base.get(d, 0.0) for d in domains], dtype=np.float64)
        self.target = np.array([schedule.target.get(d, 0.0) for d in domains], dtype=np.float64)
        self.ramp = schedule.ramp
        self.sampling = sampling
        seed_bits = _splitmix64(np.array([seed], dtype=np.uint64))
        self._offset = seed_bits[0]
        self._seed_bits = _splitmix64(seed_bits)[0]
        self.key = (repr(schedule), self.total_samples, self.start_sample, self.ramp_samples, tuple(domains), seed,
                    sampling)

    def alpha(self, positions: np.ndarray) -> np.ndarray:
        return ramp_alpha(positions.astype(np.float64), float(self.start_sample), float(self.ramp_samples), self.ramp)

    def weights(self, positions: np.ndarray) -> np.ndarray:
        alpha = self.alpha(positions)[:, None]
        return (1.0 - alpha) * self.base[None, :] + alpha * self.target[None, :]

    def uniforms(self, positions: np.ndarray) -> np.ndarray:
        g = positions.astype(np.uint64)
        if self.sampling == 'stratified':
            return _unit_floats(self._offset + g * _PHI)
        return _unit_floats(_splitmix64(g ^ self._seed_bits))

    def assign(self, positions: np.ndarray) -> np.ndarray:
        """The domain index (into the dataset's domain order) serving each global position."""
        cumulative = np.cumsum(self.weights(positions), axis=1)
        cumulative /= cumulative[:, -1:]  # the last edge is exactly 1.0, so a zero-weight tail is never drawn
        return (cumulative[:, :-1] <= self.uniforms(positions)[:, None]).sum(axis=1)

    def expected_draws(self, begin: int, end: int, points: int = 4097) -> np.ndarray:
        """Expected draws per domain over positions [begin, end) (a projection; exact for a step switch)."""
        if end <= begin:
            return np.zeros_like(self.base)
        if self.ramp == 'step' or self.ramp_samples <= 0:
            after = max(0, end - max(begin, self.start_sample))
            return self.base * (end - begin - after) + self.target * after
        grid = np.linspace(begin, end, points)
        alpha = self.alpha(grid)
        # The trapezoid rule by hand: np.trapezoid is numpy >= 2 only, and np.trapz is deprecated there.
        mean_alpha = float(np.sum((alpha[1:] + alpha[:-1]) * np.diff(grid)) / 2 / (end - begin))
        return (self.base * (1.0 - mean_alpha) + self.target * mean_alpha) * (end - begin)

