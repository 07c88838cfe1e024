"""Tiny reproduction of domain upsampling (Blakeney et al. 2024, *Does your data spark joy?*).

Trains the small GPT of ``yamls/domain_upsampling/`` twice for the same number of steps on the embedded
six-domain corpus: once on the natural mix throughout (``baseline.yaml``) and once with one domain upsampled
to half of every batch for the last 20% of training (``upsample.yaml``; ``math`` by default). Both runs share
the seed, the initial weights, the data order before the switch and the LR schedule (with its drop at the
switch). The claim: the upsampled domain's held-out loss ends lower than the baseline's.

    .venv/bin/python examples/domain_upsampling/reproduce.py                      # ~6 minutes on 2 idle CPU cores
    .venv/bin/python examples/domain_upsampling/reproduce.py --target code
    .venv/bin/python examples/domain_upsampling/reproduce.py --ci         # scaled down (CI_PRESET)
    .venv/bin/python examples/domain_upsampling/reproduce.py --max-duration 100ba  # a quick check (no claim)

Prints a table of every domain's held-out cross-entropy and writes it as JSON (``--output``).
"""

from __future__ import annotations

import argparse
import json
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
        'run_name=du_reproduce_upsampled', f'loggers.file.filename={folder}/upsampled/log.txt'],
        folder / 'upsampled.json' if reuse else None)
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--target', default='math', choices=DOMAINS, help='the domain to upsample (default: math)')
    parser.add_argument('--max-duration', default='600ba', help='steps of both runs (default: 600ba)')
    parser.add_argument('--start', default='0.8dur', help='when the upsampling (and the LR drop) starts')
    parser.add_argument('--seed', type=int, default=17)
    parser.add_argument('--output', default=str(ROOT / 'runs' / 'du_reproduce' / 'results.json'),
                        help='where to write the JSON result')
    parser.add_argument('--reuse', action='store_true', help='read back runs already finished with these settings')
    parser.add_argument('--ci', action='store_true',
                        help=f'the scaled-down run (pytest -m reproduction): {CI_PRESET} unless given explicitly')
    args = parser.parse_args(argv)
    if args.ci:  # the preset replaces the defaults only: what the command line gives explicitly still wins
        parser.set_defaults(**CI_PRESET)
        args = parser.parse_args(argv)
    result = reproduce(args.target, args.max_duration, args.start, args.seed, args.output, reuse=args.reuse)
    return 0 if result['target_improved'] else 1


if __name__ == '__main__':
    sys.exit(main())
