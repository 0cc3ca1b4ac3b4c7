"""EleutherAI's lm-eval harness on lowbit models: the ``lowbit`` model adapter and local tasks.

Command line (``python -m lowbit.harness`` takes exactly ``lm_eval``'s arguments)::

    python -m lowbit.harness --model lowbit --model_args path=out/w4g128,max_length=2048 --tasks lowbit_wiki
    python -m lowbit.harness --model lowbit --model_args path=smollm2-135m,max_length=512 \\
        --tasks lowbit_wiki --limit 4 --batch_size 4
    python -m lowbit.harness --model lowbit --model_args path=out/w4g128 --tasks lowbit_mc \\
        --metadata jsonl=questions.jsonl
    python -m lowbit.harness ls tasks                 # lm_eval's own tasks and the bundled ones

lm_eval 0.4.13 finds models only in its own registry: it reads no plugin entry points, so ``lm_eval
--model lowbit`` cannot find lowbit by itself. ``python -m lowbit.harness`` registers ``LowbitLM`` under
``lowbit`` through lm_eval's public ``register_model`` and runs lm_eval's own console entry
(``lm_eval.__main__.cli_evaluate``) with the same arguments, adding ``--include_path`` the bundled task
folder (``TASKS_DIR``) unless the arguments name one. lm_eval takes one ``--include_path``: with your own
folder, copy the bundled YAML files into it (they name their functions by module, so they work from
anywhere) or name them by file, ``--tasks mytask,DIR/lowbit_wiki.yaml`` with DIR printed by
``python -c 'import lowbit.harness as h; print(h.TASKS_DIR)'``. A ``LowbitError`` (bad ``path``, a model
without a tokenizer, a bad JSONL line) ends the run with one line on stderr and exit code 2.

``model_args``: ``path`` (required: a lowbit checkpoint folder, a bundled name such as ``smollm2-135m``,
a Hugging Face folder or a ``.gguf`` file; see ``lowbit.workflows.load_any``), ``max_length`` (tokens per
forward pass; default the model's maximum positions: SmolLM2's 8192 costs 1.6 GB of logits per row, so
``max_length=512`` or ``2048`` suits a CPU), ``verify`` (``False`` skips a checkpoint's sha256
checks). Batch size: ``--batch_size N`` (lm_eval passes it to every model; ``auto`` is not supported).
``--device``: lm_eval's default ``cuda:0`` runs on the CPU where CUDA is absent. Threads: torch's default.

Bundled tasks (``harness_tasks/``), offline, over data lowbit already ships:

- ``lowbit_wiki``: ``loglikelihood_rolling`` (word_perplexity, byte_perplexity, bits_per_byte) over the
  held-out Wikipedia articles of ``lowbit.data.wiki`` (gensim's test dump; ~25 documents, the text that
  ``lowbit eval --task wiki-ppl`` cuts its windows from), one document per article, as lm_eval's
  ``wikitext`` task scores Wikipedia.
- ``lowbit_mc``: multiple choice (acc, acc_norm) over your JSONL file, one question per line:
  ``{"question": "...", "choices": ["...", "..."], "answer": 1}`` (``answer``: the index of the right
  choice, or its text); the prompt is ``"{question}\\nAnswer:"`` and each choice is scored after a space.
  The file comes from lm_eval's ``--metadata jsonl=FILE``.

Your own tasks: lm_eval YAML files in a folder of yours, ``--include_path DIR``; data must be local (the
machine may be offline): ``dataset_path: json`` with ``dataset_kwargs: {data_files: {test: FILE}}``, or
``custom_dataset: !function your_module.function`` returning ``{"test": datasets.Dataset}``.

Python::

    import lm_eval
    from lowbit.harness import LowbitLM, task_manager

    results = lm_eval.simple_evaluate(model=LowbitLM(path="out/w4g128", batch_size=4),
                                      tasks=["lowbit_wiki"], task_manager=task_manager(), limit=4)

``register()`` makes ``simple_evaluate(model="lowbit", model_args="path=...")`` work as well.

``LowbitLM`` scores like lm_eval's ``HFLM``: a continuation is scored after its context in one forward
pass (left-truncated to ``max_length + 1`` tokens), log-probabilities in float32 summed in float64;
``loglikelihood_rolling`` cuts a document into lm_eval's disjoint rolling windows of ``max_length`` tokens,
so every token is predicted once (the first from the end-of-text token) from the tokens before it in its
window, and a window's first prediction sees the last token of the window before;
``generate_until`` decodes greedily, ``max_gen_toks`` tokens at most (default 256), and stops at the first
``until`` string or end-of-text (sampling settings are ignored, with a warning); a batch of one context
runs through ``lowbit.decode`` (static KV cache, one-call or compiled step) where the architecture allows.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import torch
from torch.nn import functional as F
from transformers import StoppingCriteria

from lowbit.core.errors import LowbitError

try:
    from lm_eval.api.model import TemplateLM
except ImportError as e:
    raise ImportError("lowbit.harness needs EleutherAI's lm-eval: pip install 'lowbit[lmeval]'") from e

MODEL_NAME = "lowbit"
TASKS_DIR = Path(__file__).resolve().with_name("harness_tasks")
MAX_GEN_TOKS = 256
_log = logging.getLogger(__name__)


def _positive(name: str, value) -> int:
    """``value`` (an int, or digits as lm_eval's command line passes them) as a positive int."""
    text = str(value).strip()
    if isinstance(value, bool) or not text.isdigit() or int(text) < 1:
        raise LowbitError(f"--model lowbit: {name} must be a positive integer, got {value!r}")
    return int(text)


def _max_positions(model) -> int:
    """The longest input ``model`` takes (its config's positions; 2048 where it names none, as HFLM)."""
    config = getattr(model, "config", None)
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        if isinstance(getattr(config, attr, None), int):
            return getattr(config, attr)
    return 2048


def _device(device: str | None) -> torch.device:
    """Where to run: the CPU unless ``device`` names an available accelerator (lm_eval's command line
    always passes one, ``cuda:0`` by default)."""
    if device is None:
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        _log.info("--device %s: no CUDA device here; running on the CPU", device)
        return torch.device("cpu")
    return dev


class LowbitLM(TemplateLM):
    """lm_eval's ``LM`` over any model reference lowbit loads (module docstring)."""

    def __init__(self, path=None, batch_size=1, max_length=None, device=None, verify=True, **unknown):
        super().__init__()
        unknown.pop("max_batch_size", None)  # lm_eval passes it to every model; used with batch_size auto
        if unknown:
            raise LowbitError(
                f"--model lowbit: unknown model_args {', '.join(sorted(unknown))}; "
                "accepted: path, max_length, verify (and lm_eval's batch_size, device)"
            )
        if path is None or not str(path).strip():
            raise LowbitError(
                "--model lowbit needs model_args path=MODEL: a lowbit checkpoint folder, a bundled name "
                "(smollm2-135m), a Hugging Face folder or a .gguf file"
            )
        from lowbit.workflows import load_any

        self.batch_size = _positive("batch_size", batch_size)
        length = None if max_length is None else _positive("max_length", max_length)
        model, tokenizer = load_any(str(path), progress=False, verify=str(verify).lower() != "false")
        if tokenizer is None or getattr(tokenizer, "eos_token_id", None) is None:
            raise LowbitError(f"--model lowbit: {path} has no tokenizer with an end-of-text token")
        self._device = _device(device)
        self.model = model.to(self._device).eval()
        self.tokenizer = tokenizer
        self.max_length = length or _max_positions(model)
        self.path = str(path)
        self._warned = False
        self._decoder = None  # lowbit.decode.Decoder for one-context batches, False where it cannot run

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "") or self.path

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Token ids of ``string``, without special tokens unless asked for (as lowbit's evaluation)."""
        return self.tokenizer(string, add_special_tokens=bool(add_special_tokens), verbose=False)["input_ids"]

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def _batches(self, keys: list) -> list[list[int]]:
        """Request indices in batches of ``batch_size``, longest first (equal ``keys[i][0]`` together)."""
        order = sorted(range(len(keys)), key=lambda i: keys[i])
        batches, step = [], self.batch_size
        for i in order:
            if batches and len(batches[-1]) < step and keys[batches[-1][0]][0] == keys[i][0]:
                batches[-1].append(i)
            else:
                batches.append([i])
        return batches

    def _loglikelihood_tokens(
        self, requests, disable_tqdm: bool = False, **kwargs
    ) -> list[tuple[float, bool]]:
        """(log-likelihood, greedy) of each ``(strings, context ids, continuation ids)`` request."""
        from tqdm import tqdm

        pairs = [(list(ctx), list(cont)) for _, ctx, cont in requests]
        for ctx, cont in pairs:
            if not ctx or not cont or len(cont) > self.max_length:
                raise LowbitError(
                    f"--model lowbit: a request has {len(ctx)} context and {len(cont)} continuation tokens; "
                    f"need at least one of each and at most max_length={self.max_length} to score"
                )
        out: list = [None] * len(pairs)
        batches = self._batches([(0, -len(c) - len(t)) for c, t in pairs])
        for batch in tqdm(batches, desc="lowbit loglikelihood", disable=disable_tqdm):
            for i, result in zip(batch, self._score([pairs[i] for i in batch]), strict=True):
                out[i] = result
        return out

    @torch.inference_mode()
    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """One forward pass over right-padded rows: (summed log-prob, greedy) of each continuation."""
        inputs = [(ctx + cont)[-(self.max_length + 1) :][:-1] for ctx, cont in pairs]
        ids = torch.full((len(inputs), max(map(len, inputs))), self.eot_token_id, dtype=torch.long)
        for row, inp in zip(ids, inputs, strict=True):
            row[: len(inp)] = torch.tensor(inp)
        logits = self.model(ids.to(self._device), use_cache=False).logits
        out = []
        for row, inp, (_, cont) in zip(logits, inputs, pairs, strict=True):
            piece = row[len(inp) - len(cont) : len(inp)].float()
            target = torch.tensor(cont, device=piece.device)
            logp = F.log_softmax(piece, dim=-1).gather(1, target[:, None])[:, 0]
            out.append((logp.double().sum().item(), bool((piece.argmax(-1) == target).all())))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole document over lm_eval's disjoint rolling windows (as HFLM)."""
        from lm_eval import utils

        windows, owner = [], []
        for n, (text,) in enumerate(req.args for req in requests):
            rolling = utils.get_rolling_token_windows(
                self.tok_encode(text), self.prefix_token_id, self.max_length, 1
            )
            for ctx, cont in map(utils.make_disjoint_window, rolling):
                windows.append(((text, ""), ctx, cont))
                owner.append(n)
        totals = [0.0] * len(requests)
        for n, (ll, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm), strict=True):
            totals[n] += ll
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuation of each context, cut before the first ``until`` string."""
        from tqdm import tqdm

        settings = [self._gen_settings(kwargs) for _, kwargs in (req.args for req in requests)]
        contexts = [self.tok_encode(ctx) for ctx, _ in (req.args for req in requests)]
        keys = [(json.dumps(s), -len(c)) for s, c in zip(settings, contexts, strict=True)]
        out: list = [None] * len(requests)
        for batch in tqdm(self._batches(keys), desc="lowbit generate_until", disable=disable_tqdm):
            until, max_new = settings[batch[0]]
            if len(batch) == 1 and self._fast() is not None:
                texts = [self._greedy_fast(contexts[batch[0]], until, max_new)]
            else:
                texts = self._greedy([contexts[i] for i in batch], until, max_new)
            for i, text in zip(batch, texts, strict=True):
                out[i] = text
        return out

    def _gen_settings(self, kwargs: dict | None) -> tuple[list[str], int]:
        """(stop strings, max new tokens) of one request's ``gen_kwargs``."""
        kwargs = dict(kwargs or {})
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        eos = self.tok_decode([self.eot_token_id]) or self.tokenizer.eos_token
        max_new = _positive("max_gen_toks", kwargs.pop("max_gen_toks", MAX_GEN_TOKS))
        if max_new >= self.max_length:
            raise LowbitError(
                f"--model lowbit: max_gen_toks {max_new} leaves no room in max_length {self.max_length}"
            )
        if (kwargs.get("do_sample") or (kwargs.get("temperature") or 0) > 0) and not self._warned:
            self._warned = True
            _log.warning("lowbit generates greedily; the task's sampling settings %s are ignored", kwargs)
        return [*until, *([eos] if eos and eos not in until else [])], max_new

    def _fast(self):
        """The fast decode path for this model (built on first use), or None: not on the CPU, or an
        architecture ``lowbit.decode`` does not know."""
        if self._decoder is None:
            from lowbit.decode import Decoder, Unsupported

            try:
                ok = self._device.type == "cpu"
                self._decoder = Decoder(self.model, cache_len=min(self.max_length, 1024)) if ok else False
            except Unsupported:
                self._decoder = False
        return self._decoder or None

    def _greedy_fast(self, context: list[int], until: list[str], max_new: int) -> str:
        """``_greedy`` of one context through ``lowbit.decode`` (same tokens; stops at a stop string)."""
        dec = self._decoder
        ids = torch.tensor([context[-(self.max_length - max_new) :] or [self.eot_token_id]])
        tok, new = int(dec.prefill(ids).argmax()), []
        for i in range(max_new):
            new.append(tok)
            text = self.tok_decode(new)
            if tok == self.eot_token_id or any(u and u in text for u in until) or i == max_new - 1:
                break
            tok = int(dec.step(torch.tensor([[tok]])).argmax())
        return _cut(self.tok_decode(new), until)

    @torch.inference_mode()
    def _greedy(self, contexts: list[list[int]], until: list[str], max_new: int) -> list[str]:
        """Greedy decoding of left-padded ``contexts`` (each left-truncated to leave ``max_new`` tokens)."""
        contexts = [c[-(self.max_length - max_new) :] or [self.eot_token_id] for c in contexts]
        width = max(map(len, contexts))
        ids = torch.full((len(contexts), width), self.eot_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, m, c in zip(ids, mask, contexts, strict=True):
            row[width - len(c) :], m[width - len(c) :] = torch.tensor(c), 1
        new = self.model.generate(
            input_ids=ids.to(self._device),
            attention_mask=mask.to(self._device),
            max_new_tokens=max_new,
            do_sample=False,
            pad_token_id=self.eot_token_id,
            eos_token_id=self.eot_token_id,
            stopping_criteria=[_StopStrings(self.tok_decode, until, width)],
        )[:, width:]
        texts = [self.tok_decode(row.tolist()) for row in new]
        return [_cut(text, until) for text in texts]


class _StopStrings(StoppingCriteria):
    """Done rows of a generation: those whose text after ``width`` prompt columns holds a stop string
    (transformers' ``stop_strings`` needs a tokenizer whose vocabulary it can invert; HFLM decodes too)."""

    def __init__(self, decode, until: list[str], width: int):
        self.decode, self.until, self.width = decode, [u for u in until if u], width

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        done = [any(u in self.decode(row[self.width :].tolist()) for u in self.until) for row in input_ids]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def _cut(text: str, until: list[str]) -> str:
    """``text`` up to the first occurrence of any of ``until``."""
    for stop in until:
        text = text.split(stop)[0] if stop else text
    return text


def wiki_dataset(**_metadata) -> dict:
    """``custom_dataset`` of task ``lowbit_wiki``: ``{"test": one document per held-out article}``. lm_eval
    calls it with the task metadata (``--metadata``, and on its command line the ``model_args``): unused."""
    from datasets import Dataset

    from lowbit.data import eval_articles

    return {"test": Dataset.from_list([{"text": article} for article in eval_articles()])}


def jsonl_dataset(jsonl: str | None = None, **_metadata) -> dict:
    """``custom_dataset`` of task ``lowbit_mc``: ``{"test": the questions of JSONL file jsonl}`` (module
    docstring), ``answer`` as the index of the right choice; ``LowbitError`` naming a bad line."""
    from datasets import Dataset

    from lowbit.data.user import jsonl_lines

    if not jsonl:
        raise LowbitError("task lowbit_mc reads your questions: pass --metadata jsonl=FILE.jsonl")
    return {"test": Dataset.from_list([_mc_row(obj, where) for where, obj in jsonl_lines(Path(jsonl))])}


def _mc_row(obj: object, where: str) -> dict:
    """One JSONL question, checked: ``{"question", "choices", "answer" (index)}``."""
    obj = obj if isinstance(obj, dict) else {}
    question, choices, answer = obj.get("question"), obj.get("choices"), obj.get("answer")
    if not isinstance(question, str) or not isinstance(choices, list) or len(choices) < 2:
        raise LowbitError(f"{where}: needs a string 'question' and a list 'choices' of at least 2 strings")
    if not all(isinstance(c, str) for c in choices):
        raise LowbitError(f"{where}: every choice must be a string")
    if isinstance(answer, str) and answer in choices:
        answer = choices.index(answer)
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise LowbitError(f"{where}: 'answer' must be a choice's index (0-{len(choices) - 1}) or its text")
    return {"question": question, "choices": choices, "answer": answer}


def register() -> None:
    """Make ``lowbit`` a model name of lm_eval's registry (its public ``register_model``); idempotent."""
    import lm_eval.models  # noqa: F401  lm_eval's own names first: it imports them only into an empty registry
    from lm_eval.api.registry import model_registry, register_model

    if MODEL_NAME not in model_registry:
        register_model(MODEL_NAME)(LowbitLM)


def task_manager(*include_paths, metadata: dict | None = None, include_defaults: bool = True):
    """lm_eval's ``TaskManager`` with the bundled tasks and your ``include_paths``; ``metadata`` reaches
    every task (``lowbit_mc``: ``{"jsonl": FILE}``); ``include_defaults=False`` leaves out lm_eval's own
    tasks (indexing them takes ~12 s)."""
    from lm_eval.tasks import TaskManager

    paths = [str(TASKS_DIR), *map(str, include_paths)]
    return TaskManager(include_path=paths, include_defaults=include_defaults, metadata=metadata)


def _with_tasks(argv: list[str]) -> list[str]:
    """``argv`` plus ``--include_path TASKS_DIR`` unless it names an include path or asks only for help."""
    named = any(a == "--include_path" or a.startswith("--include_path=") for a in argv)
    if named or not argv or argv[0] in ("-h", "--help"):
        return argv
    return [*argv, "--include_path", str(TASKS_DIR)]


def main(argv: list[str] | None = None) -> int:
    """``python -m lowbit.harness ARGS``: lm_eval's command line with ``--model lowbit`` (module docstring).
    0 on success; 2 with one line on stderr for a ``LowbitError``."""
    from lm_eval.__main__ import cli_evaluate

    argv = _with_tasks(list(sys.argv[1:] if argv is None else argv))
    register()
    saved, sys.argv = sys.argv, ["lm-eval", *argv]
    try:
        cli_evaluate()
    except LowbitError as e:
        print(f"lowbit: error: {e}", file=sys.stderr)
        return 2
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    from lowbit import harness  # the importable module, not __main__: one LowbitLM class per process

    sys.exit(harness.main())
