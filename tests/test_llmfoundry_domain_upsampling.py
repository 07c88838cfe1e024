"""Domain upsampling from an llm-foundry YAML: llm-foundry's own ``train_from_yaml`` on
yamls/llmfoundry/domain_upsampling.yaml, with composer_ext's ``text_mixture`` dataloader (entry point group
``llmfoundry_dataloaders``) driven by the ``domain_upsampling`` algorithm.

What is checked: the achieved mixture follows the schedule after the switch (from the logged fractions and from the
trained batches themselves); the run's tokenizer, not the data's ``tokens`` column, makes the rows when another
tokenizer wrote that column (a BPE trained here); two gloo ranks read disjoint samples that together are the
single-process run's global batches, and log the same mixture; and every mistake in the section fails with our
error style before training.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from composer.core import Callback

from composer_ext.data.corpus import ensure_corpus
from composer_ext.data.mds import MDSDataset
from composer_ext.domain_upsampling.foundry_loader import build_text_mixture_dataloader
from composer_ext.domain_upsampling.mixture import DomainTokens, build_mixture_dataloader, encode_text
from composer_ext.testing import run_distributed
from tests.llmfoundry_harness import YAML_DIR, load_yaml, logged_metrics, train_yaml, write_yaml

YAML = YAML_DIR / 'domain_upsampling.yaml'
RECORDER = 'composer_ext_test_record_batches'
SEQ = 64  # max_seq_len of the YAML


class RecordBatches(Callback):
    """Every trained batch of this rank: its rows' domain labels, uids and real (attention_mask) token ids."""

    def __init__(self):
        self.batches: list[dict] = []

    def after_dataloader(self, state, logger):
        batch = state.batch
        mask = batch['attention_mask'].bool()
        self.batches.append({'domain': list(batch['domain']), 'uid': list(batch['uid']),
                             'ids': [row[keep].tolist() for row, keep in zip(batch['input_ids'], mask)]})


def _register_recorder() -> None:
    """Make the recorder an llm-foundry callback (llm-foundry's registry, as a plugin would), for YAML overrides."""
    from llmfoundry import registry

    if RECORDER not in registry.callbacks:
        registry.callbacks.register(RECORDER, func=RecordBatches)


def _overrides(*extra: str) -> list[str]:
    return [f'variables.data={ensure_corpus().root}', 'max_duration=20ba',
            'algorithms.domain_upsampling.log_interval=4ba', 'loggers={inmemory: {}}',
            f'callbacks={{{RECORDER}: {{}}}}', 'python_log_level=null', *extra]


def _records(trainer) -> list[dict]:
    return next(c for c in trainer.state.callbacks if isinstance(c, RecordBatches)).batches


def _run(path: str, overrides: list[str]) -> dict:
    """Train the YAML (on this rank); what it logged and trained, and the domains' tokens-column decisions."""
    from composer.utils import dist

    _register_recorder()
    trainer = train_yaml(path, overrides)
    dataset = trainer.state.train_dataloader.dataset
    return {'rank': dist.get_global_rank(), 'metrics': logged_metrics(trainer), 'records': _records(trainer),
            'batches': int(trainer.state.timestamp.batch), 'domain_names': list(dataset.domain_names),
            'use_tokens': {name: rows.use_tokens for name, rows in dataset.datasets.items()}}


@pytest.fixture(scope='module')
def single_run():
    """The shipped YAML for 20 batches (switch at 0.8dur = batch 16), logging the mixture every 4 batches."""
    return _run(str(YAML), _overrides())


def _math_fraction(batches: list[dict]) -> float:
    domains = [d for b in batches for d in b['domain']]
    return domains.count('math') / len(domains)


# --- the technique does its work --------------------------------------------------------------------------


def test_the_achieved_mixture_follows_the_schedule_after_the_switch(single_run):
    metrics, records = single_run['metrics'], single_run['records']
    assert single_run['batches'] == 20 and len(records) == 20
    assert single_run['domain_names'] == ['code', 'math']
    # The schedule DomainUpsampling logged: 0.5 math over the windows before batch 16, 0.9 in the last one.
    assert [b for b, _ in metrics['mixture/target/math']] == [4, 8, 12, 16, 20]
    assert [v for _, v in metrics['mixture/target/math']] == pytest.approx([0.5, 0.5, 0.5, 0.5, 0.9])
    # What the batches held (counted by DomainUpsampling from their domain column), window by window.
    achieved = [v for _, v in metrics['mixture/fraction/math']]
    assert achieved[:4] == pytest.approx([0.5] * 4, abs=2 / 32)
    assert achieved[4] == pytest.approx(0.9, abs=2 / 32)
    assert [v for _, v in metrics['mixture/fraction/code']][4] == pytest.approx(0.1, abs=2 / 32)
    # The same from the trained batches themselves; every row's domain label is its sample's (corpus uids start
    # with the domain), so the labels DomainUpsampling counts are true.
    for batch in records:
        assert all(uid.startswith(f'{domain}/') for domain, uid in zip(batch['domain'], batch['uid']))
    assert _math_fraction(records[:16]) == pytest.approx(0.5, abs=0.03)
    assert _math_fraction(records[16:]) == pytest.approx(0.9, abs=2 / 32)
    # One read of each sample: no uid twice in the run (passes over each domain stay far below 1).
    uids = [u for b in records for u in b['uid']]
    assert len(set(uids)) == len(uids) == 160
    # The corpus tokenizer is the run's tokenizer here, and it wrote the tokens column: that column is read.
    assert single_run['use_tokens'] == {'code': True, 'math': True}
    assert all(np.isfinite(v) for _, v in metrics['loss/train/total'])


# --- the run's tokenizer ----------------------------------------------------------------------------------


def _small_domains(root: Path, per_domain: int = 64) -> dict[str, dict[str, tuple[str, list[int]]]]:
    """Copies of the first samples of the corpus's code and math domains (text, corpus tokens, domain, uid), as
    ``<root>/<domain>/train`` MDS directories; returns domain -> uid -> (text, corpus tokens)."""
    from streaming import MDSWriter

    corpus = ensure_corpus()
    columns = {'text': 'str', 'tokens': 'ndarray:uint16', 'domain': 'str', 'uid': 'str'}
    out: dict[str, dict[str, tuple[str, list[int]]]] = {}
    for domain in ('code', 'math'):
        source = MDSDataset(corpus.path(domain))
        out[domain] = {}
        with MDSWriter(out=str(root / domain / 'train'), columns=columns, compression=None,
                       progress_bar=False) as writer:
            for index in range(per_domain):
                sample = source[index]
                writer.write({key: sample[key] for key in columns})
                out[domain][sample['uid']] = (sample['text'], sample['tokens'].tolist())
    return out


def _train_bpe(texts: list[str], directory: Path, vocab_size: int = 512):
    """A byte-level BPE trained on ``texts``, saved as a PreTrainedTokenizerFast directory (eos and pad tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                                       special_tokens=['<|endoftext|>', '<|pad|>'],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token='<|endoftext|>', pad_token='<|pad|>')
    tokenizer.save_pretrained(str(directory))
    return tokenizer


def test_rows_are_made_by_the_runs_tokenizer_not_a_tokens_column_another_tokenizer_wrote(tmp_path):
    data = _small_domains(tmp_path / 'remote')
    bpe = _train_bpe([text for samples in data.values() for text, _ in samples.values()], tmp_path / 'bpe')
    assert len(bpe) == 512
    config = load_yaml('domain_upsampling')
    # code is fetched from a "remote" (a directory standing in for object storage) into a local cache directory.
    config['train_loader']['dataset']['domains'] = {
        'code': {'remote': str(tmp_path / 'remote' / 'code'), 'local': str(tmp_path / 'cache' / 'code'),
                 'split': 'train'},
        'math': {'remote': None, 'local': str(tmp_path / 'remote' / 'math'), 'split': 'train'},
    }
    path = write_yaml(config, tmp_path / 'bpe.yaml')
    result = _run(str(path), _overrides(f'tokenizer.name={tmp_path / "bpe"}', 'model.vocab_size=512',
                                        'max_duration=4ba'))
    assert result['batches'] == 4
    # The data's tokens column was written by the corpus tokenizer, not the run's: the text was tokenized.
    assert result['use_tokens'] == {'code': False, 'math': False}
    assert (tmp_path / 'cache' / 'code' / 'train' / 'index.json').exists()
    rows = 0
    for batch in result['records']:
        for domain, uid, ids in zip(batch['domain'], batch['uid'], batch['ids']):
            text, corpus_tokens = data[domain][uid]
            expected = bpe(text)['input_ids'][:SEQ]
            expected += [bpe.eos_token_id] if len(expected) < SEQ else []
            assert ids == expected, uid
            corpus_row = corpus_tokens[:SEQ] + ([bpe.eos_token_id] if len(corpus_tokens) < SEQ else [])
            assert ids != corpus_row, uid
            rows += 1
    assert rows == 32


def test_a_tokens_column_is_read_only_when_the_runs_tokenizer_wrote_it_and_then_gives_the_same_rows(tmp_path):
    corpus = ensure_corpus()
    tokenizer = corpus.load_tokenizer()
    math = MDSDataset(corpus.path('math'))
    read, tokenized = DomainTokens(math, 'math', tokenizer, SEQ), DomainTokens(math, 'math', tokenizer, SEQ)
    tokenized.use_tokens = False  # the text path, for comparison
    assert read.use_tokens is True
    for index in (0, 5, 1234):
        assert read[index]['tokens'].tolist() == tokenized[index]['tokens'].tolist() == \
            encode_text(tokenizer, math[index]['text'])[:SEQ]
        assert read[index]['domain'] == 'math' and read[index]['uid'] == math[index]['uid']
    bpe = _train_bpe([math[i]['text'] for i in range(200)], tmp_path / 'bpe', vocab_size=300)
    assert DomainTokens(math, 'math', bpe, SEQ).use_tokens is False


def test_both_front_ends_build_the_same_batches_through_one_builder():
    corpus = ensure_corpus()
    ours = build_mixture_dataloader(batch_size=8, domains=['code', 'math'], weights={'code': 0.5, 'math': 0.5},
                                    seq_len=SEQ, seed=3)
    section = {'domains': {d: {'local': str(corpus.root / d), 'split': 'train'} for d in ('code', 'math')},
               'max_seq_len': SEQ, 'shuffle': True, 'shuffle_seed': 3, 'weights': {'code': 0.5, 'math': 0.5}}
    foundry = build_text_mixture_dataloader(corpus.load_tokenizer(), 8, section)
    assert type(ours.dataloader) is type(foundry.dataloader)
    for mine, theirs, _ in zip(ours.dataloader, foundry.dataloader, range(3)):
        # One plan: the same domain at every position. Which sample a draw reads differs by design: a local
        # MDSDataset is read in a seeded permutation, a StreamingDataset in Streaming's own shard-local order.
        assert mine['domain'] == theirs['domain']
        assert all(uid.startswith(f'{domain}/') for uid, domain in zip(theirs['uid'], theirs['domain']))
        assert len(set(theirs['uid'])) == len(theirs['uid'])
        for key in ('input_ids', 'attention_mask', 'labels'):
            assert mine[key].shape == theirs[key].shape, key
        assert (theirs['labels'][theirs['attention_mask'] == 0] == -100).all()
        assert foundry.get_num_tokens_in_batch(theirs) == int(theirs['attention_mask'].sum())
        assert foundry.get_num_tokens_in_batch(theirs, 'loss_generating') == int((theirs['labels'][:, 1:] != -100)
                                                                                 .sum())


# --- two gloo ranks ---------------------------------------------------------------------------------------


@pytest.mark.distributed
def test_two_ranks_read_disjoint_samples_that_make_the_single_process_batches_and_agree(single_run):
    ranks = run_distributed(_run, world_size=2, args=(str(YAML), _overrides('device_train_microbatch_size=4')))
    assert [r['rank'] for r in ranks] == [0, 1] and all(r['batches'] == 20 for r in ranks)
    zero, one = ranks[0]['records'], ranks[1]['records']
    for batch, (first, second, single) in enumerate(zip(zero, one, single_run['records'])):
        assert len(first['uid']) == len(second['uid']) == 4
        assert not set(first['uid']) & set(second['uid']), batch
        # the two ranks' halves are the single-process run's global batch
        assert sorted(first['uid'] + second['uid']) == sorted(single['uid']), batch
    # The mixture is counted over both ranks: both log the same numbers, those of the single-process run.
    for key in ('mixture/fraction/math', 'mixture/fraction/code', 'mixture/target/math'):
        assert ranks[0]['metrics'][key] == ranks[1]['metrics'][key] == single_run['metrics'][key], key


# --- mistakes in the YAML ---------------------------------------------------------------------------------


def _section() -> dict:
    root = ensure_corpus().root
    return {'name': 'text_mixture',
            'dataset': {'domains': {'code': {'remote': None, 'local': str(root / 'code'), 'split': 'train'},
                                    'math': {'local': str(root / 'math'), 'split': 'train'}},
                        'max_seq_len': SEQ, 'shuffle': True},
            'drop_last': True, 'num_workers': 0}


def _dataset(section):
    return section['dataset']


def _domain(section, name='code'):
    return section['dataset']['domains'][name]


MISTAKES = {
    'no_domains': (lambda s: _dataset(s).pop('domains'),
                   r"text_mixture dataset.domains=None is not a mapping of domain name -> Streaming dataset section. "
                   r"Fix: write dataset: \{domains: \{code:"),
    'text_loader_local': (lambda s: _dataset(s).update(local='/data/all'),
                          r'text_mixture dataset.local is set, but text_mixture reads one Streaming dataset per '
                          r'domain. Fix: move it into dataset.domains.<name>'),
    'unknown_dataset_key': (lambda s: _dataset(s).update(max_seq_length=64),
                            r"text_mixture dataset has the unknown key 'max_seq_length'. Fix: use only \['domains', "
                            r"'max_seq_len'"),
    'domain_is_a_path': (lambda s: _dataset(s)['domains'].update(code='/data/code'),
                         r"text_mixture dataset.domains.code='/data/code' is a str, not a Streaming dataset section. "
                         r"Fix: write code: \{remote: null, local: /data/code, split: train\}"),
    'domain_without_data': (lambda s: _dataset(s)['domains'].update(code={'split': 'train'}),
                            r'text_mixture dataset.domains.code has neither remote nor local, so it names no data. '
                            r'Fix: give local'),
    'domain_wrong_split': (lambda s: _domain(s).update(split='training'),
                           r"text_mixture dataset.domains.code: local='.*/code' with split='training' is not an MDS "
                           r"dataset \('.*/code/training' has no index.json\) and remote is null.*Fix: point local"),
    'domain_order_option': (lambda s: _domain(s).update(partition_algo='orig'),
                            r"text_mixture dataset.domains.code.partition_algo='orig' is a Streaming option about "
                            r"the order or mix of samples, but text_mixture reads each domain by sample index .* Fix: "
                            r"remove it"),
    'domain_shuffle_algo': (lambda s: _domain(s).update(shuffle_algo='py9'),
                            r"text_mixture dataset.domains.code.shuffle_algo='py9' is not one of Streaming's shuffle "
                            r"algorithms. Fix: use one of \[.*'py1e'"),
    'domain_block_size': (lambda s: _domain(s).update(shuffle_block_size=0),
                          r'text_mixture dataset.domains.code.shuffle_block_size=0 is not a positive int. Fix: give '
                          r'a number of samples'),
    'domain_proportion': (lambda s: _domain(s).update(proportion=0.3),
                          r'text_mixture dataset.domains.code.proportion=0.3 is a Streaming option .* Fix: set '
                          r'dataset.weights instead'),
    'domain_typo': (lambda s: _domain(s).update(lcoal='/data/code'),
                    r"text_mixture dataset.domains.code has the unknown key 'lcoal'. Fix: use only \['remote', "
                    r"'local', 'split'"),
    'domain_local_not_a_path': (lambda s: _domain(s).update(local=7),
                                r'text_mixture dataset.domains.code.local=7 is not a path. Fix: give a directory'),
    'no_max_seq_len': (lambda s: _dataset(s).pop('max_seq_len'),
                       r'text_mixture dataset.max_seq_len=None is not an int >= 2. Fix: set it to the model'),
    'shuffle_not_bool': (lambda s: _dataset(s).update(shuffle='yes'),
                         r"text_mixture dataset.shuffle='yes' is not a boolean. Fix: write true or false"),
    'negative_seed': (lambda s: _dataset(s).update(shuffle_seed=-1),
                      r'text_mixture dataset.shuffle_seed=-1 is not an int >= 0. Fix: use e.g. 9176'),
    'epoch_size_zero': (lambda s: _dataset(s).update(epoch_size=0),
                        r'text_mixture dataset.epoch_size=0 is not a positive int. Fix: give the global samples per '
                        r'epoch'),
    'sampling_unknown': (lambda s: _dataset(s).update(sampling='uniform'),
                         r"text_mixture dataset.sampling='uniform' is not a sampling mode. Fix: use one of "
                         r"\['stratified', 'random'\]"),
    'weights_missing_domain': (lambda s: _dataset(s).update(weights={'code': 1.0}),
                               r"text_mixture dataset.weights gives no weight to \['math'\]. Fix: give every domain "
                               r"of dataset.domains a weight"),
    'weights_unknown_domain': (lambda s: _dataset(s).update(weights={'code': 0.5, 'maths': 0.5}),
                               r"text_mixture dataset.weights names \['maths'\], which dataset.domains does not have "
                               r"\(it has \['code', 'math'\]\). Fix: weigh only those domains"),
    'weights_do_not_sum_to_one': (lambda s: _dataset(s).update(weights={'code': 3, 'math': 1}),
                                  r'text_mixture dataset.weights=.*: .*weights sum to 4, not 1'),
    'loader_batch_size': (lambda s: s.update(batch_size=8),
                          r"text_mixture has the unknown keys \['batch_size'\]. Fix: use only name, dataset, "
                          r"drop_last, .*\(the batch size is global_train_batch_size"),
    'num_workers_negative': (lambda s: s.update(num_workers=-1),
                             r'text_mixture num_workers=-1 is invalid. Fix: use an int >= 0'),
}


@pytest.mark.parametrize('mistake', sorted(MISTAKES))
def test_a_mistake_in_the_section_fails_when_llm_foundry_builds_the_loader(mistake):
    from llmfoundry.data.dataloader import build_dataloader

    mutate, message = MISTAKES[mistake]
    section = _section()
    mutate(section)
    with pytest.raises(ValueError, match=message):
        build_dataloader(section, ensure_corpus().load_tokenizer(), 4)


def test_a_domain_without_a_text_column_fails_when_the_loader_is_built(tmp_path):
    from llmfoundry.data.dataloader import build_dataloader
    from streaming import MDSWriter

    with MDSWriter(out=str(tmp_path / 'code' / 'train'), columns={'tokens': 'ndarray:uint16', 'uid': 'str'},
                   progress_bar=False) as writer:
        for i in range(8):
            writer.write({'tokens': np.arange(i + 2, dtype=np.uint16), 'uid': f'u{i}'})
    section = _section()
    _domain(section)['local'] = str(tmp_path / 'code')
    with pytest.raises(ValueError, match=r"text_mixture dataset: domain 'code' has no text column \(its samples have "
                                         r"\['tokens', 'uid'\]\).* Fix: write the data with a text column"):
        build_dataloader(section, ensure_corpus().load_tokenizer(), 4)


def test_a_loader_without_a_tokenizer_or_with_a_fractional_batch_fails():
    with pytest.raises(ValueError, match=r"text_mixture needs the run's tokenizer.*Fix: give the run a tokenizer"):
        build_text_mixture_dataloader(None, 4, _section()['dataset'])
    with pytest.raises(ValueError, match=r'device_batch_size=2.5 is not a positive whole number of samples. Fix: '
                                         r'make global_train_batch_size a multiple of the number of ranks'):
        build_text_mixture_dataloader(ensure_corpus().load_tokenizer(), 2.5, _section()['dataset'])


def test_an_unknown_schedule_key_fails_when_llm_foundry_builds_the_algorithm():
    from llmfoundry.utils.builders import build_algorithm

    with pytest.raises(TypeError, match=r"schedule has the unknown keys \['begin'\]. Fix: use only \['base', "):
        build_algorithm('domain_upsampling', {'schedule': {'base': {'code': 1.0}, 'target': {'code': 1.0},
                                                           'begin': '0.8dur'}})


def test_a_schedule_domain_the_loader_lacks_fails_at_fit_start(tmp_path):
    config = load_yaml('domain_upsampling')
    config['algorithms']['domain_upsampling']['schedule']['target'] = {'code': 0.1, 'maths': 0.9}
    path = write_yaml(config, tmp_path / 'maths.yaml')
    with pytest.raises(ValueError, match=r"the target mix gives 'maths' weight 0.9, but domains has no dataset named "
                                         r"'maths' \(it has \['code', 'math'\]\). Fix: add its data to domains"):
        train_yaml(str(path), _overrides())


def test_per_domain_read_order_options_reach_the_shard_order():
    # shuffle_algo, shuffle_block_size and num_canonical_nodes decide how MixtureDataset reads a Streaming domain
    # (its shard-local shuffle), so text_mixture takes them per domain instead of refusing them.
    from llmfoundry.data.dataloader import build_dataloader

    section = _section()
    _domain(section).update(shuffle_algo='py1s', shuffle_block_size=512, num_canonical_nodes=2)
    loader = build_dataloader(section, ensure_corpus().load_tokenizer(), 4).dataloader
    dataset = loader.dataset
    orders = {dataset.domain_names[index]: order for index, order in dataset._orders.items()}
    code, math = orders['code'], orders['math']
    assert (code.algo, code.block, code.canonical_nodes) == ('py1s', 512, 2)
    assert math.algo == 'py1e' and math.block != 512  # the other domain keeps Streaming's defaults
    from streaming.base.shuffle import get_shuffle
    assert (code.order(0) == get_shuffle('py1s', code.shard_sizes, 2, code.seed, 0, 512)).all()
