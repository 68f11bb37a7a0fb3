"""Atomic file writes: every file a user asks for (images, videos, JSON reports,
checkpoints, sample shards, the decision cache) is written under a temporary name in
the same folder and renamed into place, so a crash or a kill never leaves a partial
file under the name a later step reads. Nothing here imports the rest of the package."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

__all__ = ["atomic_path", "save_figure", "write_atomic"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "", fsync: bool = False) -> Iterator[str]:
    """Yields a temporary path next to `path`; when the block ends without an exception
    the temporary file is renamed to `path` (os.replace, atomic on one filesystem),
    otherwise it is removed. `suffix` keeps an extension that a writer keys on (e.g.
    ".png" for matplotlib, ".mp4" for ffmpeg); `fsync` flushes the data to disk before
    the rename (for files another process reads after a crash, e.g. shards)."""
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}{suffix}"
    try:
        yield tmp
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_atomic(path: str | os.PathLike, data: bytes | str, fsync: bool = False) -> None:
    """Writes `data` (bytes, or str as UTF-8) to `path` through atomic_path."""
    if isinstance(data, str):
        data = data.encode()
    with atomic_path(path, fsync=fsync) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def save_figure(fig, path: str | os.PathLike, dpi: int = 110) -> str:
    """fig.savefig (a matplotlib figure) to `path` through atomic_path, keeping the
    extension that tells matplotlib the format; returns the path."""
    path = os.fspath(path)
    with atomic_path(path, suffix=os.path.splitext(path)[1]) as tmp:
        fig.savefig(tmp, dpi=dpi)
    return path
