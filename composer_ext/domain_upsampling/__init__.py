"""Domain upsampling (Blakeney et al. 2024, *Does your data spark joy?*): change the data mixture for the
last part of training towards chosen domains.

* :mod:`.mixture` -- the schedule (:class:`MixtureSchedule`) and the dataset that follows it (:class:`MixtureDataset`).
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
    'MixtureSchedule': 'mixture',
    'MixtureDataset': 'mixture',
    'MixtureDataLoader': 'mixture',
    'RAMPS': 'mixture',
    'SAMPLING': 'mixture',
    'build_mixture_dataloader': 'mixture',
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
