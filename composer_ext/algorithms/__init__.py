"""Composer Algorithms: one module per technique (a functional core plus the Algorithm class)."""

from composer_ext._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    'DomainUpsampling': 'domain_upsampling',
    'KnowledgeDistillation': 'knowledge_distillation',
    'kd_loss': 'knowledge_distillation',
    'load_teacher': 'knowledge_distillation',
    'MagnitudePruning': 'magnitude_pruning',
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
