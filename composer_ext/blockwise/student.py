"""Student blocks: every dense 3x3 convolution of a teacher block becomes a depthwise-separable pair.

The replacement of one 3x3 ``Conv2d(C_in, C_out, stride=s)`` is
``depthwise 3x3 (groups=C_in, stride=s) -> norm -> ReLU -> pointwise 1x1 (C_in -> C_out)``, followed by the
norm and activation that follow the conv in the teacher. The rest of the teacher block is kept (its norms,
activations, residual path and 1x1 downsample, with the teacher's weights as a warm start), so input and
output shapes, strides and the residual structure are those of the teacher.

**The last activation follows the teacher.** A student block ends in an activation exactly when the teacher
block does: a ResNet ``BasicBlock`` (``... bn2 -> + identity -> ReLU``) keeps its final ReLU; a bare conv
block (torchvision's VGG, whose ReLU is a separate module after the block) produces a *pre-activation*
output, so its student is ``depthwise -> norm -> ReLU -> pointwise -> norm`` and ends without a ReLU: a
ReLU-terminated student could not match the negative half of the teacher's output.
"""

from __future__ import annotations

import copy
import zlib
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import nn

from composer_ext.blockwise.activations import TeacherActivations
from composer_ext.blockwise.discovery import (ACTIVATIONS, NORMS, BlockTrace, find_blocks, get_submodule,
                                              is_replaceable_conv, set_submodule, trace_blocks)

__all__ = ['DepthwiseSeparableConv2d', 'block_seed', 'default_example_input', 'make_student', 'student_block']

StudentFactory = Callable[[nn.Module, BlockTrace], nn.Module]


class DepthwiseSeparableConv2d(nn.Module):
    """``depthwise kxk -> BatchNorm -> ReLU -> pointwise 1x1 [-> BatchNorm]``: a cheap stand-in for a dense conv.

    Args:
        in_channels: Input channels (the depthwise conv has one filter per channel).
        out_channels: Output channels of the pointwise conv.
        kernel_size, stride, padding, dilation, padding_mode: Those of the replaced conv (same output shape).
        bias: Bias on the pointwise conv (use it when no norm follows).
        pointwise_norm: Add a ``BatchNorm2d`` after the pointwise conv (when the teacher has no norm there).

    Example:
        >>> conv = DepthwiseSeparableConv2d(16, 32, stride=2)
        >>> tuple(conv(torch.zeros(1, 16, 8, 8)).shape)
        (1, 32, 4, 4)
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Union[int, tuple] = 3,
                 stride: Union[int, tuple] = 1, padding: Union[int, tuple, str] = 1, dilation: Union[int, tuple] = 1,
                 bias: bool = False, pointwise_norm: bool = True, padding_mode: str = 'zeros'):
        super().__init__()
        for name, value in (('in_channels', in_channels), ('out_channels', out_channels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f'{name}={value!r} is invalid. Fix: use a positive int.')
        self.depthwise = nn.Conv2d(in_channels, in_channels, kernel_size, stride=stride, padding=padding,
                                   dilation=dilation, groups=in_channels, bias=False, padding_mode=padding_mode)
        self.depthwise_norm = nn.BatchNorm2d(in_channels)
        self.depthwise_act = nn.ReLU(inplace=True)
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1, bias=bias)
        self.pointwise_norm = nn.BatchNorm2d(out_channels) if pointwise_norm else nn.Identity()

    @classmethod
    def replacing(cls, conv: nn.Conv2d, pointwise_norm: bool) -> 'DepthwiseSeparableConv2d':
        """The pair that replaces ``conv`` (same geometry, device and dtype)."""
        module = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                     dilation=conv.dilation, bias=conv.bias is not None and not pointwise_norm,
                     pointwise_norm=pointwise_norm, padding_mode=conv.padding_mode)
        return module.to(device=conv.weight.device, dtype=conv.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.depthwise_act(self.depthwise_norm(self.depthwise(x)))
        return self.pointwise_norm(self.pointwise(x))


def block_seed(seed: int, path: str) -> int:
    """A per-block seed from the run seed and the block path: independent of which rank trains the block."""
    return (int(seed) * 1_000_003 + zlib.crc32(path.encode())) % (2**31 - 1)


def _followed_by_norm(trace: BlockTrace, conv_name: str, block: nn.Module) -> bool:
    order = trace.leaf_order
    if conv_name not in order:
        return False
    position = order.index(conv_name)
    if position + 1 >= len(order):
        return False
    return isinstance(block.get_submodule(order[position + 1]) if order[position + 1] else block, NORMS)


def student_block(teacher_block: nn.Module, trace: BlockTrace) -> nn.Module:
    """The default student of one block: a copy with every dense 3x3 conv made depthwise-separable.

    Args:
        teacher_block: The teacher's block (not modified).
        trace: Its :class:`~composer_ext.blockwise.discovery.BlockTrace` (call order, which says
            whether a norm follows each conv and whether the block ends in an activation).
    """
    if is_replaceable_conv(teacher_block):  # a bare conv: its output is pre-activation; end without a ReLU
        return DepthwiseSeparableConv2d.replacing(teacher_block, pointwise_norm=True)
    student = copy.deepcopy(teacher_block)
    convs = [name for name, module in student.named_modules() if is_replaceable_conv(module)]
    for name in convs:
        conv = student.get_submodule(name)
        set_submodule(student, name, DepthwiseSeparableConv2d.replacing(
            conv, pointwise_norm=not _followed_by_norm(trace, name, teacher_block)))
    return student


def default_example_input(model: nn.Module, size: int = 32, batch: int = 2) -> torch.Tensor:
    """A seeded random image batch ``(batch, C, size, size)`` with ``C`` the first conv's input channels."""
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        raise ValueError(f'example_input is required: {type(model).__name__} has no Conv2d to infer the input '
                         f'channels from. Fix: pass example_input=<a batch of inputs>.')
    parameter = next(model.parameters())
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch, conv.in_channels, size, size, generator=generator).to(parameter.device,
                                                                                   parameter.dtype)


def _probe(block: nn.Module, inputs: torch.Tensor) -> tuple[torch.Tensor, Optional[nn.Module]]:
    """Run a block in eval mode (no BN statistics change): its output and the last leaf module that ran."""
    called: list[nn.Module] = []
    handles = [m.register_forward_hook(lambda mod, _i, _o: called.append(mod)) for m in block.modules()
               if next(m.children(), None) is None]
    modes = {m: m.training for m in block.modules()}
    block.eval()
    try:
        with torch.no_grad():
            output = block(inputs)
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes.items():
            module.training = mode
    output = output[0] if isinstance(output, (tuple, list)) else output
    return output, called[-1] if called else None


def make_student(teacher: nn.Module, blocks: Union[str, Sequence[str]] = 'auto', example_input: Any = None,
                 seed: Optional[int] = None, factory: Optional[StudentFactory] = None) -> nn.Module:
    """A copy of ``teacher`` whose blocks are replaced by depthwise-separable student blocks.

    Every dense 3x3 conv of every block becomes ``depthwise 3x3 -> norm -> ReLU -> pointwise 1x1`` followed
    by the teacher's own norm and activation; shapes, strides and the residual path are preserved, and a
    block ends in an activation exactly when the teacher block does (see the module docstring). The teacher
    is not modified; all parameters of the student require gradients.

    Args:
        teacher: The trained network (a plain ``nn.Module`` or a Composer model such as ``small_vgg()``).
        blocks: ``'auto'`` (see :func:`~composer_ext.blockwise.discovery.find_blocks`) or a list of
            module paths.
        example_input: A batch (as the dataloader yields it) or an input tensor used to trace shapes; default:
            a random ``(2, C, 32, 32)`` image batch.
        seed: Seeds each student block's initialisation from ``(seed, path)``, so every rank builds the
            same student; ``None`` uses the global RNG.
        factory: ``factory(teacher_block, trace) -> nn.Module`` to build a different student block; its
            output shape must equal the teacher block's.

    Returns:
        The student network (same class as ``teacher``).

    Raises:
        ValueError: a block path that does not exist or holds no 3x3 conv, or a student block whose output
            shape differs from the teacher's.

    Example:
        >>> from composer_ext.models import small_vgg
        >>> teacher = small_vgg(widths=[16, 32])
        >>> student = make_student(teacher, seed=0)
        >>> sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in teacher.parameters()) / 2
        True
    """
    if not isinstance(teacher, nn.Module):
        raise TypeError(f'teacher={type(teacher).__name__} is not a torch.nn.Module. Fix: pass the trained network.')
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f'seed={seed!r} must be an int or None. Fix: e.g. seed=17.')
    if factory is not None and not callable(factory):
        raise TypeError(f'factory={factory!r} is not callable. Fix: pass a function (teacher_block, trace) -> '
                        f'nn.Module, or None for depthwise-separable blocks.')
    paths = find_blocks(teacher, blocks)
    example = default_example_input(teacher) if example_input is None else example_input
    traces = trace_blocks(teacher, paths, example)
    modes = {m: m.training for m in teacher.modules()}
    try:
        from composer.models import ComposerModel

        batch = (example, None) if isinstance(example, torch.Tensor) and isinstance(teacher, ComposerModel) \
            else example
        captured = TeacherActivations(teacher, paths)(batch)
    finally:
        for module, mode in modes.items():
            module.training = mode
    student = copy.deepcopy(teacher)
    build = factory or student_block
    for path in paths:
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(block_seed(seed, path))
            block = build(get_submodule(teacher, path), traces[path])
        if not isinstance(block, nn.Module):
            raise TypeError(f'factory returned {type(block).__name__} for block {path!r}, not an nn.Module. Fix: '
                            f'return the student block module.')
        parameter = next(get_submodule(teacher, path).parameters())
        block = block.to(device=parameter.device)
        want = traces[path]
        output, last = _probe(block, captured[path][0])
        if tuple(output.shape[1:]) != want.output_shape:
            raise ValueError(f'blocks: the student block for {path!r} outputs shape {tuple(output.shape[1:])} per '
                             f'sample, but the teacher block outputs {want.output_shape} (input {want.input_shape}). '
                             f"Fix: make the student keep the teacher's channels and strides (check the factory), "
                             f'or leave this block out of blocks=[...].')
        if factory is None and isinstance(last, ACTIVATIONS) != want.post_activation:
            raise RuntimeError(f'the student block for {path!r} ends in an activation: {not want.post_activation}, '
                               f'the teacher block: {want.post_activation}; the activation boundary must match.')
        set_submodule(student, path, block)
    student.requires_grad_(True)
    return student
