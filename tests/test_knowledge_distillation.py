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
from composer.optim import DecoupledSGDW
from torch import nn

from composer_ext.algorithms.knowledge_distillation import (KnowledgeDistillation, distillation_mask, extract_logits,
                                                            kd_loss, load_teacher, output_width, select_teachers)
from composer_ext.data import build_image_dataloader
from composer_ext.models import small_resnet, small_vgg
from composer_ext.testing import KillAt, Killed, run_distributed

@pytest.fixture(autouse=True)
def _one_torch_thread():
    """These models are tiny: one intra-op thread is as fast and does not oversubscribe a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

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


def test_kd_loss_of_identical_logits_is_zero_and_half_precision_is_computed_in_float32():
    logits = torch.randn(4, 7, 11).to(torch.bfloat16)
    assert kd_loss(logits, logits.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_loss(logits, logits.clone()).dtype == torch.float32
    empty = torch.zeros(1, 3, dtype=torch.bool)
    assert kd_loss(torch.randn(1, 3, 5), torch.randn(1, 3, 5), mask=empty).item() == 0.0


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
    counter, memory = CallsPerStep(teachers), InMemoryLogger()
    kd = KnowledgeDistillation(teachers, policy='random', end='6ba', seed=3)
    model = _student()
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # no stray warnings from the algorithm
        trainer = _trainer(model, [kd], batch_size=24, microbatch=8, max_duration='10ba', callbacks=[counter],
                           loggers=[memory])
        trainer.fit()
    for step, calls in enumerate(counter.steps):
        if step < 6:  # 3 micro-batches, all served by the one teacher of the step
            assert sorted(calls) == [0, 0, 0, 3], (step, calls)
        else:
            assert calls == [0, 0, 0, 0], (step, calls)
    used = [calls.index(3) for calls in counter.steps[:6]]
    assert _logged(memory, 'kd/teacher') == used
    assert len(set(used)) > 1  # random, not a fixed teacher
    assert _logged(memory, 'kd/active') == [1.0] * 6 + [0.0] * 4
    assert len(_logged(memory, 'kd/loss')) == 6 and all(v > 0 for v in _logged(memory, 'kd/original_loss'))
    assert all(t >= 0 for t in _logged(memory, 'kd/teacher_forward_time'))
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


def _train_with_teachers(tmp_path, max_duration='8ba', **kwargs):
    teachers = [CountingTeacher(10), CountingTeacher(11), CountingTeacher(12)]
    memory = InMemoryLogger()
    kd = KnowledgeDistillation(teachers, end='0.75dur', seed=None)
    return _trainer(_student(), [kd], max_duration=max_duration, loggers=[memory], **kwargs), memory


def test_resume_after_a_kill_samples_the_same_teachers_and_matches_bit_for_bit(tmp_path):
    full, full_log = _train_with_teachers(tmp_path)
    full.fit()
    reference = {k: v.clone() for k, v in full.state.model.state_dict().items()}
    full.close()

    folder = tmp_path / 'ckpt'
    interrupted, _ = _train_with_teachers(tmp_path, save_folder=str(folder), save_interval='3ba',
                                          callbacks=[KillAt(3)])
    with pytest.raises(Killed):
        interrupted.fit()
    interrupted.close()
    resumed, resumed_log = _train_with_teachers(tmp_path, load_path=str(folder / 'ep0-ba3-rank0.pt'))
    resumed.fit()
    assert resumed.state.timestamp.batch.value == 8
    for key, value in resumed.state.model.state_dict().items():
        assert torch.equal(value, reference[key]), key
    teachers_full = _logged(full_log, 'kd/teacher')
    assert len(teachers_full) == 6 and len(set(teachers_full)) > 1
    assert _logged(resumed_log, 'kd/teacher') == teachers_full[3:]
    assert _logged(resumed_log, 'kd/loss') == _logged(full_log, 'kd/loss')[3:]
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
])
def test_invalid_arguments_name_the_argument_and_the_fix(kwargs, match):
    arguments = {'teachers': [CountingTeacher(0), CountingTeacher(1)], **kwargs}
    with pytest.raises((ValueError, TypeError), match=match) as info:
        KnowledgeDistillation(**arguments)
    assert 'Fix:' in str(info.value)


def test_teacher_with_another_output_width_is_refused():
    with pytest.raises(ValueError, match=r'has output width 7 but the student has 10'):
        _trainer(_student(), [KnowledgeDistillation([small_vgg(num_classes=7, widths=[4])])])

    class Opaque(nn.Module):  # width not visible statically: caught at the first forward
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(64, 7)

        def forward(self, x):
            return self.layer(x.flatten(1))

    trainer = _trainer(_student(), [KnowledgeDistillation([Opaque()])], max_duration='1ba')
    with pytest.raises(ValueError, match=r'teacher output width 7 .* differs from the student output width 10'):
        trainer.fit()
    trainer.close()


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
