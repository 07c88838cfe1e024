"""Helpers for testing Composer code across processes (used by our tests; usable by yours)."""

from composer_ext.testing.distributed import DistributedTestError, run_distributed

__all__ = ['DistributedTestError', 'run_distributed']
