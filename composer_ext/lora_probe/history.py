"""The probe's history: the records :class:`~composer_ext.lora_probe.callback.LoRAProbe` keeps and writes to
``lora_probe.json``, and the metric keys it logs from them. Light (no torch): ``composer-ext report lora`` reads
the same format.

A record holds the batch/sample/token/epoch counts of one probe point and, when measured there, ``metrics``
(``{'source'|'target': {label: {metric: value}}}``), ``learning`` / ``forgetting`` (the change from the start,
signed so that positive means "learned" / "forgot", whatever the metric's direction) with their means over
evaluators of the primary metric (``learning_mean``, ``forgetting_mean``), and ``spectrum`` /
``spectrum_summary`` (ΔW statistics per module and aggregated).
"""

from __future__ import annotations

from typing import Any, Collection, Optional

import numpy as np

__all__ = ['FORMAT', 'HISTORY_FILE', 'add_metrics', 'loggable_metrics']

FORMAT = 'composer_ext.lora_probe/1'
HISTORY_FILE = 'lora_probe.json'


def add_metrics(record: dict[str, Any], values: dict[str, dict[str, float]], baseline: dict[str, dict[str, float]],
                directions: dict[str, bool], source_labels: Collection[str], primary: Optional[str]) -> None:
    """Put evaluation ``values`` (``{label: {metric: value}}``) into ``record``, with learning and forgetting
    measured from ``baseline`` (the values at the start) in each metric's direction (``directions``: higher is
    better)."""
    source = set(source_labels)
    record['metrics'] = {'source': {k: v for k, v in values.items() if k in source},
                         'target': {k: v for k, v in values.items() if k not in source}}
    learning: dict[str, dict[str, float]] = {}
    forgetting: dict[str, dict[str, float]] = {}
    for label, metrics in values.items():
        for name, value in metrics.items():
            gain = value - baseline[label][name]
            improvement = gain if directions[name] else -gain
            if label in source:
                forgetting.setdefault(label, {})[name] = -improvement
            else:
                learning.setdefault(label, {})[name] = improvement
    record['learning'], record['forgetting'] = learning, forgetting
    record['learning_mean'] = float(np.mean([m[primary] for m in learning.values()])) if learning else None
    record['forgetting_mean'] = float(np.mean([m[primary] for m in forgetting.values()])) if forgetting else None


def loggable_metrics(record: dict[str, Any], log_modules: bool = True) -> dict[str, float]:
    """The ``lora_probe/...`` metric keys and values of one record (per-module ΔW statistics with ``log_modules``)."""
    values: dict[str, float] = {}
    for role, by_label in record.get('metrics', {}).items():
        for label, metrics in by_label.items():
            for name, value in metrics.items():
                values[f'lora_probe/{role}/{label}/{name}'] = value
    for kind in ('learning', 'forgetting'):
        for label, metrics in record.get(kind, {}).items():
            for name, value in metrics.items():
                values[f'lora_probe/{kind}/{label}/{name}'] = value
        if record.get(f'{kind}_mean') is not None:
            values[f'lora_probe/{kind}'] = record[f'{kind}_mean']
    if log_modules:
        for module, stats in record.get('spectrum', {}).items():
            for stat, value in stats.items():
                values[f'lora_probe/delta_w/{module}/{stat}'] = value
    for key, value in record.get('spectrum_summary', {}).items():
        values[f'lora_probe/delta_w/{key}'] = value
    return values
