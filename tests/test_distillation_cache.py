"""The teacher-output cache of KnowledgeDistillation and the cheap teacher side: cached losses against live ones
(full logits within fp16 rounding, top-k within a measured bound), refusals (changed teacher, changed data,
augmented inputs, bad arguments), a kill while the cache is being written, 2 ranks writing disjoint chunks, sample
ids of the image sets, and the teachers' precision and inference mode."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch
from composer import Trainer
from composer.loggers import InMemoryLogger
from composer.optim import DecoupledSGDW

from composer_ext.data import build_image_dataloader
from composer_ext.data.images import ArrayImageDataset, digits
from composer_ext.distillation import KnowledgeDistillation
from composer_ext.distillation.cache import TeacherCacheError, decode_logits, encode_logits
from composer_ext.distillation.loss import kd_loss
from composer_ext.distillation.teachers import resolve_teacher_precision, teacher_context
from composer_ext.models import small_resnet, small_vgg
from composer_ext.testing import KillAt, Killed, run_distributed

BATCH = 48  # digits train: 1,437 samples -> 29 batches per epoch (drop_last)


pytestmark = pytest.mark.usefixtures('one_torch_thread')


def _teacher(seed=1):
    torch.manual_seed(seed)
    return small_resnet(widths=[8, 16], blocks_per_stage=[1, 1])


def _student(seed=0):
    torch.manual_seed(seed)
    return small_vgg(widths=[8, 16], convs_per_stage=1)


def _trainer(kd, *, lr=0.05, max_duration='1ep', loader=None, loggers=(), callbacks=(), **kwargs):
    model = _student()
    loader = loader if loader is not None else build_image_dataloader('digits', BATCH, sample_ids=True)
    return Trainer(model=model, train_dataloader=loader, max_duration=max_duration,
                   optimizers=DecoupledSGDW(model.parameters(), lr=lr, momentum=0.9), algorithms=[kd],
                   loggers=list(loggers), callbacks=list(callbacks), progress_bar=False, seed=7, **kwargs)


def _logged(logger: InMemoryLogger, key: str) -> np.ndarray:
    return np.array([float(v) for _, v in logger.data.get(key, [])])


def _chunk_ids(cache_dir, teacher=0) -> np.ndarray:
    parts = []
    for chunk in sorted((cache_dir / f'teacher-{teacher}').glob('chunk-*.npz')):
        with np.load(chunk) as npz:
            parts.append(npz['ids'])
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def _kd(teacher, **kwargs):
    return KnowledgeDistillation(teacher, start='0ba', end='1000ba', seed=0, **kwargs)


def _kd_losses(tmp_path, max_duration='2ep', **cache_kwargs):
    """kd/loss per step with lr=0 (the student and the batches are those of a live run)."""
    memory = InMemoryLogger()
    trainer = _trainer(_kd(_teacher(), **cache_kwargs), lr=0.0, max_duration=max_duration, loggers=[memory])
    trainer.fit()
    trainer.close()
    return _logged(memory, 'kd/loss'), _logged(memory, 'kd/cache_hit_rate')


# --- the encoding ------------------------------------------------------------------------------------------------


def test_encoding_full_logits_is_fp16_and_top_k_keeps_top_probabilities_and_the_rest_mass():
    torch.manual_seed(0)
    logits = torch.randn(6, 10) * 3
    assert torch.equal(decode_logits(encode_logits(logits, None, 4.0), 10), logits.half().float())
    decoded = decode_logits(encode_logits(logits, 3, 4.0), 10)
    p, q = torch.softmax(logits / 4.0, -1), torch.softmax(decoded / 4.0, -1)
    top = logits.topk(3, -1).indices
    assert torch.allclose(p.gather(-1, top), q.gather(-1, top), atol=2e-3)  # fp16 of the stored logits
    rest = torch.ones_like(p, dtype=torch.bool).scatter(-1, top, False)
    assert torch.allclose((p * rest).sum(-1), (q * rest).sum(-1), atol=2e-3)
    assert torch.allclose(q[rest].reshape(6, 7), q[rest].reshape(6, 7)[:, :1].expand(6, 7))  # spread evenly


# --- cached against live -------------------------------------------------------------------------------------------


def test_cached_full_logits_give_the_live_losses_within_fp16_and_later_runs_read_only_the_cache(tmp_path):
    live, _ = _kd_losses(tmp_path)
    cached, hits = _kd_losses(tmp_path, cache=tmp_path / 'cache')
    again, hits_again = _kd_losses(tmp_path, cache=tmp_path / 'cache')
    steps = len(live) // 2
    assert len(live) == len(cached) == 2 * steps == 58
    # epoch 1 writes; epoch 2 reads all but the samples that drop_last left out of epoch 1 (45 of 1,437)
    assert hits[:steps].max() == 0.0 and hits[steps:].mean() > 0.95
    assert hits_again.min() == 1.0  # a later run: every step from the cache
    np.testing.assert_array_equal(again, cached)  # a step's loss does not depend on where its logits came from
    relative = np.abs(cached - live) / live
    # fp16 keeps 11 significant bits: a logit moves by <= 2^-11 (4.9e-4) relative, the KL by no more (measured:
    # 9e-6 max, 3e-6 mean)
    assert relative.max() < 2.0**-11, relative.max()
    ids = _chunk_ids(tmp_path / 'cache')
    assert len(np.unique(ids)) == len(ids) == round(((1 - hits) * BATCH).sum())  # each sample written once
    assert f"cache='{tmp_path / 'cache'}'" in repr(_kd(_teacher(), cache=str(tmp_path / 'cache')))


def test_top_k_cache_differs_from_live_kd_by_a_measured_bound(tmp_path):
    # one epoch: a step computes the same encoded logits whether it writes or reads them (tested above)
    live, _ = _kd_losses(tmp_path, '1ep')
    top3, _ = _kd_losses(tmp_path, '1ep', cache=tmp_path / 'top3', cache_top_k=3)
    top6, _ = _kd_losses(tmp_path, '1ep', cache=tmp_path / 'top6', cache_top_k=6)
    error3, error6 = np.abs(top3 - live) / live, np.abs(top6 - live) / live
    # measured on this data (10 classes, T=4, an untrained teacher: flat distributions are the hard case):
    # top-3 mean 4.6% / max 4.9% relative, top-6 mean 1.1% / max 1.3%
    assert error3.max() < 0.08 and error6.max() < 0.025, (error3.max(), error6.max())
    assert error6.mean() < error3.mean()  # more of the distribution kept: closer to live


# --- refusals -------------------------------------------------------------------------------------------------------


def _fit_one_batch(cache, teacher=None, loader=None, **kwargs):
    trainer = _trainer(_kd(teacher or _teacher(), cache=cache, **kwargs), max_duration='1ba', loader=loader)
    trainer.fit()
    trainer.close()


def test_a_changed_teacher_and_changed_data_are_refused(tmp_path):
    _fit_one_batch(tmp_path / 'cache')
    with pytest.raises(TeacherCacheError, match=r'other weights for teachers\[0\].*Fix: pass a new cache directory'):
        _fit_one_batch(tmp_path / 'cache', teacher=_teacher(seed=2))
    other_data = build_image_dataloader('digits', BATCH, split='test', sample_ids=True)
    with pytest.raises(TeacherCacheError, match=r'written for other data.*Fix: pass a new cache directory'):
        _fit_one_batch(tmp_path / 'cache', loader=other_data)
    with pytest.raises(TeacherCacheError, match=r'encoding='):
        _fit_one_batch(tmp_path / 'cache', cache_top_k=3)


class NoisyDigits(ArrayImageDataset):
    """Digits augmented per access (noise drawn anew every epoch), without declaring a transform."""

    def __getitem__(self, index):
        image, label, sample_id = super().__getitem__(index)
        return image + 0.1 * torch.randn_like(image), label, sample_id


class TransformedDigits(ArrayImageDataset):
    transform = 'random_crop'


def _loader(cls):
    from torch.utils.data import DataLoader
    base = digits('train')
    data = cls(base.images.numpy(), base.labels.numpy(), base.mean, base.std, base.scale,
               sample_ids=base.sample_ids.numpy(), return_sample_ids=True)
    return DataLoader(data, batch_size=BATCH, shuffle=True, drop_last=True)


def test_inputs_augmented_per_epoch_are_refused(tmp_path):
    trainer = _trainer(_kd(_teacher(), cache=tmp_path / 'noisy'), max_duration='2ep', loader=_loader(NoisyDigits))
    with pytest.raises(TeacherCacheError, match=r'the input of sample id \d+ differs from the one cached.*augmented '
                                                r'per epoch.*Fix: remove the per-epoch augmentation'):
        trainer.fit()
    trainer.close()
    assert trainer.state.timestamp.epoch.value == 1  # the first read (epoch 2) is refused
    with pytest.raises(ValueError, match=r"transforms its inputs \('random_crop'\) and cache_transform=None.*Fix"):
        _fit_one_batch(tmp_path / 'transformed', loader=_loader(TransformedDigits))
    # a declared deterministic transform is part of the key
    _fit_one_batch(tmp_path / 'transformed', loader=_loader(TransformedDigits), cache_transform='crop_seed0')


def test_data_without_sample_ids_and_bad_cache_directories_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r'needs sample ids.*return_sample_ids=False.*sample_ids=True'):
        _fit_one_batch(tmp_path / 'a', loader=build_image_dataloader('digits', BATCH))
    (tmp_path / 'busy').mkdir()
    (tmp_path / 'busy' / 'notes.txt').write_text('mine')
    with pytest.raises(TeacherCacheError, match=r'is not empty.*not a teacher-output cache.*Fix'):
        _fit_one_batch(tmp_path / 'busy')
    with pytest.raises(ValueError, match=r'cache_top_k=10 is not below the 10 classes.*Fix'):
        _fit_one_batch(tmp_path / 'b', cache_top_k=10)


@pytest.mark.parametrize('kwargs,error,match', [
    ({'cache': 3}, TypeError, r'cache=3 is a int, not a directory path\. Fix'),
    ({'cache': 'c', 'cache_top_k': 0}, ValueError, r'cache_top_k=0 is not a positive int\. Fix'),
    ({'cache': 'c', 'cache_top_k': True}, ValueError, r'cache_top_k=True is not a positive int'),
    ({'cache_top_k': 4}, ValueError, r'cache_top_k=4 has no effect without a cache\. Fix: pass cache=DIR'),
    ({'cache_transform': 'crop'}, ValueError, r"cache_transform='crop' has no effect without a cache"),
    ({'cache': 'c', 'cache_transform': ''}, ValueError, r"cache_transform='' is not a non-empty string\. Fix"),
    ({'cache': 'c', 'cache_flush_every': 0}, ValueError, r'cache_flush_every=0 is not a positive int\. Fix'),
    ({'cache': 'c', 'cache_check_inputs': 'yes'}, TypeError, r"cache_check_inputs='yes' is a str, not a bool"),
    ({'cache': 'c', 'cache_top_k': 3, 'loss': 'mse'}, ValueError, r"cache_top_k=3 with loss='mse'.*Fix"),
    ({'teacher_precision': 'fp8'}, ValueError, r"teacher_precision='fp8' is not one of \['auto', 'student'\]\. Fix"),
])
def test_bad_cache_arguments_name_the_argument_and_the_fix(kwargs, error, match):
    with pytest.raises(error, match=match):
        KnowledgeDistillation(_teacher(), **kwargs)


def test_resuming_with_another_cache_encoding_is_refused():
    saved = _kd(_teacher(), cache='c', cache_top_k=3).state_dict()
    with pytest.raises(ValueError, match=r"encoded as \{'top_k': 3.*this run uses None.*Fix: resume with the same"):
        _kd(_teacher()).load_state_dict(saved)


# --- a kill while writing, 2 ranks ----------------------------------------------------------------------------------


@pytest.mark.filterwarnings('ignore:InMemoryLogger is not in the state_dict')  # the test's own logger
def test_a_kill_while_writing_the_cache_resumes_without_losing_or_duplicating_an_entry(tmp_path):
    cache = tmp_path / 'cache'
    full_log = InMemoryLogger()
    full = _trainer(_kd(_teacher(), cache=tmp_path / 'reference', cache_flush_every=2 * BATCH), loggers=[full_log])
    full.fit()
    full.close()

    folder = tmp_path / 'ckpt'
    killed = _trainer(_kd(_teacher(), cache=cache, cache_flush_every=2 * BATCH), save_folder=str(folder),
                      save_interval='5ba', callbacks=[KillAt(7)])
    with pytest.raises(Killed):
        killed.fit()
    killed.close()
    written = _chunk_ids(cache)
    assert len(written) == 6 * BATCH  # flushed after batches 2, 4, 6; batch 7 was never run
    # a writer killed inside a write leaves its temporary file: the next run removes it and never reads it
    leftover = cache / 'teacher-0' / '.chunk-r0-1-1.npz.tmp-dead'
    leftover.write_bytes(b'half a chunk')
    os.utime(leftover, (time.time() - 3600, time.time() - 3600))

    resumed_log = InMemoryLogger()
    resumed = _trainer(_kd(_teacher(), cache=cache, cache_flush_every=2 * BATCH), loggers=[resumed_log],
                       load_path=str(folder / 'ep0-ba5-rank0.pt'))
    resumed.fit()
    resumed.close()
    ids = _chunk_ids(cache)
    assert not leftover.exists()
    assert len(ids) == len(np.unique(ids)) == 29 * BATCH  # every sample of the epoch once
    np.testing.assert_array_equal(np.sort(ids), np.sort(_chunk_ids(tmp_path / 'reference')))
    assert _logged(resumed_log, 'kd/cache_hit_rate')[0] == 1.0  # batch 6 was cached before the kill
    np.testing.assert_array_equal(_logged(resumed_log, 'kd/loss'), _logged(full_log, 'kd/loss')[5:])


def _two_epochs_on_rank(cache_dir):
    from composer.utils import dist
    memory = InMemoryLogger()
    loader = build_image_dataloader('digits', 240, sample_ids=True)  # 5 steps per epoch, 120 samples per rank
    trainer = _trainer(_kd(_teacher(), cache=cache_dir), max_duration='2ep', loggers=[memory], loader=loader)
    trainer.fit()
    trainer.close()
    rank = dist.get_global_rank()
    ids = []
    for chunk in sorted((cache_dir / 'teacher-0').glob(f'chunk-r{rank}-*.npz')):
        with np.load(chunk) as npz:
            ids.append(npz['ids'])
    return np.concatenate(ids).tolist(), _logged(memory, 'kd/cache_hit_rate').tolist()


@pytest.mark.distributed
def test_two_ranks_write_disjoint_entries_and_read_each_others(tmp_path):
    (ids0, hits0), (ids1, hits1) = run_distributed(_two_epochs_on_rank, world_size=2, args=(tmp_path / 'cache',),
                                                   timeout=600)
    assert len(ids0) == len(set(ids0)) and len(ids1) == len(set(ids1)) and not set(ids0) & set(ids1)
    steps = len(hits0) // 2
    assert hits0[:steps] == hits1[:steps] == [0.0] * steps
    # epoch 2 reshuffles the shards: each rank reads entries the other rank wrote (all but the few samples that
    # drop_last left out of epoch 1), and writes only those few
    assert steps == 5 and min(hits0[steps:]) > 0.7 and min(hits1[steps:]) > 0.7
    misses = sum(round((1 - h) * 120) for h in hits0 + hits1)
    assert len(ids0) + len(ids1) == misses >= 5 * 240


# --- the cheap teacher side -----------------------------------------------------------------------------------------


def test_teacher_precision_selection_and_teachers_run_without_autograd_state():
    assert resolve_teacher_precision('auto', 'cuda', 'fp32', bf16_supported=True) == 'bf16'
    assert resolve_teacher_precision('auto', 'cuda', 'amp_bf16', bf16_supported=True) == 'bf16'
    assert resolve_teacher_precision('auto', 'cuda', 'amp_fp16', bf16_supported=True) == 'student'
    assert resolve_teacher_precision('auto', 'cuda', 'fp32', bf16_supported=False) == 'student'
    assert resolve_teacher_precision('auto', 'cpu', 'fp32', bf16_supported=True) == 'student'
    assert resolve_teacher_precision('student', 'cuda', 'fp32', bf16_supported=True) == 'student'
    teacher, x = _teacher().module.eval(), torch.randn(4, 1, 8, 8)
    with teacher_context('bf16', 'cpu', torch.autocast('cpu', enabled=False)):  # the autocast path, run on the CPU
        low = teacher(x)
    with teacher_context('student', 'cpu', torch.autocast('cpu', enabled=False)):
        full = teacher(x)
    assert low.dtype == torch.bfloat16 and full.dtype == torch.float32
    assert full.is_inference() and not full.requires_grad
    assert torch.allclose(low.float(), full, atol=0.1)


def test_image_sets_carry_stable_sample_ids_and_a_content_fingerprint():
    x, y, ids = next(iter(build_image_dataloader('digits', 32, sample_ids=True)))
    assert x.shape == (32, 1, 8, 8) and ids.dtype == torch.int64 and len(set(ids.tolist())) == 32
    data = digits('train', return_sample_ids=True)
    image, label, sample_id = data[5]
    assert sample_id == data.sample_ids[5] and len(digits('train')[5]) == 2  # without ids: unchanged items
    test_ids = set(digits('test').sample_ids.tolist())
    assert not test_ids & set(data.sample_ids.tolist()) and len(test_ids) + len(data) == 1797  # ids of the full set
    assert data.fingerprint == digits('train').fingerprint != digits('test').fingerprint
    with pytest.raises(ValueError, match=r'sample_ids must be 3 distinct non-negative integers.*Fix'):
        ArrayImageDataset(np.zeros((3, 2, 2), np.uint8), np.array([0, 1, 1]), 0.0, 1.0, sample_ids=np.array([1, 1, 2]))
