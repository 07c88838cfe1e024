"""Language-model batches over MDS text: a collator, and train/eval dataloaders over the embedded corpus.

Batches are dicts with ``input_ids``, ``attention_mask`` and ``labels`` (``-100`` on padding), plus the
samples' ``domain`` and ``uid`` as lists of strings (HuggingFace models ignore keys they do not take;
algorithms use them to account per domain).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from composer_ext.core.streaming import open_streaming_dataset
from composer_ext.data.corpus import corpus_domains, ensure_corpus
from composer_ext.data.sharding import per_rank_batch_size

__all__ = ['LMCollator', 'count_tokens', 'build_text_dataloader', 'build_text_evaluators']


class LMCollator:
    """Pad (or cut) token sequences to ``seq_len`` and build causal-LM labels.

    Args:
        pad_token_id: Id written at padded positions of ``input_ids``.
        seq_len: Length of every row. Longer samples keep their first ``seq_len`` tokens; callers that must
            not lose tokens (scoring) window samples themselves.
        eos_token_id: If given, appended to each sample that has room, so the model learns where text ends.
    """

    def __init__(self, pad_token_id: int, seq_len: int, eos_token_id: Optional[int] = None):
        if not isinstance(seq_len, int) or seq_len < 2:
            raise ValueError(f'seq_len={seq_len!r} is invalid. Fix: use an int >= 2.')
        self.pad_token_id = int(pad_token_id)
        self.seq_len = seq_len
        self.eos_token_id = eos_token_id

    def __call__(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        input_ids = torch.full((len(samples), self.seq_len), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(samples), self.seq_len), dtype=torch.long)
        for row, sample in enumerate(samples):
            tokens = np.asarray(sample['tokens'], dtype=np.int64)[:self.seq_len]
            if self.eos_token_id is not None and len(tokens) < self.seq_len:
                tokens = np.append(tokens, self.eos_token_id)
            input_ids[row, :len(tokens)] = torch.from_numpy(tokens)
            attention_mask[row, :len(tokens)] = 1
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        batch: dict[str, Any] = {'input_ids': input_ids, 'attention_mask': attention_mask, 'labels': labels}
        for key in ('domain', 'uid'):
            if all(key in s for s in samples):
                batch[key] = [s[key] for s in samples]
        return batch

    def __repr__(self) -> str:
        return f'LMCollator(pad_token_id={self.pad_token_id}, seq_len={self.seq_len}, eos_token_id={self.eos_token_id})'


def count_tokens(batch: Mapping[str, Any]) -> int:
    """Real (non-padding) tokens in an LM batch, so ``tok`` durations count text, not padding."""
    return int(batch['attention_mask'].sum().item())


def _streams(domains, local, split):
    from streaming import Stream

    if local is not None and domains is not None:
        raise ValueError('Give either domains= (embedded corpus) or local= (your own MDS directories), not both.')
    if local is not None:
        dirs = {Path(p).name: p for p in ([local] if isinstance(local, (str, Path)) else local)} \
            if not isinstance(local, Mapping) else dict(local)
        for name, path in dirs.items():
            if not (Path(path) / 'index.json').exists():
                raise ValueError(f'local={path!r} ({name}) is not an MDS directory (no index.json). '
                                 f'Fix: point it at a directory written by streaming.MDSWriter.')
        return [Stream(local=str(p)) for p in dirs.values()]
    corpus = ensure_corpus()
    return [Stream(local=str(corpus.path(d, split))) for d in corpus_domains(corpus, domains)]


def build_text_dataloader(
    batch_size: int,
    domains: Union[str, Sequence[str], None] = None,
    local: Union[str, Sequence[str], Mapping[str, str], None] = None,
    split: str = 'train',
    # seq_len .. num_workers: a deliberate twin in perplexity_pruning's selected_text builder (the YAML validator
    # checks each builder's own signature, so they cannot be shared through **kwargs)
    seq_len: int = 128,
    shuffle: bool = True,
    seed: int = 0,
    drop_last: bool = True,
    num_workers: int = 0,
):
    """A Composer ``DataSpec`` of LM batches over MDS text, sharded over ranks by Streaming.

    Args:
        batch_size: The GLOBAL batch size; each of the N ranks gets ``batch_size / N`` samples per step, so a
            config trains the same way on 1 or 8 processes.
        domains: Embedded corpus domains (``'all'``, a name, or a list); the default when ``local`` is not set.
        local: Your own MDS directories (written with ``MDSWriter``, with a ``tokens`` column) instead.
        split: ``train`` or ``val`` of the embedded corpus.
        seq_len: Tokens per row.
        shuffle: Shuffle samples (Streaming's deterministic, resumable shuffle).
        seed: Shuffle seed.
        drop_last: Drop a last partial batch.
        num_workers: DataLoader worker processes.
    """
    from composer.core import DataSpec
    from torch.utils.data import DataLoader

    per_rank = per_rank_batch_size(batch_size)
    if domains is None and local is None:
        domains = 'all'
    streams = _streams(domains, local, split)
    tokenizer = ensure_corpus().load_tokenizer()
    dataset = open_streaming_dataset(streams=streams, batch_size=per_rank, shuffle=shuffle, shuffle_seed=seed)
    loader = DataLoader(dataset, batch_size=per_rank, collate_fn=LMCollator(tokenizer.pad_token_id, seq_len,
                                                                           tokenizer.eos_token_id),
                        drop_last=drop_last, num_workers=num_workers)
    return DataSpec(loader, get_num_tokens_in_batch=count_tokens)


def build_text_evaluators(
    batch_size: int,
    domains: Union[str, Sequence[str]] = 'all',
    split: str = 'val',
    seq_len: int = 128,
    metric_names: Sequence[str] = ('LanguageCrossEntropy', 'LanguagePerplexity'),
    subset_num_batches: int = -1,
):
    """One Composer ``Evaluator`` per corpus domain, labelled by the domain name (``metrics/<domain>/...``)."""
    from composer.core import Evaluator

    evaluators = []
    for domain in corpus_domains(ensure_corpus(), domains):
        # Full batches only: Composer warns on a last batch smaller than the eval microbatch, and a fixed val
        # set minus the same few samples every time is still the same yardstick.
        spec = build_text_dataloader(batch_size, domains=[domain], split=split, seq_len=seq_len, shuffle=False,
                                     drop_last=True)
        available = len(spec.dataloader)
        subset = available if subset_num_batches < 0 else min(subset_num_batches, available)
        evaluators.append(Evaluator(label=domain, dataloader=spec, metric_names=list(metric_names),
                                    subset_num_batches=subset))
    return evaluators
