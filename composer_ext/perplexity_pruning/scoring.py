"""Reference-model perplexity of every sample of an MDS directory: ``composer-ext score``.

For a sample of ``n`` tokens the score is the mean negative log-likelihood of tokens ``1 .. n-1`` given
their prefix (``n - 1`` predictions; padding is never counted), and the perplexity is ``exp`` of it, as in
*Perplexed by Perplexity* (Ankner et al. 2024). A sample longer than the window (the model's context by
default) is scored in overlapping windows: every token is predicted exactly once, with at least
``max_len - stride`` tokens of context after the first window, so nothing is truncated.

The scorer runs the model's base transformer and applies the output layer in chunks of positions, which
never materialises the ``batch x length x vocabulary`` logits tensor; it does this only after checking on a
probe input that it gives bit-identical logits to the model's own forward (otherwise it falls back to the
full forward). Batches never span shards, so a shard's scores do not depend on which rank scored it:
scores from ``composer -n N`` equal the single-process scores exactly.

The score covers the whole sample, while a ``selected_text`` training run (like the ``text`` loader) keeps
only each sample's first ``seq_len`` tokens. For samples longer than ``seq_len`` the two differ; pass
``max_tokens=seq_len`` (``--max-tokens``) to score exactly what training will see.

``composer-ext score --model CKPT_OR_HF_DIR --data MDS_DIR --out SCORES_DIR`` writes a score index
(:mod:`composer_ext.perplexity_pruning.score_index`) shard by shard; a killed run resumes where it stopped.

An llm-foundry checkpoint (``llmfoundry train`` with a ``save_folder``: MPT, or any model in llm-foundry's
registry) is scored with its model section: ``--model CKPT --model-config SECTION.yaml``, where the YAML file holds
the ``model`` section itself or is the llm-foundry YAML that trained the checkpoint (its ``model:`` key is used,
interpolations resolved). The model is built with llm-foundry's own ``build_composer_model``
(:func:`composer_ext.core.foundry_sections.build_model_spec`) and the checkpoint's weights are loaded strictly; the
section's digest joins the score index's identity, so resuming with another section is refused.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from composer.models import HuggingFaceModel
from composer.utils import dist
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from composer_ext.core.checkpoints import load_checkpoint, load_weights, model_state_dict
from composer_ext.core.foundry_sections import build_model_spec, check_model_spec
from composer_ext.core.provenance import ids_sha256, json_sha256
from composer_ext.core.unwrap import unwrap_huggingface
from composer_ext.data.mds import MDSDataset
from composer_ext.perplexity_pruning.fingerprints import model_fingerprint, tokenizer_fingerprint
from composer_ext.perplexity_pruning.reference_split import ReferenceSplit
from composer_ext.perplexity_pruning.score_index import (STATUS_REFERENCE, STATUS_SCORED, STATUS_TOO_SHORT, ScoreIndex,
                                                         ScoreIndexError, ScoreIndexWriter)
from composer_ext.perplexity_pruning.selection import read_selection

__all__ = ['LLMFOUNDRY_KIND', 'PRECISIONS', 'PerplexityScorer', 'ReferenceModel', 'ScoreBatch', 'ScoringFailedError',
           'TokenizerMismatchError', 'TokenizerUnverifiedWarning', 'UnrecordedReferenceWarning',
           'load_reference_model', 'read_model_config', 'score_mds', 'configure_parser', 'cli_main']

PRECISIONS = ('fp32', 'amp_bf16', 'amp_fp16')
# ReferenceModel.source['kind'] of a model built from an llm-foundry model section and its checkpoint.
LLMFOUNDRY_KIND = 'llmfoundry_checkpoint'
# Section keys that do not change what the built model computes (the scorer builds on the CPU, then moves it).
_CONFIG_KEYS_NOT_HASHED = ('init_device',)
_TOKENIZER_CHECK_SAMPLES = 8


class TokenizerMismatchError(ValueError):
    """The data was tokenized with another tokenizer than the model's (or ids exceed its vocabulary)."""


class ScoringFailedError(RuntimeError):
    """Scoring failed on another rank (this rank's own error is raised as itself)."""


class TokenizerUnverifiedWarning(UserWarning):
    """The data has token ids but no text: the tokenizer that produced them cannot be checked."""


class UnrecordedReferenceWarning(UserWarning):
    """Nothing says which samples trained the reference model: any of them in the data are scored too."""


# --- loading the reference model ---------------------------------------------------------------------------


@dataclass
class ReferenceModel:
    """A causal LM to score with, its tokenizer, where it came from and (if recorded) what it trained on."""

    model: Any
    tokenizer: Any
    source: dict = field(default_factory=dict)
    trained_on: Optional[dict] = None


def _causal_lm(model: Any) -> Any:
    """The ``transformers`` model to score with: ``model`` itself, or the one inside a Composer HuggingFaceModel."""
    model = unwrap_huggingface(model)
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f'model={type(model).__name__} is not a HuggingFace causal LM. Fix: pass a transformers '
                        f'PreTrainedModel, a composer HuggingFaceModel, a Composer checkpoint or a HF directory.')
    return model


def _load_tokenizer(path: Union[str, Path]):
    path = Path(path)
    if not path.exists():
        raise ValueError(f'tokenizer={str(path)!r} does not exist. Fix: pass a tokenizer directory (save_pretrained), '
                         f'e.g. composer_ext.data.ensure_corpus().tokenizer_dir.')
    return AutoTokenizer.from_pretrained(str(path))


def _huggingface_state(checkpoint: Any) -> Optional[dict]:
    """The ``integrations.huggingface`` record of a Composer checkpoint (HF config and tokenizer files), or None."""
    state = checkpoint.get('state') if isinstance(checkpoint, dict) else None
    hf_state = (state or {}).get('integrations', {}).get('huggingface') if isinstance(state, dict) else None
    return hf_state or None


def _saved_class(hf_state: Optional[dict]) -> str:
    """The class path a Composer checkpoint records for its HuggingFace model (``''`` when none)."""
    config = ((hf_state or {}).get('model') or {}).get('config') or {}
    return str(config.get('class', '')) if isinstance(config, dict) else ''


def _saved_tokenizer(hf_state: Optional[dict]) -> Any:
    """The tokenizer a Composer checkpoint saved with its HuggingFaceModel, or None."""
    if not (hf_state or {}).get('tokenizer'):
        return None
    with tempfile.TemporaryDirectory() as folder:  # fast tokenizers are fully loaded into memory
        return HuggingFaceModel.load_huggingface_tokenizer_from_saved_state(hf_state, tokenizer_save_dir=folder)


def _trained_on(checkpoint: Any) -> Optional[dict]:
    """The training-data record (``composer_ext_selection``) of a Composer checkpoint's train dataset, if any."""
    state = checkpoint.get('state') if isinstance(checkpoint, dict) else None
    train_state = ((state or {}).get('dataset_state') or {}).get('train') if isinstance(state, dict) else None
    return train_state.get('composer_ext_selection') if isinstance(train_state, dict) else None


def _load_composer_checkpoint(path: Path, tokenizer: Any) -> ReferenceModel:
    checkpoint = load_checkpoint(path, weights_only=True, what='reference model checkpoint')
    state = checkpoint.get('state') if isinstance(checkpoint, dict) else None
    hf_state = _huggingface_state(checkpoint)
    if not hf_state:
        raise ValueError(f'model={str(path)!r} is not a checkpoint of a composer HuggingFaceModel (no HuggingFace '
                         f'config in it). Fix: score with a checkpoint of small_gpt (or another HuggingFaceModel), a '
                         f'HuggingFace directory, or an llm-foundry checkpoint with --model-config (model_config=).')
    if _saved_class(hf_state).startswith('llmfoundry.'):
        raise ValueError(f'model={str(path)!r} is a checkpoint of an llm-foundry model ({_saved_class(hf_state)}), '
                         f'which is built from its model section. Fix: add --model-config (model_config=) with that '
                         f'section: a YAML file holding it, or the llm-foundry YAML that trained the checkpoint.')
    model = HuggingFaceModel.load_huggingface_model_from_saved_state(hf_state, checkpoint, None, None)
    weights = {key[len('model.'):]: value for key, value in state['model'].items() if key.startswith('model.')}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = set(getattr(model, '_tied_weights_keys', None) or [])
    if unexpected or set(missing) - tied:
        raise ValueError(f'model={str(path)!r}: the checkpoint weights do not fit the saved config (missing '
                         f'{sorted(set(missing) - tied)[:3]}, unexpected {unexpected[:3]}). Fix: pass a full (not '
                         f'sharded) checkpoint of one HuggingFaceModel.')
    if tokenizer is None:
        tokenizer = _saved_tokenizer(hf_state)
    return ReferenceModel(model, tokenizer, {'kind': 'composer_checkpoint', 'path': str(path)}, _trained_on(checkpoint))


def read_model_config(model_config: Any) -> tuple[dict, Optional[str]]:
    """The llm-foundry model section that ``model_config`` (``--model-config``) gives, and the file it came from.

    Args:
        model_config: A mapping (the section), or a YAML file holding either the section itself (``name:
            mpt_causal_lm`` at the top) or an llm-foundry YAML with a ``model:`` key (e.g. the one that trained the
            checkpoint). Interpolations (``${variables.max_seq_len}``) are resolved.

    Returns:
        ``(section, path)``: the section as a plain dict (``path`` is None for a mapping).

    Raises:
        ValueError: the file is missing or not YAML, or it holds no model section with a ``name``.

    Example:
        >>> read_model_config({'name': 'mpt_causal_lm', 'd_model': 64})
        ({'name': 'mpt_causal_lm', 'd_model': 64}, None)
    """
    example = ('a file with `name: mpt_causal_lm`, `d_model: 64`, ... at the top (the model section), or the '
               'llm-foundry YAML that trained the checkpoint (its `model:` key is used)')
    path = None
    if isinstance(model_config, (str, Path)):
        path = str(model_config)
        if not Path(path).is_file():
            what = 'a directory' if Path(path).is_dir() else 'missing'
            raise ValueError(f'model_config={path!r} (--model-config) is {what}. Fix: pass a YAML file holding the '
                             f'llm-foundry model section: {example}.')
        try:
            config = OmegaConf.load(path)
        except Exception as err:  # noqa: BLE001 -- unreadable bytes, bad YAML syntax: the same user error
            problem = ' '.join(str(err).split())[:200]
            raise ValueError(f'model_config={path!r} (--model-config) is not a YAML file ({type(err).__name__}: '
                             f'{problem}). Fix: pass a YAML file holding the llm-foundry model section: '
                             f'{example}.') from None
    elif isinstance(model_config, (dict, DictConfig)) or hasattr(model_config, 'items'):
        config = OmegaConf.create(dict(model_config)) if not isinstance(model_config, DictConfig) else model_config
    else:
        raise ValueError(f'model_config={model_config!r} is a {type(model_config).__name__}. Fix: pass a YAML file '
                         f'or a mapping holding the llm-foundry model section: {example}.')
    shown = repr(path) if path is not None else repr(model_config)
    if not isinstance(config, DictConfig):
        raise ValueError(f'model_config={shown} (--model-config) holds a {type(config).__name__}, not a model '
                         f'section. Fix: write {example}.')
    if 'name' not in config and isinstance(config.get('model'), DictConfig):
        section = config.model
    else:
        section = config
    try:
        section = OmegaConf.to_container(section, resolve=True)
    except Exception as err:  # noqa: BLE001 -- omegaconf's interpolation errors
        problem = ' '.join(str(err).split())[:200]
        raise ValueError(f'model_config={shown} (--model-config): its model section cannot be resolved ({problem}). '
                         f'Fix: define what it interpolates in the same file, or write the values out.') from None
    if not isinstance(section.get('name'), str) or not section['name']:
        raise ValueError(f'model_config={shown} (--model-config) holds no model section with a name (top-level keys '
                         f'{sorted(map(str, section))[:8]}). Fix: write {example}.')
    return section, path


def _llmfoundry_model_names() -> list[str]:
    from llmfoundry import registry  # heavy (seconds), and only an llm-foundry reference model needs it

    return sorted(registry.models.get_all())


def _load_llmfoundry_checkpoint(path: Path, tokenizer: Any, model_config: Any) -> ReferenceModel:
    """An llm-foundry model built from its section, with the checkpoint's weights loaded strictly."""
    section, config_path = read_model_config(model_config)
    shown = repr(config_path) if config_path is not None else 'the given section'
    check_model_spec({'model': section, 'checkpoint': str(path)}, 'model_config')  # llm-foundry installed, a name
    names = _llmfoundry_model_names()
    if section['name'] not in names:
        raise ValueError(f'model_config={shown} (--model-config): name={section["name"]!r} is not an llm-foundry '
                         f'model. Fix: use the name of the run that trained the checkpoint, one of {names}.')
    checkpoint = load_checkpoint(path, weights_only=True, what='reference model checkpoint')
    hf_state = _huggingface_state(checkpoint)
    if tokenizer is None:
        tokenizer = _saved_tokenizer(hf_state)
    if tokenizer is None:
        raise ValueError(f'model={str(path)!r} has no tokenizer saved with it. Fix: pass --tokenizer DIR (the '
                         f'tokenizer the reference model was trained with).')
    composer_model = build_model_spec({'model': section, 'checkpoint': None}, tokenizer, None, 'model_config')
    try:
        load_weights(composer_model, model_state_dict(checkpoint, path), path, 'reference')
    except ValueError as err:
        problem = str(err).split(' Fix: ')[0].rstrip('.')
        raise ValueError(f'model_config={shown} (--model-config) does not describe the checkpoint '
                         f'model={str(path)!r}: {problem}. Fix: pass the model section of the run that saved the '
                         f'checkpoint (e.g. that run\'s YAML).') from None
    hashed = {k: v for k, v in section.items() if k not in _CONFIG_KEYS_NOT_HASHED}
    source = {'kind': LLMFOUNDRY_KIND, 'path': str(path), 'model_config': config_path, 'model_name': section['name'],
              'model_config_sha256': json_sha256(hashed), 'saved_class': _saved_class(hf_state) or None}
    return ReferenceModel(unwrap_huggingface(composer_model), tokenizer, source, _trained_on(checkpoint))


def load_reference_model(path: Union[str, Path], tokenizer: Union[str, Path, Any, None] = None,
                         model_config: Any = None) -> ReferenceModel:
    """Load a reference model from a Composer checkpoint, an llm-foundry checkpoint or a HuggingFace directory.

    Args:
        path: A checkpoint file written by ``composer-ext run`` for a ``HuggingFaceModel`` (such as
            ``small_gpt``; Composer stores the HF config and tokenizer in it), a checkpoint written by
            ``llmfoundry train`` (with ``model_config``), a ``save_folder`` holding ``latest-rank0.pt``, or a
            HuggingFace directory (``save_pretrained``).
        tokenizer: A tokenizer or its directory; default: the one stored with the model.
        model_config: For an llm-foundry checkpoint: its model section (see :func:`read_model_config`). The model
            is built with llm-foundry's ``build_composer_model`` and the checkpoint's weights loaded strictly.

    Returns:
        ReferenceModel: the ``transformers`` model (on CPU, eval mode), tokenizer, source, and the training
        data record of the checkpoint (which samples trained it), if any.

    A Composer checkpoint is read with ``weights_only=True`` (:func:`composer_ext.core.checkpoints.load_checkpoint`):
    tensors and plain data only, so an untrusted file cannot run code while it is unpickled.
    """
    if tokenizer is not None and isinstance(tokenizer, (str, Path)):
        tokenizer = _load_tokenizer(tokenizer)
    path = Path(path)
    if path.is_dir() and not (path / 'config.json').exists() and (path / 'latest-rank0.pt').exists():
        path = path / 'latest-rank0.pt'
    if model_config is not None and path.is_dir() and (path / 'config.json').exists():
        raise ValueError(f'model_config={model_config!r} (--model-config) was given with model={str(path)!r}, a '
                         f'HuggingFace directory, which carries its own config.json. Fix: drop --model-config, or pass '
                         f'the llm-foundry checkpoint file (e.g. .../checkpoints/latest-rank0.pt) that it describes.')
    if path.is_file() and model_config is not None:
        loaded = _load_llmfoundry_checkpoint(path.resolve(), tokenizer, model_config)
    elif path.is_file():
        loaded = _load_composer_checkpoint(path.resolve(), tokenizer)
    elif path.is_dir() and (path / 'config.json').exists():
        model = AutoModelForCausalLM.from_pretrained(str(path))
        if tokenizer is None and any((path / name).exists() for name in ('tokenizer.json', 'tokenizer_config.json')):
            tokenizer = _load_tokenizer(path)
        loaded = ReferenceModel(model, tokenizer, {'kind': 'huggingface', 'path': str(path.resolve())}, None)
    elif path.is_dir() and any(path.glob('*.distcp')):
        raise ValueError(f'model={str(path)!r} is a sharded (FSDP) checkpoint. Fix: save the reference model with '
                         f"parallelism.fsdp.state_dict_type: full, or convert it to a HuggingFace directory.")
    else:
        raise ValueError(f'model={str(path)!r} is neither a Composer checkpoint file nor a HuggingFace directory '
                         f'(no config.json). Fix: pass e.g. runs/<run>/checkpoints/latest-rank0.pt.')
    if loaded.tokenizer is None:
        raise ValueError(f'model={str(path)!r} has no tokenizer saved with it. Fix: pass --tokenizer DIR (the '
                         f'tokenizer the reference model was trained with).')
    loaded.model.eval()
    return loaded


# --- the scorer --------------------------------------------------------------------------------------------


@dataclass
class ScoreBatch:
    """A padded batch of windows and the positions whose next token is scored.

    ``rows``/``positions`` index the hidden state that predicts ``targets`` (flattened in row-major order);
    ``row_starts`` are the offsets of each row's targets (for per-row sums); ``windows`` the window ids.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    rows: torch.Tensor
    positions: torch.Tensor
    targets: torch.Tensor
    row_starts: np.ndarray
    windows: np.ndarray

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


def _check_int(name: str, value: Any, low: int, high: Optional[int] = None, fix: str = '') -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low or \
            (high is not None and value > high):
        bound = f'in [{low}, {high}]' if high is not None else f'>= {low}'
        fix = fix or f'use an int {bound}.'
        raise ValueError(f'{name}={value!r} is invalid: it must be an int {bound}. Fix: {fix}')
    return int(value)


class PerplexityScorer:
    """Mean token NLL of token sequences under a causal LM, batched, windowed, padding excluded.

    Args:
        model: A ``transformers`` causal LM or a composer ``HuggingFaceModel``.
        batch_size: Windows per forward pass.
        max_len: Window length in tokens (default: the model's context length).
        stride: Tokens between window starts for long samples (default ``max_len // 2``); each window after
            the first has at least ``max_len - stride`` tokens of context.
        device: Where to run (default: this rank's GPU when there is one, else CPU).
        precision: ``fp32`` (default on CPU), ``amp_bf16`` (default on GPU) or ``amp_fp16``. NLLs are
            computed in fp32 and summed in fp64 either way.

    The model is moved to ``device`` and put in eval mode.

    Example:
        .. code-block:: python

            import numpy as np
            from composer_ext.data import PerplexityScorer
            from composer_ext.models import small_gpt
            scorer = PerplexityScorer(small_gpt(), batch_size=16)
            nll_sum, num_tokens = scorer.score([[5, 9, 12, 7], [3, 3]])
            perplexity = np.exp(nll_sum / num_tokens)
    """

    def __init__(self, model: Any, batch_size: int = 32, max_len: Optional[int] = None, stride: Optional[int] = None,
                 device: Union[str, torch.device, None] = None, precision: Optional[str] = None):
        self.model = _causal_lm(model)
        config = self.model.config
        context = getattr(config, 'n_positions', None) or getattr(config, 'max_position_embeddings', None) or \
            getattr(config, 'max_seq_len', None)  # MPT (llm-foundry)
        self.batch_size = _check_int('batch_size', batch_size, 1)
        if max_len is None:
            if context is None:
                raise ValueError('the model config states no context length. Fix: pass max_len (--max-len).')
            max_len = int(context)
        self.max_len = _check_int('max_len', max_len, 2, int(context) if context else None,
                                  f'use at most the model context ({context}) and at least 2.')
        self.stride = _check_int('stride', self.max_len // 2 if stride is None else stride, 1, self.max_len - 1,
                                 f'use a stride below max_len={self.max_len}, e.g. {self.max_len // 2}.')
        if device is None:
            device = torch.device('cuda', dist.get_local_rank() % max(torch.cuda.device_count(), 1)) \
                if torch.cuda.is_available() else torch.device('cpu')
        self.device = torch.device(device)
        if precision is None:
            precision = 'amp_bf16' if self.device.type == 'cuda' else 'fp32'
        if precision not in PRECISIONS:
            raise ValueError(f'precision={precision!r} is not supported. Fix: use one of {list(PRECISIONS)}.')
        self.precision = precision
        self.vocab_size = int(config.vocab_size)
        self.model.to(self.device).eval()
        self.fast_path = self._probe_fast_path()
        self._chunk = max(128, min(4096, (1 << 21) // max(self.vocab_size, 1)))

    def __repr__(self) -> str:
        return (f'PerplexityScorer(<{type(self.model).__name__}>, batch_size={self.batch_size}, '
                f'max_len={self.max_len}, '
                f'stride={self.stride}, device={str(self.device)!r}, precision={self.precision!r})')

    # -- model plumbing ---------------------------------------------------------------------------------

    def autocast(self):
        """The autocast context the scorer runs the model under (a no-op for ``fp32``)."""
        if self.precision == 'fp32':
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == 'amp_bf16' else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _output_layer(self):
        head = self.model.get_output_embeddings()
        base = getattr(self.model, 'base_model', None)
        if not isinstance(head, torch.nn.Linear) or base is None or base is self.model:
            return None, None
        return base, head

    def _probe_fast_path(self) -> bool:
        """Use base model + chunked output layer only where it reproduces the model's logits bit for bit."""
        base, head = self._output_layer()
        if base is None:
            return False
        probe = (torch.arange(min(self.max_len, 16), device=self.device) * 7 % self.vocab_size)[None]
        with torch.inference_mode():
            try:
                full = self.model(input_ids=probe, use_cache=False).logits
                fast = head(base(input_ids=probe, use_cache=False)[0])
            except (TypeError, ValueError, RuntimeError):
                return False
        return full.shape == fast.shape and torch.equal(full.float(), fast.float())

    def _nll(self, source: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor, targets: torch.Tensor,
             head: Optional[torch.nn.Linear]) -> torch.Tensor:
        """Per-target NLL (fp32), ``chunk`` targets at a time: from hidden states through ``head`` (fast path),
        or from the model's logits. The fused ``cross_entropy`` kernel (log-softmax and gather in one) is about
        twice as fast on CPU as the same reduction written out in steps."""
        out = torch.empty(len(targets), dtype=torch.float32, device=source.device)
        for begin in range(0, len(targets), self._chunk):
            end = min(begin + self._chunk, len(targets))
            if head is not None:
                logits = head(source[rows[begin:end], positions[begin:end]])
            else:
                logits = source[rows[begin:end], positions[begin:end]]
            out[begin:end] = F.cross_entropy(logits.float(), targets[begin:end], reduction='none')
        return out

    def batch_nll(self, batch: ScoreBatch) -> np.ndarray:
        """Summed NLL (fp64) of each row's targets."""
        device = self.device
        with torch.inference_mode(), self.autocast():
            input_ids = batch.input_ids.to(device, non_blocking=True)
            attention_mask = batch.attention_mask.to(device, non_blocking=True)
            rows, positions = batch.rows.to(device), batch.positions.to(device)
            targets = batch.targets.to(device)
            if self.fast_path:
                base, head = self._output_layer()
                hidden = base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)[0]
                nll = self._nll(hidden, rows, positions, targets, head)
            else:
                logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
                nll = self._nll(logits, rows, positions, targets, None)
        return np.add.reduceat(nll.double().cpu().numpy(), batch.row_starts)

    # -- windows and batches ----------------------------------------------------------------------------

    def windows(self, length: int) -> list[tuple[int, int, int, int]]:
        """``(start, end, first_target, end_target)`` of each window of a ``length``-token sample.

        Targets are token indices ``1 .. length-1``, each in exactly one window.
        """
        if length < 2:
            return []
        spans, start, done = [], 0, 1
        while done < length:
            end = min(start + self.max_len, length)
            spans.append((start, end, done, end))
            done = end
            start += self.stride
        return spans

    def plan(self, token_lists: Sequence[Sequence[int]]) -> tuple[list[ScoreBatch], np.ndarray]:
        """Batches of windows (similar lengths together) and each window's sample index."""
        spans, owners = [], []
        for sample, tokens in enumerate(token_lists):
            for span in self.windows(len(tokens)):
                spans.append(span)
                owners.append(sample)
        order = sorted(range(len(spans)), key=lambda w: (-(spans[w][1] - spans[w][0]), w))
        batches = []
        for begin in range(0, len(order), self.batch_size):
            chosen = order[begin:begin + self.batch_size]
            width = max(spans[w][1] - spans[w][0] for w in chosen)
            input_ids = torch.zeros((len(chosen), width), dtype=torch.long)
            attention_mask = torch.zeros((len(chosen), width), dtype=torch.long)
            rows, positions, targets, row_starts, count = [], [], [], [], 0
            for row, window in enumerate(chosen):
                start, end, first, stop = spans[window]
                tokens = np.asarray(token_lists[owners[window]][start:end], dtype=np.int64)
                input_ids[row, :end - start] = torch.from_numpy(tokens)
                attention_mask[row, :end - start] = 1
                row_starts.append(count)
                rows.append(np.full(stop - first, row, dtype=np.int64))
                positions.append(np.arange(first - start - 1, stop - start - 1, dtype=np.int64))
                targets.append(tokens[first - start:stop - start])
                count += stop - first
            batches.append(ScoreBatch(input_ids, attention_mask, torch.from_numpy(np.concatenate(rows)),
                                      torch.from_numpy(np.concatenate(positions)),
                                      torch.from_numpy(np.concatenate(targets)), np.asarray(row_starts),
                                      np.asarray(chosen)))
        return batches, np.asarray(owners, dtype=np.int64)

    def score(self, token_lists: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        """``(nll_sum, num_tokens)`` per sequence: summed NLL (fp64) of tokens ``1..n-1`` and their count ``n-1``.

        Sequences shorter than 2 tokens have no target: ``nll_sum`` 0 and ``num_tokens`` 0.
        """
        for tokens in token_lists:
            if len(tokens) and (int(np.max(tokens)) >= self.vocab_size or int(np.min(tokens)) < 0):
                raise TokenizerMismatchError(f'token id {int(np.max(tokens))} is outside the model vocabulary '
                                             f'(size {self.vocab_size}). Fix: score with the model whose tokenizer '
                                             f'produced these tokens.')
        batches, owners = self.plan(token_lists)
        window_sums = np.zeros(len(owners), dtype=np.float64)
        for batch in batches:
            window_sums[batch.windows] = self.batch_nll(batch)
        nll_sum = np.zeros(len(token_lists), dtype=np.float64)
        if len(owners):
            firsts = np.flatnonzero(np.r_[True, owners[1:] != owners[:-1]])
            nll_sum[owners[firsts]] = np.add.reduceat(window_sums, firsts)  # windows of a sample, in order
        num_tokens = np.array([max(len(t) - 1, 0) for t in token_lists], dtype=np.int64)
        return nll_sum, num_tokens


# --- scoring an MDS directory ------------------------------------------------------------------------------


def _sample_tokens(samples: list[dict], tokenizer: Any, retokenize: bool, shard: int, start: int) -> list[np.ndarray]:
    has_tokens = bool(samples) and 'tokens' in samples[0] and not retokenize
    if not has_tokens:
        if samples and 'text' not in samples[0]:
            raise ValueError(f'the data has neither a `tokens` nor a `text` column (columns: {sorted(samples[0])}). '
                             f'Fix: write the MDS data with a `tokens` (ids) or `text` (str) column.')
        encoded = tokenizer([str(s['text']) for s in samples], add_special_tokens=False)['input_ids']
        return [np.asarray(ids, dtype=np.int64) for ids in encoded]
    tokens = [np.asarray(s['tokens'], dtype=np.int64) for s in samples]
    checked = [i for i, s in enumerate(samples[:_TOKENIZER_CHECK_SAMPLES]) if 'text' in s]
    if checked:
        encoded = tokenizer([str(samples[i]['text']) for i in checked], add_special_tokens=False)['input_ids']
        for i, ids in zip(checked, encoded):
            if not np.array_equal(np.asarray(ids, dtype=np.int64), tokens[i]):
                raise TokenizerMismatchError(
                    f'tokenizer mismatch: sample {start + i} (shard {shard}) has `tokens` {tokens[i][:8].tolist()}..., '
                    f'but the model tokenizer encodes its `text` as {list(ids[:8])}... The data was tokenized with '
                    f'another tokenizer. Fix: score with the model (or --tokenizer) the data was tokenized with, '
                    f'or pass --retokenize to score the `text` column with the model tokenizer.')
    return tokens


def _check_tokenization(mds: MDSDataset, tokenizer: Any, retokenize: bool) -> None:
    """The data's first samples must be the model tokenizer's encoding of their text (see ``_sample_tokens``).

    Data with token ids and no ``text`` column cannot be checked (only that ids fit the vocabulary): warn.
    """
    if not retokenize and 'text' not in mds.columns:
        warnings.warn(TokenizerUnverifiedWarning(
            f'{mds.path} has token ids but no `text` column, so the scorer cannot check that they come from the '
            f'model\'s tokenizer (only that they fit its vocabulary of {len(tokenizer)}); scores of ids from another '
            f'tokenizer are meaningless. Make sure the data was tokenized with the tokenizer of --model '
            f'(or --tokenizer), or add a `text` column so it is checked.'), stacklevel=3)
    first = [mds[i] for i in range(min(_TOKENIZER_CHECK_SAMPLES, len(mds)))]
    _sample_tokens(first, tokenizer, retokenize, mds.shard_of(0), 0)


def _trained_ids(record: dict) -> np.ndarray:
    """The sample ids that a checkpoint's training-data record (of this very data) says it trained on."""
    inline = record.get('ids')
    if inline is not None:  # small selections and splits record their ids in the checkpoint itself
        ids = np.asarray(inline, dtype=np.int64)
        if ids_sha256(ids) == record.get('ids_sha256'):
            return ids
    kind = record.get('kind')
    if kind == 'reference_split':
        return ReferenceSplit.from_provenance(record).ids(record['part'])
    if kind == 'selection' and Path(record.get('path', '')).is_dir():
        _, ids = read_selection(record['path'])
        if ids_sha256(ids) == record.get('ids_sha256'):
            return ids
    raise ValueError(f'the reference model was trained on {record.get("num_selected")} samples of this data '
                     f'({record.get("kind")} {record.get("path", "")!r}) that cannot be identified any more. Fix: '
                     f'pass --reference-split with the split it trained on, or --score-reference-samples to score '
                     f'every sample anyway.')


def _reference_exclusion(reference: ReferenceModel, mds: MDSDataset, reference_split: Any,
                         score_reference_samples: bool) -> tuple[np.ndarray, dict]:
    """The ids of ``mds`` that trained the reference model, and what meta.json records about where they came from.

    Raises ``ValueError`` where training samples could be scored unnoticed: the checkpoint trained on other
    data (its samples cannot be located in this data), or its record cannot be resolved, or ``reference_split``
    is not the split the checkpoint records. ``score_reference_samples`` overrides all of these.
    """
    ids, record = None, {'source': None}
    trained_on = reference.trained_on
    if reference_split is not None:
        split = reference_split if isinstance(reference_split, ReferenceSplit) else ReferenceSplit.load(reference_split)
        split.check_data(mds)
        if not score_reference_samples and trained_on is not None and trained_on.get('kind') == 'reference_split' \
                and trained_on.get('data_index_fingerprint') == mds.index_fingerprint \
                and trained_on.get('reference_sha256') != split.reference_sha256:
            raise ValueError(f'reference_split={str(reference_split)!r} is not the split the reference model trained '
                             f'on: its checkpoint records a split of this data with other ids (SHA-256 '
                             f'{str(trained_on.get("reference_sha256"))[:12]}, the given one has '
                             f'{split.reference_sha256[:12]}). Fix: pass the split file it trained on, or drop '
                             f'--reference-split to use the checkpoint\'s record.')
        ids = split.reference_ids
        record = {'source': 'reference_split', 'path': str(reference_split) if not isinstance(
            reference_split, ReferenceSplit) else None, 'fraction': split.fraction, 'seed': split.seed}
    elif trained_on is not None:
        same_data = trained_on.get('data_index_fingerprint') == mds.index_fingerprint
        record = {'source': 'checkpoint', 'same_data': same_data,
                  'trained_on': {k: v for k, v in trained_on.items() if k != 'ids'}}
        if not same_data and not score_reference_samples:
            fingerprint = trained_on.get('data_index_fingerprint')
            raise ValueError(
                f'the reference model trained on {trained_on.get("num_selected")} samples of '
                f'{trained_on.get("data_path")!r} (fingerprint {str(fingerprint)[:12]}), not of data={str(mds.path)!r} '
                f'(fingerprint {mds.index_fingerprint[:12]}): its training samples cannot be located in this data, '
                f'so any that are in it would be scored as if unseen. Fix: pass --reference-split with the split of '
                f'this data it trained on, or --score-reference-samples to score every sample (right when this '
                f'data shares no samples with its training data).')
        if same_data:
            try:
                ids = _trained_ids(trained_on)
            except ValueError:
                if not score_reference_samples:
                    raise
    elif not score_reference_samples:
        source = reference.source.get('path')
        source = f'{reference.source.get("kind")} {source!r}' if source else 'the model object'
        warnings.warn(UnrecordedReferenceWarning(
            f'nothing records which samples trained the reference model ({source} has no training-data record): '
            f'if any are in {mds.path}, they are scored as if unseen. Pass --reference-split (reference_split=) with '
            f'the split it trained on, or --score-reference-samples to state that every sample should be scored.'),
            stacklevel=4)
    # int64, as ids_sha256 hashes them: the digest equals the one meta.json recorded before it existed (resume)
    ids = np.zeros(0, np.int64) if ids is None else np.asarray(ids, np.int64)
    record.update({'num_reference_samples': int(len(ids)), 'score_reference_samples': bool(score_reference_samples),
                   'reference_ids_sha256': ids_sha256(ids)})
    return ids, record


def _set_up(model, data, tokenizer, batch_size, max_len, stride, device, precision, reference_split,
            score_reference_samples, retokenize, max_tokens, model_config=None):
    """Load what :func:`score_mds` needs: the data, the model, the scorer, the excluded ids and ``meta.json``."""
    mds = data if isinstance(data, MDSDataset) else MDSDataset(data)
    if model_config is not None and not isinstance(model, (str, Path)):
        raise ValueError(f'model_config is given, but model is a {type(model).__name__}, not a checkpoint path: '
                         f'the section only says how to build the model a checkpoint holds. Fix: pass the llm-foundry '
                         f'checkpoint path as model, or drop model_config.')
    if isinstance(model, ReferenceModel):
        reference = model
        if tokenizer is not None:
            reference = ReferenceModel(model.model, _load_tokenizer(tokenizer) if isinstance(tokenizer, (str, Path))
                                       else tokenizer, model.source, model.trained_on)
    elif isinstance(model, (str, Path)):
        reference = load_reference_model(model, tokenizer, model_config=model_config)
    else:
        if tokenizer is None:
            raise ValueError('tokenizer is required when model is a model object. Fix: pass tokenizer=...')
        reference = ReferenceModel(_causal_lm(model), _load_tokenizer(tokenizer) if isinstance(tokenizer, (str, Path))
                                   else tokenizer, {'kind': 'object'}, None)
    if retokenize and 'text' not in mds.columns:
        raise ValueError(f'retokenize needs a `text` column; {mds.path} has {sorted(mds.columns)}. Fix: drop '
                         f'--retokenize.')
    scorer = PerplexityScorer(reference.model, batch_size=batch_size, max_len=max_len, stride=stride, device=device,
                              precision=precision)
    excluded, reference_record = _reference_exclusion(reference, mds, reference_split, score_reference_samples)
    excluded_mask = np.zeros(len(mds), dtype=bool)
    if not score_reference_samples:
        excluded_mask[excluded] = True
    model_fp, tokenizer_fp = model_fingerprint(scorer.model), tokenizer_fingerprint(reference.tokenizer)
    meta = {
        'model': {**reference.source, 'fingerprint': model_fp, 'class': type(scorer.model).__name__,
                  'parameters': int(sum(p.numel() for p in scorer.model.parameters())),
                  'vocab_size': scorer.vocab_size},
        'tokenizer': {'fingerprint': tokenizer_fp, 'size': len(reference.tokenizer)},
        'data': {'path': str(mds.path), 'index_fingerprint': mds.index_fingerprint, 'num_samples': len(mds),
                 'num_shards': mds.num_shards, 'columns': mds.columns},
        'scoring': {'max_len': scorer.max_len, 'stride': scorer.stride, 'batch_size': scorer.batch_size,
                    'precision': scorer.precision, 'device_type': scorer.device.type, 'fast_path': scorer.fast_path,
                    'retokenize': bool(retokenize), 'max_tokens': max_tokens,
                    'nll': 'mean over tokens 1..n-1 (nats); padding excluded'
                           + (f'; only the first {max_tokens} tokens of each sample' if max_tokens else '')},
        'reference': reference_record,
    }
    meta['identity'] = {'model': model_fp, 'tokenizer': tokenizer_fp, 'data': mds.index_fingerprint,
                        'num_samples': len(mds), 'max_len': scorer.max_len, 'stride': scorer.stride,
                        'batch_size': scorer.batch_size, 'precision': scorer.precision,
                        'device_type': scorer.device.type, 'retokenize': bool(retokenize), 'max_tokens': max_tokens,
                        'excluded': reference_record['reference_ids_sha256'],
                        'score_reference_samples': bool(score_reference_samples)}
    if reference.source.get('kind') == LLMFOUNDRY_KIND:
        # Same weights under another section (logit_scale, softcapping, attention settings) score differently. Only
        # this kind gets the keys: an index written before they existed keeps its identity, and so resumes.
        meta['identity']['model_kind'] = LLMFOUNDRY_KIND
        meta['identity']['model_config'] = reference.source['model_config_sha256']
    return mds, reference, scorer, excluded_mask, meta


def score_mds(
    model: Any,
    data: Union[str, Path, MDSDataset],
    out: Union[str, Path],
    tokenizer: Any = None,
    batch_size: int = 32,
    max_len: Optional[int] = None,
    stride: Optional[int] = None,
    device: Union[str, torch.device, None] = None,
    precision: Optional[str] = None,
    reference_split: Any = None,
    score_reference_samples: bool = False,
    retokenize: bool = False,
    max_tokens: Optional[int] = None,
    overwrite: bool = False,
    progress: bool = True,
    on_shard_done: Optional[Callable[[int], None]] = None,
    model_config: Any = None,
) -> ScoreIndex:
    """Score every sample of an MDS directory with a reference model and write a score index to ``out``.

    Under Composer's launcher (``composer -n N -m composer_ext.cli score ...``) the shards are split over
    the ranks; rank 0 merges them. Shards already finished by an earlier (killed) run are kept. An error on
    any rank is raised on every rank (there as :class:`ScoringFailedError`), so none is left waiting.

    Each sample is scored whole (long ones in windows). Training with ``selected_text`` sees only the first
    ``seq_len`` tokens of a sample: set ``max_tokens`` to that ``seq_len`` to score exactly those.

    Args:
        model: A checkpoint/HF directory path (see :func:`load_reference_model`), a
            :class:`ReferenceModel`, or a model object (then ``tokenizer`` is required).
        model_config: With an llm-foundry checkpoint path as ``model``: its model section, a mapping or a YAML
            file (see :func:`read_model_config`). Its digest is part of the index identity (``model_config``).
        data: The MDS directory (``tokens`` column, or ``text`` to tokenize with the model tokenizer).
        out: The score index directory.
        tokenizer: Overrides the model's tokenizer (object or directory).
        batch_size, max_len, stride, device, precision: See :class:`PerplexityScorer`.
        reference_split: The split (object or file) whose reference part trained the model. Default: the
            training-data record of the checkpoint, when it has one.
        score_reference_samples: Score the samples that trained the reference model too (they are left
            out, with status 1, by default). Also the explicit consent needed to score data other than the
            one the checkpoint records training on (which raises ``ValueError`` otherwise), and to score
            without any record (which warns otherwise).
        retokenize: Tokenize the ``text`` column with the model tokenizer instead of using ``tokens``.
        max_tokens: Score only each sample's first ``max_tokens`` tokens (default: all of them). The index's
            ``num_tokens`` then counts the scored targets, at most ``max_tokens - 1``.
        overwrite: Discard an existing index in ``out`` instead of resuming it.
        progress: Show a tqdm bar on rank 0.
        on_shard_done: Called with each shard id after its scores are written (tests use it to kill a run).

    Returns:
        ScoreIndex: the complete index.

    Warns:
        UnrecordedReferenceWarning: nothing says which samples trained the model (a HuggingFace directory,
            or a checkpoint of a plain ``text`` run) and neither ``reference_split`` nor
            ``score_reference_samples`` is given.
        TokenizerUnverifiedWarning: the data has token ids but no ``text`` to check them against.
    """
    if max_tokens is not None:
        max_tokens = _check_int('max_tokens', max_tokens, 2, fix='pass the seq_len training will use, e.g. 128, or '
                                'None to score whole samples.')
    rank, world = dist.get_global_rank(), dist.get_world_size()
    setup, error = None, None
    try:  # one rank failing to load (a missing file, a bad argument) must not leave the others waiting
        setup = _set_up(model, data, tokenizer, batch_size, max_len, stride, device, precision, reference_split,
                        score_reference_samples, retokenize, max_tokens, model_config)
    except Exception as err:  # noqa: BLE001 - shared with the other ranks, then re-raised
        error = err
    _raise_on_every_rank(error, world, 'loading the model and the data')
    mds, reference, scorer, excluded_mask, meta = setup
    writer = ScoreIndexWriter(out, meta, mds.num_shards)
    outcome: list[Any] = [None]
    if rank == 0:
        try:
            outcome = [('ok', writer.prepare(overwrite=overwrite, shard_sha256=mds.shard_sha256))]
        except (ScoreIndexError, ValueError, OSError) as err:
            outcome = [('error', str(err))]
    if world > 1:
        dist.broadcast_object_list(outcome, src=0)
    status_word, payload = outcome[0]
    if status_word == 'error':
        raise ScoreIndexError(payload)
    _check_tokenization(mds, reference.tokenizer, retokenize)  # every rank, before any work: fail together
    mine = payload[rank::world]
    # Rank 0 cannot see the other ranks' progress without extra collectives: the bar says it counts its own.
    label = f'score {mds.path.name}' + (f' (rank 0: {len(mine)} of {len(payload)} shards)' if world > 1 else '')
    bar = tqdm(total=sum(mds.shard_range(s)[1] - mds.shard_range(s)[0] for s in mine), unit='sample', desc=label,
               disable=not progress or rank != 0, file=sys.stderr, dynamic_ncols=True)
    error = None
    try:
        for shard in mine:
            start, end = mds.shard_range(shard)
            samples, digest = mds.read_shard(shard)
            tokens = _sample_tokens(samples, reference.tokenizer, retokenize, shard, start)
            if max_tokens is not None:
                tokens = [t[:max_tokens] for t in tokens]
            status = np.full(len(samples), STATUS_SCORED, dtype=np.int8)
            status[np.array([len(t) < 2 for t in tokens], dtype=bool)] = STATUS_TOO_SHORT
            status[excluded_mask[start:end]] = STATUS_REFERENCE
            todo = np.flatnonzero(status == STATUS_SCORED)
            nll_sum = np.zeros(len(samples), dtype=np.float64)
            num_tokens = np.zeros(len(samples), dtype=np.int64)
            nll_sum[todo], num_tokens[todo] = scorer.score([tokens[i] for i in todo])
            writer.write_shard(shard, start, digest, nll_sum, num_tokens, status,
                               [str(s.get('domain', '')) for s in samples],
                               [str(s['uid']) for s in samples] if samples and 'uid' in samples[0] else None)
            bar.update(len(samples))
            if on_shard_done is not None:
                on_shard_done(shard)
    except Exception as err:  # noqa: BLE001 - shared with the other ranks below, then re-raised
        error = err
    finally:
        bar.close()
    _raise_on_every_rank(error, world, 'scoring its shards')
    error = None
    if rank == 0:
        try:
            writer.finalize()
        except Exception as err:  # noqa: BLE001 - as above: the other ranks must not wait for a dead rank 0
            error = err
    _raise_on_every_rank(error, world, 'merging the shards', only_rank=0)
    return ScoreIndex(out)


def _raise_on_every_rank(error: Optional[BaseException], world: int, stage: str, only_rank: Optional[int] = None):
    """Share each rank's outcome (a collective every rank reaches, so it also acts as a barrier) and raise on
    every rank if any failed: the failing rank raises its own error, the others :class:`ScoringFailedError`."""
    if world > 1:
        message = None if error is None else f'{type(error).__name__}: {error}'
        if only_rank is None:
            failures = [(r, m) for r, m in enumerate(dist.all_gather_object(message)) if m is not None]
        else:
            shared = [message]
            dist.broadcast_object_list(shared, src=only_rank)
            failures = [(only_rank, shared[0])] if shared[0] is not None else []
    else:
        failures = []
    if error is not None:
        raise error
    if failures:
        rank, message = failures[0]
        raise ScoringFailedError(f'scoring failed on rank {rank} while {stage} ({message}); every rank stops. Fix: '
                                 f'correct that error, then rerun the same command: shards already scored are kept.')


# --- CLI ---------------------------------------------------------------------------------------------------


def configure_parser(parser) -> None:
    """Arguments of ``composer-ext score``."""
    parser.add_argument('--model', required=True, help='Composer checkpoint (.pt) of a HuggingFaceModel or (with '
                        '--model-config) of an llm-foundry model, its save_folder, or a HuggingFace directory')
    parser.add_argument('--model-config', default=None, metavar='YAML',
                        help='for an llm-foundry checkpoint: a YAML file with its model section (name: mpt_causal_lm, '
                        '...), or the llm-foundry YAML that trained it (its model: key is used)')
    parser.add_argument('--data', required=True, help='MDS directory to score (tokens or text column)')
    parser.add_argument('--out', required=True, help='score index directory to write (resumed if it exists)')
    parser.add_argument('--tokenizer', default=None, help='tokenizer directory (default: the one saved with the model)')
    parser.add_argument('--batch-size', type=int, default=32, help='windows per forward pass (default 32)')
    parser.add_argument('--max-len', type=int, default=None, help='window length (default: the model context)')
    parser.add_argument('--stride', type=int, default=None, help='window stride for long samples (default max-len/2)')
    parser.add_argument('--precision', default=None, choices=PRECISIONS,
                        help='default amp_bf16 on GPU, fp32 on CPU')
    parser.add_argument('--reference-split', default=None, help='the split file whose reference part trained the '
                        'model (default: what the checkpoint recorded)')
    parser.add_argument('--score-reference-samples', action='store_true',
                        help='also score the samples that trained the reference model (left out by default); also '
                        'needed to score data other than the checkpoint\'s training data, and silences the warning '
                        'for a model with no training-data record')
    parser.add_argument('--retokenize', action='store_true', help='tokenize the text column with the model tokenizer')
    parser.add_argument('--max-tokens', type=int, default=None, metavar='N',
                        help='score only the first N tokens of each sample: what a selected_text run with seq_len N '
                        'trains on (it keeps the first seq_len tokens). Default: the whole sample, in windows')
    parser.add_argument('--overwrite', action='store_true', help='discard an existing index in --out')
    parser.add_argument('--no-progress', action='store_true', help='no progress bar')
    parser.add_argument('--dist-timeout', type=float, default=600.0, help='seconds ranks wait for each other')


def cli_main(args) -> int:
    dist.initialize_dist('gpu' if torch.cuda.is_available() else 'cpu', timeout=args.dist_timeout)
    rank = dist.get_global_rank()
    notes = (TokenizerUnverifiedWarning, UnrecordedReferenceWarning)
    caught: list = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always', TokenizerUnverifiedWarning)
            warnings.simplefilter('always', UnrecordedReferenceWarning)
            index = score_mds(args.model, args.data, args.out, tokenizer=args.tokenizer, batch_size=args.batch_size,
                              max_len=args.max_len, stride=args.stride, precision=args.precision,
                              reference_split=args.reference_split,
                              score_reference_samples=args.score_reference_samples, retokenize=args.retokenize,
                              max_tokens=args.max_tokens, overwrite=args.overwrite, progress=not args.no_progress,
                              model_config=args.model_config)
    except (ScoreIndexError, ScoringFailedError, ValueError, TypeError) as err:
        print(f'composer-ext score: error: {err}', file=sys.stderr)
        return 2
    finally:
        # Outside the recording block: there ``showwarning`` appends to ``caught``, so re-showing a model's own
        # warning (llm-foundry's MPT warns on padded batches) would grow the list it iterates, without end.
        for warning in caught:  # as the command's own notes, once (rank 0), not as Python warnings per rank
            if rank == 0 and issubclass(warning.category, notes):
                print(f'composer-ext score: warning: {warning.message}', file=sys.stderr)
            elif not issubclass(warning.category, notes):
                warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
    if rank == 0:
        summary = index.summary()
        median = summary['median_perplexity']
        print(f'scored {summary["scored"]} of {summary["samples"]} samples ({summary["scored_tokens"]} tokens); '
              f'median perplexity {"n/a" if median is None else f"{median:.2f}"}; left out '
              f'{summary["excluded_reference"]} that trained the reference model, {summary["too_short"]} too short')
        print(f'score index: {args.out}')
    return 0
