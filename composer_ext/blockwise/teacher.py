"""The ``teacher`` stage: the frozen teacher of a blockwise config, trained first when it has no checkpoint.

A config names its teacher either by a ``composer-ext run`` YAML (``teacher.run``: trained with that config, a
normal Composer run on all ranks, autoresumed, unless its checkpoint has already reached ``max_duration``) or
by a model section and a checkpoint (``teacher.model`` + ``teacher.checkpoint``). Either way the weights are
read with :func:`composer_ext.core.checkpoints.load_module` (``weights_only=True``: a user's file is never
unpickled).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import torch
from composer.utils import dist
from torch import nn

from composer_ext.blockwise.config import BlockwiseConfig
from composer_ext.config import ConfigError, RunConfig, load_config
from composer_ext.core.checkpoints import load_checkpoint, load_module
from composer_ext.core.timing import parse_time
from composer_ext.runner import RunContext, run

__all__ = ['build_teacher', 'teacher_checkpoint_path', 'trained_to_the_end']

_TIMESTAMP_FIELDS = {'ep': 'epoch', 'ba': 'batch', 'sp': 'sample', 'tok': 'token'}


def teacher_checkpoint_path(run_config: RunConfig) -> Path:
    """Rank 0's latest checkpoint of a ``composer-ext run`` config (``save_folder`` / ``save_latest_filename``)."""
    folder = run_config.save_folder.replace('{run_name}', run_config.run_name or '')
    name = (run_config.save_latest_filename or 'latest-rank{rank}.pt').replace('{rank}', '0')
    return Path(folder) / name.replace('{run_name}', run_config.run_name or '')


def trained_to_the_end(checkpoint: Path, max_duration: Any) -> bool:
    """Whether a Composer checkpoint exists and its timestamp has reached ``max_duration`` (ep, ba, sp or tok)."""
    if not checkpoint.exists():
        return False
    state = load_checkpoint(checkpoint, weights_only=True, what='teacher checkpoint')
    timestamp = state.get('state', {}).get('timestamp', {}).get('Timestamp') if isinstance(state, dict) else None
    if timestamp is None:
        return False
    duration = parse_time(max_duration, 'max_duration', '2ep')
    field = _TIMESTAMP_FIELDS.get(duration.unit.value)
    return field is not None and timestamp.get(field, 0) >= duration.value


def _torch_device(device: str) -> torch.device:
    return torch.device(f'cuda:{dist.get_local_rank()}') if device == 'gpu' else torch.device('cpu')


def build_teacher(config: BlockwiseConfig, device: str, train: bool = True,
                  stream=sys.stdout) -> tuple[nn.Module, dict]:
    """The frozen teacher of ``config`` on this rank's device, and what is known about it (``info``).

    With ``teacher.run``, the teacher is first trained with that config when its checkpoint is missing or has
    not reached ``max_duration`` (only when ``train``; otherwise that is a :class:`ConfigError`); then the model
    of the run config (or ``teacher.model``) is built and the checkpoint's weights are loaded into it strictly.

    Raises:
        ConfigError: the checkpoint is missing, unreadable, or does not fit the model (the message names the key
            and the fix).
    """
    section = config.teacher
    info: dict[str, Any] = {}
    if section.run is not None:
        run_config = load_config(section.run, section.overrides)
        checkpoint = Path(section.checkpoint) if section.checkpoint else teacher_checkpoint_path(run_config)
        if not trained_to_the_end(checkpoint, run_config.max_duration):
            if not train:
                raise ConfigError(config.source, 'teacher.run', f'the teacher has not been trained ({checkpoint} '
                                  f'is missing or unfinished).', 'run the teacher stage (--stage teacher, or all).')
            if dist.get_global_rank() == 0:
                print(f'[blockwise] training the teacher with {section.run} (checkpoint {checkpoint})', file=stream,
                      flush=True)
            started = time.perf_counter()
            result = run(dataclasses.replace(run_config, autoresume=True), stream=stream)
            result.trainer.close()
            info.update(eval_metrics=result.eval_metrics, training_seconds=time.perf_counter() - started)
            dist.barrier()
        info['run'] = section.run
        model = RunContext(config=run_config, device=device).build_model(run_config.model, 'teacher.run: model')
    else:
        checkpoint = Path(section.checkpoint)
        model = RunContext(config=RunConfig(max_duration=1, model=section.model, train_loader={},
                                            source=config.source), device=device).build_model(section.model,
                                                                                              'teacher.model')
    if not checkpoint.exists():
        raise ConfigError(config.source, 'teacher.checkpoint', f'the teacher checkpoint {checkpoint} does not exist.',
                          'train the teacher first (composer-ext run <teacher yaml>) or fix the path.')
    try:
        load_module(checkpoint, model=model, role='teacher')
    except ValueError as err:  # unreadable, or weights of another architecture: the message holds the fix
        raise ConfigError(config.source, 'teacher', str(err), '') from None
    info['checkpoint'] = str(checkpoint)
    model.to(_torch_device(device)).eval().requires_grad_(False)
    return model, info
