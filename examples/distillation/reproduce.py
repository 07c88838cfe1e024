"""Tiny reproduction of random-teacher distillation ("Reduce, Reuse, Recycle", Blakeney et al. 2022).

1. Three teachers (two small ResNets and a small VGG, 73k-175k parameters) are trained on a 20k-image subset of
   Fashion-MNIST with ``yamls/distillation/teacher_*.yaml`` (cached: skipped when ``<out>/<teacher>/done.json``
   matches the config).
2. For each seed, the same small student (a 6.3k-parameter VGG: one conv per stage, widths 8/16/32) is trained
   twice for 600 steps of 128 images at learning rate 0.02, with ``baseline.yaml`` and with ``kd.yaml`` (the
   baseline plus ``KnowledgeDistillation``: one random teacher of the 3 per step during the first 50% of
   training), evaluated on 2,000 test images every 25 steps.
3. The steps to a fixed target accuracy (0.80: just below every baseline's final accuracy, i.e. the paper's
   "steps to the baseline's quality") are compared: speed-up = baseline steps / KD steps (the paper reports up to
   1.96x for ResNet-50 on ImageNet). The summary also gives the speed-up at other targets, the steps for KD to
   reach each seed's own baseline final accuracy, and the training seconds to the target (KD steps include the
   teacher forward). ``examples/distillation/README.md`` has the measured numbers.

Run from the repository root::

    .venv/bin/python examples/distillation/reproduce.py --threads 1     # 12-20 min + teachers (~25 min), 2 busy cores
    .venv/bin/python examples/distillation/reproduce.py --seeds 0       # one seed, ~2.5 min once the teachers exist
    .venv/bin/python examples/distillation/reproduce.py --help

Prints one JSON object with the numbers (also written to ``<out>/results.json``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

YAMLS = ROOT / 'yamls' / 'distillation'
TEACHERS = ('teacher_resnet', 'teacher_vgg', 'teacher_resnet_shallow')
ACCURACY = 'metrics/test/MulticlassAccuracy'


def _run(yaml: Path, overrides: list[str]):
    """Build and fit a run config in this process; return (trainer, InMemoryLogger, seconds)."""
    from composer.loggers import InMemoryLogger

    from composer_ext.config import load_config
    from composer_ext.runner import build_trainer

    memory = InMemoryLogger()
    trainer = build_trainer(load_config(yaml, tuple(overrides)), extra_loggers=[memory])
    started = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - started
    trainer.close()
    return trainer, memory, seconds


def train_teachers(out: Path, train_samples: int, epochs: int, log=print) -> dict[str, dict]:
    """Train (or reuse) the three teachers; return ``{name: {'checkpoint', 'accuracy', 'seconds'}}``."""
    from composer_ext.core.provenance import file_sha256
    from composer_ext.runner import final_eval_metrics
    from composer_ext.storage import atomic_write_json

    teachers = {}
    for name in TEACHERS:
        yaml = YAMLS / f'{name}.yaml'
        params = {'yaml_sha256': file_sha256(yaml), 'train_samples': train_samples,
                  'epochs': epochs}
        folder = out / name
        checkpoint = folder / 'checkpoints' / 'latest-rank0.pt'
        record = folder / 'done.json'
        if record.exists() and checkpoint.exists() and json.loads(record.read_text()).get('params') == params:
            teachers[name] = json.loads(record.read_text())
            log(f'teacher {name}: cached (test accuracy {teachers[name]["accuracy"]:.4f})')
            continue
        log(f'teacher {name}: training {epochs} epochs on {train_samples} images ...')
        trainer, _, seconds = _run(yaml, [f'variables.train_samples={train_samples}', f'max_duration={epochs}ep',
                                          f'eval_interval={epochs}ep', f'save_interval={epochs}ep',
                                          f'save_folder={folder}/checkpoints'])
        accuracy = final_eval_metrics(trainer.state)[ACCURACY]
        teachers[name] = {'params': params, 'checkpoint': str(checkpoint), 'accuracy': accuracy, 'seconds': seconds}
        atomic_write_json(record, teachers[name])  # written last: a killed run retrains this teacher
        log(f'teacher {name}: test accuracy {accuracy:.4f} ({seconds:.0f} s)')
    return teachers


def train_student(kind: str, seed: int, out: Path, steps: int, train_samples: int, eval_interval: int,
                  kd_end: str, policy: str, extra: Sequence[str] = ()) -> dict:
    """One student run (``baseline`` or ``kd``); returns its accuracy curve, KD log and wall time.

    ``extra`` are more ``key=value`` overrides for both runs (e.g. ``optimizer.lr=0.05``).
    """
    overrides = [f'seed={seed}', f'variables.steps={steps}ba', f'variables.train_samples={train_samples}',
                 f'eval_interval={eval_interval}ba', f'run_name=kd_student_{kind}_seed{seed}', *extra]
    if kind == 'kd':
        overrides += [f'variables.teachers={out}', f'algorithms.knowledge_distillation.end={kd_end}',
                      f'algorithms.knowledge_distillation.policy={policy}',
                      f'algorithms.knowledge_distillation.seed={seed}', 'callbacks=null']
    _, memory, seconds = _run(YAMLS / f'{kind}.yaml', overrides)
    curve = [(int(ts.batch.value), float(value)) for ts, value in memory.data[ACCURACY]]
    # Composer's total_wct counts training time only (evaluation is paused out), teacher forwards included.
    train_seconds = [(int(ts.batch.value), ts.total_wct.total_seconds()) for ts, _ in memory.data[ACCURACY]]
    teachers_used = [int(v) for _, v in memory.data.get('kd/teacher', [])]
    forward = [float(v) for _, v in memory.data.get('kd/teacher_forward_time', [])]
    return {'curve': curve, 'train_seconds': train_seconds, 'seconds': seconds, 'final_accuracy': curve[-1][1],
            'teacher_counts': [teachers_used.count(i) for i in range(len(TEACHERS))] if teachers_used else None,
            'teacher_forward_seconds': sum(forward)}


def _ratio_of_mean_steps(baseline: list[Optional[int]], kd: list[Optional[int]]) -> Optional[float]:
    """Mean baseline steps / mean KD steps over the seeds; None when any run missed the target."""
    if not baseline or None in baseline or None in kd:
        return None
    return statistics.mean(baseline) / statistics.mean(kd)


def summarize(runs: dict[str, list[dict]], target: float) -> dict:
    """Steps (and training seconds) to ``target`` per seed and the speed-ups derived from them."""
    from composer_ext.distillation import steps_to_target

    steps = {kind: [steps_to_target(r['curve'], target) for r in results] for kind, results in runs.items()}
    per_seed = [b / k for b, k in zip(steps['baseline'], steps['kd']) if b is not None and k is not None]
    summary = {'target_accuracy': target, 'steps_to_target': steps}
    summary['speedup_mean_steps'] = _ratio_of_mean_steps(steps['baseline'], steps['kd'])  # None: a run missed it
    if summary['speedup_mean_steps'] is not None:
        summary['speedup_per_seed'] = per_seed
    summary['train_seconds_to_target'] = {
        kind: [None if step is None else dict(r['train_seconds'])[step] for r, step in zip(results, steps[kind])]
        for kind, results in runs.items()}
    # The paper's own measure: steps for KD to reach the quality the baseline ends at (each seed its own).
    finals = [r['final_accuracy'] for r in runs['baseline']]
    to_final = {kind: [steps_to_target(r['curve'], final) for r, final in zip(results, finals)]
                for kind, results in runs.items()}
    summary['steps_to_baseline_final'] = to_final
    summary['speedup_to_baseline_final_per_seed'] = [
        None if b is None or k is None else b / k for b, k in zip(to_final['baseline'], to_final['kd'])]
    # Other fixed targets, so that the chosen one can be seen in context (None: some run never reached it).
    grid = sorted({round(0.70 + 0.01 * i, 2) for i in range(16)} | {target})
    summary['speedup_mean_steps_by_target'] = {
        f'{t:g}': _ratio_of_mean_steps(*(
            [steps_to_target(r['curve'], t) for r in runs[kind]] for kind in ('baseline', 'kd'))) for t in grid}
    summary['final_accuracy'] = {kind: [r['final_accuracy'] for r in results] for kind, results in runs.items()}
    summary['wall_seconds'] = {kind: [r['seconds'] for r in results] for kind, results in runs.items()}
    return summary


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--out', type=Path, default=ROOT / 'runs' / 'distillation',
                        help='output directory (teacher checkpoints are cached here)')
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2, 3, 4], help='student seeds')
    parser.add_argument('--steps', type=int, default=600, help='student training steps (batch 128)')
    parser.add_argument('--target', type=float, default=0.80,
                        help="target test accuracy (0.80: just below the baselines' final accuracy, see README)")
    parser.add_argument('--train-samples', type=int, default=20000, help='Fashion-MNIST training subset')
    parser.add_argument('--teacher-epochs', type=int, default=3)
    parser.add_argument('--eval-interval', type=int, default=25, help='steps between evaluations')
    parser.add_argument('--kd-end', default='0.5dur', help='end of the distillation window')
    parser.add_argument('--policy', default='random', help='teacher policy (random, round_robin, ensemble, random_k)')
    parser.add_argument('--override', action='append', default=[], metavar='KEY=VALUE',
                        help='an override for both student runs, e.g. optimizer.lr=0.05 (repeatable)')
    parser.add_argument('--threads', type=int, default=1,
                        help='torch intra-op threads (1 is fastest for these small models, also on a busy machine)')
    args = parser.parse_args(argv)

    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731 -- stdout carries the JSON
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    teachers = train_teachers(args.out, args.train_samples, args.teacher_epochs, log)
    runs: dict[str, list[dict]] = {'baseline': [], 'kd': []}
    for seed in args.seeds:
        for kind in ('baseline', 'kd'):
            result = train_student(kind, seed, args.out, args.steps, args.train_samples, args.eval_interval,
                                   args.kd_end, args.policy, args.override)
            runs[kind].append(result)
            log(f'seed {seed} {kind:8s}: final accuracy {result["final_accuracy"]:.4f}, {result["seconds"]:.0f} s, '
                f'curve {[round(a, 3) for _, a in result["curve"]]}')
    summary = summarize(runs, args.target)
    results = {
        'summary': summary,
        'teachers': {name: {'accuracy': t['accuracy']} for name, t in teachers.items()},
        'runs': runs,
        'settings': {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        'total_seconds': time.perf_counter() - started,
        'torch_threads': torch.get_num_threads(),
    }
    from composer_ext.storage import atomic_write_json
    atomic_write_json(args.out / 'results.json', results)
    print(json.dumps({'summary': summary, 'teachers': results['teachers'],
                      'total_seconds': results['total_seconds']}, indent=2))
    return 0


if __name__ == '__main__':
    sys.exit(main())
