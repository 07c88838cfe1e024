"""LM batching (the collator), the text dataloaders, and the tokenizer."""

import numpy as np
import pytest
import torch

from composer_ext.data.text import LMCollator, build_text_dataloader, build_text_evaluators, count_tokens


def test_collator_pads_truncates_and_masks_labels():
    collate = LMCollator(pad_token_id=1, seq_len=5, eos_token_id=0)
    batch = collate([
        {'tokens': np.array([7, 8], dtype=np.uint16), 'domain': 'a', 'uid': 'a/x#0'},
        {'tokens': np.array([3, 4, 5, 6, 7, 9], dtype=np.uint16), 'domain': 'b', 'uid': 'b/y#0'},
    ])
    assert batch['input_ids'].tolist() == [[7, 8, 0, 1, 1], [3, 4, 5, 6, 7]]
    assert batch['attention_mask'].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch['labels'].tolist() == [[7, 8, 0, -100, -100], [3, 4, 5, 6, 7]]
    assert batch['domain'] == ['a', 'b'] and batch['uid'] == ['a/x#0', 'b/y#0']
    assert count_tokens(batch) == 8


def test_collator_rejects_bad_seq_len():
    with pytest.raises(ValueError, match='seq_len=1'):
        LMCollator(0, 1)


def test_tokenizer_round_trips_every_domain(corpus, tokenizer):
    from transformers import AutoTokenizer
    assert len(tokenizer) == 4096
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    reloaded = AutoTokenizer.from_pretrained(str(corpus.tokenizer_dir))
    for text in ['def f(x):\n    return x ** 2\n', '\\subsec{zeta}$\\sum_{n\\ge1} n^{-s}$', 'A: hi!\nB: héllo 🙂']:
        ids = tokenizer(text)['input_ids']
        assert tokenizer.decode(ids) == text
        assert reloaded(text)['input_ids'] == ids


def test_text_dataloader_yields_lm_batches(corpus):
    spec = build_text_dataloader(batch_size=8, domains=['code', 'prose'], seq_len=64, seed=3)
    batch = next(iter(spec.dataloader))
    assert batch['input_ids'].shape == (8, 64)
    assert set(batch['domain']) <= {'code', 'prose'}
    assert spec.get_num_tokens_in_batch(batch) == int(batch['attention_mask'].sum())
    assert torch.equal(batch['labels'][batch['attention_mask'] == 1], batch['input_ids'][batch['attention_mask'] == 1])


def test_text_dataloader_reads_your_own_mds(corpus):
    spec = build_text_dataloader(batch_size=4, local=[str(corpus.path('legal', 'val'))], shuffle=False)
    assert next(iter(spec.dataloader))['domain'] == ['legal'] * 4


def test_text_dataloader_errors(corpus, tmp_path):
    with pytest.raises(ValueError, match=r"unknown domains \['poetry'\]"):
        build_text_dataloader(batch_size=4, domains=['poetry'])
    with pytest.raises(ValueError, match='not an MDS directory'):
        build_text_dataloader(batch_size=4, local=[str(tmp_path)])
    with pytest.raises(ValueError, match='batch_size=0'):
        build_text_dataloader(batch_size=0)
    with pytest.raises(ValueError, match='either domains= .* or local='):
        build_text_dataloader(batch_size=4, domains='all', local=[str(tmp_path)])


def test_evaluators_are_labelled_by_domain_and_use_full_batches(corpus):
    evaluators = build_text_evaluators(batch_size=64, domains=['technical', 'math'], subset_num_batches=1000)
    assert [e.label for e in evaluators] == ['technical', 'math']
    for evaluator in evaluators:
        assert evaluator.subset_num_batches == len(evaluator.dataloader.dataloader)



def test_streaming_datasets_are_opened_one_job_at_a_time_per_machine(corpus):
    """Streaming picks a machine-wide shared-memory prefix by looking then creating, which races between jobs; our
    opener makes every job's local leader take one machine-wide lock first (flock: another descriptor, even in this
    process, waits for it as another job would)."""
    import threading

    from composer_ext.core.streaming import PREFIX_LOCK, open_streaming_dataset
    from composer_ext.storage import file_lock

    opened, datasets = threading.Event(), []

    def open_math():
        datasets.append(open_streaming_dataset(local=str(corpus.path('math')), batch_size=4))
        opened.set()

    with file_lock(PREFIX_LOCK):
        opener = threading.Thread(target=open_math, daemon=True)
        opener.start()
        assert not opened.wait(10)  # opening takes well under a second: it is waiting for the lock
    assert opened.wait(300) and len(datasets[0]) > 0
    opener.join()
    with pytest.raises(ValueError, match=r'attempts=0 is invalid. Fix: use an int >= 1'):
        open_streaming_dataset(attempts=0, local=str(corpus.path('math')))


def test_a_retried_open_gets_unmodified_streams(corpus, monkeypatch):
    """A single-rank job retries when another job took the shared-memory prefix; StreamingDataset had already written
    the weights onto the streams of the failed attempt, and refuses such streams, so every attempt needs fresh ones."""
    import streaming
    from streaming import Stream

    from composer_ext.core.streaming import open_streaming_dataset

    real, attempts = streaming.StreamingDataset, []

    def collide_once(**kwargs):
        attempts.append(kwargs['streams'])
        dataset = real(**kwargs)  # the first attempt gets as far as Streaming's weights, then collides
        if len(attempts) == 1:
            raise FileExistsError('[Errno 17] File exists: /000000_locals')
        return dataset

    monkeypatch.setattr(streaming, 'StreamingDataset', collide_once)
    streams = [Stream(local=str(corpus.path('math'))), Stream(local=str(corpus.path('code')))]
    dataset = open_streaming_dataset(streams=streams, batch_size=4)
    assert len(attempts) == 2 and len(dataset) > 0
    assert attempts[0] is not attempts[1] and all(not hasattr(s, 'repeat') for s in streams)  # the caller's intact


def test_the_test_harness_retries_a_prefix_collision_with_unmodified_streams(corpus, monkeypatch):
    """tests/conftest.py rebuilds a StreamingDataset whose shared-memory prefix another test process took in the same
    instant (CI runs two pytest processes side by side); the failed attempt has written weights onto the streams, so
    the retry must get them as they were (it raised "Streams must provide at most one of ..." in a slow reproduction
    run beside another test process)."""
    import streaming.base.dataset as streaming_dataset
    from streaming import Stream, StreamingDataset

    real, calls = streaming_dataset.get_shm_prefix, []

    def collide_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise FileExistsError('[Errno 17] File exists: /000000_locals')
        return real(*args, **kwargs)

    monkeypatch.setattr(streaming_dataset, 'get_shm_prefix', collide_once)
    streams = [Stream(local=str(corpus.path('math'))), Stream(local=str(corpus.path('code')))]
    dataset = StreamingDataset(streams=streams, batch_size=4)
    assert len(calls) == 2 and len(dataset) > 0
