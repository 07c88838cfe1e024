"""The LoRA probe's evaluations: which metrics each evaluator follows, and an eval loop without side effects.

* :func:`as_evaluators` / :func:`as_evaluator` -- Composer ``Evaluator`` s from evaluators, DataLoaders or
  DataSpecs.
* :func:`follow_metrics` -- per evaluator, copies of the model's eval metrics it follows, their directions
  (higher or lower is better), why they were chosen, and the primary metric that learning and forgetting average.
  By default (no ``metric_names``) a language model's evaluators follow its language-model metrics (the
  ``LanguageCrossEntropy`` family: cross-entropy, perplexity), and any other model's evaluators its eval metrics
  except in-context-learning ones (:func:`default_metric_names`): an ICL metric needs ICL batches
  (``continuation_indices``, ...), which a text evaluation does not have.
* :func:`evaluate` -- every evaluator's metrics with the current weights (reduced over ranks), under
  ``torch.no_grad`` in eval mode, with every random generator restored afterwards (:func:`preserved_rng`), so a
  run with the probe trains bit for bit like a run without it.

Metrics that accumulate the same states (LanguageCrossEntropy and LanguagePerplexity: two views of one sum of token
losses) are updated once per batch and the states copied before ``compute``: this reads torchmetrics' private
``_defaults``/``_update_count``/``_computed`` fields, and is checked against independent updates in the tests.
"""

from __future__ import annotations

import contextlib
import copy
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from composer.core import Evaluator, State
from composer.core.data_spec import ensure_data_spec
from composer.core.precision import get_precision_context
from composer.metrics import LanguageCrossEntropy
from composer.utils import dist
from composer.utils.misc import model_eval_mode

from composer_ext.core.unwrap import unwrap_parallel

__all__ = ['EvaluatorsLike', 'FollowedMetrics', 'agreed_num_batches', 'as_evaluator', 'as_evaluators',
           'default_metric_names', 'evaluate', 'follow_metrics', 'is_icl_metric', 'preserved_rng']

_LOWER_IS_BETTER = re.compile(r'loss|entropy|perplexity|error|mse|mae|bpb|bits', re.IGNORECASE)
_HIGHER_IS_BETTER = re.compile(r'accuracy|acc\b|f1|auroc|auc|precision|recall|score|iou|bleu|rouge', re.IGNORECASE)

EvaluatorsLike = Union[Evaluator, Any, Sequence[Any], None]


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Restore Python, NumPy, torch and CUDA generators afterwards: the probe must not change training."""
    python_state, numpy_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


# torchmetrics' own per-instance wrappers and cross-rank sync settings: they do not change what update() adds.
_SYNC_ATTRIBUTES = frozenset({'update', 'compute', 'process_group', 'dist_sync_fn', 'distributed_available_fn'})


def _update_config(obj: Any) -> Optional[dict]:
    """The settings that shape ``obj``'s (a metric's or its submodule's) update, or None if they cannot be compared.

    Public plain-value attributes (``ignore_index``, ``reduction``, ...) and, recursively, submodules (a loss
    module) with their type and buffers, as values that compare with ``==``. Any other public attribute (a tensor,
    a list of class weights) makes the metric incomparable, so it never shares its update.
    """
    config: dict[str, Any] = {}
    for key, value in vars(obj).items():
        if key.startswith('_') or key in getattr(obj, '_defaults', {}) or key in _SYNC_ATTRIBUTES:
            continue
        if value is not None and not isinstance(value, (bool, int, float, str)):
            return None
        config[key] = value
    for name, module in getattr(obj, '_modules', {}).items():
        sub = _update_config(module)
        if sub is None:
            return None
        buffers = {k: None if b is None else (str(b.dtype), tuple(b.shape), b.detach().cpu().flatten().tolist())
                   for k, b in module._buffers.items()}
        config[f'{name}.'] = (type(module), sub, buffers)
    return config


def _same_update(leader: Any, follower: Any) -> bool:
    """Whether ``follower`` would accumulate exactly the states of ``leader`` (e.g. LanguagePerplexity, a subclass
    of LanguageCrossEntropy that only changes ``compute``): same update function, same states, same settings."""
    if type(leader).update is not type(follower).update or leader._defaults.keys() != follower._defaults.keys():
        return False
    config = _update_config(leader)
    return config is not None and config == _update_config(follower)


def _shared_updates(metrics: dict[str, Any]) -> dict[str, Optional[str]]:
    """Per metric name, the name of an earlier metric whose accumulated states it can copy (None: update it).

    An LM evaluator usually follows LanguageCrossEntropy and LanguagePerplexity, two views of one sum of token
    losses; updating both computes the cross-entropy over the vocabulary twice per batch (a fifth of the probe's
    evaluation time). Shared metrics are updated once and the states copied before ``compute``.
    """
    leaders: dict[str, Optional[str]] = {}
    for name, metric in metrics.items():
        leaders[name] = next((other for other, lead in leaders.items()
                              if lead is None and _same_update(metrics[other], metric)), None)
    return leaders


def _copy_states(source: Any, target: Any) -> None:
    """Give ``target`` the accumulated states of ``source`` (same state names), as if it had seen the same updates."""
    for key in source._defaults:
        value = getattr(source, key)
        setattr(target, key, [v.clone() for v in value] if isinstance(value, list) else value.clone())
    target._update_count = source._update_count
    target._computed = None


def as_evaluator(item: Any, key: str, label: str) -> Evaluator:
    """``item`` (an Evaluator, a DataLoader or a DataSpec) as an ``Evaluator``; a new one is labelled ``label``.

    Raises:
        TypeError: ``item`` is none of them (``key`` names it in the message).
    """
    if isinstance(item, Evaluator):
        return item
    if isinstance(item, (str, bytes, Mapping)) or not (hasattr(item, '__iter__') or hasattr(item, 'dataloader')):
        raise TypeError(f'{key} is a {type(item).__name__} ({item!r}). Fix: pass composer Evaluators, DataLoaders '
                        f'or DataSpecs, or (in YAML) eval sections such as {{label: prose, name: text, dataset: '
                        f'{{local: /data/prose, split: val}}}}.')
    return Evaluator(label=label, dataloader=ensure_data_spec(item))


def as_evaluators(value: EvaluatorsLike, role: str) -> list[Evaluator]:
    """``value`` (evaluators, DataLoaders or DataSpecs; None: none) as ``Evaluator`` s, labelled by ``role``."""
    if value is None:
        return []
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    return [as_evaluator(item, f'{role}_evals[{i}]', role if len(items) == 1 else f'{role}_{i}')
            for i, item in enumerate(items)]


def _direction(name: str, metric: Any, overrides: dict[str, bool]) -> bool:
    if name in overrides:
        return bool(overrides[name])
    declared = getattr(metric, 'higher_is_better', None)
    if declared is not None:
        return bool(declared)
    if _LOWER_IS_BETTER.search(name):
        return False
    if _HIGHER_IS_BETTER.search(name):
        return True
    raise ValueError(f'cannot tell whether a higher {name!r} is better (the metric does not declare '
                     f'higher_is_better). Fix: pass higher_is_better={{{name!r}: True}} (or False) to LoRAProbe.')


def is_icl_metric(metric: Any) -> bool:
    """Whether ``metric`` is an in-context-learning metric (Composer's or llm-foundry's ``InContextLearningMetric``).

    By class name, so llm-foundry need not be imported: its ICL metrics update from ICL batches
    (``continuation_indices``, ``gold_indices``, ...), which a text evaluation does not provide.
    """
    return any(cls.__name__ == 'InContextLearningMetric' for cls in type(metric).__mro__)


def default_metric_names(available: dict[str, Any]) -> tuple[list[str], str]:
    """The metrics an evaluator follows when nobody names any, and why: ``(names, reason)``.

    A language model's language-model metrics (instances of Composer's ``LanguageCrossEntropy``, e.g.
    LanguageCrossEntropy and LanguagePerplexity), else every eval metric except in-context-learning ones.

    Example:
        >>> from composer.metrics import LanguageCrossEntropy, LanguagePerplexity
        >>> from torchmetrics.classification import MulticlassAccuracy
        >>> default_metric_names({'LanguageCrossEntropy': LanguageCrossEntropy(),
        ...                       'LanguagePerplexity': LanguagePerplexity(),
        ...                       'MulticlassAccuracy': MulticlassAccuracy(num_classes=3)})
        (['LanguageCrossEntropy', 'LanguagePerplexity'], 'default: language-model metrics')
    """
    language = [name for name, metric in available.items() if isinstance(metric, LanguageCrossEntropy)]
    if language:
        return language, 'default: language-model metrics'
    return [name for name, metric in available.items() if not is_icl_metric(metric)], \
        "default: the model's eval metrics (in-context-learning metrics skipped)"


@dataclass
class FollowedMetrics:
    """What a probe's evaluations follow (from :func:`follow_metrics`).

    Attributes:
        metrics: Per evaluator label, ``{metric name: metric}``: copies of the model's eval metrics.
        leaders: Per evaluator label, ``{metric name: name of an earlier metric whose states it copies, or None}``.
        directions: ``{metric name: higher is better}``.
        primary: The metric that ``lora_probe/learning`` and ``lora_probe/forgetting`` average.
        chosen_by: Per evaluator label, why it follows these metrics: ``'metric_names'`` (the probe's argument),
            ``'evaluator'`` (its own ``metric_names``) or a ``'default: ...'`` (:func:`default_metric_names`).
    """

    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    leaders: dict[str, dict[str, Optional[str]]] = field(default_factory=dict)
    directions: dict[str, bool] = field(default_factory=dict)
    primary: Optional[str] = None
    chosen_by: dict[str, str] = field(default_factory=dict)


def follow_metrics(model: Any, evaluators: Sequence[Evaluator], metric_names: Optional[Sequence[str]],
                   higher_is_better: dict[str, bool], key: str = 'metric_names') -> FollowedMetrics:
    """Per evaluator, copies of the model's eval metrics it follows; errors name a missing metric.

    Args:
        model: The Composer model (its ``get_metrics(is_train=False)``).
        evaluators: The source and target evaluators.
        metric_names: The metrics to follow (the first is the primary one); None: each evaluator's own
            (``Evaluator.metric_names``), else :func:`default_metric_names`.
        higher_is_better: ``{metric name: bool}`` for metrics that do not declare a direction.
        key: How ``metric_names`` is named in error messages (its YAML key).

    Raises:
        ValueError: an evaluator asks for a metric the model lacks, or lacks one of ``metric_names``, a named
            metric is an in-context-learning metric, or the evaluators share no metric to average.
    """
    get_metrics = getattr(model, 'get_metrics', None)
    available = dict(get_metrics(is_train=False)) if callable(get_metrics) else {}
    icl = [name for name in metric_names or () if name in available and is_icl_metric(available[name])]
    if icl:
        raise ValueError(f'{key}={list(metric_names)!r}: {icl[0]!r} is an in-context-learning metric; it needs ICL '
                         f'batches (continuation_indices, ...), which the probe\'s evaluations do not have. Fix: '
                         f'follow language-model metrics (e.g. {key}: [LanguageCrossEntropy, LanguagePerplexity]), '
                         f'or leave {key} unset for them.')
    default, default_reason = default_metric_names(available)
    followed = FollowedMetrics()
    for evaluator in evaluators:
        if evaluator.metric_names:
            own, reason = list(evaluator.metric_names), 'evaluator'
        else:
            own, reason = (list(available), 'metric_names') if metric_names else (default, default_reason)
        unknown = [name for name in own if name not in available]
        if unknown:
            raise ValueError(f'evaluator {evaluator.label!r} asks for the metric(s) {unknown}, which the model '
                             f'does not provide (it has {sorted(available)}). Fix: use metric_names the model '
                             f'computes.')
        wanted = list(metric_names) if metric_names else own
        if metric_names:
            reason = 'metric_names'
        missing = [name for name in wanted if name not in own]
        if missing:
            raise ValueError(f'evaluator {evaluator.label!r} has no metric {missing[0]!r} (its metrics: {own}; the '
                             f"model's: {sorted(available)}). Fix: choose {key} among them, or give the "
                             f'evaluator metric_names that include {missing[0]!r}.')
        if not wanted:
            raise ValueError(f'evaluator {evaluator.label!r} has no metric to follow (the model has no eval '
                             f'metrics other than in-context-learning ones: {sorted(available)}). Fix: give the '
                             f'model eval metrics, or pass {key}=[...].')
        followed.metrics[evaluator.label] = {name: copy.deepcopy(available[name]) for name in wanted}
        followed.leaders[evaluator.label] = _shared_updates(followed.metrics[evaluator.label])
        followed.chosen_by[evaluator.label] = reason
        for name in wanted:
            followed.directions[name] = _direction(name, available[name], higher_is_better)
    if metric_names:
        followed.primary = metric_names[0]
    elif followed.metrics:
        followed.primary = _shared_primary(followed.metrics)
    return followed


def _shared_primary(metrics: dict[str, dict[str, Any]]) -> str:
    """The first metric of the first evaluator that every evaluator follows (learning and forgetting average it).

    Evaluators may follow different metrics (``Evaluator(metric_names=...)``); the primary metric must be
    common to all of them, or the means ``lora_probe/learning`` and ``lora_probe/forgetting`` (and the
    report) would compare different quantities.
    """
    followed = {label: list(names) for label, names in metrics.items()}
    first_label, first = next(iter(followed.items()))
    for name in first:
        if all(name in names for names in followed.values()):
            return name
    lacking = [label for label, names in followed.items() if first[0] not in names]
    raise ValueError(f'the evaluators follow no common metric, so learning and forgetting cannot be averaged: '
                     f'{followed} (evaluator {lacking[0]!r} lacks {first[0]!r}, the first metric of '
                     f'{first_label!r}). Fix: let every evaluator compute one common metric (its '
                     f'Evaluator(metric_names=[...]) must include it) and pass it first in LoRAProbe(metric_names='
                     f'[...]), e.g. metric_names=[{first[0]!r}].')


def agreed_num_batches(dataloader: Any, limit: int, state: State) -> int:
    """All ranks run the same number of forward passes (needed under FSDP): the minimum over ranks."""
    try:
        length = len(dataloader)
    except TypeError:
        return limit
    count = length if limit < 0 else min(limit, length)
    if dist.get_world_size() > 1:
        tensor = state.device.tensor_to_device(torch.tensor([count], dtype=torch.int64))
        dist.all_reduce(tensor, reduce_operation='MIN')
        count = int(tensor.item())
    return count


def evaluate(state: State, evaluators: Sequence[Evaluator], followed: FollowedMetrics,
             default_num_batches: int = -1) -> dict[str, dict[str, float]]:
    """Every evaluator's metrics (reduced over ranks) with the current weights, without side effects.

    Args:
        state: The Trainer's state (model, device, precision).
        evaluators: The evaluators, each labelled in ``followed``.
        followed: The metrics they follow (:func:`follow_metrics`); reset before and after.
        default_num_batches: Batches per evaluation for evaluators without ``subset_num_batches`` (-1: all).

    Returns:
        ``{evaluator label: {metric name: value}}``.
    """
    model = unwrap_parallel(state.model)
    values: dict[str, dict[str, float]] = {}
    with preserved_rng(), torch.no_grad(), model_eval_mode(state.model):
        for evaluator in evaluators:
            metrics = followed.metrics[evaluator.label]
            for name, metric in metrics.items():
                metrics[name] = state.device.module_to_device(metric)
                metric.reset()
            leaders = followed.leaders[evaluator.label]
            updated = [metric for name, metric in metrics.items() if leaders[name] is None]
            spec = evaluator.dataloader
            limit = evaluator.subset_num_batches
            if limit is None or limit < 0:
                limit = default_num_batches
            limit = agreed_num_batches(spec.dataloader, limit, state)
            microbatch = evaluator.device_eval_microbatch_size
            for index, batch in enumerate(spec.dataloader):
                if 0 <= limit <= index:
                    break
                batch = spec.batch_transforms(batch)
                # Split only a batch larger than the microbatch (a smaller last batch makes Composer warn).
                split = isinstance(microbatch, int) and spec.get_num_samples_in_batch(batch) > microbatch
                pieces = spec.split_batch(batch, microbatch) if split else [batch]
                for piece in pieces:
                    piece = spec.microbatch_transforms(state.device.batch_to_device(piece))
                    with get_precision_context(state.precision, state.precision_config, fp8_autocast_enabled=False):
                        outputs = model.eval_forward(piece)
                    with get_precision_context(state.precision, state.precision_config):
                        for metric in updated:
                            model.update_metric(piece, outputs, metric)
            for name, metric in metrics.items():  # before any compute() and reset() below
                if leaders[name] is not None:
                    _copy_states(metrics[leaders[name]], metric)
            values[evaluator.label] = {}
            for name, metric in metrics.items():
                result = metric.compute()  # torchmetrics reduces over ranks here
                if isinstance(result, torch.Tensor) and result.numel() != 1 or isinstance(result, dict):
                    raise ValueError(f'metric {name!r} of evaluator {evaluator.label!r} is not a scalar. Fix: pass '
                                     f'metric_names with scalar metrics only.')
                values[evaluator.label][name] = float(result)
                metric.reset()
    return values
