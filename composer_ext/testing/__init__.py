"""Helpers for testing Composer code across processes, parallelisms and a kill (used by our tests; usable by yours).

* :mod:`.distributed` -- :func:`run_distributed`: a function on N gloo ranks with Composer's ``dist`` initialised.
* :mod:`.parallelism` -- :func:`run_ddp_and_fsdp2`: the same training under DDP and FSDP2; :func:`differences`.
* :mod:`.interrupt` -- :class:`KillAt` / :class:`Killed`: a simulated crash after batch N.
"""

from __future__ import annotations

from composer_ext._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    'DistributedTestError': 'distributed',
    'KillAt': 'interrupt',
    'Killed': 'interrupt',
    'Parallelism': 'parallelism',
    'differences': 'parallelism',
    'run_ddp_and_fsdp2': 'parallelism',
    'run_distributed': 'distributed',
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
