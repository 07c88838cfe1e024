"""Whether each block's teacher activations are cached on disk: decided up front, against the free disk.

A disk cache (:class:`~composer_ext.blockwise.activations.ActivationCache`) saves the teacher prefix of every
epoch after the first, at the cost of ``num_samples x (input + output elements) x bytes per element`` of
disk per block. :func:`plan_activation_cache` decides block by block (``BlockTrainingSpec.activations``:
``'on_the_fly'``, ``'disk'`` or ``'auto'``) and says why; :func:`require_cache_fits` turns a ``'disk'`` cache
that cannot fit into an error before any block trains.
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from composer_ext.blockwise.activations import estimate_activation_bytes
from composer_ext.blockwise.discovery import BlockTrace
from composer_ext.blockwise.spec import BlockTrainingSpec

__all__ = ['CacheDecision', 'format_bytes', 'plan_activation_cache', 'require_cache_fits']


@dataclass
class CacheDecision:
    """Whether one block's teacher activations go to a disk cache, how big that cache is, and why.

    ``fits`` says whether the cache fits the free disk (``free_bytes`` under the cache folder, shared by
    ``ranks`` ranks that may build caches at the same time); with ``activations='disk'`` a cache that does
    not fit is an error (:func:`require_cache_fits`), with ``'auto'`` the block trains on the fly instead.
    """

    path: str
    estimate_bytes: int
    use_disk: bool
    fits: bool
    reason: str
    free_bytes: int
    ranks: int = 1

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def format_bytes(value: float) -> str:
    """A byte count for people: ``'2.01 GB'``, ``'753.0 MB'``, ``'12.5 kB'``."""
    for unit, scale in (('GB', 1e9), ('MB', 1e6)):
        if value >= scale:
            return f'{value / scale:.{2 if unit == "GB" else 1}f} {unit}'
    return f'{value / 1e3:.1f} kB'


def _free_bytes(folder: Path) -> int:
    existing = folder.absolute()
    while not existing.exists() and existing != existing.parent:  # the cache folder is created later
        existing = existing.parent
    return int(shutil.disk_usage(existing).free)


def plan_activation_cache(spec: BlockTrainingSpec, traces: dict[str, BlockTrace], num_samples: int,
                          folder: str | Path, ranks: int = 1,
                          free_bytes: Optional[int] = None) -> dict[str, CacheDecision]:
    """Decide, block by block, whether the teacher activations are cached on disk, against the free disk space.

    A block's cache takes :func:`~composer_ext.blockwise.activations.estimate_activation_bytes`
    (``num_samples x (input + output elements) x bytes per element``). Without ``spec.keep_cache`` every
    rank holds one cache at a time, and all ``ranks`` may build one at the same moment, so a cache fits
    when ``ranks x its size`` is free (a conservative bound: it assumes the ranks share the disk); with
    ``keep_cache`` the caches accumulate, so they fit while their running total is free. A cache already
    complete on disk (a resumed block) needs no new space.

    Args:
        spec: The training settings (``activations``, ``epochs``, ``cache_max_bytes``, ``cache_dtype``,
            ``keep_cache``).
        traces: ``{path: BlockTrace}`` of the blocks to decide, in training order.
        num_samples: Samples in the training dataset.
        folder: The cache root (``<folder>/<path>/`` per block).
        ranks: Ranks that may build caches at the same time on this disk.
        free_bytes: Free bytes to plan with (default: ``shutil.disk_usage`` of ``folder`` or its nearest
            existing parent).

    Returns:
        ``{path: CacheDecision}``.

    Example:
        >>> from composer_ext.blockwise.discovery import BlockTrace
        >>> traces = {'a': BlockTrace('a', 0, (8, 4, 4), (8, 4, 4), True)}
        >>> spec = BlockTrainingSpec(epochs=2, activations='auto')
        >>> plan_activation_cache(spec, traces, 1000, '/tmp/cache', free_bytes=10**9)['a'].use_disk
        True
    """
    if isinstance(ranks, bool) or not isinstance(ranks, int) or ranks < 1:
        raise ValueError(f'ranks={ranks!r} is invalid. Fix: use a positive int (the ranks sharing the disk).')
    folder = Path(folder)
    free = _free_bytes(folder) if free_bytes is None else int(free_bytes)
    decisions = {}
    kept = 0
    for path, trace in traces.items():
        size = estimate_activation_bytes(trace, num_samples, spec.cache_dtype)
        need = 0 if (folder / path / 'meta.json').exists() else size
        fits = kept + need <= free if spec.keep_cache else need * ranks <= free
        shortage = (f'{format_bytes(kept + need)} of kept caches' if spec.keep_cache else
                    f'{ranks} rank(s) x {format_bytes(need)}') + f' > {format_bytes(free)} free under {folder}'
        if spec.activations == 'on_the_fly':
            use_disk, reason = False, "activations='on_the_fly'"
        elif spec.activations == 'disk':
            use_disk = True
            reason = "activations='disk'" + ('' if fits else f' but the cache does not fit ({shortage})')
        elif spec.epochs == 1:
            use_disk, reason = False, 'one epoch: a cache would be read once, so it saves nothing'
        elif size > spec.cache_max_bytes:
            use_disk, reason = False, f'{format_bytes(size)} > cache_max_bytes={format_bytes(spec.cache_max_bytes)}'
        elif not fits:
            use_disk, reason = False, f'not enough free disk ({shortage})'
        else:
            use_disk, reason = True, f'fits cache_max_bytes and the free disk ({format_bytes(free)})'
        if use_disk and spec.keep_cache:
            kept += need
        decisions[path] = CacheDecision(path=path, estimate_bytes=size, use_disk=use_disk, fits=fits, reason=reason,
                                        free_bytes=free, ranks=ranks)
    return decisions


def require_cache_fits(decisions: dict[str, CacheDecision], spec: BlockTrainingSpec, folder: str | Path) -> None:
    """Raise ``ValueError`` when ``activations='disk'`` and a block's cache cannot fit the free disk."""
    if spec.activations != 'disk':
        return
    bad = [d for d in decisions.values() if d.use_disk and not d.fits]
    if bad:
        worst = max(bad, key=lambda d: d.estimate_bytes)
        raise ValueError(
            f"activations='disk': the teacher activation cache of block {worst.path!r} needs "
            f'{format_bytes(worst.estimate_bytes)} ({worst.estimate_bytes} bytes), and {worst.ranks} rank(s) may '
            f'build such caches at once, but only {format_bytes(worst.free_bytes)} are free under {folder} '
            f'({len(bad)} block(s) do not fit: {[d.path for d in bad]}). Fix: free disk space or move the output '
            f"folder, set cache_dtype='float16' (half the size) or fewer samples, or use activations='auto' (on "
            f"the fly when a cache does not fit) or 'on_the_fly'.")
