"""Random-teacher knowledge distillation (Blakeney et al. 2022, *Reduce, Reuse, Recycle*): one teacher drawn
per optimizer step from a pool (O(1) teacher cost), only inside a training window.
"""

from composer_ext._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    'KnowledgeDistillation': 'knowledge_distillation',
    'ENSEMBLE_AVERAGES': 'knowledge_distillation',
    'LOSSES': 'knowledge_distillation',
    'POLICIES': 'knowledge_distillation',
    'build_knowledge_distillation': 'knowledge_distillation',
    'default_teacher_forward': 'knowledge_distillation',
    'distillation_mask': 'knowledge_distillation',
    'extract_logits': 'knowledge_distillation',
    'kd_loss': 'knowledge_distillation',
    'load_teacher': 'knowledge_distillation',
    'output_width': 'knowledge_distillation',
    'select_teachers': 'knowledge_distillation',
    'steps_to_target': 'knowledge_distillation',
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
