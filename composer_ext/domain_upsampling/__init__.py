"""Domain upsampling (Blakeney et al. 2024, *Does your data spark joy?*): change the data mixture for the
last part of training towards chosen domains.

* :mod:`.schedule` -- :class:`MixtureSchedule`: per-domain weights over training (base mix, target mix, switch).
* :mod:`.plan` -- :class:`SamplePlan`: the schedule placed on global sample positions (which domain serves ``g``).
* :mod:`.mixture` -- :class:`MixtureDataset` (follows the schedule), :class:`MixtureDataLoader`, and
  :func:`build_mixture_dataspec`, the one builder of the ``text_mixture`` dataloader (its ``composer-ext run`` front
  end: :func:`build_mixture_dataloader`).
* :mod:`.foundry_loader` -- :func:`build_text_mixture_dataloader`, llm-foundry's ``text_mixture`` dataloader.
* :mod:`.algorithm` -- :class:`DomainUpsampling`, the Composer Algorithm that drives the schedule.
* :mod:`.ablation` -- ``composer-ext ablate``: drop-one-domain anneals from one checkpoint.
"""

from composer_ext._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    'AblationResult': 'ablation',
    'drop_domain': 'ablation',
    'run_ablation': 'ablation',
    'DomainUpsampling': 'algorithm',
    'build_domain_upsampling': 'algorithm',
    'domain_counts': 'algorithm',
    'find_mixture_dataset': 'algorithm',
    'lr_cooldown_start': 'algorithm',
    'MixtureSchedule': 'schedule',
    'RAMPS': 'schedule',
    'SAMPLING': 'plan',
    'SamplePlan': 'plan',
    'MixtureDataset': 'mixture',
    'ShardTimeoutError': 'shard_order',
    'MixtureDataLoader': 'mixture',
    'build_mixture_dataloader': 'mixture',
    'build_mixture_dataspec': 'mixture',
    'count_lm_tokens': 'mixture',
    'DomainTokens': 'mixture',
    'tokens_written_by': 'mixture',
    'build_text_mixture_dataloader': 'foundry_loader',
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
