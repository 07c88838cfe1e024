"""Gradual magnitude pruning (Zhu & Gupta 2017) as a Composer Algorithm.

Between ``start`` and ``end`` the target sparsity follows the cubic schedule of Zhu & Gupta,
``s(t) = s_f + (s_i - s_f) * (1 - (t - start) / (end - start))**3``, updated every ``interval``: at each update
the smallest-magnitude weights (``structure='unstructured'``) or output filters (``structure='filter'``, by
mean absolute weight) of every Conv/Linear layer are masked, ranked over all layers together
(``scope='global'``) or layer by layer (``scope='layer'``). Masks only grow: a pruned weight stays pruned.

Masks are applied to the gradients before every optimizer step and to the weights after it, so pruned weights
stay exactly zero under any optimizer (momentum, weight decay), in evaluation and in checkpoints. The masks
are part of the algorithm's ``state_dict``; the schedule depends only on the trainer's timestamp, so a run
resumed from a checkpoint prunes exactly as an uninterrupted one.

FSDP2 (``DTensor`` weights sharded on dim 0): the ranking stays global and exact without gathering any weight.
Each rank scores its own rows; :func:`composer_ext.fairness.sharded_ranking.select_lowest_sharded` finds the
threshold by a bisection on the scores' order-preserving integer keys (``all_reduce`` of counts, 34 small
collectives per update) and splits the ties at the threshold in global position order, the same tie rule as the
unsharded ``argsort(stable=True)``: equal magnitudes are pruned in the order of their position in the concatenated
whole weights. Each rank keeps and applies the masks of its rows; checkpoints hold whole masks (see
:meth:`MagnitudePruning.state_dict`), cut back to each rank's rows on resume.

Compose with :class:`composer_ext.algorithms.KnowledgeDistillation` (the unpruned model as teacher) for the
"prune + distill" mitigation of pruning-induced bias (Blakeney et al., *Simon Says*, 2021).
"""

from __future__ import annotations

import fnmatch
import math
from typing import Any, Optional, Sequence, Union

import torch
from composer.core import Algorithm, Event, State, Time, TimeUnit
from composer.loggers import Logger
from composer.utils import dist
from torch import nn

from composer_ext.core.sharding import is_sharded, local_tensor, reshard, shard_like, sharded_like
from composer_ext.core.timing import parse_time, resolve_bound, time_string
from composer_ext.core.unwrap import unwrap_parallel
from composer_ext.fairness.sharded_ranking import select_lowest_sharded

__all__ = ['MagnitudePruning', 'PRUNABLE_TYPES', 'SCHEDULES', 'SCOPES', 'STRUCTURES', 'agp_sparsity', 'compute_masks',
           'output_layer', 'prunable_layers']

SCHEDULES = ('cubic', 'linear', 'one_shot')
STRUCTURES = ('unstructured', 'filter')
SCOPES = ('global', 'layer')
PRUNABLE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)  # the layers whose weights are pruned (and measured)
TimeLike = Union[str, int, Time]


# --- validation (shared by the functional core and the Algorithm: one check, one message) ------------------


def _check_fraction(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f'{name}={value!r} is outside [0, 1). Fix: use a fraction such as 0.9.')
    return float(value)


def _check_choice(value: Any, name: str, valid: Sequence[str]) -> str:
    if value not in valid:
        raise ValueError(f'{name}={value!r} is unknown. Fix: use one of {list(valid)}.')
    return value


def _check_schedule(initial_sparsity: Any, target_sparsity: Any, schedule: Any) -> None:
    _check_fraction(target_sparsity, 'target_sparsity')
    _check_fraction(initial_sparsity, 'initial_sparsity')
    if initial_sparsity > target_sparsity:
        raise ValueError(f'initial_sparsity={initial_sparsity!r} is above target_sparsity={target_sparsity!r}. '
                         f'Fix: use initial_sparsity <= target_sparsity (0.0 by default).')
    _check_choice(schedule, 'schedule', SCHEDULES)


# --- functional core ---------------------------------------------------------------------------------------


def agp_sparsity(t: float, start: float, end: float, initial_sparsity: float, target_sparsity: float,
                 schedule: str = 'cubic') -> float:
    """The scheduled sparsity at time ``t`` (any unit, the same as ``start``/``end``).

    ``cubic`` (Zhu & Gupta): ``s_f + (s_i - s_f)(1 - p)**3``; ``linear``: ``s_i + (s_f - s_i) p``; ``one_shot``:
    ``s_f`` from ``start`` on; with ``p = clamp((t - start) / (end - start), 0, 1)``. Before ``start``: 0.

    Raises:
        ValueError: a sparsity outside [0, 1), ``initial_sparsity > target_sparsity`` or an unknown schedule.

    Example:
        >>> round(agp_sparsity(50, 0, 100, 0.0, 0.8), 6)
        0.7
    """
    _check_schedule(initial_sparsity, target_sparsity, schedule)
    if t < start:
        return 0.0
    if schedule == 'one_shot' or end <= start:
        return float(target_sparsity)
    progress = min(max((t - start) / (end - start), 0.0), 1.0)
    if schedule == 'cubic':
        return float(target_sparsity + (initial_sparsity - target_sparsity) * (1.0 - progress) ** 3)
    return float(initial_sparsity + (target_sparsity - initial_sparsity) * progress)  # linear


def output_layer(model: nn.Module) -> Optional[tuple[str, nn.Module]]:
    """The ``(name, module)`` of the model's output layer (the one that makes the logits), or None.

    Found, in this order:

    1. the output embeddings of the outermost submodule with a ``get_output_embeddings()`` that returns a module
       (``transformers`` models, llm-foundry's MPT): ``lm_head``, or, when input and output embeddings are tied
       and there is no separate head (MPT's default), the input embedding itself (``transformer.wte``, an
       ``nn.Embedding``);
    2. a Linear whose weight is an Embedding's weight (a tied head without ``get_output_embeddings``);
    3. the last Linear/Conv layer in registration order (the classifier of a torchvision-style model).

    Rule 3 alone is wrong for tied embeddings: MPT's last Linear is the last block's ``ffn.down_proj``, a hidden
    layer.

    Example:
        >>> from torch import nn
        >>> output_layer(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))[0]
        '2'
    """
    names = {id(module): name for name, module in model.named_modules()}
    for module in model.modules():
        getter = getattr(module, 'get_output_embeddings', None)
        if not callable(getter):
            continue
        try:
            head = getter()
        except (AttributeError, NotImplementedError, TypeError):  # a model class without an LM head
            head = None
        if isinstance(head, nn.Module) and id(head) in names:
            return names[id(head)], head
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    layers = [(name, module) for name, module in model.named_modules() if isinstance(module, PRUNABLE_TYPES)]
    for name, module in layers:
        if id(module.weight) in embedding_weights:
            return name, module
    return layers[-1] if layers else None


def prunable_layers(model: nn.Module, prune_output_layer: bool = False,
                    exclude: Sequence[str] = ()) -> list[tuple[str, nn.Module]]:
    """The ``(name, module)`` of every layer that is pruned, in registration order.

    Every Linear/Conv layer except the output layer (see :func:`output_layer`), which is kept dense unless
    ``prune_output_layer``; then it is pruned too, also when it is an embedding tied to the input embeddings (MPT's
    ``transformer.wte``: pruning it prunes the input embeddings, the same weight). A weight shared by several
    modules is pruned once. Module names matching any ``fnmatch`` pattern in ``exclude`` are kept dense.

    Example:
        >>> from torch import nn
        >>> [name for name, _ in prunable_layers(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))]
        ['0']
    """
    output = output_layer(model)
    layers, seen = [], set()
    for name, module in model.named_modules():
        is_output = output is not None and module is output[1]
        if not (isinstance(module, PRUNABLE_TYPES) or is_output) or (is_output and not prune_output_layer):
            continue
        if id(module.weight) in seen or any(fnmatch.fnmatchcase(name, p) for p in exclude):
            continue
        seen.add(id(module.weight))
        layers.append((name, module))
    return layers


def _select_lowest(scores: torch.Tensor, sizes: torch.Tensor, budget: float) -> torch.Tensor:
    """Indices of the lowest scores whose total size is at most ``budget`` (stable: ties by position)."""
    order = torch.argsort(scores, stable=True)
    taken = torch.searchsorted(torch.cumsum(sizes[order], 0), torch.tensor(budget, dtype=sizes.dtype,
                                                                            device=sizes.device), right=True)
    return order[:int(taken)]


def compute_masks(weights: dict[str, torch.Tensor], sparsity: float, structure: str = 'unstructured',
                  scope: str = 'global', masks: Optional[dict[str, torch.Tensor]] = None) -> dict[str, torch.Tensor]:
    """Boolean keep-masks that prune a ``sparsity`` fraction of the weights by magnitude.

    Args:
        weights: ``name -> weight`` of the layers to prune.
        sparsity: The fraction of all these weights to mask, in [0, 1).
        structure: ``unstructured`` (single weights by ``|w|``) or ``filter`` (whole output filters, dim 0, by mean
            ``|w|``; at least one filter per layer is kept).
        scope: ``global`` (rank all layers together) or ``layer`` (the same fraction in every layer).
        masks: The current masks; their pruned entries are pruned again first (masks only grow).

    Raises:
        ValueError: a sparsity outside [0, 1), or an unknown structure or scope.

    Example:
        >>> import torch
        >>> w = {'a': torch.tensor([[0.1, -2.0], [0.5, 3.0]])}
        >>> compute_masks(w, 0.5)['a'].tolist()
        [[False, True], [False, True]]
    """
    _check_fraction(sparsity, 'sparsity')
    _check_choice(structure, 'structure', STRUCTURES)
    _check_choice(scope, 'scope', SCOPES)
    masks = masks or {}
    sharded = any(is_sharded(w) for w in weights.values())
    groups = [list(weights)] if scope == 'global' else [[name] for name in weights]
    all_scores, all_sizes = [], []
    for names in groups:
        scores, sizes = [], []
        for name in names:
            w = local_tensor(weights[name]).detach()
            old = masks.get(name)
            old = old.to(w.device) if old is not None else torch.ones_like(w, dtype=torch.bool)
            if structure == 'unstructured':
                score = w.abs().flatten().float()
                score = torch.where(old.flatten(), score, torch.full_like(score, -1.0))
                size = torch.ones_like(score)
            else:
                rows = w.abs().reshape(w.shape[0], -1).float()
                score = torch.where(old.reshape(w.shape[0], -1).any(1), rows.mean(1), torch.full_like(rows[:, 0], -1))
                _keep_strongest(score, sharded)  # a layer never vanishes
                size = torch.full_like(score, float(rows.shape[1]))
            scores.append(score)
            sizes.append(size.double())
        all_scores.append(scores)
        all_sizes.append(sizes)
    totals = torch.tensor([float(sum(s.sum() for s in sizes)) for sizes in all_sizes], dtype=torch.float64)
    if sharded:
        totals = _sum_over_ranks(totals)
        selected = select_lowest_sharded(all_scores, all_sizes, [sparsity * float(t) + 1e-9 for t in totals])
    else:
        selected = []
        for scores, sizes, total in zip(all_scores, all_sizes, totals):
            flat = torch.cat(scores)
            pruned = torch.zeros_like(flat, dtype=torch.bool)
            pruned[_select_lowest(flat, torch.cat(sizes), sparsity * float(total) + 1e-9)] = True
            selected.append(list(torch.split(pruned, [s.numel() for s in scores])))
    new: dict[str, torch.Tensor] = {}
    for names, parts in zip(groups, selected):
        for name, part in zip(names, parts):
            w = local_tensor(weights[name])
            if structure == 'unstructured':
                new[name] = ~part.reshape(w.shape)
            else:
                new[name] = (~part).reshape(-1, *([1] * (w.ndim - 1))).expand_as(w).clone()
    return new


def _sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    if dist.get_world_size() > 1:
        dist.all_reduce(tensor, reduce_operation='SUM')
    return tensor


def _keep_strongest(score: torch.Tensor, sharded: bool) -> None:
    """Set the layer's highest filter score (the first one on ties, as ``torch.argmax``) to ``inf``, in place.

    Sharded: each rank holds some rows; the first rank holding the global maximum marks its first maximal row.
    """
    if not sharded or dist.get_world_size() == 1:
        if score.numel():
            score[torch.argmax(score)] = math.inf
        return
    local_max = score.max() if score.numel() else torch.tensor(-math.inf, device=score.device)
    maxima = torch.stack(dist.all_gather(local_max.contiguous())).cpu()
    owner = int(torch.argmax(maxima))  # the first rank holding the maximum
    if owner == dist.get_global_rank() and score.numel():
        score[torch.argmax(score)] = math.inf


def _time_repr(value: Any) -> str:
    return repr(time_string(value) if isinstance(value, Time) else value)


class MagnitudePruning(Algorithm):
    """Gradual magnitude pruning to ``target_sparsity`` between ``start`` and ``end`` (Zhu & Gupta 2017).

    Args:
        target_sparsity: Final fraction of the prunable weights that are zero, in [0, 1).
        start: When pruning starts (a Composer time: ``'0dur'``, ``'100ba'``, ``'1ep'``, an int = batches).
        end: When the target is reached; after it the sparsity is fixed (fine-tuning with frozen masks).
        schedule: ``cubic`` (Zhu & Gupta), ``linear`` or ``one_shot`` (the target at ``start``).
        structure: ``unstructured`` (single weights) or ``filter`` (whole output filters/rows by mean ``|w|``,
            also masking the layer's bias for them; a following BatchNorm is left as it is).
        scope: ``global`` (one magnitude ranking over all layers) or ``layer`` (each layer to the same sparsity).
        initial_sparsity: The schedule's sparsity at ``start`` (Zhu & Gupta's ``s_i``), in [0, target].
        interval: How often the masks are updated inside the window (the last update is at ``end``).
        prune_output_layer: Also prune the output layer (see :func:`output_layer`: the classifier, an LM head, or
            the input embedding when the embeddings are tied, as in MPT); kept dense by default. Every other
            Linear/Conv layer is pruned, e.g. all of MPT's ``Wqkv``, ``out_proj``, ``up_proj`` and ``down_proj``.
        exclude: ``fnmatch`` patterns of module names (as in ``model.named_modules()``) never to prune.

    Logs ``pruning/target_sparsity`` and ``pruning/sparsity`` (measured) at every mask update.

    Example:
        >>> from composer_ext.algorithms import MagnitudePruning
        >>> pruning = MagnitudePruning(target_sparsity=0.9, start='0dur', end='0.6dur')
        >>> # Trainer(..., algorithms=[pruning])  (+ KnowledgeDistillation for prune + distill)
    """

    def __init__(self, target_sparsity: float, start: TimeLike = '0dur', end: TimeLike = '0.75dur',
                 schedule: str = 'cubic', structure: str = 'unstructured', scope: str = 'global',
                 initial_sparsity: float = 0.0, interval: TimeLike = '0.01dur', prune_output_layer: bool = False,
                 exclude: Sequence[str] = ()):
        # The functional core's checks, made here at construction so that a bad value fails before training.
        _check_schedule(initial_sparsity, target_sparsity, schedule)
        _check_choice(structure, 'structure', STRUCTURES)
        _check_choice(scope, 'scope', SCOPES)
        past_end = 'is beyond the end of training'
        self._start = parse_time(start, 'start', '0dur', past_end)
        self._end = parse_time(end, 'end', '0.75dur', past_end)
        # A step length inside the window (resolved on the window's axis with the bounds), not a cadence of its own.
        self._interval = parse_time(interval, 'interval', '10ba', past_end)
        if self._interval.value == 0:
            raise ValueError(f"interval={interval!r} is zero. Fix: use a positive time such as '10ba' or '0.01dur'.")
        if self._start.unit == self._end.unit and self._end.value < self._start.value or \
                self._start.unit == self._end.unit and self._end.value == self._start.value and schedule != 'one_shot':
            raise ValueError(f"end={end!r} is not after start={start!r}. Fix: choose end > start, e.g. start='0dur', "
                             f"end='0.5dur' (or schedule='one_shot').")
        if isinstance(exclude, str) or not all(isinstance(p, str) for p in exclude):
            raise TypeError(f"exclude={exclude!r} must be a list of module-name patterns. Fix: e.g. "
                            f"['*.downsample.*'].")
        if not isinstance(prune_output_layer, bool):
            raise TypeError(f'prune_output_layer={prune_output_layer!r} is a {type(prune_output_layer).__name__}, '
                            f'not a bool. Fix: pass False (keep the output layer dense, the default) or True.')
        self.target_sparsity, self.initial_sparsity = float(target_sparsity), float(initial_sparsity)
        self.schedule, self.structure, self.scope = schedule, structure, scope
        self.prune_output_layer, self.exclude = prune_output_layer, tuple(exclude)
        self._args = {'start': start, 'end': end, 'interval': interval}
        self.masks: dict[str, torch.Tensor] = {}
        self._layers: list[tuple[str, nn.Module]] = []
        self._window: Optional[tuple[str, float, float, float]] = None  # unit, start, end, interval
        self._model: Optional[nn.Module] = None
        self._masks_whole = False  # loaded whole masks that FSDP2 still has to cut to this rank's rows

    def __repr__(self) -> str:
        return (f'MagnitudePruning(target_sparsity={self.target_sparsity!r}, start={_time_repr(self._args["start"])}, '
                f'end={_time_repr(self._args["end"])}, schedule={self.schedule!r}, structure={self.structure!r}, '
                f'scope={self.scope!r}, initial_sparsity={self.initial_sparsity!r}, '
                f'interval={_time_repr(self._args["interval"])}, prune_output_layer={self.prune_output_layer!r}, '
                f'exclude={self.exclude!r})')

    # --- time --------------------------------------------------------------------------------------------

    def _resolve_window(self, state: State) -> tuple[str, float, float, float]:
        """``(unit, start, end, interval)`` on one time axis: ``dur`` and epochs resolved as far as the run allows."""
        bounds = {name: resolve_bound(time, state) for name, time in
                  (('start', self._start), ('end', self._end), ('interval', self._interval))}
        units = {unit for _, unit in bounds.values()}
        if len(units) != 1:
            raise ValueError(f'start={self._args["start"]!r}, end={self._args["end"]!r} and interval='
                             f'{self._args["interval"]!r} cannot be put on one time axis with max_duration='
                             f'{state.max_duration} (units {sorted(str(u) for u in units)}). Fix: '
                             f"give them in one unit, e.g. all in 'dur' or all in 'ba'.")
        unit = units.pop()
        values = {name: value for name, (value, _) in bounds.items()}
        if unit == TimeUnit.BATCH:  # masks change at batch ends: whole batches
            values = {name: float(round(value)) for name, value in values.items()}
        if values['end'] < values['start'] or (values['end'] == values['start'] and self.schedule != 'one_shot'):
            raise ValueError(f'end={self._args["end"]!r} is not after start={self._args["start"]!r} for max_duration='
                             f'{state.max_duration}. Fix: choose end > start.')
        return unit.value, values['start'], values['end'], max(values['interval'], 1.0 if unit == TimeUnit.BATCH
                                                                else 1e-12)

    def _now(self, timestamp) -> float:
        assert self._window is not None
        return float(timestamp.get(self._window[0]).value)

    def scheduled_sparsity(self, state: State) -> float:
        """The schedule's sparsity at the current timestamp."""
        unit, start, end, _ = self._window or self._resolve_window(state)
        return agp_sparsity(float(state.timestamp.get(unit).value), start, end, self.initial_sparsity,
                            self.target_sparsity, self.schedule)

    def _update_due(self, previous: float, now: float) -> bool:
        """Whether (previous, now] contains an update time: start + k * interval within [start, end], or end."""
        _, start, end, interval = self._window
        if now < start or previous >= end:
            return False
        if previous < end <= now or previous < start <= now:
            return True
        last_grid = start + math.floor((min(now, end) - start) / interval) * interval
        return last_grid > previous

    # --- masks -------------------------------------------------------------------------------------------

    def _weights(self) -> dict[str, torch.Tensor]:
        if self._model is not None:  # FSDP2: an evaluation leaves the root unsharded; masks are per shard
            reshard(self._model)
        return {f'{name}.weight': module.weight for name, module in self._layers}

    def apply_masks(self) -> None:
        """Zero the pruned weights (and, for filters, their biases) in place."""
        if self._model is not None:
            reshard(self._model)  # FSDP2: the masks are those of the local shards
        with torch.no_grad():
            for name, module in self._layers:
                mask = self.masks.get(f'{name}.weight')
                if mask is None:
                    continue
                weight = local_tensor(module.weight)  # under FSDP2: this rank's rows, and its rows of the mask
                if mask.device != weight.device:
                    mask = self.masks[f'{name}.weight'] = mask.to(weight.device)
                weight.masked_fill_(~mask, 0)
                if self.structure == 'filter' and getattr(module, 'bias', None) is not None:
                    local_tensor(module.bias).masked_fill_(~mask.reshape(mask.shape[0], -1).any(1), 0)

    def _mask_gradients(self) -> None:
        for name, module in self._layers:
            mask = self.masks.get(f'{name}.weight')
            if mask is None:
                continue
            if module.weight.grad is not None:
                grad = local_tensor(module.weight.grad)
                grad.masked_fill_(~mask.to(grad.device), 0)
            if self.structure == 'filter' and getattr(module, 'bias', None) is not None and \
                    module.bias.grad is not None:
                grad = local_tensor(module.bias.grad)
                grad.masked_fill_(~mask.reshape(mask.shape[0], -1).any(1).to(grad.device), 0)

    def sparsity(self) -> float:
        """The measured fraction of zero weights over the pruned layers."""
        weights = self._weights()
        total = sum(w.numel() for w in weights.values())  # a DTensor's numel is the whole tensor's
        zeros = sum(int((local_tensor(w) == 0).sum()) for w in weights.values())
        if self._sharded():  # each rank counts the zeros of its shards
            zeros = int(_sum_over_ranks(torch.tensor([float(zeros)], dtype=torch.float64))[0])
        return zeros / total if total else 0.0

    def _sharded(self) -> bool:
        return any(is_sharded(module.weight) for _, module in self._layers)

    def _prune(self, sparsity: float, logger: Logger) -> None:
        masks = compute_masks(self._weights(), sparsity, self.structure, self.scope, self.masks)
        if dist.get_world_size() > 1 and not self._sharded():
            # DDP: identical weights give identical masks; broadcast so they cannot drift. (FSDP2: each rank's masks
            # are those of its own rows, computed from one global ranking.)
            names = list(masks)
            flat = torch.cat([masks[n].flatten() for n in names]).to(torch.uint8)
            dist.broadcast(flat, src=0)
            for name, part in zip(names, torch.split(flat, [masks[n].numel() for n in names])):
                masks[name] = part.bool().reshape(masks[name].shape)
        self.masks = masks
        self.apply_masks()
        logger.log_metrics({'pruning/target_sparsity': sparsity, 'pruning/sparsity': self.sparsity()})

    # --- Composer ----------------------------------------------------------------------------------------

    def match(self, event: Event, state: State) -> bool:
        return event in (Event.FIT_START, Event.AFTER_TRAIN_BATCH, Event.BATCH_END, Event.EPOCH_END)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.FIT_START:
            self._fit_start(state, logger)
        elif event == Event.AFTER_TRAIN_BATCH:
            self._mask_gradients()
        elif event == Event.BATCH_END:
            self.apply_masks()
            self._maybe_prune(state, logger)
        elif event == Event.EPOCH_END:
            self._maybe_prune(state, logger)

    def _find_layers(self, state: State) -> None:
        model = unwrap_parallel(state.model)
        self._model = model
        reshard(model)
        self._layers = prunable_layers(model, self.prune_output_layer, self.exclude)
        for name, module in self._layers:
            mesh = getattr(module.weight, 'device_mesh', None)
            if mesh is not None and mesh.ndim != 1:
                raise ValueError(f'MagnitudePruning supports FSDP2 sharding over one mesh dimension; {name}.weight is '
                                 f'placed on a {mesh.ndim}-d device mesh (HSDP or tensor parallelism). Fix: use '
                                 f'plain FSDP2 (FSDP2Config() without data_parallel_replicate_degree) or DDP.')

    def _fit_start(self, state: State, logger: Logger) -> None:
        self._find_layers(state)
        model = self._model
        if not self._layers:
            raise ValueError(f'MagnitudePruning found no Linear/Conv layer to prune in {type(model).__name__} '
                             f'(prune_output_layer={self.prune_output_layer}, exclude={list(self.exclude)}). Fix: '
                             f'set prune_output_layer=True or loosen exclude.')
        known = {f'{name}.weight' for name, _ in self._layers}
        unknown = sorted(set(self.masks) - known)
        if unknown:
            raise ValueError(f'the loaded pruning masks name layers the model does not prune: {unknown[:5]}. Fix: load '
                             f'a checkpoint of the same architecture and MagnitudePruning settings.')
        self._shard_loaded_masks()
        self._window = self._resolve_window(state)
        self.apply_masks()
        if self._now(state.timestamp) == self._window[1]:  # at the window start: the initial pruning (idempotent)
            self._prune(self.scheduled_sparsity(state), logger)

    def _maybe_prune(self, state: State, logger: Logger) -> None:
        if self._window is None:
            return
        if self._update_due(self._now(state.previous_timestamp), self._now(state.timestamp)):
            self._prune(self.scheduled_sparsity(state), logger)

    def _shard_loaded_masks(self) -> None:
        """Under FSDP2, cut whole masks (from a full checkpoint or an unsharded run) to this rank's rows."""
        if not self._masks_whole:
            return
        weights = self._weights()
        for name, mask in list(self.masks.items()):
            if name in weights:
                self.masks[name] = shard_like(mask, weights[name])
        self._masks_whole = False

    def state_dict(self) -> dict[str, Any]:
        """The whole masks (``name -> bool tensor`` shaped as the whole weight), whatever the parallelism.

        Under FSDP2 this is a collective, as Composer's own state dict is (every rank calls it when saving): each
        rank holds only its rows of the masks, and they are gathered here, one mask at a time. Gathering is needed
        for sharded checkpoints too: Composer keeps every algorithm's state in a list of ``(name, state)`` tuples,
        which torch's distributed checkpoint writes as one pickled object from rank 0 alone, so per-rank shards
        would be lost. Masks cost one byte per weight (a quarter of the float32 weights); the weights themselves are
        never gathered by the pruning.
        """
        # Composer's own entries ('repr') first: checkpoint loading reads them back.
        state = super().state_dict()
        if not self._sharded():
            state['masks'] = {name: mask.detach().cpu().clone() for name, mask in self.masks.items()}
            return state
        self._shard_loaded_masks()
        weights = self._weights()
        state['masks'] = {name: sharded_like(mask.detach(), weights[name]).full_tensor().cpu()
                          for name, mask in self.masks.items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        masks = state.get('masks', {})
        if not isinstance(masks, dict) or not all(isinstance(m, torch.Tensor) and m.dtype == torch.bool
                                                  for m in masks.values()):
            raise ValueError('the MagnitudePruning state has no valid masks. Fix: load a checkpoint written by '
                             'MagnitudePruning.')
        # A sharded checkpoint gives DTensors: keep this rank's rows. Whole masks are cut at FIT_START under FSDP2.
        self.masks = {name: local_tensor(mask).clone() for name, mask in masks.items()}
        self._masks_whole = not any(is_sharded(mask) for mask in masks.values())
