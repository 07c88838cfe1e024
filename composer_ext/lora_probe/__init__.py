"""LoRA regularization probe (Biderman et al. 2024, *LoRA Learns Less and Forgets Less*): learning vs
forgetting on held-out evaluations, and the spectrum of the weight change ΔW, for LoRA and full finetuning.

* :mod:`.lora` -- peft LoRA configs with the paper's recommendations; a small GPT finetuned with LoRA.
* :mod:`.spectrum` -- the ΔW spectrum (functional :func:`delta_w_spectrum` and the :class:`DeltaWSpectrum` metric).
* :mod:`.callback` -- :class:`LoRAProbe`, the Composer Callback.
* :mod:`.report` -- ``composer-ext report lora``: the Pareto plot of learning vs forgetting.
"""

from composer_ext._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    'LORA_TARGETS': 'lora',
    'LoRARecommendationWarning': 'lora',
    'lora_config': 'lora',
    'lora_target_modules': 'lora',
    'small_gpt_from_checkpoint': 'lora',
    'DeltaWSpectrum': 'spectrum',
    'delta_w_spectrum': 'spectrum',
    'singular_values': 'spectrum',
    'spectrum_from_singular_values': 'spectrum',
    'DeltaWTracker': 'callback',
    'LoRAProbe': 'callback',
    'ProbedModule': 'callback',
    'build_lora_probe': 'callback',
    'find_probed_modules': 'callback',
    'lora_report': 'report',
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
