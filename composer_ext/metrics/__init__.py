"""The torchmetrics Metrics (and functional forms) of every technique, under one import path."""

from composer_ext._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    'ClassBias': 'composer_ext.fairness.bias',
    'cev_sde': 'composer_ext.fairness.bias',
    'delta_w_spectrum': 'composer_ext.lora_probe.spectrum',
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
