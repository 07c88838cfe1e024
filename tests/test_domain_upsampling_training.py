"""Domain upsampling in a Trainer: exact resume (with and without the algorithm, with and without DataLoader
workers), logging (one rank and two), the LR check, the repetition guard, fit() twice, the YAMLs and the
drop-one-domain ablation."""

import csv
import math
import textwrap
import warnings
from collections import Counter

import numpy as np
import pytest
import torch
from composer import Trainer
from composer.core import Callback
from composer.loggers import InMemoryLogger
from composer.optim import (ConstantScheduler, CosineAnnealingWithWarmupScheduler, DecoupledAdamW,
                            MultiStepWithWarmupScheduler)
from composer.utils import reproducibility

from composer_ext.domain_upsampling.ablation import drop_domain, run_ablation
from composer_ext.cli import main
from composer_ext.domain_upsampling.algorithm import (DomainUpsampling, build_domain_upsampling, domain_counts,
                                                        lr_cooldown_start)
from composer_ext.config import ConfigError, load_config
from composer_ext.domain_upsampling.mixture import MixtureDataLoader, MixtureDataset, build_mixture_dataloader
from composer_ext.domain_upsampling.schedule import MixtureSchedule
from composer_ext.models import small_gpt
from composer_ext.runner import run
from composer_ext.testing import KillAt, Killed, run_distributed
from tests.conftest import ROOT

BASE = {'code': 0.2, 'dialogue': 0.15, 'legal': 0.15, 'math': 0.2, 'prose': 0.2, 'technical': 0.1}
TARGET = {'code': 0.1, 'dialogue': 0.1, 'legal': 0.1, 'math': 0.5, 'prose': 0.1, 'technical': 0.1}
SCHEDULE = MixtureSchedule(BASE, TARGET, start='0.5dur')


class Record(Callback):
    """The uids of every trained batch, and its real (attention_mask) tokens per domain, by batch number."""

    def __init__(self):
        self.uids: dict[int, list[str]] = {}
        self.tokens: dict[int, Counter] = {}

    def after_dataloader(self, state, logger):
        batch = int(state.timestamp.batch) + 1
        self.uids[batch] = list(state.batch['uid'])
        lengths = state.batch['attention_mask'].sum(dim=1).tolist()
        self.tokens[batch] = Counter()
        for domain, length in zip(state.batch['domain'], lengths):
            self.tokens[batch][domain] += int(length)


def _trainer(algorithm=None, num_samples=32, max_duration='8ba', scheduler=None, callbacks=(), loggers=(),
             num_workers=0, **kwargs):
    reproducibility.seed_all(11)
    model = small_gpt(n_layer=1, n_embd=32, n_head=2, n_positions=32)
    spec = build_mixture_dataloader(batch_size=8, domains='all', weights=BASE, num_samples=num_samples, seq_len=32,
                                    seed=3, num_workers=num_workers)
    return Trainer(model=model, train_dataloader=spec, max_duration=max_duration, seed=11,
                   optimizers=DecoupledAdamW(model.parameters(), lr=1e-3),
                   schedulers=scheduler or ConstantScheduler(), algorithms=[algorithm] if algorithm else [],
                   callbacks=list(callbacks), loggers=list(loggers), progress_bar=False, device='gpu' if
                   torch.cuda.is_available() else 'cpu', **kwargs)


def _mixture_history(logger: InMemoryLogger) -> dict:
    return {key: [(int(t.batch), value) for t, value in entries]
            for key, entries in logger.data.items() if key.startswith('mixture/')}


def _weights(trainer):
    return {k: v.detach().cpu().clone() for k, v in trainer.state.model.state_dict().items()}


def _fit(algorithm, kill=None, folder=None, load_path=None, **kwargs):
    """Train (killed after batch ``kill`` with a checkpoint there, if given); return uids, history, weights."""
    return _fit_recorded(algorithm, kill, folder, load_path, **kwargs)[:3]


def _fit_recorded(algorithm, kill=None, folder=None, load_path=None, **kwargs):
    """:func:`_fit`, and the Record callback (uids and tokens) last."""
    record, memory = Record(), InMemoryLogger()
    callbacks = [record] + ([KillAt(kill)] if kill else [])
    saving = {'save_folder': str(folder), 'save_interval': f'{kill}ba'} if kill else {}
    trainer = _trainer(algorithm, callbacks=callbacks, loggers=[memory], load_path=load_path, **saving, **kwargs)
    if kill:
        with pytest.raises(Killed):
            trainer.fit()
    else:
        trainer.fit()
    result = record.uids, _mixture_history(memory), _weights(trainer), record
    trainer.close()
    return result


def _upsampling():
    return DomainUpsampling(SCHEDULE, log_interval=2, lr_cooldown='ignore')


@pytest.fixture(scope='module')
def uninterrupted():
    return _fit_recorded(_upsampling())


# 8 batches of 8, 4 batches an epoch, the switch at batch 4. Killed at 3: before the switch, mid-epoch; at 4: the
# epoch boundary, before the switch; at 6: after it, mid-epoch. (Composer saves the batch-4 checkpoint before it
# closes epoch 0, so the resumed run first finishes that empty epoch, and Composer and torchmetrics warn that it
# trained no batch; any dataloader does the same. Only that case filters those warnings.)
@pytest.mark.parametrize('kill', [3, pytest.param(4, marks=[
    pytest.mark.filterwarnings('ignore:No batches were trained:UserWarning'),
    pytest.mark.filterwarnings('ignore:The ``compute`` method of metric:UserWarning')]), 6])
def test_kill_and_resume_matches_the_uninterrupted_run(tmp_path, uninterrupted, kill):
    full_uids, full_history, full_weights, _ = uninterrupted
    assert len(full_uids) == 8 and len({u for b in full_uids.values() for u in b}) == 64
    math_share = [sum(u.startswith('math/') for u in full_uids[b]) / 8 for b in range(1, 9)]
    assert np.mean(math_share[:4]) < 0.3 and np.mean(math_share[4:]) > 0.4  # the switch happens at batch 4
    _fit(_upsampling(), kill=kill, folder=tmp_path)
    checkpoint = next(tmp_path.glob(f'ep*-ba{kill}-rank0.pt'))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        uids, history, weights = _fit(_upsampling(), load_path=str(checkpoint))
    if kill != 4:  # a resume mid-epoch warns about nothing (the filters above are for the empty epoch only)
        assert [str(w.message) for w in caught if issubclass(w.category, UserWarning)] == []
    assert uids == {b: full_uids[b] for b in range(kill + 1, 9)}
    for key, value in weights.items():
        assert torch.equal(value, full_weights[key]), key
    assert history == {k: [(b, v) for b, v in entries if b > kill] for k, entries in full_history.items()}


def test_dataset_resumes_through_composer_without_the_algorithm(tmp_path):
    # One epoch is the whole run, so the dataset alone places '0.5dur' at batch 4.
    full_uids, _, full_weights = _fit(None, num_samples=64)
    _fit(None, kill=6, folder=tmp_path, num_samples=64)
    uids, _, weights = _fit(None, load_path=str(tmp_path / 'ep0-ba6-rank0.pt'), num_samples=64)
    assert uids == {b: full_uids[b] for b in range(7, 9)}
    assert all(torch.equal(v, full_weights[k]) for k, v in weights.items())


def test_epochs_without_the_algorithm_with_dataloader_workers(tmp_path):
    # 2 epochs of 4 batches and no DomainUpsampling: nothing but the loader tells the workers the epoch.
    full_uids, _, full_weights = _fit(None)
    assert len({u for b in full_uids.values() for u in b}) == 64  # epoch 1 is not epoch 0 again
    uids, _, weights = _fit(None, num_workers=2)
    assert uids == full_uids and all(torch.equal(v, full_weights[k]) for k, v in weights.items())
    _fit(None, kill=6, folder=tmp_path, num_workers=2)
    state = torch.load(tmp_path / 'ep1-ba6-rank0.pt', weights_only=False)['state']['dataset_state']['train']
    assert (state['epoch'], state['sample_in_epoch'], state['position']) == (1, 16, 48)
    uids, _, weights = _fit(None, load_path=str(tmp_path / 'ep1-ba6-rank0.pt'), num_workers=2)
    assert uids == {b: full_uids[b] for b in range(7, 9)}
    assert all(torch.equal(v, full_weights[k]) for k, v in weights.items())


@pytest.mark.parametrize('num_workers', [0, 2])
def test_fit_twice_without_the_algorithm_continues_the_epoch(num_workers):
    full_uids, _, _ = _fit(None, num_samples=64)  # one epoch of 8 batches
    record = Record()
    trainer = _trainer(None, callbacks=[record], max_duration='3ba', num_samples=64, num_workers=num_workers)
    assert isinstance(trainer.state.train_dataloader, MixtureDataLoader)
    trainer.fit()
    trainer.fit(duration='3ba')  # Composer skips the 3 batches it trained: the dataset must serve epoch 0 again
    trainer.close()
    assert record.uids == {b: full_uids[b] for b in range(1, 7)}


def _window_fractions(uids: dict, tokens: dict, domain: str, windows) -> tuple[list, list]:
    """Achieved sample and token fractions of ``domain`` over each window (a tuple of batch numbers)."""
    samples = [sum(u.startswith(f'{domain}/') for b in w for u in uids[b]) / sum(len(uids[b]) for b in w)
               for w in windows]
    token_fractions = [sum(tokens[b][domain] for b in w) / sum(sum(tokens[b].values()) for b in w) for w in windows]
    return samples, token_fractions


def test_logs_target_and_achieved_fractions(uninterrupted):
    uids, history, _, record = uninterrupted
    assert [b for b, _ in history['mixture/fraction/math']] == [2, 4, 6, 8]
    assert [v for _, v in history['mixture/target/math']] == pytest.approx([0.2, 0.2, 0.5, 0.5])  # switch at 4
    assert [v for _, v in history['mixture/alpha']] == [0.0, 0.0, 1.0, 1.0]
    windows = [(1, 2), (3, 4), (5, 6), (7, 8)]
    for domain in BASE:  # achieved = what the window's batches held, in samples and in real tokens
        samples, tokens = _window_fractions(uids, record.tokens, domain, windows)
        assert [v for _, v in history[f'mixture/fraction/{domain}']] == samples
        assert [v for _, v in history[f'mixture/token_fraction/{domain}']] == tokens
    assert len({tuple(v for _, v in history[f'mixture/token_fraction/{d}']) for d in BASE}) == 6  # not uniform
    assert sum(history[f'mixture/fraction/{d}'][0][1] for d in BASE) == pytest.approx(1.0)
    math_draws = sum(u.startswith('math/') for b in uids.values() for u in b)
    assert history['mixture/passes/math'][-1][1] == pytest.approx(math_draws / 12285)


def test_domain_counts_functional_core():
    batch = {'domain': ['math', 'code', 'math', 'poetry'],
             'attention_mask': torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 1]])}
    assert domain_counts(batch, ('code', 'math')).tolist() == [[1, 2], [1, 5]]
    assert domain_counts({'input_ids': torch.zeros(2, 3)}, ('code',)) is None


def test_resolves_tok_start_and_rejects_it_without_a_token_count():
    schedule = MixtureSchedule(BASE, TARGET, start='1024tok')
    algorithm = DomainUpsampling(schedule, tokens_per_sample=32, lr_cooldown='ignore')
    trainer = _trainer(algorithm, callbacks=[KillAt(1)])
    with pytest.raises(Killed):
        trainer.fit()
    assert algorithm.start_sample == 32  # 1024 tokens / 32 per sample
    trainer.close()
    failing = _trainer(DomainUpsampling(schedule, lr_cooldown='ignore'))
    with pytest.raises(ValueError, match=r"start='1024tok' is in tokens .* Fix: pass tokens_per_sample="):
        failing.fit()
    failing.close()
    in_tokens = _trainer(DomainUpsampling(SCHEDULE, lr_cooldown='ignore'), max_duration='5000tok')
    with pytest.raises(ValueError, match=r"max_duration='5000tok' is in tokens.*tokens_per_sample is None"):
        in_tokens.fit()
    in_tokens.close()


def test_start_after_the_end_of_training_is_rejected_at_fit_start():
    trainer = _trainer(DomainUpsampling(MixtureSchedule(BASE, TARGET, start='20ba'), lr_cooldown='ignore'))
    with pytest.raises(ValueError, match=r"start='20ba' is after the end of training \(max_duration='8ba'\)"):
        trainer.fit()
    trainer.close()


def _two_rank_run(folder=None) -> dict:
    """One rank of a 2-rank run with DomainUpsampling: what it trained on and what it logged; with ``folder``,
    also the history of the same run killed after batch 3 (mid logging window) and resumed."""
    from composer.utils import dist

    record, memory = Record(), InMemoryLogger()
    trainer = _trainer(_upsampling(), callbacks=[record], loggers=[memory], max_duration='4ba')
    trainer.fit()
    trainer.close()
    result = {'rank': dist.get_global_rank(), 'uids': record.uids, 'tokens': record.tokens,
              'history': _mixture_history(memory)}
    if folder is None:
        return result
    killed = _trainer(_upsampling(), callbacks=[KillAt(3)], max_duration='4ba', save_folder=folder,
                      save_interval='3ba')
    try:
        killed.fit()
    except Killed:
        pass
    killed.close()
    resumed_memory = InMemoryLogger()
    resumed = _trainer(_upsampling(), loggers=[resumed_memory], max_duration='4ba',
                       load_path=f'{folder}/ep0-ba3-rank0.pt')
    resumed.fit()
    resumed.close()
    return {**result, 'resumed_history': _mixture_history(resumed_memory)}


@pytest.mark.slow  # three fits on each of two spawned ranks: about two minutes on 2 cores
@pytest.mark.distributed
def test_two_ranks_resume_the_logging_window_exactly(tmp_path):
    # The checkpoint at batch 3 holds the window of batch 3 summed over both ranks (state_dict reduces), so the
    # resumed run logs what the uninterrupted one did.
    ranks = run_distributed(_two_rank_run, world_size=2, args=(str(tmp_path),), timeout=900)
    assert ranks[0]['history'] == ranks[1]['history']
    for rank in ranks:
        assert rank['resumed_history'] == {k: [(b, v) for b, v in entries if b > 3]
                                           for k, entries in ranks[0]['history'].items()}


@pytest.mark.distributed
def test_two_ranks_log_the_fractions_of_both_ranks_batches():
    ranks = run_distributed(_two_rank_run, world_size=2, timeout=600)
    zero, one = ranks
    assert (zero['rank'], one['rank']) == (0, 1) and zero['history'] == one['history']
    assert all(len(zero['uids'][b]) == len(one['uids'][b]) == 4 for b in range(1, 5))  # a global batch of 8
    assert not {u for b in zero['uids'].values() for u in b} & {u for b in one['uids'].values() for u in b}
    uids = {b: zero['uids'][b] + one['uids'][b] for b in range(1, 5)}
    tokens = {b: zero['tokens'][b] + one['tokens'][b] for b in range(1, 5)}
    history = zero['history']
    assert [b for b, _ in history['mixture/fraction/math']] == [2, 4]
    for domain in BASE:  # the logged fractions are those of the union of both ranks' batches, exactly
        samples, token_fractions = _window_fractions(uids, tokens, domain, [(1, 2), (3, 4)])
        assert [v for _, v in history[f'mixture/fraction/{domain}']] == samples
        assert [v for _, v in history[f'mixture/token_fraction/{domain}']] == token_fractions
    windows = [(1, 2), (3, 4)]  # rank 0's own batches give other fractions, so the test tells a sum from a local log
    assert any(_window_fractions(zero['uids'], zero['tokens'], d, windows) !=
               _window_fractions(uids, tokens, d, windows) for d in BASE)


def test_fit_twice_continues_the_stream():
    record = Record()
    trainer = _trainer(DomainUpsampling(SCHEDULE, log_interval=2, lr_cooldown='ignore'), callbacks=[record],
                       max_duration='3ba', num_samples=64)
    trainer.fit()
    trainer.fit(duration='3ba')
    trainer.close()
    assert sorted(record.uids) == list(range(1, 7))
    seen = [u for b in sorted(record.uids) for u in record.uids[b]]
    assert len(set(seen)) == len(seen) == 48  # the second fit continued where the first stopped
    assert sum(u.startswith('math/') for b in (5, 6) for u in record.uids[b]) >= 6  # and switched at 0.5 x 6


def _fit_then_extend(record: Record, **kwargs):
    """fit() for 2 batches (the '0.5dur' switch at batch 1), then fit(duration='6ba'): the run becomes 8 batches,
    so DomainUpsampling moves the switch to batch 4 mid-run. Returns the trainer (closed)."""
    trainer = _trainer(DomainUpsampling(SCHEDULE, log_interval=2, lr_cooldown='ignore'), callbacks=[record, *kwargs.pop(
        'callbacks', ())], max_duration='2ba', num_samples=64, **kwargs)
    trainer.fit()
    try:
        trainer.fit(duration='6ba')
    finally:
        trainer.close()
    return trainer


def test_resume_after_a_mid_run_schedule_change_continues_the_per_domain_draws(tmp_path):
    # Samples 8-15 were drawn under the first schedule (after its switch at batch 1: math-heavy), but the second
    # schedule places them before its switch (batch 4). The per-domain draws at a later position therefore
    # differ from what the final schedule alone would count, and only the draws saved in the checkpoint let the
    # resumed run read each domain where the uninterrupted one does.
    full = Record()
    uninterrupted = _fit_then_extend(full)
    dataset = uninterrupted.state.train_dataloader.dataset
    full_weights = _weights(uninterrupted)
    assert sorted(full.uids) == list(range(1, 9))
    assert sum(u.startswith('math/') for u in full.uids[2]) >= 3  # batch 2: after the first switch ...
    assert sum(u.startswith('math/') for u in full.uids[3] + full.uids[4]) <= 5  # ... batches 3-4 before the second
    final_plan_only = MixtureDataset(dataset.datasets, MixtureSchedule.constant(BASE), num_samples=64, seed=3,
                                     batch_size=8)
    final_plan_only.bind(dataset.plan.schedule, total_samples=64)
    assert final_plan_only.plan.start_sample == dataset.plan.start_sample == 32
    assert list(dataset.draws_at(40)) != list(final_plan_only.draws_at(40))  # the saved counts matter

    with pytest.raises(Killed):
        _fit_then_extend(Record(), callbacks=[KillAt(5)], save_folder=str(tmp_path), save_interval='5ba')
    checkpoint = tmp_path / 'ep0-ba5-rank0.pt'
    saved = torch.load(checkpoint, weights_only=False)['state']['dataset_state']['train']
    assert saved['position'] == 40 and saved['draws'] == dict(zip(dataset.domain_names,
                                                                  map(int, dataset.draws_at(40))))
    resumed = Record()
    trainer = _trainer(DomainUpsampling(SCHEDULE, log_interval=2, lr_cooldown='ignore'), callbacks=[resumed],
                       max_duration='8ba', num_samples=64, load_path=str(checkpoint))
    trainer.fit()
    trainer.close()
    assert resumed.uids == {b: full.uids[b] for b in range(6, 9)}
    weights = _weights(trainer)
    assert all(torch.equal(v, full_weights[k]) for k, v in weights.items())


# --- the LR schedule ----------------------------------------------------------------------------------------


def test_lr_cooldown_start_hand_computed():
    assert lr_cooldown_start(lambda b: min(1.0, (100 - b) / 20), 100) == pytest.approx(80.0)  # WSD, linear decay
    assert lr_cooldown_start(lambda b: 1.0 if b < 80 else 0.1, 100) == 80.0  # a step drop
    assert lr_cooldown_start(lambda b: min(b / 10, 1.0) if b < 50 else 0.5, 100) == 50.0  # warmup, then a drop
    assert lr_cooldown_start(lambda b: 1.0, 100) is None
    assert lr_cooldown_start(lambda b: min(b / 5, 1.0), 100) is None  # warmup, then constant
    wsd = lambda b: min(1.0, (100_000 - b) / 20_000)  # noqa: E731  (grid + bisection on a long run)
    assert lr_cooldown_start(wsd, 100_000) == pytest.approx(80_000)
    # Constant to batch 60, then a cosine to 0 at 100: the last batch on the plateau is 60 (1.0 at 60, below at 61).
    plateau_cosine = lambda b: 1.0 if b <= 60 else 0.5 * (1 + math.cos(math.pi * (b - 60) / 40))  # noqa: E731
    assert lr_cooldown_start(plateau_cosine, 100) == 60.0
    long_wsd_cosine = lambda b: (min(b / 1000, 1.0) if b <= 70_000 else  # noqa: E731
                                 0.5 * (1 + math.cos(math.pi * (b - 70_000) / 30_000)))
    assert lr_cooldown_start(long_wsd_cosine, 100_000) == 70_000.0
    # A decay that spans the whole run has no plateau, hence no separate cooldown.
    cosine = lambda b: 0.5 * (1 + np.cos(np.pi * b / 10_000))  # noqa: E731
    assert lr_cooldown_start(cosine, 10_000) is None
    cosine_after_warmup = lambda b: b / 2 if b < 2 else 0.5 * (1 + math.cos(math.pi * (b - 2) / 6))  # noqa: E731
    assert lr_cooldown_start(cosine_after_warmup, 8) is None
    long_cosine_after_warmup = lambda b: (b / 1025 if b < 1025 else  # noqa: E731  (peak between grid batches)
                                          0.5 * (1 + math.cos(math.pi * (b - 1025) / 98_975)))
    assert lr_cooldown_start(long_cosine_after_warmup, 100_000) is None
    assert lr_cooldown_start(lambda b: b / 2 if b < 2 else 1 - (b - 2) / 6, 8) is None  # linear after warmup
    with pytest.raises(TypeError, match=r"total_batches='8' is a str, not an int"):
        lr_cooldown_start(cosine, '8')


def test_warns_when_upsampling_and_lr_cooldown_do_not_line_up():
    # Warmup (1 batch), constant, a 10x drop at batch 6: the cooldown starts at 6, the upsampling at 4 (0.5 x 8).
    late = MultiStepWithWarmupScheduler(t_warmup='1ba', milestones=['6ba'], gamma=0.1)
    trainer = _trainer(DomainUpsampling(SCHEDULE), scheduler=late, callbacks=[KillAt(1)])
    with pytest.warns(UserWarning, match=r'upsampling starts at batch 4 \(50% of training\) but the LR cooldown starts '
                      r"at batch 6 \(75%\); the LR multiplier is 1 \(cooldown from 1\).*lr_cooldown='align'"):
        with pytest.raises(Killed):
            trainer.fit()
    trainer.close()
    # Cosine after warmup decays over the whole run: no cooldown to line up with, so no warning by default.
    algorithm = DomainUpsampling(SCHEDULE)
    trainer = _trainer(algorithm, scheduler=CosineAnnealingWithWarmupScheduler(t_warmup='2ba'), callbacks=[KillAt(1)])
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        with pytest.raises(Killed):
            trainer.fit()
    assert algorithm.lr_cooldown_batch is None
    trainer.close()
    aligned = MultiStepWithWarmupScheduler(t_warmup='1ba', milestones=['0.5dur'])
    trainer = _trainer(DomainUpsampling(SCHEDULE), scheduler=aligned, callbacks=[KillAt(1)])
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        with pytest.raises(Killed):
            trainer.fit()
    trainer.close()


def test_align_moves_the_start_to_the_lr_cooldown():
    scheduler = MultiStepWithWarmupScheduler(t_warmup='1ba', milestones=['6ba'], gamma=0.1)
    algorithm = DomainUpsampling(SCHEDULE, lr_cooldown='align')
    trainer = _trainer(algorithm, scheduler=scheduler, callbacks=[KillAt(1)])
    with pytest.raises(Killed):
        trainer.fit()
    assert algorithm.lr_cooldown_batch == 6.0 and algorithm.start_sample == 48
    trainer.close()
    flat = _trainer(DomainUpsampling(SCHEDULE, lr_cooldown='align'), max_duration='2ba')
    with pytest.raises(ValueError, match=r"lr_cooldown='align' but the LR schedule has no final decay from a plateau"):
        flat.fit()
    flat.close()


# --- the repetition guard -------------------------------------------------------------------------------------


def test_repetition_guard_projects_and_raises_or_warns():
    heavy = MixtureSchedule(BASE, {'technical': 1.0}, start='0.5dur', normalize=True)
    # 200 batches x 8 = 1600 samples; half of them from technical (6199 samples) stays under 1 pass.
    trainer = _trainer(DomainUpsampling(heavy, max_repeats={'technical': 0.1}, on_repeat='raise',
                                        lr_cooldown='ignore'), max_duration='200ba')
    with pytest.raises(ValueError, match=r"domain 'technical' is projected to make 0.14 passes over its data .* more "
                       r"than max_repeats=0.1. Fix: .*on_repeat='warn'"):
        trainer.fit()
    trainer.close()
    trainer = _trainer(DomainUpsampling(heavy, max_repeats=1e-5, lr_cooldown='ignore'), max_duration='2ba')
    with pytest.warns(UserWarning) as caught:
        trainer.fit()
    trainer.close()
    messages = [str(w.message) for w in caught]
    assert any("domain 'technical' is projected to make" in m for m in messages)
    assert any("domain 'code' has now made" in m for m in messages)  # any draw is > 1e-5 * 9909


@pytest.mark.parametrize('ramp', ['linear', 'cosine'])
def test_repetition_guard_projects_a_ramp(ramp):
    # 200 batches x 8 = 1600 samples; technical (6199 samples) has weight 0.1 for the first 800 and ramps to 1.0
    # over the last 800, where both ramps average alpha = 1/2: 0.1 x 800 + (0.1 + 1.0) / 2 x 800 = 520 draws.
    heavy = MixtureSchedule(BASE, {'technical': 1.0}, start='0.5dur', ramp=ramp, normalize=True)
    trainer = _trainer(DomainUpsampling(heavy, max_repeats={'technical': 0.08}, on_repeat='raise',
                                        lr_cooldown='ignore'), max_duration='200ba')
    with pytest.raises(ValueError, match=r"domain 'technical' is projected to make 0.08 passes over its data \(520 "
                       r'draws of its 6199 samples\), more than max_repeats=0.08'):
        trainer.fit()
    trainer.close()


def test_repetition_found_during_training_raises_runtime_error():
    # The projection is an expectation; the real draws can pass it by a sample. Put the limit in between, so
    # only the check during training sees it (a RuntimeError: nothing is wrong with the arguments).
    spec = build_mixture_dataloader(batch_size=8, domains='all', weights=BASE, num_samples=32, seq_len=32, seed=3)
    dataset = spec.dataloader.dataset
    dataset.bind(SCHEDULE, total_samples=16)  # as DomainUpsampling binds it for 2 batches of 8
    actual = np.bincount(dataset.domain_of(np.arange(16)), minlength=6)
    expected = dataset.plan.expected_draws(0, 16)
    over = [i for i in range(6) if actual[i] > expected[i] + 0.2]
    assert over, (actual, expected)  # the stratified draws round some domain up
    domain, size = dataset.domain_names[over[0]], int(dataset.sizes[over[0]])
    limit = (actual[over[0]] + expected[over[0]]) / 2 / size
    trainer = _trainer(DomainUpsampling(SCHEDULE, max_repeats={domain: limit}, on_repeat='raise',
                                        lr_cooldown='ignore'), max_duration='2ba')
    with pytest.raises(RuntimeError, match=rf"domain '{domain}' has now made .* \({actual[over[0]]} draws of its "
                       rf"{size} samples\), more than max_repeats=.*on_repeat='warn'"):
        trainer.fit()
    trainer.close()


def test_algorithm_bad_input_and_repr():
    algorithm = DomainUpsampling(SCHEDULE, log_interval='20ba', max_repeats={'math': 2}, on_repeat='raise')
    rebuilt = eval(repr(algorithm))
    assert repr(rebuilt) == repr(algorithm) and rebuilt.schedule == SCHEDULE
    for kwargs, match in [({'log_interval': '2ep'}, r"log_interval='2ep' is not a number of batches"),
                          ({'max_repeats': -1}, r'max_repeats=-1 is invalid'),
                          ({'max_repeats': {'math': 0}}, r"max_repeats\['math'\]=0 is invalid"),
                          ({'on_repeat': 'ignore'}, r"on_repeat='ignore' is invalid"),
                          ({'lr_cooldown': 'auto'}, r"lr_cooldown='auto' is invalid"),
                          ({'lr_tolerance': 1.5}, r'lr_tolerance=1.5 is not a fraction'),
                          ({'tokens_per_sample': 0}, r'tokens_per_sample=0 is invalid')]:
        with pytest.raises(ValueError, match=match):
            DomainUpsampling(SCHEDULE, **kwargs)
    for kwargs, match in [({'max_repeats': '2'}, r"max_repeats='2' is a str, not a number"),
                          ({'max_repeats': {'math': None}}, r"max_repeats\['math'\]=None is a NoneType, not a number"),
                          ({'tokens_per_sample': '32'}, r"tokens_per_sample='32' is a str, not a number"),
                          ({'lr_tolerance': '0.1'}, r"lr_tolerance='0.1' is a str, not a number"),
                          ({'log_interval': 2.5}, r'log_interval=2.5 is a float, not a time')]:
        with pytest.raises(TypeError, match=match):
            DomainUpsampling(SCHEDULE, **kwargs)
    with pytest.raises(TypeError, match=r"schedule has the unknown keys \['code', 'dialogue'.*Fix: use only \['base'"):
        DomainUpsampling(BASE)  # domain weights are not a schedule
    with pytest.raises(TypeError, match=r'schedule=.* is not a MixtureSchedule'):
        DomainUpsampling([BASE])
    # An llm-foundry YAML gives the schedule as a plain mapping of MixtureSchedule's arguments.
    as_mapping = DomainUpsampling({'base': SCHEDULE.base, 'target': SCHEDULE.target, 'start': str(SCHEDULE.start)})
    assert as_mapping.schedule == SCHEDULE
    unknown = _trainer(DomainUpsampling(SCHEDULE, max_repeats={'poetry': 2}, lr_cooldown='ignore'), max_duration='2ba')
    with pytest.raises(ValueError, match=r"max_repeats names domains \['poetry'\]"):
        unknown.fit()
    unknown.close()
    missing = _trainer(DomainUpsampling(MixtureSchedule({'math': 1.0}, {'poetry': 1.0}), lr_cooldown='ignore'),
                       max_duration='2ba')
    with pytest.raises(ValueError, match=r"target mix gives 'poetry' weight 1, but domains has no dataset named"):
        missing.fit()
    missing.close()


def test_needs_a_mixture_dataset():
    from composer_ext.data.images import build_image_dataloader
    from composer_ext.models import small_vgg
    model = small_vgg(num_classes=10, widths=[4, 8])
    trainer = Trainer(model=model, train_dataloader=build_image_dataloader('digits', batch_size=32), max_duration='1ba',
                      optimizers=DecoupledAdamW(model.parameters()), algorithms=[DomainUpsampling(SCHEDULE)],
                      progress_bar=False)
    with pytest.raises(ValueError, match=r'DomainUpsampling needs a train dataloader over a composer_ext.data.'
                       r'MixtureDataset, got DataLoader'):
        trainer.fit()
    trainer.close()


# --- YAML and the CLI -------------------------------------------------------------------------------------------

YAMLS = sorted((ROOT / 'yamls' / 'domain_upsampling').glob('*.yaml'))


@pytest.mark.parametrize('path', YAMLS, ids=[p.name for p in YAMLS])
def test_every_yaml_loads(path):
    config = load_config(path)
    assert config.train_loader['name'] == 'text_mixture'
    assert 'domain_upsampling' in (config.algorithms or {})


def test_builder_makes_the_schedule_from_plain_values():
    algorithm = build_domain_upsampling(None, base={'math': 1, 'prose': 3}, target={'math': 1}, start='0.8dur',
                                        normalize=True, max_repeats=2)
    assert algorithm.schedule == MixtureSchedule({'math': 0.25, 'prose': 0.75}, {'math': 1.0, 'prose': 0.0},
                                                 start='0.8dur')
    assert algorithm.max_repeats == 2.0


@pytest.mark.parametrize('name', ['upsample', 'baseline'])
def test_yaml_runs(tmp_path, name):
    result = run(str(ROOT / f'yamls/domain_upsampling/{name}.yaml'),
                 ('max_duration=5ba', 'eval_interval=5ba', 'eval_loaders.0.subset_num_batches=1',
                  'model.n_layer=1', 'model.n_embd=32', 'model.n_head=2', f'loggers.file.filename={tmp_path}/log.txt',
                  'scheduler.t_warmup=1ba',
                  'algorithms.domain_upsampling.log_interval=5ba'))
    assert result.trainer.state.timestamp.batch.value == 5
    assert set(result.eval_metrics) >= {f'metrics/{d}/LanguageCrossEntropy' for d in BASE}
    algorithm = next(a for a in result.trainer.state.algorithms if isinstance(a, DomainUpsampling))
    assert algorithm.start_sample == 4 * 16  # 0.8 * 5 batches of 16
    log = (tmp_path / 'log.txt').read_text()
    assert 'mixture/fraction/math' in log and 'mixture/target/math' in log
    assert (algorithm.schedule.target == algorithm.schedule.base) == (name == 'baseline')
    result.trainer.close()


TINY = ('model.n_layer=1', 'model.n_embd=32', 'model.n_head=2', 'variables.seq_len=32', 'train_loader.batch_size=8',
        'eval_loaders.0.batch_size=8', 'eval_loaders.0.subset_num_batches=1', 'scheduler.t_warmup=1ba',
        'max_duration=5ba', 'eval_interval=5ba', 'algorithms.domain_upsampling.log_interval=1ba',
        'log_to_console=false')


def test_ablate_yaml_runs_through_the_cli(tmp_path, capsys):
    # The documented two commands, shrunk: the full run saves the checkpoint at the start (0.8 x 5 = batch 4),
    # then `composer-ext ablate` anneals from it with overrides written before the options.
    files = (f'loggers.file.filename={tmp_path}/log.txt',)
    base = run(str(ROOT / 'yamls/domain_upsampling/ablate.yaml'),
               TINY + files + (f'save_folder={tmp_path}/ckpt', 'save_interval=4ba'))
    base.trainer.close()
    checkpoint = tmp_path / 'ckpt' / 'ep0-ba4-rank0.pt'
    assert checkpoint.is_file()
    code = main(['ablate', str(ROOT / 'yamls/domain_upsampling/ablate.yaml'), *TINY, *files, '--checkpoint',
                 str(checkpoint), '--domains', 'math', 'prose', '--output', str(tmp_path / 'ablation')])
    assert code == 0
    rows = list(csv.DictReader((tmp_path / 'ablation' / 'ablation.csv').open()))
    assert {r['anneal'] for r in rows} == {'full', 'drop_math', 'drop_prose'} and len(rows) == 18  # 6 eval domains
    full = {r['eval']: float(r['value']) for r in rows if r['anneal'] == 'full'}
    base_losses = {k.split('/')[1]: v for k, v in base.eval_metrics.items() if k.endswith('/LanguageCrossEntropy')}
    assert full == pytest.approx(base_losses, abs=1e-5)  # the full-mix anneal is the full run's last batch
    assert 'Drop-one-domain ablation' in capsys.readouterr().out


def test_yaml_errors_name_the_field(tmp_path):
    bad = tmp_path / 'bad.yaml'
    bad.write_text(textwrap.dedent("""
        max_duration: 4ba
        model: {name: small_gpt, n_layer: 1, n_embd: 32, n_head: 2, n_positions: 32}
        train_loader: {name: text_mixture, batch_size: 8, seq_len: 32}
        algorithms:
          domain_upsampling: {base: {math: 0.5, prose: 0.6}, target: {math: 1.0}, start: 0.5dur}
    """))
    with pytest.raises(ConfigError, match=r'algorithms.domain_upsampling: base weights sum to 1.1, not 1'):
        run(str(bad))
    with pytest.raises(ConfigError, match=r'algorithms.domain_upsampling.start: .*time string'):
        load_config(bad, ('algorithms.domain_upsampling.start=later',))


# --- the drop-one-domain ablation ---------------------------------------------------------------------------------

ANNEAL_YAML = """
run_name: tiny_anneal
seed: 5
max_duration: 6ba
model: {name: small_gpt, n_layer: 1, n_embd: 32, n_head: 2, n_positions: 32}
train_loader: {name: text_mixture, batch_size: 8, seq_len: 32, num_samples: 96}
eval_loaders:
  - {name: text_evaluators, domains: [math, code, prose], batch_size: 16, seq_len: 32, subset_num_batches: 1}
eval_interval: 6ba
optimizer: {name: decoupled_adamw, lr: 3.0e-3}
algorithms:
  domain_upsampling:
    base: {code: 0.2, dialogue: 0.15, legal: 0.15, math: 0.2, prose: 0.2, technical: 0.1}
    target: {code: 0.3, math: 0.4, prose: 0.3}
    start: 0.5dur
    lr_cooldown: ignore
progress_bar: false
"""


def test_drop_domain_rescales_the_rest():
    section = {'base': BASE, 'target': {'code': 0.3, 'math': 0.4, 'prose': 0.3}, 'start': '0.5dur'}
    dropped = drop_domain(section, 'math')
    assert dropped['target'] == {'code': 0.3, 'math': 0.0, 'prose': 0.3} and dropped['normalize'] is True
    assert section['target']['math'] == 0.4
    with pytest.raises(ValueError, match=r"domain='legal' has no weight in the target mix"):
        drop_domain(section, 'legal')


def test_ablation_writes_csv_and_png_of_deltas(tmp_path, capsys):
    config = tmp_path / 'anneal.yaml'
    config.write_text(ANNEAL_YAML)
    base = run(str(config), (f'save_folder={tmp_path}/ckpt', 'save_interval=1ba'))
    base.trainer.close()
    checkpoint = str(tmp_path / 'ckpt' / 'ep0-ba3-rank0.pt')  # the upsampling start (0.5 x 6 batches)
    output = tmp_path / 'ablation'
    result = run_ablation(config, checkpoint, domains=['math', 'code'], output=output)
    assert set(result.values) == {'full', 'drop_math', 'drop_code'}
    base_losses = {k.split('/')[1]: v for k, v in base.eval_metrics.items() if k.endswith('/LanguageCrossEntropy')}
    assert result.values['full'] == pytest.approx(base_losses)  # the full-mix anneal is the base run's second half
    for domain in ('math', 'code'):
        assert result.values[f'drop_{domain}'] != result.values['full']
        for label in ('math', 'code', 'prose'):
            assert result.deltas[domain][label] == pytest.approx(
                result.values[f'drop_{domain}'][label] - result.values['full'][label])
    rows = list(csv.DictReader(result.csv_path.open()))
    assert len(rows) == 9 and {r['anneal'] for r in rows} == {'full', 'drop_math', 'drop_code'}
    assert float(next(r for r in rows if r['anneal'] == 'drop_math' and r['eval'] == 'math')['delta_vs_full']) == \
        pytest.approx(result.deltas['math']['math'], abs=1e-6)
    assert result.png_path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    stamps = {p.name: p.stat().st_mtime_ns for p in (output / 'results').iterdir()}
    again = run_ablation(config, checkpoint, domains=['math', 'code'], output=output)  # cached: no anneal reruns
    assert again.values == result.values
    assert {p.name: p.stat().st_mtime_ns for p in (output / 'results').iterdir()} == stamps

    late = str(tmp_path / 'ckpt' / 'ep0-ba4-rank0.pt')  # past the start
    assert main(['ablate', str(config), '--checkpoint', late, '--output', str(tmp_path / 'late')]) == 2
    assert 'after the upsampling start' in capsys.readouterr().err


def test_ablate_cli_errors(tmp_path, capsys):
    config = tmp_path / 'anneal.yaml'
    config.write_text(ANNEAL_YAML)
    assert main(['ablate', str(config), 'max_duration=4ba', '--checkpoint', str(tmp_path / 'none.pt')]) == 2
    assert 'is not a file' in capsys.readouterr().err
    assert main(['ablate', str(config), '--checkpoint', str(config), '--domains', 'legal']) == 2
    assert "--domains ['legal'] are not in the target mix" in capsys.readouterr().err
    config.write_text(ANNEAL_YAML.replace('algorithms:', 'unused:').split('unused:')[0])
    assert main(['ablate', str(config), '--checkpoint', str(config)]) == 2
    assert 'ablate needs a domain_upsampling algorithm' in capsys.readouterr().err
