"""The embedded image sets read real images from installed packages."""

import pytest
import torch

from composer_ext.data.images import build_image_dataloader, digits, fashion_mnist


def test_fashion_mnist_sizes_and_labels():
    train, test = fashion_mnist('train'), fashion_mnist('test')
    assert (len(train), len(test)) == (60_000, 10_000)
    image, label = train[0]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    assert abs(float(train.images[:5000].float().div(255).mean()) - 0.286) < 0.01


def test_fashion_mnist_subset_is_fixed():
    a, b = fashion_mnist('train', num_samples=500), fashion_mnist('train', num_samples=500)
    assert torch.equal(a.labels, b.labels) and len(a) == 500
    with pytest.raises(ValueError, match='num_samples=0'):
        fashion_mnist('train', num_samples=0)


def test_digits_split_is_disjoint_and_complete():
    train, test = digits('train'), digits('test')
    assert len(train) + len(test) == 1797 and len(test) == 359
    assert train[0][0].shape == (1, 8, 8)
    rows = {tuple(x.flatten().tolist()) for x in train.images}
    assert sum(tuple(x.flatten().tolist()) in rows for x in test.images) < 10  # a few exact duplicates exist


def test_image_dataloader_global_batch_and_errors():
    loader = build_image_dataloader('digits', batch_size=32)
    x, y = next(iter(loader))
    assert x.shape == (32, 1, 8, 8) and y.shape == (32,)
    with pytest.raises(ValueError, match="dataset='cifar'"):
        build_image_dataloader('cifar', batch_size=32)
    with pytest.raises(ValueError, match="split='val'"):
        fashion_mnist('val')
