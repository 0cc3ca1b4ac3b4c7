"""atomic_dir / atomic_write_*: one atomic swap (or a recoverable fallback), dead writers' debris removed,
live writers' kept, only replaceable folders replaced, never the working folder, umask modes."""

import ctypes
import errno
import os
import platform
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

from lowbit import LowbitError
from lowbit.core import fsio

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2 is Linux-only")


def _folder(path: Path, text: str) -> Path:
    path.mkdir(parents=True)
    (path / "w").write_text(text)
    return path


def _entries(parent: Path) -> list[str]:
    return sorted(os.listdir(parent))


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _no_exchange(monkeypatch):
    def unsupported(a, b):
        raise OSError(errno.EINVAL, "exchange unsupported here")

    monkeypatch.setattr(fsio, "_exchange", unsupported)


@linux_only
@pytest.mark.parametrize("via", ["libc", "syscall"])
def test_exchange_swaps_two_folders(tmp_path, monkeypatch, via):
    if via == "syscall":  # a libc without renameat2 (glibc < 2.28, some musl)
        if platform.machine().lower() not in fsio._SYS_RENAMEAT2:
            pytest.skip(f"no renameat2 syscall number for {platform.machine()}")
        libc = ctypes.CDLL(None, use_errno=True)
        monkeypatch.setattr(fsio, "_libc", lambda: types.SimpleNamespace(syscall=libc.syscall))
    a, b = _folder(tmp_path / "a", "A"), _folder(tmp_path / "b", "B")
    fsio._exchange(a, b)
    assert (a / "w").read_text() == "B" and (b / "w").read_text() == "A"
    with pytest.raises(FileNotFoundError):
        fsio._exchange(a, tmp_path / "missing")


@linux_only
def test_overwrite_is_one_exchange(tmp_path, monkeypatch):
    target = _folder(tmp_path / "q", "old")
    calls, real = [], fsio._exchange
    monkeypatch.setattr(fsio, "_exchange", lambda a, b: (calls.append((a, b)), real(a, b)))
    with fsio.atomic_dir(target, overwrite=True) as tmp:
        assert tmp.name.startswith(f".q.tmp-{os.getpid()}-")
        (tmp / "w").write_text("new")
    assert calls == [(tmp, target)]
    assert (target / "w").read_text() == "new" and _entries(tmp_path) == ["q"]


def test_fallback_overwrite_completes(tmp_path, monkeypatch):
    _no_exchange(monkeypatch)
    target = _folder(tmp_path / "q", "old")
    with fsio.atomic_dir(target, overwrite=True) as tmp:
        (tmp / "w").write_text("new")
    assert (target / "w").read_text() == "new" and _entries(tmp_path) == ["q"]


def test_fallback_error_between_renames_puts_old_back(tmp_path, monkeypatch):
    _no_exchange(monkeypatch)
    target = _folder(tmp_path / "q", "old")
    real, failed = os.rename, []

    def rename(src, dst):
        if Path(dst) == target and not failed:
            failed.append(dst)
            raise OSError(errno.EIO, "disk gone")
        real(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "replace", rename)
    with pytest.raises(OSError, match="disk gone"), fsio.atomic_dir(target, overwrite=True) as tmp:
        (tmp / "w").write_text("new")
    monkeypatch.undo()
    assert (target / "w").read_text() == "old" and _entries(tmp_path) == ["q"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_crash_between_fallback_renames_is_restored_by_next_start(tmp_path, monkeypatch):
    target = _folder(tmp_path / "q", "old")
    pid = os.fork()
    if pid == 0:  # the writer: dies right after moving the old copy aside
        try:
            _no_exchange(monkeypatch)
            real = os.rename

            def rename(src, dst):
                real(src, dst)
                if Path(src) == target:
                    os._exit(0)

            os.rename = os.replace = rename
            with fsio.atomic_dir(target, overwrite=True) as tmp:
                (tmp / "w").write_text("new")
        finally:
            os._exit(1)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    assert not target.exists()
    assert [n.split("-")[0] for n in _entries(tmp_path)] == [".q.old", ".q.tmp"]
    with pytest.raises(LowbitError, match="already exists"), fsio.atomic_dir(target):
        pass  # the old copy is back before anything else
    assert (target / "w").read_text() == "old" and _entries(tmp_path) == ["q"]


def test_dead_writers_debris_removed_live_kept(tmp_path):
    dead, live = _dead_pid(), os.getpid()
    stale = [
        _folder(tmp_path / f".q.tmp-{dead}-abc123", "partial"),
        _folder(tmp_path / f".q.old-{dead}-def456", "superseded"),  # target exists: not restored
        _folder(tmp_path / f".f.bin.tmp-{dead}-x_9", "partial"),
    ]
    kept = [
        _folder(tmp_path / f".q.tmp-{live}-abc123", "in progress"),
        _folder(tmp_path / ".q.tmp-notapid", "unknown writer"),
        _folder(tmp_path / f".other.tmp-{dead}-abc123", "another target"),
    ]
    (tmp_path / f".f.bin.tmp-{dead}-zz").write_bytes(b"partial")
    (tmp_path / f".f.bin.tmp-{live}-zz").write_bytes(b"in progress")
    _folder(tmp_path / "q", "old")
    with fsio.atomic_dir(tmp_path / "q", overwrite=True) as tmp:
        (tmp / "w").write_text("new")
    fsio.atomic_write_bytes(tmp_path / "f.bin", b"new")
    left = _entries(tmp_path)
    assert not any(p.name in left for p in stale) and f".f.bin.tmp-{dead}-zz" not in left
    assert all(p.name in left for p in kept) and f".f.bin.tmp-{live}-zz" in left
    assert (tmp_path / "q" / "w").read_text() == "new" and (tmp_path / "f.bin").read_bytes() == b"new"


def test_debris_older_than_its_pids_process_is_stale(tmp_path, monkeypatch):
    """A reused pid: the process that now has it started after the debris was made."""
    _folder(tmp_path / f".q.tmp-{os.getpid()}-abc", "partial")
    monkeypatch.setattr(fsio, "_start_time", lambda pid: 4e9)
    fsio.recover(tmp_path / "q")
    assert _entries(tmp_path) == []


def test_replaceable_predicate(tmp_path):
    def is_ours(p):
        return (p / "quant_config.json").is_file()

    foreign = _folder(tmp_path / "photos", "mine")
    refused = f"{foreign} exists and is not a lowbit checkpoint (nor empty); refusing to replace it"
    with pytest.raises(LowbitError, match=f"^{re.escape(refused)}$"):
        with fsio.atomic_dir(foreign, overwrite=True, replaceable=is_ours):
            pass
    assert (foreign / "w").read_text() == "mine" and _entries(tmp_path) == ["photos"]
    (foreign / "quant_config.json").write_text("{}")
    with fsio.atomic_dir(foreign, overwrite=True, replaceable=is_ours) as tmp:
        (tmp / "new").write_text("")
    assert _entries(foreign) == ["new"]


@pytest.mark.parametrize("replaceable", [None, lambda p: False], ids=["no-predicate", "refusing-predicate"])
def test_empty_folder_always_replaceable(tmp_path, replaceable):
    (tmp_path / "q").mkdir()
    with fsio.atomic_dir(tmp_path / "q", overwrite=True, replaceable=replaceable) as tmp:
        (tmp / "w").write_text("new")
    assert (tmp_path / "q" / "w").read_text() == "new"


def test_no_predicate_replaces_anything(tmp_path):
    _folder(tmp_path / "entry", "whatever")
    with fsio.atomic_dir(tmp_path / "entry", overwrite=True) as tmp:
        (tmp / "x").write_text("")
    assert _entries(tmp_path / "entry") == ["x"]


def test_refuses_working_folder_and_its_parents(tmp_path, monkeypatch):
    here = _folder(tmp_path / "a" / "b", "keep")
    (tmp_path / "file").write_text("keep")
    monkeypatch.chdir(here)
    for target in ["", ".", "./", here, tmp_path / "a", "..", "../b/..", "/", tmp_path / "file"]:
        with pytest.raises(LowbitError) as e, fsio.atomic_dir(target, overwrite=True):
            pass
        assert "\n" not in str(e.value)
    assert (here / "w").read_text() == "keep" and (tmp_path / "file").read_text() == "keep"
    assert _entries(tmp_path) == ["a", "file"] and _entries(tmp_path / "a") == ["b"]


def test_existing_target_needs_overwrite(tmp_path):
    _folder(tmp_path / "q", "old")
    with pytest.raises(LowbitError, match="already exists"), fsio.atomic_dir(tmp_path / "q"):
        pass
    with pytest.raises(LowbitError, match="already exists"):
        fsio.atomic_write_bytes(tmp_path / "q" / "w", b"", overwrite=False)
    assert (tmp_path / "q" / "w").read_text() == "old"


def test_error_in_block_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), fsio.atomic_dir(tmp_path / "q") as tmp:
        (tmp / "w").write_text("partial")
        raise RuntimeError
    assert _entries(tmp_path) == []


@pytest.fixture(params=[0o022, 0o077, 0o002], ids=["022", "077", "002"])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


@pytest.mark.skipif(os.name != "posix", reason="POSIX modes")
@pytest.mark.parametrize("exists", [False, True], ids=["fresh", "overwrite"])
def test_modes_follow_umask(tmp_path, umask, exists):
    if exists:
        _folder(tmp_path / "q", "old")
        (tmp_path / "f.json").write_text("old")
    with fsio.atomic_dir(tmp_path / "q", overwrite=True) as tmp:
        (tmp / "w").write_text("new")
        (tmp / "private").write_text("safetensors writes its files 0600")
        (tmp / "private").chmod(0o600)
        (tmp / "sub").mkdir(mode=0o700)
    fsio.atomic_write_text(tmp_path / "f.json", "{}")
    assert (tmp_path / "q").stat().st_mode & 0o7777 == 0o777 & ~umask
    assert (tmp_path / "q" / "sub").stat().st_mode & 0o7777 == 0o777 & ~umask
    for name in ("w", "private"):
        assert (tmp_path / "q" / name).stat().st_mode & 0o7777 == 0o666 & ~umask
    assert (tmp_path / "f.json").stat().st_mode & 0o7777 == 0o666 & ~umask


def test_umask_is_read_without_changing_it(umask):
    assert fsio._umask() == umask
    assert os.umask(umask) == umask
