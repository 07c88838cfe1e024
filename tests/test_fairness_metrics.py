"""CEV/SDE (cev_sde, ClassBias) and model similarity (agreement, churn, KL, linear CKA) on hand-computed cases."""

import itertools
import math
import warnings

import numpy as np
import pytest
import torch

from composer_ext.metrics import ClassBias, cev_sde
from composer_ext.fairness import bias as bias_module
from composer_ext.fairness.bias import ZeroRateWarning, cev_sde_from_confusion
from composer_ext.fairness.similarity import (Agreement, Churn, LinearCKA, NegativeFlipRate, OutputKL, churn,
                                             linear_cka, negative_flip_rate, output_kl, top1_agreement)
from composer_ext.testing import run_distributed

# A 3-class case worked by hand (4 samples per class).
#   reference confusion (rows = truth): [[3,1,0],[0,3,1],[1,0,3]] -> FPR = 1/8 and FNR = 1/4 for every class
#   model confusion:                    [[2,2,0],[0,4,0],[2,0,2]] -> FPR = (1/4, 1/4, 0), FNR = (1/2, 0, 1/2)
#   ΔFPR = (1, 1, -1), ΔFNR = (1, -1, 1); both means 1/3; squared deviations sum to 8/3 per component
#   CEV_nas = (8/3 + 8/3) / 3 = 16/9;  SDE_nas = (0 + 2 + 2) / 3 = 4/3
#   simon: Δ in percent, CEV / 2, SDE / √2 -> CEV = 16/9 * 100² / 2 = 80000/9, SDE = 400 / (3√2)
TARGET = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
REF = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 0])
MODEL = torch.tensor([0, 0, 1, 1, 1, 1, 1, 1, 2, 2, 0, 0])


def test_hand_computed_three_class_case_nas():
    result = cev_sde(TARGET, REF, MODEL, num_classes=3)
    assert result.cev == pytest.approx(16 / 9, rel=1e-12)
    assert result.sde == pytest.approx(4 / 3, rel=1e-12)
    assert result.n_masked == 0
    assert result.delta_fpr.tolist() == pytest.approx([1.0, 1.0, -1.0])
    assert result.delta_fnr.tolist() == pytest.approx([1.0, -1.0, 1.0])
    assert result.ref_fpr.tolist() == pytest.approx([1 / 8] * 3) and result.fnr.tolist() == pytest.approx([.5, 0, .5])


def test_hand_computed_three_class_case_simon():
    result = cev_sde(TARGET, REF, MODEL, num_classes=3, variant='simon')
    assert result.cev == pytest.approx(80000 / 9, rel=1e-12)
    assert result.sde == pytest.approx(400 / (3 * math.sqrt(2)), rel=1e-12)
    assert result.delta_fpr.tolist() == pytest.approx([100.0, 100.0, -100.0])


def test_scores_are_argmaxed_and_numpy_is_accepted():
    ref_scores = torch.nn.functional.one_hot(REF, 3).float() * 5 + 0.1 * torch.randn(12, 3)
    result = cev_sde(TARGET.numpy(), ref_scores, MODEL.numpy(), 3)
    assert result.cev == pytest.approx(16 / 9) and result.sde == pytest.approx(4 / 3)


def test_confusion_matrix_form_matches():
    ref = torch.tensor([[3, 1, 0], [0, 3, 1], [1, 0, 3]])
    new = torch.tensor([[2, 2, 0], [0, 4, 0], [2, 0, 2]])
    result = cev_sde_from_confusion(ref, new)
    assert (result.cev, result.sde) == (pytest.approx(16 / 9), pytest.approx(4 / 3))
    with pytest.raises(ValueError, match='row sums'):
        cev_sde_from_confusion(ref, torch.tensor([[4, 0, 0], [0, 4, 0], [0, 0, 5]]))


def _noisy(labels, accuracy, num_classes, generator):
    wrong = torch.randint(0, num_classes, labels.shape, generator=generator)
    return torch.where(torch.rand(labels.shape, generator=generator) < accuracy, labels, wrong)


@pytest.mark.parametrize('variant', ['nas', 'simon'])
@pytest.mark.parametrize('eps', [None, 1e-6])
def test_identical_models_give_zero(variant, eps):
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 10, (5000,), generator=g)
    preds = _noisy(target, 0.7, 10, g)
    result = cev_sde(target, preds, preds.clone(), 10, variant=variant, eps=eps)
    assert result.cev == 0.0 and result.sde == 0.0 and result.n_masked == 0


def test_zero_reference_rate_is_masked_with_a_warning_and_counted():
    # Reference: class 0 perfect recall (FNR 0), nothing predicted as class 2 wrongly (FPR 0).
    target = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 2])
    ref = torch.tensor([0, 0, 0, 1, 1, 0, 2, 2, 2, 1])
    model = torch.tensor([0, 1, 0, 1, 1, 0, 2, 2, 0, 1])
    with pytest.warns(ZeroRateWarning, match=r'FPR of classes \[2\]; FNR of classes \[0\]'):
        result = cev_sde(target, ref, model, 3)
    assert result.n_masked == 2
    assert result.masked_fpr.tolist() == [False, False, True] and result.masked_fnr.tolist() == [True, False, False]
    assert math.isnan(result.delta_fpr[2]) and math.isnan(result.delta_fnr[0])
    # By hand: ref FPR = (1/7, 1/7, 0), FNR = (0, 1/3, 1/4); model FPR = (2/7, 2/7, 0), FNR = (1/3, 1/3, 1/2).
    # ΔFPR over classes {0,1}: (1, 1) -> spread 0. ΔFNR over classes {1,2}: (0, 1) -> mean 1/2, spread 1/4.
    # CEV = 0 + 1/4. SDE over classes valid in both ({1}): |1 - 0| = 1.
    assert result.cev == pytest.approx(0.25) and result.sde == pytest.approx(1.0)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        smoothed = cev_sde(target, ref, model, 3, eps=1e-6)
    assert smoothed.n_masked == 0 and math.isfinite(smoothed.cev) and math.isfinite(smoothed.sde)
    assert smoothed.cev > 1e5  # eps makes a 0 -> 1/3 change enormous: masking is the default for a reason


def test_zero_rates_never_give_inf_and_nan_only_with_nothing_to_compare():
    g = torch.Generator().manual_seed(1)
    for trial in range(30):
        n = int(torch.randint(2, 30, (1,), generator=g))
        target = torch.randint(0, 4, (n,), generator=g)
        ref, model = _noisy(target, 0.9, 4, g), _noisy(target, 0.5, 4, g)
        for eps, variant in itertools.product((None, 1e-12, 1e-6, 0.5), ('nas', 'simon')):
            with warnings.catch_warnings():
                warnings.simplefilter('ignore', ZeroRateWarning)
                result = cev_sde(target, ref, model, 4, eps=eps, variant=variant)
            kept_fpr, kept_fnr = ~result.masked_fpr, ~result.masked_fnr
            # NaN exactly where a mean runs over no class: CEV needs a class in each component, SDE one in both.
            assert math.isnan(result.cev) == (not kept_fpr.any() or not kept_fnr.any()), (trial, eps, variant)
            assert math.isnan(result.sde) == (not (kept_fpr & kept_fnr).any()), (trial, eps, variant)
            assert not math.isinf(result.cev) and not math.isinf(result.sde)
            assert math.isnan(result.cev) or result.cev >= 0
            assert math.isnan(result.sde) or result.sde >= 0
    # A perfect reference leaves every rate out (eps=None): nothing to compare is NaN, not the 0 of "no bias".
    # (This expectation was (0.0, 0.0, 6) before the Hardening issue's item 9.)
    with pytest.warns(ZeroRateWarning, match=r'CEV and SDE are NaN'):
        everything_masked = cev_sde(TARGET, TARGET, MODEL, 3)
    assert math.isnan(everything_masked.cev) and math.isnan(everything_masked.sde)
    assert everything_masked.n_masked == 6
    assert everything_masked.as_dict()['cev'] is None and everything_masked.as_dict()['sde'] is None


def test_nothing_to_compare_is_nan_for_empty_input_and_for_sde_alone():
    # Empty input: no rate has samples, in both modes.
    empty = torch.zeros(0, dtype=torch.long)
    for eps in (None, 1e-6):
        with pytest.warns(ZeroRateWarning, match=r'6 class rate\(s\).*CEV and SDE are NaN'):
            result = cev_sde(empty, empty, empty, 3, eps=eps)
        assert math.isnan(result.cev) and math.isnan(result.sde)
        assert (result.n_masked, result.n_unsupported) == (6, 6)
    # Two classes, worked by hand. The reference puts one class-1 sample into class 0: ref FP_0 = FN_1 = 1,
    # FN_0 = FP_1 = 0 -> FNR_0 and FPR_1 are masked (zero reference rate); kept: FPR_0 (1/3) and FNR_1 (1/3).
    # The model: FN_0 = 1, FP_0 = FN_1 = 2 -> FPR_0 = 2/3, FNR_1 = 2/3 -> ΔFPR_0 = ΔFNR_1 = 1.
    # CEV: one point per component, spread 0 (defined). SDE: no class has both rates kept -> NaN (was 0).
    target = torch.tensor([0, 0, 1, 1, 1])
    ref = torch.tensor([0, 0, 1, 0, 1])
    model = torch.tensor([1, 0, 1, 0, 0])
    with pytest.warns(ZeroRateWarning, match=r'SDE is NaN: no class has both rates left'):
        result = cev_sde(target, ref, model, 2)
    assert result.n_masked == 2 and result.cev == 0.0 and math.isnan(result.sde)
    assert result.delta_fpr.tolist()[0] == pytest.approx(1.0) and result.delta_fnr.tolist()[1] == pytest.approx(1.0)
    # The metric (and its bootstrap: every replicate of a perfect reference is NaN too) says the same.
    metric = ClassBias(3, num_bootstraps=50)
    metric.update(TARGET, TARGET, MODEL)
    with pytest.warns(ZeroRateWarning, match=r'CEV and SDE are NaN'):
        out = {k: float(v) for k, v in metric.compute().items()}
    assert out['n_masked'] == 6 and all(math.isnan(out[k]) for k in out if k != 'n_masked')
    assert all(math.isnan(float(v)) for k, v in metric(TARGET, TARGET, MODEL).items() if k != 'n_masked')


@pytest.mark.parametrize('call,error,match', [
    (lambda: cev_sde(TARGET, REF[:-1], MODEL, 3), ValueError, r'same samples.*12, 11 and 12'),
    (lambda: cev_sde(TARGET, REF, MODEL.reshape(3, 4), 3), ValueError, r'preds has shape \(3, 4\).*num_classes=3'),
    (lambda: cev_sde(TARGET, REF, MODEL + 1, 3), ValueError, r'preds contains the label 3, outside \[0, num_classes'),
    (lambda: cev_sde(TARGET - 1, REF, MODEL, 3), ValueError, r'target contains the label -1'),
    (lambda: cev_sde(TARGET, REF, MODEL, 3, variant='fair'), ValueError, r"variant='fair' is unknown.*'nas'"),
    (lambda: cev_sde(TARGET, REF, MODEL, 3, eps=-1e-6), ValueError, r'eps=-1e-06 is negative.*eps=None'),
    (lambda: cev_sde(TARGET, REF, MODEL, 3, eps=0.0), ValueError, r'eps=0.0 is not a positive finite number'),
    (lambda: cev_sde(TARGET, REF, MODEL, 3, eps=1e-200), ValueError, r'eps=1e-200 is below 1e-12.*inf in float64'),
    (lambda: ClassBias(3, eps=1e-150), ValueError, r'eps=1e-150 is below 1e-12.*Fix: use eps >= 1e-12'),
    (lambda: cev_sde(TARGET, REF.float(), MODEL, 3), TypeError, r'ref_preds is a 1-D torch.float32 tensor'),
    (lambda: cev_sde(TARGET, REF, MODEL, 1), ValueError, r'num_classes=1 is invalid'),
    (lambda: cev_sde(TARGET.tolist(), REF, MODEL, 3), TypeError, r'target is a list'),
    (lambda: ClassBias(3, num_bootstraps=1), ValueError, r'num_bootstraps=1 is invalid'),
    (lambda: ClassBias(3, confidence_level=1.5), ValueError, r'confidence_level=1.5 is outside \(0, 1\)'),
    (lambda: ClassBias(3, variant='x'), ValueError, r"variant='x' is unknown"),
])
def test_bad_input_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_class_bias_streams_to_the_functional_value():
    g = torch.Generator().manual_seed(2)
    target = torch.randint(0, 10, (3000,), generator=g)
    ref, model = _noisy(target, 0.9, 10, g), _noisy(target, 0.7, 10, g)
    metric = ClassBias(10, num_bootstraps=0)
    for start in range(0, 3000, 512):
        metric.update(target[start:start + 512], ref[start:start + 512], model[start:start + 512])
    out = metric.compute()
    expected = cev_sde(target, ref, model, 10)
    assert set(out) == {'cev', 'sde', 'n_masked'}
    assert float(out['cev']) == pytest.approx(expected.cev, rel=1e-12)
    assert float(out['sde']) == pytest.approx(expected.sde, rel=1e-12)
    assert torch.equal(metric.last_result.delta_fpr, expected.delta_fpr)
    assert eval(repr(metric), {'ClassBias': ClassBias}).num_bootstraps == 0


def _resampled_quantiles(target, ref, model, num_classes, replicates, seed):
    """The textbook bootstrap: resample the samples with replacement, recompute."""
    rng = np.random.default_rng(seed)
    arrays = [t.numpy() for t in (target, ref, model)]
    values = []
    for _ in range(replicates):
        idx = rng.integers(0, len(target), len(target))
        values.append(cev_sde(*(torch.from_numpy(a[idx]) for a in arrays), num_classes).cev)
    return np.quantile(values, [0.025, 0.975])


def test_bootstrap_intervals_cells_and_online_agree_with_resampling(monkeypatch):
    g = torch.Generator().manual_seed(3)
    target = torch.randint(0, 5, (4000,), generator=g)
    ref, model = _noisy(target, 0.9, 5, g), _noisy(target, 0.6, 5, g)
    cells = ClassBias(5, num_bootstraps=400, seed=1)
    cells.update(target, ref, model)
    cells_out = cells.compute()
    again = ClassBias(5, num_bootstraps=400, seed=1)
    again.update(target, ref, model)
    assert float(again.compute()['cev_ci_high']) == float(cells_out['cev_ci_high'])  # seeded: reproducible
    monkeypatch.setattr(bias_module, '_MAX_JOINT_CLASSES', 2)
    online = ClassBias(5, num_bootstraps=400, seed=1)
    for start in range(0, 4000, 1000):
        online.update(target[start:start + 1000], ref[start:start + 1000], model[start:start + 1000])
    online_out = online.compute()
    assert (cells.bootstrap_method, online.bootstrap_method) == ('cells', 'online')
    low, high = _resampled_quantiles(target, ref, model, 5, 400, seed=0)
    for out in (cells_out, online_out):
        assert float(out['cev']) == pytest.approx(float(cells_out['cev']))
        assert out['cev_ci_low'] < out['cev_ci_high']
        assert float(out['cev_ci_low']) == pytest.approx(low, rel=0.35)
        assert float(out['cev_ci_high']) == pytest.approx(high, rel=0.35)
        assert out['sde_ci_low'] < out['sde'] < out['sde_ci_high']


def test_bootstrap_of_identical_models_is_zero():
    g = torch.Generator().manual_seed(4)
    target = torch.randint(0, 10, (2000,), generator=g)
    preds = _noisy(target, 0.8, 10, g)
    metric = ClassBias(10, num_bootstraps=200)
    metric.update(target, preds, preds)
    assert all(float(v) == 0.0 for v in metric.compute().values())


def _ddp_class_bias_and_similarity(target, ref, model, ref_logits, logits, features_x, features_y):
    from composer.utils import dist
    rank, world = dist.get_global_rank(), dist.get_world_size()
    shard = slice(rank, None, world)
    bias = ClassBias(10, num_bootstraps=300, seed=5)
    bias.update(target[shard], ref[shard], model[shard])
    agreement, kl, cka = Agreement(), OutputKL(), LinearCKA()
    agreement.update(ref_logits[shard], logits[shard])
    kl.update(ref_logits[shard], logits[shard])
    for batch in range(rank, 8, world):  # the same 8 minibatches, dealt out over the ranks
        cka.update(features_x[batch * 32:(batch + 1) * 32], features_y[batch * 32:(batch + 1) * 32])
    cka.update(features_x[:3], features_y[:3])  # too small: skipped on every rank, counted over all ranks
    return ({k: float(v) for k, v in bias.compute().items()}, float(agreement.compute()), float(kl.compute()),
            float(cka.compute()), cka.last_skipped_batches, int(cka.skipped_batches))


@pytest.mark.distributed
def test_ddp_two_ranks_equal_one_process():
    g = torch.Generator().manual_seed(6)
    target = torch.randint(0, 10, (3001,), generator=g)  # odd: the ranks hold different numbers of samples
    ref, model = _noisy(target, 0.9, 10, g), _noisy(target, 0.7, 10, g)
    ref_logits, logits = torch.randn(3001, 10, generator=g), torch.randn(3001, 10, generator=g)
    features_x = torch.randn(256, 20, generator=g, dtype=torch.float64)
    features_y = features_x @ torch.randn(20, 7, generator=g, dtype=torch.float64)
    args = (target, ref, model, ref_logits, logits, features_x, features_y)
    single = ClassBias(10, num_bootstraps=300, seed=5)
    single.update(target, ref, model)
    expected_bias = {k: float(v) for k, v in single.compute().items()}
    cka = LinearCKA()
    for batch in range(8):
        cka.update(features_x[batch * 32:(batch + 1) * 32], features_y[batch * 32:(batch + 1) * 32])
    # 7 s alone, but starting two ranks that import composer took over 300 s (the default) on a loaded 2-core
    # machine: wait up to 800 s, inside pytest's 900 s per-test limit so that a hang still reports the ranks' state.
    results = run_distributed(_ddp_class_bias_and_similarity, world_size=2, args=args, timeout=800)
    for bias_values, agreement, kl, cka_value, skipped, local_skipped in results:
        for key, value in expected_bias.items():
            assert bias_values[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key
        assert agreement == pytest.approx(float(top1_agreement(ref_logits, logits)), rel=1e-12)
        assert kl == pytest.approx(float(output_kl(ref_logits, logits)), rel=1e-12)
        assert cka_value == pytest.approx(float(cka.compute()), rel=1e-12)
        assert (skipped, local_skipped) == (2, 1)  # summed in compute(); the state is this rank's own again after


# --- similarity ---------------------------------------------------------------------------------------------


def test_prediction_similarity_hand_cases():
    target = torch.tensor([0, 1, 2, 2, 1])
    ref = torch.tensor([0, 1, 2, 0, 1])
    model = torch.tensor([0, 2, 2, 2, 1])
    assert float(top1_agreement(ref, model)) == pytest.approx(3 / 5)
    assert float(churn(ref, model)) == pytest.approx(2 / 5)
    assert float(negative_flip_rate(target, ref, model)) == pytest.approx(1 / 5)  # sample 1: ref right, model wrong
    for metric, args, expected in ((Agreement(), (ref, model), 3 / 5), (Churn(), (ref, model), 2 / 5),
                                   (NegativeFlipRate(), (target, ref, model), 1 / 5)):
        metric.update(*(a[:2] for a in args))
        metric.update(*(a[2:] for a in args))
        assert float(metric.compute()) == pytest.approx(expected)
    with pytest.raises(ValueError, match='ref_preds has 5, preds has 4'):
        top1_agreement(ref, model[:4])


def test_scores_are_turned_into_labels_by_argmax():
    # argmax rows: ref (0, 1, 2, 1), model (0, 2, 2, 1) -> agreement 3/4. (argmin would give ref (2, 0, 1, 0),
    # model (1, 1, 0, 0): agreement 1/4.)
    ref_scores = torch.tensor([[3., 1., 0.], [0., 2., 1.], [1., 0., 5.], [2., 4., 3.]])
    scores = torch.tensor([[5., 0., 1.], [1., 0., 3.], [0., 1., 4.], [0., 3., 2.]])
    model_labels = torch.tensor([0, 2, 2, 1])
    assert float(top1_agreement(ref_scores, scores)) == pytest.approx(3 / 4)
    assert float(top1_agreement(ref_scores, model_labels)) == pytest.approx(3 / 4)  # scores against indices
    assert float(churn(ref_scores, scores)) == pytest.approx(1 / 4)
    # Negative flips with target (0, 1, 1, 1): the reference is right on samples 0, 1, 3, the model wrong on 1 of them.
    target = torch.tensor([0, 1, 1, 1])
    assert float(negative_flip_rate(target, ref_scores, scores)) == pytest.approx(1 / 4)
    for metric, args, expected in ((Agreement(), (ref_scores, scores), 3 / 4), (Churn(), (ref_scores, scores), 1 / 4),
                                   (NegativeFlipRate(), (target, ref_scores, scores), 1 / 4)):
        metric.update(*(a[:3] for a in args))
        metric.update(*(a[3:] for a in args))
        assert float(metric.compute()) == pytest.approx(expected)


def test_negative_flips_are_not_positive_flips():
    # 6 samples: 2 negative flips (samples 1, 2: reference right, model wrong), 1 positive flip (sample 3: reference
    # wrong, model right), both right on 0 and 4, both wrong on 5 -> negative flip rate 2/6 (positive: 1/6).
    target = torch.tensor([0, 1, 2, 0, 1, 2])
    ref = torch.tensor([0, 1, 2, 1, 1, 0])
    model = torch.tensor([0, 2, 0, 0, 1, 0])
    assert float(negative_flip_rate(target, ref, model)) == pytest.approx(2 / 6)
    assert float(negative_flip_rate(target, model, ref)) == pytest.approx(1 / 6)  # the roles swapped: the other flip
    metric = NegativeFlipRate()
    metric.update(target[:4], ref[:4], model[:4])
    metric.update(target[4:], ref[4:], model[4:])
    assert float(metric.compute()) == pytest.approx(2 / 6)


def test_output_kl_at_a_temperature_by_hand():
    # Two classes, T = 2. Sample 0: ref (2, 0), model (0, 2) -> p = (σ(1), σ(-1)), q = (σ(-1), σ(1)),
    # KL = (σ(1) - σ(-1)) * log(σ(1)/σ(-1)) = tanh(1/2) * 1. Sample 1: ref (0, 0), model (4, 0) -> p = (1/2, 1/2),
    # q = (σ(2), σ(-2)), KL = -log 2 - (log σ(2) + log σ(-2)) / 2 = log(1 + e²) - 1 - log 2.
    ref_logits = torch.tensor([[2., 0.], [0., 0.]])
    logits = torch.tensor([[0., 2.], [4., 0.]])
    expected = (math.tanh(0.5) + math.log(1 + math.e ** 2) - 1 - math.log(2)) / 2
    assert float(output_kl(ref_logits, logits, temperature=2.0)) == pytest.approx(expected, rel=1e-12)
    metric = OutputKL(temperature=2.0)
    metric.update(ref_logits[:1], logits[:1])
    metric.update(ref_logits[1:], logits[1:])
    assert float(metric.compute()) == pytest.approx(expected, rel=1e-12)
    # At T = 1 it is another value: sample 0: (σ(2) - σ(-2)) * 2 = 2 tanh(1); sample 1: log(1 + e⁴) - 2 - log 2.
    at_one = (2 * math.tanh(1.0) + math.log(1 + math.e ** 4) - 2 - math.log(2)) / 2
    assert float(output_kl(ref_logits, logits)) == pytest.approx(at_one, rel=1e-12)
    assert abs(at_one - expected) > 0.3


def test_output_kl_matches_the_definition():
    g = torch.Generator().manual_seed(7)
    ref_logits, logits = torch.randn(64, 5, generator=g), torch.randn(64, 5, generator=g)
    p, q = ref_logits.double().softmax(1), logits.double().softmax(1)
    expected = (p * (p.log() - q.log())).sum(1).mean()
    assert float(output_kl(ref_logits, logits)) == pytest.approx(float(expected), rel=1e-10)
    assert float(output_kl(logits, logits)) == 0.0
    metric = OutputKL(temperature=2.0)
    metric.update(ref_logits[:40], logits[:40])
    metric.update(ref_logits[40:], logits[40:])
    assert float(metric.compute()) == pytest.approx(float(output_kl(ref_logits, logits, temperature=2.0)), rel=1e-10)
    with pytest.raises(ValueError, match='temperature=0 is invalid'):
        output_kl(ref_logits, logits, temperature=0)


def test_cka_self_orthogonal_and_isotropic_scaling_invariance():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(200, 6, 4, 4, generator=g, dtype=torch.float64)  # conv-like activations, flattened inside
    y = x.reshape(200, -1)[:, :40] @ torch.randn(40, 30, generator=g, dtype=torch.float64) + \
        0.5 * torch.randn(200, 30, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(96, 96, generator=g, dtype=torch.float64))
    x_rotated_scaled = 7.5 * (x.reshape(200, -1) @ q)
    for unbiased in (True, False):
        assert float(linear_cka(x, x, unbiased)) == pytest.approx(1.0, abs=1e-12)
        base = float(linear_cka(x, y, unbiased))
        assert 0.05 < base < 0.99
        assert float(linear_cka(x_rotated_scaled, y, unbiased)) == pytest.approx(base, rel=1e-9)
        assert float(linear_cka(x, 0.01 * y, unbiased)) == pytest.approx(base, rel=1e-9)
    minibatch, rotated = LinearCKA(), LinearCKA()
    for start in range(0, 200, 50):
        minibatch.update(x[start:start + 50], x[start:start + 50])
        rotated.update(x[start:start + 50], x_rotated_scaled[start:start + 50])
    assert float(minibatch.compute()) == pytest.approx(1.0, abs=1e-12)
    assert float(rotated.compute()) == pytest.approx(1.0, abs=1e-9)


def test_cka_estimators():
    g = torch.Generator().manual_seed(9)
    x, y = torch.randn(300, 50, generator=g, dtype=torch.float64), torch.randn(300, 50, generator=g,
                                                                                dtype=torch.float64)
    # The biased estimator equals the classic feature-space formula ||Yc'Xc||² / (||Xc'Xc|| ||Yc'Yc||) ...
    xc, yc = x - x.mean(0), y - y.mean(0)
    classic = (yc.T @ xc).norm() ** 2 / ((xc.T @ xc).norm() * (yc.T @ yc).norm())
    assert float(linear_cka(x, y, unbiased=False)) == pytest.approx(float(classic), rel=1e-10)
    # ... which is far from 0 for independent wide representations; the unbiased one is near 0.
    assert float(classic) > 0.1 and abs(float(linear_cka(x, y))) < 0.05
    constant = LinearCKA()
    constant.update(torch.zeros(8, 4), x[:8])
    assert float(constant.compute()) == 0.0  # a representation with no variation: 0, not nan
    small = LinearCKA()
    small.update(x[:3], y[:3])
    assert small.skipped_batches == 1
    with pytest.raises(ValueError, match='x has 10 samples and y has 9'):
        linear_cka(x[:10], y[:9])


# --- classes without samples, ClassBias.forward, CKA numerics ---------------------------------------------------


def test_a_class_without_samples_is_left_out_in_both_modes():
    # The hand case with a 4th class that has no sample: its FNR is 0/0, not a zero rate.
    with pytest.warns(ZeroRateWarning, match=r'no samples to define the rate.*FNR of classes \[3\]'):
        masked = cev_sde(TARGET, REF, MODEL, num_classes=4)
    # eps=None: class 3's FNR (no samples) and FPR (nobody predicts 3: reference rate 0) are left out -> the 3-class
    # values.
    assert (masked.n_masked, masked.n_unsupported) == (2, 1)
    assert masked.cev == pytest.approx(16 / 9, rel=1e-12) and masked.sde == pytest.approx(4 / 3, rel=1e-12)
    # eps: class 3's FPR is defined (0 for both models; Δ = 0 is a real "no change"), its FNR is still left out.
    # Otherwise it would get ΔFNR = 0 and pull the FNR mean towards 0 (spread 11/16·b² over 4 classes).
    eps = 1e-3
    with pytest.warns(ZeroRateWarning, match=r'FNR of classes \[3\]'):
        smoothed = cev_sde(TARGET, REF, MODEL, num_classes=4, eps=eps)
    assert (smoothed.n_masked, smoothed.n_unsupported) == (1, 1)
    assert smoothed.masked_fnr.tolist() == [False, False, False, True] and math.isnan(smoothed.delta_fnr[3])
    a, b = (1 / 8) / (1 / 8 + eps), (1 / 4) / (1 / 4 + eps)  # |ΔFPR|, |ΔFNR| of classes 0..2
    # ΔFPR = (a, a, -a, 0): spread 11/16·a². ΔFNR = (b, -b, b): spread 8/9·b². SDE over classes 0..2.
    assert smoothed.cev == pytest.approx(11 / 16 * a ** 2 + 8 / 9 * b ** 2, rel=1e-12)
    assert smoothed.sde == pytest.approx((abs(a - b) + 2 * (a + b)) / 3, rel=1e-12)
    assert smoothed.as_dict()['n_unsupported'] == 1 and smoothed.as_dict()['delta_fnr'][3] is None


def test_calling_class_bias_returns_the_batch_value_cheaply_and_keeps_compute_intact():
    g = torch.Generator().manual_seed(11)
    target = torch.randint(0, 5, (900,), generator=g)
    ref, model = _noisy(target, 0.9, 5, g), _noisy(target, 0.6, 5, g)
    called, updated = ClassBias(5, num_bootstraps=100, seed=3), ClassBias(5, num_bootstraps=100, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # forward never warns, even on a batch with zero reference rates
        for start in range(0, 900, 300):
            batch = (target[start:start + 300], ref[start:start + 300], model[start:start + 300])
            value = called(*batch)
            updated.update(*batch)
            expected = cev_sde(*batch, num_classes=5)
            assert set(value) == {'cev', 'sde', 'n_masked'}
            assert float(value['cev']) == pytest.approx(expected.cev, rel=1e-12)
            assert called.last_result is None and called.last_confmats is None  # left to compute()
        called(target[:2], target[:2], model[:2])  # a tiny batch: most reference rates are 0
        updated.update(target[:2], target[:2], model[:2])
    assert {k: float(v) for k, v in called.compute().items()} == {k: float(v) for k, v in updated.compute().items()}
    assert called.last_result.cev == updated.last_result.cev
    with pytest.raises(ValueError, match=r'dist_sync_on_step=True is not supported.*Fix: leave'):
        ClassBias(5, dist_sync_on_step=True)


def test_calling_class_bias_keeps_the_online_bootstrap_stream(monkeypatch):
    # torchmetrics' default forward resets the metric per batch, which would reseed the online bootstrap each time.
    monkeypatch.setattr(bias_module, '_MAX_JOINT_CLASSES', 2)
    g = torch.Generator().manual_seed(12)
    target = torch.randint(0, 4, (600,), generator=g)
    ref, model = _noisy(target, 0.9, 4, g), _noisy(target, 0.6, 4, g)
    called, updated = ClassBias(4, num_bootstraps=50), ClassBias(4, num_bootstraps=50)
    for start in range(0, 600, 200):
        called(target[start:start + 200], ref[start:start + 200], model[start:start + 200])
        updated.update(target[start:start + 200], ref[start:start + 200], model[start:start + 200])
    assert called.bootstrap_method == 'online'
    assert torch.equal(called.boot_counts, updated.boot_counts)


def test_cka_is_computed_in_float64_from_float32_activations():
    # Activations with a large common offset: a float32 Gram matrix loses the digits the estimator needs (0.07 here
    # instead of 0.25).
    g = torch.Generator().manual_seed(10)
    x = 1000 + torch.randn(64, 512, generator=g, dtype=torch.float64)
    y = x[:, :256] @ torch.randn(256, 128, generator=g, dtype=torch.float64) / 16 + \
        torch.randn(64, 128, generator=g, dtype=torch.float64)
    exact = float(linear_cka(x, y))
    assert 0.2 < exact < 0.3
    assert float(linear_cka(x.float(), y.float())) == pytest.approx(exact, rel=1e-4)
    metric = LinearCKA()
    metric.update(x.float(), y.float())
    assert float(metric.compute()) == pytest.approx(exact, rel=1e-4)


def test_cka_denominator_rule():
    g = torch.Generator().manual_seed(13)
    y = torch.randn(8, 5, generator=g, dtype=torch.float64)
    # No variation (0 exactly, whatever rounding the constant 0.1 or a lone non-zero sample would leave): CKA 0.
    lone = torch.zeros(8, 5, dtype=torch.float64)
    lone[3] = 10 * torch.randn(5, generator=g, dtype=torch.float64)
    for x in (torch.full((8, 5), 0.1), lone):
        metric = LinearCKA()
        metric.update(x, y)
        assert float(metric.hsic_xx) == 0.0 and float(metric.compute()) == 0.0
    # Two negative self-HSIC sums: their product is positive, but the ratio is no CKA: nan.
    metric = LinearCKA()
    metric.update(y, y)
    metric.hsic_xy, metric.hsic_xx, metric.hsic_yy = (torch.tensor(v, dtype=torch.float64) for v in (0.5, -1.0, -1.0))
    assert math.isnan(float(metric.compute()))
    metric.hsic_xx = torch.tensor(2.0, dtype=torch.float64)  # one negative: nan too
    assert math.isnan(float(metric.compute()))
    # Every batch too small for the unbiased estimator: nan (not the 0 of a constant representation).
    skipped = LinearCKA()
    skipped.update(y[:3], y[:3])
    assert int(skipped.skipped_batches) == 1 and math.isnan(float(skipped.compute()))
    assert skipped.last_skipped_batches == 1
