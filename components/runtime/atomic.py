"""Write outputs to a temporary path, then rename: a crash leaves no partial file.

Temporaries are named `.<name>.<8 random chars>.tmp` beside their target (is_temp_name), so
the next holder of the folder's lock (components/runtime/locks.py) can remove what a killed run left.

The OS refusing a write (a file where a folder is due, a read-only or full disk, no permission)
is a PathError: one line naming the path and what the OS said, not a traceback.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from components.runtime.errors import Sa2crqError

TEMP_SUFFIX = ".tmp"
_TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}" + re.escape(TEMP_SUFFIX) + "$")  # tempfile's 8 random chars


# errnos a write meets when the disk cannot take it, whichever call (with no file name) met them
CANNOT_TAKE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG})
HINTS = {
    errno.EEXIST: " (a file is in the way of a folder)",
    errno.ENOTDIR: " (a file is in the way of a folder)",
    errno.ENOSPC: " (free space, or set out_dir elsewhere)",
    errno.EDQUOT: " (free space, or set out_dir elsewhere)",
    errno.EROFS: " (set out_dir to a writable folder)",
    errno.EACCES: " (set out_dir to a folder you may write)",
    errno.EPERM: " (set out_dir to a folder you may write)",
}


class PathError(Sa2crqError):
    """The OS refused to create or write a path of the run: names the path and the errno's meaning."""

    def __init__(self, path: str | os.PathLike, exc: OSError, doing: str):
        self.path = str(path)
        self.errno = exc.errno
        super().__init__(f"{self.path}: cannot {doing}: {os.strerror(exc.errno)}{HINTS.get(exc.errno, '')}")


def path_error(path: str | os.PathLike, exc: OSError, doing: str) -> PathError:
    """exc as a PathError on the file the OS named, else on `path`; a temporary (or a file in one)
    is named as the `path` it stands for, since its random name means nothing to the user."""
    named = exc.filename
    return PathError(path if named is None or _in_temp(named) else named, exc, doing)


def _in_temp(name: str | bytes | int) -> bool:
    """Whether a file name the OS reported is one of this module's temporaries, or inside one."""
    return isinstance(name, str | bytes) and any(is_temp_name(part) for part in Path(os.fsdecode(name)).parts)


@contextmanager
def refused_as_path_error(path: str | os.PathLike, doing: str = "write") -> Iterator[None]:
    """Run the block; an OSError with an errno (the OS refused) becomes a PathError naming `path`.
    An OSError without one (raised by Python code, not the OS) passes unchanged."""
    try:
        yield
    except OSError as exc:
        if exc.errno is None:
            raise
        raise path_error(path, exc, doing) from exc


def _written_by_block(exc: OSError) -> bool:
    """Whether an OSError from the caller's block is about the temporary it writes (its name, or a
    full / read-only disk with no name), not about some file the block read."""
    if exc.errno is None:
        return False
    return _in_temp(exc.filename) if exc.filename is not None else exc.errno in CANNOT_TAKE


def is_temp_name(name: str) -> bool:
    """Whether a file or folder name is one of this module's temporaries."""
    return bool(_TEMP_NAME.match(name))


def fsync_dir(path: str | os.PathLike) -> None:
    """Make renames and deletions in a folder durable (they live in the folder's own entry)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike, durable: bool = False) -> Iterator[Path]:
    """Yield a temp path beside `path`; rename it onto `path` only if the block succeeds.

    durable: fsync the file and its folder, so the write survives a power cut, not only a
    killed process (journals whose order matters)."""
    path = Path(path)
    with refused_as_path_error(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
        os.close(fd)
    tmp_path = Path(tmp)
    try:
        try:
            yield tmp_path
        except OSError as exc:
            if _written_by_block(exc):
                raise path_error(path, exc, "write") from exc
            raise
        with refused_as_path_error(path):
            tmp_path.chmod(0o644)  # mkstemp makes 0600 files
            if durable:
                with open(tmp_path, "rb") as fh:
                    os.fsync(fh.fileno())
            os.replace(tmp_path, path)
            if durable:
                fsync_dir(path.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp folder beside `path`; swap it in for `path` only if the block succeeds.

    The old folder is renamed aside, not deleted in place, so `path` is never a half-deleted
    folder: a kill leaves it whole, or (between the two renames) missing until the step reruns."""
    path = Path(path)
    with refused_as_path_error(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent))
    aside = tmp.with_name(f".{path.name}.old.{tmp.name.rsplit('.', 2)[1]}{TEMP_SUFFIX}")   # a temp name too
    try:
        try:
            yield tmp
        except OSError as exc:
            if _written_by_block(exc):
                raise path_error(path, exc, "write") from exc
            raise
        with refused_as_path_error(path):
            tmp.chmod(0o755)  # mkdtemp makes 0700 folders; outputs should read like any other
            if path.exists():
                os.replace(path, aside)
            try:
                os.replace(tmp, path)
            except BaseException:
                if aside.exists():
                    os.replace(aside, path)
                raise
    finally:
        for left in (tmp, aside):
            if left.exists():
                shutil.rmtree(left)


def out_of_space(exc: BaseException) -> bool:
    """Whether a failed write ran out of disk space (or quota): ENOSPC anywhere in the chain,
    or numpy's short write ('N requested and M written'), which carries no errno."""
    while exc is not None:
        if isinstance(exc, OSError) and (exc.errno in (errno.ENOSPC, errno.EDQUOT)
                                         or re.search(r"\d+ requested and \d+ written", str(exc))):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def write_parquet(df: pd.DataFrame, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)


def write_json(obj: Any, path: str | os.PathLike, durable: bool = False) -> None:
    with atomic_path(path, durable) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=float) + "\n")


def write_npy(arr: np.ndarray, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, arr)


def write_torch(obj: Any, path: str | os.PathLike) -> None:
    """torch.save through a file handle: saved to a path, the archive inside is named after the
    (random) temp file, so identical checkpoints would differ byte for byte."""
    import torch

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
