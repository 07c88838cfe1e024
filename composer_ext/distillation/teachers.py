"""The teachers: where they come from, which ones serve a step, and how they are called.

* :func:`load_teacher` -- a teacher from a checkpoint path (``weights_only`` loading by default; see
  :func:`composer_ext.core.checkpoints.load_module`).
* :class:`Teacher` -- one member of the pool: its module (None while released), where it came from, how to get it
  back, and the manifest a checkpoint records instead of its weights.
* :func:`select_teachers`, :func:`check_selection` -- the teacher-selection policies (``random``,
  ``round_robin``, ``ensemble``, ``random_k``) and the checks of their arguments.
* :func:`default_teacher_forward` -- run a teacher on a batch without modifying it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

import numpy as np
from torch import nn

from composer_ext.core.checkpoints import load_module
from composer_ext.core.forward import frozen_forward
from composer_ext.core.provenance import tensors_sha256
from composer_ext.core.unwrap import unwrap_parallel
from composer_ext.distillation.loss import normalized_weights

__all__ = ['POLICIES', 'Teacher', 'TeacherSource', 'check_selection', 'default_teacher_forward', 'load_teacher',
           'select_teachers']

POLICIES = ('random', 'round_robin', 'ensemble', 'random_k')

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


class Teacher:
    """One member of the teacher pool: the module (None while released) and how to get it back.

    Args:
        source: A module, a checkpoint path, or ``{'model': architecture, 'checkpoint': path}``.
        index: The teacher's position in the pool (error messages say ``teachers[index]``).
        weights_only: How checkpoint paths are loaded (see :func:`load_teacher`).

    Example:
        >>> Teacher(nn.Linear(3, 2), 0, weights_only=True).description
        'Linear'
    """

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
        name = type(unwrap_parallel(self.module)).__name__
        self.description = name if self.path is None else f'{name}@{self.path}'
        # Computed once while the module is at hand: a released teacher must not be reloaded just to checkpoint.
        self.num_parameters = sum(p.numel() for p in self.module.parameters())
        self.checksum = tensors_sha256(self.module.state_dict())

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

    def manifest(self) -> dict:
        """What a checkpoint records about this teacher instead of its weights (``checksum``: their SHA-256)."""
        return {'index': self.index, 'description': self.description, 'path': self.path,
                'num_parameters': self.num_parameters, 'checksum': self.checksum}


# The teachers' default forward is the shared frozen-model forward (the fairness reference uses it too).
default_teacher_forward = frozen_forward
