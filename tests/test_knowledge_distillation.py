"""KnowledgeDistillation: the loss against a hand computation, one teacher per optimizer step (gradient
accumulation, 2 ranks), the window, exact resume, checkpoints without teacher weights, and the errors."""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch
from composer import Trainer
from composer.core import Callback
from composer.loggers import InMemoryLogger
from composer.models import ComposerModel
from composer.optim import DecoupledSGDW
from torch import nn

from composer_ext.distillation import (KnowledgeDistillation, default_teacher_forward, distillation_mask,
                                       extract_logits, kd_loss, load_teacher, output_width, select_teachers)
from composer_ext.data import build_image_dataloader
from composer_ext.models import small_resnet, small_vgg
from composer_ext.testing import KillAt, Killed, run_distributed

pytestmark = pytest.mark.usefixtures('one_torch_thread')

# --- the loss ----------------------------------------------------------------------------------------------


def _softmax(row, temperature):
    exps = [math.exp(v / temperature) for v in row]
    return [e / sum(exps) for e in exps]


def test_kl_loss_matches_a_hand_computation_with_direction_t2_and_ignored_positions():
    student = torch.tensor([[[1.0, 2.0, 0.5], [0.0, -1.0, 3.0], [2.0, 2.0, 2.0]]], requires_grad=True)
    teacher = torch.tensor([[[3.0, 0.0, 1.0], [1.0, 1.0, -2.0], [-3.0, 5.0, 0.0]]], requires_grad=True)
    labels = torch.tensor([[7, 4, -100]])  # causal: position t predicts labels[t + 1]
    temperature = 2.0
    mask = distillation_mask(labels, student.shape, shift_labels=True)
    assert mask.tolist() == [[True, False, False]]  # position 1 predicts an ignored label, position 2 has none

    loss = kd_loss(student, teacher, temperature=temperature, mask=mask)
    p_t, p_s = _softmax(teacher[0, 0].tolist(), temperature), _softmax(student[0, 0].tolist(), temperature)
    forward_kl = sum(t * math.log(t / s) for t, s in zip(p_t, p_s))  # KL(teacher || student)
    reverse_kl = sum(s * math.log(s / t) for t, s in zip(p_t, p_s))
    assert loss.item() == pytest.approx(temperature**2 * forward_kl, rel=1e-5)
    assert abs(forward_kl - reverse_kl) > 0.05  # the case tells the two directions apart

    loss.backward()
    assert teacher.grad is None  # no gradient into the teacher
    # d/ds T² KL(p_t || softmax(s/T)) = T (p_s - p_t), only at the kept position
    assert student.grad[0, 0].tolist() == pytest.approx([temperature * (s - t) for s, t in zip(p_s, p_t)], rel=1e-4)
    assert torch.equal(student.grad[0, 1:], torch.zeros(2, 3))

    # Masked LM (no shift): positions with labels != -100 count; the mean runs over kept positions only.
    mlm_mask = distillation_mask(labels, student.shape, shift_labels=False)
    assert mlm_mask.tolist() == [[True, True, False]]
    per_position = []
    for i in (0, 1):
        p_t, p_s = _softmax(teacher[0, i].tolist(), 1.0), _softmax(student[0, i].tolist(), 1.0)
        per_position.append(sum(t * math.log(t / s) for t, s in zip(p_t, p_s)))
    assert kd_loss(student, teacher, temperature=1.0, mask=mlm_mask).item() == pytest.approx(
        sum(per_position) / 2, rel=1e-5)


def test_ensemble_averages_teacher_probabilities_and_mse_averages_logits():
    student = torch.tensor([[0.5, -0.5, 1.0]])
    teachers = [torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([[0.0, 0.0, 4.0]])]
    temperature = 3.0
    probs = [_softmax(t[0].tolist(), temperature) for t in teachers]
    p_t = [(a + b) / 2 for a, b in zip(*probs)]
    p_s = _softmax(student[0].tolist(), temperature)
    expected = temperature**2 * sum(t * math.log(t / s) for t, s in zip(p_t, p_s))
    assert kd_loss(student, teachers, temperature).item() == pytest.approx(expected, rel=1e-4)  # float32
    # weighted ensemble: all weight on the second teacher equals distilling from it alone
    assert kd_loss(student, teachers, temperature, teacher_weights=[0.0, 1.0]).item() == pytest.approx(
        kd_loss(student, teachers[1], temperature).item(), rel=1e-6)
    mean_logits = [1.0, 0.0, 2.0]
    expected_mse = sum((s - t)**2 for s, t in zip(student[0].tolist(), mean_logits)) / 3
    assert kd_loss(student, teachers, loss='mse').item() == pytest.approx(expected_mse, rel=1e-6)

    # ensemble_average='logits': the target is softmax(mean logits / T), not the mean of the probabilities
    p_mean_logits = _softmax(mean_logits, temperature)
    expected_logits = temperature**2 * sum(t * math.log(t / s) for t, s in zip(p_mean_logits, p_s))
    by_logits = kd_loss(student, teachers, temperature, ensemble_average='logits').item()
    assert by_logits == pytest.approx(expected_logits, rel=1e-4)
    assert abs(by_logits - expected) > 0.3 * expected  # the case tells the two averages apart (0.031 vs 0.047)
    assert kd_loss(student, teachers[0], temperature, ensemble_average='logits').item() == pytest.approx(
        kd_loss(student, teachers[0], temperature).item(), rel=1e-6)  # one teacher: nothing to average
    with pytest.raises(ValueError, match=r"ensemble_average='geometric' is not an ensemble average. Fix: use one of "
                       r"\['probs', 'logits'\]"):
        kd_loss(student, teachers, ensemble_average='geometric')


def test_kd_loss_of_identical_logits_is_zero_and_half_precision_is_computed_in_float32():
    logits = torch.randn(4, 7, 11).to(torch.bfloat16)
    assert kd_loss(logits, logits.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_loss(logits, logits.clone()).dtype == torch.float32
    empty = torch.zeros(1, 3, dtype=torch.bool)
    assert kd_loss(torch.randn(1, 3, 5), torch.randn(1, 3, 5), mask=empty).item() == 0.0


def test_default_teacher_forward_passes_only_named_inputs_of_a_dict_batch():
    class Named(nn.Module):  # like a transformers model: named inputs next to **kwargs
        def forward(self, input_ids, attention_mask=None, **kwargs):
            self.received = sorted(['input_ids', *(['attention_mask'] if attention_mask is not None else []),
                                    *kwargs])
            return input_ids.float()

    class OnlyKwargs(nn.Module):
        def forward(self, **kwargs):
            self.received = sorted(kwargs)
            return kwargs['input_ids'].float()

    batch = {'input_ids': torch.ones(2, 3, dtype=torch.long), 'attention_mask': torch.ones(2, 3, dtype=torch.long),
             'labels': torch.zeros(2, 3, dtype=torch.long), 'sample_index': torch.arange(2)}
    named, only_kwargs = Named(), OnlyKwargs()
    default_teacher_forward(named, batch)
    assert named.received == ['attention_mask', 'input_ids']  # sample_index does not leak into **kwargs
    default_teacher_forward(only_kwargs, batch)
    assert only_kwargs.received == ['attention_mask', 'input_ids', 'sample_index']  # never the labels
    assert sorted(batch) == ['attention_mask', 'input_ids', 'labels', 'sample_index']  # the batch is untouched


def test_extract_logits_and_output_width():
    assert extract_logits((torch.ones(2, 3), 'x')).shape == (2, 3)
    assert extract_logits({'logits': torch.ones(1)}).shape == (1,)
    with pytest.raises(TypeError, match='cannot find logits'):
        extract_logits('not an output')
    assert output_width(small_vgg(num_classes=7, widths=[4])) == 7
    assert output_width(small_resnet(widths=[4], blocks_per_stage=[1]).module) == 10  # `fc` head
    assert output_width(nn.Identity()) is None


def test_select_teachers_policies():
    rng = np.random.default_rng(0)
    draws = [select_teachers('random', 4, i, rng)[0] for i in range(400)]
    assert set(draws) == {0, 1, 2, 3} and min(np.bincount(draws)) > 70
    assert [select_teachers('round_robin', 3, i) for i in range(4)] == [[0], [1], [2], [0]]
    assert select_teachers('ensemble', 3, 5) == [0, 1, 2]
    picks = [select_teachers('random_k', 5, i, rng, k=2) for i in range(50)]
    assert all(len(set(p)) == 2 and p == sorted(p) for p in picks)
    only_two = [select_teachers('random', 3, i, rng, weights=[0.0, 1.0, 0.0])[0] for i in range(20)]
    assert set(only_two) == {1}


# --- the algorithm in a Trainer -------------------------------------------------------------------------------


class CountingTeacher(nn.Module):
    """A real (linear) classifier of 8x8 digits that counts its calls and whether it ran in training mode."""

    def __init__(self, seed: int, num_classes: int = 10):
        super().__init__()
        torch.manual_seed(seed)
        self.fc = nn.Linear(64, num_classes)
        self.calls = 0
        self.calls_in_train_mode = 0
        self.calls_with_grad = 0

    def forward(self, x):
        self.calls += 1
        self.calls_in_train_mode += int(self.training)
        self.calls_with_grad += int(torch.is_grad_enabled())
        return self.fc(x.flatten(1))


class Opaque(nn.Module):
    """A digits classifier whose output width cannot be read statically (no recognised head); counts its calls."""

    def __init__(self, num_classes: int = 7):
        super().__init__()
        self.layer = nn.Linear(64, num_classes)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.layer(x.flatten(1))


class CallsPerMicrobatch(Callback):
    """Per optimizer step, per micro-batch, how often each teacher ran (read at AFTER_LOSS, after the algorithm)."""

    def __init__(self, teachers):
        self.teachers = teachers
        self.steps: list[list[list[int]]] = []

    def batch_start(self, state, logger):
        self.steps.append([])
        self._before = [t.calls for t in self.teachers]

    def after_loss(self, state, logger):
        now = [t.calls for t in self.teachers]
        self.steps[-1].append([n - b for n, b in zip(now, self._before)])
        self._before = now


class CallsPerStep(Callback):
    """Per optimizer step, how often each teacher ran."""

    def __init__(self, teachers):
        self.teachers = teachers
        self.steps: list[list[int]] = []

    def batch_start(self, state, logger):
        self._before = [t.calls for t in self.teachers]

    def batch_end(self, state, logger):
        self.steps.append([t.calls - b for t, b in zip(self.teachers, self._before)])


def _student(seed=0):
    torch.manual_seed(seed)
    return small_vgg(widths=[8, 16])


def _trainer(model, algorithms, *, batch_size=24, microbatch=None, max_duration='8ba', callbacks=(), loggers=(),
             **kwargs):
    return Trainer(model=model, train_dataloader=build_image_dataloader('digits', batch_size),
                   max_duration=max_duration,
                   optimizers=DecoupledSGDW(model.parameters(), lr=0.05, momentum=0.9), algorithms=list(algorithms),
                   callbacks=list(callbacks), loggers=list(loggers), device_train_microbatch_size=microbatch,
                   progress_bar=False, seed=7, **kwargs)


def _logged(logger: InMemoryLogger, key: str) -> list[float]:
    return [float(v) for _, v in logger.data.get(key, [])]


def test_one_teacher_per_optimizer_step_with_gradient_accumulation_and_none_after_end():
    teachers = [CountingTeacher(i) for i in range(4)]
    counter, per_microbatch, memory = CallsPerStep(teachers), CallsPerMicrobatch(teachers), InMemoryLogger()
    kd = KnowledgeDistillation(teachers, policy='random', end='6ba', seed=3)
    model = _student()
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # no stray warnings from the algorithm
        trainer = _trainer(model, [kd], batch_size=24, microbatch=8, max_duration='10ba',
                           callbacks=[counter, per_microbatch], loggers=[memory])
        trainer.fit()
    assert len(counter.steps) == 10 and len(per_microbatch.steps) == 10
    used = []
    for step, microbatches in enumerate(per_microbatch.steps):
        assert len(microbatches) == 3, (step, microbatches)
        if step < 6:  # each micro-batch served by exactly one call of the step's one teacher
            teacher = microbatches[0].index(1)
            assert all(calls == [int(i == teacher) for i in range(4)] for calls in microbatches), (step, microbatches)
            used.append(teacher)
        else:
            assert microbatches == [[0, 0, 0, 0]] * 3, (step, microbatches)
    assert counter.steps == [[3 * int(i == t) for i in range(4)] for t in used] + [[0, 0, 0, 0]] * 4
    assert _logged(memory, 'kd/teacher') == used
    assert len(set(used)) > 1  # random, not a fixed teacher
    assert _logged(memory, 'kd/active') == [1.0] * 6 + [0.0] * 4
    assert len(_logged(memory, 'kd/loss')) == 6 and all(v > 0 for v in _logged(memory, 'kd/original_loss'))
    forward_times = _logged(memory, 'kd/teacher_forward_time')
    assert len(forward_times) == 6 and all(t > 0 for t in forward_times)
    for teacher in teachers:  # frozen, eval mode, no grad, never in the optimizer
        assert teacher.calls_in_train_mode == 0 and teacher.calls_with_grad == 0
        assert not any(p.requires_grad for p in teacher.parameters())
        assert all(p.grad is None for p in teacher.parameters())
    optimized = {id(p) for group in trainer.state.optimizers[0].param_groups for p in group['params']}
    assert not optimized & {id(p) for t in teachers for p in t.parameters()}
    trainer.close()


def test_round_robin_ensemble_and_random_k_call_the_expected_teachers():
    for policy, extra, expected_calls in (('round_robin', {}, None), ('ensemble', {}, 4), ('random_k', {'k': 2}, 2)):
        teachers = [CountingTeacher(i) for i in range(4)]
        counter = CallsPerStep(teachers)
        kd = KnowledgeDistillation(teachers, policy=policy, end='4ba', seed=0, **extra)
        trainer = _trainer(_student(), [kd], batch_size=16, max_duration='5ba', callbacks=[counter])
        trainer.fit()
        active = counter.steps[:4]
        if policy == 'round_robin':
            assert active == [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
        else:
            assert all(sum(c > 0 for c in calls) == expected_calls for calls in active), active
        assert counter.steps[4] == [0, 0, 0, 0]
        trainer.close()


def test_window_with_start_and_no_teacher_forward_before_it():
    teachers = [CountingTeacher(0), CountingTeacher(1)]
    counter = CallsPerStep(teachers)
    kd = KnowledgeDistillation(teachers, start='0.25dur', end='0.75dur', seed=0)
    trainer = _trainer(_student(), [kd], batch_size=16, max_duration='8ba', callbacks=[counter])
    trainer.fit()
    assert [sum(c) for c in counter.steps] == [0, 0, 1, 1, 1, 1, 0, 0]
    trainer.close()


def test_the_student_loss_is_the_weighted_mix():
    """The loss the student backpropagates equals ce_weight * CE + kd_weight * T²·KL, recomputed independently."""

    class Capture(Callback):
        def after_loss(self, state, logger):
            self.loss, self.batch = state.loss.detach().clone(), state.batch
            self.outputs = state.outputs.detach().clone()

    teacher = CountingTeacher(5)
    capture = Capture()
    kd = KnowledgeDistillation([teacher], kd_weight=0.7, ce_weight=0.3, temperature=2.0, end='1.0dur')
    trainer = _trainer(_student(), [kd], batch_size=16, max_duration='1ba', callbacks=[capture])
    trainer.fit()
    inputs, targets = capture.batch
    with torch.no_grad():
        p_t = torch.softmax(teacher(inputs) / 2.0, -1)
        log_p_s = torch.log_softmax(capture.outputs / 2.0, -1)
    kl = (p_t * (p_t.log() - log_p_s)).sum(-1).mean() * 4.0
    ce = torch.nn.functional.cross_entropy(capture.outputs, targets)
    assert capture.loss.item() == pytest.approx(0.3 * ce.item() + 0.7 * kl.item(), rel=1e-5)
    trainer.close()


def test_ensemble_average_logits_distils_from_the_softmax_of_the_mean_logits():
    class Capture(Callback):
        def after_loss(self, state, logger):
            self.loss, self.batch = state.loss.detach().clone(), state.batch
            self.outputs = state.outputs.detach().clone()

    teachers, capture = [CountingTeacher(5), CountingTeacher(6)], Capture()
    kd = KnowledgeDistillation(teachers, policy='ensemble', ensemble_average='logits', temperature=2.0, end='1.0dur')
    trainer = _trainer(_student(), [kd], batch_size=16, max_duration='1ba', callbacks=[capture])
    trainer.fit()
    inputs, targets = capture.batch
    with torch.no_grad():
        p_t = torch.softmax((teachers[0](inputs) + teachers[1](inputs)) / 2 / 2.0, -1)
        log_p_s = torch.log_softmax(capture.outputs / 2.0, -1)
    kl = (p_t * (p_t.log() - log_p_s)).sum(-1).mean() * 4.0
    ce = torch.nn.functional.cross_entropy(capture.outputs, targets)
    assert capture.loss.item() == pytest.approx(0.1 * ce.item() + 0.9 * kl.item(), rel=1e-5)
    trainer.close()


class TokenModel(ComposerModel):
    """A tiny sequence model (embedding + head) that is not a HuggingFaceModel: it has no `shift_labels`."""

    def __init__(self, seed: int, vocab: int = 11):
        super().__init__()
        torch.manual_seed(seed)
        self.embed, self.head = nn.Embedding(vocab, 8), nn.Linear(8, vocab)

    def forward(self, batch):
        return self.head(self.embed(batch['input_ids']))

    def loss(self, outputs, batch):
        return nn.functional.cross_entropy(outputs.flatten(0, 1), batch['labels'].flatten(), ignore_index=-100)


class TokenTeacher(nn.Module):
    def __init__(self, seed: int, vocab: int = 11):
        super().__init__()
        torch.manual_seed(seed)
        self.embed, self.head = nn.Embedding(vocab, 8), nn.Linear(8, vocab)

    def forward(self, input_ids):
        return self.head(self.embed(input_ids))


def _token_loader():
    generator = torch.Generator().manual_seed(0)
    samples = []
    for _ in range(8):
        ids = torch.randint(0, 11, (6,), generator=generator)
        labels = ids.clone()
        labels[torch.randperm(6, generator=generator)[:2]] = -100  # two unlabelled positions per sequence
        samples.append({'input_ids': ids, 'labels': labels})
    return torch.utils.data.DataLoader(samples, batch_size=4, shuffle=False)


@pytest.mark.parametrize('shift_labels', [None, False, True])
def test_shift_labels_override_selects_the_distilled_positions(shift_labels):
    class Capture(Callback):
        def after_loss(self, state, logger):
            self.loss, self.batch = float(state.loss), state.batch
            self.outputs = state.outputs.detach().clone()

    teacher, student, capture = TokenTeacher(1), TokenModel(2), Capture()
    kd = KnowledgeDistillation([teacher], temperature=2.0, end='1.0dur', shift_labels=shift_labels)
    trainer = Trainer(model=student, train_dataloader=_token_loader(), max_duration='1ba', algorithms=[kd],
                      optimizers=DecoupledSGDW(student.parameters(), lr=0.01), callbacks=[capture], progress_bar=False)
    trainer.fit()
    labels = capture.batch['labels']
    with torch.no_grad():
        p_t = torch.softmax(teacher(capture.batch['input_ids']) / 2.0, -1)
        log_p_s = torch.log_softmax(capture.outputs / 2.0, -1)
    per_position = (p_t * (p_t.log() - log_p_s)).sum(-1) * 4.0
    keep_same = labels != -100  # no attribute and no override: position t is scored where label t exists
    keep_next = torch.zeros_like(keep_same)
    keep_next[:, :-1] = labels[:, 1:] != -100  # causal: position t predicts label t + 1
    expected = {kept: float(per_position[mask].mean()) for kept, mask in (('same', keep_same), ('next', keep_next))}
    assert abs(expected['same'] - expected['next']) > 1e-3  # the case tells the two apart
    ce = float(student.loss(capture.outputs, capture.batch))
    kept = 'next' if shift_labels else 'same'
    assert capture.loss == pytest.approx(0.1 * ce + 0.9 * expected[kept], rel=1e-5)
    trainer.close()


def test_a_failed_auto_microbatching_attempt_does_not_leak_into_the_logged_values():
    """After a CUDA OOM, Composer reruns the step with smaller micro-batches and no new BATCH_START; the logged KD
    values must be those of the rerun alone (the same as a run with the smaller micro-batches from the start)."""

    class OutOfMemoryAtSecondMicrobatch(Callback):  # raises what Composer's auto micro-batching catches
        microbatches = 0

        def after_loss(self, state, logger):
            self.microbatches += 1
            if self.microbatches == 2:
                raise RuntimeError('CUDA out of memory. Tried to allocate 1 GiB (raised by the test)')

    logs = {}
    for oom in (True, False):
        teachers, memory = [CountingTeacher(0), CountingTeacher(1)], InMemoryLogger()
        kd = KnowledgeDistillation(teachers, end='2ba', seed=0)
        trainer = _trainer(_student(), [kd], batch_size=24, microbatch=8 if oom else 4, max_duration='2ba',
                           callbacks=[OutOfMemoryAtSecondMicrobatch()] if oom else [], loggers=[memory])
        if oom:  # 'auto' needs a GPU; the retry path it enables is device-independent
            trainer.state.auto_microbatching = True
        with warnings.catch_warnings():
            warnings.filterwarnings('ignore', message='CUDA out of memory', category=RuntimeWarning)
            trainer.fit()
        if oom:
            assert trainer.state.device_train_microbatch_size == 4  # the step was rerun with halved micro-batches
            assert sum(t.calls for t in teachers) == 2 + 6 + 6  # 2 micro-batches of the failed attempt, then 6 + 6
        logs[oom] = {key: _logged(memory, key) for key in ('kd/loss', 'kd/original_loss', 'kd/teacher')}
        trainer.close()
    assert logs[True]['kd/teacher'] == logs[False]['kd/teacher']
    for key in ('kd/loss', 'kd/original_loss'):
        assert logs[True][key] == pytest.approx(logs[False][key], rel=1e-6), key


def _first_input(teacher, batch):
    return teacher(batch[0])


def test_repr_names_teacher_forward_and_the_options_and_rebuilds(tmp_path):
    scripted = torch.jit.script(small_vgg(widths=[4]).module)
    path = tmp_path / 'teacher.pt'
    torch.jit.save(scripted, str(path))
    kd = KnowledgeDistillation([str(path), str(path)], policy='ensemble', teacher_forward=_first_input,
                               shift_labels=False, ensemble_average='logits', offload_unused=True)
    text = repr(kd)
    for part in ('teacher_forward=_first_input', 'shift_labels=False', "ensemble_average='logits'",
                 'offload_unused=True'):
        assert part in text, text
    rebuilt = eval(text, {'KnowledgeDistillation': KnowledgeDistillation, '_first_input': _first_input})
    assert repr(rebuilt) == text and rebuilt.teacher_forward is _first_input
    assert 'teacher_forward' not in repr(KnowledgeDistillation([str(path)]))  # the default is not shown
    # the repr is built once per change (Composer formats it ~10 times a step): a reassigned argument shows
    kd.temperature = 2.5
    assert 'temperature=2.5' in repr(kd) and repr(kd) != text


def test_kd_changes_the_student_and_the_batch_is_not_modified():
    class BatchIdentity(Callback):
        def after_loss(self, state, logger):
            self.ids = (id(state.batch), id(state.batch[0]), state.batch[0].clone(), state.batch[1].clone())

        def before_backward(self, state, logger):
            assert id(state.batch) == self.ids[0] and id(state.batch[0]) == self.ids[1]
            assert torch.equal(state.batch[0], self.ids[2]) and torch.equal(state.batch[1], self.ids[3])

    plain, distilled = _student(), _student()
    _trainer(plain, [], max_duration='3ba').fit()
    kd = KnowledgeDistillation([CountingTeacher(1)], end='1.0dur')
    _trainer(distilled, [kd], max_duration='3ba', callbacks=[BatchIdentity()]).fit()
    differs = [not torch.equal(a, b) for a, b in zip(plain.state_dict().values(), distilled.state_dict().values())]
    assert any(differs)


def _train_with_teachers(tmp_path, max_duration='8ba', policy='random', **kwargs):
    teachers = [CountingTeacher(10), CountingTeacher(11), CountingTeacher(12)]
    memory = InMemoryLogger()
    kd = KnowledgeDistillation(teachers, policy=policy, end='0.75dur', seed=None)
    return _trainer(_student(), [kd], max_duration=max_duration, loggers=[memory], **kwargs), memory


@pytest.mark.parametrize('policy,microbatch', [('random', None), ('round_robin', None), ('random', 8)])
def test_resume_after_a_kill_samples_the_same_teachers_and_matches_bit_for_bit(tmp_path, policy, microbatch):
    full, full_log = _train_with_teachers(tmp_path, policy=policy, microbatch=microbatch)
    full.fit()
    reference = {k: v.clone() for k, v in full.state.model.state_dict().items()}
    full.close()

    folder = tmp_path / 'ckpt'
    interrupted, _ = _train_with_teachers(tmp_path, policy=policy, microbatch=microbatch, save_folder=str(folder),
                                          save_interval='3ba', callbacks=[KillAt(3)])
    with pytest.raises(Killed):
        interrupted.fit()
    interrupted.close()
    resumed, resumed_log = _train_with_teachers(tmp_path, policy=policy, microbatch=microbatch,
                                                load_path=str(folder / 'ep0-ba3-rank0.pt'))
    resumed.fit()
    assert resumed.state.timestamp.batch.value == 8
    for key, value in resumed.state.model.state_dict().items():
        assert torch.equal(value, reference[key]), key
    teachers_full = _logged(full_log, 'kd/teacher')
    if policy == 'round_robin':  # resumes at the 4th draw, not at teacher 0
        assert teachers_full == [0, 1, 2, 0, 1, 2]
    else:
        assert len(teachers_full) == 6 and len(set(teachers_full)) > 1
    assert _logged(resumed_log, 'kd/teacher') == teachers_full[3:]
    assert _logged(resumed_log, 'kd/loss') == _logged(full_log, 'kd/loss')[3:]
    assert _logged(resumed_log, 'kd/original_loss') == _logged(full_log, 'kd/original_loss')[3:]
    resumed.close()


def test_checkpoint_holds_a_teacher_manifest_and_no_teacher_weights(tmp_path):
    teachers = [CountingTeacher(0), CountingTeacher(1)]
    kd = KnowledgeDistillation(teachers, seed=4)
    model = _student()
    trainer = _trainer(model, [kd], max_duration='2ba', save_folder=str(tmp_path), save_interval='2ba')
    trainer.fit()
    trainer.close()
    checkpoint = torch.load(tmp_path / 'ep0-ba2-rank0.pt', weights_only=False)
    assert set(checkpoint['state']['model']) == set(model.state_dict())
    saved = dict(checkpoint['state']['algorithms'])['KnowledgeDistillation']
    assert [t['num_parameters'] for t in saved['teachers']] == [650, 650]
    assert saved['draws'] == 1 and saved['generator']['bit_generator'] == 'PCG64'
    assert not any(isinstance(v, torch.Tensor) and v.numel() == 640 for v in _walk(saved))

    # resuming with another pool size is refused; with other teacher weights it warns
    with pytest.raises(ValueError, match='trained with 2 teachers.*this run has 1'):
        KnowledgeDistillation([CountingTeacher(0)]).load_state_dict(saved)
    with pytest.warns(UserWarning, match='differ from the checkpoint'):
        KnowledgeDistillation([CountingTeacher(0), CountingTeacher(9)]).load_state_dict(saved)
    # another policy or k would draw other teachers than the interrupted run: refused, naming both values
    with pytest.raises(ValueError, match=r"trained with policy='random', this run has policy='round_robin'. Fix: "
                                         r"resume with policy='random'"):
        KnowledgeDistillation([CountingTeacher(0), CountingTeacher(1)], policy='round_robin').load_state_dict(saved)
    pool = [CountingTeacher(0), CountingTeacher(1), CountingTeacher(2)]
    saved_k = KnowledgeDistillation(pool, policy='random_k', k=1).state_dict()
    with pytest.raises(ValueError, match=r'trained with k=1, this run has k=2. Fix: resume with k=1'):
        KnowledgeDistillation(pool, policy='random_k', k=2).load_state_dict(saved_k)
    KnowledgeDistillation(pool, policy='random_k', k=1).load_state_dict(saved_k)  # the same settings resume


def _walk(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _walk(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _walk(v)
    else:
        yield value


def test_fit_twice_reresolves_the_window():
    teachers = [CountingTeacher(0), CountingTeacher(1)]
    counter = CallsPerStep(teachers)
    kd = KnowledgeDistillation(teachers, end='0.5dur', seed=0)
    trainer = _trainer(_student(), [kd], batch_size=16, max_duration='4ba', callbacks=[counter])
    trainer.fit()
    trainer.fit(duration='4ba')  # max_duration becomes 8ba: the window is now [0, 4)
    assert [sum(c) for c in counter.steps] == [1, 1, 0, 0, 0, 0, 0, 0]
    trainer.close()


def test_window_bounds_in_epochs_and_dur_are_compared_in_batches():
    teachers = [CountingTeacher(0), CountingTeacher(1)]
    counter = CallsPerStep(teachers)
    kd = KnowledgeDistillation(teachers, start='1ep', end='0.75dur', seed=0)  # 2 batches per epoch, 8 in all
    trainer = _trainer(_student(), [kd], batch_size=16, max_duration='4ep', train_subset_num_batches=2,
                       callbacks=[counter])
    trainer.fit()
    assert [sum(c) for c in counter.steps] == [0, 0, 1, 1, 1, 1, 0, 0]
    trainer.close()

    empty = KnowledgeDistillation([CountingTeacher(0)], start='2ep', end='0.5dur')  # both are batch 4
    trainer = _trainer(_student(), [empty], batch_size=16, max_duration='4ep', train_subset_num_batches=2)
    with pytest.raises(ValueError, match=r'end=0.5dur is not after start=2ep: for max_duration=4ep, 2 batches per '
                                         r'epoch they resolve to end=4ba, start=4ba, an empty window. Fix: choose '
                                         r'end > start'):
        trainer.fit()
    trainer.close()


# --- teachers from checkpoints, unloading --------------------------------------------------------------------


def test_teachers_from_paths_are_released_after_the_window_and_repr_rebuilds(tmp_path):
    scripted = torch.jit.script(small_vgg(widths=[4]).module)
    path = tmp_path / 'teacher.pt'
    torch.jit.save(scripted, str(path))
    kd = KnowledgeDistillation([str(path), str(path)], end='2ba', seed=1)
    rebuilt = eval(repr(kd), {'KnowledgeDistillation': KnowledgeDistillation})
    assert repr(rebuilt) == repr(kd) and rebuilt.num_teachers == 2
    assert all(t is not None for t in kd.teachers)
    trainer = _trainer(_student(), [kd], max_duration='4ba')
    trainer.fit()
    assert kd.teachers == [None, None]  # dropped: they can be reloaded from disk if a window comes again
    trainer.close()


class PlacedTeacher(CountingTeacher):
    """A CountingTeacher that records every ``.to(device)`` it receives as (calls so far, device type)."""

    def __init__(self, seed: int):
        super().__init__(seed)
        self.moves: list[tuple[int, str]] = []

    def to(self, *args, **kwargs):
        device = args[0] if args else kwargs['device']
        self.moves.append((self.calls, torch.device(device).type))
        return super().to(*args, **kwargs)


class ResidentPerStep(Callback):
    def __init__(self, kd):
        self.kd, self.steps = kd, []

    def after_loss(self, state, logger):
        self.steps.append(self.kd.resident_teachers)


@pytest.mark.parametrize('unload', [True, False])
def test_module_teachers_after_the_window_are_moved_off_the_device_only_when_unloading(unload):
    teachers = [PlacedTeacher(i) for i in range(3)]
    counter = CallsPerStep(teachers)
    kd = KnowledgeDistillation(teachers, policy='round_robin', end='3ba', unload_after_window=unload)
    trainer = _trainer(_student(), [kd], batch_size=16, max_duration='5ba', callbacks=[counter])
    trainer.fit()
    assert [sum(c) for c in counter.steps] == [1, 1, 1, 0, 0]  # no forward after the window
    assert all(module is teacher for module, teacher in zip(kd.teachers, teachers))  # modules are kept, not dropped
    device = next(trainer.state.model.parameters()).device.type
    for teacher in teachers:  # placed on the training device once, before its first (and only) forward
        assert teacher.moves[0] == (0, device) and teacher.calls == 1
    if unload:  # then moved to the CPU at the end of the window, after its last forward
        assert kd.resident_teachers == []
        assert [t.moves[1:] for t in teachers] == [[(1, 'cpu')]] * 3
    else:  # left where they were
        assert kd.resident_teachers == [0, 1, 2]
        assert [t.moves[1:] for t in teachers] == [[]] * 3
    trainer.close()


def test_offload_unused_keeps_only_the_steps_teachers_on_the_device():
    results = {}
    for offload in (False, True):
        teachers = [PlacedTeacher(i) for i in range(3)]
        kd = KnowledgeDistillation(teachers, policy='round_robin', end='4ba', offload_unused=offload,
                                   unload_after_window=False)
        resident = ResidentPerStep(kd)
        trainer = _trainer(_student(), [kd], batch_size=16, max_duration='4ba', callbacks=[resident])
        trainer.fit()
        device = next(trainer.state.model.parameters()).device.type
        trainer.close()
        results[offload] = (resident.steps, [t.moves for t in teachers])
    assert results[False][0] == [[0], [0, 1], [0, 1, 2], [0, 1, 2]]  # O(pool) device memory in the window
    assert results[True][0] == [[0], [1], [2], [0]]  # only the step's teacher
    assert results[True][1][0] == [(0, device), (1, 'cpu'), (1, device)]  # on, off at step 1, on again at step 3
    assert results[False][1][0] == [(0, device)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
@pytest.mark.parametrize('unload', [True, False])
def test_cuda_teachers_are_moved_to_the_cpu_after_the_window_when_unloading(unload):
    class DeviceSeen(Callback):  # where the step's teacher was when it ran
        def __init__(self):
            self.devices = []

        def after_loss(self, state, logger):
            for index in kd.current_teachers:
                self.devices.append(next(teachers[index].parameters()).device.type)

    teachers = [CountingTeacher(0), CountingTeacher(1)]  # built on the CPU
    seen = DeviceSeen()
    kd = KnowledgeDistillation(teachers, policy='round_robin', end='2ba', unload_after_window=unload)
    model = _student()
    trainer = Trainer(model=model, train_dataloader=build_image_dataloader('digits', 16), max_duration='3ba',
                      optimizers=DecoupledSGDW(model.parameters(), lr=0.05), algorithms=[kd], callbacks=[seen],
                      device='gpu', progress_bar=False, seed=7)
    trainer.fit()
    assert [t.calls for t in teachers] == [1, 1] and seen.devices == ['cuda', 'cuda']
    expected = 'cpu' if unload else 'cuda'
    assert all(p.device.type == expected for t in teachers for p in t.parameters())
    trainer.close()


def test_load_teacher_reads_composer_checkpoints_with_weights_only(tmp_path):
    teacher_model = small_vgg(widths=[4])
    trainer = _trainer(teacher_model, [], max_duration='1ba', save_folder=str(tmp_path), save_interval='1ba')
    trainer.fit()
    trainer.close()
    loaded = load_teacher(tmp_path / 'ep0-ba1-rank0.pt', model=small_vgg(widths=[4]))
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, teacher_model.state_dict()[key]), key
    bare = load_teacher(tmp_path / 'ep0-ba1-rank0.pt', model=small_vgg(widths=[4]).module)  # keys without `module.`
    assert torch.equal(bare.classifier.weight, teacher_model.module.classifier.weight)

    torch.save(teacher_model.state_dict(), tmp_path / 'weights.pt')
    with pytest.raises(ValueError, match="holds weights but no architecture.*'model'"):
        load_teacher(tmp_path / 'weights.pt')
    with pytest.raises(ValueError, match='do not fit the teacher architecture'):
        load_teacher(tmp_path / 'weights.pt', model=small_vgg(widths=[8]))
    torch.save(teacher_model, tmp_path / 'pickled.pt')
    with pytest.raises(ValueError, match='cannot be loaded with weights_only=True'):
        load_teacher(tmp_path / 'pickled.pt')
    assert isinstance(load_teacher(tmp_path / 'pickled.pt', weights_only=False), nn.Module)
    with pytest.raises(ValueError, match='does not exist'):
        load_teacher(tmp_path / 'missing.pt')


# --- errors ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('kwargs,match', [
    ({'teachers': []}, r'teachers=\[\] is an empty pool'),
    ({'policy': 'best'}, r"policy='best' is not a teacher policy.*'random', 'round_robin', 'ensemble', 'random_k'"),
    ({'start': '0.5dur', 'end': '0.5dur'}, r'end=0.5dur is not after start=0.5dur. Fix: choose end > start'),
    ({'start': '100ba', 'end': '10ba'}, r'end=10ba is not after start=100ba'),
    ({'kd_weight': -0.1}, r'kd_weight=-0.1 must be a finite number >= 0'),
    ({'ce_weight': -1}, r'ce_weight=-1 must be a finite number >= 0'),
    ({'kd_weight': 0, 'ce_weight': 0}, r'kd_weight=0 and ce_weight=0 leave nothing to train on'),
    ({'temperature': 0}, r'temperature=0 must be a positive number'),
    ({'loss': 'ce'}, r"loss='ce' is not a distillation loss"),
    ({'policy': 'random_k'}, r"k=None is out of range for policy='random_k' with 2 teachers"),
    ({'policy': 'random_k', 'k': 3}, r'k=3 is out of range.*1 <= k <= 2'),
    ({'k': 1}, r"k=1 only applies to policy='random_k'"),
    ({'end': '0.5epochs'}, r"end='0.5epochs' is not a Composer time"),
    ({'teacher_weights': [1.0, -1.0]}, r'teacher_weights=\[1.0, -1.0\] must be finite, >= 0'),
    ({'policy': 'round_robin', 'teacher_weights': [1, 1]}, r"teacher_weights has no effect with policy='round_robin'"),
    ({'seed': -1}, r'seed=-1 must be None or an int >= 0'),
    ({'teachers': [3]}, r'teachers\[0\] is a int'),
    ({'unload_after_window': 'false'}, r"unload_after_window='false' is a str, not a bool. Fix: pass "
                                       r'unload_after_window=True or unload_after_window=False'),
    ({'weights_only': 0}, r'weights_only=0 is a int, not a bool'),
    ({'offload_unused': 'yes'}, r"offload_unused='yes' is a str, not a bool"),
    ({'shift_labels': 'true'}, r"shift_labels='true' is a str, not None or a bool"),
    ({'policy': 'ensemble', 'ensemble_average': 'mean'}, r"ensemble_average='mean' is not an ensemble average"),
    ({'ensemble_average': 'logits'}, r"ensemble_average='logits' has no effect with policy='random'"),
])
def test_invalid_arguments_name_the_argument_and_the_fix(kwargs, match):
    arguments = {'teachers': [CountingTeacher(0), CountingTeacher(1)], **kwargs}
    with pytest.raises((ValueError, TypeError), match=match) as info:
        KnowledgeDistillation(**arguments)
    assert 'Fix:' in str(info.value)


def test_teacher_with_another_output_width_is_refused():
    with pytest.raises(ValueError, match=r'has output width 7 but the student has 10'):
        _trainer(_student(), [KnowledgeDistillation([small_vgg(num_classes=7, widths=[4])])])

    trainer = _trainer(_student(), [KnowledgeDistillation([Opaque()])], max_duration='1ba')
    with pytest.raises(ValueError, match=r'teachers\[0\] \(Opaque\) has output width 7 but the student has 10'):
        trainer.fit()
    trainer.close()


def test_a_teacher_of_unreadable_width_is_checked_at_step_0_even_when_not_drawn():
    """round_robin would draw teachers[1] only at step 1: its wrong width must fail at step 0, naming its index."""
    teachers = [CountingTeacher(0), Opaque(num_classes=7)]
    trainer = _trainer(_student(), [KnowledgeDistillation(teachers, policy='round_robin')], max_duration='4ba')
    with pytest.raises(ValueError, match=r'teachers\[1\] \(Opaque\) has output width 7 but the student has 10 '
                                         r'\(classes or vocabulary\).*Fix:'):
        trainer.fit()
    assert trainer.state.timestamp.batch.value == 0 and teachers[0].calls == 1 and teachers[1].calls == 1
    trainer.close()

    # a fitting one is run once for the check and then only when drawn
    teachers = [CountingTeacher(0), Opaque(num_classes=10)]
    counter = CallsPerStep(teachers)
    trainer = _trainer(_student(), [KnowledgeDistillation(teachers, policy='round_robin', end='4ba')],
                       max_duration='5ba', callbacks=[counter])
    trainer.fit()
    assert counter.steps == [[1, 1], [0, 1], [1, 0], [0, 1], [0, 0]]
    trainer.close()


def test_teacher_in_the_optimizer_is_refused_when_the_trainer_is_built():
    student, teachers = _student(), [CountingTeacher(0), CountingTeacher(1)]
    optimizer = DecoupledSGDW(list(student.parameters()) + list(teachers[1].parameters()), lr=0.1)
    with pytest.raises(ValueError, match=r'a parameter of teachers\[1\] \(CountingTeacher\) is in the optimizer '
                                         r'DecoupledSGDW. Fix: build the optimizer from the student only'):
        Trainer(model=student, train_dataloader=build_image_dataloader('digits', 16), max_duration='1ba',
                optimizers=optimizer, algorithms=[KnowledgeDistillation(teachers)], progress_bar=False)
    assert all(p.requires_grad for t in teachers for p in t.parameters())  # refused before anything was frozen


def test_teacher_sharing_parameters_with_the_student_is_refused():
    student = _student()
    with pytest.raises(ValueError, match=r'shares parameters with the student.*copy.deepcopy'):
        _trainer(student, [KnowledgeDistillation([student])])
    assert all(p.requires_grad for p in student.parameters())  # refused before anything was frozen
    _trainer(student, [KnowledgeDistillation([copy.deepcopy(student)])], max_duration='1ba').fit()


# --- two ranks --------------------------------------------------------------------------------------------------


def _teachers_per_step_on_rank():
    """Per step and teacher, the calls on this rank: once with seed=None, once with a rank-dependent seed."""
    from composer.utils import dist
    runs = []
    for seed in (None, 100 + dist.get_global_rank()):  # a rank-dependent seed: rank 0's sampler must win
        teachers = [CountingTeacher(i) for i in range(4)]
        counter = CallsPerStep(teachers)
        kd = KnowledgeDistillation(teachers, end='5ba', seed=seed)
        trainer = _trainer(_student(), [kd], batch_size=24, microbatch=4, max_duration='6ba', callbacks=[counter])
        trainer.fit()
        trainer.close()
        runs.append(counter.steps)
    return runs


@pytest.mark.distributed
def test_two_ranks_use_the_same_teacher_every_step():
    rank0, rank1 = run_distributed(_teachers_per_step_on_rank, world_size=2, timeout=600)
    assert rank0 == rank1
    for steps in rank0:
        for calls in steps[:5]:  # 12 samples per rank, micro-batches of 4: 3 calls of one teacher
            assert sorted(calls) == [0, 0, 0, 3]
        assert steps[5] == [0, 0, 0, 0]
        assert len({calls.index(3) for calls in steps[:5]}) > 1


# --- HuggingFace causal LM ---------------------------------------------------------------------------------------


def _gpt(seed, **kwargs):
    from composer_ext.models import small_gpt
    torch.manual_seed(seed)
    return small_gpt(n_layer=1, n_embd=32, n_head=2, n_positions=64, **kwargs)


def test_causal_lm_distillation_uses_labelled_tokens_only_and_no_teacher_labels(corpus):
    from composer_ext.data.text import build_text_dataloader

    class Capture(Callback):
        def after_loss(self, state, logger):
            self.loss = float(state.loss)
            self.batch = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.batch.items()}
            self.logits, self.student_loss = state.outputs.logits.detach().clone(), float(state.outputs.loss)

    teacher, student = _gpt(1), _gpt(2)
    seen_keys = []
    teacher.model.register_forward_pre_hook(lambda module, args, kwargs: seen_keys.append(sorted(kwargs)),
                                            with_kwargs=True)
    capture = Capture()
    kd = KnowledgeDistillation([teacher], temperature=2.0, end='1.0dur')
    trainer = Trainer(model=student, train_dataloader=build_text_dataloader(4, domains='prose', seq_len=64),
                      max_duration='1ba', optimizers=DecoupledSGDW(student.parameters(), lr=0.01), algorithms=[kd],
                      callbacks=[capture], progress_bar=False, seed=1)
    trainer.fit()
    assert seen_keys == [['attention_mask', 'input_ids']]  # no labels: the teacher computes no loss
    batch = capture.batch
    with torch.no_grad():
        teacher_logits = teacher.model(input_ids=batch['input_ids'], attention_mask=batch['attention_mask']).logits
    keep = batch['labels'][:, 1:] != -100  # causal: position t predicts token t + 1
    assert (~keep).any()  # the batch has padding, so masking matters
    p_t = torch.softmax(teacher_logits[:, :-1] / 2.0, -1)[keep]
    log_p_s = torch.log_softmax(capture.logits[:, :-1] / 2.0, -1)[keep]
    expected_kd = float((p_t * (p_t.log() - log_p_s)).sum(-1).mean() * 4.0)
    assert capture.loss == pytest.approx(0.1 * capture.student_loss + 0.9 * expected_kd, rel=1e-4)
    trainer.close()


def test_causal_lm_teacher_with_another_vocabulary_is_refused(corpus):
    from composer_ext.data.text import build_text_dataloader
    student, teacher = _gpt(2), _gpt(1).model  # a plain transformers model as the teacher
    teacher.resize_token_embeddings(4000)
    with pytest.raises(ValueError, match=r'has output width 4000 but the student has 4096'):
        Trainer(model=student, train_dataloader=build_text_dataloader(4, domains='prose', seq_len=64),
                max_duration='1ba', optimizers=DecoupledSGDW(student.parameters(), lr=0.01),
                algorithms=[KnowledgeDistillation([teacher])])
