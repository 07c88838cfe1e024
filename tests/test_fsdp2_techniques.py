"""Each technique under FSDP2 against DDP, on 2 gloo ranks (CPU), and its resume from a sharded checkpoint.

Composer 0.32.1's FSDP2 runs on CPU with gloo; gloo sums gradients where DDP averages them, so every FSDP2 run here
trains at ``lr * parallelism.lr_scale`` (see :mod:`composer_ext.testing.parallelism` and ``tests/test_fsdp2.py``).
Each test makes one :func:`run_ddp_and_fsdp2` call: the same tiny model, data and seed under DDP and under FSDP2
(with ``state_dict_type='sharded'``), killed after a checkpoint and resumed, and compares what each run logged and
trained on. The DDP run resumes from a full checkpoint, the FSDP2 run from a sharded one, so each test also shows
that a sharded checkpoint resumes as a full one does.
"""

from __future__ import annotations

import pytest

from composer_ext.testing import differences, run_ddp_and_fsdp2

pytestmark = pytest.mark.distributed

SHARDED = {'state_dict_type': 'sharded'}
ATOL = 1e-6  # float sums over shards may be ordered differently from DDP's; measured differences are far below


def _is_dtensor(tensor) -> bool:
    return hasattr(tensor, 'full_tensor') or type(tensor).__name__ == 'DTensor'


def _mlp_classifier(seed: int, hidden: int = 32):
    """A small MLP on 8x8 digits (flattened to 64 inputs), as a Composer classifier."""
    import torch
    from composer.models import ComposerClassifier

    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, hidden), torch.nn.ReLU(),
                              torch.nn.Linear(hidden, 10))
    return ComposerClassifier(net, num_classes=10)


def _checkpoint_path(folder: str, parallelism, batch: int) -> str:
    """Where Composer wrote the checkpoint of ``batch``: a file per rank 0 (full) or a directory of shards."""
    import os

    full = os.path.join(folder, f'ep0-ba{batch}-rank0.pt')
    if parallelism.kind == 'ddp':
        return full
    sharded = os.path.join(folder, f'ep0-ba{batch}')
    assert os.path.isdir(sharded) and any(n.endswith('.distcp') for n in os.listdir(sharded)), os.listdir(folder)
    return sharded


def _uninterrupted_and_resumed(run, parallelism, folder: str, kill: int) -> dict:
    """``run`` uninterrupted, then killed after batch ``kill`` and resumed from that checkpoint (its own folder)."""
    import os

    folder = os.path.join(folder, parallelism.kind)
    runs = {'full': run(parallelism, folder)}
    run(parallelism, folder, kill=kill)
    runs['resumed'] = run(parallelism, folder, load_path=_checkpoint_path(f'{folder}/ckpt', parallelism, kill))
    return runs


def _series(logger, key: str) -> list[float]:
    return [float(value) for _, value in logger.data.get(key, [])]


# --- KnowledgeDistillation ---------------------------------------------------------------------------------------


def _kd_run(parallelism, folder: str, lr: float, kill=None, load_path=None) -> dict:
    """One fit with two teachers from ``folder``; with ``kill``, checkpoints into ``folder/ckpt`` and is killed."""
    import gc
    import weakref

    import torch
    from composer import Trainer
    from composer.core import Callback
    from composer.loggers import InMemoryLogger

    from composer_ext.data import build_image_dataloader
    from composer_ext.distillation import KnowledgeDistillation
    from composer_ext.testing import KillAt

    class Watch(Callback):
        """Per step: whether the step's teacher is a DTensor anywhere, is inside the (wrapped) student, and a weak
        reference to it (to see that unloading after the window drops every reference)."""

        def __init__(self, kd):
            self.kd, self.sharded, self.inside, self.refs = kd, [], [], []

        def after_loss(self, state, logger):
            if not self.kd.current_teachers:
                return
            module = self.kd.teachers[self.kd.current_teachers[0]]
            student = {id(m) for m in state.model.modules()}
            self.sharded.append(any(_is_dtensor(p) for p in module.parameters()))
            self.inside.append(id(module) in student)
            self.refs.append(weakref.ref(module))

    paths = [f'{folder}/teacher{i}.pt' for i in range(2)]
    kd = KnowledgeDistillation(paths, policy='random', end='4ba', seed=None, unload_after_window=True)
    watch, memory = Watch(kd), InMemoryLogger()
    model = _mlp_classifier(0)
    trainer = Trainer(model=model, train_dataloader=build_image_dataloader('digits', 32, seed=2),
                      max_duration='6ba', optimizers=torch.optim.SGD(model.parameters(), lr=lr * parallelism.lr_scale),
                      algorithms=[kd], callbacks=[watch] + ([KillAt(kill)] if kill else []), loggers=[memory],
                      save_folder=f'{folder}/ckpt' if kill else None, save_interval=f'{kill}ba' if kill else '1ep',
                      load_path=load_path, progress_bar=False, seed=7, device='cpu', **parallelism.trainer_kwargs())
    try:
        trainer.fit()
    except Exception as error:  # KillAt: the run is "killed" after its checkpoint
        if type(error).__name__ != 'Killed':
            raise
    gc.collect()
    result = {
        'student_sharded': all(_is_dtensor(p) for p in model.parameters()),
        'teacher_sharded': watch.sharded, 'teacher_inside_student': watch.inside,
        'teachers_after': [t is None for t in kd.teachers], 'teacher_refs_alive': [r() is not None for r in watch.refs],
        'kd/teacher': _series(memory, 'kd/teacher'), 'kd/loss': _series(memory, 'kd/loss'),
        'kd/original_loss': _series(memory, 'kd/original_loss'), 'kd/active': _series(memory, 'kd/active'),
        'loss': _series(memory, 'loss/train/total'), 'weights': parallelism.full_state(model),
    }
    trainer.close()
    return result


def _kd_train(parallelism, folder: str) -> dict:
    import os

    import torch
    from composer.utils import dist

    folder = os.path.join(folder, parallelism.kind)
    if dist.get_global_rank() == 0:  # two frozen teachers on disk (dropped after the window, reloadable)
        os.makedirs(folder, exist_ok=True)
        for i in range(2):
            torch.jit.save(torch.jit.script(_mlp_classifier(10 + i, hidden=48).module), f'{folder}/teacher{i}.pt')
    dist.barrier()
    runs = {'full': _kd_run(parallelism, folder, lr=0.1)}
    if parallelism.kind == 'fsdp2':  # a deliberately wrong learning rate (DDP's, unscaled) must show in the weights
        runs['unscaled_lr'] = _kd_run(parallelism, folder, lr=0.1 / parallelism.lr_scale)
    _kd_run(parallelism, folder, lr=0.1, kill=3)
    runs['resumed'] = _kd_run(parallelism, folder, lr=0.1, load_path=_checkpoint_path(f'{folder}/ckpt', parallelism, 3))
    return runs


def test_knowledge_distillation_under_fsdp2_matches_ddp_and_resumes_from_a_sharded_checkpoint(tmp_path):
    runs = run_ddp_and_fsdp2(_kd_train, args=(str(tmp_path),), fsdp=SHARDED)
    ddp, fsdp2 = runs['ddp'][0]['full'], runs['fsdp2'][0]['full']
    assert not ddp['student_sharded'] and fsdp2['student_sharded']
    # The teacher is deliberately not sharded: it is not part of state.model (which FSDP2 wraps), its parameters are
    # plain tensors on every rank, and every rank runs a whole copy of it.
    assert fsdp2['teacher_sharded'] == [False] * 4 and fsdp2['teacher_inside_student'] == [False] * 4
    # One teacher per step, the same on every rank and under both parallelisms (discrete: exact).
    assert len(ddp['kd/teacher']) == 4 and len(set(ddp['kd/teacher'])) == 2
    for rank in range(2):
        assert runs['fsdp2'][rank]['full']['kd/teacher'] == ddp['kd/teacher']
        assert runs['ddp'][rank]['full']['kd/teacher'] == ddp['kd/teacher']
    assert fsdp2['kd/active'] == ddp['kd/active'] == [1.0] * 4 + [0.0] * 2
    # Unloading after the window dropped every reference to the teachers (loaded from paths: reloadable).
    assert fsdp2['teachers_after'] == [True, True] and fsdp2['teacher_refs_alive'] == [False] * 4
    # Same loss curve, KD metrics and weights within float tolerance.
    keys = ['kd/loss', 'kd/original_loss', 'loss', 'weights']
    assert differences({k: ddp[k] for k in keys}, {k: fsdp2[k] for k in keys}, atol=ATOL) == []
    assert differences(runs['fsdp2'][0]['full']['weights'], runs['fsdp2'][1]['full']['weights']) == []
    # The comparison can fail: FSDP2 at DDP's learning rate (gloo sums gradients) trains other weights.
    assert differences(ddp['weights'], runs['fsdp2'][0]['unscaled_lr']['weights'], atol=ATOL) != []
    # Resume: sharded (FSDP2) and full (DDP) checkpoints continue the uninterrupted run of the same parallelism.
    for kind in ('ddp', 'fsdp2'):
        full, resumed = runs[kind][0]['full'], runs[kind][0]['resumed']
        assert resumed['kd/teacher'] == full['kd/teacher'][3:], kind
        for key in ('kd/loss', 'kd/original_loss', 'loss'):
            assert resumed[key] == full[key][3:], (kind, key)
        assert differences(full['weights'], resumed['weights']) == [], kind  # bit for bit


# --- BiasProbe ---------------------------------------------------------------------------------------------------


def _probe_run(parallelism, folder: str, kill=None, load_path=None) -> dict:
    import torch
    from composer import Trainer
    from composer.core import Callback, Evaluator
    from composer.loggers import InMemoryLogger

    from composer_ext.data import build_image_dataloader
    from composer_ext.fairness.probe import BiasProbe
    from composer_ext.testing import KillAt

    class ShardedAtEval(Callback):
        """Whether the model's weights are sharded when an evaluation starts (after it, FSDP2 leaves the root
        module's weights gathered: an eval forward has no backward that would reshard them)."""

        def __init__(self):
            self.sharded = []

        def eval_start(self, state, logger):
            self.sharded.append(all(_is_dtensor(p) for p in state.model.parameters()))

    reference = _mlp_classifier(1)  # a plain (unsharded) frozen reference; the probed model is the sharded one
    probe = BiasProbe(reference, 'test', layers=['module.1', 'module.2'], num_bootstraps=20, seed=3)
    memory, sharded = InMemoryLogger(), ShardedAtEval()
    model = _mlp_classifier(0)
    test = build_image_dataloader('digits', 120, split='test', shuffle=False, drop_last=False)
    trainer = Trainer(model=model, train_dataloader=build_image_dataloader('digits', 32, seed=2),
                      eval_dataloader=Evaluator(label='test', dataloader=test), eval_interval='2ba',
                      max_duration='4ba', optimizers=torch.optim.SGD(model.parameters(), lr=0.2 * parallelism.lr_scale),
                      callbacks=[sharded, probe] + ([KillAt(kill)] if kill else []), loggers=[memory],
                      save_folder=f'{folder}/ckpt' if kill else None, save_interval=f'{kill}ba' if kill else '1ep',
                      load_path=load_path, progress_bar=False, seed=7, device='cpu', **parallelism.trainer_kwargs())
    try:
        trainer.fit()
    except Exception as error:  # KillAt
        if type(error).__name__ != 'Killed':
            raise
    logged = {key: [(int(t.batch), float(v)) for t, v in series] for key, series in memory.data.items()
              if key.startswith(('bias/', 'similarity/'))}
    records = [{k: v for k, v in record.items() if k != 'run_name'} for record in probe.records]
    result = {'sharded': sharded.sharded,
              'reference_sharded': any(_is_dtensor(p) for p in reference.parameters()),
              'logged': logged, 'records': records}
    trainer.close()
    return result


def _probe_train(parallelism, folder: str) -> dict:
    return _uninterrupted_and_resumed(_probe_run, parallelism, folder, kill=2)


def test_bias_probe_of_a_sharded_model_logs_what_ddp_logs_and_resumes_from_a_sharded_checkpoint(tmp_path):
    runs = run_ddp_and_fsdp2(_probe_train, args=(str(tmp_path),), fsdp=SHARDED)
    ddp, fsdp2 = runs['ddp'][0]['full'], runs['fsdp2'][0]['full']
    assert (fsdp2['sharded'], ddp['sharded'], fsdp2['reference_sharded']) == ([True, True], [False, False], False)
    keys = set(ddp['logged'])
    assert {'bias/test/cev', 'bias/test/sde', 'similarity/test/cka/module.1', 'similarity/test/cka/module.2',
            'similarity/test/cka/logits'} <= keys, sorted(keys)
    assert all(len(series) == 2 for series in ddp['logged'].values())  # evaluations at batches 2 and 4
    # CEV, SDE (and their bootstrap CIs), CKA of both layers and the logits, agreement, KL: as under DDP.
    assert differences(ddp['logged'], fsdp2['logged'], atol=ATOL, rtol=1e-5) == []
    assert differences(ddp['records'], fsdp2['records'], atol=ATOL, rtol=1e-5) == []
    assert differences(fsdp2['logged'], runs['fsdp2'][1]['full']['logged']) == []  # every rank logs the same
    # The comparison can fail: the second evaluation (after training) differs from the first.
    assert ddp['logged']['bias/test/cev'][0][1] != ddp['logged']['bias/test/cev'][1][1]
    # Resume from a sharded (FSDP2) or full (DDP) checkpoint: the same history as the uninterrupted run, exactly.
    for kind in ('ddp', 'fsdp2'):
        full, resumed = runs[kind][0]['full'], runs[kind][0]['resumed']
        assert resumed['records'] == full['records'], kind
        assert resumed['logged'] == {k: [(b, v) for b, v in s if b > 2] for k, s in full['logged'].items()}, kind


# --- DomainUpsampling --------------------------------------------------------------------------------------------


def _mixture_run(parallelism, folder: str, kill=None, load_path=None) -> dict:
    import torch
    from composer import Trainer
    from composer.core import Callback
    from composer.loggers import InMemoryLogger
    from composer.utils import reproducibility

    from composer_ext.domain_upsampling import DomainUpsampling, MixtureSchedule
    from composer_ext.domain_upsampling.mixture import build_mixture_dataloader
    from composer_ext.models import small_gpt
    from composer_ext.testing import KillAt

    class Uids(Callback):
        def __init__(self):
            self.uids = {}

        def after_dataloader(self, state, logger):
            self.uids[int(state.timestamp.batch) + 1] = list(state.batch['uid'])

    base = {'code': 0.2, 'dialogue': 0.15, 'legal': 0.15, 'math': 0.2, 'prose': 0.2, 'technical': 0.1}
    target = {'code': 0.1, 'dialogue': 0.1, 'legal': 0.1, 'math': 0.5, 'prose': 0.1, 'technical': 0.1}
    algorithm = DomainUpsampling(MixtureSchedule(base, target, start='0.5dur'), log_interval=2, lr_cooldown='ignore')
    reproducibility.seed_all(11)
    model = small_gpt(n_layer=1, n_embd=32, n_head=2, n_positions=32)
    spec = build_mixture_dataloader(batch_size=8, domains='all', weights=base, num_samples=32, seq_len=32, seed=3)
    uids, memory = Uids(), InMemoryLogger()
    trainer = Trainer(model=model, train_dataloader=spec, max_duration='6ba', seed=11,
                      optimizers=torch.optim.SGD(model.parameters(), lr=0.05 * parallelism.lr_scale),
                      algorithms=[algorithm], callbacks=[uids] + ([KillAt(kill)] if kill else []), loggers=[memory],
                      save_folder=f'{folder}/ckpt' if kill else None, save_interval=f'{kill}ba' if kill else '1ep',
                      load_path=load_path, progress_bar=False, device='cpu', **parallelism.trainer_kwargs())
    try:
        trainer.fit()
    except Exception as error:  # KillAt
        if type(error).__name__ != 'Killed':
            raise
    result = {'sharded': all(_is_dtensor(p) for p in model.parameters()), 'uids': uids.uids,
              'history': {k: [(int(t.batch), float(v)) for t, v in s] for k, s in memory.data.items()
                          if k.startswith('mixture/')},
              'loss': _series(memory, 'loss/train/total')}
    trainer.close()
    return result


def _mixture_train(parallelism, folder: str) -> dict:
    return _uninterrupted_and_resumed(_mixture_run, parallelism, folder, kill=3)


def test_domain_upsampling_under_fsdp2_keeps_the_data_order_and_resumes_from_a_sharded_checkpoint(tmp_path):
    runs = run_ddp_and_fsdp2(_mixture_train, args=(str(tmp_path),), fsdp=SHARDED)
    assert runs['fsdp2'][0]['full']['sharded'] and not runs['ddp'][0]['full']['sharded']
    for rank in range(2):  # the same sample ids per step on each rank (discrete: exact), the same logged mixture
        ddp, fsdp2 = runs['ddp'][rank]['full'], runs['fsdp2'][rank]['full']
        assert sorted(ddp['uids']) == list(range(1, 7)) and all(len(u) == 4 for u in ddp['uids'].values())
        assert fsdp2['uids'] == ddp['uids'], rank
        assert fsdp2['history'] == ddp['history'] and ddp['history'], rank
        assert differences(ddp['loss'], fsdp2['loss'], atol=1e-5) == [], rank
    zero, one = runs['fsdp2'][0]['full']['uids'], runs['fsdp2'][1]['full']['uids']
    assert not {u for b in zero.values() for u in b} & {u for b in one.values() for u in b}  # disjoint shards
    assert any(u.startswith('math/') for u in zero[6] + one[6])
    # Resume from a sharded (FSDP2) or full (DDP) checkpoint: the uninterrupted run's remaining batches, exactly.
    for kind in ('ddp', 'fsdp2'):
        for rank in range(2):
            full, resumed = runs[kind][rank]['full'], runs[kind][rank]['resumed']
            assert resumed['uids'] == {b: u for b, u in full['uids'].items() if b > 3}, (kind, rank)
            assert resumed['history'] == {k: [(b, v) for b, v in s if b > 3] for k, s in full['history'].items()}
            assert resumed['loss'] == full['loss'][3:], (kind, rank)


# --- the YAML runner ---------------------------------------------------------------------------------------------


def _run_yaml_under_ddp_and_fsdp2(yaml: str, overrides: list, fsdp: str) -> dict:
    """The same YAML run without parallelism (DDP) and with ``parallelism=<fsdp>``: what each warned."""
    return {'ddp': _run_yaml_and_record_warnings(yaml, overrides),
            'fsdp2': _run_yaml_and_record_warnings(yaml, overrides + [f'parallelism={fsdp}'])}


def _run_yaml_and_record_warnings(yaml: str, overrides: list) -> dict:
    import os
    import warnings

    from composer_ext.config import load_config
    from composer_ext.runner import FSDP2GlooGradientWarning, build_trainer

    assert 'FSDP_VERSION' not in os.environ  # FSDP2 is selected by the device (CPU), not by the environment
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        trainer = build_trainer(load_config(yaml, overrides))
        trainer.fit()
    fsdp_config = trainer.state.fsdp_config
    result = {'sharded': all(_is_dtensor(p) for p in trainer.state.model.parameters()),
              'reshard_after_forward': getattr(fsdp_config, 'reshard_after_forward', None),
              'gloo': [str(w.message) for w in caught if issubclass(w.category, FSDP2GlooGradientWarning)],
              'other': [f'{w.category.__name__}: {w.message}' for w in caught
                        if not issubclass(w.category, FSDP2GlooGradientWarning)]}
    trainer.close()
    return result


def test_the_yaml_runner_maps_fsdp_keys_to_fsdp2_on_cpu_without_stray_warnings(corpus):
    import os

    from composer_ext.testing import run_distributed

    overrides = ['device=cpu', 'max_duration=1ba',
                 'eval_loaders=[]', 'algorithms={}', 'callbacks={}', 'loggers={}', 'model.n_layer=1',
                 'model.n_embd=32', 'model.n_head=2', 'variables.seq_len=32', 'train_loader.batch_size=4',
                 'save_folder=null']
    previous = os.environ.pop('FSDP_VERSION', None)  # the ranks inherit this environment
    try:
        ranks = run_distributed(_run_yaml_under_ddp_and_fsdp2, world_size=2,
                                args=('yamls/quickstart.yaml', overrides, '{fsdp: {sharding_strategy: SHARD_GRAD_OP}}'))
    finally:
        if previous is not None:
            os.environ['FSDP_VERSION'] = previous
    for rank in ranks:
        ddp, fsdp2 = rank['ddp'], rank['fsdp2']
        assert fsdp2['sharded'] and fsdp2['reshard_after_forward'] is False  # SHARD_GRAD_OP -> FSDP2's False
        assert not ddp['sharded'] and ddp['gloo'] == []
        assert len(fsdp2['gloo']) == 1 and 'runs as FSDP2 on CPU' in fsdp2['gloo'][0]
        # FSDP2 adds no warning to what the same run warns under DDP: no 'experimental', no dropped sharding_strategy
        assert sorted(set(fsdp2['other']) - set(ddp['other'])) == [], fsdp2['other']
