"""Perplexity-band selection: choose which scored samples to train on, and train on them by sample id.

The bands of *Perplexed by Perplexity* (Ankner et al. 2024), at a selection rate ``keep``:

- ``low``: the lowest-perplexity ``keep`` share: ``score <= P(100 * keep)``;
- ``medium``: centred on the median: ``P(50 * (1 - keep)) <= score <= P(50 * (1 + keep))``;
- ``high``: the highest-perplexity share: ``score >= P(100 * (1 - keep))``;
- ``random``: ``round(keep * n)`` samples drawn uniformly (the baseline),

where ``P(q)`` is ``numpy.percentile(scores, q)`` over the scored samples (linear interpolation). Samples
without a score (NaN: excluded because they trained the reference model, or too short) are never chosen.
With ``per_domain`` the percentiles are taken within each domain, so pruning keeps the domain mix.

``composer-ext select`` applies a band to a score index and writes a selection directory (the sorted
sample ids plus a JSON + PNG report); :class:`SelectedDataset` and the ``selected_text`` dataloader train
on it without rewriting the corpus (``--write-mds`` writes a pruned MDS copy when you want one).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
from torch.utils.data import Dataset

from composer_ext.storage import atomic_dir, atomic_write_json

__all__ = ['BANDS', 'SelectedDataset', 'build_selected_text_dataloader', 'band_bounds', 'read_selection', 'select_band',
           'select_from_scores', 'selected_text_dataspec', 'configure_parser', 'cli_main']

BANDS = ('low', 'medium', 'high', 'random')
SELECTION_FORMAT = 'composer_ext.selection/v1'
INLINE_IDS = 1 << 16  # a checkpoint records up to this many trained-on ids themselves (about 0.5 MB at most)


# --- the selection rule ------------------------------------------------------------------------------------


def _check_keep(keep: Any) -> float:
    if isinstance(keep, bool) or not isinstance(keep, (int, float, np.floating, np.integer)) or \
            not 0.0 < float(keep) <= 1.0:
        raise ValueError(f'keep={keep!r} is outside (0, 1]. Fix: pass the share of samples to keep, e.g. keep=0.5 '
                         f'(the paper\'s selection rate).')
    return float(keep)


def _check_band(band: Any) -> str:
    if band not in BANDS:
        import difflib
        close = difflib.get_close_matches(str(band), BANDS, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ''
        raise ValueError(f'band={band!r} is not a band.{hint} Fix: use one of {", ".join(BANDS)} (low = lowest '
                         f'perplexity, high = highest, medium = centred on the median, random = baseline).')
    return band


def band_bounds(values: np.ndarray, band: str, keep: float) -> tuple[float, float]:
    """The inclusive score interval ``[low, high]`` of ``band`` over finite ``values`` (numpy percentiles)."""
    band, keep = _check_band(band), _check_keep(keep)
    if band == 'random':
        raise ValueError("band='random' has no score interval. Fix: use select_band for random selection.")
    values = np.asarray(values, dtype=np.float64)
    if band == 'low':
        return -np.inf, float(np.percentile(values, 100.0 * keep))
    if band == 'high':
        return float(np.percentile(values, 100.0 * (1.0 - keep))), np.inf
    low, high = np.percentile(values, [50.0 * (1.0 - keep), 50.0 * (1.0 + keep)])
    return float(low), float(high)


def _select_group(values: np.ndarray, positions: np.ndarray, band: str, keep: float,
                  rng: np.random.Generator) -> np.ndarray:
    if len(positions) == 0:
        return positions
    if band == 'random':
        count = int(round(keep * len(positions)))
        return np.sort(rng.choice(positions, size=count, replace=False)) if count < len(positions) else positions
    low, high = band_bounds(values[positions], band, keep)
    group = values[positions]
    return positions[(group >= low) & (group <= high)]


def select_band(scores: Any, band: str, keep: float, seed: int = 0, domains: Optional[Sequence] = None) -> np.ndarray:
    """Sorted indices of the samples in perplexity ``band`` at selection rate ``keep``.

    Args:
        scores: One score per sample (perplexity or mean NLL: the bands are the same, exp is monotonic); NaN
            marks samples without a score, which are never selected. A
            :class:`~composer_ext.perplexity_pruning.score_index.ScoreIndex` uses its perplexities.
        band: ``low``, ``medium``, ``high`` or ``random`` (see the module docstring for the definitions).
        keep: Selection rate in (0, 1].
        seed: Seed of the ``random`` band.
        domains: One label per sample: take the percentiles (or the random draw) within each label.

    Returns:
        numpy.ndarray: int64 indices into ``scores``, ascending.

    Example:
        .. code-block:: python

            import numpy as np
            from composer_ext.data import select_band
            ppl = np.array([5.0, 50.0, 12.0, np.nan, 30.0])
            select_band(ppl, 'low', keep=0.5)        # array([0, 2]): the two lowest of the four scored
    """
    from composer_ext.perplexity_pruning.score_index import ScoreIndex
    band, keep = _check_band(band), _check_keep(keep)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f'seed={seed!r} is not an int. Fix: pass an int seed, e.g. seed=0.')
    if isinstance(scores, ScoreIndex):
        scores = np.where(scores.scored, scores.perplexity, np.nan)
    values = np.asarray(scores, dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(f'scores has shape {values.shape}; expected one score per sample (1-D). Fix: pass a 1-D '
                         f'array.')
    valid = ~np.isnan(values)
    if not valid.any():
        raise ValueError(f'scores has no score to select from ({len(values)} entries, all NaN). Fix: score the data '
                         f'first; samples that trained the reference model or have < 2 tokens have no score.')
    if np.isinf(values[valid]).any():
        raise ValueError('scores contains inf. Fix: use finite scores, or NaN for samples that must not be chosen.')
    rng = np.random.default_rng(seed)
    if domains is None:
        return _select_group(values, np.flatnonzero(valid), band, keep, rng).astype(np.int64)
    labels = np.asarray(domains)
    if labels.shape != values.shape:
        raise ValueError(f'domains has {labels.shape[0] if labels.ndim else 0} labels for {len(values)} scores. Fix: '
                         f'pass one domain label per score.')
    chosen = [_select_group(values, np.flatnonzero(valid & (labels == label)), band, keep, rng)
              for label in np.unique(labels[valid])]
    return np.sort(np.concatenate(chosen)).astype(np.int64) if chosen else np.zeros(0, np.int64)


# --- training on a selection --------------------------------------------------------------------------------


def _ids_sha256(ids: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(ids, dtype=np.int64).tobytes()).hexdigest()


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
        from composer_ext.data.mds import MDSDataset
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
        from composer_ext.data.mds import MDSDataset
        mds = MDSDataset(data if data is not None else record['data']['path'])
        if mds.index_fingerprint != record['data']['index_fingerprint']:
            raise ValueError(f'selection={str(selection)!r} was made for {record["data"]["path"]!r} (fingerprint '
                             f'{record["data"]["index_fingerprint"][:12]}), not for data={str(mds.path)!r} '
                             f'(fingerprint {mds.index_fingerprint[:12]}). Fix: pass the data that was scored, or '
                             f'select again from scores of this data.')
        provenance = {'kind': 'selection', 'path': str(Path(selection).resolve()), 'indices_sha256': _ids_sha256(ids),
                      'band': record['band'], 'keep': record['keep'], 'per_domain': record['per_domain'],
                      'data_index_fingerprint': mds.index_fingerprint, 'data_path': str(mds.path)}
        return cls(mds, ids, provenance=provenance)

    @classmethod
    def from_reference_split(cls, split: Any, part: str = 'reference',
                             data: Union[str, Path, None] = None) -> 'SelectedDataset':
        """One part of a :class:`~composer_ext.perplexity_pruning.reference_split.ReferenceSplit` (object or saved file)."""
        from composer_ext.data.mds import MDSDataset
        from composer_ext.perplexity_pruning.reference_split import ReferenceSplit
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
        from composer_ext.data.mds import MDSDataset
        mds = self.dataset if isinstance(self.dataset, MDSDataset) else None
        ids = np.sort(self.indices)
        record = {'num_selected': self.num_samples, 'num_base_samples': self.num_base_samples,
                  'ids_sha256': _ids_sha256(ids), 'data_index_fingerprint': mds.index_fingerprint if mds else None,
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
    from composer.core import DataSpec
    from composer.utils import dist
    from torch.utils.data import DataLoader

    from composer_ext.data.sharding import per_rank_batch_size
    from composer_ext.data.text import LMCollator, count_tokens

    per_rank = per_rank_batch_size(batch_size)
    if tokenizer is None:
        from composer_ext.data.tokenizer import load_tokenizer
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
        from composer_ext.data.tokenizer import load_tokenizer
        tokenizer = load_tokenizer()
    if check_tokenizer:
        from composer_ext.perplexity_pruning.scoring import tokenizer_fingerprint
        record, _ = read_selection(selection, with_ids=False)
        if record['tokenizer_fingerprint'] != tokenizer_fingerprint(tokenizer):
            raise ValueError(f'tokenizer mismatch: selection={selection!r} was scored with tokenizer '
                             f'{record["tokenizer_fingerprint"][:12]}, but this run\'s model uses '
                             f'{tokenizer_fingerprint(tokenizer)[:12]}. Fix: train with the tokenizer the scores were '
                             f'computed with, rescore with the training tokenizer, or set check_tokenizer: false.')
    return selected_text_dataspec(dataset, batch_size, seq_len=seq_len, shuffle=shuffle, seed=seed,
                                  drop_last=drop_last, num_workers=num_workers, tokenizer=tokenizer)


# --- selection directories ---------------------------------------------------------------------------------


def read_selection(selection: Union[str, Path], with_ids: bool = True) -> tuple[dict, Optional[np.ndarray]]:
    """Read and verify a selection directory: its ``selection.json`` and (optionally) its sorted ids."""
    path = Path(selection)
    record_file = path / 'selection.json'
    if not record_file.is_file():
        raise ValueError(f'selection={str(selection)!r} is not a selection directory (no selection.json). Fix: '
                         f'write one with `composer-ext select --scores SCORES --band high --keep 0.5 --out DIR`.')
    record = json.loads(record_file.read_text())
    if record.get('format') != SELECTION_FORMAT:
        raise ValueError(f'{record_file} has format {record.get("format")!r}, not {SELECTION_FORMAT!r}. Fix: select '
                         f'again with this version of composer_ext.')
    if not with_ids:
        return record, None
    ids = np.load(path / 'indices.npy', allow_pickle=False)
    if _ids_sha256(ids) != record['indices_sha256']:
        raise ValueError(f'{path / "indices.npy"} does not match selection.json (altered?). Fix: select again.')
    return record, ids


def _composition(labels: np.ndarray, names: list[str]) -> dict[str, int]:
    counts = np.bincount(labels, minlength=len(names)) if len(labels) else np.zeros(len(names), np.int64)
    return {name: int(count) for name, count in zip(names, counts)}


def _kl(p: np.ndarray, q: np.ndarray) -> Optional[float]:
    """KL(p || q) in nats for two count vectors; None when p has mass where q has none."""
    p = p / p.sum()
    q = q / q.sum()
    support = p > 0
    if np.any(q[support] == 0):
        return None
    return float(np.sum(p[support] * np.log(p[support] / q[support])))


def _quantiles(values: np.ndarray) -> dict[str, float]:
    if len(values) == 0:
        return {}
    qs = np.percentile(values, [0, 10, 25, 50, 75, 90, 100])
    return {name: float(v) for name, v in zip(['min', 'p10', 'p25', 'median', 'p75', 'p90', 'max'], qs)}


def _examples(scores, candidates: np.ndarray, keep: float, mds, count: int, seed: int) -> dict[str, list]:
    """``count`` samples from each band (evenly spaced through the band's perplexity order), with their text."""
    ppl = scores.perplexity
    candidate_ppl = np.full(len(ppl), np.nan)
    candidate_ppl[candidates] = ppl[candidates]
    out = {}
    for band in ('low', 'medium', 'high'):
        ids = select_band(candidate_ppl, band, keep, seed)
        ordered = ids[np.argsort(ppl[ids], kind='stable')]
        picks = ordered[np.unique(np.linspace(0, len(ordered) - 1, num=min(count, len(ordered))).round().astype(int))] \
            if len(ordered) else []
        rows = []
        for sample_id in picks:
            row = {'sample_id': int(sample_id), 'perplexity': float(ppl[sample_id]),
                   'domain': str(scores.domains[sample_id])}
            if scores.uids is not None:
                row['uid'] = str(scores.uids[sample_id])
            if mds is not None:
                sample = mds[int(sample_id)]
                if 'text' in sample:
                    text = str(sample['text'])
                    row['text'] = text[:300] + ('...' if len(text) > 300 else '')
            rows.append(row)
        out[band] = rows
    return out


def _plot(report: dict, scores, candidates: np.ndarray, chosen: np.ndarray, path: Path) -> None:
    import matplotlib
    matplotlib.use('Agg', force=False)
    import matplotlib.pyplot as plt

    log_ppl = np.log10(scores.perplexity)
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(19, 5.2), gridspec_kw={'width_ratios': [1.2, 1, 1]})
    # The bulk of the distribution: a few extreme outliers would squeeze the histogram into a few bins.
    bins = np.linspace(*np.percentile(log_ppl[candidates], [0.1, 99.9]), 60) if len(candidates) else 10
    left.hist(log_ppl[candidates], bins=bins, color='0.75', label=f'scored ({len(candidates)})')
    left.hist(log_ppl[chosen], bins=bins, color='tab:blue', alpha=0.8, label=f'kept ({len(chosen)})')
    thresholds = report['thresholds']
    if not report['per_domain'] and report['band'] != 'random':
        for key in ('perplexity_low', 'perplexity_high'):
            if thresholds.get(key) is not None:
                left.axvline(np.log10(thresholds[key]), color='tab:red', linestyle='--', linewidth=1)
    left.set_xlabel('log10 perplexity under the reference model')
    left.set_ylabel('samples')
    per_domain_note = ' per domain\n(thresholds per domain: middle panel)' if report['per_domain'] and \
        report['band'] != 'random' else (' per domain' if report['per_domain'] else '')
    left.set_title(f'band={report["band"]} keep={report["keep"]}{per_domain_note}')
    left.legend()

    # Where each domain sits: which bands keep or drop it.
    codes = scores.domain_codes[candidates]
    present = [code for code in range(len(scores.domain_names)) if np.any(codes == code)]
    import inspect
    horizontal = {'orientation': 'horizontal'} if 'orientation' in inspect.signature(middle.boxplot).parameters \
        else {'vert': False}  # matplotlib >= 3.10 deprecates vert
    middle.boxplot([log_ppl[candidates][codes == code] for code in present], showfliers=False, whis=(5, 95),
                   **horizontal)
    middle.set_yticks(np.arange(1, len(present) + 1), [scores.domain_names[c] for c in present])
    if not report['per_domain'] and report['band'] != 'random':
        for key in ('perplexity_low', 'perplexity_high'):
            if thresholds.get(key) is not None:
                middle.axvline(np.log10(thresholds[key]), color='tab:red', linestyle='--', linewidth=1)
    elif report['band'] != 'random':  # per domain: each domain's own thresholds, across its own row
        for row, code in enumerate(present, start=1):
            for key in ('perplexity_low', 'perplexity_high'):
                value = thresholds.get(scores.domain_names[code], {}).get(key)
                if value is not None:
                    middle.vlines(np.log10(value), row - 0.4, row + 0.4, color='tab:red', linestyle='--',
                                  linewidth=1.2)
    middle.set_xlabel('log10 perplexity (box: quartiles, whiskers: 5-95%)')
    middle.set_title('perplexity by domain' + (' (red: the band\'s bounds)' if report['band'] != 'random' else ''))

    composition = report['composition']
    names = list(composition)
    x = np.arange(len(names))
    before = [composition[n]['before_fraction'] for n in names]
    after = [composition[n]['after_fraction'] for n in names]
    right.bar(x - 0.2, before, width=0.4, color='0.6', label='before')
    right.bar(x + 0.2, after, width=0.4, color='tab:blue', label='after')
    right.set_xticks(x, names, rotation=30, ha='right')
    right.set_ylabel('share of samples')
    kl = report['kl_after_before']
    right.set_title(f'domain composition (KL(after||before) = {kl:.4f} nats)' if kl is not None else
                    'domain composition')
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def select_from_scores(scores: Union[str, Path, Any], band: str, keep: float, out: Union[str, Path],
                       per_domain: bool = False, seed: int = 0, data: Union[str, Path, None] = None,
                       write_mds: Union[str, Path, None] = None, examples: int = 3,
                       overwrite: bool = False, progress: bool = True) -> dict:
    """Apply a band to a score index and write the selection directory ``out`` (what ``composer-ext select`` runs).

    ``out`` gets ``selection.json``, ``indices.npy`` (sorted sample ids), ``report.json`` and ``report.png``,
    all at once (atomically). With ``write_mds`` the MDS copy is written (atomically) first and ``out`` is
    committed only after it, so a complete ``out`` always has its complete copy; a run killed in between
    leaves the copy alone, and rerunning with ``overwrite`` replaces it. Returns the report.

    Args:
        scores: A score index directory (or :class:`~composer_ext.perplexity_pruning.score_index.ScoreIndex`).
        band, keep, seed: See :func:`select_band`.
        out: The selection directory to write.
        per_domain: Take the percentiles within each domain.
        data: The scored MDS directory (default: the path recorded in the index), for example texts and
            ``write_mds``; its fingerprint must match the index.
        write_mds: Also write the selected samples as a new MDS directory here.
        examples: Example samples per band in the report.
        overwrite: Replace an existing ``out`` (and ``write_mds``).
        progress: Show a tqdm bar while writing the MDS copy.
    """
    from composer_ext.data.mds import MDSDataset
    from composer_ext.perplexity_pruning.score_index import STATUS_REFERENCE, STATUS_TOO_SHORT, ScoreIndex

    band, keep = _check_band(band), _check_keep(keep)
    if isinstance(examples, bool) or not isinstance(examples, int) or examples < 0:
        raise ValueError(f'examples={examples!r} is invalid. Fix: use a non-negative int.')
    scores = scores if isinstance(scores, ScoreIndex) else ScoreIndex(scores)
    out = Path(out)
    for target, name in ((out, 'out'), (Path(write_mds) if write_mds else None, 'write_mds')):
        if target is not None and target.exists() and not overwrite:
            raise ValueError(f'{name}={str(target)!r} already exists. Fix: choose a new path or pass --overwrite.')
    mds, data_note = None, None
    data_path = Path(data) if data is not None else Path(scores.data_path)
    if (data_path / 'index.json').is_file():
        mds = MDSDataset(data_path)
        scores.check_data(mds)
    elif data is not None or write_mds is not None:
        raise ValueError(f'data={str(data_path)!r} is not an MDS directory. Fix: pass --data with the MDS directory '
                         f'that was scored.')
    else:
        data_note = f'the scored data {str(data_path)!r} is not available: no example texts'

    chosen = select_band(scores, band, keep, seed=seed, domains=scores.domain_codes if per_domain else None)
    candidates = np.flatnonzero(scores.scored)
    names = scores.domain_names
    before = _composition(scores.domain_codes[candidates], names)
    after = _composition(scores.domain_codes[chosen], names)
    before_counts = np.array([before[n] for n in names], dtype=np.float64)
    after_counts = np.array([after[n] for n in names], dtype=np.float64)
    thresholds: dict[str, Any] = {}
    if band != 'random':
        if per_domain:
            for code, name in enumerate(names):
                group = candidates[scores.domain_codes[candidates] == code]
                if len(group):
                    low, high = band_bounds(scores.perplexity[group], band, keep)
                    thresholds[name] = {'perplexity_low': None if np.isinf(low) else low,
                                        'perplexity_high': None if np.isinf(high) else high}
        else:
            low, high = band_bounds(scores.perplexity[candidates], band, keep)
            thresholds = {'perplexity_low': None if np.isinf(low) else low,
                          'perplexity_high': None if np.isinf(high) else high}
    report = {
        'band': band, 'keep': keep, 'per_domain': bool(per_domain), 'seed': int(seed),
        'scores': str(scores.path.resolve()),
        'counts': {'samples': scores.num_samples, 'candidates': int(len(candidates)), 'selected': int(len(chosen)),
                   'excluded_reference': int((scores.status == STATUS_REFERENCE).sum()),
                   'too_short': int((scores.status == STATUS_TOO_SHORT).sum())},
        'tokens': {'before': int(scores.num_tokens[candidates].sum()), 'after': int(scores.num_tokens[chosen].sum())},
        'thresholds': thresholds,
        'perplexity': {'before': _quantiles(scores.perplexity[candidates]),
                       'after': _quantiles(scores.perplexity[chosen])},
        'composition': {name: {'before': before[name], 'after': after[name],
                               'before_fraction': before[name] / max(len(candidates), 1),
                               'after_fraction': after[name] / max(len(chosen), 1),
                               'kept_fraction': after[name] / before[name] if before[name] else None}
                        for name in names},
        'kl_after_before': _kl(after_counts, before_counts) if len(chosen) else None,
        'kl_before_after': _kl(before_counts, after_counts) if len(chosen) else None,
        'examples': _examples(scores, candidates, keep, mds, examples, seed) if examples else {},
    }
    if data_note:
        report['note'] = data_note
    record = {
        'format': SELECTION_FORMAT, 'band': band, 'keep': keep, 'per_domain': bool(per_domain), 'seed': int(seed),
        'num_selected': int(len(chosen)), 'num_candidates': int(len(candidates)),
        'indices_sha256': _ids_sha256(chosen), 'scores': str(scores.path.resolve()),
        'data': {'path': scores.data_path, 'index_fingerprint': scores.data_index_fingerprint,
                 'content_fingerprint': scores.data_content_fingerprint, 'num_samples': scores.num_samples},
        'tokenizer_fingerprint': scores.tokenizer_fingerprint, 'model': scores.meta['model'],
        'thresholds': thresholds,
    }
    with atomic_dir(out) as tmp:
        np.save(tmp / 'indices.npy', chosen, allow_pickle=False)
        atomic_write_json(tmp / 'report.json', report)
        _plot(report, scores, candidates, chosen, tmp / 'report.png')
        atomic_write_json(tmp / 'selection.json', record)
        if write_mds is not None:  # inside: `out` appears only once its MDS copy is complete
            _write_mds(mds, chosen, Path(write_mds), record, progress)
    return report


def _write_mds(mds, ids: np.ndarray, out: Path, record: dict, progress: bool = True) -> None:
    from streaming import MDSWriter
    from tqdm import tqdm
    with atomic_dir(out) as tmp:
        with MDSWriter(out=str(tmp), columns=mds.columns, compression=None, progress_bar=False) as writer:
            for sample_id in tqdm(ids, desc=f'write {out.name}', unit='sample', disable=not progress,
                                  file=sys.stderr, dynamic_ncols=True):
                writer.write(mds[int(sample_id)])
        atomic_write_json(tmp / 'composer_ext_selection.json', record)


# --- CLI ---------------------------------------------------------------------------------------------------


def configure_parser(parser) -> None:
    """Arguments of ``composer-ext select``."""
    parser.add_argument('--scores', required=True, help='score index directory (the --out of `composer-ext score`)')
    parser.add_argument('--band', required=True, help='low | medium | high | random')
    parser.add_argument('--keep', required=True, type=float, help='selection rate in (0, 1], e.g. 0.5')
    parser.add_argument('--out', required=True, help='selection directory to write (ids + report.json + report.png)')
    parser.add_argument('--per-domain', action='store_true', help='take the percentiles within each domain')
    parser.add_argument('--seed', type=int, default=0, help='seed of the random band (default 0)')
    parser.add_argument('--data', default=None, help='the scored MDS directory (default: the path in the index)')
    parser.add_argument('--write-mds', default=None, metavar='DIR', help='also write the selection as a new MDS dir')
    parser.add_argument('--examples', type=int, default=3, help='example samples per band in the report')
    parser.add_argument('--overwrite', action='store_true', help='replace an existing --out / --write-mds')
    parser.add_argument('--no-progress', action='store_true', help='no progress bar (writing --write-mds)')


def cli_main(args) -> int:
    if int(os.environ.get('RANK', '0')) != 0:  # under a launcher, one process writes the selection
        return 0
    from composer_ext.perplexity_pruning.score_index import ScoreIndexError
    try:
        report = select_from_scores(args.scores, args.band, args.keep, args.out, per_domain=args.per_domain,
                                    seed=args.seed, data=args.data, write_mds=args.write_mds, examples=args.examples,
                                    overwrite=args.overwrite, progress=not args.no_progress)
    except (ScoreIndexError, ValueError, TypeError) as err:
        print(f'composer-ext select: error: {err}', file=sys.stderr)
        return 2
    counts = report['counts']
    kl = report['kl_after_before']
    print(f'selected {counts["selected"]} of {counts["candidates"]} scored samples (band={report["band"]}, '
          f'keep={report["keep"]}{", per domain" if report["per_domain"] else ""}); '
          f'tokens {report["tokens"]["after"]} of {report["tokens"]["before"]}; '
          f'KL(after||before) = {"n/a" if kl is None else f"{kl:.4f}"} nats')
    print(f'wrote {args.out}/indices.npy, report.json, report.png' + (f'; MDS copy {args.write_mds}'
                                                                       if args.write_mds else ''))
    return 0
