"""The tiny reproduction (slow): upsampling a domain for the last 20% of training lowers its held-out loss."""

import importlib.util

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_upsampled_domain_has_lower_held_out_loss_at_the_same_steps(tmp_path):
    spec = importlib.util.spec_from_file_location('du_reproduce', ROOT / 'examples/domain_upsampling/reproduce.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.reproduce(target='math', output=tmp_path / 'results.json')
    losses = result['held_out_cross_entropy']
    assert losses['upsampled']['math'] < losses['baseline']['math']
    assert (tmp_path / 'results.json').exists()
