"""Scalar rules of the data contract: what an id and an integer may be, whatever the file type.

Parquet and JSONL keep their types, so the same id can arrive as "7", 7, 7.0 or 7.5; these
rules say which are the same id and which are refused, so an error blames the right row.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1
EXACT_FLOAT = 2 ** 53  # floats beyond this are not exact integers any more


def is_null(value: Any) -> bool:
    """None, NaN or pd.NA (never raises on a list, unlike pd.isna)."""
    return value is None or value is pd.NA or (isinstance(value, (float, np.floating)) and math.isnan(value))


def id_string(value: Any) -> str | None:
    """An id as its string: str as is, an integer as its digits; None for null.

    A whole float (7.0) is read as the integer: pandas widens an integer column holding a
    null to float. Any other float (7.5, inf), a boolean or a container is a ValueError.
    """
    if is_null(value):
        return None
    if isinstance(value, str):
        return str(value)
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"an id is a string or an integer, not the boolean {value!r}")
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        if math.isfinite(value) and float(value).is_integer() and abs(value) <= EXACT_FLOAT:
            return str(int(value))
        raise ValueError(f"an id is a string or an integer, not the float {float(value)!r}")
    raise ValueError(f"an id is a string or an integer, not {type(value).__name__} {_short(value)}")


def int_value(value: Any) -> int | None:
    """An integer that fits int64 from an int, a whole finite float or a numeric string; else None."""
    if isinstance(value, (bool, np.bool_)) or is_null(value):
        return None
    if isinstance(value, str):
        text = value.strip()
        try:
            value = int(text)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                return None
    if isinstance(value, (float, np.floating)):
        if not (math.isfinite(value) and float(value).is_integer()):
            return None
        value = int(value)
    if not isinstance(value, (int, np.integer)):
        return None
    value = int(value)
    return value if INT64_MIN <= value <= INT64_MAX else None


def _short(value: Any, width: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."
