"""FSDP2 on CPU (gloo): the gradient-sum behaviour that users meet, and the runner's warning about it.

Composer 0.32.1 runs FSDP2 on CPU with gloo (``parallelism_config={'fsdp': FSDP2Config()}``, weights become
``DTensor`` s). torch's FSDP2 reduce-scatters gradients with ``ReduceOp.AVG``, which gloo does not have: it sums.
The first test pins that down (if torch or gloo ever average, it fails and the warning must go).
"""

from __future__ import annotations

import warnings

import pytest

from composer_ext.testing import differences, run_ddp_and_fsdp2, run_distributed

pytestmark = pytest.mark.distributed


def _train(kind: str, lr: float) -> dict:
    import torch
    from composer import Trainer
    from composer.models import ComposerClassifier
    from composer.utils import dist
    from composer.utils.parallelism import FSDP2Config
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    model = ComposerClassifier(net, num_classes=3)
    generator = torch.Generator().manual_seed(1)
    dataset = TensorDataset(torch.randn(64, 8, generator=generator), torch.randint(0, 3, (64,), generator=generator))
    loader = DataLoader(dataset, batch_size=8, sampler=dist.get_sampler(dataset, shuffle=False))
    parallelism = {'parallelism_config': {'fsdp': FSDP2Config()}} if kind == 'fsdp2' else {}
    trainer = Trainer(model=model, train_dataloader=loader, max_duration='4ba', device='cpu', progress_bar=False,
                      optimizers=torch.optim.SGD(model.parameters(), lr=lr), **parallelism)
    trainer.fit()
    weights = {}
    for name, parameter in model.named_parameters():
        sharded = type(parameter).__name__ == 'DTensor' or hasattr(parameter, 'full_tensor')
        full = parameter.full_tensor() if sharded else parameter
        weights[name] = (sharded, full.detach().flatten().tolist())
    trainer.close()
    return weights


def _ddp_and_fsdp2() -> dict:
    return {'ddp@0.1': _train('ddp', 0.1), 'fsdp2@0.1': _train('fsdp2', 0.1), 'fsdp2@0.05': _train('fsdp2', 0.05)}


def test_fsdp2_on_gloo_sums_gradients_where_ddp_averages():
    runs = run_distributed(_ddp_and_fsdp2, world_size=2, env={'FSDP_VERSION': '2'})[0]
    ddp, fsdp2_same_lr, fsdp2_half_lr = runs['ddp@0.1'], runs['fsdp2@0.1'], runs['fsdp2@0.05']
    assert all(sharded for sharded, _ in fsdp2_half_lr.values()) and not any(s for s, _ in ddp.values())
    for name, (_, weights) in ddp.items():
        assert fsdp2_half_lr[name][1] == weights, name  # lr / world_size under FSDP2 == lr under DDP, bit for bit
    assert any(fsdp2_same_lr[name][1] != weights for name, (_, weights) in ddp.items())


def _build_and_record_warnings(yaml: str, overrides: list) -> list:
    from composer_ext.config import load_config
    from composer_ext.runner import FSDP2GlooGradientWarning, build_trainer

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        trainer = build_trainer(load_config(yaml, overrides))
    trainer.close()
    return [str(w.message) for w in caught if issubclass(w.category, FSDP2GlooGradientWarning)]


def test_the_runner_warns_when_fsdp2_runs_on_gloo(corpus):
    overrides = ['device=cpu', 'parallelism={fsdp: {}}', 'max_duration=1ba', 'eval_loaders=[]', 'algorithms={}']
    messages = run_distributed(_build_and_record_warnings, world_size=2, args=('yamls/quickstart.yaml', overrides),
                               env={'FSDP_VERSION': '2'})
    assert len(messages) == 2 and all(len(m) == 1 for m in messages), messages
    assert 'gloo sums the 2 ranks\' gradients' in messages[0][0] and 'divide optimizer.lr by 2' in messages[0][0]
    # DDP on 2 ranks (no parallelism) and FSDP2 on 1 process: no warning
    assert run_distributed(_build_and_record_warnings, world_size=2, args=('yamls/quickstart.yaml', overrides[:1]
                                                                           + overrides[2:])) == [[], []]


def _plain_classifier(parallelism, steps: int) -> dict:
    import torch
    from composer import Trainer
    from composer.models import ComposerClassifier
    from composer.utils import dist
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    model = ComposerClassifier(net, num_classes=3)
    generator = torch.Generator().manual_seed(1)
    dataset = TensorDataset(torch.randn(64, 8, generator=generator), torch.randint(0, 3, (64,), generator=generator))
    loader = DataLoader(dataset, batch_size=8, sampler=dist.get_sampler(dataset, shuffle=False))
    trainer = Trainer(model=model, train_dataloader=loader, max_duration=f'{steps}ba', device='cpu',
                      progress_bar=False, optimizers=torch.optim.SGD(model.parameters(), lr=0.1 * parallelism.lr_scale),
                      **parallelism.trainer_kwargs())
    trainer.fit()
    sharded = all(hasattr(p, 'full_tensor') for p in model.parameters())
    result = {'sharded': sharded, 'lr_scale': parallelism.lr_scale, 'weights': parallelism.full_state(model)}
    trainer.close()
    return result


def test_run_ddp_and_fsdp2_trains_both_at_the_same_effective_learning_rate():
    runs = run_ddp_and_fsdp2(_plain_classifier, args=(4,))
    assert [r['sharded'] for r in runs['ddp']] == [False, False] and [r['sharded'] for r in runs['fsdp2']] == [True] * 2
    assert runs['ddp'][0]['lr_scale'] == 1.0 and runs['fsdp2'][0]['lr_scale'] == 0.5
    assert differences(runs['ddp'][0]['weights'], runs['fsdp2'][0]['weights']) == []  # bit for bit
    assert differences(runs['fsdp2'][0]['weights'], runs['fsdp2'][1]['weights']) == []  # every rank sees the whole


def test_differences_names_each_mismatch_and_validates_its_tolerance():
    from composer_ext.testing import Parallelism

    assert differences({'a': [1.0, float('nan')], 'b': 'x'}, {'a': [1.0, float('nan')], 'b': 'x'}) == []
    assert differences({'a': [1.0, 2.0], 'c': 1}, {'a': [1.0], 'd': 1}) == ['a: length 2 != 1', 'c: only in expected',
                                                                           'd: only in actual']
    assert differences([1.0], [1.0 + 1e-7], rtol=1e-6) == [] and differences([True], [1]) == ['[0]: True != 1']
    with pytest.raises(ValueError, match=r'atol=-1.*Fix: use values >= 0'):
        differences(1, 1, atol=-1)
    with pytest.raises(ValueError, match=r"kind='fsdp'.*Fix: use one of \('ddp', 'fsdp2'\)"):
        Parallelism('fsdp')
    with pytest.raises(ValueError, match=r"kind='ddp'.*Fix: use kind='fsdp2'"):
        Parallelism('ddp', {'state_dict_type': 'full'})
    with pytest.raises(ValueError, match=r'world_size=1 leaves nothing to shard'):
        run_ddp_and_fsdp2(_plain_classifier, world_size=1)
