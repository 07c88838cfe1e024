"""Small models for examples, tests and benchmarks, built from configs (no downloaded weights)."""

from composer_ext.models.cnn import SmallResNet, SmallVGG, small_resnet, small_vgg
from composer_ext.models.gpt import small_gpt

__all__ = ['SmallResNet', 'SmallVGG', 'small_gpt', 'small_resnet', 'small_vgg']
