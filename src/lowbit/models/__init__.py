"""Real weights: ``load()`` a bundled name, a Hugging Face folder or a ``.gguf`` file -> (model, tokenizer).

transformers is imported on first use only.
"""

from lowbit.models.cache import cache_root
from lowbit.models.checks import check_hf_folder, check_safetensors
from lowbit.models.loader import load
from lowbit.models.registry import BUNDLED

__all__ = ["BUNDLED", "cache_root", "check_hf_folder", "check_safetensors", "load"]
