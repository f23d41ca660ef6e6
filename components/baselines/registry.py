"""Baselines by registration: each baseline declares itself once, with `register_baseline(Baseline(...))`;
the evaluation's rows, the params schema's choices (`eval.baselines`), the comparison's baseline run
keys and results files, and the docs table read the registrations (docs/EXTENDING.md).

The built-in ones are registered at the end of this module, in the order of their rows. A runner is a
callable or a 'module:function' reference, imported when the baseline runs, so that checking params
(which imports this module) does not import torch, Lightning or cornac.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from components.runtime import extensions

if TYPE_CHECKING:
    import pandas as pd

KIND = "baseline"
SKIPPED = "does not apply to this catalog"   # a skipped row's reason when its registration gives none


@dataclass(frozen=True)
class Baseline:
    """One baseline (`eval.baselines: [<name>, ...]`).

    runner(params, data, k) -> the ranked frame (query_id, rank, item_id, score) of the test queries in
    `data` (components.evaluation.evaluate.EvalInputs), `k` items each, or None when the baseline does not
    apply to the data (it logs why; the comparison keeps its row, without values, noted "skipped: <skipped>";
    skipped: that reason in a few words, default SKIPPED). label: its row name in results,
    reports and the comparison (default: the name). reads: the `eval.*` keys only this baseline reads
    (its section, its settings): part of its comparison run key, left out of every other run's.
    seeded: trained with the run's seed, so the comparison runs it once per seed (else once).
    check(params): ConfigError for settings it cannot run with (before any step runs; a callable or a
    reference). section: its own settings block `eval.<name>` (a model made with
    components.runtime.config_schema.section), checked with the rest of params, required while the baseline
    is in eval.baselines; its name joins `reads`. reads_retriever: the `retriever.*` keys of the generative
    ranking (flows.compare.GENERATIVE_RANKING_KEYS, e.g. `fusion`) it reads too, kept in its run key so a
    change there reruns it. doc: the docs table's description."""

    name: str
    runner: Callable[[dict, Any, int], pd.DataFrame | None] | str
    label: str = ""
    reads: tuple[str, ...] = ()
    reads_retriever: tuple[str, ...] = ()
    seeded: bool = False
    check: Callable[[dict], Any] | str | None = None
    section: Any = None
    doc: str = ""
    skipped: str = ""

    def __post_init__(self) -> None:
        if self.section is not None and self.name not in self.reads:
            object.__setattr__(self, "reads", (*self.reads, self.name))

    @property
    def row(self) -> str:
        """The row name in results, reports and the comparison."""
        return self.label or self.name

    @property
    def skipped_note(self) -> str:
        """What the comparison's tables say in the row of a run that returned None."""
        return f"skipped: {self.skipped or SKIPPED}"

    def run(self, params: dict, data: Any, k: int) -> pd.DataFrame | None:
        return extensions.resolve(self.runner)(params, data, k)

    def check_params(self, params: dict) -> None:
        if self.check is not None:
            extensions.resolve(self.check)(params)


def register_baseline(baseline: Baseline) -> Baseline:
    """Make `baseline` a choice of eval.baselines, a row of the evaluation and of the comparison."""
    extensions.register(KIND, baseline.name, baseline)
    return baseline


def unregister_baseline(name: str) -> None:
    """Drop a registration (one made for a while, e.g. by a test)."""
    extensions.unregister(KIND, name)


def baselines() -> dict[str, Baseline]:
    """Every registered baseline by name, the built-in ones first."""
    return {name: extensions.entry(KIND, name) for name in extensions.names(KIND)}


def baseline_names() -> tuple[str, ...]:
    """The registered baselines' names, in the order of their rows."""
    return extensions.names(KIND)


def get_baseline(name: str) -> Baseline:
    """The registration of `name` (KeyError for an unknown one: the params check rejects it before)."""
    return extensions.entry(KIND, name)


def baseline_label(name: str) -> str:
    """The row name of a baseline key in results, reports and the comparison."""
    return get_baseline(name).row


def baselines_table() -> str:
    """The markdown table of docs/EXTENDING.md, from the registrations."""
    rows = ["| baseline | row | reads (eval.*) | per seed | what |", "|---|---|---|---|---|"]
    rows += [f"| `{b.name}` | {b.row} | {', '.join(f'`{r}`' for r in b.reads) or '-'} | "
             f"{'yes' if b.seeded else 'no'} | {b.doc} |" for b in baselines().values()]
    return "\n".join(rows)


# ---- the built-in baselines, in the order of their rows ------------------------------------------
register_baseline(Baseline("bm25", "components.baselines.classic:run_bm25", reads=("bm25_history",),
                           doc="BM25 over item text (history queries: their last items' text)"))
register_baseline(Baseline("dense", "components.baselines.classic:run_dense", reads=("dense_history",),
                           doc="cosine over the frozen text embeddings"))
register_baseline(Baseline("popular", "components.baselines.classic:run_popular",
                           doc="the most popular training items"))
register_baseline(Baseline("two_tower", "components.baselines.two_tower:run_two_tower", reads=("two_tower",),
                           seeded=True, doc="a trained two-tower model on the retriever's query encoder"))
register_baseline(Baseline("sasrec", "components.baselines.sasrec:run_sasrec_ids", label="SASRec",
                           reads=("sasrec",), seeded=True, skipped="no histories, SASRec needs sequences",
                           doc="SASRec (cornac) on item ids"))
register_baseline(Baseline("sasrec_text", "components.baselines.sasrec:run_sasrec_text", label="SASRec + text",
                           reads=("sasrec",), seeded=True, skipped="no histories, SASRec needs sequences",
                           doc="SASRec with the items' text embeddings"))
register_baseline(Baseline("sasrec_text_fusion", "components.baselines.sasrec_fusion:run_sasrec_text_fusion",
                           label="SASRec + text + fusion", reads=("sasrec", "bm25_history", "dense_history"),
                           reads_retriever=("fusion",), skipped="no histories, SASRec needs sequences",
                           seeded=True, doc="SASRec + text fused with dense and BM25 (RRF weights chosen on validation)"))
