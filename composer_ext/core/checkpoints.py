"""Checkpoint and model loading: one loader for teachers, references and our own stage files.

``torch.load`` unpickles, and unpickling can run code. :func:`load_checkpoint` therefore loads with
``weights_only=True`` by default (plain tensors and containers, plus the few plain-data globals that Composer
checkpoints hold); the pickled path is explicit: ``weights_only=False``, for files you trust.

* :func:`load_checkpoint` -- a file's contents (a Composer checkpoint, a state dict, one of our stage files).
* :func:`model_state_dict` -- the model weights inside what :func:`load_checkpoint` returned.
* :func:`load_weights` -- load weights strictly into an architecture, tolerating a ``module.``/``model.`` prefix.
* :func:`load_module` -- a whole module: weights into a given architecture, a TorchScript archive, or (trusted
  files only) a pickled module.
"""

from __future__ import annotations

import datetime
import os
import zipfile
from typing import Any, Mapping, Optional, Union

import numpy as np
import torch
import torch.nn as nn

__all__ = ['checkpoint_problem', 'is_torchscript', 'load_checkpoint', 'load_module', 'load_weights', 'model_state_dict']

PathLike = Union[str, os.PathLike]


def _safe_globals() -> list:
    """Plain-data globals that Composer checkpoints contain (numpy RNG states, timedeltas, version strings)."""
    from torch.torch_version import TorchVersion
    allowed: list = [datetime.timedelta, TorchVersion, np.ndarray, np.dtype]
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct  # type: ignore
    allowed.append(_reconstruct)
    allowed.extend({type(np.dtype(code)) for code in 'bBhHiIlLqQefd?'})
    return allowed


def _existing_file(path: PathLike, what: str) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f'{what}={path!r} is not a path. Fix: pass a str or os.PathLike.')
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f'the {what} {path!r} is a directory, not a checkpoint file. Fix: pass the file inside it '
                         f"(e.g. {os.path.join(path, 'latest-rank0.pt')!r}).")
    if not os.path.isfile(path):
        raise ValueError(f'the {what} {path!r} does not exist. Fix: train it first or correct the path.')
    return path


def is_torchscript(path: PathLike) -> bool:
    """Whether ``path`` is a TorchScript archive (``torch.jit.save``)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.split('/', 1)[-1].startswith('code/') for name in archive.namelist())


_COMPRESSED_SUFFIXES = ('.tar', '.gz', '.tgz', '.bz2', '.xz', '.lz4', '.zst', '.lzma')


def checkpoint_problem(path: str) -> Optional[str]:
    """Why ``path`` cannot be a ``torch.save`` checkpoint (a zip archive or, in the legacy format, a pickle), or None.

    Cheap: reads the zip directory only (a file cut short by a killed save or a full disk has none), so a
    validator can check a checkpoint before anything is built. Compressed archives (which Composer unpacks
    itself) are not checked.
    """
    if path.endswith(_COMPRESSED_SUFFIXES):
        return None  # Composer decompresses these itself; nothing cheap to check
    with open(path, 'rb') as file:
        head = file.read(4)
    if not head:
        return 'the file is empty'
    if head.startswith(b'PK'):
        try:
            with zipfile.ZipFile(path) as archive:
                archive.namelist()
        except (zipfile.BadZipFile, OSError) as err:
            return f'a truncated or damaged torch.save archive: {err}'
        return None
    if head[:1] == b'\x80':
        return None  # the legacy torch.save format: a pickle
    return 'neither a torch.save zip archive nor a legacy torch.save pickle'


def load_checkpoint(path: PathLike, weights_only: bool = True, what: str = 'checkpoint') -> Any:
    """The contents of a checkpoint file, on the CPU.

    Args:
        path: The file.
        weights_only: True (default): refuse anything but tensors, containers and plain data (safe on untrusted
            files). False: full unpickling, for files you trust (e.g. a module saved whole with ``torch.save``).
        what: What the file is, for error messages (``'teacher checkpoint'``).

    Raises:
        ValueError: the file is missing, a directory, not a checkpoint, or needs ``weights_only=False``.
    """
    if not isinstance(weights_only, bool):
        raise TypeError(f'weights_only={weights_only!r} is a {type(weights_only).__name__}, not a bool. Fix: pass '
                        f'weights_only=True or weights_only=False.')
    path = _existing_file(path, what)
    if not weights_only:
        try:
            return torch.load(path, map_location='cpu', weights_only=False)
        except Exception as err:  # noqa: BLE001 -- any unreadable file is the same user error
            problem = ' '.join(str(err).split())[-200:]
            raise ValueError(f'the {what} {path!r} is not a readable checkpoint ({type(err).__name__}: {problem}). '
                             f'Fix: pass a file written by torch.save or a Composer Trainer.') from None
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as err:  # noqa: BLE001 -- torch raises UnpicklingError/RuntimeError for disallowed globals
        message = ' '.join(str(err).split())
        if 'Unsupported global' not in message:
            # not a refused global: the file itself is not a checkpoint (truncated, garbage, another format)
            raise ValueError(f'the {what} {path!r} is not a readable checkpoint ({type(err).__name__}: '
                             f'{message[-200:]}). Fix: pass a file written by torch.save or a Composer Trainer; if it '
                             f'was cut short, save it again.') from None
        raise ValueError(f'the {what} {path!r} cannot be loaded with weights_only=True ({message[-300:]}). Fix: '
                         f'save a state_dict (torch.save(model.state_dict(), path)) and pass '
                         f"{{'model': <architecture>, 'checkpoint': path}}, or pass weights_only=False if you trust "
                         f'the file (unpickling can run code).') from None


def model_state_dict(obj: Any, path: PathLike) -> Mapping[str, torch.Tensor]:
    """The model weights inside a loaded checkpoint: Composer (``state.model``), a ``state_dict``/``model`` key,
    or a plain state dict."""
    if isinstance(obj, Mapping):
        state = obj.get('state')
        if isinstance(state, Mapping) and isinstance(state.get('model'), Mapping):
            return state['model']
        for key in ('state_dict', 'model'):
            if isinstance(obj.get(key), Mapping):
                return obj[key]
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    raise ValueError(f'the checkpoint {os.fspath(path)!r} holds no model state dict (a Composer checkpoint, a dict '
                     f"with a 'state_dict' or 'model' key, or a plain state dict). Fix: save it with "
                     f'torch.save(model.state_dict(), path) or pass a Composer checkpoint.')


def load_weights(model: nn.Module, weights: Mapping[str, torch.Tensor], path: PathLike, role: str = 'model') -> None:
    """Load ``weights`` strictly into ``model``, with or without a ``module.``/``model.`` wrapper prefix.

    Raises:
        ValueError: names or shapes do not fit (the message shows examples and names ``role``).
    """
    path = os.fspath(path)
    expected = set(model.state_dict())
    candidates = [dict(weights)]
    for prefix in ('module.', 'model.'):  # a bare network vs a Composer/HuggingFace wrapper, either way round
        if all(k.startswith(prefix) for k in weights):
            candidates.append({k[len(prefix):]: v for k, v in weights.items()})
        candidates.append({prefix + k: v for k, v in weights.items()})
    fix = f'Fix: build the {role} model with the same configuration as the run that saved the checkpoint.'
    for candidate in candidates:
        if set(candidate) == expected:
            try:
                model.load_state_dict(candidate, strict=True)
            except RuntimeError as err:  # same names, other shapes
                problem = next((line.strip() for line in str(err).splitlines() if 'size mismatch' in line), str(err))
                raise ValueError(f'the weights in {path!r} do not fit the {role} architecture '
                                 f'{type(model).__name__} ({problem}). {fix}') from None
            return
    missing, unexpected = sorted(expected - set(weights))[:5], sorted(set(weights) - expected)[:5]
    raise ValueError(f'the weights in {path!r} do not fit the {role} architecture {type(model).__name__} (missing '
                     f'e.g. {missing}, unexpected e.g. {unexpected}). {fix}')


def load_module(path: PathLike, model: Optional[nn.Module] = None, weights_only: bool = True,
                role: str = 'model') -> nn.Module:
    """A module from a checkpoint file.

    With ``model`` (the architecture), its weights are read from ``path`` (a Composer checkpoint or a state
    dict) and loaded strictly into ``model``, which is returned. Without it, ``path`` must be a TorchScript
    archive or, only with ``weights_only=False``, a pickled module (``torch.save(module)``; trusted files only).

    Example:
        .. code-block:: python

            teacher = load_module('runs/teacher/checkpoints/latest-rank0.pt', model=small_resnet(), role='teacher')
    """
    what = f'{role} checkpoint'
    path = _existing_file(path, what)
    if model is not None:
        if not isinstance(model, nn.Module):
            raise TypeError(f'model={model!r} is not a torch.nn.Module. Fix: pass the {role} architecture.')
        load_weights(model, model_state_dict(load_checkpoint(path, weights_only, what), path), path, role)
        return model
    if is_torchscript(path):
        return torch.jit.load(path, map_location='cpu')
    loaded = load_checkpoint(path, weights_only, what)
    if isinstance(loaded, nn.Module):
        return loaded
    raise ValueError(f'the {what} {path!r} holds weights but no architecture. Fix: pass '
                     f"{{'model': <{role} architecture>, 'checkpoint': {path!r}}} instead of the bare path.")
