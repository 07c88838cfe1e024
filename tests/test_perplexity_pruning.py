"""Perplexity pruning: the scorer's arithmetic, windows, bands, the reference split, the MDS reader, the score
index (kill and resume, 1 rank vs 2 ranks, a failing rank) and the errors and warnings on bad input."""

from __future__ import annotations

import json
import math
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from composer_ext.data.mds import MDSDataset
from composer_ext.perplexity_pruning.bands import band_bounds, select_band
from composer_ext.perplexity_pruning.reference_split import ReferenceSplit, ids_file_of, split_for_reference
from composer_ext.perplexity_pruning.score_index import STATUS_REFERENCE, STATUS_SCORED, ScoreIndex, ScoreIndexError
from composer_ext.perplexity_pruning.scoring import (PerplexityScorer, ReferenceModel, ScoringFailedError,
                                                     TokenizerMismatchError, TokenizerUnverifiedWarning,
                                                     UnrecordedReferenceWarning, score_mds)
from composer_ext.perplexity_pruning.selected_dataset import SelectedDataset
from composer_ext.perplexity_pruning.selection import read_selection, select_from_scores
from composer_ext.testing import Killed, run_distributed
from tests.conftest import load_example

DOMAINS = ('code', 'dialogue', 'prose')

# Most tests score a bare HuggingFace directory, which records no training data: the warning about it is
# asserted in test_scoring_warns_when_nothing_records_the_reference_data, and silenced elsewhere.
pytestmark = [pytest.mark.filterwarnings('ignore::composer_ext.perplexity_pruning.scoring.UnrecordedReferenceWarning'),
              pytest.mark.usefixtures('one_torch_thread')]




# --- fixtures ------------------------------------------------------------------------------------------------


def write_mds(path: Path, samples: list[dict], shard_bytes: int = 1 << 14) -> Path:
    from streaming import MDSWriter
    columns = {'text': 'str', 'tokens': 'ndarray:uint16', 'domain': 'str', 'uid': 'str'}
    columns = {k: v for k, v in columns.items() if k in samples[0]}
    with MDSWriter(out=str(path), columns=columns, compression=None, size_limit=shard_bytes,
                   progress_bar=False) as writer:
        for sample in samples:
            writer.write(sample)
    return path


@pytest.fixture(scope='module')
def small_mds(tmp_path_factory, corpus):
    """180 real corpus samples (60 each of three domains) in about ten small shards."""
    samples = []
    for domain in DOMAINS:
        data = MDSDataset(corpus.path(domain, 'train'))
        samples.extend(data[i] for i in range(60))
    return write_mds(tmp_path_factory.mktemp('mds') / 'data', samples)


def tiny_gpt(tokenizer, seed: int = 0, n_positions: int = 32):
    from composer_ext.models import small_gpt
    torch.manual_seed(seed)
    model = small_gpt(n_layer=1, n_embd=32, n_head=2, n_positions=n_positions, tokenizer=tokenizer)
    return model.model.eval()


@pytest.fixture(scope='module')
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A small GPT with random weights saved as a HuggingFace directory (model + tokenizer)."""
    path = tmp_path_factory.mktemp('model') / 'hf'
    tiny_gpt(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _arrays(index: ScoreIndex) -> dict[str, np.ndarray]:
    return {'mean_nll': index.mean_nll, 'perplexity': index.perplexity, 'num_tokens': index.num_tokens,
            'status': index.status, 'domain': index.domain_codes, 'uid': index.uids}


def _assert_same_scores(a: ScoreIndex, b: ScoreIndex) -> None:
    for name, value in _arrays(a).items():
        other = _arrays(b)[name]
        if value.dtype.kind == 'f':
            assert np.array_equal(value, other, equal_nan=True), name
        else:
            assert np.array_equal(value, other), name


# --- the score: exp(mean NLL), padding excluded, windows -----------------------------------------------------


def unigram_gpt(probabilities: np.ndarray):
    """A GPT-2 whose every weight is zero except the final norm bias and output layer, so that at every position
    the next-token distribution is exactly ``probabilities`` (hand-checkable NLLs)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    config = GPT2Config(vocab_size=len(probabilities), n_positions=16, n_embd=4, n_layer=1, n_head=1,
                        tie_word_embeddings=False)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        model.transformer.ln_f.bias[0] = 1.0             # hidden state = ln_f(0) = its bias = e_0
        model.lm_head.weight[:, 0] = torch.from_numpy(np.log(probabilities)).float()
    return model.eval()


def test_perplexity_is_exp_mean_nll_on_a_hand_checked_case_with_padding(tmp_path, tokenizer):
    probabilities = np.array([1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 32, 1 / 64, 1 / 128, 1 / 128])
    model = unigram_gpt(probabilities)
    samples = [[0, 1, 2], [3, 0], [1, 1, 1, 1, 5], [7]]
    scorer = PerplexityScorer(model, batch_size=3)
    nll_sum, num_tokens = scorer.score(samples)
    ln2 = math.log(2)
    # Targets are tokens 1..n-1: -log p = (t+1) ln 2 for t < 7. [0,1,2] -> 2+3; [3,0] -> 1; [1,1,1,1,5] -> 2+2+2+6.
    assert num_tokens.tolist() == [2, 1, 4, 0]
    np.testing.assert_allclose(nll_sum[:3], [5 * ln2, 1 * ln2, 12 * ln2], rtol=1e-6)
    # The same through the score index: padding (rows 2 and 4 are shorter than row 3) is not counted.
    data = write_mds(tmp_path / 'data', [{'tokens': np.array(s, dtype=np.uint16), 'domain': 'x', 'uid': f'u{i}'}
                                         for i, s in enumerate(samples)])
    with pytest.warns(TokenizerUnverifiedWarning, match=r'has token ids but no `text` column.*vocabulary of'):
        index = score_mds(model, data, tmp_path / 'scores', tokenizer=tokenizer, batch_size=3, progress=False)
    np.testing.assert_allclose(index.mean_nll[:3], [2.5 * ln2, ln2, 3 * ln2], rtol=1e-6)
    np.testing.assert_allclose(index.perplexity[:3], [2 ** 2.5, 2.0, 8.0], rtol=1e-6)
    np.testing.assert_allclose(index.perplexity[:3], np.exp(index.mean_nll[:3]), rtol=0)
    assert index.status.tolist() == [0, 0, 0, 2] and math.isnan(index.perplexity[3])  # one token: no target
    assert index.uids.tolist() == ['u0', 'u1', 'u2', 'u3']
    # max_tokens scores what training on the first seq_len tokens sees: [0,1,|2] -> 2; [3,0] -> 1; [1,1,|1,1,5] -> 2.
    with pytest.warns(TokenizerUnverifiedWarning):
        cut = score_mds(model, data, tmp_path / 'cut', tokenizer=tokenizer, batch_size=3, max_tokens=2,
                        progress=False)
    assert cut.num_tokens.tolist() == [1, 1, 1, 0] and cut.meta['identity']['max_tokens'] == 2
    np.testing.assert_allclose(cut.mean_nll[:3], [2 * ln2, ln2, 2 * ln2], rtol=1e-6)
    with pytest.raises(ValueError, match=r'max_tokens=1 is invalid: it must be an int >= 2\. Fix: pass the seq_len'):
        score_mds(model, data, tmp_path / 'bad', tokenizer=tokenizer, max_tokens=1, progress=False)


@pytest.mark.parametrize('stride', [3, 15])
def test_long_samples_are_scored_in_windows_predicting_every_token_once(tokenizer, stride):
    model = tiny_gpt(tokenizer, n_positions=16)
    scorer = PerplexityScorer(model, batch_size=4, stride=stride)
    rng = np.random.default_rng(0)
    samples = [rng.integers(0, len(tokenizer), n) for n in (2, 9, 16, 17, 35, 5)]
    nll_sum, num_tokens = scorer.score(samples)
    assert num_tokens.tolist() == [len(s) - 1 for s in samples]  # nothing truncated
    for sample, total in zip(samples, nll_sum):
        expected, predicted = 0.0, []
        for start, end, first, stop in scorer.windows(len(sample)):
            assert end - start <= 16 and (start == 0 or first - start >= 16 - stride)  # context after window 1
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor(sample[start:end])[None]).logits[0].double(), -1)
            for target in range(first, stop):
                expected -= logp[target - start - 1, sample[target]].item()
                predicted.append(target)
        assert predicted == list(range(1, len(sample)))
        assert total == pytest.approx(expected, rel=1e-5)


def _tiny_causal_lms():
    from transformers import (Gemma2Config, Gemma2ForCausalLM, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig,
                              LlamaForCausalLM, OPTConfig, OPTForCausalLM)
    torch.manual_seed(0)
    return {
        'llama': LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                              num_attention_heads=2, num_key_value_heads=2,
                                              max_position_embeddings=32)),
        'gpt_neox': GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=96, hidden_size=16, intermediate_size=32,
                                                     num_hidden_layers=1, num_attention_heads=2,
                                                     max_position_embeddings=32)),
        'opt': OPTForCausalLM(OPTConfig(vocab_size=96, hidden_size=16, ffn_dim=32, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=32, word_embed_proj_dim=16)),
        # Soft-capped logits are not lm_head(hidden): the probe must fall back to the full forward.
        'gemma2': Gemma2ForCausalLM(Gemma2Config(vocab_size=96, hidden_size=16, intermediate_size=32,
                                                 num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                                 head_dim=8, max_position_embeddings=32,
                                                 final_logit_softcapping=0.5)),
    }


def test_chunked_output_layer_is_used_only_where_it_reproduces_the_models_logits():
    rng = np.random.default_rng(1)
    samples = [rng.integers(0, 96, n) for n in (3, 12, 32, 50)]
    for name, model in _tiny_causal_lms().items():
        scorer = PerplexityScorer(model.eval(), batch_size=3)
        assert scorer.fast_path == (name != 'gemma2'), name
        nll_sum, _ = scorer.score(samples)
        scorer.fast_path = False
        full_forward, _ = scorer.score(samples)
        np.testing.assert_allclose(nll_sum, full_forward, rtol=1e-5, err_msg=name)


# --- bands ---------------------------------------------------------------------------------------------------


def _percentile_definition(scores: np.ndarray, band: str, keep: float) -> np.ndarray:
    valid = scores[~np.isnan(scores)]
    with np.errstate(invalid='ignore'):
        if band == 'low':
            mask = scores <= np.percentile(valid, 100 * keep)
        elif band == 'high':
            mask = scores >= np.percentile(valid, 100 * (1 - keep))
        else:
            mask = (scores >= np.percentile(valid, 50 - 50 * keep)) & (scores <= np.percentile(valid, 50 + 50 * keep))
    return np.flatnonzero(mask)


def _rank_definition(scores: np.ndarray, band: str, keep: float) -> np.ndarray:
    """The band by ranks, for scores without ties: the k = round(keep * n) lowest / middle / highest."""
    valid = np.flatnonzero(~np.isnan(scores))
    ranked = valid[np.argsort(scores[valid])]
    count = round(keep * len(valid))
    start = {'low': 0, 'medium': (len(valid) - count) // 2, 'high': len(valid) - count}[band]
    return np.sort(ranked[start:start + count])


@pytest.mark.parametrize('keep', [0.1, 0.25, 0.5, 0.9, 1.0])
def test_band_selection_without_ties_is_the_rank_band_within_one_sample_of_the_percentiles(keep):
    rng = np.random.default_rng(7)
    scores = np.exp(rng.normal(3.0, 1.0, 5001))
    scores[rng.choice(5001, 300, replace=False)] = np.nan  # not scored: never selected
    for band in ('low', 'medium', 'high'):
        chosen = select_band(scores, band, keep)
        assert np.array_equal(chosen, _rank_definition(scores, band, keep)), band
        assert chosen.dtype == np.int64 and np.all(np.diff(chosen) > 0)
        assert len(chosen) == round(keep * 4701)
        assert not np.isnan(scores[chosen]).any()
        # The paper's percentile rule differs from it by at most one sample at each edge.
        assert len(np.setxor1d(chosen, _percentile_definition(scores, band, keep))) <= 2, band
        low, high = band_bounds(scores, band, keep)
        kept = np.sort(scores[chosen])
        assert (low, high) == ({'low': -np.inf}.get(band, kept[0]), {'high': np.inf}.get(band, kept[-1]))
    ordered = np.sort(scores[~np.isnan(scores)])
    start = (4701 - round(keep * 4701)) // 2
    assert band_bounds(scores, 'medium', keep) == (ordered[start], ordered[start + round(keep * 4701) - 1])


def test_random_band_and_per_domain_quantiles():
    rng = np.random.default_rng(3)
    scores = rng.gamma(2.0, 10.0, 4000)
    scores[:100] = np.nan
    chosen = select_band(scores, 'random', 0.5, seed=1)
    assert len(chosen) == 1950 and np.all(np.diff(chosen) > 0) and not np.isnan(scores[chosen]).any()
    assert np.array_equal(chosen, select_band(scores, 'random', 0.5, seed=1))
    assert not np.array_equal(chosen, select_band(scores, 'random', 0.5, seed=2))
    # Per domain: the percentiles are taken within each domain, so every domain keeps its share.
    domains = np.where(np.arange(4000) % 3 == 0, 'a', 'b')
    scores[domains == 'a'] *= 10.0  # domain a has much higher perplexity
    chosen = select_band(scores, 'low', 0.5, domains=domains)
    for label in ('a', 'b'):
        members = np.flatnonzero((domains == label) & ~np.isnan(scores))
        assert np.array_equal(np.intersect1d(chosen, members), members[_percentile_definition(scores[members],
                                                                                             'low', 0.5)])
    assert np.isin(np.flatnonzero(domains == 'a'), select_band(scores, 'low', 0.5)).sum() < 50  # globally: dropped


@pytest.mark.parametrize('keep', [0, 0.0, -0.5, 1.5, True, 'half'])
def test_keep_outside_zero_one_is_rejected_with_a_fix(keep):
    with pytest.raises(ValueError, match=r'keep=.* is outside \(0, 1\]\. Fix: pass the share'):
        select_band(np.ones(10), 'low', keep)


def test_unknown_band_and_bad_scores_are_rejected():
    with pytest.raises(ValueError, match=r"band='mediun' is not a band\. Did you mean 'medium'\?.*Fix: use one of"):
        select_band(np.ones(10), 'mediun', 0.5)
    with pytest.raises(ValueError, match=r'scores has shape \(2, 5\); expected one score per sample'):
        select_band(np.ones((2, 5)), 'low', 0.5)
    with pytest.raises(ValueError, match=r'scores has no score to select from \(3 entries, all NaN\)'):
        select_band(np.full(3, np.nan), 'high', 0.5)
    with pytest.raises(ValueError, match='domains has 3 labels for 10 scores'):
        select_band(np.ones(10), 'low', 0.5, domains=['a', 'b', 'c'])


def test_tied_scores_keep_exactly_the_asked_share_and_break_edge_ties_by_seed():
    # The review's two cases: the percentile rule kept 5 of 10 here (every 1.0 is <= P(20) = 1.0) ...
    scores = np.array([1., 1, 1, 1, 1, 2, 3, 4, 5, 6])
    for seed in range(5):
        chosen = select_band(scores, 'low', keep=0.2, seed=seed)
        assert len(chosen) == 2 and set(chosen) <= {0, 1, 2, 3, 4}
        assert np.array_equal(chosen, select_band(scores, 'low', keep=0.2, seed=seed))
    # ... and all 10 of ten equal scores at keep=0.5.
    for band in ('low', 'medium', 'high'):
        assert len(select_band(np.full(10, 3.0), band, keep=0.5, seed=1)) == 5, band
    # Which of the tied samples are kept depends on the seed, not on their position.
    picks = {tuple(select_band(scores, 'low', keep=0.2, seed=seed)) for seed in range(20)}
    assert len(picks) > 1 and set(np.concatenate([list(p) for p in picks])) == {0, 1, 2, 3, 4}


def test_ties_straddling_each_band_edge_hand_computed():
    # sorted: 1(id3) 2(ids 1,4,9) 2 2 3(id7) 4(id5) 5(ids 0,6) 5 6(id8) 7(id2); keep=0.3 of 10 -> 3 samples
    scores = np.array([5., 2, 7, 1, 2, 4, 5, 3, 6, 2])
    expected = {  # band: (ids always kept, tied ids at the edge, how many of those are kept)
        'low': ({3}, {1, 4, 9}, 2),       # ranks 0-2
        'medium': ({7, 5}, {1, 4, 9}, 1),  # ranks 3-5: (10 - 3) // 2 = 3 ranks below the band
        'high': ({8, 2}, {0, 6}, 1),       # ranks 7-9
    }
    for band, (sure, tied, count) in expected.items():
        seen = set()
        for seed in range(20):
            chosen = set(select_band(scores, band, keep=0.3, seed=seed).tolist())
            assert len(chosen) == 3 and sure <= chosen and len(chosen & tied) == count, (band, seed, chosen)
            assert chosen <= sure | tied
            seen |= chosen & tied
        assert seen == tied, band  # every tied sample is kept under some seed
        low, high = band_bounds(scores, band, 0.3)
        assert (low, high) == {'low': (-np.inf, 2.0), 'medium': (2.0, 4.0), 'high': (5.0, np.inf)}[band]


@pytest.mark.parametrize('size', [1, 2, 7, 10, 101, 1000])
def test_every_band_keeps_exactly_round_keep_times_n(size):
    rng = np.random.default_rng(size)
    scores = rng.integers(0, 4, size).astype(float)  # many ties
    scores[rng.random(size) < 0.1] = np.nan
    if np.isnan(scores).all():
        scores[0] = 1.0
    scored = int((~np.isnan(scores)).sum())
    for keep in (0.1, 0.25, 0.5, 0.9, 1.0):
        for band in ('low', 'medium', 'high', 'random'):
            chosen = select_band(scores, band, keep, seed=3)
            assert len(chosen) == round(keep * scored), (band, keep)
            assert np.all(np.diff(chosen) > 0) and not np.isnan(scores[chosen]).any()
            assert np.array_equal(chosen, select_band(scores.copy(), band, keep, seed=3))


@pytest.mark.parametrize('seed', [1.5, '0', None, True])
def test_seed_that_is_not_an_int_is_rejected_with_a_fix(seed):
    with pytest.raises(TypeError, match=r'seed=.* is not an int\. Fix: pass an int seed'):
        select_band(np.ones(10), 'low', 0.5, seed=seed)


# --- the reference split ---------------------------------------------------------------------------------------


def test_reference_split_is_disjoint_reproducible_and_verified(tmp_path, small_mds):
    split = split_for_reference(small_mds, fraction=0.25, seed=3)
    reference, remainder = split.reference_ids, split.remainder_ids
    assert len(reference) == 45 and len(remainder) == 135
    assert np.array_equal(np.sort(np.concatenate([reference, remainder])), np.arange(180))
    assert np.array_equal(reference, split_for_reference(small_mds, 0.25, seed=3).reference_ids)
    assert not np.array_equal(reference, split_for_reference(small_mds, 0.25, seed=4).reference_ids)
    assert split.data_fingerprint == MDSDataset(small_mds).index_fingerprint
    assert eval(repr(split)) == split
    path = split.save(tmp_path / 'split.json')
    assert ids_file_of(path) == tmp_path / 'split.ids.npy'
    assert np.array_equal(np.load(ids_file_of(path)), reference)
    assert ReferenceSplit.load(path) == split
    record = json.loads(path.read_text())
    assert record['ids_file'] == 'split.ids.npy' and record['reference_sha256'] == split.reference_sha256
    with pytest.raises(ValueError, match=r'reference_ids \(3 ids\) are not 45 sorted, unique ids'):
        ReferenceSplit(180, 0.25, reference_ids=[0, 1, 2])
    with pytest.raises(ValueError, match=r'reference_ids \(45 ids\) are not 45 sorted, unique ids'):
        ReferenceSplit(180, 0.25, reference_ids=np.r_[reference[:-1], reference[0]])
    # An altered ids file, or a lost one, is refused; the seed in the JSON is informational once ids are recorded.
    np.save(ids_file_of(path), np.r_[reference[:-1], 179 if reference[-1] != 179 else 178])
    with pytest.raises(ValueError, match=r'split\.ids\.npy.* does not match the SHA-256 stored in'):
        ReferenceSplit.load(path)
    ids_file_of(path).unlink()
    with pytest.raises(ValueError, match=r'has lost its ids file .*split\.ids\.npy.*Fix: restore it'):
        ReferenceSplit.load(path)
    # A split file of the first format (no ids) is redrawn from its seed and checked against its hash.
    legacy = tmp_path / 'legacy.json'
    legacy.write_text(json.dumps({**record, 'format': 'composer_ext.reference_split/v1'}))
    assert ReferenceSplit.load(legacy) == split
    legacy.write_text(json.dumps({**record, 'format': 'composer_ext.reference_split/v1', 'seed': 4}))
    with pytest.raises(ValueError, match='do not match the stored hash'):
        ReferenceSplit.load(legacy)
    with pytest.raises(ValueError, match=r'fraction=1\.0 is outside \(0, 1\)\. Fix:'):
        split_for_reference(small_mds, 1.0)
    with pytest.raises(ValueError, match='is not an MDS directory'):
        split_for_reference(tmp_path, 0.5)
    assert len(split_for_reference(1000, 0.1).reference_ids) == 100  # a sample count works too


def test_a_saved_split_is_read_back_without_redrawing_it(tmp_path, small_mds, monkeypatch):
    """The recorded ids are the split: reading it (and a checkpoint record naming its file) never calls numpy's
    random generator, so a numpy whose stream differs still gets the same ids."""
    split = split_for_reference(small_mds, fraction=0.25, seed=3)
    path = split.save(tmp_path / 'split.json')
    provenance = split.provenance('remainder', split_file=path)

    def no_redraw(*args, **kwargs):
        raise AssertionError('the ids were redrawn instead of read')

    monkeypatch.setattr(np.random, 'default_rng', no_redraw)
    loaded = ReferenceSplit.load(path)
    assert np.array_equal(loaded.reference_ids, split.reference_ids) and loaded == split
    from_record = ReferenceSplit.from_provenance(provenance)
    assert np.array_equal(from_record.ids('remainder'), split.remainder_ids)
    with pytest.raises(AssertionError, match='redrawn'):  # without the file it must redraw, which is what failed
        ReferenceSplit.from_provenance({**provenance, 'split_file': str(tmp_path / 'gone.json')})
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r'ids cannot be recovered: its split file .* gone .*--reference-split'):
        ReferenceSplit.from_provenance({**provenance, 'split_file': str(tmp_path / 'gone.json'),
                                        'reference_sha256': '0' * 64})


def test_selected_dataset_reads_by_sample_id_from_mds_streaming_and_map_style(small_mds):
    from streaming import StreamingDataset
    ids = [0, 17, 179, 64]
    mds = MDSDataset(small_mds)
    selected = SelectedDataset(small_mds, ids)
    assert len(selected) == 4 and selected[2]['sample_id'] == 179
    assert [s['uid'] for s in selected] == [mds[i]['uid'] for i in ids]
    streaming = StreamingDataset(local=str(small_mds), batch_size=1, shuffle=False)
    via_streaming = SelectedDataset(streaming, ids)
    assert via_streaming.num_base_samples == 180
    assert [s['uid'] for s in via_streaming] == [mds[i]['uid'] for i in ids]
    assert SelectedDataset(list(range(100, 200)), [3, 5])[1] == 105  # any map-style dataset
    state = selected.state_dict(0, True)['composer_ext_selection']
    assert state['kind'] == 'ids' and state['num_selected'] == 4 and state['data_index_fingerprint'] == \
        mds.index_fingerprint
    with pytest.raises(ValueError, match=r'indices range over \[0, 180\] but the dataset has 180 samples'):
        SelectedDataset(small_mds, [0, 180])
    with pytest.raises(ValueError, match='indices is empty'):
        SelectedDataset(small_mds, [])


# --- the score index: resume after a kill, ranks, bad input ----------------------------------------------------


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory, small_mds, tiny_model_dir):
    out = tmp_path_factory.mktemp('scores') / 'full'
    return score_mds(tiny_model_dir, small_mds, out, batch_size=16, progress=False)


def test_a_killed_scoring_run_resumes_and_gives_identical_scores(tmp_path, small_mds, tiny_model_dir, uninterrupted):
    num_shards = MDSDataset(small_mds).num_shards
    assert num_shards >= 6
    out = tmp_path / 'scores'
    finished = []

    def crash_after_three(shard):
        finished.append(shard)
        if len(finished) == 3:
            raise Killed('simulated crash after 3 shards')

    with pytest.raises(Killed):
        score_mds(tiny_model_dir, small_mds, out, batch_size=16, progress=False, on_shard_done=crash_after_three)
    with pytest.raises(ScoreIndexError, match=r'is incomplete: scoring stopped after 3 of \d+ shards\. Fix: rerun'):
        ScoreIndex(out)
    # A crash between a shard's npz and its marker, and a temporary file of a crash mid-write.
    (out / 'shards' / f'{finished[-1]:05d}.json').unlink()
    (out / 'shards' / '.00009.npz.tmp-dead').write_bytes(b'partial')
    rescored = []
    resumed = score_mds(tiny_model_dir, small_mds, out, batch_size=16, progress=False, on_shard_done=rescored.append)
    assert sorted(rescored) == sorted(set(range(num_shards)) - set(finished[:2]))
    _assert_same_scores(resumed, uninterrupted)
    assert not list((out / 'shards').glob('.*tmp*'))
    assert resumed.data_content_fingerprint == uninterrupted.data_content_fingerprint
    # A complete index is not redone.
    again = []
    score_mds(tiny_model_dir, small_mds, out, batch_size=16, progress=False, on_shard_done=again.append)
    assert again == []


def test_scores_refuse_other_data_other_settings_and_a_foreign_tokenizer(tmp_path, small_mds, tiny_model_dir,
                                                                         uninterrupted, tokenizer, corpus):
    # The index knows which data it describes.
    other = write_mds(tmp_path / 'other', [MDSDataset(corpus.path('legal', 'train'))[i] for i in range(20)])
    with pytest.raises(ScoreIndexError, match=r'does not describe data=.*Fix: score this data'):
        uninterrupted.check_data(other)
    with pytest.raises(ScoreIndexError, match='does not describe data='):
        select_from_scores(uninterrupted.path, 'low', 0.5, tmp_path / 'sel', data=other)
    # Resuming into an index written with other settings.
    with pytest.raises(ScoreIndexError, match=r'holds scores of a different scoring run .*batch_size.*--overwrite'):
        score_mds(tiny_model_dir, small_mds, uninterrupted.path, batch_size=8, progress=False)
    with pytest.raises(ScoreIndexError, match=r'does not exist\. Fix: write a score index first'):
        ScoreIndex(tmp_path / 'nothing')
    # Tokens that the model's tokenizer does not produce from the text.
    samples = [MDSDataset(small_mds)[i] for i in range(10)]
    shifted = write_mds(tmp_path / 'shifted', [{**s, 'tokens': (s['tokens'].astype(np.int64) + 1).astype(np.uint16)}
                                               for s in samples])
    with pytest.raises(TokenizerMismatchError, match=r'tokenizer mismatch: sample 0 .*--retokenize'):
        score_mds(tiny_model_dir, shifted, tmp_path / 'shifted_scores', progress=False)
    fixed = score_mds(tiny_model_dir, shifted, tmp_path / 'retokenized', retokenize=True, progress=False)
    np.testing.assert_allclose(fixed.mean_nll, uninterrupted.mean_nll[:10], rtol=1e-6)  # other batches


def test_reference_split_samples_are_left_out_unless_asked(tmp_path, small_mds, tiny_model_dir, uninterrupted):
    split = split_for_reference(small_mds, 0.25, seed=0)
    split_file = split.save(tmp_path / 'split.json')
    index = score_mds(tiny_model_dir, small_mds, tmp_path / 'scores', reference_split=split_file, progress=False)
    assert np.all(index.status[split.reference_ids] == STATUS_REFERENCE)
    assert np.all(index.status[split.remainder_ids] == STATUS_SCORED)
    assert np.isnan(index.perplexity[split.reference_ids]).all()
    # Equal up to float rounding: leaving samples out changes which windows share a batch.
    np.testing.assert_allclose(index.mean_nll[split.remainder_ids], uninterrupted.mean_nll[split.remainder_ids],
                               rtol=1e-6)
    assert not np.isin(select_band(index, 'high', 1.0), split.reference_ids).any()
    forced = score_mds(tiny_model_dir, small_mds, tmp_path / 'forced', reference_split=split_file,
                       score_reference_samples=True, progress=False)
    assert np.all(forced.status == STATUS_SCORED) and forced.meta['reference']['score_reference_samples']
    with pytest.raises(ValueError, match='does not match data='):
        other = write_mds(tmp_path / 'other', [MDSDataset(small_mds)[i] for i in range(30)])
        score_mds(tiny_model_dir, other, tmp_path / 'x', reference_split=split_file, progress=False)


# --- the MDS reader (also MixtureDataset's) ------------------------------------------------------------------


def test_mds_dataset_random_access_matches_whole_shard_reads_raw_and_compressed(tmp_path, small_mds):
    from streaming import MDSWriter
    mds = MDSDataset(small_mds)
    whole = [sample for shard in range(mds.num_shards) for sample in mds.read_shard(shard)[0]]
    assert len(whole) == len(mds) == 180
    for i in (0, 1, 17, 95, 179, -1, -180):
        assert mds[i]['uid'] == whole[i]['uid'] and np.array_equal(mds[i]['tokens'], whole[i]['tokens'])
    assert mds[np.int64(5)]['uid'] == whole[5]['uid']
    assert 0 < len(mds._maps) <= mds.num_shards  # raw shards are mapped once, then kept
    copy = pickle.loads(pickle.dumps(mds))
    assert copy._maps == {} and copy[42]['uid'] == whole[42]['uid']  # maps stay in their process
    with pytest.raises(IndexError, match=r'index=180 is out of range for 180 samples .*Fix: use a global sample id'):
        mds[180]
    with pytest.raises(IndexError, match=r'index=-181 is out of range for 180 samples'):
        mds[-181]
    with pytest.raises(TypeError, match=r"index='3' is not an int"):
        mds['3']
    # Compressed shards (only the .zstd file present) read the same samples, through the decompression cache.
    zipped = tmp_path / 'zipped'
    with MDSWriter(out=str(zipped), columns=mds.columns, compression='zstd', size_limit=1 << 14,
                   progress_bar=False) as writer:
        for sample in whole:
            writer.write(sample)
    for raw in zipped.glob('shard.*.mds'):
        raw.unlink()
    compressed = MDSDataset(zipped)
    assert compressed.num_shards > 1 and compressed.shard_file(0).suffix == '.zstd'
    assert [compressed[i]['uid'] for i in (179, 0, 3, 100)] == [whole[i]['uid'] for i in (179, 0, 3, 100)]
    assert [s['uid'] for s in compressed] == [s['uid'] for s in whole]  # whole-shard reads decompress too
    assert compressed._maps == {}


def test_mds_dataset_refuses_unsafe_columns_and_empty_or_broken_directories(tmp_path):
    from streaming import MDSWriter
    with MDSWriter(out=str(tmp_path / 'pkl'), columns={'obj': 'pkl', 'uid': 'str'}, progress_bar=False) as writer:
        writer.write({'obj': {'a': 1}, 'uid': 'x'})
    with pytest.raises(ValueError, match=r"unsafe encodings \{'obj': 'pkl'\}.*Fix: pass allow_unsafe_types=True"):
        MDSDataset(tmp_path / 'pkl')
    trusted = MDSDataset(tmp_path / 'pkl', allow_unsafe_types=True)
    assert trusted[0]['obj'] == {'a': 1}
    assert pickle.loads(pickle.dumps(trusted)).allow_unsafe_types and eval(repr(trusted), {'MDSDataset': MDSDataset})
    with pytest.raises(TypeError, match=r"allow_unsafe_types='yes' is not a bool"):
        MDSDataset(tmp_path / 'pkl', allow_unsafe_types='yes')
    (tmp_path / 'empty').mkdir()
    (tmp_path / 'empty' / 'index.json').write_text(json.dumps({'version': 2, 'shards': []}))
    with pytest.raises(ValueError, match=r'lists no shards\. Fix: write at least one sample'):
        MDSDataset(tmp_path / 'empty')
    (tmp_path / 'pkl' / 'shard.00000.mds').unlink()
    with pytest.raises(ValueError, match=r'shard file .*shard\.00000\.mds is missing .*Fix: restore'):
        MDSDataset(tmp_path / 'pkl', allow_unsafe_types=True)
    from composer_ext.domain_upsampling.mixture import MDSDataset as MixtureMDSDataset
    assert MixtureMDSDataset is MDSDataset  # one reader for mixtures and pruning


# --- which samples trained the reference model ---------------------------------------------------------------


def test_scoring_warns_when_nothing_records_the_reference_data(tmp_path, small_mds, tiny_model_dir):
    with pytest.warns(UnrecordedReferenceWarning, match=r"huggingface '.*hf' has no training-data record.*"
                                                         r'--reference-split'):
        score_mds(tiny_model_dir, small_mds, tmp_path / 'a', batch_size=16, progress=False)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # stating that every sample is to be scored is an answer: no warning
        index = score_mds(tiny_model_dir, small_mds, tmp_path / 'b', batch_size=16, score_reference_samples=True,
                          progress=False)
    assert np.all(index.status == STATUS_SCORED)


def test_a_checkpoint_record_of_other_data_is_refused_and_of_this_data_is_used(tmp_path, small_mds, tokenizer, corpus):
    model = tiny_gpt(tokenizer)
    other = write_mds(tmp_path / 'other', [MDSDataset(corpus.path('legal', 'train'))[i] for i in range(40)])
    trained_elsewhere = SelectedDataset(other, np.arange(0, 40, 2)).state_dict()['composer_ext_selection']
    reference = ReferenceModel(model, tokenizer, {'kind': 'composer_checkpoint', 'path': 'ref.pt'}, trained_elsewhere)
    with pytest.raises(ValueError, match=r'trained on 20 samples of .*other.*not of data=.*--score-reference-samples'):
        score_mds(reference, small_mds, tmp_path / 'refused', progress=False)
    assert not (tmp_path / 'refused').exists()
    forced = score_mds(reference, small_mds, tmp_path / 'forced', score_reference_samples=True, progress=False)
    assert np.all(forced.status == STATUS_SCORED) and forced.meta['reference']['same_data'] is False
    # A record of this data names its ids itself (a small selection): exactly those are left out.
    trained_here = SelectedDataset(small_mds, [150, 3, 77]).state_dict()['composer_ext_selection']
    assert trained_here['ids'] == [3, 77, 150]
    here = score_mds(ReferenceModel(model, tokenizer, {'kind': 'composer_checkpoint'}, trained_here), small_mds,
                     tmp_path / 'here', progress=False)
    assert np.flatnonzero(here.status == STATUS_REFERENCE).tolist() == [3, 77, 150]
    assert 'ids' not in here.meta['reference']['trained_on']  # meta.json keeps the hash, not the list
    # A split passed by hand must be the one the checkpoint trained on.
    split = split_for_reference(small_mds, 0.25, seed=0)
    record = SelectedDataset(small_mds, split.reference_ids,
                             provenance=split.provenance('reference')).state_dict()['composer_ext_selection']
    wrong = split_for_reference(small_mds, 0.25, seed=1).save(tmp_path / 'wrong.json')
    with pytest.raises(ValueError, match=r'reference_split=.*wrong\.json.* is not the split the reference model'):
        score_mds(ReferenceModel(model, tokenizer, {'kind': 'composer_checkpoint'}, record), small_mds,
                  tmp_path / 'x', reference_split=wrong, progress=False)


# --- a failing rank, a stale index, a half-written selection ---------------------------------------------------


def _fail_on_rank_one_then_resume(model_dir, data, out):
    """Rank 1 dies after its first shard (rank 0 goes on); both must raise, then a rerun on both ranks resumes."""
    import warnings

    from composer.utils import dist
    warnings.simplefilter('ignore', UnrecordedReferenceWarning)
    rank = dist.get_global_rank()
    first = []

    def crash(shard):
        first.append(shard)
        if rank == 1:
            raise Killed(f'simulated crash on rank 1 after shard {shard}')

    try:
        score_mds(model_dir, data, out, batch_size=16, progress=False, on_shard_done=crash)
        failure = None
    except (Killed, ScoringFailedError) as err:
        failure = (type(err).__name__, str(err))
    resumed = []
    index = score_mds(model_dir, data, out, batch_size=16, progress=False, on_shard_done=resumed.append)
    return failure, first, resumed, index.mean_nll


@pytest.mark.distributed
def test_two_ranks_give_exactly_the_one_rank_scores_even_after_a_rank_fails(tmp_path, small_mds, tiny_model_dir,
                                                                            uninterrupted):
    """One spawn of two ranks checks three things: a failing rank stops both (no rank left waiting in a
    collective), the rerun resumes where each stopped, and the result equals the single-process scores."""
    out = tmp_path / 'scores'
    (fail0, first0, resumed0, nll0), (fail1, first1, resumed1, nll1) = run_distributed(
        _fail_on_rank_one_then_resume, world_size=2, args=(str(tiny_model_dir), str(small_mds), str(out)))
    assert fail1[0] == 'Killed' and 'simulated crash on rank 1' in fail1[1]
    assert fail0[0] == 'ScoringFailedError' and 'failed on rank 1 while scoring its shards (Killed:' in fail0[1]
    num_shards = MDSDataset(small_mds).num_shards
    # Rank 0 scored all of its shards, rank 1 one before dying; the rerun scored exactly the rest, split over ranks.
    assert len(first1) == 1 and len(first0) == (num_shards + 1) // 2
    assert resumed0 and resumed1 and not set(resumed0) & set(resumed1)
    assert sorted(first0 + first1 + resumed0 + resumed1) == list(range(num_shards))
    assert np.array_equal(nll0, nll1, equal_nan=True) and np.array_equal(nll0, uninterrupted.mean_nll, equal_nan=True)
    _assert_same_scores(ScoreIndex(out), uninterrupted)


def test_a_rescore_removes_the_old_complete_index_before_it_starts(tmp_path, small_mds, tiny_model_dir,
                                                                   uninterrupted):
    out = tmp_path / 'scores'
    shutil.copytree(uninterrupted.path, out)
    (out / 'shards' / '00002.json').unlink()  # shard 2 must be scored again: the old index is stale

    def crash(shard):
        raise Killed('simulated crash during the rescore')

    with pytest.raises(Killed):
        score_mds(tiny_model_dir, small_mds, out, batch_size=16, progress=False, on_shard_done=crash)
    assert not (out / 'index.json').exists()
    with pytest.raises(ScoreIndexError, match='is incomplete'):
        ScoreIndex(out)
    _assert_same_scores(score_mds(tiny_model_dir, small_mds, out, batch_size=16, progress=False), uninterrupted)


def test_select_commits_the_selection_only_after_its_mds_copy(tmp_path, small_mds, uninterrupted):
    blocker = tmp_path / 'not_a_dir'
    blocker.write_text('a file where the MDS copy should go')
    with pytest.raises(OSError):
        select_from_scores(uninterrupted.path, 'low', 0.5, tmp_path / 'sel', write_mds=blocker / 'copy',
                           progress=False)
    assert not (tmp_path / 'sel').exists()  # no selection that claims an MDS copy it does not have
    select_from_scores(uninterrupted.path, 'low', 0.5, tmp_path / 'sel', write_mds=tmp_path / 'copy', examples=0,
                       progress=False)
    _, ids = read_selection(tmp_path / 'sel')
    assert [s['uid'] for s in MDSDataset(tmp_path / 'copy')] == [str(uninterrupted.uids[i]) for i in ids]


# --- the example's demo data ------------------------------------------------------------------------------------


def test_the_reproduction_demo_data_has_unique_uids(tmp_path):
    """reproduce.py's data at the size where the review found duplicate uids (2,250 samples; about 10 s): a
    corrupted document copies the uid of a source sample that may be drawn twice, so its uid must say which
    corrupted document it is."""
    reproduce = load_example('perplexity_pruning')
    summary = reproduce.build_corrupted_corpus(tmp_path / 'data', clean_per_domain=300, corrupt_share=0.2, seed=0)
    data = MDSDataset(tmp_path / 'data')
    assert summary['samples'] == len(data) == 2250 and summary['corrupted'] == 450
    uids = data.column('uid')
    assert len(set(uids)) == len(uids)
    corrupt = [uid for uid, domain in zip(uids, data.column('domain')) if domain.startswith('corrupt_')]
    assert len(corrupt) == 450 and all(uid.startswith(('corrupt_shuffled/', 'corrupt_chars/')) for uid in corrupt)


def _flip_last_uid_byte(mds_dir: Path, shard: int) -> None:
    """Change one byte of ``shard``'s file (its last sample's uid) in place: same size, still a valid shard."""
    mds = MDSDataset(mds_dir)
    path = mds.shard_file(shard)
    uid = str(mds[mds.shard_range(shard)[1] - 1]['uid']).encode()
    data = bytearray(path.read_bytes())
    at = data.rfind(uid) + len(uid) - 1
    data[at] ^= 1
    size = path.stat().st_size
    path.write_bytes(bytes(data))
    assert path.stat().st_size == size


def test_a_shard_changed_at_the_same_size_is_rescored_on_resume_and_refused_by_select(tmp_path, small_mds,
                                                                                      tiny_model_dir, uninterrupted):
    data = tmp_path / 'data'
    shutil.copytree(small_mds, data)
    out = tmp_path / 'scores'
    score_mds(tiny_model_dir, data, out, batch_size=16, progress=False)
    _flip_last_uid_byte(data, 1)
    first, last = MDSDataset(data).shard_range(1)
    changed_uid = str(MDSDataset(data)[last - 1]['uid'])
    assert changed_uid != str(uninterrupted.uids[last - 1])
    # select reads the data: it must not pass the changed shard off as the one that was scored
    with pytest.raises(ScoreIndexError, match=r'shard 1 of data=.* changed since it was scored.*Fix: rerun the '
                                              r'`composer-ext score` command that wrote'):
        select_from_scores(out, 'low', 0.5, tmp_path / 'sel', data=data, examples=0)
    assert not (tmp_path / 'sel').exists()
    # resuming the scorer rescores exactly that shard and records its new content
    rescored = []
    index = score_mds(tiny_model_dir, data, out, batch_size=16, progress=False, on_shard_done=rescored.append)
    assert rescored == [1]
    assert str(index.uids[last - 1]) == changed_uid
    assert index.data_content_fingerprint == MDSDataset(data).content_fingerprint()
    assert index.data_content_fingerprint != uninterrupted.data_content_fingerprint
    select_from_scores(out, 'low', 0.5, tmp_path / 'sel', data=data, examples=0)
