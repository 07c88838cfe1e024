"""LoRA regularization probe (Biderman et al. 2024, *LoRA Learns Less and Forgets Less*): learning vs
forgetting on held-out evaluations, and the spectrum of the weight change ΔW, for LoRA and full finetuning.

* :mod:`.lora` -- peft LoRA configs with the paper's recommendations; a small GPT finetuned with LoRA.
* :mod:`.spectrum` -- the ΔW spectrum (functional :func:`delta_w_spectrum` and the :class:`DeltaWSpectrum` result).
* :mod:`.discovery` -- which modules the probe measures (:func:`find_probed_modules`, :class:`ProbedModule`).
* :mod:`.gathering` -- full weights from FSDP1/FSDP2 shards, one unit at a time.
* :mod:`.tracker` -- :class:`DeltaWTracker`: ΔW since the start and its spectra, on its own or in the probe.
* :mod:`.evaluation` -- the probe's evaluations (followed metrics, an eval loop without side effects).
* :mod:`.foundry_evals` -- evaluators from llm-foundry eval sections (``{label, name, dataset, ...}``).
* :mod:`.history` -- the probe's records, the metric keys it logs, the ``lora_probe.json`` format.
* :mod:`.callback` -- :class:`LoRAProbe`, the Composer Callback, and its YAML builder.
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
    'ProbedModule': 'discovery',
    'find_probed_modules': 'discovery',
    'DeltaWTracker': 'tracker',
    'LoRAProbe': 'callback',
    'build_lora_probe': 'callback',
    'lora_report': 'report',
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
