"""Tiny reproduction of perplexity-based data pruning (Ankner et al. 2024) on the embedded corpus.

1. Data: samples of the six clean domains of the embedded corpus, plus a share of deliberately corrupted
   documents (the tokens of a real sample shuffled; random characters), written as one new MDS directory
   in random order. Corrupted samples carry the domains ``corrupt_shuffled`` / ``corrupt_chars``.
2. ``composer-ext run yamls/perplexity_pruning/reference.yaml``: a small GPT trained on a random 25% split.
3. ``composer-ext score``: the reference model scores the other 75% (the split is left out automatically).
4. ``composer-ext select``: every band at keep=0.5; the reports show how many corrupted documents each drops.
5. ``composer-ext run yamls/perplexity_pruning/pruned.yaml``: the same small GPT, the same steps, on each
   chosen band and on a random 50%; compared by cross-entropy on the clean held-out (val) text.

Run from the repository root::

    .venv/bin/python examples/perplexity_pruning/reproduce.py                 # about 15 minutes on 2 CPU cores
    .venv/bin/python examples/perplexity_pruning/reproduce.py --only-data     # just build the data set
    .venv/bin/python examples/perplexity_pruning/reproduce.py --ci          # scaled down (CI_PRESET)
    .venv/bin/python examples/perplexity_pruning/reproduce.py --help

Prints one JSON object with the numbers (also written to ``<out>/results.json``).
"""

from __future__ import annotations

import argparse
import json
import string
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

CORRUPT = ('corrupt_shuffled', 'corrupt_chars')
# ``--ci``: the selection half of the claim (the medium perplexity band drops most corrupted documents) at a size
# that fits CI (tests/test_perplexity_pruning_reproduction.py): 1,000 clean samples per domain instead of 2,500 (the
# same 20% corrupted share), a reference model of 200 steps instead of 400, every band selected, and no final
# training runs. The other half (training on the medium band beats a random 50%) does not hold at a size that fits
# CI: with final runs of 200 steps the two ended 0.002 nats apart (data seed 0), so it is checked by hand at full
# size. Any option given explicitly wins over the preset.
CI_PRESET = {'out': 'runs/perplexity_pruning_ci', 'clean_per_domain': 1000, 'reference_steps': 200, 'bands': '',
             'threads': 1}


def build_corrupted_corpus(out: Path, clean_per_domain: int, corrupt_share: float, seed: int) -> dict:
    """Write clean corpus samples plus corrupted ones to the MDS directory ``out`` (skipped when up to date)."""
    from streaming import MDSWriter

    from composer_ext.data import ensure_corpus
    from composer_ext.data.corpus import MDS_COLUMNS
    from composer_ext.data.mds import MDSDataset
    from composer_ext.storage import atomic_dir, atomic_write_json

    # version 2: each corrupted document's uid carries its running number (version 1 repeated uids)
    params = {'clean_per_domain': clean_per_domain, 'corrupt_share': corrupt_share, 'seed': seed, 'version': 2}
    record = out / 'composer_ext_demo.json'
    if record.exists() and json.loads(record.read_text()).get('params') == params:
        return json.loads(record.read_text())
    corpus = ensure_corpus()
    tokenizer = corpus.load_tokenizer()
    rng = np.random.default_rng(seed)
    clean, pool = [], []
    for domain in corpus.domains:
        data = MDSDataset(corpus.path(domain, 'train'))
        order = rng.permutation(len(data))
        clean.extend(data[int(i)] for i in order[:clean_per_domain])
        pool.extend(data[int(i)] for i in order[clean_per_domain:clean_per_domain + clean_per_domain // 2])
    num_corrupt = int(round(corrupt_share / (1.0 - corrupt_share) * len(clean)))
    alphabet = np.array(list(string.ascii_letters + string.digits + string.punctuation + '     \n'))
    corrupt = []
    for i in range(num_corrupt):
        source = pool[int(rng.integers(len(pool)))]
        if i % 2 == 0:  # the tokens of a real sample in random order
            text = tokenizer.decode(rng.permutation(np.asarray(source['tokens'], dtype=np.int64)).tolist())
            kind = 'corrupt_shuffled'
        else:  # random characters, about as long as a real sample
            text = ''.join(rng.choice(alphabet, size=int(rng.integers(150, 260))))
            kind = 'corrupt_chars'
        tokens = np.asarray(tokenizer(text, add_special_tokens=False)['input_ids'], dtype=np.uint16)
        # Sources are drawn with replacement, so the source uid alone repeats: the running number makes it unique.
        corrupt.append({'text': text, 'tokens': tokens, 'domain': kind, 'uid': f'{kind}/{i:05d}/{source["uid"]}'})
    samples = clean + corrupt
    order = rng.permutation(len(samples))
    with atomic_dir(out) as tmp:
        with MDSWriter(out=str(tmp), columns=MDS_COLUMNS, compression=None, size_limit=1 << 18,
                       progress_bar=False) as writer:
            for i in order:
                sample = samples[int(i)]
                writer.write({'text': sample['text'], 'tokens': np.asarray(sample['tokens'], dtype=np.uint16),
                              'domain': sample['domain'], 'uid': sample['uid']})
        summary = {'params': params, 'samples': len(samples), 'clean': len(clean), 'corrupted': len(corrupt),
                   'corrupt_share': len(corrupt) / len(samples)}
        atomic_write_json(tmp / 'composer_ext_demo.json', summary)
    return summary


def _cli(argv: list[str]) -> None:
    from composer_ext.cli import main
    code = main(argv)
    if code != 0:
        raise SystemExit(f'`composer-ext {" ".join(argv)}` failed with exit status {code}')


def _train(config: str, overrides: list[str]) -> dict:
    from composer_ext.runner import run
    result = run(config, tuple(overrides))
    metrics = result.eval_metrics
    result.trainer.close()
    return metrics


def _clean_loss(metrics: dict) -> dict:
    per_domain = {key.split('/')[1]: value for key, value in metrics.items() if key.endswith('/LanguageCrossEntropy')}
    return {'mean': float(np.mean(list(per_domain.values()))), 'per_domain': per_domain}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out', default='runs/perplexity_pruning', help='working directory (default %(default)s)')
    parser.add_argument('--clean-per-domain', type=int, default=2500, help='clean samples per domain (%(default)s)')
    parser.add_argument('--corrupt-share', type=float, default=0.2, help='share of corrupted samples (%(default)s)')
    parser.add_argument('--reference-steps', type=int, default=400, help='reference model batches (%(default)s)')
    parser.add_argument('--steps', type=int, default=470, help='batches of each final run (%(default)s)')
    parser.add_argument('--bands', default='medium,low,random', help='bands to train on (%(default)s)')
    parser.add_argument('--keep', type=float, default=0.5, help='selection rate (%(default)s)')
    parser.add_argument('--seed', type=int, default=0, help='data seed (%(default)s)')
    parser.add_argument('--only-data', action='store_true', help='build the data set and stop')
    parser.add_argument('--threads', type=int, default=None,
                        help='torch intra-op threads (default: torch\'s choice; 1 is faster on a busy machine)')
    parser.add_argument('--ci', action='store_true', help=f'scaled down: {CI_PRESET} unless given explicitly')
    args = parser.parse_args(argv)
    if args.ci:  # the preset replaces the defaults only: what the command line gives explicitly still wins
        parser.set_defaults(**CI_PRESET)
        args = parser.parse_args(argv)
    if args.threads is not None:
        import torch
        torch.set_num_threads(args.threads)

    out = Path(args.out)
    started = time.time()
    data = out / 'data'
    summary = build_corrupted_corpus(data, args.clean_per_domain, args.corrupt_share, args.seed)
    if args.only_data:
        print(json.dumps(summary, indent=2))
        return summary
    timings = {}

    t = time.time()
    split_file = out / 'reference_split.json'
    split_file.unlink(missing_ok=True)
    reference = _train('yamls/perplexity_pruning/reference.yaml', [
        f'variables.data={data}', f'variables.split_file={split_file}', f'max_duration={args.reference_steps}ba',
        f'save_folder={out}/reference/checkpoints', 'log_to_console=false'])
    timings['reference_training_s'] = time.time() - t

    t = time.time()
    scores = out / 'scores'
    _cli(['score', '--model', f'{out}/reference/checkpoints/latest-rank0.pt', '--data', str(data), '--out',
          str(scores), '--overwrite', '--no-progress'])
    timings['scoring_s'] = time.time() - t

    selections = {}
    for band in ('low', 'medium', 'high', 'random'):
        _cli(['select', '--scores', str(scores), '--band', band, '--keep', str(args.keep), '--out',
              f'{out}/selection_{band}', '--overwrite'])
        report = json.loads((out / f'selection_{band}' / 'report.json').read_text())
        composition = report['composition']
        corrupt_before = sum(composition[k]['before'] for k in CORRUPT if k in composition)
        corrupt_after = sum(composition[k]['after'] for k in CORRUPT if k in composition)
        selections[band] = {
            'selected': report['counts']['selected'], 'candidates': report['counts']['candidates'],
            'corrupted_scored': corrupt_before, 'corrupted_kept': corrupt_after,
            'corrupted_dropped_fraction': 1.0 - corrupt_after / corrupt_before if corrupt_before else None,
            'corrupted_share_of_kept': corrupt_after / report['counts']['selected'],
            'clean_domain_kl_after_before': _clean_kl(composition),
        }

    runs = {}
    for band in [b.strip() for b in args.bands.split(',') if b.strip()]:
        t = time.time()
        metrics = _train('yamls/perplexity_pruning/pruned.yaml', [
            f'variables.selection={out}/selection_{band}', f'max_duration={args.steps}ba',
            f'eval_interval={args.steps}ba', f'run_name=ppl_{band}', 'log_to_console=false'])
        runs[band] = {**_clean_loss(metrics), 'seconds': time.time() - t}

    results = {
        'data': summary, 'reference': {'steps': args.reference_steps, 'clean_val_loss': _clean_loss(reference)['mean']},
        'scores': json.loads((scores / 'index.json').read_text())['summary'], 'keep': args.keep,
        'selections': selections, 'final_runs': {'steps': args.steps, 'batch_size': 16, **runs},
        'timings': {**timings, 'total_s': time.time() - started},
    }
    (out / 'results.json').write_text(json.dumps(results, indent=2) + '\n')
    print(json.dumps(results, indent=2))
    return results


def _clean_kl(composition: dict) -> float:
    clean = [k for k in composition if k not in CORRUPT]
    before = np.array([composition[k]['before'] for k in clean], dtype=float)
    after = np.array([composition[k]['after'] for k in clean], dtype=float)
    p, q = after / after.sum(), before / before.sum()
    return float(np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1) / q), 0.0)))


if __name__ == '__main__':
    main()
