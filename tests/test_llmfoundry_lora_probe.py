"""LoRAProbe from an llm-foundry YAML (yamls/llmfoundry/lora_probe.yaml), run by llm-foundry's own ``train_from_yaml``
on the CPU: evaluators written as llm-foundry eval sections with a label, the run config (``train_config``) supplying
their batch size and sequence length, language-model metrics by default on an MPT whose eval metrics include
in-context-learning ones, the ΔW spectra, learning and forgetting logged; LoRA through llm-foundry's ``peft_config``
on an ``hf_causal_lm`` built from a local config directory; and every YAML mistake in the probe's entry reported
with the key and the fix, before training starts."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from composer_ext.data.corpus import ensure_corpus
from composer_ext.lora_probe.callback import LoRAProbe
from tests.llmfoundry_harness import YAML_DIR, load_yaml, logged_metrics, train_yaml, write_yaml

PROBE_YAML = YAML_DIR / 'lora_probe.yaml'
LM_METRICS = ['LanguageCrossEntropy', 'LanguagePerplexity']


@pytest.fixture(scope='module')
def data() -> str:
    return str(ensure_corpus(progress=False).root)


@pytest.fixture(scope='module')
def run_config(data) -> dict:
    """The YAML resolved as llm-foundry passes it to callbacks_with_config (``train_config``)."""
    config = OmegaConf.merge(OmegaConf.create(load_yaml('lora_probe')), {'variables': {'data': data}})
    return OmegaConf.to_container(config, resolve=True)


def _probe(trainer) -> LoRAProbe:
    probes = [c for c in trainer.state.callbacks if isinstance(c, LoRAProbe)]
    assert len(probes) == 1, trainer.state.callbacks
    return probes[0]


def _hyperparameters(trainer) -> dict:
    from composer.loggers import InMemoryLogger

    return next(d for d in trainer.logger.destinations if isinstance(d, InMemoryLogger)).hyperparameters


@pytest.fixture(scope='module')
def full_run(data, tmp_path_factory):
    """The shipped YAML, 8 batches, probed every 4, eval batch size from the run's device_eval_batch_size (4)."""
    run_dir = tmp_path_factory.mktemp('lora_probe_runs')
    trainer = train_yaml(PROBE_YAML, [f'variables.data={data}', f'variables.run_dir={run_dir}', 'max_duration=8ba',
                                      'callbacks.lora_probe.every=4ba', 'callbacks.lora_probe.spectrum_every=4ba',
                                      'device_eval_batch_size=4', 'loggers.inmemory={}', 'log_to_console=false'])
    return trainer, run_dir


def test_shipped_yaml_hard_codes_no_machine_paths():
    text = PROBE_YAML.read_text()
    assert '/root' not in text and '/home' not in text
    probe = load_yaml('lora_probe')['callbacks']['lora_probe']
    assert [s['label'] for s in probe['source_evals']] == ['prose']
    assert [s['label'] for s in probe['target_evals']] == ['code']
    assert '/code' in load_yaml('lora_probe')['train_loader']['dataset']['local']


def test_yaml_run_logs_spectra_learning_and_forgetting(full_run):
    trainer, run_dir = full_run
    metrics = logged_metrics(trainer)
    # ΔW spectra of the 8 trainable matrices (the tied embedding is not probed), at batches 4 and 8.
    assert metrics['lora_probe/modules'][-1][1] == 8
    for stat in ('rank_at_energy/mean', 'rank_at_energy/max', 'effective_rank/mean', 'stable_rank/mean',
                 'spectral_norm/max', 'frobenius_norm/total'):
        rows = metrics[f'lora_probe/delta_w/{stat}']
        assert {batch for batch, _ in rows} == {4, 8} and all(math.isfinite(v) and v > 0 for _, v in rows), stat
    per_module = [k for k in metrics if k.startswith('lora_probe/delta_w/model.') and k.endswith('/rank_at_energy')]
    assert len(per_module) == 8
    # Learning (target code) and forgetting (source prose), measured from the baseline at batch 0.
    for key in ('lora_probe/learning', 'lora_probe/forgetting', 'lora_probe/learning/code/LanguageCrossEntropy',
                'lora_probe/forgetting/prose/LanguageCrossEntropy'):
        rows = metrics[key]
        assert rows[0] == (0, 0.0) and rows[-1][0] == 8 and all(math.isfinite(v) for _, v in rows), key
    learning = metrics['lora_probe/learning'][-1][1]
    forgetting = metrics['lora_probe/forgetting'][-1][1]
    start = metrics['lora_probe/target/code/LanguageCrossEntropy'][0][1]
    end = metrics['lora_probe/target/code/LanguageCrossEntropy'][-1][1]
    assert learning == pytest.approx(start - end) and learning > 0.3
    # Trained on code from random weights: code improves more than prose (which improves too: forgetting < 0).
    assert learning > -forgetting
    history = json.loads((run_dir / 'lora_probe_full_code' / 'lora_probe.json').read_text())
    assert history['evaluators'] == {'source': ['prose'], 'target': ['code']}
    assert [r['batch'] for r in history['history']] == [0, 4, 8]


def test_default_metrics_are_language_model_metrics_and_the_choice_is_logged(full_run):
    trainer, run_dir = full_run
    model_metrics = list(trainer.state.model.get_metrics(is_train=False))
    # The MPT's eval metrics include in-context-learning ones, whose update needs ICL batches (KeyError
    # 'continuation_indices' on text): the probe must not follow them.
    assert 'InContextLearningLMAccuracy' in model_metrics and 'TokenAccuracy' in model_metrics
    metrics = logged_metrics(trainer)
    followed = {k.rsplit('/', 1)[1] for k in metrics if k.startswith(('lora_probe/source/', 'lora_probe/target/'))}
    assert followed == set(LM_METRICS)
    hyperparameters = _hyperparameters(trainer)
    for label in ('prose', 'code'):
        assert hyperparameters[f'lora_probe/metrics/{label}'] == LM_METRICS
        assert hyperparameters[f'lora_probe/metrics_chosen_by/{label}'] == 'default: language-model metrics'
    assert hyperparameters['lora_probe/primary_metric'] == 'LanguageCrossEntropy'
    history = json.loads((run_dir / 'lora_probe_full_code' / 'lora_probe.json').read_text())
    assert history['metrics'] == {'prose': LM_METRICS, 'code': LM_METRICS}
    assert history['metrics_chosen_by']['code'] == 'default: language-model metrics'


def test_train_config_supplies_batch_size_and_seq_len_and_repr_rebuilds(full_run, data):
    trainer, _ = full_run
    probe = _probe(trainer)
    # The sections set no batch size: the run's device_eval_batch_size (4, overridden from 8) is used.
    for evaluator in probe.source_evals + probe.target_evals:
        assert evaluator.dataloader.dataloader.batch_size == 4
    assert [e.label for e in probe.source_evals] == ['prose'] and [e.label for e in probe.target_evals] == ['code']
    # The kept sections are plain data, completed from the run config and untouched by llm-foundry's builders.
    text = repr(probe)
    assert (f"target_evals=[{{'label': 'code', 'name': 'text', 'dataset': {{'local': '{data}/code', 'split': 'val', "
            f"'max_seq_len': 64}}, 'batch_size': 4}}], every='4ba'") in text
    rebuilt = eval(text, {'LoRAProbe': LoRAProbe})
    assert repr(rebuilt) == text
    state = probe.state_dict()
    assert [r['batch'] for r in state['history']] == [0, 4, 8] and state['tracker'] is not None


def test_lora_via_llmfoundry_peft_config_on_a_local_hf_causal_lm(data, tmp_path):
    from transformers import LlamaConfig

    hf_dir = tmp_path / 'tiny_llama'
    LlamaConfig(vocab_size=4096, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=2, max_position_embeddings=64).save_pretrained(hf_dir)
    config = load_yaml('lora_probe')
    config['model'] = {'name': 'hf_causal_lm', 'pretrained_model_name_or_path': str(hf_dir), 'pretrained': False,
                       'init_device': 'cpu',
                       'peft_config': {'peft_type': 'LORA', 'task_type': 'CAUSAL_LM', 'r': 4, 'lora_alpha': 8,
                                       'lora_dropout': 0.0, 'target_modules': ['q_proj', 'v_proj', 'up_proj']}}
    path = write_yaml(config, tmp_path / 'lora.yaml')
    trainer = train_yaml(path, [f'variables.data={data}', f'variables.run_dir={tmp_path}', 'run_name=lora',
                                'max_duration=4ba', 'callbacks.lora_probe.every=4ba',
                                'callbacks.lora_probe.spectrum_every=4ba', 'loggers.inmemory={}',
                                'log_to_console=false'])
    probe = _probe(trainer)
    summary = probe.summary(trainer.state)
    assert summary['adapter']['kind'] == 'lora' and summary['adapter']['r'] == 4
    # The adapted layers, probed as LoRA layers (ΔW = scaling * B A from the factors), and nothing else.
    assert sorted(name.rsplit('.', 1)[1] for name in summary['modules']) == ['q_proj', 'up_proj', 'v_proj']
    assert all(module['kind'] == 'lora' for module in summary['modules'].values())
    assert summary['adapter']['trainable_params'] < summary['adapter']['total_params'] / 10
    metrics = logged_metrics(trainer)
    ranks = [v for k, rows in metrics.items() if k.endswith('/rank_at_energy') and '/delta_w/model.' in k
             for _, v in rows]
    assert len(ranks) >= 3 and all(1 <= r <= 4 for r in ranks)  # a rank-4 adapter's ΔW has rank <= 4
    assert math.isfinite(metrics['lora_probe/learning'][-1][1])
    assert summary['metrics'] == {'prose': LM_METRICS, 'code': LM_METRICS}


# -- YAML mistakes: each reported with its key and the fix, before training starts ------------------------------


def _build(entry: dict, run_config: dict):
    """llm-foundry's own build_callback on a probe entry, as its train() does (before the model exists)."""
    from llmfoundry.utils.builders import build_callback

    return build_callback('lora_probe', kwargs=copy.deepcopy(entry), train_config=copy.deepcopy(run_config))


def _entry(run_config: dict) -> dict:
    return copy.deepcopy(run_config['callbacks']['lora_probe'])


def test_llmfoundry_builds_the_probe_with_train_config_and_section_batch_sizes(run_config):
    entry = _entry(run_config)
    entry['source_evals'][0]['batch_size'] = 2
    probe = _build(entry, run_config)
    assert isinstance(probe, LoRAProbe)
    assert probe.source_evals[0]['batch_size'] == 2  # the section's own
    assert probe.target_evals[0]['batch_size'] == run_config['device_eval_batch_size'] == 8  # the run's
    assert probe.target_evals[0]['dataset']['max_seq_len'] == run_config['max_seq_len'] == 64


def _set(path: str, value):
    def mutate(entry: dict) -> None:
        *parents, last = path.split('.')
        node = entry
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if value is _DELETE:
            del node[last]
        else:
            node[last] = value
    return mutate


_DELETE = object()
KEY = r'callbacks\.lora_probe\.'


@pytest.mark.parametrize('mutate,error,message', [
    (_set('source_evals', ['prose']), TypeError,
     KEY + r"source_evals\[0\] is a str \('prose'\)\. Fix: .*eval sections such as \{label: prose, name: text"),
    (_set('source_evals.0.label', _DELETE), ValueError,
     KEY + r'source_evals\[0\] has no label \(label=None\)\. Fix: add a label'),
    (_set('target_evals.0.name', _DELETE), ValueError,
     KEY + r'target_evals\[0\] has no dataloader name\. Fix: add name \(e\.g\. text\)'),
    (_set('target_evals.0.name', 'txt'), ValueError,
     KEY + r"target_evals\[0\]\.name='txt' is not an llm-foundry dataloader\. Fix: use one of \[.*'text'"),
    (_set('target_evals.0.label', 'prose'), ValueError,
     KEY + r"source_evals/target_evals: the evaluator labels \['prose'\] are used more than once .*Fix: give every"),
    (_set('every', 'soon'), ValueError, KEY + r"every='soon' is not a Composer time string\. Fix:"),
    (_set('spectrum_every', '0ba'), ValueError, KEY + r"spectrum_every='0ba' must be positive"),
    (_set('metric_names', 'LanguageCrossEntropy'), ValueError,
     KEY + r"metric_names='LanguageCrossEntropy' is invalid\. Fix: pass a non-empty list"),
    (_set('source_evals.0.batch_size', 0), ValueError,
     KEY + r'source_evals\[0\]\.batch_size=0 is not a positive int\. Fix: give the per-device batch size'),
    (_set('source_evals.0.subset_num_batches', 0), ValueError,
     KEY + r'source_evals\[0\]\.subset_num_batches=0 is invalid\. Fix: use a positive int'),
    (_set('target_evals.0.dataset', 'code/val'), ValueError,
     KEY + r"target_evals\[0\]\.dataset='code/val' is not a mapping\. Fix:"),
    (_set('target_evals.0.dataset.split', 'validation'), ValueError,
     KEY + r"target_evals\[0\]\.dataset\.local='.*/code' \(split 'validation'\): .*no index\.json.*Fix: point local"),
])
def test_yaml_mistake_is_reported_with_key_and_fix_at_construction(run_config, mutate, error, message):
    entry = _entry(run_config)
    mutate(entry)
    with pytest.raises(error, match=message):
        _build(entry, run_config)


def test_both_batch_sizes_and_no_batch_size_are_rejected(run_config):
    entry = _entry(run_config)
    entry['source_evals'][0].update(batch_size=2, device_eval_batch_size=4)
    with pytest.raises(ValueError, match=KEY + r'source_evals\[0\] sets both batch_size=2 and '
                                                r'device_eval_batch_size=4\. Fix: keep one'):
        _build(entry, run_config)
    # From Python, without a run config, a section needs its own batch size.
    section = {k: v for k, v in _entry(run_config)['source_evals'][0].items()}
    with pytest.raises(ValueError, match=r'source_evals\[0\] has no batch size \(no batch_size in the section, and no '
                                         r'train_config was given\)\. Fix: add batch_size: 8'):
        LoRAProbe([section], [])
    assert LoRAProbe([dict(section, batch_size=8)], []).source_labels == ['prose']


def _not_training(excinfo) -> bool:
    return not any(entry.name in ('fit', '_train_loop') for entry in excinfo.traceback)


def test_yaml_mistakes_fail_in_train_from_yaml_before_training(data, tmp_path):
    """Through llm-foundry's own train: a section mistake when the callbacks are built, a metric the model lacks
    (or an in-context-learning one) when the Trainer is built (Event.INIT), never in fit."""
    common = [f'variables.data={data}', f'variables.run_dir={tmp_path}', 'max_duration=2ba', 'log_to_console=false']
    config = load_yaml('lora_probe')
    del config['callbacks']['lora_probe']['target_evals'][0]['label']
    with pytest.raises(ValueError, match=KEY + r'target_evals\[0\] has no label') as excinfo:
        train_yaml(write_yaml(config, tmp_path / 'no_label.yaml'), common)
    assert _not_training(excinfo)
    with pytest.raises(ValueError, match=r"evaluator 'prose' has no metric 'BLEU' \(its metrics: \[.*'TokenAccuracy'"
                                         r".*Fix: choose callbacks\.lora_probe\.metric_names among them") as excinfo:
        train_yaml(PROBE_YAML, common + ['callbacks.lora_probe.metric_names=[BLEU]'])
    assert _not_training(excinfo)
    with pytest.raises(ValueError, match=KEY + r"metric_names=\['InContextLearningLMAccuracy'\]: "
                                                r"'InContextLearningLMAccuracy' is an in-context-learning metric.*Fix: "
                                                r'follow language-model metrics') as excinfo:
        train_yaml(PROBE_YAML, common + ['callbacks.lora_probe.metric_names=[InContextLearningLMAccuracy]'])
    assert _not_training(excinfo)
    assert not list(Path(tmp_path).rglob('lora_probe.json'))
