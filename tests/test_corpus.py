"""The corpus builder: chunking, determinism, the manifest, atomic builds, MDS output."""

import json

import numpy as np
import pytest

from composer_ext.data import corpus as corpus_module
from composer_ext.data.corpus import CorpusConfig, build_corpus, chunk_document, ensure_corpus, manifest_hash
from composer_ext.data.sources import DOMAINS

SMALL = CorpusConfig(domains=('technical', 'math'), max_bytes_per_domain=200_000, vocab_size=1024,
                     shard_bytes=1 << 16)


def test_chunks_respect_the_token_limit_and_keep_all_text(tokenizer):
    text = '\n\n'.join([
        'Short paragraph one.',
        'word ' * 400,  # one paragraph far over the limit, on one line
        '\n'.join(f'line {i} of a long paragraph with many lines' for i in range(80)),
        'Tail.',
    ])
    chunks = chunk_document(text, tokenizer, 64)
    assert all(len(tokenizer(c)['input_ids']) <= 64 for c in chunks)
    # Nothing but whitespace at the cuts is lost.
    assert ''.join(''.join(c.split()) for c in chunks) == ''.join(text.split())
    assert chunks[0].startswith('Short paragraph one.')
    assert chunks[-1].endswith('Tail.')


def test_small_paragraphs_are_packed_together(tokenizer):
    text = '\n\n'.join(f'Paragraph {i}.' for i in range(10))
    assert chunk_document(text, tokenizer, 128) == [text]


def test_chunk_document_rejects_bad_limit(tokenizer):
    with pytest.raises(ValueError, match='max_tokens=0'):
        chunk_document('text', tokenizer, 0)


def test_build_is_deterministic(tmp_path):
    first = build_corpus(tmp_path / 'a', SMALL, progress=False)
    second = build_corpus(tmp_path / 'b', SMALL, progress=False)
    assert first.manifest['manifest_hash'] == second.manifest['manifest_hash']
    assert first.manifest['content_hash'] == second.manifest['content_hash']
    assert manifest_hash(first.manifest) == first.manifest['manifest_hash']
    assert (tmp_path / 'a/tokenizer/tokenizer.json').read_bytes() == (tmp_path / 'b/tokenizer/tokenizer.json').read_bytes()


def test_killed_build_leaves_nothing_and_a_rebuild_succeeds(tmp_path, monkeypatch):
    real = corpus_module._write_split
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt('killed')
        return real(*args, **kwargs)

    monkeypatch.setattr(corpus_module, '_write_split', failing)
    with pytest.raises(KeyboardInterrupt):
        ensure_corpus(SMALL, cache_dir=tmp_path, progress=False)
    corpus_dir = tmp_path / 'corpus'
    assert not (corpus_dir / SMALL.cache_name()).exists()
    assert not [p for p in corpus_dir.iterdir() if p.name.startswith('.v') and p.is_dir()]  # no temp dirs left
    monkeypatch.setattr(corpus_module, '_write_split', real)
    built = ensure_corpus(SMALL, cache_dir=tmp_path, progress=False)
    assert (built.root / 'manifest.json').exists()


def test_default_corpus_manifest(corpus):
    manifest = corpus.manifest
    assert set(manifest['domains']) == set(DOMAINS)
    for domain, entry in manifest['domains'].items():
        assert entry['bytes'] >= 1_000_000, domain
        assert entry['tokens'] > 100_000 and entry['documents'] > 100
        assert entry['train']['samples'] > entry['val']['samples'] > 50
        assert entry['sources']['packages']
    assert manifest['tokenizer']['vocab_size'] == 4096
    assert manifest_hash(manifest) == manifest['manifest_hash']
    on_disk = json.loads((corpus.root / 'manifest.json').read_text())
    assert on_disk == manifest


def test_mds_samples_round_trip_and_splits_are_disjoint(corpus, tokenizer):
    from streaming import StreamingDataset

    docs = {}
    for split in ('train', 'val'):
        dataset = StreamingDataset(local=str(corpus.path('math', split)), shuffle=False)
        uids = [dataset[i]['uid'] for i in range(len(dataset))]
        assert len(set(uids)) == len(uids)
        docs[split] = {u.rsplit('#', 1)[0] for u in uids}
        sample = dataset[len(dataset) // 2]
        assert sample['domain'] == 'math'
        assert sample['tokens'].dtype == np.uint16 and 0 < len(sample['tokens']) <= 128
        assert tokenizer.decode(sample['tokens'].tolist()) == sample['text']
    assert not docs['train'] & docs['val']


def test_corpus_rejects_bad_config():
    with pytest.raises(ValueError, match=r"unknown or no domains \['poetry'\]"):
        CorpusConfig(domains=('poetry',))
    with pytest.raises(ValueError, match='val_fraction=0.7'):
        CorpusConfig(val_fraction=0.7)
    with pytest.raises(ValueError, match='chunk_tokens=4'):
        CorpusConfig(chunk_tokens=4)


def test_corpus_path_errors(corpus):
    with pytest.raises(ValueError, match="domain='poetry'"):
        corpus.path('poetry')
    with pytest.raises(ValueError, match="split='test'"):
        corpus.path('code', 'test')
