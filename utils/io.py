"""Atomic file writes: a reader (or a killed writer's next run) sees the old file or the new one, never half.

Every file the project writes for later reading (checkpoints, configs, metrics, CSV rows, JSON reports, block
caches) goes through `atomic_write`: the content goes to a temporary file in the destination's directory,
which is then renamed over the destination. The temporary file gets the permissions a plain `open` would
give (0666 minus the umask; `mkstemp` alone would leave 0600), and it is removed if the write fails, e.g. on
a full disk, whose error is re-raised as `OSError` with a one-line message naming the path.
"""
from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import IO, Callable, Union

PathLike = Union[str, os.PathLike]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: PathLike, write: Callable[[IO], None], binary: bool = False) -> Path:
    """Call `write(fh)` on a temporary file beside `path`, then rename it to `path`. Returns the path.

    The parent directory must exist. A directory at `path`, a read-only location or a full disk raise
    `OSError` whose message names the path and the cause; no temporary file is left behind."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, f"cannot write {path}: it is a directory")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise type(e)(e.errno, f"cannot write {path}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8", "newline": ""})) as fh:
            write(fh)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as e:
        cause = "no space left on device" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise OSError(e.errno, f"cannot write {path}: {cause}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def atomic_write_text(path: PathLike, text: str) -> Path:
    """`atomic_write` of a string."""
    return atomic_write(path, lambda fh: fh.write(text))
