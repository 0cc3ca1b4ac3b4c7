"""One rank of the distributed tests (``test_distributed.py``), started with torchrun's environment
variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) by ``launch``.

    python dist_worker.py MODE SRC OUT [METHODS...]

MODE ``run``: quantize ``tiny_llama`` with each method in memory (every rank saves its model to
``OUT/mem-<method>-r<rank>``) and streamed from folder ``SRC`` (``OUT/stream-<method>``, rank 0
writes); ``kill``: like ``run`` (streamed only), but rank 1 SIGKILLs itself after staging block 0;
``mismatch``: rank 1 asks for another group size; ``othermodel``: rank 1 changes a weight;
``few``: one calibration forward for all ranks.
"""

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for ``support``

METHODS = ("rtn", "gptq", "awq", "smoothquant", "gptq-mixed")
MIXED = {  # per-layer formats: q (3-bit) and k (g32) differ from v inside one input group
    "model.layers.0.self_attn.q_proj": {"bits": 3},
    "model.layers.0.self_attn.k_proj": {"group_size": 32},
    "model.layers.1.mlp.down_proj": {"bits": 2, "group_size": 0},
}


def config(method: str, group_size: int = 16):
    from lowbit import SmoothQuant, WeightOnly

    if method == "smoothquant":
        return SmoothQuant()
    if method == "gptq-mixed":
        return WeightOnly(bits=4, group_size=group_size, method="gptq", layers=MIXED)
    return WeightOnly(bits=4, group_size=group_size, method=method)


def calib(n: int = 6):
    """``n`` batches of distinct lengths: ``n`` calibration forwards (nothing is stacked)."""
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 64, (2, 12 + k), generator=g) for k in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, *args: str, timeout: float = 300) -> list[subprocess.CompletedProcess]:
    """Run ``world`` ranks of this script with ``args`` (as torchrun would: one thread each)."""
    port, procs = free_port(), []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)}
        env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, __file__, *map(str, args)]
        procs.append(
            subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=timeout)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


def main(mode: str, src: str, out: str, *methods: str) -> None:
    import lowbit
    from lowbit.export.streaming import quantize_folder
    from lowbit.transforms.comm import TorchComm, torchrun_comm
    from support import tiny_llama

    torch.set_num_threads(1)

    class Dies(TorchComm):
        """Rank 1 dies (SIGKILL) at its third barrier: once block 0 is staged."""

        calls = 0

        def barrier(self) -> None:
            Dies.calls += 1
            if Dies.calls == 3 and self.rank == 1:  # 1: staging opened; 2-3: block 0 committed
                os.kill(os.getpid(), signal.SIGKILL)
            super().barrier()

    comm = torchrun_comm()
    if mode == "kill":
        comm = Dies()
    out = Path(out)
    for method in methods or METHODS:
        group = 8 if mode == "mismatch" and comm.rank == 1 else 16
        batches = calib(1 if mode == "few" else 6)
        if mode != "kill":
            model = tiny_llama()
            if mode == "othermodel" and comm.rank == 1:
                model.model.layers[1].mlp.up_proj.weight.data[3, 5] += 1
            lowbit.quantize_(model, config(method, group), batches, comm=comm)
            lowbit.save(model, out / f"mem-{method}-r{comm.rank}")
        quantize_folder(
            src, config(method, group), out / f"stream-{method}", batches, progress=False, comm=comm
        )
    print("volume", comm.volume())


if __name__ == "__main__":
    from lowbit.core.errors import LowbitError

    try:
        main(*sys.argv[1:])
    except LowbitError as e:
        print(f"lowbit: error: {e}", file=sys.stderr)
        sys.exit(2)
