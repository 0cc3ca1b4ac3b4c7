"""``train``: the training loop for the common case (a prepared model, batches, an optional teacher), with a
cosine schedule, checkpoints every N steps and resume; ``shuffled``: deterministic, resumable batches.

One step: forward the student (train mode) and, if given, the teacher (eval mode, no grad); the
``Objective`` (``lowbit.qat.loss``) gives the loss; AdamW steps every trainable parameter (weight decay
on weights only, never on scales or zero points); the learning rate follows a linear warm-up then a
cosine decay to 0. BatchNorm statistics of ``QATConvBn2d`` layers freeze after ``freeze_bn_after`` steps
(from the options, else the model's ``QATConfig``); learned bit widths (``QATConfig.bit_budget``) become
integers at ``QATConfig.freeze_bits_after`` (default: half the steps; the allocation is in the history).

Checkpoint (``folder/qat-checkpoint.pt``, written atomically every ``every`` steps and at the end): model,
optimizer and schedule state, the step, the loss history and a fingerprint of the config, options and
model structure. ``train`` with the same folder resumes from it; a checkpoint of another config, other
options or another model is refused naming the first difference. A NaN or Inf loss, or a quantizer
scale that stops being finite and positive, stops training with an error naming the step and the layer;
the last good checkpoint stays as it was.
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lowbit.core.errors import CheckpointError, LowbitError, NonFiniteError
from lowbit.core.fsio import atomic_write_bytes
from lowbit.qat.bits import fix_bit_widths, learned_bits
from lowbit.qat.fake import FakeQuantizer
from lowbit.qat.loss import HiddenMatch, Objective
from lowbit.qat.modules import QATConvBn2d, qat_modules
from lowbit.transforms.comm import first_difference

CHECKPOINT = "qat-checkpoint.pt"
BITS_LR_SCALE = 10.0  # learned bit widths step at this multiple of the learning rate
FORMAT = "lowbit-qat-checkpoint"


class shuffled:  # noqa: N801  (reads as a function at the call site)
    """Endless batches ``(x[idx], y[idx], ...)`` of ``batch_size`` rows: each epoch a permutation drawn
    from ``seed`` and the epoch number, a last partial batch dropped. ``iter_from(step)`` starts at any
    step without drawing the ones before (resume)."""

    def __init__(self, *tensors: Tensor, batch_size: int, seed: int = 0) -> None:
        if not tensors or any(len(t) != len(tensors[0]) for t in tensors):
            raise LowbitError("shuffled: give one or more tensors with the same number of rows")
        if not 1 <= batch_size <= len(tensors[0]):
            raise LowbitError(f"shuffled: batch_size must be 1..{len(tensors[0])}, got {batch_size}")
        self.tensors, self.batch_size, self.seed = tensors, batch_size, seed
        self.per_epoch = len(tensors[0]) // batch_size

    def iter_from(self, step: int) -> Iterator:
        while True:
            epoch, i = divmod(step, self.per_epoch)
            perm = torch.randperm(
                len(self.tensors[0]), generator=torch.Generator().manual_seed(self.seed + epoch)
            )
            idx = perm[i * self.batch_size : (i + 1) * self.batch_size]
            batch = tuple(t[idx] for t in self.tensors)
            yield batch[0] if len(batch) == 1 else batch
            step += 1

    def __iter__(self) -> Iterator:
        return self.iter_from(0)


@dataclass
class TrainOptions:
    """steps: optimizer steps. lr: peak learning rate. weight_decay: AdamW's, on weights only.
    warmup: fraction of steps with a linear warm-up. every: checkpoint interval in steps.
    freeze_bn_after: step at which BatchNorm statistics freeze (None: the QATConfig's). log_every:
    steps between entries of the loss history."""

    steps: int = 1000
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: float = 0.02
    every: int = 200
    freeze_bn_after: int | None = None
    log_every: int = 50

    def __post_init__(self) -> None:
        if self.steps < 1 or self.every < 1 or self.log_every < 1:
            raise LowbitError("steps, every and log_every must be positive")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise LowbitError(f"lr must be a positive number, got {self.lr}")
        if not 0.0 <= self.warmup < 1.0:
            raise LowbitError(f"warmup must be a fraction in [0, 1), got {self.warmup}")


@dataclass
class TrainResult:
    steps: int
    resumed_from: int
    seconds: float
    history: list[dict] = field(default_factory=list)  # {"step", "loss", "lr", term: value ...}


def _split(batch) -> tuple[Tensor, Tensor | None]:
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and all(isinstance(t, Tensor) for t in batch):
        return batch[0], batch[1]
    raise LowbitError(f"training batches must be a tensor or (inputs, labels), got {type(batch).__name__}")


def _optimizer(model: nn.Module, opts: TrainOptions) -> torch.optim.Optimizer:
    fqs = [m for m in model.modules() if isinstance(m, FakeQuantizer)]
    bits = {id(m.bit_width) for m in fqs if m.mode == "bits"}
    qparams = {id(p) for m in fqs for p in m.parameters()} - bits
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise LowbitError("the model has no trainable parameter")
    groups = [
        {"params": [p for p in params if id(p) not in qparams | bits], "weight_decay": opts.weight_decay},
        {"params": [p for p in params if id(p) in qparams], "weight_decay": 0.0},
        {"params": [p for p in params if id(p) in bits], "weight_decay": 0.0, "lr": opts.lr * BITS_LR_SCALE},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=opts.lr)


def _schedule(opt: torch.optim.Optimizer, opts: TrainOptions) -> torch.optim.lr_scheduler.LambdaLR:
    warm = int(opts.warmup * opts.steps)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(1, opts.steps - warm)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _fingerprint(model: nn.Module, opts: TrainOptions, objective: Objective) -> dict:
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    return {
        "qat_config": getattr(model, "lowbit_qat", None),
        "options": {k: v for k, v in asdict(opts).items() if k not in ("every", "log_every")},
        "objective": asdict(objective),
        "model": shapes,
    }


def _save(path: Path, model, opt, sched, step: int, history: list, fingerprint: dict) -> None:
    state = {"format": FORMAT, "version": 1, "fingerprint": fingerprint, "step": step, "history": history}
    state |= {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict()}
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def _resume(path: Path, model, opt, sched, fingerprint: dict) -> tuple[int, list]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a damaged file
        raise CheckpointError(f"{path}: not a readable QAT checkpoint ({str(e)[:120]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a lowbit QAT checkpoint")
    if state["fingerprint"] != fingerprint:
        key, now, then = first_difference(fingerprint, state["fingerprint"])
        raise CheckpointError(
            f"{path}: written by another run ({key} is {then} in the checkpoint but {now} now); "
            "use another checkpoint folder or delete it"
        )
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    return int(state["step"]), list(state["history"])


def _broken_quantizer(model: nn.Module) -> NonFiniteError | None:
    """``check_finite``'s error for the first quantizer whose qparams are NaN, Inf or not positive."""
    for m in model.modules():
        if isinstance(m, FakeQuantizer):
            try:
                m.check_finite()
            except NonFiniteError as e:
                return e
    return None


def _blame(model: nn.Module, step: int, what: str, checkpoint: Path | None) -> LowbitError:
    """The error for a non-finite step: names the first quantizer whose qparams blew up, if any."""
    kept = f"; the last good checkpoint {checkpoint} is kept" if checkpoint and checkpoint.exists() else ""
    broken = _broken_quantizer(model) or "every quantizer scale is finite (try a lower lr)"
    return NonFiniteError(f"step {step}: {what}; {broken}{kept}")


def _step(model, batch, teacher, objective, hidden) -> dict[str, Tensor]:
    x, labels = _split(batch)
    t_logits = None
    if teacher is not None:
        with torch.no_grad():
            t_logits = teacher(x)
    logits = model(x)
    terms = objective(model, logits, labels, t_logits, hidden)
    if hidden is not None:
        hidden.clear()
    return terms


def train(
    model: nn.Module,
    data: Iterable,
    options: TrainOptions | None = None,
    *,
    teacher: nn.Module | None = None,
    objective: Objective | None = None,
    hidden: dict[str, str] | None = None,
    checkpoint: str | Path | None = None,
    progress: bool = False,
) -> TrainResult:
    """Train a prepared ``model`` on ``data`` (batches: a tensor, or ``(inputs, labels)``; re-iterated
    until ``options.steps``; ``shuffled`` resumes exactly). ``teacher``: the float model, for
    distillation. ``objective``: default cross-entropy with labels, distillation without (or
    ``Objective(task_weight=1, distill_weight=1)`` for both). ``hidden``: student fqn -> teacher fqn
    activations matched by MSE (``Objective.hidden_weight``). ``checkpoint``: folder to checkpoint to and
    resume from. Leaves the model in eval mode."""
    opts = options or TrainOptions()
    if not qat_modules(model):
        raise LowbitError("train: the model has no QAT layer (call lowbit.qat.prepare first)")
    objective = objective or Objective(task_weight=1.0 if teacher is None else 0.0,
                                       distill_weight=0.0 if teacher is None else 1.0)  # fmt: skip
    opt, path = _optimizer(model, opts), Path(checkpoint) / CHECKPOINT if checkpoint else None
    sched, fingerprint = _schedule(opt, opts), _fingerprint(model, opts, objective)
    start, history = (0, [])
    if path is not None and path.exists():
        start, history = _resume(path, model, opt, sched, fingerprint)
    matcher = HiddenMatch(model, teacher, hidden) if hidden and teacher is not None else None
    batches = data.iter_from(start) if hasattr(data, "iter_from") else _skip(data, start)
    qat_config, t0 = getattr(model, "lowbit_qat", None) or {}, time.perf_counter()
    freeze = opts.freeze_bn_after if opts.freeze_bn_after is not None else qat_config.get("freeze_bn_after")
    budget, freeze_bits = qat_config.get("bit_budget"), qat_config.get("freeze_bits_after")
    freeze_bits = opts.steps // 2 if freeze_bits is None else freeze_bits
    if teacher is not None:
        teacher.eval()
    model.train()
    try:
        bar = tqdm(range(start, opts.steps), desc="qat", unit="step", disable=not progress, initial=start)
        for step in bar:
            if step == freeze:  # the frozen flags are state: a resume past this step has them
                _freeze_bn(model)
            if step == freeze_bits and learned_bits(model):
                history.append({"step": step, "bit_widths": fix_bit_widths(model, budget)})
            terms = _step(model, next(batches), teacher, objective, matcher)
            loss = terms["loss"]
            if not bool(torch.isfinite(loss)):
                raise _blame(model, step, f"loss is {float(loss.detach())}", path)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if _broken_quantizer(model) is not None:
                raise _blame(model, step, "a quantizer's qparams left the finite positive range", path)
            if step % opts.log_every == 0 or step == opts.steps - 1:
                entry = {k: round(float(v.detach()), 5) for k, v in terms.items()}
                history.append({"step": step, "lr": sched.get_last_lr()[0], **entry})
                bar.set_postfix(loss=entry["loss"])
            if path is not None and ((step + 1) % opts.every == 0 or step + 1 == opts.steps):
                _save(path, model, opt, sched, step + 1, history, fingerprint)
    finally:
        model.eval()
        if matcher is not None:
            matcher.__exit__()
    return TrainResult(opts.steps, start, round(time.perf_counter() - t0, 2), history)


def _freeze_bn(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, QATConvBn2d):
            m.freeze_bn()


def _skip(data: Iterable, start: int) -> Iterator:
    """``data`` re-iterated forever, the first ``start`` batches dropped."""
    n = 0
    while True:
        empty = True
        for batch in data:
            empty = False
            if n >= start:
                yield batch
            n += 1
        if empty:
            raise LowbitError("train: the data yields no batch")
