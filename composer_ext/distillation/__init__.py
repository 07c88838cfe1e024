"""Random-teacher knowledge distillation (Blakeney et al. 2022, *Reduce, Reuse, Recycle*): one teacher drawn
per optimizer step from a pool (O(1) teacher cost), only inside a training window.

* :mod:`.loss` -- the functional core: :func:`kd_loss`, :func:`distillation_mask`,
  :func:`output_width`.
* :mod:`.teachers` -- :func:`load_teacher`, the pool member :class:`Teacher`, teachers written as YAML
  (:func:`is_model_spec`, :func:`check_teacher_spec`), :func:`select_teachers`, :func:`default_teacher_forward`.
* :mod:`.algorithm` -- the Composer Algorithm :class:`KnowledgeDistillation`.
* :mod:`.builder` -- :func:`build_knowledge_distillation`, the YAML builder.
* :mod:`.efficiency` -- :func:`steps_to_target`, the paper's efficiency measure.
* :mod:`.cache` -- :class:`TeacherOutputCache`, the teacher-output cache (``KnowledgeDistillation(cache=DIR)``).
"""

from __future__ import annotations

from composer_ext._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    'KnowledgeDistillation': 'algorithm',
    'ENSEMBLE_AVERAGES': 'loss',
    'LOSSES': 'loss',
    'POLICIES': 'teachers',
    'TEACHER_PRECISIONS': 'teachers',
    'Teacher': 'teachers',
    'TeacherCacheError': 'cache',
    'TeacherOutputCache': 'cache',
    'build_knowledge_distillation': 'builder',
    'check_teacher_spec': 'teachers',
    'default_teacher_forward': 'teachers',
    'distillation_mask': 'loss',
    'extract_logits': 'composer_ext.core.forward',
    'is_model_spec': 'teachers',
    'kd_loss': 'loss',
    'load_teacher': 'teachers',
    'output_width': 'loss',
    'select_teachers': 'teachers',
    'steps_to_target': 'efficiency',
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
