"""``lowbit report`` and ``lowbit debug`` end to end on small models, and their bad input: one line on
stderr, exit 2, nothing left behind."""

import json
import shutil

import pytest
import torch
from tests.models.test_models_load import _tiny_tokenizer

import lowbit
from support import run_cli, tiny_llama


@pytest.fixture(scope="module")
def lm_checkpoint(tmp_path_factory):
    """A float tiny Llama HF folder with a tokenizer, and its w4g32 lowbit checkpoint (source: the folder)."""
    root = tmp_path_factory.mktemp("lm")
    tiny_llama().save_pretrained(root / "float")
    _tiny_tokenizer().save_pretrained(root / "float")
    model, tok = lowbit.models.load(str(root / "float"), progress=False)
    lowbit.quantize_(model, lowbit.WeightOnly(bits=4, group_size=32))
    lowbit.save(model, root / "q", tokenizer=tok)
    return root


def _files(folder):
    return sorted(p.name for p in folder.iterdir())


def test_report_lm_writes_three_files(capsys, lm_checkpoint, tmp_path):
    out = tmp_path / "rep"
    code, stdout, err = run_cli(capsys, "report", str(lm_checkpoint / "q"), "--data", "wiki:4", "--no-speed",
                                "--quiet", "--out", str(out))  # fmt: skip
    assert code == 0, err
    assert _files(out) == ["MODEL_CARD.md", "report.html", "report.json"]
    r = json.loads((out / "report.json").read_text())
    assert r["model"]["baseline"] == str(lm_checkpoint / "float") and r["model"]["kind"] == "causal-lm"
    assert [row["model"] for row in r["quality"]["rows"]] == ["baseline", "quantized"]
    assert r["quality"]["samples"] == 4 and r["audit"]["grouping"] == "article"
    assert len(r["layers"]) == 16 and all(e["weight_sqnr_db"] > 15 for e in r["layers"])
    assert r["speed"] is None and any("speed" in m for m in r["not_measured"])
    assert "perplexity" in stdout and str(out / "report.html") in stdout


def test_report_without_reachable_baseline_measures_the_rest(capsys, tmp_path):
    tiny_llama().save_pretrained(tmp_path / "float")
    _tiny_tokenizer().save_pretrained(tmp_path / "float")
    model, tok = lowbit.models.load(str(tmp_path / "float"), progress=False)
    lowbit.quantize_(model, lowbit.WeightOnly(bits=4, group_size=32))
    lowbit.save(model, tmp_path / "q", tokenizer=tok)
    shutil.rmtree(tmp_path / "float")  # the checkpoint's float source is gone
    code, stdout, err = run_cli(capsys, "report", str(tmp_path / "q"), "--data", "wiki:2", "--no-speed",
                                "--quiet", "--out", str(tmp_path / "rep"))  # fmt: skip
    assert code == 0, err
    r = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert r["layers"] and r["size"]["quantized_bytes"] > 0 and r["size"]["baseline_bytes"] is None
    assert [row["model"] for row in r["quality"]["rows"]] == ["quantized"] and r["audit"] is None
    assert all(e["weight_sqnr_db"] is None for e in r["layers"])
    assert any("cannot be loaded" in m for m in r["not_measured"]) and "cannot be loaded" in stdout


def test_explicit_baseline_missing_is_exit_2(capsys, lm_checkpoint, tmp_path):
    argv = ["report", str(lm_checkpoint / "q"), "--baseline", str(tmp_path / "nope"), "--data", "wiki:2"]
    code, _, err = run_cli(capsys, *argv, "--no-speed", "--quiet", "--out", str(tmp_path / "rep"))
    assert code == 2 and err.count("\n") == 1 and "--baseline" in err
    assert not (tmp_path / "rep").exists()


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--data", "mnist:10"], "is images: the model is a language model"),
        (["--data", "wiki:0"], "bad --data"),
        (["--groups", "{tmp}/groups.csv"], "ids the data does not have"),
    ],
    ids=["data-does-not-fit", "bad-spec", "groups-unknown-ids"],
)
def test_report_bad_input(capsys, lm_checkpoint, tmp_path, extra, message):
    (tmp_path / "groups.csv").write_text("id,group\n0,a\n1,b\n99,c\n")
    argv = ["report", str(lm_checkpoint / "q"), "--no-speed", "--quiet", "--out", str(tmp_path / "rep")]
    code, _, err = run_cli(capsys, *argv, *[a.replace("{tmp}", str(tmp_path)) for a in extra])
    assert code == 2 and err.startswith("lowbit: error:") and err.count("\n") == 1, err
    assert message in err
    assert not (tmp_path / "rep").exists() and not list(tmp_path.glob(".rep*"))


def test_report_tokens_outside_the_vocabulary_do_not_fit(capsys, lm_checkpoint, tmp_path):
    from lowbit.reporting.data import EvalData, check_fits

    model = lowbit.load(lm_checkpoint / "q")
    data = EvalData("wiki:1", "causal-lm", torch.full((1, 8), 10_000), None)
    with pytest.raises(lowbit.LowbitError, match="does not fit the model"):
        check_fits(model, data)


def test_report_existing_folder_refused(capsys, lm_checkpoint, tmp_path):
    (tmp_path / "rep").mkdir()
    (tmp_path / "rep" / "mine.txt").write_text("keep")
    code, _, err = run_cli(capsys, "report", str(lm_checkpoint / "q"), "--out", str(tmp_path / "rep"))
    assert code == 2 and "already exists" in err
    assert _files(tmp_path / "rep") == ["mine.txt"]


def test_report_float_model_needs_scheme(capsys, lm_checkpoint, tmp_path):
    code, _, err = run_cli(capsys, "report", str(lm_checkpoint / "float"), "--out", str(tmp_path / "r"))
    assert code == 2 and "no quantized layer" in err


def test_debug_names_the_broken_layer(capsys, lm_checkpoint, tmp_path):
    model = lowbit.load(lm_checkpoint / "q")
    with torch.no_grad():
        model.get_submodule("model.layers.1.mlp.up_proj").scale[5] *= 100
    model.lowbit_source = str(lm_checkpoint / "float")
    tok = lowbit.models.load(str(lm_checkpoint / "float"), progress=False)[1]
    lowbit.save(model, tmp_path / "broken", tokenizer=tok)
    argv = ["debug", str(tmp_path / "broken"), "--data", "wiki:2", "--quiet", "--threshold", "10"]
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err  # 4-bit g32 layers of this random model: 18-23 dB; the broken one far below
    assert "first layer below 10 dB: model.layers.1.mlp.up_proj" in out
    code, out, _ = run_cli(capsys, "debug", str(lm_checkpoint / "q"), "--data", "wiki:2", "--quiet",
                           "--threshold", "5")  # fmt: skip
    assert code == 0 and "no layer below 5 dB" in out


def test_group_by_unknown_is_exit_2(capsys, lm_checkpoint, tmp_path):
    argv = ["report", str(lm_checkpoint / "q"), "--group-by", "photo", "--data", "wiki:2", "--no-speed"]
    code, _, err = run_cli(capsys, *argv, "--quiet", "--out", str(tmp_path / "rep"))
    assert code == 2 and "--group-by 'photo': wiki:2 has the groupings article" in err


def test_rank_agreement_sums_to_spearman():
    from scipy.stats import spearmanr

    from lowbit.reporting.data import EvalData
    from lowbit.reporting.measure import _rank_agreement

    g = torch.Generator().manual_seed(0)
    human = torch.randperm(50, generator=g).double().tolist()
    pairs = [(f"a{i}", f"b{i}", h) for i, h in enumerate(human)]
    cos = torch.rand(50, generator=g, dtype=torch.float64)
    s = _rank_agreement(cos, EvalData("simlex:50", "embeddings", pairs, None))
    assert float(s.mean()) + 1 == pytest.approx(spearmanr(cos.numpy(), human).statistic)


@pytest.mark.slow
def test_report_sentence_encoder_simlex(capsys, tmp_path):
    """The bundled MiniLM, dynamic W8A8: Spearman with intervals, audit by SimLex part of speech."""
    code, _, err = run_cli(capsys, "quantize", "--model", "minilm-l6", "--scheme", "w8a8", "--out",
                           str(tmp_path / "q"), "--quiet")  # fmt: skip
    assert code == 0, err
    code, out, err = run_cli(capsys, "report", str(tmp_path / "q"), "--data", "simlex:300", "--no-speed",
                             "--quiet", "--out", str(tmp_path / "rep"))  # fmt: skip
    assert code == 0, err
    r = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert r["model"]["kind"] == "embeddings" and r["quality"]["samples"] == 300
    base, quant = (row["value"] for row in r["quality"]["rows"])
    assert 0.3 < base < 0.6 and abs(quant - base) < 0.05  # measured 0.45 / 0.45 on all 999 pairs
    assert r["audit"]["grouping"] == "part of speech"
    assert {g["group"] for g in r["audit"]["groups"]} == {"adjective", "noun"}  # the first 300 pairs
    code, _, err = run_cli(
        capsys, "report", str(tmp_path / "q"), "--data", "wiki:2", "--out", str(tmp_path / "r2")
    )
    assert code == 2 and "for language models" in err
