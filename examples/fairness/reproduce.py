"""Reproduce "Simon Says" in miniature: pruning induces class-wise bias (CEV/SDE), distillation mitigates it.

Runs, with the YAMLs in yamls/fairness/ and ``composer-ext``:

1. ``teacher.yaml``: a small VGG on Fashion-MNIST (skipped when its checkpoint exists);
2. for every sparsity, ``prune.yaml`` (gradual magnitude pruning + cross-entropy) and ``prune_kd.yaml`` (the same
   + knowledge distillation from the dense teacher), each fine-tuned from the teacher and probed against it by
   ``BiasProbe`` on the 10,000 test images;
3. ``composer-ext report bias`` over all pruned runs,

then prints one JSON object: the report rows and the checks of the paper's claims (CEV and SDE rise with
sparsity; at high sparsity prune + KD has the lower CEV; the sign of the CEV-similarity correlation).

    .venv/bin/python examples/fairness/reproduce.py                     # everything, in runs/
    .venv/bin/python examples/fairness/reproduce.py --jobs 2 --runs /tmp/fairness
    .venv/bin/python examples/fairness/reproduce.py --seeds 17,18,19   # three trials per configuration, pooled
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, '-m', 'composer_ext.cli']


def _run(args: list[str], log: Path) -> float:
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, 'w') as handle:
        proc = subprocess.run(CLI + args, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f'{" ".join(args)} failed (exit {proc.returncode}); see {log}')
    return time.perf_counter() - start


def _rises(values: list[float]) -> bool:
    return all(b > a for a, b in zip(values, values[1:]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--runs', default='runs', help='directory for all runs (YAML variables.runs)')
    parser.add_argument('--sparsities', default='0.5,0.75,0.9,0.95', help='comma-separated target sparsities')
    parser.add_argument('--high', type=float, default=0.9, help='sparsities >= this count as "high"')
    parser.add_argument('--jobs', type=int, default=1, help='pruning runs to execute at once (one process each)')
    parser.add_argument('--seeds', default='17',
                        help='comma-separated seeds of the pruning runs; with several, every (yaml, sparsity) runs '
                             'once per seed and the report pools the trials (summed confusion matrices)')
    parser.add_argument('--rerun', action='store_true',
                        help='rerun pruning runs that finished before (default: skip them, so a killed reproduction '
                             'resumes where it stopped)')
    parser.add_argument('--retrain-teacher', action='store_true',
                        help='train the teacher even if its checkpoint exists')
    parser.add_argument('overrides', nargs='*', metavar='key=value',
                        help='extra overrides for the pruning runs, e.g. max_duration=100ba')
    args = parser.parse_args(argv)
    runs = Path(args.runs).resolve()
    sparsities = [float(s) for s in args.sparsities.split(',')]
    timings = {}

    teacher = runs / 'fairness_teacher' / 'checkpoints' / 'latest-rank0.pt'
    if args.retrain_teacher or not teacher.exists():
        timings['teacher_s'] = _run(['run', 'yamls/fairness/teacher.yaml', f'variables.runs={runs}'],
                                    runs / 'fairness_logs' / 'teacher.out')

    seeds = [int(s) for s in args.seeds.split(',')]
    jobs = [(yaml, sparsity, seed) for sparsity in sparsities for yaml in ('prune', 'prune_kd') for seed in seeds]

    def name_of(yaml: str, sparsity: float, seed: int) -> str:
        # One seed keeps the YAML's run name; several get one run directory per seed (the report's trials).
        return f'fairness_{yaml}_{sparsity}' + (f'_s{seed}' if len(seeds) > 1 else '')

    def one(job):
        yaml, sparsity, seed = job
        name = name_of(*job)
        command = ['run', f'yamls/fairness/{yaml}.yaml', f'variables.runs={runs}', f'variables.sparsity={sparsity}',
                   f'seed={seed}', f'train_loader.seed={seed}', f'run_name={name}', *args.overrides]
        done = runs / 'fairness_logs' / f'{name}.done.json'
        if done.exists() and not args.rerun:
            # Finished earlier with the same command (the marker is written only after the run exits 0): skip it,
            # so that a killed reproduction resumes where it stopped.
            marker = json.loads(done.read_text())
            if marker.get('command') == command:
                return name, marker['seconds']
        seconds = _run(command, runs / 'fairness_logs' / f'{name}.out')
        done.write_text(json.dumps({'command': command, 'seconds': seconds}) + '\n')
        return name, seconds

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        timings.update({f'{name}_s': seconds for name, seconds in pool.map(one, jobs)})

    run_dirs = [str(runs / name_of(*job)) for job in jobs]
    report = runs / 'fairness_bias_report'
    _run(['report', 'bias', *run_dirs, '--out', str(report)], runs / 'fairness_logs' / 'report.out')
    summary = json.loads((report / 'bias_report.json').read_text())
    rows = summary['rows']

    def series(group: str, key: str) -> list[float]:
        return [r[key] for r in sorted((r for r in rows if r['group'] == group), key=lambda r: r['sparsity'])]

    high = [s for s in sparsities if s >= args.high]
    by = {(r['group'], r['sparsity']): r for r in rows}
    checks = {
        'cev_rises_with_sparsity': {g: _rises(series(g, 'cev')) for g in ('prune', 'prune+KD')},
        'sde_rises_with_sparsity': {g: _rises(series(g, 'sde')) for g in ('prune', 'prune+KD')},
        'kd_lower_cev_at_high_sparsity': {str(s): by[('prune+KD', s)]['cev'] < by[('prune', s)]['cev'] for s in high},
        'kd_lower_sde_at_high_sparsity': {str(s): by[('prune+KD', s)]['sde'] < by[('prune', s)]['sde'] for s in high},
        'pearson_cev_vs_similarity': summary['pearson_cev'],
    }
    table = [{k: r.get(k) for k in ('group', 'sparsity', 'n_trials', 'cev_trial_sd', 'sde_trial_sd', 'accuracy', 'cev', 'cev_ci_low', 'cev_ci_high', 'sde',
                                    'sde_ci_low', 'sde_ci_high', 'n_masked', 'agreement', 'kl', 'cka/logits',
                                    'cka/module.features.2', 'cka/module.features.4')} for r in rows]
    result = {'reference_accuracy': rows[0]['reference_accuracy'], 'rows': table, 'checks': checks,
              'timings_s': timings, 'report': str(report)}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == '__main__':
    sys.exit(main())
