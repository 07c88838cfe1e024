"""The ``composer-ext blockwise`` YAML: its schema, loading and validation.

The file is loaded like a run YAML (omegaconf interpolation, ``key=value`` overrides) and validated before
anything is built; every problem is a :class:`composer_ext.config.ConfigError` naming the file, the key and
the fix. Components (models, dataloaders, optimizers, schedulers, algorithms, callbacks, loggers) are names
from :mod:`composer_ext.registry`, checked against their constructors' signatures. Schema::

    run_name: blockwise-vgg            # names the output folder and the finetune run
    seed: 17                           # block i is seeded from (seed, its path): same result on any rank
    device: auto                       # auto | cpu | gpu
    output_folder: runs/{run_name}     # blocks/, activations/, finetune/, *.json, report.png
    teacher:                           # either a `composer-ext run` config (trained when its checkpoint is missing)
      run: yamls/blockwise/teacher_vgg.yaml
      overrides: []                    #   key=value overrides for that config
      # or: model: {name: small_vgg, ...} and checkpoint: path/to/composer-checkpoint.pt
    blocks: auto                       # or a list of module paths
    data: {name: image, dataset: fashion_mnist, batch_size: 128}   # samples fed to the teacher; batch per block
    eval_data: {name: image, dataset: fashion_mnist, split: test, batch_size: 500, shuffle: false, drop_last: false}
    block_training: {epochs: 2, optimizer: {name: adam, lr: 0.01}, activations: auto, ...}   # BlockTrainingSpec
    schedule: {cost: params_x_activation, partition: auto}   # cost: params_x_activation | flops | profile;
                                       #   partition: auto (exact up to 20 blocks, else LPT) | exact | lpt
    stitch: {max_solo_drop: 0.15, eval_samples: 2000, batch_size: 500}
    finetune:                          # a normal Composer run of the stitched student (omit to skip)
      max_duration: 2ep
      train_loader: {name: image, dataset: fashion_mnist, batch_size: 128}
      optimizer: {name: decoupled_sgdw, lr: 0.02, momentum: 0.9}
      scheduler: {name: cosine_decay_with_warmup, t_warmup: 0.05dur}
      kd: {kd_weight: 0.9, ce_weight: 0.1, temperature: 4.0}   # KnowledgeDistillation from the teacher (optional)
      algorithms: {}, callbacks: {}, loggers: {}, eval_interval: 1ep, save_interval: 1ep, precision: null
    threads_per_rank: auto             # CPU: cores // processes per node; or an int
    progress_bar: true
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from composer_ext import registry
from composer_ext.blockwise.scheduling import COST_MODELS, PARTITION_METHODS
from composer_ext.blockwise.spec import BlockTrainingSpec
from composer_ext.config import (ConfigError, apply_overrides, load_config, load_yaml, to_container,
                                 validate_arguments)
from composer_ext.core.timing import is_time
from composer_ext.distillation import KnowledgeDistillation

__all__ = ['BlockwiseConfig', 'FinetuneSection', 'ScheduleSection', 'StitchSection', 'TeacherSection',
           'load_blockwise_config']


@dataclass
class TeacherSection:
    """Where the teacher comes from: a run config (trained when needed) or a model section + checkpoint."""

    run: Optional[str] = None
    overrides: list = field(default_factory=list)
    model: Optional[dict] = None
    checkpoint: Optional[str] = None


@dataclass
class ScheduleSection:
    """How blocks are assigned to ranks (see :mod:`~composer_ext.blockwise.scheduling`).

    ``cost``: the block cost model, ``'params_x_activation'`` (default; the teacher block's parameters x its
    output size), ``'flops'`` (teacher prefix + student training MACs) or ``'profile'`` (measured seconds of a
    few steps; the most faithful). ``partition``: ``'auto'`` (exact minimum makespan up to 20 blocks, LPT
    beyond), ``'exact'`` or ``'lpt'``. ``profile_steps``: timed steps per block for ``'profile'``.
    """

    cost: str = 'params_x_activation'
    partition: str = 'auto'
    profile_steps: int = 5


@dataclass
class StitchSection:
    """Solo-drop threshold and evaluation size of the stitch stage."""

    max_solo_drop: float = 0.15
    eval_samples: Optional[int] = 2000
    batch_size: int = 500


@dataclass
class FinetuneSection:
    """The end-to-end Composer run of the stitched student."""

    # A deliberate twin of the keys of the same names in composer_ext.config.RunConfig: the finetune stage is a
    # Composer run, so its keys mean what they mean in a run YAML (the model is the stitched student, not a key).
    max_duration: Union[str, int]
    train_loader: dict
    optimizer: Optional[dict] = None
    scheduler: Optional[dict] = None
    kd: Optional[dict] = None
    algorithms: Optional[dict] = None
    callbacks: Optional[dict] = None
    loggers: Optional[dict] = None
    eval_interval: Union[str, int] = '1ep'
    save_interval: Union[str, int] = '1ep'
    precision: Optional[str] = None
    step_schedulers_every_batch: Optional[bool] = None


@dataclass
class BlockwiseConfig:
    """A validated ``composer-ext blockwise`` config (see the module docstring for the YAML)."""

    teacher: TeacherSection
    data: dict
    eval_data: dict
    run_name: str = 'blockwise'
    seed: int = 17
    device: str = 'auto'
    output_folder: str = 'runs/{run_name}'
    blocks: Union[str, list] = 'auto'
    block_training: BlockTrainingSpec = field(default_factory=BlockTrainingSpec)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    stitch: StitchSection = field(default_factory=StitchSection)
    finetune: Optional[FinetuneSection] = None
    threads_per_rank: Union[int, str] = 'auto'
    progress_bar: bool = True
    dist_timeout: float = 600.0
    variables: dict = field(default_factory=dict)
    source: str = '<config>'

    @property
    def output(self) -> Path:
        """The output folder with ``{run_name}`` filled in."""
        return Path(self.output_folder.replace('{run_name}', self.run_name))


_TOP = {f.name: f for f in dataclasses.fields(BlockwiseConfig) if f.name != 'source'}


def _unknown(source: str, key: str, name: str, valid: Sequence[str], what: str) -> ConfigError:
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ''
    return ConfigError(source, f'{key}.{name}' if key else name, f'unknown {what} {name!r}.',
                       f'{hint}Valid keys: {", ".join(valid)}.')


def _mapping(value: Any, source: str, key: str, example: str) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(source, key, f'expected a mapping, got {value!r}.', f'write e.g. `{key}: {example}`.')
    return value


def _section(value: Any, source: str, key: str, reg: registry.Registry, exclude: Sequence[str] = ()) -> dict:
    value = _mapping(value, source, key, f'{{name: {reg.names()[0]}, ...}}')
    if 'name' not in value:
        raise ConfigError(source, key, f'the {reg.kind} section has no `name`.',
                          f'add `name:` with one of: {", ".join(reg.names())}.')
    if value['name'] not in reg:
        raise ConfigError(source, f'{key}.name', str(reg.unknown(value['name'])),
                          f'use one of the valid {reg.kind} names.')
    validate_arguments(reg.get(value['name']), {k: v for k, v in value.items() if k != 'name'}, source, key,
                       f'{reg.kind} {value["name"]!r}', exclude=exclude)
    return value


def _named(value: Any, source: str, key: str, reg: registry.Registry) -> Optional[dict]:
    if value is None:
        return None
    value = _mapping(value, source, key, f'{{{reg.names()[0]}: {{}}}}')
    for name, kwargs in value.items():
        if name not in reg:
            raise ConfigError(source, f'{key}.{name}', str(reg.unknown(name)),
                              f'use one of the valid {reg.kind} names.')
        kwargs = _mapping(kwargs if kwargs is not None else {}, source, f'{key}.{name}', '{}')
        validate_arguments(reg.get(name), kwargs, source, f'{key}.{name}', f'{reg.kind} {name!r}')
    return value


def _fields(cls, value: Any, source: str, key: str, example: str) -> dict:
    value = _mapping(value, source, key, example)
    names = [f.name for f in dataclasses.fields(cls)]
    for name in value:
        if name not in names:
            raise _unknown(source, key, name, names, f'key in {key}')
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [n for n in required if n not in value]
    if missing:
        raise ConfigError(source, key, f'the required key(s) {missing} are missing.',
                          f'add {", ".join(f"{key}.{m}" for m in missing)}.')
    return value


def _time(value: Any, source: str, key: str) -> None:
    if not is_time(value):
        raise ConfigError(source, key, f'{value!r} is not a Composer time.', "write e.g. '1000ba', '2ep' or '0.5dur'.")


def _check_type(value: Any, kinds: tuple, source: str, key: str, description: str) -> None:
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise ConfigError(source, key, f'expected {description}, got {type(value).__name__} {value!r}.',
                          f'set {key} to {description}.')


def _teacher(raw: Any, source: str) -> TeacherSection:
    values = _fields(TeacherSection, raw, source, 'teacher', '{run: yamls/blockwise/teacher_vgg.yaml}')
    section = TeacherSection(**values)
    if section.run is None and section.model is None:
        raise ConfigError(source, 'teacher', 'the teacher has neither `run` nor `model`.',
                          'set teacher.run to a `composer-ext run` YAML, or teacher.model and teacher.checkpoint.')
    if section.run is not None and section.model is not None:
        raise ConfigError(source, 'teacher', 'set either teacher.run or teacher.model, not both.',
                          'keep teacher.run (the model comes from that config) or teacher.model + teacher.checkpoint.')
    if not isinstance(section.overrides, list) or not all(isinstance(o, str) for o in section.overrides):
        raise ConfigError(source, 'teacher.overrides', f'expected a list of key=value strings, got '
                          f'{section.overrides!r}.', "write e.g. `overrides: ['max_duration=2ep']`.")
    if section.run is not None:
        _check_type(section.run, (str,), source, 'teacher.run', 'a path to a run YAML')
        run = load_config(section.run, section.overrides)
        if not run.run_name:
            raise ConfigError(source, 'teacher.run', f'the teacher config {section.run} has no run_name, which '
                              f'Composer needs to resume an interrupted teacher run.', f'add `run_name:` to '
                              f'{section.run}.')
        if not run.save_folder:
            raise ConfigError(source, 'teacher.run', f'the teacher config {section.run} has no save_folder, so its '
                              f'trained weights cannot be found.', f'add `save_folder:` to {section.run} or pass '
                              f"teacher.overrides: ['save_folder=...'].")
    else:
        _section(section.model, source, 'teacher.model', registry.models)
        if section.checkpoint is None:
            raise ConfigError(source, 'teacher.checkpoint',
                              'teacher.model needs a checkpoint with the trained weights.',
                              'set teacher.checkpoint to a Composer checkpoint (e.g. '
                              'runs/x/checkpoints/latest-rank0.pt), or use teacher.run to train the teacher.')
    if section.checkpoint is not None:
        _check_type(section.checkpoint, (str,), source, 'teacher.checkpoint', 'a path')
    return section


def _block_training(raw: Any, source: str) -> BlockTrainingSpec:
    values = _fields(BlockTrainingSpec, raw if raw is not None else {}, source, 'block_training', '{epochs: 2}')
    if 'batch_size' in values:
        raise ConfigError(source, 'block_training.batch_size', 'the block batch size is data.batch_size.',
                          'remove block_training.batch_size and set data.batch_size.')
    if 'optimizer' in values:
        _section(values['optimizer'], source, 'block_training.optimizer', registry.optimizers, exclude=('params',))
    try:
        return BlockTrainingSpec(**values)
    except (TypeError, ValueError) as err:
        name = str(err).split('=', 1)[0] if '=' in str(err).split(' ', 1)[0] else ''
        raise ConfigError(source, f'block_training.{name}' if name else 'block_training', str(err), '') from None


def _finetune(raw: Any, source: str) -> Optional[FinetuneSection]:
    if raw is None:
        return None
    values = _fields(FinetuneSection, raw, source, 'finetune', '{max_duration: 2ep, train_loader: {...}}')
    _time(values['max_duration'], source, 'finetune.max_duration')
    for name in ('eval_interval', 'save_interval'):
        if name in values:
            _time(values[name], source, f'finetune.{name}')
    _section(values['train_loader'], source, 'finetune.train_loader', registry.dataloaders)
    if values.get('optimizer') is not None:
        _section(values['optimizer'], source, 'finetune.optimizer', registry.optimizers, exclude=('params',))
    if values.get('scheduler') is not None:
        _section(values['scheduler'], source, 'finetune.scheduler', registry.schedulers)
    for key, reg in (('algorithms', registry.algorithms), ('callbacks', registry.callbacks),
                     ('loggers', registry.loggers)):
        _named(values.get(key), source, f'finetune.{key}', reg)
    if values.get('kd') is not None:
        kd = _mapping(values['kd'], source, 'finetune.kd', '{kd_weight: 0.9, temperature: 4.0}')
        validate_arguments(KnowledgeDistillation, kd, source, 'finetune.kd', 'KnowledgeDistillation',
                           exclude=('teachers',))
    if values.get('precision') not in (None, 'fp32', 'amp_bf16', 'amp_fp16'):
        raise ConfigError(source, 'finetune.precision', f'unknown precision {values["precision"]!r}.',
                          "use null, 'fp32', 'amp_bf16' or 'amp_fp16'.")
    return FinetuneSection(**values)


def _blocks(value: Any, source: str) -> Union[str, list]:
    if value == 'auto':
        return value
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(source, 'blocks', f"expected 'auto' or a non-empty list of module paths, got {value!r}.",
                          "write `blocks: auto` or `blocks: [module.features.1, module.features.3]`.")
    return value


def load_blockwise_config(path: Union[str, Path], overrides: Sequence[str] = ()) -> BlockwiseConfig:
    """Load, override, resolve and validate a blockwise YAML; raises :class:`ConfigError` on any problem.

    Example:
        >>> config = load_blockwise_config('yamls/blockwise/vgg.yaml', ['block_training.epochs=1'])
        >>> config.block_training.epochs
        1
    """
    path = Path(path)
    source = str(path)
    raw = to_container(apply_overrides(load_yaml(path), overrides, source), source)
    for key in raw:
        if key not in _TOP:
            raise _unknown(source, '', key, list(_TOP), 'top-level key')
    for key in ('teacher', 'data', 'eval_data'):
        if key not in raw:
            raise ConfigError(source, key, f'the required key {key!r} is missing.', f'add `{key}:` to the file.')
    _check_type(raw.get('run_name', 'x'), (str,), source, 'run_name', 'a string')
    _check_type(raw.get('seed', 0), (int,), source, 'seed', 'an int')
    _check_type(raw.get('output_folder', 'x'), (str,), source, 'output_folder', 'a path')
    _check_type(raw.get('progress_bar', True), (bool,), source, 'progress_bar', 'true or false')
    _check_type(raw.get('dist_timeout', 1.0), (int, float), source, 'dist_timeout', 'a number of seconds')
    _check_type(raw.get('variables', {}), (dict,), source, 'variables', 'a mapping')
    if raw.get('device', 'auto') not in ('auto', 'cpu', 'gpu'):
        raise ConfigError(source, 'device', f'unknown device {raw["device"]!r}.', "use 'auto', 'cpu' or 'gpu'.")
    threads = raw.get('threads_per_rank', 'auto')
    if threads != 'auto' and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ConfigError(source, 'threads_per_rank', f'expected auto or a positive int, got {threads!r}.',
                          'write `threads_per_rank: auto` or e.g. `threads_per_rank: 1`.')
    data = _section(raw['data'], source, 'data', registry.dataloaders)
    if 'batch_size' not in data:
        raise ConfigError(source, 'data.batch_size', 'data needs a batch_size (the batch size of block training).',
                          'add data.batch_size, e.g. 128.')
    eval_data = _section(raw['eval_data'], source, 'eval_data', registry.dataloaders)
    schedule = ScheduleSection(**_fields(ScheduleSection, raw.get('schedule') or {}, source, 'schedule',
                                         '{cost: params_x_activation}'))
    if schedule.cost not in COST_MODELS:
        raise ConfigError(source, 'schedule.cost', f'unknown cost model {schedule.cost!r}.',
                          f'use one of {", ".join(COST_MODELS)}.')
    if schedule.partition not in PARTITION_METHODS:
        raise ConfigError(source, 'schedule.partition', f'unknown partition method {schedule.partition!r}.',
                          f'use one of {", ".join(PARTITION_METHODS)}.')
    if isinstance(schedule.profile_steps, bool) or not isinstance(schedule.profile_steps, int) or \
            schedule.profile_steps < 1:
        raise ConfigError(source, 'schedule.profile_steps', f'expected a positive int, got {schedule.profile_steps!r}.',
                          'write e.g. `profile_steps: 3`.')
    stitch = StitchSection(**_fields(StitchSection, raw.get('stitch') or {}, source, 'stitch', '{max_solo_drop: 0.15}'))
    if isinstance(stitch.max_solo_drop, bool) or not isinstance(stitch.max_solo_drop, (int, float)) or \
            not 0 <= stitch.max_solo_drop <= 1:
        raise ConfigError(source, 'stitch.max_solo_drop', f'{stitch.max_solo_drop!r} is not a fraction in [0, 1].',
                          'write e.g. `max_solo_drop: 0.15` (15 points).')
    if stitch.eval_samples is not None and (isinstance(stitch.eval_samples, bool) or
                                            not isinstance(stitch.eval_samples, int) or stitch.eval_samples < 1):
        raise ConfigError(source, 'stitch.eval_samples', f'expected a positive int or null, got '
                          f'{stitch.eval_samples!r}.', 'write e.g. `eval_samples: 2000` or null for all.')
    if isinstance(stitch.batch_size, bool) or not isinstance(stitch.batch_size, int) or stitch.batch_size < 1:
        raise ConfigError(source, 'stitch.batch_size', f'expected a positive int, got {stitch.batch_size!r}.',
                          'write e.g. `batch_size: 500`.')
    spec = _block_training(raw.get('block_training'), source)
    spec.batch_size = data['batch_size']
    if isinstance(spec.batch_size, bool) or not isinstance(spec.batch_size, int) or spec.batch_size < 1:
        raise ConfigError(source, 'data.batch_size', f'expected a positive int, got {spec.batch_size!r}.',
                          'write e.g. `batch_size: 128`.')
    return BlockwiseConfig(
        teacher=_teacher(raw['teacher'], source), data=data, eval_data=eval_data,
        run_name=raw.get('run_name', 'blockwise'), seed=raw.get('seed', 17), device=raw.get('device', 'auto'),
        output_folder=raw.get('output_folder', 'runs/{run_name}'), blocks=_blocks(raw.get('blocks', 'auto'), source),
        block_training=spec, schedule=schedule, stitch=stitch, finetune=_finetune(raw.get('finetune'), source),
        threads_per_rank=threads, progress_bar=raw.get('progress_bar', True),
        dist_timeout=float(raw.get('dist_timeout', 600.0)), variables=raw.get('variables', {}), source=source)

