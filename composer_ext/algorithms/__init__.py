"""The Composer Algorithms of every technique, under one import path (each is defined in its technique's package)."""

from composer_ext._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    'DomainUpsampling': 'composer_ext.domain_upsampling.algorithm',
    'KnowledgeDistillation': 'composer_ext.distillation.algorithm',
    'kd_loss': 'composer_ext.distillation.loss',
    'load_teacher': 'composer_ext.distillation.teachers',
    'MagnitudePruning': 'composer_ext.fairness.magnitude_pruning',
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
