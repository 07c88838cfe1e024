"""``composer-ext report bias RUN_DIR... [--out DIR]``: CEV/SDE vs sparsity, ΔFNR vs ΔFPR, CEV vs similarity.

Each RUN_DIR holds the ``bias_probe.json`` that :class:`composer_ext.callbacks.BiasProbe` (``folder: runs/{run_name}``)
writes; the report takes every run's last evaluation and groups runs by their algorithms (``prune`` for
MagnitudePruning, ``+KD`` for KnowledgeDistillation) and sparsity. Runs that share a group and a sparsity are trials
(seeds) of one configuration; as in the Simon Says code (``compression_errors.ipynb``, which averages each method's
per-class FPR/FNR over its trials before taking Δ), the configuration's row **pools** them: their confusion matrices
(``confmat`` and ``reference_confmat`` in the records) are summed, which on the same test set averages the per-class
rates over trials, and CEV/SDE are computed from the sums with the probe's variant and eps
(:func:`composer_ext.fairness.bias.cev_sde_from_confusion`). The similarity measures of a pooled row are the trials'
means. A pooled row has no bootstrap interval (each run's interval bootstraps its own test predictions; they do
not combine into an interval of the pooled statistic); it carries the per-trial CEV/SDE mean, sample sd, min and
max instead. A configuration with a single run keeps that run's row, interval included.

It writes to ``--out``:

* ``delta_scatter.png``: per sparsity, every class as a point (ΔFPR, ΔFNR) for each configuration, with the
  ΔFPR = ΔFNR line (SDE is the mean distance from it, CEV the spread of the points); trials faint;
* ``cev_sde_vs_sparsity.png``: CEV and SDE (with their bootstrap intervals where a row has one) against sparsity,
  one line per group; trials as faint points;
* ``cev_vs_similarity.png``: CEV against each similarity measure (agreement, output KL, CKA per layer) over the
  configurations, with the Pearson r in each panel's title (and the r over all trial runs when pooled);
* ``bias_report.csv``, ``bias_report.md`` (tables and correlations) and ``bias_report.json``; with pooled trials
  also ``bias_report_trials.csv`` (one row per run).

The intervals are labelled with the probes' ``confidence_level`` (recorded in ``bias_probe.json``). Under
``composer -n N -m composer_ext.cli report bias ...`` every rank checks the inputs and only rank 0 writes and prints.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import os
import statistics
import sys
import warnings
from typing import Any, Optional

import torch
from composer.utils import dist

from composer_ext.config import ConfigError
from composer_ext.fairness.bias import ZeroRateWarning, cev_sde_from_confusion
from composer_ext.storage import atomic_write_bytes, atomic_write_json

__all__ = ['RECORD_FILE', 'collect_rows', 'configure_parser', 'cli_main', 'json_ready', 'pearson', 'pool_trials',
           'write_report']

RECORD_FILE = 'bias_probe.json'  # what BiasProbe (composer_ext.fairness.probe) writes into its folder
_SHORT = {'MagnitudePruning': 'prune', 'KnowledgeDistillation': 'KD'}
_ORDER = {'MagnitudePruning': 0, 'KnowledgeDistillation': 1}
_SCALARS = ('cev', 'sde', 'cev_ci_low', 'cev_ci_high', 'sde_ci_low', 'sde_ci_high', 'n_masked', 'accuracy',
            'reference_accuracy', 'weight_sparsity')
_SIMILARITY = ('agreement', 'churn', 'negative_flip_rate', 'kl')  # plus every 'cka/<layer>'
_TRIAL_COLUMNS = ('n_trials', 'cev_trial_mean', 'cev_trial_sd', 'cev_trial_min', 'cev_trial_max', 'sde_trial_mean',
                  'sde_trial_sd', 'sde_trial_min', 'sde_trial_max')
# BiasProbe's defaults, for records written before it recorded its settings.
_DEFAULT_VARIANT, _DEFAULT_EPS = 'nas', None


def json_ready(value: Any) -> Any:
    """``value`` with every non-finite float (a ``nan`` CEV/SDE: nothing to compare) replaced by ``None``.

    Python's ``json`` writes ``nan`` as a bare ``NaN`` token, which is not JSON (strict parsers and other languages
    reject the file). ``bias_probe.json`` and ``bias_report.json`` go through this; reading them back, ``None``
    stands for the ``nan``.

    Example:
        >>> json_ready({'cev': float('nan'), 'sde': 0.5, 'delta_fpr': [1.0, float('inf')]})
        {'cev': None, 'sde': 0.5, 'delta_fpr': [1.0, None]}
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(item) for item in value]
    return value


def configure_parser(parser) -> None:
    parser.add_argument('run_dirs', nargs='+', metavar='RUN_DIR',
                        help='run directories holding bias_probe.json (BiasProbe folder: runs/{run_name}); runs '
                             'that share a group and sparsity are pooled as trials')
    parser.add_argument('--out', default=None,
                        help='output directory (default: bias_report beside the run directories)')
    parser.add_argument('--label', default=None,
                        help='the evaluator label to report (default: the label of each run\'s last record)')


def _group(algorithms: list[str]) -> str:
    names = sorted(set(algorithms), key=lambda n: (_ORDER.get(n, 99), n))
    return '+'.join(_SHORT.get(n, n) for n in names) or 'none'


def _is_similarity(key: str) -> bool:
    return key in _SIMILARITY or key.startswith('cka/')


def _load(run_dir: str, label: Optional[str]) -> dict[str, Any]:
    path = os.path.join(run_dir, RECORD_FILE)
    if not os.path.isfile(path):
        raise ConfigError(run_dir, '', f'has no {RECORD_FILE}.', 'add the bias_probe callback with '
                          '`folder: runs/{run_name}` to the run, and pass that run directory.')
    with open(path) as handle:
        all_records = json.load(handle).get('records', [])
    records = [r for r in all_records if label is None or r.get('eval_label') == label]
    if not records:
        labels = sorted({r.get('eval_label') for r in all_records} - {None})
        raise ConfigError(path, '', f'has no evaluation record{f" for label {label!r}" if label else ""}.',
                          f'pass --label with one of {labels}, or let the run evaluate at least once.')
    return records[-1]


def _row(run_dir: str, record: dict[str, Any]) -> dict[str, Any]:
    metrics = record['metrics']
    row = {'run': record.get('run_name') or os.path.basename(os.path.normpath(run_dir)), 'run_dir': run_dir,
           'group': _group(record.get('algorithms', [])), 'batch': record.get('batch')}
    target = record.get('target_sparsity')
    row['sparsity'] = float(target) if target is not None else round(float(metrics['weight_sparsity']), 4)
    row.update({k: metrics.get(k) for k in _SCALARS})
    for name in ('cev', 'sde'):  # written as null when nan (nothing to compare): nan again, a float like the others
        if row[name] is None:
            row[name] = math.nan
    row['confidence_level'] = record.get('settings', {}).get('confidence_level')
    row.update({k: v for k, v in metrics.items() if _is_similarity(k)})
    row['delta_fpr'] = record['per_class']['delta_fpr']
    row['delta_fnr'] = record['per_class']['delta_fnr']
    return row


def _collect(run_dirs: list[str], label: Optional[str]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(row, record) per run, sorted by group, sparsity and run name (so that trials are adjacent)."""
    seen: dict[str, str] = {}
    for run_dir in run_dirs:
        real = os.path.realpath(run_dir)
        if real in seen:
            # A run given twice would count as two trials of its configuration.
            raise ConfigError(run_dir, '', f'is passed twice (also as {seen[real]!r}).',
                              'pass every run directory once.')
        seen[real] = run_dir
    entries = []
    for run_dir in run_dirs:
        record = _load(run_dir, label)
        entries.append((_row(run_dir, record), record))
    return sorted(entries, key=lambda e: (e[0]['group'], e[0]['sparsity'], e[0]['run']))


def collect_rows(run_dirs: list[str], label: Optional[str] = None) -> list[dict[str, Any]]:
    """One row per run: its group, sparsity, CEV/SDE (+ CIs), accuracies, similarities and per-class Δ."""
    return [row for row, _ in _collect(run_dirs, label)]


def _settings(record: dict[str, Any]) -> tuple[str, Optional[float]]:
    """The probe's (variant, eps): from ``settings``, else from the per-class result, else BiasProbe's defaults."""
    settings = record.get('settings') or {}
    per_class = record.get('per_class') or {}
    variant = settings.get('variant', per_class.get('variant', _DEFAULT_VARIANT))
    eps = settings['eps'] if 'eps' in settings else per_class.get('eps', _DEFAULT_EPS)
    return variant, None if eps is None else float(eps)


def _mean(values: list[Any]) -> Optional[float]:
    """The mean, or None when a trial lacks the value (a measure every trial does not have is not averaged)."""
    if not values or any(v is None for v in values):
        return None
    return statistics.fmean(float(v) for v in values)


def _pooled_row(members: list[tuple[dict[str, Any], dict[str, Any]]]) -> dict[str, Any]:
    """The configuration row of several trials: CEV/SDE of the summed confusion matrices, similarities averaged."""
    trials = [row for row, _ in members]
    records = [record for _, record in members]
    group, sparsity = trials[0]['group'], trials[0]['sparsity']
    what = (f'the {len(trials)} runs of group {group!r} at sparsity {sparsity:g} '
            f'({", ".join(str(r["run_dir"]) for r in trials)})')
    settings = [_settings(record) for record in records]
    if len(set(settings)) > 1:
        raise ConfigError(trials[0]['run_dir'], 'settings', f'{what} were probed with different CEV/SDE settings '
                          f'(variant, eps) {settings}, so their trials cannot be pooled.',
                          'probe every trial with the same BiasProbe variant and eps, or pass one run per group '
                          'and sparsity.')
    for row, record in members:
        if record.get('confmat') is None or record.get('reference_confmat') is None:
            raise ConfigError(os.path.join(row['run_dir'], RECORD_FILE), 'confmat',
                              f'has no confusion matrices (confmat, reference_confmat), needed to pool the trials '
                              f'of {what}.', 'rerun it with the current BiasProbe, which records both, or pass one '
                              'run per group and sparsity.')
    confmats = [torch.tensor(record['confmat'], dtype=torch.float64) for record in records]
    references = [torch.tensor(record['reference_confmat'], dtype=torch.float64) for record in records]
    shapes = sorted({tuple(m.shape) for m in confmats + references})
    if len(shapes) > 1:
        raise ConfigError(trials[0]['run_dir'], 'confmat', f'{what} have confusion matrices of different shapes '
                          f'{shapes}.', 'pool only trials of the same task (the same classes).')
    # Summing the counts averages the rates over trials only when every trial saw the same samples per class
    # (FPR_c = FP_c / (samples not of class c), FNR_c = FN_c / (samples of class c)): the authors' trials share the
    # test set.
    supports = sorted({tuple(m.sum(1).tolist()) for m in confmats + references})
    if len(supports) > 1:
        raise ConfigError(trials[0]['run_dir'], 'confmat', f'{what} were evaluated on different samples (samples '
                          f'per class: {supports}), so summing their counts would not average their rates.',
                          'evaluate every trial on the same eval set (same loader, split and num_samples), or pass '
                          'one run per group and sparsity.')
    confmat, reference = torch.stack(confmats).sum(0), torch.stack(references).sum(0)
    variant, eps = settings[0]
    with warnings.catch_warnings():
        # The row reports n_masked; each run's probe already warned about the rates it left out.
        warnings.simplefilter('ignore', ZeroRateWarning)
        result = cev_sde_from_confusion(reference, confmat, variant=variant, eps=eps)
    total = float(confmat.sum())
    batches = {r.get('batch') for r in trials}
    levels = {r.get('confidence_level') for r in trials}
    pooled: dict[str, Any] = {'run': f'pooled over {len(trials)} trials', 'run_dir': None, 'group': group,
                              'batch': batches.pop() if len(batches) == 1 else None, 'sparsity': sparsity}
    pooled.update({k: None for k in _SCALARS})  # the intervals stay None: see the module docstring
    pooled.update(cev=result.cev, sde=result.sde, n_masked=float(result.n_masked),
                  accuracy=float(confmat.trace()) / total if total else None,
                  reference_accuracy=float(reference.trace()) / total if total else None,
                  weight_sparsity=_mean([r.get('weight_sparsity') for r in trials]))
    pooled['confidence_level'] = levels.pop() if len(levels) == 1 else None
    keys = sorted({k for r in trials for k in r if _is_similarity(k)})
    pooled.update({k: _mean([r.get(k) for r in trials]) for k in keys})
    deltas = result.as_dict()
    pooled['delta_fpr'], pooled['delta_fnr'] = deltas['delta_fpr'], deltas['delta_fnr']
    pooled.update(n_trials=len(trials), trials=[r['run'] for r in trials], variant=variant, eps=eps)
    for name in ('cev', 'sde'):
        values = [float(r[name]) for r in trials]
        if any(math.isnan(v) for v in values):  # a trial with nothing to compare: no summary over the trials
            pooled.update({f'{name}_trial_{stat}': math.nan for stat in ('mean', 'sd', 'min', 'max')})
            continue
        pooled.update({f'{name}_trial_mean': statistics.fmean(values), f'{name}_trial_sd': statistics.stdev(values),
                       f'{name}_trial_min': min(values), f'{name}_trial_max': max(values)})
    return pooled


def _pool(entries: list[tuple[dict[str, Any], dict[str, Any]]]) -> list[dict[str, Any]]:
    rows = []
    for _, members in itertools.groupby(entries, key=lambda e: (e[0]['group'], e[0]['sparsity'])):
        members = list(members)
        rows.append(members[0][0] if len(members) == 1 else _pooled_row(members))
    return rows


def pool_trials(run_dirs: list[str], label: Optional[str] = None) -> list[dict[str, Any]]:
    """One row per (group, sparsity): a single run's row as :func:`collect_rows` gives it, or the trials pooled.

    A pooled row sums the trials' confusion matrices (the per-class FPR/FNR averaged over trials, as the Simon Says
    code does) and computes CEV/SDE from the sums with the probes' variant and eps; it averages the similarity
    measures, has no bootstrap interval (``*_ci_*`` are None) and adds ``n_trials``, ``trials`` (run names),
    ``variant``, ``eps`` and the per-trial ``{cev,sde}_trial_{mean,sd,min,max}``.

    Args:
        run_dirs: Run directories holding ``bias_probe.json``.
        label: The evaluator label to report (default: each run's last record).

    Example:
        >>> rows = pool_trials(['runs/fairness_prune_0.9_s17', 'runs/fairness_prune_0.9_s18'])  # doctest: +SKIP
        >>> rows[0]['n_trials'], rows[0]['cev']  # doctest: +SKIP
    """
    return _pool(_collect(run_dirs, label))


def pearson(xs: list[float], ys: list[float]) -> Optional[float]:
    """Pearson's r, or None with fewer than 3 points or a constant variable."""
    pairs = [(float(x), float(y)) for x, y in zip(xs, ys) if x is not None and y is not None and
             math.isfinite(float(x)) and math.isfinite(float(y))]
    if len(pairs) < 3:
        return None
    n = len(pairs)
    mx, my = sum(p[0] for p in pairs) / n, sum(p[1] for p in pairs) / n
    sxx = sum((p[0] - mx) ** 2 for p in pairs)
    syy = sum((p[1] - my) ** 2 for p in pairs)
    if sxx == 0 or syy == 0:
        return None
    return sum((p[0] - mx) * (p[1] - my) for p in pairs) / math.sqrt(sxx * syy)


def _interval_name(rows: list[dict[str, Any]]) -> str:
    """``'95% CI'`` when every run's probe used one confidence level, else ``'CI'`` (older files lack the level)."""
    levels = {row.get('confidence_level') for row in rows}
    if len(levels) == 1 and None not in levels:
        return f'{100 * float(next(iter(levels))):g}% CI'
    return 'CI'


def _similarity_keys(rows: list[dict[str, Any]]) -> list[str]:
    keys = ['agreement', 'kl', 'negative_flip_rate']
    keys += sorted({k for row in rows for k in row if k.startswith('cka/')}, key=lambda k: (k != 'cka/logits', k))
    return [k for k in keys if any(row.get(k) is not None for row in rows)]


def _plots(rows: list[dict[str, Any]], correlations: dict[str, Optional[float]], out: str,
           trials: Optional[list[dict[str, Any]]] = None,
           trial_correlations: Optional[dict[str, Optional[float]]] = None) -> list[str]:
    """The three figures of ``rows``; ``trials`` (the runs of pooled configurations) are drawn faint."""
    # matplotlib is slow to import (fonts, backends): only drawing pays for it; Agg draws without a display.
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    trials, trial_correlations = trials or [], trial_correlations or {}
    faint = {'alpha': 0.3}
    groups = sorted({r['group'] for r in rows})
    colours = {g: plt.get_cmap('tab10')(i) for i, g in enumerate(groups)}
    markers = {g: 'os^Dv<>p*h'[i % 10] for i, g in enumerate(groups)}
    written = []

    # ΔFNR vs ΔFPR per class, one panel per sparsity.
    sparsities = sorted({r['sparsity'] for r in rows})
    fig, axes = plt.subplots(1, len(sparsities), figsize=(4.2 * len(sparsities), 4.2), squeeze=False)
    for ax, sparsity in zip(axes[0], sparsities):
        values = []
        for trial in (t for t in trials if t['sparsity'] == sparsity):
            points = [(x, y) for x, y in zip(trial['delta_fpr'], trial['delta_fnr']) if x is not None and y is not None]
            if points:
                xs, ys = zip(*points)
                values += list(xs) + list(ys)
                ax.scatter(xs, ys, color=colours[trial['group']], marker=markers[trial['group']], s=10, **faint)
        for row in (r for r in rows if r['sparsity'] == sparsity):
            points = [(x, y, c) for c, (x, y) in enumerate(zip(row['delta_fpr'], row['delta_fnr']))
                      if x is not None and y is not None]
            if not points:
                continue
            xs, ys, cs = zip(*points)
            values += list(xs) + list(ys)
            pooled = f' pooled x{row["n_trials"]}' if row.get('n_trials', 1) > 1 else ''
            ax.scatter(xs, ys, color=colours[row['group']], marker=markers[row['group']], s=28,
                       label=f'{row["group"]}{pooled} (CEV {row["cev"]:.3g}, SDE {row["sde"]:.3g})')
            for x, y, c in points:
                ax.annotate(str(c), (x, y), fontsize=6, xytext=(2, 2), textcoords='offset points')
        if values:
            low, high = min(values + [0.0]), max(values + [0.0])
            ax.plot([low, high], [low, high], color='grey', linewidth=0.8, linestyle='--')
        ax.axhline(0, color='lightgrey', linewidth=0.6)
        ax.axvline(0, color='lightgrey', linewidth=0.6)
        ax.set_title(f'sparsity {sparsity:g}' + (' (faint: trials)' if trials else ''))
        ax.set_xlabel('ΔFPR (relative to reference)')
        ax.set_ylabel('ΔFNR (relative to reference)')
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        else:  # every Δ left out (e.g. a perfect reference with eps=None): an empty panel that says why
            ax.text(0.5, 0.5, 'no class with both Δ defined', ha='center', va='center', transform=ax.transAxes)
    fig.tight_layout()
    written.append(_save(fig, out, 'delta_scatter.png'))

    # CEV and SDE vs sparsity.
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, name in zip(axes, ('cev', 'sde')):
        for group in groups:
            points = [t for t in trials if t['group'] == group]
            if points:
                ax.scatter([t['sparsity'] for t in points], [t[name] for t in points], color=colours[group],
                           marker=markers[group], s=14, **faint)
            series = sorted((r for r in rows if r['group'] == group), key=lambda r: r['sparsity'])
            xs = [r['sparsity'] for r in series]
            ys = [r[name] for r in series]
            low = [r.get(f'{name}_ci_low') for r in series]
            high = [r.get(f'{name}_ci_high') for r in series]
            if all(v is not None for v in low + high):
                err = [[max(y - l, 0) for y, l in zip(ys, low)], [max(h - y, 0) for y, h in zip(ys, high)]]
                ax.errorbar(xs, ys, yerr=err, color=colours[group], marker=markers[group], capsize=3, label=group)
            else:
                ax.plot(xs, ys, color=colours[group], marker=markers[group], label=group)
        ax.set_xlabel('sparsity')
        ax.set_ylabel(name.upper())
        if all(r[name] > 0 for r in rows + trials):
            ax.set_yscale('log')
        if trials:
            ax.set_title(f'{name.upper()} vs sparsity (pooled over trials; faint: trials)')
        else:
            ax.set_title(f'{name.upper()} vs sparsity ({_interval_name(rows).replace("CI", "bootstrap CI")})')
        ax.legend()
    fig.tight_layout()
    written.append(_save(fig, out, 'cev_sde_vs_sparsity.png'))

    # CEV vs similarity measures.
    keys = list(correlations)
    if keys:
        cols = min(3, len(keys))
        nrows = math.ceil(len(keys) / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(4.3 * cols, 3.8 * nrows), squeeze=False)
        for ax, key in zip(axes.flat, keys):
            for group in groups:
                points = [t for t in trials if t['group'] == group and t.get(key) is not None]
                if points:
                    ax.scatter([t[key] for t in points], [t['cev'] for t in points], color=colours[group],
                               marker=markers[group], s=14, **faint)
                series = [r for r in rows if r['group'] == group and r.get(key) is not None]
                ax.scatter([r[key] for r in series], [r['cev'] for r in series], color=colours[group],
                           marker=markers[group], label=group)
            r_value = correlations[key]
            title = f'CEV vs {key}: r = {r_value:+.2f}' if r_value is not None else f'CEV vs {key}: r = n/a'
            if trials:
                r_trials = trial_correlations.get(key)
                title += f'\n(trials: r = {r_trials:+.2f})' if r_trials is not None else '\n(trials: r = n/a)'
            ax.set_title(title)
            ax.set_xlabel(key)
            ax.set_ylabel('CEV')
            ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(keys):]:
            ax.axis('off')
        fig.tight_layout()
        written.append(_save(fig, out, 'cev_vs_similarity.png'))
    return written


def _save(fig, out: str, name: str) -> str:
    import matplotlib.pyplot as plt  # slow to import (fonts, backends): paid only when a figure is drawn

    buffer = io.BytesIO()
    fig.savefig(buffer, format='png', dpi=120)
    plt.close(fig)
    path = os.path.join(out, name)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def _fmt(value: Any) -> str:
    if value is None:
        return '-'
    if isinstance(value, float):
        return f'{value:.4g}'
    return str(value)


def _table(rows: list[dict[str, Any]], columns: list[str], interval: str) -> list[str]:
    lines = ['| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
    for row in rows:
        cells = []
        for column in columns:
            if column.endswith(f' {interval}'):
                name = column.split()[0]
                low, high = row.get(f'{name}_ci_low'), row.get(f'{name}_ci_high')
                cells.append(f'[{_fmt(low)}, {_fmt(high)}]' if low is not None else '-')
            elif column.endswith(' trials'):  # 'cev trials': mean ± sd [min, max] over a pooled row's trials
                name = column.split()[0]
                mean = row.get(f'{name}_trial_mean')
                cells.append('-' if mean is None else f'{_fmt(mean)} ± {_fmt(row[f"{name}_trial_sd"])} '
                             f'[{_fmt(row[f"{name}_trial_min"])}, {_fmt(row[f"{name}_trial_max"])}]')
            elif column == 'trials':
                cells.append(str(row.get('n_trials', 1)))
            else:
                cells.append(_fmt(row.get(column)))
        lines.append('| ' + ' | '.join(cells) + ' |')
    return lines


def _correlation_table(correlations: dict[str, Optional[float]],
                       sde_correlations: dict[str, Optional[float]]) -> list[str]:
    lines = ['| similarity | r(CEV, similarity) | r(SDE, similarity) |', '|---|---|---|']
    for key in correlations:
        lines.append(f'| {key} | {_fmt(correlations[key])} | {_fmt(sde_correlations.get(key))} |')
    return lines


def _markdown(summary: dict[str, Any]) -> str:
    rows = summary['rows']
    similarity = _similarity_keys(rows)
    lines = ['# Bias report', '', f'Reference accuracy: {_fmt(rows[0].get("reference_accuracy"))}. CEV/SDE: '
             f'variant of the BiasProbe (default nas: fractions).', '']
    if not summary.get('pooled'):
        interval = _interval_name(rows)
        columns = ['group', 'sparsity', 'accuracy', 'cev', f'cev {interval}', 'sde', f'sde {interval}', 'n_masked']
        lines += _table(rows, columns + similarity, interval)
        lines += ['', '## Pearson r over all runs', '']
        lines += _correlation_table(summary['pearson_cev'], summary['pearson_sde'])
        return '\n'.join(lines) + '\n'
    trial_rows = summary['trial_rows']
    interval = _interval_name(trial_rows)
    lines += ['Runs that share a group and a sparsity are trials (seeds) of one configuration. As in the Simon Says '
              'code, a configuration\'s row pools its trials: their confusion matrices are summed, which averages '
              'the per-class FPR and FNR over trials (one test set), and Δ, CEV and SDE come from the averaged '
              'rates; its accuracy and similarity measures are the trials\' means. A pooled row has no bootstrap '
              'interval (the runs\' intervals do not combine into one for the pooled statistic); "cev trials" '
              'gives the per-trial CEV as mean ± sd [min, max].', '']
    columns = ['group', 'sparsity', 'trials', 'accuracy', 'cev', f'cev {interval}', 'cev trials', 'sde',
               f'sde {interval}', 'sde trials', 'n_masked']
    lines += _table(rows, columns + similarity, interval)
    lines += ['', '## Per-trial runs', '']
    columns = ['run', 'group', 'sparsity', 'accuracy', 'cev', f'cev {interval}', 'sde', f'sde {interval}', 'n_masked']
    lines += _table(trial_rows, columns + _similarity_keys(trial_rows), interval)
    lines += ['', '## Pearson r over the configurations (pooled CEV/SDE, similarity averaged over trials)', '']
    lines += _correlation_table(summary['pearson_cev'], summary['pearson_sde'])
    lines += ['', '## Pearson r over all trial runs', '']
    lines += _correlation_table(summary['pearson_cev_trials'], summary['pearson_sde_trials'])
    return '\n'.join(lines) + '\n'


def _csv(rows: list[dict[str, Any]], columns: list[str]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator='\n')
    writer.writerow(columns)
    writer.writerows(['' if row.get(c) is None else str(row.get(c)) for c in columns] for row in rows)
    return buffer.getvalue().encode()


def _correlations(rows: list[dict[str, Any]]) -> tuple[dict[str, Optional[float]], dict[str, Optional[float]]]:
    keys = _similarity_keys(rows)
    return ({k: pearson([r.get(k) for r in rows], [r['cev'] for r in rows]) for k in keys},
            {k: pearson([r.get(k) for r in rows], [r['sde'] for r in rows]) for k in keys})


def write_report(run_dirs: list[str], out: str, label: Optional[str] = None) -> dict[str, Any]:
    """Collect the runs, pool trials, write the figures and tables to ``out``; return the summary.

    The summary holds ``rows`` (one per configuration, see :func:`pool_trials`), ``pearson_cev``/``pearson_sde``
    over those rows, ``trial_rows`` (one per run, see :func:`collect_rows`) with ``pearson_cev_trials``/
    ``pearson_sde_trials`` over them, ``pooled`` (whether any configuration has several trials) and ``figures``.
    """
    entries = _collect(run_dirs, label)
    trial_rows = [row for row, _ in entries]
    rows = _pool(entries)
    pooled = any(row.get('n_trials', 1) > 1 for row in rows)
    correlations, sde_correlations = _correlations(rows)
    trial_correlations, trial_sde_correlations = _correlations(trial_rows)
    os.makedirs(out, exist_ok=True)
    # Faint points: the runs of the pooled configurations (a single-run configuration is its own row).
    pooled_keys = {(r['group'], r['sparsity']) for r in rows if r.get('n_trials', 1) > 1}
    faint = [t for t in trial_rows if (t['group'], t['sparsity']) in pooled_keys]
    figures = _plots(rows, correlations, out, faint, trial_correlations if pooled else None)
    columns = ['run', 'group', 'sparsity', 'batch', *_SCALARS, *_similarity_keys(rows)]
    if pooled:
        columns += _TRIAL_COLUMNS
    atomic_write_bytes(os.path.join(out, 'bias_report.csv'), _csv(rows, columns))
    if pooled:
        atomic_write_bytes(os.path.join(out, 'bias_report_trials.csv'), _csv(
            trial_rows, ['run', 'group', 'sparsity', 'batch', *_SCALARS, *_similarity_keys(trial_rows)]))
    summary = {'rows': rows, 'pearson_cev': correlations, 'pearson_sde': sde_correlations, 'figures': figures,
               'pooled': pooled, 'trial_rows': trial_rows, 'pearson_cev_trials': trial_correlations,
               'pearson_sde_trials': trial_sde_correlations}
    atomic_write_bytes(os.path.join(out, 'bias_report.md'), _markdown(summary).encode())
    atomic_write_json(os.path.join(out, 'bias_report.json'), json_ready(summary))
    return summary


def cli_main(args) -> int:
    run_dirs = [os.path.normpath(d) for d in args.run_dirs]
    if dist.get_global_rank() != 0:
        # Under `composer -n N` every rank runs the command: all check the inputs, only rank 0 writes and prints.
        pool_trials(run_dirs, args.label)
        return 0
    out = args.out or os.path.join(os.path.commonpath([os.path.abspath(d) for d in run_dirs]) if len(run_dirs) > 1
                                   else os.path.dirname(os.path.abspath(run_dirs[0])), 'bias_report')
    summary = write_report(run_dirs, out, args.label)
    print(_markdown(summary))
    extra = ', bias_report_trials.csv' if summary['pooled'] else ''
    print(f'Wrote {len(summary["figures"])} figures and bias_report.{{csv,md,json}}{extra} to {out}', file=sys.stderr)
    return 0
