"""``composer-ext report lora RUN_DIR... [--out DIR]``: learning vs forgetting Pareto plot and ΔW rank table.

A RUN_DIR is any directory holding a ``lora_probe.json`` written by :class:`composer_ext.callbacks.LoRAProbe`
(``save_folder=...``), directly or in a subdirectory: ``composer-ext report lora runs/lora_probe`` reports every
finetune under ``runs/lora_probe``. For each run the report takes the last evaluation (learning = target
improvement, forgetting = source degradation, of the primary metric averaged over evaluators) and the last
ΔW spectrum (rank at the probe's energy, mean and max over modules), and writes:

* ``pareto.png``: forgetting against learning, one trajectory per run (every probe point), the final point marked
  (squares: full finetuning; circles: LoRA) and ringed when Pareto-optimal;
* ``table.csv`` and ``table.md``: one row per run, with whether the run is Pareto-optimal (no other run learns at
  least as much while forgetting at most as much).

The runs must share the metric (``--metric``) and the probe's ``energy`` (ranks at different energies are not
comparable). Under ``composer -n N -m composer_ext.cli report lora ...`` every rank checks the inputs and only
rank 0 writes and prints.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from composer_ext.config import ConfigError
from composer_ext.lora_probe.history import FORMAT, HISTORY_FILE
from composer_ext.storage import atomic_write_bytes

__all__ = ['LoRARun', 'cli_main', 'configure_parser', 'find_runs', 'load_run', 'load_runs', 'lora_report',
           'pareto_optimal']

_SOURCE = 'composer-ext report lora'


@dataclass
class LoRARun:
    """The final numbers of one probed run (from its ``lora_probe.json``)."""

    name: str
    path: Path
    method: str
    metric: str
    learning: Optional[float]
    forgetting: Optional[float]
    rank_mean: Optional[float]
    rank_max: Optional[float]
    effective_rank_mean: Optional[float]
    energy: float
    batches: int
    trainable_params: Optional[int]
    trajectory: list = field(default_factory=list)  # [(batch, learning, forgetting)]


def _error(problem: str, fix: str):
    return ConfigError(_SOURCE, 'RUN_DIR', problem, fix)


def find_runs(run_dirs: Sequence[str | Path]) -> list[Path]:
    """Every ``lora_probe.json`` under the given directories (each must hold at least one), in a stable order."""
    files: list[Path] = []
    for run_dir in run_dirs:
        path = Path(run_dir)
        if path.is_file() and path.name == HISTORY_FILE:
            found = [path]
        elif path.is_dir():
            found = sorted(path.rglob(HISTORY_FILE))
        else:
            raise _error(f'{str(run_dir)!r} does not exist.', 'pass directories written by LoRAProbe(save_folder=...), '
                         'e.g. runs/lora_probe.')
        if not found:
            raise _error(f'{str(run_dir)!r} holds no {HISTORY_FILE}.', 'pass the save_folder of a LoRAProbe run (or a '
                         'directory above it); set save_folder= on the probe to write one.')
        files.extend(f for f in found if f not in files)
    return files


def _method(summary: dict) -> str:
    adapter = summary.get('adapter') or {}
    if adapter.get('kind') != 'lora':
        return 'full'
    names = list((summary.get('modules') or {}).keys())
    attention = any('attn' in n or 'attention' in n or n.endswith(('q_proj', 'k_proj', 'v_proj', 'o_proj'))
                    for n in names)
    mlp = any('mlp' in n or 'ffn' in n or n.endswith(('up_proj', 'down_proj', 'gate_proj')) for n in names)
    targets = 'all' if attention and mlp else 'attention' if attention else 'mlp' if mlp else f'{len(names)} modules'
    alpha = adapter.get('alpha')
    alpha_text = '' if alpha is None or alpha == 2 * adapter.get('r', 0) else f', alpha={alpha:g}'
    return f"LoRA r={adapter.get('r')} {targets}{alpha_text}"


def _mean_of(by_label: dict, metric: str) -> Optional[float]:
    values = [metrics[metric] for metrics in (by_label or {}).values() if metric in metrics]
    return float(sum(values) / len(values)) if values else None


def load_run(path: str | Path, metric: Optional[str] = None) -> LoRARun:
    """Read one ``lora_probe.json``; ``metric`` defaults to the run's primary metric."""
    path = Path(path)
    try:
        summary = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise _error(f'{str(path)!r} cannot be read as JSON ({err}).', 'point the report at files written by '
                     'LoRAProbe; a run killed mid-write leaves the previous complete file, never a partial '
                     'one.') from None
    if not isinstance(summary, dict) or summary.get('format') != FORMAT:
        found = summary.get('format') if isinstance(summary, dict) else None
        raise _error(f'{str(path)!r} is not a LoRAProbe history (format {found!r}).',
                     f'pass files written by composer_ext.callbacks.LoRAProbe (format {FORMAT!r}).')
    metric = metric or summary.get('primary_metric')
    history = summary.get('history') or []
    evaluated = [r for r in history if 'metrics' in r]
    last = evaluated[-1] if evaluated else {}
    followed = [m for kind in ('learning', 'forgetting') for m in (last.get(kind) or {}).values()]
    if metric is not None and evaluated and not any(metric in m for m in followed):
        raise _error(f'{str(path)!r} has no metric {metric!r}.', 'choose --metric among the metrics the probe followed '
                     f'(primary: {summary.get("primary_metric")!r}).')
    trajectory = [(r['batch'], _mean_of(r.get('learning'), metric), _mean_of(r.get('forgetting'), metric))
                  for r in evaluated]
    spectra = [r for r in history if 'spectrum_summary' in r]
    last_spectrum = spectra[-1]['spectrum_summary'] if spectra else {}
    final = trajectory[-1] if trajectory else (None, None, None)
    return LoRARun(
        name=str(summary.get('run_name') or path.parent.name),
        path=path,
        method=_method(summary),
        metric=str(metric),
        learning=final[1],
        forgetting=final[2],
        rank_mean=last_spectrum.get('rank_at_energy/mean'),
        rank_max=last_spectrum.get('rank_at_energy/max'),
        effective_rank_mean=last_spectrum.get('effective_rank/mean'),
        energy=float((summary.get('settings') or {}).get('energy', 0.9)),
        batches=int(history[-1]['batch']) if history else 0,
        trainable_params=(summary.get('adapter') or {}).get('trainable_params'),
        trajectory=trajectory,
    )


def pareto_optimal(runs: Sequence[LoRARun]) -> list[bool]:
    """Whether each run is on the learning-forgetting Pareto front (more learning, less forgetting is better)."""
    flags = []
    for run in runs:
        if run.learning is None or run.forgetting is None:
            flags.append(False)
            continue
        dominated = any(other is not run and other.learning is not None and other.forgetting is not None and
                        other.learning >= run.learning and other.forgetting <= run.forgetting and
                        (other.learning > run.learning or other.forgetting < run.forgetting) for other in runs)
        flags.append(not dominated)
    return flags


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return '-'
    if isinstance(value, float):
        return f'{value:.{digits}f}' if not value.is_integer() or digits else f'{value:.0f}'
    return str(value)


def _rows(runs: Sequence[LoRARun]) -> tuple[list[str], list[list[str]]]:
    energy = runs[0].energy if runs else 0.9
    percent = f'{100 * energy:g}%'
    metric = runs[0].metric if runs else 'metric'
    header = ['run', 'method', 'trainable params', 'batches', f'learning ({metric})', 'forgetting',
              f'ΔW rank@{percent} mean', f'ΔW rank@{percent} max', 'effective rank mean', 'Pareto-optimal']
    rows = []
    for run, optimal in zip(runs, pareto_optimal(runs)):
        rows.append([run.name, run.method, _fmt(run.trainable_params), str(run.batches), _fmt(run.learning, 4),
                     _fmt(run.forgetting, 4), _fmt(run.rank_mean, 1), _fmt(run.rank_max, 0),
                     _fmt(run.effective_rank_mean, 1), 'yes' if optimal else 'no'])
    return header, rows


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    lines += ['| ' + ' | '.join(row) + ' |' for row in rows]
    return '\n'.join(lines) + '\n'


PARETO_RING = {'marker': 'o', 'markersize': 17, 'markerfacecolor': 'none', 'markeredgecolor': 'crimson',
               'markeredgewidth': 1.8, 'linestyle': 'none'}


def _figure(runs: Sequence[LoRARun]):
    """The Pareto plot: trajectories, final points, and a ring around every Pareto-optimal final point."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7.5, 5.5))
    colours = plt.get_cmap('tab10')
    ringed = False
    for i, (run, optimal) in enumerate(zip(runs, pareto_optimal(runs))):
        points = [(lrn, fgt) for _, lrn, fgt in run.trajectory if lrn is not None and fgt is not None]
        if not points:
            continue
        colour = 'black' if run.method == 'full' else colours(i % 10)
        xs, ys = zip(*points)
        axes.plot(xs, ys, '-', color=colour, alpha=0.35, linewidth=1)
        axes.plot(xs[-1], ys[-1], 's' if run.method == 'full' else 'o', color=colour, markersize=9,
                  markeredgecolor=colour, label=f'{run.method} (rank@{100 * run.energy:g}% {_fmt(run.rank_mean, 1)})')
        if optimal:
            # A separate ring, not the marker's own edge: it stays visible on the black squares of full finetuning.
            axes.plot([xs[-1]], [ys[-1]], label='_nolegend_' if ringed else 'Pareto-optimal', **PARETO_RING)
            ringed = True
    axes.axhline(0.0, color='grey', linewidth=0.5)
    axes.axvline(0.0, color='grey', linewidth=0.5)
    metric = runs[0].metric if runs else ''
    axes.set_xlabel(f'learning: target improvement ({metric}, higher is better)')
    axes.set_ylabel(f'forgetting: source degradation ({metric}, lower is better)')
    axes.set_title('Learning vs forgetting (lines: trajectories; ringed: Pareto-optimal)')
    axes.legend(fontsize=8, loc='best')
    axes.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def _plot(runs: Sequence[LoRARun], path: Path) -> None:
    figure = _figure(runs)  # selects the Agg backend before pyplot is imported here
    import matplotlib.pyplot as plt
    buffer = io.BytesIO()
    figure.savefig(buffer, format='png', dpi=150)
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())


def load_runs(run_dirs: Sequence[str | Path], metric: Optional[str] = None) -> list[LoRARun]:
    """Every run under ``run_dirs``, checked to be comparable: one metric and one energy for ``rank_at_energy``."""
    runs = [load_run(path, metric) for path in find_runs(run_dirs)]
    metrics = sorted({run.metric for run in runs})
    if len(metrics) > 1:
        raise _error(f'the runs follow different primary metrics {metrics}.', 'pass --metric NAME to compare them on '
                     'one metric.')
    energies = {}
    for run in runs:
        energies.setdefault(run.energy, []).append(run.name)
    if len(energies) > 1:
        found = ', '.join(f'energy={energy:g}: {names}' for energy, names in sorted(energies.items()))
        raise _error(f'the runs measured ΔW rank at different energies ({found}); one table column cannot hold '
                     'both.', 'report runs probed with the same LoRAProbe(energy=...) together (pass their '
                     'directories separately), or rerun the others with that energy.')
    return runs


def lora_report(run_dirs: Sequence[str | Path], out: str | Path, metric: Optional[str] = None) -> dict[str, Any]:
    """Write ``pareto.png``, ``table.csv`` and ``table.md`` into ``out``; returns the runs and the paths.

    Args:
        run_dirs: Directories holding ``lora_probe.json`` files (searched recursively), or the files themselves.
        out: Output directory (created).
        metric: The metric for learning and forgetting (default: each run's primary metric).

    Raises:
        ConfigError: no run found, an unreadable file, or runs that differ in metric or energy.
    """
    runs = load_runs(run_dirs, metric)
    runs.sort(key=lambda run: (run.method != 'full', run.learning is None, -(run.learning or 0.0)))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    header, rows = _rows(runs)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_bytes(out / 'table.csv', buffer.getvalue().encode())
    markdown = _markdown(header, rows)
    atomic_write_bytes(out / 'table.md', markdown.encode())
    _plot(runs, out / 'pareto.png')
    return {'runs': runs, 'markdown': markdown, 'png': out / 'pareto.png', 'csv': out / 'table.csv',
            'md': out / 'table.md'}


def configure_parser(parser) -> None:
    parser.add_argument('run_dirs', nargs='+', metavar='RUN_DIR',
                        help=f'directories holding {HISTORY_FILE} files written by LoRAProbe (searched recursively)')
    parser.add_argument('--out', default='lora_report', help='output directory (default: ./lora_report)')
    parser.add_argument('--metric', default=None, help="metric for learning/forgetting (default: the runs' primary "
                        'metric, e.g. LanguageCrossEntropy)')


def cli_main(args) -> int:
    from composer.utils import dist

    if dist.get_global_rank() != 0:
        # Under `composer -n N` every rank runs the command: all check the inputs, only rank 0 writes and prints.
        load_runs(args.run_dirs, args.metric)
        return 0
    result = lora_report(args.run_dirs, args.out, args.metric)
    print(result['markdown'], end='')
    print(f"\nwrote {result['png']}, {result['csv']}, {result['md']}", file=sys.stdout)
    return 0
