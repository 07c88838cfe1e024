"""Run configs: load a YAML file with omegaconf (dotlist overrides, interpolation) and validate all of it.

Validation happens before anything is built or trained: the YAML must parse, every top-level key must be
known and of the right type, every component ``name`` must be in :mod:`composer_ext.registry`, and every
component argument must exist in the constructor's signature with a value of the annotated type. Each
problem raises :class:`ConfigError`, which names the file, the key and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

from composer_ext import registry

__all__ = ['ConfigError', 'RunConfig', 'load_config', 'validate_arguments', 'accepts']


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


def _is_time(annotation: Any) -> bool:
    return getattr(annotation, '__name__', None) == 'Time' and 'composer' in getattr(annotation, '__module__', '')


def accepts(value: Any, annotation: Any) -> bool:
    """Whether a YAML value can be passed to a parameter annotated ``annotation`` (permissive when unsure)."""
    if annotation in (inspect.Parameter.empty, Any, object) or isinstance(annotation, (str, typing.ForwardRef)):
        return True
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        if isinstance(value, str) and _annotation_allows_time(annotation):
            return _valid_time(value)  # `Union[str, Time]` means a time string, not any string
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
    if _is_time(annotation):
        return _valid_time(value)
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


def _valid_time(value: Any) -> bool:
    from composer.core import Time
    if isinstance(value, int) and not isinstance(value, bool):
        return True
    if not isinstance(value, str):
        return False
    try:
        Time.from_timestring(value)
    except ValueError:
        return False
    return True


def _annotation_allows_time(annotation: Any) -> bool:
    if _is_time(annotation):
        return True
    return any(_is_time(a) for a in typing.get_args(annotation))


def _resolved_hints(fn: Callable) -> dict[str, Any]:
    target = fn.__init__ if inspect.isclass(fn) else fn
    try:
        return typing.get_type_hints(target)
    except Exception:  # unresolvable forward references: fall back to the unchecked raw annotations
        return {}


def validate_arguments(fn: Callable, kwargs: dict, source: str, key: str, what: str,
                       exclude: Sequence[str] = ()) -> None:
    """Check ``kwargs`` against ``fn``'s signature: unknown names, missing required ones, wrong types.

    ``exclude`` names parameters that the runner supplies itself (e.g. an optimizer's ``params``).
    """
    signature = inspect.signature(fn)
    skipped = {'self', 'context', *exclude}
    params = {n: p for n, p in signature.parameters.items()
              if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and n not in skipped}
    takes_any = any(p.kind == p.VAR_KEYWORD for p in signature.parameters.values())
    hints = _resolved_hints(fn)
    for name, value in kwargs.items():
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


def _load_yaml(path: Path):
    import yaml
    from omegaconf import OmegaConf

    if not path.exists():
        raise ConfigError(str(path), '', 'the config file does not exist.', 'pass the path of a YAML file, '
                          'e.g. yamls/quickstart.yaml.')
    try:
        cfg = OmegaConf.load(path)
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


def _apply_overrides(cfg, overrides: Sequence[str], source: str):
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


def _to_container(cfg, source: str) -> dict:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as err:
        key = getattr(err, 'full_key', '') or ''
        raise ConfigError(source, key, f'an interpolation cannot be resolved ({err.msg if hasattr(err, "msg") else err}).',
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
        if not accepts(raw[name], annotation):
            raise ConfigError(source, name, f'expected {_type_name(annotation)}, got {type(raw[name]).__name__} '
                              f'{raw[name]!r}.', f'set {name} to a value of type {_type_name(annotation)}.')
    for name in ('max_duration', 'eval_interval', 'save_interval', 'console_log_interval'):
        if isinstance(raw.get(name), str) and not _valid_time(raw[name]):
            raise ConfigError(source, name, f'{raw[name]!r} is not a Composer time.',
                              f"write e.g. '1000ba', '2ep', '1e6tok' or '0.5dur'.")
    if raw.get('device', 'auto') not in ('auto', 'cpu', 'gpu', 'mps'):
        raise ConfigError(source, 'device', f'unknown device {raw["device"]!r}.', "use 'auto', 'cpu', 'gpu' or 'mps'.")


def load_config(path: Union[str, Path], overrides: Sequence[str] = ()) -> RunConfig:
    """Load, override, resolve and validate a run YAML. Raises :class:`ConfigError` on any problem."""
    path = Path(path)
    source = str(path)
    cfg = _apply_overrides(_load_yaml(path), overrides, source)
    raw = _to_container(cfg, source)
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
    return RunConfig(**raw, source=source)
