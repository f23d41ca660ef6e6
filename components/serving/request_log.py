"""JSONL log of answered requests, and its reading as A/B candidates.

One line per request: ts, query_id (the request id), user_id, variant (A | B), version, k, beam,
exclude_history, items [{rank, item_id, sid, score}, plus "text" when the request asked for it].
`read_request_log` turns it into the frame `flows/candidates_flow.py` writes to candidates.parquet
(query_id, variant, rank, item_id, score, sid), plus version, so live traffic is analysed like offline candidates.
"""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from components.retrieval.retrieve import CANDIDATE_COLUMNS

if TYPE_CHECKING:
    from components.serving.engine import Answer

class RequestLog:
    """Appends whole lines under a lock, flushed per batch (a crash loses at most the batch being written)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def write(self, answers: list[Answer]) -> None:
        if not answers:
            return
        ts = time.time()
        lines = "".join(json.dumps({"ts": ts, "query_id": a.request_id, "user_id": a.user_id, "variant": a.variant,
                                    "version": a.version, "k": a.k, "beam": a.beam,
                                    "exclude_history": a.exclude_history, "items": a.items}) + "\n"
                        for a in answers)
        with self._lock, self.path.open("a", encoding="utf-8") as fh:
            fh.write(lines)


def read_request_log(path: str | Path) -> pd.DataFrame:
    """The log as candidate rows: CANDIDATE_COLUMNS + version, one row per returned item."""
    rows = []
    with Path(path).open(encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            rows.extend({"query_id": rec["query_id"], "variant": rec["variant"], "rank": it["rank"],
                         "item_id": it["item_id"], "score": it["score"], "sid": it["sid"], "version": rec["version"]}
                        for it in rec["items"])
    frame = pd.DataFrame(rows, columns=[*CANDIDATE_COLUMNS, "version"])
    return frame.astype({"query_id": str, "variant": str, "rank": "int64", "item_id": str, "score": "float64",
                         "sid": str, "version": str})
