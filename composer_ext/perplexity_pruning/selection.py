"""``composer-ext select``: apply a perplexity band to a score index and write a selection directory.

The selection directory holds the sorted sample ids (``indices.npy``), what they were chosen from and how
(``selection.json``) and a report (``report.json``, ``report.png``: the perplexity histogram, where each domain
sits, the domain mix before and after). The band rule itself is :mod:`.bands` (*Perplexed by Perplexity*,
Ankner et al. 2024); :class:`~composer_ext.perplexity_pruning.selected_dataset.SelectedDataset` and the
``selected_text`` dataloader train on a selection without rewriting the corpus (``--write-mds`` writes a pruned
MDS copy when you want one: every column of the scored data, so llm-foundry's ``text`` loader reads it as it is).
"""

from __future__ import annotations

import inspect
import json
import os
import sys
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
from tqdm import tqdm

from composer_ext.core.provenance import ids_sha256
from composer_ext.data.mds import MDSDataset
from composer_ext.perplexity_pruning.bands import band_bounds, select_band
from composer_ext.perplexity_pruning.score_index import STATUS_REFERENCE, STATUS_TOO_SHORT, ScoreIndex, ScoreIndexError
from composer_ext.storage import atomic_dir, atomic_write_json

__all__ = ['SELECTION_FORMAT', 'cli_main', 'configure_parser', 'read_selection', 'select_from_scores']

SELECTION_FORMAT = 'composer_ext.selection/v1'


# --- the selection directory and its report ---------------------------------------------------------------


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
    if ids_sha256(ids) != record['indices_sha256']:
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
        per_domain: Rank within each domain (each keeps ``round(keep * n_domain)`` samples).
        data: The scored MDS directory (default: the path recorded in the index), for example texts and
            ``write_mds``; its index fingerprint and every shard's SHA-256 must match the index (one read of
            the data), so a shard changed since scoring is refused.
        write_mds: Also write the selected samples as a new MDS directory here.
        examples: Example samples per band in the report.
        overwrite: Replace an existing ``out`` (and ``write_mds``).
        progress: Show a tqdm bar while writing the MDS copy.
    """
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
        scores.check_data(mds, content=True)  # its texts and --write-mds copy must be the samples scored
    elif data is not None or write_mds is not None:
        raise ValueError(f'data={str(data_path)!r} is not an MDS directory. Fix: pass --data with the MDS directory '
                         f'that was scored.')
    else:
        data_note = f'the scored data {str(data_path)!r} is not available: no example texts'

    chosen = select_band(scores, band, keep, seed=seed, domains=scores.domain_codes if per_domain else None)
    keep = float(keep)  # select_band has checked it: the records store it as a float
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
                    thresholds[name] = {'perplexity_low': low if np.isfinite(low) else None,
                                        'perplexity_high': high if np.isfinite(high) else None}
        else:
            low, high = band_bounds(scores.perplexity[candidates], band, keep)
            thresholds = {'perplexity_low': low if np.isfinite(low) else None,
                          'perplexity_high': high if np.isfinite(high) else None}
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
        'indices_sha256': ids_sha256(chosen), 'scores': str(scores.path.resolve()),
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
    from streaming import MDSWriter  # heavy, and only --write-mds needs it
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
    parser.add_argument('--per-domain', action='store_true', help='rank within each domain: each keeps its share')
    parser.add_argument('--seed', type=int, default=0, help='seed of the random band and of the order that '
                        'breaks ties at a band edge (default 0; the same seed gives the same selection)')
    parser.add_argument('--data', default=None, help='the scored MDS directory (default: the path in the index)')
    parser.add_argument('--write-mds', default=None, metavar='DIR', help='also write the selection as a new MDS dir')
    parser.add_argument('--examples', type=int, default=3, help='example samples per band in the report')
    parser.add_argument('--overwrite', action='store_true', help='replace an existing --out / --write-mds')
    parser.add_argument('--no-progress', action='store_true', help='no progress bar (writing --write-mds)')


def cli_main(args) -> int:
    if int(os.environ.get('RANK', '0')) != 0:  # under a launcher, one process writes the selection
        return 0
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
