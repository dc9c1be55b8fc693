"""Precision plugins: ``"32-true"`` (the base class), ``"64-true"``, ``"16-mixed"``, ``"bf16-mixed"``,
``"16-true"``, ``"bf16-true"``. Names resolve through :data:`PRECISION_REGISTRY`."""

from ember.precision.amp import MixedPrecision
from ember.precision.base import PRECISION_REGISTRY, Precision, resolve_precision
from ember.precision.double import DoublePrecision
from ember.precision.half import HalfPrecision

for _plugin in (Precision, DoublePrecision, MixedPrecision, HalfPrecision):
    _plugin.register_precisions(PRECISION_REGISTRY)

__all__ = [
    "PRECISION_REGISTRY",
    "DoublePrecision",
    "HalfPrecision",
    "MixedPrecision",
    "Precision",
    "resolve_precision",
]
