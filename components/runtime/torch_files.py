"""Load torch checkpoints safely: weights-only, and every failure a DataError naming the file.

A truncated or empty file otherwise surfaces as a bare EOFError or a zip-reader RuntimeError,
and a file that carries a pickled program as a long UnpicklingError traceback.
"""
from __future__ import annotations

import pickle
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from components.runtime.errors import DataError


def load_weights(path: str | Path, keys: Iterable[str] = (), rerun: str = "the step that writes it") -> Any:
    """torch.load(weights_only=True) on CPU; DataError when the file is unreadable, holds more
    than tensors and plain containers, or lacks one of `keys`. The caller checks existence
    (its FileNotFoundError says which step to run)."""
    path = Path(path)
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise DataError(path, f"refused: it holds more than tensors and plain containers ({_unpickler_reason(exc)}), "
                              f"so it was not written by this project or was altered; run {rerun} again") from None
    except Exception as exc:  # EOFError, RuntimeError (zip reader), OSError ...: a truncated or corrupt file
        raise DataError(path, f"unreadable checkpoint, truncated or corrupt ({type(exc).__name__}: "
                              f"{str(exc)[:120]}); run {rerun} again") from None
    missing = [k for k in keys if not isinstance(blob, dict) or k not in blob]
    if missing:
        raise DataError(path, f"not a checkpoint of this project: no {missing} entry; run {rerun} again")
    return blob


def _unpickler_reason(exc: Exception) -> str:
    """The weights-only unpickler's own reason, without torch's advice to load with weights_only=False."""
    reason = str(exc)
    for marker in ("trusted source.", "WeightsUnpickler error:"):
        reason = reason.split(marker, 1)[-1]
    return " ".join(reason.split("Check the documentation", 1)[0].split())[:160] or type(exc).__name__
