"""Shared fixtures: the embedded corpus (built once per machine into the cache) and small helpers."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]

def load_example(technique: str, script: str = 'reproduce') -> ModuleType:
    """``examples/<technique>/<script>.py`` as a module of its own name (the scripts are not a package, and the six
    are all called ``reproduce``, so a plain import would hand every test the first one imported)."""
    spec = importlib.util.spec_from_file_location(f'{technique}_{script}',
                                                  ROOT / 'examples' / technique / f'{script}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Keep test runs on 2 cores predictable: one intra-op thread per process unless a test asks otherwise.
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')


@pytest.fixture(scope='module')
def one_torch_thread():
    """One torch intra-op thread for a module of tiny models: faster on 2 shared cores (a second thread only spins),
    immune to a busy machine's oversubscription, and the numbers do not change. Use with
    ``pytestmark = pytest.mark.usefixtures('one_torch_thread')``."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope='session', autouse=True)
def _clean_streaming_shared_memory():
    """Streaming keeps shared memory per dataset; clear stale blocks from killed runs before the session."""
    from streaming.base.util import clean_stale_shared_memory
    clean_stale_shared_memory()
    yield


# (weakref to a StreamingDataset, the Streaming SharedMemory objects its constructor created)
_STREAMING_SHARED_MEMORY: list = []


def _track_streaming_shared_memory() -> None:
    """Record which shared memory each StreamingDataset creates, so that it can be released once the dataset is gone.

    Streaming registers an ``atexit`` cleanup for every ``SharedMemory``, which keeps its file descriptors open until
    the process exits even after the dataset is garbage: a test session builds hundreds of datasets and would run
    out of file descriptors. Only the memory of datasets that no longer exist or belong to closed Trainers is
    released (see ``_release_streaming_shared_memory``).
    """
    import weakref

    from streaming import StreamingDataset
    from streaming.base.shared import memory

    collecting: list = []
    shm_init, dataset_init = memory.SharedMemory.__init__, StreamingDataset.__init__

    def tracking_shm_init(self, *args, **kwargs):
        shm_init(self, *args, **kwargs)
        if collecting:
            collecting[-1].append(self)

    def tracking_dataset_init(self, *args, **kwargs):
        import atexit
        import copy
        import time
        # Streaming writes the weights onto the Stream objects it is given and refuses streams that carry them: a
        # retry needs the streams as they were before the failed attempt.
        pristine = copy.deepcopy(kwargs.get('streams'))
        for attempt in range(5):
            if attempt and pristine is not None:
                kwargs['streams'] = copy.deepcopy(pristine)
            collecting.append([])
            try:
                dataset_init(self, *args, **kwargs)
                break
            except FileExistsError:
                # Streaming looks for a free shared-memory prefix, then creates it: two test processes (CI runs the
                # default suite and the reproductions side by side) can pick the same one. Release what this attempt
                # created and look again; the prefix is taken by then.
                if attempt == 4:
                    raise
                for shm in collecting[-1]:
                    atexit.unregister(shm.cleanup)
                    shm.cleanup()
                time.sleep(0.05 * (attempt + 1))
            finally:
                created = collecting.pop()
        _STREAMING_SHARED_MEMORY.append((weakref.ref(self), created))

    memory.SharedMemory.__init__ = tracking_shm_init
    StreamingDataset.__init__ = tracking_dataset_init


def _release_streaming_shared_memory(finished=()) -> None:
    """Release the shared memory of datasets that are gone or belong to ``finished`` (closed) Trainers."""
    import atexit
    done = set()
    for trainer in finished:
        state = trainer.state
        loaders = [state.train_dataloader] + [e.dataloader.dataloader for e in state.evaluators or ()]
        done.update(id(getattr(loader, 'dataset', None)) for loader in loaders if loader is not None)
    alive = []
    for ref, memories in _STREAMING_SHARED_MEMORY:
        dataset = ref()
        if dataset is not None and id(dataset) not in done:
            alive.append((ref, memories))
            continue
        for shm in memories:
            atexit.unregister(shm.cleanup)
            shm.cleanup()
    _STREAMING_SHARED_MEMORY[:] = alive


_track_streaming_shared_memory()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    """Close the Trainers a test body created and left open, then release unused Streaming shared memory.

    Composer's Engine registers ``atexit`` hooks that keep every unclosed Trainer's state (dataloaders, datasets,
    memory-mapped shards) alive until the process exits; over a few hundred tests that exhausts the open-file
    limit. Trainers made by fixtures (setup) are left alone: later tests use them.
    """
    from composer import Trainer
    created = []  # strong references: an unclosed Trainer may already be garbage, its state kept by atexit
    original = Trainer.__init__

    def tracking_init(self, *args, **kwargs):
        created.append(self)
        original(self, *args, **kwargs)

    Trainer.__init__ = tracking_init
    try:
        yield
    finally:
        Trainer.__init__ = original
        finished = [t for t in created if getattr(t, 'engine', None) is not None]
        for trainer in finished:
            if not getattr(trainer.engine, '_is_closed', False):
                trainer.close()
        # No gc.collect() here: on a heap of torch and transformers objects it costs about a second per test.
        _release_streaming_shared_memory(finished)


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
