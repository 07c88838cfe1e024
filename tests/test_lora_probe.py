"""LoRAProbe on real small finetunes: rank <= r for LoRA, ΔW equal to the true update, exact resume, bad input."""

import json

import pytest
import torch
from composer import Trainer
from composer.core import Evaluator
from composer.loggers import InMemoryLogger
from composer.models import HuggingFaceModel
from composer.optim import DecoupledAdamW
from torch.utils.data import DataLoader

from composer_ext.callbacks import LoRAProbe
from composer_ext.data import build_image_dataloader, digits
from composer_ext.data.text import build_text_dataloader, build_text_evaluators
from composer_ext.lora_probe.discovery import find_probed_modules
from composer_ext.lora_probe.lora import LoRARecommendationWarning, lora_config
from composer_ext.models import small_gpt, small_vgg
from composer_ext.testing import KillAt, Killed

SEQ = 64


def _gpt(dropout=0.0):
    return small_gpt(n_layer=1, n_embd=32, n_head=2, n_positions=SEQ, dropout=dropout)


def _lora_gpt(r=2, **kwargs):
    base = _gpt()
    with pytest.warns() if kwargs.get('targets') in ('attention', 'mlp') else _no_warning():
        config = lora_config(r=r, model=base, dropout=0.0, **kwargs)
    return HuggingFaceModel(base.model, tokenizer=base.tokenizer, use_logits=True,
                            metrics=list(base.get_metrics(is_train=False).values()), shift_labels=True,
                            peft_config=config)


class _no_warning:
    def __enter__(self):
        import warnings
        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter('error')

    def __exit__(self, *exc):
        self._catch.__exit__(*exc)


def _evals():
    return (build_text_evaluators(16, domains='prose', seq_len=SEQ, subset_num_batches=2),
            build_text_evaluators(16, domains='code', seq_len=SEQ, subset_num_batches=2))


def _trainer(model, probe, max_duration='6ba', lr=1e-2, **kwargs):
    callbacks = [probe] if probe is not None else []
    return Trainer(model=model, train_dataloader=build_text_dataloader(8, domains=['code'], seq_len=SEQ),
                   max_duration=max_duration, optimizers=DecoupledAdamW(model.parameters(), lr=lr),
                   callbacks=callbacks, progress_bar=False, device='cpu', seed=5, **kwargs)


def _weight_matrix(module):
    from transformers.pytorch_utils import Conv1D
    weight = module.weight.detach()
    return weight.T if isinstance(module, Conv1D) else weight


def test_lora_rank_r_finetune_reports_rank_at_most_r_and_the_true_update(corpus, tmp_path):
    r = 2
    model = _lora_gpt(r=r)
    source, target = _evals()
    memory = InMemoryLogger()
    probe = LoRAProbe(source, target, every='3ba', spectrum_every='3ba', save_folder=str(tmp_path / '{run_name}'))
    trainer = _trainer(model, probe, loggers=[memory], run_name='lora_r2')
    trainer.fit()
    final = probe.history[-1]
    assert final['batch'] == 6 and {'metrics', 'spectrum'} <= set(final)
    adapted = [m for m in find_probed_modules(model) if m.kind == 'lora']
    assert len(adapted) == 4 and set(final['spectrum']) == {m.name for m in adapted}
    assert {m.name for m in adapted} == {'model.transformer.h.0.attn.c_attn', 'model.transformer.h.0.attn.c_proj',
                                         'model.transformer.h.0.mlp.c_fc', 'model.transformer.h.0.mlp.c_proj'}
    for entry in adapted:
        stats = final['spectrum'][entry.name]
        assert 1 <= stats['rank_at_energy'] <= r, (entry.name, stats)
        assert stats['effective_rank'] <= r + 1e-6
        # ΔW from the factors is peft's own merged update (scaling * B @ A, in the base weight's layout).
        true_update = entry.module.get_delta_weight('default').detach()
        assert stats['frobenius_norm'] == pytest.approx(float(torch.linalg.norm(true_update)), rel=1e-4)
        assert stats['spectral_norm'] == pytest.approx(float(torch.linalg.matrix_norm(true_update, ord=2)), rel=1e-4)
    assert final['learning_mean'] > 0  # six steps on code already lower the code loss
    # Logged to Composer's logger, per module and aggregated, and written to the run directory.
    assert memory.data['lora_probe/delta_w/rank_at_energy/max'][-1][1] <= r
    assert 'lora_probe/delta_w/model.transformer.h.0.mlp.c_fc/rank_at_energy' in memory.data
    assert {'lora_probe/learning', 'lora_probe/forgetting', 'lora_probe/learning/code/LanguageCrossEntropy',
            'lora_probe/forgetting/prose/LanguagePerplexity', 'lora_probe/source/prose/LanguageCrossEntropy',
            'lora_probe/baseline_bytes'} <= set(memory.data)
    written = json.loads((tmp_path / 'lora_r2' / 'lora_probe.json').read_text())
    assert written['history'] == json.loads(json.dumps(probe.history))
    assert written['adapter']['kind'] == 'lora' and written['adapter']['r'] == r
    assert written['baseline_bytes'] < 10_000  # LoRA keeps only the initial adapter factors
    trainer.close()


def test_full_finetune_update_is_the_weight_difference_and_higher_rank(corpus):
    model = _gpt()
    initial = {m.name: _weight_matrix(m.module).clone() for m in find_probed_modules(model)}
    source, target = _evals()
    probe = LoRAProbe(source, target, every=None, spectrum_every=None)
    trainer = _trainer(model, probe)
    trainer.fit()
    final = probe.history[-1]
    assert [r['batch'] for r in probe.history] == [0, 6]  # every=None: only the start and the end
    assert set(final['spectrum']) == set(initial) and len(initial) == 4  # lm_head is tied to the embedding
    probed = {m.name: m.module for m in find_probed_modules(model)}
    for name, stats in final['spectrum'].items():
        delta = _weight_matrix(probed[name]) - initial[name]
        assert stats['frobenius_norm'] == pytest.approx(float(torch.linalg.norm(delta)), rel=1e-4)
        assert stats['rank_at_energy'] > 2  # Adam's full update is far from rank 2 (the LoRA rank above)
    summary = final['spectrum_summary']
    assert summary['rank_at_energy/mean'] > 4
    # The CPU copy of the initial weights is what it costs: 4 bytes x the probed weights.
    assert probe.tracker.baseline_bytes == 4 * sum(t.numel() for t in initial.values())
    trainer.close()


def _digits_probe(**kwargs):
    test = digits('test')
    loader = DataLoader(test, batch_size=60)
    first, second = Evaluator(label='even_half', dataloader=loader), Evaluator(label='odd_half', dataloader=loader)
    return LoRAProbe([first], [second], **kwargs)


def _digits_trainer(probe, **kwargs):
    model = small_vgg(widths=[8, 16])
    return Trainer(model=model, train_dataloader=build_image_dataloader('digits', 32), max_duration='2ba',
                   optimizers=DecoupledAdamW(model.parameters(), lr=1e-3), callbacks=[probe], progress_bar=False,
                   device='cpu', **kwargs)


def test_module_pattern_that_matches_nothing_fails_at_trainer_construction():
    with pytest.raises(ValueError, match=r"modules pattern 'attn\.c_attn' matches no probe-able module\. Fix: .*"
                                         r"candidate names, e\.g\. \['module\.features\.0\.conv'"):
        _digits_trainer(_digits_probe(modules=['attn.c_attn']))
    # A malformed pattern needs no model: it fails when the probe is built.
    for modules in ('(', ['c_fc', '[a-']):
        with pytest.raises(ValueError, match=r"modules pattern '(\(|\[a-)' is not a regular expression .*Fix: escape"):
            LoRAProbe([], [], modules=modules)


def test_evaluators_without_a_common_metric_fail_at_trainer_construction():
    loader = DataLoader(digits('test'), batch_size=60)
    probe = LoRAProbe([Evaluator(label='even_half', dataloader=loader, metric_names=['CrossEntropy'])],
                      [Evaluator(label='odd_half', dataloader=loader, metric_names=['MulticlassAccuracy'])])
    with pytest.raises(ValueError, match=r"the evaluators follow no common metric.*\{'even_half': \['CrossEntropy'\], "
                                         r"'odd_half': \['MulticlassAccuracy'\]\} \(evaluator 'odd_half' lacks "
                                         r"'CrossEntropy'.*Fix: .*metric_names=\['CrossEntropy'\]"):
        _digits_trainer(probe)


def test_evaluators_with_different_metrics_average_the_first_shared_one():
    loader = DataLoader(digits('test'), batch_size=60)
    probe = LoRAProbe([Evaluator(label='even_half', dataloader=loader,
                                 metric_names=['MulticlassAccuracy', 'CrossEntropy'])],
                      [Evaluator(label='odd_half', dataloader=loader, metric_names=['CrossEntropy'])],
                      every=None, spectrum_every=None)
    trainer = _digits_trainer(probe)
    trainer.fit()
    final = probe.history[-1]
    assert probe.primary_metric == 'CrossEntropy'  # the source's first metric is not followed by the target
    assert set(final['learning']['odd_half']) == {'CrossEntropy'}
    assert set(final['forgetting']['even_half']) == {'MulticlassAccuracy', 'CrossEntropy'}
    assert final['learning_mean'] == final['learning']['odd_half']['CrossEntropy']
    assert final['forgetting_mean'] == final['forgetting']['even_half']['CrossEntropy']
    trainer.close()


def test_evaluator_without_the_requested_metric_fails_with_the_available_ones():
    with pytest.raises(ValueError, match=r"evaluator 'even_half' has no metric 'LanguageCrossEntropy' \(its metrics: "
                                         r"\['CrossEntropy', 'MulticlassAccuracy'\].*Fix: choose metric_names"):
        _digits_trainer(_digits_probe(metric_names=['LanguageCrossEntropy']))
    loader = DataLoader(digits('test'), batch_size=60)
    probe = LoRAProbe([Evaluator(label='s', dataloader=loader, metric_names=['BLEU'])], [])
    with pytest.raises(ValueError, match=r"evaluator 's' asks for the metric\(s\) \['BLEU'\], which the model does "
                                         r'not provide'):
        _digits_trainer(probe)


@pytest.mark.parametrize('energy', [0.0, -1, 1.5, True])
def test_energy_outside_unit_interval_is_rejected(energy):
    with pytest.raises(ValueError, match=r'energy=.* is outside \(0, 1\]\. Fix:'):
        LoRAProbe([], [], energy=energy)


@pytest.mark.parametrize('kwargs,message', [
    ({'every': 'soon'}, r"every='soon' is not a Composer time string\. Fix: use e\.g\. \"100ba\""),
    ({'every': '0ba'}, r'every=.* must be positive'),
    ({'spectrum_every': '2dur'}, r'spectrum_every=.* must be positive \(and at most 1dur\)'),
    ({'spectrum_every': '3s'}, r"spectrum_every=.* has unit 'sec'"),
    ({'modules': []}, r'modules=\[\] is invalid'),
    ({'metric_names': 'LanguageCrossEntropy'}, r'metric_names=.* is invalid\. Fix: pass a non-empty list'),
    ({'higher_is_better': {'x': 1}}, r'higher_is_better=.* is invalid'),
    ({'baseline_device': 'gpu'}, r"baseline_device='gpu' is invalid"),
    ({'eval_subset_num_batches': 0}, r'eval_subset_num_batches=0 is invalid'),
])
def test_bad_arguments_name_the_argument_and_the_fix(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        LoRAProbe([], [], **kwargs)


def test_duplicate_labels_and_unknown_metric_direction_are_rejected():
    loader = DataLoader(digits('test'), batch_size=60)
    with pytest.raises(ValueError, match=r"the evaluator labels \['x'\] are used more than once"):
        LoRAProbe([Evaluator(label='x', dataloader=loader)], [Evaluator(label='x', dataloader=loader)])
    with pytest.raises(TypeError, match=r'source_evals\[0\] is a str'):
        LoRAProbe(['prose'], [])
    from torchmetrics import MeanMetric
    from composer_ext.lora_probe.evaluation import _direction
    with pytest.raises(ValueError, match=r"cannot tell whether a higher 'Mean' is better.*higher_is_better=\{'Mean'"):
        _direction('Mean', MeanMetric(), {})
    assert _direction('Mean', MeanMetric(), {'Mean': True}) is True


def test_repr_rebuilds_plain_probe_and_marks_evaluators_as_a_placeholder():
    probe = LoRAProbe([], [], every='0.25dur', spectrum_every=200, energy=0.8, modules=['c_fc'],
                      metric_names=['LanguageCrossEntropy'], save_folder='runs/{run_name}')
    rebuilt = eval(repr(probe), {'LoRAProbe': LoRAProbe})
    assert repr(rebuilt) == repr(probe)
    assert "every='0.25dur', spectrum_every='200ba', energy=0.8, modules=['c_fc']" in repr(probe)
    # Evaluators hold dataloaders: they are named, and eval refuses the placeholder instead of dropping them.
    with_evaluators = _digits_probe(modules='auto')
    text = repr(with_evaluators)
    assert text.startswith("LoRAProbe(source_evals=<1 Evaluator: 'even_half'>, target_evals=<1 Evaluator: "
                           "'odd_half'>, every='100ba'")
    with pytest.raises(SyntaxError):
        eval(text, {'LoRAProbe': LoRAProbe})


def test_digits_probe_signs_learning_by_metric_direction_and_survives_fit_twice():
    probe = _digits_probe(every='1ba', spectrum_every='1ba')
    trainer = _digits_trainer(probe, loggers=[InMemoryLogger()])
    trainer.fit()
    baseline = json.dumps(probe.baseline_metrics)
    first = probe.history[-1]
    # The same data as source and target: learning and forgetting are exact opposites, whatever the direction.
    for name in ('MulticlassAccuracy', 'CrossEntropy'):
        assert first['learning']['odd_half'][name] == pytest.approx(-first['forgetting']['even_half'][name])
    accuracy_change = first['metrics']['target']['odd_half']['MulticlassAccuracy'] - \
        probe.baseline_metrics['odd_half']['MulticlassAccuracy']
    assert first['learning']['odd_half']['MulticlassAccuracy'] == pytest.approx(accuracy_change)  # higher is better
    loss_change = first['metrics']['target']['odd_half']['CrossEntropy'] - probe.baseline_metrics['odd_half'][
        'CrossEntropy']
    assert first['learning']['odd_half']['CrossEntropy'] == pytest.approx(-loss_change)  # lower is better
    assert probe.primary_metric == 'CrossEntropy'  # the model's first eval metric
    assert set(first['spectrum']) == {'module.features.0.conv', 'module.features.1.conv', 'module.features.3.conv',
                                      'module.features.4.conv', 'module.classifier'}
    trainer.fit(duration='2ba')  # a second fit continues against the original start
    assert json.dumps(probe.baseline_metrics) == baseline
    assert [r['batch'] for r in probe.history] == [0, 1, 2, 3, 4]
    assert probe.history[-1]['spectrum_summary']['frobenius_norm/total'] > first['spectrum_summary'][
        'frobenius_norm/total']
    trainer.close()
    trainer.close()


def test_duration_interval_errors_name_the_argument():
    # Composer itself refuses most runs that cannot be counted; the probe's own check covers the State it is given.
    from composer.core import State
    from composer.devices import DeviceCPU
    probe = _digits_probe(every='0.25dur', spectrum_every='0.5dur')
    state = State(model=small_vgg(widths=[8, 16]), rank_zero_seed=0, run_name='t', device=DeviceCPU())
    with pytest.raises(ValueError, match=r"every='0\.25dur' is a fraction of the duration, but the Trainer has no "
                                         r'max_duration\. Fix: .*every="100ba"'):
        probe._eval_schedule.resolve(state)
    state.max_duration = '1ep'  # and no train dataloader whose batches could be counted
    with pytest.raises(ValueError, match=r"spectrum_every='0\.5dur' with max_duration='1ep' needs a sized train "
                                         r'dataloader.*Fix: .*spectrum_every="100ba"'):
        probe._spectrum_schedule.resolve(state)


def test_a_probe_reused_on_another_model_starts_a_new_run():
    probe = _digits_probe(every=None, spectrum_every=None)
    first = _digits_trainer(probe, seed=1)
    first.fit()
    first_baseline = probe.baseline_metrics
    first.close()
    torch.manual_seed(123)  # another model: other initial weights, another baseline
    second = _digits_trainer(probe, seed=2)
    network = second.state.model
    initial = {m.name: m.module.weight.detach().clone().reshape(m.shape) for m in find_probed_modules(network)}
    second.fit()
    assert [r['batch'] for r in probe.history] == [0, 2]  # not the 4 records of a continued run
    assert probe.baseline_metrics != first_baseline
    assert all(p.module is dict(network.named_modules())[p.path] for p in probe.tracker.probed)
    for entry in find_probed_modules(network):  # ΔW against the second model's own start
        delta = entry.module.weight.detach().reshape(entry.shape) - initial[entry.name]
        assert probe.history[-1]['spectrum'][entry.name]['frobenius_norm'] == pytest.approx(
            float(torch.linalg.norm(delta)), rel=1e-4)
    second.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device to tell the devices apart')
def test_same_device_baseline_returns_to_the_parameters_after_a_resume():
    from composer_ext.lora_probe.tracker import DeltaWTracker
    model = torch.nn.Sequential(torch.nn.Linear(16, 24)).cuda()
    tracker = DeltaWTracker(model, baseline_device='same')
    tracker.capture()
    assert tracker.baseline['0']['weight'].device.type == 'cuda'
    saved = {**tracker.state_dict(), 'baseline': {'0': {'weight': tracker.baseline['0']['weight'].cpu()}}}
    resumed = DeltaWTracker(model, baseline_device='same')
    resumed.load_state_dict(saved)  # as a checkpoint loaded onto the CPU
    with torch.no_grad():
        model[0].weight.add_(1.0)
    spectrum = resumed.spectra()['0']
    assert resumed.baseline['0']['weight'].device.type == 'cuda'
    assert spectrum.frobenius_norm == pytest.approx(float(torch.ones(24, 16).norm()), rel=1e-5)


def test_epoch_and_duration_intervals_resolve_against_the_run():
    probe = _digits_probe(every='1ep', spectrum_every='0.5dur')
    model = small_vgg(widths=[8, 16])
    trainer = Trainer(model=model, train_dataloader=build_image_dataloader('digits', 128), max_duration='2ep',
                      optimizers=DecoupledAdamW(model.parameters(), lr=1e-3), callbacks=[probe], progress_bar=False,
                      device='cpu')
    trainer.fit()
    per_epoch = len(trainer.state.dataloader)  # 1,438 images in batches of 128, last one dropped: 11
    assert [(r['batch'], 'metrics' in r, 'spectrum' in r) for r in probe.history] == [
        (0, True, False), (per_epoch, True, True), (2 * per_epoch, True, True)]
    assert [r['epoch'] for r in probe.history] == [0, 1, 2]
    trainer.close()


def _full_probe_run(tmp_path, name, probe=True, dropout=0.0, lora=False, **kwargs):
    source, target = _evals()
    callback = LoRAProbe(source, target, every='2ba', spectrum_every='2ba',
                         save_folder=str(tmp_path / 'probe' / '{run_name}')) if probe else None
    torch.manual_seed(0)  # the same initial weights in every run
    model = _lora_gpt(r=2) if lora else _gpt(dropout=dropout)
    return _trainer(model, callback, run_name=name, **kwargs), callback


def _state(trainer):
    return {k: v.clone() for k, v in trainer.state.model.state_dict().items()}


def test_the_probe_never_changes_training(corpus, tmp_path):
    # Dropout on: the probe's evaluations iterate dataloaders (which draw from the torch RNG), yet a run with
    # the probe trains bit for bit like one without it, because the probe restores every generator.
    with_probe, _ = _full_probe_run(tmp_path, 'with_probe', dropout=0.1)
    with_probe.fit()
    without, _ = _full_probe_run(tmp_path, 'without', probe=False, dropout=0.1)
    without.fit()
    reference = _state(with_probe)
    for key, value in _state(without).items():
        assert torch.equal(value, reference[key]), key
    with_probe.close()
    without.close()


@pytest.mark.parametrize('lora', [False, True], ids=['full', 'lora'])
def test_resume_reports_against_the_original_start(corpus, tmp_path, lora):
    reference, probe = _full_probe_run(tmp_path, 'reference', lora=lora)
    reference.fit()
    weights = _state(reference)
    reference.close()

    killed, _ = _full_probe_run(tmp_path, 'resumed', lora=lora, save_folder=str(tmp_path / 'ckpt'), save_interval='2ba')
    killed.state.callbacks.append(KillAt(4))
    with pytest.raises(Killed):
        killed.fit()
    killed.close()
    resumed, resumed_probe = _full_probe_run(tmp_path, 'resumed', lora=lora,
                                             load_path=str(tmp_path / 'ckpt' / 'ep0-ba4-rank0.pt'))
    resumed.fit()
    assert resumed_probe.baseline_metrics == probe.baseline_metrics  # the baseline of batch 0, not of batch 4
    assert resumed_probe.history == probe.history                    # incl. ΔW against the batch-0 weights
    assert [r['batch'] for r in resumed_probe.history] == [0, 2, 4, 6]
    for key, value in _state(resumed).items():
        assert torch.equal(value, weights[key]), key
    on_disk = json.loads((tmp_path / 'probe' / 'resumed' / 'lora_probe.json').read_text())
    assert on_disk['history'] == json.loads((tmp_path / 'probe' / 'reference' / 'lora_probe.json').read_text())[
        'history']
    resumed.close()


def test_lora_config_follows_the_paper_and_warns_on_deviations():
    base = _gpt()
    with _no_warning():
        config = lora_config(r=16, model=base)
    assert config.r == 16 and config.lora_alpha == 32 and config.fan_in_fan_out is True
    assert sorted(config.target_modules) == ['attn.c_attn', 'attn.c_proj', 'mlp.c_fc', 'mlp.c_proj']
    assert sorted(lora_config(architecture='llama', warn=False, targets='mlp').target_modules) == \
        ['down_proj', 'gate_proj', 'up_proj']
    with pytest.warns(LoRARecommendationWarning, match=r'alpha=8 with r=16: the paper sets alpha = 2 \* r = 32'):
        lora_config(r=16, alpha=8, model=base)
    with pytest.warns(LoRARecommendationWarning, match=r"targets='attention'.*All > MLP > Attention"):
        attention = lora_config(r=16, targets='attention', model=base)
    assert sorted(attention.target_modules) == ['attn.c_attn', 'attn.c_proj']


@pytest.mark.parametrize('targets,architecture,kind', [
    (['attn.c_attn', 'attn.c_proj'], None, 'attention'),
    (['c_attn'], None, 'attention'),
    (['transformer.h.0.mlp.c_fc', 'mlp.c_proj'], None, 'MLP'),
    (['q_proj', 'v_proj'], 'llama', 'attention'),
    (['gate_proj', 'up_proj', 'down_proj'], 'qwen2', 'MLP'),
])
def test_lora_config_warns_when_an_explicit_list_adapts_only_one_kind(targets, architecture, kind):
    source = {'architecture': architecture} if architecture else {'model': _gpt()}
    with pytest.warns(LoRARecommendationWarning, match=rf'targets=.* \(only {kind} projections of \w+\): .*All > '
                                                       r"MLP > Attention\)\. Fix: targets='all'"):
        config = lora_config(r=16, targets=targets, **source)
    assert set(config.target_modules) == set(targets)  # passed through unchanged (peft keeps a set)


@pytest.mark.parametrize('targets,source', [
    (['attn.c_attn', 'mlp.c_fc'], {'model': True}),   # both kinds
    (['c_proj'], {'model': True}),                    # GPT-2's c_proj is in attention and MLP
    (['q_proj', 'lm_head'], {'architecture': 'llama'}),  # an unknown module: coverage undecided
    (['q_proj', 'v_proj'], {}),                       # no architecture: nothing to compare with
])
def test_lora_config_does_not_warn_for_lists_covering_both_or_unknown(targets, source):
    if source.get('model'):
        source = {'model': _gpt()}
    with _no_warning():
        lora_config(r=16, targets=targets, **source)


@pytest.mark.parametrize('kwargs,message', [
    ({'r': 0}, r'r=0 is invalid\. Fix: use a positive int rank'),
    ({'alpha': -1}, r'alpha=-1 is invalid'),
    ({'dropout': 1.0}, r'dropout=1\.0 is outside \[0, 1\)'),
    ({'targets': 'everything'}, r"targets='everything' is not one of \['attention', 'mlp', 'all'\]"),
    ({'model': None}, r"targets='all' needs the architecture to name the modules"),
    ({'architecture': 'llama', 'use_model': True}, r"architecture='llama' contradicts the model.*'gpt2'"),
    ({'targets': ['q_proj'], 'use_model': True}, r"targets=\['q_proj'\].*match no module of the model"),
    ({'architecture': 'bert'}, r"architecture='bert' has no known LoRA module names"),
])
def test_lora_config_bad_input(kwargs, message):
    if kwargs.pop('use_model', False):
        kwargs['model'] = _gpt()
    with pytest.raises(ValueError, match=message):
        lora_config(**kwargs)


def test_cross_entropy_and_perplexity_share_one_update_with_the_same_values(corpus):
    """The probe updates LanguageCrossEntropy once and copies its states into LanguagePerplexity: the baseline
    values equal those of two independently updated metrics, as Composer's own eval loop computes them."""
    import math

    from composer.metrics.nlp import LanguageCrossEntropy, LanguagePerplexity

    from composer_ext.lora_probe.evaluation import _shared_updates

    metrics = {'LanguageCrossEntropy': LanguageCrossEntropy(), 'LanguagePerplexity': LanguagePerplexity(),
               'OtherIgnore': LanguagePerplexity(ignore_index=0)}
    assert _shared_updates(metrics) == {'LanguageCrossEntropy': None, 'LanguagePerplexity': 'LanguageCrossEntropy',
                                        'OtherIgnore': None}  # another ignore_index: another sum, updated itself
    from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score, MulticlassPrecision
    # Same StatScores update and settings: shared. F1 has an extra setting (beta), micro averaging other states,
    # another class count other shapes: each updated itself.
    assert _shared_updates({'acc': MulticlassAccuracy(10), 'prec': MulticlassPrecision(10), 'f1': MulticlassF1Score(10),
                            'micro': MulticlassPrecision(10, average='micro'), 'acc3': MulticlassAccuracy(3)}) == \
        {'acc': None, 'prec': 'acc', 'f1': None, 'micro': None, 'acc3': None}

    torch.manual_seed(0)
    model = _gpt()
    source, target = _evals()
    expected = {}
    with torch.no_grad():  # independent updates of both metrics with the initial weights
        model.eval()
        for evaluator in source + target:
            ce, pp = LanguageCrossEntropy(), LanguagePerplexity()
            for index, batch in enumerate(evaluator.dataloader.dataloader):
                if index >= evaluator.subset_num_batches:
                    break
                outputs = model.eval_forward(batch)
                model.update_metric(batch, outputs, ce)
                model.update_metric(batch, outputs, pp)
            expected[evaluator.label] = (float(ce.compute()), float(pp.compute()))
        model.train()
    probe = LoRAProbe(source, target, every=None, spectrum_every=None)
    _trainer(model, probe, max_duration='1ba').fit()
    for label, (ce_value, pp_value) in expected.items():
        values = probe.baseline_metrics[label]
        assert values['LanguageCrossEntropy'] == pytest.approx(ce_value, rel=1e-6)
        assert values['LanguagePerplexity'] == pytest.approx(pp_value, rel=1e-6)
        assert values['LanguagePerplexity'] == pytest.approx(math.exp(values['LanguageCrossEntropy']), rel=1e-6)
