"""The validation pass of `composer-ext run`: every value that Composer (or a technique) would reject later is
refused before any model or dataset is built, with exit status 2 and a message naming the key and the fix."""

import importlib.util
import os
import textwrap

import pytest
import torch

from composer_ext import registry
from composer_ext.cli import main
from composer_ext.config import ConfigError, check_environment, load_config
from composer_ext.runner import RunContext
from tests.conftest import ROOT

QUICKSTART = str(ROOT / 'yamls/quickstart.yaml')
UPSAMPLE = str(ROOT / 'yamls/domain_upsampling/upsample.yaml')
PRUNE = str(ROOT / 'yamls/fairness/prune.yaml')
IMAGES = str(ROOT / 'yamls/distillation/baseline.yaml')


@pytest.fixture
def built(monkeypatch):
    """The keys of every model/dataloader/component the runner starts to build (none, when validation refuses)."""
    calls = []

    def build(self, reg, section, key, **injected):
        calls.append(key)
        raise AssertionError(f'{key} was built before validation refused the config')

    def call(self, reg, name, kwargs, key, **injected):
        calls.append(key)
        raise AssertionError(f'{key} was built before validation refused the config')

    monkeypatch.setattr(RunContext, 'build', build)
    monkeypatch.setattr(RunContext, 'call', call)
    return calls


def refused(capsys, built, path, *overrides, command='run') -> str:
    """Run the CLI in process; assert exit 2, nothing built, no traceback; return stderr."""
    code = main([command, str(path), *overrides])
    err = capsys.readouterr().err
    assert code == 2, err
    assert built == []
    assert 'Traceback' not in err and f'composer-ext {command}: error: {path}: ' in err
    assert 'Fix:' in err
    return err


# --- 1. values only Composer checks -------------------------------------------------------------------------


@pytest.mark.parametrize('value', ['0ba', '-5ba', '0', '-2ep', '0.5dur'])
def test_non_positive_or_relative_max_duration_is_refused(capsys, built, value):
    err = refused(capsys, built, QUICKSTART, f'max_duration={value}')
    assert 'max_duration: ' in err


def test_unknown_precision_is_refused(capsys, built):
    err = refused(capsys, built, QUICKSTART, 'precision=fp64')
    assert "precision: unknown precision 'fp64'" in err and "'amp_bf16'" in err


def test_mixed_precision_on_cpu_is_refused(capsys, built):
    err = refused(capsys, built, QUICKSTART, 'device=cpu', 'precision=amp_bf16')
    assert "precision: 'amp_bf16' needs a GPU" in err and 'precision: fp32' in err


@pytest.mark.skipif(torch.cuda.is_available(), reason='this machine has CUDA')
def test_gpu_device_without_cuda_is_refused(capsys, built):
    err = refused(capsys, built, QUICKSTART, 'device=gpu')
    assert "device: 'gpu' but CUDA is not available" in err and 'device: auto' in err


def test_fsdp_on_cpu_selects_fsdp2_and_refuses_what_fsdp2_cannot_do(capsys, built, monkeypatch):
    from composer_ext.config import fsdp_version

    monkeypatch.delenv('FSDP_VERSION', raising=False)
    assert fsdp_version('cpu') == 2 and fsdp_version('gpu') == 1  # FSDP (v1) needs CUDA: off a GPU it is FSDP2
    check_environment(load_config(QUICKSTART, ['device=cpu', 'parallelism={fsdp: {sharding_strategy: FULL_SHARD}}']))
    err = refused(capsys, built, QUICKSTART, 'device=cpu', 'parallelism={fsdp: {sharding_strategy: NO_SHARD}}')
    assert 'parallelism.fsdp.sharding_strategy: NO_SHARD' in err and 'remove parallelism for data parallelism' in err
    err = refused(capsys, built, QUICKSTART, 'device=cpu', 'parallelism={fsdp: {cpu_offload: true}}')
    assert "parallelism.fsdp.cpu_offload: 'cpu_offload' is an FSDP (v1) setting" in err and 'Fix: remove it' in err
    monkeypatch.setenv('FSDP_VERSION', '2')
    assert fsdp_version('gpu') == 2
    check_environment(load_config(QUICKSTART, ['device=cpu', 'parallelism={fsdp: {reshard_after_forward: true}}']))
    # and an unknown FSDP setting is named
    with pytest.raises(ConfigError, match=r"parallelism.fsdp.sharding_strategie: .*did you mean 'sharding_strategy'"):
        load_config(QUICKSTART, ['parallelism={fsdp: {sharding_strategie: FULL_SHARD}}'])


@pytest.mark.parametrize('value', ['0', '-2', 'many'])
def test_bad_microbatch_size_is_refused(capsys, built, value):
    err = refused(capsys, built, QUICKSTART, f'device_train_microbatch_size={value}')
    assert 'device_train_microbatch_size: ' in err


def test_auto_microbatching_on_cpu_is_refused(capsys, built):
    err = refused(capsys, built, QUICKSTART, 'device=cpu', 'device_train_microbatch_size=auto')
    assert "device_train_microbatch_size: 'auto' needs a GPU" in err


def test_missing_or_garbage_load_path_is_refused(capsys, built, tmp_path):
    err = refused(capsys, built, IMAGES, f'load_path={tmp_path}/none.pt')
    assert f"load_path: {str(tmp_path / 'none.pt')!r} does not exist" in err
    garbage = tmp_path / 'garbage.pt'
    garbage.write_text('not a checkpoint\n')
    err = refused(capsys, built, IMAGES, f'load_path={garbage}')
    assert f'load_path: {str(garbage)!r} is not a checkpoint' in err
    err = refused(capsys, built, IMAGES, f'load_path={tmp_path}')
    assert 'is a directory' in err


def test_range_errors_are_reported_before_anything_is_built(capsys, built):
    err = refused(capsys, built, QUICKSTART, 'optimizer.lr=-0.1')
    assert "optimizer.lr: optimizer 'decoupled_adamw' refuses" in err and '-0.1' in err
    err = refused(capsys, built, IMAGES, 'optimizer.momentum=-1')
    assert 'optimizer.momentum: ' in err
    err = refused(capsys, built, PRUNE, 'algorithms.magnitude_pruning.target_sparsity=1.5')
    assert 'algorithms.magnitude_pruning.target_sparsity: ' in err and '1.5' in err


# --- 2. loggers the README names ----------------------------------------------------------------------------


@pytest.mark.parametrize('name', ['tensorboard', 'wandb', 'mlflow'])
def test_readme_loggers_work_or_are_refused_with_the_pip_command(capsys, built, name, tmp_path):
    module, package = registry.LOGGER_PACKAGES[name]
    override = f'loggers.{name}={{}}'
    if importlib.util.find_spec(module) is None:
        err = refused(capsys, built, IMAGES, override)
        assert f'loggers.{name} needs the `{package}` package. Fix: pip install {package}' in err
    else:
        check_environment(load_config(IMAGES, [override]))


def test_every_logger_the_readme_names_is_registered():
    readme = (ROOT / 'README.md').read_text()
    for name in ('tensorboard', 'wandb', 'mlflow'):
        assert name in readme and name in registry.loggers and name in registry.LOGGER_PACKAGES


# --- 3. domain_upsampling domains the loader lacks ----------------------------------------------------------


def test_upsampling_a_domain_the_loader_lacks_is_refused(capsys, built):
    err = refused(capsys, built, UPSAMPLE, 'train_loader.domains=[code, math]')
    assert 'algorithms.domain_upsampling.base: ' in err and "'dialogue'" in err and "['code', 'math']" in err
    err = refused(capsys, built, UPSAMPLE, 'algorithms.domain_upsampling.target.poetry=0.1')
    assert "algorithms.domain_upsampling.target: " in err and "'poetry'" in err
    # `domains: all` is the six embedded domains: the YAML as written is accepted
    assert load_config(UPSAMPLE).train_loader['domains'] == 'all'


# --- 4. token times on image data ---------------------------------------------------------------------------


def test_token_durations_on_image_data_are_refused(capsys, built):
    err = refused(capsys, built, IMAGES, 'max_duration=1000tok')
    assert "max_duration: '1000tok' counts tokens, but the train loader 'image' yields none" in err
    err = refused(capsys, built, IMAGES, 'eval_interval=100tok')
    assert 'eval_interval: ' in err and 'tokens' in err
    err = refused(capsys, built, IMAGES, 'scheduler.t_warmup=100tok')
    assert 'scheduler.t_warmup: ' in err
    assert load_config(QUICKSTART, ['max_duration=1e5tok']).max_duration == '1e5tok'  # text data counts tokens


# --- 10. magnitude_pruning excluding every layer ------------------------------------------------------------


@pytest.mark.parametrize('patterns', ["['*']", "['module.features.*', '**']"])
def test_excluding_every_layer_from_pruning_is_refused(capsys, built, patterns):
    err = refused(capsys, built, PRUNE, f'algorithms.magnitude_pruning.exclude={patterns}')
    assert 'algorithms.magnitude_pruning.exclude: ' in err and 'matches every layer' in err


def test_a_narrow_exclude_is_accepted():
    config = load_config(PRUNE, ["algorithms.magnitude_pruning.exclude=['module.features.0']"])
    assert config.algorithms['magnitude_pruning']['exclude'] == ['module.features.0']


# --- 11. a directory or a non-UTF-8 file as the config --------------------------------------------------------


def test_a_directory_as_the_config_is_refused(capsys, built, tmp_path):
    err = refused(capsys, built, tmp_path)
    assert 'is a directory, not a YAML file' in err
    err = refused(capsys, built, tmp_path, command='blockwise')
    assert 'is a directory, not a YAML file' in err


def test_a_latin1_config_is_refused(capsys, built, tmp_path):
    path = tmp_path / 'latin1.yaml'
    path.write_bytes((ROOT / 'yamls/distillation/baseline.yaml').read_bytes() + '# caf\xe9\n'.encode('latin-1'))
    err = refused(capsys, built, path)
    assert 'is not UTF-8' in err and 'line' in err


# --- 12. numbers read the same way in the file and on the command line ------------------------------------------


def test_float_literals_are_floats_where_a_float_is_expected(tmp_path):
    assert load_config(QUICKSTART, ['optimizer.lr=1e-3']).optimizer['lr'] == 0.001
    assert isinstance(load_config(QUICKSTART, ['optimizer.lr=1e-3']).optimizer['lr'], float)
    adam = load_config(QUICKSTART, ['optimizer.name=adam', 'optimizer.lr=2e-4'])  # adam's lr: float or Tensor
    assert adam.optimizer['lr'] == 2e-4
    path = tmp_path / 'run.yaml'
    path.write_text(textwrap.dedent("""
        max_duration: 2ba
        model: {name: small_vgg, widths: [8, 16]}
        train_loader: {name: image, dataset: digits, batch_size: 32}
        optimizer: {name: decoupled_sgdw, lr: '1e-3'}
        dist_timeout: '3e2'
    """))
    config = load_config(path)
    assert config.optimizer['lr'] == 0.001 and config.dist_timeout == 300.0
    # names stay names
    assert load_config(path, ['run_name=1e3']).run_name == '1e3'
    with pytest.raises(ConfigError, match=r"optimizer.lr: expected float, got str 'fast'"):
        load_config(path, ['optimizer.lr=fast'])


# --- 13. non-positive time fields -----------------------------------------------------------------------------


@pytest.mark.parametrize('key,value', [('save_interval', '-3'), ('save_interval', '0ba'), ('eval_interval', '0'),
                                       ('eval_interval', '-1ba'), ('eval_interval', '2dur'),
                                       ('console_log_interval', '0ba')])
def test_non_positive_intervals_are_refused(capsys, built, key, value):
    err = refused(capsys, built, IMAGES, f'{key}={value}')
    assert f'{key}: ' in err and 'must be positive' in err


# --- 14. autoresume from a damaged latest checkpoint -------------------------------------------------------------


def test_autoresume_from_a_truncated_checkpoint_names_the_file(capsys, built, tmp_path):
    folder = tmp_path / 'ckpt'
    folder.mkdir()
    torch.save({'state': {'model': {'w': torch.zeros(64)}}}, folder / 'ep0-ba2-rank0.pt')
    torch.save({'state': {'model': {'w': torch.zeros(64)}}}, folder / 'ep0-ba4-rank0.pt')
    data = (folder / 'ep0-ba4-rank0.pt').read_bytes()
    (folder / 'ep0-ba4-rank0.pt').write_bytes(data[:len(data) // 2])
    os.symlink('ep0-ba4-rank0.pt', folder / 'latest-rank0.pt')
    err = refused(capsys, built, IMAGES, f'save_folder={folder}', 'autoresume=true')
    assert f"autoresume: the latest checkpoint {str(folder / 'ep0-ba4-rank0.pt')!r} is damaged" in err
    assert str(folder / 'ep0-ba2-rank0.pt') in err  # the previous one, to resume from


def test_autoresume_needs_a_run_name_and_a_save_folder(capsys, built, tmp_path, monkeypatch):
    monkeypatch.delenv('COMPOSER_RUN_NAME', raising=False)
    monkeypatch.delenv('RUN_NAME', raising=False)
    err = refused(capsys, built, IMAGES, 'autoresume=true', f'save_folder={tmp_path}', 'run_name=null')
    assert 'autoresume: ' in err and 'run_name' in err
    err = refused(capsys, built, IMAGES, 'autoresume=true')
    assert 'autoresume: ' in err and 'save_folder' in err


@pytest.mark.parametrize('fsdp,expected', [
    ({}, {}),
    ({'sharding_strategy': 'FULL_SHARD'}, {'reshard_after_forward': True}),
    ({'sharding_strategy': 'SHARD_GRAD_OP', 'state_dict_type': 'sharded', 'mixed_precision': 'PURE',
      'activation_checkpointing': True},
     {'reshard_after_forward': False, 'state_dict_type': 'sharded', 'mixed_precision': 'PURE',
      'activation_checkpointing': True}),
    ({'state_dict_type': 'full', 'reshard_after_forward': False}, {'state_dict_type': 'full',
                                                                   'reshard_after_forward': False}),
])
def test_the_readme_fsdp_keys_map_to_fsdp2_settings(fsdp, expected):
    from composer_ext.config import fsdp2_settings

    assert fsdp2_settings(fsdp) == expected


@pytest.mark.parametrize('fsdp,match', [
    ({'sharding_strategy': 'HYBRID_SHARD'}, r'sharding_strategy: .*no FSDP2 equivalent.*Fix: use sharding_strategy'),
    ({'sharding_strategy': 'FULL_SHARD', 'reshard_after_forward': False},
     r'means reshard_after_forward: true, but reshard_after_forward is False.*Fix: set only one'),
    ({'mixed_precision': {'param_dtype': 'bf16'}}, r'mixed_precision: .*Fix: use one of DEFAULT, PURE, FULL'),
    ({'state_dict_type': 'local'}, r"state_dict_type: 'local'.*Fix: use state_dict_type: sharded"),
    ({'backward_prefetch': 'BACKWARD_PRE'}, r'backward_prefetch: .*FSDP \(v1\) setting.*Fix: remove it'),
])
def test_fsdp2_settings_refuse_what_fsdp2_cannot_do(fsdp, match):
    from composer_ext.config import fsdp2_settings

    with pytest.raises(ConfigError, match=match):
        fsdp2_settings(fsdp, 'run.yaml')


def test_an_unknown_sharding_strategy_is_refused_at_validation():
    with pytest.raises(ConfigError, match=r"parallelism.fsdp.sharding_strategy: 'FULLSHARD' is not a sharding "
                                          r'strategy. Fix: use one of FULL_SHARD, SHARD_GRAD_OP'):
        load_config(QUICKSTART, ['parallelism={fsdp: {sharding_strategy: FULLSHARD}}'])


def test_the_runner_builds_the_fsdp2_config_itself_without_warnings(monkeypatch):
    import warnings

    from composer.utils.parallelism import FSDP2Config

    from composer_ext.runner import trainer_parallelism

    monkeypatch.delenv('FSDP_VERSION', raising=False)
    config = load_config(QUICKSTART, ['device=cpu', 'parallelism={fsdp: {sharding_strategy: SHARD_GRAD_OP, '
                                                    'state_dict_type: full}}'])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        built = trainer_parallelism(config, 'cpu')
    assert [str(w.message) for w in caught] == []  # neither Composer's 'experimental' nor its dropped-key warning
    assert isinstance(built['fsdp'], FSDP2Config)
    assert (built['fsdp'].reshard_after_forward, built['fsdp'].state_dict_type) == (False, 'full')
    assert trainer_parallelism(config, 'gpu') == config.parallelism  # FSDP (v1) on a GPU: Composer reads the section
    assert trainer_parallelism(load_config(QUICKSTART, ['device=cpu']), 'cpu') is None
