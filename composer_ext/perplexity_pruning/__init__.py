"""Perplexity pruning (Ankner et al. 2024, *Perplexed by Perplexity*): train a small reference LM on a random
split, score the rest of the corpus by its perplexity, keep a perplexity band (exactly round(keep * n) samples).

* :mod:`.reference_split` -- the random split the reference model trains on (:func:`split_for_reference`).
* :mod:`.fingerprints` -- the model and tokenizer fingerprints a score index records.
* :mod:`.score_index` -- the on-disk score index (atomic, resumable).
* :mod:`.scoring` -- ``composer-ext score``: per-sample perplexity into a resumable :class:`ScoreIndex` (reference
  models: Composer or llm-foundry checkpoints, Hugging Face directories).
* :mod:`.bands` -- the band rule (:func:`select_band`, :func:`band_bounds`), on plain arrays.
* :mod:`.selection` -- ``composer-ext select``: a band applied to a score index, written as a selection directory.
* :mod:`.selected_dataset` -- :class:`SelectedDataset` and the ``selected_text`` / ``reference_text`` dataloaders.

See README.md beside this file.
"""

from composer_ext._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    'PARTS': 'reference_split',
    'ReferenceSplit': 'reference_split',
    'split_for_reference': 'reference_split',
    'model_fingerprint': 'fingerprints',
    'tokenizer_fingerprint': 'fingerprints',
    'ScoreIndex': 'score_index',
    'ScoreIndexError': 'score_index',
    'ScoreIndexWriter': 'score_index',
    'PerplexityScorer': 'scoring',
    'ReferenceModel': 'scoring',
    'ScoringFailedError': 'scoring',
    'TokenizerMismatchError': 'scoring',
    'load_reference_model': 'scoring',
    'read_model_config': 'scoring',
    'score_mds': 'scoring',
    'BANDS': 'bands',
    'band_bounds': 'bands',
    'select_band': 'bands',
    'read_selection': 'selection',
    'select_from_scores': 'selection',
    'SelectedDataset': 'selected_dataset',
    'build_reference_text_dataloader': 'selected_dataset',
    'build_selected_text_dataloader': 'selected_dataset',
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
