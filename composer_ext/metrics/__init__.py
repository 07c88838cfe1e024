"""torchmetrics Metric classes and their functional forms."""

from composer_ext._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    'ClassBias': 'bias',
    'cev_sde': 'bias',
    'delta_w_spectrum': 'spectrum',
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
