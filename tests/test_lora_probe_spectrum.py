"""delta_w_spectrum against numpy on synthetic ΔW = U·diag(s)·Vᵀ, factored inputs, edge cases and bad input."""

import math

import numpy as np
import pytest
import torch

from composer_ext.metrics import delta_w_spectrum
from composer_ext.lora_probe.spectrum import DeltaWSpectrum, singular_values, spectrum_from_singular_values


def _synthetic(rows, cols, sigma, seed=0):
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((rows, len(sigma))))
    v, _ = np.linalg.qr(rng.standard_normal((cols, len(sigma))))
    return u @ np.diag(sigma) @ v.T, u, v


def _numpy_reference(delta, energy):
    """The definitions, written independently: rank for `energy` of sum(σ²) and exp(entropy of σ/sum(σ))."""
    s = np.linalg.svd(delta, compute_uv=False)
    s = s[s > s[0] * max(delta.shape) * np.finfo(np.float64).eps]
    share = np.cumsum(s**2) / np.sum(s**2)
    rank = int(np.argmax(share >= energy)) + 1
    p = s / s.sum()
    return rank, float(np.exp(-np.sum(p * np.log(p)))), float(s[0]), float(np.sqrt(np.sum(s**2)))


@pytest.mark.parametrize('energy', [0.5, 0.9, 0.99])
def test_rank_and_effective_rank_match_numpy_on_synthetic_update(energy):
    sigma = np.array([10.0, 7.0, 5.0, 3.0, 2.0, 1.5, 1.0, 0.5, 0.25, 0.1, 0.05, 0.01])
    delta, _, _ = _synthetic(96, 64, sigma)
    rank, effective, spectral, frobenius = _numpy_reference(delta, energy)
    # The thresholds are not borderline: the integer ranks are well defined.
    shares = np.cumsum(sigma**2) / np.sum(sigma**2)
    assert np.min(np.abs(shares - energy)) > 1e-3
    for value in (delta, torch.from_numpy(delta), torch.from_numpy(delta).float()):
        result = delta_w_spectrum(value, energy=energy)
        assert result.rank_at_energy == rank
        assert result.effective_rank == pytest.approx(effective, rel=1e-5)
        assert result.spectral_norm == pytest.approx(spectral, rel=1e-5)
        assert result.frobenius_norm == pytest.approx(frobenius, rel=1e-5)
        assert result.stable_rank == pytest.approx(frobenius**2 / spectral**2, rel=1e-5)
        assert result.shape == (96, 64) and result.energy == energy
    # By hand for energy=0.9: σ² = 100, 49, 25, 9, ... of 193.8: 149/193.8 = 77% < 90% <= 174/193.8 = 90.2%.
    if energy == 0.9:
        assert rank == 3


def test_factored_update_gives_the_dense_result_without_materialising_it():
    sigma = np.array([4.0, 2.0, 1.0, 0.5])
    _, u, v = _synthetic(200, 120, sigma, seed=3)
    left, right = torch.from_numpy(u * sigma), torch.from_numpy(v.T)   # ΔW = left @ right, rank 4
    dense = delta_w_spectrum(left @ right)
    factored = delta_w_spectrum((left, right))
    assert factored.rank_at_energy == dense.rank_at_energy == 2       # 16 + 4 = 20 of 21.25 = 94%
    assert factored.effective_rank == pytest.approx(dense.effective_rank, rel=1e-4)
    assert factored.frobenius_norm == pytest.approx(dense.frobenius_norm, rel=1e-5)
    assert factored.shape == (200, 120)
    assert singular_values((left, right)).shape == (4,)
    # A wide inner dimension (k >= min(m, n)) falls back to the product, still correct.
    wide = delta_w_spectrum((torch.randn(8, 20, dtype=torch.float64), torch.randn(20, 6, dtype=torch.float64)), 1.0)
    assert wide.rank_at_energy == 6


def test_exact_rank_at_full_energy_ignores_rounding_noise():
    sigma = np.array([3.0, 2.0, 1.0])
    delta, _, _ = _synthetic(50, 40, sigma)
    assert delta_w_spectrum(torch.from_numpy(delta).float(), energy=1.0).rank_at_energy == 3
    assert delta_w_spectrum(torch.eye(5), energy=1.0).effective_rank == pytest.approx(5.0)


def test_zero_and_non_finite_updates():
    zero = delta_w_spectrum(torch.zeros(6, 4))
    assert (zero.rank_at_energy, zero.effective_rank, zero.spectral_norm, zero.frobenius_norm) == (0, 0.0, 0.0, 0.0)
    diverged = delta_w_spectrum(torch.tensor([[1.0, float('nan')], [0.0, 1.0]]))
    assert diverged.rank_at_energy == -1 and math.isnan(diverged.effective_rank)


def test_conv_kernels_are_read_as_out_by_in_times_kernel():
    result = delta_w_spectrum(torch.randn(8, 3, 3, 3))
    assert result.shape == (8, 27)


def test_result_reads_as_mapping_and_dict():
    result = delta_w_spectrum(torch.eye(3))
    assert isinstance(result, DeltaWSpectrum)
    assert result['rank_at_energy'] == result.rank_at_energy == 3
    assert result.as_dict()['shape'] == [3, 3]
    assert spectrum_from_singular_values([1.0, 1.0], shape=(2, 2)).effective_rank == pytest.approx(2.0)


@pytest.mark.parametrize('energy', [0, 0.0, -0.1, 1.01, 2, True, 'high'])
def test_energy_outside_unit_interval_is_rejected(energy):
    with pytest.raises(ValueError, match=r'energy=.* is outside \(0, 1\]. Fix: .*energy=0.9'):
        delta_w_spectrum(torch.eye(3), energy=energy)


def test_bad_matrices_are_rejected():
    with pytest.raises(ValueError, match=r'delta has shape \(3,\). Fix: pass a matrix'):
        delta_w_spectrum(torch.ones(3))
    with pytest.raises(TypeError, match='delta is a list'):
        delta_w_spectrum([[1.0, 2.0]])
    with pytest.raises(ValueError, match='inner sizes differ'):
        delta_w_spectrum((torch.ones(4, 2), torch.ones(3, 5)))
    with pytest.raises(ValueError, match='tuple of 3 items'):
        delta_w_spectrum((torch.ones(2, 2), torch.ones(2, 2), torch.ones(2, 2)))


# --- the probe's own numbers: DeltaWTracker on real layers against numpy ------------------------------------


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(64, 96)


def _not_borderline(delta, energy):
    s = np.linalg.svd(delta, compute_uv=False)
    shares = np.cumsum(s**2) / np.sum(s**2)
    return np.min(np.abs(shares - energy)) > 1e-3


@pytest.mark.parametrize('energy', [0.5, 0.9])
def test_tracker_on_a_linear_layer_matches_numpy_for_a_synthetic_update(energy):
    from composer_ext.lora_probe.tracker import DeltaWTracker
    torch.manual_seed(0)
    model = _Net()
    sigma = np.array([10.0, 7.0, 5.0, 3.0, 2.0, 1.5, 1.0, 0.5, 0.25, 0.1])
    delta, _, _ = _synthetic(96, 64, sigma, seed=1)
    tracker = DeltaWTracker(model, energy=energy)
    assert tracker.names == ['proj']
    tracker.capture()
    initial = model.proj.weight.detach().double().clone()
    with torch.no_grad():
        model.proj.weight.add_(torch.from_numpy(delta).float())  # W = W0 + U diag(s) Vᵀ, rounded to float32
    applied = model.proj.weight.detach().double() - initial        # the update the layer really holds
    assert _not_borderline(applied.numpy(), energy)
    rank, effective, spectral, frobenius = _numpy_reference(applied.numpy(), energy)
    assert rank == _numpy_reference(delta, energy)[0]               # rounding did not change the answer
    result = tracker.spectra()['proj']
    assert result.rank_at_energy == rank
    assert result.effective_rank == pytest.approx(effective, rel=1e-4)
    assert result.spectral_norm == pytest.approx(spectral, rel=1e-5)
    assert result.frobenius_norm == pytest.approx(frobenius, rel=1e-5)
    assert result.shape == (96, 64)


def _lora_net(r, init_lora_weights=True):
    import peft
    config = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=['proj'], lora_dropout=0.0,
                             init_lora_weights=init_lora_weights)
    model = peft.get_peft_model(_Net(), config)
    return model, model.base_model.model.proj


def _set_factors(layer, b, a):
    with torch.no_grad():
        layer.lora_B['default'].weight.copy_(torch.from_numpy(b))
        layer.lora_A['default'].weight.copy_(torch.from_numpy(a))


def test_tracker_on_a_peft_lora_layer_matches_numpy_for_hand_set_factors():
    from composer_ext.lora_probe.tracker import DeltaWTracker
    r, sigma = 4, np.array([6.0, 3.0, 1.0, 0.5])
    torch.manual_seed(0)
    model, layer = _lora_net(r)
    tracker = DeltaWTracker(model, energy=0.9)
    assert tracker.names == ['proj'] and tracker.probed[0].kind == 'lora'
    tracker.capture()  # peft starts with B = 0: the initial update is zero
    _, u, v = _synthetic(96, 64, sigma, seed=2)
    _set_factors(layer, (u * sigma).astype(np.float32), v.T.astype(np.float32))   # B = U diag(s), A = Vᵀ
    scaling = float(layer.scaling['default'])
    assert scaling == 2.0
    b, a = layer.lora_B['default'].weight.detach().double(), layer.lora_A['default'].weight.detach().double()
    expected = (scaling * b @ a).numpy()
    rank, effective, spectral, frobenius = _numpy_reference(expected, 0.9)
    assert _not_borderline(expected, 0.9) and rank == 2                  # 36 + 9 = 45 of 46.25 = 97%
    result = tracker.spectra()['proj']
    assert result.rank_at_energy == rank <= r
    assert result.effective_rank == pytest.approx(effective, rel=1e-4)
    assert result.spectral_norm == pytest.approx(spectral, rel=1e-5) and spectral == pytest.approx(12.0, rel=1e-5)
    assert result.frobenius_norm == pytest.approx(frobenius, rel=1e-5)
    # peft's own merged update agrees (the tracker never merges it into the model).
    assert frobenius == pytest.approx(float(torch.linalg.norm(layer.get_delta_weight('default'))), rel=1e-5)


def test_tracker_subtracts_a_nonzero_initial_lora_product():
    from composer_ext.lora_probe.tracker import DeltaWTracker
    r = 3
    torch.manual_seed(0)
    model, layer = _lora_net(r, init_lora_weights=False)  # random A and B: the start is not zero
    rng = np.random.default_rng(4)
    _set_factors(layer, rng.standard_normal((96, r)).astype(np.float32), rng.standard_normal((r, 64)).astype(
        np.float32))
    tracker = DeltaWTracker(model, energy=0.9)
    tracker.capture()
    b0, a0 = layer.lora_B['default'].weight.detach().double(), layer.lora_A['default'].weight.detach().double()
    _set_factors(layer, rng.standard_normal((96, r)).astype(np.float32), rng.standard_normal((r, 64)).astype(
        np.float32))
    b1, a1 = layer.lora_B['default'].weight.detach().double(), layer.lora_A['default'].weight.detach().double()
    scaling = float(layer.scaling['default'])
    expected = (scaling * (b1 @ a1 - b0 @ a0)).numpy()                  # rank <= 2r
    rank, effective, _, frobenius = _numpy_reference(expected, 0.9)
    assert _not_borderline(expected, 0.9)
    result = tracker.spectra()['proj']
    assert result.rank_at_energy == rank <= 2 * r
    assert result.effective_rank == pytest.approx(effective, rel=1e-4)
    assert result.frobenius_norm == pytest.approx(frobenius, rel=1e-5)
