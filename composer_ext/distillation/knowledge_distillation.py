"""Random-teacher knowledge distillation for training efficiency ("Reduce, Reuse, Recycle", Blakeney et al. 2022).

A student trains on ``ce_weight * original_loss + kd_weight * T² · KL(p_teacher ‖ p_student)`` during a window
of training (by default the first half) and on its original loss alone afterwards. The teacher of each optimizer
step is drawn from a pool, so an ensemble's benefit costs one teacher forward per step.

The module has a functional core (plain functions on tensors) and the Composer :class:`KnowledgeDistillation`
algorithm:

* :func:`kd_loss` -- ``T² · KL(p_teacher ‖ p_student)`` (or MSE on logits), mean over the kept positions; a list
  of teacher logits is an ensemble whose probabilities (default) or logits are averaged.
* :func:`distillation_mask` -- which positions carry a label (``labels != ignore_index``, shifted for causal LMs).
* :func:`extract_logits`, :func:`output_width` -- logits of any model output; the output width of a model.
* :func:`select_teachers` -- the teacher-selection policies (``random``, ``round_robin``, ``ensemble``,
  ``random_k``).
* :func:`load_teacher` -- a teacher from a checkpoint path (``weights_only`` loading where possible).

Design points that differ from Composer's unmerged PR #1819: the KL has the teacher as the target distribution
and gradients flow only through the student; ``state.batch`` is never modified; teachers are frozen and in
``eval()`` mode; the teacher is drawn once per optimizer step (at ``BATCH_START``), so every micro-batch of a
gradient-accumulation step and every rank uses the same teacher; the sampler's state is checkpointed.
"""

from __future__ import annotations

import copy
import inspect
import math
import os
import time
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from composer.core import Algorithm, Event, State, Time, TimeUnit
from composer.core.precision import get_precision_context
from composer.loggers import Logger
from composer.models import ComposerModel, HuggingFaceModel
from composer.utils import dist, ensure_tuple
from torch import nn

__all__ = [
    'KnowledgeDistillation',
    'ENSEMBLE_AVERAGES',
    'LOSSES',
    'POLICIES',
    'build_knowledge_distillation',
    'default_teacher_forward',
    'distillation_mask',
    'extract_logits',
    'kd_loss',
    'load_teacher',
    'output_width',
    'select_teachers',
    'steps_to_target',
]

POLICIES = ('random', 'round_robin', 'ensemble', 'random_k')
LOSSES = ('kl', 'mse')
ENSEMBLE_AVERAGES = ('probs', 'logits')

TeacherSource = Union[nn.Module, str, os.PathLike, Mapping]


# --- functional core ---------------------------------------------------------------------------------------


def extract_logits(output: Any) -> torch.Tensor:
    """The logits in a model output: a tensor, an object with ``.logits`` (HuggingFace), a dict, or a tuple.

    Example:
        >>> extract_logits(torch.zeros(2, 3)).shape
        torch.Size([2, 3])
    """
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, 'logits', None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, Mapping) and isinstance(output.get('logits'), torch.Tensor):
        return output['logits']
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f'cannot find logits in a model output of type {type(output).__name__}. Fix: return a tensor, '
                    f'a HuggingFace output with `.logits`, a dict with a "logits" key, or a tuple of tensors whose '
                    f'first item is the logits.')


def distillation_mask(labels: Optional[torch.Tensor], logits_shape: Sequence[int], shift_labels: bool = False,
                      ignore_index: int = -100) -> Optional[torch.Tensor]:
    """The positions of ``logits`` that carry a label, as a bool tensor of shape ``logits_shape[:-1]``.

    For a causal LM (``shift_labels=True``) the logits at position ``t`` predict the label at ``t + 1``, so
    position ``t`` is kept when ``labels[..., t + 1] != ignore_index`` and the last position is dropped (this is
    how HuggingFace and Composer compute the causal-LM loss). For a masked LM or a classifier, position ``t`` is
    kept when ``labels[..., t] != ignore_index``. Returns None (keep everything) when ``labels`` is None, not an
    integer tensor (soft labels, e.g. after MixUp), or not shaped like the logits' leading dimensions.

    Example:
        >>> labels = torch.tensor([[5, 6, -100]])
        >>> distillation_mask(labels, (1, 3, 10), shift_labels=True)
        tensor([[ True, False, False]])
    """
    if labels is None or not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point or \
            labels.dtype == torch.bool or tuple(labels.shape) != tuple(logits_shape[:-1]):
        return None
    if not shift_labels:
        return labels != ignore_index
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[..., :-1] = labels[..., 1:] != ignore_index
    return mask


def _check_logits(student_logits: torch.Tensor, teacher_logits: Sequence[torch.Tensor]) -> None:
    for i, logits in enumerate(teacher_logits):
        if logits.shape != student_logits.shape:
            width, student_width = logits.shape[-1] if logits.dim() else None, student_logits.shape[-1]
            if width != student_width:
                raise ValueError(f'teacher output width {width} (classes or vocabulary) differs from the student '
                                 f'output width {student_width} (teacher logits {i}: {tuple(logits.shape)}, student '
                                 f'logits: {tuple(student_logits.shape)}). Fix: distil only from teachers with the '
                                 f"student's classes/vocabulary (the same tokenizer and num_classes).")
            raise ValueError(f'teacher logits {i} have shape {tuple(logits.shape)} but the student logits have '
                             f'shape {tuple(student_logits.shape)}. Fix: make the teacher see the same inputs as the '
                             f'student.')


def _masked_mean(values: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    if mask is None:
        return values.mean()
    if mask.shape != values.shape:
        raise ValueError(f'mask has shape {tuple(mask.shape)} but the logits have {tuple(values.shape)} positions. '
                         f'Fix: pass a mask shaped like the logits without the last dimension.')
    kept = values[mask.to(values.device)]
    if kept.numel() == 0:
        return values.sum() * 0.0  # no labelled position: a zero that keeps the graph (and device, dtype)
    return kept.mean()


def kd_loss(student_logits: torch.Tensor, teacher_logits: Union[torch.Tensor, Sequence[torch.Tensor]],
            temperature: float = 4.0, loss: str = 'kl', mask: Optional[torch.Tensor] = None,
            teacher_weights: Optional[Sequence[float]] = None, ensemble_average: str = 'probs') -> torch.Tensor:
    """The distillation loss of a student against one teacher or an ensemble, averaged over kept positions.

    ``kl``: ``T² · KL(p_teacher ‖ p_student)`` with ``p = softmax(logits / T)`` over the last dimension, summed
    over classes and averaged over positions (samples, or tokens where ``mask`` is True). The teacher is the
    target distribution; gradients flow only into the student. With several teachers, ``p_teacher`` is the
    (weighted) mean of their probabilities (``ensemble_average='probs'``, a mixture of the teachers' predictions), or
    the softmax of the (weighted) mean of their logits (``ensemble_average='logits'``, a geometric mean of their
    probabilities: sharper where the teachers agree).

    ``mse``: the mean squared error between raw logits (no temperature), averaged over classes and kept
    positions; with several teachers, against the (weighted) mean of their logits.

    Computed in float32 whatever the logits' dtype.

    Args:
        student_logits: ``(..., C)`` logits of the student (with grad).
        teacher_logits: ``(..., C)`` logits of one teacher, or a list of them (an ensemble).
        temperature: ``T > 0``.
        loss: ``'kl'`` or ``'mse'``.
        mask: Optional bool tensor of shape ``student_logits.shape[:-1]``: the positions to average over.
        teacher_weights: Optional non-negative weights of the ensemble members (default: uniform).
        ensemble_average: ``'probs'`` or ``'logits'``: what a KL ensemble averages (MSE always averages logits).

    Returns:
        A scalar tensor.

    Example:
        >>> student, teacher = torch.randn(8, 10, requires_grad=True), torch.randn(8, 10)
        >>> kd_loss(student, teacher, temperature=2.0).backward()
    """
    if loss not in LOSSES:
        raise ValueError(f'loss={loss!r} is not a distillation loss. Fix: use one of {list(LOSSES)}.')
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not temperature > 0:
        raise ValueError(f'temperature={temperature!r} must be a positive number. Fix: use e.g. temperature=4.0.')
    if ensemble_average not in ENSEMBLE_AVERAGES:
        raise ValueError(f'ensemble_average={ensemble_average!r} is not an ensemble average. Fix: use one of '
                         f'{list(ENSEMBLE_AVERAGES)}.')
    teachers = [teacher_logits] if isinstance(teacher_logits, torch.Tensor) else list(teacher_logits)
    if not teachers:
        raise ValueError('teacher_logits is empty. Fix: pass one tensor or a non-empty list of tensors.')
    _check_logits(student_logits, teachers)
    weights = _normalized_weights(teacher_weights, len(teachers), 'teacher_weights')
    student = student_logits.float()
    if loss == 'mse':
        target = sum(w * t.detach().float() for w, t in zip(weights, teachers))
        return _masked_mean(((student - target)**2).mean(-1), mask)
    log_p_student = F.log_softmax(student / temperature, dim=-1)
    if ensemble_average == 'logits' and len(teachers) > 1:
        mean_logits = sum(w * t.detach().float() for w, t in zip(weights, teachers))
        teachers, weights = [mean_logits], [1.0]
    log_p_teacher = [F.log_softmax(t.detach().float() / temperature, dim=-1) for t in teachers]
    if len(log_p_teacher) == 1:
        log_p_target = log_p_teacher[0]
    else:  # log of the weighted mean of probabilities, computed stably
        log_w = torch.tensor([math.log(w) if w > 0 else -math.inf for w in weights], device=student.device)
        stacked = torch.stack(log_p_teacher) + log_w.view(-1, *([1] * student.dim()))
        log_p_target = torch.logsumexp(stacked, dim=0)
    per_position = F.kl_div(log_p_student, log_p_target, reduction='none', log_target=True).sum(-1)
    return _masked_mean(per_position, mask) * (temperature**2)


def _normalized_weights(weights: Optional[Sequence[float]], n: int, name: str) -> list[float]:
    if weights is None:
        return [1.0 / n] * n
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise ValueError(f'{name}={weights!r} has {len(weights)} entries for {n} teachers. Fix: give one weight '
                         f'per teacher.')
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f'{name}={weights!r} must be finite, >= 0 and not all 0. Fix: e.g. [1.0] * {n}.')
    total = sum(weights)
    return [w / total for w in weights]


def select_teachers(policy: str, num_teachers: int, step: int, generator: Optional[np.random.Generator] = None,
                    k: Optional[int] = None, weights: Optional[Sequence[float]] = None) -> list[int]:
    """The teacher indices of one optimizer step under a policy.

    * ``random``: one teacher, drawn with probabilities ``weights`` (uniform by default) from ``generator``.
    * ``round_robin``: teacher ``step % num_teachers``, where ``step`` counts the distillation steps so far.
    * ``ensemble``: every teacher.
    * ``random_k``: ``k`` distinct teachers drawn from ``generator`` (with probabilities ``weights``), sorted.

    Example:
        >>> select_teachers('round_robin', 3, step=4)
        [1]
    """
    if policy not in POLICIES:
        raise ValueError(f'policy={policy!r} is not a teacher policy. Fix: use one of {list(POLICIES)}.')
    if policy == 'round_robin':
        return [step % num_teachers]
    if policy == 'ensemble':
        return list(range(num_teachers))
    if generator is None:
        raise ValueError(f'policy={policy!r} needs a generator. Fix: pass generator=np.random.default_rng(seed).')
    p = None if weights is None else np.asarray(_normalized_weights(weights, num_teachers, 'weights'))
    if policy == 'random':
        return [int(generator.choice(num_teachers, p=p))]
    if k is None or not 1 <= k <= num_teachers:
        raise ValueError(f'k={k!r} is out of range for {num_teachers} teachers. Fix: use 1 <= k <= {num_teachers}.')
    return sorted(int(i) for i in generator.choice(num_teachers, size=k, replace=False, p=p))


def steps_to_target(curve: Sequence[tuple[int, float]], target: float, higher_is_better: bool = True) -> Optional[int]:
    """The first step of an evaluation curve ``[(step, value), ...]`` whose value reaches ``target`` (None if never).

    This is the paper's efficiency measure: a distilled run's speed-up is ``steps_to_target(baseline) /
    steps_to_target(distilled)`` for a fixed target quality.

    Example:
        >>> steps_to_target([(25, 0.61), (50, 0.72), (75, 0.80)], target=0.7)
        50
    """
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not math.isfinite(target):
        raise ValueError(f'target={target!r} must be a finite number. Fix: e.g. target=0.8 for an accuracy.')
    for step, value in sorted(curve):
        if (value >= target) if higher_is_better else (value <= target):
            return int(step)
    return None


def _underlying(model: nn.Module) -> nn.Module:
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def output_width(model: nn.Module) -> Optional[int]:
    """The number of output classes (or vocabulary size) of a model, or None when it cannot be told statically.

    Knows Composer classifiers (``num_classes``), HuggingFace models (their output embeddings or
    ``config.vocab_size``/``num_labels``), and modules whose head is a ``Linear`` named ``classifier``, ``fc``,
    ``head`` or ``lm_head``.
    """
    model = _underlying(model)
    if isinstance(model, HuggingFaceModel):
        model = model.model
    num_classes = getattr(model, 'num_classes', None)
    if isinstance(num_classes, int) and not isinstance(num_classes, bool):
        return num_classes
    get_output_embeddings = getattr(model, 'get_output_embeddings', None)
    if callable(get_output_embeddings):
        try:
            embeddings = get_output_embeddings()
        except (NotImplementedError, AttributeError):
            embeddings = None
        if isinstance(embeddings, nn.Linear):
            return embeddings.out_features
    config = getattr(model, 'config', None)
    if config is not None and getattr(config, 'vocab_size', None) and hasattr(model, 'lm_head'):
        return int(config.vocab_size)
    inner = getattr(model, 'module', None)  # ComposerClassifier wraps its network in `.module`
    for candidate in (model, inner):
        if not isinstance(candidate, nn.Module):
            continue
        for name in ('classifier', 'fc', 'head', 'lm_head'):
            head = getattr(candidate, name, None)
            if isinstance(head, nn.Linear):
                return head.out_features
    return None


# --- loading teachers ---------------------------------------------------------------------------------------


def _safe_globals() -> list:
    """Plain-data globals that Composer checkpoints contain (numpy RNG states, timedeltas, version strings)."""
    import datetime

    from torch.torch_version import TorchVersion
    allowed: list = [datetime.timedelta, TorchVersion, np.ndarray, np.dtype]
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct  # type: ignore
    allowed.append(_reconstruct)
    allowed.extend({type(np.dtype(code)) for code in ('b', 'B', 'h', 'H', 'i', 'I', 'l', 'L', 'q', 'Q', 'e', 'f', 'd',
                                                       '?')})
    return allowed


def _is_torchscript(path: str) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.split('/', 1)[-1].startswith('code/') for name in archive.namelist())


def _torch_load(path: str, weights_only: bool) -> Any:
    if not weights_only:
        return torch.load(path, map_location='cpu', weights_only=False)
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as err:  # noqa: BLE001 -- torch raises UnpicklingError/RuntimeError for disallowed globals
        raise ValueError(f'the teacher checkpoint {path!r} cannot be loaded with weights_only=True '
                         f'({str(err)[-300:]}). Fix: save a state_dict (torch.save(model.state_dict(), path)) and pass '
                         f"{{'model': <architecture>, 'checkpoint': path}}, or pass weights_only=False if you trust "
                         f'the file (unpickling can run code).') from None


def _model_state_dict(obj: Any, path: str) -> Mapping[str, torch.Tensor]:
    """The model weights inside a loaded checkpoint: Composer (``state.model``), ``state_dict``/``model`` keys, or
    a plain state dict."""
    if isinstance(obj, Mapping):
        state = obj.get('state')
        if isinstance(state, Mapping) and isinstance(state.get('model'), Mapping):
            return state['model']
        for key in ('state_dict', 'model'):
            if isinstance(obj.get(key), Mapping):
                return obj[key]
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    raise ValueError(f'the checkpoint {path!r} holds no model state dict (a Composer checkpoint, a dict with a '
                     f"'state_dict' or 'model' key, or a plain state dict). Fix: save it with "
                     f'torch.save(model.state_dict(), path) or pass a Composer checkpoint.')


def _load_weights(model: nn.Module, weights: Mapping[str, torch.Tensor], path: str) -> None:
    expected = set(model.state_dict())
    candidates = [dict(weights)]
    for prefix in ('module.', 'model.'):  # a bare network vs a Composer/HuggingFace wrapper, either way round
        if all(k.startswith(prefix) for k in weights):
            candidates.append({k[len(prefix):]: v for k, v in weights.items()})
        candidates.append({prefix + k: v for k, v in weights.items()})
    fix = 'Fix: build the teacher model with the same configuration as the run that saved the checkpoint.'
    for candidate in candidates:
        if set(candidate) == expected:
            try:
                model.load_state_dict(candidate, strict=True)
            except RuntimeError as err:  # same names, other shapes
                problem = next((line.strip() for line in str(err).splitlines() if 'size mismatch' in line), str(err))
                raise ValueError(f'the weights in {path!r} do not fit the teacher architecture '
                                 f'{type(model).__name__} ({problem}). {fix}') from None
            return
    missing, unexpected = sorted(expected - set(weights))[:5], sorted(set(weights) - expected)[:5]
    raise ValueError(f'the weights in {path!r} do not fit the teacher architecture {type(model).__name__} (missing '
                     f'e.g. {missing}, unexpected e.g. {unexpected}). {fix}')


def load_teacher(checkpoint: Union[str, os.PathLike], model: Optional[nn.Module] = None,
                 weights_only: bool = True) -> nn.Module:
    """Load a teacher from a checkpoint file.

    With ``model`` (the architecture), its weights are read from ``checkpoint`` (a Composer checkpoint or a
    state dict) with ``torch.load(weights_only=True)`` and loaded strictly into ``model``, which is returned.
    Without ``model``, ``checkpoint`` must be a TorchScript archive (``torch.jit.save``) or, only with
    ``weights_only=False``, a pickled module (``torch.save(module)``; unpickling can run code: trusted files only).

    Example:
        .. code-block:: python

            teacher = load_teacher('runs/teacher/checkpoints/latest-rank0.pt', model=small_resnet())
    """
    if not isinstance(checkpoint, (str, os.PathLike)):
        raise TypeError(f'checkpoint={checkpoint!r} is not a path. Fix: pass a str or os.PathLike.')
    path = os.fspath(checkpoint)
    if not os.path.isfile(path):
        raise ValueError(f'the teacher checkpoint {path!r} does not exist. Fix: train the teacher first (see '
                         f'yamls/distillation/) or correct the path.')
    if model is not None:
        if not isinstance(model, nn.Module):
            raise TypeError(f'model={model!r} is not a torch.nn.Module. Fix: pass the teacher architecture.')
        _load_weights(model, _model_state_dict(_torch_load(path, weights_only), path), path)
        return model
    if _is_torchscript(path):
        return torch.jit.load(path, map_location='cpu')
    loaded = _torch_load(path, weights_only)
    if isinstance(loaded, nn.Module):
        return loaded
    raise ValueError(f'the teacher checkpoint {path!r} holds weights but no architecture. Fix: pass '
                     f"{{'model': <teacher architecture>, 'checkpoint': {path!r}}} instead of the bare path.")


# --- the algorithm -----------------------------------------------------------------------------------------


def _parse_time(value: Any, name: str) -> Time:
    if isinstance(value, Time):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f'{name}={value!r} is negative. Fix: use a batch count >= 0 or a time string such as '
                             f"'0.5dur'.")
        return Time(value, TimeUnit.BATCH)
    if isinstance(value, str):
        try:
            return Time.from_timestring(value)
        except ValueError:
            pass
    raise ValueError(f"{name}={value!r} is not a Composer time. Fix: use e.g. '0.5dur', '500ba', '2ep' or "
                     f"'1e9tok' (or an int number of batches).")


def _check_bool(value: Any, name: str) -> bool:
    # bool('false') is True: a YAML or CLI string must not silently flip a switch
    if not isinstance(value, bool):
        raise TypeError(f'{name}={value!r} is a {type(value).__name__}, not a bool. Fix: pass {name}=True or '
                        f'{name}=False.')
    return value


def _check_weight(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f'{name}={value!r} must be a finite number >= 0. Fix: use e.g. kd_weight=0.9, ce_weight=0.1.')
    return float(value)


class _Teacher:
    """One pool member: the module (None while released) and how to get it back."""

    def __init__(self, source: TeacherSource, index: int, weights_only: bool):
        self.index = index
        self.path: Optional[str] = None
        self.architecture: Optional[nn.Module] = None
        if isinstance(source, Mapping):
            unknown = set(source) - {'model', 'checkpoint'}
            if unknown or 'model' not in source:
                raise ValueError(f"teachers[{index}]={source!r} must be {{'model': module, 'checkpoint': path}} "
                                 f'(unknown keys: {sorted(unknown)}). Fix: give the architecture as `model` and the '
                                 f'weights file as `checkpoint`.')
            if not isinstance(source['model'], nn.Module):
                raise TypeError(f"teachers[{index}]['model'] is a {type(source['model']).__name__}, not a "
                                f'torch.nn.Module. Fix: pass the teacher architecture (e.g. small_resnet()).')
            self.architecture = source['model']
            checkpoint = source.get('checkpoint')
            self.path = None if checkpoint is None else os.fspath(checkpoint)
            self.module: Optional[nn.Module] = self.architecture
            if self.path is not None:
                load_teacher(self.path, self.architecture, weights_only)
        elif isinstance(source, (str, os.PathLike)):
            self.path = os.fspath(source)
            self.module = load_teacher(self.path, None, weights_only)
        elif isinstance(source, nn.Module):
            self.module = source
        else:
            raise TypeError(f'teachers[{index}] is a {type(source).__name__}. Fix: pass a torch.nn.Module, a '
                            f"ComposerModel, a checkpoint path, or {{'model': module, 'checkpoint': path}}.")
        self.weights_only = weights_only
        if self.path is not None:  # loaded by us: nobody else trains it
            self.freeze()
        self.description = self._describe()
        # Computed once while the module is at hand: a released teacher must not be reloaded just to checkpoint.
        self.num_parameters = sum(p.numel() for p in self.module.parameters())
        self.checksum = self._checksum(self.module)

    def _describe(self) -> str:
        assert self.module is not None
        name = type(_underlying(self.module)).__name__
        return name if self.path is None else f'{name}@{self.path}'

    def freeze(self) -> None:
        """No gradients, eval mode (done after checking that the module is not part of the student)."""
        if self.module is not None:
            for parameter in self.module.parameters():  # (ScriptModules have no requires_grad_())
                parameter.requires_grad_(False)
            self.module.eval()

    def materialize(self) -> nn.Module:
        """The module, reloaded from its checkpoint if it was released."""
        if self.module is None:
            assert self.path is not None
            self.module = load_teacher(self.path, None, self.weights_only)
            self.freeze()
        elif self.module.training:  # someone called .train() on it: teachers always run in eval mode
            self.module.eval()
        return self.module

    def release(self) -> None:
        """Free the teacher's device memory: drop it when it can be reloaded from disk, else move it to the CPU."""
        if self.module is None:
            return
        if self.path is not None and self.architecture is None:
            self.module = None
        else:
            self.module.to('cpu')

    def offload(self) -> None:
        """Move the teacher to the CPU (kept in memory: it is likely to be drawn again in this window)."""
        if self.module is not None:
            self.module.to('cpu')

    @staticmethod
    def _checksum(module: nn.Module) -> float:
        """A cheap fingerprint of the (frozen) weights: the float64 sum of |w| + w over floating-point tensors."""
        with torch.no_grad():
            return sum(float(t.detach().double().abs().sum() + t.detach().double().sum())
                       for t in module.state_dict().values() if t.is_floating_point())

    def manifest(self) -> dict:
        return {'index': self.index, 'description': self.description, 'path': self.path,
                'num_parameters': self.num_parameters, 'checksum': self.checksum}


def _forward_args(module: nn.Module) -> Optional[set]:
    """The names a module's ``forward`` takes by keyword, or None (pass everything) when it names none.

    A ``forward(input_ids, attention_mask=None, **kwargs)`` (most ``transformers`` models) gets only its named
    parameters: a batch's extra keys (``labels``, indices, sample weights) would otherwise land in ``**kwargs`` and
    be passed on to places that reject or misuse them. Only a bare ``forward(**kwargs)`` gets every key.
    """
    try:
        parameters = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return None
    named = {name for name, p in parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return named or None


def default_teacher_forward(teacher: nn.Module, batch: Any) -> Any:
    """Run a teacher on a (micro-)batch without modifying it and without computing the teacher's loss.

    A ``HuggingFaceModel`` teacher gets the batch's ``model_forward_args`` without ``labels``; another
    ``ComposerModel`` gets the batch; a plain module (a ``transformers`` model included) gets ``batch[0]`` of a
    tuple/list batch, the batch itself if it is neither a tuple/list nor a dict, or, for a dict batch, the non-label
    entries its ``forward`` names as parameters (all non-label entries if it names none, e.g. ``forward(**kwargs)``;
    extra keys never reach a ``**kwargs`` that sits next to named parameters).

    Example:
        >>> default_teacher_forward(nn.Linear(3, 2), (torch.zeros(4, 3), torch.zeros(4))).shape
        torch.Size([4, 2])
    """
    if isinstance(teacher, HuggingFaceModel):
        allowed = teacher.model_forward_args
        return teacher.model(**{k: v for k, v in batch.items() if k in allowed and k != 'labels'})
    if isinstance(teacher, ComposerModel):
        return teacher(batch)
    if isinstance(batch, Mapping):
        allowed = _forward_args(teacher)
        return teacher(**{k: v for k, v in batch.items() if k != 'labels' and (allowed is None or k in allowed)})
    if isinstance(batch, (tuple, list)):
        return teacher(batch[0])
    return teacher(batch)


def _scalar_loss(loss: Any) -> torch.Tensor:
    """The total of a loss as Composer computes it: ``loss['total']``, else the sum of the means."""
    if isinstance(loss, Mapping):
        if 'total' in loss:
            return loss['total'].mean()
        return sum(v.mean() for v in loss.values())
    if isinstance(loss, (tuple, list)):
        return sum(v.mean() for v in loss)
    return loss.mean()


def _mix_loss(loss: Any, kd: torch.Tensor, ce_weight: float, kd_weight: float) -> Any:
    """``ce_weight * loss + kd_weight * kd``, keeping the structure of Composer's loss (tensor, tuple or dict)."""
    if isinstance(loss, Mapping):
        mixed = {k: ce_weight * v for k, v in loss.items()}
        mixed['kd'] = kd_weight * kd
        if 'total' in loss:
            mixed['total'] = ce_weight * loss['total'] + kd_weight * kd
        return mixed
    if isinstance(loss, (tuple, list)):
        return tuple(ce_weight * v for v in loss) + (kd_weight * kd,)
    return ce_weight * loss + kd_weight * kd


def _callable_name(fn: Callable) -> str:
    """How ``__repr__`` shows a callable: its qualified name when that is an expression, else ``<type>``."""
    name = getattr(fn, '__qualname__', None)
    if isinstance(name, str) and all(part.isidentifier() for part in name.split('.')):
        return name
    return f'<{type(fn).__name__}>'


def _show_bound(bound: tuple[float, TimeUnit]) -> str:
    value, unit = bound
    return f'{value:g}{unit.value}'


class KnowledgeDistillation(Algorithm):
    """Distil a pool of frozen teachers into the student during a window of training, one teacher per step.

    During ``[start, end)`` the student's loss becomes ``ce_weight * loss + kd_weight * kd`` with
    ``kd = T² · KL(p_teacher ‖ p_student)`` (``loss='kl'``) or the MSE between logits (``loss='mse'``), averaged
    over samples, or over the tokens that carry a label for causal and masked LMs. Outside the window the loss is
    untouched and no teacher runs; after ``end``, with ``unload_after_window``, the teachers' device memory is freed
    (teachers loaded from a path are dropped, modules are moved to the CPU).

    **Window.** ``start`` and ``end`` are resolved at ``FIT_START``: ``dur`` against ``max_duration``, then epochs to
    batches when the dataloader's length is known, so bounds in different units (``start='2ep', end='0.5dur'``) are
    compared; a window that is empty once resolved is a ``ValueError``.

    **Sampling.** The teachers of a step are chosen once per optimizer step (at ``Event.BATCH_START``), so every
    micro-batch of a gradient-accumulation step uses the same teacher, and every rank draws the same one: the
    sampler is a numpy generator seeded identically on all ranks (``seed``, or the Trainer's ``rank_zero_seed`` when
    None; its state is broadcast from rank 0 at ``FIT_START``) and saved in :meth:`state_dict`, so a resumed run
    samples the same teachers. The checkpoint holds the policy, ``k`` and a manifest of the teachers (description,
    path, size, weight checksum), never their weights; resuming with another policy, ``k`` or pool size is an error,
    with other weights a warning.

    **Checks.** Teachers are frozen (``requires_grad=False``) and put in ``eval()`` mode when the Trainer is built
    (``Event.INIT``), after checking that they share no parameter with the student, are not in the optimizer (checked
    again at ``FIT_START``) and, where it can be read statically, have the student's output width. A teacher whose
    width cannot be read statically (e.g. a TorchScript archive) is run once on the first micro-batch of the first
    distillation step even when it is not that step's teacher, so a wrong width fails at step 0 and not when the
    teacher is first drawn, possibly hours later; this extra forward happens once per teacher and fit, and is not
    counted in ``kd/teacher_forward_time``. Teachers run under ``torch.no_grad()`` and the student's precision
    context, on the student's device. ``state.batch`` is never modified.

    **Labels.** For sequence logits ``(batch, positions, classes)`` only positions with a label
    (``labels != ignore_index``) are distilled. Whether position ``t`` is scored against label ``t + 1`` (causal LM)
    is read from the student's ``shift_labels`` attribute (Composer's ``HuggingFaceModel`` sets it for causal LMs);
    pass ``shift_labels`` to say it explicitly for other students.

    **Memory.** A teacher is moved to the student's device when it is first drawn and stays there until ``end``, so
    during the window device memory grows to the whole pool (compute stays one teacher per step). With
    ``offload_unused=True`` the teachers that the current step does not use are moved back to the CPU: device
    memory then holds only the step's teachers, at the cost of a host-to-device copy whenever the teacher changes.

    **Distributed.** Teachers are not part of ``state.model``: under DDP every rank holds a full copy of each
    teacher it has drawn (no gradients, nothing to synchronize). Under FSDP they are not sharded either: every rank
    also holds full copies (use ``offload_unused=True`` or smaller teachers when they do not fit); sharding teachers
    with FSDP is not implemented.

    Logged every step (Composer ``Logger``): ``kd/active``; in the window also ``kd/loss`` (the unweighted KD
    loss), ``kd/original_loss`` (the student's own loss before mixing), both averaged over micro-batches and ranks,
    ``kd/teacher`` (the index of the step's teacher, single-teacher policies; ``kd/teacher/<i>`` = 1 or 0 for
    ``random_k``), ``kd/num_teachers`` and ``kd/teacher_forward_time`` (seconds of teacher forwards this step on this
    rank). These cover the step's last attempt: when automatic micro-batching reruns a step after a CUDA OOM, the
    failed attempt's values are discarded.

    Args:
        teachers: The pool: a module or a list of modules (``torch.nn.Module`` or ``ComposerModel``), checkpoint paths
            (TorchScript archives; pickled modules with ``weights_only=False``) or
            ``{'model': architecture, 'checkpoint': path}`` dicts (weights read with ``weights_only=True``).
        policy: ``random`` (one teacher per step, the paper's O(1) ensemble), ``round_robin``, ``ensemble`` (mean of
            all teachers every step) or ``random_k`` (``k`` distinct teachers per step, averaged).
        kd_weight: Weight of the distillation loss (>= 0).
        ce_weight: Weight of the student's original loss inside the window (>= 0).
        temperature: Softmax temperature ``T`` of the KL loss (> 0); the KL is scaled by ``T²``.
        start: When distillation starts (a Composer ``Time``, a time string, or batches).
        end: When distillation stops (exclusive).
        loss: ``'kl'`` or ``'mse'`` (on logits, no temperature).
        seed: Seed of the teacher sampler; None uses the Trainer's ``rank_zero_seed``.
        unload_after_window: Free the teachers' device memory once ``end`` is reached (a bool).
        k: Teachers per step for ``random_k``.
        teacher_weights: Sampling probabilities of the teachers (``random``, ``random_k``) or their mixture weights
            (``ensemble``); uniform when None.
        ignore_index: Label value of positions without a label (HuggingFace: -100).
        teacher_forward: ``fn(teacher, batch) -> output`` to call a teacher; default :func:`default_teacher_forward`
            (which passes a dict batch's non-label keys that the teacher's ``forward`` names).
        weights_only: Load checkpoint paths with ``torch.load(weights_only=True)`` (default; set False only for
            trusted pickled modules).
        shift_labels: Whether the logits at position ``t`` predict the label at ``t + 1`` (causal LM). None (default)
            reads the student's ``shift_labels`` attribute (set by ``HuggingFaceModel`` for causal LMs; False when
            absent); True or False overrides it, e.g. for a causal LM that is not a ``HuggingFaceModel``.
        ensemble_average: What a KL ensemble (``ensemble``, ``random_k``) averages: ``'probs'`` (default, the mean
            of the teachers' probabilities) or ``'logits'`` (the softmax of their mean logits). MSE always averages
            logits.
        offload_unused: Move the teachers that a step does not use to the CPU (see **Memory**).

    Example:
        .. code-block:: python

            from composer import Trainer
            from composer_ext.algorithms import KnowledgeDistillation
            from composer_ext.data import build_image_dataloader
            from composer_ext.models import small_resnet, small_vgg

            teachers = [{'model': small_resnet(), 'checkpoint': f'runs/teacher{i}.pt'} for i in range(3)]
            kd = KnowledgeDistillation(teachers, policy='random', start='0dur', end='0.5dur')
            trainer = Trainer(model=small_vgg(widths=[16, 32]), algorithms=[kd], max_duration='2ep',
                              train_dataloader=build_image_dataloader('fashion_mnist', batch_size=128))
            trainer.fit()
    """

    def __init__(
        self,
        teachers: Union[TeacherSource, Sequence[TeacherSource]],
        policy: str = 'random',
        kd_weight: float = 0.9,
        ce_weight: float = 0.1,
        temperature: float = 4.0,
        start: Union[str, int, Time] = '0dur',
        end: Union[str, int, Time] = '0.5dur',
        loss: str = 'kl',
        seed: Optional[int] = None,
        unload_after_window: bool = True,
        *,
        k: Optional[int] = None,
        teacher_weights: Optional[Sequence[float]] = None,
        ignore_index: int = -100,
        teacher_forward: Optional[Callable[[nn.Module, Any], Any]] = None,
        weights_only: bool = True,
        shift_labels: Optional[bool] = None,
        ensemble_average: str = 'probs',
        offload_unused: bool = False,
    ):
        if isinstance(teachers, (nn.Module, str, os.PathLike, Mapping)):
            teachers = [teachers]
        if not isinstance(teachers, Sequence):
            raise TypeError(f'teachers is a {type(teachers).__name__}. Fix: pass a list of modules, ComposerModels, '
                            f"checkpoint paths or {{'model': ..., 'checkpoint': ...}} dicts.")
        if len(teachers) == 0:
            raise ValueError('teachers=[] is an empty pool. Fix: pass at least one teacher.')
        if policy not in POLICIES:
            raise ValueError(f'policy={policy!r} is not a teacher policy. Fix: use one of {list(POLICIES)}.')
        if loss not in LOSSES:
            raise ValueError(f'loss={loss!r} is not a distillation loss. Fix: use one of {list(LOSSES)}.')
        self.kd_weight = _check_weight(kd_weight, 'kd_weight')
        self.ce_weight = _check_weight(ce_weight, 'ce_weight')
        if self.kd_weight == 0 and self.ce_weight == 0:
            raise ValueError('kd_weight=0 and ce_weight=0 leave nothing to train on. Fix: make at least one positive, '
                             'e.g. kd_weight=0.9, ce_weight=0.1.')
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or \
                not math.isfinite(temperature) or temperature <= 0:
            raise ValueError(f'temperature={temperature!r} must be a positive number. Fix: use e.g. temperature=4.0.')
        self.start, self.end = _parse_time(start, 'start'), _parse_time(end, 'end')
        self._check_window(self.start, self.end)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ValueError(f'seed={seed!r} must be None or an int >= 0. Fix: e.g. seed=0.')
        n = len(teachers)
        if policy == 'random_k':
            if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
                raise ValueError(f'k={k!r} is out of range for policy=\'random_k\' with {n} teachers. Fix: use an '
                                 f'int 1 <= k <= {n}.')
        elif k is not None:
            raise ValueError(f"k={k!r} only applies to policy='random_k' (policy={policy!r}). Fix: remove k or use "
                             f"policy='random_k'.")
        if teacher_weights is not None:
            if policy == 'round_robin':
                raise ValueError("teacher_weights has no effect with policy='round_robin'. Fix: remove it, or use "
                                 "policy='random' to sample teachers with these probabilities.")
            teacher_weights = _normalized_weights(teacher_weights, n, 'teacher_weights')
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise ValueError(f'ignore_index={ignore_index!r} must be an int. Fix: use -100 (HuggingFace).')
        if teacher_forward is not None and not callable(teacher_forward):
            raise TypeError(f'teacher_forward={teacher_forward!r} is not callable. Fix: pass fn(teacher, batch).')
        if shift_labels is not None and not isinstance(shift_labels, bool):
            raise TypeError(f'shift_labels={shift_labels!r} is a {type(shift_labels).__name__}, not None or a bool. '
                            f'Fix: pass None (read it from the student), True (causal LM) or False.')
        if ensemble_average not in ENSEMBLE_AVERAGES:
            raise ValueError(f'ensemble_average={ensemble_average!r} is not an ensemble average. Fix: use one of '
                             f'{list(ENSEMBLE_AVERAGES)}.')
        if ensemble_average != 'probs' and policy in ('random', 'round_robin'):
            raise ValueError(f'ensemble_average={ensemble_average!r} has no effect with policy={policy!r} (one teacher '
                             f"per step). Fix: remove it, or use policy='ensemble' or 'random_k'.")
        self.policy, self.temperature, self.loss = policy, float(temperature), loss
        self.seed, self.k = seed, k
        self.unload_after_window = _check_bool(unload_after_window, 'unload_after_window')
        self.offload_unused = _check_bool(offload_unused, 'offload_unused')
        self.weights_only = _check_bool(weights_only, 'weights_only')
        self.teacher_weights = teacher_weights
        self.ignore_index = ignore_index
        self.shift_labels, self.ensemble_average = shift_labels, ensemble_average
        self.teacher_forward = teacher_forward or default_teacher_forward
        self._sources = list(teachers)
        self._teachers = [_Teacher(source, i, self.weights_only) for i, source in enumerate(teachers)]

        self._generator: Optional[np.random.Generator] = None
        self._draws = 0  # distillation steps so far (round_robin's position)
        self._window: Optional[tuple[tuple[float, TimeUnit], tuple[float, TimeUnit]]] = None
        self._active = False
        self._released = False
        self._resident: set[int] = set()  # teachers this algorithm has put on the training device
        self._width_checked: set[int] = set()  # teachers whose output width is known to match the student's
        self.current_teachers: list[int] = []
        self._reset_step_stats()

    # -- construction helpers -------------------------------------------------------------------------------

    @staticmethod
    def _check_window(start: Time, end: Time) -> None:
        if start.unit == end.unit and end.value <= start.value:
            raise ValueError(f'end={end} is not after start={start}. Fix: choose end > start, e.g. start=\'0dur\', '
                             f"end='0.5dur'.")
        for name, bound in (('start', start), ('end', end)):
            if bound.value < 0 or (bound.unit == TimeUnit.DURATION and bound.value > 1):
                raise ValueError(f"{name}={bound} is outside the run. Fix: use a time >= 0 (a 'dur' fraction within "
                                 f'[0, 1]).')

    @property
    def teachers(self) -> list[Optional[nn.Module]]:
        """The pool's modules (None for a teacher released after the window)."""
        return [t.module for t in self._teachers]

    @property
    def num_teachers(self) -> int:
        return len(self._teachers)

    @property
    def resident_teachers(self) -> list[int]:
        """The indices of the teachers this algorithm has placed on the training device and not moved off since."""
        return sorted(self._resident)

    def __repr__(self) -> str:
        def show(source: Any) -> str:
            if isinstance(source, (str, os.PathLike)):
                return repr(os.fspath(source))
            if isinstance(source, Mapping):
                return (f"{{'model': <{type(source['model']).__name__}>, 'checkpoint': "
                        f"{None if source.get('checkpoint') is None else os.fspath(source['checkpoint'])!r}}}")
            return f'<{type(_underlying(source)).__name__}>'

        args = [f'teachers=[{", ".join(show(s) for s in self._sources)}]', f'policy={self.policy!r}',
                f'kd_weight={self.kd_weight!r}', f'ce_weight={self.ce_weight!r}', f'temperature={self.temperature!r}',
                f"start='{self.start}'", f"end='{self.end}'", f'loss={self.loss!r}', f'seed={self.seed!r}',
                f'unload_after_window={self.unload_after_window!r}']
        if self.k is not None:
            args.append(f'k={self.k!r}')
        if self.teacher_weights is not None:
            args.append(f'teacher_weights={self.teacher_weights!r}')
        if self.ignore_index != -100:
            args.append(f'ignore_index={self.ignore_index!r}')
        if self.teacher_forward is not default_teacher_forward:
            args.append(f'teacher_forward={_callable_name(self.teacher_forward)}')
        if not self.weights_only:
            args.append('weights_only=False')
        if self.shift_labels is not None:
            args.append(f'shift_labels={self.shift_labels!r}')
        if self.ensemble_average != 'probs':
            args.append(f'ensemble_average={self.ensemble_average!r}')
        if self.offload_unused:
            args.append('offload_unused=True')
        return f'KnowledgeDistillation({", ".join(args)})'

    # -- state ------------------------------------------------------------------------------------------------

    def manifest(self) -> list[dict]:
        """What the checkpoint records about each teacher (instead of its weights)."""
        return [t.manifest() for t in self._teachers]

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update({
            'generator': None if self._generator is None else copy.deepcopy(self._generator.bit_generator.state),
            'draws': self._draws,
            'policy': self.policy,
            'k': self.k,
            'teachers': self.manifest(),
        })
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # The sampler state only means the same thing under the same policy, k and pool: refuse anything else rather
        # than silently drawing other teachers than the interrupted run would have.
        saved_policy = state.get('policy')
        if saved_policy is not None and saved_policy != self.policy:
            raise ValueError(f'the checkpoint was trained with policy={saved_policy!r}, this run has '
                             f'policy={self.policy!r}. Fix: resume with policy={saved_policy!r} (the teacher sampling '
                             f'depends on it), or start a new run instead of resuming.')
        saved = state.get('teachers') or []
        if len(saved) != self.num_teachers:
            raise ValueError(f'the checkpoint was trained with {len(saved)} teachers '
                             f'({[t.get("description") for t in saved]}), this run has {self.num_teachers}. Fix: '
                             f'resume with the same teacher pool (the teacher sampling depends on it).')
        if 'k' in state and state['k'] != self.k:
            saved_k = state['k']
            raise ValueError(f'the checkpoint was trained with k={saved_k!r}, this run has k={self.k!r}. Fix: resume '
                             f'with k={saved_k!r} (the teacher sampling depends on it), or start a new run instead of '
                             f'resuming.')
        changed = []
        for old, teacher in zip(saved, self._teachers):
            checksum = teacher.checksum
            if old.get('checksum') is not None and not math.isclose(old['checksum'], checksum, rel_tol=1e-6,
                                                                    abs_tol=1e-6):
                changed.append(f'{teacher.index} ({old.get("description")} -> {teacher.description})')
        if changed:
            warnings.warn(f'KnowledgeDistillation: the weights of teacher(s) {", ".join(changed)} differ from the '
                          f'checkpoint\'s teachers; the resumed run will not match the original one.', UserWarning)
        if state.get('generator') is not None:
            generator = np.random.Generator(np.random.PCG64())
            generator.bit_generator.state = copy.deepcopy(state['generator'])
            self._generator = generator
        self._draws = int(state.get('draws', 0))

    # -- events -----------------------------------------------------------------------------------------------

    def match(self, event: Event, state: State) -> bool:
        if event in (Event.INIT, Event.FIT_START, Event.BATCH_START):
            return True
        return self._active and event in (Event.BEFORE_TRAIN_BATCH, Event.AFTER_LOSS, Event.BATCH_END)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.INIT:
            self._check_against_student(state)
        elif event == Event.FIT_START:
            self._fit_start(state)
        elif event == Event.BATCH_START:
            self._batch_start(state, logger)
        elif event == Event.BEFORE_TRAIN_BATCH:
            # Fires at every attempt at the step: automatic micro-batching reruns the whole step (same teachers, no
            # new BATCH_START) after a CUDA OOM, and the failed attempt's sums must not leak into the logged values.
            self._reset_step_stats()
        elif event == Event.AFTER_LOSS:
            self._distil(state)
        elif event == Event.BATCH_END:
            self._log_step(logger)

    def _check_against_student(self, state: State) -> None:
        """Refuse teachers that share parameters with the student, have another output width, or are optimized;
        then freeze them. Runs at INIT (so a bad pool fails when the Trainer is built) and again at FIT_START."""
        student = _underlying(state.model)
        student_params = {id(p) for p in student.parameters()}
        width = output_width(student)
        for teacher in self._teachers:
            module = teacher.module
            if module is None:
                continue
            if module is student or any(id(p) in student_params for p in module.parameters()):
                raise ValueError(f'teachers[{teacher.index}] ({teacher.description}) shares parameters with the '
                                 f'student. Fix: pass a frozen copy, e.g. copy.deepcopy(model), as the teacher.')
            teacher_width = output_width(module)
            if width is not None and teacher_width is not None:
                if width != teacher_width:
                    raise ValueError(f'teachers[{teacher.index}] ({teacher.description}) has output width '
                                     f'{teacher_width} but the student has {width} (classes or vocabulary). Fix: '
                                     f"distil only from teachers with the student's classes/vocabulary.")
                self._width_checked.add(teacher.index)
        self._check_optimizers(state)
        for teacher in self._teachers:
            teacher.freeze()

    def _check_optimizers(self, state: State) -> None:
        owners = {id(p): t for t in self._teachers if t.module is not None for p in t.module.parameters()}
        for optimizer in ensure_tuple(state.optimizers):
            for group in optimizer.param_groups:
                for parameter in group['params']:
                    teacher = owners.get(id(parameter))
                    if teacher is not None:
                        raise ValueError(f'a parameter of teachers[{teacher.index}] ({teacher.description}) is in the '
                                         f'optimizer {type(optimizer).__name__}. Fix: build the optimizer from the '
                                         f'student only, e.g. DecoupledSGDW(student.parameters(), ...).')

    def _fit_start(self, state: State) -> None:
        self._check_against_student(state)
        self._window = self._resolve_window(state)
        if self._generator is None:
            seed = self.seed if self.seed is not None else state.rank_zero_seed
            self._generator = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), 0x4B44])))
        if dist.get_world_size() > 1:  # every rank must sample the same teachers: rank 0's sampler rules
            payload = [(self._generator.bit_generator.state, self._draws)]
            dist.broadcast_object_list(payload, src=0)
            self._generator.bit_generator.state, self._draws = payload[0]
        self._active = False

    def _resolve_window(self, state: State) -> tuple[tuple[float, TimeUnit], tuple[float, TimeUnit]]:
        start, end = self._resolve(self.start, state), self._resolve(self.end, state)
        if start[1] == end[1] and end[0] <= start[0]:
            per_epoch = '' if state.dataloader_len is None else f', {int(state.dataloader_len)} batches per epoch'
            raise ValueError(f'end={self.end} is not after start={self.start}: for max_duration={state.max_duration}'
                             f'{per_epoch} they resolve to end={_show_bound(end)}, start={_show_bound(start)}, an '
                             f"empty window. Fix: choose end > start, e.g. start='0dur', end='0.5dur'.")
        return start, end

    @staticmethod
    def _resolve(bound: Time, state: State) -> tuple[float, TimeUnit]:
        """A window bound as (threshold, unit) compared with ``state.timestamp``: ``dur`` becomes ``max_duration``'s
        unit, and epochs become batches where the epoch length is known (so ``0.5dur`` of an epoch-based run ends
        mid-epoch, and bounds given in epochs, batches and ``dur`` can be compared with each other)."""
        value, unit = float(bound.value), bound.unit
        if unit == TimeUnit.DURATION:
            max_duration = state.max_duration
            assert max_duration is not None, 'the Trainer requires max_duration'
            value, unit = value * max_duration.value, max_duration.unit
        if unit == TimeUnit.EPOCH and state.dataloader_len is not None:
            value, unit = value * int(state.dataloader_len), TimeUnit.BATCH
        return value, unit

    def _in_window(self, state: State) -> tuple[bool, bool]:
        """(inside [start, end), at or past end)."""
        assert self._window is not None
        (start_value, start_unit), (end_value, end_unit) = self._window
        past_end = state.timestamp.get(end_unit).value >= end_value
        started = state.timestamp.get(start_unit).value >= start_value
        return started and not past_end, past_end

    def _batch_start(self, state: State, logger: Logger) -> None:
        if self._window is None:  # BATCH_START without FIT_START cannot happen in a Trainer; be safe anyway
            self._fit_start(state)
        active, past_end = self._in_window(state)
        self._active = active
        if not active:
            self.current_teachers = []
            if past_end and self.unload_after_window and not self._released:
                self._release()
            logger.log_metrics({'kd/active': 0.0})
            return
        self.current_teachers = select_teachers(self.policy, self.num_teachers, self._draws, self._generator, self.k,
                                                self.teacher_weights if self.policy != 'ensemble' else None)
        self._draws += 1
        self._released = False
        if self.offload_unused:
            for index in sorted(self._resident - set(self.current_teachers)):
                self._teachers[index].offload()
                self._resident.discard(index)
        for index in self.current_teachers:
            self._place(index, state)
        self._reset_step_stats()

    def _place(self, index: int, state: State) -> nn.Module:
        """Teacher ``index`` on the training device (reloaded if it was released)."""
        module = self._teachers[index].materialize()
        if index not in self._resident:
            state.device.module_to_device(module)
            self._resident.add(index)
        return module

    def _release(self) -> None:
        for teacher in self._teachers:
            teacher.release()
        self._resident.clear()
        self._released = True
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _reset_step_stats(self) -> None:
        self._kd_sum: Optional[torch.Tensor] = None
        self._original_sum: Optional[torch.Tensor] = None
        self._samples = 0.0
        self._forward_seconds = 0.0
        self._cuda_events: list = []

    def _student_shift_labels(self, state: State) -> bool:
        if self.shift_labels is not None:
            return self.shift_labels
        return bool(getattr(_underlying(state.model), 'shift_labels', False))

    def _check_teacher_output(self, teacher: _Teacher, logits: torch.Tensor, student_logits: torch.Tensor) -> None:
        """Refuse teacher logits that cannot be compared with the student's, naming the pool member."""
        if logits.shape != student_logits.shape:
            width, student_width = logits.shape[-1] if logits.dim() else None, student_logits.shape[-1]
            shapes = f'(teacher logits: {tuple(logits.shape)}, student logits: {tuple(student_logits.shape)})'
            if width != student_width:
                raise ValueError(f'teachers[{teacher.index}] ({teacher.description}) has output width {width} but the '
                                 f'student has {student_width} (classes or vocabulary) {shapes}. Fix: distil only '
                                 f"from teachers with the student's classes/vocabulary (the same tokenizer and "
                                 f'num_classes).')
            raise ValueError(f'teachers[{teacher.index}] ({teacher.description}) returned logits of another shape than '
                             f"the student's {shapes}. Fix: make the teacher see the same inputs as the student (see "
                             f'teacher_forward).')
        self._width_checked.add(teacher.index)

    def _check_unchecked_teachers(self, state: State, student_logits: torch.Tensor) -> None:
        """Run every teacher whose output width is still unverified once on this micro-batch (see the class doc)."""
        for teacher in self._teachers:
            if teacher.index in self._width_checked:
                continue
            was_resident = teacher.index in self._resident
            module = self._place(teacher.index, state)
            with torch.no_grad(), get_precision_context(state.precision, state.precision_config,
                                                        fp8_autocast_enabled=False):
                logits = extract_logits(self.teacher_forward(module, state.batch))
            self._check_teacher_output(teacher, logits, student_logits)
            if self.offload_unused and not was_resident and teacher.index not in self.current_teachers:
                teacher.offload()
                self._resident.discard(teacher.index)

    def _distil(self, state: State) -> None:
        batch = state.batch
        student_logits = extract_logits(state.outputs)
        use_cuda_events = student_logits.is_cuda
        if use_cuda_events:
            start_event, end_event = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start_event.record()
        else:
            started = time.perf_counter()
        teacher_logits = []
        with torch.no_grad(), get_precision_context(state.precision, state.precision_config,
                                                    fp8_autocast_enabled=False):
            for index in self.current_teachers:
                module = self._teachers[index].module
                assert module is not None
                teacher_logits.append(extract_logits(self.teacher_forward(module, batch)).detach())
        if use_cuda_events:
            end_event.record()
            self._cuda_events.append((start_event, end_event))
        else:
            self._forward_seconds += time.perf_counter() - started
        for index, logits in zip(self.current_teachers, teacher_logits):
            self._check_teacher_output(self._teachers[index], logits, student_logits)
        if len(self._width_checked) < self.num_teachers:
            self._check_unchecked_teachers(state, student_logits)

        labels = batch.get('labels') if isinstance(batch, Mapping) else (
            batch[1] if isinstance(batch, (tuple, list)) and len(batch) > 1 else None)
        shift_labels = self._student_shift_labels(state)
        if labels is None and isinstance(batch, Mapping) and isinstance(batch.get('attention_mask'), torch.Tensor):
            mask = distillation_mask(batch['attention_mask'].long(), student_logits.shape, shift_labels, ignore_index=0)
        else:
            mask = distillation_mask(labels, student_logits.shape, shift_labels, self.ignore_index)
        weights = self.teacher_weights if self.policy == 'ensemble' else None
        kd = kd_loss(student_logits, teacher_logits, self.temperature, self.loss, mask, weights, self.ensemble_average)

        original = state.loss
        samples = float(student_logits.shape[0])
        original_value = _scalar_loss(original).detach().float() * samples
        kd_value = kd.detach() * samples
        self._kd_sum = kd_value if self._kd_sum is None else self._kd_sum + kd_value
        self._original_sum = original_value if self._original_sum is None else self._original_sum + original_value
        self._samples += samples
        state.loss = _mix_loss(original, kd, self.ce_weight, self.kd_weight)

    def _log_step(self, logger: Logger) -> None:
        if self._kd_sum is None or self._original_sum is None:
            return
        totals = torch.stack([self._kd_sum.reshape(()), self._original_sum.reshape(()),
                              torch.tensor(self._samples, device=self._kd_sum.device)]).double()
        dist.all_reduce(totals, reduce_operation='SUM')
        kd_mean, original_mean, _ = (totals / totals[2]).tolist()
        for _, end_event in self._cuda_events[-1:]:  # long done by now (the loss was reduced); be safe anyway
            end_event.synchronize()
        seconds = self._forward_seconds + sum(s.elapsed_time(e) for s, e in self._cuda_events) / 1000.0
        metrics = {'kd/active': 1.0, 'kd/loss': kd_mean, 'kd/original_loss': original_mean,
                   'kd/num_teachers': float(len(self.current_teachers)), 'kd/teacher_forward_time': seconds}
        if len(self.current_teachers) == 1:
            metrics['kd/teacher'] = float(self.current_teachers[0])
        elif self.policy == 'random_k':  # which k of the pool served this step
            metrics.update({f'kd/teacher/{i}': float(i in self.current_teachers) for i in range(self.num_teachers)})
        logger.log_metrics(metrics)
        self._reset_step_stats()


# --- YAML builder ------------------------------------------------------------------------------------------


def build_knowledge_distillation(
    context,
    teachers: list[dict],
    policy: str = 'random',
    kd_weight: float = 0.9,
    ce_weight: float = 0.1,
    temperature: float = 4.0,
    start: Union[str, int, Time] = '0dur',
    end: Union[str, int, Time] = '0.5dur',
    loss: str = 'kl',
    seed: Optional[int] = None,
    unload_after_window: bool = True,
    k: Optional[int] = None,
    teacher_weights: Optional[list[float]] = None,
    ignore_index: int = -100,
    weights_only: bool = True,
    shift_labels: Optional[bool] = None,
    ensemble_average: str = 'probs',
    offload_unused: bool = False,
) -> KnowledgeDistillation:
    """Build :class:`KnowledgeDistillation` from a YAML ``algorithms`` entry.

    Each teacher is ``{model: <model section>, checkpoint: <path>}``: the model section is built with the run's
    model registry (``context.build_model``) and its weights are loaded from the checkpoint (a Composer checkpoint,
    e.g. ``runs/<teacher run>/checkpoints/latest-rank0.pt``, or a state dict).

    Example:
        .. code-block:: yaml

            algorithms:
              knowledge_distillation:
                teachers:
                  - {model: {name: small_resnet}, checkpoint: runs/kd_teacher_resnet/checkpoints/latest-rank0.pt}
                  - {model: {name: small_vgg}, checkpoint: runs/kd_teacher_vgg/checkpoints/latest-rank0.pt}
                policy: random
                end: 0.5dur
    """
    key = 'algorithms.knowledge_distillation.teachers'
    if not isinstance(teachers, list) or not teachers:
        raise ValueError(f'{key}={teachers!r} must be a non-empty list of {{model: ..., checkpoint: ...}}. Fix: list '
                         f'at least one teacher.')
    for i, entry in enumerate(teachers):  # check every entry before loading any checkpoint
        if not isinstance(entry, dict) or set(entry) - {'model', 'checkpoint'} or 'model' not in entry or \
                'checkpoint' not in entry:
            raise ValueError(f'{key}[{i}]={entry!r} must be {{model: <model section>, checkpoint: <path>}}. Fix: '
                             f'e.g. {{model: {{name: small_resnet}}, checkpoint: '
                             f'runs/teacher/checkpoints/latest-rank0.pt}}.')
        if not isinstance(entry['checkpoint'], str):
            raise ValueError(f'{key}[{i}].checkpoint={entry["checkpoint"]!r} must be a path string. Fix: give the '
                             f"teacher's checkpoint file.")
    pool = [{'model': context.build_model(entry['model'], f'{key}[{i}].model'), 'checkpoint': entry['checkpoint']}
            for i, entry in enumerate(teachers)]
    return KnowledgeDistillation(pool, policy=policy, kd_weight=kd_weight, ce_weight=ce_weight,
                                 temperature=temperature, start=start, end=end, loss=loss, seed=seed,
                                 unload_after_window=unload_after_window, k=k, teacher_weights=teacher_weights,
                                 ignore_index=ignore_index, weights_only=weights_only, shift_labels=shift_labels,
                                 ensemble_average=ensemble_average, offload_unused=offload_unused)
