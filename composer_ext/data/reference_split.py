"""The reference-model split: which samples train the small reference model, kept apart from the rest.

In *Perplexed by Perplexity* (Ankner et al. 2024) the data is first split in two: one part trains the
small reference model, the other is scored by it and pruned. :func:`split_for_reference` makes that split
reproducibly (a function of the number of samples, the fraction and the seed) and records it;
``composer-ext score`` refuses to score the samples that trained the reference model unless told to.

The ``reference_text`` dataloader (``yamls/perplexity_pruning/reference.yaml``) trains on one part of a
split and writes the split file on first use; the training checkpoint records which samples it trained
on, which is how ``composer-ext score --model CHECKPOINT`` knows what to leave out.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from composer_ext.storage import atomic_write_json

__all__ = ['PARTS', 'ReferenceSplit', 'split_for_reference', 'build_reference_text_dataloader']

FORMAT = 'composer_ext.reference_split/v1'
PARTS = ('reference', 'remainder')


def _ids_sha256(ids: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(ids, dtype=np.int64).tobytes()).hexdigest()


@dataclass(frozen=True)
class ReferenceSplit:
    """A random split of ``num_samples`` sample ids into a reference part and the remainder.

    The split is a pure function of ``(num_samples, fraction, seed)``: ``reference_ids`` are the first
    ``round(fraction * num_samples)`` entries of ``numpy.random.default_rng(seed).permutation(num_samples)``,
    sorted. Build it with :func:`split_for_reference`.

    Args:
        num_samples: Samples in the data set (ids ``0 .. num_samples - 1``).
        fraction: Share of the samples that train the reference model, in (0, 1).
        seed: Seed of the permutation.
        data_fingerprint: Index fingerprint of the MDS directory it was made for (None for other data).
        data_path: That directory (informational).

    Example:
        .. code-block:: python

            from composer_ext.data import split_for_reference
            split = split_for_reference('runs/ppl/data', fraction=0.25, seed=0)
            split.reference_ids, split.remainder_ids       # disjoint, sorted, together all ids
            split.save('runs/ppl/reference_split.json')
    """

    num_samples: int
    fraction: float
    seed: int = 0
    data_fingerprint: Optional[str] = None
    data_path: Optional[str] = field(default=None, compare=False)

    def __post_init__(self):
        if isinstance(self.num_samples, bool) or not isinstance(self.num_samples, (int, np.integer)) \
                or self.num_samples < 2:
            raise ValueError(f'num_samples={self.num_samples!r} is invalid: a split needs at least 2 samples. Fix: '
                             f'split a data set of 2 or more samples.')
        if isinstance(self.fraction, bool) or not isinstance(self.fraction, (int, float)) \
                or not 0.0 < self.fraction < 1.0:
            raise ValueError(f'fraction={self.fraction!r} is outside (0, 1). Fix: pass the share of samples that '
                             f'train the reference model, e.g. fraction=0.25.')
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise ValueError(f'seed={self.seed!r} is invalid. Fix: use a non-negative int.')
        count = int(round(self.fraction * self.num_samples))
        if not 1 <= count <= self.num_samples - 1:
            raise ValueError(f'fraction={self.fraction!r} of num_samples={self.num_samples} leaves one part empty '
                             f'({count} reference samples). Fix: choose a fraction between '
                             f'{1 / self.num_samples:.3g} and {1 - 1 / self.num_samples:.3g}.')
        object.__setattr__(self, 'num_samples', int(self.num_samples))
        object.__setattr__(self, 'fraction', float(self.fraction))
        object.__setattr__(self, 'seed', int(self.seed))

    @property
    def num_reference(self) -> int:
        return int(round(self.fraction * self.num_samples))

    def _mask(self) -> np.ndarray:
        cached = self.__dict__.get('_mask_cache')
        if cached is None:
            order = np.random.default_rng(self.seed).permutation(self.num_samples)
            cached = np.zeros(self.num_samples, dtype=bool)
            cached[order[:self.num_reference]] = True
            self.__dict__['_mask_cache'] = cached
        return cached

    @property
    def reference_ids(self) -> np.ndarray:
        """Sorted ids of the samples that train the reference model."""
        return np.flatnonzero(self._mask())

    @property
    def remainder_ids(self) -> np.ndarray:
        """Sorted ids of the samples that are scored and pruned (everything else)."""
        return np.flatnonzero(~self._mask())

    def ids(self, part: str) -> np.ndarray:
        if part not in PARTS:
            raise ValueError(f'part={part!r} is not a split part. Fix: use one of {list(PARTS)}.')
        return self.reference_ids if part == 'reference' else self.remainder_ids

    @property
    def reference_sha256(self) -> str:
        return _ids_sha256(self.reference_ids)

    def provenance(self, part: str = 'reference') -> dict[str, Any]:
        """What a training checkpoint records about the samples it trained on (see ``SelectedDataset``)."""
        return {'kind': 'reference_split', 'part': part, 'num_samples': self.num_samples, 'fraction': self.fraction,
                'seed': self.seed, 'reference_sha256': self.reference_sha256,
                'data_index_fingerprint': self.data_fingerprint, 'data_path': self.data_path}

    @classmethod
    def from_provenance(cls, record: dict[str, Any]) -> 'ReferenceSplit':
        split = cls(record['num_samples'], record['fraction'], record['seed'], record.get('data_index_fingerprint'),
                    record.get('data_path'))
        if split.reference_sha256 != record['reference_sha256']:
            raise ValueError('the recorded reference split does not regenerate to the same ids (numpy changed its '
                             'random stream?). Fix: pass the split explicitly with --reference-split.')
        return split

    def save(self, path: Union[str, Path]) -> Path:
        """Write the split as JSON (atomically): its parameters, the data fingerprint, a hash of the ids."""
        path = Path(path)
        atomic_write_json(path, {'format': FORMAT, 'num_samples': self.num_samples, 'fraction': self.fraction,
                                 'seed': self.seed, 'num_reference': self.num_reference,
                                 'reference_sha256': self.reference_sha256, 'data_fingerprint': self.data_fingerprint,
                                 'data_path': self.data_path})
        return path

    @classmethod
    def load(cls, path: Union[str, Path]) -> 'ReferenceSplit':
        """Read a split written by :meth:`save`, regenerate its ids and check them against the stored hash."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f'reference split {str(path)!r} does not exist. Fix: create it with '
                             f'composer_ext.data.split_for_reference(...).save(path), or let the reference_text '
                             f'dataloader write it (give it a fraction).')
        try:
            record = json.loads(path.read_text())
            if record.get('format') != FORMAT:
                raise KeyError('format')
            split = cls(record['num_samples'], record['fraction'], record['seed'], record.get('data_fingerprint'),
                        record.get('data_path'))
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f'{str(path)!r} is not a reference split file ({err}). Fix: pass a file written by '
                             f'ReferenceSplit.save.') from None
        if split.reference_sha256 != record['reference_sha256']:
            raise ValueError(f'{str(path)!r}: the ids regenerated from (num_samples, fraction, seed) do not match the '
                             f'stored hash (the file was edited, or numpy changed its random stream). Fix: recreate '
                             f'the split and retrain the reference model on it.')
        return split

    def check_data(self, data) -> None:
        """Raise ``ValueError`` unless ``data`` (an MDS path or MDSDataset) is the data the split was made for."""
        from composer_ext.data.mds import MDSDataset
        mds = data if isinstance(data, MDSDataset) else MDSDataset(data)
        if len(mds) != self.num_samples or (self.data_fingerprint is not None
                                            and mds.index_fingerprint != self.data_fingerprint):
            raise ValueError(f'the reference split (made for {self.num_samples} samples of {self.data_path!r}, '
                             f'fingerprint {str(self.data_fingerprint)[:12]}) does not match data={str(mds.path)!r} '
                             f'({len(mds)} samples, fingerprint {mds.index_fingerprint[:12]}). Fix: make a new split '
                             f'for this data with split_for_reference, or pass the data the split was made for.')

    def __repr__(self) -> str:
        return (f'ReferenceSplit(num_samples={self.num_samples!r}, fraction={self.fraction!r}, seed={self.seed!r}, '
                f'data_fingerprint={self.data_fingerprint!r}, data_path={self.data_path!r})')


def _dataset_size_and_fingerprint(dataset: Any) -> tuple[int, Optional[str], Optional[str]]:
    from composer_ext.data.mds import MDSDataset
    if isinstance(dataset, (str, Path, MDSDataset)):
        mds = dataset if isinstance(dataset, MDSDataset) else MDSDataset(dataset)
        return len(mds), mds.index_fingerprint, str(mds.path)
    if isinstance(dataset, (int, np.integer)) and not isinstance(dataset, bool):
        return int(dataset), None, None
    num_samples = getattr(dataset, 'num_samples', None)  # a StreamingDataset: len() is per rank, this is total
    if isinstance(num_samples, (int, np.integer)):
        return int(num_samples), None, None
    try:
        return len(dataset), None, None
    except TypeError:
        raise TypeError(f'dataset={dataset!r} has no length. Fix: pass an MDS directory, a StreamingDataset, a '
                        f'map-style dataset or the number of samples.') from None


def split_for_reference(dataset: Any, fraction: float, seed: int = 0) -> ReferenceSplit:
    """Split ``dataset``'s sample ids into the reference model's part and the part to score and prune.

    Args:
        dataset: An MDS directory (path or :class:`~composer_ext.data.mds.MDSDataset`; the split then records
            its fingerprint), a ``StreamingDataset`` (its ``num_samples``), a map-style dataset, or an int.
        fraction: Share of samples that train the reference model, in (0, 1).
        seed: Seed of the random permutation.

    Returns:
        ReferenceSplit: ``reference_ids`` / ``remainder_ids`` are disjoint, sorted, and cover every id.

    Example:
        .. code-block:: python

            split = split_for_reference('runs/ppl/data', fraction=0.25, seed=0)
            split.save('runs/ppl/reference_split.json')
    """
    num_samples, fingerprint, path = _dataset_size_and_fingerprint(dataset)
    return ReferenceSplit(num_samples, fraction, seed, fingerprint, path)


def build_reference_text_dataloader(
    batch_size: int,
    data: str,
    split_file: str,
    fraction: Optional[float] = None,
    split_seed: int = 0,
    part: str = 'reference',
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
    from composer.utils import dist

    from composer_ext.data.mds import MDSDataset
    from composer_ext.data.selection import SelectedDataset, selected_text_dataspec

    if part not in PARTS:
        raise ValueError(f'part={part!r} is not a split part. Fix: use one of {list(PARTS)}.')
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
    dataset = SelectedDataset(mds, split.ids(part), provenance=split.provenance(part))
    tokenizer = getattr(context, 'tokenizer', None) if context is not None else None
    return selected_text_dataspec(dataset, batch_size, seq_len=seq_len, shuffle=shuffle, seed=seed,
                                  drop_last=drop_last, num_workers=num_workers, tokenizer=tokenizer)
