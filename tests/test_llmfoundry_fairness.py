"""CEV/SDE fairness from an llm-foundry YAML: magnitude_pruning on a tied-embedding MPT and bias_probe against its
dense reference (a model section + checkpoint), run by llm-foundry's own ``train_from_yaml`` on the CPU."""

import copy
import json
import math

import pytest
from torch import nn

from composer_ext.data import ensure_corpus
from composer_ext.fairness.magnitude_pruning import output_layer, prunable_layers
from tests.llmfoundry_harness import (TINY_MPT, YAML_DIR, load_yaml, logged_metrics, train_yaml, train_yaml_distributed,
                                      write_yaml)

pytest.importorskip('llmfoundry')

SPARSITY = 0.75
EVAL_BATCHES = 4  # eval_subset_num_batches of fairness.yaml


@pytest.fixture(scope='module')
def corpus():
    return str(ensure_corpus().root)


def _overrides(corpus, runs):
    return [f'variables.data={corpus}', f'variables.runs={runs}']


def _with_memory_logger(config):
    config = copy.deepcopy(config)
    config['loggers'] = {'inmemory': {}}
    return config


@pytest.fixture(scope='module')
def dense(corpus, tmp_path_factory):
    """The dense reference, trained by the shipped fairness_dense.yaml (fewer batches)."""
    runs = tmp_path_factory.mktemp('runs')
    train_yaml(YAML_DIR / 'fairness_dense.yaml', _overrides(corpus, runs) + ['max_duration=20ba'])
    checkpoint = runs / 'llmfoundry_fairness_dense' / 'checkpoints' / 'latest-rank0.pt'
    assert checkpoint.is_file()
    return runs


def _eval_target_counts(corpus, runs):
    """Target-token counts of the batches the probe evaluates, read independently with llm-foundry's own loader."""
    from llmfoundry.data.dataloader import build_dataloader
    from llmfoundry.models.mpt.modeling_mpt import get_targets
    from llmfoundry.utils.builders import build_tokenizer
    from omegaconf import OmegaConf

    config = OmegaConf.merge(OmegaConf.create(load_yaml('fairness')), OmegaConf.from_dotlist(_overrides(corpus, runs)))
    config = OmegaConf.to_container(config, resolve=True)
    tokenizer = build_tokenizer(config['tokenizer']['name'], config['tokenizer']['kwargs'])
    loader = build_dataloader(config['eval_loader'], tokenizer, config['device_eval_batch_size'])
    counts: dict[int, int] = {}
    for index, batch in enumerate(loader.dataloader):
        if index == config['eval_subset_num_batches']:
            break
        for token in get_targets(batch['labels']).flatten().tolist():
            if token >= 0:
                counts[token] = counts.get(token, 0) + 1
    return counts


def _most_frequent(counts, n):
    return [token for token, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:n]]


@pytest.fixture(scope='module')
def pruned(corpus, dense, tmp_path_factory):
    path = write_yaml(_with_memory_logger(load_yaml('fairness')), tmp_path_factory.mktemp('yaml') / 'fairness.yaml')
    trainer = train_yaml(path, _overrides(corpus, dense))
    record = json.loads((dense / 'llmfoundry_fairness_pruned' / 'bias_probe.json').read_text())['records'][-1]
    return trainer, logged_metrics(trainer), record


# --- the YAMLs run ---------------------------------------------------------------------------------------------


def test_pruned_mpt_logs_finite_nonzero_bias_against_the_dense_reference(pruned):
    trainer, metrics, record = pruned
    assert int(trainer.state.timestamp.batch) == 10
    cev, sde = metrics['bias/eval/cev'][-1][1], metrics['bias/eval/sde'][-1][1]
    assert math.isfinite(cev) and math.isfinite(sde)
    assert cev > 1e-3 and sde > 1e-3  # pruning 75% of every hidden layer moved the class-wise errors
    assert metrics['bias/eval/cev_ci_low'][-1][1] <= cev <= metrics['bias/eval/cev_ci_high'][-1][1]
    agreement = metrics['similarity/eval/agreement'][-1][1]
    assert 0.0 < agreement < 1.0 and metrics['similarity/eval/kl'][-1][1] > 0
    # The reference is the dense checkpoint the run started from: it differs from the pruned model only by pruning
    # and 10 batches of fine-tuning, so it agrees on many positions, and its accuracy is its own.
    assert agreement > 0.3
    assert record['metrics']['reference_accuracy'] != record['metrics']['accuracy']


def test_every_hidden_linear_reaches_the_target_and_the_tied_embedding_stays_dense(pruned):
    trainer, metrics, _ = pruned
    model = trainer.state.model
    linears = {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    assert len(linears) == 8 and 'model.transformer.blocks.1.ffn.down_proj' in linears  # 4 per block, no lm_head
    for name, module in linears.items():
        assert float((module.weight == 0).float().mean()) == pytest.approx(SPARSITY, abs=1e-3), name
    wte = model.model.transformer.wte
    assert bool((wte.weight != 0).all())  # the output layer (tied to the input embeddings) is kept dense
    assert metrics['pruning/sparsity'][-1][1] == pytest.approx(SPARSITY, abs=1e-3)
    assert metrics['bias/eval/weight_sparsity'][-1][1] == pytest.approx(SPARSITY, abs=1e-3)


def test_classes_restrict_cev_sde_to_the_most_frequent_target_tokens(pruned, corpus, dense):
    _, metrics, record = pruned
    counts = _eval_target_counts(corpus, dense)
    expected = _most_frequent(counts, 50)
    assert record['classes'] == expected
    # CEV/SDE count exactly the eval positions whose target is one of the 50 classes, classified among them.
    assert record['num_samples'] == sum(counts[token] for token in expected) < sum(counts.values())
    assert len(record['confmat']) == len(record['reference_confmat']) == 50
    assert len(record['per_class']['delta_fpr']) == len(record['per_class']['delta_fnr']) == 50
    assert 0 <= metrics['bias/eval/n_masked'][-1][1] <= 100


def test_the_dense_model_against_itself_has_zero_bias_on_an_explicit_class_list(corpus, dense, tmp_path):
    classes = _most_frequent(_eval_target_counts(corpus, dense), 10)
    config = _with_memory_logger(load_yaml('fairness'))
    del config['algorithms']  # no pruning, and lr 0: the trained model stays the dense reference
    config['callbacks']['bias_probe']['classes'] = classes
    config.update(max_duration='1ba', eval_interval='1ba', run_name='llmfoundry_fairness_self')
    config['optimizer']['lr'] = 0.0
    trainer = train_yaml(write_yaml(config, tmp_path / 'self.yaml'), _overrides(corpus, dense))
    metrics = logged_metrics(trainer)
    assert metrics['bias/eval/cev'][-1][1] == 0.0 and metrics['bias/eval/sde'][-1][1] == 0.0
    assert metrics['similarity/eval/agreement'][-1][1] == 1.0
    assert metrics['similarity/eval/kl'][-1][1] == pytest.approx(0.0, abs=1e-9)
    record = json.loads((dense / 'llmfoundry_fairness_self' / 'bias_probe.json').read_text())['records'][-1]
    assert record['classes'] == classes and len(record['confmat']) == 10


def test_two_ranks_pick_the_same_classes_and_log_the_same_bias(corpus, dense, tmp_path):
    path = write_yaml(_with_memory_logger(load_yaml('fairness')), tmp_path / 'fairness.yaml')
    ranks = train_yaml_distributed(path, _overrides(corpus, dense) + [
        'run_name=llmfoundry_fairness_ddp', 'max_duration=2ba', 'eval_interval=2ba', 'global_train_batch_size=16'])
    assert [rank['batches'] for rank in ranks] == [2, 2]
    keys = ('bias/eval/cev', 'bias/eval/sde', 'bias/eval/n_masked', 'similarity/eval/agreement')
    values = [{key: rank['metrics'][key][-1][1] for key in keys} for rank in ranks]
    assert values[0] == values[1] and math.isfinite(values[0]['bias/eval/cev'])
    # The classes were counted over both ranks' shards of the eval set: 50 of them, the same on both ranks (rank 0
    # wrote the record; rank 1's identical reduced confusion matrices need the identical class list).
    record = json.loads((dense / 'llmfoundry_fairness_ddp' / 'bias_probe.json').read_text())['records'][-1]
    assert len(record['classes']) == len(set(record['classes'])) == 50


# --- the output layer of tied embeddings (no training) ------------------------------------------------------


def _mpt(**overrides):
    from llmfoundry.models.mpt.configuration_mpt import MPTConfig
    from llmfoundry.models.mpt.modeling_mpt import MPTForCausalLM

    config = {k: v for k, v in TINY_MPT.items() if k not in ('name', 'loss_fn')}
    return MPTForCausalLM(MPTConfig(**{**config, **overrides}))


def test_tied_mpt_output_layer_is_the_embedding_and_every_block_linear_is_prunable():
    model = _mpt()
    assert model.lm_head is None  # llm-foundry's default: input and output embeddings tied
    name, module = output_layer(model)
    assert (name, module) == ('transformer.wte', model.transformer.wte)
    names = [name for name, _ in prunable_layers(model)]
    assert names == [f'transformer.blocks.{b}.{layer}' for b in (0, 1)
                     for layer in ('attn.Wqkv', 'attn.out_proj', 'ffn.up_proj', 'ffn.down_proj')]
    # prune_output_layer prunes the tied embedding itself (input and output share the weight)
    assert [name for name, _ in prunable_layers(model, prune_output_layer=True)] == ['transformer.wte'] + names


def test_untied_mpt_keeps_its_lm_head_dense_and_prunes_every_block():
    model = _mpt(tie_word_embeddings=False)
    assert output_layer(model) == ('lm_head', model.lm_head)
    names = [name for name, _ in prunable_layers(model)]
    assert 'lm_head' not in names and len(names) == 8 and 'transformer.blocks.1.ffn.down_proj' in names


def test_a_linear_head_tied_to_an_embedding_is_the_output_layer():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.hidden, self.head = nn.Embedding(10, 4), nn.Linear(4, 4), nn.Linear(4, 10, bias=False)
            self.head.weight = self.embed.weight
            self.after = nn.Linear(10, 10)  # registered last, but not the tied head

    model = Tied()
    assert output_layer(model) == ('head', model.head)
    assert [name for name, _ in prunable_layers(model)] == ['hidden', 'after']
    plain = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))  # no embeddings: the last layer, as before
    assert [name for name, _ in prunable_layers(plain)] == ['0']


# --- YAML mistakes: named, with the fix, before training starts ---------------------------------------------


def _probe_config(**changes):
    config = load_yaml('fairness')
    probe = config['callbacks']['bias_probe']
    for key, value in changes.items():
        if value is _DELETE:
            probe.pop(key)
        else:
            probe[key] = value
    return config


_DELETE = object()


def _reference(**changes):
    reference = copy.deepcopy(load_yaml('fairness')['callbacks']['bias_probe']['reference_model'])
    for key, value in changes.items():
        if value is _DELETE:
            reference.pop(key)
        else:
            reference[key] = value
    return reference


MISTAKES = {
    'reference_not_a_section': (
        _probe_config(reference_model='runs/dense/checkpoints/latest-rank0.pt'),
        r"callbacks\.bias_probe\.reference_model is a str; expected a torch\.nn\.Module .* Fix: .*"
        r"callbacks\.bias_probe\.reference_model: \{model: <model section>, checkpoint: "),
    'checkpoint_file_missing': (
        _probe_config(reference_model=_reference(checkpoint='${variables.runs}/nowhere/latest-rank0.pt')),
        r"callbacks\.bias_probe\.reference_model\.checkpoint='.*/nowhere/latest-rank0\.pt' is missing\. Fix: give "
        r"the checkpoint file"),
    'checkpoint_not_given': (
        _probe_config(reference_model=_reference(checkpoint=_DELETE)),
        r"callbacks\.bias_probe\.reference_model has no checkpoint \(checkpoint=None\): a reference built from a "
        r"model section alone has random weights\. Fix: add checkpoint:"),
    'reference_model_section_without_name': (
        _probe_config(reference_model=_reference(model={'d_model': 32})),
        r"callbacks\.bias_probe\.reference_model\.model=\{'d_model': 32\} is not a model section with a name\. "
        r"Fix: write an llm-foundry model section"),
    'reference_vocab_differs': (
        _probe_config(reference_model=_reference(model={**TINY_MPT, 'vocab_size': 50368})),
        r"callbacks\.bias_probe\.reference_model\.model\.vocab_size=50368 differs from the run's "
        r"model\.vocab_size=4096.*Fix: give the reference the model section it was trained with"),
    'classes_missing': (
        _probe_config(classes=_DELETE),
        r"callbacks\.bias_probe\.classes is not set: CEV/SDE over a whole vocabulary .* Fix: "
        r"callbacks\.bias_probe\.classes: 50 \(the 50 most frequent targets"),
    'classes_below_two': (
        _probe_config(classes=1),
        r"callbacks\.bias_probe\.classes=1 is below 2: CEV/SDE compare classes with each other\. Fix: "),
    'classes_a_string': (
        _probe_config(classes='top50'),
        r"callbacks\.bias_probe\.classes='top50' is neither a count nor a list of class ids\. Fix: "),
    'classes_negative_id': (
        _probe_config(classes=[13, -1]),
        r"callbacks\.bias_probe\.classes=\[13, -1\] holds -1, which is not a class id \(an int >= 0\)\. Fix: "),
    'classes_repeated': (
        _probe_config(classes=[13, 267, 13]),
        r"callbacks\.bias_probe\.classes=\[13, 267, 13\] repeats \[13\]\. Fix: list each class once\."),
    'classes_outside_vocab': (
        _probe_config(classes=[13, 4096]),
        r"callbacks\.bias_probe\.classes=\[13, 4096\] holds the id 4096, outside the model's vocabulary "
        r"\(model\.vocab_size=4096\)\. Fix: use token ids below 4096\."),
    'num_classes_contradicts_classes': (
        _probe_config(num_classes=10),
        r"callbacks\.bias_probe\.num_classes=10 contradicts callbacks\.bias_probe\.classes=50 \(50 classes\)\. "
        r"Fix: leave num_classes unset"),
    'eval_label_not_an_evaluator': (
        _probe_config(eval_label='test'),
        r"callbacks\.bias_probe\.eval_label='test' is the label of none of the run's evaluators \['eval'\], so "
        r"nothing would be probed\. Fix: set eval_label to one of \['eval'\]"),
}


@pytest.mark.parametrize('mistake', sorted(MISTAKES))
def test_a_bias_probe_yaml_mistake_is_named_before_training(mistake, corpus, dense, tmp_path):
    config, message = MISTAKES[mistake]
    path = write_yaml(config, tmp_path / 'bad.yaml')
    with pytest.raises(ValueError, match=message):  # raised by the callback's constructor: before the model exists
        train_yaml(path, _overrides(corpus, dense))  # the dense checkpoint exists: only the mistake is wrong


def test_a_run_without_eval_loader_is_refused_by_the_probe(corpus, dense, tmp_path):
    config = load_yaml('fairness')
    del config['eval_loader'], config['eval_subset_num_batches']
    path = write_yaml(config, tmp_path / 'bad.yaml')
    with pytest.raises(ValueError, match=r"callbacks\.bias_probe\.eval_label='eval', but the run has no eval_loader, "
                                         r"so nothing would be probed\. Fix: add an eval_loader section"):
        train_yaml(path, _overrides(corpus, dense))


def test_a_magnitude_pruning_yaml_mistake_is_named_before_training(corpus, dense, tmp_path):
    config = load_yaml('fairness')
    config['algorithms']['magnitude_pruning']['target_sparsity'] = 1.5
    path = write_yaml(config, tmp_path / 'bad.yaml')
    with pytest.raises(ValueError, match=r'target_sparsity=1\.5 is outside \[0, 1\)\. Fix: use a fraction'):
        train_yaml(path, _overrides(corpus, dense))


def test_the_probe_built_from_a_section_reprs_and_rebuilds(dense):
    from composer_ext.fairness.probe import BiasProbe

    reference = {'model': dict(TINY_MPT), 'checkpoint': str(dense / 'llmfoundry_fairness_dense' / 'checkpoints' /
                                                            'latest-rank0.pt')}
    probe = BiasProbe(reference, 'eval', classes=[13, 267], num_bootstraps=0)
    assert probe.reference_model is None  # built at FIT_START, with the run's tokenizer
    assert repr(eval(repr(probe), {'BiasProbe': BiasProbe})) == repr(probe)
    assert probe.state_dict()['classes'] == [13, 267]
    with pytest.raises(TypeError, match=r'reference_model is a int; expected a torch\.nn\.Module'):
        BiasProbe(3, 'eval')
    with pytest.raises(ValueError, match=r'reference_model has no checkpoint'):
        BiasProbe({'model': dict(TINY_MPT)}, 'eval', classes=2)
