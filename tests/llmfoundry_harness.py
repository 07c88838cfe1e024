"""Running llm-foundry's own ``train`` on our YAMLs in tests: a tiny MPT config, the run, and what it logged.

Every test of the llm-foundry front end goes through :func:`train_yaml` (one process) or
:func:`train_yaml_distributed` (gloo ranks, :func:`composer_ext.testing.run_distributed`), which call
``llmfoundry.command_utils.train_from_yaml`` exactly as ``llmfoundry train YAML`` does. Importing llm-foundry takes
~15 s, so tests share one process where they can.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

ROOT = Path(__file__).resolve().parents[1]
YAML_DIR = ROOT / 'yamls' / 'llmfoundry'

# A tiny MPT (tied input/output embeddings, llm-foundry's default) that trains a few batches in seconds on a CPU.
TINY_MPT = {
    'name': 'mpt_causal_lm',
    'init_device': 'cpu',
    'd_model': 32,
    'n_heads': 2,
    'n_layers': 2,
    'expansion_ratio': 2,
    'max_seq_len': 64,
    'vocab_size': 4096,
    'attn_config': {'attn_impl': 'torch'},
    'loss_fn': 'torch_crossentropy',
}


def logged_metrics(trainer: Any) -> dict[str, list[tuple[int, float]]]:
    """``key -> [(batch, value), ...]`` from the run's InMemoryLogger (the YAMLs under test log to ``inmemory``)."""
    from composer.loggers import InMemoryLogger

    for destination in trainer.logger.destinations:
        if isinstance(destination, InMemoryLogger):
            out: dict[str, list[tuple[int, float]]] = {}
            for key, rows in destination.data.items():
                values = []
                for timestamp, value in rows:
                    try:
                        values.append((int(timestamp.batch.value), float(value)))
                    except (TypeError, ValueError):
                        continue
                if values:
                    out[key] = values
            return out
    raise AssertionError('the run has no InMemoryLogger: add `loggers: {inmemory: {}}` to the YAML under test')


def write_yaml(config: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def load_yaml(name: str) -> dict:
    """``yamls/llmfoundry/<name>.yaml`` as a dict (interpolations unresolved)."""
    return yaml.safe_load((YAML_DIR / f'{name}.yaml').read_text())


_LOGGERS_SET_BY_A_RUN = ('', 'composer', 'llmfoundry', 'llmfoundry.command_utils.train', 'streaming')


def train_yaml(path: Path | str, overrides: Sequence[str] = ()) -> Any:
    """Run ``llmfoundry train path overrides...`` in this process; return the Trainer (closed).

    A run reconfigures Python logging (``logging.basicConfig(force=True)`` with a handler on the stderr of that moment,
    and DEBUG levels): that would drop pytest's log capture for every later test and, at exit, write to a closed
    capture stream. The root handlers and the levels are restored after the run.
    """
    from llmfoundry.command_utils import train_from_yaml

    root = logging.getLogger()
    handlers = list(root.handlers)
    levels = {name: logging.getLogger(name).level for name in _LOGGERS_SET_BY_A_RUN}
    try:
        return train_from_yaml(str(path), list(overrides))
    finally:
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()
        root.handlers[:] = handlers
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def _train_and_collect(path: str, overrides: list[str]) -> dict:
    from composer.utils import dist

    trainer = train_yaml(path, overrides)
    return {'rank': dist.get_global_rank(), 'world_size': dist.get_world_size(), 'metrics': logged_metrics(trainer),
            'batches': int(trainer.state.timestamp.batch.value)}


def train_yaml_distributed(path: Path | str, overrides: Sequence[str] = (), world_size: int = 2,
                           env: Optional[dict] = None) -> list[dict]:
    """Run the YAML on ``world_size`` gloo ranks; per rank: ``{'rank', 'world_size', 'metrics', 'batches'}``."""
    from composer_ext.testing import run_distributed

    return run_distributed(_train_and_collect, world_size=world_size, args=(str(path), list(overrides)), env=env)


def last(metrics: dict, key: str) -> float:
    assert key in metrics, f'{key} was not logged; logged keys: {sorted(metrics)[:40]}'
    return metrics[key][-1][1]


def finite(value: float) -> bool:
    return math.isfinite(value)
