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
runs after the window).

Teacher cost and the teacher-output cache (issue 19), same student and data, interleaved:

* ``plain``            -- the student alone (the denominator)
* ``live_1x``          -- KD from a live teacher of about the student's forward FLOPs (the same VGG, another seed)
* ``live_4x``          -- KD from a live teacher of about 4x the student's forward FLOPs (a wider VGG)
* ``live_4x_nchw``     -- ``live_4x`` with ``teacher_channels_last=False`` (what channels-last saves)
* ``cached_4x``        -- KD from the teacher-output cache of the 4x teacher (full fp16 logits, every entry cached)
* ``cached_4x_top4``   -- the same with ``cache_top_k=4``

Ratios ``<variant>_over_plain`` (goal: ``cached_4x_over_plain`` <= 1.10), the FLOP ratios measured with
``torch.utils.flop_counter``, and the cache's read throughput (samples/s of lookup + read + decode, batches of
128). Then ``steps_to_target baseline / KD``: the reproduction of
``examples/distillation/reproduce.py`` (teachers cached in ``--out``, trained first if missing) with ``--seeds``.

    .venv/bin/python benchmarks/bench_distillation.py                       # about 4 minutes on 2 idle cores
    .venv/bin/python benchmarks/bench_distillation.py --skip-steps-to-target --repeats 3
    .venv/bin/python benchmarks/bench_distillation.py --only-cache               # issue 19's ratios only
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


def _vgg(seed: int, widths):
    import torch

    from composer_ext.models import small_vgg
    torch.manual_seed(seed)
    return small_vgg(widths=widths, convs_per_stage=1)


def _forward_flops(model) -> int:
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.module(torch.zeros(1, 1, 28, 28))
    return int(counter.get_total_flops())


def cache_step_times(steps: int, repeats: int, train_samples: int, cache_dir: Path) -> dict:
    """KD step time with a live teacher at 1x and 4x the student's FLOPs, and from the cache, over the plain step."""
    import shutil
    import time

    import numpy as np
    import torch
    from composer import Trainer
    from composer.optim import DecoupledSGDW

    from composer_ext.algorithms import KnowledgeDistillation
    from composer_ext.data import build_image_dataloader

    student_widths, widths_1x, widths_4x = [8, 16], [8, 16], [16, 32]
    flops = {name: _forward_flops(_vgg(0, w)) for name, w in
             (('student', student_widths), ('teacher_1x', widths_1x), ('teacher_4x', widths_4x))}
    shutil.rmtree(cache_dir, ignore_errors=True)
    always = {'start': '0ba', 'end': '1000000000ba', 'seed': 0}

    def trainer(kd_kwargs=None, teacher_widths=None):
        torch.manual_seed(0)
        model = _vgg(0, student_widths)
        algorithms = [] if kd_kwargs is None else [KnowledgeDistillation(_vgg(1, teacher_widths), **always,
                                                                         **kd_kwargs)]
        # every variant reads the same batches; the plain student has no ids to strip
        loader = build_image_dataloader('fashion_mnist', 128, num_samples=train_samples,
                                        sample_ids=kd_kwargs is not None and 'cache' in kd_kwargs)
        return Trainer(model=model, train_dataloader=loader, max_duration='1ep', progress_bar=False, seed=0,
                       optimizers=DecoupledSGDW(model.parameters(), lr=0.05, momentum=0.9), algorithms=algorithms)

    trainers = {
        'plain': trainer(),
        'live_1x': trainer({}, widths_1x),
        'live_4x': trainer({}, widths_4x),
        'live_4x_nchw': trainer({'teacher_channels_last': False}, widths_4x),
        'cached_4x': trainer({'cache': cache_dir / 'full'}, widths_4x),
        'cached_4x_top4': trainer({'cache': cache_dir / 'top4', 'cache_top_k': 4}, widths_4x),
    }
    build = {}
    for name, t in trainers.items():  # one epoch untimed: warms up, and fills the caches (every sample seen)
        started = time.perf_counter()
        t.fit()
        build[name] = time.perf_counter() - started
    variants = {name: (lambda t=t: t.fit(duration=f'{steps}ba')) for name, t in trainers.items()}
    results = harness.time_variants(variants, repeats=repeats, warmup=1)
    hit_rates = {name: trainers[name].state.algorithms[0].cache_store.num_entries(0) / train_samples
                 for name in ('cached_4x', 'cached_4x_top4')}
    store = trainers['cached_4x'].state.algorithms[0].cache_store
    for t in trainers.values():
        t.close()

    # read throughput: random batches of 128 ids from the full-logit cache, lookup + read (input check off) + decode
    ids = np.arange(train_samples)
    fashion_ids = trainers['cached_4x'].state.train_dataloader.dataset.sample_ids.numpy()
    rng = np.random.default_rng(0)
    batches = [fashion_ids[rng.choice(ids, 128, replace=False)] for _ in range(200)]

    def read_all():
        for batch_ids in batches:
            store.read(0, store.lookup(0, batch_ids), None, batch_ids, torch.device('cpu'), 10)

    read = harness.time_variants({'read': read_all}, repeats=repeats, warmup=1)['read']
    per_step = {name: {k: v / steps for k, v in r.items() if k in ('min', 'median')} for name, r in results.items()}
    return {
        'seconds_per_step': per_step,
        **{f'{name}_over_plain': harness.ratio(results, name, 'plain') for name in trainers if name != 'plain'},
        # the same ratios in CPU seconds of this (one-thread) process: what a dedicated core would take, robust to
        # other jobs on the machine, which move the wall-clock ratios above
        **{f'{name}_over_plain_cpu': harness.ratio(results, name, 'plain', clock='cpu')
           for name in trainers if name != 'plain'},
        'live_4x_over_live_4x_nchw': harness.ratio(results, 'live_4x', 'live_4x_nchw'),
        'forward_flops': flops,
        'teacher_flops_over_student': {k: flops[k] / flops['student'] for k in ('teacher_1x', 'teacher_4x')},
        'cache_entries_over_train_samples': hit_rates,
        'first_epoch_seconds': build,
        'cache_read_samples_per_second': {k: 200 * 128 / read[k] for k in ('min', 'median')},
        'steps_per_call': steps,
        'repeats': repeats,
        'train_samples': train_samples,
    }


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
    parser.add_argument('--only-cache', action='store_true', help='only the teacher-cost and cache ratios')
    parser.add_argument('--cache-dir', type=Path, default=ROOT / 'runs' / 'distillation' / 'bench_cache',
                        help='where the cache variants write their teacher-output caches (emptied first)')
    parser.add_argument('--out', type=Path, default=ROOT / 'runs' / 'distillation',
                        help='where the reproduction caches its teachers')
    parser.add_argument('--seeds', type=int, nargs='+', default=[0], help='student seeds for steps-to-target')
    parser.add_argument('--student-steps', type=int, default=600)
    parser.add_argument('--target', type=float, default=0.80, help='target test accuracy')
    parser.add_argument('--threads', type=int, default=1, help='torch intra-op threads')
    args = parser.parse_args(argv)

    import torch
    torch.set_num_threads(args.threads)

    result = {'teacher_cost_and_cache': cache_step_times(args.steps, args.repeats, args.train_samples,
                                                         args.cache_dir)}
    if args.only_cache:
        harness.emit(result)
        return 0
    result['step_time'] = step_times(args.steps, args.repeats, args.train_samples)
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
