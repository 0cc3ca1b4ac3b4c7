"""Communication between the processes of one quantization run, for the block pipeline
(``lowbit.transforms.sequential``).

``Comm`` is one process: every collective is the identity. ``TorchComm`` runs the same calls over a
``torch.distributed`` process group (gloo on CPU, NCCL on GPUs; started by ``torchrun``):

- data parallel: each rank runs the blocks on its contiguous share of the calibration forwards
  (``share``); the statistics are combined in rank order, so results do not depend on timing:
  sums at their one consumer (``sum_to``, used for GPTQ Hessians), maxima everywhere (``max_all``,
  exact), sampled rows concatenated in rank order (``cat_all``, exact);
- layer parallel: the input groups of a block are dealt to ranks by cost (``owners``), each rank
  rounds its own, the results are broadcast (``broadcast``).

``TorchComm`` counts the bytes each rank sends and receives per kind of collective (``volume``), and
turns a failed collective (a rank that died, a lost connection) into a ``LowbitError`` that names the
operation and, where the backend can tell, the rank that stopped answering.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta

import torch

from lowbit.core.errors import LowbitError

SLICE_BYTES = 1 << 26  # sum_to moves a tensor in pieces of at most this many bytes per rank


class Comm:
    """The single-process ``Comm``: rank 0 of 1, collectives return their input."""

    rank = 0
    world = 1

    def share(self, n: int) -> range:
        """Indices of the ``n`` calibration forwards this rank runs: a contiguous run, ranks in order,
        the first ``n % world`` ranks one more. ``LowbitError`` if some rank would get none."""
        if n < self.world:
            raise LowbitError(
                f"{self.world} ranks but only {n} calibration forward(s) (batches stacked up to the "
                f"token budget): use at most {n} rank(s) or more calibration batches"
            )
        base, extra = divmod(n, self.world)
        start = self.rank * base + min(self.rank, extra)
        return range(start, start + base + (self.rank < extra))

    def owners(self, costs: Sequence[float]) -> list[int]:
        """A rank per item: largest cost first to the least loaded rank (lowest rank on ties)."""
        load, out = [0.0] * self.world, [0] * len(costs)
        for k in sorted(range(len(costs)), key=lambda k: (-costs[k], k)):
            r = min(range(self.world), key=lambda r: (load[r], r))
            out[k], load[r] = r, load[r] + costs[k]
        return out

    def sum_to(self, t: torch.Tensor, dst: int) -> torch.Tensor | None:
        """On rank ``dst``: the sum over ranks of ``t``, added in rank order; elsewhere None."""
        return t

    def sum_ints(self, values: Sequence[int]) -> list[int]:
        """Element-wise sums over ranks of small integer lists (same length on every rank)."""
        return list(values)

    def counts(self, value: int) -> list[int]:
        """``value`` of every rank, in rank order."""
        return [value]

    def max_all(self, t: torch.Tensor) -> torch.Tensor:
        """The element-wise maximum over ranks, on every rank."""
        return t

    def cat_all(self, t: torch.Tensor) -> torch.Tensor:
        """Rows ``(n_r, ...)`` of every rank concatenated in rank order, on every rank."""
        return t

    def broadcast(self, tensors: list[torch.Tensor | None], src: int) -> list[torch.Tensor | None]:
        """Rank ``src``'s ``tensors`` on every rank (other ranks pass anything of the same length)."""
        return tensors

    def first(self, obj):
        """Rank 0's ``obj`` (picklable), on every rank."""
        return obj

    def agree(self, facts: dict) -> None:
        """``LowbitError`` on every rank unless every rank passes the same ``facts`` (JSON-able)."""

    def barrier(self) -> None:
        pass

    def volume(self) -> dict[str, int]:
        """Bytes sent plus received by this rank so far, per kind of collective."""
        return {}


SOLO = Comm()


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, ended but not yet reaped, counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def digest_batches(batches: Sequence) -> str:
    """sha256 over the calibration batches' tensors (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()

    def add(key: str, v) -> None:
        if isinstance(v, torch.Tensor):
            t = v.detach().cpu().contiguous()
            h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(v, dict):
            for k in sorted(v):
                add(f"{key}.{k}", v[k])
        elif isinstance(v, (list, tuple)):
            for i, x in enumerate(v):
                add(f"{key}.{i}", x)
        else:
            h.update(f"{key}={v!r}".encode())

    add("calib", list(batches))
    return h.hexdigest()


def model_facts(model: torch.nn.Module) -> dict:
    """What identifies ``model``'s weights across processes: per state-dict entry its shape, dtype and
    a sha256 of up to 4096 evenly strided elements (quick even for large models)."""
    out = {}
    for k, v in model.state_dict().items():
        facts = [list(v.shape), str(v.dtype).removeprefix("torch.")]
        if not v.is_meta and v.numel():
            flat = v.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 4096)].cpu().contiguous()
            facts.append(hashlib.sha256(sample.view(torch.uint8).numpy().tobytes()).hexdigest()[:16])
        out[k] = facts
    return out


def first_difference(a, b, path: str = "") -> tuple[str, str, str]:
    """Where JSON-like ``a`` and ``b`` first differ: (path "key.sub[2]", a's value, b's value)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            if a.get(k, "<missing>") != b.get(k, "<missing>"):
                return first_difference(a.get(k, "<missing>"), b.get(k, "<missing>"), f"{path}.{k}")
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            if x != y:
                return first_difference(x, y, f"{path}[{i}]")
    show = lambda v: s if len(s := json.dumps(v, default=str)) < 80 else s[:77] + "..."  # noqa: E731
    return path.lstrip(".") or "value", show(a), show(b)


class TorchComm(Comm):
    """``Comm`` over a ``torch.distributed`` process group (default: the world); the group must be
    initialised (``torch.distributed.init_process_group``). Tensors travel on the group's device:
    CPU for gloo, this rank's CUDA device for NCCL."""

    def __init__(self, group=None) -> None:
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise LowbitError(
                "distributed quantization needs an initialised torch.distributed process group: "
                "launch with torchrun (CLI: torchrun --nproc-per-node N $(which lowbit) quantize ... "
                "--distributed)"
            )
        self.dist, self.group = dist, group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        backend = dist.get_backend(group)
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else None
        self._bytes: Counter = Counter()
        self.procs: list = [None] * self.world  # (host, pid) of each rank
        with self._guard("meeting the other ranks"):
            dist.all_gather_object(self.procs, (socket.gethostname(), os.getpid()), group=group)

    def _dev(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.device is None else t.to(self.device)

    def _global(self, r: int) -> int:
        return r if self.group is None else self.dist.get_global_rank(self.group, r)

    @contextmanager
    def _guard(self, op: str) -> Iterator[None]:
        try:
            yield
        except LowbitError:
            raise
        except (RuntimeError, ValueError) as e:  # DistBackendError is a RuntimeError
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise LowbitError(
                f"rank {self.rank} of {self.world}: {op} failed, a rank stopped or lost its connection "
                f"({self._missing() or first}); staged work resumes: run the same command again"
            ) from e

    def _missing(self) -> str:
        """The ranks on this host whose process has ended, as text ("rank 1 (pid 123) stopped"), or ''
        if none (the rank that stopped may be on another host)."""
        host, gone = socket.gethostname(), []
        for r, proc in enumerate(self.procs):
            if isinstance(proc, tuple) and proc[0] == host and r != self.rank and not _alive(proc[1]):
                gone.append(f"rank {r} (pid {proc[1]})")
        return f"{', '.join(gone)} stopped" if gone else ""

    def sum_to(self, t: torch.Tensor, dst: int) -> torch.Tensor | None:
        flat = t.reshape(-1)
        step = max(1, SLICE_BYTES // max(1, t.element_size()))
        out = torch.empty_like(flat) if self.rank == dst else None
        with self._guard(f"summing a {tuple(t.shape)} statistic on rank {dst}"):
            for a in range(0, flat.numel(), step):
                piece = self._dev(flat[a : a + step].contiguous())
                parts = [torch.empty_like(piece) for _ in range(self.world)] if self.rank == dst else None
                self.dist.gather(piece, parts, dst=self._global(dst), group=self.group)
                self._bytes["sum_to"] += (
                    piece.numel() * piece.element_size() * (self.world - 1 if self.rank == dst else 1)
                )
                if parts is not None:
                    acc = parts[0]
                    for p in parts[1:]:
                        acc = acc + p
                    out[a : a + step] = acc.to(out.device)
        return None if out is None else out.view(t.shape)

    def sum_ints(self, values: Sequence[int]) -> list[int]:
        t = self._dev(torch.tensor(list(values), dtype=torch.int64))
        with self._guard("summing counts"):
            self.dist.all_reduce(t, group=self.group)
        return [int(v) for v in t.cpu()]

    def counts(self, value: int) -> list[int]:
        t = self._dev(torch.tensor([value], dtype=torch.int64))
        parts = [torch.empty_like(t) for _ in range(self.world)]
        with self._guard("gathering counts"):
            self.dist.all_gather(parts, t, group=self.group)
        return [int(p.item()) for p in parts]

    def max_all(self, t: torch.Tensor) -> torch.Tensor:
        x = self._dev(t.contiguous().clone())
        with self._guard(f"taking the maximum of a {tuple(t.shape)} statistic"):
            self.dist.all_reduce(x, op=self.dist.ReduceOp.MAX, group=self.group)
        self._bytes["max_all"] += 2 * x.numel() * x.element_size()
        return x.to(t.device)

    def cat_all(self, t: torch.Tensor) -> torch.Tensor:
        rows = self.counts(t.shape[0])
        width = t.shape[1:]
        pad = max(rows)
        x = torch.zeros(pad, *width, dtype=t.dtype, device=t.device)
        x[: t.shape[0]] = t
        x = self._dev(x)
        parts = [torch.empty_like(x) for _ in range(self.world)]
        with self._guard(f"gathering sampled rows {tuple(width)}"):
            self.dist.all_gather(parts, x, group=self.group)
        self._bytes["cat_all"] += x.numel() * x.element_size() * self.world
        return torch.cat([p[:n].to(t.device) for p, n in zip(parts, rows, strict=True)])

    def broadcast(self, tensors: list[torch.Tensor | None], src: int) -> list[torch.Tensor | None]:
        head = [None if t is None else (tuple(t.shape), str(t.dtype).removeprefix("torch.")) for t in tensors]
        box = [head if self.rank == src else None]
        with self._guard(f"receiving quantized weights from rank {src}"):
            self.dist.broadcast_object_list(box, src=self._global(src), group=self.group)
            out = []
            for t, h in zip(tensors, box[0], strict=True):
                if h is None:
                    out.append(None)
                    continue
                x = t.contiguous() if self.rank == src else torch.empty(h[0], dtype=getattr(torch, h[1]))
                y = self._dev(x)
                self.dist.broadcast(y, src=self._global(src), group=self.group)
                self._bytes["broadcast"] += (
                    y.numel() * y.element_size() * (self.world - 1 if self.rank == src else 1)
                )
                out.append(y.to(x.device) if self.rank != src else t)
        return out

    def first(self, obj):
        box = [obj]
        with self._guard("receiving rank 0's order"):
            self.dist.broadcast_object_list(box, src=self._global(0), group=self.group)
        return box[0]

    def agree(self, facts: dict) -> None:
        text = json.dumps(facts, sort_keys=True, default=str)
        digest = hashlib.sha256(text.encode()).hexdigest()
        mine = {"digest": digest, "facts": facts}
        every: list = [None] * self.world
        with self._guard("comparing the ranks' inputs"):
            self.dist.all_gather_object(every, mine, group=self.group)
        for r, theirs in enumerate(every):
            if theirs["digest"] != every[0]["digest"]:
                where = first_difference(json.loads(json.dumps(every[0]["facts"], default=str)),
                                          json.loads(json.dumps(theirs["facts"], default=str)))  # fmt: skip
                key, first, other = where
                raise LowbitError(
                    f"rank {r} was started with other inputs than rank 0: {key} is {other} on rank {r} but "
                    f"{first} on rank 0; every rank must run the same command on the same model and data"
                )

    def barrier(self) -> None:
        with self._guard("waiting for every rank"):
            self.dist.barrier(group=self.group)

    def volume(self) -> dict[str, int]:
        return dict(self._bytes)


TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def torchrun_comm(timeout_s: float = 1800) -> TorchComm:
    """Join the process group ``torchrun`` describes in the environment (gloo on CPU; NCCL, one GPU per
    local rank, where CUDA is available) and return its ``TorchComm``; ``LowbitError`` naming what is
    missing outside torchrun. ``timeout_s``: how long a collective waits for a slow rank."""
    import torch.distributed as dist

    missing = [k for k in TORCHRUN_ENV if not os.environ.get(k)]
    if missing:
        raise LowbitError(
            f"--distributed needs the environment torchrun sets ({', '.join(missing)} missing): launch "
            "as torchrun --nproc-per-node N $(which lowbit) quantize ... --distributed"
        )
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        try:
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
        except (RuntimeError, ValueError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise LowbitError(f"cannot join the torchrun process group: {first}") from e
    return TorchComm()
