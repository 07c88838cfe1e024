"""Train the same thing under DDP and under FSDP2 on N gloo ranks, and compare what each run produced.

Composer 0.32.1 runs FSDP2 on CPU with gloo, so a technique's sharded behaviour is testable without a GPU::

    def train(parallelism, steps):            # module-level: it is pickled into each rank
        import torch
        from composer import Trainer
        ...
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1 * parallelism.lr_scale)
        trainer = Trainer(model=model, ..., device='cpu', **parallelism.trainer_kwargs())
        trainer.fit()
        return {'weights': parallelism.full_state(model), 'logged': ...}

    runs = run_ddp_and_fsdp2(train, args=(6,))   # {'ddp': [rank0, rank1], 'fsdp2': [rank0, rank1]}
    assert differences(runs['ddp'][0], runs['fsdp2'][0], atol=1e-6) == []

Same effective learning rate: torch's FSDP2 reduce-scatters gradients with ``ReduceOp.AVG``, which gloo lacks, so
on gloo the gradients are **summed** over ranks where DDP averages them (``tests/test_fsdp2.py`` pins this down).
``Parallelism.lr_scale`` is ``1 / world_size`` for FSDP2 on gloo and 1 otherwise: multiply an SGD-type learning
rate by it and the two runs take the same steps. Adam's update is nearly invariant to a gradient's scale, but not
exactly (its ``eps``, and gradient clipping by norm, see the summed gradient): compare techniques with SGD.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from composer_ext.testing.distributed import run_distributed

__all__ = ['KINDS', 'Parallelism', 'differences', 'run_ddp_and_fsdp2']

KINDS = ('ddp', 'fsdp2')


@dataclass(frozen=True)
class Parallelism:
    """How one of the compared runs is parallelised.

    Args:
        kind: ``'ddp'`` (Composer's default data parallelism on more than one rank) or ``'fsdp2'``.
        fsdp: Keyword arguments of Composer's ``FSDP2Config`` for ``kind='fsdp2'`` (e.g.
            ``{'state_dict_type': 'full'}``).
    """

    kind: str
    fsdp: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f'kind={self.kind!r} is not a parallelism this helper compares. Fix: use one of {KINDS}.')
        if not isinstance(self.fsdp, dict):
            raise TypeError(f'fsdp={self.fsdp!r} is not a dict. Fix: pass FSDP2Config keyword arguments as a dict.')
        if self.fsdp and self.kind != 'fsdp2':
            raise ValueError(f"fsdp={self.fsdp!r} is given for kind={self.kind!r}. Fix: use kind='fsdp2' or fsdp={{}}.")

    @property
    def lr_scale(self) -> float:
        """The factor for an SGD-type learning rate that gives both runs the same steps (see the module doc)."""
        import torch.distributed as torch_dist

        if self.kind != 'fsdp2' or not torch_dist.is_initialized() or torch_dist.get_backend() != 'gloo':
            return 1.0
        return 1.0 / torch_dist.get_world_size()

    def trainer_kwargs(self) -> dict:
        """What to pass to ``Trainer(...)`` for this parallelism (nothing for DDP: Composer wraps it itself)."""
        if self.kind == 'ddp':
            return {}
        from composer.utils.parallelism import FSDP2Config  # composer: heavy, and only on the ranks

        return {'parallelism_config': {'fsdp': FSDP2Config(**self.fsdp)}}

    @staticmethod
    def full_state(module) -> dict[str, list[float]]:
        """Every parameter and buffer of ``module`` as a whole (gathered) flat list, by name, on every rank."""
        state = {}
        for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
            whole = tensor.full_tensor() if hasattr(tensor, 'full_tensor') else tensor
            state[name] = whole.detach().float().flatten().cpu().tolist()
        return state


def _train_both(train_fn: Callable, fsdp: dict, args: Sequence, kwargs: dict) -> dict[str, Any]:
    import warnings

    results = {}
    for kind in KINDS:
        with warnings.catch_warnings():
            # Composer warns on every FSDP2Config that its API is experimental; that is not the code under test.
            warnings.filterwarnings('ignore', message='FSDP2 Config/APIs are experimental')
            results[kind] = train_fn(Parallelism(kind, dict(fsdp) if kind == 'fsdp2' else {}), *args, **kwargs)
    return results


def run_ddp_and_fsdp2(train_fn: Callable, world_size: int = 2, args: Sequence = (), kwargs: Optional[dict] = None,
                      fsdp: Optional[dict] = None, timeout: float = 800.0,
                      env: Optional[dict] = None) -> dict[str, list[Any]]:
    """Run ``train_fn(parallelism, *args, **kwargs)`` under DDP, then under FSDP2, on ``world_size`` gloo ranks.

    Both runs happen in the same processes, one after the other, so they share the start-up cost; ``train_fn``
    must build everything it uses itself (model, data, seed) so that the two runs start equal.

    Args:
        train_fn: A module-level function; its first argument is a :class:`Parallelism`; it returns anything
            picklable (what was logged, the weights through ``Parallelism.full_state``, ...).
        world_size: Number of gloo ranks (at least 2: on one rank there is nothing to shard).
        args, kwargs: Passed on to ``train_fn``.
        fsdp: ``FSDP2Config`` keyword arguments for the FSDP2 run.
        timeout: Seconds to wait for the ranks (see ``run_distributed``).
        env: Extra environment variables; ``FSDP_VERSION=2`` is always set (Composer then reads a ``fsdp:`` mapping
            of a YAML as FSDP2).

    Returns:
        ``{'ddp': [result of rank 0, ...], 'fsdp2': [result of rank 0, ...]}``.
    """
    if not callable(train_fn):
        raise TypeError(f'train_fn={train_fn!r} is not callable. Fix: pass a module-level function.')
    if not isinstance(world_size, int) or world_size < 2:
        raise ValueError(f'world_size={world_size!r} leaves nothing to shard. Fix: use an int >= 2.')
    per_rank = run_distributed(_train_both, world_size=world_size, args=(train_fn, dict(fsdp or {}), tuple(args),
                                                                         dict(kwargs or {})),
                               timeout=timeout, env={**(env or {}), 'FSDP_VERSION': '2'})
    return {kind: [rank_result[kind] for rank_result in per_rank] for kind in KINDS}


def differences(expected: Any, actual: Any, atol: float = 0.0, rtol: float = 0.0, path: str = '') -> list[str]:
    """Where two nested results (dicts, lists, numbers, strings, ...) differ beyond ``atol + rtol * |expected|``.

    Returns one line per difference (``'weights.fc.weight[3]: 0.5 != 0.5001'``); an empty list when they agree.
    Numbers compare with the tolerance (NaN equals NaN); everything else must be equal.

    Example:
        >>> differences({'loss': [1.0, 2.0], 'teacher': 1}, {'loss': [1.0, 2.1], 'teacher': 1}, atol=0.05)
        ['loss[1]: 2.0 != 2.1']
    """
    if atol < 0 or rtol < 0:
        raise ValueError(f'atol={atol!r}, rtol={rtol!r}: a tolerance cannot be negative. Fix: use values >= 0.')
    here = path or '<root>'
    numbers = (int, float)
    if isinstance(expected, bool) != isinstance(actual, bool):  # True == 1 in Python; a flag is not a count
        return [f'{here}: {expected!r} != {actual!r}']
    if isinstance(expected, numbers) and isinstance(actual, numbers) and not isinstance(expected, bool) \
            and not isinstance(actual, bool):
        if math.isnan(expected) and math.isnan(actual):
            return []
        if abs(expected - actual) <= atol + rtol * abs(expected):
            return []
        return [f'{here}: {expected!r} != {actual!r}']
    if isinstance(expected, dict) and isinstance(actual, dict):
        found = []
        for key in sorted(set(expected) | set(actual), key=str):
            name = f'{path}.{key}' if path else str(key)
            if key not in actual or key not in expected:
                found.append(f'{name}: only in {"expected" if key in expected else "actual"}')
            else:
                found += differences(expected[key], actual[key], atol, rtol, name)
        return found
    if isinstance(expected, (list, tuple)) and isinstance(actual, (list, tuple)):
        if len(expected) != len(actual):
            return [f'{here}: length {len(expected)} != {len(actual)}']
        found = []
        for index, (left, right) in enumerate(zip(expected, actual)):
            found += differences(left, right, atol, rtol, f'{path}[{index}]')
        return found
    return [] if expected == actual else [f'{here}: {expected!r} != {actual!r}']
