"""How a global batch is split over the ranks of a job."""

from __future__ import annotations

__all__ = ['per_rank_batch_size']


def per_rank_batch_size(batch_size: int, name: str = 'batch_size') -> int:
    """``batch_size`` is the global batch; every rank gets an equal share, so a config trains the same way on
    1 or N processes. Raises ``ValueError`` when it does not divide evenly."""
    from composer.utils import dist
    world = dist.get_world_size()
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1 or batch_size % world:
        raise ValueError(f'{name}={batch_size!r} must be a positive int divisible by the world size ({world}): it is '
                         f'the global batch, split evenly over ranks. Fix: use a multiple of {world}.')
    return batch_size // world
