"""A checkpoint is verified before it is trusted: checksums, qparams, and one CheckpointError (CLI: one
line, exit 2) per malformed quant_config.json, with nothing allocated from sizes the file claims."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lowbit
from lowbit import CheckpointError, FormatVersionError, LowbitError, WeightOnly, quantize_
from lowbit.cli.main import main
from lowbit.export.validate import config_digest


def _model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    quantize_(m, WeightOnly(bits=4, group_size=16))
    return m


def _skeleton():
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))


@pytest.fixture
def saved(tmp_path):
    return lowbit.save(_model(), tmp_path / "q")


def edit_meta(folder, fn, resign=True):
    """Apply ``fn`` to quant_config.json; ``resign``: recompute config_sha256 so that the deeper checks
    (not the checksum) are what must catch the edit."""
    p = folder / "quant_config.json"
    meta = json.loads(p.read_text())
    result = fn(meta)
    meta = result if isinstance(result, list) else meta
    if resign and isinstance(meta, dict) and "config_sha256" in meta:
        meta["config_sha256"] = config_digest(meta)
    p.write_text(json.dumps(meta))


def edit_tensor(folder, name, fn, resign=False):
    """Rewrite tensor ``name`` of model.safetensors with ``fn``; ``resign``: fix its recorded sha256."""
    p = folder / "model.safetensors"
    tensors = load_file(str(p))
    tensors[name] = fn(tensors[name].clone())
    save_file(tensors, str(p), metadata={"format": "lowbit"})
    if resign:
        from lowbit.export.validate import tensor_digests

        edit_meta(folder, lambda m: m.update(tensor_sha256=tensor_digests(p)))


def test_checksums_recorded_and_round_trip(saved):
    meta = json.loads((saved / "quant_config.json").read_text())
    assert meta["format_version"] == 2
    assert set(meta["tensor_sha256"]) == set(load_file(str(saved / "model.safetensors")))
    assert meta["config_sha256"] == config_digest(meta)
    x = torch.randn(3, 64)
    assert torch.equal(lowbit.load(saved, model=_skeleton())(x), _model()(x))


@pytest.mark.parametrize(
    "value", [float("nan"), -0.5, 0.0, float("inf")], ids=["nan", "negative", "zero", "inf"]
)
@pytest.mark.parametrize("resign", [False, True], ids=["stale-digest", "digest-fixed"])
def test_bad_scale_refused(saved, value, resign):
    def poison(s):
        s.view(-1)[3] = value
        return s

    edit_tensor(saved, "0.scale", poison, resign=resign)
    message = r"module 0: scale .* not finite and positive" if resign else "tensor 0.scale does not match"
    with pytest.raises(CheckpointError, match=message):
        lowbit.load(saved, model=_skeleton())
    with pytest.raises(CheckpointError, match=r"module 0: scale .* not finite and positive"):
        lowbit.load(saved, model=_skeleton(), verify=False)  # qparam checks run without verify too


def test_zero_point_out_of_range_refused(saved):
    edit_tensor(saved, "2.zero_point", lambda z: z.fill_(200), resign=True)
    with pytest.raises(CheckpointError, match=r"module 2: zero point 200 outside uint4's \[0, 15\]"):
        lowbit.load(saved, model=_skeleton())


def test_flipped_code_byte_detected(saved):
    def flip(q):
        q.view(-1)[5] ^= 0x10
        return q

    edit_tensor(saved, "0.qweight", flip)
    with pytest.raises(CheckpointError, match="tensor 0.qweight does not match its sha256"):
        lowbit.load(saved, model=_skeleton())


def test_flipped_bytes_in_file_detected(saved):
    p = saved / "model.safetensors"
    data = bytearray(p.read_bytes())
    data[-7] ^= 0x01  # inside the last tensor's data
    p.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match its sha256"):
        lowbit.load(saved, model=_skeleton())


def test_edited_config_detected(saved):
    edit_meta(saved, _set(["modules", "0", "spec", "clip_ratio"], 0.5), resign=False)
    with pytest.raises(CheckpointError, match="do not match its config_sha256"):
        lowbit.load(saved, model=_skeleton())


def test_version_1_without_checksums_loads_with_warning(saved):
    def strip(m):
        m.pop("tensor_sha256"), m.pop("config_sha256")
        m["format_version"] = 1

    edit_meta(saved, strip, resign=False)
    with pytest.warns(UserWarning, match="not verified"):
        lowbit.load(saved, model=_skeleton())


def test_version_2_without_checksums_refused(saved):
    edit_meta(saved, lambda m: m.pop("tensor_sha256"), resign=False)
    with pytest.raises(CheckpointError, match="missing or malformed checksums"):
        lowbit.load(saved, model=_skeleton())


@pytest.mark.parametrize(
    "version,message",
    [("1", "must be an integer, got \"1\""), (-5, "must be >= 1"), (True, "must be an integer, got true"),
     (1.0, "must be an integer"), (None, "must be an integer, got null")],
    ids=["string", "negative", "bool", "float", "null"],
)  # fmt: skip
def test_format_version_type_and_bounds(saved, version, message):
    edit_meta(saved, lambda m: m.update(format_version=version))
    with pytest.raises(CheckpointError, match=message):
        lowbit.load(saved, model=_skeleton())


def test_newer_format_version_still_says_upgrade(saved):
    edit_meta(saved, lambda m: m.update(format_version=3))
    with pytest.raises(FormatVersionError, match="newer than this lowbit reads"):
        lowbit.load(saved, model=_skeleton())


def _set(path, value):
    def fn(m):
        target = m
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return fn


MALFORMED = {
    "top-level-list": (lambda m: [m], "not a lowbit quant config"),
    "modules-list": (_set(["modules"], []), "modules has the wrong type"),
    "entry-null": (_set(["modules", "0"], None), "module 0: entry must be an object"),
    "dtype-os-system": (_set(["modules", "0", "dtype"], "os.system"), "module 0: dtype: expected dtype"),
    "in-features-abc": (_set(["modules", "0", "in_features"], "abc"), "module 0: in_features: expected dim"),
    "in-features-float": (_set(["modules", "0", "in_features"], 64.0), "module 0: in_features: expected dim"),
    "in-features-negative": (_set(["modules", "0", "in_features"], -1), "in_features: expected dim"),
    "in-features-1e9": (_set(["modules", "0", "in_features"], 10**9), r"0.qweight has shape \(32, 32\)"),
    "in-features-huge": (_set(["modules", "0", "in_features"], 10**30), "in_features: expected dim"),
    "group-string": (_set(["modules", "0", "spec", "granularity", "size"], "8"), "group size must be an int"),
    "group-1e9": (_set(["modules", "0", "spec", "granularity", "size"], 10**9), r"0.scale has shape"),
    "format-unknown": (_set(["modules", "0", "spec", "format"], "int99"), "unknown format 'int99'"),
    "format-list": (_set(["modules", "0", "spec", "format"], ["uint4"]), "format and scale_dtype must be"),
    "clip-nan": (
        _set(["modules", "0", "spec", "clip_ratio"], math.inf),
        "clip_ratio must be a finite number",
    ),
    "spec-extra": (_set(["modules", "0", "spec", "eval"], 1), "expected a QuantSpec object"),
    "entry-extra": (_set(["modules", "0", "__class__"], 1), r"unknown fields \['__class__'\]"),
    "entry-missing": (lambda m: m["modules"]["0"].pop("bias"), r"missing \['bias'\]"),
    "type-unknown": (_set(["modules", "0", "type"], "Popen"), "unknown type 'Popen'"),
    "type-list": (_set(["modules", "0", "type"], ["QLinear"]), "unknown type"),
    "identity-empty-name": (_set(["identity"], [""]), "identity must hold non-empty"),
    "identity-not-a-module": (_set(["identity"], ["0.weight"]), r"module 0.weight not in the model"),
    "identity-dunder": (_set(["identity"], ["__class__"]), r"module __class__ not in the model"),
    "module-not-in-model": (
        lambda m: m["modules"].update({"9": m["modules"]["0"]}),
        "module 9 not in the model",
    ),
    "aliases-list": (_set(["aliases"], ["x"]), "aliases has the wrong type"),
    "alias-to-nothing": (_set(["aliases"], {"0.bias2": "nope"}), "alias 0.bias2 names no stored tensor"),
    "source-number": (_set(["source"], 5), "source must be a model name or null"),
    "inputs-huge": (
        _set(["inputs"], {"input": {"shape": [1, 1 << 20, 1 << 20], "dtype": "float32"}}),
        "inputs",
    ),
    "inputs-dtype": (_set(["inputs"], {"input": {"shape": [1, 4], "dtype": "os.system"}}), "inputs"),
    "unknown-top-field": (_set(["trust_remote_code"], True), r"unknown fields \['trust_remote_code'\]"),
    "digest-not-hex": (_set(["tensor_sha256", "0.scale"], "zz"), "malformed checksums"),
    "deep-nesting": (lambda m: m.update(config=json.loads("[" * 50 + "]" * 50)), "config has the wrong type"),
}


@pytest.mark.parametrize("case", list(MALFORMED), ids=list(MALFORMED))
def test_malformed_quant_config_is_one_checkpoint_error(saved, case):
    fn, message = MALFORMED[case]
    edit_meta(saved, fn)
    with pytest.raises(CheckpointError, match=message) as e:
        lowbit.load(saved, model=_skeleton())
    assert "\n" not in str(e.value) and len(str(e.value)) < 400


def test_recursion_bomb_is_not_json(saved):
    (saved / "quant_config.json").write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(CheckpointError, match="not valid JSON"):
        lowbit.load(saved, model=_skeleton())


def test_quantized_modules_are_built_on_meta_before_the_header_check(saved, monkeypatch):
    """in_features 1e9 must not allocate 32 x 1e9 codes before the stored shape says no."""
    edit_meta(saved, _set(["modules", "0", "in_features"], 10**9))
    big = []
    real_zeros = torch.zeros

    def spy(*a, **k):
        t = real_zeros(*a, **k)
        if t.numel() > 10**8:
            big.append(t.device.type)
        return t

    monkeypatch.setattr(torch, "zeros", spy)
    with pytest.raises(CheckpointError, match="the model expects"):
        lowbit.load(saved, model=_skeleton())
    assert big and set(big) == {"meta"}  # codes and scales of 1e9 columns existed on the meta device only


def test_save_refuses_to_replace_a_foreign_folder(tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("x")
    with pytest.raises(LowbitError, match="not a lowbit checkpoint"):
        lowbit.save(_model(), precious, overwrite=True)
    assert (precious / "thesis.txt").read_text() == "x"
    empty = tmp_path / "empty"
    empty.mkdir()
    lowbit.save(_model(), empty, overwrite=True)  # an empty folder may be replaced
    lowbit.save(_model(), empty, overwrite=True)  # and so may a lowbit checkpoint
    assert (empty / "quant_config.json").is_file()


@pytest.mark.parametrize("out", ["", " ", "."], ids=["empty", "blank", "cwd"])
def test_save_refuses_empty_or_cwd_target(tmp_path, monkeypatch, out):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.txt").write_text("x")
    with pytest.raises(LowbitError):
        lowbit.save(_model(), out, overwrite=True)
    assert (tmp_path / "mine.txt").read_text() == "x"


def _cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _hf_folder(path):
    from support import tiny_llama

    tiny_llama().save_pretrained(str(path))
    return path


def test_cli_overwrite_never_deletes_a_foreign_folder(capsys, tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("x")
    model = _hf_folder(tmp_path / "m")
    capsys.readouterr()
    code, _, err = _cli(
        capsys, "quantize", "--model", model, "--scheme", "w8", "--out", precious,
        "--overwrite", "--quiet",
    )  # fmt: skip
    assert code == 2 and "not a lowbit checkpoint" in err and err.count("\n") == 1
    assert (precious / "thesis.txt").read_text() == "x"


@pytest.mark.parametrize(
    "argv,message",
    [(["--scheme", "w4g999999999999999999999", "--out", "{tmp}/o"], "group size must be"),
     (["--scheme", "w8", "--out", "", "--overwrite"], "output folder name is empty")],
    ids=["huge-group", "empty-out"],
)  # fmt: skip
def test_cli_bad_arguments_one_line(capsys, tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.txt").write_text("x")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code, _, err = _cli(capsys, "quantize", "--model", "smollm2-135m", *argv)
    assert code == 2 and message in err and err.count("\n") == 1
    assert (tmp_path / "mine.txt").read_text() == "x"


@pytest.mark.parametrize(
    "case", ["top-level-list", "dtype-os-system", "in-features-abc", "identity-empty-name"]
)
def test_cli_eval_of_malformed_checkpoint_exit_2(capsys, saved, case):
    edit_meta(saved, MALFORMED[case][0])
    code, out, err = _cli(capsys, "eval", saved, "--quiet")
    assert code == 2 and err.startswith("lowbit: error:") and err.count("\n") == 1 and out == ""


def test_calib_for_a_method_without_data_is_reported(tmp_path):
    from lowbit import workflows

    folder = _hf_folder(tmp_path / "m")
    with pytest.warns(UserWarning, match="--calib is ignored: w8 with method rtn uses no data"):
        workflows.quantize_and_save(str(folder), "w8", tmp_path / "o", calib="wiki:2x16", progress=False)
    assert (tmp_path / "o" / "quant_config.json").is_file()


@pytest.mark.parametrize(
    "edit,message",
    [({"auto_map": {"AutoModelForCausalLM": "evil.Model"}}, "auto_map"),
     ({"model_type": "my_custom"}, "not built into transformers")],
    ids=["auto-map", "unknown-model-type"],
)  # fmt: skip
def test_checkpoint_whose_config_asks_for_remote_code_is_refused(tmp_path, capsys, edit, message):
    from support import tiny_llama

    m = tiny_llama()
    quantize_(m, WeightOnly(bits=8, group_size=None))
    folder = lowbit.save(m, tmp_path / "q")
    cfg = json.loads((folder / "config.json").read_text()) | edit
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=message):
        lowbit.load(folder)
    code, _, err = _cli(capsys, "eval", folder, "--quiet")
    assert code == 2 and message in err and err.count("\n") == 1


@pytest.mark.parametrize("mask", [0o022, 0o077], ids=["umask-022", "umask-077"])
def test_checkpoint_files_follow_the_umask(tmp_path, mask):
    import os

    old = os.umask(mask)
    try:
        folder = lowbit.save(_model(), tmp_path / "q")
    finally:
        os.umask(old)
    assert folder.stat().st_mode & 0o777 == 0o777 & ~mask
    for name in ("model.safetensors", "quant_config.json"):
        assert (folder / name).stat().st_mode & 0o777 == 0o666 & ~mask
