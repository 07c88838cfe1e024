"""Benchmark random-teacher knowledge distillation: step-time ratios and steps-to-target, side by side.

Step times (Fashion-MNIST batches of 128, a 1.4k-parameter VGG student, teachers = ResNets of 175k parameters),
each variant a persistent Trainer advanced by ``--steps`` optimizer steps per timed call, interleaved:

* ``random_of_4``      -- ``KnowledgeDistillation`` with a pool of 4 teachers, one drawn per step (``random``)
* ``one_teacher``      -- the same with a pool of 1
* ``ensemble_of_4``    -- all 4 teachers every step (``ensemble``)
* ``after_window``     -- ``KnowledgeDistillation`` whose window ended (``end='1ba'``; teachers released)
* ``baseline``         -- the student without the algorithm

Ratios: ``random_of_4 / one_teacher`` (goal <= 1.05: a pool costs one teacher forward per step),
``ensemble_of_4 / one_teacher`` (what the random policy saves), ``after_window / baseline`` (goal <= 1.05: nothing
runs after the window). Then ``steps_to_target baseline / KD``: the reproduction of
``examples/distillation/reproduce.py`` (teachers cached in ``--out``, trained first if missing) with ``--seeds``.

    .venv/bin/python benchmarks/bench_distillation.py                       # about 4 minutes on 2 idle cores
    .venv/bin/python benchmarks/bench_distillation.py --skip-steps-to-target --repeats 3
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / 'benchmarks'))
sys.path.insert(0, str(ROOT / 'examples' / 'distillation'))

import harness  # noqa: E402


def _trainer(algorithms, seed: int, train_samples: int):
    import torch
    from composer import Trainer
    from composer.optim import DecoupledSGDW

    from composer_ext.data import build_image_dataloader
    from composer_ext.models import small_vgg

    torch.manual_seed(seed)
    model = small_vgg(widths=[8, 16], convs_per_stage=1)
    loader = build_image_dataloader('fashion_mnist', 128, num_samples=train_samples)
    return Trainer(model=model, train_dataloader=loader,
                   max_duration='1ba', optimizers=DecoupledSGDW(model.parameters(), lr=0.05, momentum=0.9),
                   algorithms=algorithms, progress_bar=False, seed=seed)


def _teachers(n: int):
    import torch

    from composer_ext.models import small_resnet
    pool = []
    for i in range(n):
        torch.manual_seed(100 + i)
        pool.append(small_resnet(widths=[16, 32, 64], blocks_per_stage=[2, 2, 2]))
    return pool


def step_times(steps: int, repeats: int, train_samples: int) -> dict:
    from composer_ext.algorithms import KnowledgeDistillation

    always = {'start': '0ba', 'end': '1000000000ba', 'seed': 0}
    trainers = {
        'random_of_4': _trainer([KnowledgeDistillation(_teachers(4), policy='random', **always)], 0, train_samples),
        'one_teacher': _trainer([KnowledgeDistillation(_teachers(1), policy='random', **always)], 0, train_samples),
        'ensemble_of_4': _trainer([KnowledgeDistillation(_teachers(4), policy='ensemble', **always)], 0,
                                  train_samples),
        'after_window': _trainer([KnowledgeDistillation(_teachers(4), start='0ba', end='1ba', seed=0)], 0,
                                 train_samples),
        'baseline': _trainer([], 0, train_samples),
    }
    for trainer in trainers.values():
        trainer.fit()  # the first step (and, for after_window, the whole window) before timing
    variants = {name: (lambda t=trainer: t.fit(duration=f'{steps}ba')) for name, trainer in trainers.items()}
    results = harness.time_variants(variants, repeats=repeats, warmup=1)
    per_step = {name: {k: v / steps for k, v in r.items() if k in ('min', 'median')} for name, r in results.items()}
    for trainer in trainers.values():
        trainer.close()
    return {
        'seconds_per_step': per_step,
        'random_of_4_over_one_teacher': harness.ratio(results, 'random_of_4', 'one_teacher'),
        'ensemble_of_4_over_one_teacher': harness.ratio(results, 'ensemble_of_4', 'one_teacher'),
        'after_window_over_baseline': harness.ratio(results, 'after_window', 'baseline'),
        'steps_per_call': steps,
        'repeats': repeats,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--steps', type=int, default=10, help='optimizer steps per timed call')
    parser.add_argument('--repeats', type=int, default=5, help='interleaved repeats per variant')
    parser.add_argument('--train-samples', type=int, default=4096, help='Fashion-MNIST subset for the timing runs')
    parser.add_argument('--skip-steps-to-target', action='store_true', help='only the step-time ratios')
    parser.add_argument('--out', type=Path, default=ROOT / 'runs' / 'distillation',
                        help='where the reproduction caches its teachers')
    parser.add_argument('--seeds', type=int, nargs='+', default=[0], help='student seeds for steps-to-target')
    parser.add_argument('--student-steps', type=int, default=600)
    parser.add_argument('--target', type=float, default=0.80, help='target test accuracy')
    parser.add_argument('--threads', type=int, default=1, help='torch intra-op threads')
    args = parser.parse_args(argv)

    import torch
    torch.set_num_threads(args.threads)

    result = {'step_time': step_times(args.steps, args.repeats, args.train_samples)}
    if not args.skip_steps_to_target:
        import reproduce

        log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
        args.out.mkdir(parents=True, exist_ok=True)
        reproduce.train_teachers(args.out, 20000, 3, log)
        runs = {kind: [reproduce.train_student(kind, seed, args.out, args.student_steps, 20000, 25, '0.5dur', 'random')
                       for seed in args.seeds] for kind in ('baseline', 'kd')}
        summary = reproduce.summarize(runs, args.target)
        result['steps_to_target'] = {
            'baseline_over_kd': summary['speedup_mean_steps'],
            'steps': summary['steps_to_target'],
            'target_accuracy': args.target,
            'final_accuracy': summary['final_accuracy'],
            'seeds': args.seeds,
        }
    harness.emit(result)
    return 0


if __name__ == '__main__':
    sys.exit(main())
