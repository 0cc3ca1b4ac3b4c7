"""lowbit.qat.train on tiny prepared models: the loss goes down, a resumed run is bit-identical to an
uninterrupted one, distillation without labels, and every failure named (NaN steps with the checkpoint
kept, foreign or damaged checkpoints, mismatched teachers, objectives without a term). Random data and
weights: these test the loop's mechanics, not accuracy."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit import CheckpointError, LowbitError, NonFiniteError
from lowbit.qat import Objective, QATConfig, TrainOptions, distillation, prepare, shuffled, train
from lowbit.qat.modules import QATConvBn2d
from lowbit.qat.trainer import CHECKPOINT
from support import Crashing


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(32, 4),
    ).eval()  # fmt: skip


def _task(n=256, features=16, seed=0):
    """Inputs and labels of a random linear teacher (4 classes)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    return x, (x @ torch.randn(features, 4, generator=g)).argmax(1)


def _prepared_mlp(config=None):
    model = _mlp()
    prepare(model, config or QATConfig(weights="int4", activation_bits=8), calib=[_task()[0][:64]])
    return model


def _prepared_cnn():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 3, 8, 8, generator=g)
    model = _cnn()
    prepare(model, QATConfig(weights="int4", activation_bits=4), calib=[x[:32]])
    return model, x, torch.randint(0, 4, (64,), generator=g)


def _params(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_loss_decreases_on_a_learnable_task():
    """50 steps of W4A8 (lr 2e-3) on labels of a random linear map."""
    model = _prepared_mlp()
    x, y = _task()

    def loss():
        with torch.no_grad():
            return float(F.cross_entropy(model(x), y))

    before = loss()
    result = train(model, shuffled(x, y, batch_size=32), TrainOptions(steps=50, lr=2e-3, log_every=10))
    assert [h["step"] for h in result.history] == [0, 10, 20, 30, 40, 49]
    assert result.resumed_from == 0 and not model.training
    assert result.history[0]["task"] == result.history[0]["loss"] and "distill" not in result.history[0]
    # measured: 1.407 before, 1.214 after (all 256 examples)
    assert loss() < 0.92 * before


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    """10 steps in one go vs 6 steps, a crash (checkpoint at step 5), and a restart from a fresh copy
    of the prepared model: same parameters, BatchNorm statistics, freeze flags and history, bit for bit.
    BatchNorm freezes at step 7, after the resume; the cosine schedule warms up over 2 steps."""
    start, x, y = _prepared_cnn()
    data = shuffled(x, y, batch_size=16, seed=3)  # 4 batches per epoch: the run crosses two epochs
    opts = TrainOptions(steps=10, warmup=0.2, every=5, freeze_bn_after=7, log_every=1)
    whole = copy.deepcopy(start)
    reference = train(whole, data, opts, checkpoint=tmp_path / "a")
    crashed = copy.deepcopy(start)
    with pytest.raises(RuntimeError, match="power cut"):
        train(crashed, Crashing(data, at=6), opts, checkpoint=tmp_path / "b")
    assert torch.load(tmp_path / "b" / CHECKPOINT, weights_only=True)["step"] == 5
    restarted = copy.deepcopy(start)
    result = train(restarted, data, opts, checkpoint=tmp_path / "b")
    assert result.resumed_from == 5 and result.history == reference.history
    want, got = _params(whole), _params(restarted)
    assert want.keys() == got.keys()
    assert [k for k in want if not torch.equal(want[k], got[k])] == []
    assert bool(restarted[0].frozen) and not torch.equal(want["0.bn.running_mean"], start[0].bn.running_mean)
    again = train(restarted, data, opts, checkpoint=tmp_path / "b")  # finished: nothing left to run
    assert again.resumed_from == 10 and torch.equal(restarted[5].weight, whole[5].weight)


def test_bn_statistics_freeze_after_the_configured_step():
    model, x, y = _prepared_cnn()
    mean = model[0].bn.running_mean.clone()
    train(model, shuffled(x, y, batch_size=16), TrainOptions(steps=3, freeze_bn_after=0))
    assert bool(model[0].frozen) and torch.equal(model[0].bn.running_mean, mean)
    model, x, y = _prepared_cnn()
    train(model, shuffled(x, y, batch_size=16), TrainOptions(steps=3))  # the QATConfig's: never
    assert not bool(model[0].frozen) and not torch.equal(model[0].bn.running_mean, mean)


def test_distillation_without_labels_reduces_kl():
    """Batches are plain tensors; the float model (logits scaled up to ~2) teaches its W2A4 copy."""
    teacher = _mlp()
    with torch.no_grad():
        teacher[2].weight.mul_(8.0), teacher[2].bias.mul_(8.0)
    student = copy.deepcopy(teacher)
    x, _ = _task()
    prepare(student, QATConfig(weights="int2", activation_bits=4), calib=[x[:64]])
    held_out = _task(64, seed=1)[0]

    def kl():
        with torch.no_grad():
            return float(distillation(student(held_out), teacher(held_out)))

    before = kl()
    result = train(student, shuffled(x, batch_size=32), TrainOptions(steps=60), teacher=teacher)
    assert set(result.history[0]) == {"step", "lr", "distill", "loss"}
    # measured: held-out KL 0.204 before, 0.104 after
    assert kl() < 0.7 * before
    assert not teacher.training and all(p.grad is None for p in teacher.parameters())


def test_quantization_and_hidden_terms_are_logged():
    teacher = _mlp()
    student = _prepared_mlp()
    x, _ = _task()
    objective = Objective(task_weight=0.0, distill_weight=1.0, quant_weight=0.5, hidden_weight=1.0)
    result = train(student, shuffled(x, batch_size=32), TrainOptions(steps=2, log_every=1), teacher=teacher,
                   objective=objective, hidden={"0": "0"})  # fmt: skip
    entry = result.history[0]
    assert {"distill", "quant", "hidden"} <= set(entry) and entry["quant"] > 0 and entry["hidden"] > 0
    assert not student[0]._forward_hooks and not teacher[0]._forward_hooks  # removed after training


def test_shuffled_batches_resume_anywhere():
    x, y = _task(40)
    data = shuffled(x, y, batch_size=16, seed=5)  # 2 batches per epoch, 8 rows dropped
    it = iter(data)
    first = [next(it) for _ in range(5)]
    later = data.iter_from(3)
    for a, b in zip(first[3:], [next(later), next(later)], strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(first[0][0], first[2][0])  # a new permutation each epoch
    assert isinstance(next(iter(shuffled(x, batch_size=8))), torch.Tensor)


# ---------------------------------------------------------------- failures


class Batches:
    """A re-iterable list of batches; ``before(i)`` runs before batch ``i`` is handed out."""

    def __init__(self, batches, before):
        self.batches, self.before = batches, before

    def __iter__(self):
        for i, batch in enumerate(self.batches):
            self.before(i)
            yield batch


def test_nan_loss_names_the_step_and_keeps_the_checkpoint(tmp_path):
    """Batch 3 holds a NaN: the error names step 3 and the checkpoint written after step 2 stays as it was."""
    model = _prepared_mlp()
    x, y = _task(128)
    batches = [(x[i : i + 32].clone(), y[i : i + 32]) for i in range(0, 128, 32)]
    batches[3][0][5, 7] = float("nan")
    path, seen = tmp_path / CHECKPOINT, {}

    def before(i):
        if i == 3:
            seen["bytes"] = path.read_bytes()

    match = r"step 3: loss is nan; every quantizer scale is finite \(try a lower lr\); the last good"
    with pytest.raises(NonFiniteError, match=match + r" checkpoint .*qat-checkpoint.pt is kept"):
        train(model, Batches(batches, before), TrainOptions(steps=8, every=2), checkpoint=tmp_path)
    assert path.read_bytes() == seen["bytes"]
    assert torch.load(path, weights_only=True)["step"] == 2
    assert not model.training


def _log_scale_set_at_step_2(model, value, path):
    """Batches that set ``model[2]``'s second weight ``log_scale`` to ``value`` before step 2, and the
    bytes of the checkpoint at ``path`` as they were then (``seen["bytes"]``)."""
    x, y = _task(128)
    seen = {}

    def before(i):
        if i == 2:
            seen["bytes"] = path.read_bytes()
            with torch.no_grad():
                model[2].weight_fq.log_scale[1] = value

    return Batches([(x[i : i + 32], y[i : i + 32]) for i in range(0, 128, 32)], before), seen


def test_a_scale_that_blows_up_is_named(tmp_path):
    """A quantizer scale turns Inf before step 2 (as a diverging run would leave it): the error names it."""
    model = _prepared_mlp()
    path = tmp_path / CHECKPOINT
    batches, seen = _log_scale_set_at_step_2(model, float("inf"), path)  # scale exp(inf) = inf
    with pytest.raises(NonFiniteError, match="step 2: loss is nan; 2.weight: scale became inf; the last"):
        train(model, batches, TrainOptions(steps=8, every=2), checkpoint=tmp_path)
    assert path.read_bytes() == seen["bytes"]


def test_a_scale_made_nan_by_its_update_is_named():
    """The loss is finite but the optimizer step leaves a NaN scale (a NaN gradient): named after the step."""
    model = _prepared_mlp()
    model[0].input_fq.log_scale.register_hook(lambda g: g * float("nan"))
    x, y = _task()
    match = "step 0: a quantizer's qparams left the finite positive range; 0 input: scale became nan"
    with pytest.raises(NonFiniteError, match=match):
        train(model, shuffled(x, y, batch_size=32), TrainOptions(steps=4))


def test_a_scale_that_underflows_is_refused_not_clamped(tmp_path):
    """A step size can only reach 0 by ``exp`` underflowing (``log_scale`` about -104 or below). The weight
    quantizer's forward still runs (it floors the step at ``MIN_SCALE``; weight-only, so no bias grid
    divides by the zero step, and the loss stays finite), but the check after the step raises instead of
    clamping the scale back up, and the checkpoint before stays."""
    model = _prepared_mlp(QATConfig(weights="int4", activation_bits=None))
    path = tmp_path / CHECKPOINT
    batches, seen = _log_scale_set_at_step_2(model, -200.0, path)
    match = r"step 2: a quantizer's qparams left the finite positive range; 2.weight: scale became 0 \(<= 0\)"
    with pytest.raises(NonFiniteError, match=match):
        train(model, batches, TrainOptions(steps=8, every=2), checkpoint=tmp_path)
    assert path.read_bytes() == seen["bytes"]
    assert float(model[2].weight_fq.log_scale.detach()[1]) < -190  # not projected back to a positive scale


def test_scales_stay_positive_at_a_high_learning_rate():
    """300 steps at lr 1e-2 (no warm-up). Adam's first step moves every parameter by exactly lr against
    its gradient's sign, and ``log_scale``'s gradient has the sign of the raw step size's: a quantizer whose
    scale is below lr and whose first step lowers it would have gone negative as a raw parameter (the
    trainer used to clamp it to 1e-38, a dead quantizer). Learned as ``log_scale`` every scale stays finite
    and positive, moves by about lr a step at most, and the model converts."""
    model = _prepared_mlp()
    fqs = {f: m for f, m in model.named_modules() if hasattr(m, "log_scale")}
    seen = []

    def before(i):
        seen.append({f: fq.log_scale.detach().clone() for f, fq in fqs.items()})

    x, y = _task()
    data = Batches([(x[i : i + 32], y[i : i + 32]) for i in range(0, 256, 32)], before)
    result = train(model, data, TrainOptions(steps=300, lr=1e-2, warmup=0.0))
    assert len(seen) == 300 and all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)
    start, first = seen[0], seen[1]  # before step 0, after it
    doomed = [
        f for f in fqs
        if ((torch.exp(start[f]) < 1e-2) & (first[f] - start[f] < 0)).any()
    ]  # fmt: skip
    assert doomed == ["2.input_fq"]  # measured: scale 0.0078, first step -0.01 (raw: 0.0078 - 0.01 < 0)
    moved = 0.0
    for f, fq in fqs.items():
        fq.check_finite()
        log_scale = torch.stack([step[f] for step in seen[1:]] + [fq.log_scale.detach()])
        assert torch.isfinite(log_scale).all() and (torch.exp(log_scale) > 0).all(), f
        # Adam: about lr a step (measured at most 1.2 lr; its worst case is (1 - b1) / sqrt(1 - b2) = 3.2 lr)
        assert (log_scale.diff(dim=0).abs() <= 2e-2).all(), f
        moved = max(moved, float((log_scale[-1] - start[f]).abs().max()))
    assert moved > 0.3  # measured: up to 1.01 (a factor 2.7)
    from lowbit.qat import convert

    with torch.no_grad():
        fake = model(x)
    convert(model)
    with torch.no_grad():
        assert (model(x) - fake).abs().max() < 1e-5


def test_teacher_with_another_output_shape():
    model = _prepared_mlp()
    x, _ = _task()
    match = r"distillation: teacher output \(32, 5\) does not match the student's \(32, 4\)"
    with pytest.raises(LowbitError, match=match):
        train(model, shuffled(x, batch_size=32), TrainOptions(steps=2), teacher=nn.Linear(16, 5))


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"lr": 2e-2}, r"options.lr is 0.01 in the checkpoint but 0.02 now"),
        ({"config": QATConfig(weights="int4", activation_bits=8, activation_learning="lsq")},
         r'qat_config.activation_learning is "lsq\+" in the checkpoint but "lsq" now'),
        ({"config": QATConfig(weights="int8", activation_bits=8)},
         r'qat_config.weights is "int4" in the checkpoint but "int8" now'),
        ({"objective": Objective(quant_weight=0.1)},
         r"objective.quant_weight is 0.0 in the checkpoint but 0.1 now"),
    ],
    ids=["lr", "activation-learning", "weights", "objective"],
)  # fmt: skip
def test_a_checkpoint_of_another_run_is_refused(tmp_path, change, match):
    x, y = _task()
    data = shuffled(x, y, batch_size=32)
    train(_prepared_mlp(), data, TrainOptions(steps=4, every=2, lr=1e-2), checkpoint=tmp_path)
    written = (tmp_path / CHECKPOINT).read_bytes()
    model = _prepared_mlp(change.get("config"))
    before = _params(model)
    opts = TrainOptions(steps=4, every=2, lr=change.get("lr", 1e-2))
    with pytest.raises(CheckpointError, match=rf"written by another run \({match}\); use another checkpoint"):
        train(model, data, opts, checkpoint=tmp_path, objective=change.get("objective"))
    assert (tmp_path / CHECKPOINT).read_bytes() == written
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def _truncated(tmp_path):
    train(_prepared_mlp(), shuffled(*_task(), batch_size=32), TrainOptions(steps=2), checkpoint=tmp_path)
    data = (tmp_path / CHECKPOINT).read_bytes()
    (tmp_path / CHECKPOINT).write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda p: (p / CHECKPOINT).write_bytes(b"\x00garbage" * 100), "not a readable QAT checkpoint"),
        (_truncated, "not a readable QAT checkpoint"),
        (lambda p: torch.save({"step": 3}, p / CHECKPOINT), "not a lowbit QAT checkpoint"),
    ],
    ids=["garbage", "truncated", "foreign"],
)
def test_a_damaged_checkpoint_is_refused(tmp_path, damage, match):
    damage(tmp_path)
    with pytest.raises(CheckpointError, match=match):
        train(_prepared_mlp(), shuffled(*_task(), batch_size=32), TrainOptions(steps=2), checkpoint=tmp_path)


def test_objective_without_a_term():
    model = _prepared_mlp()
    logits, labels = torch.randn(4, 4), torch.tensor([0, 1, 2, 3])
    with pytest.raises(LowbitError, match="the objective has no term: give labels or a teacher"):
        Objective(task_weight=0.0)(model, logits, labels, None)
    with pytest.raises(LowbitError, match="the task loss needs labels"):
        Objective()(model, logits, None, None)
    with pytest.raises(LowbitError, match="distillation needs a teacher model"):
        Objective(task_weight=0.0, distill_weight=1.0)(model, logits, labels, None)
    x, _ = _task()
    with pytest.raises(LowbitError, match="the task loss needs labels"):  # plain batches, no teacher
        train(model, shuffled(x, batch_size=32), TrainOptions(steps=2))


def test_train_needs_a_prepared_model():
    with pytest.raises(LowbitError, match=r"the model has no QAT layer \(call lowbit.qat.prepare first\)"):
        train(_mlp(), shuffled(*_task(), batch_size=32), TrainOptions(steps=2))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"steps": 0}, "steps, every and log_every must be positive"),
        ({"every": 0}, "steps, every and log_every must be positive"),
        ({"lr": float("nan")}, "lr must be a positive number, got nan"),
        ({"lr": -1e-3}, "lr must be a positive number"),
        ({"warmup": 1.0}, r"warmup must be a fraction in \[0, 1\), got 1.0"),
    ],
    ids=["steps", "every", "lr-nan", "lr-negative", "warmup"],
)
def test_bad_options(kwargs, match):
    with pytest.raises(LowbitError, match=match):
        TrainOptions(**kwargs)


def test_bad_batches():
    x, y = _task(8)
    with pytest.raises(LowbitError, match="shuffled: give one or more tensors with the same number of rows"):
        shuffled(x, y[:4], batch_size=2)
    with pytest.raises(LowbitError, match="shuffled: batch_size must be 1..8, got 9"):
        shuffled(x, batch_size=9)
    with pytest.raises(LowbitError, match=r"batches must be a tensor or \(inputs, labels\), got dict"):
        train(_prepared_mlp(), [{"x": x}], TrainOptions(steps=1))
    with pytest.raises(LowbitError, match="train: the data yields no batch"):
        train(_prepared_mlp(), [], TrainOptions(steps=1))


def test_every_twin_type_trains():
    """Weights, BatchNorm affine parameters and step sizes of a QATConvBn2d and a QATLinear all move."""
    model, x, y = _prepared_cnn()
    before = _params(model)
    train(model, shuffled(x, y, batch_size=16), TrainOptions(steps=3))
    after = _params(model)
    assert isinstance(model[0], QATConvBn2d)
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert {"0.weight", "0.bn.weight", "0.weight_fq.log_scale", "0.input_fq.log_scale"} <= set(moved)
    assert {"5.weight", "5.weight_fq.log_scale"} <= set(moved)
