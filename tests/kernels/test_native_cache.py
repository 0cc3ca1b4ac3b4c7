"""The compiled kernel library is only loaded from a private folder and only when its bytes match the
sha256 recorded at build time: a file planted at the expected name, a foreign or open folder, or a
digest mismatch never reaches ``dlopen``."""

import hashlib
import os
import shutil
import stat
import warnings
from pathlib import Path

import pytest

from lowbit.kernels import native

pytestmark = pytest.mark.skipif(
    shutil.which("cc") is None and not os.environ.get("CC"), reason="no C compiler"
)

VARIANT = "generic"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh ``$LOWBIT_CACHE``; ``library``'s memo is cleared before and after."""
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))
    monkeypatch.delenv("LOWBIT_NATIVE", raising=False)
    native.library.cache_clear()
    yield tmp_path / "kernels"
    native.library.cache_clear()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _sidecar(target: Path) -> Path:
    return target.with_name(target.name + ".sha256")


def _load_quietly():
    """``library(VARIANT)``, with the warnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lib = native.library(VARIANT)
    return lib, [str(w.message) for w in caught]


def _assert_loaded_from_build(lib, target: Path):
    """``lib`` is usable and was hashed from ``target``, whose sha256 is the recorded one."""
    assert lib is not None
    assert lib.lb_abi_version() == native.ABI_VERSION
    assert Path(lib.lowbit_path) == target
    recorded = _sidecar(target).read_text().strip()
    assert lib.lowbit_sha256 == recorded == _sha(target)


def test_build_records_digest_and_private_folder(cache):
    target = native.build(VARIANT)
    assert target.parent == cache
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    assert _sidecar(target).read_text().strip() == _sha(target)
    assert target.stat().st_mode & 0o022 == 0
    lib, warned = _load_quietly()
    assert warned == []
    _assert_loaded_from_build(lib, target)


@pytest.mark.parametrize("planted", ["garbage", "other-build"])
def test_planted_library_is_rebuilt_not_loaded(cache, planted):
    target = native.build(VARIANT)
    good = target.read_bytes()
    if planted == "garbage":
        bad = b"\x7fELF not really a library"
    else:  # a real, loadable library: the native variant's build under the generic name
        bad = native.build("nobf16").read_bytes()
    target.write_bytes(bad)
    lib, warned = _load_quietly()
    _assert_loaded_from_build(lib, target)
    assert target.read_bytes() != bad
    assert target.read_bytes() == good  # the same source, flags and compiler give the same bytes
    assert any("rebuilding" in w for w in warned), warned


def test_planted_library_without_sidecar_is_rebuilt(cache):
    cache.mkdir(mode=0o700)
    target = native.build(VARIANT)
    _sidecar(target).unlink()
    target.write_bytes(b"planted")
    lib, _ = _load_quietly()
    _assert_loaded_from_build(lib, target)
    assert target.read_bytes() != b"planted"


def test_sidecar_mismatch_rebuilds(cache):
    target = native.build(VARIANT)
    _sidecar(target).write_text("0" * 64 + "\n")
    lib, warned = _load_quietly()
    _assert_loaded_from_build(lib, target)
    assert any("sha256" in w for w in warned), warned


def test_load_refuses_a_mismatch(cache):
    """``load`` itself checks the digest (a file swapped in after ``build`` is never opened)."""
    target = native.build(VARIANT)
    _sidecar(target).write_text("0" * 64 + "\n")
    with pytest.raises(native.NativeUnavailable, match="sha256"):
        native.load(target)


def test_symlink_at_target_is_not_followed(cache, tmp_path):
    target = native.build(VARIANT)
    elsewhere = tmp_path / "elsewhere.so"
    shutil.copy(target, elsewhere)
    target.unlink()
    target.symlink_to(elsewhere)
    lib, _ = _load_quietly()
    _assert_loaded_from_build(lib, target)
    assert not target.is_symlink()


def test_open_folder_is_made_private(cache):
    cache.mkdir()
    os.chmod(cache, 0o777)
    target = native.build(VARIANT)
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    lib, _ = _load_quietly()
    _assert_loaded_from_build(lib, target)


def test_group_writable_library_is_rebuilt(cache):
    target = native.build(VARIANT)
    os.chmod(target, 0o777)
    lib, warned = _load_quietly()
    _assert_loaded_from_build(lib, target)
    assert target.stat().st_mode & 0o022 == 0
    assert any("writable" in w for w in warned), warned


def test_foreign_folder_is_refused(cache, monkeypatch):
    """A kernels folder owned by another user: no build, no load; the reference backend runs."""
    cache.mkdir(mode=0o700)
    someone_else = os.getuid() + 1
    monkeypatch.setattr(native.os, "getuid", lambda: someone_else)
    with pytest.raises(native.NativeUnavailable, match="owned by another user"):
        native.build(VARIANT)
    with pytest.warns(RuntimeWarning, match="owned by another user"):
        assert native.library(VARIANT) is None
    assert list(cache.iterdir()) == []
