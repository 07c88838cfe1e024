"""The small models build from configs, train, and validate their arguments."""

import pytest
import torch

from composer_ext.models import SmallResNet, SmallVGG, small_gpt, small_resnet, small_vgg


def test_small_gpt_computes_the_lm_loss(tokenizer):
    model = small_gpt(n_layer=1, n_embd=32, n_head=2, n_positions=16, tokenizer=tokenizer)
    ids = torch.randint(0, len(tokenizer), (2, 16))
    batch = {'input_ids': ids, 'attention_mask': torch.ones_like(ids), 'labels': ids.clone()}
    outputs = model(batch)
    loss = model.loss(outputs, batch)
    assert outputs.logits.shape == (2, 16, len(tokenizer))
    assert abs(float(loss) - torch.log(torch.tensor(float(len(tokenizer))))) < 0.5  # random init ~ uniform
    assert {'LanguageCrossEntropy', 'LanguagePerplexity'} <= set(model.get_metrics(is_train=False))


def test_small_gpt_validates(tokenizer):
    with pytest.raises(ValueError, match='n_embd=30 is not a multiple of n_head=4'):
        small_gpt(n_embd=30, n_head=4, tokenizer=tokenizer)
    with pytest.raises(ValueError, match='n_layer=0'):
        small_gpt(n_layer=0, tokenizer=tokenizer)


@pytest.mark.parametrize('builder', [small_vgg, small_resnet])
@pytest.mark.parametrize('size', [8, 28])
def test_cnns_classify_both_image_sizes(builder, size):
    model = builder(num_classes=10, in_channels=1)
    x = torch.randn(4, 1, size, size)
    assert model((x, torch.zeros(4, dtype=torch.long))).shape == (4, 10)


def test_cnn_structure_exposes_blocks():
    vgg = SmallVGG(widths=(8, 16), convs_per_stage=2)
    assert [type(m).__name__ for m in vgg.features] == ['Sequential', 'Sequential', 'MaxPool2d'] * 2
    resnet = SmallResNet(widths=(8, 16), blocks_per_stage=(1, 2))
    from torchvision.models.resnet import BasicBlock
    assert all(isinstance(b, BasicBlock) for b in [*resnet.layer1, *resnet.layer2])
    assert resnet.layer2[0].stride == 2


def test_cnns_validate():
    with pytest.raises(ValueError, match='widths=\\(\\)'):
        small_vgg(widths=())
    with pytest.raises(ValueError, match='blocks_per_stage=\\(2,\\) needs one entry per width'):
        small_resnet(widths=(8, 16), blocks_per_stage=(2,))
    with pytest.raises(ValueError, match='num_classes=1'):
        small_vgg(num_classes=1)
