"""Assemble the student from its block checkpoints and measure what every block costs in accuracy.

:func:`load_student` rebuilds the student with :func:`~composer_ext.blockwise.make_student` and
loads every block's finished weights (``<folder>/<path>/block.pt``). :func:`stitch` then measures, on
held-out data, the teacher's accuracy, each block's *solo accuracy drop* (the teacher with only that block
replaced), and the accuracy of the stitched student. As in the paper's code, a block whose solo drop
exceeds ``max_solo_drop`` is not used: the stitched model keeps the teacher's block there (the default 0.15
is the paper's threshold; it rarely triggers after a reasonable block training).

Accuracy is computed on all ranks at once: each rank evaluates a contiguous shard of the samples and the
correct/total counts are summed with ``composer.utils.dist.all_reduce``, so every rank gets the same number.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from composer.utils import dist
from torch import nn
from tqdm.auto import tqdm

from composer_ext.blockwise.activations import batch_to_device
from composer_ext.blockwise.discovery import find_blocks, get_submodule, run_model, set_submodule
from composer_ext.blockwise.student import StudentFactory, make_student
from composer_ext.blockwise.training import (BlockCheckpointMismatchError, block_folder, load_block_file,
                                             teacher_fingerprint)

__all__ = ['MissingBlockCheckpointError', 'StitchResult', 'evaluate_accuracy', 'load_student', 'stitch']


class MissingBlockCheckpointError(FileNotFoundError, ValueError):
    """A block has no finished checkpoint at stitch time (a ``ValueError`` about the input, and a missing file)."""


def load_student(teacher: nn.Module, folder: Union[str, Path], blocks: Union[str, Sequence[str]] = 'auto',
                 example_input: Any = None, seed: Optional[int] = None,
                 factory: Optional[StudentFactory] = None) -> nn.Module:
    """The student with every block's trained weights loaded from ``<folder>/<path>/block.pt``.

    Every block checkpoint records the fingerprint of the teacher it was distilled from; a block trained
    against another teacher (other weights, e.g. a retrained teacher) is refused rather than mixed in.

    Raises:
        MissingBlockCheckpointError: a block has no finished checkpoint (the message names the block and the
            file); it is both a ``FileNotFoundError`` and a ``ValueError``.
        BlockCheckpointMismatchError: a block was trained against a different teacher (a ``ValueError``).
    """
    paths = find_blocks(teacher, blocks)
    missing = [p for p in paths if not (block_folder(folder, p) / 'block.pt').exists()
               or not (block_folder(folder, p) / 'result.json').exists()]
    if missing:
        details = []
        for path in missing:
            directory = block_folder(folder, path)
            in_progress = (directory / 'checkpoint.pt').exists()
            state = 'is in progress (checkpoint.pt only)' if in_progress else 'was never trained'
            details.append(f'{path!r} ({directory / "block.pt"} is missing; the block {state})')
        raise MissingBlockCheckpointError(
            f'cannot stitch: {len(missing)} of {len(paths)} blocks have no finished checkpoint: '
            f'{"; ".join(details)}. Fix: train them first (composer-ext blockwise CONFIG.yaml --stage blocks resumes '
            f'only the unfinished blocks), or point folder= at the run that trained them.')
    student = make_student(teacher, paths, example_input=example_input, seed=seed, factory=factory)
    teacher_hash = teacher_fingerprint(teacher)
    for path in paths:
        file = block_folder(folder, path) / 'block.pt'
        saved = load_block_file(file)
        trained_against = saved.get('fingerprint', {}).get('teacher')
        if trained_against != teacher_hash:
            raise BlockCheckpointMismatchError(
                f'cannot stitch: block {path!r} in {Path(folder)} was trained against a different teacher (its '
                f'{file} records teacher fingerprint {str(trained_against)[:16]}..., this teacher is '
                f'{teacher_hash[:16]}...). Fix: stitch with the teacher the blocks were trained against, or '
                f'retrain the blocks for this teacher in a new output folder (or delete {Path(folder)}).')
        get_submodule(student, path).load_state_dict(saved['block'])
    return student


def _shard(n: int) -> range:
    world, rank = dist.get_world_size(), dist.get_global_rank()
    per = -(-n // world)
    return range(min(n, rank * per), min(n, (rank + 1) * per))


def evaluate_accuracy(model: nn.Module, dataset: Any, batch_size: int = 256, samples: Optional[int] = None) -> float:
    """Top-1 accuracy of ``model`` on the first ``samples`` items of ``dataset`` (``(inputs, label)`` items).

    Under ``torch.distributed`` the samples are split over ranks and the counts summed, so every rank
    returns the same value. The model is evaluated in eval mode and its mode restored.
    """
    n = len(dataset) if samples is None else min(samples, len(dataset))
    if n < 1:
        raise ValueError(f'samples={samples!r} leaves no data to evaluate on. Fix: use samples >= 1 or None.')
    device = next(model.parameters()).device
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, _shard(n)), batch_size=batch_size,
                                         shuffle=False)
    counts = torch.zeros(2, dtype=torch.float64, device=device)
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            for batch in loader:
                batch = batch_to_device(batch, device)
                logits = run_model(model, batch)
                counts[0] += (logits.argmax(dim=1) == batch[1]).sum()
                counts[1] += len(batch[1])
    finally:
        for module, mode in modes.items():
            module.training = mode
    if dist.get_world_size() > 1:
        dist.all_reduce(counts)
    return float(counts[0] / counts[1])


@dataclass
class StitchResult:
    """The stitched student and the accuracies measured on the way."""

    model: nn.Module
    teacher_accuracy: float
    stitched_accuracy: float
    solo_accuracy: dict[str, float] = field(default_factory=dict)
    accepted: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    max_solo_drop: float = 0.15
    eval_samples: int = 0

    @property
    def solo_drop(self) -> dict[str, float]:
        """Teacher accuracy minus the accuracy with only that block replaced (positive: the block costs accuracy)."""
        return {path: self.teacher_accuracy - acc for path, acc in self.solo_accuracy.items()}

    def to_dict(self) -> dict:
        return {'teacher_accuracy': self.teacher_accuracy, 'stitched_accuracy': self.stitched_accuracy,
                'solo_accuracy': self.solo_accuracy, 'solo_drop': self.solo_drop, 'accepted': self.accepted,
                'rejected': self.rejected, 'max_solo_drop': self.max_solo_drop, 'eval_samples': self.eval_samples}


def stitch(teacher: nn.Module, folder: Union[str, Path], dataset: Any, blocks: Union[str, Sequence[str]] = 'auto',
           max_solo_drop: float = 0.15, eval_samples: Optional[int] = None, batch_size: int = 256,
           example_input: Any = None, seed: Optional[int] = None,
           factory: Optional[StudentFactory] = None, progress: bool = False) -> StitchResult:
    """Assemble the student from block checkpoints, keeping only blocks whose solo accuracy drop is acceptable.

    Args:
        teacher: The trained teacher (not modified).
        folder: The block checkpoint root (``<folder>/<path>/block.pt``).
        dataset: Held-out ``(inputs, label)`` data for the accuracies.
        blocks: The block paths used to train (``'auto'`` or a list).
        max_solo_drop: Largest accepted solo drop (a fraction, 0.15 = 15 points); a block above it stays the
            teacher's block.
        eval_samples: Evaluate on the first ``eval_samples`` items (``None``: all).
        batch_size: Evaluation batch size.
        example_input, seed, factory: As for :func:`~composer_ext.blockwise.make_student`.
        progress: Show a ``tqdm`` bar over the solo evaluations (one per block).

    Example:
        >>> result = stitch(teacher, 'runs/x/blocks', fashion_mnist('test'))  # doctest: +SKIP
        >>> result.stitched_accuracy, result.solo_drop  # doctest: +SKIP
    """
    if isinstance(max_solo_drop, bool) or not isinstance(max_solo_drop, (int, float)) or not 0 <= max_solo_drop <= 1:
        raise ValueError(f'max_solo_drop={max_solo_drop!r} is not a fraction in [0, 1]. Fix: e.g. 0.15 for 15 '
                         f'points.')
    paths = find_blocks(teacher, blocks)
    trained = load_student(teacher, folder, paths, example_input=example_input, seed=seed, factory=factory)
    trained.to(next(teacher.parameters()).device)
    teacher_accuracy = evaluate_accuracy(teacher, dataset, batch_size, eval_samples)
    solo: dict[str, float] = {}
    for path in tqdm(paths, desc='solo accuracy per block', disable=not progress, leave=False):
        swapped = copy.deepcopy(teacher)
        set_submodule(swapped, path, copy.deepcopy(get_submodule(trained, path)))
        solo[path] = evaluate_accuracy(swapped, dataset, batch_size, eval_samples)
    accepted = [p for p in paths if teacher_accuracy - solo[p] <= max_solo_drop]
    rejected = [p for p in paths if p not in accepted]
    stitched = trained
    for path in rejected:
        set_submodule(stitched, path, copy.deepcopy(get_submodule(teacher, path)))
    stitched.requires_grad_(True)
    stitched_accuracy = evaluate_accuracy(stitched, dataset, batch_size, eval_samples)
    return StitchResult(model=stitched, teacher_accuracy=teacher_accuracy, stitched_accuracy=stitched_accuracy,
                        solo_accuracy=solo, accepted=accepted, rejected=rejected, max_solo_drop=float(max_solo_drop),
                        eval_samples=len(dataset) if eval_samples is None else min(eval_samples, len(dataset)))
