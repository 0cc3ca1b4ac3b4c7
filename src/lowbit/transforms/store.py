"""Block stores: where the block pipeline (``sequential.run_blocks``) gets each decoder block from and
where it puts the result.

``run_blocks`` is the one block loop; a store says only what differs between runs. In memory
(``InMemoryStore``, ``quantize_``) the blocks are already there and stay there. A staged store
(``lowbit.export.staging.StagedStore``, ``quantize_folder``) reads each block from a safetensors
folder, commits its result to disk, sends it back to the meta device and resumes after the last commit.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Protocol

import torch
from torch import nn

from lowbit.transforms.block import BlockResult


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
    """

    done: int

    def result(self, i: int) -> BlockResult: ...

    def capturing(self, model: nn.Module) -> AbstractContextManager: ...

    def hidden(self, i: int) -> list[torch.Tensor]: ...

    def load(self, i: int, prefix: str, block: nn.Module) -> None: ...

    def commit(
        self, i: int, prefix: str, block: nn.Module, result: BlockResult, hidden: list | None
    ) -> None: ...

    def release(self, i: int, block: nn.Module) -> None: ...


class InMemoryStore:
    """The model's own blocks, quantized in place: nothing to load, commit or release."""

    done = 0

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
