"""Simulate a killed run: a callback that raises right after a given batch's checkpoint was written.

Resume tests compare an uninterrupted run with one that is killed after batch N (with a checkpoint saved
at N) and then resumed from that checkpoint; every training-relevant state must match bit for bit::

    trainer = Trainer(..., max_duration='8ba', save_folder=folder, save_interval='4ba', callbacks=[KillAt(4)])
    with pytest.raises(Killed):
        trainer.fit()
    resumed = Trainer(..., max_duration='8ba', load_path=f'{folder}/ep0-ba4-rank0.pt')
    resumed.fit()

``Trainer.fit(duration=...)`` is not a substitute: it changes ``max_duration``, and with it every schedule
that depends on it.
"""

from __future__ import annotations

from composer.core import Callback, State
from composer.loggers import Logger

__all__ = ['KillAt', 'Killed']


class Killed(Exception):
    """Raised by :class:`KillAt` to stop training as a crash would."""


class KillAt(Callback):
    """Raise :class:`Killed` at the start of the batch after ``batch`` completed batches."""

    def __init__(self, batch: int):
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f'batch={batch!r} is invalid. Fix: use a positive int.')
        self.batch = batch

    def batch_start(self, state: State, logger: Logger) -> None:
        if state.timestamp.batch.value == self.batch:
            raise Killed(f'killed after batch {self.batch}')

    def __repr__(self) -> str:
        return f'KillAt(batch={self.batch})'
