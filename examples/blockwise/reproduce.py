"""Tiny reproduction of parallel blockwise distillation (Blakeney et al. 2020) on Fashion-MNIST.

A small VGG teacher (yamls/blockwise/teacher_vgg.yaml, trained first if its checkpoint is missing) becomes a
student whose 3x3 convolutions are depthwise-separable: every block is distilled on its own against the
teacher's input and output of that block (in parallel over ranks), the blocks are stitched, and the student
is finetuned end to end. The bar: the student has at least 2x fewer parameters and, after finetuning, its
test accuracy is within 3 points of the teacher's.

    .venv/bin/python examples/blockwise/reproduce.py                 # one process (sequential block training)
    .venv/bin/python examples/blockwise/reproduce.py --ranks 2       # composer -n 2: blocks split over 2 ranks
    .venv/bin/python examples/blockwise/reproduce.py --ci            # scaled down (CI_OVERRIDES)

Extra ``key=value`` arguments override the YAML (e.g. ``block_training.epochs=3``). Exits 1 when the bar is
not met. Every stage resumes, so rerunning after an interruption continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[2]
# ``--ci``: the same bar at a size that fits CI (tests/test_blockwise_reproduction.py): the teacher trains 1 epoch
# on 30,000 images instead of 3 on 60,000, each block 1 epoch on 10,000 images instead of 2 on 20,000, the finetune
# 1 epoch on 30,000 images instead of 2 on 60,000 (test accuracy still on all 10,000 test images). The runs get
# their own names (so their own folders under runs/), so they never reuse or replace the full-size ones. These go
# before the command line's overrides, which win; a ``teacher.overrides=[...]`` given on the command line is added
# to CI_TEACHER_OVERRIDES instead of replacing them.
CI_OVERRIDES = ('run_name=blockwise-vgg-ci', 'block_training.epochs=1', 'data.num_samples=10000',
                'finetune.max_duration=1ep', 'finetune.train_loader.num_samples=30000')
CI_TEACHER_OVERRIDES = ('run_name=blockwise-teacher-vgg-ci', 'max_duration=1ep', 'train_loader.num_samples=30000',
                        'progress_bar=false')


def ci_overrides(overrides: list[str]) -> list[str]:
    """``overrides`` after the ``--ci`` preset; a ``teacher.overrides=[...]`` among them is merged into the preset's."""
    teacher = list(CI_TEACHER_OVERRIDES)
    rest = []
    for override in overrides:
        key, _, value = override.partition('=')
        if key.strip() == 'teacher.overrides':
            value = value.strip()
            if not (value.startswith('[') and value.endswith(']')):
                raise ValueError(f'{override!r} is not a list. Fix: write teacher.overrides=[key=value,...].')
            teacher += [item.strip() for item in value[1:-1].split(',') if item.strip()]
        else:
            rest.append(override)
    return [*CI_OVERRIDES, f'teacher.overrides=[{",".join(teacher)}]', *rest]


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--ranks', type=int, default=1, help='processes (composer -n RANKS); default 1')
    parser.add_argument('--config', default='yamls/blockwise/vgg.yaml', help='the blockwise YAML')
    parser.add_argument('--ci', action='store_true', help='scaled down (see CI_OVERRIDES)')
    parser.add_argument('overrides', nargs='*', metavar='key=value', help='overrides of the YAML')
    args = parser.parse_args(argv)
    if args.ci:
        args.overrides = ci_overrides(args.overrides)

    sys.path.insert(0, str(ROOT))
    from composer_ext.blockwise import load_blockwise_config

    config = load_blockwise_config(ROOT / args.config, args.overrides)
    if args.ranks > 1:
        command = [str(Path(sys.executable).with_name('composer')), '-n', str(args.ranks), '-m', 'composer_ext.cli']
    else:
        command = [sys.executable, '-m', 'composer_ext.cli']
    subprocess.run(command + ['blockwise', args.config, *args.overrides], cwd=ROOT, check=True)

    report = json.loads((ROOT / config.output / 'report.json').read_text())
    accuracy, compression, wall = report['accuracy'], report['compression'], report['wallclock']
    teacher_params, student_params = report['teacher']['params'], report['student']['params']
    gap = 100 * (accuracy['teacher'] - accuracy['finetuned'])
    print(f'\nteacher   {teacher_params:>9,} parameters  {2 * report["teacher"]["macs_per_sample"] / 1e6:7.2f} '
          f'MFLOPs  accuracy {100 * accuracy["teacher"]:.2f}%')
    print(f'student   {student_params:>9,} parameters  {2 * report["student"]["macs_per_sample"] / 1e6:7.2f} '
          f'MFLOPs  accuracy {100 * accuracy["stitched"]:.2f}% stitched, {100 * accuracy["finetuned"]:.2f}% finetuned')
    print(f'compression {compression["params_ratio"]:.2f}x parameters, {compression["flops_ratio"]:.2f}x FLOPs; '
          f'finetuned student {gap:+.2f} points below the teacher')
    print(f'block stage: {wall["block_stage_wall_seconds"]:.0f}s wall on {report["world_size"]} rank(s), '
          f'{wall["block_seconds_sum"]:.0f}s of block training in total, load balance '
          f'{wall["load_balance_efficiency"]:.2f}')
    met = compression['params_ratio'] >= 2.0 and gap <= 3.0
    print('bar (>= 2x fewer parameters, within 3 points): ' + ('MET' if met else 'NOT MET'))
    return 0 if met else 1


if __name__ == '__main__':
    sys.exit(main())
