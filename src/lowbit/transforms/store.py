"""Block stores: where the block pipeline (``sequential.run_pipeline``: ``run_blocks``, then
``quantize_rest``) gets each decoder block and the tensors outside the blocks from, and where it puts
the result.

The pipeline drives every quantization step; a store says only what differs between runs. In memory
(``InMemoryStore``, ``quantize_``) the tensors are already there and stay there. A staged store
(``lowbit.export.staging.StagedStore``, ``quantize_folder``) reads each block from a safetensors
folder (``lowbit.transforms.source``), commits its result to disk, sends it back to the meta device
and resumes after the last commit; it hands the big tables over a row chunk at a time.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Protocol

import torch
from torch import nn

from lowbit.core.errors import LowbitError
from lowbit.transforms.block import BlockResult
from lowbit.transforms.swap import Rows


class BlockStore(Protocol):
    """What ``run_blocks`` asks of a store, in call order.

    ``done``: blocks finished before the loop starts (0 in memory; read once, a store may count on as
    it commits); ``result(i)`` gives what each of them did.
    ``capturing(model)``: context for the calibration forward through the embeddings.
    ``hidden(i)``: the inputs of block ``i == done > 0`` as committed (resume).
    ``load(i, prefix, block)``: make block ``i``'s tensors real before it is quantized.
    ``commit(i, prefix, block, result, hidden)``: block ``i`` is quantized; ``hidden``, the inputs of
    block ``i + 1`` (None after the last block or without calibration data).
    ``release(i, block)``: block ``i`` is no longer needed by the loop.
    Then ``quantize_rest``, for the layers outside the blocks:
    ``table(key, shape)``: a reader ``(start, stop) -> rows`` of tensor ``key`` (``shape``, checked) of
    a table still on the meta device, which is rounded a row chunk at a time.
    ``load_rest(model, path, rounded)``: read in the tensors outside the blocks at ``path`` still on
    meta that the model needs now; ``rounded``: the float layers about to be rounded whole.
    ``rest_everywhere``: in a distributed run, every rank (True) or rank 0 alone (False, it writes
    the result) rounds the layers outside the blocks.
    """

    done: int
    rest_everywhere: bool

    def result(self, i: int) -> BlockResult: ...

    def capturing(self, model: nn.Module) -> AbstractContextManager: ...

    def hidden(self, i: int) -> list[torch.Tensor]: ...

    def load(self, i: int, prefix: str, block: nn.Module) -> None: ...

    def commit(
        self, i: int, prefix: str, block: nn.Module, result: BlockResult, hidden: list | None
    ) -> None: ...

    def release(self, i: int, block: nn.Module) -> None: ...

    def table(self, key: str, shape: tuple[int, int]) -> Rows: ...

    def load_rest(self, model: nn.Module, path: str, rounded: list[nn.Module]) -> None: ...


class InMemoryStore:
    """The model's own tensors, quantized in place: nothing to load, commit or release; every rank of
    a distributed run ends with the whole quantized model."""

    done = 0
    rest_everywhere = True

    def result(self, i: int) -> BlockResult:
        raise IndexError(f"block {i}: an in-memory run has no finished blocks before it starts")

    def capturing(self, model: nn.Module) -> AbstractContextManager:
        return nullcontext()

    def hidden(self, i: int) -> list[torch.Tensor]:
        raise IndexError(f"block {i}: an in-memory run keeps no block inputs")

    def load(self, i: int, prefix: str, block: nn.Module) -> None:
        pass

    def commit(self, i: int, prefix: str, block: nn.Module, result: BlockResult, hidden: list | None) -> None:
        pass

    def release(self, i: int, block: nn.Module) -> None:
        pass

    def table(self, key: str, shape: tuple[int, int]) -> Rows:
        raise LowbitError(f"{key} is on the meta device: an in-memory model has no weights to read it from")

    def load_rest(self, model: nn.Module, path: str, rounded: list[nn.Module]) -> None:
        pass
