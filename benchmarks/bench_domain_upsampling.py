"""Throughput of MixtureDataset vs one Streaming StreamingDataset over the same MDS shards.

Reads ``--samples`` samples from the embedded corpus's per-domain MDS shards (the train split of every domain)
three ways, timed interleaved by ``harness.time_variants``:

- ``one_streamingdataset`` (the baseline): one ``StreamingDataset`` with one ``Stream`` per domain, shuffled;
- ``mixture_of_mdsdatasets``: ``MixtureDataset`` over one ``composer_ext.data.MDSDataset`` per domain (the
  memory-mapped reader the ``text_mixture`` YAML loader uses), following a schedule that switches to an
  upsampled mix halfway;
- ``mixture_of_streamingdatasets``: ``MixtureDataset`` over one ``StreamingDataset`` per domain (the Streaming
  path of the issue: per-domain datasets that are StreamingDatasets), same schedule.

Each ratio in ``throughput_ratio`` is ``<variant>_vs_one_streamingdataset`` = the variant's throughput divided
by the baseline's (= baseline time / variant time); the goal, for both mixtures, is at least 0.9
(``meets_goal`` per ratio). With ``--loader``, the same three also go through a DataLoader with the LM collator
(``*_loader`` entries, compared with ``one_streamingdataset_loader``).

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
    from composer_ext.domain_upsampling.mixture import MDSDataset, MixtureDataset
    from composer_ext.domain_upsampling.schedule import MixtureSchedule

    corpus = ensure_corpus()
    domains = corpus.domains
    paths = {d: str(corpus.path(d, 'train')) for d in domains}
    total = sum(MDSDataset(p).__len__() for p in paths.values())
    if not args.batch_size <= args.samples <= total:
        parser.error(f'--samples={args.samples} must be in [--batch-size={args.batch_size}, {total}] (the samples of '
                     f'the shards).')
    args.samples -= args.samples % args.batch_size  # a MixtureDataset epoch is whole batches
    base = {d: len(MDSDataset(p)) / total for d, p in paths.items()}
    schedule = MixtureSchedule(base, TARGET, start='0.5dur', normalize=True)

    baseline = 'one_streamingdataset'
    datasets = {
        baseline: StreamingDataset(streams=[Stream(local=p) for p in paths.values()], shuffle=True, shuffle_seed=7,
                                   batch_size=args.batch_size),
        'mixture_of_mdsdatasets': MixtureDataset({d: MDSDataset(p) for d, p in paths.items()}, schedule,
                                                 num_samples=args.samples, seed=7, batch_size=args.batch_size),
        'mixture_of_streamingdatasets': MixtureDataset(
            {d: StreamingDataset(local=p, shuffle=False, batch_size=args.batch_size) for d, p in paths.items()},
            schedule, num_samples=args.samples, seed=7, batch_size=args.batch_size),
    }
    variants = {name: (lambda dataset=dataset: _read(dataset, args.samples)) for name, dataset in datasets.items()}
    if args.loader:
        tokenizer = corpus.load_tokenizer()
        collate = LMCollator(tokenizer.pad_token_id, 128, tokenizer.eos_token_id)
        batches = args.samples // args.batch_size
        for name, dataset in datasets.items():
            loader = DataLoader(dataset, batch_size=args.batch_size, collate_fn=collate, drop_last=True)
            variants[f'{name}_loader'] = (lambda loader=loader: _batches(loader, batches))

    results = harness.time_variants(variants, repeats=args.repeats, warmup=args.warmup)
    ratios = {}
    for suffix in ('', '_loader') if args.loader else ('',):
        for name in ('mixture_of_mdsdatasets', 'mixture_of_streamingdatasets'):
            ratios[f'{name}{suffix}_vs_{baseline}{suffix}'] = harness.ratio(results, baseline + suffix, name + suffix)
    harness.emit({
        'bench': 'domain_upsampling',
        'measures': 'throughput of MixtureDataset (over per-domain MDSDatasets, and over per-domain '
                    'StreamingDatasets) / throughput of one StreamingDataset over the same MDS shards (higher is '
                    'better)',
        'variants': {
            baseline: 'one StreamingDataset, one Stream per domain (shuffled): the baseline',
            'mixture_of_mdsdatasets': 'MixtureDataset over one composer_ext MDSDataset per domain (text_mixture)',
            'mixture_of_streamingdatasets': 'MixtureDataset over one StreamingDataset per domain',
        },
        'samples': args.samples,
        'repeats': args.repeats,
        'samples_per_second': {name: args.samples / r['median'] for name, r in results.items()
                               if not name.endswith('_loader')},
        'throughput_ratio': ratios,
        'goal': GOAL,
        'meets_goal': {name: ratio['median'] >= GOAL for name, ratio in ratios.items()},
        'times': {name: {'min': r['min'], 'median': r['median']} for name, r in results.items()},
    })
    return 0


if __name__ == '__main__':
    sys.exit(main())
