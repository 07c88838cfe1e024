"""``composer-ext report bias RUN_DIR... [--out DIR]``: CEV/SDE vs sparsity, ΔFNR vs ΔFPR, CEV vs similarity.

Each RUN_DIR holds the ``bias_probe.json`` that :class:`composer_ext.callbacks.BiasProbe` (``folder: runs/{run_name}``)
writes; the report takes every run's last evaluation and groups runs by their algorithms (``prune`` for
MagnitudePruning, ``+KD`` for KnowledgeDistillation). It writes to ``--out``:

* ``delta_scatter.png``: per sparsity, every class as a point (ΔFPR, ΔFNR) for each group, with the ΔFPR = ΔFNR
  line (SDE is the mean distance from it, CEV the spread of the points);
* ``cev_sde_vs_sparsity.png``: CEV and SDE (with their bootstrap intervals) against sparsity, one line per group;
* ``cev_vs_similarity.png``: CEV against each similarity measure (agreement, output KL, CKA per layer) over all
  runs, with the Pearson r in each panel's title;
* ``bias_report.csv``, ``bias_report.md`` (tables and correlations) and ``bias_report.json``.

The intervals are labelled with the probes' ``confidence_level`` (recorded in ``bias_probe.json``). Under
``composer -n N -m composer_ext.cli report bias ...`` every rank checks the inputs and only rank 0 writes and prints.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any, Optional

__all__ = ['collect_rows', 'configure_parser', 'cli_main', 'pearson', 'write_report']

RECORD_FILE = 'bias_probe.json'  # the file composer_ext.callbacks.bias_probe writes (kept light: no torch import)
_SHORT = {'MagnitudePruning': 'prune', 'KnowledgeDistillation': 'KD'}
_ORDER = {'MagnitudePruning': 0, 'KnowledgeDistillation': 1}
_SCALARS = ('cev', 'sde', 'cev_ci_low', 'cev_ci_high', 'sde_ci_low', 'sde_ci_high', 'n_masked', 'accuracy',
            'reference_accuracy', 'weight_sparsity')


def configure_parser(parser) -> None:
    parser.add_argument('run_dirs', nargs='+', metavar='RUN_DIR',
                        help='run directories holding bias_probe.json (BiasProbe folder: runs/{run_name})')
    parser.add_argument('--out', default=None,
                        help='output directory (default: bias_report beside the run directories)')
    parser.add_argument('--label', default=None,
                        help='the evaluator label to report (default: the label of each run\'s last record)')


def _group(algorithms: list[str]) -> str:
    names = sorted(set(algorithms), key=lambda n: (_ORDER.get(n, 99), n))
    return '+'.join(_SHORT.get(n, n) for n in names) or 'none'


def _load(run_dir: str, label: Optional[str]) -> dict[str, Any]:
    from composer_ext.config import ConfigError

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


def collect_rows(run_dirs: list[str], label: Optional[str] = None) -> list[dict[str, Any]]:
    """One row per run: its group, sparsity, CEV/SDE (+ CIs), accuracies, similarities and per-class Δ."""
    rows = []
    for run_dir in run_dirs:
        record = _load(run_dir, label)
        metrics = record['metrics']
        row = {'run': record.get('run_name') or os.path.basename(os.path.normpath(run_dir)), 'run_dir': run_dir,
               'group': _group(record.get('algorithms', [])), 'batch': record.get('batch')}
        target = record.get('target_sparsity')
        row['sparsity'] = float(target) if target is not None else round(float(metrics['weight_sparsity']), 4)
        row.update({k: metrics.get(k) for k in _SCALARS})
        row['confidence_level'] = record.get('settings', {}).get('confidence_level')
        row.update({k: v for k, v in metrics.items() if k in ('agreement', 'churn', 'negative_flip_rate', 'kl') or
                    k.startswith('cka/')})
        row['delta_fpr'] = record['per_class']['delta_fpr']
        row['delta_fnr'] = record['per_class']['delta_fnr']
        rows.append(row)
    return sorted(rows, key=lambda r: (r['group'], r['sparsity'], r['run']))


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


def _plots(rows: list[dict[str, Any]], correlations: dict[str, Optional[float]], out: str) -> list[str]:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    groups = sorted({r['group'] for r in rows})
    colours = {g: plt.get_cmap('tab10')(i) for i, g in enumerate(groups)}
    markers = {g: 'os^Dv<>p*h'[i % 10] for i, g in enumerate(groups)}
    written = []

    # ΔFNR vs ΔFPR per class, one panel per sparsity.
    sparsities = sorted({r['sparsity'] for r in rows})
    fig, axes = plt.subplots(1, len(sparsities), figsize=(4.2 * len(sparsities), 4.2), squeeze=False)
    for ax, sparsity in zip(axes[0], sparsities):
        values = []
        for row in (r for r in rows if r['sparsity'] == sparsity):
            points = [(x, y, c) for c, (x, y) in enumerate(zip(row['delta_fpr'], row['delta_fnr']))
                      if x is not None and y is not None]
            if not points:
                continue
            xs, ys, cs = zip(*points)
            values += list(xs) + list(ys)
            ax.scatter(xs, ys, color=colours[row['group']], marker=markers[row['group']], s=28,
                       label=f'{row["group"]} (CEV {row["cev"]:.3g}, SDE {row["sde"]:.3g})')
            for x, y, c in points:
                ax.annotate(str(c), (x, y), fontsize=6, xytext=(2, 2), textcoords='offset points')
        if values:
            low, high = min(values + [0.0]), max(values + [0.0])
            ax.plot([low, high], [low, high], color='grey', linewidth=0.8, linestyle='--')
        ax.axhline(0, color='lightgrey', linewidth=0.6)
        ax.axvline(0, color='lightgrey', linewidth=0.6)
        ax.set_title(f'sparsity {sparsity:g}')
        ax.set_xlabel('ΔFPR (relative to reference)')
        ax.set_ylabel('ΔFNR (relative to reference)')
        ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(_save(fig, out, 'delta_scatter.png'))

    # CEV and SDE vs sparsity.
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, name in zip(axes, ('cev', 'sde')):
        for group in groups:
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
        if all(r[name] > 0 for r in rows):
            ax.set_yscale('log')
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
                series = [r for r in rows if r['group'] == group and r.get(key) is not None]
                ax.scatter([r[key] for r in series], [r['cev'] for r in series], color=colours[group],
                           marker=markers[group], label=group)
            r_value = correlations[key]
            ax.set_title(f'CEV vs {key}: r = {r_value:+.2f}' if r_value is not None else f'CEV vs {key}: r = n/a')
            ax.set_xlabel(key)
            ax.set_ylabel('CEV')
            ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(keys):]:
            ax.axis('off')
        fig.tight_layout()
        written.append(_save(fig, out, 'cev_vs_similarity.png'))
    return written


def _save(fig, out: str, name: str) -> str:
    import io

    import matplotlib.pyplot as plt

    from composer_ext.storage import atomic_write_bytes

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


def _markdown(rows: list[dict[str, Any]], correlations: dict[str, Optional[float]],
              sde_correlations: dict[str, Optional[float]]) -> str:
    similarity = _similarity_keys(rows)
    interval = _interval_name(rows)
    columns = ['group', 'sparsity', 'accuracy', 'cev', f'cev {interval}', 'sde', f'sde {interval}', 'n_masked']
    columns += similarity
    lines = ['# Bias report', '', f'Reference accuracy: {_fmt(rows[0].get("reference_accuracy"))}. CEV/SDE: '
             f'variant of the BiasProbe (default nas: fractions).', '',
             '| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
    for row in rows:
        cells = []
        for column in columns:
            if column.endswith(f' {interval}'):
                name = column.split()[0]
                low, high = row.get(f'{name}_ci_low'), row.get(f'{name}_ci_high')
                cells.append(f'[{_fmt(low)}, {_fmt(high)}]' if low is not None else '-')
            else:
                cells.append(_fmt(row.get(column)))
        lines.append('| ' + ' | '.join(cells) + ' |')
    lines += ['', '## Pearson r over all runs', '', '| similarity | r(CEV, similarity) | r(SDE, similarity) |',
              '|---|---|---|']
    for key in correlations:
        lines.append(f'| {key} | {_fmt(correlations[key])} | {_fmt(sde_correlations.get(key))} |')
    return '\n'.join(lines) + '\n'


def write_report(run_dirs: list[str], out: str, label: Optional[str] = None) -> dict[str, Any]:
    """Collect the runs, write the figures and tables to ``out``; return the summary (rows, correlations)."""
    from composer_ext.storage import atomic_write_bytes, atomic_write_json

    rows = collect_rows(run_dirs, label)
    keys = _similarity_keys(rows)
    correlations = {k: pearson([r.get(k) for r in rows], [r['cev'] for r in rows]) for k in keys}
    sde_correlations = {k: pearson([r.get(k) for r in rows], [r['sde'] for r in rows]) for k in keys}
    os.makedirs(out, exist_ok=True)
    figures = _plots(rows, correlations, out)
    scalar_columns = ['run', 'group', 'sparsity', 'batch', *_SCALARS, *keys]
    csv_lines = [','.join(scalar_columns)]
    for row in rows:
        csv_lines.append(','.join('' if row.get(c) is None else str(row.get(c)) for c in scalar_columns))
    atomic_write_bytes(os.path.join(out, 'bias_report.csv'), ('\n'.join(csv_lines) + '\n').encode())
    atomic_write_bytes(os.path.join(out, 'bias_report.md'),
                       _markdown(rows, correlations, sde_correlations).encode())
    summary = {'rows': rows, 'pearson_cev': correlations, 'pearson_sde': sde_correlations, 'figures': figures}
    atomic_write_json(os.path.join(out, 'bias_report.json'), summary)
    return summary


def cli_main(args) -> int:
    from composer.utils import dist

    run_dirs = [os.path.normpath(d) for d in args.run_dirs]
    if dist.get_global_rank() != 0:
        # Under `composer -n N` every rank runs the command: all check the inputs, only rank 0 writes and prints.
        collect_rows(run_dirs, args.label)
        return 0
    out = args.out or os.path.join(os.path.commonpath([os.path.abspath(d) for d in run_dirs]) if len(run_dirs) > 1
                                   else os.path.dirname(os.path.abspath(run_dirs[0])), 'bias_report')
    summary = write_report(run_dirs, out, args.label)
    print(_markdown(summary['rows'], summary['pearson_cev'], summary['pearson_sde']))
    print(f'Wrote {len(summary["figures"])} figures and bias_report.{{csv,md,json}} to {out}', file=sys.stderr)
    return 0
