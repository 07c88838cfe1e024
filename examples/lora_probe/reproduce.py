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
    .venv/bin/python examples/lora_probe/reproduce.py --configs full lora_r4_all lora_r16_all lora_r64_all
    .venv/bin/python examples/lora_probe/reproduce.py --sweep --out runs/lora_seeds           # the sweep only
    .venv/bin/python examples/lora_probe/reproduce.py --best --seeds 17 18 19 --out runs/lora_seeds   # sweep + best

Prints one JSON object (also written to ``<out>/results.json``) and exits 1 if the bar does not hold.

``--sweep`` and ``--best`` are modes of their own (the untuned ``--configs`` runs are not made):

* ``--sweep``: full finetuning and LoRA r=16 (all) at the rates of ``SWEEP`` (three each, on the 1-3-10 ladder),
  at the first seed of ``--seeds``. The best rate of a method is the one with the greatest learning (code CE drop
  at the end; ties go to the lower rate: :func:`best_rate`); where it sits at an edge of the grid, the grid is
  widened by one ladder step past that edge and the new rate run, up to ``--max-widen`` steps per side
  (:func:`widened`). Writes ``<out>/sweep.json``; the last stdout line is ``SWEEP: ...``.
* ``--best``: the sweep (finished runs are reused), then each method at its best rate for every seed of
  ``--seeds``, pooled (:func:`pool_best`: mean, sample sd and standard error of learning, forgetting and ΔW
  rank@90%, and full - LoRA differences called real only where |difference| > 2 standard errors). Writes
  ``<out>/best.json`` and the report of the best-rate runs (``<out>/best/report``: pareto.png, table.md); the last
  stdout line is ``BEST: ...``; exits 1 if "LoRA learns less and forgets less" does not hold beyond the spread.

A seed sets the finetune's ``seed`` (LoRA's initial A matrices, dropout) and its data order
(``train_loader.seed``); the pretrained base model is one (``pretrain.yaml``, seed 17), shared by every seed.
Every finetune of these modes lives in ``<out>/finetunes/<config>_lr<lr>_seed<seed>`` and writes ``result.json``
when it finishes; a finetune whose ``result.json`` holds the same settings (config, rate, seed, batches, and the
SHA-256 of the pretrained checkpoint) is read back instead of rerun, so reruns are cheap and a killed run resumes
at the finetune it stopped in. Processes that share ``<out>`` take a lock per finetune (each runs once): e.g. one
process per method (``--methods full``, ``--methods lora_r16_all``; each writes ``sweep_<method>.json`` and
``best_<method>.json`` without pooling), then ``--best`` with both, which reads everything back and pools.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Mapping, Sequence

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
DEFAULT_SEEDS = (17, 18, 19)
# What is pooled at the best rates; rank@90% is the mean over the probed matrices of the last ΔW spectrum.
POOLED = ('learning', 'forgetting', 'rank_at_90_mean', 'rank_at_90_max')


def _run(yaml: str, overrides: list[str]) -> float:
    """Build and fit one config in this process; return the seconds ``fit()`` took."""
    import warnings

    from composer_ext.config import load_config
    from composer_ext.lora_probe.lora import LoRARecommendationWarning
    from composer_ext.runner import build_trainer

    for attempt in range(5):
        try:
            with warnings.catch_warnings():
                # Attention-only and MLP-only runs deviate from the recommendation on purpose: they are the comparison.
                warnings.simplefilter('ignore', LoRARecommendationWarning)
                trainer = build_trainer(load_config(YAMLS / yaml, tuple(overrides)))
            break
        except FileExistsError:
            # Streaming picks a machine-wide shared-memory prefix by looking, then creating: a job on the machine
            # that starts at the same moment can take the same one. Looking again finds the next free prefix.
            if attempt == 4:
                raise
            time.sleep(1.0 + attempt)
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


def ladder_step(lr: float, up: bool) -> float:
    """The next rate on the 1-3-10 ladder above (``up``) or below ``lr``: 1e-3 -> 3e-3 -> 1e-2, 3e-4 <- 1e-3.

    Example:
        >>> ladder_step(3e-3, up=True), ladder_step(1e-3, up=False), ladder_step(1e-2, up=True)
        (0.01, 0.0003, 0.03)
    """
    if not lr > 0:
        raise ValueError(f'lr={lr!r} is not positive. Fix: pass a learning rate such as 1e-3.')
    exponent = math.floor(math.log10(lr) + 1e-9)
    rungs = [m * 10.0 ** e for e in (exponent - 1, exponent, exponent + 1) for m in (1, 3)]
    if up:
        return float(f'{min(r for r in rungs if r > lr * 1.01):.1g}')
    return float(f'{max(r for r in rungs if r < lr / 1.01):.1g}')


def best_rate(finals: Mapping[float, dict]) -> dict:
    """The best learning rate of one method's sweep: the greatest learning (code CE drop), ties to the lower rate.

    Args:
        finals: ``{lr: final numbers}`` (each with ``learning``) for one method and seed.

    Returns:
        ``{'lr': best, 'edge': 'low' | 'high' | None, 'rates': sorted rates}``; ``edge`` says where the best rate
        sits at an end of the grid (a one-rate grid sits at both: ``'both'``).

    Example:
        >>> best_rate({1e-3: {'learning': 1.0}, 3e-3: {'learning': 1.5}, 1e-2: {'learning': 1.2}})
        {'lr': 0.003, 'edge': None, 'rates': [0.001, 0.003, 0.01]}
    """
    if not finals:
        raise ValueError('finals={} is empty. Fix: pass {lr: {"learning": ...}} for at least one rate.')
    rates = sorted(finals)
    missing = [lr for lr in rates if finals[lr].get('learning') is None]
    if missing:
        raise ValueError(f'rates {missing} have no learning value. Fix: rerun them (their lora_probe.json has no '
                         f'evaluation).')
    best = max(rates, key=lambda lr: (finals[lr]['learning'], -lr))
    if len(rates) == 1:
        edge = 'both'
    else:
        edge = 'low' if best == rates[0] else 'high' if best == rates[-1] else None
    return {'lr': best, 'edge': edge, 'rates': rates}


def widened(rates: Sequence[float], edge) -> list[float]:
    """The rates to add when the best rate sits at ``edge`` (``'low'``, ``'high'`` or ``'both'``): one ladder step out.

    Example:
        >>> widened([1e-3, 3e-3, 1e-2], 'high'), widened([1e-3, 3e-3, 1e-2], 'low'), widened([1e-3], None)
        ([0.03], [0.0003], [])
    """
    rates = sorted(rates)
    new = []
    if edge in ('low', 'both'):
        new.append(ladder_step(rates[0], up=False))
    if edge in ('high', 'both'):
        new.append(ladder_step(rates[-1], up=True))
    return new


def _stats(values: Sequence[float]) -> dict:
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return {'values': list(values), 'mean': mean, 'sd': sd, 'se': sd / math.sqrt(len(values))}


def pool_best(per_seed: Mapping[str, Mapping[int, dict]], full: str = 'full', lora: str = 'lora_r16_all') -> dict:
    """Pool the best-rate finetunes over seeds and compare full finetuning with LoRA beyond the seed spread.

    Args:
        per_seed: ``{method: {seed: final numbers}}`` with the keys of ``POOLED`` (what :func:`_finetune` returns
            under ``'final'``), for ``full`` and ``lora``, over the same seeds.
        full: The full-finetuning method's name.
        lora: The LoRA method's name.

    Returns:
        ``{'seeds', 'methods': {method: {key: {values, mean, sd, se}}}, 'differences': {key: {mean, se, real}},
        'claims': {...}, 'claim_holds'}``. A difference is ``full - lora`` of the means; its standard error is
        ``sqrt(se_full² + se_lora²)`` (unpaired: LoRA's initialisation differs from full finetuning's at the same
        seed); ``real`` is ``|mean| > 2 se`` with at least 2 seeds. The claims: LoRA learns less (learning
        difference > 0 and real), forgets less (forgetting difference > 0 and real), and full finetuning's ΔW needs a
        higher rank@90% (rank_at_90_mean difference > 0 and real); ``claim_holds`` is the first two together.

    Example:
        >>> full = {s: {'learning': 3.0 + d, 'forgetting': 1.3, 'rank_at_90_mean': 14.0, 'rank_at_90_max': 19}
        ...         for s, d in ((1, 0.1), (2, 0.0), (3, -0.1))}
        >>> lora = {s: {'learning': 1.3, 'forgetting': 0.9 + d, 'rank_at_90_mean': 4.0, 'rank_at_90_max': 7}
        ...         for s, d in ((1, 0.3), (2, -0.3), (3, 0.0))}
        >>> pooled = pool_best({'full': full, 'lora_r16_all': lora})
        >>> pooled['claims']['lora_learns_less'], pooled['claims']['lora_forgets_less'], pooled['claim_holds']
        (True, True, True)
    """
    for name in (full, lora):
        if name not in per_seed or not per_seed[name]:
            raise ValueError(f'per_seed has no runs of {name!r} (has {sorted(per_seed)}). Fix: pass '
                             f'{{{name!r}: {{seed: final}}}} for both methods.')
    seeds = sorted(per_seed[full])
    if sorted(per_seed[lora]) != seeds:
        raise ValueError(f'the seeds differ: {full!r} has {seeds}, {lora!r} has {sorted(per_seed[lora])}. Fix: run '
                         'both methods at the same seeds.')
    methods = {name: {key: _stats([float(per_seed[name][seed][key]) for seed in seeds]) for key in POOLED}
               for name in (full, lora)}
    differences = {}
    for key in POOLED:
        mean = methods[full][key]['mean'] - methods[lora][key]['mean']
        se = math.sqrt(methods[full][key]['se'] ** 2 + methods[lora][key]['se'] ** 2)
        differences[key] = {'mean': mean, 'se': se, 'real': len(seeds) > 1 and abs(mean) > 2 * se}
    claims = {
        'lora_learns_less': differences['learning']['mean'] > 0 and differences['learning']['real'],
        'lora_forgets_less': differences['forgetting']['mean'] > 0 and differences['forgetting']['real'],
        'full_delta_w_needs_higher_rank_at_90': (differences['rank_at_90_mean']['mean'] > 0 and
                                                 differences['rank_at_90_mean']['real']),
    }
    return {'seeds': seeds, 'methods': methods, 'differences': differences, 'claims': claims,
            'claim_holds': claims['lora_learns_less'] and claims['lora_forgets_less']}


def _pm(stats: dict, digits: int = 3) -> str:
    return f"{stats['mean']:.{digits}f} ± {stats['sd']:.{digits}f}"


def best_summary(pooled: dict, rates: Mapping[str, float], full: str = 'full', lora: str = 'lora_r16_all') -> str:
    """The one-line summary of a pooled best-rate comparison (the ``BEST:`` line)."""
    def method(name):
        stats = pooled['methods'][name]
        return (f"{name} lr={rates[name]:g} learning {_pm(stats['learning'])} forgetting {_pm(stats['forgetting'])} "
                f"rank@90% {_pm(stats['rank_at_90_mean'], 1)}")

    verdict = ', '.join(f"{claim} {'HOLDS' if holds else 'does NOT hold'}" for claim, holds in pooled['claims'].items())
    return (f"BEST: seeds {pooled['seeds']} (mean ± sd); {method(full)}; {method(lora)}; {verdict}; "
            f"learns less and forgets less: {'HOLDS' if pooled['claim_holds'] else 'does NOT hold'} beyond 2 SE")


def _pretrain(out: Path, batches: int, force: bool, timings: dict) -> Path:
    checkpoint = out / 'pretrain' / 'checkpoints' / 'latest-rank0.pt'
    if force or not checkpoint.exists():
        print(f'pretraining on prose ({batches} batches)...', file=sys.stderr, flush=True)
        timings['pretrain'] = _run('pretrain.yaml', [f'variables.root={out}', f'max_duration={batches}ba',
                                                     f'save_interval={batches}ba'])
    return checkpoint


def _finetune(out: Path, name: str, lr: float, seed: int, batches: int, checkpoint: Path,
              checkpoint_sha256: str) -> dict:
    """One finetune of ``name`` at ``lr`` and ``seed``, read back from its ``result.json`` when already finished."""
    from composer_ext.storage import atomic_write_json, file_lock

    yaml, overrides = CONFIGS[name]
    run_name = f'{name}_lr{lr:g}_seed{seed}'
    folder = out / 'finetunes'
    settings = {'config': name, 'yaml': yaml, 'overrides': list(overrides), 'lr': lr, 'seed': seed,
                'finetune_batches': batches, 'pretrained_sha256': checkpoint_sha256}
    result_path = folder / run_name / 'result.json'
    # Processes that share <out> (one per method, or helpers) run each finetune once: the second waits, then reads.
    with file_lock(folder / f'{run_name}.lock'):
        if result_path.exists():
            stored = json.loads(result_path.read_text())
            if stored.get('settings') == settings:
                print(f'reusing {result_path}', file=sys.stderr, flush=True)
                # the run folder is where the result is now: <out> may have been moved or named from another cwd
                return {**stored, 'path': str(result_path.parent)}
        print(f'finetuning on code: {run_name}...', file=sys.stderr, flush=True)
        seconds = _run(yaml, [f'variables.root={folder}', f'variables.pretrained={checkpoint}',
                              f'max_duration={batches}ba', f'run_name={run_name}', f'optimizer.lr={lr}', f'seed={seed}',
                              f'train_loader.seed={seed}'] + list(overrides))
        result = {'settings': settings, 'run_name': run_name, 'final': _final(folder, run_name), 'seconds': seconds,
                  'path': str(folder / run_name)}
        atomic_write_json(result_path, result)
    return result


def run_sweep(out: Path, seed: int, batches: int, checkpoint: Path, max_widen: int = 2,
              grid: Mapping[str, Sequence[float]] = SWEEP) -> dict:
    """The learning-rate sweep at one seed, widened past an edge where the best rate sits (see the module doc)."""
    from composer_ext.core.provenance import file_sha256

    digest = file_sha256(checkpoint)
    sweep = {}
    for name, rates in grid.items():
        runs = {lr: _finetune(out, name, lr, seed, batches, checkpoint, digest) for lr in rates}
        steps = {'low': 0, 'high': 0}
        while True:
            best = best_rate({lr: run['final'] for lr, run in runs.items()})
            sides = [side for side in ('low', 'high') if best['edge'] in (side, 'both') and steps[side] < max_widen]
            if not sides:
                break
            for side, lr in zip(sides, widened(best['rates'], 'both' if len(sides) == 2 else sides[0])):
                steps[side] += 1
                runs[lr] = _finetune(out, name, lr, seed, batches, checkpoint, digest)
        sweep[name] = {'seed': seed, 'rates': best['rates'], 'best_lr': best['lr'], 'best_at_edge': best['edge'],
                       'widened': steps, 'rule': 'greatest learning (code CE drop); ties to the lower rate',
                       'runs': {f'{lr:g}': {**runs[lr]['final'], 'seconds': runs[lr]['seconds'],
                                            'run_name': runs[lr]['run_name']} for lr in best['rates']}}
    return sweep


def sweep_summary(sweep: Mapping[str, dict]) -> str:
    """The one-line summary of a sweep (the ``SWEEP:`` line)."""
    parts = []
    for name, entry in sweep.items():
        grid = ' '.join(f"{lr}:{run['learning']:.3f}/{run['forgetting']:.3f}" for lr, run in entry['runs'].items())
        edge = f" (at the {entry['best_at_edge']} edge)" if entry['best_at_edge'] else ''
        parts.append(f"{name} best lr={entry['best_lr']:g}{edge} [lr:learning/forgetting {grid}]")
    return 'SWEEP: ' + '; '.join(parts)


def sweep_table(sweep: Mapping[str, dict]) -> str:
    """The sweep as a markdown table: one row per (method, rate), the best rate of each method in bold."""
    lines = ['| method | lr | learning (code CE drop, nats) | forgetting (prose CE rise, nats) | ΔW rank@90% mean | '
             'ΔW rank@90% max | seconds |', '|---|---|---|---|---|---|---|']
    for name, entry in sweep.items():
        for lr, run in entry['runs'].items():
            mark = '**' if float(lr) == entry['best_lr'] else ''
            lines.append(f"| {name} | {mark}{lr}{mark} | {mark}{run['learning']:.3f}{mark} | {run['forgetting']:.3f} | "
                         f"{run['rank_at_90_mean']:.1f} | {run['rank_at_90_max']:.0f} | {run['seconds']:.0f} |")
    return '\n'.join(lines) + '\n'


def best_table(pooled: dict, rates: Mapping[str, float]) -> str:
    """The pooled best-rate comparison as a markdown table (mean ± sd over the seeds; the full - LoRA difference
    with its standard error, * where beyond 2 SE)."""
    names = list(pooled['methods'])
    lines = ['| | ' + ' | '.join(f'{name} (lr {rates[name]:g})' for name in names) +
             ' | full - LoRA (± SE) |', '|---|' + '---|' * (len(names) + 1)]
    labels = {'learning': 'learning (code CE drop, nats)', 'forgetting': 'forgetting (prose CE rise, nats)',
              'rank_at_90_mean': 'ΔW rank@90% mean', 'rank_at_90_max': 'ΔW rank@90% max'}
    for key, label in labels.items():
        digits = 3 if key in ('learning', 'forgetting') else 1
        diff = pooled['differences'][key]
        cells = [_pm(pooled['methods'][name][key], digits) for name in names]
        lines.append(f'| {label} | ' + ' | '.join(cells) +
                     f" | {diff['mean']:+.{digits}f} ± {diff['se']:.{digits}f}{' *' if diff['real'] else ''} |")
    return '\n'.join(lines) + '\n'


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out', default='runs/lora_probe', help='output root (default runs/lora_probe)')
    parser.add_argument('--configs', nargs='+', default=list(DEFAULT_CONFIGS), choices=list(CONFIGS),
                        help='finetunes to run (default: full and the paper\'s six LoRA configurations)')
    parser.add_argument('--finetune-batches', type=int, default=300, help='batches per finetune (default 300)')
    parser.add_argument('--pretrain-batches', type=int, default=800, help='pretraining batches (default 800)')
    parser.add_argument('--force-pretrain', action='store_true', help='pretrain even if the checkpoint exists')
    parser.add_argument('--sweep', action='store_true', help='only the learning-rate sweep of full and LoRA r=16 '
                        '(at the first --seeds), widened past an edge where the best rate sits')
    parser.add_argument('--best', action='store_true', help='the sweep, then full and LoRA r=16 at their best rates '
                        'for every --seeds, pooled (mean ± sd, differences beyond 2 SE)')
    parser.add_argument('--seeds', type=int, nargs='+', default=list(DEFAULT_SEEDS),
                        help=f'finetune seeds (data order, LoRA init) for --sweep (the first) and --best (all); '
                        f'default {" ".join(map(str, DEFAULT_SEEDS))}')
    parser.add_argument('--methods', nargs='+', default=list(SWEEP), choices=list(SWEEP),
                        help='--sweep/--best: only these methods (default both). One method runs its part (e.g. two '
                        'processes, one per method) and writes sweep_<method>.json / best_<method>.json without '
                        'pooling; a later run with both reuses every finetune and pools')
    parser.add_argument('--max-widen', type=int, default=2,
                        help='--sweep/--best: at most this many ladder steps past each edge of the grid (default 2)')
    args = parser.parse_args(argv)
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f'--seeds {args.seeds} repeats a seed. Fix: give each seed once, e.g. --seeds 17 18 19.')

    from composer_ext.lora_probe.report import lora_report
    from composer_ext.storage import atomic_write_json

    out = Path(args.out)
    timings = {}
    if args.sweep or args.best:
        started = time.perf_counter()
        checkpoint = _pretrain(out, args.pretrain_batches, args.force_pretrain, timings)
        sweep = run_sweep(out, args.seeds[0], args.finetune_batches, checkpoint, args.max_widen,
                          {name: SWEEP[name] for name in args.methods})
        timings['sweep_stage'] = time.perf_counter() - started
        summary = sweep_summary(sweep)
        both = set(args.methods) == set(SWEEP)
        part = '' if both else '_' + '+'.join(args.methods)
        atomic_write_json(out / f'sweep{part}.json', {'sweep': sweep, 'summary': summary, 'seconds': timings,
                                                      'table_markdown': sweep_table(sweep),
                                                      'finetune_batches': args.finetune_batches})
        if not args.best:
            print(summary, flush=True)
            return 0
        started = time.perf_counter()
        from composer_ext.core.provenance import file_sha256
        digest = file_sha256(checkpoint)
        rates = {name: entry['best_lr'] for name, entry in sweep.items()}
        runs = {name: {seed: _finetune(out, name, lr, seed, args.finetune_batches, checkpoint, digest)
                       for seed in args.seeds} for name, lr in rates.items()}
        timings['best_stage'] = time.perf_counter() - started
        if not both:  # one method's part: its seeds are run and stored; pooling needs both methods
            summary = 'BEST-PART: ' + '; '.join(
                f"{name} lr={rates[name]:g} learning {_pm(_stats([r['final']['learning'] for r in by_seed.values()]))}"
                f" forgetting {_pm(_stats([r['final']['forgetting'] for r in by_seed.values()]))}"
                for name, by_seed in runs.items())
            atomic_write_json(out / f'best{part}.json', {
                'best_lr': rates, 'summary': summary, 'seconds': timings, 'finetune_batches': args.finetune_batches,
                'finals': {name: {str(seed): run['final'] for seed, run in by_seed.items()}
                           for name, by_seed in runs.items()},
                'finetune_seconds': {run['run_name']: run['seconds'] for by_seed in runs.values()
                                     for run in by_seed.values()}})
            print(summary, flush=True)
            return 0
        pooled = pool_best({name: {seed: run['final'] for seed, run in by_seed.items()} for name, by_seed in
                            runs.items()})
        report = lora_report([Path(run['path']) for by_seed in runs.values() for run in by_seed.values()],
                             out / 'best' / 'report')
        summary = best_summary(pooled, rates)
        atomic_write_json(out / 'best.json', {
            'best_lr': rates, 'best_at_edge': {name: entry['best_at_edge'] for name, entry in sweep.items()},
            'pooled': pooled, 'claim_holds': pooled['claim_holds'], 'summary': summary, 'seconds': timings,
            'finetune_seconds': {run['run_name']: run['seconds'] for by_seed in runs.values()
                                 for run in by_seed.values()},
            'finetune_batches': args.finetune_batches,
            'report': {'png': str(report['png']), 'table': str(report['md'])}, 'table_markdown': report['markdown'],
            'best_table_markdown': best_table(pooled, rates)})
        print(summary, flush=True)
        return 0 if pooled['claim_holds'] else 1

    root = [f'variables.root={out}']
    checkpoint = _pretrain(out, args.pretrain_batches, args.force_pretrain, timings)
    finetune = root + [f'max_duration={args.finetune_batches}ba']
    for name in args.configs:
        yaml, overrides = CONFIGS[name]
        print(f'finetuning on code: {name}...', file=sys.stderr, flush=True)
        timings[name] = _run(yaml, finetune + overrides + [f'run_name=ft_{name}', f'variables.pretrained={checkpoint}'])
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
    result = {'finetunes': finals, 'checks': checks, 'bar_holds': bool(checks) and all(checks.values()),
              'seconds': timings, 'report': {'png': str(report['png']), 'table': str(report['md'])},
              'table_markdown': report['markdown']}
    atomic_write_json(out / 'results.json', result)
    print(json.dumps(result, indent=2))
    return 0 if result['bar_holds'] or not checks else 1

if __name__ == '__main__':
    sys.exit(main())
