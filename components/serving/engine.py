"""Answer a batch of checked requests: one decode per (slot, beam) group, exactly as `retrieve` ranks.

The group's queries go through `decode_with` and `ranked_items`, the functions `retrieve` itself
calls, on a version loaded once; so an answer equals `retrieve(params, queries, beam=beam)` on the
same files, cut at the request's k; with exclude_history, minus the history's own items (history.py:
the offline eval.exclude_history protocol, still k items). A request naming an item the answering
version lacks is refused alone; an error while decoding fails its group, not the worker. "fields"
adds per-item fields ("text": the item's text cut to serve.item_text_chars) after ITEM_FIELDS.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import pandas as pd
from threadpoolctl import ThreadpoolController

from components.retrieval.retrieve import decode_with, group_order, ranked_items
from components.serving.history import kept_rows, wider_beam
from components.serving.request_log import RequestLog
from components.serving.schema import Job, RequestError
from components.serving.versions import LoadedVersion, ModelSlot

ITEM_FIELDS = ("rank", "item_id", "sid", "score")


@dataclass(frozen=True)
class Answer:
    request_id: str
    user_id: str | None
    variant: str
    version: str
    k: int
    beam: int
    items: list[dict]     # ITEM_FIELDS (then the asked-for fields) of each returned item, best first
    exclude_history: bool = False


def queries_frame(jobs: list[Job]) -> pd.DataFrame:
    """Jobs as data-contract queries (the layout `candidates_flow.read_queries` gives); query_id = position."""
    return pd.DataFrame({"query_id": [str(i) for i in range(len(jobs))], "history": [list(j.history) for j in jobs],
                         "text": [j.text for j in jobs], "targets": [[] for _ in jobs],
                         "emb_row": np.full(len(jobs), -1, np.int64)})


def unknown_items(job: Job, loaded: LoadedVersion) -> RequestError | None:
    index = loaded.context.inputs.item_index
    missing = [item for item, row in zip(job.history, index.get_indexer(list(job.history))) if row < 0]
    if not missing:
        return None
    return RequestError("history", f"unknown item id(s) {missing[:5]} (not in version {loaded.version}'s catalog)")


def cut_text(text: str, chars: int) -> str:
    """At most `chars` characters; a cut text ends with an ellipsis so a reader knows it goes on."""
    return text if len(text) <= chars else text[: chars - 1] + "…"


class Engine:
    """Runs in the batcher's worker thread; one `run` per collected batch.

    numpy's BLAS (the dense rankings of the fusion) runs on retriever.num_threads threads, as torch
    does: left at one thread per core, a one-query ranking took 16 ms instead of 0.07 ms on a
    loaded 2-core machine (its threads spin against the other jobs).
    """

    def __init__(self, params: dict, slots: dict[str, ModelSlot], log: RequestLog | None, item_text_chars: int):
        self.params, self.slots, self.log, self.item_text_chars = params, slots, log, item_text_chars
        self.order = group_order(params)
        self.threads = int(params["retriever"]["num_threads"])
        self._blas = ThreadpoolController()

    def run(self, jobs: list[Job]) -> list[Answer | Exception]:
        out: list[Answer | Exception | None] = [None] * len(jobs)
        groups: dict[tuple[str, int], list[int]] = defaultdict(list)
        for pos, job in enumerate(jobs):
            groups[(job.variant, job.beam)].append(pos)
        for (variant, beam), positions in groups.items():
            loaded = self.slots[variant].current      # one version for the whole group
            if loaded is None:
                raise RuntimeError(f"version {variant} is not loaded")   # the app refuses requests before ready
            ok = []
            for pos in positions:
                out[pos] = unknown_items(jobs[pos], loaded)
                if out[pos] is None:
                    ok.append(pos)
            if not ok:
                continue
            try:
                with self._blas.limit(limits=self.threads, user_api="blas"):
                    answers = self.answer(loaded, [jobs[p] for p in ok], beam)
            except Exception as exc:                  # noqa: BLE001 - fail the group, keep the worker
                answers = [exc] * len(ok)
            for pos, answer in zip(ok, answers):
                out[pos] = answer
            if self.log is not None:
                self.log.write([a for a in answers if isinstance(a, Answer)])
        return out

    def answer(self, loaded: LoadedVersion, jobs: list[Job], beam: int) -> list[Answer]:
        answers = []
        for job, items in zip(jobs, self._items(loaded, jobs, beam, widen=True)):
            if "text" in job.fields:
                self._add_text(loaded, items)
            answers.append(Answer(job.request_id, job.user_id, job.variant, loaded.version, job.k, beam, items,
                                  job.exclude_history))
        return answers

    def _items(self, loaded: LoadedVersion, jobs: list[Job], beam: int, widen: bool) -> list[list[dict]]:
        """Each job's top k (ITEM_FIELDS), without its history when it asks: a job the exclusion left
        short is decoded once more with a wider beam (history.py)."""
        ranked = ranked_items(decode_with(self.params, loaded.context, queries_frame(jobs), beam=beam), self.order)
        # rows come query by query (query_id = the job's position), best first
        pos = ranked["query_id"].to_numpy().astype(np.int64)
        starts = np.searchsorted(pos, np.arange(len(jobs)))
        ends = np.searchsorted(pos, np.arange(len(jobs)), side="right")
        cols = [ranked[f].to_numpy() for f in ITEM_FIELDS]
        item_ids = cols[ITEM_FIELDS.index("item_id")]
        out, again = [], defaultdict(list)
        for i, (job, start, end) in enumerate(zip(jobs, starts, ends)):
            rows = np.arange(start, end)
            if job.exclude_history:
                seen = set(job.history)
                rows = start + kept_rows(item_ids[start:end], seen)
                width = wider_beam(len(rows), end - start, job.k, beam, seen)
                if widen and width is not None:
                    again[width].append(i)
            rows = rows[: job.k]
            values = [col[rows].tolist() for col in cols]
            if job.exclude_history:
                values[ITEM_FIELDS.index("rank")] = list(range(len(rows)))   # ranks closed up
            out.append([dict(zip(ITEM_FIELDS, row)) for row in zip(*values)])
        for width, wide in again.items():
            for i, items in zip(wide, self._items(loaded, [jobs[i] for i in wide], width, widen=False)):
                out[i] = items
        return out

    def _add_text(self, loaded: LoadedVersion, items: list[dict]) -> None:
        inputs = loaded.context.inputs
        rows = inputs.item_index.get_indexer([item["item_id"] for item in items])
        for item, text in zip(items, inputs.items["text"].to_numpy()[rows]):
            item["text"] = cut_text(str(text), self.item_text_chars)
