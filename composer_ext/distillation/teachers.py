"""The teachers: where they come from, which ones serve a step, and how they are called.

* :func:`load_teacher` -- a teacher from a checkpoint path (``weights_only`` loading by default; see
  :func:`composer_ext.core.checkpoints.load_module`).
* :class:`Teacher` -- one member of the pool: its module (None while released, or before ``FIT_START`` for a model
  spec), where it came from, how to get it back, and the manifest a checkpoint records instead of its weights.
* :func:`is_model_spec`, :func:`check_teacher_spec` -- teachers written as YAML: an llm-foundry model section or a
  Hugging Face directory, with a checkpoint, checked when the algorithm is built and built at ``FIT_START``.
* :func:`select_teachers`, :func:`check_selection` -- the teacher-selection policies (``random``,
  ``round_robin``, ``ensemble``, ``random_k``) and the checks of their arguments.
* :func:`default_teacher_forward` -- run a teacher on a batch without modifying it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from typing import Any, Iterator, Optional, Union

import numpy as np
import torch
from torch import nn

from composer_ext.core.checkpoints import is_torchscript, load_checkpoint, load_module
from composer_ext.core.foundry_sections import build_model_spec, check_model_spec
from composer_ext.core.forward import frozen_forward
from composer_ext.core.provenance import tensors_sha256
from composer_ext.core.unwrap import unwrap_parallel
from composer_ext.distillation.loss import normalized_weights

__all__ = ['POLICIES', 'TEACHER_PRECISIONS', 'Teacher', 'TeacherSource', 'check_selection', 'check_teacher_spec',
           'default_teacher_forward', 'resolve_teacher_precision', 'teacher_context',
           'is_model_spec', 'load_teacher', 'select_teachers', 'spec_description']

POLICIES = ('random', 'round_robin', 'ensemble', 'random_k')
TEACHER_PRECISIONS = ('auto', 'student')

TeacherSource = Union[nn.Module, str, os.PathLike, Mapping]


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
    return load_module(checkpoint, model, weights_only, role='teacher')


def check_selection(policy: Any, num_teachers: int, k: Any = None, weights: Optional[Sequence[float]] = None,
                    weights_name: str = 'weights') -> Optional[list[float]]:
    """Refuse a policy, ``k`` or weights that :func:`select_teachers` cannot use; return the weights normalized.

    ``weights_name`` is the name of the weights argument in the caller (``teacher_weights`` for the Algorithm).

    Example:
        >>> check_selection('random', 2, weights=[1, 3])
        [0.25, 0.75]
    """
    if policy not in POLICIES:
        raise ValueError(f'policy={policy!r} is not a teacher policy. Fix: use one of {list(POLICIES)}.')
    if policy == 'random_k':
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_teachers:
            raise ValueError(f"k={k!r} is out of range for policy='random_k' with {num_teachers} teachers. Fix: use "
                             f'an int 1 <= k <= {num_teachers}.')
    elif k is not None:
        raise ValueError(f"k={k!r} only applies to policy='random_k' (policy={policy!r}). Fix: remove k or use "
                         f"policy='random_k'.")
    if weights is None:
        return None
    if policy == 'round_robin':
        raise ValueError(f"{weights_name} has no effect with policy='round_robin'. Fix: remove it, or use "
                         f"policy='random' to sample teachers with these probabilities.")
    return normalized_weights(weights, num_teachers, weights_name)


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
    p = check_selection(policy, num_teachers, k, weights)
    if policy == 'round_robin':
        return [step % num_teachers]
    if policy == 'ensemble':
        return list(range(num_teachers))
    if generator is None:
        raise ValueError(f'policy={policy!r} needs a generator. Fix: pass generator=np.random.default_rng(seed).')
    if policy == 'random':
        return [int(generator.choice(num_teachers, p=p))]
    return sorted(int(i) for i in generator.choice(num_teachers, size=k, replace=False, p=p))


def _load_whole_teacher(path: str, weights_only: bool, key: str) -> nn.Module:
    """A teacher given as a bare path (a TorchScript archive, or a pickled module); a file of weights alone (an
    llm-foundry or Composer checkpoint) is refused with the YAML that names its architecture."""
    if not os.path.isfile(path) or is_torchscript(path):
        return load_teacher(path, None, weights_only)  # (a missing file or a directory: load_teacher says so)
    loaded = load_checkpoint(path, weights_only, 'teacher checkpoint')
    if isinstance(loaded, nn.Module):
        return loaded
    raise ValueError(f'{key}={path!r} holds weights but no architecture (e.g. an llm-foundry or Composer checkpoint). '
                     f'Fix: name the architecture it was saved from: in YAML {{model: <the model section of the run '
                     f'that saved it, e.g. {{name: mpt_causal_lm, d_model: 64, ...}}>, checkpoint: {path}}}; in Python '
                     f"{{'model': <module>, 'checkpoint': {path!r}}}.")


def is_model_spec(source: Any) -> bool:
    """Whether a teacher entry is a model spec that is built at ``FIT_START`` (an llm-foundry model section or a
    Hugging Face directory, see :mod:`composer_ext.core.foundry_sections`) rather than ``{'model': module, ...}``.

    Example:
        >>> is_model_spec({'model': {'name': 'mpt_causal_lm'}, 'checkpoint': None})
        True
        >>> is_model_spec({'model': nn.Linear(3, 2), 'checkpoint': None})
        False
    """
    return isinstance(source, Mapping) and not isinstance(source.get('model'), nn.Module)


def check_teacher_spec(source: Mapping, key: str) -> dict:
    """Check a teacher model spec without building it: :func:`check_model_spec` (keys, checkpoint file, section
    name, Hugging Face ``config.json``), and that llm-foundry knows the section's model ``name``.

    Raises:
        ValueError: naming ``key``, the bad value and the fix.

    Example:
        >>> check_teacher_spec({'checkpoint': 'teacher.pt'}, 'teachers[0]')
        Traceback (most recent call last):
        ...
        ValueError: teachers[0]={'checkpoint': 'teacher.pt'} names no model. Fix: write {model: {name: mpt_causal_lm, \
d_model: 64, ...}, checkpoint: runs/t/checkpoints/latest-rank0.pt} or {pretrained_model_name_or_path: /models/hf_dir}.
    """
    model = source.get('model')
    if model is not None and not isinstance(model, Mapping):
        raise TypeError(f'{key}.model={model!r} is a {type(model).__name__}, neither a torch.nn.Module nor a model '
                        f'section. Fix: pass the teacher architecture (e.g. small_resnet()) in Python, or an '
                        f'llm-foundry model section in YAML, e.g. {{name: mpt_causal_lm, d_model: 64, ...}}.')
    spec = check_model_spec(source, key)
    if 'model' in spec:
        # llm-foundry: a heavy optional dependency (seconds to import), present (check_model_spec checked), and
        # imported already when llm-foundry builds this algorithm.
        from llmfoundry import registry
        name = spec['model']['name']
        if name not in registry.models:
            raise ValueError(f'{key}.model.name={name!r} is not an llm-foundry model. Fix: use one of '
                             f'{sorted(registry.models.get_all())}.')
    return spec


def spec_description(spec: Mapping) -> str:
    """How a model spec is named in messages and manifests (known before it is built, the same on a resumed run).

    Example:
        >>> spec_description({'model': {'name': 'mpt_causal_lm'}, 'checkpoint': 'runs/t/latest-rank0.pt'})
        'mpt_causal_lm@runs/t/latest-rank0.pt'
    """
    name = spec['model']['name'] if 'model' in spec else f"hf:{os.fspath(spec['pretrained_model_name_or_path'])}"
    checkpoint = spec.get('checkpoint')
    return name if checkpoint is None else f'{name}@{os.fspath(checkpoint)}'


class Teacher:
    """One member of the teacher pool: the module (None while released or not built yet) and how to get it back.

    A model spec (see :func:`is_model_spec`) is checked here and built by :meth:`build` at ``FIT_START``, with the
    run's tokenizer, on the student's device.

    Args:
        source: A module, a checkpoint path, ``{'model': architecture, 'checkpoint': path}``, or a model spec:
            ``{'model': <llm-foundry model section>, 'checkpoint': path or None}`` or
            ``{'pretrained_model_name_or_path': <Hugging Face directory>, 'checkpoint'?: path}``.
        index: The teacher's position in the pool (error messages say ``teachers[index]``).
        weights_only: How checkpoint paths are loaded (see :func:`load_teacher`; model specs always load their
            checkpoint with ``weights_only=True``).

    Example:
        >>> Teacher(nn.Linear(3, 2), 0, weights_only=True).description
        'Linear'
    """

    def __init__(self, source: TeacherSource, index: int, weights_only: bool):
        self.index = index
        self.key = f'teachers[{index}]'
        self.path: Optional[str] = None
        self.architecture: Optional[nn.Module] = None
        self.spec: Optional[dict] = None
        self.module: Optional[nn.Module] = None
        self.weights_only = weights_only
        self._build_context: Optional[tuple[Any, Optional[torch.device], int]] = None
        if is_model_spec(source):
            self.spec = check_teacher_spec(source, self.key)
            checkpoint = self.spec.get('checkpoint')
            self.path = None if checkpoint is None else os.fspath(checkpoint)
            self.description = spec_description(self.spec)
            # Known once built (FIT_START): what a checkpoint records about the teacher.
            self.num_parameters: Optional[int] = None
            self.checksum: Optional[str] = None
            return
        if isinstance(source, Mapping):
            unknown = set(source) - {'model', 'checkpoint'}
            if unknown:
                raise ValueError(f"teachers[{index}]={source!r} must be {{'model': module, 'checkpoint': path}} "
                                 f'(unknown keys: {sorted(unknown)}). Fix: give the architecture as `model` and the '
                                 f'weights file as `checkpoint`.')
            self.architecture = source['model']
            checkpoint = source.get('checkpoint')
            self.path = None if checkpoint is None else os.fspath(checkpoint)
            self.module = self.architecture
            if self.path is not None:
                load_teacher(self.path, self.architecture, weights_only)
        elif isinstance(source, (str, os.PathLike)):
            self.path = os.fspath(source)
            self.module = _load_whole_teacher(self.path, weights_only, self.key)
        elif isinstance(source, nn.Module):
            self.module = source
        else:
            raise TypeError(f'teachers[{index}] is a {type(source).__name__}. Fix: pass a torch.nn.Module, a '
                            f"ComposerModel, a checkpoint path, {{'model': module, 'checkpoint': path}}, or a model "
                            f"section {{'model': {{'name': 'mpt_causal_lm', ...}}, 'checkpoint': path}}.")
        if self.path is not None:  # loaded by us: nobody else trains it
            self.freeze()
        name = type(unwrap_parallel(self.module)).__name__
        self.description = name if self.path is None else f'{name}@{self.path}'
        # Computed once while the module is at hand: a released teacher must not be reloaded just to checkpoint.
        self.num_parameters = sum(p.numel() for p in self.module.parameters())
        self.checksum = tensors_sha256(self.module.state_dict())

    @property
    def built(self) -> bool:
        """False only for a model spec that :meth:`build` has not built yet."""
        return self.spec is None or self._build_context is not None

    def build(self, tokenizer: Any, device: Optional[torch.device], seed: int) -> nn.Module:
        """Build a model spec (at ``FIT_START``): with the run's ``tokenizer``, on ``device`` (the student's), frozen.

        A spec without a checkpoint is initialized under ``seed`` (the CPU generator is forked, so the run's random
        stream is untouched), so every rank and a resumed run build the same teacher.
        """
        assert self.spec is not None, 'only model specs are built'
        self._build_context = (tokenizer, device, seed)
        if self.module is None:
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(seed)
                self.module = build_model_spec(self.spec, tokenizer, device, self.key)
            self.freeze()
            if self.checksum is None:
                self.num_parameters = sum(p.numel() for p in self.module.parameters())
                self.checksum = tensors_sha256(self.module.state_dict())
        return self.module

    def freeze(self) -> None:
        """No gradients, eval mode (done after checking that the module is not part of the student)."""
        if self.module is not None:
            for parameter in self.module.parameters():  # (ScriptModules have no requires_grad_())
                parameter.requires_grad_(False)
            self.module.eval()

    def materialize(self) -> nn.Module:
        """The module, rebuilt from its spec or reloaded from its checkpoint if it was released."""
        if self.module is None:
            if self.spec is not None:
                if self._build_context is None:
                    raise RuntimeError(f'{self.key} ({self.description}) is a model section that is built at '
                                       f'FIT_START, which has not run. Fix: use the algorithm in a Composer Trainer.')
                return self.build(*self._build_context)
            assert self.path is not None
            self.module = load_teacher(self.path, None, self.weights_only)
            self.freeze()
        elif self.module.training:  # someone called .train() on it: teachers always run in eval mode
            self.module.eval()
        return self.module

    def release(self) -> None:
        """Free the teacher's device memory: drop it when it can be rebuilt or reloaded, else move it to the CPU."""
        if self.module is None:
            return
        if self.spec is not None or (self.path is not None and self.architecture is None):
            self.module = None
        else:
            self.module.to('cpu')

    def offload(self) -> None:
        """Move the teacher to the CPU (kept in memory: it is likely to be drawn again in this window)."""
        if self.module is not None:
            self.module.to('cpu')

    def manifest(self) -> dict:
        """What a checkpoint records about this teacher instead of its weights (``checksum``: their SHA-256; None for
        a model spec not built yet)."""
        return {'index': self.index, 'description': self.description, 'path': self.path,
                'num_parameters': self.num_parameters, 'checksum': self.checksum}


def resolve_teacher_precision(choice: str, device_type: Optional[str], student_precision: str,
                              bf16_supported: bool) -> str:
    """The precision teachers run in: ``'bf16'`` (bf16 autocast) or ``'student'`` (the student's precision context).

    ``'auto'`` runs the teachers in bf16 autocast where that is cheaper and not less precise than the student's own
    compute would be worth: on a CUDA device that supports bf16 when the student runs in fp32 or bf16 AMP (a teacher
    only supplies soft targets; the KD loss is computed in float32 anyway). Elsewhere (CPU, fp16 AMP students, GPUs
    without bf16) the teachers run in the student's precision. ``'student'`` always uses the student's.

    Example:
        >>> resolve_teacher_precision('auto', 'cuda', 'fp32', bf16_supported=True)
        'bf16'
        >>> resolve_teacher_precision('auto', 'cpu', 'fp32', bf16_supported=True)
        'student'
    """
    if choice not in TEACHER_PRECISIONS:
        raise ValueError(f'teacher_precision={choice!r} is not one of {list(TEACHER_PRECISIONS)}. Fix: use \'auto\' '
                         f'(bf16 autocast on a bf16-capable GPU) or \'student\' (the student\'s precision).')
    if choice == 'auto' and device_type == 'cuda' and bf16_supported and student_precision in ('fp32', 'amp_bf16'):
        return 'bf16'
    return 'student'


@contextlib.contextmanager
def teacher_context(precision: str, device_type: Optional[str], student_context: Any) -> Iterator[None]:
    """Where teachers run: ``torch.inference_mode`` (no autograd state, no version counters) and, for
    ``precision='bf16'``, bf16 autocast on ``device_type``, else ``student_context`` (the student's precision).

    Outputs made here are inference tensors: clone them before they meet autograd (the KD loss saves them).
    """
    with torch.inference_mode():
        if precision == 'bf16':
            with torch.autocast(device_type or 'cuda', dtype=torch.bfloat16):
                yield
        else:
            with student_context:
                yield


# The teachers' default forward is the shared frozen-model forward (the fairness reference uses it too).
default_teacher_forward = frozen_forward
