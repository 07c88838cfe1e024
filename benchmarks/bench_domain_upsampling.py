"""Throughput of MixtureDataset over MDS shards vs one Streaming StreamingDataset over the same shards.

Reads ``--samples`` samples from the embedded corpus's per-domain MDS shards (the train split of every domain)
three ways, timed interleaved by ``harness.time_variants``:

- ``streaming``: one ``StreamingDataset`` with one ``Stream`` per domain (shuffled), the baseline;
- ``mixture_mds``: ``MixtureDataset`` over an ``MDSDataset`` per domain (what the ``text_mixture`` loader
  uses), following a schedule that switches to an upsampled mix halfway;
- ``mixture_streaming``: ``MixtureDataset`` over a ``StreamingDataset`` per domain, same schedule.

Each ratio is the variant's throughput divided by the baseline's (= baseline time / variant time); the goal is
``mixture_mds / streaming >= 0.9``. With ``--loader``, the same three go through a DataLoader with the LM
collator as well (``*_loader`` entries).

    .venv/bin/python benchmarks/bench_domain_upsampling.py                 # about a minute on 2 CPU cores
    .venv/bin/python benchmarks/bench_domain_upsampling.py --samples 50000 --repeats 7 --loader
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402

GOAL = 0.9
TARGET = {'code': 0.1, 'dialogue': 0.1, 'legal': 0.1, 'math': 0.5, 'prose': 0.1, 'technical': 0.1}


def _read(dataset, samples: int) -> int:
    count = 0
    for _ in dataset:
        count += 1
        if count == samples:
            break
    if count < samples:
        raise RuntimeError(f'the dataset ran out after {count} of {samples} samples. Fix: lower --samples.')
    return count


def _batches(loader, batches: int) -> int:
    count = 0
    for _ in loader:
        count += 1
        if count == batches:
            break
    return count


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--samples', type=int, default=20_000, help='samples read per timed call (default 20000)')
    parser.add_argument('--repeats', type=int, default=5, help='timed rounds (default 5)')
    parser.add_argument('--warmup', type=int, default=1, help='untimed rounds first (default 1)')
    parser.add_argument('--batch-size', type=int, default=16, help='batch size of the --loader variants')
    parser.add_argument('--loader', action='store_true', help='also time DataLoader + LM collator variants')
    args = parser.parse_args(argv)

    from streaming import Stream, StreamingDataset
    from torch.utils.data import DataLoader

    from composer_ext.data import LMCollator, ensure_corpus
    from composer_ext.data.mixture import MDSDataset, MixtureDataset, MixtureSchedule

    corpus = ensure_corpus()
    domains = corpus.domains
    paths = {d: str(corpus.path(d, 'train')) for d in domains}
    total = sum(MDSDataset(p).__len__() for p in paths.values())
    if not 0 < args.samples <= total:
        parser.error(f'--samples={args.samples} must be in [1, {total}] (the samples of the shards).')
    base = {d: len(MDSDataset(p)) / total for d, p in paths.items()}
    schedule = MixtureSchedule(base, TARGET, start='0.5dur', normalize=True)

    streaming = StreamingDataset(streams=[Stream(local=p) for p in paths.values()], shuffle=True, shuffle_seed=7,
                                 batch_size=args.batch_size)
    mixture_mds = MixtureDataset({d: MDSDataset(p) for d, p in paths.items()}, schedule, num_samples=args.samples,
                                 seed=7, batch_size=args.batch_size)
    mixture_streaming = MixtureDataset({d: StreamingDataset(local=p, shuffle=False, batch_size=args.batch_size)
                                        for d, p in paths.items()}, schedule, num_samples=args.samples, seed=7,
                                       batch_size=args.batch_size)
    variants = {
        'streaming': lambda: _read(streaming, args.samples),
        'mixture_mds': lambda: _read(mixture_mds, args.samples),
        'mixture_streaming': lambda: _read(mixture_streaming, args.samples),
    }
    if args.loader:
        tokenizer = corpus.load_tokenizer()
        collate = LMCollator(tokenizer.pad_token_id, 128, tokenizer.eos_token_id)
        batches = args.samples // args.batch_size
        for name in ('streaming', 'mixture_mds', 'mixture_streaming'):
            dataset = {'streaming': streaming, 'mixture_mds': mixture_mds, 'mixture_streaming': mixture_streaming}[name]
            loader = DataLoader(dataset, batch_size=args.batch_size, collate_fn=collate, drop_last=True)
            variants[f'{name}_loader'] = (lambda loader=loader: _batches(loader, batches))

    results = harness.time_variants(variants, repeats=args.repeats, warmup=args.warmup)
    ratios = {
        'mixture_mds_vs_streaming': harness.ratio(results, 'streaming', 'mixture_mds'),
        'mixture_streaming_vs_streaming': harness.ratio(results, 'streaming', 'mixture_streaming'),
    }
    if args.loader:
        ratios['mixture_mds_loader_vs_streaming_loader'] = harness.ratio(results, 'streaming_loader',
                                                                        'mixture_mds_loader')
        ratios['mixture_streaming_loader_vs_streaming_loader'] = harness.ratio(results, 'streaming_loader',
                                                                              'mixture_streaming_loader')
    harness.emit({
        'bench': 'domain_upsampling',
        'measures': 'throughput of MixtureDataset over MDS shards / throughput of one StreamingDataset over the same '
                    'shards (higher is better)',
        'samples': args.samples,
        'repeats': args.repeats,
        'samples_per_second': {name: args.samples / r['median'] for name, r in results.items()
                               if not name.endswith('_loader')},
        'throughput_ratio': ratios,
        'goal': {'mixture_mds_vs_streaming': GOAL},
        'meets_goal': ratios['mixture_mds_vs_streaming']['median'] >= GOAL,
        'times': {name: {'min': r['min'], 'median': r['median']} for name, r in results.items()},
    })
    return 0


if __name__ == '__main__':
    sys.exit(main())
