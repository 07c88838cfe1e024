"""Shared fixtures: the embedded corpus (built once per machine into the cache) and small helpers."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Keep test runs on 2 cores predictable: one intra-op thread per process unless a test asks otherwise.
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')


@pytest.fixture(scope='session', autouse=True)
def _clean_streaming_shared_memory():
    """Streaming keeps shared memory per dataset; clear stale blocks from killed runs before the session."""
    from streaming.base.util import clean_stale_shared_memory
    clean_stale_shared_memory()
    yield


@pytest.fixture(scope='session')
def corpus():
    """The default embedded corpus (built on first use, then read from $COMPOSER_EXT_CACHE)."""
    from composer_ext.data.corpus import ensure_corpus
    return ensure_corpus()


@pytest.fixture(scope='session')
def tokenizer(corpus):
    return corpus.load_tokenizer()


@pytest.fixture
def cli_env():
    """Environment for running the CLI in a subprocess from the repository root."""
    env = dict(os.environ)
    env['PYTHONPATH'] = str(ROOT) + os.pathsep + env.get('PYTHONPATH', '')
    return env


def composer_ext_cmd() -> list[str]:
    return [sys.executable, '-m', 'composer_ext.cli']
