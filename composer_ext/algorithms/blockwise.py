"""Compatibility path: ``composer_ext.algorithms.blockwise`` is :mod:`composer_ext.blockwise`.

Parallel blockwise distillation is not a Composer Algorithm; it lives in its own package. Names resolve lazily.
"""

from composer_ext._lazy import lazy_exports

_PACKAGE = 'composer_ext.blockwise'
_NAMES = (
    'ActivationCache', 'Assignment', 'BlockCheckpointMismatchError', 'BlockResult', 'BlockTrace', 'BlockTrainingSpec',
    'BlockwiseConfig', 'CacheDecision', 'DepthwiseSeparableConv2d', 'MissingBlockCheckpointError', 'STAGES',
    'StitchResult', 'TeacherActivations', 'assign_blocks', 'block_costs', 'block_progress', 'count_macs',
    'estimate_activation_bytes', 'evaluate_accuracy', 'find_blocks', 'load_blockwise_config', 'load_student',
    'make_student', 'plan_activation_cache', 'run_blockwise', 'stitch', 'student_block', 'trace_blocks', 'train_block',
    'train_blocks', 'unfinished_costs', 'write_report')
_EXPORTS: dict[str, str] = {name: _PACKAGE for name in _NAMES}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
