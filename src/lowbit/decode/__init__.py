"""Fast greedy decoding over a static KV cache with a compiled step (``Decoder``, ``generate``)."""

from lowbit.decode.decoder import Decoder, generate
from lowbit.decode.layers import FAMILIES, Unsupported

__all__ = ["FAMILIES", "Decoder", "Unsupported", "generate"]
