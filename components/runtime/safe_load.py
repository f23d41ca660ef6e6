"""Load the steps' .npy matrices and parquet tables safely: no pickles, and every damaged file a DataError naming it.

np.load on a truncated file, an object array or a file that is not .npy at all raises a bare
ValueError / EOFError; and a header that claims a huge shape makes it allocate that much before
it finds the data missing. The file is memory-mapped first (allow_pickle=False), so its size is
checked against its header before anything is read, then copied into memory.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from components.runtime.errors import DataError


def load_matrix(path: str | Path, rerun: str = "the embed step") -> np.ndarray:
    """A 2-D numeric .npy file as float32 (a copy in memory). FileNotFoundError when missing (the
    caller's message says which step to run); DataError when the file is truncated, corrupt,
    holds Python objects or non-numbers, or is not 2-D."""
    path = Path(path)
    try:
        mapped = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise
    except (ValueError, EOFError, OSError) as exc:
        raise DataError(path, f"not a readable numeric .npy array: {_reason(exc)}; run {rerun} again") from None
    if not isinstance(mapped, np.ndarray):   # an .npz archive: np.load gives an NpzFile
        mapped.close()
        raise DataError(path, f"not a .npy array (an .npz archive); run {rerun} again")
    if mapped.dtype.kind not in "iuf":
        raise DataError(path, f"holds {mapped.dtype} values, not real numbers; run {rerun} again")
    if mapped.ndim != 2:
        raise DataError(path, f"must be a 2-D matrix (rows x dimensions), has shape {mapped.shape}; run {rerun} again")
    return np.array(mapped, dtype=np.float32)


def _reason(exc: BaseException) -> str:
    """numpy's reason, in the words a user can act on."""
    text = str(exc)
    if "Python objects" in text or "Object arrays" in text:
        return "it holds Python objects (refused: they would be unpickled)"
    if "pickled" in text:
        return "it is not a .npy file (a pickle or other data; refused)"
    if "mmap length" in text or "EOF" in text or isinstance(exc, EOFError) or "empty file" in text:
        return "truncated (the file is shorter than its header says)"
    return f"corrupt ({type(exc).__name__}: {text[:120]})"


def read_frame(path: str | Path, columns: list[str] | None = None, rerun: str = "the step that writes it") -> pd.DataFrame:
    """A parquet file the steps wrote, read with pandas; a truncated or corrupt one (or one that lacks
    a column asked for) is a DataError naming it, where pyarrow's own error names neither the file
    nor what to do. FileNotFoundError passes through: its caller says which step to run."""
    path = Path(path)
    try:
        return pd.read_parquet(path, columns=columns)
    except FileNotFoundError:
        raise
    except (pa.ArrowException, OSError, ValueError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise DataError(path, f"not a readable parquet table ({reason}); run {rerun} again") from None
