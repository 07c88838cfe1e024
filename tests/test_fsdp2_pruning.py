"""MagnitudePruning under FSDP2 (2 gloo ranks): the distributed k-th value, masks equal to DDP's at every update,
and exact resume from sharded and full checkpoints."""

from __future__ import annotations

import pytest

from composer_ext.testing import differences, run_ddp_and_fsdp2, run_distributed

pytestmark = pytest.mark.distributed


# --- the distributed k-th value and selection --------------------------------------------------------------

# Per rank, deliberately uneven (5 values and 3; and a rank with none), with ties across ranks and inside a rank.
_HAND = {0: [1.0, 2.0, 2.0, 0.5, 3.0], 1: [2.0, 0.5, 2.0]}
_HAND_EMPTY = {0: [0.25, -1.0, 0.25], 1: []}


def _kth_values_and_selections() -> dict:
    import torch
    from composer.utils import dist

    from composer_ext.fairness.sharded_ranking import select_lowest_sharded, sharded_kth_value

    rank = dist.get_global_rank()
    result = {'hand': [], 'empty': [], 'random': [], 'selection': []}
    for key, values in (('hand', _HAND), ('empty', _HAND_EMPTY)):
        local = torch.tensor(values[rank])
        total = len(values[0]) + len(values[1])
        result[key] = [sharded_kth_value(local, k) for k in range(1, total + 1)]
    generator = torch.Generator().manual_seed(7)
    for trial in range(6):  # coarse values: many ties; uneven shard sizes that differ per trial
        sizes = [int(torch.randint(0, 40, (1,), generator=generator)) for _ in range(2)]
        sizes[0] += 1
        values = [torch.randint(-4, 5, (n,), generator=generator).float() / 4 for n in sizes]
        whole = torch.cat(values)
        k = int(torch.randint(1, whole.numel() + 1, (1,), generator=generator))
        result['random'].append((sharded_kth_value(values[rank], k), float(torch.kthvalue(whole, k).values)))
    # The tie rule: two pieces (layers) split across the ranks; the budget ends inside the ties.
    pieces = {0: [[0.5, 0.1, 0.1], [0.1, 0.3]], 1: [[0.1, 0.2], [0.1]]}  # piece 0 is rows [r0, r1], then piece 1
    for budget in range(0, 9):
        selected = select_lowest_sharded([[torch.tensor(p) for p in pieces[rank]]],
                                         [[torch.ones(len(p)) for p in pieces[rank]]], [budget + 1e-9])[0]
        result['selection'].append([part.tolist() for part in selected])
    return result


def _stable_prefix(pieces: dict, budget: int) -> list:
    """What the unsharded path selects: the first ``budget`` of a stable argsort of the whole concatenation."""
    import torch

    whole = [value for p in range(2) for rank in (0, 1) for value in pieces[rank][p]]
    chosen = set(torch.argsort(torch.tensor(whole), stable=True)[:budget].tolist())
    flags, position = {0: [[], []], 1: [[], []]}, 0
    for p in range(2):
        for rank in (0, 1):
            for _ in pieces[rank][p]:
                flags[rank][p].append(position in chosen)
                position += 1
    return [flags[0], flags[1]]


def test_sharded_kth_value_equals_kthvalue_of_the_concatenation_with_ties_and_uneven_shards():
    import torch

    results = run_distributed(_kth_values_and_selections, world_size=2)
    for key, values in (('hand', _HAND), ('empty', _HAND_EMPTY)):
        whole = torch.tensor(values[0] + values[1])
        expected = [float(torch.kthvalue(whole, k).values) for k in range(1, whole.numel() + 1)]
        assert results[0][key] == expected and results[1][key] == expected, key
    assert results[0]['hand'] == [0.5, 0.5, 1.0, 2.0, 2.0, 2.0, 2.0, 3.0]  # by hand
    for mine, theirs in results[0]['random']:
        assert mine == theirs
    pieces = {0: [[0.5, 0.1, 0.1], [0.1, 0.3]], 1: [[0.1, 0.2], [0.1]]}
    for budget in range(0, 9):
        expected = _stable_prefix(pieces, budget)
        assert [results[0]['selection'][budget], results[1]['selection'][budget]] == expected, budget
    # budget 2 ends inside the 0.1 ties: rank 0's two ties of layer 0 come first, rank 1's does not fit
    assert results[0]['selection'][2] == [[False, True, True], [False, False]]
    assert results[1]['selection'][2] == [[False, False], [False]]


# --- masks under FSDP2 == masks under DDP, at every update --------------------------------------------------


def _pruned_run(parallelism, structure: str, scope: str) -> dict:
    import torch
    from composer import Trainer
    from composer.core import Callback
    from composer.loggers import InMemoryLogger
    from composer.models import ComposerClassifier
    from composer.utils import dist
    from torch.utils.data import DataLoader, TensorDataset

    from composer_ext.algorithms import MagnitudePruning
    from composer_ext.core.sharding import sharded_like

    torch.manual_seed(0)
    # Row counts 13, 7, 3: uneven shards on 2 ranks (7/6, 4/3, 2/1).
    net = torch.nn.Sequential(torch.nn.Linear(8, 13), torch.nn.ReLU(), torch.nn.Linear(13, 7), torch.nn.ReLU(),
                              torch.nn.Linear(7, 3))
    with torch.no_grad():  # coarse weights: many equal magnitudes, so the first ranking is decided by the tie rule
        for layer in (net[0], net[2], net[4]):
            layer.weight.copy_(torch.round(layer.weight * 8) / 8)
    initial = {f'module.{i}.weight': net[i].weight.detach().flatten().tolist() for i in (0, 2, 4)}
    model = ComposerClassifier(net, num_classes=3)
    generator = torch.Generator().manual_seed(1)
    dataset = TensorDataset(torch.randn(64, 8, generator=generator), torch.randint(0, 3, (64,), generator=generator))
    loader = DataLoader(dataset, batch_size=8, sampler=dist.get_sampler(dataset, shuffle=False))
    pruning = MagnitudePruning(0.6, start='0ba', end='4ba', interval='1ba', structure=structure, scope=scope,
                               initial_sparsity=0.3,
                               prune_output_layer=True)

    class RecordMasks(Callback):  # runs after the algorithm on the same event
        def __init__(self):
            self.masks = []

        def _record(self):
            whole = {}
            for name, module in pruning._layers:
                mask = pruning.masks[f'{name}.weight']
                whole[name] = sharded_like(mask, module.weight).full_tensor().flatten().tolist() if hasattr(
                    module.weight, 'full_tensor') else mask.flatten().tolist()
            self.masks.append(whole)

        def fit_start(self, state, logger):
            self._record()

        def batch_end(self, state, logger):
            self._record()

    record, logger = RecordMasks(), InMemoryLogger()
    trainer = Trainer(model=model, train_dataloader=loader, max_duration='6ba', device='cpu', progress_bar=False,
                      optimizers=torch.optim.SGD(model.parameters(), lr=0.1 * parallelism.lr_scale),
                      algorithms=[pruning], callbacks=[record], loggers=[logger], **parallelism.trainer_kwargs())
    trainer.fit()
    logged = {key: [value for _, value in logger.data[key]] for key in ('pruning/sparsity', 'pruning/target_sparsity')}
    result = {'masks': record.masks, 'logged': logged, 'weights': parallelism.full_state(model), 'initial': initial,
              'sharded': all(hasattr(p, 'full_tensor') for p in model.parameters())}
    trainer.close()
    return result


def _both_structures(parallelism) -> dict:
    return {'unstructured-global': _pruned_run(parallelism, 'unstructured', 'global'),
            'filter-layer': _pruned_run(parallelism, 'filter', 'layer')}


def test_masks_under_fsdp2_equal_ddp_masks_at_every_update():
    runs = run_ddp_and_fsdp2(_both_structures)
    for variant in ('unstructured-global', 'filter-layer'):
        ddp, fsdp2 = runs['ddp'][0][variant], runs['fsdp2'][0][variant]
        assert fsdp2['sharded'] and not ddp['sharded']
        assert len(ddp['masks']) == 7  # FIT_START and 6 batch ends; pruning updates at 0, 1, 2, 3, 4
        assert differences(ddp['masks'], fsdp2['masks']) == [], variant  # exact, every update
        assert differences(fsdp2['masks'], runs['fsdp2'][1][variant]['masks']) == []
        assert len(ddp['logged']['pruning/sparsity']) == 5
        assert differences(ddp['logged'], fsdp2['logged']) == [], variant
        assert differences(ddp['weights'], fsdp2['weights'], atol=1e-6) == [], variant
        assert ddp['masks'][-1] != ddp['masks'][1]  # the masks did change over the window
    # The first ranking had ties at the threshold, split between pruned and kept: the tie rule decided it.
    ddp = runs['ddp'][0]['unstructured-global']
    magnitudes = [abs(w) for name in ('module.0', 'module.2', 'module.4') for w in ddp['initial'][f'{name}.weight']]
    kept = [keep for name in ('module.0', 'module.2', 'module.4') for keep in ddp['masks'][0][name]]
    threshold = max(m for m, keep in zip(magnitudes, kept) if not keep)
    tied = [keep for m, keep in zip(magnitudes, kept) if m == threshold]
    assert True in tied and False in tied


# --- resume under FSDP2 from sharded and full checkpoints --------------------------------------------------


def _resume_runs(folder: str) -> dict:
    import torch
    from composer import Trainer
    from composer.loggers import InMemoryLogger
    from composer.models import ComposerClassifier
    from composer.utils import dist
    from composer.utils.parallelism import FSDP2Config
    from torch.utils.data import DataLoader, TensorDataset

    from composer_ext.algorithms import MagnitudePruning
    from composer_ext.testing import KillAt, Killed, Parallelism

    def run(checkpoints: str, name: str, kill=None, load_path=None):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(8, 13), torch.nn.ReLU(), torch.nn.Linear(13, 3))
        model = ComposerClassifier(net, num_classes=3)
        generator = torch.Generator().manual_seed(1)
        dataset = TensorDataset(torch.randn(64, 8, generator=generator),
                                torch.randint(0, 3, (64,), generator=generator))
        loader = DataLoader(dataset, batch_size=8, sampler=dist.get_sampler(dataset, shuffle=False))
        pruning = MagnitudePruning(0.7, start='1ba', end='6ba', interval='1ba', prune_output_layer=True)
        logger = InMemoryLogger()
        trainer = Trainer(model=model, train_dataloader=loader, max_duration='8ba', device='cpu', progress_bar=False,
                          optimizers=torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                          algorithms=[pruning], callbacks=[KillAt(kill)] if kill else [], loggers=[logger],
                          parallelism_config={'fsdp': FSDP2Config(state_dict_type=checkpoints)},
                          save_folder=f'{folder}/{checkpoints}-{name}', save_interval='4ba', load_path=load_path)
        if kill:
            try:
                trainer.fit()
            except Killed:
                pass
            trainer.close()
            return None
        trainer.fit()
        result = {'weights': Parallelism.full_state(model), 'local_masks': {k: m.tolist() for k, m in
                                                                           pruning.masks.items()},
                  'logged': [(ts.batch.value, v) for ts, v in logger.data['pruning/sparsity']]}
        trainer.close()
        return result

    results = {}
    for checkpoints in ('sharded', 'full'):
        whole = run(checkpoints, 'whole')
        run(checkpoints, 'killed', kill=4)
        load = f'{folder}/{checkpoints}-killed/ep0-ba4' + ('' if checkpoints == 'sharded' else '-rank0.pt')
        resumed = run(checkpoints, 'resumed', load_path=load)
        results[checkpoints] = {'whole': whole, 'resumed': resumed}
    return results


def test_resume_under_fsdp2_from_sharded_and_full_checkpoints_matches_bit_for_bit(tmp_path):
    results = run_distributed(_resume_runs, world_size=2, args=(str(tmp_path),), env={'FSDP_VERSION': '2'})
    assert (tmp_path / 'sharded-killed' / 'ep0-ba4').is_dir()  # a sharded (distcp) checkpoint
    for rank in (0, 1):
        for checkpoints in ('sharded', 'full'):
            whole, resumed = results[rank][checkpoints]['whole'], results[rank][checkpoints]['resumed']
            assert differences(whole['weights'], resumed['weights']) == [], (rank, checkpoints)
            assert differences(whole['local_masks'], resumed['local_masks']) == [], (rank, checkpoints)
            assert resumed['logged'] == [entry for entry in whole['logged'] if entry[0] > 4]
            assert [batch for batch, _ in resumed['logged']] == [5, 6]
    # each rank kept its own rows: 13 rows of layer 0 split 7 / 6
    assert len(results[0]['sharded']['whole']['local_masks']['module.0.weight']) == 7
    assert len(results[1]['sharded']['whole']['local_masks']['module.0.weight']) == 6
