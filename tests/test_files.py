"""core/files.py: the one atomic-write helper."""

from __future__ import annotations

import os

import pytest

from ipadapter.core.files import atomic_write, publish


def test_atomic_write_replaces_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "out.json"
    assert atomic_write(path, lambda tmp: tmp.write_text("one")) == path
    atomic_write(path, lambda tmp: tmp.write_text("two"))
    assert path.read_text() == "two"
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.json"]


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    path = tmp_path / "out.bin"
    path.write_text("old")

    def half(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(path, half)
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_atomic_write_gives_the_usual_permissions(tmp_path):
    path = atomic_write(tmp_path / "a.txt", lambda tmp: tmp.write_text("x"), durable=True)
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_publish_renames_a_folder(tmp_path):
    tmp = tmp_path / ".step.tmp"
    tmp.mkdir()
    (tmp / "state.pt").write_text("s")
    publish(tmp, tmp_path / "step")
    assert (tmp_path / "step" / "state.pt").read_text() == "s" and not tmp.exists()
