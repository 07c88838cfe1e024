"""The blockwise report: one JSON file and one PNG figure.

The JSON (``report.json``) holds, per block, its loss curve and final MSE, teacher and student parameters
and MACs, its solo accuracy drop, its rank and its training seconds; for the whole model the parameters and
FLOPs of teacher and student, the accuracy of the teacher, of the stitched student and of the finetuned
student, the activation-cache decision of every block (size estimate, disk or on the fly, and why), and
the wall-clock of the block stage: the latest session's parallel wall time, per-rank busy time, the
seconds its blocks took (their sum is what one worker would spend on them one after another) and the
load-balance efficiency, plus the measured 1-rank vs N-rank wall times when both kinds of session trained
every block (``block_stage_w<N>.json``). The PNG (``report.png``) draws the same numbers in six panels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from composer_ext.storage import atomic_write_bytes, atomic_write_json

__all__ = ['plot_report', 'write_report']


def write_report(report: dict, folder: str | Path) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.png`` into ``folder`` (atomically); return their paths."""
    folder = Path(folder)
    json_path, png_path = folder / 'report.json', folder / 'report.png'
    atomic_write_json(json_path, report)
    atomic_write_bytes(png_path, plot_report(report))
    return json_path, png_path


def _short(path: str) -> str:
    return path.removeprefix('module.')


def plot_report(report: dict) -> bytes:
    """The six-panel PNG of a report, as bytes."""
    import io

    import matplotlib
    matplotlib.use('Agg', force=False)
    import matplotlib.pyplot as plt

    blocks: dict[str, Any] = report.get('blocks', {})
    names = list(blocks)
    labels = [_short(n) for n in names]
    figure, axes = plt.subplots(2, 3, figsize=(17, 9.5))
    figure.suptitle(f'Blockwise distillation: {report.get("run_name", "")} ({report.get("world_size", 1)} rank(s))')

    ax = axes[0, 0]
    for name, label in zip(names, labels):
        history = blocks[name].get('history') or []
        if history:
            ax.plot([h[0] for h in history], [h[1] for h in history], label=label)
    ax.set(title='Per-block training loss (MSE to the teacher block)', xlabel='step', ylabel='MSE', yscale='log')
    if names:
        ax.legend(fontsize=7)

    ax = axes[0, 1]
    relative = [blocks[n].get('val_relative_mse') or 0.0 for n in names]
    drops = [100 * (blocks[n].get('solo_drop') or 0.0) for n in names]
    positions = range(len(names))
    ax.bar([p - 0.2 for p in positions], relative, width=0.4, label='final val MSE / target variance')
    twin = ax.twinx()
    twin.bar([p + 0.2 for p in positions], drops, width=0.4, color='tab:red', label='solo accuracy drop (points)')
    ax.set_xticks(list(positions), labels, rotation=45, ha='right', fontsize=7)
    ax.set(title='Final block MSE and solo accuracy drop', ylabel='relative MSE')
    twin.set_ylabel('accuracy drop (points)')
    ax.legend(loc='upper left', fontsize=7)
    twin.legend(loc='upper right', fontsize=7)

    ax = axes[0, 2]
    teacher, student = report.get('teacher', {}), report.get('student', {})
    values = [[teacher.get('params', 0) / 1e3, student.get('params', 0) / 1e3],
              [2 * teacher.get('macs_per_sample', 0) / 1e6, 2 * student.get('macs_per_sample', 0) / 1e6]]
    for offset, (kind, color) in enumerate((('teacher', 'tab:blue'), ('student', 'tab:green'))):
        heights = [values[0][offset], values[1][offset]]
        bars = ax.bar([i + (offset - 0.5) * 0.4 for i in range(2)], heights, width=0.4, color=color, label=kind)
        for bar, height in zip(bars, heights):
            ax.annotate(f'{height:.3g}', (bar.get_x() + bar.get_width() / 2, height), ha='center', va='bottom',
                        fontsize=8)
    ax.set_xticks([0, 1], ['parameters (thousands)', 'MFLOPs per sample'])
    ax.set(title='Model size and compute', yscale='log')
    ax.legend(fontsize=7)

    ax = axes[1, 0]
    accuracy = report.get('accuracy', {})
    kinds = [k for k in ('teacher', 'stitched', 'finetuned') if accuracy.get(k) is not None]
    bars = ax.bar(kinds, [100 * accuracy[k] for k in kinds], color=['tab:blue', 'tab:orange', 'tab:green'][:len(kinds)])
    for bar, kind in zip(bars, kinds):
        ax.annotate(f'{100 * accuracy[kind]:.2f}', (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha='center', va='bottom', fontsize=8)
    ax.set(title='Accuracy (eval data)', ylabel='accuracy (%)', ylim=(0, 100))

    ax = axes[1, 1]
    wall = report.get('wallclock', {})
    per_rank: dict[int, list] = {}
    for name in names:
        rank = blocks[name].get('rank')
        if rank is not None:
            per_rank.setdefault(rank, []).append((name, blocks[name].get('seconds') or 0.0))
    for rank, items in sorted(per_rank.items()):
        bottom = 0.0
        for name, seconds in items:
            ax.bar(rank, seconds, bottom=bottom, edgecolor='white')
            ax.annotate(_short(name), (rank, bottom + seconds / 2), ha='center', va='center', fontsize=6)
            bottom += seconds
    efficiency = wall.get('load_balance_efficiency')
    ax.set(title='Block seconds by the rank that trained them' +
           (f' (load balance {efficiency:.2f})' if efficiency else ''), xlabel='rank', ylabel='seconds')
    ax.set_xticks(sorted(per_rank) or [0])

    ax = axes[1, 2]
    kinds, seconds, colors = [], [], []
    measured = wall.get('measured_sequential_vs_parallel')
    if measured:  # real 1-rank and N-rank sessions that each trained every block
        kinds += ['measured\n1 rank', f'measured\n{measured["parallel_world_size"]} ranks']
        seconds += [measured['sequential_wall_seconds'], measured['parallel_wall_seconds']]
        colors += ['tab:gray', 'tab:purple']
    if wall.get('block_seconds_sum') is not None and wall.get('block_stage_wall_seconds') is not None:
        kinds += ['sum of block times\n(latest session)',
                  f'its wall\n({wall.get("world_size") or report.get("world_size", 1)} rank(s))']
        seconds += [wall['block_seconds_sum'], wall['block_stage_wall_seconds']]
        colors += ['silver', 'plum']
    ax.bar(kinds, seconds, color=colors)
    ax.tick_params(axis='x', labelsize=7)
    ratio = wall.get('sequential_over_parallel')
    title = 'Block-stage wall-clock'
    if measured and measured.get('speedup'):
        title += f' (measured speedup {measured["speedup"]:.2f}x)'
    elif ratio:
        title += f' (estimated {ratio:.2f}x)'
    ax.set(title=title, ylabel='seconds')

    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format='png', dpi=110)
    plt.close(figure)
    return buffer.getvalue()
