"""Loading a Hugging Face folder reads safetensors only, never runs code from the folder, never reads a
file outside it, never leaves weights newly initialised, and refuses a stripped lowbit checkpoint: each
bad folder is one ``CheckpointError`` line (the CLI: exit 2), with no bytes of a foreign file echoed."""

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import lowbit
from lowbit import CheckpointError, Int8Dynamic
from lowbit.cli.main import main as cli_main
from lowbit.models import check_hf_folder, check_safetensors, load
from support import tiny_llama

INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture
def folder(tmp_path, model):
    out = tmp_path / "tiny"
    model.save_pretrained(out)
    return out


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    return msg


def _write_index(folder: Path, index: object) -> Path:
    path = folder / INDEX
    path.write_text(json.dumps(index))
    return path


def _sharded(folder: Path, model, shard: str) -> Path:
    """Rewrite ``folder`` as one shard named ``shard`` in an index (no model.safetensors left)."""
    (folder / "model.safetensors").unlink()
    return _write_index(folder, {"metadata": {}, "weight_map": dict.fromkeys(model.state_dict(), shard)})


class _Touch:
    """Unpickling this creates ``path``: the marker of a pickle that ran."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


# --- 1. safetensors only --------------------------------------------------------------------------


def test_pickled_weights_are_never_read(folder, model, tmp_path):
    """A pytorch_model.bin beside a stray *.safetensors: refused, the .bin never unpickled."""
    marker = tmp_path / "unpickled"
    (folder / "model.safetensors").unlink()
    with open(folder / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.embed_tokens.weight": _Touch(marker)}, f)
    save_file({"x": torch.zeros(2)}, str(folder / "adapter.safetensors"))
    with pytest.raises(CheckpointError, match=r"tiny: no \*\.safetensors weights") as e:
        load(folder, progress=False)
    _one_line(e)
    assert not marker.exists()


def test_real_bin_is_not_loaded(folder, model):
    """A loadable pytorch_model.bin (and a stray *.safetensors) is not a fallback for model.safetensors."""
    (folder / "model.safetensors").unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    save_file({"x": torch.zeros(2)}, str(folder / "adapter.safetensors"))
    with pytest.raises(CheckpointError, match="pytorch_model.bin are never loaded"):
        load(folder, progress=False)


def test_bin_beside_safetensors_is_ignored(folder, model, tmp_path):
    """model.safetensors present: it is what loads; a pickle beside it is never opened."""
    marker = tmp_path / "unpickled"
    with open(folder / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.embed_tokens.weight": _Touch(marker)}, f)
    loaded, _ = load(folder, progress=False)
    assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert not marker.exists()


def test_config_cannot_name_a_pickle(folder, tmp_path):
    """config.json's ``transformers_weights`` may name ``adapter_model.bin``; it is refused, unread."""
    marker = tmp_path / "unpickled"
    with open(folder / "adapter_model.bin", "wb") as f:
        pickle.dump({"model.embed_tokens.weight": _Touch(marker)}, f)
    _edit_config(folder, transformers_weights="adapter_model.bin")
    with pytest.raises(
        CheckpointError, match="transformers_weights 'adapter_model.bin' is not a safetensors"
    ) as e:
        load(folder, progress=False)
    _one_line(e)
    assert not marker.exists()


def test_config_named_weights_must_be_inside(folder, tmp_path):
    shutil.copy(folder / "model.safetensors", tmp_path / "x.safetensors")
    _edit_config(folder, transformers_weights="../x.safetensors")
    with pytest.raises(CheckpointError, match="transformers_weights '../x.safetensors' is not a file inside"):
        load(folder, progress=False)


def test_config_named_weights_are_checked(folder, model):
    """The file config.json names is the one checked (and loaded), not model.safetensors."""
    os.replace(folder / "model.safetensors", folder / "weights.safetensors")
    (folder / "model.safetensors").write_bytes(b"not read by transformers")
    _edit_config(folder, transformers_weights="weights.safetensors")
    loaded, _ = load(folder, progress=False)
    assert torch.equal(loaded.model.norm.weight, model.model.norm.weight)
    data = (folder / "weights.safetensors").read_bytes()
    (folder / "weights.safetensors").write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match=r"weights\.safetensors: truncated"):
        load(folder, progress=False)


# --- 2. no remote code ----------------------------------------------------------------------------


def _edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(cfg | changes))


def test_remote_code_is_refused(folder):
    _edit_config(folder, auto_map={"AutoModelForCausalLM": "modeling_my.MyModel"}, model_type="my_custom")
    (folder / "modeling_my.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(CheckpointError, match=r"config\.json: asks for the model's own Python code") as e:
        load(folder, progress=False)
    _one_line(e)


def test_auto_map_alone_is_refused(folder):
    _edit_config(folder, auto_map={"AutoModelForCausalLM": "modeling_my.MyModel"})
    with pytest.raises(CheckpointError, match="auto_map"):
        load(folder, progress=False)


def test_unknown_model_type_is_refused(folder):
    _edit_config(folder, model_type="my_custom")
    with pytest.raises(CheckpointError, match="model_type 'my_custom' is not built into transformers") as e:
        load(folder, progress=False)
    _one_line(e)


@pytest.mark.parametrize("config", ["[1, 2]", "{not json", '"llama"'], ids=["list", "broken", "string"])
def test_bad_config_json(folder, config):
    (folder / "config.json").write_text(config)
    with pytest.raises(CheckpointError, match=r"config\.json") as e:
        load(folder, progress=False)
    _one_line(e)


# --- 3. shards stay inside the folder -------------------------------------------------------------


@pytest.mark.parametrize(
    "shard",
    ["/etc/passwd", "../x.safetensors", "sub/../../x.safetensors", "ABSOLUTE"],
    ids=["passwd", "dotdot", "nested-dotdot", "absolute"],
)
def test_index_shards_must_be_inside(folder, model, shard):
    if shard == "ABSOLUTE":  # an absolute path to a sound safetensors file
        shard = str(folder.parent / "elsewhere.safetensors")
        shutil.copy(folder / "model.safetensors", shard)
    else:
        shutil.copy(folder / "model.safetensors", folder.parent / "x.safetensors")
    index = _sharded(folder, model, shard)
    with pytest.raises(CheckpointError, match=f"{index}: shard .* is not a file inside") as e:
        load(folder, progress=False)
    msg = _one_line(e)
    assert "root:" not in msg and "bytes" not in msg


def test_symlinked_shard_pointing_outside(folder, model, tmp_path):
    outside = tmp_path / "outside.safetensors"
    shutil.copy(folder / "model.safetensors", outside)
    index = _sharded(folder, model, "shard.safetensors")
    (folder / "shard.safetensors").symlink_to(outside)
    with pytest.raises(CheckpointError, match=f"{index}: shard 'shard.safetensors' is not a file inside"):
        load(folder, progress=False)


def test_symlinked_weights_pointing_outside(folder, tmp_path):
    outside = tmp_path / "outside.safetensors"
    os.replace(folder / "model.safetensors", outside)
    (folder / "model.safetensors").symlink_to(outside)
    with pytest.raises(CheckpointError, match="model.safetensors is not a file inside"):
        load(folder, progress=False)


def test_symlink_to_passwd_echoes_nothing(folder):
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").symlink_to("/etc/passwd")
    with pytest.raises(CheckpointError) as e:
        load(folder, progress=False)
    msg = _one_line(e)
    assert "root:" not in msg and "bytes" not in msg and "header alone" not in msg


def test_hub_cache_layout_is_accepted(tmp_path, model):
    """A Hugging Face hub cache snapshot: files are symlinks into ``../../blobs``; that is allowed."""
    repo = tmp_path / "models--me--tiny"
    snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    model.save_pretrained(tmp_path / "plain")
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in (tmp_path / "plain").iterdir():
        os.replace(f, blobs / f"blob-{f.name}")
        (snap / f.name).symlink_to(Path("..", "..", "blobs", f"blob-{f.name}"))
    loaded, _ = load(snap, progress=False)
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_sharded_folder_inside_loads(folder, model):
    shard = "model-00001-of-00001.safetensors"
    os.replace(folder / "model.safetensors", folder / shard)
    _write_index(folder, {"metadata": {}, "weight_map": dict.fromkeys(model.state_dict(), shard)})
    loaded, _ = load(folder, progress=False)
    assert torch.equal(loaded.model.norm.weight, model.model.norm.weight)


@pytest.mark.parametrize("size", [7, 100], ids=["tiny", "text"])
def test_implausible_header_length_is_not_echoed(tmp_path, size):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"secret: hunter2 and more text than that"[:size])
    with pytest.raises(CheckpointError) as e:
        check_safetensors(path)
    msg = _one_line(e)
    assert (
        "hunter2" not in msg
        and str(int.from_bytes(path.read_bytes()[:8].ljust(8, b"\0"), "little")) not in msg
    )
    if size >= 8:
        assert "header length field is implausible" in msg


def test_huge_header_length_is_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    n = 200 * 2**20
    with open(path, "wb") as f:
        f.write(n.to_bytes(8, "little"))
        f.truncate(8 + n + 16)  # sparse: a file large enough to hold the claimed header
    with pytest.raises(CheckpointError, match="header length field is implausible") as e:
        check_safetensors(path)
    assert str(n) not in _one_line(e)


# --- 4. malformed index ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "index",
    [
        [1, 2],
        {"weight_map": ["model.safetensors"]},
        {"weight_map": {"model.embed_tokens.weight": 5}},
        {"weight_map": {"model.embed_tokens.weight": None}},
        {"weight_map": {"model.embed_tokens.weight": ["a"]}},
        {"weight_map": {"model.embed_tokens.weight": ""}},
        {"metadata": {}},
        {"weight_map": {"model.embed_tokens.weight": "model.safetensors"}},
        "not json",
    ],
    ids=[
        "top-list",
        "map-list",
        "value-int",
        "value-none",
        "value-list",
        "value-empty",
        "no-map",
        "no-metadata",
        "broken",
    ],  # fmt: skip
)
def test_malformed_index(folder, index):
    path = folder / INDEX
    path.write_text(index if isinstance(index, str) else json.dumps(index))
    with pytest.raises(CheckpointError, match=f"{path}: ") as e:
        check_hf_folder(folder)
    _one_line(e)
    with pytest.raises(CheckpointError):
        load(folder, progress=False)


# --- 5. no newly initialised weights --------------------------------------------------------------


def _state(model, drop=()) -> dict:
    """The model's tensors as saved (the tied lm_head is stored once, as the embedding), less ``drop``."""
    skip = {"lm_head.weight", *drop}
    return {k: v.contiguous() for k, v in model.state_dict().items() if k not in skip}


def test_missing_weights_are_an_error(folder, model):
    state = {k: v for k, v in _state(model).items() if ".layers.1.mlp." not in k}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"3 weights missing .*model\.layers\.1\.mlp\.down_proj") as e:
        load(folder, progress=False)
    _one_line(e)


def test_missing_index_tensor_is_an_error(folder, model):
    """An index naming only some tensors: the rest would be newly initialised."""
    os.replace(folder / "model.safetensors", folder / "shard.safetensors")
    state = _state(model, drop=["model.norm.weight"])
    save_file(state, str(folder / "shard.safetensors"), metadata={"format": "pt"})
    _write_index(folder, {"metadata": {}, "weight_map": dict.fromkeys(state, "shard.safetensors")})
    with pytest.raises(CheckpointError, match=r"1 weights missing .*model\.norm\.weight"):
        load(folder, progress=False)


def test_misshaped_weight_is_an_error(folder, model):
    state = _state(model) | {"model.norm.weight": torch.ones(7)}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight") as e:
        load(folder, progress=False)
    _one_line(e)


def test_tied_lm_head_is_not_missing(folder, model):
    loaded, _ = load(folder, progress=False)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


# --- 6. a lowbit checkpoint without its quant_config.json ------------------------------------------


@pytest.fixture
def stripped(tmp_path, model):
    """A lowbit checkpoint of the tiny Llama, its quant_config.json deleted."""
    import copy

    q = copy.deepcopy(model)
    lowbit.quantize_(q, Int8Dynamic())
    out = lowbit.save(q, tmp_path / "ckpt")
    (out / "quant_config.json").unlink()
    return out


def test_stripped_lowbit_checkpoint_is_refused(stripped):
    msg = f"{stripped}: looks like a lowbit checkpoint but quant_config.json is missing"
    with pytest.raises(CheckpointError, match=msg) as e:
        load(stripped, progress=False)
    _one_line(e)
    with pytest.raises(CheckpointError, match=msg):
        check_hf_folder(stripped)


def test_stripped_lowbit_checkpoint_cli(stripped, capsys):
    assert cli_main(["eval", str(stripped), "--tokens", "16", "--window", "8", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert "looks like a lowbit checkpoint but quant_config.json is missing" in err


def test_unquantized_lowbit_save_is_refused_too(tmp_path, model):
    out = lowbit.save(model, tmp_path / "float")
    (out / "quant_config.json").unlink()
    with pytest.raises(CheckpointError, match="looks like a lowbit checkpoint"):
        load(out, progress=False)
