"""Data: the embedded demo corpus and image sets, MDS reading and LM batching.

The mixture, scoring and selection names are re-exported from their techniques' packages
(:mod:`composer_ext.domain_upsampling`, :mod:`composer_ext.perplexity_pruning`), where they are defined.
"""

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
    'read_tokenizer': 'bpe',
    'train_tokenizer': 'bpe',
    'LMCollator': 'text',
    'build_text_dataloader': 'text',
    'build_text_evaluators': 'text',
    'ArrayImageDataset': 'images',
    'build_image_dataloader': 'images',
    'digits': 'images',
    'fashion_mnist': 'images',
    'per_rank_batch_size': 'sharding',
    'MixtureSchedule': 'composer_ext.domain_upsampling.schedule',
    'MixtureDataset': 'composer_ext.domain_upsampling.mixture',
    'MixtureDataLoader': 'composer_ext.domain_upsampling.mixture',
    'build_mixture_dataloader': 'composer_ext.domain_upsampling.mixture',
    'split_for_reference': 'composer_ext.perplexity_pruning.reference_split',
    'select_band': 'composer_ext.perplexity_pruning.bands',
    'SelectedDataset': 'composer_ext.perplexity_pruning.selected_dataset',
    'ReferenceSplit': 'composer_ext.perplexity_pruning.reference_split',
    'MDSDataset': 'mds',
    'ScoreIndex': 'composer_ext.perplexity_pruning.score_index',
    'PerplexityScorer': 'composer_ext.perplexity_pruning.scoring',
    'score_mds': 'composer_ext.perplexity_pruning.scoring',
    'select_from_scores': 'composer_ext.perplexity_pruning.selection',
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
