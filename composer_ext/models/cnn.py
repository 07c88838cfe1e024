"""Small CNNs for the embedded image sets, as Composer ``ComposerClassifier`` models.

Both are built from standard parts so that block-level tools see familiar structure: the VGG-style net is
``features`` (a ``Sequential`` of conv-BN-ReLU blocks and max-pools) + ``classifier``; the ResNet-style net
uses torchvision's own ``BasicBlock`` in ``layer1..layerN``.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
from torch import nn

__all__ = ['SmallVGG', 'SmallResNet', 'small_vgg', 'small_resnet']


def _check_widths(widths: Sequence[int], name: str = 'widths') -> tuple[int, ...]:
    widths = tuple(widths)
    if not widths or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths):
        raise ValueError(f'{name}={widths!r} must be a non-empty list of positive ints. Fix: e.g. [32, 64, 128].')
    return widths


def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(OrderedDict(
        conv=nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        bn=nn.BatchNorm2d(out_channels),
        relu=nn.ReLU(inplace=True),
    ))


class SmallVGG(nn.Module):
    """VGG-style: per stage, ``convs_per_stage`` 3x3 conv-BN-ReLU blocks then a 2x2 max-pool.

    ``features`` is a flat ``Sequential`` (as in torchvision's VGG), whose conv blocks are
    ``features.0``, ``features.1``, ... ; global average pooling feeds a linear ``classifier``.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, widths: Sequence[int] = (32, 64, 128),
                 convs_per_stage: int = 2):
        super().__init__()
        widths = _check_widths(widths)
        if not isinstance(convs_per_stage, int) or convs_per_stage < 1:
            raise ValueError(f'convs_per_stage={convs_per_stage!r} is invalid. Fix: use a positive int.')
        layers: list[nn.Module] = []
        channels = in_channels
        for width in widths:
            for _ in range(convs_per_stage):
                layers.append(_conv_bn_relu(channels, width))
                channels = width
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class SmallResNet(nn.Module):
    """ResNet-style: a 3x3 conv-BN-ReLU stem, stages of torchvision ``BasicBlock``s, average pool, ``fc``.

    The first stage keeps the resolution; each later stage halves it with a strided first block.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, widths: Sequence[int] = (16, 32, 64),
                 blocks_per_stage: Sequence[int] = (2, 2, 2)):
        from torchvision.models.resnet import BasicBlock

        super().__init__()
        widths = _check_widths(widths)
        blocks_per_stage = _check_widths(blocks_per_stage, 'blocks_per_stage')
        if len(blocks_per_stage) != len(widths):
            raise ValueError(f'blocks_per_stage={blocks_per_stage!r} needs one entry per width in widths={widths!r}. '
                             f'Fix: give both the same length.')
        self.stem = _conv_bn_relu(in_channels, widths[0])
        channels = widths[0]
        for stage, (width, blocks) in enumerate(zip(widths, blocks_per_stage), start=1):
            stride = 1 if stage == 1 else 2
            downsample = None
            if stride != 1 or channels != width:
                downsample = nn.Sequential(nn.Conv2d(channels, width, 1, stride=stride, bias=False),
                                           nn.BatchNorm2d(width))
            stage_blocks = [BasicBlock(channels, width, stride=stride, downsample=downsample)]
            stage_blocks += [BasicBlock(width, width) for _ in range(blocks - 1)]
            self.add_module(f'layer{stage}', nn.Sequential(*stage_blocks))
            channels = width
        self.num_stages = len(widths)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in range(1, self.num_stages + 1):
            x = getattr(self, f'layer{stage}')(x)
        return self.fc(torch.flatten(self.pool(x), 1))


def _classifier(module: nn.Module, num_classes: int):
    from composer.models import ComposerClassifier
    return ComposerClassifier(module, num_classes=num_classes)


def _check_classes(num_classes: int, in_channels: int) -> None:
    for name, value, low in (('num_classes', num_classes, 2), ('in_channels', in_channels, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f'{name}={value!r} is invalid. Fix: use an int >= {low}.')


def small_vgg(num_classes: int = 10, in_channels: int = 1, widths: Sequence[int] = (32, 64, 128),
              convs_per_stage: int = 2):
    """A :class:`SmallVGG` as a ``ComposerClassifier`` (accuracy and cross-entropy metrics)."""
    _check_classes(num_classes, in_channels)
    return _classifier(SmallVGG(num_classes, in_channels, widths, convs_per_stage), num_classes)


def small_resnet(num_classes: int = 10, in_channels: int = 1, widths: Sequence[int] = (16, 32, 64),
                 blocks_per_stage: Sequence[int] = (2, 2, 2)):
    """A :class:`SmallResNet` as a ``ComposerClassifier`` (accuracy and cross-entropy metrics)."""
    _check_classes(num_classes, in_channels)
    return _classifier(SmallResNet(num_classes, in_channels, widths, blocks_per_stage), num_classes)
