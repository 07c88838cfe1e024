"""The YAML builder of :class:`KnowledgeDistillation` (``algorithms: knowledge_distillation: ...``).

The builder builds only what YAML cannot hold as plain values, the teachers, from model sections and checkpoint
paths; every other argument goes to :class:`KnowledgeDistillation` as it is, so the class's signature is the one
list of arguments. The builder shows that list as its own signature (``__signature__`` and ``__annotations__``),
so that the YAML validator (:func:`composer_ext.config.validate_arguments`) checks names and types of the passed
arguments against it before anything is built.
"""

from __future__ import annotations

import inspect
import typing
from typing import Any, Callable

from composer_ext.distillation.algorithm import KnowledgeDistillation
from composer_ext.distillation.teachers import check_teacher_spec

__all__ = ['build_knowledge_distillation']


def build_knowledge_distillation(context, teachers: list[dict], **kwargs: Any) -> KnowledgeDistillation:
    """Build :class:`KnowledgeDistillation` from a YAML ``algorithms`` entry.

    Each teacher is ``{model: <model section>, checkpoint: <path>}``: the model section is built with the run's
    model registry (``context.build_model``) and its weights are loaded from the checkpoint (a Composer checkpoint,
    e.g. ``runs/<teacher run>/checkpoints/latest-rank0.pt``, or a state dict). A teacher may also be a local Hugging
    Face directory, ``{pretrained_model_name_or_path: <dir>}`` (optionally with a ``checkpoint``), which the
    algorithm builds at ``FIT_START`` on the student's device. (In an llm-foundry YAML, ``model`` is an llm-foundry
    model section instead, built by the algorithm itself: see :class:`KnowledgeDistillation`.) The other arguments
    are those of :class:`KnowledgeDistillation` (``policy``, ``kd_weight``, ``end``, ...), passed through unchanged.

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
        if isinstance(entry, dict) and 'pretrained_model_name_or_path' in entry:
            check_teacher_spec(entry, f'{key}[{i}]')  # a Hugging Face directory: built by the algorithm at FIT_START
            continue
        if not isinstance(entry, dict) or set(entry) - {'model', 'checkpoint'} or 'model' not in entry or \
                'checkpoint' not in entry:
            raise ValueError(f'{key}[{i}]={entry!r} must be {{model: <model section>, checkpoint: <path>}} or '
                             f'{{pretrained_model_name_or_path: <Hugging Face directory>}}. Fix: e.g. {{model: '
                             f'{{name: small_resnet}}, checkpoint: runs/teacher/checkpoints/latest-rank0.pt}}.')
        if not isinstance(entry['checkpoint'], str):
            raise ValueError(f'{key}[{i}].checkpoint={entry["checkpoint"]!r} must be a path string. Fix: give the '
                             f"teacher's checkpoint file.")
    pool = [entry if 'pretrained_model_name_or_path' in entry else
            {'model': context.build_model(entry['model'], f'{key}[{i}].model'), 'checkpoint': entry['checkpoint']}
            for i, entry in enumerate(teachers)]
    return KnowledgeDistillation(pool, **kwargs)


def _show_passed_arguments(builder: Callable, cls: type) -> None:
    """Give ``builder(own..., **kwargs)`` the signature ``builder(own..., *, <cls's other parameters>)``.

    ``inspect.signature`` reads ``__signature__`` and ``typing.get_type_hints`` reads ``__annotations__``; the
    annotations are stored resolved, because the class's string annotations name things of its own module.
    """
    own = inspect.signature(builder)
    hints = {name: hint for name, hint in typing.get_type_hints(builder).items() if name != 'kwargs'}
    taken = {name for name, p in own.parameters.items() if p.kind != p.VAR_KEYWORD}
    cls_hints = typing.get_type_hints(cls.__init__)
    passed = [p.replace(kind=p.KEYWORD_ONLY, annotation=cls_hints.get(name, p.annotation))
              for name, p in inspect.signature(cls).parameters.items()
              if name not in taken and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    parameters = [p.replace(annotation=hints.get(name, p.annotation)) for name, p in own.parameters.items()
                  if name in taken]
    builder.__signature__ = own.replace(parameters=parameters + passed,
                                        return_annotation=hints.get('return', own.return_annotation))
    builder.__annotations__ = {**hints, **{p.name: p.annotation for p in passed}}


_show_passed_arguments(build_knowledge_distillation, KnowledgeDistillation)
