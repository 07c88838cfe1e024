"""The corpus tokenizer: :func:`load_tokenizer` loads a tokenizer directory, by default the embedded corpus's.

The byte-level BPE itself (training, saving, loading a directory) lives in :mod:`composer_ext.data.bpe`, which
the corpus build uses; this module sits above the corpus, so that the default (build the corpus if needed, then
load its tokenizer) needs no import back from the corpus.
"""

from __future__ import annotations

from pathlib import Path

from composer_ext.data.bpe import EOS_TOKEN, PAD_TOKEN, read_tokenizer, train_tokenizer
from composer_ext.data.corpus import ensure_corpus

# EOS_TOKEN, PAD_TOKEN and train_tokenizer are re-exported: they were importable from here before bpe.py existed.
__all__ = ['EOS_TOKEN', 'PAD_TOKEN', 'train_tokenizer', 'load_tokenizer']


def load_tokenizer(path: str | Path | None = None):
    """Load a tokenizer directory; with ``path=None`` the embedded corpus's (building the corpus first if needed).

    Example:
        .. code-block:: python

            from composer_ext.data import load_tokenizer
            tokenizer = load_tokenizer()          # the embedded corpus tokenizer
    """
    return read_tokenizer(ensure_corpus().tokenizer_dir if path is None else path)
