"""Tiny reproduction of "LoRA Learns Less and Forgets Less" (Biderman et al. 2024) with LoRAProbe.

1. ``yamls/lora_probe/pretrain.yaml``: a small GPT (2 layers, width 128) pretrained on the embedded ``prose``
   domain (skipped when ``<out>/pretrain/checkpoints/latest-rank0.pt`` exists; ``--force-pretrain`` redoes it).
2. From that checkpoint, the same finetune on the ``code`` domain (300 batches of 16 x 128 tokens), once with full
   finetuning (``full.yaml``) and with LoRA (``lora.yaml``, peft, alpha = 2r) at ranks 16 and 256 on the attention,
   MLP or all projections: the paper's six LoRA configurations. ``LoRAProbe`` measures, every 50 batches, learning
   (code cross-entropy improvement) and forgetting (prose cross-entropy degradation), and every 100 batches the
   spectrum of ΔW of every adapted (LoRA) or every projection (full) matrix.

   Rank vs width: the model's width is 128, so every adapted matrix has full rank <= 128 and r=256 is at least
   full rank (it can express any update); the paper's r=16 and r=256 are 0.4% and 6% of Llama-2-7B's width 4096.
   Ranks scaled to this width are the extra configs ``lora_r4_all`` and ``lora_r64_all`` (with ``lora_r16_all``:
   4/16/64, i.e. 3%/12.5%/50% of the width); they are not in the default list.
3. ``composer-ext report lora <out>``: the learning-forgetting Pareto plot and the table, in ``<out>/report``.

The bar (``checks`` in the output): full finetuning learns more on code AND forgets more on prose than LoRA r=16
(all), and its ΔW needs a higher rank for 90% of the energy.

Run from the repository root::

    .venv/bin/python examples/lora_probe/reproduce.py                     # about 12 minutes on 2 idle CPU cores
    .venv/bin/python examples/lora_probe/reproduce.py --configs full lora_r16_all   # the bar only, ~5 minutes
    .venv/bin/python examples/lora_probe/reproduce.py --sweep             # + the learning-rate sweep (~7 more)
    .venv/bin/python examples/lora_probe/reproduce.py --configs full lora_r4_all lora_r16_all lora_r64_all

Prints one JSON object (also written to ``<out>/results.json``) and exits 1 if the bar does not hold.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

YAMLS = ROOT / 'yamls' / 'lora_probe'
CONFIGS = {
    'full': ('full.yaml', []),
    'lora_r16_all': ('lora.yaml', ['model.lora.r=16', 'model.lora.targets=all']),
    'lora_r16_mlp': ('lora.yaml', ['model.lora.r=16', 'model.lora.targets=mlp']),
    'lora_r16_attention': ('lora.yaml', ['model.lora.r=16', 'model.lora.targets=attention']),
    'lora_r256_all': ('lora.yaml', ['model.lora.r=256', 'model.lora.targets=all']),
    'lora_r256_mlp': ('lora.yaml', ['model.lora.r=256', 'model.lora.targets=mlp']),
    'lora_r256_attention': ('lora.yaml', ['model.lora.r=256', 'model.lora.targets=attention']),
    # Ranks scaled to the width 128 (r=256 above is >= the full rank of every matrix): run them by name.
    'lora_r4_all': ('lora.yaml', ['model.lora.r=4', 'model.lora.targets=all']),
    'lora_r64_all': ('lora.yaml', ['model.lora.r=64', 'model.lora.targets=all']),
}
# The default run: full finetuning and the paper's six LoRA configurations.
DEFAULT_CONFIGS = ['full', 'lora_r16_all', 'lora_r16_mlp', 'lora_r16_attention', 'lora_r256_all', 'lora_r256_mlp',
                   'lora_r256_attention']
SWEEP = {'full': (3.0e-4, 1.0e-3, 3.0e-3), 'lora_r16_all': (1.0e-3, 3.0e-3, 1.0e-2)}


def _run(yaml: str, overrides: list[str]) -> float:
    """Build and fit one config in this process; return the seconds ``fit()`` took."""
    import warnings

    from composer_ext.config import load_config
    from composer_ext.lora_probe.lora import LoRARecommendationWarning
    from composer_ext.runner import build_trainer

    with warnings.catch_warnings():
        # Attention-only and MLP-only runs deviate from the recommendation on purpose: they are the comparison.
        warnings.simplefilter('ignore', LoRARecommendationWarning)
        trainer = build_trainer(load_config(YAMLS / yaml, tuple(overrides)))
    started = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - started
    trainer.close()
    return seconds


def _final(out: Path, run_name: str) -> dict:
    from composer_ext.lora_probe.report import load_run
    run = load_run(out / run_name / 'lora_probe.json')
    return {'learning': run.learning, 'forgetting': run.forgetting, 'rank_at_90_mean': run.rank_mean,
            'rank_at_90_max': run.rank_max, 'method': run.method, 'trainable_params': run.trainable_params}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out', default='runs/lora_probe', help='output root (default runs/lora_probe)')
    parser.add_argument('--configs', nargs='+', default=list(DEFAULT_CONFIGS), choices=list(CONFIGS),
                        help='finetunes to run (default: full and the paper\'s six LoRA configurations)')
    parser.add_argument('--finetune-batches', type=int, default=300, help='batches per finetune (default 300)')
    parser.add_argument('--pretrain-batches', type=int, default=800, help='pretraining batches (default 800)')
    parser.add_argument('--force-pretrain', action='store_true', help='pretrain even if the checkpoint exists')
    parser.add_argument('--sweep', action='store_true', help='also sweep the learning rate of full and LoRA r=16')
    args = parser.parse_args(argv)

    from composer_ext.lora_probe.report import lora_report
    from composer_ext.storage import atomic_write_json

    out = Path(args.out)
    root = [f'variables.root={out}']
    timings = {}
    checkpoint = out / 'pretrain' / 'checkpoints' / 'latest-rank0.pt'
    if args.force_pretrain or not checkpoint.exists():
        print(f'pretraining on prose ({args.pretrain_batches} batches)...', file=sys.stderr, flush=True)
        timings['pretrain'] = _run('pretrain.yaml', root + [f'max_duration={args.pretrain_batches}ba',
                                                            f'save_interval={args.pretrain_batches}ba'])
    finetune = root + [f'max_duration={args.finetune_batches}ba']
    for name in args.configs:
        yaml, overrides = CONFIGS[name]
        print(f'finetuning on code: {name}...', file=sys.stderr, flush=True)
        timings[name] = _run(yaml, finetune + overrides + [f'run_name=ft_{name}'])
    sweep = {}
    if args.sweep:
        for name, rates in SWEEP.items():
            yaml, overrides = CONFIGS[name]
            for lr in rates:
                run_name = f'sweep_{name}_lr{lr:g}'
                print(f'learning-rate sweep: {run_name}...', file=sys.stderr, flush=True)
                timings[run_name] = _run(yaml, finetune + overrides + [
                    f'run_name={run_name}', f'optimizer.lr={lr}', f'variables.root={out / "sweep"}',
                    f'variables.pretrained={checkpoint}'])
                sweep[run_name] = _final(out / 'sweep', run_name)
    report = lora_report([out / f'ft_{name}' for name in args.configs], out / 'report')
    finals = {name: _final(out, f'ft_{name}') for name in args.configs}
    checks = {}
    if 'full' in finals and 'lora_r16_all' in finals:
        full, lora = finals['full'], finals['lora_r16_all']
        checks = {
            'full_learns_more_than_lora_r16': full['learning'] > lora['learning'],
            'full_forgets_more_than_lora_r16': full['forgetting'] > lora['forgetting'],
            'full_delta_w_needs_higher_rank_at_90': full['rank_at_90_mean'] > lora['rank_at_90_max'],
        }
    result = {'finetunes': finals, 'sweep': sweep, 'checks': checks, 'bar_holds': bool(checks) and all(checks.values()),
              'seconds': timings, 'report': {'png': str(report['png']), 'table': str(report['md'])},
              'table_markdown': report['markdown']}
    atomic_write_json(out / 'results.json', result)
    print(json.dumps(result, indent=2))
    return 0 if result['bar_holds'] or not checks else 1


if __name__ == '__main__':
    sys.exit(main())
