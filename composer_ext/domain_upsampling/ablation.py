"""``composer-ext ablate CONFIG [key=value ...] --checkpoint CKPT``: drop-one-domain anneals from one checkpoint.

Blakeney et al. 2024 measure what each dataset is worth by removing it from the upsampled mix during the
final phase only, which costs a short anneal instead of a full pretraining run. This command runs, from one
checkpoint saved at (or before) the upsampling start, the anneal with the full upsampled mix and one anneal
per left-out domain (its target weight set to 0, the others rescaled), sequentially in this process (every
rank runs them together under ``composer -n N -m composer_ext.cli ablate ...``). It writes:

- ``ablation.csv``: one row per anneal and eval label: the metric, and its delta against the full mix;
- ``ablation.png``: a heatmap of the deltas (rows: left-out domain, columns: eval label);
- ``results/<anneal>.json``: each finished anneal's metrics, so a rerun skips finished anneals.

A positive delta of a loss means the model got worse without the domain: the domain was useful there.

Overrides go right after the config (before the options), as argparse reads positionals first:
``composer-ext ablate yamls/domain_upsampling/ablate.yaml max_duration=300ba --checkpoint CKPT``.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import gc
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

from composer_ext.config import ConfigError, RunConfig, load_config
from composer_ext.core.provenance import bytes_sha256
from composer_ext.domain_upsampling.algorithm import DomainUpsampling
from composer_ext.runner import build_trainer, final_eval_metrics, resolve_device
from composer_ext.storage import atomic_write_bytes, atomic_write_json

__all__ = ['AblationResult', 'configure_parser', 'cli_main', 'drop_domain', 'run_ablation']

ALGORITHM = 'domain_upsampling'
FULL = 'full'


def drop_domain(section: dict, domain: str) -> dict:
    """A copy of a ``domain_upsampling`` YAML section whose target mix leaves ``domain`` out (rest rescaled)."""
    target = dict(section.get('target') or {})
    if target.get(domain, 0) <= 0:
        raise ValueError(f'domain={domain!r} has no weight in the target mix {target!r}, so there is nothing to drop. '
                         f'Fix: choose one of {[d for d, w in target.items() if w > 0]}.')
    target[domain] = 0.0
    if sum(target.values()) <= 0:
        raise ValueError(f'dropping {domain!r} leaves the target mix {section.get("target")!r} empty. Fix: ablate a '
                         f'mix with at least two upsampled domains.')
    return {**copy.deepcopy(section), 'target': target, 'normalize': True}


@dataclass
class AblationResult:
    """What :func:`run_ablation` measured: ``values[anneal][label]`` and ``deltas[domain][label]`` (vs full)."""

    metric: str
    values: dict[str, dict[str, float]]
    deltas: dict[str, dict[str, float]]
    csv_path: Path
    png_path: Path

    def markdown(self) -> str:
        labels = sorted({label for row in self.values.values() for label in row})
        lines = ['| left out | ' + ' | '.join(labels) + ' |', '|---|' + '---|' * len(labels),
                 f'| (none: {FULL} mix) | ' + ' | '.join(f'{self.values[FULL].get(x, float("nan")):.4f}'
                                                       for x in labels) + ' |']
        for domain, row in self.deltas.items():
            lines.append(f'| {domain} | ' + ' | '.join(f'{row.get(x, float("nan")):+.4f}' for x in labels) + ' |')
        return '\n'.join(lines)


class _StartCheck(Callback):
    """Stop before training when the checkpoint is already past the upsampling start."""

    def __init__(self, checkpoint: str):
        self.checkpoint = checkpoint

    def fit_start(self, state: State, logger: Logger) -> None:
        algorithm = next(a for a in state.algorithms if isinstance(a, DomainUpsampling))
        position = algorithm.sample_position(state)
        if algorithm.start_sample is not None and position > algorithm.start_sample:
            raise ConfigError('--checkpoint', '', f'{self.checkpoint} is at global sample {position} (batch '
                              f'{int(state.timestamp.batch)}), after the upsampling start (sample '
                              f'{algorithm.start_sample}), so the anneals would miss part of the upsampled phase.',
                              'use a checkpoint saved at or before the upsampling start (e.g. save_interval at the '
                              'start of a run of the same config).')


def _fingerprint(config: RunConfig, checkpoint: str) -> str:
    fields = {k: v for k, v in dataclasses.asdict(config).items() if k != 'source'}
    path = Path(checkpoint)
    stamp = [path.stat().st_size, path.stat().st_mtime_ns] if path.exists() else None
    # default=str (which json_sha256 does not take): a config value that is not JSON still gets a stable digest
    payload = json.dumps({'config': fields, 'checkpoint': checkpoint, 'stamp': stamp}, sort_keys=True, default=str)
    return bytes_sha256(payload.encode())


def _variants(config: RunConfig, domains: Optional[Sequence[str]]) -> dict[str, Optional[str]]:
    section = (config.algorithms or {}).get(ALGORITHM)
    if section is None:
        raise ConfigError(config.source, 'algorithms', f'ablate needs a {ALGORITHM} algorithm (the upsampled mix to '
                          'ablate), and this config has none.', f'add `algorithms: {{{ALGORITHM}: {{base: ..., '
                          'target: ..., start: 0.8dur}}}}`.')
    target = section.get('target') or {}
    upsampled = [d for d, w in target.items() if w > 0]
    chosen = list(domains) if domains else upsampled
    unknown = [d for d in chosen if d not in upsampled]
    if unknown:
        raise ConfigError(config.source, f'algorithms.{ALGORITHM}.target', f'--domains {unknown} are not in the target '
                          f'mix with a positive weight.', f'choose from {upsampled}.')
    if len(upsampled) < 2:
        raise ConfigError(config.source, f'algorithms.{ALGORITHM}.target', f'the target mix {target!r} has fewer than '
                          'two domains, so none can be left out.', 'ablate a mix of at least two domains.')
    if not config.eval_loaders:
        raise ConfigError(config.source, 'eval_loaders', 'ablate compares eval metrics, and the config has no '
                          'eval_loaders.', 'add e.g. `eval_loaders: [{name: text_evaluators, domains: all, '
                          'batch_size: 32}]`.')
    return {FULL: None, **{f'drop_{d}': d for d in chosen}}


def _variant_config(config: RunConfig, name: str, domain: Optional[str], checkpoint: str) -> RunConfig:
    algorithms = copy.deepcopy(config.algorithms or {})
    if domain is not None:
        algorithms[ALGORITHM] = drop_domain(algorithms[ALGORITHM], domain)
    return dataclasses.replace(config, run_name=f'{config.run_name or "ablate"}-{name}', load_path=checkpoint,
                               autoresume=False, save_folder=None, algorithms=algorithms)


def _anneal(config: RunConfig, checkpoint: str, metric: str) -> dict[str, float]:
    trainer = build_trainer(config)
    try:
        trainer.state.callbacks.append(_StartCheck(checkpoint))
        trainer.fit()
        found = final_eval_metrics(trainer.state)
    finally:
        trainer.close()
        del trainer
        gc.collect()
    values = {key.split('/')[1]: value for key, value in found.items() if key.split('/', 2)[2] == metric}
    if not values:
        names = sorted({key.split('/', 2)[2] for key in found})
        raise ConfigError(config.source, 'eval_loaders', f'no eval metric named {metric!r} was computed (found '
                          f'{names}).', 'pass --metric with one of those names.')
    return values


def _write_png(result_deltas: dict[str, dict[str, float]], metric: str, path: Path) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import numpy as np

    rows = list(result_deltas)
    labels = sorted({label for row in result_deltas.values() for label in row})
    grid = np.array([[result_deltas[r].get(x, np.nan) for x in labels] for r in rows])
    bound = float(np.nanmax(np.abs(grid))) if np.isfinite(grid).any() else 1.0
    figure, axes = plt.subplots(figsize=(1.2 + 1.1 * len(labels), 1.0 + 0.55 * len(rows)))
    image = axes.imshow(grid, cmap='RdBu_r', vmin=-bound or -1, vmax=bound or 1, aspect='auto')
    axes.set_xticks(range(len(labels)), labels, rotation=30, ha='right')
    axes.set_yticks(range(len(rows)), [f'without {r}' for r in rows])
    for i in range(len(rows)):
        for j in range(len(labels)):
            if np.isfinite(grid[i, j]):
                axes.text(j, i, f'{grid[i, j]:+.3f}', ha='center', va='center', fontsize=8)
    axes.set_xlabel('eval set')
    axes.set_title(f'{metric}: anneal without a domain minus the full upsampled mix', fontsize=9)
    figure.colorbar(image, ax=axes, shrink=0.8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format='png', dpi=120)
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())


def _write_csv(values: dict[str, dict[str, float]], variants: dict[str, Optional[str]], metric: str,
               path: Path) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator='\n')
    writer.writerow(['anneal', 'left_out', 'eval', 'metric', 'value', 'delta_vs_full'])
    for name, domain in variants.items():
        for label in sorted(values[name]):
            delta = values[name][label] - values[FULL][label] if label in values[FULL] else float('nan')
            writer.writerow([name, domain or '', label, metric, f'{values[name][label]:.6f}', f'{delta:.6f}'])
    atomic_write_bytes(path, buffer.getvalue().encode())


def run_ablation(config: str | Path | RunConfig, checkpoint: str, domains: Optional[Sequence[str]] = None,
                 output: Optional[str | Path] = None, overrides: Sequence[str] = (),
                 metric: str = 'LanguageCrossEntropy', force: bool = False, stream=None) -> AblationResult:
    """Run the full-mix anneal and one anneal per left-out domain from ``checkpoint``; write CSV + PNG.

    Args:
        config: A run YAML (or :class:`RunConfig`) with a ``domain_upsampling`` algorithm and eval loaders;
            its ``max_duration`` is the end of the anneals (the checkpoint is where they begin).
        checkpoint: A Composer checkpoint of a run of the same model and data, at or before the start.
        domains: Domains to leave out; default: every domain of the target mix.
        output: Folder for ``ablation.csv``, ``ablation.png`` and ``results/``; default
            ``runs/ablate/<run_name>``.
        overrides: ``key=value`` overrides applied to a YAML ``config``.
        metric: The eval metric to compare (``metrics/<label>/<metric>``).
        force: Rerun anneals whose results are already in ``output``.
        stream: Where the table is printed (rank 0); default: the current ``sys.stdout``.
    """
    if not isinstance(config, RunConfig):
        config = load_config(config, overrides)
    if '://' not in checkpoint and not Path(checkpoint).is_file():
        raise ConfigError('--checkpoint', '', f'{checkpoint!r} is not a file.', 'pass the path of a Composer '
                          'checkpoint (e.g. runs/<run>/checkpoints/ep0-ba480-rank0.pt).')
    variants = _variants(config, domains)
    folder = Path(output) if output is not None else Path('runs') / 'ablate' / (config.run_name or 'ablate')
    dist.initialize_dist(resolve_device(config.device), timeout=config.dist_timeout)
    rank_zero = dist.get_global_rank() == 0

    values: dict[str, dict[str, float]] = {}
    for name, domain in variants.items():
        variant = _variant_config(config, name, domain, checkpoint)
        cache = folder / 'results' / f'{name}.json'
        fingerprint = _fingerprint(variant, checkpoint)
        cached = None
        if not force and cache.exists():
            stored = json.loads(cache.read_text())
            cached = stored['values'] if stored.get('fingerprint') == fingerprint and \
                stored.get('metric') == metric else None
        cached = dist.all_gather_object(cached)[0]  # every rank follows rank 0's reading of the cache
        if cached is None:
            cached = _anneal(variant, checkpoint, metric)
            if rank_zero:
                atomic_write_json(cache, {'anneal': name, 'left_out': domain, 'metric': metric,
                                          'fingerprint': fingerprint, 'values': cached})
        values[name] = cached
    deltas = {domain: {label: value - values[FULL][label] for label, value in values[name].items()
                       if label in values[FULL]}
              for name, domain in variants.items() if domain is not None}
    result = AblationResult(metric=metric, values=values, deltas=deltas, csv_path=folder / 'ablation.csv',
                            png_path=folder / 'ablation.png')
    if rank_zero:
        _write_csv(values, variants, metric, result.csv_path)
        _write_png(deltas, metric, result.png_path)
        print(f'\nDrop-one-domain ablation ({metric}; deltas vs the full upsampled mix, positive = the domain '
              f'helped):\n{result.markdown()}\n\nwrote {result.csv_path} and {result.png_path}',
              file=stream or sys.stdout, flush=True)
    return result


def configure_parser(parser) -> None:
    """Arguments of ``composer-ext ablate``."""
    parser.add_argument('config', help='the anneal YAML: a run config with a domain_upsampling algorithm')
    parser.add_argument('overrides', nargs='*', metavar='key=value',
                        help='dotted overrides, as for `run`; write them before the options')
    parser.add_argument('--checkpoint', required=True, help='Composer checkpoint at (or before) the upsampling start')
    parser.add_argument('--domains', nargs='+', default=None, help='domains to leave out (default: every domain of '
                        'the target mix)')
    parser.add_argument('--output', default=None, help='output folder (default: runs/ablate/<run_name>)')
    parser.add_argument('--metric', default='LanguageCrossEntropy', help='eval metric to compare')
    parser.add_argument('--force', action='store_true', help='rerun anneals that already have results')


def cli_main(args) -> int:
    run_ablation(args.config, args.checkpoint, domains=args.domains, output=args.output,
                 overrides=tuple(args.overrides), metric=args.metric, force=args.force)
    return 0
