"""At every evaluation, measure how the model's class-wise errors and representations moved from a reference model.

:class:`BiasProbe` runs a frozen reference model (e.g. the dense teacher of a pruned student) on the same eval
batches as the model and logs, for one evaluator:

* ``bias/<label>/cev`` and ``bias/<label>/sde`` with bootstrap confidence bounds (``..._ci_low``/``..._ci_high``),
  ``bias/<label>/n_masked`` (:class:`composer_ext.metrics.ClassBias`), and both models' accuracy;
* ``similarity/<label>/agreement``, ``churn``, ``negative_flip_rate``, ``kl`` (mean ``KL(p_ref || p_model)``) and
  ``cka/<layer>``: linear CKA (unbiased minibatch estimator) of the chosen layers' activations and of the logits
  (:mod:`composer_ext.fairness.similarity`);
* ``bias/<label>/weight_sparsity``: the fraction of zero Conv/Linear weights of the model.

Everything is accumulated in one pass over the eval set, reduced over ranks, and (with ``folder``) written with
the per-class ΔFPR/ΔFNR to ``<folder>/bias_probe.json``, the input of ``composer-ext report bias``. The history is
part of the callback's ``state_dict``, so a resumed run writes the same file as an uninterrupted one.

A value with nothing to compare is ``nan`` (e.g. CEV/SDE against a perfect reference with ``eps=None``: every class
rate is left out, ``n_masked`` counts them all): it is logged as ``nan`` and written to ``bias_probe.json`` as
``null`` (``nan`` is not JSON); :attr:`BiasProbe.records` keeps the ``nan``.

Every rank takes part in the reduction at the end of every probed evaluation, also a rank whose eval batches
were all DistributedSampler padding (it contributes zero counts), so no rank waits for another forever.

Language models: with token logits ``(batch, seq, vocab)`` every labelled position (label >= 0, after the shift of a
causal LM's ``shift_labels``) is a sample. ``classes`` picks the tokens that CEV/SDE compare (e.g. ``classes=50``:
the 50 most frequent target tokens of the probed eval set, counted once before the first evaluation): the positions
whose target is one of them, classified among them (argmax over their logits). Agreement, churn, negative flips and
KL use every labelled position and the whole vocabulary; ``cka/logits`` compares the classes' logits per sequence.

From an llm-foundry YAML (entry-point group ``llmfoundry_callbacks_with_config``, which passes ``train_config``), the
reference is a model section plus checkpoint, checked at construction and built at ``FIT_START`` with the run's
tokenizer (:mod:`composer_ext.core.foundry_sections`)::

    callbacks:
      bias_probe:
        reference_model: {model: {name: mpt_causal_lm, ...}, checkpoint: runs/dense/checkpoints/latest-rank0.pt}
        eval_label: eval
        classes: 50
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

import torch
from composer.core import Callback, DataSpec, State
from composer.core.precision import get_precision_context
from composer.loggers import Logger
from composer.utils import dist
from torch import nn
from torch.utils.data import DistributedSampler

from composer_ext.core.checkpoints import load_module
from composer_ext.core.forward import extract_logits, frozen_forward
from composer_ext.core.foundry_sections import build_model_spec, check_model_spec, run_tokenizer
from composer_ext.core.unwrap import unwrap_parallel
from composer_ext.fairness.bias import ClassBias
from composer_ext.fairness.magnitude_pruning import PRUNABLE_TYPES
from composer_ext.fairness.report import RECORD_FILE, json_ready
from composer_ext.fairness.similarity import Agreement, Churn, LinearCKA, NegativeFlipRate, OutputKL
from composer_ext.storage import atomic_write_json

__all__ = ['BiasProbe', 'RECORD_FILE', 'build_bias_probe', 'foundry_eval_labels', 'weight_sparsity']

_LABEL_KEYS = ('labels', 'label', 'targets', 'target')


def _targets(batch: Any) -> torch.Tensor:
    if isinstance(batch, Mapping):
        for key in _LABEL_KEYS:
            if isinstance(batch.get(key), torch.Tensor):
                return batch[key]
    elif isinstance(batch, (tuple, list)) and len(batch) >= 2 and isinstance(batch[1], torch.Tensor):
        return batch[1]
    raise TypeError(f'BiasProbe cannot find the labels in an eval batch of type {type(batch).__name__}. Fix: use '
                    f'(inputs, labels) batches or a dict with a "labels" key.')


def _shifted(model: Any, labels: torch.Tensor) -> torch.Tensor:
    """The targets of a causal LM's logits: its labels shifted left by one (Composer's ``HuggingFaceModel`` and
    llm-foundry models with ``shift_labels``); any other model's labels as they are."""
    if labels.ndim == 2 and getattr(unwrap_parallel(model), 'shift_labels', False):
        targets = torch.roll(labels, shifts=-1, dims=1)
        targets[:, -1] = -100
        return targets
    return labels


def foundry_eval_labels(train_config: Mapping) -> list[str]:
    """The labels llm-foundry gives the evaluators of its ``eval_loader``/``eval_loaders`` sections.

    A single ``eval_loader`` section is labelled ``eval``; each entry of a list is ``eval/<its label>``.

    Example:
        >>> foundry_eval_labels({'eval_loaders': [{'label': 'prose'}, {'label': 'code'}]})
        ['eval/prose', 'eval/code']
    """
    loader = train_config.get('eval_loader')
    if isinstance(loader, Mapping):
        return ['eval']
    entries = loader if isinstance(loader, Sequence) and not isinstance(loader, str) else \
        train_config.get('eval_loaders') or []
    return [f'eval/{entry.get("label")}' for entry in entries if isinstance(entry, Mapping)]


def _activation(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    hidden = getattr(output, 'last_hidden_state', None)
    if isinstance(hidden, torch.Tensor):
        return hidden
    raise TypeError(f'a probed layer returned a {type(output).__name__}; BiasProbe needs a tensor. Fix: probe a '
                    f'module whose output is a tensor.')


def weight_sparsity(model: nn.Module) -> float:
    """The fraction of exactly-zero weights over all Linear/Conv layers of ``model``."""
    total = zeros = 0
    for module in unwrap_parallel(model).modules():
        if isinstance(module, PRUNABLE_TYPES):
            total += module.weight.numel()
            zeros += int((module.weight == 0).sum())
    return zeros / total if total else 0.0


def _rank_sample_count(dataloader: Any) -> Optional[int]:
    """Real (non-padding) samples this rank sees, when a DistributedSampler pads the eval set; else None."""
    sampler = getattr(dataloader, 'sampler', None)
    if not isinstance(sampler, DistributedSampler) or getattr(dataloader, 'drop_last', True) or sampler.drop_last:
        return None
    padding = sampler.total_size - len(sampler.dataset)  # type: ignore[arg-type]
    world, rank = dist.get_world_size(), dist.get_global_rank()
    return sampler.num_samples - (1 if padding > 0 and rank >= world - padding else 0)


def _float(value: Any) -> float:
    return float(value.item() if isinstance(value, torch.Tensor) else value)


class BiasProbe(Callback):
    """Log CEV/SDE (with CIs), agreement, churn, output KL and CKA of the model against a frozen reference model.

    Args:
        reference_model: The reference (e.g. the dense teacher): a ``ComposerModel`` or a plain ``nn.Module``
            taking ``batch[0]``, or a model spec (``{model: <llm-foundry model section>, checkpoint: PATH}`` or
            ``{pretrained_model_name_or_path: HF_DIR}``, see :mod:`composer_ext.core.foundry_sections`), checked
            now and built at ``FIT_START`` with the run's tokenizer. It is frozen, put in ``eval()`` mode and moved
            to the trainer's device.
        eval_label: The label of the evaluator to probe (e.g. ``'test'``); other evaluators are left alone.
        layers: Layers whose activations are compared with linear CKA: module names as in
            ``model.named_modules()`` (the same in both models), or a mapping ``{model layer: reference layer}``.
            The logits are always compared (``cka/logits``).
        num_classes: Number of classes; inferred from the logits (or ``classes``) when None.
        classes: The classes CEV/SDE compare (required for language models, whose classes are the vocabulary):
            an int ``N`` (the ``N`` most frequent targets of the probed eval set, ties to the lower id, counted over
            the batches an evaluation uses, once before the first evaluation) or a list of class ids (token ids).
            The samples (token positions) whose target is one of them are classified among them (argmax over their
            logits); per-class values follow the order of the classes (most frequent first for an int). None: all
            classes of the logits (classifiers).
        variant: CEV/SDE definition, ``'nas'`` (default) or ``'simon'`` (see :func:`composer_ext.metrics.cev_sde`).
        eps: ``None`` (mask zero reference rates, counted in ``n_masked``) or a positive smoothing constant.
        num_bootstraps: Bootstrap replicates for the CEV/SDE confidence intervals (0 disables them).
        confidence_level: Coverage of the intervals.
        seed: Seed of the bootstrap.
        kl_temperature: Softmax temperature of the output KL.
        folder: Directory (``{run_name}`` is formatted) for ``bias_probe.json``: every evaluation's values and
            per-class ΔFPR/ΔFNR, rewritten atomically by rank 0. None: log only.
        log_per_class: Also log ``bias/<label>/delta_fpr/<c>`` and ``delta_fnr/<c>`` for every class (``c`` is the
            index in ``classes`` when they are given).
        train_config: The run config llm-foundry passes to callbacks of ``llmfoundry_callbacks_with_config``:
            with it, the YAML sections are checked at construction (``eval_label`` against the run's eval loaders,
            ``classes`` required, the reference's and the run's ``vocab_size``) and errors name the YAML keys
            (``callbacks.bias_probe.<argument>``).

    Raises:
        ValueError: at ``FIT_START`` or the first evaluation, when ``eval_label`` is the label of none of the
            trainer's evaluators (nothing would ever be probed); with ``train_config``, already at construction.

    Example:
        >>> from composer_ext.callbacks import BiasProbe
        >>> from composer_ext.models import small_vgg
        >>> probe = BiasProbe(small_vgg(widths=[8]), eval_label='test', layers=['module.features.0'])
        >>> # Trainer(..., eval_dataloader=Evaluator(label='test', ...), callbacks=[probe])
    """

    def __init__(self, reference_model: Union[nn.Module, Mapping[str, Any]], eval_label: str,
                 layers: Union[Sequence[str], Mapping[str, str]] = (), num_classes: Optional[int] = None,
                 variant: str = 'nas', eps: Optional[float] = None, num_bootstraps: int = 1000,
                 confidence_level: float = 0.95, seed: int = 0, kl_temperature: float = 1.0,
                 folder: Optional[str] = None, log_per_class: bool = False,
                 classes: Optional[Union[int, Sequence[int]]] = None, *, train_config: Optional[Mapping] = None):
        if train_config is not None and not isinstance(train_config, Mapping):
            raise TypeError(f'train_config is a {type(train_config).__name__}; llm-foundry passes the run config as a '
                            f'dict. Fix: pass a dict or None.')
        yaml = train_config is not None
        self._key = 'callbacks.bias_probe.' if yaml else ''  # how errors name an argument
        key = self._key + 'reference_model'
        self._reference_spec: Optional[dict] = None
        if isinstance(reference_model, Mapping):
            self._reference_spec = self._check_reference_spec(reference_model, key)
            reference_model = None
        elif not isinstance(reference_model, nn.Module):
            message = (f'{key} is a {type(reference_model).__name__}; expected a torch.nn.Module (e.g. a '
                       f'ComposerModel) or a model section. Fix: pass the loaded reference model, or write '
                       f'{key}: {{model: <model section>, checkpoint: runs/dense/checkpoints/latest-rank0.pt}}.')
            raise ValueError(message) if yaml else TypeError(message)
        if not isinstance(eval_label, str) or not eval_label:
            raise ValueError(f'{self._key}eval_label={eval_label!r} must be the label of an evaluator. Fix: e.g. '
                             f"eval_label='test'.")
        classes = self._check_classes(classes, num_classes, yaml)
        if isinstance(layers, str):
            raise TypeError(f'layers={layers!r} is a single string. Fix: pass a list of module names, e.g. '
                            f"['{layers}'].")
        if isinstance(layers, Mapping):
            pairs = dict(layers)
        elif isinstance(layers, Sequence):
            pairs = {name: name for name in layers}
        else:
            raise TypeError(f'layers is a {type(layers).__name__} ({layers!r}). Fix: pass a list of module names, '
                            f"e.g. ['module.features.2'], or a {{model layer: reference layer}} mapping.")
        bad = [name for pair in pairs.items() for name in pair if not isinstance(name, str)]
        if bad:
            raise TypeError(f'layers={layers!r} holds {bad[0]!r}, which is not a module name. Fix: name layers by '
                            f'their str names in model.named_modules(), e.g. \'module.features.2\'.')
        if folder is not None and not isinstance(folder, str):
            raise TypeError(f'folder={folder!r} is a {type(folder).__name__}, not a path. Fix: pass a str such as '
                            f"'runs/{{run_name}}' (formatted with the run name), or None to only log.")
        # The metrics validate their own arguments: build them once now, so that a bad value fails at construction
        # (None: the class count is inferred from the logits later).
        bias = ClassBias(num_classes if num_classes is not None else 2, variant=variant, eps=eps,
                         num_bootstraps=num_bootstraps, confidence_level=confidence_level, seed=seed)
        kl = OutputKL(kl_temperature)
        self.reference_model: Optional[nn.Module] = reference_model
        self.eval_label = eval_label
        self.classes = classes
        self._classes: Optional[tuple[int, ...]] = tuple(classes) if isinstance(classes, tuple) else None
        self._class_index: Optional[torch.Tensor] = None
        self._batch_targets: Optional[torch.Tensor] = None
        self.layers = pairs
        self._layers_arg = layers
        self.num_classes, self.variant, self.eps = num_classes, bias.variant, bias.eps
        self.num_bootstraps, self.confidence_level, self.seed = num_bootstraps, confidence_level, seed
        self.kl_temperature, self.folder, self.log_per_class = kl.temperature, folder, bool(log_per_class)
        self.records: list[dict[str, Any]] = []
        self._device: Optional[torch.device] = None
        self._active = False
        self._hooks: list[Any] = []
        self._captured: dict[str, dict[str, torch.Tensor]] = {'model': {}, 'reference': {}}
        self._metrics: dict[str, Any] = {}
        self._remaining: Optional[int] = None
        self._warned_masked = False
        self._check_label = True  # check eval_label against the evaluators at the next evaluation
        if train_config is not None:
            self._check_train_config(train_config)
        if self.reference_model is not None:
            self.reference_model.eval()
            self.reference_model.requires_grad_(False)

    def __repr__(self) -> str:
        reference = repr(self._reference_spec) if self._reference_spec is not None else \
            f'<{type(self.reference_model).__name__}>'
        return (f'BiasProbe(reference_model={reference}, eval_label={self.eval_label!r}, '
                f'layers={self._layers_arg!r}, num_classes={self.num_classes!r}, variant={self.variant!r}, '
                f'eps={self.eps!r}, num_bootstraps={self.num_bootstraps!r}, '
                f'confidence_level={self.confidence_level!r}, '
                f'seed={self.seed!r}, kl_temperature={self.kl_temperature!r}, folder={self.folder!r}, '
                f'log_per_class={self.log_per_class!r}, classes={self.classes!r})')

    # --- arguments ---------------------------------------------------------------------------------------

    @staticmethod
    def _check_reference_spec(spec: Mapping, key: str) -> dict:
        spec = check_model_spec(spec, key)
        if 'model' in spec and spec.get('checkpoint') is None:
            raise ValueError(f'{key} has no checkpoint (checkpoint={spec.get("checkpoint")!r}): a reference built from '
                             f'a model section alone has random weights. Fix: add checkpoint: <the dense run\'s '
                             f'checkpoint>, e.g. runs/llmfoundry_fairness_dense/checkpoints/latest-rank0.pt.')
        return spec

    def _check_classes(self, classes: Any, num_classes: Any, yaml: bool) -> Optional[Union[int, tuple[int, ...]]]:
        key = self._key + 'classes'
        fix = (f'Fix: {key}: 50 (the 50 most frequent targets of the probed eval set, e.g. tokens), or a list of '
               f'at least 2 distinct class ids such as [13, 262, 287].')
        if classes is None:
            if yaml:  # llm-foundry trains language models: the classes are the whole vocabulary
                raise ValueError(f'{key} is not set: CEV/SDE over a whole vocabulary compare mostly tokens that never '
                                 f'occur (and need vocab² counts). {fix}')
            return None
        if isinstance(classes, bool) or isinstance(classes, (str, bytes)) or \
                not isinstance(classes, (int, Sequence)):
            raise ValueError(f'{key}={classes!r} is neither a count nor a list of class ids. {fix}')
        if isinstance(classes, int):
            if classes < 2:
                raise ValueError(f'{key}={classes!r} is below 2: CEV/SDE compare classes with each other. {fix}')
            count = classes
        else:
            bad = [c for c in classes if isinstance(c, bool) or not isinstance(c, int) or c < 0]
            if bad:
                raise ValueError(f'{key}={list(classes)!r} holds {bad[0]!r}, which is not a class id (an int >= 0). '
                                 f'{fix}')
            repeated = sorted({c for c in classes if list(classes).count(c) > 1})
            if repeated:
                raise ValueError(f'{key}={list(classes)!r} repeats {repeated}. Fix: list each class once.')
            if len(classes) < 2:
                raise ValueError(f'{key}={list(classes)!r} has fewer than 2 classes: CEV/SDE compare classes with '
                                 f'each other. {fix}')
            classes = tuple(classes)
            count = len(classes)
        if num_classes is not None and num_classes != count:
            raise ValueError(f'{self._key}num_classes={num_classes!r} contradicts {key}={classes!r} ({count} classes). '
                             f'Fix: leave num_classes unset (it follows classes) or make them agree.')
        return classes

    def _check_train_config(self, config: Mapping) -> None:
        labels = foundry_eval_labels(config)
        if not labels:
            raise ValueError(f'{self._key}eval_label={self.eval_label!r}, but the run has no eval_loader, so nothing '
                             f'would be probed. Fix: add an eval_loader section (its evaluator is labelled eval), e.g. '
                             f'eval_loader: {{name: text, dataset: {{local: <data>/val, max_seq_len: 128}}}}, and set '
                             f'eval_label: eval.')
        if self.eval_label not in labels:
            raise ValueError(f'{self._key}eval_label={self.eval_label!r} is the label of none of the run\'s evaluators '
                             f'{labels}, so nothing would be probed. Fix: set eval_label to one of {labels} (a single '
                             f'eval_loader is labelled eval; each entry of eval_loaders eval/<its label>).')
        model = config.get('model')
        vocab = model.get('vocab_size') if isinstance(model, Mapping) else None
        if isinstance(vocab, int) and isinstance(self._classes, tuple) and max(self._classes) >= vocab:
            raise ValueError(f'{self._key}classes={list(self._classes)!r} holds the id {max(self._classes)}, outside '
                             f'the model\'s vocabulary (model.vocab_size={vocab}). Fix: use token ids below {vocab}.')
        reference = (self._reference_spec or {}).get('model')
        reference_vocab = reference.get('vocab_size') if isinstance(reference, Mapping) else None
        if isinstance(vocab, int) and isinstance(reference_vocab, int) and reference_vocab != vocab:
            raise ValueError(f'{self._key}reference_model.model.vocab_size={reference_vocab} differs from the run\'s '
                             f'model.vocab_size={vocab}: the two models\' logits would not describe the same tokens. '
                             f'Fix: give the reference the model section it was trained with (the same tokenizer and '
                             f'vocab_size as the run).')

    # --- setup -------------------------------------------------------------------------------------------

    def _build_reference(self, state: State) -> None:
        """Build the reference from its model spec (once): the run's tokenizer, the run model's device."""
        if self.reference_model is not None or self._reference_spec is None:
            return
        parameter = next(unwrap_parallel(state.model).parameters(), None)
        model = build_model_spec(self._reference_spec, run_tokenizer(state.model),
                                 parameter.device if parameter is not None else None, self._key + 'reference_model')
        model.requires_grad_(False)
        self.reference_model = model

    def _count_targets(self, state: State, dataloader: Any, max_batches: Optional[int]) -> torch.Tensor:
        """How often each class is a target in the first ``max_batches`` batches (all: None/-1), summed over ranks."""
        loader = dataloader.dataloader if isinstance(dataloader, DataSpec) else dataloader
        counts = torch.zeros(0, dtype=torch.long)
        for index, batch in enumerate(loader):
            if max_batches is not None and 0 <= max_batches <= index:
                break
            targets = _shifted(state.model, _targets(batch)).flatten().cpu().long()
            found = torch.bincount(targets[targets >= 0], minlength=len(counts))
            counts = torch.nn.functional.pad(counts, (0, len(found) - len(counts))) + found
        if dist.get_world_size() > 1:  # every rank ranks the same totals, so all pick the same classes
            size = state.device.tensor_to_device(torch.tensor([len(counts)], dtype=torch.long))
            dist.all_reduce(size, reduce_operation='MAX')
            counts = state.device.tensor_to_device(torch.nn.functional.pad(counts, (0, int(size.item()) - len(counts))))
            dist.all_reduce(counts, reduce_operation='SUM')
        return counts.cpu()

    def _resolve_classes(self, state: State, dataloader: Any = None, max_batches: Optional[int] = None) -> None:
        """Fix the compared classes of ``classes=N``: the N most frequent targets of the probed evaluator's data."""
        if self._classes is not None or not isinstance(self.classes, int):
            return
        if dataloader is None:
            evaluator = next((e for e in state.evaluators if e.label == self.eval_label), None)
            if evaluator is None:
                return  # no such evaluator yet (Trainer.eval adds its own later): resolved at its EVAL_START
            dataloader, max_batches = evaluator.dataloader, evaluator.subset_num_batches
        counts = self._count_targets(state, dataloader, max_batches)
        occurring = int((counts > 0).sum())
        if occurring < self.classes:
            raise ValueError(f'{self._key}classes={self.classes} but the targets of the evaluator '
                             f'{self.eval_label!r} hold only {occurring} distinct classes. Fix: set classes <= '
                             f'{occurring}, or evaluate on more batches (eval_subset_num_batches).')
        order = torch.argsort(-counts, stable=True)[:self.classes]  # stable: ties go to the lower id
        self._classes = tuple(int(c) for c in order)

    def _compared_classes(self, num_logits: int, device: torch.device) -> Optional[torch.Tensor]:
        """The class id -> index lookup (-1: not compared) for ``num_logits`` logits, or None (all classes)."""
        if self._classes is None:
            return None
        if max(self._classes) >= num_logits:
            raise ValueError(f'{self._key}classes={list(self._classes)!r} holds the id {max(self._classes)}, but the '
                             f'model outputs {num_logits} logits. Fix: use class ids below {num_logits}.')
        if self._class_index is None or len(self._class_index) != num_logits or self._class_index.device != device:
            index = torch.full((num_logits,), -1, dtype=torch.long, device=device)
            index[torch.tensor(self._classes, device=device)] = torch.arange(len(self._classes), device=device)
            self._class_index = index
        return self._class_index

    def _num_classes(self) -> Optional[int]:
        return len(self._classes) if self._classes is not None else self.num_classes

    def _place_reference(self, state: State) -> None:
        self._build_reference(state)
        device = state.device._device if hasattr(state.device, '_device') else None
        if self._device is None or self._device != device:
            state.device.module_to_device(self.reference_model)
            self._device = device
        self.reference_model.eval()

    def _resolve(self, module: nn.Module, name: str, which: str) -> nn.Module:
        modules = dict(module.named_modules())
        if name not in modules:
            close = sorted(n for n in modules if n and (name in n or n in name))[:5] or \
                [n for n in modules if n][:8]
            raise ValueError(f'layers names {name!r}, which the {which} does not have. Fix: use names from '
                             f'{which}.named_modules(), e.g. {close}.')
        return modules[name]

    def _new_metrics(self, num_classes: int, device: torch.device) -> None:
        metrics: dict[str, Any] = {
            'bias': ClassBias(num_classes, variant=self.variant, eps=self.eps, num_bootstraps=self.num_bootstraps,
                              confidence_level=self.confidence_level, seed=self.seed),
            'agreement': Agreement(), 'churn': Churn(), 'negative_flip_rate': NegativeFlipRate(),
            'kl': OutputKL(self.kl_temperature), 'cka/logits': LinearCKA(),
        }
        metrics.update({f'cka/{name}': LinearCKA() for name in self.layers})
        self._metrics = {name: metric.to(device) for name, metric in metrics.items()}

    def _hook(self, which: str, name: str):
        def capture(module: nn.Module, inputs: Any, output: Any) -> None:
            self._captured[which][name] = _activation(output).detach()
        return capture

    def _check_eval_label(self, state: State) -> None:
        labels = [evaluator.label for evaluator in state.evaluators]
        if labels and self.eval_label not in labels:
            raise ValueError(f'BiasProbe eval_label={self.eval_label!r} is the label of none of the trainer\'s '
                             f'evaluators {labels}, so nothing would be probed. Fix: set eval_label to one of '
                             f'{labels}, or add an Evaluator(label={self.eval_label!r}, ...).')

    def fit_start(self, state: State, logger: Logger) -> None:
        self._check_eval_label(state)  # fail before training, not at the first evaluation
        self._place_reference(state)
        self._resolve_classes(state)

    def eval_before_all(self, state: State, logger: Logger) -> None:
        self._check_label = True

    def eval_standalone_start(self, state: State, logger: Logger) -> None:
        self._check_label = True  # Trainer.eval(eval_dataloader=...) adds its evaluators only after this event

    def eval_start(self, state: State, logger: Logger) -> None:
        if self._check_label:
            # At the first evaluator of a round state.evaluators lists them all (Trainer.eval removes passed-in
            # evaluators one by one as they finish, so later evaluators would see a partial list).
            self._check_label = False
            self._check_eval_label(state)
        if state.dataloader_label != self.eval_label:
            return
        self._place_reference(state)
        if self._classes is None and isinstance(self.classes, int):
            evaluator = next((e for e in state.evaluators if e.label == self.eval_label), None)
            self._resolve_classes(state, state.dataloader, evaluator.subset_num_batches if evaluator else None)
        self._remove_hooks()
        model = unwrap_parallel(state.model)
        for name, reference_name in self.layers.items():
            self._hooks.append(self._resolve(model, name, 'model').register_forward_hook(self._hook('model', name)))
            self._hooks.append(self._resolve(self.reference_model, reference_name, 'reference model')
                               .register_forward_hook(self._hook('reference', name)))
        self._metrics = {}
        if self._num_classes() is not None:  # every rank has its metrics before the first batch (see eval_end)
            self._new_metrics(self._num_classes(), state.device.tensor_to_device(torch.zeros(0)).device)
        self._remaining = _rank_sample_count(state.dataloader)
        self._active = True

    # --- per batch ---------------------------------------------------------------------------------------

    def eval_before_forward(self, state: State, logger: Logger) -> None:
        if self._active:  # before the model's eval_forward, which may take the labels out of the batch (HuggingFace)
            self._batch_targets = _shifted(state.model, _targets(state.batch)).clone()

    def eval_after_forward(self, state: State, logger: Logger) -> None:
        if not self._active:
            return
        model_activations = self._captured['model']
        self._captured = {'model': {}, 'reference': {}}
        logits = extract_logits(state.outputs).detach()
        target = self._batch_targets if self._batch_targets is not None else \
            _shifted(state.model, _targets(state.batch))
        self._batch_targets = None
        if logits.ndim not in (2, 3) or tuple(target.shape) != tuple(logits.shape[:-1]):
            raise ValueError(f'BiasProbe compares classifiers (logits (batch, classes), labels (batch,)) or language '
                             f'models (logits (batch, seq, vocab), labels (batch, seq)), but the model output has '
                             f'shape {tuple(logits.shape)} and the labels {tuple(target.shape)}. Fix: probe a '
                             f'classification or language-modelling evaluator.')
        with torch.no_grad(), get_precision_context(state.precision, state.precision_config):
            ref_logits = extract_logits(frozen_forward(self.reference_model, state.batch)).detach()
        ref_activations = self._captured['reference']
        self._captured = {'model': {}, 'reference': {}}
        if ref_logits.shape != logits.shape:
            raise ValueError(f'the reference model outputs shape {tuple(ref_logits.shape)} but the model '
                             f'{tuple(logits.shape)}. Fix: compare models with the same classes.')
        if logits.ndim == 3 and self._classes is None:
            raise ValueError(f'{self._key}classes is not set, but the model outputs token logits of shape '
                             f'{tuple(logits.shape)}: CEV/SDE over all {logits.shape[-1]} tokens compare mostly tokens '
                             f'that never occur. Fix: set classes=50 (the 50 most frequent target tokens) or a list '
                             f'of token ids.')
        index = self._compared_classes(int(logits.shape[-1]), logits.device)
        num_classes = self._num_classes() or int(logits.shape[-1])
        if index is None and num_classes != logits.shape[-1]:
            raise ValueError(f'num_classes={self.num_classes} but the model outputs {logits.shape[-1]} scores. '
                             f'Fix: set num_classes={logits.shape[-1]} or leave it None.')
        if not self._metrics:  # before the padding check: a rank that sees only padding still joins the reduction
            self._new_metrics(num_classes, logits.device)
        n = len(target)
        if self._remaining is not None:  # drop the DistributedSampler's padding duplicates, as Composer does
            n = max(0, min(n, self._remaining))
            self._remaining -= n
            if n == 0:
                return
        logits, ref_logits, target = logits[:n].float(), ref_logits[:n].float(), target[:n]
        if logits.ndim == 3:  # a language model: every labelled position (label >= 0) is a sample
            labelled = target >= 0
            flat, ref_flat, flat_target = logits[labelled], ref_logits[labelled], target[labelled]
        else:
            flat, ref_flat, flat_target = logits, ref_logits, target
        m = self._metrics
        if index is None:
            m['bias'].update(flat_target, ref_flat, flat)
            cka_logits, cka_ref_logits = logits, ref_logits
        else:
            mapped = index[flat_target]
            kept = mapped >= 0
            columns = torch.tensor(self._classes, device=logits.device)
            m['bias'].update(mapped[kept], ref_flat[kept][:, columns], flat[kept][:, columns])
            cka_logits, cka_ref_logits = logits[..., columns], ref_logits[..., columns]
        m['agreement'].update(ref_flat, flat)
        m['churn'].update(ref_flat, flat)
        m['negative_flip_rate'].update(flat_target, ref_flat, flat)
        m['kl'].update(ref_flat, flat)
        m['cka/logits'].update(cka_ref_logits, cka_logits)
        for name in self.layers:
            if name not in model_activations or name not in ref_activations:
                raise RuntimeError(f'the layer {name!r} did not run in the forward pass of both models. Fix: probe '
                                   f'layers that every eval forward uses.')
            m[f'cka/{name}'].update(ref_activations[name][:n], model_activations[name][:n])

    # --- per evaluation ----------------------------------------------------------------------------------

    def eval_end(self, state: State, logger: Logger) -> None:
        if not self._active:
            return
        self._active = False
        self._remove_hooks()
        if self._num_classes() is None and dist.get_world_size() > 1:
            # The metrics exist on the ranks that saw a batch; a rank that saw none (an empty shard) learns the
            # class count here, so that every rank enters the metrics' all-gather below.
            known = torch.tensor([self._metrics['bias'].num_classes if self._metrics else 0], dtype=torch.long)
            known = state.device.tensor_to_device(known)
            dist.all_reduce(known, reduce_operation='MAX')
            if int(known.item()) and not self._metrics:
                self._new_metrics(int(known.item()), known.device)
        if not self._metrics:  # no rank evaluated a batch
            return
        label = self.eval_label
        bias = self._metrics['bias']
        bias.warn_masked = not self._warned_masked
        values = {k: _float(v) for k, v in bias.compute().items()}
        self._warned_masked = self._warned_masked or values['n_masked'] > 0
        result = bias.last_result
        confmat, ref_confmat = (m.double() for m in bias.last_confmats)  # summed over ranks
        total = float(confmat.sum())
        metrics = {f'bias/{label}/{k}': v for k, v in values.items()}
        metrics[f'bias/{label}/accuracy'] = float(confmat.trace()) / total if total else math.nan
        metrics[f'bias/{label}/reference_accuracy'] = float(ref_confmat.trace()) / total if total else math.nan
        metrics[f'bias/{label}/weight_sparsity'] = weight_sparsity(state.model)
        for name, metric in self._metrics.items():
            if name != 'bias':
                metrics[f'similarity/{label}/{name}'] = _float(metric.compute())
        if self.log_per_class:
            for kind in ('delta_fpr', 'delta_fnr'):
                for c, value in enumerate(getattr(result, kind).tolist()):
                    if not math.isnan(value):
                        metrics[f'bias/{label}/{kind}/{c}'] = value
        logger.log_metrics(metrics)
        targets = [getattr(a, 'target_sparsity') for a in state.algorithms
                   if isinstance(getattr(a, 'target_sparsity', None), float)]
        self.records.append({
            'run_name': state.run_name, 'eval_label': label, 'batch': int(state.timestamp.batch),
            'epoch': int(state.timestamp.epoch), 'sample': int(state.timestamp.sample), 'num_samples': int(total),
            'algorithms': [type(a).__name__ for a in state.algorithms],
            'target_sparsity': targets[0] if targets else None,
            'metrics': {key.split('/', 2)[2]: value for key, value in metrics.items()},
            'classes': list(self._classes) if self._classes is not None else None,
            'per_class': result.as_dict(),
            'confmat': bias.last_confmats[0].tolist(), 'reference_confmat': bias.last_confmats[1].tolist(),
            'settings': {'variant': self.variant, 'eps': self.eps, 'num_bootstraps': self.num_bootstraps,
                         'confidence_level': self.confidence_level, 'seed': self.seed},
            'cka_skipped_batches': {name.split('/', 1)[1]: metric.last_skipped_batches
                                    for name, metric in self._metrics.items() if name.startswith('cka/')},
        })
        for metric in self._metrics.values():
            metric.reset()
        self._write(state)

    def _write(self, state: State) -> None:
        if self.folder is None or dist.get_global_rank() != 0:
            return
        folder = self.folder.format(run_name=state.run_name)
        # A nan value (CEV/SDE with nothing to compare, an accuracy over no sample, CKA without a usable batch) is
        # written as null: Python's json would write a bare NaN, which is not JSON.
        atomic_write_json(os.path.join(folder, RECORD_FILE), json_ready({'records': self.records}))

    def _remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self._captured = {'model': {}, 'reference': {}}

    def fit_end(self, state: State, logger: Logger) -> None:
        self._remove_hooks()

    def close(self, state: State, logger: Logger) -> None:
        self._remove_hooks()
        self._active = False

    # --- checkpointing -----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        # The records are a tuple, not a list: a sharded (FSDP) checkpoint's torch.distributed.checkpoint flattens
        # lists of dicts into one key per record, and then a fresh probe (no records yet) asks for a key 'records'
        # that the checkpoint does not have; a tuple is stored and loaded as one object.
        return {'records': tuple(dict(record) for record in self.records), 'warned_masked': self._warned_masked,
                'classes': list(self._classes) if self._classes is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        records = state.get('records', [])
        if not isinstance(records, (list, tuple)):
            raise ValueError('the BiasProbe state has no record list. Fix: load a checkpoint written with BiasProbe.')
        self.records = [dict(record) for record in records]
        self._warned_masked = bool(state.get('warned_masked', False))
        if state.get('classes') is not None:  # the classes the run compared: a resumed run compares the same
            self._classes = tuple(int(c) for c in state['classes'])
            self._class_index = None


def build_bias_probe(context, reference_model: dict, eval_label: str,
                     layers: Optional[Union[list, dict]] = None, num_classes: Optional[int] = None,
                     variant: str = 'nas', eps: Optional[float] = None, num_bootstraps: int = 1000,
                     confidence_level: float = 0.95, seed: int = 0, kl_temperature: float = 1.0,
                     folder: Optional[str] = None, log_per_class: bool = False,
                     weights_only: bool = True, classes: Optional[Union[int, list]] = None) -> BiasProbe:
    """Build :class:`BiasProbe` from a YAML ``callbacks`` entry; the reference is a model section + checkpoint.

    Example:
        .. code-block:: yaml

            callbacks:
              bias_probe:
                reference_model: {model: {name: small_vgg}, checkpoint: runs/teacher/checkpoints/latest-rank0.pt}
                eval_label: test
                layers: [module.features.2, module.features.5]
                folder: runs/{run_name}
    """
    key = 'callbacks.bias_probe.reference_model'
    if not isinstance(reference_model, dict) or set(reference_model) != {'model', 'checkpoint'}:
        raise ValueError(f'{key}={reference_model!r} must be {{model: <model section>, checkpoint: <path>}}. Fix: e.g. '
                         f'{{model: {{name: small_vgg}}, checkpoint: runs/teacher/checkpoints/latest-rank0.pt}}.')
    checkpoint = reference_model['checkpoint']
    if not isinstance(checkpoint, str) or not os.path.isfile(checkpoint):
        raise ValueError(f'{key}.checkpoint={checkpoint!r} is not a file. Fix: train the reference first (e.g. '
                         f'composer-ext run yamls/fairness/teacher.yaml) or correct the path.')
    model = context.build_model(reference_model['model'], f'{key}.model')
    model = load_module(checkpoint, model=model, weights_only=weights_only, role='reference')
    return BiasProbe(model, eval_label, layers=layers if layers is not None else (), num_classes=num_classes,
                     variant=variant, eps=eps, num_bootstraps=num_bootstraps, confidence_level=confidence_level,
                     seed=seed, kl_temperature=kl_temperature, folder=folder, log_per_class=log_per_class,
                     classes=classes)
