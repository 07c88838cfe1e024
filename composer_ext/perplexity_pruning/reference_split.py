"""The reference-model split: which samples train the small reference model, kept apart from the rest.

In *Perplexed by Perplexity* (Ankner et al. 2024) the data is first split in two: one part trains the
small reference model, the other is scored by it and pruned. :func:`split_for_reference` draws that split
from a seeded permutation and :meth:`ReferenceSplit.save` **records the ids themselves** (``NAME.ids.npy``
beside ``NAME.json``, with their SHA-256 in the JSON), so reading a split never depends on numpy's random
stream staying the same across versions. ``composer-ext score`` refuses to score the samples that trained
the reference model unless told to.

The ``reference_text`` dataloader (:mod:`.selected_dataset`, ``yamls/perplexity_pruning/reference.yaml``)
trains on one part of a split and writes the split file on first use; the training checkpoint records which
samples it trained on (the ids themselves for up to ``selected_dataset.INLINE_IDS`` samples, else the split
file and the ids' hash), which is how ``composer-ext score --model CHECKPOINT`` knows what to leave out.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from composer_ext.core.provenance import ids_sha256
from composer_ext.data.mds import MDSDataset
from composer_ext.storage import atomic_write_bytes, atomic_write_json

__all__ = ['PARTS', 'ReferenceSplit', 'check_part', 'ids_file_of', 'split_for_reference']

FORMAT = 'composer_ext.reference_split/v2'
LEGACY_FORMAT = 'composer_ext.reference_split/v1'  # parameters and hash only: ids regenerated on load
PARTS = ('reference', 'remainder')


def check_part(part: Any) -> str:
    """``part`` if it names a part of a split (``'reference'`` or ``'remainder'``), else ``ValueError``."""
    if part not in PARTS:
        raise ValueError(f'part={part!r} is not a split part. Fix: use one of {list(PARTS)}.')
    return part


def ids_file_of(path: Union[str, Path]) -> Path:
    """Where :meth:`ReferenceSplit.save` puts the ids of the split file ``path``: ``NAME.ids.npy`` beside it."""
    path = Path(path)
    return path.with_name(f'{path.stem}.ids.npy')


@dataclass(frozen=True, eq=False)
class ReferenceSplit:
    """A random split of ``num_samples`` sample ids into a reference part and the remainder.

    A new split draws ``reference_ids`` as the first ``round(fraction * num_samples)`` entries of
    ``numpy.random.default_rng(seed).permutation(num_samples)``, sorted. From then on the ids are data:
    :meth:`save` writes them and :meth:`load` reads them back (checked against their SHA-256), so a split
    stays the same even where numpy's random stream changes. Build one with :func:`split_for_reference`.
    Two splits are equal when their parameters, data fingerprint and ids are.

    Args:
        num_samples: Samples in the data set (ids ``0 .. num_samples - 1``).
        fraction: Share of the samples that train the reference model, in (0, 1).
        seed: Seed of the permutation.
        data_fingerprint: Index fingerprint of the MDS directory it was made for (None for other data).
        data_path: That directory (informational).
        reference_ids: The recorded ids (sorted, unique, ``round(fraction * num_samples)`` of them); default:
            drawn from the seed as above.

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
    data_path: Optional[str] = None
    reference_ids: Optional[np.ndarray] = field(default=None, repr=False)

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
        if self.reference_ids is None:
            ids = np.sort(np.random.default_rng(self.seed).permutation(self.num_samples)[:count]).astype(np.int64)
        else:
            ids = np.asarray(self.reference_ids)
            if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
                raise ValueError(f'reference_ids must be a 1-D array of int sample ids, got dtype {ids.dtype} and '
                                 f'shape {ids.shape}. Fix: pass the ids of a saved split (ReferenceSplit.load).')
            ids = ids.astype(np.int64)
            if len(ids) != count or (count and (ids[0] < 0 or ids[-1] >= self.num_samples)) or \
                    np.any(np.diff(ids) <= 0):
                raise ValueError(f'reference_ids ({len(ids)} ids) are not {count} sorted, unique ids in [0, '
                                 f'{self.num_samples}) as fraction={self.fraction} of num_samples={self.num_samples} '
                                 f'requires. Fix: pass the ids that were saved with this split.')
        ids.setflags(write=False)
        object.__setattr__(self, 'reference_ids', ids)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ReferenceSplit):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def _key(self) -> tuple:
        return self.num_samples, self.fraction, self.seed, self.data_fingerprint, self.reference_sha256

    @property
    def num_reference(self) -> int:
        return int(round(self.fraction * self.num_samples))

    @property
    def remainder_ids(self) -> np.ndarray:
        """Sorted ids of the samples that are scored and pruned (everything else)."""
        mask = np.ones(self.num_samples, dtype=bool)
        mask[self.reference_ids] = False
        return np.flatnonzero(mask)

    def ids(self, part: str) -> np.ndarray:
        """The sorted ids of ``part`` (``'reference'`` or ``'remainder'``)."""
        check_part(part)
        return self.reference_ids if part == 'reference' else self.remainder_ids

    @property
    def reference_sha256(self) -> str:
        digest = self.__dict__.get('_reference_sha256')
        if digest is None:  # the ids never change (read-only array of a frozen object): hash them once
            digest = self.__dict__['_reference_sha256'] = ids_sha256(self.reference_ids)
        return digest

    def provenance(self, part: str = 'reference', split_file: Union[str, Path, None] = None) -> dict[str, Any]:
        """What a training checkpoint records about the samples it trained on (see ``SelectedDataset``).

        ``split_file`` (where the split was saved) lets :meth:`from_provenance` read the recorded ids back.
        """
        check_part(part)
        return {'kind': 'reference_split', 'part': part, 'num_samples': self.num_samples, 'fraction': self.fraction,
                'seed': self.seed, 'reference_sha256': self.reference_sha256,
                'split_file': None if split_file is None else str(Path(split_file).resolve()),
                'data_index_fingerprint': self.data_fingerprint, 'data_path': self.data_path}

    @classmethod
    def from_provenance(cls, record: dict[str, Any]) -> 'ReferenceSplit':
        """The split a checkpoint's record describes: read from its split file, else redrawn from the seed;
        either way the ids must hash to the recorded ``reference_sha256``."""
        split_file = record.get('split_file')
        if split_file and Path(split_file).is_file():
            try:
                split = cls.load(split_file)
            except ValueError:  # lost or altered since: fall back to redrawing, which the hash then checks
                split = None
            if split is not None and split.reference_sha256 == record['reference_sha256']:
                return split
        split = cls(record['num_samples'], record['fraction'], record['seed'], record.get('data_index_fingerprint'),
                    record.get('data_path'))
        if split.reference_sha256 != record['reference_sha256']:
            where = f'its split file {split_file!r} is gone or was replaced, and ' if split_file else ''
            raise ValueError(f'the reference model\'s training record names a split whose ids cannot be recovered: '
                             f'{where}redrawing them from seed={record["seed"]} gives other ids (another numpy '
                             f'version?). Fix: pass the split file it trained on with --reference-split (its '
                             f'.ids.npy must lie beside it).')
        return split

    def save(self, path: Union[str, Path]) -> Path:
        """Write the split: the ids to ``NAME.ids.npy``, then ``NAME.json`` (parameters, data fingerprint, the
        ids' SHA-256), each atomically; the JSON last, so an existing JSON always has its ids beside it."""
        path = Path(path)
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(self.reference_ids, dtype=np.int64), allow_pickle=False)
        atomic_write_bytes(ids_file_of(path), buffer.getvalue())
        atomic_write_json(path, {'format': FORMAT, 'num_samples': self.num_samples, 'fraction': self.fraction,
                                 'seed': self.seed, 'num_reference': self.num_reference,
                                 'reference_sha256': self.reference_sha256, 'ids_file': ids_file_of(path).name,
                                 'data_fingerprint': self.data_fingerprint, 'data_path': self.data_path})
        return path

    @classmethod
    def load(cls, path: Union[str, Path]) -> 'ReferenceSplit':
        """Read a split written by :meth:`save`: its recorded ids, checked against the stored SHA-256.

        A split file of the first format (no ids file) is redrawn from its seed and checked the same way.
        """
        path = Path(path)
        if not path.is_file():
            raise ValueError(f'reference split {str(path)!r} does not exist. Fix: create it with '
                             f'composer_ext.data.split_for_reference(...).save(path), or let the reference_text '
                             f'dataloader write it (give it a fraction).')
        try:
            record = json.loads(path.read_text())
            if record.get('format') not in (FORMAT, LEGACY_FORMAT):
                raise KeyError('format')
            params = (record['num_samples'], record['fraction'], record['seed'], record.get('data_fingerprint'),
                      record.get('data_path'))
            expected = record['reference_sha256']
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f'{str(path)!r} is not a reference split file ({err!r}). Fix: pass a file written by '
                             f'ReferenceSplit.save.') from None
        if record['format'] == LEGACY_FORMAT:
            split = cls(*params)
            if split.reference_sha256 != expected:
                raise ValueError(f'{str(path)!r}: the ids redrawn from (num_samples, fraction, seed) do not match the '
                                 f'stored hash (the file was edited, or numpy changed its random stream). Fix: '
                                 f'recreate the split and retrain the reference model on it.')
            return split
        ids_file = path.with_name(str(record.get('ids_file') or ids_file_of(path).name))
        if not ids_file.is_file():
            raise ValueError(f'reference split {str(path)!r} has lost its ids file {str(ids_file)!r}. Fix: restore '
                             f'it (ReferenceSplit.save writes both), or recreate the split and retrain the reference '
                             f'model on it.')
        data = ids_file.read_bytes()
        try:
            ids = np.load(io.BytesIO(data), allow_pickle=False)
        except ValueError as err:
            raise ValueError(f'{str(ids_file)!r} is not a numpy array file ({err}). Fix: restore it from the split '
                             f'that trained the reference model.') from None
        if ids_sha256(ids) != expected:
            raise ValueError(f'{str(ids_file)!r} does not match the SHA-256 stored in {str(path)!r} (one of them was '
                             f'altered or replaced). Fix: restore both files from the split that trained the '
                             f'reference model, or recreate the split and retrain the reference model on it.')
        return cls(*params, reference_ids=ids)

    def check_data(self, data) -> None:
        """Raise ``ValueError`` unless ``data`` (an MDS path or MDSDataset) is the data the split was made for."""
        mds = data if isinstance(data, MDSDataset) else MDSDataset(data)
        if len(mds) != self.num_samples or (self.data_fingerprint is not None
                                            and mds.index_fingerprint != self.data_fingerprint):
            raise ValueError(f'the reference split (made for {self.num_samples} samples of {self.data_path!r}, '
                             f'fingerprint {str(self.data_fingerprint)[:12]}) does not match data={str(mds.path)!r} '
                             f'({len(mds)} samples, fingerprint {mds.index_fingerprint[:12]}). Fix: make a new split '
                             f'for this data with split_for_reference, or pass the data the split was made for.')

    def __repr__(self) -> str:  # the ids are left out: the repr rebuilds them from the seed
        return (f'ReferenceSplit(num_samples={self.num_samples!r}, fraction={self.fraction!r}, seed={self.seed!r}, '
                f'data_fingerprint={self.data_fingerprint!r}, data_path={self.data_path!r})')


def _dataset_size_and_fingerprint(dataset: Any) -> tuple[int, Optional[str], Optional[str]]:
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

