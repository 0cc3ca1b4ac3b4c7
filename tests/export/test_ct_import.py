"""compressed-tensors folders written by compressed-tensors' own compressor, loaded by lowbit
(lowbit.export.ct_import): weights equal to compressed-tensors' decompression, logits equal to
transformers' run of the same folder, and each config lowbit cannot hold refused with a message."""

import json

import pytest
import torch

import lowbit
from lowbit.core.errors import CheckpointError
from lowbit.nn import QDynamicLinear, QLinear
from support import run_cli, tiny_llama

pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors import ModelCompressor  # noqa: E402
from compressed_tensors.quantization import (  # noqa: E402
    QuantizationConfig,
    apply_quantization_config,
    preset_name_to_scheme,
)
from compressed_tensors.quantization.utils import calculate_qparams  # noqa: E402
from transformers import AutoModelForCausalLM, CompressedTensorsConfig  # noqa: E402

IDS = torch.tensor([[1, 5, 9, 2, 33, 17, 4, 60]])


def _write(path, preset, group=None, fmt="pack-quantized"):
    """A tiny Llama quantized (min-max) and saved by compressed-tensors' own compressor."""
    m = tiny_llama(hidden=64, intermediate=128)
    scheme = preset_name_to_scheme(preset, ["Linear"])
    if group:
        scheme.weights.group_size = group
    apply_quantization_config(m, QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"]))
    for mod in m.modules():
        args = getattr(getattr(mod, "quantization_scheme", None), "weights", None)
        if args is None:
            continue
        w = mod.weight.detach()
        grouped = args.strategy == "group"
        w = w.reshape(w.shape[0], -1, args.group_size) if grouped else w.reshape(w.shape[0], 1, -1)
        scale, zp = calculate_qparams(w.amin(-1), w.amax(-1), args)
        mod.weight_scale.data.copy_(scale.reshape(mod.weight_scale.shape))
        if getattr(mod, "weight_zero_point", None) is not None:
            mod.weight_zero_point.data.copy_(zp.reshape(mod.weight_zero_point.shape))
    compressor = ModelCompressor.from_pretrained_model(m, quantization_format=fmt)
    compressor.compress_model(m)
    m.save_pretrained(str(path))
    compressor.update_config(str(path))
    return path


# W8A8's activations: compressed-tensors quantizes each token symmetrically, lowbit's QDynamicLinear
# asymmetrically (its own rule); the weights are still exact, the logits close (measured 2e-2 relative).
@pytest.mark.parametrize(
    "preset,group,fmt,cls,tol",
    [("W4A16", 32, "pack-quantized", QLinear, 1e-5), ("W4A16_ASYM", 32, "pack-quantized", QLinear, 1e-5),
     ("W8A16", 32, "pack-quantized", QLinear, 1e-5), ("W8A8", None, "int-quantized", QDynamicLinear, 6e-2)],
)  # fmt: skip
def test_lowbit_loads_compressed_tensors_own_output(tmp_path, preset, group, fmt, cls, tol):
    path = _write(tmp_path / "ct", preset, group, fmt)
    ours = lowbit.load(path)
    theirs = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)
    ).eval()
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        layer = ours.get_submodule(name)
        assert type(layer) is cls
        assert torch.equal(layer.dequantized_weight(), theirs.get_submodule(name).weight.detach()), name
    assert type(ours.lm_head) is torch.nn.Linear  # ignored: stays float
    with torch.no_grad():
        a, b = ours(IDS).logits, theirs(IDS).logits
    assert float((a - b).abs().max()) <= tol * float(b.abs().max())  # weight-only: measured 3e-7


def _edit(path, **changes):
    cfg_path = path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    qc = cfg["quantization_config"]
    for key, value in changes.items():
        target = qc["config_groups"]["group_0"] if key in ("weights", "input_activations", "format") else qc
        target[key] = value(target.get(key)) if callable(value) else value
    cfg_path.write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "changes,message",
    [({"format": "float-quantized"}, "format 'float-quantized' not supported"),
     ({"weights": lambda w: w | {"type": "float", "num_bits": 8}}, "weights float 8-bit"),
     ({"weights": lambda w: w | {"num_bits": 3}}, "int weights of 2, 4 or 8 bits"),
     ({"input_activations": {"num_bits": 8, "type": "int", "strategy": "tensor", "dynamic": False}},
      "dynamic per-token"),
     ({"sparsity_config": {"format": "sparse-24-bitmask"}}, "sparsity_config is not imported"),
     ({"kv_cache_scheme": {"num_bits": 8}}, "kv_cache_scheme"),
     ({"config_groups": {}}, "config_groups is missing or empty"),
     ({"weights": lambda w: w | {"group_size": 64}}, "weight_scale is .* expected \\[64, 1\\]"),
     ({"ignore": ["lm_head", "re:.*mlp.*"]}, "stored quantized, but no config group targets it")],
    ids=["fp8-format", "fp8-weights", "3-bit", "static-activations", "sparse", "kv-cache", "no-groups",
         "group-vs-tensors", "ignored-but-stored"],
)  # fmt: skip
def test_configs_lowbit_cannot_hold_are_refused(tmp_path, changes, message):
    path = _write(tmp_path / "ct", "W4A16", 32)
    _edit(path, **changes)
    with pytest.raises(CheckpointError, match=message):
        lowbit.load(path)


def test_cli_refuses_a_decompressed_folder_that_still_says_compressed(capsys, tmp_path):
    path = _write(tmp_path / "ct", "W4A16", 32)
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    with torch.no_grad():
        hf(IDS)  # decompresses in place
    hf.save_pretrained(str(tmp_path / "resaved"))  # float weights under a pack-quantized config
    capsys.readouterr()
    code, out, err = run_cli(capsys, "eval", str(tmp_path / "resaved"), "--task", "wiki-ppl")
    assert code == 2 and "weight_packed is missing" in err and err.count("\n") == 1 and not out
