"""Knowledge distillation from an llm-foundry YAML (yamls/llmfoundry/knowledge_distillation.yaml), run by llm-foundry's
own ``train_from_yaml`` on the CPU: teachers trained by llm-foundry (kd_teacher.yaml) and given as llm-foundry model
sections + checkpoints, a Hugging Face directory, a TorchScript file; the window; 2 gloo ranks; resume; and every YAML
mistake in a teacher entry reported with the key and the fix, before training starts."""

from __future__ import annotations

import copy
import traceback
import warnings
from pathlib import Path

import pytest
import torch
from composer.core import Callback
from torch import nn

from composer_ext.core.checkpoints import load_checkpoint, model_state_dict
from composer_ext.core.forward import forward_parameters
from composer_ext.core.provenance import tensors_sha256
from composer_ext.data.corpus import ensure_corpus
from composer_ext.distillation import KnowledgeDistillation
from tests.llmfoundry_harness import YAML_DIR, load_yaml, logged_metrics, train_yaml, train_yaml_distributed, write_yaml

KD_YAML = YAML_DIR / 'knowledge_distillation.yaml'
TEACHER_YAML = YAML_DIR / 'kd_teacher.yaml'
SHORT = ('max_duration=6ba', 'eval_interval=6ba', 'eval_subset_num_batches=1')  # window: batches 0-2 (end=0.5dur)


@pytest.fixture(scope='module')
def data() -> str:
    return str(ensure_corpus(progress=False).root)


@pytest.fixture(scope='module')
def teachers(data, tmp_path_factory) -> Path:
    """``<dir>/kd_teacher_{a,b}/checkpoints/latest-rank0.pt``, written by llm-foundry runs of kd_teacher.yaml."""
    root = tmp_path_factory.mktemp('teacher_runs')
    for name, seed in (('kd_teacher_a', 1), ('kd_teacher_b', 2)):
        train_yaml(TEACHER_YAML, [f'variables.data={data}', f'run_name={name}', f'seed={seed}', 'max_duration=2ba',
                                  'save_interval=2ba', f'save_folder={root}/{name}/checkpoints'])
        assert (root / name / 'checkpoints' / 'latest-rank0.pt').is_file()
    return root


@pytest.fixture(scope='module')
def hf_teacher(tmp_path_factory) -> Path:
    """A Hugging Face directory: a tiny GPT-2 with the corpus vocabulary, saved with save_pretrained."""
    from transformers import GPT2Config, GPT2LMHeadModel

    path = tmp_path_factory.mktemp('hf_teacher') / 'gpt2'
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=4096, n_positions=64, n_embd=32, n_layer=1, n_head=2)).save_pretrained(path)
    return path


class InputIdsTeacher(nn.Module):
    """A TorchScript teacher that takes ``input_ids`` only: any other batch key passed to it is an error."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(4096, 16)
        self.lm_head = nn.Linear(16, 4096)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.embedding(input_ids))


@pytest.fixture(scope='module')
def torchscript_teacher(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp('ts_teacher') / 'teacher.ts'
    torch.manual_seed(0)
    torch.jit.save(torch.jit.script(InputIdsTeacher()), str(path))
    return path


def _overrides(data: str, teachers: Path, *extra: str) -> list[str]:
    return [f'variables.data={data}', f'variables.teachers={teachers}', *SHORT, *extra]


def _kd(trainer) -> KnowledgeDistillation:
    return next(a for a in trainer.state.algorithms if isinstance(a, KnowledgeDistillation))


def _section(config: dict, index: int) -> dict:
    return config['algorithms']['knowledge_distillation']['teachers'][index]


class TeacherObserver(Callback):
    """Records at INIT and FIT_START (after the algorithm) whether each teacher is built, where, with what tokenizer."""

    def __init__(self):
        self.seen: dict[str, list] = {}

    def _record(self, event: str, state) -> None:
        kd = next(a for a in state.algorithms if isinstance(a, KnowledgeDistillation))
        student_device = next(state.model.parameters()).device
        rows = []
        for module in kd.teachers:
            if module is None:
                rows.append(None)
                continue
            device = next(module.parameters()).device
            rows.append({'type': type(module).__name__, 'on_student_device': device == student_device,
                         'run_tokenizer': getattr(module, 'tokenizer', None) is state.model.tokenizer,
                         'frozen': not any(p.requires_grad for p in module.parameters()),
                         'eval': not module.training})
        self.seen[event] = rows

    def init(self, state, logger):
        self._record('init', state)

    def fit_start(self, state, logger):
        self._record('fit_start', state)


@pytest.fixture(scope='module')
def observer_registered():
    from llmfoundry import registry

    if 'kd_teacher_observer' not in registry.callbacks:
        registry.callbacks.register('kd_teacher_observer', func=TeacherObserver)


# --- the shipped YAML -------------------------------------------------------------------------------------------


def test_kd_yaml_distils_from_llmfoundry_checkpoints_in_the_window_only(data, teachers, tmp_path):
    trainer = train_yaml(KD_YAML, _overrides(data, teachers, f'save_folder={tmp_path}/run', 'save_interval=2ba'))
    metrics = logged_metrics(trainer)
    assert [v for _, v in metrics['kd/active']] == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    # kd/active is logged at BATCH_START, kd/loss at BATCH_END (when the batch counter has moved on)
    kd_steps = [batch - 1 for batch, _ in metrics['kd/loss']]
    inactive = [batch for batch, value in metrics['kd/active'] if value == 0.0]
    assert kd_steps == [0, 1, 2] and inactive == [3, 4, 5]  # KD loss in the window and none after
    assert all(0.0 < value < 100.0 for _, value in metrics['kd/loss'])
    assert {value for _, value in metrics['kd/teacher']} <= {0.0, 1.0}
    kd = _kd(trainer)
    assert kd.num_teachers == 2 and kd.teachers == [None, None]  # built at FIT_START, released after the window
    for entry, name in zip(kd.manifest(), ('kd_teacher_a', 'kd_teacher_b')):
        checkpoint = teachers / name / 'checkpoints' / 'latest-rank0.pt'
        saved = model_state_dict(load_checkpoint(checkpoint), checkpoint)
        # the teacher held the weights of the llm-foundry run that trained it (not a fresh initialization)
        assert entry['checksum'] == tensors_sha256(saved), entry
        assert entry['description'] == f'mpt_causal_lm@{checkpoint}' and entry['num_parameters'] > 0
    assert (tmp_path / 'run' / 'ep0-ba2-rank0.pt').is_file()


def test_resume_continues_the_teacher_draws_and_warns_about_other_teacher_weights(data, teachers, tmp_path):
    end = 'algorithms.knowledge_distillation.end=4ba'
    full = logged_metrics(train_yaml(KD_YAML, _overrides(data, teachers, end, f'save_folder={tmp_path}/full',
                                                         'save_interval=2ba')))
    checkpoint = tmp_path / 'full' / 'ep0-ba2-rank0.pt'
    with warnings.catch_warnings(record=True) as caught:  # the same teachers: nothing to warn about
        warnings.simplefilter('always')
        same = logged_metrics(train_yaml(KD_YAML, _overrides(data, teachers, end, f'load_path={checkpoint}')))
    assert not [w for w in caught if 'differ from the checkpoint' in str(w.message)]
    assert same['kd/teacher'] == [row for row in full['kd/teacher'] if row[0] > 2]  # the sampler state was restored
    # the two teacher checkpoints swapped: the checksums are compared once the teachers are built at FIT_START
    config = load_yaml('knowledge_distillation')
    first, second = _section(config, 0), _section(config, 1)
    first['checkpoint'], second['checkpoint'] = second['checkpoint'], first['checkpoint']
    path = write_yaml(config, tmp_path / 'swapped.yaml')
    with pytest.warns(UserWarning, match=r'the weights of teacher\(s\) 0 \(mpt_causal_lm@.*kd_teacher_a.* -> '
                                         r'mpt_causal_lm@.*kd_teacher_b.*\), 1 .* differ from the checkpoint'):
        train_yaml(path, _overrides(data, teachers, end, f'load_path={checkpoint}'))


def test_the_same_yaml_on_two_gloo_ranks_uses_the_same_teacher_at_every_step(data, teachers):
    ranks = train_yaml_distributed(KD_YAML, _overrides(data, teachers, 'eval_loader=null', 'eval_interval=1'))
    assert [r['world_size'] for r in ranks] == [2, 2]
    zero, one = (r['metrics'] for r in sorted(ranks, key=lambda r: r['rank']))
    assert len(zero['kd/teacher']) == 3 and zero['kd/teacher'] == one['kd/teacher']
    assert zero['kd/loss'] == one['kd/loss']  # reduced over the ranks: both distilled from the same teachers
    assert [v for _, v in zero['kd/active']] == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]


# --- every teacher kind through the entry point -----------------------------------------------------------------


def test_llmfoundry_hf_and_torchscript_teachers_built_at_fit_start_on_the_students_device(
        data, teachers, hf_teacher, torchscript_teacher, observer_registered, tmp_path):
    config = load_yaml('knowledge_distillation')
    section = _section(config, 0)
    config['algorithms']['knowledge_distillation'].update(
        teachers=[section, {'pretrained_model_name_or_path': str(hf_teacher)}, str(torchscript_teacher)],
        policy='round_robin')
    config['callbacks'] = {'kd_teacher_observer': {}}
    trainer = train_yaml(write_yaml(config, tmp_path / 'kinds.yaml'), _overrides(data, teachers))
    observer = next(c for c in trainer.state.callbacks if isinstance(c, TeacherObserver))
    # the TorchScript file is loaded when the algorithm is built; the two YAML sections wait for FIT_START
    assert observer.seen['init'][:2] == [None, None] and observer.seen['init'][2]['type'] == 'RecursiveScriptModule'
    llmfoundry_teacher, hf, script = observer.seen['fit_start']
    assert llmfoundry_teacher == {'type': 'ComposerMPTCausalLM', 'on_student_device': True, 'run_tokenizer': True,
                                  'frozen': True, 'eval': True}
    assert hf['type'] == 'GPT2LMHeadModel' and hf['on_student_device'] and hf['frozen'] and hf['eval']
    assert script['type'] == 'RecursiveScriptModule' and script['on_student_device']
    metrics = logged_metrics(trainer)
    # round_robin: each kind served one step of the window (the TorchScript teacher got input_ids only: called with
    # the batch's attention_mask it raises)
    assert [v for _, v in metrics['kd/teacher']] == [0.0, 1.0, 2.0]
    assert len(metrics['kd/loss']) == 3 and all(0.0 < v < 100.0 for _, v in metrics['kd/loss'])
    assert _kd(trainer).teachers == [None, None, None]  # all released after the window


def test_a_torchscript_forward_gets_only_the_inputs_it_names(torchscript_teacher):
    from composer_ext.core.forward import frozen_forward

    loaded = torch.jit.load(str(torchscript_teacher))
    assert forward_parameters(loaded) == {'input_ids'}
    batch = {'input_ids': torch.zeros(2, 5, dtype=torch.long), 'attention_mask': torch.ones(2, 5),
             'labels': torch.zeros(2, 5, dtype=torch.long)}
    assert frozen_forward(loaded, batch).shape == (2, 5, 4096)
    with pytest.raises(RuntimeError, match=r'expected at most 2 argument\(s\) but received 3'):
        loaded(**{k: v for k, v in batch.items() if k != 'labels'})  # what it received before


def test_repr_of_yaml_teachers_rebuilds(teachers, hf_teacher):
    section = _section(load_yaml('knowledge_distillation'), 0)
    section = {**section, 'model': {**section['model'], 'max_seq_len': 64},
               'checkpoint': str(teachers / 'kd_teacher_a' / 'checkpoints' / 'latest-rank0.pt')}
    kd = KnowledgeDistillation([section, {'pretrained_model_name_or_path': hf_teacher}], end='4ba')
    assert kd.teachers == [None, None] and [t['checksum'] for t in kd.manifest()] == [None, None]
    rebuilt = eval(repr(kd), {'KnowledgeDistillation': KnowledgeDistillation})
    assert repr(rebuilt) == repr(kd) and f"'pretrained_model_name_or_path': '{hf_teacher}'" in repr(kd)


# --- YAML mistakes -----------------------------------------------------------------------------------------------


def _mistake(kind: str, teachers: Path, tmp_path: Path):
    """A teacher entry with one mistake, and the message it must produce."""
    good = _section(load_yaml('knowledge_distillation'), 0)
    checkpoint = str(teachers / 'kd_teacher_a' / 'checkpoints' / 'latest-rank0.pt')
    good = {**good, 'checkpoint': checkpoint}
    if kind == 'missing_checkpoint':
        return {**good, 'checkpoint': str(tmp_path / 'nope.pt')}, \
            r"teachers\[0\].checkpoint='.*nope.pt' is missing. Fix: give the checkpoint file itself"
    if kind == 'checkpoint_is_a_directory':
        return {**good, 'checkpoint': str(teachers / 'kd_teacher_a' / 'checkpoints')}, \
            r"teachers\[0\].checkpoint='.*checkpoints' is a directory. Fix: give the checkpoint file itself"
    if kind == 'unknown_key':
        return {**good, 'weights_only': False}, \
            r"teachers\[0\] has unknown keys \['weights_only'\]. Fix: use only \['model', 'checkpoint'\]"
    if kind == 'section_without_name':
        model = {k: v for k, v in good['model'].items() if k != 'name'}
        return {**good, 'model': model}, \
            r'teachers\[0\].model=\{.*\} is not a model section with a name. Fix: write an llm-foundry model section'
    if kind == 'unknown_model_name':
        return {**good, 'model': {**good['model'], 'name': 'mpt_causal_lmm'}}, \
            r"teachers\[0\].model.name='mpt_causal_lmm' is not an llm-foundry model. Fix: use one of " \
            r"\[.*'mpt_causal_lm'"
    if kind == 'hf_dir_without_config':
        return {'pretrained_model_name_or_path': str(tmp_path)}, \
            r"teachers\[0\].pretrained_model_name_or_path='.*' is not a local Hugging Face model directory \(no " \
            r'config.json; nothing is downloaded at run time\). Fix: save the model with model.save_pretrained'
    if kind == 'model_and_hf_dir':
        return {**good, 'pretrained_model_name_or_path': str(tmp_path)}, \
            r'teachers\[0\] has both model and pretrained_model_name_or_path. Fix: give one'
    if kind == 'no_model':
        return {'checkpoint': checkpoint}, r"teachers\[0\]=\{'checkpoint': .*\} names no model. Fix: write"
    if kind == 'model_not_a_section':
        return {**good, 'model': 'mpt_causal_lm'}, \
            r"teachers\[0\].model='mpt_causal_lm' is a str, neither a torch.nn.Module nor a model section. Fix:"
    if kind == 'bare_llmfoundry_checkpoint':  # the weights alone: the architecture has to be named
        return checkpoint, r"teachers\[0\]='.*latest-rank0.pt' holds weights but no architecture \(e.g. an " \
                           r'llm-foundry or Composer checkpoint\). Fix: name the architecture it was saved from: in ' \
                           r'YAML \{model: <the model section of the run that saved it'

    raise AssertionError(kind)


CONSTRUCTION_MISTAKES = ('missing_checkpoint', 'checkpoint_is_a_directory', 'unknown_key', 'section_without_name',
                         'unknown_model_name', 'hf_dir_without_config', 'model_and_hf_dir', 'no_model',
                         'model_not_a_section', 'bare_llmfoundry_checkpoint')


@pytest.mark.parametrize('kind', CONSTRUCTION_MISTAKES)
def test_a_teacher_entry_mistake_fails_when_llmfoundry_builds_the_algorithm(kind, data, teachers, tmp_path):
    entry, match = _mistake(kind, teachers, tmp_path)
    config = load_yaml('knowledge_distillation')
    config['algorithms']['knowledge_distillation']['teachers'] = [entry]
    with pytest.raises((ValueError, TypeError), match=match) as info:
        train_yaml(write_yaml(config, tmp_path / 'bad.yaml'), _overrides(data, teachers))
    # raised while llm-foundry builds the algorithms, i.e. before the model, the dataloaders and any training
    assert 'build_algorithm' in ''.join(traceback.format_tb(info.tb))


@pytest.mark.parametrize('kind', ['vocab_mismatch', 'checkpoint_of_another_architecture'])
def test_a_teacher_that_does_not_fit_the_student_fails_at_fit_start(kind, data, teachers, tmp_path):
    config = load_yaml('knowledge_distillation')
    entry = copy.deepcopy(_section(config, 0))
    if kind == 'vocab_mismatch':  # no checkpoint: a teacher with another vocabulary than the student's
        entry = {'model': {**entry['model'], 'vocab_size': 5000}, 'checkpoint': None}
        match = (r'teachers\[0\] \(mpt_causal_lm\) has output width 5000 but the student has 4096 \(classes or '
                 r"vocabulary\). Fix: distil only from teachers with the student's classes/vocabulary")
    else:
        entry['model']['d_model'] = 48
        match = (r"the weights in '.*kd_teacher_a.*latest-rank0.pt' do not fit the teachers\[0\] architecture "
                 r'ComposerMPTCausalLM \(.*size mismatch.*\). Fix: build the teachers\[0\] model with the same '
                 r'configuration as the run that saved the checkpoint')
    config['algorithms']['knowledge_distillation']['teachers'] = [entry]
    with pytest.raises(ValueError, match=match) as info:
        train_yaml(write_yaml(config, tmp_path / 'bad.yaml'), _overrides(data, teachers))
    frames = ''.join(traceback.format_tb(info.tb))
    assert '_fit_start' in frames and '_train_batch' not in frames  # at FIT_START, before the first batch


# --- our own runner: registry sections stay ours, a Hugging Face directory passes through ------------------------


def _runner_yaml(tmp_path: Path, teacher: dict) -> Path:
    config = {
        'run_name': 'kd_runner_hf', 'seed': 0, 'max_duration': '4ba',
        'model': {'name': 'small_gpt', 'n_layer': 1, 'n_embd': 32, 'n_head': 2, 'n_positions': 32},
        'train_loader': {'name': 'text', 'domains': 'prose', 'batch_size': 8, 'seq_len': 32},
        'optimizer': {'name': 'decoupled_adamw', 'lr': 1.0e-3},
        'algorithms': {'knowledge_distillation': {'teachers': [teacher], 'end': '2ba', 'seed': 0}},
        'progress_bar': False,
    }
    return write_yaml(config, tmp_path / 'runner_kd.yaml')


def test_our_runner_passes_a_hugging_face_teacher_to_the_algorithm_which_builds_it_at_fit_start(hf_teacher, tmp_path):
    from composer.loggers import InMemoryLogger

    from composer_ext.config import ConfigError, load_config
    from composer_ext.runner import build_trainer

    memory = InMemoryLogger()
    trainer = build_trainer(load_config(_runner_yaml(tmp_path, {'pretrained_model_name_or_path': str(hf_teacher)})),
                            extra_loggers=[memory])
    kd = _kd(trainer)
    assert kd.teachers == [None] and kd.manifest()[0]['description'] == f'hf:{hf_teacher}'
    trainer.fit()
    assert [v for _, v in memory.data['kd/active']] == [1.0, 1.0, 0.0, 0.0] and len(memory.data['kd/loss']) == 2
    assert kd.manifest()[0]['checksum'] is not None and kd.teachers == [None]  # built, used, released
    trainer.close()
    with pytest.raises(ConfigError, match=r'algorithms.knowledge_distillation.*teachers\[0\].pretrained_model_name_or'
                                          r"_path='.*' is not a local Hugging Face model directory"):
        build_trainer(load_config(_runner_yaml(tmp_path, {'pretrained_model_name_or_path': str(tmp_path)})))
