"""Compatibility path: ``composer_ext.lora`` is :mod:`composer_ext.lora_probe.lora`. Names resolve lazily."""

from composer_ext._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    name: 'composer_ext.lora_probe.lora'
    for name in ('LORA_TARGETS', 'LoRARecommendationWarning', 'lora_config', 'lora_target_modules',
                 'small_gpt_from_checkpoint')
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
