"""Perplexity scoring throughput against a bare forward loop, and band selection time on 10 million scores.

- ``scoring``: ``composer_ext.data.score_mds`` end to end on an MDS directory of real corpus samples: reading
  the shards, the tokenizer check, windows and batches, the model, the per-sample NLL sums, and the atomic
  writes of the score index (into a fresh directory every repeat).
- ``bare_forward``: ``model(input_ids, attention_mask)`` under ``torch.no_grad()`` over exactly the batches
  the scorer builds (pre-collated, so this loop does nothing but the forward passes), under the same
  precision as the scorer (``--precision``; default ``amp_bf16`` on GPU, ``fp32`` on CPU): comparing a bf16
  scorer with an fp32 loop would credit the scorer with the speed of autocast.

``scoring_throughput_ratio`` = scoring tokens/s / bare-forward tokens/s (goal >= 0.9). The scorer beats a bare
loop when the output layer dominates (small models, large vocabularies): it applies the output layer to the
scored positions in chunks and never materialises the full logits tensor.

Selection: ``select_band`` on ``--num-scores`` random perplexities (1% NaN), per band, and per domain.

    .venv/bin/python benchmarks/bench_perplexity_scoring.py                 # about 2 minutes on 2 CPU cores
    .venv/bin/python benchmarks/bench_perplexity_scoring.py --help
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import harness  # noqa: E402


def _build_mds(out: Path, samples_per_domain: int) -> Path:
    from streaming import MDSWriter

    from composer_ext.data import ensure_corpus
    from composer_ext.data.corpus import MDS_COLUMNS
    from composer_ext.data.mds import MDSDataset

    corpus = ensure_corpus()
    with MDSWriter(out=str(out), columns=MDS_COLUMNS, compression=None, size_limit=1 << 20,
                   progress_bar=False) as writer:
        for domain in corpus.domains:
            data = MDSDataset(corpus.path(domain, 'train'))
            for i in range(min(samples_per_domain, len(data))):
                writer.write(data[i])
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--samples-per-domain', type=int, default=512, help='corpus samples per domain (%(default)s)')
    parser.add_argument('--batch-size', type=int, default=32, help='windows per forward pass (%(default)s)')
    parser.add_argument('--n-layer', type=int, default=2, help='small_gpt layers (%(default)s)')
    parser.add_argument('--n-embd', type=int, default=128, help='small_gpt width (%(default)s)')
    parser.add_argument('--repeats', type=int, default=5, help='interleaved timed repeats (%(default)s)')
    parser.add_argument('--num-scores', type=int, default=10_000_000, help='scores for the selection timing')
    parser.add_argument('--selection-repeats', type=int, default=3, help='repeats of each selection (%(default)s)')
    parser.add_argument('--threads', type=int, default=None, help='torch intra-op threads (default: torch\'s)')
    parser.add_argument('--precision', default=None, choices=('fp32', 'amp_bf16', 'amp_fp16'),
                        help='precision of both variants (default: amp_bf16 on GPU, fp32 on CPU)')
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    from composer_ext.data import ensure_corpus
    from composer_ext.data.mds import MDSDataset
    from composer_ext.models import small_gpt
    from composer_ext.perplexity_pruning.bands import select_band
    from composer_ext.perplexity_pruning.scoring import PerplexityScorer, score_mds

    work = Path(tempfile.mkdtemp(prefix='bench_ppl_'))
    try:
        data = _build_mds(work / 'data', args.samples_per_domain)
        tokenizer = ensure_corpus().load_tokenizer()
        torch.manual_seed(0)
        model = small_gpt(n_layer=args.n_layer, n_embd=args.n_embd, tokenizer=tokenizer).model.eval()
        scorer = PerplexityScorer(model, batch_size=args.batch_size, precision=args.precision)
        tokens = [np.asarray(s['tokens'], dtype=np.int64) for s in MDSDataset(data)]
        batches, _ = scorer.plan(tokens)
        device = scorer.device
        inputs = [(b.input_ids.to(device), b.attention_mask.to(device)) for b in batches]
        num_tokens = sum(b.num_tokens for b in batches)
        runs = iter(range(10 ** 6))

        def scoring():
            out = work / f'scores{next(runs)}'
            score_mds(model, data, out, tokenizer=tokenizer, batch_size=args.batch_size, precision=scorer.precision,
                      score_reference_samples=True, progress=False)  # a bare model records no training data
            shutil.rmtree(out)

        def bare_forward():
            with torch.no_grad(), scorer.autocast():  # the scorer's precision: a like-for-like comparison
                for input_ids, attention_mask in inputs:
                    model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            if device.type == 'cuda':
                torch.cuda.synchronize()

        timed = harness.time_variants({'scoring': scoring, 'bare_forward': bare_forward}, repeats=args.repeats)
        throughput = harness.ratio(timed, 'bare_forward', 'scoring')  # = scoring tokens/s / bare tokens/s

        rng = np.random.default_rng(0)
        scores = np.exp(rng.normal(3.0, 1.0, args.num_scores))
        scores[rng.random(args.num_scores) < 0.01] = np.nan
        domains = rng.integers(0, 6, args.num_scores).astype(np.int16)
        selections = {f'{band}': (lambda band=band: select_band(scores, band, 0.5)) for band in
                      ('low', 'medium', 'high', 'random')}
        selections['medium_per_domain'] = lambda: select_band(scores, 'medium', 0.5, domains=domains)
        selection = harness.time_variants(selections, repeats=args.selection_repeats, warmup=0)

        result = {
            'bench': 'perplexity_scoring',
            'scoring_throughput_ratio': throughput,
            'goal': {'scoring_throughput_ratio': '>= 0.9'},
            'tokens_per_s': {'scoring': num_tokens / timed['scoring']['min'],
                             'bare_forward': num_tokens / timed['bare_forward']['min']},
            'scoring': timed['scoring'], 'bare_forward': timed['bare_forward'],
            'fast_path': scorer.fast_path,
            'selection_seconds_10m' if args.num_scores == 10_000_000 else 'selection_seconds': {
                name: {'min': r['min'], 'median': r['median']} for name, r in selection.items()},
            'config': {'samples': len(tokens), 'tokens': num_tokens, 'batches': len(batches),
                       'batch_size': args.batch_size, 'model': f'small_gpt(n_layer={args.n_layer}, '
                       f'n_embd={args.n_embd})', 'num_scores': args.num_scores, 'repeats': args.repeats,
                       'device': str(device), 'precision': scorer.precision},
        }
        harness.emit(result)
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
    main()
