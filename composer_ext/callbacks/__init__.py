"""The Composer Callbacks of every technique, under one import path (each is defined in its technique's package)."""

from composer_ext._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    'BiasProbe': 'composer_ext.fairness.probe',
    'LoRAProbe': 'composer_ext.lora_probe.callback',
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
