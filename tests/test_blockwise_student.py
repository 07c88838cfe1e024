"""Blockwise distillation: block discovery, depthwise-separable student blocks, the pre-activation rule."""

import copy

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from composer_ext.blockwise import (BlockTrainingSpec, DepthwiseSeparableConv2d, TeacherActivations,
                                               find_blocks, make_student, trace_blocks)
from composer_ext.models import small_resnet, small_vgg

pytestmark = pytest.mark.usefixtures('one_torch_thread')




def torchvision_vgg11() -> nn.Module:
    """torchvision's VGG class with the real VGG-11 ``features`` and a small head (the stock head has 120M
    parameters and is irrelevant here: blocks live in ``features``, a flat Sequential of Conv2d/ReLU/MaxPool)."""
    model = torchvision.models.VGG.__new__(torchvision.models.VGG)
    nn.Module.__init__(model)
    model.features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs['A'], batch_norm=False)
    model.avgpool = nn.AdaptiveAvgPool2d(1)
    model.classifier = nn.Linear(512, 10)
    return model


def torchvision_resnet(block=BasicBlock) -> nn.Module:
    width = {'width_per_group': 16} if block is Bottleneck else {}  # BasicBlock only allows the default 64
    return torchvision.models.ResNet(block, [1, 1, 1, 1], num_classes=10, **width)


MODELS = {
    'small_vgg': (lambda: small_vgg(widths=[16, 32, 64]), (2, 1, 28, 28)),
    'small_resnet': (lambda: small_resnet(widths=[8, 16, 32]), (2, 1, 28, 28)),
    'torchvision_vgg11': (torchvision_vgg11, (2, 3, 32, 32)),
    'torchvision_resnet_basic': (torchvision_resnet, (2, 3, 32, 32)),
    'torchvision_resnet_bottleneck': (lambda: torchvision_resnet(Bottleneck), (2, 3, 32, 32)),
}


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_auto_blocks_of_our_and_torchvision_models():
    assert find_blocks(small_vgg(widths=[16, 32, 64])) == [f'module.features.{i}' for i in (1, 3, 4, 6, 7)]
    assert find_blocks(small_resnet(widths=[8, 16, 32])) == [f'module.layer{s}.{b}' for s in (1, 2, 3) for b in (0, 1)]
    # torchvision VGG: every conv of the flat `features` is a block, except the RGB stem (3 input channels).
    assert find_blocks(torchvision_vgg11()) == [f'features.{i}' for i in (3, 6, 8, 11, 13, 16, 18)]
    assert find_blocks(torchvision_resnet()) == [f'layer{s}.0' for s in (1, 2, 3, 4)]
    # An explicit list may include the stem.
    assert find_blocks(small_vgg(widths=[16, 32]), ['module.features.0']) == ['module.features.0']


# The image stem (1 or 3 input channels), which 'auto' leaves out; torchvision's ResNet stem is a 7x7 conv.
STEMS = {'small_vgg': 'module.features.0', 'small_resnet': 'module.stem', 'torchvision_vgg11': 'features.0',
         'torchvision_resnet_basic': None, 'torchvision_resnet_bottleneck': None}


@pytest.mark.parametrize('name,with_stem', [(n, False) for n in MODELS] + [(n, True) for n in MODELS if STEMS[n]],
                         ids=list(MODELS) + [f'{n}+stem' for n in MODELS if STEMS[n]])
def test_shapes_and_strides_are_preserved_and_parameters_fewer_for_every_block(name, with_stem):
    build, shape = MODELS[name]
    teacher = build()
    example = torch.randn(*shape)
    paths = ([STEMS[name]] if with_stem else []) + find_blocks(teacher)
    assert STEMS[name] not in find_blocks(teacher)
    student = make_student(teacher, paths, example_input=example, seed=0)
    teacher_traces = trace_blocks(teacher, paths, example)
    student_traces = trace_blocks(student, paths, example)
    for path in paths:
        assert student_traces[path].input_shape == teacher_traces[path].input_shape, path
        assert student_traces[path].output_shape == teacher_traces[path].output_shape, path
        teacher_convs = {n: m for n, m in teacher.get_submodule(path).named_modules()
                         if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) and m.groups == 1}
        student_block = student.get_submodule(path)
        assert teacher_convs
        for conv_name, conv in teacher_convs.items():
            pair = student_block if conv_name == '' else student_block.get_submodule(conv_name)
            assert isinstance(pair, DepthwiseSeparableConv2d), (path, conv_name)
            assert pair.depthwise.groups == conv.in_channels == pair.depthwise.in_channels
            assert pair.depthwise.stride == conv.stride and pair.depthwise.padding == conv.padding
            assert pair.depthwise.dilation == conv.dilation and pair.pointwise.stride == (1, 1)
            assert pair.pointwise.kernel_size == (1, 1) and pair.pointwise.out_channels == conv.out_channels
            assert isinstance(pair.depthwise_norm, nn.BatchNorm2d) and isinstance(pair.depthwise_act, nn.ReLU)
        assert _params(student_block) < _params(teacher.get_submodule(path)), path
    assert _params(student) < _params(teacher)
    # The whole network still runs and produces the teacher's output shape.
    batch = (example, None) if hasattr(teacher, 'module') else example
    assert student.eval()(batch).shape == teacher.eval()(batch).shape


def test_small_vgg_student_has_at_least_2x_fewer_parameters_and_teacher_is_untouched():
    teacher = small_vgg(widths=[16, 32, 64])
    before = copy.deepcopy(teacher.state_dict())
    student = make_student(teacher, seed=0)
    assert _params(teacher) / _params(student) >= 2.0
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert not any(isinstance(m, DepthwiseSeparableConv2d) for m in teacher.modules())
    assert all(p.requires_grad for p in student.parameters())


def _last_leaf(module: nn.Module, x: torch.Tensor) -> nn.Module:
    called = []
    handles = [m.register_forward_hook(lambda mod, _i, _o: called.append(mod)) for m in module.modules()
               if next(m.children(), None) is None]
    module.eval()
    with torch.no_grad():
        out = module(x)
    for handle in handles:
        handle.remove()
    return called[-1], out


class PreActivationBasicBlock(BasicBlock):
    """A residual block whose output is the sum before the final ReLU (pre-activation output)."""

    def forward(self, x):
        return self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))) + x


def test_the_last_activation_follows_the_teacher():
    x = torch.randn(4, 8, 6, 6)
    # Post-activation teacher blocks: a ResNet BasicBlock (ends in ReLU) and a conv-BN-ReLU unit.
    resnet = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), BasicBlock(8, 8), PreActivationBasicBlock(8, 8),
                           nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()))
    traces = trace_blocks(resnet, ['1', '2', '3'], x)
    assert traces['1'].post_activation and not traces['2'].post_activation and traces['3'].post_activation
    student = make_student(resnet, ['0', '1', '2', '3'], example_input=x, seed=0)
    for path, post in (('1', True), ('2', False), ('3', True)):
        block = student.get_submodule(path)
        last, out = _last_leaf(block, torch.randn(16, 8, 6, 6))
        assert isinstance(last, nn.ReLU) == post, path
        assert (out.min() >= 0) == post, path  # a pre-activation student can match negative targets
    # A bare conv block (its ReLU lies outside the block) is pre-activation: depthwise -> BN -> ReLU ->
    # pointwise -> BN, with no final ReLU.
    assert not trace_blocks(resnet, ['0'], x)['0'].post_activation
    bare = student.get_submodule('0')
    assert isinstance(bare, DepthwiseSeparableConv2d) and isinstance(bare.pointwise_norm, nn.BatchNorm2d)
    last, out = _last_leaf(bare, torch.randn(16, 8, 6, 6))
    assert isinstance(last, nn.BatchNorm2d) and out.min() < 0


def test_torchvision_vgg_conv_blocks_are_pre_activation_and_targets_survive_the_inplace_relu():
    teacher = torchvision_vgg11().eval()
    assert isinstance(teacher.features[4], nn.ReLU) and teacher.features[4].inplace
    traces = trace_blocks(teacher, ['features.3'], torch.randn(2, 3, 32, 32))
    assert not traces['features.3'].post_activation
    inputs, targets = TeacherActivations(teacher, ['features.3'])(torch.randn(4, 3, 32, 32))['features.3']
    assert targets.min() < 0  # captured before the in-place ReLU that follows the conv in `features`
    assert inputs.min() >= 0  # the block's input is the previous ReLU's output
    student = make_student(teacher, ['features.3'], example_input=torch.randn(2, 3, 32, 32), seed=0)
    assert not any(isinstance(m, nn.ReLU) for m in [student.features[3].pointwise_norm])


def test_conv_followed_by_a_norm_gets_no_extra_pointwise_norm():
    teacher = small_resnet(widths=[8, 16], blocks_per_stage=[1, 1])
    student = make_student(teacher, seed=0)
    block = student.get_submodule('module.layer2.0')
    assert isinstance(block.conv1.pointwise_norm, nn.Identity) and isinstance(block.bn1, nn.BatchNorm2d)
    # The 1x1 downsample is kept, with the teacher's weights as a warm start.
    assert torch.equal(block.downsample[0].weight, teacher.get_submodule('module.layer2.0.downsample.0').weight)


def test_same_seed_same_student_different_seed_different_student():
    teacher = small_vgg(widths=[8, 16])
    a, b, c = (make_student(teacher, seed=s) for s in (1, 1, 2))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values()))


def test_bad_block_paths_name_the_path_and_the_fix():
    teacher = small_vgg(widths=[8, 16])
    with pytest.raises(ValueError, match=r"has no module 'module.features.99'.*Did you mean.*Fix: use a path"):
        make_student(teacher, ['module.features.99'])
    with pytest.raises(ValueError, match=r"'module.features.2' \(MaxPool2d\) has no dense 3x3 Conv2d.*Fix"):
        find_blocks(teacher, ['module.features.2'])
    with pytest.raises(ValueError, match=r"'module.features.1.conv' is inside 'module.features.1'.*Fix"):
        find_blocks(teacher, ['module.features.1', 'module.features.1.conv'])
    with pytest.raises(ValueError, match=r"listed more than once"):
        find_blocks(teacher, ['module.features.1', 'module.features.1'])
    with pytest.raises(ValueError, match=r"blocks='everything' is not 'auto'"):
        find_blocks(teacher, 'everything')
    with pytest.raises(ValueError, match=r"found no block with a dense 3x3"):
        find_blocks(nn.Sequential(nn.Linear(4, 4)))


def test_a_student_block_with_a_different_output_shape_is_refused():
    teacher = small_vgg(widths=[8, 16])

    def wrong_width(block, trace):
        return nn.Conv2d(trace.input_shape[0], trace.output_shape[0] + 1, 3, padding=1)

    with pytest.raises(ValueError, match=r"student block for 'module.features.1' outputs shape \(9, 32, 32\).*"
                       r"teacher block outputs \(8, 32, 32\).*Fix"):
        make_student(teacher, factory=wrong_width)

    def strided(block, trace):
        return nn.Conv2d(trace.input_shape[0], trace.output_shape[0], 3, stride=2, padding=1)

    with pytest.raises(ValueError, match=r"outputs shape \(8, 16, 16\)"):
        make_student(teacher, factory=strided)


def test_specs_rebuild_from_repr_and_validate_their_arguments():
    spec = BlockTrainingSpec(epochs=2, optimizer={'name': 'sgd', 'lr': 0.1}, activations='disk')
    assert eval(repr(spec)) == spec
    with pytest.raises(ValueError, match=r"activations='memory' is unknown. Fix: use one of"):
        BlockTrainingSpec(activations='memory')
    with pytest.raises(ValueError, match=r"epochs=0 is invalid. Fix: use an int >= 1"):
        BlockTrainingSpec(epochs=0)
    with pytest.raises(ValueError, match=r"unknown optimizer 'adamm'"):
        BlockTrainingSpec(optimizer={'name': 'adamm'})
    with pytest.raises(ValueError, match=r"optimizer.betas_typo"):
        BlockTrainingSpec(optimizer={'name': 'adam', 'betas_typo': 1})
    # Composer time strings where they are natural: epochs in 'ep', the checkpoint interval in 'ba'.
    assert BlockTrainingSpec(epochs='3ep', checkpoint_interval='50ba') == BlockTrainingSpec(epochs=3,
                                                                                           checkpoint_interval=50)
    with pytest.raises(ValueError, match=r"epochs='2ba' is not a count of 'ep'. Fix: use an int or a time string "
                       r"such as '2ep'"):
        BlockTrainingSpec(epochs='2ba')
    with pytest.raises(ValueError, match=r"checkpoint_interval='1 epoch' is not a count of 'ba'"):
        BlockTrainingSpec(checkpoint_interval='1 epoch')
