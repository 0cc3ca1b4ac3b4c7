"""Model transforms: configs, handler registry, ``quantize_``, module swap."""

from lowbit.transforms import dynamic as _dynamic  # noqa: F401  (registers the handler)
from lowbit.transforms import weight_only as _weight_only  # noqa: F401  (registers the handler)
from lowbit.transforms.configs import (
    CONFIGS,
    Int8Dynamic,
    QuantConfig,
    WeightOnly,
    config_from_dict,
    register_config,
)
from lowbit.transforms.dequantize import dequantize_
from lowbit.transforms.quantize import HANDLERS, QuantSummary, Selector, quantize_, register_handler
from lowbit.transforms.schemes import parse_scheme

__all__ = [
    "dequantize_",
    "CONFIGS",
    "HANDLERS",
    "Int8Dynamic",
    "QuantConfig",
    "QuantSummary",
    "Selector",
    "WeightOnly",
    "config_from_dict",
    "parse_scheme",
    "quantize_",
    "register_config",
    "register_handler",
]
