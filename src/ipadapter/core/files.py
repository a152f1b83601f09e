"""Atomic writes: a reader (or a crash) never sees half a file.

    atomic_write("out.json", lambda tmp: tmp.write_text(text))        # any writer that takes a path
    atomic_write("a.safetensors", lambda tmp: save_file(tensors, str(tmp)), durable=True)

The writer fills a unique temporary name in the same folder, which is then renamed over the target
(``os.replace``: atomic on POSIX and Windows); on any error the temporary file is removed and the target is
left as it was. :func:`publish` is the rename step alone, for folders filled by several processes (training
checkpoints).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object], durable: bool = False) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it into place; returns ``path``.

    ``durable``: flush the file and its folder to disk before returning (survives a power cut, not only a crash).
    The temporary name is unique per call (several processes may write the same file), hidden, and ends in
    ``.tmp``: writers must not pick the format from the name. The writer creates the file, so it gets the
    usual permissions (umask), not a temporary file's private ones.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        write(tmp)
        if durable:
            _fsync(tmp)
        publish(tmp, path, durable)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def publish(tmp: str | os.PathLike, final: str | os.PathLike, durable: bool = True) -> None:
    """Rename a finished file or folder ``tmp`` to ``final`` (same file system), flushing the folder."""
    os.replace(tmp, final)
    if durable:
        _fsync(Path(final).parent)


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on folders
        pass
    finally:
        os.close(fd)
