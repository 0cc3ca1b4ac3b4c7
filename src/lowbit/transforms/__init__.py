"""Model transforms: configs, handler registry, ``quantize_``, module swap."""

from lowbit.transforms import dynamic as _dynamic  # noqa: F401  (registers the handler)
from lowbit.transforms import sequential as _sequential  # noqa: F401  (registers the handler)
from lowbit.transforms import static as _static  # noqa: F401  (registers the handler)
from lowbit.transforms import weight_only as _weight_only  # noqa: F401  (registers the handler)
from lowbit.transforms.calibrate import observing, run_batches
from lowbit.transforms.configs import (
    CONFIGS,
    Int8Dynamic,
    QuantConfig,
    SmoothQuant,
    StaticW8A8,
    WeightOnly,
    config_from_dict,
    register_config,
)
from lowbit.transforms.dequantize import dequantize_
from lowbit.transforms.fold import conv_bn_pairs, fold_batchnorm_
from lowbit.transforms.mappings import ARCHITECTURES, Architecture, ScaleMap
from lowbit.transforms.quantize import HANDLERS, QuantSummary, Selector, quantize_, register_handler
from lowbit.transforms.schemes import parse_scheme
from lowbit.transforms.sequential import PipelineSummary, quantize_sequential

__all__ = [
    "conv_bn_pairs",
    "dequantize_",
    "fold_batchnorm_",
    "observing",
    "run_batches",
    "StaticW8A8",
    "ARCHITECTURES",
    "Architecture",
    "PipelineSummary",
    "ScaleMap",
    "SmoothQuant",
    "quantize_sequential",
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
