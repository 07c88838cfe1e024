"""LoRAProbe on 2 gloo ranks: metrics reduced over ranks (DDP), spectra from gathered FSDP1/FSDP2 shards."""

import pytest
import torch

from composer_ext.testing import run_distributed

pytestmark = pytest.mark.distributed


def _ddp_body(folder):
    from composer import Trainer
    from composer.core import Evaluator
    from composer.optim import DecoupledAdamW
    from composer.utils import dist

    from composer_ext.callbacks import LoRAProbe
    from composer_ext.data import build_image_dataloader
    from composer_ext.models import small_vgg

    def loader():
        return build_image_dataloader('digits', 40, split='test', shuffle=False)

    torch.manual_seed(0)
    model = small_vgg(widths=[8, 16])
    probe = LoRAProbe([Evaluator(label='source', dataloader=loader())], [Evaluator(label='target',
                                                                                   dataloader=loader())],
                      every='1ba', spectrum_every='2ba', save_folder=folder)
    trainer = Trainer(model=model, train_dataloader=build_image_dataloader('digits', 32), max_duration='3ba',
                      optimizers=DecoupledAdamW(model.parameters(), lr=1e-3), callbacks=[probe],
                      progress_bar=False, device='cpu', seed=3)
    trainer.fit()
    # The loss over the union of both ranks' shards, by hand, with the final weights.
    network = trainer.state.model.module if hasattr(trainer.state.model, 'module') else trainer.state.model
    total, count = torch.zeros(2), 0
    network.eval()
    with torch.no_grad():
        for images, labels in loader():
            logits = network((images, labels))
            total[0] += torch.nn.functional.cross_entropy(logits, labels, reduction='sum')
            total[1] += (logits.argmax(1) == labels).sum()
            count += len(labels)
    counts = torch.tensor([float(count)])
    dist.all_reduce(total)
    dist.all_reduce(counts)
    by_hand = {'CrossEntropy': float(total[0] / counts[0]), 'MulticlassAccuracy': float(total[1] / counts[0]),
               'local_samples': count}
    result = {'history': probe.history, 'by_hand': by_hand, 'baseline_bytes': probe.tracker.baseline_bytes}
    trainer.close()
    return result


def test_ddp_metrics_are_reduced_and_every_rank_holds_the_same_history(tmp_path):
    first, second = run_distributed(_ddp_body, world_size=2, args=(str(tmp_path),), timeout=600)
    assert first['history'] == second['history']
    assert [r['batch'] for r in first['history']] == [0, 1, 2, 3]
    assert 'spectrum' in first['history'][2] and 'spectrum' in first['history'][3]
    final = first['history'][-1]['metrics']['target']['target']
    assert first['by_hand']['local_samples'] == 160  # each rank saw its own half of the evaluation set
    for name in ('CrossEntropy', 'MulticlassAccuracy'):
        assert first['by_hand'][name] == pytest.approx(second['by_hand'][name], rel=1e-6)
        assert final[name] == pytest.approx(first['by_hand'][name], rel=1e-5)  # reduced over both halves
    # Only rank 0 keeps the initial weights and writes the history.
    assert first['baseline_bytes'] > 0 and second['baseline_bytes'] == 0
    assert (tmp_path / 'lora_probe.json').exists()


def _fsdp_body(kind, lora):
    import peft
    from composer.utils import dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block

    from composer_ext.lora_probe.discovery import canonical_name as _clean, find_probed_modules
    from composer_ext.lora_probe.tracker import DeltaWTracker
    from composer_ext.lora_probe.lora import lora_config
    from composer_ext.metrics import delta_w_spectrum
    from composer_ext.models import small_gpt

    torch.manual_seed(0)
    model = small_gpt(n_layer=2, n_embd=32, n_head=2, n_positions=32).model
    if lora:
        model = peft.get_peft_model(model, lora_config(r=3, model=model, dropout=0.0))
    unwrapped = {m.name: m for m in find_probed_modules(model)}
    initial = {name: (m.module.weight.T if m.module.__class__.__name__ == 'Conv1D' else m.module.weight).detach()
               .clone() for name, m in unwrapped.items() if m.kind == 'full'}
    if kind == 'fsdp1':
        import warnings

        from torch.distributed.fsdp.wrap import ModuleWrapPolicy
        warnings.filterwarnings('ignore', message='.*has both parameters with requires_grad=True and False')
        model = FSDP(model, auto_wrap_policy=ModuleWrapPolicy({GPT2Block}), use_orig_params=True,
                     device_id=torch.device('cpu'))
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh('cpu', (dist.get_world_size(),))
        for module in list(model.modules()):
            if isinstance(module, GPT2Block):
                fully_shard(module, mesh=mesh)
        fully_shard(model, mesh=mesh)
    tracker = DeltaWTracker(model, 'auto')
    calls, summon = [], FSDP.summon_full_params

    def recording_summon(module, *args, **kwargs):  # record every gather the tracker asks for
        calls.append((module is model, kwargs.get('recurse'), kwargs.get('rank0_only')))
        return summon(module, *args, **kwargs)

    FSDP.summon_full_params = staticmethod(recording_summon)
    tracker.capture()  # before the first forward: FSDP1's root must not be mis-initialised by an inner gather
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 4096, (4, 32), generator=generator) for _ in range(3)]
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for tokens in batches:
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    spectra = tracker.spectra()
    FSDP.summon_full_params = staticmethod(summon)
    # The reference: every full weight at once (fine for a test model), the update by hand.
    if kind == 'fsdp1':
        with FSDP.summon_full_params(model, writeback=False):
            full = {_clean(k): v.detach().clone() for k, v in model.named_parameters()}
    else:
        full = {k: v.full_tensor().detach().clone() for k, v in model.named_parameters()}
    if dist.get_global_rank() != 0:
        return {'spectra': {k: v.as_dict() for k, v in spectra.items()}}
    reference = {}
    for name, entry in unwrapped.items():
        if entry.kind == 'full':
            weight = full[f'{entry.path}.weight']
            delta = (weight.T if entry.module.__class__.__name__ == 'Conv1D' else weight) - initial[name]
        else:
            a, b = full[f'{entry.path}.lora_A.default.weight'], full[f'{entry.path}.lora_B.default.weight']
            delta = entry.module.scaling['default'] * b @ a
        reference[name] = delta_w_spectrum(delta).as_dict()
    return {'spectra': {k: v.as_dict() for k, v in spectra.items()}, 'reference': reference, 'gathers': calls,
            'units': len(FSDP.fsdp_modules(model)) if kind == 'fsdp1' else None}


def _all_fsdp_cases():
    return {(kind, lora): _fsdp_body(kind, lora) for kind in ('fsdp1', 'fsdp2') for lora in (False, True)}


def test_fsdp_spectra_match_the_unsharded_update_and_gather_one_unit_at_a_time():
    first, second = run_distributed(_all_fsdp_cases, world_size=2, timeout=600)
    for case, result in first.items():
        kind, lora = case
        assert result['spectra'] == second[case]['spectra'], case  # broadcast: every rank holds rank 0's result
        assert set(result['spectra']) == set(result['reference']) and len(result['reference']) == 8, case
        for name, reference in result['reference'].items():
            measured = result['spectra'][name]
            assert measured['rank_at_energy'] == reference['rank_at_energy'], (case, name)
            assert measured['frobenius_norm'] == pytest.approx(reference['frobenius_norm'], rel=1e-4), (case, name)
            if lora:
                assert 1 <= measured['rank_at_energy'] <= 3
        if kind == 'fsdp1':
            # Per pass (capture, spectra): one gather per transformer block, never recursive, full only on rank 0.
            assert result['gathers'] == [(False, False, True)] * 4, (case, result['gathers'])
