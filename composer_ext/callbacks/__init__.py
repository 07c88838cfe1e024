"""Composer Callbacks: one module per callback."""

from composer_ext._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    'BiasProbe': 'bias_probe',
    'LoRAProbe': 'lora_probe',
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
