"""Every name a YAML config can use, and the llm-foundry entry points of our Algorithms and Callbacks.

Entries are lazy ``'module:attribute'`` strings, so importing this module imports nothing heavy, and
``setup.py`` reads :data:`ALGORITHMS` and :data:`CALLBACKS` (plain literals) to declare the entry-point
groups ``llmfoundry_algorithms`` and ``llmfoundry_callbacks``; likewise :data:`CALLBACKS_WITH_CONFIG`
(``llmfoundry_callbacks_with_config``: llm-foundry passes these the run config as ``train_config``, which is how a
probe builds its evaluators and reference model from llm-foundry sections) and :data:`FOUNDRY_DATALOADERS`
(``llmfoundry_dataloaders``, called with llm-foundry's ``(tokenizer, device_batch_size, **section)``). Keep those
dicts literal.

A YAML entry is built by calling its target with the entry's keyword arguments. When the target has a
parameter named ``context``, it also receives the :class:`composer_ext.runner.RunContext` (the model,
tokenizer, and builders for nested models and dataloaders), which is how YAML-only builders construct
objects that a config cannot spell directly (teachers, evaluators).

Add your own components at run time::

    from composer_ext import registry
    registry.algorithms.register('my_algorithm', MyAlgorithm)
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any, Callable, Union

__all__ = [
    'ALGORITHMS',
    'CALLBACKS',
    'CALLBACKS_WITH_CONFIG',
    'FOUNDRY_DATALOADERS',
    'DATALOADERS_WITHOUT_TOKENS',
    'LOGGER_PACKAGES',
    'Registry',
    'UnknownNameError',
    'algorithms',
    'callbacks',
    'dataloaders',
    'loggers',
    'models',
    'optimizers',
    'schedulers',
]

# Our Algorithms and Callbacks (class paths). These two literals are the llm-foundry entry points.
ALGORITHMS: dict[str, str] = {
    'domain_upsampling': 'composer_ext.domain_upsampling.algorithm:DomainUpsampling',
    'knowledge_distillation': 'composer_ext.distillation.algorithm:KnowledgeDistillation',
    'magnitude_pruning': 'composer_ext.fairness.magnitude_pruning:MagnitudePruning',
}
CALLBACKS: dict[str, str] = {
    'bias_probe': 'composer_ext.fairness.probe:BiasProbe',
    'lora_probe': 'composer_ext.lora_probe.callback:LoRAProbe',
}
# The same classes again for llm-foundry's ``callbacks_with_config`` group (it wins over ``callbacks`` for a name in
# both): they accept ``train_config`` and build llm-foundry sections from it at FIT_START.
CALLBACKS_WITH_CONFIG: dict[str, str] = {
    'bias_probe': 'composer_ext.fairness.probe:BiasProbe',
    'lora_probe': 'composer_ext.lora_probe.callback:LoRAProbe',
}
# llm-foundry dataloaders (group ``llmfoundry_dataloaders``): llm-foundry's builder signature.
FOUNDRY_DATALOADERS: dict[str, str] = {
    'text_mixture': 'composer_ext.domain_upsampling.foundry_loader:build_text_mixture_dataloader',
}

# YAML builders for our classes whose arguments are objects (they take ``context``); default: the class.
# A deliberate twin of the tables above (same names, other targets): the class is the entry point, the builder is
# what a YAML calls.
ALGORITHM_BUILDERS: dict[str, str] = {
    'domain_upsampling': 'composer_ext.domain_upsampling.algorithm:build_domain_upsampling',
    'knowledge_distillation': 'composer_ext.distillation.builder:build_knowledge_distillation',
}
CALLBACK_BUILDERS: dict[str, str] = {
    'bias_probe': 'composer_ext.fairness.probe:build_bias_probe',
    'lora_probe': 'composer_ext.lora_probe.callback:build_lora_probe',
}

COMPOSER_ALGORITHMS: dict[str, str] = {
    'alibi': 'composer.algorithms:Alibi',
    'blurpool': 'composer.algorithms:BlurPool',
    'channels_last': 'composer.algorithms:ChannelsLast',
    'cutmix': 'composer.algorithms:CutMix',
    'ema': 'composer.algorithms:EMA',
    'gradient_clipping': 'composer.algorithms:GradientClipping',
    'label_smoothing': 'composer.algorithms:LabelSmoothing',
    'layer_freezing': 'composer.algorithms:LayerFreezing',
    'mixup': 'composer.algorithms:MixUp',
    'sam': 'composer.algorithms:SAM',
    'selective_backprop': 'composer.algorithms:SelectiveBackprop',
    'seq_length_warmup': 'composer.algorithms:SeqLengthWarmup',
    'swa': 'composer.algorithms:SWA',
}

COMPOSER_CALLBACKS: dict[str, str] = {
    'activation_monitor': 'composer.callbacks:ActivationMonitor',
    'early_stopper': 'composer.callbacks:EarlyStopper',
    'lr_monitor': 'composer.callbacks:LRMonitor',
    'memory_monitor': 'composer.callbacks:MemoryMonitor',
    'nan_monitor': 'composer.callbacks:NaNMonitor',
    'optimizer_monitor': 'composer.callbacks:OptimizerMonitor',
    'runtime_estimator': 'composer.callbacks:RuntimeEstimator',
    'speed_monitor': 'composer.callbacks:SpeedMonitor',
    'threshold_stopper': 'composer.callbacks:ThresholdStopper',
}

MODELS: dict[str, str] = {
    'small_gpt': 'composer_ext.models.gpt:small_gpt',
    'small_gpt_from_checkpoint': 'composer_ext.lora_probe.lora:small_gpt_from_checkpoint',
    'small_resnet': 'composer_ext.models.cnn:small_resnet',
    'small_vgg': 'composer_ext.models.cnn:small_vgg',
}

# A dataloader builder returns a dataloader or DataSpec; an evaluator builder (``*_evaluators``) returns
# a list of Composer Evaluators.
DATALOADERS: dict[str, str] = {
    'image': 'composer_ext.data.images:build_image_dataloader',
    'text': 'composer_ext.data.text:build_text_dataloader',
    'text_evaluators': 'composer_ext.data.text:build_text_evaluators',
    'text_mixture': 'composer_ext.domain_upsampling.mixture:build_mixture_dataloader',
    'reference_text': 'composer_ext.perplexity_pruning.selected_dataset:build_reference_text_dataloader',
    'selected_text': 'composer_ext.perplexity_pruning.selected_dataset:build_selected_text_dataloader',
}

# Dataloaders whose batches carry no tokens (images): Composer's token count stays 0, so the validator refuses
# `tok` times (a `1000tok` max_duration would never be reached).
DATALOADERS_WITHOUT_TOKENS: tuple[str, ...] = ('image',)

OPTIMIZERS: dict[str, str] = {
    'adam': 'torch.optim:Adam',
    'adamw': 'torch.optim:AdamW',
    'decoupled_adamw': 'composer.optim:DecoupledAdamW',
    'decoupled_sgdw': 'composer.optim:DecoupledSGDW',
    'rmsprop': 'torch.optim:RMSprop',
    'sgd': 'torch.optim:SGD',
}

SCHEDULERS: dict[str, str] = {
    'constant': 'composer.optim:ConstantScheduler',
    'constant_with_warmup': 'composer.optim:ConstantWithWarmupScheduler',
    'cosine_decay': 'composer.optim:CosineAnnealingScheduler',
    'cosine_decay_with_warmup': 'composer.optim:CosineAnnealingWithWarmupScheduler',
    'cosine_warm_restarts': 'composer.optim:CosineAnnealingWarmRestartsScheduler',
    'exponential': 'composer.optim:ExponentialScheduler',
    'linear_decay': 'composer.optim:LinearScheduler',
    'linear_decay_with_warmup': 'composer.optim:LinearWithWarmupScheduler',
    'multistep': 'composer.optim:MultiStepScheduler',
    'multistep_with_warmup': 'composer.optim:MultiStepWithWarmupScheduler',
    'polynomial': 'composer.optim:PolynomialScheduler',
    'polynomial_with_warmup': 'composer.optim:PolynomialWithWarmupScheduler',
    'step': 'composer.optim:StepScheduler',
}

LOGGERS: dict[str, str] = {
    'file': 'composer.loggers:FileLogger',
    'in_memory': 'composer.loggers:InMemoryLogger',
    'mlflow': 'composer.loggers:MLFlowLogger',
    'tensorboard': 'composer.loggers:TensorboardLogger',
    'wandb': 'composer.loggers:WandBLogger',
}


# Loggers that need a package Composer does not install: name -> (module to find, pip package). The validator refuses
# them, with the pip command, when the module is missing.
LOGGER_PACKAGES: dict[str, tuple[str, str]] = {
    'mlflow': ('mlflow', 'mlflow'),
    'tensorboard': ('tensorboard', 'tensorboard'),
    'wandb': ('wandb', 'wandb'),
}


class UnknownNameError(ValueError):
    """A name that is not in a registry; the message lists the valid choices."""


Target = Union[str, Callable[..., Any]]


def _import(target: Target) -> Callable[..., Any]:
    if not isinstance(target, str):
        return target
    module, _, attribute = target.partition(':')
    return getattr(importlib.import_module(module), attribute)


class Registry:
    """A name -> constructor table of one kind of component (``kind`` is used in error messages)."""

    def __init__(self, kind: str, *tables: dict[str, str]):
        self.kind = kind
        self._entries: dict[str, Target] = {}
        for table in tables:
            self._entries.update(table)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def register(self, name: str, target: Target, override: bool = False) -> None:
        """Add ``name`` -> ``target`` (a callable or a ``'module:attribute'`` string)."""
        if not isinstance(name, str) or not name:
            raise TypeError(f'name={name!r} must be a non-empty str.')
        if name in self._entries and not override:
            raise ValueError(f'{self.kind} {name!r} is already registered. Fix: pick another name or pass '
                             f'override=True.')
        self._entries[name] = target

    def unknown(self, name: object) -> UnknownNameError:
        suggestion = difflib.get_close_matches(str(name), self.names(), n=1)
        hint = f" Did you mean '{suggestion[0]}'?" if suggestion else ''
        return UnknownNameError(f'unknown {self.kind} {name!r}.{hint} Valid choices: {", ".join(self.names())}.')

    def get(self, name: str) -> Callable[..., Any]:
        """The constructor registered as ``name``; raises :class:`UnknownNameError` with the valid choices."""
        if name not in self._entries:
            raise self.unknown(name)
        return _import(self._entries[name])

    def __repr__(self) -> str:
        return f'Registry({self.kind!r}, {self.names()})'


def _with_builders(classes: dict[str, str], builders: dict[str, str]) -> dict[str, str]:
    return {**classes, **builders}


algorithms = Registry('algorithm', COMPOSER_ALGORITHMS, _with_builders(ALGORITHMS, ALGORITHM_BUILDERS))
callbacks = Registry('callback', COMPOSER_CALLBACKS, _with_builders(CALLBACKS, CALLBACK_BUILDERS))
models = Registry('model', MODELS)
dataloaders = Registry('dataloader', DATALOADERS)
optimizers = Registry('optimizer', OPTIMIZERS)
schedulers = Registry('scheduler', SCHEDULERS)
loggers = Registry('logger', LOGGERS)
