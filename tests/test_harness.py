"""lowbit.harness: lm_eval's model adapter on a tiny Llama with a real (word-level) tokenizer, the bundled
local tasks end to end, bad input; the CLI wrapper and SmolLM2 against lowbit's own perplexity (slow)."""

import json
import math
import re

import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from lowbit.core.errors import LowbitError  # noqa: E402
from lowbit.harness import TASKS_DIR, LowbitLM, _with_tasks, main, register, task_manager  # noqa: E402
from support import tiny_llama  # noqa: E402

WORDS = ["</s>", "[UNK]", "the", "a", "cat", "dog", "sat", "on", "mat", "hello", "world", "yes", "no", "."]
QUESTIONS = [
    {"question": "the cat sat on the", "choices": ["mat", "dog"], "answer": 0},
    {"question": "hello", "choices": ["world", "cat", "no"], "answer": "world"},
    {"question": "a dog", "choices": ["sat", "yes"], "answer": 1},
]


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()  # words joined by spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="</s>")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("harness")
    tiny_llama(vocab=16).save_pretrained(root / "tiny")
    _tokenizer().save_pretrained(root / "tiny")
    (root / "q.jsonl").write_text("\n".join(json.dumps(q) for q in QUESTIONS) + "\n\n")
    return root


@pytest.fixture(scope="module")
def lm(folder):
    return LowbitLM(path=str(folder / "tiny"), batch_size=3, max_length=16)


def _req(kind, *args):
    return Instance(kind, {}, args, 0)


def _logprob(model, ids: list[int], start: int) -> float:
    """Summed log-probability of ``ids[start:]`` given what precedes each, from one forward pass."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    return sum(logp[t - 1, ids[t]].item() for t in range(start, len(ids)))


def test_loglikelihood_is_the_models_logprob(lm):
    tok = lm.tokenizer
    pairs = [("the cat", " sat on the mat"), ("hello", " world"), ("", "a dog sat")]
    got = lm.loglikelihood([_req("loglikelihood", *p) for p in pairs])
    for (ctx, cont), (ll, _) in zip(pairs, got, strict=True):
        ids = tok(ctx + cont)["input_ids"]
        start = len(tok(ctx)["input_ids"])
        if not ctx:  # an empty context is the end-of-text token (lm_eval's rule)
            ids, start = [tok.eos_token_id, *ids], 1
        assert ll == pytest.approx(_logprob(lm.model, ids, start), abs=1e-5)


def test_greedy_flag(lm):
    ids = lm.tokenizer("the cat sat")["input_ids"]
    with torch.no_grad():
        best = lm.model(torch.tensor([ids])).logits[0, -1].argmax().item()
    other = (best + 3) % len(WORDS) or 2
    got = lm.loglikelihood([_req("loglikelihood", "the cat sat", " " + WORDS[w]) for w in (best, other)])
    assert [g for _, g in got] == [True, False]


def test_rolling_is_the_sum_over_windows(lm):
    text = " ".join(["the cat sat on the mat", "a dog sat on a mat", "hello world"] * 3)
    ids = lm.tokenizer(text)["input_ids"]
    n, width = len(ids), lm.max_length
    assert n > 2 * width and n % width  # several windows and a short last one
    full, want = [lm.eot_token_id, *ids], 0.0
    for start in range(0, n, width):  # window: predict ids[start:end], from up to `width` tokens before
        end = min(start + width, n)
        window = full[max(0, end - width) : end + 1]
        want += _logprob(lm.model, window, len(window) - (end - start))
    (got,) = lm.loglikelihood_rolling([_req("loglikelihood_rolling", text)])
    assert got == pytest.approx(want, abs=1e-4)


def test_generate_until_stops_at_the_stop_string(lm, monkeypatch):
    dec = lm._fast()  # one request: the fast decode path
    assert dec is not None
    calls, step = [], dec.step
    monkeypatch.setattr(dec, "step", lambda tok: calls.append(1) or step(tok))
    (free,) = lm.generate_until([_req("generate_until", "the cat", {"max_gen_toks": 6})])
    first = free.split()[0]
    calls.clear()
    (cut,) = lm.generate_until([_req("generate_until", "the cat", {"until": [first], "max_gen_toks": 6})])
    assert len(free.split()) == 6 and cut == free[: free.index(first)]
    assert not calls  # stopped after the first token (the prompt's), not cut after six


def test_generate_in_a_batch_as_alone(lm):
    reqs = [_req("generate_until", ctx, {"max_gen_toks": 4}) for ctx in ("a dog sat on the", "hello", "the")]
    batched = lm.generate_until(reqs)
    lm.batch_size = 1
    try:
        alone = lm.generate_until(reqs)
    finally:
        lm.batch_size = 3
    assert batched == alone


def test_simple_evaluate_bundled_tasks(folder):
    import lm_eval

    from lowbit.data import eval_articles

    lm = LowbitLM(path=str(folder / "tiny"), batch_size=32, max_length=64)
    tm = task_manager(metadata={"jsonl": str(folder / "q.jsonl")}, include_defaults=False)
    out = lm_eval.simple_evaluate(model=lm, tasks=["lowbit_wiki", "lowbit_mc"], task_manager=tm, limit=2)
    wiki, mc = out["results"]["lowbit_wiki"], out["results"]["lowbit_mc"]
    docs = eval_articles()[:2]
    ll = lm.loglikelihood_rolling([_req("loglikelihood_rolling", d) for d in docs])
    words = sum(len(re.split(r"\s+", d)) for d in docs)
    assert wiki["word_perplexity,none"] == pytest.approx(math.exp(-sum(ll) / words), rel=1e-9)
    right = 0
    for q, answer in zip(QUESTIONS[:2], (0, 0), strict=True):  # the second answer is given by its text
        prompt = q["question"] + "\nAnswer:"
        got = lm.loglikelihood([_req("loglikelihood", prompt, " " + c) for c in q["choices"]])
        scores = [ll for ll, _ in got]
        right += scores.index(max(scores)) == answer
    assert mc["acc,none"] == right / 2


def test_register_keeps_lm_evals_models():
    from lm_eval.api.registry import get_model

    register()
    register()  # idempotent
    assert get_model("lowbit") is LowbitLM
    assert get_model("dummy").__name__ == "DummyLM"


def test_include_path_added_unless_named():
    assert _with_tasks(["--model", "lowbit"]) == ["--model", "lowbit", "--include_path", str(TASKS_DIR)]
    assert _with_tasks(["ls", "tasks"])[-1] == str(TASKS_DIR)
    for argv in (["--tasks", "x", "--include_path", "mine"], ["--include_path=mine"], ["--help"], []):
        assert _with_tasks(argv) == argv


@pytest.mark.parametrize(
    "args, message",
    [
        ({}, "needs model_args path=MODEL"),
        ({"path": "no-such-model"}, "unknown model 'no-such-model'"),
        ({"path": "TINY", "batch_size": "auto"}, "batch_size must be a positive integer, got 'auto'"),
        ({"path": "TINY", "pth": "x"}, "unknown model_args pth; accepted: path"),
    ],
    ids=["no-path", "not-a-model", "auto-batch", "typo"],
)
def test_bad_model_args(folder, args, message):
    args = {k: str(folder / "tiny") if v == "TINY" else v for k, v in args.items()}
    with pytest.raises(LowbitError, match=re.escape(message)):
        LowbitLM(**args)


@pytest.mark.parametrize(
    "line, message",
    [
        ("{nope", "line 1: not JSON"),
        ('{"question": "q", "choices": ["a"], "answer": 0}', "at least 2 strings"),
        ('{"question": "q", "choices": ["a", "b"], "answer": 2}', "'answer' must be a choice's index (0-1)"),
        ('{"question": "q", "choices": ["a", "b"], "answer": "c"}', "or its text"),
    ],
    ids=["json", "one-choice", "index", "text"],
)
def test_bad_jsonl(tmp_path, line, message):
    from lowbit.harness import jsonl_dataset

    (tmp_path / "q.jsonl").write_text(line + "\n")
    with pytest.raises(LowbitError, match=re.escape(message)):
        jsonl_dataset(jsonl=str(tmp_path / "q.jsonl"))
    with pytest.raises(LowbitError, match="pass --metadata jsonl=FILE"):
        jsonl_dataset(path="model-args reach custom_dataset too")


@pytest.mark.slow
def test_cli_runs_lm_evals_command_line(folder, capsys):
    argv = ["--model", "lowbit", "--model_args", f"path={folder / 'tiny'},max_length=16", "--tasks",
            "lowbit_mc", "--metadata", f"jsonl={folder / 'q.jsonl'}", "--batch_size", "2"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "lowbit_mc" in out and "acc" in out and "batch_size: 2" in out


@pytest.mark.slow
def test_cli_bad_path_exit_2(capsys):
    assert main(["--model", "lowbit", "--model_args", "path=no-such-model", "--tasks", "lowbit_wiki"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("lowbit: error: unknown model 'no-such-model'")


@pytest.mark.slow
def test_smollm2_scores_lowbits_windows_as_lowbit_eval():
    """The adapter's scoring of lowbit's own wiki-ppl windows gives lowbit's perplexity (same windows)."""
    from lowbit.data import eval_tokens
    from lowbit.eval.perplexity import perplexity

    lm = LowbitLM(path="smollm2-135m", batch_size=2, max_length=512)
    tokens = eval_tokens(lm.tokenizer, 1024)
    windows = tokens.view(2, 512).tolist()
    got = lm._loglikelihood_tokens([(("", ""), w[:1], w[1:]) for w in windows], disable_tqdm=True)
    ppl = math.exp(-sum(ll for ll, _ in got) / (2 * 511))
    # Measured 1.2e-4 (25.6442 vs 25.6410): lowbit's window_nll takes float32 cross_entropy over the
    # (batch, vocab, window) layout, 0.065 nats per window from float64 log-softmax; the adapter's row-wise
    # float32 log_softmax is 0.004 nats from it.
    assert ppl == pytest.approx(perplexity(lm.model, tokens, window=512), rel=3e-4)
