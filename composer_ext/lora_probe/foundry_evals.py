"""The LoRA probe's evaluators from llm-foundry ``eval_loader``-style sections (``{label, name, dataset, ...}``).

llm-foundry builds callbacks before the model and tokenizer exist, so :class:`~composer_ext.lora_probe.callback.
LoRAProbe` keeps such sections as plain dicts: :func:`check_eval_section` checks and completes them at
construction (so a YAML mistake fails before anything is built), :func:`build_section_evaluator` turns them into
Composer ``Evaluator`` s once the run's model (and so its tokenizer) exists.

A section is an llm-foundry dataloader section (``name: text``, ``dataset: {...}``, ... exactly as under
``eval_loader``) plus keys the probe reads itself and removes before llm-foundry sees the section:

* ``label`` (required): the evaluator's name in the logged keys (``lora_probe/source/<label>/<metric>``);
* ``batch_size`` (or ``device_eval_batch_size``): the per-device batch size; default: the run's
  ``device_eval_batch_size`` (from ``train_config``);
* ``subset_num_batches``: batches per evaluation (default: the probe's ``eval_subset_num_batches``).

``dataset.max_seq_len`` defaults to the run's ``max_seq_len``. The completed section (batch size and sequence
length filled in) is what the probe keeps and what its ``repr`` shows, so the probe rebuilds without the run config.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from typing import Any, Optional

from composer.core import Evaluator

from composer_ext.core.foundry_sections import build_eval_loader, check_loader_section

__all__ = ['PROBE_SECTION_KEYS', 'build_section_evaluator', 'check_eval_section']

# Keys the probe reads from a section and removes before llm-foundry's build_dataloader sees it.
PROBE_SECTION_KEYS = ('label', 'batch_size', 'device_eval_batch_size', 'subset_num_batches')
_EXAMPLE = '{label: prose, name: text, dataset: {local: /data/prose, split: val, max_seq_len: 128}}'


def _positive_int(value: Any) -> Optional[int]:
    """``value`` as a positive int (an integral float such as 8.0 too), or None when it is not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return value if isinstance(value, int) and value > 0 else None


def _batch_size(section: dict, key: str, train_config: Optional[Mapping]) -> int:
    given = [name for name in ('batch_size', 'device_eval_batch_size') if section.get(name) is not None]
    if len(given) == 2:
        raise ValueError(f'{key} sets both batch_size={section["batch_size"]!r} and device_eval_batch_size='
                         f'{section["device_eval_batch_size"]!r}. Fix: keep one (batch_size: the per-device batch '
                         f'size of this evaluation).')
    if given:
        value = section.pop(given[0])
        size = _positive_int(value)
        if size is None:
            raise ValueError(f'{key}.{given[0]}={value!r} is not a positive int. Fix: give the per-device batch '
                             f'size, e.g. {given[0]}: 8.')
        return size
    run_value = (train_config or {}).get('device_eval_batch_size')
    if run_value is None:
        where = ('the run config has no device_eval_batch_size' if train_config is not None else
                 'no train_config was given')
        raise ValueError(f'{key} has no batch size (no batch_size in the section, and {where}). Fix: add '
                         f'batch_size: 8 to the section (or device_eval_batch_size to the run config).')
    size = _positive_int(run_value)
    if size is None:
        raise ValueError(f'{key} takes its batch size from the run config, but device_eval_batch_size='
                         f'{run_value!r} is not a positive int. Fix: give the section its own batch_size, e.g. '
                         f'batch_size: 8.')
    return size


def _check_dataloader_name(name: str, key: str) -> None:
    # Heavy optional dependency: llm-foundry's registry (its import takes seconds; check_loader_section has
    # already made sure it is installed).
    from llmfoundry import registry

    known = sorted(registry.dataloaders.get_all())
    if name not in known:
        raise ValueError(f'{key}.name={name!r} is not an llm-foundry dataloader. Fix: use one of {known} (text for '
                         f'MDS text, as in {_EXAMPLE}).')


def _check_local_dataset(section: dict, key: str) -> None:
    """A local-only streaming dataset must exist now, not fail when the model has been built."""
    dataset = section.get('dataset')
    if not isinstance(dataset, Mapping) or dataset.get('remote') or dataset.get('streams'):
        return
    local = dataset.get('local')
    if not isinstance(local, (str, os.PathLike)):
        return
    split = dataset.get('split')
    directory = os.path.join(local, split) if isinstance(split, str) and split else os.fspath(local)
    if not os.path.isfile(os.path.join(directory, 'index.json')):
        where = f'{key}.dataset.local={os.fspath(local)!r}' + (f' (split {split!r})' if split else '')
        raise ValueError(f'{where}: {directory} is not an MDS dataset (no index.json there) and no remote is '
                         f'given. Fix: point local (and split) at an MDS directory, e.g. local: /data/prose, '
                         f'split: val for /data/prose/val/index.json.')


def check_eval_section(section: Any, key: str, train_config: Optional[Mapping] = None) -> dict:
    """Check an eval section and complete it from the run config; return the completed copy.

    Args:
        section: ``{label, name, dataset, ...}`` (see the module docstring).
        key: The section's YAML key, for error messages (e.g. ``callbacks.lora_probe.source_evals[0]``).
        train_config: llm-foundry's run config (``device_eval_batch_size``, ``max_seq_len``), or None.

    Returns:
        A copy with ``batch_size`` set (``device_eval_batch_size`` renamed) and ``dataset.max_seq_len`` filled in
        from the run's ``max_seq_len`` when the section has none.

    Raises:
        ValueError: naming ``key``, the bad value and the fix.

    Example:
        .. code-block:: python

            check_eval_section({'label': 'prose', 'name': 'text', 'dataset': {'local': '/data/prose', 'split':
                                'val'}}, 'source_evals[0]', {'device_eval_batch_size': 8, 'max_seq_len': 128})
            # {'label': 'prose', 'name': 'text', 'dataset': {'local': '/data/prose', 'split': 'val',
            #  'max_seq_len': 128}, 'batch_size': 8}
    """
    section = copy.deepcopy(check_loader_section(section, key, require_label=True))
    if train_config is not None and not isinstance(train_config, Mapping):
        raise ValueError(f'train_config={train_config!r} is a {type(train_config).__name__}. Fix: pass the run '
                         f'config as a dict (llm-foundry does this for callbacks_with_config), or None.')
    section['batch_size'] = _batch_size(section, key, train_config)
    subset = section.get('subset_num_batches')
    if subset is not None and subset != -1 and _positive_int(subset) is None:
        raise ValueError(f'{key}.subset_num_batches={subset!r} is invalid. Fix: use a positive int (batches per '
                         f'evaluation), or -1 for the whole dataloader.')
    dataset = section.get('dataset')
    if 'dataset' in section and not isinstance(dataset, Mapping):
        raise ValueError(f'{key}.dataset={dataset!r} is not a mapping. Fix: write the dataset as in {_EXAMPLE}.')
    run_seq_len = (train_config or {}).get('max_seq_len')
    if isinstance(dataset, Mapping):
        dataset = dict(dataset)
        if dataset.get('max_seq_len') is None and run_seq_len is not None:
            dataset['max_seq_len'] = run_seq_len
        section['dataset'] = dataset
    _check_dataloader_name(section['name'], key)
    _check_local_dataset(section, key)
    return section


def build_section_evaluator(section: Mapping, tokenizer: Any, key: str) -> Evaluator:
    """A Composer ``Evaluator`` labelled by the section's ``label``, from a section :func:`check_eval_section`
    completed, with llm-foundry's ``build_dataloader`` and the run's ``tokenizer``.

    Its ``metric_names`` stay unset: the probe chooses the metrics (:func:`~composer_ext.lora_probe.evaluation.
    follow_metrics`).
    """
    # A deep copy: llm-foundry's builders write into the section (dataset.replication, ...), and the probe's own
    # copy must stay what the user wrote (it is the probe's repr).
    loader_section = copy.deepcopy({k: v for k, v in section.items() if k not in PROBE_SECTION_KEYS})
    spec = build_eval_loader(loader_section, tokenizer, section['batch_size'], key)
    return Evaluator(label=section['label'], dataloader=spec, subset_num_batches=section.get('subset_num_batches'))
