"""The shared mechanics in composer_ext.core: time arguments, unwrapping, checkpoint loading, provenance."""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
from composer.core import Event, Time, TimeUnit, Timestamp

from composer_ext.core.checkpoints import load_checkpoint, load_module, load_weights, model_state_dict
from composer_ext.core.provenance import (bytes_sha256, chunks_sha256, file_sha256, ids_sha256, json_sha256,
                                          tensors_sha256)
from composer_ext.core.timing import (TIME_UNITS, Interval, is_time, parse_interval, parse_time, reached,
                                      resolve_bound, time_string)
from composer_ext.core.unwrap import unwrap_parallel

# --- time ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('value,expected', [('0.8dur', Time(0.8, TimeUnit.DURATION)), (500, Time(500, TimeUnit.BATCH)),
                                            ('2ep', Time(2, TimeUnit.EPOCH)), ('1e9tok', Time(10**9, TimeUnit.TOKEN)),
                                            ('5000sp', Time(5000, TimeUnit.SAMPLE)),
                                            (Time(3, TimeUnit.BATCH), Time(3, TimeUnit.BATCH))])
def test_parse_time_reads_every_accepted_form(value, expected):
    assert parse_time(value, 'start') == expected


@pytest.mark.parametrize('value,error,match', [
    ('10sec', ValueError, r"start='10sec' is in 'sec'.*has unit 'sec'.*Fix: use 'ba', 'ep', 'sp', 'tok' or 'dur'"),
    ('3iter', ValueError, r"start='3iter' is in 'iter'"),
    ('soon', ValueError, r"start='soon' is not a Composer time string\. Fix: use e\.g\. \"0\.9dur\""),
    ('-5ba', ValueError, r"start='-5ba' is negative"),
    ('1.5dur', ValueError, r"start='1.5dur' is after the end of training"),
    (0.5, TypeError, r"start=0.5 is a float, not a time\. Fix: .*'0\.9dur'"),
    (True, TypeError, r'start=True is not a time'),
    (None, TypeError, r'start=None is not a time'),
])
def test_parse_time_refuses_with_the_argument_the_value_and_the_fix(value, error, match):
    with pytest.raises(error, match=match):
        parse_time(value, 'start', example='0.9dur')


def test_one_unit_policy_for_bounds_and_intervals():
    # The same units are refused by both parsers: the policy is not a per-caller flag.
    assert TimeUnit.SECOND not in TIME_UNITS and TimeUnit.ITERATION not in TIME_UNITS
    for text in ('3sec', '2iter'):
        with pytest.raises(ValueError, match='has unit'):
            parse_time(text, 'x')
        with pytest.raises(ValueError, match='has unit'):
            parse_interval(text, 'x')
        assert not is_time(text)
    assert is_time('0.5dur') and is_time(7) and not is_time('seven') and not is_time(True)


@pytest.mark.parametrize('value,match', [('0ba', r"every='0ba' must be positive \(and at most 1dur\)"),
                                         ('2dur', r"every='2dur' must be positive"),
                                         ('-1ep', r'must be positive')])
def test_parse_interval_needs_a_positive_interval(value, match):
    with pytest.raises(ValueError, match=match):
        parse_interval(value, 'every')
    assert parse_interval(None, 'every') is None
    assert parse_interval('0.1dur', 'every') == Time(0.1, TimeUnit.DURATION)


@pytest.mark.parametrize('text', ['0.5dur', '100ba', '2ep', '1000000000tok', '0.125dur'])
def test_time_string_round_trips(text):
    time = Time.from_timestring(text)
    assert Time.from_timestring(time_string(time)) == time


def _state(max_duration: str, dataloader_len=None, batch=0, epoch=0, sample=0):
    timestamp = Timestamp(epoch=epoch, batch=batch, sample=sample)
    return SimpleNamespace(max_duration=Time.from_timestring(max_duration), dataloader_len=dataloader_len,
                           timestamp=timestamp, previous_timestamp=None)


def test_resolve_bound_puts_dur_and_epochs_on_the_run_axis():
    # 4 epochs of 10 batches: 0.25dur is one epoch, which is batch 10; '3ep' becomes batch 30; samples stay samples.
    state = _state('4ep', dataloader_len=10)
    assert resolve_bound(Time(0.25, TimeUnit.DURATION), state) == (10.0, TimeUnit.BATCH)
    assert resolve_bound(Time(3, TimeUnit.EPOCH), state) == (30.0, TimeUnit.BATCH)
    assert resolve_bound(Time(70, TimeUnit.SAMPLE), state) == (70.0, TimeUnit.SAMPLE)
    # Unknown epoch length: epochs stay epochs.
    assert resolve_bound(Time(0.5, TimeUnit.DURATION), _state('4ep')) == (2.0, TimeUnit.EPOCH)
    assert resolve_bound(Time(0.3, TimeUnit.DURATION), _state('1000sp')) == (300.0, TimeUnit.SAMPLE)
    assert reached((10.0, TimeUnit.BATCH), _state('4ep', 10, batch=10))
    assert not reached((10.0, TimeUnit.BATCH), _state('4ep', 10, batch=9))


def test_interval_is_due_on_each_crossing():
    interval = Interval(parse_interval('0.25dur', 'every'), 'every')
    state = _state('8ba')
    interval.resolve(state)
    assert interval.resolved == Time(2, TimeUnit.BATCH)
    due = []
    for batch in range(1, 9):
        state.previous_timestamp, state.timestamp = state.timestamp, Timestamp(batch=batch)
        due.append(interval.due(state, Event.BATCH_END))
    assert due == [False, True, False, True, False, True, False, True]
    epochs = Interval(parse_interval('2ep', 'every'), 'every')
    epochs.resolve(state)
    assert epochs.due(_state('8ep', epoch=4), Event.EPOCH_END) and not epochs.due(_state('8ep', epoch=3),
                                                                                  Event.EPOCH_END)
    with pytest.raises(ValueError, match=r"every='0.25dur' with max_duration='2ep' needs a sized train dataloader"):
        Interval(parse_interval('0.25dur', 'every'), 'every').resolve(_state('2ep'))


# --- unwrapping ----------------------------------------------------------------------------------------------


def test_unwrap_parallel_removes_nested_wrappers():
    inner = nn.Linear(2, 2)
    assert unwrap_parallel(nn.DataParallel(nn.DataParallel(inner))) is inner
    assert unwrap_parallel(inner) is inner
    compiled = torch.compile(inner)
    assert unwrap_parallel(nn.DataParallel(compiled)) is inner


# --- checkpoints ---------------------------------------------------------------------------------------------


def test_load_module_loads_weights_with_a_wrapper_prefix(tmp_path):
    source = nn.Sequential(nn.Linear(3, 2))
    torch.save({'state': {'model': {f'module.{k}': v for k, v in source.state_dict().items()}}}, tmp_path / 'c.pt')
    target = load_module(tmp_path / 'c.pt', model=nn.Sequential(nn.Linear(3, 2)), role='teacher')
    assert torch.equal(target[0].weight, source[0].weight)
    with pytest.raises(ValueError, match=r'do not fit the teacher architecture Sequential'):
        load_module(tmp_path / 'c.pt', model=nn.Sequential(nn.Linear(4, 2)), role='teacher')


def test_load_checkpoint_is_safe_by_default_and_pickled_only_when_asked(tmp_path):
    torch.save(nn.Linear(2, 2), tmp_path / 'pickled.pt')
    with pytest.raises(ValueError, match=r'cannot be loaded with weights_only=True.*weights_only=False if you trust'):
        load_module(tmp_path / 'pickled.pt', role='teacher')
    assert isinstance(load_module(tmp_path / 'pickled.pt', weights_only=False), nn.Linear)
    with pytest.raises(ValueError, match=r'holds weights but no architecture'):
        torch.save(nn.Linear(2, 2).state_dict(), tmp_path / 'weights.pt')
        load_module(tmp_path / 'weights.pt')


def test_load_checkpoint_names_a_directory_a_missing_file_and_garbage(tmp_path):
    with pytest.raises(ValueError, match=r'is a directory, not a checkpoint file\. Fix: pass the file inside it'):
        load_checkpoint(tmp_path, what='teacher checkpoint')
    with pytest.raises(ValueError, match=r"the teacher checkpoint '.*missing.pt' does not exist"):
        load_checkpoint(tmp_path / 'missing.pt', what='teacher checkpoint')
    (tmp_path / 'garbage.pt').write_bytes(b'not a checkpoint at all' * 10)
    with pytest.raises(ValueError, match=r'is not a readable checkpoint') as raised:
        load_checkpoint(tmp_path / 'garbage.pt')
    assert 'weights_only=False' not in str(raised.value)  # no unsafe advice for a file that is no checkpoint
    with pytest.raises(TypeError, match=r'weights_only=0 is a int, not a bool'):
        load_checkpoint(tmp_path / 'garbage.pt', weights_only=0)


def test_model_state_dict_finds_the_weights_in_each_layout(tmp_path):
    weights = {'w': torch.ones(1)}
    assert model_state_dict({'state': {'model': weights}}, 'p') is weights
    assert model_state_dict({'state_dict': weights}, 'p') is weights
    assert model_state_dict(weights, 'p') is weights
    with pytest.raises(ValueError, match='holds no model state dict'):
        model_state_dict({'optimizer': 1}, 'p')
    model = nn.Linear(1, 1, bias=False)
    load_weights(model, {'model.weight': torch.full((1, 1), 3.0)}, 'p')
    assert model.weight.item() == 3.0


# --- provenance ----------------------------------------------------------------------------------------------


def test_ids_sha256_is_the_int64_digest_whatever_the_input_dtype():
    expected = hashlib.sha256(np.array([3, 1, 2], dtype=np.int64).tobytes()).hexdigest()
    assert ids_sha256([3, 1, 2]) == ids_sha256(np.array([3, 1, 2], dtype=np.int32)) == expected
    assert ids_sha256([1, 2, 3]) != expected  # order matters


def test_json_and_file_digests_depend_on_content_only(tmp_path):
    assert json_sha256({'a': 1, 'b': [2]}) == json_sha256({'b': [2], 'a': 1})
    (tmp_path / 'x').write_bytes(b'abc' * 1000)
    assert file_sha256(tmp_path / 'x') == hashlib.sha256(b'abc' * 1000).hexdigest()


def test_tensors_sha256_changes_with_one_bit_and_not_with_key_order():
    a = {'w': torch.arange(6, dtype=torch.float32).reshape(2, 3), 'b': torch.zeros(2)}
    b = {'b': torch.zeros(2), 'w': torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    assert tensors_sha256(a) == tensors_sha256(b)
    flipped = {k: v.clone() for k, v in a.items()}
    flipped['w'].view(torch.int32)[0, 0] ^= 1  # the lowest mantissa bit of one weight
    assert tensors_sha256(flipped) != tensors_sha256(a)
    # The float sum a checksum would use cannot see a swap; the digest does.
    swapped = {'w': a['w'].flip(1), 'b': a['b']}
    assert float(swapped['w'].sum()) == float(a['w'].sum()) and tensors_sha256(swapped) != tensors_sha256(a)
    assert tensors_sha256({'w': a['w'].reshape(3, 2), 'b': a['b']}) != tensors_sha256(a)  # shape is part of it


def test_chunks_sha256_is_the_digest_of_the_concatenation():
    assert chunks_sha256([b'a', b'bc']) == bytes_sha256(b'abc') == hashlib.sha256(b'abc').hexdigest()
    assert chunks_sha256([]) == bytes_sha256(b'')


def test_time_string_is_short_and_exact():
    assert time_string(Time(2.0, TimeUnit.DURATION)) == '2dur'
    assert time_string(Time(1 / 3, TimeUnit.DURATION)) == f'{1 / 3!r}dur'
    assert Time.from_timestring(time_string(Time(1 / 3, TimeUnit.DURATION))).value == 1 / 3
