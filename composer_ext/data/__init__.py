"""Data: the embedded corpus and image sets, LM batching, mixtures, scoring and selection."""

from composer_ext._lazy import lazy_exports

_EXPORTS = {
    'DOMAINS': 'sources',
    'MissingSourceError': 'sources',
    'iter_documents': 'sources',
    'Corpus': 'corpus',
    'CorpusConfig': 'corpus',
    'build_corpus': 'corpus',
    'chunk_document': 'corpus',
    'ensure_corpus': 'corpus',
    'load_tokenizer': 'tokenizer',
    'train_tokenizer': 'tokenizer',
    'LMCollator': 'text',
    'build_text_dataloader': 'text',
    'build_text_evaluators': 'text',
    'ArrayImageDataset': 'images',
    'build_image_dataloader': 'images',
    'digits': 'images',
    'fashion_mnist': 'images',
    'per_rank_batch_size': 'sharding',
    'MixtureSchedule': 'mixture',
    'MixtureDataset': 'mixture',
    'MixtureDataLoader': 'mixture',
    'build_mixture_dataloader': 'mixture',
    'split_for_reference': 'reference_split',
    'select_band': 'selection',
    'SelectedDataset': 'selection',
    'ReferenceSplit': 'reference_split',
    'MDSDataset': 'mds',
    'ScoreIndex': 'score_index',
    'PerplexityScorer': 'scoring',
    'score_mds': 'scoring',
    'select_from_scores': 'selection',
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
