"""Mixed precision: per-layer sensitivity, exact bit allocation under a budget, and the plan as data.

    import lowbit
    from lowbit.autotune import Budget, tune
    model, tok = lowbit.models.load("smollm2-135m")
    calib = lowbit.data.calib_batches(tok, 32, 512)
    plan = tune(model, calib, Budget(bits=3.375), base=lowbit.WeightOnly(method="awq+gptq"),
                exclude=["lm_head"])
    lowbit.quantize_(model, plan.config, calib, exclude=["lm_head", "model.embed_tokens"])

``plan.config`` is a ``WeightOnly`` with one ``layers`` entry per planned Linear; it is saved in the
checkpoint's quant_config.json like any config. CLI: ``lowbit autotune`` (``lowbit.autotune.workflow``).
"""

from lowbit.autotune.candidates import DEFAULT_CANDIDATES, Candidate, parse_candidates
from lowbit.autotune.sensitivity import (
    classifier_logits,
    fisher_diagonals,
    lm_logits,
    lm_loss,
    one_layer_kl,
    one_layer_losses,
    own_label_loss,
    spearman,
    weight_errors,
)
from lowbit.autotune.tune import Budget, Plan, Table, choose, sensitivity_table, tune

__all__ = [
    "DEFAULT_CANDIDATES",
    "Budget",
    "Candidate",
    "Plan",
    "Table",
    "choose",
    "classifier_logits",
    "fisher_diagonals",
    "lm_logits",
    "lm_loss",
    "one_layer_kl",
    "one_layer_losses",
    "own_label_loss",
    "parse_candidates",
    "sensitivity_table",
    "spearman",
    "tune",
    "weight_errors",
]
