"""CEV/SDE fairness (Blakeney et al., *Measure Twice, Cut Once*; *Simon Says* 2021): class-wise bias of a model
(e.g. a pruned one) against a reference, model similarity, and pruning with distillation as the mitigation.

* :mod:`.bias` -- CEV and SDE: functional :func:`cev_sde` and the :class:`ClassBias` metric.
* :mod:`.similarity` -- agreement, churn, negative flips, output KL, linear CKA (metrics and functional forms).
* :mod:`.probe` -- :class:`BiasProbe`, the Callback that measures all of it against a reference during training.
* :mod:`.magnitude_pruning` -- :class:`MagnitudePruning`, gradual magnitude pruning (the models being measured).
* :mod:`.report` -- ``composer-ext report bias``: CEV/SDE vs sparsity and the bias scatter plots.
"""

from __future__ import annotations

from composer_ext._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    'BiasResult': 'bias',
    'ClassBias': 'bias',
    'ZeroRateWarning': 'bias',
    'cev_sde': 'bias',
    'cev_sde_from_confusion': 'bias',
    'confusion_matrix': 'bias',
    'Agreement': 'similarity',
    'Churn': 'similarity',
    'LinearCKA': 'similarity',
    'NegativeFlipRate': 'similarity',
    'OutputKL': 'similarity',
    'churn': 'similarity',
    'linear_cka': 'similarity',
    'negative_flip_rate': 'similarity',
    'output_kl': 'similarity',
    'top1_agreement': 'similarity',
    'BiasProbe': 'probe',
    'build_bias_probe': 'probe',
    'weight_sparsity': 'probe',
    'MagnitudePruning': 'magnitude_pruning',
    'PRUNABLE_TYPES': 'magnitude_pruning',
    'agp_sparsity': 'magnitude_pruning',
    'compute_masks': 'magnitude_pruning',
    'output_layer': 'magnitude_pruning',
    'prunable_layers': 'magnitude_pruning',
    'write_report': 'report',
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
