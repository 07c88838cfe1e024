"""yamls/distillation/: every config validates, the teacher configs write checkpoints that kd.yaml loads, and a
short KD run trains from them; bad teacher entries are reported with the key and the fix."""

from __future__ import annotations

import pytest
import torch
from composer.loggers import InMemoryLogger

from composer_ext.distillation import KnowledgeDistillation
from composer_ext.config import ConfigError, load_config
from composer_ext.runner import build_trainer, final_eval_metrics
from tests.conftest import ROOT

YAMLS = sorted((ROOT / 'yamls' / 'distillation').glob('*.yaml'))
TEACHERS = ('teacher_resnet', 'teacher_vgg', 'teacher_resnet_shallow')
SMALL = ('variables.train_samples=256',)

pytestmark = pytest.mark.usefixtures('one_torch_thread')


def test_every_distillation_yaml_loads():
    names = {path.stem for path in YAMLS}
    assert {'baseline', 'kd', *TEACHERS} <= names
    for path in YAMLS:
        config = load_config(path)
        assert config.max_duration


def test_kd_and_baseline_train_the_same_student():
    kd = load_config(ROOT / 'yamls/distillation/kd.yaml')
    baseline = load_config(ROOT / 'yamls/distillation/baseline.yaml')
    for key in ('model', 'train_loader', 'eval_loaders', 'optimizer', 'scheduler', 'max_duration', 'seed'):
        assert getattr(kd, key) == getattr(baseline, key), key
    assert 'knowledge_distillation' in kd.algorithms and not baseline.algorithms


def _train_teachers(tmp_path):
    for name in TEACHERS:
        config = load_config(ROOT / f'yamls/distillation/{name}.yaml', SMALL + (
            'max_duration=1ba', 'save_interval=1ba', 'eval_loaders=null', 'eval_interval=1', 'scheduler.t_warmup=1ba',
            f'save_folder={tmp_path}/{name}/checkpoints'))
        trainer = build_trainer(config)
        trainer.fit()
        trainer.close()
        assert (tmp_path / name / 'checkpoints' / 'latest-rank0.pt').exists()


def test_short_kd_run_from_teacher_checkpoints(tmp_path):
    _train_teachers(tmp_path)
    memory = InMemoryLogger()
    config = load_config(ROOT / 'yamls/distillation/kd.yaml', SMALL + (
        f'variables.teachers={tmp_path}', 'max_duration=4ba', 'eval_interval=4ba', 'eval_loaders.0.num_samples=500',
        'scheduler.t_warmup=1ba'))
    trainer = build_trainer(config, extra_loggers=[memory])
    kd = next(a for a in trainer.state.algorithms if isinstance(a, KnowledgeDistillation))
    assert kd.num_teachers == 3 and kd.policy == 'random'
    assert kd.manifest()[0]['path'].endswith('teacher_resnet/checkpoints/latest-rank0.pt')
    saved = torch.load(tmp_path / 'teacher_vgg/checkpoints/latest-rank0.pt', weights_only=False)['state']['model']
    assert torch.equal(kd.teachers[1].module.classifier.weight, saved['module.classifier.weight'])  # weights loaded
    trainer.fit()
    assert [v for _, v in memory.data['kd/active']] == [1.0, 1.0, 0.0, 0.0]
    assert len(memory.data['kd/loss']) == 2 and len(memory.data['kd/teacher']) == 2
    assert 'metrics/test/MulticlassAccuracy' in final_eval_metrics(trainer.state)
    trainer.close()


@pytest.mark.parametrize('override,match', [
    ('algorithms.knowledge_distillation.teachers.0.checkpoint=/no/such/file.pt',
     r"algorithms.knowledge_distillation: the teacher checkpoint '/no/such/file.pt' does not exist"),
    ('algorithms.knowledge_distillation.policy=best', r"policy='best' is not a teacher policy"),
    ('algorithms.knowledge_distillation.end=0.0dur', r'end=0.0dur is not after start=0.0dur'),
    ('algorithms.knowledge_distillation.teachers.0.model.name=small_resnett',
     r"teachers\[0\].model: unknown model 'small_resnett'. Did you mean 'small_resnet'"),
    ('algorithms.knowledge_distillation.teachers.1.weights=teacher.pt',
     r'teachers\[1\]=.* must be \{model: <model section>, checkpoint: <path>\}'),
])
def test_bad_teacher_config_names_the_key_and_the_fix(tmp_path, override, match):
    config = load_config(ROOT / 'yamls/distillation/kd.yaml', SMALL + (f'variables.teachers={tmp_path}', override))
    with pytest.raises(ConfigError, match=match) as info:
        build_trainer(config)
    assert 'Fix:' in str(info.value)


def test_bad_argument_type_is_caught_before_anything_is_built():
    with pytest.raises(ConfigError, match=r'algorithms.knowledge_distillation.end: expected .*Time.*got str'):
        load_config(ROOT / 'yamls/distillation/kd.yaml', ('algorithms.knowledge_distillation.end=soon',))


@pytest.mark.slow  # trains 3 teachers and runs kd.yaml twice (about 40 s on an idle machine)
def test_kd_yaml_with_a_teacher_output_cache_writes_then_reads_it(tmp_path):
    _train_teachers(tmp_path)
    cached = (f'variables.teachers={tmp_path}', 'max_duration=4ba', 'eval_loaders=null', 'eval_interval=1',
              'scheduler.t_warmup=1ba', 'train_loader.sample_ids=true',
              f'algorithms.knowledge_distillation.cache={tmp_path}/kd_cache',
              'algorithms.knowledge_distillation.cache_top_k=4', 'algorithms.knowledge_distillation.policy=ensemble')
    hit_rates = []
    for _ in range(2):  # the second run reads what the first wrote
        memory = InMemoryLogger()
        trainer = build_trainer(load_config(ROOT / 'yamls/distillation/kd.yaml', SMALL + cached),
                                extra_loggers=[memory])
        trainer.fit()
        trainer.close()
        hit_rates.append([v for _, v in memory.data['kd/cache_hit_rate']])
    assert hit_rates == [[0.0, 0.0], [1.0, 1.0]]  # window: the first 2 of 4 batches
    assert (tmp_path / 'kd_cache' / 'meta.json').exists()
    with pytest.raises(ConfigError, match=r'algorithms.knowledge_distillation.cache_top_k'):
        load_config(ROOT / 'yamls/distillation/kd.yaml', ('algorithms.knowledge_distillation.cache_top_k=many',))


def test_cached_yaml_writes_then_reads_the_same_teacher_outputs(tmp_path):
    _train_teachers(tmp_path)

    def run():
        memory = InMemoryLogger()
        config = load_config(ROOT / 'yamls/distillation/kd_cached.yaml', SMALL + (
            f'variables.teachers={tmp_path}', f'variables.cache={tmp_path}/cache', 'max_duration=4ba',
            'algorithms.knowledge_distillation.end=1dur',
            'eval_loaders=null', 'eval_interval=1', 'scheduler.t_warmup=1ba'))
        trainer = build_trainer(config, extra_loggers=[memory])
        trainer.fit()
        trainer.close()
        return ([float(v) for _, v in memory.data['kd/loss']],
                [float(v) for _, v in memory.data['kd/cache_hit_rate']])

    first_loss, first_hits = run()
    second_loss, second_hits = run()
    assert first_hits[:2] == [0.0, 0.0]  # epoch 1 (2 batches of 128 of the 256 images): nothing cached yet
    assert second_hits == [1.0] * 4  # the same seed and data: every teacher output comes from the cache
    assert second_loss == first_loss  # a written step and a read step see the same (encoded) logits


def test_cache_without_sample_ids_is_refused_when_the_yaml_loads():
    with pytest.raises(ConfigError, match=r'train_loader\.sample_ids.*sample_ids=False.*Fix: add `sample_ids: true`'):
        load_config(ROOT / 'yamls/distillation/kd_cached.yaml', ('train_loader.sample_ids=false',))
