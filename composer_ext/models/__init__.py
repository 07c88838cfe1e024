"""Small models for examples, tests and benchmarks, built from configs (no downloaded weights)."""

from composer_ext._lazy import lazy_exports

_EXPORTS = {
    'SmallResNet': 'cnn',
    'SmallVGG': 'cnn',
    'small_resnet': 'cnn',
    'small_vgg': 'cnn',
    'small_gpt': 'gpt',
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
