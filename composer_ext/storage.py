"""Crash-safe writes for offline stages: the cache root, a cross-process file lock, atomic files and dirs.

Every offline stage (corpus build, scoring, per-block checkpoints) writes through these, so a killed
process leaves either the previous complete result or nothing: never a half-written file that a later
run would read as complete.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

__all__ = ['CACHE_ENV', 'cache_location', 'cache_root', 'file_lock', 'atomic_dir', 'atomic_write_bytes', 'npz_bytes',
           'atomic_write_json', 'is_unwritable', 'umask']

CACHE_ENV = 'COMPOSER_EXT_CACHE'


def is_unwritable(err: BaseException) -> bool:
    """Whether ``err`` says a path cannot be written (permissions, a read-only file system), not a bug."""
    return isinstance(err, OSError) and err.errno in (errno.EACCES, errno.EPERM, errno.EROFS)


def cache_location() -> Path:
    """``$COMPOSER_EXT_CACHE`` or ``~/.cache/composer_ext`` (not created)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / '.cache' / 'composer_ext').expanduser()


def cache_root() -> Path:
    """``$COMPOSER_EXT_CACHE`` or ``~/.cache/composer_ext``, created if missing."""
    root = cache_location()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        if not is_unwritable(err):
            raise
        raise PermissionError(err.errno, f'cannot create the cache directory {root} ({err.strerror}). Fix: set '
                              f'{CACHE_ENV} to a writable directory, e.g. {CACHE_ENV}=$HOME/.cache/composer_ext.',
                              str(root)) from None
    return root


def umask() -> int:
    """The process's umask, read without changing it where the kernel reports it (no window for other threads)."""
    try:
        with open('/proc/self/status') as status:
            for line in status:
                if line.startswith('Umask:'):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) for the duration of the block.

    Ranks of one job, and concurrent jobs on one machine, serialise on it; the kernel drops the lock when
    a holder dies, so a killed build never blocks the next one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        handle = open(path, 'a+')
    except PermissionError:
        if not path.exists():
            raise
        # Another user's lock file in a shared cache: a read-only descriptor takes the same flock.
        handle = open(path, 'r')
    with handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a temporary directory beside ``final`` and rename it to ``final`` when the block succeeds.

    On an exception the temporary directory is removed and ``final`` is left untouched. An existing
    ``final`` is replaced only after the new one is complete.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{final.name}.tmp-', dir=final.parent))
    try:
        # mkdtemp makes 0700; the result must get the mode a plain mkdir would (other users of a shared cache).
        os.chmod(tmp, 0o777 & ~umask())
        yield tmp
        if final.exists():
            trash = Path(tempfile.mkdtemp(prefix=f'.{final.name}.old-', dir=final.parent))
            os.rename(final, trash / 'old')
            os.rename(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a fsynced temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.tmp-', dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~umask())  # mkstemp makes 0600; give the mode a plain open() would
        with os.fdopen(fd, 'wb') as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Atomically write ``obj`` as indented, key-sorted JSON (stable bytes for stable hashes)."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + '\n').encode())


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """The bytes of ``np.savez(**arrays)``: what a cache hashes and then writes with :func:`atomic_write_bytes`."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()
