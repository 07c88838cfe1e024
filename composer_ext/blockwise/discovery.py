"""Find the blocks of a CNN and trace them: shapes, call order, activation boundary, parameters and MACs.

A *block* is the unit that one student replaces and that trains on its own. ``find_blocks(model, 'auto')``
walks the module tree and stops at the first module that is a block:

* a bare 3x3 convolution (torchvision's VGG, whose ``features`` is a flat ``Sequential`` of convs, ReLUs
  and pools: every conv is its own block);
* a ``Sequential`` of leaf modules with exactly one 3x3 convolution (a conv-BN-ReLU unit, as in
  :class:`~composer_ext.models.SmallVGG` ``features.<i>`` and ``SmallResNet.stem``);
* any other module whose 3x3 convolutions are its direct children, or sit in conv units that are its direct
  children (torchvision's ``BasicBlock`` and ``Bottleneck``).

Containers (``Sequential`` of blocks, ``ModuleList``) and models are walked into, never taken whole.
``'auto'`` leaves out the image stem, a block whose convs all read fewer than :data:`MIN_AUTO_IN_CHANNELS`
channels (1 for grayscale, 3 for RGB): a depthwise conv over so few channels has one or three filters, so
its pointwise conv can only mix a rank-1 or rank-3 feature map, while a dense conv there costs almost
nothing (MobileNet keeps its first layer dense for the same reason). List it explicitly to replace it anyway.

:func:`trace_blocks` runs the teacher once on an example batch with hooks and records, for every block, the
per-sample input and output shapes, the order in which its leaf modules run, whether its output is
*post-activation* (the last leaf that runs is an activation, as a ResNet ``BasicBlock`` ending in ReLU) or
*pre-activation* (a bare conv, whose ReLU follows outside the block), and the parameters and
multiply-accumulates of the block and of the teacher up to the block's end (the cost of producing its
training target).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

__all__ = ['ACTIVATIONS', 'MIN_AUTO_IN_CHANNELS', 'NORMS', 'BlockTrace', 'count_macs', 'find_blocks', 'get_submodule',
           'is_replaceable_conv', 'run_model', 'set_submodule', 'trace_blocks']

ACTIVATIONS: tuple[type, ...] = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU,
                                 nn.SiLU, nn.Mish, nn.Hardswish, nn.Hardtanh, nn.Sigmoid, nn.Tanh)
NORMS: tuple[type, ...] = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm,
                           nn.modules.instancenorm._InstanceNorm, nn.LocalResponseNorm)
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
MIN_AUTO_IN_CHANNELS = 4


def is_replaceable_conv(module: nn.Module) -> bool:
    """A dense 3x3 ``Conv2d`` (``groups == 1``): what a depthwise-separable pair replaces."""
    return isinstance(module, nn.Conv2d) and tuple(module.kernel_size) == (3, 3) and module.groups == 1


def _is_leaf(module: nn.Module) -> bool:
    return next(module.children(), None) is None


def _replaceable_count(module: nn.Module) -> int:
    return sum(1 for m in module.modules() if is_replaceable_conv(m))


def _is_conv_unit(module: nn.Module) -> bool:
    """A container of leaves holding exactly one 3x3 conv (conv-BN-ReLU)."""
    return (isinstance(module, _CONTAINERS) and all(_is_leaf(c) for c in module.children())
            and _replaceable_count(module) == 1)


def _is_block(module: nn.Module) -> bool:
    if is_replaceable_conv(module):
        return True
    if isinstance(module, _CONTAINERS):
        return _is_conv_unit(module)
    if _replaceable_count(module) == 0:
        return False
    return all(is_replaceable_conv(c) or _is_conv_unit(c) or _replaceable_count(c) == 0 for c in module.children())


def get_submodule(model: nn.Module, path: str, argument: str = 'blocks') -> nn.Module:
    """The submodule at dotted ``path``; a ``ValueError`` naming the closest existing paths otherwise."""
    if not isinstance(path, str) or not path:
        raise ValueError(f'{argument}: the block path {path!r} is not a non-empty module path. Fix: use a dotted path '
                         f"from model.named_modules(), e.g. 'features.0' or 'layer1.0'.")
    try:
        return model.get_submodule(path)
    except AttributeError:
        names = [name for name, _ in model.named_modules() if name]
        close = difflib.get_close_matches(path, names, n=3)
        hint = f' Did you mean {", ".join(repr(c) for c in close)}?' if close else ''
        raise ValueError(f'{argument}: the model has no module {path!r}.{hint} Fix: use a path from '
                         f'model.named_modules() (or blocks="auto"); the model has {len(names)} modules, e.g. '
                         f'{names[:6]}.') from None


def set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    """Replace the submodule at dotted ``path`` with ``module``."""
    parent_path, _, name = path.rpartition('.')
    parent = model.get_submodule(parent_path) if parent_path else model
    if isinstance(parent, (nn.Sequential, nn.ModuleList)) and name.isdigit():
        parent[int(name)] = module
    else:
        setattr(parent, name, module)


def _auto_blocks(module: nn.Module, prefix: str) -> list[str]:
    found = []
    for name, child in module.named_children():
        path = f'{prefix}.{name}' if prefix else name
        if _is_block(child):
            if any(m.in_channels >= MIN_AUTO_IN_CHANNELS for m in child.modules() if is_replaceable_conv(m)):
                found.append(path)
        elif _replaceable_count(child):
            found.extend(_auto_blocks(child, path))
    return found


def find_blocks(model: nn.Module, blocks: Union[str, Sequence[str]] = 'auto') -> list[str]:
    """The block paths of ``model``: discovered (``'auto'``) or the given list, validated.

    Args:
        model: The teacher (any ``nn.Module``, e.g. a Composer ``ComposerClassifier``).
        blocks: ``'auto'`` or a list of dotted module paths, each holding at least one dense 3x3 conv; paths
            must exist, be distinct and not nest.

    Returns:
        The block paths, in module-registration order for ``'auto'`` and in the given order otherwise.

    Example:
        >>> from composer_ext.models import small_resnet
        >>> find_blocks(small_resnet(widths=[8, 16], blocks_per_stage=[1, 1]))
        ['module.layer1.0', 'module.layer2.0']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f'model={type(model).__name__} is not a torch.nn.Module. Fix: pass the teacher network.')
    if isinstance(blocks, str):
        if blocks != 'auto':
            raise ValueError(f"blocks={blocks!r} is not 'auto' or a list of module paths. Fix: pass blocks='auto' "
                             f"or a list such as ['features.0', 'features.1'].")
        paths = _auto_blocks(model, '')
        if not paths:
            raise ValueError(f'blocks=\'auto\' found no block with a dense 3x3 convolution in '
                             f'{type(model).__name__}. Fix: pass blocks=[...] with the module paths to replace.')
        return paths
    if not isinstance(blocks, (list, tuple)) or not blocks:
        raise ValueError(f"blocks={blocks!r} must be 'auto' or a non-empty list of module paths. Fix: e.g. "
                         f"blocks=['layer1.0', 'layer1.1'].")
    paths = list(blocks)
    for path in paths:
        module = get_submodule(model, path)
        if _replaceable_count(module) == 0:
            raise ValueError(f'blocks: the module {path!r} ({type(module).__name__}) has no dense 3x3 Conv2d to '
                             f'replace with a depthwise-separable pair. Fix: choose a module that contains one, or '
                             f'use blocks="auto".')
    duplicates = sorted({p for p in paths if paths.count(p) > 1})
    if duplicates:
        raise ValueError(f'blocks: {duplicates} listed more than once. Fix: list every block path once.')
    for outer in paths:
        for inner in paths:
            if inner != outer and inner.startswith(outer + '.'):
                raise ValueError(f'blocks: {inner!r} is inside {outer!r}; blocks must not nest. Fix: keep one of '
                                 f'the two.')
    return paths


def run_model(model: nn.Module, batch: Any) -> Any:
    """Call ``model`` on a dataloader batch: a Composer model takes the whole batch, a plain module the inputs."""
    from composer.models import ComposerModel

    if isinstance(model, ComposerModel):
        return model(batch)
    return model(batch[0] if isinstance(batch, (tuple, list)) else batch)


@dataclass
class BlockTrace:
    """What one traced forward pass says about a block (shapes and costs are per sample)."""

    path: str
    index: int
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    post_activation: bool
    leaf_order: list[str] = field(default_factory=list)
    params: int = 0
    macs: int = 0
    prefix_macs: int = 0
    last_leaf: Optional[str] = None

    @property
    def input_numel(self) -> int:
        return int(torch.Size(self.input_shape).numel())

    @property
    def output_numel(self) -> int:
        return int(torch.Size(self.output_shape).numel())


def _leaf_macs(module: nn.Module, output: Any) -> int:
    if not isinstance(output, torch.Tensor) or output.dim() == 0:
        return 0
    per_sample = output.numel() // max(1, output.shape[0])
    if isinstance(module, nn.modules.conv._ConvNd):
        kernel = int(torch.tensor(module.kernel_size).prod())
        return per_sample * (module.in_channels // module.groups) * kernel
    if isinstance(module, nn.Linear):
        return per_sample * module.in_features
    return 0


def _first_tensor(value: Any) -> Optional[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


def _run_hooked(model: nn.Module, example: Any, handles: list) -> None:
    """One forward pass of ``model`` on ``example`` (a batch, or an input tensor) in eval mode without gradients,
    for the hooks ``handles`` to observe; then the hooks are removed and every module's train/eval mode restored."""
    from composer.models import ComposerModel

    if isinstance(example, torch.Tensor) and isinstance(model, ComposerModel):
        example = (example, None)
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            run_model(model, example)
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes.items():
            module.training = mode


def trace_blocks(model: nn.Module, paths: Sequence[str], example: Any) -> dict[str, BlockTrace]:
    """Run ``model`` once on ``example`` (a batch, or an input tensor) in eval mode and trace every block.

    Returns:
        ``{path: BlockTrace}`` ordered by execution (``BlockTrace.index``). The model's train/eval modes are
        restored and no gradients are computed.

    Raises:
        ValueError: a path that is not a module of ``model`` (the message lists the closest module names), or
            a block that does not run, runs twice, or does not take and return a tensor.
    """
    if isinstance(paths, str) or not isinstance(paths, (list, tuple)):
        raise ValueError(f"paths={paths!r} is not a list of module paths. Fix: pass e.g. ['features.0'] (see "
                         f'find_blocks).')
    blocks = {path: get_submodule(model, path, argument='paths') for path in paths}  # ValueError naming close paths
    leaf_names = {module: name for name, module in model.named_modules() if _is_leaf(module)}
    owner = {module: path for path in paths for module in blocks[path].modules() if module in leaf_names}
    calls: list[tuple[str, nn.Module]] = []
    total = [0]
    block_macs = {path: 0 for path in paths}
    seen: dict[str, dict[str, Any]] = {path: {} for path in paths}
    order: list[str] = []
    handles = []

    def leaf_hook(module, _inputs, output):
        calls.append((leaf_names[module], module))
        macs = _leaf_macs(module, output)
        total[0] += macs
        if module in owner:
            block_macs[owner[module]] += macs

    def pre_hook(path):
        def hook(_module, inputs):
            tensor = _first_tensor(inputs)
            if tensor is None:
                raise ValueError(f'blocks: the block {path!r} is not called with a tensor as its first input. Fix: '
                                 f'choose modules that take one activation tensor.')
            if 'input' in seen[path]:
                raise ValueError(f'blocks: the block {path!r} runs more than once per forward pass (shared '
                                 f'weights). Fix: choose modules that run once.')
            seen[path].update(input=tuple(tensor.shape[1:]), start=len(calls))
        return hook

    def post_hook(path):
        def hook(_module, _inputs, output):
            tensor = _first_tensor(output)
            if tensor is None:
                raise ValueError(f'blocks: the block {path!r} does not return a tensor. Fix: choose modules that '
                                 f'return one activation tensor.')
            seen[path].update(output=tuple(tensor.shape[1:]), end=len(calls), prefix_macs=total[0])
            order.append(path)
        return hook

    for module in leaf_names:
        handles.append(module.register_forward_hook(leaf_hook))
    for path, module in blocks.items():
        handles.append(module.register_forward_pre_hook(pre_hook(path)))
        handles.append(module.register_forward_hook(post_hook(path)))
    _run_hooked(model, example, handles)
    missing = [p for p in paths if 'output' not in seen[p]]
    if missing:
        raise ValueError(f'blocks: {missing} never ran in the forward pass of {type(model).__name__}. Fix: choose '
                         f'modules that the forward pass calls.')
    traces = {}
    for index, path in enumerate(order):
        info = seen[path]
        prefix = path + '.'
        inside = [(name, m) for name, m in calls[info['start']:info['end']] if name == path or name.startswith(prefix)]
        relative = [name[len(prefix):] if name != path else '' for name, _ in inside]
        traces[path] = BlockTrace(
            path=path, index=index, input_shape=info['input'], output_shape=info['output'],
            post_activation=bool(inside) and isinstance(inside[-1][1], ACTIVATIONS), leaf_order=relative,
            params=sum(p.numel() for p in blocks[path].parameters()), macs=block_macs[path],
            prefix_macs=info['prefix_macs'], last_leaf=relative[-1] if relative else None)
    return traces


def count_macs(model: nn.Module, example: Any) -> int:
    """Multiply-accumulates per sample of one forward pass (convolutions and linear layers) on ``example``."""
    total = [0]
    handles = [m.register_forward_hook(lambda mod, _i, out: total.__setitem__(0, total[0] + _leaf_macs(mod, out)))
               for m in model.modules() if _is_leaf(m)]
    _run_hooked(model, example, handles)
    return total[0]
