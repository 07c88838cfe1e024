"""The Composer Algorithm of random-teacher knowledge distillation ("Reduce, Reuse, Recycle", Blakeney et al. 2022).

A student trains on ``ce_weight * original_loss + kd_weight * T² · KL(p_teacher ‖ p_student)`` during a window
of training (by default the first half) and on its original loss alone afterwards. The teacher of each optimizer
step is drawn from a pool, so an ensemble's benefit costs one teacher forward per step. The loss is computed by the
functional core in :mod:`.loss`; the pool members and the selection policies are in :mod:`.teachers`.

Design points that differ from Composer's unmerged PR #1819: the KL has the teacher as the target distribution
and gradients flow only through the student; ``state.batch`` is never modified; teachers are frozen and in
``eval()`` mode; the teacher is drawn once per optimizer step (at ``BATCH_START``), so every micro-batch of a
gradient-accumulation step and every rank uses the same teacher; the sampler's state is checkpointed.
"""

from __future__ import annotations

import copy
import math
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from composer.core import Algorithm, Event, State, Time, TimeUnit
from composer.core.precision import get_precision_context
from composer.loggers import Logger
from composer.utils import dist, ensure_tuple
from torch import nn

from composer_ext.core.forward import NOT_INPUTS, extract_logits
from composer_ext.core.foundry_sections import run_tokenizer
from composer_ext.core.timing import parse_time, reached, resolve_bound
from composer_ext.core.unwrap import unwrap_parallel
from composer_ext.distillation.loss import (check_kd_loss_arguments, check_teacher_logits, distillation_mask,
                                            kd_loss, mix_loss, output_width, scalar_loss)
from composer_ext.distillation.cache import TeacherOutputCache, decode_logits, encode_logits, input_digests
from composer_ext.distillation.teachers import Teacher, TeacherSource, check_selection, default_teacher_forward, \
    is_model_spec, resolve_teacher_precision, select_teachers, teacher_context

__all__ = ['KnowledgeDistillation']


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


def _callable_name(fn: Callable) -> str:
    """How ``__repr__`` shows a callable: its qualified name when that is an expression, else ``<type>``."""
    name = getattr(fn, '__qualname__', None)
    if isinstance(name, str) and all(part.isidentifier() for part in name.split('.')):
        return name
    return f'<{type(fn).__name__}>'


def _student_device(state: State) -> Optional[torch.device]:
    """The device of the student's parameters (where its teachers run), or None for a student without parameters."""
    for parameter in unwrap_parallel(state.model).parameters():
        return parameter.device
    return None


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
    path, size, SHA-256 of the weights), never their weights; resuming with another policy, ``k`` or pool size is an
    error, with other weights a warning.

    **Checks.** Teachers are frozen (``requires_grad=False``) and put in ``eval()`` mode when the Trainer is built
    (``Event.INIT``), after checking that they share no parameter with the student, are not in the optimizer (checked
    again at ``FIT_START``) and, where it can be read statically, have the student's output width. A teacher whose
    width cannot be read statically (e.g. a TorchScript archive) is run once on the first micro-batch of the first
    distillation step even when it is not that step's teacher, so a wrong width fails at step 0 and not when the
    teacher is first drawn, possibly hours later; this extra forward happens once per teacher and fit, and is not
    counted in ``kd/teacher_forward_time``. Teachers run under ``torch.inference_mode()`` (no autograd state) and
    the student's precision context (or bf16 autocast, see ``teacher_precision``), on the student's device; only the
    step's teachers run. ``state.batch`` is never modified, except that a sample id carried as a third tuple element
    (``build_image_dataloader(..., sample_ids=True)``) is taken out of each micro-batch before the student's forward.

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
    with FSDP is not implemented. Tested with FSDP2 on 2 gloo ranks (``tests/test_fsdp2_techniques.py``): the
    teacher's parameters stay plain tensors, the draws, losses and weights match DDP's, and a sharded checkpoint
    resumes bit for bit.

    Logged every step (Composer ``Logger``): ``kd/active``; in the window also ``kd/loss`` (the unweighted KD
    loss), ``kd/original_loss`` (the student's own loss before mixing), both averaged over micro-batches and ranks,
    ``kd/teacher`` (the index of the step's teacher, single-teacher policies; ``kd/teacher/<i>`` = 1 or 0 for
    ``random_k``), ``kd/num_teachers`` and ``kd/teacher_forward_time`` (seconds of teacher forwards this step on this
    rank). These cover the step's last attempt: when automatic micro-batching reruns a step after a CUDA OOM, the
    failed attempt's values are discarded.

    **Teachers as YAML** (llm-foundry's ``algorithms: knowledge_distillation: {teachers: [...]}``, where only plain
    values can be written): a teacher may be a *model spec*, ``{'model': <llm-foundry model section>, 'checkpoint':
    path}`` (e.g. ``{name: mpt_causal_lm, d_model: 64, ...}`` and an llm-foundry run's ``latest-rank0.pt``) or
    ``{'pretrained_model_name_or_path': <local Hugging Face directory>}`` (optionally with a ``checkpoint``). A spec is
    checked when the algorithm is built (keys, the checkpoint file, the model name, ``config.json``), so a YAML mistake
    fails before the model is built, and built at the first ``FIT_START`` with
    :func:`composer_ext.core.foundry_sections.build_model_spec`: with the run's tokenizer (the student's
    ``tokenizer``), on the student's device, frozen; a spec without checkpoint is initialized from ``seed`` (or the
    Trainer's ``rank_zero_seed``), so every rank builds the same teacher, and ranks whose weights differ are refused.
    After the window it is dropped and rebuilt if a window comes again. A ``model`` that is a ``torch.nn.Module`` is
    an architecture, not a section (our runner's YAML builder builds its registry sections into modules).

    Args:
        teachers: The pool: a module or a list of modules (``torch.nn.Module`` or ``ComposerModel``), checkpoint paths
            (TorchScript archives; pickled modules with ``weights_only=False``),
            ``{'model': architecture, 'checkpoint': path}`` dicts (weights read with ``weights_only=True``), or model
            specs (see **Teachers as YAML**).
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
            (which passes a dict batch's non-label keys that the teacher's ``forward`` names; a TorchScript teacher's
            names are read from its compiled schema).
        weights_only: Load checkpoint paths with ``torch.load(weights_only=True)`` (default; set False only for
            trusted pickled modules).
        shift_labels: Whether the logits at position ``t`` predict the label at ``t + 1`` (causal LM). None (default)
            reads the student's ``shift_labels`` attribute (set by ``HuggingFaceModel`` for causal LMs; False when
            absent); True or False overrides it, e.g. for a causal LM that is not a ``HuggingFaceModel``.
        ensemble_average: What a KL ensemble (``ensemble``, ``random_k``) averages: ``'probs'`` (default, the mean
            of the teachers' probabilities) or ``'logits'`` (the softmax of their mean logits). MSE always averages
            logits.
        offload_unused: Move the teachers that a step does not use to the CPU (see **Memory**).
        teacher_precision: ``'auto'`` (default: bf16 autocast for teachers on a bf16-capable GPU when the student
            runs in fp32 or bf16, the student's precision elsewhere) or ``'student'`` (always the student's). Teachers
            always run under ``torch.inference_mode()``.
        teacher_channels_last: Run teachers that have 2-d convolutions in the channels-last memory format (their
            weights and a 4-d image input; the batch itself is not modified): 0.78x the teacher forward time of a
            small ResNet on CPU, and the layout tensor cores want on GPUs.
        cache: A directory for the teacher-output cache (see **Cache**), or None (teachers run live every step).
        cache_top_k: Store each teacher's top ``k`` logits and one bucket for the rest; None (default) stores all
            logits (exact up to fp16; the right choice for class counts up to a few thousand).
        cache_transform: A name for the deterministic input transform of the training data, including its seed
            (e.g. ``'center_crop24'``), made part of the cache's identity; None when the inputs are the dataset's
            items as they are.
        cache_check_inputs: Check on every cache read that the input is the one cached under its sample id (a
            digest of its bytes); refuses inputs augmented per epoch.
        cache_flush_every: New entries of one teacher buffered before a chunk is written (also written at every
            epoch end and at the end of fit).

    **Cache** (``cache=DIR``, the paper's "Reuse"): each teacher's logits are stored per sample id (fp16, see
    :mod:`composer_ext.distillation.cache`), written the first time a teacher sees a sample and read in every later
    epoch and by every later run with the same teachers (SHA-256 of their weights), the same data (the dataset's
    ``fingerprint``), the same ``cache_transform``, encoding and teacher precision; a directory written for another
    identity is refused. The training data must carry sample ids: ``build_image_dataloader(..., sample_ids=True)``
    (the id, a third batch element, is taken out of the batch before the student's forward) or a ``sample_id`` key
    of a dict batch, and the dataset must have a ``fingerprint``. With a cache, the teachers' logits always go through
    the stored encoding, also when they are computed live, so a step's loss does not depend on whether its entries
    were cached: resumed, repeated and cached runs match. Only ``(batch, classes)`` logits are cached. Under several
    ranks each rank writes its own chunk files (ranks see disjoint samples) and reads every rank's at each epoch.

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
        teacher_precision: str = 'auto',
        teacher_channels_last: bool = True,
        cache: Optional[Union[str, os.PathLike]] = None,
        cache_top_k: Optional[int] = None,
        cache_transform: Optional[str] = None,
        cache_check_inputs: bool = True,
        cache_flush_every: int = 4096,
    ):
        if isinstance(teachers, (nn.Module, str, os.PathLike, Mapping)):
            teachers = [teachers]
        if not isinstance(teachers, Sequence):
            raise TypeError(f'teachers is a {type(teachers).__name__}. Fix: pass a list of modules, ComposerModels, '
                            f"checkpoint paths or {{'model': ..., 'checkpoint': ...}} dicts.")
        if len(teachers) == 0:
            raise ValueError('teachers=[] is an empty pool. Fix: pass at least one teacher.')
        # The checks the functional core makes anyway (select_teachers, kd_loss), made once here so that a bad
        # argument fails when the algorithm is built rather than at the first distillation step.
        teacher_weights = check_selection(policy, len(teachers), k, teacher_weights, weights_name='teacher_weights')
        check_kd_loss_arguments(temperature, loss, ensemble_average)
        self.kd_weight = _check_weight(kd_weight, 'kd_weight')
        self.ce_weight = _check_weight(ce_weight, 'ce_weight')
        if self.kd_weight == 0 and self.ce_weight == 0:
            raise ValueError('kd_weight=0 and ce_weight=0 leave nothing to train on. Fix: make at least one positive, '
                             'e.g. kd_weight=0.9, ce_weight=0.1.')
        self.start, self.end = parse_time(start, 'start'), parse_time(end, 'end')
        if self.start.unit == self.end.unit and self.end.value <= self.start.value:
            raise ValueError(f'end={self.end} is not after start={self.start}. Fix: choose end > start, e.g. '
                             f"start='0dur', end='0.5dur'.")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ValueError(f'seed={seed!r} must be None or an int >= 0. Fix: e.g. seed=0.')
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise ValueError(f'ignore_index={ignore_index!r} must be an int. Fix: use -100 (HuggingFace).')
        if teacher_forward is not None and not callable(teacher_forward):
            raise TypeError(f'teacher_forward={teacher_forward!r} is not callable. Fix: pass fn(teacher, batch).')
        if shift_labels is not None and not isinstance(shift_labels, bool):
            raise TypeError(f'shift_labels={shift_labels!r} is a {type(shift_labels).__name__}, not None or a bool. '
                            f'Fix: pass None (read it from the student), True (causal LM) or False.')
        if ensemble_average != 'probs' and policy in ('random', 'round_robin'):
            raise ValueError(f'ensemble_average={ensemble_average!r} has no effect with policy={policy!r} (one teacher '
                             f"per step). Fix: remove it, or use policy='ensemble' or 'random_k'.")
        self.policy, self.temperature, self.loss = policy, float(temperature), loss
        self.seed, self.k = seed, k
        self.unload_after_window = _check_bool(unload_after_window, 'unload_after_window')
        self.offload_unused = _check_bool(offload_unused, 'offload_unused')
        resolve_teacher_precision(teacher_precision, None, 'fp32', False)  # checks the value
        self.teacher_precision = teacher_precision
        self.teacher_channels_last = _check_bool(teacher_channels_last, 'teacher_channels_last')
        self._channels_last: set[int] = set()  # teachers converted to channels-last
        self._check_cache_arguments(cache, cache_top_k, cache_transform, cache_flush_every)
        self.cache = None if cache is None else os.fspath(cache)
        self.cache_top_k, self.cache_transform = cache_top_k, cache_transform
        self.cache_check_inputs = _check_bool(cache_check_inputs, 'cache_check_inputs')
        self.cache_flush_every = cache_flush_every
        self._cache = None if cache is None else TeacherOutputCache(cache, cache_top_k, cache_flush_every)
        self.weights_only = _check_bool(weights_only, 'weights_only')
        self.teacher_weights = teacher_weights
        self.ignore_index = ignore_index
        self.shift_labels, self.ensemble_average = shift_labels, ensemble_average
        self.teacher_forward = teacher_forward or default_teacher_forward
        self._sources = list(teachers)
        self._teachers = [Teacher(source, i, self.weights_only) for i, source in enumerate(teachers)]

        self._generator: Optional[np.random.Generator] = None
        self._draws = 0  # distillation steps so far (round_robin's position)
        self._window: Optional[tuple[tuple[float, TimeUnit], tuple[float, TimeUnit]]] = None
        self._active = False
        self._released = False
        self._resident: set[int] = set()  # teachers this algorithm has put on the training device
        self._width_checked: set[int] = set()  # teachers whose output width is known to match the student's
        self.current_teachers: list[int] = []
        self._saved_manifest: list[Optional[dict]] = []  # a resumed checkpoint's teachers, until compared
        self._precision = 'student'  # resolved at FIT_START
        self._ids_in_batch = False  # the training items carry a sample id as a third element (set at FIT_START)
        self._step_ids: Optional[torch.Tensor] = None  # the sample ids of the step's batch (taken out of it)
        self._step_labels: Optional[torch.Tensor] = None
        self._ids_offset = 0  # rows of the step's batch that earlier micro-batches used
        self._reset_step_stats()

    def _check_cache_arguments(self, cache: Any, top_k: Any, transform: Any, flush_every: Any) -> None:
        if cache is not None and not isinstance(cache, (str, os.PathLike)):
            raise TypeError(f'cache={cache!r} is a {type(cache).__name__}, not a directory path. Fix: pass e.g. '
                            f"cache='runs/kd_cache', or cache=None for live teachers.")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f'cache_top_k={top_k!r} is not a positive int. Fix: use e.g. cache_top_k=8, or None to '
                             f'store all logits.')
        if transform is not None and (not isinstance(transform, str) or not transform):
            raise ValueError(f'cache_transform={transform!r} is not a non-empty string. Fix: name the deterministic '
                             f"input transform and its seed, e.g. cache_transform='crop24_seed0', or pass None.")
        if isinstance(flush_every, bool) or not isinstance(flush_every, int) or flush_every < 1:
            raise ValueError(f'cache_flush_every={flush_every!r} is not a positive int. Fix: use e.g. 4096.')
        if cache is None and (top_k is not None or transform is not None):
            name, value = ('cache_top_k', top_k) if top_k is not None else ('cache_transform', transform)
            raise ValueError(f'{name}={value!r} has no effect without a cache. Fix: pass cache=DIR too, or remove '
                             f'{name}.')
        if top_k is not None and self.loss == 'mse':
            raise ValueError(f"cache_top_k={top_k!r} with loss='mse': the rest bucket keeps probabilities, not the "
                             f"logits the MSE compares. Fix: use cache_top_k=None (all logits) or loss='kl'.")

    @property
    def cache_store(self) -> Optional[TeacherOutputCache]:
        """The teacher-output cache (None without ``cache``)."""
        return self._cache

    # -- properties -------------------------------------------------------------------------------------------

    @property
    def teachers(self) -> list[Optional[nn.Module]]:
        """The pool's modules (None for a teacher released after the window, and for a model spec before FIT_START)."""
        return [t.module for t in self._teachers]

    @property
    def num_teachers(self) -> int:
        return len(self._teachers)

    @property
    def resident_teachers(self) -> list[int]:
        """The indices of the teachers this algorithm has placed on the training device and not moved off since."""
        return sorted(self._resident)

    def __setattr__(self, name: str, value: Any) -> None:
        if not name.startswith('_') or name == '_sources':
            self.__dict__.pop('_repr', None)  # an argument changed: the next repr is built anew
        super().__setattr__(name, value)

    def __repr__(self) -> str:
        # Composer formats every algorithm it runs into a trace key, ~10 times a step: build the string once per
        # change of the arguments (reassigning an attribute clears it; in-place edits of a list do not)
        if '_repr' not in self.__dict__:
            self.__dict__['_repr'] = self._build_repr()
        return self.__dict__['_repr']

    def _build_repr(self) -> str:
        def show(source: Any) -> str:
            if isinstance(source, (str, os.PathLike)):
                return repr(os.fspath(source))
            if is_model_spec(source):  # plain values: the repr rebuilds it
                paths = ('checkpoint', 'pretrained_model_name_or_path')
                return repr({str(k): os.fspath(v) if k in paths and v is not None else v for k, v in source.items()})
            if isinstance(source, Mapping):
                return (f"{{'model': <{type(source['model']).__name__}>, 'checkpoint': "
                        f"{None if source.get('checkpoint') is None else os.fspath(source['checkpoint'])!r}}}")
            return f'<{type(unwrap_parallel(source)).__name__}>'

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
        if self.teacher_precision != 'auto':
            args.append(f'teacher_precision={self.teacher_precision!r}')
        if not self.teacher_channels_last:
            args.append('teacher_channels_last=False')
        if self.cache is not None:
            args.append(f'cache={self.cache!r}')
            for name, default in (('cache_top_k', None), ('cache_transform', None), ('cache_check_inputs', True),
                                  ('cache_flush_every', 4096)):
                if getattr(self, name) != default:
                    args.append(f'{name}={getattr(self, name)!r}')
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
            'cache_encoding': self._cache_encoding(),
        })
        return state

    def _cache_encoding(self) -> Optional[dict]:
        """What of the cache changes the losses (the logits' encoding): None for live teachers."""
        if self.cache is None:
            return None
        return {'top_k': self.cache_top_k, 'temperature': self.temperature if self.cache_top_k else None}

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
        if 'cache_encoding' in state and state['cache_encoding'] != self._cache_encoding():
            saved_encoding = state['cache_encoding']
            raise ValueError(f'the checkpoint was trained with teacher logits encoded as {saved_encoding!r} (cache), '
                             f'this run uses {self._cache_encoding()!r}: the KD losses would differ. Fix: resume with '
                             f'the same cache and cache_top_k as the interrupted run (cache=None if it had none).')
        # A checkpoint written before the checksum was a SHA-256 holds a float sum, which cannot be compared. A model
        # spec is built at FIT_START, after the checkpoint is loaded: its weights are compared then.
        self._saved_manifest = [old if isinstance(old.get('checksum'), str) else None for old in saved]
        self._warn_changed_teachers()
        if state.get('generator') is not None:
            generator = np.random.Generator(np.random.PCG64())
            generator.bit_generator.state = copy.deepcopy(state['generator'])
            self._generator = generator
        self._draws = int(state.get('draws', 0))

    def _warn_changed_teachers(self) -> None:
        """Warn about the (built) teachers whose weights differ from those of the resumed checkpoint."""
        changed = []
        for i, (old, teacher) in enumerate(zip(self._saved_manifest, self._teachers)):
            if old is None or teacher.checksum is None:
                continue  # nothing to compare, or not built yet (compared at FIT_START)
            if old['checksum'] != teacher.checksum:
                changed.append(f'{teacher.index} ({old.get("description")} -> {teacher.description})')
            self._saved_manifest[i] = None
        if changed:
            warnings.warn(f'KnowledgeDistillation: the weights of teacher(s) {", ".join(changed)} differ from the '
                          f'checkpoint\'s teachers; the resumed run will not match the original one.', UserWarning)

    # -- events -----------------------------------------------------------------------------------------------

    def match(self, event: Event, state: State) -> bool:
        if event in (Event.INIT, Event.FIT_START, Event.BATCH_START):
            return True
        if event == Event.AFTER_DATALOADER:
            return self._ids_in_batch
        if event in (Event.EPOCH_END, Event.FIT_END):
            return self._cache is not None
        return self._active and event in (Event.BEFORE_TRAIN_BATCH, Event.AFTER_LOSS, Event.BATCH_END)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.INIT:
            self._check_against_student(state)
        elif event == Event.FIT_START:
            self._fit_start(state)
        elif event == Event.BATCH_START:
            self._batch_start(state, logger)
        elif event == Event.AFTER_DATALOADER:
            self._take_sample_ids(state)
        elif event in (Event.EPOCH_END, Event.FIT_END):
            self._share_cache()
        elif event == Event.BEFORE_TRAIN_BATCH:
            # Fires at every attempt at the step: automatic micro-batching reruns the whole step (same teachers, no
            # new BATCH_START) after a CUDA OOM, and the failed attempt's sums must not leak into the logged values.
            self._reset_step_stats()
            self._ids_offset = 0
        elif event == Event.AFTER_LOSS:
            self._distil(state)
        elif event == Event.BATCH_END:
            self._log_step(logger)

    def _check_against_student(self, state: State) -> None:
        """Refuse teachers that share parameters with the student, have another output width, or are optimized;
        then freeze them. Runs at INIT (so a bad pool fails when the Trainer is built) and again at FIT_START."""
        student = unwrap_parallel(state.model)
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
        seed = self.seed if self.seed is not None else state.rank_zero_seed
        self._build_teachers(state, seed)
        self._check_against_student(state)
        self._warn_changed_teachers()
        self._window = self._resolve_window(state)
        device = _student_device(state)
        bf16 = device is not None and device.type == 'cuda' and torch.cuda.is_bf16_supported()
        self._precision = resolve_teacher_precision(self.teacher_precision, None if device is None else device.type,
                                                    state.precision.value, bf16)
        dataset = getattr(state.train_dataloader, 'dataset', None)
        self._ids_in_batch = bool(getattr(dataset, 'return_sample_ids', False))
        if self._cache is not None:
            self._open_cache(state, dataset)
        if self._generator is None:
            self._generator = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), 0x4B44])))
        if dist.get_world_size() > 1:  # every rank must sample the same teachers: rank 0's sampler rules
            payload = [(self._generator.bit_generator.state, self._draws)]
            dist.broadcast_object_list(payload, src=0)
            self._generator.bit_generator.state, self._draws = payload[0]
        self._active = False

    def _open_cache(self, state: State, dataset: Any) -> None:
        """Check that the training data can be cached (ids, fingerprint, no undeclared transform); open the cache."""
        assert self._cache is not None
        fingerprint = getattr(dataset, 'fingerprint', None)
        if not isinstance(fingerprint, str):
            raise ValueError(f'cache={self.cache!r} needs a training dataset that names its content and carries sample '
                             f'ids; {type(dataset).__name__} has no `fingerprint`. Fix: use '
                             f'build_image_dataloader(..., sample_ids=True), or give the dataset a `fingerprint` '
                             f"string (a digest of its content) and a 'sample_id' key in its dict items; or use "
                             f'cache=None.')
        if getattr(dataset, 'return_sample_ids', None) is False:
            raise ValueError(f'cache={self.cache!r} needs sample ids in the training batches; the dataset '
                             f'{type(dataset).__name__} has return_sample_ids=False. Fix: build the dataloader with '
                             f'build_image_dataloader(..., sample_ids=True) (in a run YAML: `train_loader: {{name: '
                             f'image, ..., sample_ids: true}}`), or use cache=None.')
        transform = getattr(dataset, 'transform', None) or getattr(dataset, 'transforms', None)
        if transform is not None and self.cache_transform is None:
            raise ValueError(f'cache={self.cache!r} with a dataset that transforms its inputs ({transform!r}) and '
                             f'cache_transform=None: augmented inputs would be served the outputs of other inputs. '
                             f'Fix: remove the per-epoch augmentation from the training data, or, for a deterministic '
                             f"transform (fixed per sample and seed), name it, e.g. cache_transform='crop24_seed0'.")
        device = _student_device(state)
        identity = {
            'teachers': [teacher.checksum for teacher in self._teachers],
            'data': fingerprint,
            'transform': self.cache_transform,
            'encoding': self._cache_encoding(),
            'teacher_precision': 'bf16' if self._precision == 'bf16' else state.precision.value,
            'teacher_forward': _callable_name(self.teacher_forward),
            'channels_last': self.teacher_channels_last,
            'device': None if device is None else device.type,
        }
        self._cache.open(identity, self.num_teachers)

    def _share_cache(self) -> None:
        """Epoch end / fit end: write this rank's new entries and read the other ranks'."""
        assert self._cache is not None
        self._cache.flush()
        if dist.get_world_size() > 1:
            dist.barrier()
        self._cache.refresh()

    def _take_sample_ids(self, state: State) -> None:
        """AFTER_DATALOADER: take the sample ids (a third tuple element) out of the batch, before anything reads it
        (the student's ``ComposerClassifier`` expects ``(inputs, targets)``); each micro-batch's ids are then the
        next rows (Composer splits a tuple batch in order; checked against the labels)."""
        batch = state.batch
        if isinstance(batch, (tuple, list)) and len(batch) == 3 and isinstance(batch[2], torch.Tensor):
            self._step_ids, self._step_labels = batch[2], batch[1]
            state.batch = batch[:2]
        else:
            self._step_ids = self._step_labels = None

    def _microbatch_ids(self, batch: Any, size: int) -> Optional[torch.Tensor]:
        """The sample ids of the current micro-batch of ``size`` samples (None when the batch carries none)."""
        if isinstance(batch, Mapping):
            ids = batch.get('sample_id')
            return ids if isinstance(ids, torch.Tensor) else None
        if self._step_ids is None:
            return None
        start, self._ids_offset = self._ids_offset, self._ids_offset + size
        ids = self._step_ids[start:start + size]
        labels = batch[1] if isinstance(batch, (tuple, list)) and len(batch) > 1 else None
        expected = None if self._step_labels is None else self._step_labels[start:start + size]
        if len(ids) != size or (isinstance(labels, torch.Tensor) and expected is not None and
                                not torch.equal(labels.cpu(), expected.cpu())):
            raise RuntimeError(f'cache={self.cache!r}: cannot tell the sample ids of this micro-batch (the batch was '
                               f'not split into micro-batches in order). Fix: use the default split_batch, or put a '
                               f"'sample_id' tensor in dict batches.")
        return ids

    def _build_teachers(self, state: State, seed: int) -> None:
        """Build the model-spec teachers (first FIT_START): the run's tokenizer, on the student's device; then check
        that every rank built the same weights (a rank reading another file would distil from another teacher)."""
        pending = [teacher for teacher in self._teachers if not teacher.built]
        if not pending:
            return
        tokenizer = run_tokenizer(state.model)
        device = _student_device(state)
        for teacher in pending:
            # The seed initializes a spec without checkpoint: the same on every rank, per teacher.
            teacher.build(tokenizer, device, int(seed) + teacher.index)
            if device is not None:
                self._resident.add(teacher.index)
        if dist.get_world_size() > 1:
            local = [(teacher.index, teacher.checksum) for teacher in pending]
            for rank, checksums in enumerate(dist.all_gather_object(local)):
                for (index, checksum), (_, own) in zip(checksums, local):
                    if checksum != own:
                        teacher = self._teachers[index]
                        raise ValueError(f'teachers[{index}] ({teacher.description}) has other weights on rank '
                                         f'{rank} than on rank {dist.get_global_rank()}. Fix: give every rank the same '
                                         f'checkpoint file (e.g. on a shared file system).')

    def _resolve_window(self, state: State) -> tuple[tuple[float, TimeUnit], tuple[float, TimeUnit]]:
        start, end = resolve_bound(self.start, state), resolve_bound(self.end, state)
        if start[1] == end[1] and end[0] <= start[0]:
            per_epoch = '' if state.dataloader_len is None else f', {int(state.dataloader_len)} batches per epoch'
            raise ValueError(f'end={self.end} is not after start={self.start}: for max_duration={state.max_duration}'
                             f'{per_epoch} they resolve to end={_show_bound(end)}, start={_show_bound(start)}, an '
                             f"empty window. Fix: choose end > start, e.g. start='0dur', end='0.5dur'.")
        return start, end

    def _in_window(self, state: State) -> tuple[bool, bool]:
        """(inside [start, end), at or past end)."""
        assert self._window is not None
        start, end = self._window
        past_end = reached(end, state)
        return reached(start, state) and not past_end, past_end

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
        if self._cache is None:  # with a cache a teacher is placed when an entry is missing
            for index in self.current_teachers:
                self._place(index, state)
        self._reset_step_stats()

    def _place(self, index: int, state: State) -> nn.Module:
        """Teacher ``index`` on the training device (reloaded if it was released)."""
        module = self._teachers[index].materialize()
        if index not in self._resident:
            # Deliberately unsharded: the teacher is not part of state.model, which is all FSDP wraps, so under FSDP
            # every rank holds and runs a whole copy (frozen, no gradients: there is nothing to reduce).
            state.device.module_to_device(module)
            self._resident.add(index)
        if self.teacher_channels_last and index not in self._channels_last:
            if any(isinstance(m, nn.Conv2d) for m in module.modules()):
                module.to(memory_format=torch.channels_last)
            self._channels_last.add(index)
        return module

    def _teacher_batch(self, index: int, batch: Any) -> Any:
        """The batch a teacher gets: for a channels-last teacher, a 4-d image input in channels-last (a new tuple;
        the batch is not modified)."""
        if index in self._channels_last and isinstance(batch, (tuple, list)) and batch and \
                isinstance(batch[0], torch.Tensor) and batch[0].ndim == 4 and batch[0].is_floating_point():
            return (batch[0].contiguous(memory_format=torch.channels_last), *batch[1:])
        return batch

    def _release(self) -> None:
        for teacher in self._teachers:
            teacher.release()
        self._resident.clear()
        self._channels_last.clear()  # a teacher reloaded from its checkpoint comes back contiguous
        self._released = True
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _reset_step_stats(self) -> None:
        self._kd_sum: Optional[torch.Tensor] = None
        self._original_sum: Optional[torch.Tensor] = None
        self._samples = 0.0
        self._forward_seconds = 0.0
        self._cuda_events: list = []
        self._cache_hits = 0
        self._cache_lookups = 0

    def _student_shift_labels(self, state: State) -> bool:
        if self.shift_labels is not None:
            return self.shift_labels
        return bool(getattr(unwrap_parallel(state.model), 'shift_labels', False))

    def _check_teacher_output(self, teacher: Teacher, logits: torch.Tensor, student_logits: torch.Tensor) -> None:
        """Refuse teacher logits that cannot be compared with the student's, naming the pool member."""
        check_teacher_logits(logits, student_logits, f'teachers[{teacher.index}] ({teacher.description})')
        self._width_checked.add(teacher.index)

    def _check_unchecked_teachers(self, state: State, student_logits: torch.Tensor) -> None:
        """Run every teacher whose output width is still unverified once on this micro-batch (see the class doc)."""
        for teacher in self._teachers:
            if teacher.index in self._width_checked:
                continue
            was_resident = teacher.index in self._resident
            module = self._place(teacher.index, state)
            with self._teacher_context(state):
                logits = extract_logits(self.teacher_forward(module, self._teacher_batch(teacher.index, state.batch)))
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
        if self._cache is None:
            teacher_logits = []
            with self._teacher_context(state):
                for index in self.current_teachers:
                    module = self._teachers[index].module
                    assert module is not None
                    output = self.teacher_forward(module, self._teacher_batch(index, batch))
                    teacher_logits.append(extract_logits(output))
            # inference tensors cannot be saved for backward (the KD loss saves the teacher's probabilities)
            teacher_logits = [logits.clone() for logits in teacher_logits]
        else:
            teacher_logits = self._cached_teacher_logits(state, batch, student_logits)
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
        original_value = scalar_loss(original).detach().float() * samples
        kd_value = kd.detach() * samples
        self._kd_sum = kd_value if self._kd_sum is None else self._kd_sum + kd_value
        self._original_sum = original_value if self._original_sum is None else self._original_sum + original_value
        self._samples += samples
        state.loss = mix_loss(original, kd, self.ce_weight, self.kd_weight)

    def _teacher_context(self, state: State):
        student = get_precision_context(state.precision, state.precision_config, fp8_autocast_enabled=False)
        device = _student_device(state)
        return teacher_context(self._precision, None if device is None else device.type, student)

    def _cached_teacher_logits(self, state: State, batch: Any, student_logits: torch.Tensor) -> list[torch.Tensor]:
        """The step's teachers' logits through the cache: read where every sample is cached, else computed live,
        encoded, stored for the new samples, and decoded (so a live and a cached step see the same logits)."""
        assert self._cache is not None
        ids_tensor = self._microbatch_ids(batch, int(student_logits.shape[0]))
        if ids_tensor is None:
            raise ValueError(f'cache={self.cache!r} needs sample ids in every training batch; this batch has none. '
                             f'Fix: build the training dataloader with build_image_dataloader(..., sample_ids=True) '
                             f"(or put a 'sample_id' tensor in dict batches), or use cache=None.")
        if student_logits.ndim != 2:
            raise ValueError(f'cache={self.cache!r} stores (batch, classes) logits; the student\'s logits have shape '
                             f'{tuple(student_logits.shape)} (sequence logits are not cached). Fix: use cache=None.')
        num_classes = int(student_logits.shape[-1])
        if self.cache_top_k is not None and self.cache_top_k >= num_classes:
            raise ValueError(f'cache_top_k={self.cache_top_k} is not below the {num_classes} classes. Fix: use '
                             f'cache_top_k=None to store all logits, or a k < {num_classes}.')
        ids = ids_tensor.detach().cpu().numpy().astype(np.int64, copy=False)
        inputs = batch[0] if isinstance(batch, (tuple, list)) else (
            {k: v for k, v in batch.items() if k not in NOT_INPUTS} if isinstance(batch, Mapping) else batch)
        digests = None
        device = student_logits.device
        out = []
        for index in self.current_teachers:
            rows = self._cache.lookup(index, ids)
            self._cache_lookups += len(ids)
            if (rows >= 0).all():
                if self.cache_check_inputs and digests is None:
                    digests = input_digests(inputs)
                out.append(self._cache.read(index, rows, digests if self.cache_check_inputs else None, ids, device,
                                            num_classes))
                self._cache_hits += len(ids)
                continue
            if digests is None:
                digests = input_digests(inputs)
            hits = rows >= 0
            if hits.any() and self.cache_check_inputs:  # the cached part must still be the same inputs
                self._cache.read(index, rows[hits], digests[hits], ids[hits], device, num_classes)
            self._cache_hits += int(hits.sum())
            module = self._place(index, state)
            with self._teacher_context(state):
                live = extract_logits(self.teacher_forward(module, self._teacher_batch(index, batch)))
            self._check_teacher_output(self._teachers[index], live, student_logits)
            encoded = encode_logits(live.clone(), self.cache_top_k, self.temperature)
            self._cache.add(index, ids, digests, encoded)
            out.append(decode_logits(encoded, num_classes))
        return out

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
        if self._cache is not None and self._cache_lookups:
            metrics['kd/cache_hit_rate'] = self._cache_hits / self._cache_lookups
        if len(self.current_teachers) == 1:
            metrics['kd/teacher'] = float(self.current_teachers[0])
        elif self.policy == 'random_k':  # which k of the pool served this step
            metrics.update({f'kd/teacher/{i}': float(i in self.current_teachers) for i in range(self.num_teachers)})
        logger.log_metrics(metrics)
        self._reset_step_stats()

