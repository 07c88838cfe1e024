"""The perplexity bands of *Perplexed by Perplexity* (Ankner et al. 2024): which scored samples to keep.

At a selection rate ``keep``, over the ``n`` scored samples, every band keeps exactly ``k = round(keep * n)``
samples (Python's ``round``: a half rounds to even, e.g. ``keep=0.25`` of 10 keeps 2):

- ``low``: the ``k`` lowest-perplexity samples (ranks ``0 .. k-1`` in ascending score order);
- ``medium``: the middle ``k``: ranks ``(n - k) // 2 .. (n - k) // 2 + k - 1`` (when ``n - k`` is odd the band
  sits one rank nearer the low end);
- ``high``: the ``k`` highest-perplexity samples (ranks ``n-k .. n-1``);
- ``random``: ``k`` samples drawn uniformly (the baseline).

Samples whose score equals a band edge are tied: the band keeps as many of them as it has room for, chosen
by a seeded random order (``seed``), never by their position in the data. So the ids kept are a deterministic
function of ``(scores, band, keep, seed)`` (and ``domains``), and the same seed gives the same selection;
without ties the seed changes nothing but the ``random`` band. (The paper's percentile rule, ``score <=
numpy.percentile(scores, 100 * keep)`` for ``low``, keeps every tied sample and so more than the asked share:
ten equal scores at ``keep=0.5`` would all be kept.) Samples without a score (NaN: excluded because they
trained the reference model, or too short) are never chosen. With ``domains`` each domain keeps
``round(keep * n_domain)`` of its own ``n_domain`` scored samples, ranked within the domain, so pruning keeps
the domain mix.

This is the functional core: plain arrays in, sorted sample ids out. :mod:`.selection` applies it to a score
index and writes the selection directory.
"""

from __future__ import annotations

import difflib
from typing import Any, Optional, Sequence

import numpy as np

from composer_ext.perplexity_pruning.score_index import ScoreIndex

__all__ = ['BANDS', 'band_bounds', 'select_band']

BANDS = ('low', 'medium', 'high', 'random')


def _check_keep(keep: Any) -> float:
    if isinstance(keep, bool) or not isinstance(keep, (int, float, np.floating, np.integer)) or \
            not 0.0 < float(keep) <= 1.0:
        raise ValueError(f'keep={keep!r} is outside (0, 1]. Fix: pass the share of samples to keep, e.g. keep=0.5 '
                         f'(the paper\'s selection rate).')
    return float(keep)


def _check_band(band: Any) -> str:
    if band not in BANDS:
        close = difflib.get_close_matches(str(band), BANDS, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ''
        raise ValueError(f'band={band!r} is not a band.{hint} Fix: use one of {", ".join(BANDS)} (low = lowest '
                         f'perplexity, high = highest, medium = centred on the median, random = baseline).')
    return band


def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f'seed={seed!r} is not an int. Fix: pass an int seed, e.g. seed=0.')
    return int(seed)


def _band_ranks(n: int, band: str, keep: float) -> tuple[int, int]:
    """``[start, stop)``: the ranks (ascending score order) of ``band`` among ``n`` scored samples."""
    count = int(round(keep * n))
    if band == 'low':
        return 0, count
    if band == 'high':
        return n - count, n
    start = (n - count) // 2
    return start, start + count


def band_bounds(values: np.ndarray, band: str, keep: float) -> tuple[float, float]:
    """The inclusive score interval ``[low, high]`` that :func:`select_band` keeps from ``values`` (NaN ignored).

    The scores at the band's edge ranks (see the module docstring); ``-inf`` / ``inf`` on the open side of
    ``low`` / ``high``. Every kept sample lies inside it, every sample strictly outside is dropped, and samples
    scoring exactly an edge value may be either (ties). ``(nan, nan)`` when the band keeps no sample.

    Raises:
        ValueError: an unknown band, ``keep`` outside (0, 1], or ``band='random'`` (which has no interval).
    """
    band, keep = _check_band(band), _check_keep(keep)
    if band == 'random':
        raise ValueError("band='random' has no score interval. Fix: use select_band for random selection.")
    values = np.asarray(values, dtype=np.float64)
    ordered = np.sort(values[~np.isnan(values)])
    start, stop = _band_ranks(len(ordered), band, keep)
    if stop <= start:
        return float('nan'), float('nan')
    low = -np.inf if band == 'low' else float(ordered[start])
    high = np.inf if band == 'high' else float(ordered[stop - 1])
    return low, high


def _select_group(values: np.ndarray, positions: np.ndarray, band: str, keep: float,
                  rng: np.random.Generator) -> np.ndarray:
    if len(positions) == 0:
        return positions
    if band == 'random':
        count = int(round(keep * len(positions)))
        return np.sort(rng.choice(positions, size=count, replace=False)) if count < len(positions) else positions
    group = values[positions]
    start, stop = _band_ranks(len(group), band, keep)
    if stop <= start:
        return positions[:0]
    edges = np.partition(group, [start, stop - 1])  # O(n): the scores at the edge ranks, no full sort
    low, high = edges[start], edges[stop - 1]
    if low == high:  # the whole band is one tied value: a seeded draw of `stop - start` of its samples
        return np.sort(rng.choice(positions[group == low], size=stop - start, replace=False))
    chosen = [positions[(group > low) & (group < high)]]
    # The samples tied at an edge take ranks [below, below + len(tied)); the band has room for those of its
    # ranks [start, stop) among them, filled in a seeded order.
    below_low = int(np.count_nonzero(group < low))
    tied_low = positions[group == low]
    below_high = int(np.count_nonzero(group < high))
    tied_high = positions[group == high]
    for tied, room in ((tied_low, below_low + len(tied_low) - start), (tied_high, stop - below_high)):
        chosen.append(tied if room == len(tied) else rng.choice(tied, size=room, replace=False))
    return np.sort(np.concatenate(chosen))


def select_band(scores: Any, band: str, keep: float, seed: int = 0, domains: Optional[Sequence] = None) -> np.ndarray:
    """Sorted indices of the ``round(keep * n)`` samples in perplexity ``band`` (``n``: the scored samples).

    Args:
        scores: One score per sample (perplexity or mean NLL: the bands are the same, exp is monotonic); NaN
            marks samples without a score, which are never selected. A
            :class:`~composer_ext.perplexity_pruning.score_index.ScoreIndex` uses its perplexities.
        band: ``low``, ``medium``, ``high`` or ``random`` (see the module docstring for the definitions).
        keep: Selection rate in (0, 1]: exactly ``round(keep * n)`` of the ``n`` scored samples are kept.
        seed: Seed of the ``random`` band's draw and of the order that breaks ties at a band edge (default 0;
            the same seed gives the same selection).
        domains: One label per sample: each label keeps ``round(keep * n_label)`` of its own samples, ranked
            (or drawn) within the label.

    Returns:
        numpy.ndarray: int64 indices into ``scores``, ascending.

    Raises:
        ValueError: an unknown band, ``keep`` outside (0, 1], scores that are not 1-D, all NaN or contain inf,
            or ``domains`` of another length. TypeError: a seed that is not an int.

    Example:
        .. code-block:: python

            import numpy as np
            from composer_ext.data import select_band
            ppl = np.array([5.0, 50.0, 12.0, np.nan, 30.0])
            select_band(ppl, 'low', keep=0.5)        # array([0, 2]): the two lowest of the four scored
            tied = np.array([1.0, 1.0, 1.0, 1.0, 2.0])
            select_band(tied, 'low', keep=0.4, seed=0)  # two of the four 1.0s (which two: the seed decides)
    """
    band, keep, seed = _check_band(band), _check_keep(keep), _check_seed(seed)
    if isinstance(scores, ScoreIndex):
        scores = np.where(scores.scored, scores.perplexity, np.nan)
    values = np.asarray(scores, dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(f'scores has shape {values.shape}; expected one score per sample (1-D). Fix: pass a 1-D '
                         f'array.')
    valid = ~np.isnan(values)
    if not valid.any():
        raise ValueError(f'scores has no score to select from ({len(values)} entries, all NaN). Fix: score the data '
                         f'first; samples that trained the reference model or have < 2 tokens have no score.')
    if np.isinf(values[valid]).any():
        raise ValueError('scores contains inf. Fix: use finite scores, or NaN for samples that must not be chosen.')
    rng = np.random.default_rng(seed)
    if domains is None:
        return _select_group(values, np.flatnonzero(valid), band, keep, rng).astype(np.int64)
    labels = np.asarray(domains)
    if labels.shape != values.shape:
        raise ValueError(f'domains has {labels.shape[0] if labels.ndim else 0} labels for {len(values)} scores. Fix: '
                         f'pass one domain label per score.')
    chosen = [_select_group(values, np.flatnonzero(valid & (labels == label)), band, keep, rng)
              for label in np.unique(labels[valid])]
    return np.sort(np.concatenate(chosen)).astype(np.int64) if chosen else np.zeros(0, np.int64)
