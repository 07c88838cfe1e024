"""The byte-level BPE of the corpus: trained deterministically on the embedded text, saved and read as a directory.

Byte-level BPE never maps text to an unknown token, so every document of every domain (TeX, Python,
chat) round-trips. The trained tokenizer is saved as a ``transformers`` tokenizer directory, so
``AutoTokenizer.from_pretrained(path)``, :func:`read_tokenizer` and
:func:`composer_ext.data.tokenizer.load_tokenizer` all load it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

__all__ = ['EOS_TOKEN', 'PAD_TOKEN', 'read_tokenizer', 'train_tokenizer']

EOS_TOKEN = '<|endoftext|>'
PAD_TOKEN = '<|pad|>'


def train_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 4096):
    """Train a byte-level BPE on ``texts`` (in the order given) and save it to ``out_dir``.

    Args:
        texts: The training texts. The result depends only on their content and order.
        out_dir: Directory to write ``tokenizer.json`` and the ``transformers`` tokenizer files to.
        vocab_size: Size of the vocabulary, special tokens and the 256 byte symbols included.

    Returns:
        transformers.PreTrainedTokenizerFast: the trained tokenizer.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if not isinstance(vocab_size, int) or vocab_size < 512:
        raise ValueError(f'vocab_size={vocab_size!r} is too small for a byte-level BPE. Fix: use an int >= 512.')
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return _save(tokenizer, Path(out_dir))


def _wrap(tokenizer_object):
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer_object,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=1 << 30,  # samples are windowed by the caller, never truncated by the tokenizer
    )


def _save(tokenizer, out_dir: Path):
    out_dir.mkdir(parents=True, exist_ok=True)
    wrapped = _wrap(tokenizer)
    wrapped.save_pretrained(str(out_dir))
    return wrapped


def read_tokenizer(path: str | Path):
    """Load the tokenizer directory ``path`` (written by :func:`train_tokenizer`)."""
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    if not (path / 'tokenizer.json').exists():
        raise FileNotFoundError(f'No tokenizer.json in {path}. Fix: pass the tokenizer directory of a built corpus '
                                f'(composer_ext.data.ensure_corpus().tokenizer_dir).')
    return PreTrainedTokenizerFast.from_pretrained(str(path))
