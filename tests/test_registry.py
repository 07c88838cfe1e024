"""The registry names every YAML component, and our classes are llm-foundry entry points."""

import importlib.metadata

import pytest

from composer_ext import registry


def test_every_registered_target_imports():
    for reg in (registry.models, registry.dataloaders, registry.optimizers, registry.schedulers, registry.algorithms,
                registry.callbacks):
        for name in reg.names():
            assert callable(reg.get(name)), (reg.kind, name)


def test_unknown_name_lists_choices_and_suggests():
    with pytest.raises(registry.UnknownNameError, match=r"unknown optimizer 'adamx'. Did you mean 'adam'\?.*Valid "
                       r'choices: adam, adamw'):
        registry.optimizers.get('adamx')


def test_register_your_own():
    reg = registry.Registry('widget', {})
    reg.register('mine', 'collections:OrderedDict')
    assert reg.get('mine').__name__ == 'OrderedDict'
    with pytest.raises(ValueError, match="widget 'mine' is already registered"):
        reg.register('mine', dict)


@pytest.mark.parametrize('group,table', [('llmfoundry_algorithms', registry.ALGORITHMS),
                                         ('llmfoundry_callbacks', registry.CALLBACKS),
                                         ('llmfoundry_callbacks_with_config', registry.CALLBACKS_WITH_CONFIG),
                                         ('llmfoundry_dataloaders', registry.FOUNDRY_DATALOADERS)])
def test_llmfoundry_entry_points_match_the_registry(group, table):
    points = {ep.name: ep.value for ep in importlib.metadata.entry_points(group=group)
              if ep.dist is None or ep.dist.name == 'composer-ext'}
    assert points == table
    for ep in importlib.metadata.entry_points(group=group):
        if ep.name in table:
            target = ep.load()
            # llm-foundry builds algorithms and callbacks only from classes; dataloaders from functions
            assert isinstance(target, type) if group != 'llmfoundry_dataloaders' else callable(target)


def test_our_classes_are_composer_algorithms_and_callbacks():
    from composer.core import Algorithm, Callback
    for name in registry.ALGORITHMS:
        assert issubclass(registry.algorithms.get(name) if name not in registry.ALGORITHM_BUILDERS
                          else registry._import(registry.ALGORITHMS[name]), Algorithm)
    for name in registry.CALLBACKS:
        assert issubclass(registry._import(registry.CALLBACKS[name]), Callback)
