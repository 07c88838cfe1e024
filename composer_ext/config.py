"""Run configs: load a YAML file with omegaconf (dotlist overrides, interpolation) and validate all of it.

Validation happens before anything is built or trained: the YAML must parse, every top-level key must be
known and of the right type, every component ``name`` must be in :mod:`composer_ext.registry`, and every
component argument must exist in the constructor's signature with a value of the annotated type. Each
problem raises :class:`ConfigError`, which names the file, the key and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import inspect
import os
import re
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
from composer.core import Precision, TimeUnit
from composer.utils import format_name_with_dist
from composer.utils.parallelism import FSDP2Config, FSDPConfig, TPConfig

from composer_ext import registry
from composer_ext.core.checkpoints import checkpoint_problem
from composer_ext.core.timing import is_time, trainer_time
from composer_ext.data.sources import DOMAINS

__all__ = ['ConfigError', 'FSDP_SHARDING_STRATEGIES', 'RunConfig', 'accepts', 'apply_overrides', 'as_expected_number',
           'check_environment', 'fsdp2_settings', 'fsdp_version', 'load_config', 'load_yaml', 'resolve_device', 'resolve_precision', 'to_container', 'validate_arguments']


class ConfigError(ValueError):
    """A problem in a run config, reported as ``FILE: KEY: problem. Fix: ...``."""

    def __init__(self, source: str, key: str, problem: str, fix: str):
        self.source, self.key, self.problem, self.fix = source, key, problem, fix
        where = f'{source}: {key}: ' if key else f'{source}: '
        super().__init__(f'{where}{problem}' + (f' Fix: {fix}' if fix and 'Fix:' not in problem else ''))


Section = dict  # {'name': <registry name>, **kwargs}


@dataclass
class RunConfig:
    """The top-level keys of a run YAML (see the README's "YAML format" section)."""

    # A deliberate twin: composer_ext.blockwise.config.FinetuneSection repeats the keys a finetune run shares.
    max_duration: Union[str, int]
    model: Section
    train_loader: Section
    run_name: Optional[str] = None
    seed: int = 17
    device: str = 'auto'
    precision: Optional[str] = None
    eval_loaders: Optional[list] = None
    eval_interval: Union[str, int] = 1
    eval_subset_num_batches: int = -1
    optimizer: Optional[Section] = None
    scheduler: Optional[Section] = None
    step_schedulers_every_batch: Optional[bool] = None
    algorithms: Optional[dict] = None
    callbacks: Optional[dict] = None
    loggers: Optional[dict] = None
    device_train_microbatch_size: Optional[Union[int, str]] = None
    parallelism: Optional[dict] = None
    save_folder: Optional[str] = None
    save_interval: Union[str, int] = '1ep'
    save_filename: str = 'ep{epoch}-ba{batch}-rank{rank}.pt'
    save_latest_filename: Optional[str] = 'latest-rank{rank}.pt'
    save_overwrite: bool = False
    save_num_checkpoints_to_keep: int = -1
    save_weights_only: bool = False
    load_path: Optional[str] = None
    load_weights_only: bool = False
    load_strict_model_weights: bool = True
    autoresume: bool = False
    progress_bar: bool = True
    log_to_console: bool = False
    console_log_interval: Union[str, int] = '1ba'
    dist_timeout: float = 300.0
    python_log_level: Optional[str] = None
    variables: dict = field(default_factory=dict)
    source: str = field(default='<config>', metadata={'internal': True})


_TOP_LEVEL = {f.name: f for f in dataclasses.fields(RunConfig) if not f.metadata.get('internal')}
_SECTION_REGISTRIES = {
    'model': registry.models,
    'train_loader': registry.dataloaders,
    'optimizer': registry.optimizers,
    'scheduler': registry.schedulers,
}
_NAMED_REGISTRIES = {'algorithms': registry.algorithms, 'callbacks': registry.callbacks, 'loggers': registry.loggers}


# --- type checks from annotations -------------------------------------------------------------------------


def _type_name(annotation: Any) -> str:
    if annotation is type(None):
        return 'null'
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        return ' or '.join(_type_name(a) for a in typing.get_args(annotation))
    if origin is typing.Literal:
        return 'one of ' + ', '.join(repr(a) for a in typing.get_args(annotation))
    if origin is not None:
        return getattr(origin, '__name__', str(origin)).replace('Sequence', 'list').replace('Mapping', 'dict')
    return getattr(annotation, '__name__', str(annotation))


def _is_time_annotation(annotation: Any) -> bool:
    return getattr(annotation, '__name__', None) == 'Time' and 'composer' in getattr(annotation, '__module__', '')


def accepts(value: Any, annotation: Any) -> bool:
    """Whether a YAML value can be passed to a parameter annotated ``annotation`` (permissive when unsure)."""
    if annotation in (inspect.Parameter.empty, Any, object) or isinstance(annotation, (str, typing.ForwardRef)):
        return True
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        if isinstance(value, str) and _annotation_allows_time(annotation):
            return is_time(value)  # `Union[str, Time]` means a time string, not any string
        return any(accepts(value, a) for a in typing.get_args(annotation))
    if origin is typing.Literal:
        return value in typing.get_args(annotation)
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if _is_time_annotation(annotation):
        return is_time(value)
    container = origin or annotation
    if container in (list, tuple, set, Sequence, typing.Sequence, typing.List, typing.Tuple, typing.Iterable) or \
            (inspect.isclass(container) and container.__name__ in ('Sequence', 'Iterable', 'Collection')):
        if not isinstance(value, (list, tuple)):
            return False
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        return not args or len(args) != 1 or all(accepts(v, args[0]) for v in value)
    if container in (dict, typing.Dict, typing.Mapping) or (inspect.isclass(container) and
                                                            container.__name__ in ('Mapping', 'MutableMapping')):
        return isinstance(value, dict)
    if value is None:
        return False
    # A class we cannot build from YAML directly (a module, a tensor): the builder decides.
    return True


def _annotation_allows_time(annotation: Any) -> bool:
    if _is_time_annotation(annotation):
        return True
    return any(_is_time_annotation(a) for a in typing.get_args(annotation))


# A float literal as YAML 1.2 (and omegaconf's file loader) reads it: `1e-3` too, which YAML 1.1 leaves a string.
_FLOAT_LITERAL = re.compile(r'[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?')


def _union_members(annotation: Any) -> tuple:
    if typing.get_origin(annotation) in (Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def as_expected_number(value: Any, annotation: Any) -> Any:
    """``value`` as a float where ``annotation`` expects a float and ``value`` is a float literal string, else as is.

    A command-line override is read as YAML 1.1, where ``1e-3`` is a string, while the same text in the file is a
    float; where a string is also acceptable (a name, a time) the value stays a string.
    """
    if not isinstance(value, str) or not _FLOAT_LITERAL.fullmatch(value.strip()):
        return value
    members = _union_members(annotation)
    if float not in members or str in members or _annotation_allows_time(annotation):
        return value
    return float(value)


def _resolved_hints(fn: Callable) -> dict[str, Any]:
    target = fn.__init__ if inspect.isclass(fn) else fn
    try:
        return typing.get_type_hints(target)
    except Exception:  # unresolvable forward references: fall back to the unchecked raw annotations
        return {}


def validate_arguments(fn: Callable, kwargs: dict, source: str, key: str, what: str,
                       exclude: Sequence[str] = ()) -> None:
    """Check ``kwargs`` against ``fn``'s signature: unknown names, missing required ones, wrong types.

    ``exclude`` names parameters that the runner supplies itself (e.g. an optimizer's ``params``). A float literal
    string where a float is expected is replaced in ``kwargs`` by the float (see :func:`as_expected_number`).
    """
    signature = inspect.signature(fn)
    skipped = {'self', 'context', *exclude}
    params = {n: p for n, p in signature.parameters.items()
              if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and n not in skipped}
    takes_any = any(p.kind == p.VAR_KEYWORD for p in signature.parameters.values())
    hints = _resolved_hints(fn)
    for name, value in list(kwargs.items()):
        if name in params:
            value = kwargs[name] = as_expected_number(value, hints.get(name, inspect.Parameter.empty))
        if name not in params:
            if takes_any:
                continue
            close = difflib.get_close_matches(name, params, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ''
            raise ConfigError(source, f'{key}.{name}', f'{what} has no argument {name!r}.',
                              f'{hint}Valid arguments: {", ".join(params) or "(none)"}.')
        annotation = hints.get(name, inspect.Parameter.empty)
        if not accepts(value, annotation):
            if _annotation_allows_time(annotation) and isinstance(value, str):
                fix = (f"write a Composer time string such as '0.5dur', '100ba', '2ep' or '1e6tok' for "
                       f'{key}.{name}.')
            else:
                fix = f'set {key}.{name} to a value of type {_type_name(annotation)}.'
            raise ConfigError(source, f'{key}.{name}',
                              f'expected {_type_name(annotation)}, got {type(value).__name__} {value!r}.', fix)
    missing = [n for n, p in params.items() if p.default is p.empty and n not in kwargs]
    if missing:
        raise ConfigError(source, key, f'{what} needs the argument(s) {missing}.',
                          f'add {", ".join(f"{key}.{m}" for m in missing)}.')


# --- loading ----------------------------------------------------------------------------------------------


def load_yaml(path: Path):
    """Read a YAML file into an omegaconf ``DictConfig``; raises :class:`ConfigError` if it is missing or malformed."""
    import yaml
    from omegaconf import OmegaConf

    if not path.exists():
        raise ConfigError(str(path), '', 'the config file does not exist.', 'pass the path of a YAML file, '
                          'e.g. yamls/quickstart.yaml.')
    if path.is_dir():
        raise ConfigError(str(path), '', 'the config path is a directory, not a YAML file.',
                          f'pass one of the YAML files inside it (e.g. {path}/<name>.yaml), or yamls/quickstart.yaml.')
    try:
        cfg = OmegaConf.load(path)
    except UnicodeDecodeError as err:
        data = path.read_bytes()
        line = data[:err.start].count(b'\n') + 1
        raise ConfigError(str(path), '', f'the file is not UTF-8 (byte 0x{data[err.start]:02x} on line {line}).',
                          'save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8), or remove that character.') from None
    except OSError as err:
        raise ConfigError(str(path), '', f'the config file cannot be read ({err.strerror or err}).',
                          'check that the path is a readable YAML file.') from None
    except yaml.YAMLError as err:
        mark = getattr(err, 'problem_mark', None)
        where = f'line {mark.line + 1}, column {mark.column + 1}: ' if mark else ''
        problem = getattr(err, 'problem', None) or str(err).splitlines()[0]
        raise ConfigError(str(path), '', f'the YAML does not parse ({where}{problem}).',
                          'correct the YAML syntax at that position (indentation, a missing colon or quote).') from None
    if not isinstance(cfg, dict) and not OmegaConf.is_dict(cfg):
        raise ConfigError(str(path), '', 'the top level of the YAML is not a mapping.',
                          'write the config as `key: value` lines (see yamls/quickstart.yaml).')
    return cfg


def apply_overrides(cfg, overrides: Sequence[str], source: str):
    """Apply ``key=value`` overrides in order; keys are dotted paths, list items by index (``a.0.b=1``)."""
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    for item in overrides:
        key, sep, text = item.partition('=')
        if not sep or not key:
            raise ConfigError(source, item, f'the override {item!r} is not of the form key=value.',
                              'write overrides as dotted key=value, e.g. max_duration=10ba or optimizer.lr=0.01.')
        try:
            value = yaml.safe_load(text) if text else None
        except yaml.YAMLError:
            value = text  # not YAML: take the raw string
        try:
            OmegaConf.update(cfg, key, value, merge=True, force_add=True)
        except (OmegaConfBaseException, TypeError, ValueError, IndexError, KeyError) as err:
            raise ConfigError(source, key, f'the override {item!r} cannot be applied ({err}).',
                              'check that the key path exists (list items by index, e.g. eval_loaders.0.label).') \
                from None
    return cfg


def to_container(cfg, source: str) -> dict:
    """Resolve interpolations and return plain dicts/lists; raises :class:`ConfigError` naming an unresolved key."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as err:
        key = getattr(err, 'full_key', '') or ''
        message = err.msg if hasattr(err, 'msg') else err
        raise ConfigError(source, key, f'an interpolation cannot be resolved ({message}).',
                          'define the referenced key (e.g. under `variables:`) or fix the ${...} expression.') from None


def _check_section(section: Any, source: str, key: str, reg: registry.Registry, named: Optional[str] = None) -> None:
    if named is None:
        if not isinstance(section, dict) or 'name' not in section:
            raise ConfigError(source, key, f'expected a mapping with a `name` (a registered {reg.kind}), got '
                              f'{section!r}.', f'write e.g. `{key}: {{name: {reg.names()[0]}, ...}}`. Valid names: '
                              f'{", ".join(reg.names())}.')
        name, kwargs = section['name'], {k: v for k, v in section.items() if k != 'name'}
    else:
        name, kwargs = named, section if section is not None else {}
        if not isinstance(kwargs, dict):
            raise ConfigError(source, key, f'expected a mapping of arguments for {reg.kind} {name!r}, got {kwargs!r}.',
                              f'write `{key}: {{}}` for defaults, or `{key}: {{arg: value}}`.')
    if name not in reg:
        err = reg.unknown(name)
        raise ConfigError(source, key if named is None else key, str(err).rstrip('.') + '.',
                          f'use one of the valid {reg.kind} names, or register yours with '
                          f'composer_ext.registry.{reg.kind}s.register(...).')
    exclude = ('params',) if reg is registry.optimizers else ()
    validate_arguments(reg.get(name), kwargs, source, key, f'{reg.kind} {name!r}', exclude=exclude)
    if named is None:
        section.update(kwargs)  # numbers read from float literals (validate_arguments) go back into the config


def _check_eval_loaders(value: Any, source: str) -> None:
    if not isinstance(value, list):
        raise ConfigError(source, 'eval_loaders', f'expected a list of dataloader sections, got {value!r}.',
                          'write `eval_loaders: [{name: text, label: val, ...}]`.')
    labels = []
    for i, section in enumerate(value):
        key = f'eval_loaders[{i}]'
        if not isinstance(section, dict):
            raise ConfigError(source, key, f'expected a mapping, got {section!r}.', 'write `{name: ..., label: ...}`.')
        kwargs = {k: v for k, v in section.items() if k != 'label'}
        _check_section(kwargs, source, key, registry.dataloaders)
        section.update(kwargs)
        if not section['name'].endswith('_evaluators'):
            labels.append(section.get('label', 'eval'))
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise ConfigError(source, 'eval_loaders', f'the labels {duplicates} are used by more than one eval loader.',
                          'give every eval loader its own `label`.')


def _check_top_level(raw: dict, source: str) -> None:
    unknown = [k for k in raw if k not in _TOP_LEVEL]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, _TOP_LEVEL, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ''
        raise ConfigError(source, key, f'unknown top-level key {key!r}.',
                          f'{hint}Valid keys: {", ".join(_TOP_LEVEL)}.')
    hints = typing.get_type_hints(RunConfig)
    for name, spec in _TOP_LEVEL.items():
        required = spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING
        if name not in raw:
            if required:
                raise ConfigError(source, name, f'the required key {name!r} is missing.', f'add `{name}:` to the file.')
            continue
        if name in _SECTION_REGISTRIES or name in _NAMED_REGISTRIES or name == 'eval_loaders':
            continue
        annotation = hints[name]
        raw[name] = as_expected_number(raw[name], annotation)
        if not accepts(raw[name], annotation):
            raise ConfigError(source, name, f'expected {_type_name(annotation)}, got {type(raw[name]).__name__} '
                              f'{raw[name]!r}.', f'set {name} to a value of type {_type_name(annotation)}.')
    for name in ('max_duration', 'eval_interval', 'save_interval', 'console_log_interval'):
        if isinstance(raw.get(name), str) and not is_time(raw[name]):
            raise ConfigError(source, name, f'{raw[name]!r} is not a Composer time.',
                              "write e.g. '1000ba', '2ep', '1e6tok' or '0.5dur'.")
    if raw.get('device', 'auto') not in ('auto', 'cpu', 'gpu', 'mps'):
        raise ConfigError(source, 'device', f'unknown device {raw["device"]!r}.', "use 'auto', 'cpu', 'gpu' or 'mps'.")


# --- values: what Composer and the techniques would refuse later, checked before anything is built ------------

_INTERVALS = ('eval_interval', 'save_interval', 'console_log_interval')
_INTERVAL_FIX = {
    'eval_interval': '; to skip evaluation, remove eval_loaders',
    'save_interval': '; to save no checkpoints, remove save_folder',
    'console_log_interval': '; to log nothing to the console, set log_to_console: false',
}




def _check_times(raw: dict, source: str) -> None:
    duration = trainer_time(raw['max_duration'], 'max_duration')
    if duration.unit == TimeUnit.DURATION:
        raise ConfigError(source, 'max_duration', f'max_duration={raw["max_duration"]!r} is a fraction of the '
                          'duration, which max_duration itself defines.',
                          "give it in batches, epochs, samples or tokens, e.g. max_duration: 1000ba.")
    if not duration.value > 0:
        raise ConfigError(source, 'max_duration', f'max_duration={raw["max_duration"]!r} must be positive: the run '
                          'would stop before its first batch.', 'use e.g. max_duration: 1000ba, 2ep or 1e6tok.')
    for key in _INTERVALS:
        if key not in raw:
            continue
        interval = trainer_time(raw[key], key)
        if not interval.value > 0 or (interval.unit == TimeUnit.DURATION and interval.value > 1):
            raise ConfigError(source, key, f'{key}={raw[key]!r} must be positive (and at most 1dur): Composer would '
                              'never (or never again) act on it.',
                              f'use e.g. {key}: 100ba or 0.25dur{_INTERVAL_FIX[key]}.')


def _check_values(raw: dict, source: str) -> None:
    """Ranges and choices of the top-level keys that the Trainer would otherwise refuse after the model is built."""

    _check_times(raw, source)
    precisions = [p.value for p in Precision]
    if raw.get('precision') is not None and raw['precision'] not in precisions:
        raise ConfigError(source, 'precision', f'unknown precision {raw["precision"]!r}.',
                          f'use one of {", ".join(map(repr, precisions))}, or null for the default (amp_bf16 on GPU, '
                          'fp32 on CPU).')
    microbatch = raw.get('device_train_microbatch_size')
    if microbatch is not None and microbatch != 'auto' and not (isinstance(microbatch, int) and microbatch >= 1):
        raise ConfigError(source, 'device_train_microbatch_size', f'device_train_microbatch_size={microbatch!r} is '
                          "neither an int >= 1 nor 'auto'.", 'use the samples per microbatch, e.g. 4 (at most the '
                          "per-rank batch size), 'auto' on GPU, or null for no gradient accumulation.")
    if not raw.get('dist_timeout', 300.0) > 0:
        raise ConfigError(source, 'dist_timeout', f'dist_timeout={raw["dist_timeout"]!r} must be positive.',
                          'use seconds, e.g. dist_timeout: 300.')
    subset = raw.get('eval_subset_num_batches', -1)
    if subset != -1 and subset < 1:
        raise ConfigError(source, 'eval_subset_num_batches', f'eval_subset_num_batches={subset!r} is invalid.',
                          'use -1 (every batch) or a number of batches >= 1.')
    if raw.get('save_num_checkpoints_to_keep', -1) < -1:
        raise ConfigError(source, 'save_num_checkpoints_to_keep', f'save_num_checkpoints_to_keep='
                          f'{raw["save_num_checkpoints_to_keep"]!r} is invalid.', 'use -1 (keep all) or a count >= 0.')
    if not 0 <= raw.get('seed', 17) < 2 ** 32:
        raise ConfigError(source, 'seed', f'seed={raw["seed"]!r} is outside [0, 2**32).', 'use e.g. seed: 17.')
    if raw.get('autoresume') and raw.get('save_folder') is None:
        raise ConfigError(source, 'autoresume', 'autoresume: true resumes from the latest checkpoint in save_folder, '
                          'and save_folder is not set.', 'set save_folder (e.g. runs/{run_name}/checkpoints), or '
                          'autoresume: false.')
    if raw.get('autoresume') and 'save_latest_filename' in raw and raw['save_latest_filename'] is None:
        raise ConfigError(source, 'autoresume', 'autoresume: true finds the latest checkpoint by save_latest_filename, '
                          'which is null.', "set save_latest_filename: 'latest-rank{rank}.pt', or autoresume: false.")
    _check_parallelism(raw.get('parallelism'), source)


def _fsdp_settings() -> tuple[set, set]:
    """The settings of Composer's FSDP (v1) config and of its FSDP2 config."""

    v1 = {f.name for f in dataclasses.fields(FSDPConfig) if not f.name.startswith('_')}
    return v1, FSDP2Config.settable_attrs() - {'device_mesh'}


# FSDP (v1) sharding strategies -> FSDP2's reshard_after_forward (None: no FSDP2 equivalent, see fsdp2_settings).
FSDP_SHARDING_STRATEGIES = {'FULL_SHARD': True, 'SHARD_GRAD_OP': False, 'NO_SHARD': None, 'HYBRID_SHARD': None,
                            '_HYBRID_SHARD_ZERO2': None}
_FSDP2_MIXED_PRECISION = ('DEFAULT', 'PURE', 'FULL')


def fsdp_version(device: str) -> int:
    """The FSDP version a ``parallelism.fsdp`` mapping selects on ``device`` (``'cpu'``, ``'gpu'``, ``'mps'``).

    FSDP (v1) needs CUDA, so off a GPU it is FSDP2 (Composer 0.32's FSDP2 runs on CPU with gloo); on a GPU it is
    FSDP (v1), Composer's default, unless ``FSDP_VERSION=2`` is set in the environment (as Composer reads it).

    Example:
        >>> fsdp_version('cpu')
        2
    """
    return 2 if device != 'gpu' or os.environ.get('FSDP_VERSION', '1') == '2' else 1


def fsdp2_settings(fsdp: dict, source: str = '<config>') -> dict:
    """The ``FSDP2Config`` keyword arguments of a YAML's ``parallelism.fsdp`` mapping (written in FSDP v1 terms).

    ``sharding_strategy: FULL_SHARD`` becomes ``reshard_after_forward: true`` and ``SHARD_GRAD_OP`` ``false``;
    ``state_dict_type`` (``full``/``sharded``), ``mixed_precision`` (``DEFAULT``/``PURE``/``FULL``),
    ``activation_checkpointing`` and the other FSDP2 settings pass unchanged. What FSDP2 cannot do is a
    :class:`ConfigError` naming the key and the fix, instead of Composer's warning that drops it: ``NO_SHARD`` and the
    hybrid strategies, and FSDP (v1)-only settings (``cpu_offload``, ``backward_prefetch``, ...).

    Example:
        >>> fsdp2_settings({'sharding_strategy': 'SHARD_GRAD_OP', 'state_dict_type': 'sharded'})
        {'reshard_after_forward': False, 'state_dict_type': 'sharded'}
    """
    settings = {}
    _, v2 = _fsdp_settings()
    for name, value in fsdp.items():
        key = f'parallelism.fsdp.{name}'
        if name == 'sharding_strategy':
            strategy = str(value).upper()
            if strategy == 'NO_SHARD':
                raise ConfigError(source, key, 'NO_SHARD replicates the whole model on every rank, which FSDP2 does '
                                  'not do (it always shards).', 'remove parallelism for data parallelism (DDP), or '
                                  'use sharding_strategy: FULL_SHARD or SHARD_GRAD_OP.')
            if FSDP_SHARDING_STRATEGIES.get(strategy) is None:
                raise ConfigError(source, key, f'{value!r} has no FSDP2 equivalent in this runner (hybrid sharding needs '
                                  'a 2-D device mesh).', 'use sharding_strategy: FULL_SHARD (reshard after forward) or '
                                  'SHARD_GRAD_OP (keep parameters gathered until backward).')
            reshard = FSDP_SHARDING_STRATEGIES[strategy]
            if fsdp.get('reshard_after_forward', reshard) != reshard:
                raise ConfigError(source, key, f'{value!r} means reshard_after_forward: {str(reshard).lower()}, but '
                                  f'reshard_after_forward is {fsdp["reshard_after_forward"]!r}.',
                                  'set only one of sharding_strategy and reshard_after_forward.')
            settings['reshard_after_forward'] = reshard
        elif name == 'mixed_precision' and value not in _FSDP2_MIXED_PRECISION:
            raise ConfigError(source, key, f'{value!r} is not an FSDP2 mixed precision.',
                              f'use one of {", ".join(_FSDP2_MIXED_PRECISION)} (FSDP2 takes no per-dtype mapping).')
        elif name == 'state_dict_type' and value not in ('full', 'sharded'):
            raise ConfigError(source, key, f'{value!r} is not an FSDP2 state dict type.',
                              "use state_dict_type: sharded (a directory of shards) or full (one file).")
        elif name not in v2:
            raise ConfigError(source, key, f'{name!r} is an FSDP (v1) setting; this run uses FSDP2, which has no such '
                              'setting.', f'remove it (FSDP2 settings: {", ".join(sorted(v2))}; sharding_strategy '
                              'FULL_SHARD/SHARD_GRAD_OP is mapped), or run FSDP (v1) on a GPU.')
        else:
            settings[name] = value
    return settings


def _check_parallelism(parallelism: Optional[dict], source: str) -> None:
    if parallelism is None:
        return
    settings = {'fsdp': set().union(*_fsdp_settings()),
                'tp': {f.name for f in dataclasses.fields(TPConfig)} - {'device_mesh', 'layer_plan'}}
    for part, value in parallelism.items():
        if part not in settings:
            raise ConfigError(source, f'parallelism.{part}', f'unknown parallelism {part!r}.',
                              'use `parallelism: {fsdp: {...}}` (and/or `tp: {...}`), or null.')
        if value is None:
            continue
        if not isinstance(value, dict):
            raise ConfigError(source, f'parallelism.{part}', f'expected a mapping of settings, got {value!r}.',
                              f'write e.g. `parallelism: {{{part}: {{}}}}`.')
        for name in value:
            if name not in settings[part]:
                close = difflib.get_close_matches(name, settings[part], n=1)
                hint = f"did you mean '{close[0]}'? " if close else ''
                raise ConfigError(source, f'parallelism.{part}.{name}', f'{name!r} is not a Composer {part} setting.',
                                  f'{hint}Valid settings: {", ".join(sorted(settings[part]))}.')
        strategy = value.get('sharding_strategy') if part == 'fsdp' else None
        if strategy is not None and str(strategy).upper() not in FSDP_SHARDING_STRATEGIES:
            raise ConfigError(source, 'parallelism.fsdp.sharding_strategy', f'{strategy!r} is not a sharding strategy.',
                              f'use one of {", ".join(s for s in FSDP_SHARDING_STRATEGIES if not s.startswith("_"))}.')


def _time_arguments(fn: Callable, kwargs: dict) -> dict[str, Any]:
    """The arguments of ``kwargs`` that ``fn`` takes as Composer times."""
    hints = _resolved_hints(fn)
    return {n: v for n, v in kwargs.items() if n in hints and _annotation_allows_time(hints[n]) and is_time(v)}


def _component_sections(raw: dict) -> list[tuple[str, registry.Registry, str, dict]]:
    """``(key, registry, name, kwargs)`` of every optimizer, scheduler, algorithm and callback in the config."""
    sections = []
    for key, reg in (('optimizer', registry.optimizers), ('scheduler', registry.schedulers)):
        if raw.get(key) is not None:
            sections.append((key, reg, raw[key]['name'], {k: v for k, v in raw[key].items() if k != 'name'}))
    for key, reg in (('algorithms', registry.algorithms), ('callbacks', registry.callbacks)):
        for name, kwargs in (raw.get(key) or {}).items():
            sections.append((f'{key}.{name}', reg, name, kwargs or {}))
    return sections


def _check_token_times(raw: dict, source: str) -> None:
    """A token time never arrives when the train loader yields no tokens: Composer would train (or wait) forever."""

    loader = raw['train_loader']['name']
    if loader not in registry.DATALOADERS_WITHOUT_TOKENS:
        return
    times = {key: raw[key] for key in ('max_duration', *_INTERVALS) if key in raw}
    for key, reg, name, kwargs in _component_sections(raw):
        times.update({f'{key}.{n}': v for n, v in _time_arguments(reg.get(name), kwargs).items()})
    for key, value in times.items():
        if isinstance(value, str) and trainer_time(value, key).unit == TimeUnit.TOKEN:
            raise ConfigError(source, key, f'{value!r} counts tokens, but the train loader {loader!r} yields none (its '
                              "batches are images), so Composer's token count never advances.",
                              f'count batches, samples or epochs instead, e.g. {key}: 1000ba.')


def _loader_domains(section: dict) -> Optional[list[str]]:
    """The domains a ``text_mixture`` train loader reads (see ``build_mixture_dataloader``), or None if unknown."""
    if section['name'] != 'text_mixture':
        return None
    if isinstance(section.get('local'), dict):
        return [str(d) for d in section['local']]
    domains = section.get('domains')
    if domains is None or domains == 'all':
        return list(DOMAINS)  # the embedded corpus's default config holds every domain
    return [domains] if isinstance(domains, str) else [str(d) for d in domains]


def _check_upsampling_domains(raw: dict, source: str) -> None:
    section = (raw.get('algorithms') or {}).get('domain_upsampling')
    domains = _loader_domains(raw['train_loader'])
    if not isinstance(section, dict) or domains is None:
        return
    key = 'algorithms.domain_upsampling'
    mixes = {f'{key}.{part}': section.get(part) for part in ('base', 'target')}
    if isinstance(section.get('schedule'), dict):
        mixes.update({f'{key}.schedule.{part}': section['schedule'].get(part) for part in ('base', 'target')})
    for mix_key, mix in mixes.items():
        if not isinstance(mix, dict):
            continue
        missing = [d for d in mix if d not in domains]
        if missing:
            raise ConfigError(source, mix_key, f'the mix names {missing}, which the train loader does not read (its '
                              f'domains: {domains}).', f'remove {missing} from {mix_key}, or add them to '
                              'train_loader.domains (or train_loader.local).')


def _check_pruning_exclude(raw: dict, source: str) -> None:
    section = (raw.get('algorithms') or {}).get('magnitude_pruning')
    exclude = section.get('exclude') if isinstance(section, dict) else None
    if not isinstance(exclude, (list, tuple)):
        return
    # fnmatch: a pattern of `*` alone matches every module name, so no layer would be left to prune
    everything = [p for p in exclude if isinstance(p, str) and p and set(p) == {'*'}]
    if everything:
        raise ConfigError(source, 'algorithms.magnitude_pruning.exclude', f'the pattern {everything[0]!r} in '
                          f'exclude={list(exclude)!r} matches every layer, so nothing would be pruned.',
                          "list only the layers to keep dense, e.g. exclude: ['module.features.0'], or remove the "
                          'magnitude_pruning algorithm.')


def _dummy_parameters() -> list:
    return [torch.nn.Parameter(torch.zeros(1))]


def _argument_in(message: str, kwargs: dict) -> Optional[str]:
    """The argument of ``kwargs`` that an error message is about (torch's optimizers spell some out)."""
    spelled = {'learning rate': 'lr', 'epsilon': 'eps', 'beta parameter': 'betas'}
    for words, name in spelled.items():
        if words in message.lower() and name in kwargs:
            return name
    return next((n for n in kwargs if re.search(rf'\b{re.escape(n)}\b', message)), None)


def _check_construction(raw: dict, source: str) -> None:
    """Construct the optimizer (on a dummy parameter), the scheduler and the plain-class algorithms and callbacks once,
    so that their own range checks (a negative lr, a sparsity above 1) run before any model or dataset is built.

    Builders that take ``context`` need the model and are checked when they run.
    """
    for key, reg, name, kwargs in _component_sections(raw):
        target = reg.get(name)
        if 'context' in inspect.signature(target).parameters:
            continue
        args = (_dummy_parameters(),) if reg is registry.optimizers else ()
        try:
            with warnings.catch_warnings():  # the real construction warns again, where it belongs
                warnings.simplefilter('ignore')
                target(*args, **kwargs)
        except (ValueError, TypeError) as err:
            argument = _argument_in(str(err), kwargs)
            where = f'{key}.{argument}' if argument else key
            value = f' (got {argument}={kwargs[argument]!r})' if argument else ''
            raise ConfigError(source, where, f'{reg.kind} {name!r} refuses these arguments{value}: {err}',
                              f'correct {where}.') from None


def _check_consistency(raw: dict, source: str) -> None:
    """Checks that read two sections together: what the train loader yields against the times and the algorithms."""
    _check_token_times(raw, source)
    _check_upsampling_domains(raw, source)
    _check_pruning_exclude(raw, source)
    _check_distillation_cache_ids(raw, source)


def _check_distillation_cache_ids(raw: dict, source: str) -> None:
    section = (raw.get('algorithms') or {}).get('knowledge_distillation')
    loader = raw.get('train_loader')
    if not isinstance(section, dict) or section.get('cache') is None or not isinstance(loader, dict):
        return
    # The cache is keyed by sample id; an image loader carries ids only when asked (other loaders are checked
    # when the run starts, where their dataset is known).
    if loader.get('name') == 'image' and not loader.get('sample_ids', False):
        raise ConfigError(source, 'train_loader.sample_ids', f'algorithms.knowledge_distillation.cache='
                          f"{section['cache']!r} stores teacher outputs per sample id, but the image train_loader "
                          f"does not carry ids (sample_ids={loader.get('sample_ids', False)!r}).",
                          'add `sample_ids: true` to train_loader, or remove knowledge_distillation.cache.')


# --- this machine and the disk: devices, installed packages, checkpoints ----------------------------------


def resolve_device(device: str) -> str:
    """``auto`` -> ``gpu`` when CUDA is available, else ``cpu``; other values pass through."""

    if device == 'auto':
        return 'gpu' if torch.cuda.is_available() else 'cpu'
    return device


def resolve_precision(precision: Optional[str], device: str) -> str:
    """Default precision: bf16 autocast on GPU, fp32 elsewhere."""
    return precision or ('amp_bf16' if device == 'gpu' else 'fp32')


def _local(path: str) -> bool:
    return '://' not in path


def _check_load_path(config: RunConfig, run_name: str) -> None:
    if config.load_path is None or not _local(config.load_path):
        return
    path = format_name_with_dist(config.load_path, run_name)
    if os.path.isdir(path):
        if config.parallelism:
            return  # a sharded (FSDP) checkpoint is a directory
        raise ConfigError(config.source, 'load_path', f'{path!r} is a directory, not a checkpoint file.',
                          f"point load_path at the file inside it, e.g. {os.path.join(path, 'latest-rank0.pt')}.")
    if not os.path.exists(path):
        raise ConfigError(config.source, 'load_path', f'{path!r} does not exist.', 'train that run first, or correct '
                          'the path (e.g. runs/<run>/checkpoints/latest-rank0.pt), or set load_path: null.')
    problem = checkpoint_problem(path)
    if problem:
        raise ConfigError(config.source, 'load_path', f'{path!r} is not a checkpoint ({problem}).',
                          'point load_path at a checkpoint that Composer saved (e.g. runs/<run>/checkpoints/'
                          'latest-rank0.pt), or set load_path: null.')


def _check_autoresume(config: RunConfig, run_name: Optional[str]) -> bool:
    """Whether the run resumes from an intact latest checkpoint in save_folder; a damaged one raises."""

    if not config.autoresume:
        return False
    if run_name is None:
        raise ConfigError(config.source, 'autoresume', 'autoresume: true finds its checkpoints by the run name, and '
                          'run_name is not set (nor $COMPOSER_RUN_NAME / $RUN_NAME).',
                          'set run_name (the same in every resumed run), or autoresume: false.')
    assert config.save_folder is not None and config.save_latest_filename is not None  # _check_values
    if not _local(config.save_folder):
        return False
    folder = format_name_with_dist(config.save_folder, run_name)
    latest = os.path.join(folder, format_name_with_dist(config.save_latest_filename, run_name))
    if not os.path.isfile(latest):
        return False  # a first run: nothing to resume
    damaged = os.path.realpath(latest)
    problem = checkpoint_problem(damaged)
    if not problem:
        return True
    others = [os.path.join(folder, n) for n in os.listdir(folder)]
    others = sorted((p for p in others if os.path.isfile(p) and not os.path.islink(p) and
                     os.path.realpath(p) != damaged and os.path.splitext(p)[1] == os.path.splitext(damaged)[1] and
                     not checkpoint_problem(p)), key=os.path.getmtime, reverse=True)
    undo = f'delete {damaged!r}' + (f' and the link {latest!r}' if os.path.islink(latest) else '')
    if others:
        fix = (f'{undo}, then link {latest!r} to the previous checkpoint {others[0]!r} (ln -sfn '
               f'{os.path.basename(others[0])} {latest}) to resume from there; or set autoresume: false.')
    else:
        fix = f'{undo} to start the run over (there is no earlier checkpoint), or set autoresume: false.'
    raise ConfigError(config.source, 'autoresume', f'the latest checkpoint {damaged!r} is damaged ({problem}), so the '
                      'run cannot resume from it.', fix)


def check_environment(config: RunConfig) -> None:
    """The checks of a validated config that depend on this machine and the disk, run before anything is built.

    The device must exist, the precision and microbatching must suit it, ``parallelism.fsdp`` must suit the FSDP
    version the device selects (:func:`fsdp_version`, :func:`fsdp2_settings`), every logger's
    package must be installed, ``load_path`` must be a checkpoint, and ``autoresume`` must find an intact one.
    Raises :class:`ConfigError` naming the key and the fix.

    Example:
        >>> check_environment(load_config('yamls/quickstart.yaml', ['device=cpu']))
    """

    source = config.source
    if config.device == 'gpu' and not torch.cuda.is_available():
        raise ConfigError(source, 'device', "'gpu' but CUDA is not available on this machine.",
                          'set device: auto (the GPU when there is one, else the CPU) or device: cpu.')
    if config.device == 'mps' and not torch.backends.mps.is_available():
        raise ConfigError(source, 'device', "'mps' but Apple's MPS is not available on this machine.",
                          'set device: auto or device: cpu.')
    device = resolve_device(config.device)
    if device != 'gpu' and config.precision not in (None, 'fp32'):
        raise ConfigError(source, 'precision', f'{config.precision!r} needs a GPU; this run is on {device.upper()} '
                          f'(device: {config.device}).', 'set precision: fp32 (or null for the default), or run on a '
                          'GPU.')
    if device != 'gpu' and config.device_train_microbatch_size == 'auto':
        raise ConfigError(source, 'device_train_microbatch_size', "'auto' needs a GPU (it adapts to CUDA "
                          f'out-of-memory errors); this run is on {device.upper()}.', 'set an int >= 1, e.g. '
                          'device_train_microbatch_size: 4, or null.')
    fsdp = (config.parallelism or {}).get('fsdp')
    if fsdp is not None and fsdp_version(device) == 2:  # off a GPU, or FSDP_VERSION=2: FSDP2 (runner.py builds it)
        fsdp2_settings(fsdp, source)
    elif fsdp is not None:
        v1, _ = _fsdp_settings()
        only_v2 = sorted(set(fsdp) - v1)
        if only_v2:
            raise ConfigError(source, f'parallelism.fsdp.{only_v2[0]}', f'{only_v2[0]!r} is an FSDP2 setting, and '
                              'FSDP (v1) is selected.', 'set FSDP_VERSION=2 in the environment, or remove it.')
    for name in config.loggers or {}:
        if name in registry.LOGGER_PACKAGES:
            module, package = registry.LOGGER_PACKAGES[name]
            if importlib.util.find_spec(module) is None:
                raise ConfigError(source, f'loggers.{name}', f'loggers.{name} needs the `{package}` package.',
                                  f'pip install {package} (or remove loggers.{name}).')
    run_name = config.run_name or os.environ.get('COMPOSER_RUN_NAME') or os.environ.get('RUN_NAME')
    if not _check_autoresume(config, run_name):
        _check_load_path(config, run_name or '')  # Composer ignores load_path when it resumes


def load_config(path: Union[str, Path], overrides: Sequence[str] = ()) -> RunConfig:
    """Load, override, resolve and validate a run YAML. Raises :class:`ConfigError` on any problem.

    One pass over the whole config, before anything is built: syntax, keys and types, registered names and their
    arguments, then the values that Composer or a technique would refuse later (times, precision, microbatching,
    parallelism settings, range checks of the optimizer, scheduler and algorithms) and the sections read together
    (token times on data without tokens, mixes naming domains the loader lacks, pruning that excludes every layer).
    What depends on this machine and the disk is checked by :func:`check_environment`, which the runner calls next.
    """
    path = Path(path)
    source = str(path)
    cfg = apply_overrides(load_yaml(path), overrides, source)
    raw = to_container(cfg, source)
    _check_top_level(raw, source)
    for key, reg in _SECTION_REGISTRIES.items():
        if raw.get(key) is not None:
            _check_section(raw[key], source, key, reg)
    if raw.get('eval_loaders') is not None:
        _check_eval_loaders(raw['eval_loaders'], source)
    for key, reg in _NAMED_REGISTRIES.items():
        entries = raw.get(key)
        if entries is None:
            continue
        if not isinstance(entries, dict):
            raise ConfigError(source, key, f'expected a mapping of {reg.kind} name -> arguments, got {entries!r}.',
                              f'write `{key}: {{{reg.names()[0]}: {{}}}}`.')
        for name, kwargs in entries.items():
            _check_section(kwargs, source, f'{key}.{name}', reg, named=name)
    _check_values(raw, source)
    _check_consistency(raw, source)
    _check_construction(raw, source)
    return RunConfig(**raw, source=source)
