"""Real weights: ``load()`` a bundled name, a Hugging Face folder or a ``.gguf`` file -> (model, tokenizer).

transformers is imported on first use only.
"""

from lowbit.models.cache import cache_root
from lowbit.models.checks import check_hf_folder, check_safetensors
from lowbit.models.encoders import ENCODERS, embed, load_encoder, pooling
from lowbit.models.loader import cached_folder, load
from lowbit.models.registry import BUNDLED
from lowbit.models.vision import VISION_MODELS, load_vision, mobilenet_v2, trained_cnn

__all__ = [
    "BUNDLED",
    "ENCODERS",
    "VISION_MODELS",
    "cache_root",
    "cached_folder",
    "check_hf_folder",
    "check_safetensors",
    "embed",
    "load",
    "load_encoder",
    "load_vision",
    "mobilenet_v2",
    "pooling",
    "trained_cnn",
]
