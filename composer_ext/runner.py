"""Turn a validated :class:`~composer_ext.config.RunConfig` into a Composer ``Trainer`` and run it.

Every component comes from :mod:`composer_ext.registry`. The same config runs on one CPU process or under
Composer's launcher (``composer -n N -m composer_ext.cli run ...``): batch sizes in the config are global
and split over ranks, ``device: auto`` picks the GPU when there is one, and the process group is gloo on
CPU and NCCL on GPU.
"""

from __future__ import annotations

import inspect
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from composer_ext import registry
from composer_ext.config import (ConfigError, RunConfig, check_environment, fsdp2_settings, fsdp_version, load_config,
                                 resolve_device, resolve_precision, validate_arguments)
from composer_ext.data.tokenizer import load_tokenizer

# resolve_device/resolve_precision live in config (the validator needs them) and stay importable from here.
__all__ = ['FSDP2GlooGradientWarning', 'RunContext', 'RunResult', 'fsdp2_on_gloo', 'build_trainer', 'final_eval_metrics', 'run', 'resolve_device',
           'resolve_precision', 'trainer_parallelism']


@dataclass
class RunContext:
    """What a YAML builder that takes ``context`` can use: the config, the model, nested builders."""

    config: RunConfig
    device: str
    model: Any = None
    extras: dict = field(default_factory=dict)

    @property
    def tokenizer(self):
        """The model's tokenizer, or the embedded corpus tokenizer."""
        tokenizer = getattr(self.model, 'tokenizer', None)
        if tokenizer is None:
            tokenizer = load_tokenizer()
        return tokenizer

    def build(self, reg: registry.Registry, section: dict, key: str, **injected: Any) -> Any:
        """Build ``{'name': ..., **kwargs}`` from ``reg`` (validated first; errors name ``key``)."""
        if not isinstance(section, dict) or 'name' not in section:
            raise ConfigError(self.config.source, key, f'expected a mapping with a `name`, got {section!r}.',
                              f'valid names: {", ".join(reg.names())}.')
        kwargs = {k: v for k, v in section.items() if k != 'name'}
        return self.call(reg, section['name'], kwargs, key, **injected)

    def call(self, reg: registry.Registry, name: str, kwargs: dict, key: str, **injected: Any) -> Any:
        if name not in reg:
            raise ConfigError(self.config.source, key, str(reg.unknown(name)), 'use one of the valid names.')
        target = reg.get(name)
        validate_arguments(target, kwargs, self.config.source, key, f'{reg.kind} {name!r}', exclude=tuple(injected))
        if 'context' in inspect.signature(target).parameters:
            injected['context'] = self
        try:
            return target(**injected, **kwargs)
        except (ValueError, TypeError) as err:
            if isinstance(err, ConfigError):
                raise
            raise ConfigError(self.config.source, key, str(err), 'correct the argument named above.') from err

    def build_model(self, section: dict, key: str = 'model'):
        """Build a model section (also used for teachers and reference models)."""
        return self.build(registry.models, section, key)

    def build_dataloader(self, section: dict, key: str = 'dataloader'):
        """Build a dataloader section; ``*_evaluators`` builders return a list of Evaluators instead."""
        return self.build(registry.dataloaders, section, key)


@dataclass
class RunResult:
    """What :func:`run` returns: the trainer (after ``fit``) and the last value of each eval metric."""

    trainer: Any
    eval_metrics: dict[str, float]


def _evaluators(context: RunContext) -> list:
    from composer.core import Evaluator

    evaluators = []
    for i, section in enumerate(context.config.eval_loaders or []):
        label = section.get('label', 'eval')
        built = context.build_dataloader({k: v for k, v in section.items() if k != 'label'}, f'eval_loaders[{i}]')
        if isinstance(built, list):
            evaluators.extend(built)
        else:
            evaluators.append(Evaluator(label=label, dataloader=built))
    return evaluators


def _named(context: RunContext, reg: registry.Registry, entries: Optional[dict], key: str) -> list:
    return [context.call(reg, name, kwargs or {}, f'{key}.{name}') for name, kwargs in (entries or {}).items()]


class FSDP2GlooGradientWarning(UserWarning):
    """FSDP2 on gloo (CPU) sums gradients over ranks where DDP, and FSDP2 on NCCL, average them."""


def fsdp2_on_gloo(config: RunConfig, device: str, world_size: int) -> bool:
    """Whether this run shards with FSDP2 over a gloo process group of several ranks.

    torch's FSDP2 reduce-scatters gradients with ``ReduceOp.AVG``; gloo has no AVG and sums instead (its own
    ``set_reduce_scatter_divide_factor`` is NCCL-only), so SGD-type optimizers step ``world_size`` times further than
    under DDP at the same learning rate (measured: FSDP2 at lr/2 on 2 ranks equals DDP at lr, bit for bit; see
    tests/test_fsdp2.py).
    """
    fsdp = (config.parallelism or {}).get('fsdp')
    return fsdp is not None and fsdp_version(device) == 2 and device == 'cpu' and world_size > 1


def trainer_parallelism(config: RunConfig, device: str) -> Optional[dict]:
    """The Trainer's ``parallelism_config`` for this run: ``parallelism.fsdp`` as an ``FSDP2Config`` where FSDP2 is
    selected (:func:`composer_ext.config.fsdp_version`: off a GPU, or with ``FSDP_VERSION=2``), with the README's FSDP
    keys mapped (:func:`composer_ext.config.fsdp2_settings`); otherwise the section as written (FSDP v1 on a GPU).

    Building the ``FSDP2Config`` here, instead of letting Composer's ``FSDP2Config.from_compatible_attrs`` read the
    mapping, keeps ``sharding_strategy`` (which it drops with a warning) and makes FSDP2 on CPU work without
    ``FSDP_VERSION=2``. Composer's ``'FSDP2 Config/APIs are experimental'`` warning is not shown: it fires on every
    FSDP2 run and says nothing about this run (the README says which FSDP2 behaviour was tested).
    """
    parallelism = config.parallelism
    fsdp = (parallelism or {}).get('fsdp')
    if fsdp is None or fsdp_version(device) != 2:
        return parallelism
    from composer.utils.parallelism import FSDP2Config  # composer: heavy, only for sharded runs

    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='FSDP2 Config/APIs are experimental', category=UserWarning)
        fsdp2 = FSDP2Config(**fsdp2_settings(fsdp, config.source))
    return {**parallelism, 'fsdp': fsdp2}


def build_trainer(config: RunConfig, extra_loggers: Optional[list] = None):
    """Build the model, data, optimizer, scheduler, algorithms, callbacks and loggers; return the Trainer.

    First checks what the config needs of this machine and the disk (:func:`~composer_ext.config.check_environment`),
    so that nothing is built for a run that cannot start.
    """
    from composer import Trainer
    from composer.utils import dist, reproducibility

    check_environment(config)
    device = resolve_device(config.device)
    dist.initialize_dist(device, timeout=config.dist_timeout)
    if fsdp2_on_gloo(config, device, dist.get_world_size()):
        world = dist.get_world_size()
        warnings.warn(FSDP2GlooGradientWarning(
            f'parallelism.fsdp runs as FSDP2 on CPU: gloo sums the {world} ranks\' gradients where DDP (and '
            f'FSDP2 on NCCL GPUs) averages them, so an SGD-type optimizer steps {world}x further than the same '
            f'optimizer.lr under DDP. Fix: divide optimizer.lr by {world} for this CPU run (Adam-type updates are '
            f'nearly scale-invariant, but their eps and gradient clipping are not), or train with DDP (no '
            f'parallelism) on CPU.'), stacklevel=2)
    reproducibility.seed_all(config.seed)  # the model's initial weights depend on the seed, as does the Trainer

    context = RunContext(config=config, device=device)
    context.model = context.build_model(config.model)
    train_dataloader = context.build_dataloader(config.train_loader, 'train_loader')
    evaluators = _evaluators(context)
    optimizer = None
    if config.optimizer is not None:
        optimizer = context.build(registry.optimizers, config.optimizer, 'optimizer',
                                  params=context.model.parameters())
    schedulers = context.build(registry.schedulers, config.scheduler, 'scheduler') if config.scheduler else None
    algorithms = _named(context, registry.algorithms, config.algorithms, 'algorithms')
    callbacks = _named(context, registry.callbacks, config.callbacks, 'callbacks')
    loggers = _named(context, registry.loggers, config.loggers, 'loggers') + list(extra_loggers or [])

    return Trainer(
        model=context.model,
        train_dataloader=train_dataloader,
        eval_dataloader=evaluators or None,
        eval_interval=config.eval_interval,
        eval_subset_num_batches=config.eval_subset_num_batches,
        max_duration=config.max_duration,
        optimizers=optimizer,
        schedulers=schedulers,
        step_schedulers_every_batch=config.step_schedulers_every_batch,
        algorithms=algorithms,
        callbacks=callbacks,
        loggers=loggers,
        run_name=config.run_name,
        seed=config.seed,
        device=device,
        precision=resolve_precision(config.precision, device),
        device_train_microbatch_size=config.device_train_microbatch_size,
        parallelism_config=trainer_parallelism(config, device),
        save_folder=config.save_folder,
        save_interval=config.save_interval,
        save_filename=config.save_filename,
        save_latest_filename=config.save_latest_filename,
        save_overwrite=config.save_overwrite,
        save_num_checkpoints_to_keep=config.save_num_checkpoints_to_keep,
        save_weights_only=config.save_weights_only,
        load_path=config.load_path,
        load_weights_only=config.load_weights_only,
        load_strict_model_weights=config.load_strict_model_weights,
        autoresume=config.autoresume,
        progress_bar=config.progress_bar,
        log_to_console=config.log_to_console,
        console_log_interval=config.console_log_interval,
        dist_timeout=config.dist_timeout,
        python_log_level=config.python_log_level,
    )


def final_eval_metrics(state) -> dict[str, float]:
    """``metrics/<label>/<name>`` -> the value computed at the last evaluation (already reduced over ranks)."""
    values = {}
    for label, metrics in state.eval_metrics.items():
        for name, metric in metrics.items():
            if getattr(metric, '_computed', None) is not None:  # computed and cached by the last eval
                values[f'metrics/{label}/{name}'] = float(metric._computed)
    return values


def format_eval_table(metrics: dict[str, float]) -> str:
    """A plain-text table of ``metrics/<label>/<metric>`` values, one row per label."""
    rows: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        _, label, name = key.split('/', 2)
        rows.setdefault(label, {})[name] = value
    names = sorted({n for row in rows.values() for n in row})
    width = max([len('eval'), *(len(label) for label in rows)])
    lines = ['  '.join([f'{"eval":<{width}}'] + [f'{n:>22}' for n in names])]
    for label in sorted(rows):
        cells = [f'{rows[label][n]:>22.4f}' if n in rows[label] else f'{"-":>22}' for n in names]
        lines.append('  '.join([f'{label:<{width}}'] + cells))
    return '\n'.join(lines)


def run(config: Union[RunConfig, str], overrides: tuple[str, ...] = (), stream=sys.stdout) -> RunResult:
    """Validate and run a config (a :class:`RunConfig` or a YAML path); print the final eval table on rank 0."""
    from composer.utils import dist

    if not isinstance(config, RunConfig):
        config = load_config(config, overrides)
    trainer = build_trainer(config)
    trainer.fit()
    metrics = final_eval_metrics(trainer.state)
    if metrics and dist.get_global_rank() == 0:
        print(f'\nFinal eval metrics ({config.run_name or trainer.state.run_name}, '
              f'{trainer.state.timestamp.batch.value} batches):', file=stream)
        print(format_eval_table(metrics), file=stream, flush=True)
    return RunResult(trainer=trainer, eval_metrics=metrics)


def configure_parser(parser) -> None:
    """Arguments of ``composer-ext run``."""
    parser.add_argument('config', help='the run YAML (see yamls/)')
    parser.add_argument('overrides', nargs='*', metavar='key=value',
                        help='dotted overrides applied after loading, e.g. max_duration=20ba optimizer.lr=0.01')


def cli_main(args) -> int:
    result = run(args.config, tuple(args.overrides))
    # Flush the loggers and release the dataloaders now (Composer would otherwise wait for interpreter exit,
    # which never comes when the CLI is called in-process).
    result.trainer.close()
    return 0
