"""Helpers for testing Composer code across processes and across a kill (used by our tests; usable by yours)."""

from composer_ext.testing.distributed import DistributedTestError, run_distributed
from composer_ext.testing.interrupt import KillAt, Killed

__all__ = ['DistributedTestError', 'KillAt', 'Killed', 'run_distributed']
