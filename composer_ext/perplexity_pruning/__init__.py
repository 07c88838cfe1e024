"""Perplexity pruning (Ankner et al. 2024, *Perplexed by Perplexity*): train a small reference LM on a random
split, score the rest of the corpus by its perplexity, keep a percentile band.

* :mod:`.reference_split` -- the random split the reference model trains on (:func:`split_for_reference`).
* :mod:`.scoring` -- ``composer-ext score``: per-sample perplexity into a resumable :class:`ScoreIndex`.
* :mod:`.score_index` -- the on-disk score index (atomic, resumable).
* :mod:`.selection` -- ``composer-ext select``: :func:`select_band` and the :class:`SelectedDataset` to train on.
"""

from composer_ext._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    'PARTS': 'reference_split',
    'ReferenceSplit': 'reference_split',
    'split_for_reference': 'reference_split',
    'build_reference_text_dataloader': 'reference_split',
    'ScoreIndex': 'score_index',
    'ScoreIndexError': 'score_index',
    'ScoreIndexWriter': 'score_index',
    'PerplexityScorer': 'scoring',
    'ReferenceModel': 'scoring',
    'ScoringFailedError': 'scoring',
    'TokenizerMismatchError': 'scoring',
    'load_reference_model': 'scoring',
    'score_mds': 'scoring',
    'BANDS': 'selection',
    'SelectedDataset': 'selection',
    'band_bounds': 'selection',
    'read_selection': 'selection',
    'select_band': 'selection',
    'select_from_scores': 'selection',
    'build_selected_text_dataloader': 'selection',
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
