"""Training on chosen samples by id: :class:`SelectedDataset` and the ``selected_text`` / ``reference_text``
dataloaders.

A selection (``composer-ext select``) or one part of a reference split is trained on without rewriting the
corpus: the dataset reads the chosen ids from the MDS directory, and records them in Composer's checkpoint
(:meth:`SelectedDataset.state_dict`), which is how ``composer-ext score --model CHECKPOINT`` later knows which
samples trained that model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import numpy as np
from composer.core import DataSpec
from composer.utils import dist
from torch.utils.data import DataLoader, Dataset

from composer_ext.core.provenance import ids_sha256
from composer_ext.data.mds import MDSDataset
from composer_ext.data.sharding import per_rank_batch_size
from composer_ext.data.text import LMCollator, count_tokens
from composer_ext.data.tokenizer import load_tokenizer
from composer_ext.perplexity_pruning.fingerprints import tokenizer_fingerprint
from composer_ext.perplexity_pruning.reference_split import ReferenceSplit, check_part, split_for_reference
from composer_ext.perplexity_pruning.selection import read_selection

__all__ = ['INLINE_IDS', 'SelectedDataset', 'build_reference_text_dataloader', 'build_selected_text_dataloader',
           'selected_text_dataspec']

INLINE_IDS = 1 << 16  # a checkpoint records up to this many trained-on ids themselves (about 0.5 MB at most)


def _base_size(dataset: Any) -> int:
    num_samples = getattr(dataset, 'num_samples', None)  # StreamingDataset: len() is per rank; ids are global
    if isinstance(num_samples, (int, np.integer)) and not isinstance(num_samples, bool):
        return int(num_samples)
    try:
        return len(dataset)
    except TypeError:
        raise TypeError(f'dataset={dataset!r} has no length. Fix: pass an MDS directory, a StreamingDataset or a '
                        f'map-style dataset (with __len__ and __getitem__).') from None


class SelectedDataset(Dataset):
    """The samples of ``dataset`` whose ids are in ``indices``, as a map-style dataset (nothing is copied).

    ``selected[i]`` is ``dataset[indices[i]]`` (a dict sample gets a ``sample_id`` key). Train on it with a
    ``DistributedSampler`` (``composer.utils.dist.get_sampler``), as the ``selected_text`` and
    ``reference_text`` dataloaders do: Composer then shuffles per epoch, splits it over ranks, and resumes a
    checkpoint mid-epoch bit for bit. Composer also stores :meth:`state_dict` in checkpoints, which records
    which samples the model trained on (``composer-ext score`` reads it to leave them out): the ids themselves
    for up to ``INLINE_IDS`` samples, else where they come from and their SHA-256.

    Args:
        dataset: An MDS directory (path or :class:`~composer_ext.data.mds.MDSDataset`), a ``StreamingDataset``
            (read by global sample id with ``get_item``), or any map-style dataset.
        indices: Sample ids to keep, in the order to expose them.
        provenance: A JSON-able record of where the ids come from (a selection, a reference split).

    Example:
        .. code-block:: python

            from composer_ext.data import SelectedDataset
            data = SelectedDataset.from_selection('runs/ppl/selection_high')   # `composer-ext select --out`
            data = SelectedDataset('runs/ppl/data', [0, 5, 9])                 # or ids directly
            data[1]['sample_id']                                               # 5
    """

    def __init__(self, dataset: Any, indices: Any, provenance: Optional[Mapping[str, Any]] = None):
        if isinstance(dataset, (str, os.PathLike)):
            dataset = MDSDataset(dataset)
        self.dataset = dataset
        self.num_base_samples = _base_size(dataset)
        ids = np.asarray(indices)
        if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
            raise ValueError(f'indices must be a 1-D sequence of int sample ids, got dtype {ids.dtype} and shape '
                             f'{ids.shape}. Fix: pass e.g. the output of select_band.')
        if ids.size == 0:
            raise ValueError('indices is empty: there is nothing to train on. Fix: select at least one sample.')
        if ids.min() < 0 or ids.max() >= self.num_base_samples:
            raise ValueError(f'indices range over [{ids.min()}, {ids.max()}] but the dataset has '
                             f'{self.num_base_samples} samples. Fix: use ids of this dataset (a selection made '
                             f'for other data?).')
        self.indices = ids.astype(np.int64)
        self.provenance = dict(provenance or {'kind': 'ids'})
        self._streaming = hasattr(dataset, 'get_item') and not isinstance(dataset, MDSDataset)

    @classmethod
    def from_selection(cls, selection: Union[str, Path], data: Union[str, Path, None] = None) -> 'SelectedDataset':
        """The samples chosen by ``composer-ext select --out SELECTION`` (of ``data``, default: the scored data)."""
        record, ids = read_selection(selection)
        mds = MDSDataset(data if data is not None else record['data']['path'])
        if mds.index_fingerprint != record['data']['index_fingerprint']:
            raise ValueError(f'selection={str(selection)!r} was made for {record["data"]["path"]!r} (fingerprint '
                             f'{record["data"]["index_fingerprint"][:12]}), not for data={str(mds.path)!r} '
                             f'(fingerprint {mds.index_fingerprint[:12]}). Fix: pass the data that was scored, or '
                             f'select again from scores of this data.')
        provenance = {'kind': 'selection', 'path': str(Path(selection).resolve()), 'indices_sha256': ids_sha256(ids),
                      'band': record['band'], 'keep': record['keep'], 'per_domain': record['per_domain'],
                      'data_index_fingerprint': mds.index_fingerprint, 'data_path': str(mds.path)}
        return cls(mds, ids, provenance=provenance)

    @classmethod
    def from_reference_split(cls, split: Any, part: str = 'reference',
                             data: Union[str, Path, None] = None) -> 'SelectedDataset':
        """One part of a :class:`~composer_ext.perplexity_pruning.reference_split.ReferenceSplit` (object or saved
        file)."""
        split = split if isinstance(split, ReferenceSplit) else ReferenceSplit.load(split)
        if data is None and split.data_path is None:
            raise ValueError('the split records no data path. Fix: pass data=MDS_DIR.')
        mds = MDSDataset(data if data is not None else split.data_path)
        split.check_data(mds)
        return cls(mds, split.ids(part), provenance=split.provenance(part))

    @property
    def num_samples(self) -> int:
        return len(self.indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> Any:
        sample_id = int(self.indices[position])
        sample = self.dataset.get_item(sample_id) if self._streaming else self.dataset[sample_id]
        if isinstance(sample, dict):
            sample = {**sample, 'sample_id': sample_id}
        return sample

    def state_dict(self, num_samples: int = 0, from_beginning: bool = True) -> dict[str, Any]:
        """What Composer stores as this dataset's checkpoint state: which samples the run trains on.

        There is deliberately no ``load_state_dict``: without it Composer resumes through the
        ``DistributedSampler`` (same permutation, replayed position, restored RNG), which is exact.
        """
        del num_samples, from_beginning
        mds = self.dataset if isinstance(self.dataset, MDSDataset) else None
        ids = np.sort(self.indices)
        record = {'num_selected': self.num_samples, 'num_base_samples': self.num_base_samples,
                  'ids_sha256': ids_sha256(ids), 'data_index_fingerprint': mds.index_fingerprint if mds else None,
                  'data_path': str(mds.path) if mds else None}
        record.update(self.provenance)
        if self.num_samples <= INLINE_IDS:  # the record then identifies the samples without any other file
            record['ids'] = ids.tolist()
        return {'composer_ext_selection': record}

    def __repr__(self) -> str:
        return f'SelectedDataset({self.dataset!r}, <{self.num_samples} of {self.num_base_samples} ids>)'


def selected_text_dataspec(dataset: SelectedDataset, batch_size: int, seq_len: int = 128, shuffle: bool = True,
                           seed: int = 0, drop_last: bool = True, num_workers: int = 0, tokenizer: Any = None):
    """A Composer ``DataSpec`` of LM batches over a :class:`SelectedDataset` of MDS text samples."""
    per_rank = per_rank_batch_size(batch_size)
    if tokenizer is None:
        tokenizer = load_tokenizer()
    if drop_last and len(dataset) < batch_size:
        raise ValueError(f'the selection has {len(dataset)} samples, fewer than one global batch '
                         f'(batch_size={batch_size}); with drop_last there would be no batch. Fix: lower batch_size '
                         f'or select more samples.')
    sampler = dist.get_sampler(dataset, shuffle=shuffle, drop_last=drop_last, seed=seed)
    loader = DataLoader(dataset, batch_size=per_rank, sampler=sampler, drop_last=drop_last, num_workers=num_workers,
                        collate_fn=LMCollator(tokenizer.pad_token_id, seq_len, tokenizer.eos_token_id))
    return DataSpec(loader, get_num_tokens_in_batch=count_tokens)


def build_selected_text_dataloader(
    batch_size: int,
    selection: str,
    data: Optional[str] = None,
    # seq_len .. num_workers: the `text` dataloader's YAML arguments, a deliberate twin of its signature (the
    # YAML validator checks each builder's own signature, so they cannot be shared through **kwargs)
    seq_len: int = 128,
    shuffle: bool = True,
    seed: int = 0,
    drop_last: bool = True,
    num_workers: int = 0,
    check_tokenizer: bool = True,
    context: Any = None,
):
    """LM batches over the samples of a selection (the ``selected_text`` dataloader).

    Args:
        batch_size: GLOBAL batch size (split over ranks).
        selection: The ``--out`` directory of ``composer-ext select``.
        data: The MDS directory (default: the one that was scored); its fingerprint must match.
        seq_len, shuffle, seed, drop_last, num_workers: As for the ``text`` dataloader.
        check_tokenizer: Refuse to train when the model's tokenizer is not the one the scores were computed
            with (scores and training must see the same tokens).
    """
    dataset = SelectedDataset.from_selection(selection, data)
    tokenizer = getattr(context, 'tokenizer', None) if context is not None else None
    if tokenizer is None:
        tokenizer = load_tokenizer()
    if check_tokenizer:
        record, _ = read_selection(selection, with_ids=False)
        if record['tokenizer_fingerprint'] != tokenizer_fingerprint(tokenizer):
            raise ValueError(f'tokenizer mismatch: selection={selection!r} was scored with tokenizer '
                             f'{record["tokenizer_fingerprint"][:12]}, but this run\'s model uses '
                             f'{tokenizer_fingerprint(tokenizer)[:12]}. Fix: train with the tokenizer the scores were '
                             f'computed with, rescore with the training tokenizer, or set check_tokenizer: false.')
    return selected_text_dataspec(dataset, batch_size, seq_len=seq_len, shuffle=shuffle, seed=seed,
                                  drop_last=drop_last, num_workers=num_workers, tokenizer=tokenizer)


def build_reference_text_dataloader(
    batch_size: int,
    data: str,
    split_file: str,
    fraction: Optional[float] = None,
    split_seed: int = 0,
    part: str = 'reference',
    # seq_len .. num_workers: the `text` dataloader's YAML arguments, a deliberate twin of its signature (the
    # YAML validator checks each builder's own signature, so they cannot be shared through **kwargs)
    seq_len: int = 128,
    shuffle: bool = True,
    seed: int = 0,
    drop_last: bool = True,
    num_workers: int = 0,
    context: Any = None,
):
    """LM batches over one part of a reference split of an MDS directory (the ``reference_text`` dataloader).

    The split file is created on first use (``fraction`` is then required) and verified on every later use
    (same data, and the same ``fraction``/``split_seed`` when given). The checkpoint of a run that trains on
    it records the split, so ``composer-ext score`` leaves those samples out.

    Args:
        batch_size: GLOBAL batch size (split over ranks).
        data: MDS directory with a ``tokens`` column.
        split_file: JSON file of the split (:meth:`ReferenceSplit.save`).
        fraction: Share of samples in the reference part (needed to create the split file).
        split_seed: Seed of the split.
        part: ``reference`` (train the reference model) or ``remainder``.
        seq_len, shuffle, seed, drop_last, num_workers: As for the ``text`` dataloader.
    """
    check_part(part)  # before a split file is written for a part that does not exist
    mds = MDSDataset(data)
    path = Path(split_file)
    if path.exists():
        split = ReferenceSplit.load(path)
        split.check_data(mds)
        if fraction is not None and (abs(split.fraction - fraction) > 1e-12 or split.seed != split_seed):
            raise ValueError(f'split_file={split_file!r} holds a split with fraction={split.fraction}, '
                             f'seed={split.seed}, not fraction={fraction}, split_seed={split_seed}. Fix: drop '
                             f'fraction/split_seed to use the existing split, or choose a new split_file.')
    else:
        if fraction is None:
            raise ValueError(f'split_file={split_file!r} does not exist and no fraction was given to create it. Fix: '
                             f'set fraction (e.g. 0.25), or point split_file at an existing split.')
        split = split_for_reference(mds, fraction, split_seed)
        if dist.get_global_rank() == 0:
            split.save(path)
    dataset = SelectedDataset(mds, split.ids(part), provenance=split.provenance(part, split_file=path))
    tokenizer = getattr(context, 'tokenizer', None) if context is not None else None
    return selected_text_dataspec(dataset, batch_size, seq_len=seq_len, shuffle=shuffle, seed=seed,
                                  drop_last=drop_last, num_workers=num_workers, tokenizer=tokenizer)
