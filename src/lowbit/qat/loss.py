"""Loss terms of quantization-aware training, composed as ``L = L_task + lambda * L_quant``.

| term                   | what                                                                        |
|------------------------|-----------------------------------------------------------------------------|
| ``cross_entropy``      | task loss with labels                                                       |
| ``distillation``       | ``T^2 * KL(softmax(teacher / T) || softmax(student / T))`` on logits: no   |
|                        | labels needed (Hinton et al. 2015)                                          |
| ``HiddenMatch``        | mean squared error between student and teacher activations at named        |
|                        | modules (forward hooks), for training without labels on deep models        |
| ``quantization_error`` | mean over layers of ``||W - fq(W)||^2 / ||W||^2``: pulls weights toward     |
|                        | their grid                                                                  |
| ``bit_penalty``        | mean weight bit width above ``QATConfig.bit_budget`` (``lowbit.qat.bits``)   |

``Objective`` adds weighted terms; ``lowbit.qat.train`` builds one from its arguments.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowbit.core.errors import LowbitError
from lowbit.qat.bits import bit_penalty, learned_bits
from lowbit.qat.modules import qat_modules


def _same_shape(student: Tensor, teacher: Tensor, what: str) -> None:
    if student.shape != teacher.shape:
        raise LowbitError(
            f"{what}: teacher output {tuple(teacher.shape)} does not match the student's "
            f"{tuple(student.shape)}"
        )


def cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy of ``logits (N, C)`` against ``labels (N,)`` int64."""
    if labels.dim() != 1 or labels.shape[0] != logits.shape[0]:
        raise LowbitError(f"labels {tuple(labels.shape)} do not match logits {tuple(logits.shape)}")
    return F.cross_entropy(logits.float(), labels)


def distillation(student: Tensor, teacher: Tensor, temperature: float = 1.0) -> Tensor:
    """``T^2 * KL(p_teacher || p_student)`` over the last dimension, averaged over the other elements."""
    _same_shape(student, teacher, "distillation")
    t = float(temperature)
    log_p = F.log_softmax(student.float() / t, dim=-1)
    log_q = F.log_softmax(teacher.float().detach() / t, dim=-1)
    kl = F.kl_div(log_p.flatten(0, -2), log_q.flatten(0, -2), log_target=True, reduction="batchmean")
    return kl * t * t


def quantization_error(model: nn.Module) -> Tensor:
    """Mean over training twins of ``||W - fq(W)||^2 / ||W||^2`` (0 for a model without twins)."""
    terms = []
    for twin in qat_modules(model).values():
        w = twin.deploy_weight()[0]
        terms.append((w - twin.quantized_weight(w)).pow(2).sum() / w.pow(2).sum().clamp_min(1e-12))
    return torch.stack(terms).mean() if terms else torch.zeros(())


class HiddenMatch:
    """Mean squared error between activations of ``student`` and ``teacher`` at ``pairs`` (student fqn ->
    teacher fqn), captured by forward hooks while both run; ``loss()`` after the forwards, then ``clear()``.
    Use as a context manager (hooks removed on exit)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, pairs: Mapping[str, str]) -> None:
        self.pairs = dict(pairs)
        self.seen: dict[tuple[str, str], Tensor] = {}
        self.handles = []
        for side, model, names in (("s", student, self.pairs), ("t", teacher, self.pairs.values())):
            for name in names:
                try:
                    module = model.get_submodule(name)
                except AttributeError:
                    raise LowbitError(f"hidden-state match: no module {name!r} in the {side}") from None
                self.handles.append(module.register_forward_hook(self._keep(side, name)))

    def _keep(self, side: str, name: str):
        def hook(module, args, output):
            self.seen[(side, name)] = output if side == "s" else output.detach()

        return hook

    def loss(self) -> Tensor:
        terms = []
        for s_name, t_name in self.pairs.items():
            s, t = self.seen.get(("s", s_name)), self.seen.get(("t", t_name))
            if s is None or t is None:
                raise LowbitError(f"hidden-state match: {s_name} / {t_name} did not run in this step")
            _same_shape(s, t, f"hidden-state match {s_name} / {t_name}")
            terms.append(F.mse_loss(s.float(), t.float()))
        return torch.stack(terms).mean()

    def clear(self) -> None:
        self.seen.clear()

    def __enter__(self) -> HiddenMatch:
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()


@dataclass
class Objective:
    """``task_weight * L_task + distill_weight * L_distill + quant_weight * L_quant (+ hidden_weight *
    L_hidden) + bits_weight * L_bits``. The task term needs labels, the distillation term a teacher's
    logits."""

    task_weight: float = 1.0
    distill_weight: float = 0.0
    quant_weight: float = 0.0
    hidden_weight: float = 0.0
    temperature: float = 1.0
    bits_weight: float = 1.0  # size term while bit widths are learned (QATConfig.bit_budget)

    def __call__(self, model: nn.Module, logits: Tensor, labels: Tensor | None, teacher: Tensor | None,
                 hidden: HiddenMatch | None = None) -> dict[str, Tensor]:  # fmt: skip
        """The terms (with ``"loss"``, their weighted sum) of one step."""
        terms = {}
        if self.task_weight:
            if labels is None:
                raise LowbitError("the task loss needs labels: batches of (inputs, labels), or a teacher")
            terms["task"] = self.task_weight * cross_entropy(logits, labels)
        if self.distill_weight:
            if teacher is None:
                raise LowbitError("distillation needs a teacher model")
            terms["distill"] = self.distill_weight * distillation(logits, teacher, self.temperature)
        if self.quant_weight:
            terms["quant"] = self.quant_weight * quantization_error(model)
        budget = (getattr(model, "lowbit_qat", None) or {}).get("bit_budget")
        if self.bits_weight and budget is not None and learned_bits(model):
            terms["bits"] = self.bits_weight * bit_penalty(model, budget)
        if self.hidden_weight and hidden is not None:
            terms["hidden"] = self.hidden_weight * hidden.loss()
        if not terms:
            raise LowbitError("the objective has no term: give labels or a teacher")
        terms["loss"] = sum(terms.values())
        return terms
