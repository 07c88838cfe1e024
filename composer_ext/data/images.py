"""The embedded image sets: Fashion-MNIST (Debian ``dataset-fashion-mnist``) and scikit-learn's digits.

Fashion-MNIST (60k train / 10k test, 28x28, 10 classes) is the main image set; digits (1,797 images of
8x8, 10 classes, shipped inside scikit-learn) is small enough for unit tests that train to convergence in
seconds. Both are real data read from installed packages; nothing is downloaded.
"""

from __future__ import annotations

import gzip
import io
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from composer_ext.core.provenance import json_sha256, tensors_sha256
from composer_ext.data.sharding import per_rank_batch_size
from composer_ext.storage import atomic_write_bytes, cache_root, file_lock

__all__ = ['ArrayImageDataset', 'FASHION_MNIST_CLASSES', 'fashion_mnist', 'digits', 'build_image_dataloader']

FASHION_MNIST_DIR = Path('/usr/share/datasets/fashion-mnist')
FASHION_MNIST_CLASSES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag',
                         'Ankle boot')
_FILES = {
    'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
    'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'),
}


class ArrayImageDataset(Dataset):
    """Images held as one uint8 array ``(N, H, W)`` or ``(N, C, H, W)``, normalised on access.

    Items are ``(image float32 (C, H, W), label int64)``, as ``ComposerClassifier`` expects; with
    ``return_sample_ids=True`` they are ``(image, label, sample_id int64)``, for a consumer that needs to know which
    sample it sees (the teacher-output cache of ``KnowledgeDistillation(cache=...)``, which takes the id out of the
    batch before the student's forward). A sample's id is its index in the full image set (a subset keeps the ids
    of its samples), and :attr:`fingerprint` names the content (pixels, labels, ids, normalization).

    Args:
        images: ``(N, H, W)`` or ``(N, C, H, W)`` uint8.
        labels: ``(N,)`` integer classes.
        mean, std, scale: Normalization ``(pixel / scale - mean) / std``.
        sample_ids: ``(N,)`` distinct non-negative ids (default ``0..N-1``).
        return_sample_ids: Whether items carry their id as a third element.

    Example:
        >>> data = ArrayImageDataset(np.zeros((3, 2, 2), np.uint8), np.array([0, 1, 1]), 0.0, 1.0,
        ...                          sample_ids=np.array([7, 8, 9]), return_sample_ids=True)
        >>> data[1][2].item(), len(data[1])
        (8, 3)
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, mean: float, std: float, scale: float = 255.0,
                 sample_ids: Optional[np.ndarray] = None, return_sample_ids: bool = False):
        if len(images) != len(labels):
            raise ValueError(f'images ({len(images)}) and labels ({len(labels)}) differ in length.')
        if not isinstance(return_sample_ids, bool):
            raise TypeError(f'return_sample_ids={return_sample_ids!r} is not a bool. Fix: pass True or False.')
        images = images[:, None] if images.ndim == 3 else images
        self.images = torch.from_numpy(np.ascontiguousarray(images))
        self.labels = torch.from_numpy(labels.astype(np.int64))
        ids = np.arange(len(labels)) if sample_ids is None else np.asarray(sample_ids)
        if ids.shape != (len(labels),) or (len(ids) and (ids.min() < 0 or len(np.unique(ids)) != len(ids))):
            raise ValueError(f'sample_ids must be {len(labels)} distinct non-negative integers (got shape '
                             f'{ids.shape}). Fix: pass each sample\'s index in the full dataset, or None.')
        self.sample_ids = torch.from_numpy(ids.astype(np.int64))
        self.return_sample_ids = return_sample_ids
        self.mean, self.std, self.scale = mean, std, scale
        self.num_classes = int(self.labels.max()) + 1
        self._fingerprint: Optional[str] = None

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the content an item is computed from: pixels, labels, sample ids and the normalization."""
        if self._fingerprint is None:
            tensors = tensors_sha256({'images': self.images, 'labels': self.labels, 'sample_ids': self.sample_ids})
            self._fingerprint = json_sha256([tensors, self.mean, self.std, self.scale])
        return self._fingerprint

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = (self.images[index].float() / self.scale - self.mean) / self.std
        if self.return_sample_ids:
            return image, self.labels[index], self.sample_ids[index]
        return image, self.labels[index]


def _read_idx(path: Path) -> np.ndarray:
    raw = gzip.decompress(path.read_bytes())
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], 'big') for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _fashion_mnist_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
    images_file, labels_file = _FILES[split]
    if not (FASHION_MNIST_DIR / images_file).exists():
        raise FileNotFoundError(f'Fashion-MNIST is not installed ({FASHION_MNIST_DIR / images_file} is missing). '
                                f'Fix: sudo apt-get install -y dataset-fashion-mnist')
    cached = cache_root() / 'images' / f'fashion_mnist_{split}.npz'
    if not cached.exists():
        with file_lock(cached.with_suffix('.lock')):
            if not cached.exists():
                buffer = io.BytesIO()
                np.savez(buffer, images=_read_idx(FASHION_MNIST_DIR / images_file),
                         labels=_read_idx(FASHION_MNIST_DIR / labels_file))
                atomic_write_bytes(cached, buffer.getvalue())
    with np.load(cached) as arrays:
        return arrays['images'], arrays['labels']


def _subset(n: int, num_samples: Optional[int], seed: int) -> np.ndarray:
    """The first ``num_samples`` of a fixed permutation (all indices, in order, when None)."""
    if num_samples is None:
        return np.arange(n)
    if not isinstance(num_samples, int) or not 0 < num_samples <= n:
        raise ValueError(f'num_samples={num_samples!r} is outside [1, {n}]. Fix: use an int in that range or None.')
    return np.sort(np.random.default_rng(seed).permutation(n)[:num_samples])


def fashion_mnist(split: str = 'train', num_samples: Optional[int] = None, subset_seed: int = 0,
                  return_sample_ids: bool = False) -> ArrayImageDataset:
    """Fashion-MNIST ``train`` (60,000) or ``test`` (10,000), optionally a fixed random subset (sample ids = the
    indices in the full split)."""
    if split not in _FILES:
        raise ValueError(f'split={split!r} is not a Fashion-MNIST split. Fix: use one of {list(_FILES)}.')
    images, labels = _fashion_mnist_arrays(split)
    keep = _subset(len(labels), num_samples, subset_seed)
    return ArrayImageDataset(images[keep], labels[keep], mean=0.2860, std=0.3530, sample_ids=keep,
                             return_sample_ids=return_sample_ids)


def digits(split: str = 'train', test_fraction: float = 0.2, return_sample_ids: bool = False) -> ArrayImageDataset:
    """scikit-learn's 8x8 digits, split into ``train``/``test`` by a fixed permutation (seed 0); sample ids are the
    indices in scikit-learn's 1,797 images."""
    from sklearn.datasets import load_digits

    if split not in ('train', 'test'):
        raise ValueError(f"split={split!r} is not a digits split. Fix: use 'train' or 'test'.")
    if not 0 < test_fraction < 1:
        raise ValueError(f'test_fraction={test_fraction!r} is outside (0, 1). Fix: use e.g. 0.2.')
    data = load_digits()
    order = np.random.default_rng(0).permutation(len(data.target))
    n_test = int(round(len(order) * test_fraction))
    keep = np.sort(order[:n_test] if split == 'test' else order[n_test:])
    return ArrayImageDataset(data.images[keep].astype(np.uint8), data.target[keep], mean=0.3, std=0.38, scale=16.0,
                             sample_ids=keep, return_sample_ids=return_sample_ids)


_IMAGE_SETS = {'fashion_mnist': fashion_mnist, 'digits': digits}


def build_image_dataloader(
    dataset: str,
    batch_size: int,
    split: str = 'train',
    shuffle: bool = True,
    drop_last: bool = True,
    num_samples: Optional[int] = None,
    num_workers: int = 0,
    seed: int = 0,
    sample_ids: bool = False,
):
    """A ``DataLoader`` over an embedded image set, sharded over ranks with Composer's distributed sampler.

    Args:
        dataset: ``fashion_mnist`` or ``digits``.
        batch_size: The GLOBAL batch size, split evenly over ranks.
        split: ``train`` or ``test``.
        shuffle: Shuffle each epoch (seeded, the same order on every rank's shard).
        drop_last: Drop a last partial batch.
        num_samples: Use a fixed random subset of this size (Fashion-MNIST only).
        num_workers: DataLoader worker processes.
        seed: Sampler seed.
        sample_ids: Batches carry each sample's id as a third element ``(images, labels, ids)``, for
            ``KnowledgeDistillation(cache=...)`` (which takes the ids out before the student's forward; a plain
            ``ComposerClassifier`` expects two elements).
    """
    from composer.utils import dist
    from torch.utils.data import DataLoader

    if dataset not in _IMAGE_SETS:
        raise ValueError(f'dataset={dataset!r} is not an embedded image set. Fix: use one of {list(_IMAGE_SETS)}.')
    if dataset == 'digits':
        if num_samples is not None:
            raise ValueError('num_samples is only supported for fashion_mnist. Fix: remove it for digits.')
        data = digits(split, return_sample_ids=sample_ids)
    else:
        data = fashion_mnist(split, num_samples=num_samples, return_sample_ids=sample_ids)
    per_rank = per_rank_batch_size(batch_size)
    sampler = dist.get_sampler(data, shuffle=shuffle, drop_last=drop_last, seed=seed)
    return DataLoader(data, batch_size=per_rank, sampler=sampler, drop_last=drop_last, num_workers=num_workers)
