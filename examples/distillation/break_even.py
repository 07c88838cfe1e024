"""When does random-teacher distillation pay in wall-clock? A break-even study on Fashion-MNIST.

*Reduce, Reuse, Recycle* counts the teachers' cost: distillation is a speed-up only when the steps it saves cost
more than the teacher forwards it adds. This study measures that line for the student of
``examples/distillation`` (a 6.3k-parameter VGG):

1. **Teachers at four cost ratios**, all VGGs trained with the same recipe (``yamls/distillation/teacher_vgg.yaml``:
   3 epochs, SGD 0.1, cosine): widths 6/12/24 (0.58x the student's forward FLOPs), 8/16/32 (1.0x, the student's
   own architecture), 16/32/64 (3.8x) and 20/40/80 with two convs per stage (22.5x); and the 22.5x one trained for
   10 epochs (a clearly better teacher at the same cost). Each cost is measured twice: forward FLOPs
   (``torch.utils.flop_counter``) and seconds of a teacher forward per student training step.
2. **A learning-rate sweep** of the baseline and of KD with each teacher (from its cache, which gives the live
   losses within fp16 rounding) over ``--lrs`` on ``--sweep-seeds``, widened (x2 or /2, up to ``--max-widen``
   rates) past an edge where the best sits; each arm then runs at its own best rate (the highest mean final
   accuracy).
3. **The study**: for every seed, the tuned baseline, then KD with each teacher **live** and **cached**
   (``KnowledgeDistillation(cache=DIR)``, full fp16 logits), in an order rotated per seed (interleaved, so that
   a change in machine load falls on every arm). The cache of each teacher is written by one extra cold run of the
   first seed before the study (its extra time is the cache build, reported once and amortized over the runs that
   read it, both ways).
4. **Target**: the tuned baseline's lowest final accuracy over the seeds, rounded down to 0.005 (every baseline
   reaches it, at or near its last evaluation: the paper's "time to the baseline's quality"). For every run: the
   steps and the **training seconds** to the target. Training seconds are counted by a callback from ``FIT_START``,
   evaluation excluded, teacher forwards, cache reads and data loading included, in two clocks: the process's CPU
   time (one torch thread, no DataLoader workers: the wall time of a dedicated core, robust to other jobs on the
   machine) and wall time.
5. A plot (``break_even.png``): wall-clock speed-up (baseline seconds to target / KD seconds to target, means over
   the seeds) against the teacher's cost ratio, live and cached, with the break-even line, and the step speed-up.

Run from the repository root (about 60 minutes on one core; finished runs are reused from ``<out>/runs/``, so an
interrupted study resumes, and ``--seeds`` can be split over processes once the teachers, the sweep and the caches
exist; ``--tag`` times every study run again, interleaved, e.g. after the sweep grew)::

    .venv/bin/python examples/distillation/break_even.py                    # everything
    .venv/bin/python examples/distillation/break_even.py --seeds 3 4        # a part (another process)
    .venv/bin/python examples/distillation/break_even.py                    # again: tables and plot, no training

Prints one JSON summary (also ``<out>/break_even.json``) and a last line ``break-even: ...``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from composer import Callback  # noqa: E402

YAMLS = ROOT / 'yamls' / 'distillation'  # the student and teacher recipes of examples/distillation/reproduce.py
ACCURACY = 'metrics/test/MulticlassAccuracy'

STUDENT = {'name': 'small_vgg', 'widths': [8, 16, 32], 'convs_per_stage': 1}
# name -> the teacher's model (a VGG trained with teacher_vgg.yaml's recipe); cost ratios are measured, not assumed.
TEACHERS = {
    'vgg6': {'name': 'small_vgg', 'widths': [6, 12, 24], 'convs_per_stage': 1},
    'vgg8': {'name': 'small_vgg', 'widths': [8, 16, 32], 'convs_per_stage': 1},
    'vgg16': {'name': 'small_vgg', 'widths': [16, 32, 64], 'convs_per_stage': 1},
    'vgg20x2': {'name': 'small_vgg', 'widths': [20, 40, 80], 'convs_per_stage': 2},
    # the 22.5x teacher trained longer (10 epochs instead of 3): a clearly better teacher at the same cost
    'vgg20x2_10ep': {'name': 'small_vgg', 'widths': [20, 40, 80], 'convs_per_stage': 2},
}
TEACHER_EPOCHS = {'vgg20x2_10ep': 10}  # others: --teacher-epochs
BATCH = 128


class TrainClock(Callback):
    """Training seconds (CPU and wall) at every evaluation, evaluation excluded."""

    def __init__(self):
        self.points: list[tuple[int, float, float]] = []  # (batch, cpu seconds, wall seconds) before each eval
        self._cpu = self._wall = 0.0
        self._since: Optional[tuple[float, float]] = None

    def _start(self):
        self._since = (time.process_time(), time.perf_counter())

    def _stop(self):
        if self._since is not None:
            self._cpu += time.process_time() - self._since[0]
            self._wall += time.perf_counter() - self._since[1]
            self._since = None

    def fit_start(self, state, logger):
        self._start()

    def eval_start(self, state, logger):
        self._stop()
        self.points.append((int(state.timestamp.batch), self._cpu, self._wall))

    def eval_end(self, state, logger):
        self._start()

    def fit_end(self, state, logger):
        self._stop()


def _fit(yaml: Path, overrides: Sequence[str]) -> tuple[Any, Any, Any]:
    from composer.loggers import InMemoryLogger

    from composer_ext.config import load_config
    from composer_ext.runner import build_trainer

    memory, clock = InMemoryLogger(), TrainClock()
    trainer = build_trainer(load_config(yaml, tuple(overrides)), extra_loggers=[memory])
    trainer.state.callbacks.append(clock)
    trainer.fit()
    trainer.close()
    return trainer, memory, clock


def _teacher_folder(out: Path, name: str) -> Path:
    return out / 'teachers' / name


def _flow(value: Any) -> str:
    """A value as an OmegaConf dotlist literal (flow YAML)."""
    return json.dumps(value).replace('"', '')


def train_teachers(out: Path, epochs: int, train_samples: int, log) -> dict[str, dict]:
    """Train (or reuse) every teacher; ``{name: {'checkpoint', 'accuracy', 'seconds'}}``."""
    from composer_ext.core.provenance import file_sha256
    from composer_ext.runner import final_eval_metrics
    from composer_ext.storage import atomic_write_json

    teachers = {}
    for seed, (name, model) in enumerate(TEACHERS.items()):
        folder = _teacher_folder(out, name)
        record, checkpoint = folder / 'done.json', folder / 'checkpoints' / 'latest-rank0.pt'
        teacher_epochs = TEACHER_EPOCHS.get(name, epochs)
        params = {'yaml_sha256': file_sha256(YAMLS / 'teacher_vgg.yaml'), 'model': model, 'epochs': teacher_epochs,
                  'train_samples': train_samples, 'seed': seed}
        if record.exists() and checkpoint.exists() and json.loads(record.read_text()).get('params') == params:
            teachers[name] = json.loads(record.read_text())
            log(f'teacher {name}: cached (test accuracy {teachers[name]["accuracy"]:.4f})')
            continue
        log(f'teacher {name}: training {teacher_epochs} epochs ...')
        started = time.perf_counter()
        trainer, _, _ = _fit(YAMLS / 'teacher_vgg.yaml', [
            f'model={_flow(model)}', f'seed={seed}', f'run_name=break_even_teacher_{name}',
            f'variables.train_samples={train_samples}', f'max_duration={teacher_epochs}ep',
            f'eval_interval={teacher_epochs}ep', f'save_interval={teacher_epochs}ep',
            f'save_folder={folder}/checkpoints'])
        teachers[name] = {'params': params, 'checkpoint': str(checkpoint),
                          'accuracy': final_eval_metrics(trainer.state)[ACCURACY],
                          'seconds': time.perf_counter() - started}
        atomic_write_json(record, teachers[name])
        log(f'teacher {name}: test accuracy {teachers[name]["accuracy"]:.4f} ({teachers[name]["seconds"]:.0f} s)')
    return teachers


def measure_costs(repeats: int = 30) -> dict[str, dict]:
    """Each teacher's forward FLOPs / the student's, and its forward seconds / a student training step's."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from composer_ext.models.cnn import small_vgg

    def build(model: dict):
        return small_vgg(**{k: v for k, v in model.items() if k != 'name'}).module

    images = torch.randn(BATCH, 1, 28, 28)
    labels = torch.randint(0, 10, (BATCH,))

    def flops(module) -> int:
        with FlopCounterMode(display=False) as counter, torch.inference_mode():
            module(images)
        return counter.get_total_flops()

    def median_seconds(fn) -> float:
        for _ in range(5):
            fn()
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
        return statistics.median(times)

    student = build(STUDENT)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)

    def step():
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(student(images), labels).backward()
        optimizer.step()

    student_flops, step_seconds = flops(student), median_seconds(step)
    costs = {}
    for name, model in TEACHERS.items():
        teacher = build(model).eval()

        def forward():
            with torch.inference_mode():
                teacher(images)

        costs[name] = {'flops_ratio': flops(teacher) / student_flops,
                       'parameters': sum(p.numel() for p in teacher.parameters()),
                       'forward_per_student_step': median_seconds(forward) / step_seconds}
    return {'student_forward_flops': student_flops, 'student_step_seconds': step_seconds, 'teachers': costs}


def run_student(out: Path, arm: str, seed: int, lr: float, steps: int, train_samples: int,
                teachers: dict[str, dict], cache: Optional[Path] = None, tag: str = '') -> dict:
    """One student run (``baseline`` or ``kd:<teacher>``), reused from ``<out>/runs`` when it finished before."""
    from composer_ext.storage import atomic_write_json

    name = f'{arm.replace(":", "_")}{"_cached" if cache else ""}{tag}_lr{lr:g}_seed{seed}'
    record = out / 'runs' / f'{name}.json'
    if record.exists():
        return json.loads(record.read_text())
    overrides = [f'seed={seed}', f'variables.steps={steps}ba', f'variables.train_samples={train_samples}',
                 f'optimizer.lr={lr}', f'run_name=break_even_{name}', 'eval_interval=25ba']
    if arm == 'baseline':
        yaml = YAMLS / 'baseline.yaml'
    else:
        teacher = arm.split(':', 1)[1]
        yaml = YAMLS / 'kd.yaml'
        pool = [{'model': TEACHERS[teacher], 'checkpoint': teachers[teacher]['checkpoint']}]
        overrides += [f'algorithms.knowledge_distillation.teachers={_flow(pool)}',
                      f'algorithms.knowledge_distillation.seed={seed}', 'callbacks=null']
        if cache is not None:
            overrides += [f'algorithms.knowledge_distillation.cache={cache}', 'train_loader.sample_ids=true']
    started = time.perf_counter()
    _, memory, clock = _fit(yaml, overrides)
    curve = [(int(ts.batch.value), float(value)) for ts, value in memory.data[ACCURACY]]
    forward = [float(v) for _, v in memory.data.get('kd/teacher_forward_time', [])]
    result = {'arm': arm, 'cached': cache is not None, 'seed': seed, 'lr': lr, 'curve': curve,
              'cpu_seconds': [(b, c) for b, c, _ in clock.points], 'wall_seconds': [(b, w) for b, _, w in clock.points],
              'final_accuracy': curve[-1][1], 'teacher_forward_seconds': sum(forward),
              'total_seconds': time.perf_counter() - started}
    atomic_write_json(record, result)
    return result


def _best_lr(results: dict[float, list[dict]]) -> float:
    return max(results, key=lambda lr: (statistics.mean(r['final_accuracy'] for r in results[lr]), -lr))


def sweep(out: Path, arm: str, lrs: Sequence[float], seeds: Sequence[int], log, max_widen: int = 1, **run) -> dict:
    """Mean final accuracy per learning rate; up to ``max_widen`` rates are added past an edge where the best sits."""
    grid = sorted(lrs)
    results: dict[float, list[dict]] = {}
    widened = 0
    while True:
        for lr in grid:
            if lr not in results:
                results[lr] = [run_student(out, arm, seed, lr, **run) for seed in seeds]
                log(f'sweep {arm} lr {lr:g}: final accuracy {[round(r["final_accuracy"], 4) for r in results[lr]]}')
        best = _best_lr(results)
        if widened < max_widen and best == grid[-1]:
            grid, widened = grid + [round(best * 2, 6)], widened + 1
        elif widened < max_widen and best == grid[0]:
            grid, widened = [round(best / 2, 6)] + grid, widened + 1
        else:
            break
    return {'best_lr': best, 'final_accuracy_mean': {f'{lr:g}': statistics.mean(r['final_accuracy'] for r in rs)
                                                     for lr, rs in sorted(results.items())}}


def _steps_and_seconds(result: dict, target: float, clock: str) -> tuple[Optional[int], Optional[float]]:
    from composer_ext.distillation import steps_to_target

    step = steps_to_target(result['curve'], target)
    return (None, None) if step is None else (step, dict(result[f'{clock}_seconds'])[step])


def _ratio_of_means(baseline: list[Optional[float]], other: list[Optional[float]]) -> Optional[float]:
    if not baseline or None in baseline or None in other or not other:
        return None
    return statistics.mean(baseline) / statistics.mean(other)


def summarize(out: Path, runs: dict[str, list[dict]], builds: dict[str, float], costs: dict, clock: str) -> dict:
    """Target, steps and seconds to it per arm and seed, and the speed-ups over the tuned baseline."""
    finals = [r['final_accuracy'] for r in runs['baseline']]
    target = math.floor(min(finals) / 0.005) * 0.005
    arms: dict[str, dict] = {}
    base_steps, base_seconds = zip(*(_steps_and_seconds(r, target, clock) for r in runs['baseline']))
    for arm, results in runs.items():
        steps, seconds = zip(*(_steps_and_seconds(r, target, clock) for r in results))
        entry = {'steps_to_target': list(steps), 'seconds_to_target': [None if s is None else round(s, 2)
                                                                        for s in seconds],
                 'reached': sum(s is not None for s in steps), 'runs': len(results),
                 'lr': results[0].get('lr'),
                 'final_accuracy_mean': statistics.mean(r['final_accuracy'] for r in results),
                 'train_seconds_mean': statistics.mean(dict(r[f'{clock}_seconds'])[r['curve'][-1][0]]
                                                       for r in results),
                 'speedup_steps': _ratio_of_means(list(base_steps), list(steps)),
                 'speedup_seconds': _ratio_of_means(list(base_seconds), list(seconds))}
        teacher = arm.split(':', 1)[1].removesuffix('+cache') if ':' in arm else None
        if teacher:
            entry['cost'] = costs['teachers'][teacher]
        if arm.endswith('+cache') and teacher in builds and entry['speedup_seconds'] is not None:
            build = builds[teacher]
            entry['cache_build_seconds'] = build
            with_build = [s + build / len(results) for s in seconds]  # amortized over the runs that read it
            entry['speedup_seconds_build_amortized'] = _ratio_of_means(list(base_seconds), with_build)
            entry['speedup_seconds_build_in_one_run'] = _ratio_of_means(list(base_seconds), [s + build for s in seconds])
        arms[arm] = entry
    # The same ratios at other targets, so that a KD arm ahead only in mid-training shows (None: a seed missed it).
    grid = sorted({round(0.70 + 0.01 * i, 2) for i in range(int(round((target - 0.70) / 0.01)) + 1)} | {target})
    for arm, results in runs.items():
        by_target = {}
        for t in grid:
            base = [_steps_and_seconds(r, t, clock) for r in runs['baseline']]
            mine = [_steps_and_seconds(r, t, clock) for r in results]
            by_target[f'{t:g}'] = {'steps': _ratio_of_means([b[0] for b in base], [m[0] for m in mine]),
                                   'seconds': _ratio_of_means([b[1] for b in base], [m[1] for m in mine])}
        arms[arm]['speedup_by_target'] = by_target
    return {'target_accuracy': target, 'clock': clock, 'arms': arms}


def plot(summary: dict, runs: dict[str, list[dict]], path: Path, targets: Sequence[float] = (0.80, 0.83)) -> None:
    """Three panels: training-seconds speed-up against teacher cost (at the tuned target and ``targets``), the mean
    accuracy curves against training seconds, and the step speed-up against teacher cost."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, (speed, curves, steps) = plt.subplots(1, 3, figsize=(16, 6.4))
    tuned = summary['target_accuracy']
    clock = summary['clock']

    def teacher_of(arm: str) -> str:
        return arm.split(':', 1)[1].removesuffix('+cache')

    # lines join the teachers of the one recipe across cost ratios; a teacher trained longer is a marker of its own
    def arms(cache: bool, recipe: bool) -> list[tuple[float, dict]]:
        chosen = [(a['cost']['flops_ratio'], a) for name, a in summary['arms'].items() if name.startswith('kd:')
                  and name.endswith('+cache') == cache and (teacher_of(name) not in TEACHER_EPOCHS) == recipe]
        return sorted(chosen, key=lambda point: point[0])

    live, cached = arms(False, True), arms(True, True)
    longer_live, longer_cached = arms(False, False), arms(True, False)

    def series(points, value):
        kept = [(x, value(a)) for x, a in points if value(a) is not None]
        return [x for x, _ in kept], [y for _, y in kept]

    for index, target in enumerate(sorted({*(t for t in targets if t < tuned), tuned})):
        key = f'{target:g}'
        color = f'C{index}'
        note = ' (tuned baseline\'s)' if target == tuned else ''
        speed.plot(*series(live, lambda a: a['speedup_by_target'].get(key, {}).get('seconds')), marker='o',
                   color=color, label=f'live teacher, target {target:.3f}{note}')
        speed.plot(*series(cached, lambda a: a['speedup_by_target'].get(key, {}).get('seconds')), marker='s',
                   color=color, linestyle='--', label=f'cached logits, target {target:.3f}')
        steps.plot(*series(live, lambda a: a['speedup_by_target'].get(key, {}).get('steps')), marker='o',
                   color=color, label=f'target {target:.3f}{note}')
        for points, marker, what in ((longer_live, '*', 'live'), (longer_cached, 'P', 'cached')):
            value = lambda a: a['speedup_by_target'].get(key, {}).get('seconds')  # noqa: E731
            if series(points, value)[0]:
                speed.plot(*series(points, value), marker=marker, markersize=11, linestyle='none', color=color,
                           label=f'teacher trained longer, {what}, target {target:.3f}')
        if series(longer_live, lambda a: a['speedup_by_target'].get(key, {}).get('steps'))[0]:
            steps.plot(*series(longer_live, lambda a: a['speedup_by_target'].get(key, {}).get('steps')), marker='*',
                       markersize=11, linestyle='none', color=color, label=f'teacher trained longer, {target:.3f}')
    for axis, title in ((speed, f'training seconds ({clock}) to target'), (steps, 'steps to target')):
        axis.axhline(1.0, color='gray', linestyle=':', label='break-even (tuned baseline)')
        axis.set_xscale('log')
        axis.set_xlim(0.3, 50)
        axis.set_xlabel("teacher forward FLOPs / student's")
        axis.set_ylabel('speed-up over the tuned baseline (mean over seeds)')
        axis.set_title(title, fontsize=10)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7, loc='upper center', bbox_to_anchor=(0.5, -0.14), ncol=2)  # below: off the points
    for index, (arm, results) in enumerate(runs.items()):
        if arm.endswith('+cache'):
            continue
        points = [r['curve'] for r in results]
        seconds = [dict(r[f'{clock}_seconds']) for r in results]
        batches = [b for b, _ in points[0]]
        accuracy = [statistics.mean(dict(curve)[b] for curve in points) for b in batches]
        elapsed = [statistics.mean(s[b] for s in seconds) for b in batches]
        style = {'color': 'black', 'linewidth': 2} if arm == 'baseline' else {'color': f'C{index}'}
        curves.plot(elapsed, accuracy, label=arm, **style)
    curves.axhline(tuned, color='gray', linestyle=':', label=f'target {tuned:.3f}')
    curves.set_ylim(tuned - 0.12, None)  # the approach to the target; the first evaluations are far below
    curves.set_xlabel(f'training seconds ({clock}, evaluation excluded)')
    curves.set_ylabel('test accuracy (mean over seeds)')
    curves.set_title('accuracy against training time (live teachers)', fontsize=10)
    curves.grid(alpha=0.3)
    curves.legend(fontsize=7, loc='upper center', bbox_to_anchor=(0.5, -0.14), ncol=3)
    fig.suptitle('Random-teacher KD on Fashion-MNIST: where it pays in wall-clock (each arm at its best learning rate)',
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--out', type=Path, default=ROOT / 'runs' / 'distillation_break_even')
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2, 3, 4])
    parser.add_argument('--sweep-seeds', type=int, nargs='+', default=[0, 1])
    parser.add_argument('--lrs', type=float, nargs='+', default=[0.02, 0.05, 0.1])
    parser.add_argument('--max-widen', type=int, default=2,
                        help='rates added (each x2 or /2) past an edge of --lrs where the best rate sits')
    parser.add_argument('--steps', type=int, default=600)
    parser.add_argument('--train-samples', type=int, default=20000)
    parser.add_argument('--teacher-epochs', type=int, default=3)
    parser.add_argument('--clock', choices=['cpu', 'wall'], default='cpu', help='the seconds the summary compares')
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--tag', default='', help='suffix of the study\'s run records: a new tag times every study '
                        'run again, interleaved (the teachers, sweeps and cache builds are kept)')
    args = parser.parse_args(argv)

    import torch
    torch.set_num_threads(args.threads)
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731 -- stdout carries the JSON
    from composer_ext.storage import atomic_write_json

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    teachers = train_teachers(out, args.teacher_epochs, args.train_samples, log)
    costs_path = out / 'costs.json'
    if not costs_path.exists() or set(TEACHERS) - set(json.loads(costs_path.read_text())['teachers']):
        atomic_write_json(costs_path, measure_costs())
    costs = json.loads(costs_path.read_text())
    run = dict(steps=args.steps, train_samples=args.train_samples, teachers=teachers)
    sweeps = {'baseline': sweep(out, 'baseline', args.lrs, args.sweep_seeds, log, max_widen=args.max_widen, **run)}
    # Cache build: one cold run per teacher writes its cache (the first seed, the middle rate of --lrs); its extra
    # time over the same run reading the finished cache is the build.
    build_lr = sorted(args.lrs)[len(args.lrs) // 2]
    builds = {}
    for teacher in TEACHERS:
        cache = out / 'cache' / teacher
        cold = run_student(out, f'kd:{teacher}', args.seeds[0], build_lr, cache=cache, tag='_cold', **run)
        warm = run_student(out, f'kd:{teacher}', args.seeds[0], build_lr, cache=cache, **run)
        last = cold['curve'][-1][0]
        builds[teacher] = dict(cold[f'{args.clock}_seconds'])[last] - dict(warm[f'{args.clock}_seconds'])[last]
    # Each teacher's KD at its own best rate: swept from its cache (the same losses as live KD within fp16 rounding,
    # tests/test_distillation_cache.py), since the best rate depends on the teacher (a better teacher takes more).
    for teacher in TEACHERS:
        sweeps[f'kd:{teacher}'] = sweep(out, f'kd:{teacher}', args.lrs, args.sweep_seeds, log,
                                        max_widen=args.max_widen, cache=out / 'cache' / teacher, **run)
    best = {arm: entry['best_lr'] for arm, entry in sweeps.items()}
    log('best learning rates: ' + ', '.join(f'{arm} {lr:g}' for arm, lr in best.items()))
    arms = ['baseline'] + [f'kd:{t}' for t in TEACHERS] + [f'kd:{t}+cache' for t in TEACHERS]
    runs: dict[str, list[dict]] = {arm: [] for arm in arms}
    for position, seed in enumerate(args.seeds):
        rotation = position % len(arms)
        for arm in arms[rotation:] + arms[:rotation]:  # interleaved: each seed starts at another arm
            teacher = arm.split(':', 1)[1].removesuffix('+cache') if ':' in arm else None
            cache = out / 'cache' / teacher if arm.endswith('+cache') else None
            result = run_student(out, arm.removesuffix('+cache'), seed, best[arm.removesuffix('+cache')],
                                 cache=cache, tag=args.tag, **run)
            runs[arm].append(result)
            log(f'seed {seed} {arm:16s} final {result["final_accuracy"]:.4f} '
                f'train {result["cpu_seconds"][-1][1]:.0f} cpu-s / {result["wall_seconds"][-1][1]:.0f} s')
    summary = summarize(out, runs, builds, costs, args.clock)
    summary.update(sweeps=sweeps, costs=costs, teachers={n: {'accuracy': t['accuracy'], 'seconds': t['seconds']}
                                                          for n, t in teachers.items()},
                   seeds=args.seeds, wall_clock_summary=summarize(out, runs, {}, costs, 'wall')['arms'])
    atomic_write_json(out / 'break_even.json', summary)
    plot(summary, runs, out / 'break_even.png')
    print(json.dumps(summary, indent=1))
    wins = {arm: a['speedup_seconds'] for arm, a in summary['arms'].items()
            if arm != 'baseline' and a['speedup_seconds'] is not None and a['speedup_seconds'] >= 1.2}
    print(f'break-even: target {summary["target_accuracy"]:.3f}; configurations >= 1.2x faster in training seconds '
          f'(mean over {len(args.seeds)} seeds): {wins or "none"}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
