"""Perplexity pruning from llm-foundry: a reference MPT trained by llm-foundry (yamls/llmfoundry/perplexity_pruning.yaml),
scored with ``composer-ext score --model CKPT --model-config SECTION.yaml`` (equal to llm-foundry's own loss on each
sample), a selection written with ``composer-ext select --write-mds``, and llm-foundry's own ``text`` loader training
on that copy as it is: the samples it fed the model are exactly the selected ones. Plus the score index's identity
(the section is part of it), kill and resume, and every ``--model-config`` mistake reported with the fix (exit 2)."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from composer.core import Callback

from composer_ext.cli import main as cli
from composer_ext.core.checkpoints import load_checkpoint, model_state_dict
from composer_ext.data.corpus import ensure_corpus
from composer_ext.data.mds import MDSDataset
from composer_ext.perplexity_pruning.score_index import STATUS_SCORED, ScoreIndex, ScoreIndexError
from composer_ext.perplexity_pruning.scoring import LLMFOUNDRY_KIND, load_reference_model, score_mds
from composer_ext.perplexity_pruning.selection import read_selection
from composer_ext.testing import Killed
from tests.llmfoundry_harness import YAML_DIR, load_yaml, train_yaml, write_yaml
from tests.test_perplexity_pruning import write_mds

pytest.importorskip('llmfoundry')

YAML = YAML_DIR / 'perplexity_pruning.yaml'
POOL = {'prose': range(0, 20), 'code': range(0, 20)}       # the data to prune: 40 samples of corpus train
REFERENCE = {'prose': range(500, 524), 'code': range(500, 516)}  # the reference model's own (disjoint) data
SMALL_RUN = ['global_train_batch_size=8', 'device_train_microbatch_size=8', 'log_to_console=false']

pytestmark = pytest.mark.usefixtures('one_torch_thread')




class FedSamples(Callback):
    """Records every row the model is fed (its unpadded ``input_ids``), at each forward pass."""

    def __init__(self):
        self.rows: list[tuple[int, ...]] = []

    def before_forward(self, state, logger):
        batch = state.batch
        for ids, mask in zip(batch['input_ids'], batch['attention_mask']):
            self.rows.append(tuple(ids[mask.bool()].tolist()))


def _section() -> dict:
    """The YAML's model section, resolved (the only interpolation in it is the top-level max_seq_len)."""
    config = load_yaml('perplexity_pruning')
    return dict(config['model'], max_seq_len=config['max_seq_len'])


def _slice(corpus, domains: dict, path: Path) -> Path:
    samples = [MDSDataset(corpus.path(domain, 'train'))[i] for domain, ids in domains.items() for i in ids]
    return write_mds(path, samples, shard_bytes=1 << 12)


@pytest.fixture(scope='module')
def pipeline(tmp_path_factory):
    """The documented pipeline on small slices: llm-foundry reference run -> score (the YAML as --model-config)."""
    corpus = ensure_corpus(progress=False)
    work = tmp_path_factory.mktemp('ppl_llmfoundry')
    pool, reference_data = _slice(corpus, POOL, work / 'pool'), _slice(corpus, REFERENCE, work / 'reference_data')
    assert MDSDataset(pool).num_shards >= 4
    base = [f'variables.data={corpus.root}', f'variables.runs={work}']
    train_yaml(YAML, [*base, f'variables.train_data={reference_data}', 'run_name=ppl_reference', 'max_duration=3ba',
                      'save_interval=3ba', f'save_folder={work}/reference', *SMALL_RUN])
    checkpoint = work / 'reference' / 'latest-rank0.pt'
    assert checkpoint.is_file()
    section_file = write_yaml(_section(), work / 'section.yaml')
    scores = work / 'scores'
    # The documented command: the training YAML itself as --model-config.
    assert cli(['score', '--model', str(checkpoint), '--model-config', str(YAML), '--data', str(pool), '--out',
                str(scores), '--max-tokens', '128', '--score-reference-samples', '--no-progress']) == 0
    return SimpleNamespace(work=work, corpus=corpus, base=base, pool=pool, checkpoint=checkpoint,
                           section_file=section_file, scores=scores, tokenizer=corpus.load_tokenizer())


def _llmfoundry_reference(pipeline):
    """The reference model as llm-foundry builds it, with the checkpoint's weights (no composer_ext code involved)."""
    from llmfoundry.utils.builders import build_composer_model

    config = _section()
    name = config.pop('name')
    model = build_composer_model(name=name, cfg=config, tokenizer=pipeline.tokenizer)
    model.load_state_dict(model_state_dict(load_checkpoint(pipeline.checkpoint), pipeline.checkpoint))
    return model.eval()


def test_scores_of_an_llmfoundry_checkpoint_equal_llmfoundrys_own_loss_per_sample(pipeline):
    index = ScoreIndex(pipeline.scores)
    pool = MDSDataset(pipeline.pool)
    assert index.num_samples == len(pool) == 40 and np.all(index.status == STATUS_SCORED)
    source = index.meta['model']
    assert source['kind'] == LLMFOUNDRY_KIND and source['model_name'] == 'mpt_causal_lm'
    assert source['class'] == 'MPTForCausalLM' and source['model_config'] == str(YAML)
    assert index.meta['identity']['model_kind'] == LLMFOUNDRY_KIND
    assert index.meta['identity']['model_config'] == source['model_config_sha256']
    model = _llmfoundry_reference(pipeline)
    lengths = []
    with torch.no_grad():
        for sample_id in range(len(pool)):
            ids = pipeline.tokenizer(pool[sample_id]['text'], add_special_tokens=False)['input_ids'][:128]
            lengths.append(len(ids))
            ids = torch.tensor([ids])
            # llm-foundry's training loss on the sample alone: mean NLL of tokens 1..n-1 given their prefix
            loss = float(model.model(input_ids=ids, labels=ids).loss)
            assert index.mean_nll[sample_id] == pytest.approx(loss, rel=1e-5, abs=1e-6), sample_id
            assert index.num_tokens[sample_id] == ids.shape[1] - 1
            if sample_id in (0, 21):  # by hand: log-softmax of the logits at each position, the next token's entry
                logits = model.model(input_ids=ids).logits[0].double()
                by_hand = -(logits[:-1].log_softmax(-1).gather(1, ids[0, 1:, None])).mean()
                assert index.mean_nll[sample_id] == pytest.approx(float(by_hand), rel=1e-5)
    np.testing.assert_allclose(index.perplexity, np.exp(index.mean_nll), rtol=1e-12)
    assert min(lengths) < 64 < max(lengths)  # short and long samples in one padded batch
    assert len(set(np.round(index.mean_nll, 6))) == len(pool)  # a real model: every sample has its own score


def test_the_model_section_is_part_of_the_index_identity(pipeline, tmp_path):
    # The section file and the training YAML give the same section: resuming from either does nothing new.
    again = []
    score_mds(pipeline.checkpoint, pipeline.pool, pipeline.scores, model_config=pipeline.section_file, max_tokens=128,
              score_reference_samples=True, progress=False, on_shard_done=again.append)
    assert again == []
    # Same weights (so the same weights fingerprint), another section: scores differ, so the index refuses it.
    scaled = write_yaml(dict(_section(), logit_scale=2.0), tmp_path / 'scaled.yaml')
    with pytest.raises(ScoreIndexError, match=r'holds scores of a different scoring run .* e\.g\. model_config: '):
        score_mds(pipeline.checkpoint, pipeline.pool, pipeline.scores, model_config=scaled, max_tokens=128,
                  score_reference_samples=True, progress=False)
    other = score_mds(pipeline.checkpoint, pipeline.pool, tmp_path / 'scaled_scores', model_config=scaled,
                      max_tokens=128, score_reference_samples=True, progress=False)
    original = ScoreIndex(pipeline.scores)
    assert other.meta['identity']['model'] == original.meta['identity']['model']
    assert other.meta['identity']['model_config'] != original.meta['identity']['model_config']
    assert not np.allclose(other.mean_nll, original.mean_nll)


def test_refusing_another_section_names_it_and_the_fix(pipeline, tmp_path, capsys):
    scaled = write_yaml(dict(_section(), logit_scale=2.0), tmp_path / 'scaled.yaml')
    assert cli(['score', '--model', str(pipeline.checkpoint), '--model-config', str(scaled), '--data',
                str(pipeline.pool), '--out', str(pipeline.scores), '--max-tokens', '128',
                '--score-reference-samples', '--no-progress']) == 2
    err = capsys.readouterr().err
    assert re.search(r'composer-ext score: error: out=.* holds scores of a different scoring run \(1 setting\(s\) '
                     r'differ, e\.g\. model_config: .*Fix: pass a new --out', err), err


def test_a_killed_scoring_run_of_an_llmfoundry_model_resumes_to_the_same_scores(pipeline, tmp_path):
    out, finished = tmp_path / 'scores', []

    def crash_after_two(shard):
        finished.append(shard)
        if len(finished) == 2:
            raise Killed('simulated crash after 2 shards')

    with pytest.raises(Killed):
        score_mds(pipeline.checkpoint, pipeline.pool, out, model_config=pipeline.section_file, max_tokens=128,
                  score_reference_samples=True, progress=False, on_shard_done=crash_after_two)
    with pytest.raises(ScoreIndexError, match=r'is incomplete: scoring stopped after 2 of \d+ shards'):
        ScoreIndex(out)
    rescored = []
    resumed = score_mds(pipeline.checkpoint, pipeline.pool, out, model_config=pipeline.section_file, max_tokens=128,
                        score_reference_samples=True, progress=False, on_shard_done=rescored.append)
    assert sorted(rescored) == sorted(set(range(MDSDataset(pipeline.pool).num_shards)) - set(finished))
    original = ScoreIndex(pipeline.scores)
    np.testing.assert_array_equal(resumed.mean_nll, original.mean_nll)
    np.testing.assert_array_equal(resumed.num_tokens, original.num_tokens)


def test_llmfoundry_text_loader_trains_on_exactly_the_selected_samples(pipeline):
    from llmfoundry.registry import callbacks

    selection = pipeline.work / 'selection'
    copy_dir = pipeline.work / 'perplexity_pruning_llmfoundry' / 'selection_mds'  # the YAML's default train_data
    assert cli(['select', '--scores', str(pipeline.scores), '--band', 'medium', '--keep', '0.5', '--out',
                str(selection), '--write-mds', str(copy_dir), '--no-progress']) == 0
    _, ids = read_selection(selection)
    pool, written = MDSDataset(pipeline.pool), MDSDataset(copy_dir)
    assert len(ids) == len(written) == 20
    assert {'text', 'uid'} <= set(written.columns)
    assert [written[i]['uid'] for i in range(len(written))] == [pool[int(i)]['uid'] for i in ids]

    callbacks.register('ppl_test_fed_samples', func=FedSamples)
    # The YAML as it is (its train_data: where `select --write-mds` wrote), plus a callback recording what the
    # model was fed.
    trainer = train_yaml(YAML, [*pipeline.base, 'callbacks.ppl_test_fed_samples={}', *SMALL_RUN])
    recorder = next(cb for cb in trainer.state.callbacks if isinstance(cb, FedSamples))
    assert int(trainer.state.timestamp.batch) == 3  # 1ep of 20 samples in batches of 8

    def tokens(sample) -> tuple[int, ...]:  # what the text loader makes of a sample: its first max_seq_len tokens
        return tuple(pipeline.tokenizer(sample['text'], truncation=True, max_length=128)['input_ids'])

    uid_of = {tokens(pool[i]): pool[i]['uid'] for i in range(len(pool))}
    assert len(uid_of) == len(pool)  # every pool sample is recognisable from its tokens
    fed = sorted(uid_of[row] for row in recorder.rows)
    assert fed == sorted(pool[int(i)]['uid'] for i in ids)  # each selected sample once, nothing else


# --- mistakes: exit 2, the option, the bad value and the fix ------------------------------------------------


def _hf_dir(path: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=4096, n_positions=64, n_embd=16, n_layer=1, n_head=2)).save_pretrained(path)
    return path


MISTAKES = {
    'missing': (lambda tmp: tmp / 'no_such.yaml', None,
                r"model_config='.*no_such\.yaml' \(--model-config\) is missing\. Fix: pass a YAML file holding the "
                r'llm-foundry model section'),
    'not_yaml': (lambda tmp: _text(tmp / 'bad.yaml', 'name: mpt_causal_lm\nd_model: [64, 32\n'), None,
                 r"model_config='.*bad\.yaml' \(--model-config\) is not a YAML file \(.*\)\. Fix: pass a YAML file"),
    'a_list': (lambda tmp: _text(tmp / 'list.yaml', '- name: mpt_causal_lm\n'), None,
               r"model_config='.*list\.yaml' \(--model-config\) holds a ListConfig, not a model section\. Fix: write"),
    'no_name': (lambda tmp: write_yaml({k: v for k, v in _section().items() if k != 'name'}, tmp / 'noname.yaml'),
                None, r"model_config='.*noname\.yaml' \(--model-config\) holds no model section with a name \(top-level "
                      r"keys \['attn_config', 'd_model'.*\)\. Fix: write a file with `name: mpt_causal_lm`"),
    'unknown_name': (lambda tmp: write_yaml(dict(_section(), name='gpt9000'), tmp / 'unknown.yaml'), None,
                     r"model_config='.*unknown\.yaml' \(--model-config\): name='gpt9000' is not an llm-foundry model\. "
                     r"Fix: use the name of the run that trained the checkpoint, one of \[.*'mpt_causal_lm'.*\]"),
    'unresolved': (lambda tmp: _text(tmp / 'interp.yaml', 'name: mpt_causal_lm\nd_model: ${variables.width}\n'), None,
                   r"model_config='.*interp\.yaml' \(--model-config\): its model section cannot be resolved \(.*"
                   r'variables.*\)\. Fix: define what it interpolates'),
    'shape_mismatch': (lambda tmp: write_yaml(dict(_section(), d_model=32), tmp / 'narrow.yaml'), None,
                       r"model_config='.*narrow\.yaml' \(--model-config\) does not describe the checkpoint "
                       r"model='.*ep0-ba3-rank0\.pt': the weights .* do not fit the reference architecture "
                       r'ComposerMPTCausalLM \(size mismatch for model\.transformer\.wte\.weight: .*\)\. Fix: pass the '
                       r'model section of the run that saved the checkpoint'),
    'with_hf_dir': (lambda tmp: None, 'hf',
                    r"model_config='.*section\.yaml' \(--model-config\) was given with model='.*hf', a HuggingFace "
                    r'directory, which carries its own config\.json\. Fix: drop --model-config'),
    'checkpoint_without_it': (lambda tmp: None, 'no_config',
                              r"model='.*ep0-ba3-rank0\.pt' is a checkpoint of an llm-foundry model \(llmfoundry\.models"
                              r'\.mpt\.modeling_mpt\.MPTForCausalLM\), which is built from its model section\. Fix: '
                              r'add --model-config'),
}


def _text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize('mistake', sorted(MISTAKES))
def test_model_config_mistakes_exit_2_with_the_fix(pipeline, tmp_path, capsys, mistake):
    make_config, model_kind, message = MISTAKES[mistake]
    config = make_config(tmp_path)
    model = str(pipeline.checkpoint)
    if model_kind == 'hf':
        model, config = str(_hf_dir(tmp_path / 'hf')), pipeline.section_file
    argv = ['score', '--model', model, '--data', str(pipeline.pool), '--out', str(tmp_path / 'out'),
            '--score-reference-samples', '--no-progress']
    if model_kind != 'no_config':
        argv += ['--model-config', str(config)]
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith('composer-ext score: error: ') and 'Fix:' in err, err
    assert re.search(message, err), err
    assert not (tmp_path / 'out').exists()


def test_model_config_with_a_model_object_is_refused(pipeline, tmp_path):
    reference = load_reference_model(pipeline.checkpoint, model_config=pipeline.section_file)
    with pytest.raises(ValueError, match=r'model_config is given, but model is a MPTForCausalLM, not a checkpoint '
                                         r'path.*Fix: pass the llm-foundry checkpoint path as model'):
        score_mds(reference.model, pipeline.pool, tmp_path / 'out', tokenizer=reference.tokenizer,
                  model_config=pipeline.section_file, progress=False)
    assert not (tmp_path / 'out').exists()
