"""Parallel blockwise distillation: N-rank parallel block training vs sequential training of the same blocks.

Every variant is a fresh ``composer-ext blockwise CONFIG --stage teacher --stage blocks`` run that trains the
same blocks of the same teacher on the same data (the teacher's weights do not change the cost, so it is not
trained). The default workload is ``small_vgg(widths=[16, 32, 64], convs_per_stage=3)`` on Fashion-MNIST: 8
blocks (every conv-BN-ReLU but the stem), so that a 2-way split can be nearly even; the 5 blocks of the
reproduction's VGG cap a 2-rank speedup at about 1.9x even with the optimal partition (their costs are too
uneven to halve). Blocks are assigned with the ``profile`` cost model (a few measured steps per block, the
most faithful on CPU, where norm/ReLU/depthwise work is memory-bound and parameter or FLOP counts predict
the time only roughly) and the exact minimum-makespan partition; the JSON records the workload, the measured block
costs, the assignment and its predicted speedup bound.

* ``sequential_1thread``: one process with one CPU thread: one worker (one rank; one GPU on a GPU machine);
* ``parallel_<N>ranks_1thread``: ``composer -n N`` with one CPU thread per rank: the same resources per worker;
* ``sequential_all_cores``: one process using every core (what a user without the launcher would run).

The variants run interleaved (``harness.time_variants``). Each is timed end to end (process start to exit:
imports, data, teacher, block stage) and by the block stage's own wall clock (``block_stage.json``: from the
barrier before block training to the gather after it), which is the part the method parallelises. The
load-balance efficiency is the mean rank busy time over the longest one in the parallel runs.

    .venv/bin/python benchmarks/bench_blockwise.py                  # several minutes on 2 idle cores
    .venv/bin/python benchmarks/bench_blockwise.py --convs-per-stage 2 --cost flops    # the reproduction's 5 blocks
    .venv/bin/python benchmarks/bench_blockwise.py --samples 512 --repeats 1 --all-cores 2     # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'benchmarks'))
import harness  # noqa: E402

CONFIG = """\
run_name: bench-blockwise
seed: 17
device: {device}
teacher: {{model: {{name: small_vgg, widths: {widths}, convs_per_stage: {convs}}}, checkpoint: {checkpoint}}}
blocks: auto
data: {{name: image, dataset: fashion_mnist, batch_size: {batch_size}, num_samples: {samples}}}
eval_data: {{name: image, dataset: fashion_mnist, split: test, batch_size: 500, num_samples: 1000, shuffle: false,
            drop_last: false}}
block_training: {{epochs: {epochs}, optimizer: {{name: adam, lr: 1.0e-2}}, activations: on_the_fly, val_samples: 0,
                 checkpoint_interval: 0}}
schedule: {{cost: {cost}, partition: {partition}, profile_steps: 5}}
progress_bar: false
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--ranks', type=int, default=2, help='ranks of the parallel variant (default 2)')
    parser.add_argument('--samples', type=int, default=4096, help='Fashion-MNIST training samples (default 4096)')
    parser.add_argument('--epochs', type=int, default=1, help='epochs per block (default 1)')
    parser.add_argument('--batch-size', type=int, default=128, help='batch size per block step (default 128)')
    parser.add_argument('--widths', default='16,32,64', help='small_vgg widths (default 16,32,64)')
    parser.add_argument('--convs-per-stage', type=int, default=3,
                        help='small_vgg convs per stage (default 3: 8 blocks; 2 is the reproduction\'s 5 blocks)')
    parser.add_argument('--cost', default='profile', choices=['profile', 'params_x_activation', 'flops'],
                        help='block cost model of the assignment (default profile: measured)')
    parser.add_argument('--partition', default='auto', choices=['auto', 'exact', 'lpt'],
                        help='partition method (default auto: exact up to 20 blocks)')
    parser.add_argument('--repeats', type=int, default=3, help='timed runs per variant (default 3)')
    parser.add_argument('--warmup', type=int, default=0, help='untimed runs per variant first (default 0)')
    parser.add_argument('--device', default='cpu', choices=['cpu', 'gpu'],
                        help='cpu (default) or gpu (needs one GPU per rank)')
    parser.add_argument('--all-cores', type=int, default=os.cpu_count() or 1,
                        help='threads of the all-cores sequential variant (default: all cores)')
    args = parser.parse_args()

    import torch

    from composer_ext.models import small_vgg

    work = Path(tempfile.mkdtemp(prefix='bench-blockwise-'))
    widths = [int(w) for w in args.widths.split(',')]
    torch.manual_seed(0)
    checkpoint = work / 'teacher.pt'
    torch.save(small_vgg(widths=widths, convs_per_stage=args.convs_per_stage).state_dict(), checkpoint)
    config = work / 'bench.yaml'
    config.write_text(CONFIG.format(device=args.device, widths=widths, convs=args.convs_per_stage,
                                    checkpoint=checkpoint, samples=args.samples, epochs=args.epochs,
                                    batch_size=args.batch_size, cost=args.cost, partition=args.partition))
    env = {**os.environ, 'PYTHONPATH': str(ROOT) + os.pathsep + os.environ.get('PYTHONPATH', ''),
           'OMP_NUM_THREADS': '1'}
    launcher = Path(sys.executable).with_name('composer')
    parallel = f'parallel_{args.ranks}ranks_1thread'
    variants = {  # name: (command prefix, threads per rank, ranks)
        'sequential_1thread': ([sys.executable, '-m', 'composer_ext.cli'], 1, 1),
        parallel: ([str(launcher), '-n', str(args.ranks), '-m', 'composer_ext.cli'], 1, args.ranks),
        'sequential_all_cores': ([sys.executable, '-m', 'composer_ext.cli'], args.all_cores, 1),
    }
    stages: dict[str, list[dict]] = {name: [] for name in variants}

    def output(name: str) -> Path:
        return work / name

    def setup(name: str) -> None:
        shutil.rmtree(output(name), ignore_errors=True)

    def runner(name: str):
        prefix, threads, ranks = variants[name]

        def run() -> None:
            variant_env = {**env, 'OMP_NUM_THREADS': str(threads)}
            proc = subprocess.run(prefix + ['blockwise', str(config), f'output_folder={output(name)}',
                                            f'threads_per_rank={threads}', '--stage', 'teacher', '--stage', 'blocks'],
                                  cwd=ROOT, env=variant_env, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f'{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}')
            stages[name].append(json.loads((output(name) / f'block_stage_w{ranks}.json').read_text()))
        return run

    results = harness.time_variants({name: runner(name) for name in variants}, repeats=args.repeats,
                                    warmup=args.warmup, setup=setup)
    timed = {name: stages[name][args.warmup:] for name in variants}
    block_stage = {name: {'min': min(s['wall_seconds'] for s in runs),
                          'median': statistics.median(s['wall_seconds'] for s in runs),
                          'times': [s['wall_seconds'] for s in runs]} for name, runs in timed.items()}
    efficiency = [s['load_balance_efficiency'] for s in timed[parallel]]
    assignment = timed[parallel][0]['assignment']
    shutil.rmtree(work, ignore_errors=True)
    blocks = sorted(assignment['costs'], key=lambda p: [int(t) if t.isdigit() else t for t in p.split('.')])
    harness.emit({
        'bench': 'blockwise',
        'what': f'block training of {len(blocks)} small_vgg{widths} (convs_per_stage={args.convs_per_stage}) blocks '
                f'on {args.samples} Fashion-MNIST samples x {args.epochs} epoch(s), batch {args.batch_size}',
        'workload': {
            'model': 'small_vgg', 'widths': widths, 'convs_per_stage': args.convs_per_stage, 'blocks': blocks,
            'samples': args.samples, 'epochs': args.epochs, 'batch_size': args.batch_size,
            'activations': 'on_the_fly', 'cost_model': args.cost, 'partition': assignment.get('method'),
            # The assignment's own bound on the speedup, if the costs were exact: total cost / busiest rank.
            'predicted_speedup_bound': sum(assignment['loads']) / max(assignment['loads']),
            'block_costs_first_parallel_run': assignment['costs'],
        },
        'end_to_end_seconds': results,
        'block_stage_seconds': block_stage,
        'speedup_parallel_vs_sequential_same_resources': {
            'block_stage': harness.ratio(block_stage, 'sequential_1thread', parallel),
            'end_to_end': harness.ratio(results, 'sequential_1thread', parallel),
            'goal': 1.7,
        },
        'speedup_parallel_vs_sequential_all_cores': {
            'block_stage': harness.ratio(block_stage, 'sequential_all_cores', parallel),
            'end_to_end': harness.ratio(results, 'sequential_all_cores', parallel),
            'all_cores_threads': args.all_cores,
        },
        'load_balance_efficiency': {'measured_median': statistics.median(efficiency), 'measured': efficiency,
                                    'predicted': assignment['efficiency'], 'cost_model': args.cost,
                                    'assignments': [s['assignment']['ranks'] for s in timed[parallel]]},
        'ranks': args.ranks,
    })


if __name__ == '__main__':
    main()
