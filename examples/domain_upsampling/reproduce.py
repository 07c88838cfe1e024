"""Tiny reproduction of domain upsampling (Blakeney et al. 2024, *Does your data spark joy?*).

Trains the small GPT of ``yamls/domain_upsampling/`` twice for the same number of steps on the embedded
six-domain corpus: once on the natural mix throughout (``baseline.yaml``) and once with one domain upsampled
to half of every batch for the last 20% of training (``upsample.yaml``; ``math`` by default). Both runs share
the seed, the initial weights, the data order before the switch and the LR schedule (with its drop at the
switch). The claim: the upsampled domain's held-out loss ends lower than the baseline's.

    .venv/bin/python examples/domain_upsampling/reproduce.py                      # ~5 minutes on 2 idle CPU cores
    .venv/bin/python examples/domain_upsampling/reproduce.py --target code
    .venv/bin/python examples/domain_upsampling/reproduce.py --ci         # scaled down (CI_PRESET)
    .venv/bin/python examples/domain_upsampling/reproduce.py --max-duration 100ba  # a quick check (no claim)
    .venv/bin/python examples/domain_upsampling/reproduce.py --seeds 17 18 19 --targets math code   # ~21 minutes
    .venv/bin/python examples/domain_upsampling/reproduce.py --pool runs/du_seeds/*/results.json    # tables only

Prints a table of every domain's held-out cross-entropy and writes it as JSON (``--output``). Over several seeds
(``--seeds``; each seed changes the initial weights and the data order, and each upsampled run is compared with
the baseline of its own seed, trained once per seed), it pools the per-seed deltas (:func:`pool_results`): mean ±
sample standard deviation per domain and target, and calls a change real only where |mean| exceeds twice its
standard error.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOMAINS = ('code', 'dialogue', 'legal', 'math', 'prose', 'technical')
# ``--ci``: the same claim at a size that fits CI (tests/test_domain_upsampling_reproduction.py): both runs half as
# long (300 batches instead of 600; the upsampled window is still the last 20%, 60 batches). Any option given
# explicitly wins over the preset.
CI_PRESET = {'max_duration': '300ba', 'output': str(ROOT / 'runs' / 'du_reproduce_ci' / 'results.json')}


def _run(config: str, overrides: list[str], cache: Path | None) -> tuple[dict[str, float], float]:
    """Train one config; a finished run with the same overrides is read back from ``cache`` instead."""
    from composer_ext.runner import run  # lazy: composer loads in seconds, and `--help` needs none of it

    if cache is not None and cache.exists():
        stored = json.loads(cache.read_text())
        if stored.get('config') == config and stored.get('overrides') == overrides:
            return stored['losses'], stored['seconds']
    began = time.perf_counter()
    result = run(str(ROOT / 'yamls' / 'domain_upsampling' / config), tuple(overrides), stream=sys.stderr)
    seconds = time.perf_counter() - began
    result.trainer.close()
    losses = {key.split('/')[1]: value for key, value in result.eval_metrics.items()
              if key.endswith('/LanguageCrossEntropy')}
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({'config': config, 'overrides': overrides, 'losses': losses,
                                     'seconds': seconds}, indent=2) + '\n')
    return losses, seconds


def reproduce(target: str = 'math', max_duration: str = '600ba', start: str = '0.8dur', seed: int = 17,
              output: str | Path | None = None, reuse: bool = False, stream=sys.stdout) -> dict:
    """Run the baseline and the upsampled run; return (and print) every domain's held-out loss.

    With ``reuse``, a run already finished with the same settings (next to ``output``) is not trained again.
    """
    if target not in DOMAINS:
        raise ValueError(f'target={target!r} is not a corpus domain. Fix: use one of {list(DOMAINS)}.')
    folder = Path(output).parent if output else ROOT / 'runs' / 'du_reproduce'
    common = [f'max_duration={max_duration}', f'eval_interval={max_duration}', f'seed={seed}',
              f'train_loader.seed={seed}', f'variables.start={start}', 'log_to_console=false']
    upsampled_mix = [f'algorithms.domain_upsampling.target.{d}={0.5 if d == target else 0.1}' for d in DOMAINS]
    baseline, baseline_seconds = _run('baseline.yaml', common + [
        'run_name=du_reproduce_baseline', f'loggers.file.filename={folder}/baseline/log.txt'],
        folder / 'baseline.json' if reuse else None)
    upsampled, upsampled_seconds = _run('upsample.yaml', common + upsampled_mix + [
        'run_name=du_reproduce_upsampled', f'loggers.file.filename={folder}/upsampled_{target}/log.txt'],
        folder / f'upsampled_{target}.json' if reuse else None)
    result = {
        'target': target, 'max_duration': max_duration, 'start': start, 'seed': seed,
        'held_out_cross_entropy': {'baseline': baseline, 'upsampled': upsampled},
        'seconds': {'baseline': round(baseline_seconds, 1), 'upsampled': round(upsampled_seconds, 1)},
        'target_improved': upsampled[target] < baseline[target],
    }
    lines = [f'Held-out cross-entropy after {max_duration} (seed {seed}; {target} upsampled to 50% from {start}):',
             f'{"domain":<10} {"baseline":>10} {"upsampled":>10} {"delta":>9}']
    for domain in DOMAINS:
        marker = '  <- upsampled' if domain == target else ''
        lines.append(f'{domain:<10} {baseline[domain]:>10.4f} {upsampled[domain]:>10.4f} '
                     f'{upsampled[domain] - baseline[domain]:>+9.4f}{marker}')
    mean_base = sum(baseline.values()) / len(baseline)
    mean_up = sum(upsampled.values()) / len(upsampled)
    lines.append(f'{"mean":<10} {mean_base:>10.4f} {mean_up:>10.4f} {mean_up - mean_base:>+9.4f}')
    lines.append(f'{target} held-out loss {"IS" if result["target_improved"] else "is NOT"} lower with upsampling '
                 f'({upsampled[target]:.4f} vs {baseline[target]:.4f}); runs took {baseline_seconds:.0f}s and '
                 f'{upsampled_seconds:.0f}s.')
    print('\n'.join(lines), file=stream, flush=True)
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(result, indent=2) + '\n')
    return result


def pool_results(results: list[dict]) -> dict:
    """Pool per-seed results (what :func:`reproduce` returns) by target: every domain's delta over the seeds.

    For each target and domain: the deltas (upsampled - baseline held-out cross-entropy, one per seed), their
    ``mean``, sample standard deviation ``sd`` (0 for one seed), standard error ``se = sd / sqrt(n)`` and ``real``:
    ``|mean| > 2 se`` with at least 2 seeds. ``claim`` (per target): the target's mean delta is negative and real,
    and below every other domain's mean delta.

    Example:
        >>> row = {'code': 5.0, 'dialogue': 5.0, 'legal': 5.0, 'math': 5.0, 'prose': 5.0, 'technical': 5.0}
        >>> runs = [{'target': 'math', 'seed': s, 'held_out_cross_entropy': {'baseline': row,
        ...          'upsampled': {**row, 'math': 5.0 + d}}} for s, d in ((1, -0.08), (2, -0.07), (3, -0.06))]
        >>> pooled = pool_results(runs)['math']
        >>> round(pooled['domains']['math']['mean'], 4), round(pooled['domains']['math']['sd'], 4), pooled['claim']
        (-0.07, 0.01, True)
    """
    by_target: dict[str, list[dict]] = {}
    for result in results:
        by_target.setdefault(result['target'], []).append(result)
    pooled = {}
    for target, runs in sorted(by_target.items()):
        seeds = [run['seed'] for run in runs]
        if len(set(seeds)) != len(seeds):
            raise ValueError(f'target={target!r} has seeds {seeds}: each seed must appear once. Fix: pool one result '
                             f'per (seed, target).')
        domains = {}
        for domain in DOMAINS:
            deltas = [run['held_out_cross_entropy']['upsampled'][domain] - run['held_out_cross_entropy']['baseline'][
                domain] for run in runs]
            mean = statistics.fmean(deltas)
            sd = statistics.stdev(deltas) if len(deltas) > 1 else 0.0
            se = sd / math.sqrt(len(deltas))
            domains[domain] = {'deltas': deltas, 'mean': mean, 'sd': sd, 'se': se,
                               'real': len(deltas) > 1 and abs(mean) > 2 * se}
        mine = domains[target]
        claim = mine['real'] and mine['mean'] < 0 and all(mine['mean'] < domains[d]['mean'] for d in DOMAINS
                                                          if d != target)
        pooled[target] = {'seeds': sorted(seeds), 'domains': domains, 'claim': claim}
    return pooled


def pooled_table(pooled: dict) -> str:
    """A markdown table (domain x target: mean ± sd of the delta, * where real) and one summary line per target."""
    targets = list(pooled)
    lines = ['| domain | ' + ' | '.join(f'Δ, {t} upsampled (n={len(pooled[t]["seeds"])})' for t in targets) + ' |',
             '|---|' + '---|' * len(targets)]
    for domain in DOMAINS:
        cells = []
        for target in targets:
            stats = pooled[target]['domains'][domain]
            cell = f'{stats["mean"]:+.4f} ± {stats["sd"]:.4f}{" *" if stats["real"] else ""}'
            cells.append(f'**{cell}**' if domain == target else cell)
        lines.append(f'| {domain} | ' + ' | '.join(cells) + ' |')
    for target in targets:
        stats = pooled[target]['domains'][target]
        lines.append(f'{target}: upsampled domain delta {stats["mean"]:+.4f} ± {stats["sd"]:.4f} over seeds '
                     f'{pooled[target]["seeds"]}; claim {"HOLDS" if pooled[target]["claim"] else "does NOT hold"}')
    return '\n'.join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--target', default='math', choices=DOMAINS, help='the domain to upsample (default: math)')
    parser.add_argument('--max-duration', default='600ba', help='steps of both runs (default: 600ba)')
    parser.add_argument('--start', default='0.8dur', help='when the upsampling (and the LR drop) starts')
    parser.add_argument('--seed', type=int, default=17)
    parser.add_argument('--output', default=str(ROOT / 'runs' / 'du_reproduce' / 'results.json'),
                        help='where to write the JSON result')
    parser.add_argument('--reuse', action='store_true', help='read back runs already finished with these settings')
    parser.add_argument('--seeds', type=int, nargs='+', help='run every seed (and --targets) and pool the deltas')
    parser.add_argument('--targets', nargs='+', choices=DOMAINS, help='with --seeds: the targets (default: --target)')
    parser.add_argument('--pool', nargs='+', metavar='RESULTS_JSON', help='only pool finished results.json files')
    parser.add_argument('--ci', action='store_true',
                        help=f'the scaled-down run (pytest -m reproduction): {CI_PRESET} unless given explicitly')
    args = parser.parse_args(argv)
    if args.ci:  # the preset replaces the defaults only: what the command line gives explicitly still wins
        parser.set_defaults(**CI_PRESET)
        args = parser.parse_args(argv)
    if args.pool or args.seeds:
        if args.pool:
            results = [json.loads(Path(path).read_text()) for path in args.pool]
        else:
            folder = Path(args.output).parent
            # one folder per seed: its baseline is trained once (--reuse) and compared with every target's run
            results = [reproduce(target, args.max_duration, args.start, seed, folder / f'seed{seed}' /
                                 f'{target}.json', reuse=True) for seed in args.seeds
                       for target in (args.targets or [args.target])]
        pooled = pool_results(results)
        print(pooled_table(pooled), flush=True)
        pooled_path = Path(args.output).parent / 'pooled.json'
        pooled_path.parent.mkdir(parents=True, exist_ok=True)
        pooled_path.write_text(json.dumps(pooled, indent=2) + '\n')
        return 0 if all(entry['claim'] for entry in pooled.values()) else 1
    result = reproduce(args.target, args.max_duration, args.start, args.seed, args.output, reuse=args.reuse)
    return 0 if result['target_improved'] else 1


if __name__ == '__main__':
    sys.exit(main())
