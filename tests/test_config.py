"""Config loading and validation: every problem is reported with the file, the key and the fix."""

import textwrap

import pytest

from composer_ext.config import ConfigError, accepts, load_config

BASE = """
max_duration: 10ba
model: {name: small_vgg, widths: [8, 16]}
train_loader: {name: image, dataset: digits, batch_size: 32}
optimizer: {name: decoupled_sgdw, lr: 0.1}
"""


def write(tmp_path, text, name='run.yaml'):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_valid_config_loads_with_defaults(tmp_path):
    config = load_config(write(tmp_path, BASE))
    assert config.max_duration == '10ba' and config.seed == 17 and config.device == 'auto'
    assert config.model == {'name': 'small_vgg', 'widths': [8, 16]}


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path, 'max_duration: 10ba\nmodel: {name: small_vgg\ntrain_loader: x\n')
    with pytest.raises(ConfigError, match=rf'{path}: the YAML does not parse \(line \d+, column \d+.*Fix: correct'):
        load_config(path)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match='does not exist'):
        load_config(tmp_path / 'nope.yaml')


def test_unknown_top_level_key_suggests(tmp_path):
    with pytest.raises(ConfigError, match=r"max_durations: unknown top-level key.*did you mean 'max_duration'"):
        load_config(write(tmp_path, BASE + 'max_durations: 5ba\n'))


def test_missing_required_key(tmp_path):
    with pytest.raises(ConfigError, match=r"train_loader: the required key 'train_loader' is missing"):
        load_config(write(tmp_path, 'max_duration: 1ba\nmodel: {name: small_vgg}\n'))


def test_unknown_algorithm_lists_choices(tmp_path):
    path = write(tmp_path, BASE + 'algorithms:\n  label_smoothin: {}\n')
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert f'{path}: algorithms.label_smoothin: unknown algorithm' in message
    assert "Did you mean 'label_smoothing'?" in message and 'Valid choices:' in message and 'gradient_clipping' in message


def test_unknown_model_name(tmp_path):
    with pytest.raises(ConfigError, match=r"model: unknown model 'gpt9'.*Valid choices: small_gpt"):
        load_config(write(tmp_path, BASE, 'run.yaml'), ['model.name=gpt9'])


def test_wrong_type_for_known_field(tmp_path):
    with pytest.raises(ConfigError, match=r"optimizer.lr: expected float, got str 'fast'.*Fix: set optimizer.lr to a "
                       r'value of type float'):
        load_config(write(tmp_path, BASE), ['optimizer.lr=fast'])
    with pytest.raises(ConfigError, match=r'seed: expected int, got str'):
        load_config(write(tmp_path, BASE), ['seed=abc'])
    with pytest.raises(ConfigError, match=r'model.widths: expected'):
        load_config(write(tmp_path, BASE), ['model.widths=8'])


def test_bad_time_string(tmp_path):
    with pytest.raises(ConfigError, match=r"max_duration: '10 batches' is not a Composer time"):
        load_config(write(tmp_path, BASE), ['max_duration=10 batches'])
    with pytest.raises(ConfigError, match=r"scheduler.t_warmup.*Composer time string"):
        load_config(write(tmp_path, BASE + 'scheduler: {name: cosine_decay_with_warmup, t_warmup: soon}\n'))


def test_unknown_argument_suggests(tmp_path):
    with pytest.raises(ConfigError, match=r"model.width: model 'small_vgg' has no argument 'width'.*did you mean "
                       r"'widths'"):
        load_config(write(tmp_path, BASE), ['model.width=8'])


def test_missing_required_argument(tmp_path):
    with pytest.raises(ConfigError, match=r"train_loader: dataloader 'image' needs the argument\(s\) \['dataset'\]"):
        load_config(write(tmp_path, BASE.replace('dataset: digits, ', '')))


def test_overrides_interpolation_and_list_items(tmp_path):
    text = BASE + 'variables: {steps: 7}\nrun_name: r${variables.steps}\n' \
        'eval_loaders:\n  - {name: image, dataset: digits, split: test, batch_size: 16, label: a}\n'
    config = load_config(write(tmp_path, text), ['variables.steps=9', 'eval_loaders.0.label=b', 'optimizer.lr=0.5'])
    assert config.run_name == 'r9' and config.eval_loaders[0]['label'] == 'b' and config.optimizer['lr'] == 0.5


def test_bad_override_and_bad_interpolation(tmp_path):
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(write(tmp_path, BASE), ['max_duration'])
    with pytest.raises(ConfigError, match='interpolation cannot be resolved'):
        load_config(write(tmp_path, BASE + 'run_name: ${variables.missing}\n'))


def test_duplicate_eval_labels(tmp_path):
    text = BASE + 'eval_loaders:\n  - {name: image, dataset: digits, batch_size: 16}\n' \
                  '  - {name: image, dataset: digits, batch_size: 32}\n'
    with pytest.raises(ConfigError, match=r"labels \['eval'\] are used by more than one"):
        load_config(write(tmp_path, text))


def test_accepts_annotations():
    from typing import Optional, Union

    from composer.core import Time
    assert accepts(3, float) and not accepts(True, int) and not accepts('1', int)
    assert accepts(None, Optional[int]) and accepts([1, 2], list[int]) and not accepts([1, 'a'], list[int])
    assert accepts('0.5dur', Union[str, Time]) and accepts('0.5dur', Time) and not accepts('soon', Time)
