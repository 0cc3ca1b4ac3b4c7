"""Distributed block pipeline (``lowbit.transforms.comm``): 2 gloo ranks give the 1-rank checkpoint,
in memory and streamed; a killed rank is named and its staged run resumes; bad launches are refused.

The ranks are processes started with torchrun's environment (``dist_worker.launch``), one thread each.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lowbit.cli.main import main
from lowbit.core.errors import LowbitError
from lowbit.transforms.comm import SOLO, Comm, first_difference, torchrun_comm
from support import tiny_llama

sys.path.insert(0, str(Path(__file__).parent))
import dist_worker  # noqa: E402

METHODS = dist_worker.METHODS


def _check(results, ok=True):
    for r, res in enumerate(results):
        assert (res.returncode == 0) == ok, f"rank {r}: rc {res.returncode}\n{res.stderr[-3000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(src folder, 1-rank outputs, 2-rank outputs, 2-rank stdout) for every method."""
    root = tmp_path_factory.mktemp("dist")
    tiny_llama().save_pretrained(root / "src")
    _check(dist_worker.launch(1, "run", root / "src", root / "one"))
    two = dist_worker.launch(2, "run", root / "src", root / "two")
    _check(two)
    return root / "src", root / "one", root / "two", two[0].stdout


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def _assert_same(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    assert [k for k in ta if not torch.equal(ta[k], tb[k])] == []


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["mem-{}-r0", "mem-{}-r1", "stream-{}"])
def test_two_ranks_give_the_one_rank_checkpoint(runs, method, kind):
    """Bit-identical for every method: RTN needs no data; AWQ's sampled rows and SmoothQuant's maxima
    combine exactly; GPTQ's Hessians are summed in rank order (not the 1-rank order), which on this
    model still gives identical codes and scales (on real models some codes move:
    benchmarks/results/distributed_gptq.md). Rank 1 ends with rank 0's model (in memory)."""
    _, one, two, _ = runs
    _assert_same(one / kind.format(method).replace("-r1", "-r0"), two / kind.format(method))


def test_two_ranks_report_their_collective_volume(runs):
    volume = eval(runs[3].split("volume", 1)[1])  # the worker prints comm.volume()
    assert set(volume) == {"broadcast", "sum_to", "cat_all", "max_all"}  # gptq, awq, smoothquant
    assert all(v > 0 for v in volume.values())


def test_killed_rank_is_named_and_the_staged_run_resumes(runs, tmp_path):
    src, one, _, _ = runs
    killed = dist_worker.launch(2, "kill", src, tmp_path, "gptq")
    assert killed[1].returncode == -9
    assert killed[0].returncode == 2
    err = killed[0].stderr
    assert "rank 1 (pid" in err and "stopped" in err and "run the same command again" in err
    stage = tmp_path / ".stream-gptq.lowbit-partial"
    names = sorted(p.name for p in stage.iterdir())
    assert "block-00000.safetensors" in names and "hidden-00001.rank1.safetensors" in names
    assert not (tmp_path / "stream-gptq").exists()
    _check(dist_worker.launch(2, "run", src, tmp_path, "gptq"))
    _assert_same(one / "stream-gptq", tmp_path / "stream-gptq")
    assert not stage.exists()


def test_ranks_started_with_other_configs_are_refused(runs, tmp_path):
    res = dist_worker.launch(2, "mismatch", runs[0], tmp_path, "gptq")
    _check(res, ok=False)
    for r in res:
        assert "config.group_size is 8 on rank 1 but 16 on rank 0" in r.stderr
    assert list(tmp_path.iterdir()) == []  # refused before any work


def test_ranks_started_with_other_weights_are_refused(runs, tmp_path):
    res = dist_worker.launch(2, "othermodel", runs[0], tmp_path, "rtn")
    _check(res, ok=False)
    for r in res:
        assert "model.model.layers.1.mlp.up_proj.weight[2] is " in r.stderr and "on rank 1 but" in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_more_ranks_than_calibration_forwards_is_refused(runs, tmp_path):
    res = dist_worker.launch(2, "few", runs[0], tmp_path, "gptq")
    _check(res, ok=False)
    assert all("2 ranks but only 1 calibration forward" in r.stderr for r in res)


def test_cli_distributed_outside_torchrun(monkeypatch, tmp_path, capsys):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    args = ["quantize", "--model", str(tmp_path), "--scheme", "w4g16", "--out", str(tmp_path / "o")]
    assert main([*args, "--distributed"]) == 2
    err = capsys.readouterr().err
    assert "--distributed needs the environment torchrun sets" in err and "torchrun --nproc-per-node" in err
    with pytest.raises(LowbitError, match="RANK, WORLD_SIZE"):
        torchrun_comm()


def test_cli_under_torchrun_writes_once_and_matches_one_process(runs, tmp_path):
    src = runs[0]
    base = ["quantize", "--model", str(src), "--scheme", "w4g16", "--streaming", "--quiet"]
    assert main([*base, "--out", str(tmp_path / "one")]) == 0
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd = [*torchrun, "-m", "lowbit.cli", *base, "--out", str(tmp_path / "two"), "--distributed", "--json"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count('"ranks": 2') == 1  # rank 0 answers
    _assert_same(tmp_path / "one", tmp_path / "two")


def test_share_splits_forwards_contiguously_in_rank_order():
    class Three(Comm):
        world = 3

        def __init__(self, rank):
            self.rank = rank

    assert [list(Three(r).share(8)) for r in range(3)] == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert list(SOLO.share(4)) == [0, 1, 2, 3]
    with pytest.raises(LowbitError, match="3 ranks but only 2 calibration forward"):
        Three(0).share(2)
    assert Three(0).owners([10, 1, 5, 5, 1]) == [0, 1, 1, 2, 2]  # largest first, least loaded rank


def test_first_difference_names_the_path():
    a = {"config": {"bits": 4, "group_size": 16}, "calib": "ab"}
    b = {"config": {"bits": 4, "group_size": 8}, "calib": "ab"}
    assert first_difference(a, b) == ("config.group_size", "16", "8")
    assert first_difference({"m": [[1, 2], "x"]}, {"m": [[1, 3], "x"]}) == ("m[0][1]", "2", "3")


def test_static_w8a8_does_not_run_distributed():
    from lowbit import StaticW8A8, quantize_

    class Two(Comm):
        world = 2

    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(LowbitError, match="StaticW8A8 does not run distributed"):
        quantize_(model, StaticW8A8(), [torch.randn(2, 4)], comm=Two())
