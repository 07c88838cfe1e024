"""Parallel blockwise distillation into depthwise-separable blocks (Blakeney et al. 2020).

Every block of a trained CNN gets a cheaper student block (each dense 3x3 conv becomes depthwise 3x3 +
pointwise 1x1); each student block learns, on its own, to map the teacher's input of that block to the
teacher's output of it; blocks train in parallel across ranks (balanced by cost, checkpointed per block); the
student is stitched together and finetuned end to end as a normal Composer run.

    from composer_ext.blockwise import make_student, train_blocks, stitch
    student = make_student(teacher)                                  # same shapes, ~5x fewer parameters
    train_blocks(teacher, student, find_blocks(teacher), train_set, folder='runs/x/blocks')
    result = stitch(teacher, 'runs/x/blocks', test_set)              # solo accuracy drop per block

From the command line (all stages, on N ranks): ``composer -n N -m composer_ext.cli blockwise CONFIG.yaml``.
"""

from composer_ext._lazy import lazy_exports

_EXPORTS = {
    'ActivationCache': 'activations',
    'Assignment': 'scheduling',
    'BlockCheckpointMismatchError': 'training',
    'BlockResult': 'training',
    'BlockTrace': 'discovery',
    'BlockTrainingSpec': 'spec',
    'BlockwiseConfig': 'config',
    'CacheDecision': 'cache_plan',
    'DepthwiseSeparableConv2d': 'student',
    'MissingBlockCheckpointError': 'stitching',
    'STAGES': 'pipeline',
    'StitchResult': 'stitching',
    'TeacherActivations': 'activations',
    'assign_blocks': 'scheduling',
    'block_costs': 'scheduling',
    'block_progress': 'training',
    'count_macs': 'discovery',
    'estimate_activation_bytes': 'activations',
    'evaluate_accuracy': 'stitching',
    'find_blocks': 'discovery',
    'load_blockwise_config': 'config',
    'load_student': 'stitching',
    'make_student': 'student',
    'plan_activation_cache': 'cache_plan',
    'run_blockwise': 'pipeline',
    'stitch': 'stitching',
    'student_block': 'student',
    'trace_blocks': 'discovery',
    'train_block': 'training',
    'train_blocks': 'training',
    'unfinished_costs': 'scheduling',
    'write_report': 'report',
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
