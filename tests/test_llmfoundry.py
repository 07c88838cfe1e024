"""composer_ext inside llm-foundry: the install, the entry points llm-foundry sees, and that every YAML in
yamls/llmfoundry/ is valid for llm-foundry and trained by a test.

The runs themselves are in the per-technique modules beside this one (``test_llmfoundry_<technique>.py``): each
trains its YAML with llm-foundry's own ``train_from_yaml`` and asserts that the technique did its work. These tests
never skip: ``./install.sh`` installs llm-foundry (``composer-ext[llmfoundry]``), so a missing llm-foundry fails.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf as om

from composer_ext import registry
from tests.llmfoundry_harness import ROOT, YAML_DIR

# The techniques that apply to language models (blockwise distillation is for CNNs) -> their llm-foundry YAML.
TECHNIQUE_YAMLS = {
    'domain_upsampling': 'domain_upsampling.yaml',
    'perplexity_pruning': 'perplexity_pruning.yaml',
    'knowledge_distillation': 'knowledge_distillation.yaml',
    'lora_probe': 'lora_probe.yaml',
    'fairness': 'fairness.yaml',
}


def _version(name: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r'\d+', importlib.metadata.version(name))[:2])


def test_installed_beside_llm_foundry_022():
    assert _version('llm-foundry') == (0, 22)
    assert (0, 12) <= _version('mosaicml-streaming') < (0, 14)
    assert _version('transformers') >= (4, 51)
    requirements = importlib.metadata.requires('composer-ext')
    assert any(r.startswith('llm-foundry') and 'extra == "llmfoundry"' in r for r in requirements), requirements
    streaming = next(r for r in requirements if r.startswith('mosaicml-streaming'))
    assert '<0.14' in streaming and '>=0.12' in streaming, streaming
    assert '".[test,llmfoundry]"' in (ROOT / 'install.sh').read_text()


@pytest.mark.parametrize('group,table', [
    ('algorithms', registry.ALGORITHMS),
    ('callbacks', registry.CALLBACKS),
    ('callbacks_with_config', registry.CALLBACKS_WITH_CONFIG),
    ('dataloaders', registry.FOUNDRY_DATALOADERS),
])
def test_llm_foundry_registries_resolve_our_entry_points(group, table):
    from llmfoundry import registry as foundry_registry

    foundry_table = getattr(foundry_registry, group)
    for name, target in table.items():
        assert name in foundry_table, f'llm-foundry does not see {group}.{name}'
        assert foundry_table.get(name) is registry._import(target)


def test_every_technique_for_language_models_has_an_llmfoundry_yaml_that_a_test_trains():
    shipped = sorted(path.name for path in YAML_DIR.glob('*.yaml'))
    for technique, name in TECHNIQUE_YAMLS.items():
        assert name in shipped, f'{technique}: yamls/llmfoundry/{name} is missing'
    tests = {path.name: path.read_text() for path in (ROOT / 'tests').glob('test_llmfoundry_*.py')}
    for name in shipped:
        stem = name[:-len('.yaml')]
        users = [test for test, text in tests.items() if f"'{stem}'" in text or name in text]
        assert users, f'yamls/llmfoundry/{name} is not trained by any tests/test_llmfoundry_*.py'


@pytest.mark.parametrize('name', sorted(path.name for path in YAML_DIR.glob('*.yaml')))
def test_llmfoundry_yamls_pass_llm_foundrys_own_config_check(name, tmp_path):
    """llm-foundry's TrainConfig accepts every shipped YAML (unknown or misspelt top-level keys fail here)."""
    from llmfoundry.utils.config_utils import TRAIN_CONFIG_KEYS, TrainConfig, make_dataclass_and_log_config

    config = om.load(YAML_DIR / name)
    # the corpus directory is a mandatory variable (`???`), given on the command line as the YAMLs' comments say
    assert om.is_missing(config.variables, 'data'), f'{name}: variables.data must be ??? (given on the command line)'
    config.variables.data = str(tmp_path)
    om.resolve(config)
    make_dataclass_and_log_config(config, TrainConfig, TRAIN_CONFIG_KEYS, transforms='all')
    # our sections use only names that llm-foundry resolves to our entry points
    for section, table in (('algorithms', registry.ALGORITHMS), ('callbacks', registry.CALLBACKS)):
        for entry in (config.get(section) or {}):
            if entry in registry.ALGORITHMS or entry in registry.CALLBACKS:
                assert entry in table, f'{name}: {section}.{entry} is not one of our {section}'


def test_llmfoundry_yamls_do_not_hard_code_machine_paths():
    for path in YAML_DIR.glob('*.yaml'):
        text = path.read_text()
        assert '/root/' not in text and '/home/' not in text and '/tmp/' not in text, path.name


def test_setup_reads_the_entry_point_tables_as_literals():
    tree = ast.parse((ROOT / 'composer_ext' / 'registry.py').read_text())
    literal = {node.target.id for node in tree.body
               if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
               and isinstance(node.value, ast.Dict)}
    assert {'ALGORITHMS', 'CALLBACKS', 'CALLBACKS_WITH_CONFIG', 'FOUNDRY_DATALOADERS'} <= literal
    setup = (ROOT / 'setup.py').read_text()
    for group in ('llmfoundry_algorithms', 'llmfoundry_callbacks', 'llmfoundry_callbacks_with_config',
                  'llmfoundry_dataloaders'):
        assert f"'{group}'" in setup


def test_the_yaml_dir_is_documented():
    readme = (ROOT / 'README.md').read_text()
    assert '## From llm-foundry' in readme
    for name in TECHNIQUE_YAMLS.values():
        assert f'yamls/llmfoundry/{name}' in readme, name
    assert Path(YAML_DIR).is_dir()
