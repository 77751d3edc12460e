"""Safe file writes: atomic replacement, modes from the umask (not tempfile's 0600/0700), errors."""

from __future__ import annotations

import errno
import json
import os
import stat

import pytest

from sgalm_jax import fileio


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_umask_is_read_without_changing_it(umask_027):
    assert fileio.current_umask() == 0o027
    assert os.umask(0o027) == 0o027  # unchanged by the read


def test_atomic_write_replaces_and_takes_the_umask_mode(tmp_path, umask_027):
    path = tmp_path / "config.json"
    path.write_text("old")
    path.chmod(0o600)
    fileio.atomic_write_json(path, {"a": 1}, indent=2)
    assert json.loads(path.read_text()) == {"a": 1}
    assert _mode(path) == 0o640  # 0666 & ~027, not mkstemp's 0600
    assert os.listdir(tmp_path) == ["config.json"]  # no temporary left behind


def test_atomic_write_failure_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "meta.json"
    path.write_text("complete")

    def full_disk(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError):
        fileio.atomic_write(path, "half")
    assert path.read_text() == "complete"
    assert os.listdir(tmp_path) == ["meta.json"]
    with pytest.raises(IsADirectoryError):
        fileio.atomic_write(tmp_path, "x")


def test_temp_dir_and_tree_modes_follow_the_umask(tmp_path, umask_027):
    d = fileio.make_temp_dir(tmp_path, ".export-")
    assert _mode(d) == 0o750  # not mkdtemp's 0700
    f = os.path.join(d, "model.safetensors")
    with open(f, "w") as fh:
        fh.write("x")
    os.chmod(f, 0o600)  # what safetensors leaves
    fileio.apply_umask(d)
    assert _mode(f) == 0o640 and _mode(d) == 0o750


def test_os_errors_are_described_with_their_path():
    e = OSError(errno.ENOSPC, "No space left on device", "/runs/x/metrics.jsonl")
    assert fileio.describe_os_error(e) == "/runs/x/metrics.jsonl: no space left on the device"
    e = OSError(errno.EROFS, "Read-only file system", "/ro/run.lock")
    assert fileio.describe_os_error(e) == "/ro/run.lock: read-only file system"
    e = OSError(errno.EISDIR, "Is a directory", "/a.tmp", None, "/a")
    assert fileio.describe_os_error(e) == "/a.tmp -> /a: is a folder, not a file"
