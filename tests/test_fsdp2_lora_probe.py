"""LoRAProbe / DeltaWTracker under FSDP2 (2 gloo ranks): the same history as under DDP, W0 kept per shard, one
module gathered at a time (measured), and resume from a sharded checkpoint."""

from __future__ import annotations

import pytest

from composer_ext.testing import differences, run_ddp_and_fsdp2, run_distributed

pytestmark = pytest.mark.distributed

_SHAPES = [(8, 13), (13, 7), (7, 3)]  # Linear (in, out): 13, 7 and 3 rows, split unevenly over 2 ranks


def _network():
    import torch

    torch.manual_seed(0)
    layers = []
    for i, (fan_in, fan_out) in enumerate(_SHAPES):
        layers += [torch.nn.Linear(fan_in, fan_out)] + ([torch.nn.ReLU()] if i < len(_SHAPES) - 1 else [])
    return torch.nn.Sequential(*layers)


def _loader(n: int, seed: int, batch_size: int = 8):
    import torch
    from composer.utils import dist
    from torch.utils.data import DataLoader, TensorDataset

    generator = torch.Generator().manual_seed(seed)
    dataset = TensorDataset(torch.randn(n, 8, generator=generator), torch.randint(0, 3, (n,), generator=generator))
    return DataLoader(dataset, batch_size=batch_size, sampler=dist.get_sampler(dataset, shuffle=False))


def _probe_run(parallelism, folder=None, kill=None, load_path=None, fsdp=None) -> dict:
    import torch
    from composer import Trainer
    from composer.core import Evaluator
    from composer.models import ComposerClassifier
    from composer.utils.parallelism import FSDP2Config

    from composer_ext.callbacks import LoRAProbe
    from composer_ext.core.sharding import GatherMeter
    from composer_ext.testing import KillAt, Killed

    model = ComposerClassifier(_network(), num_classes=3)
    probe = LoRAProbe([Evaluator(label='source', dataloader=_loader(32, 5))],
                      [Evaluator(label='target', dataloader=_loader(32, 6))], every='2ba', spectrum_every='2ba')
    kwargs = parallelism.trainer_kwargs() if fsdp is None else {'parallelism_config': {'fsdp': FSDP2Config(**fsdp)}}
    lr = 0.1 * (parallelism.lr_scale if fsdp is None else 0.5)
    # (torch 2.7 cannot load a full checkpoint's empty optimizer state under FSDP2: momentum gives it a state)
    momentum = 0.0 if fsdp is None else 0.9
    trainer = Trainer(model=model, train_dataloader=_loader(64, 1), max_duration='6ba', device='cpu',
                      progress_bar=False, optimizers=torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum),
                      callbacks=[probe] + ([KillAt(kill)] if kill else []), save_folder=folder,
                      save_interval='3ba' if folder else '1ep', load_path=load_path, **kwargs)
    with GatherMeter() as meter:
        try:
            trainer.fit()
        except Killed:
            trainer.close()
            return {}
    result = {'history': probe.history, 'baseline_bytes': probe.tracker.baseline_bytes,
              'peak_gathered': meter.peak_bytes, 'gathered': meter.sizes,
              'weights': parallelism.full_state(model)}
    trainer.close()
    return result


def _lora_tracker_run(parallelism) -> dict:
    """A peft LoRA model, trained by hand (FSDP2: ``fully_shard``), measured by DeltaWTracker."""
    import peft
    import torch
    from composer.utils import dist

    from composer_ext.core.sharding import GatherMeter
    from composer_ext.lora_probe.tracker import DeltaWTracker

    model = peft.get_peft_model(_network(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=['0', '2', '4'],
                                                             lora_dropout=0.0, init_lora_weights='gaussian'))
    if parallelism.kind == 'fsdp2':
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        fully_shard(model, mesh=init_device_mesh('cpu', (dist.get_world_size(),)))
    tracker = DeltaWTracker(model, 'auto')
    tracker.capture()
    generator = torch.Generator().manual_seed(3)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.2 * parallelism.lr_scale)
    for _ in range(3):  # the same batch on every rank: FSDP2 on gloo sums the two equal gradients (lr_scale)
        inputs, labels = torch.randn(16, 8, generator=generator), torch.randint(0, 3, (16,), generator=generator)
        torch.nn.functional.cross_entropy(model(inputs), labels).backward()
        optimizer.step()
        optimizer.zero_grad()
    with GatherMeter() as meter:
        spectra = tracker.spectra()
    return {'spectra': {name: s.as_dict() for name, s in spectra.items()}, 'baseline_bytes': tracker.baseline_bytes,
            'peak_gathered': meter.peak_bytes, 'gathered': meter.sizes}


def _both(parallelism) -> dict:
    return {'full': _probe_run(parallelism), 'lora': _lora_tracker_run(parallelism)}


def _spectra_and_metrics(history: list) -> list:
    return [{key: record[key] for key in ('batch', 'metrics', 'spectrum') if key in record} for record in history]


def test_lora_probe_under_fsdp2_matches_ddp_keeps_w0_per_shard_and_gathers_one_module_at_a_time():
    runs = run_ddp_and_fsdp2(_both)
    ddp, fsdp2 = runs['ddp'][0]['full'], runs['fsdp2'][0]['full']
    assert [r['batch'] for r in ddp['history']] == [0, 2, 4, 6]
    assert all('spectrum' in r for r in ddp['history'][1:])
    # The same learning/forgetting metrics and spectra, within float tolerance
    assert differences(_spectra_and_metrics(ddp['history']), _spectra_and_metrics(fsdp2['history']),
                       atol=1e-6, rtol=1e-5) == []
    assert differences(fsdp2['history'], runs['fsdp2'][1]['full']['history']) == []  # every rank: the same history
    assert differences(ddp['weights'], fsdp2['weights'], atol=1e-6) == []
    # W0: DDP keeps the whole on rank 0; FSDP2 keeps each rank's rows: at most half the whole plus one row per tensor
    whole = sum(4 * fan_out * fan_in for fan_in, fan_out in _SHAPES)
    one_row_each = sum(4 * fan_in for fan_in, _ in _SHAPES)
    assert ddp['baseline_bytes'] == whole and runs['ddp'][1]['full']['baseline_bytes'] == 0
    per_rank = [runs['fsdp2'][rank]['full']['baseline_bytes'] for rank in (0, 1)]
    assert sum(per_rank) == whole and all(0 < b <= whole / 2 + one_row_each for b in per_rank), per_rank
    # A spectrum pass gathers one module's ΔW at a time: the peak is the largest module, not the model
    largest = max(4 * fan_out * fan_in for fan_in, fan_out in _SHAPES)
    assert ddp['peak_gathered'] == 0 and ddp['gathered'] == []
    for rank in (0, 1):
        run = runs['fsdp2'][rank]['full']
        assert run['peak_gathered'] == largest < whole, run['peak_gathered']
        assert sorted(set(run['gathered'])) == sorted(4 * o * i for i, o in _SHAPES)
        assert len(run['gathered']) == 3 * len(_SHAPES)  # three spectrum passes, one gather per module

    ddp, fsdp2 = runs['ddp'][0]['lora'], runs['fsdp2'][0]['lora']
    assert set(ddp['spectra']) == set(fsdp2['spectra']) and len(ddp['spectra']) == 3
    assert differences(ddp['spectra'], fsdp2['spectra'], atol=1e-6, rtol=1e-4) == []
    assert all(1 <= s['rank_at_energy'] <= 2 for s in fsdp2['spectra'].values())
    lora_whole = sum(4 * 2 * (fan_in + fan_out) for fan_in, fan_out in _SHAPES)  # A (2 x in) + B (out x 2)
    lora_per_rank = [runs['fsdp2'][rank]['lora']['baseline_bytes'] for rank in (0, 1)]
    assert ddp['baseline_bytes'] == lora_whole and sum(lora_per_rank) == lora_whole
    assert all(b <= lora_whole / 2 + one_row_each for b in lora_per_rank)
    # Per module: its factors now and at the start (4 tensors), released before the next module
    largest_lora = max(2 * 4 * 2 * (fan_in + fan_out) for fan_in, fan_out in _SHAPES)
    assert fsdp2['peak_gathered'] == largest_lora < 2 * lora_whole


def _resume(folder: str) -> dict:
    from composer_ext.testing import Parallelism

    fsdp2 = Parallelism('fsdp2')
    results = {}
    for checkpoints in ('sharded', 'full'):
        fsdp = {'state_dict_type': checkpoints}
        whole = _probe_run(fsdp2, fsdp=fsdp)
        _probe_run(fsdp2, folder=f'{folder}/{checkpoints}', kill=3, fsdp=fsdp)
        load = f'{folder}/{checkpoints}/ep0-ba3' + ('' if checkpoints == 'sharded' else '-rank0.pt')
        resumed = _probe_run(fsdp2, load_path=load, fsdp=fsdp)
        results[checkpoints] = {'whole': whole, 'resumed': resumed}
    return results


def test_lora_probe_resumes_under_fsdp2_from_sharded_and_full_checkpoints(tmp_path):
    results = run_distributed(_resume, world_size=2, args=(str(tmp_path),), env={'FSDP_VERSION': '2'})
    for rank in (0, 1):
        for checkpoints in ('sharded', 'full'):
            whole, resumed = results[rank][checkpoints]['whole'], results[rank][checkpoints]['resumed']
            assert differences(_spectra_and_metrics(whole['history']), _spectra_and_metrics(resumed['history'])) == []
            assert differences(whole['weights'], resumed['weights']) == [], (rank, checkpoints)
            assert resumed['baseline_bytes'] == whole['baseline_bytes']
