"""Building what an llm-foundry YAML section describes: a model (llm-foundry section + checkpoint, or a Hugging Face
directory), and an evaluation dataloader from an llm-foundry ``eval_loader``-style section.

llm-foundry's ``train`` builds callbacks and algorithms *before* its tokenizer-dependent model and dataloaders, and
passes them only the keyword arguments of their YAML entry. So our classes keep such sections as plain dicts when
they are constructed (checked there by :func:`check_model_spec` / :func:`check_loader_section`, so a YAML mistake
fails before training starts), and build them at ``FIT_START`` with :func:`build_model_spec` /
:func:`build_eval_loader`, on the student's device and with the run's tokenizer (:func:`run_tokenizer`).

A *model spec* is one of:

* ``{model: <llm-foundry model section>, checkpoint: <path or null>}`` -- built with llm-foundry's own
  ``build_composer_model`` (so every model llm-foundry knows, MPT and ``hf_causal_lm`` included), then its weights
  read from the checkpoint (a Composer checkpoint such as ``latest-rank0.pt``, or a state dict; ``weights_only``
  loading, see :mod:`composer_ext.core.checkpoints`);
* ``{pretrained_model_name_or_path: <Hugging Face directory>}`` -- ``transformers.AutoModelForCausalLM`` from a
  local directory (no download: ``local_files_only``), plus optional ``checkpoint``.

llm-foundry is an optional dependency (``pip install "composer-ext[llmfoundry]"``); this module imports it only when
a section needs it, and says how to install it when it is missing.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Mapping
from typing import Any, Optional

import torch
from torch import nn

from composer_ext.core.checkpoints import load_checkpoint, load_weights, model_state_dict
from composer_ext.core.unwrap import unwrap_parallel

__all__ = ['HF_SPEC_KEYS', 'MODEL_SPEC_KEYS', 'build_eval_loader', 'build_model_spec', 'check_loader_section',
           'check_model_spec', 'has_llmfoundry', 'require_llmfoundry', 'run_tokenizer']

MODEL_SPEC_KEYS = ('model', 'checkpoint')
HF_SPEC_KEYS = ('pretrained_model_name_or_path', 'checkpoint')
INSTALL_HINT = 'pip install "composer-ext[llmfoundry]"'


def has_llmfoundry() -> bool:
    """Whether llm-foundry is installed (without importing it: importing it takes seconds)."""
    return importlib.util.find_spec('llmfoundry') is not None


def require_llmfoundry(key: str) -> None:
    """Raise a ValueError naming ``key`` and the install command when llm-foundry is missing."""
    if not has_llmfoundry():
        raise ValueError(f'{key} is an llm-foundry section, but llm-foundry is not installed. Fix: '
                         f'{INSTALL_HINT} (or build the object in Python and pass it instead).')


def check_model_spec(spec: Any, key: str) -> dict:
    """Check a model spec (see the module docstring) without building it; return it as a plain dict.

    Raises:
        ValueError: naming ``key``, the bad value and the fix.

    Example:
        >>> check_model_spec({'model': {'name': 'mpt_causal_lm', 'd_model': 64}, 'checkpoint': None}, 'teachers[0]')
        {'model': {'name': 'mpt_causal_lm', 'd_model': 64}, 'checkpoint': None}
        >>> check_model_spec({'model': {'d_model': 64}}, 'teachers[0]')
        Traceback (most recent call last):
        ...
        ValueError: teachers[0].model={'d_model': 64} is not a model section with a name. Fix: write an llm-foundry model section, e.g. {name: mpt_causal_lm, d_model: 64, n_heads: 2, n_layers: 2, max_seq_len: 128, vocab_size: 50368}.
    """
    example = ("{model: {name: mpt_causal_lm, d_model: 64, ...}, checkpoint: runs/t/checkpoints/latest-rank0.pt} or "
               '{pretrained_model_name_or_path: /models/hf_dir}')
    if not isinstance(spec, Mapping):
        raise ValueError(f'{key}={spec!r} is a {type(spec).__name__}, not a model section. Fix: write {example}.')
    spec = {str(k): v for k, v in spec.items()}
    if 'model' in spec and 'pretrained_model_name_or_path' in spec:
        raise ValueError(f'{key} has both model and pretrained_model_name_or_path. Fix: give one: {example}.')
    allowed = MODEL_SPEC_KEYS if 'model' in spec else HF_SPEC_KEYS
    if not ('model' in spec or 'pretrained_model_name_or_path' in spec):
        raise ValueError(f'{key}={spec!r} names no model. Fix: write {example}.')
    unknown = sorted(set(spec) - set(allowed))
    if unknown:
        raise ValueError(f'{key} has unknown keys {unknown}. Fix: use only {list(allowed)}, e.g. {example}.')
    checkpoint = spec.get('checkpoint')
    if checkpoint is not None and not isinstance(checkpoint, (str, os.PathLike)):
        raise ValueError(f'{key}.checkpoint={checkpoint!r} is not a path. Fix: give the checkpoint file (e.g. '
                         f'runs/teacher/checkpoints/latest-rank0.pt) or null.')
    if checkpoint is not None and not os.path.isfile(checkpoint):
        what = 'a directory' if os.path.isdir(checkpoint) else 'missing'
        raise ValueError(f'{key}.checkpoint={os.fspath(checkpoint)!r} is {what}. Fix: give the checkpoint file '
                         f'itself (e.g. .../checkpoints/latest-rank0.pt).')
    if 'model' in spec:
        section = spec['model']
        if not isinstance(section, Mapping) or not isinstance(section.get('name'), str):
            raise ValueError(f'{key}.model={section!r} is not a model section with a name. Fix: write an llm-foundry '
                             f'model section, e.g. {{name: mpt_causal_lm, d_model: 64, n_heads: 2, n_layers: 2, '
                             f'max_seq_len: 128, vocab_size: 50368}}.')
        require_llmfoundry(f'{key}.model')
    else:
        path = spec['pretrained_model_name_or_path']
        if not isinstance(path, (str, os.PathLike)) or not os.path.isfile(os.path.join(path, 'config.json')):
            raise ValueError(f'{key}.pretrained_model_name_or_path={path!r} is not a local Hugging Face model '
                             f'directory (no config.json; nothing is downloaded at run time). Fix: save the model '
                             f'with model.save_pretrained(DIR) and give DIR.')
    return spec


def check_loader_section(section: Any, key: str, require_label: bool = True) -> dict:
    """Check an llm-foundry dataloader section (``{label: ..., name: text, dataset: {...}}``); return a copy.

    Example:
        >>> check_loader_section({'label': 'prose', 'name': 'text', 'dataset': {'local': '/d'}}, 'source_evals[0]')
        {'label': 'prose', 'name': 'text', 'dataset': {'local': '/d'}}
    """
    example = '{label: prose, name: text, dataset: {local: /data/prose, split: val, max_seq_len: 128}}'
    if not isinstance(section, Mapping):
        raise ValueError(f'{key}={section!r} is a {type(section).__name__}, not a dataloader section. Fix: write '
                         f'{example}.')
    section = dict(section)
    if not isinstance(section.get('name'), str):
        raise ValueError(f'{key} has no dataloader name. Fix: add name (e.g. text), as in {example}.')
    if require_label and (not isinstance(section.get('label'), str) or not section['label']):
        raise ValueError(f'{key} has no label (label={section.get("label")!r}). Fix: add a label naming what it '
                         f'measures, as in {example}.')
    require_llmfoundry(key)
    return section


def _llmfoundry_model(section: Mapping, tokenizer: Any, key: str) -> nn.Module:
    from llmfoundry import registry
    from llmfoundry.utils.builders import build_composer_model

    config = dict(section)
    name = config.pop('name')
    if name not in registry.models:
        raise ValueError(f'{key}.model.name={name!r} is not an llm-foundry model. Fix: use one of '
                         f'{sorted(registry.models.get_all())}.')
    config.pop('master_weights_dtype', None)
    # Built on the CPU and moved by the caller: meta/mixed init belongs to the student's FSDP setup, not a frozen copy.
    config['init_device'] = 'cpu'
    return build_composer_model(name=name, cfg=config, tokenizer=tokenizer, init_context=contextlib.nullcontext())


def _hf_model(path: Any) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(os.fspath(path), local_files_only=True)


def build_model_spec(spec: Mapping, tokenizer: Any, device: Optional[torch.device], key: str) -> nn.Module:
    """Build a checked model spec: the model, its checkpoint's weights loaded strictly, on ``device``, in eval mode.

    Args:
        spec: A spec that :func:`check_model_spec` accepted.
        tokenizer: The run's tokenizer (llm-foundry builders size and pad with it); may be None for HF directories.
        device: Where the model goes (the student's device); None keeps it on the CPU.
        key: The spec's YAML key, for error messages.
    """
    spec = check_model_spec(spec, key)
    if 'model' in spec:
        model = _llmfoundry_model(spec['model'], tokenizer, key)
    else:
        model = _hf_model(spec['pretrained_model_name_or_path'])
    checkpoint = spec.get('checkpoint')
    if checkpoint is not None:
        what = f'{key}.checkpoint'
        load_weights(model, model_state_dict(load_checkpoint(checkpoint, True, what), checkpoint), checkpoint, key)
    if device is not None:
        model = model.to(device)
    return model.eval()


def run_tokenizer(model: Any) -> Any:
    """The tokenizer a Composer model was built with (``HuggingFaceModel.tokenizer``, llm-foundry models), or None."""
    return getattr(unwrap_parallel(model), 'tokenizer', None)


def build_eval_loader(section: Mapping, tokenizer: Any, device_batch_size: int, key: str) -> Any:
    """An llm-foundry dataloader (a Composer ``DataSpec``) from a checked section, without its ``label``.

    Uses llm-foundry's own ``build_dataloader`` (its registry of dataloaders: ``text``, ``finetuning``, ours), so the
    section reads exactly as an ``eval_loader`` entry of an llm-foundry YAML.
    """
    section = check_loader_section(section, key, require_label=False)
    section.pop('label', None)
    if tokenizer is None:
        raise ValueError(f'{key} needs the run\'s tokenizer, but the model has none. Fix: train a model that carries '
                         f'its tokenizer (llm-foundry models and HuggingFaceModel do).')
    if isinstance(device_batch_size, bool) or not isinstance(device_batch_size, int) or device_batch_size < 1:
        raise ValueError(f'{key}: device_batch_size={device_batch_size!r} is invalid. Fix: set a positive int '
                         f'(device_eval_batch_size in the run config, or batch_size in the section).')
    from llmfoundry.data.dataloader import build_dataloader

    section.setdefault('drop_last', False)
    section.setdefault('num_workers', 0)
    if section['num_workers'] == 0:  # llm-foundry's text loader sets these by default; torch refuses them without workers
        section.setdefault('prefetch_factor', None)
        section.setdefault('persistent_workers', False)
    return build_dataloader(section, tokenizer, device_batch_size)
