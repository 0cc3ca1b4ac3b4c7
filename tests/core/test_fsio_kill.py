"""kill -9 during ``lowbit.save``: the target holds the old or the new checkpoint, complete (or, for a fresh
save, nothing), and the next start on it leaves no debris.

One long-lived server process imports torch once and forks a writer per save; the test SIGKILLs the writer
at seeded random moments spread over a measured save.
"""

import contextlib
import hashlib
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from lowbit.core import fsio

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork and SIGKILL")

SERVER = r"""
import errno, os, sys, time, traceback
import torch
from torch import nn
import lowbit
from lowbit.core import fsio

torch.set_num_threads(1)


def model(version):  # 6 MB of fp32 weights
    torch.manual_seed(version)
    return nn.Sequential(nn.Linear(1024, 1024), nn.Linear(1024, 512))


def unsupported(a, b):
    raise OSError(errno.EINVAL, "exchange unsupported here")


models = {v: model(v) for v in (1, 2)}
print("ready", flush=True)
for line in sys.stdin:
    target, version, fallback = line.rstrip("\n").split("\t")
    pid = os.fork()
    if pid == 0:
        try:
            if fallback == "1":
                fsio._exchange = unsupported
            os.write(1, f"go {os.getpid()}\n".encode())  # one write: a kill cannot cut the line
            t0 = time.perf_counter()
            lowbit.save(models[int(version)], target, overwrite=True)
            os.write(1, f"took {time.perf_counter() - t0:.6f}\n".encode())
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    print(f"exit {os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])}", flush=True)
"""


class Server:
    def __init__(self, folder: Path):
        script = folder / "server.py"
        script.write_text(SERVER)
        self.proc = subprocess.Popen(
            [sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )
        assert self._line() == ["ready"]

    def _line(self) -> list[str]:
        line = self.proc.stdout.readline()
        assert line, f"server died (rc {self.proc.poll()})"
        return line.split()

    def save(self, target: Path, version: int, fallback: bool = False, kill_after: float | None = None):
        """Save model ``version`` to ``target`` in a forked writer; SIGKILL it ``kill_after`` s after it
        starts. Returns how long the save took, or None if it was killed first."""
        self.proc.stdin.write(f"{target}\t{version}\t{int(fallback)}\n")
        self.proc.stdin.flush()
        kind, pid = self._line()
        assert kind == "go"
        if kill_after is not None:
            time.sleep(kill_after)
            with contextlib.suppress(ProcessLookupError):  # done already
                os.kill(int(pid), signal.SIGKILL)
        took = None
        while (words := self._line())[0] != "exit":
            took = float(words[1])
        # a kill may land after the writer reported its finished save but before it exited
        allowed = {"0"} if kill_after is None else {"-9"} if took is None else {"0", "-9"}
        assert words[1] in allowed, "writer failed"
        return took

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _state(target: Path, versions: dict[str, dict]) -> str:
    if not os.path.lexists(target):
        return "absent"
    got = _hashes(target)
    return next((name for name, h in versions.items() if got == h), f"damaged {sorted(got)}")


# what a killed save may leave at the target; fallback: no RENAME_EXCHANGE, two renames, then ``recover``
CASES = {"fresh": {"absent", "new"}, "overwrite": {"old", "new"}, "fallback": {"old", "new"}}


def test_kill_9_during_save_leaves_old_or_new_and_no_debris(tmp_path):
    """Each kill lands at a seeded random fraction of 1.5x the median of the last 10 whole saves (the
    machine's speed drifts with its load); ``outcomes`` counts what the kills left."""
    server, took = Server(tmp_path), []
    try:
        versions = {}
        for name, v in (("old", 1), ("new", 2)):
            for _ in range(3):
                took.append(server.save(tmp_path / name, v))
            versions[name] = _hashes(tmp_path / name)
        assert versions["old"] != versions["new"]
        rng, outcomes = random.Random(0), Counter()
        for i, case in enumerate([case for case in CASES for _ in range(20)]):
            target = tmp_path / f"{case}{i}" / "ckpt"
            if case != "fresh":
                took.append(server.save(target, 1))
            delay = rng.uniform(0, 1.5) * statistics.median(took[-10:])
            finished = server.save(target, 2, fallback=case == "fallback", kill_after=delay)
            if case == "fallback":
                fsio.recover(target)  # what the next start on the target does first
            state = _state(target, versions)
            outcomes[case, state, "finished" if finished else "killed"] += 1
            assert state in CASES[case], f"{case} kill {i}: target is {state}"
            took.append(server.save(target, 1))  # the next run on it removes the dead writer's debris
            assert os.listdir(target.parent) == ["ckpt"], f"{case} kill {i}: debris left"
            assert _state(target, versions) == "old"
        median_ms = statistics.median(took) * 1e3
        print(f"save: median {median_ms:.0f} ms; outcomes", dict(sorted(outcomes.items())))
    finally:
        server.close()
