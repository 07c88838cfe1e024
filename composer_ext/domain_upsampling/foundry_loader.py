"""llm-foundry's ``text_mixture`` dataloader: a :class:`~composer_ext.domain_upsampling.mixture.MixtureDataset` over
per-domain Streaming ``StreamingDataset`` s, tokenized with the run's tokenizer, for
:class:`~composer_ext.algorithms.DomainUpsampling` to drive.

Installed as the entry point ``text_mixture`` of the group ``llmfoundry_dataloaders``, so an llm-foundry YAML names
it like llm-foundry's own ``text`` loader (llm-foundry calls it with ``(tokenizer, device_batch_size, **section)``):

.. code-block:: yaml

    train_loader:
      name: text_mixture
      dataset:
        domains:                      # one Streaming dataset per domain: remote/local/split as in llm-foundry
          code: {remote: null, local: /data/code, split: train}
          math: {local: /data/math, split: train}
        max_seq_len: 128
        shuffle: true                 # read each domain in a seeded permutation (shuffle_seed)
      drop_last: true
      num_workers: 0
    algorithms:
      domain_upsampling: {schedule: {base: {code: 0.5, math: 0.5}, target: {code: 0.1, math: 0.9}, start: 0.8dur}}

It builds through :func:`~composer_ext.domain_upsampling.mixture.build_mixture_dataspec`, the builder of
``composer-ext run``'s ``text_mixture`` too. Every mistake in the section raises ``ValueError`` here, when
llm-foundry builds the loader, before the model is built.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Mapping
from typing import Any, Optional, Union

import torch
from composer.core import DataSpec

from composer_ext.core.streaming import open_streaming_dataset
from composer_ext.domain_upsampling.mixture import build_mixture_dataspec
from composer_ext.domain_upsampling.plan import SAMPLING
from composer_ext.domain_upsampling.schedule import MixtureSchedule

__all__ = ['DATASET_KEYS', 'DOMAIN_KEYS', 'build_text_mixture_dataloader', 'check_domain_section']

# dataset: key -> what it does (the section's documentation, and the list an unknown key is shown).
DATASET_KEYS = {
    'domains': 'domain name -> {remote, local, split, ...}: one Streaming dataset per domain (required)',
    'max_seq_len': "tokens per row; longer samples keep their first max_seq_len tokens (required)",
    'shuffle': 'read each domain in a seeded permutation (default false, as llm-foundry\'s text loader)',
    'shuffle_seed': "seed of the domain choices and of the within-domain order (default 9176, as llm-foundry's)",
    'weights': 'domain -> weight of the fixed mix (default: in proportion to the domains\' samples); '
               'domain_upsampling replaces it with its schedule at FIT_START',
    'normalize': 'rescale weights to sum to 1 (default false)',
    'epoch_size': 'global samples per epoch (default: all domains\' samples together)',
    'sampling': "'stratified' (default) or 'random' domain choices",
}
# dataset.domains.<name>: the Streaming arguments that say where a domain's data is and how it is fetched.
DOMAIN_KEYS = ('remote', 'local', 'split', 'download_retry', 'download_timeout', 'validate_hash', 'keep_zip',
               'cache_limit', 'allow_unsafe_types', 'shuffle_algo', 'shuffle_block_size', 'num_canonical_nodes')
# Of Streaming's order options, these three shape how MixtureDataset reads a domain (its shard-local shuffle and how
# the domain is split over nodes), so they are taken per domain; the other order options would do nothing.
_READ_ORDER_KEYS = ('shuffle_algo', 'shuffle_block_size', 'num_canonical_nodes')
# Streaming options about the order of iteration, mixing or partitioning: the MixtureDataset reads each domain by
# sample index in its own order and mixes by weight, so these would silently do nothing.
_ORDER_KEYS = ('shuffle', 'shuffle_seed', 'partition_algo', 'batching_method', 'sampling_method', 'sampling_granularity', 'epoch_size',
               'predownload', 'proportion', 'repeat', 'choose', 'replication', 'batch_size')
_EXAMPLE = ('dataset: {domains: {code: {remote: null, local: /data/code, split: train}, math: {local: /data/math, '
            'split: train}}, max_seq_len: 128, shuffle: true}')


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_domain_section(name: Any, section: Any) -> dict:
    """Check ``dataset.domains.<name>`` of a ``text_mixture`` section; return its StreamingDataset arguments.

    Raises:
        ValueError: naming the key, the bad value and the fix.

    Example:
        >>> check_domain_section('code', {'remote': 's3://bucket/code', 'local': '/data/code', 'split': 'train'})
        {'remote': 's3://bucket/code', 'local': '/data/code', 'split': 'train'}
    """
    key = f'text_mixture dataset.domains.{name}'
    if not isinstance(name, str) or not name:
        raise ValueError(f'text_mixture dataset.domains has the key {name!r}, which is not a domain name. Fix: name '
                         f'each domain with a string, e.g. {_EXAMPLE}.')
    if not isinstance(section, Mapping):
        raise ValueError(f'{key}={section!r} is a {type(section).__name__}, not a Streaming dataset section. Fix: '
                         f'write {name}: {{remote: null, local: /data/{name}, split: train}}.')
    section = {str(k): v for k, v in section.items()}
    for option in section:
        if option in _ORDER_KEYS:
            where = {'shuffle': 'dataset.shuffle', 'shuffle_seed': 'dataset.shuffle_seed',
                     'epoch_size': 'dataset.epoch_size', 'proportion': 'dataset.weights',
                     'repeat': 'dataset.weights', 'choose': 'dataset.weights'}.get(option)
            fix = f'set {where} instead' if where else 'remove it'
            raise ValueError(f'{key}.{option}={section[option]!r} is a Streaming option about the order or mix of '
                             f'samples, but text_mixture reads each domain by sample index in its own seeded order '
                             f'and mixes the domains by weight, so it would do nothing. Fix: {fix}.')
        if option not in DOMAIN_KEYS:
            raise ValueError(f'{key} has the unknown key {option!r}. Fix: use only {list(DOMAIN_KEYS)} (where the '
                             f'data is and how it is fetched), e.g. {name}: {{remote: null, local: /data/{name}, '
                             f'split: train}}.')
    _check_read_order(key, section)
    remote, local, split = section.get('remote'), section.get('local'), section.get('split')
    wanted = {'remote': 'a directory or URL to download from', 'local': 'a directory',
              'split': 'the name of a subdirectory, such as train'}
    for option, value in (('remote', remote), ('local', local), ('split', split)):
        if value is not None and not isinstance(value, (str, os.PathLike)):
            raise ValueError(f'{key}.{option}={value!r} is not a path. Fix: give {wanted[option]} (or null).')
    if remote is None and local is None:
        raise ValueError(f'{key} has neither remote nor local, so it names no data. Fix: give local (an MDS '
                         f'directory) and/or remote (where to download it from), e.g. {name}: {{local: '
                         f'/data/{name}, split: train}}.')
    if remote is None:
        directory = os.path.join(os.fspath(local), os.fspath(split)) if split is not None else os.fspath(local)
        if not os.path.isfile(os.path.join(directory, 'index.json')):
            shown = f'local={os.fspath(local)!r}' + (f' with split={os.fspath(split)!r}' if split is not None else '')
            raise ValueError(f'{key}: {shown} is not an MDS dataset ({directory!r} has no index.json) and remote is '
                             f'null, so there is nowhere to read it from. Fix: point local (plus split, a '
                             f'subdirectory) at a directory written by streaming.MDSWriter, or give remote.')
    return section


def _check_read_order(key: str, section: dict) -> None:
    from streaming.base.shuffle import algos

    algo = section.get('shuffle_algo')
    if algo is not None and algo not in algos:
        raise ValueError(f'{key}.shuffle_algo={algo!r} is not one of Streaming\'s shuffle algorithms. Fix: use one of '
                         f'{sorted(algos)} (py1e, the default, keeps reads within a window of a few shards).')
    for option in ('shuffle_block_size', 'num_canonical_nodes'):
        value = section.get(option)
        if value is not None and (not _is_int(value) or value < 1):
            raise ValueError(f'{key}.{option}={value!r} is not a positive int. Fix: give a number of '
                             f'{"samples" if option == "shuffle_block_size" else "canonical nodes"}, or leave it '
                             f'out for the default.')


def _check_flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f'text_mixture dataset.{name}={value!r} is not a boolean. Fix: write true or false.')
    return value


def _check_weights(weights: Any, names: list[str], normalize: bool) -> Optional[dict]:
    if weights is None:
        return None
    key = 'text_mixture dataset.weights'
    if not isinstance(weights, Mapping) or not weights:
        raise ValueError(f'{key}={weights!r} is not a mapping of domain -> weight. Fix: write e.g. '
                         f'{{{", ".join(f"{n}: {1 / len(names):.2g}" for n in names)}}}, or leave it out for the '
                         f'natural mix.')
    weights = {str(k): v for k, v in weights.items()}
    unknown = [d for d in weights if d not in names]
    if unknown:
        raise ValueError(f'{key} names {unknown}, which dataset.domains does not have (it has {names}). Fix: weigh '
                         f'only those domains.')
    missing = [d for d in names if d not in weights]
    if missing:
        raise ValueError(f'{key} gives no weight to {missing}. Fix: give every domain of dataset.domains a weight '
                         f'(0 leaves a domain out).')
    try:
        MixtureSchedule.constant(weights, normalize=normalize)
    except (TypeError, ValueError) as err:
        raise ValueError(f'{key}={weights!r}: {err}') from None
    return weights


def build_text_mixture_dataloader(
    tokenizer: Any,
    device_batch_size: Union[int, float],
    dataset: dict[str, Any],
    drop_last: bool = True,
    num_workers: int = 0,
    pin_memory: bool = True,
    prefetch_factor: Optional[int] = 2,
    persistent_workers: bool = True,
    timeout: float = 0,
    **unknown: Any,
) -> DataSpec:
    """llm-foundry's ``text_mixture`` dataloader (llm-foundry's dataloader signature; see the module docstring).

    Each ``dataset.domains.<name>`` becomes a Streaming ``StreamingDataset`` (``remote``/``local``/``split`` and the
    fetching options of :data:`DOMAIN_KEYS`), read by global sample index by a
    :class:`~composer_ext.domain_upsampling.mixture.MixtureDataset`: each domain in a seeded permutation when
    ``shuffle`` (seed ``shuffle_seed``), the domains mixed by ``weights`` (default: the natural mix) until
    ``domain_upsampling`` installs its schedule. Every rank reads its own positions of every global batch, so the
    ranks' samples are disjoint. The ``text`` column is tokenized with the run's ``tokenizer`` to ``max_seq_len``
    tokens (an EOS appended when there is room); a ``tokens`` column is used instead only when it equals this
    tokenizer's encoding of the text on the first samples of the domain
    (:func:`~composer_ext.domain_upsampling.mixture.tokens_written_by`). Batches are llm-foundry LM batches:
    ``input_ids``, ``attention_mask``, ``labels`` (``-100`` on padding), plus the rows' ``domain`` (the mixture's
    name) and ``uid`` lists; Composer counts their real and loss-generating tokens.

    Args:
        tokenizer: The run's tokenizer (llm-foundry passes it).
        device_batch_size: Samples per rank per batch (llm-foundry passes ``device_train_batch_size``).
        dataset: The ``dataset`` section (keys: :data:`DATASET_KEYS`).
        drop_last, num_workers, pin_memory, prefetch_factor, persistent_workers, timeout: DataLoader arguments,
            as in llm-foundry's ``text`` loader; without workers ``prefetch_factor`` and ``persistent_workers`` do
            not apply and are ignored, and ``pin_memory`` applies only where an accelerator is present.

        **unknown: Refused with a ``ValueError`` that lists the keys above (a mistake, not a silent no-op).

    Raises:
        ValueError: for every mistake in the section, naming the key, the bad value and the fix.
    """
    if unknown:
        raise ValueError(f'text_mixture has the unknown keys {sorted(unknown)}. Fix: use only name, dataset, '
                         f'drop_last, num_workers, pin_memory, prefetch_factor, persistent_workers and timeout at this '
                         f'level (the batch size is global_train_batch_size; the data and its order go under '
                         f'dataset, e.g. {_EXAMPLE}).')
    if tokenizer is None:
        raise ValueError('text_mixture needs the run\'s tokenizer, and llm-foundry passed none. Fix: give the run a '
                         'tokenizer section (tokenizer: {name: <a tokenizer directory>}).')
    if not _is_int(device_batch_size) or device_batch_size < 1:
        raise ValueError(f'text_mixture: device_batch_size={device_batch_size!r} is not a positive whole number of '
                         f'samples. Fix: make global_train_batch_size a multiple of the number of ranks.')
    if not isinstance(dataset, Mapping):
        raise ValueError(f'text_mixture dataset={dataset!r} is a {type(dataset).__name__}, not a section. Fix: write '
                         f'{_EXAMPLE}.')
    dataset = {str(k): v for k, v in dataset.items()}
    for key in dataset:
        if key in ('remote', 'local', 'split', 'streams'):
            raise ValueError(f'text_mixture dataset.{key} is set, but text_mixture reads one Streaming dataset per '
                             f'domain. Fix: move it into dataset.domains.<name> for each domain, e.g. {_EXAMPLE}.')
        if key not in DATASET_KEYS:
            raise ValueError(f'text_mixture dataset has the unknown key {key!r}. Fix: use only '
                             f'{list(DATASET_KEYS)}: ' + '; '.join(f'{k}: {v}' for k, v in DATASET_KEYS.items()) + '.')
    domains = dataset.get('domains')
    if not isinstance(domains, Mapping) or not domains:
        raise ValueError(f'text_mixture dataset.domains={domains!r} is not a mapping of domain name -> Streaming '
                         f'dataset section. Fix: write {_EXAMPLE}.')
    sections = {name: check_domain_section(name, section) for name, section in domains.items()}
    max_seq_len = dataset.get('max_seq_len')
    if not _is_int(max_seq_len) or max_seq_len < 2:
        raise ValueError(f'text_mixture dataset.max_seq_len={max_seq_len!r} is not an int >= 2. Fix: set it to the '
                         f"model's sequence length, e.g. max_seq_len: ${{max_seq_len}}.")
    shuffle = _check_flag('shuffle', dataset.get('shuffle', False))
    normalize = _check_flag('normalize', dataset.get('normalize', False))
    seed = dataset.get('shuffle_seed', 9176)
    if not _is_int(seed) or seed < 0:
        raise ValueError(f'text_mixture dataset.shuffle_seed={seed!r} is not an int >= 0. Fix: use e.g. 9176.')
    epoch_size = dataset.get('epoch_size')
    if epoch_size is not None and (not _is_int(epoch_size) or epoch_size < 1):
        raise ValueError(f'text_mixture dataset.epoch_size={epoch_size!r} is not a positive int. Fix: give the global '
                         f'samples per epoch, or null for all domains\' samples.')
    sampling = dataset.get('sampling', 'stratified')
    if sampling not in SAMPLING:
        raise ValueError(f'text_mixture dataset.sampling={sampling!r} is not a sampling mode. Fix: use one of '
                         f'{list(SAMPLING)}.')
    weights = _check_weights(dataset.get('weights'), list(sections), normalize)
    for name, value in (('drop_last', drop_last), ('pin_memory', pin_memory),
                        ('persistent_workers', persistent_workers)):
        if not isinstance(value, bool):
            raise ValueError(f'text_mixture {name}={value!r} is not a boolean. Fix: write true or false.')
    if not _is_int(num_workers) or num_workers < 0:
        raise ValueError(f'text_mixture num_workers={num_workers!r} is invalid. Fix: use an int >= 0.')
    datasets = {}
    for name, section in sections.items():
        try:
            datasets[name] = open_streaming_dataset(**section, batch_size=int(device_batch_size), shuffle=False)
        except (OSError, ValueError, RuntimeError) as err:
            raise ValueError(f'text_mixture dataset.domains.{name}: Streaming could not open {section}: {err}. Fix: '
                             f'check remote, local and split (an MDS dataset is read from remote/split into '
                             f'local/split).') from err
    try:
        spec = build_mixture_dataspec(datasets, tokenizer, int(device_batch_size), int(max_seq_len), weights=weights,
                                      normalize=normalize, num_samples=epoch_size, seed=int(seed), shuffle=shuffle,
                                      sampling=sampling, num_workers=int(num_workers), drop_last=drop_last,
                                      pin_memory=pin_memory and _has_accelerator(),
                                      timeout=timeout,
                                      **({'prefetch_factor': prefetch_factor, 'persistent_workers': persistent_workers}
                                         if num_workers else {}))
    except (TypeError, ValueError) as err:
        raise ValueError(f'text_mixture dataset: {err}') from err
    return spec


def _has_accelerator() -> bool:
    """Whether pinned memory can help (torch warns about pin_memory without an accelerator)."""
    accelerator = getattr(torch, 'accelerator', None)
    if accelerator is not None and hasattr(accelerator, 'is_available'):
        return bool(accelerator.is_available())
    return torch.cuda.is_available()
