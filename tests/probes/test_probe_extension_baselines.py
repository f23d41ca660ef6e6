"""Issue 22 parts 1 and 5 (baselines, fusion sources, group orders): each is one registration.

Before, a new baseline touched about 7 files (evaluate.py's if-chain and BASELINES, the schema's
BASELINES, flows/compare.py's SEEDED_BASELINES / BASELINE_SETTINGS / NOT_RUN_KEYS, dvc.yaml), a fusion
source about 5 (SOURCES in fusion.py and the schema, dense_side's branches) and the group orders were
mirrored the same way, with a test keeping the copies equal. Now components/baselines/registry.py and
components/retrieval/rankings.py hold the registrations; these tests register toys from this module
alone and show that the schema, the evaluation's rows, the comparison's planning, the fusion, the
ranking and the docs tables take them.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from components.baselines.registry import (
    Baseline,
    baselines_table,
    get_baseline,
    register_baseline,
    unregister_baseline,
)
from components.retrieval import retrieve  # torch: imported at collection, not inside a fast test
from components.retrieval.fusion import fusion_config
from components.retrieval.rankings import (
    FusionSource,
    GroupOrder,
    rankings_table,
    register_group_order,
    register_source,
    unregister_group_order,
    unregister_source,
)
from components.runtime.config import deep_merge, load_params
from components.runtime.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def toy_runner(params: dict, data, k: int) -> pd.DataFrame:
    """The toy baseline: the popular ranking, fetched through the public runner of `popular`."""
    assert params["eval"]["bm25_history"] >= 1   # the key it declares it reads
    return get_baseline("popular").run(params, data, k)


@pytest.fixture
def toy() -> Iterator[Baseline]:
    baseline = register_baseline(Baseline("toy", toy_runner, label="Toy (popular)", reads=("bm25_history",),
                                          seeded=True, doc="a test's toy"))
    yield baseline
    unregister_baseline("toy")


@pytest.fixture
def toy_source() -> Iterator[list]:
    calls: list = []

    def rank(dec, depth: int, options: dict):
        calls.append((dec, depth, options))
        return "ranked"

    register_source(FusionSource("toy_source", rank, doc="a test's toy source"))
    yield calls
    unregister_source("toy_source")


@pytest.fixture
def toy_order() -> Iterator[None]:
    register_group_order(GroupOrder("toy_order", lambda dec: ("q", "i"), doc="a test's toy order"))
    yield
    unregister_group_order("toy_order")


def test_a_registered_baseline_is_a_choice_of_eval_baselines(toy) -> None:
    params = load_params(ROOT / "params.yaml", ["eval.baselines=[bm25, toy]"])
    assert params["eval"]["baselines"] == ["bm25", "toy"]
    unregister_baseline("toy")
    try:
        with pytest.raises(ConfigError, match=r"'eval.baselines': must be a list from bm25 \| dense \| popular \| "
                                              r"two_tower \| sasrec \| sasrec_text \| sasrec_text_fusion, "
                                              r"got \['bm25', 'toy'\]"):
            load_params(ROOT / "params.yaml", ["eval.baselines=[bm25, toy]"])
    finally:
        register_baseline(toy)


def test_a_registration_twice_is_refused(toy) -> None:
    with pytest.raises(ValueError, match="'toy' is registered already"):
        register_baseline(Baseline("toy", toy_runner))


def test_a_registered_baseline_is_a_row_of_compare_planning(toy, monkeypatch) -> None:
    """`sa2crq compare` plans the toy once per seed (it is seeded), with its row name, and its run key holds
    the key it reads, which no variant run depends on."""
    from flows import compare_dvc

    monkeypatch.chdir(ROOT)
    overrides = ["profile=smoke", "out_dir=outputs-toy-baseline", "eval.seeds=[0,1]", "eval.baselines=[popular, toy]"]
    params = load_params("params.yaml", overrides)
    sid, plan = compare_dvc.plan_set(params, "params.yaml", overrides, [], "sa2crq compare")
    assert [(b["name"], b["seed"]) for b in plan["baselines"].values()] == [("popular", 0), ("toy", 0), ("toy", 1)]
    assert plan["baselines"][f"{sid}-toy-s1"]["file"].endswith("compare/baselines/toy-seed1.json")
    assert "bm25_history" in plan["baseline_keys"][f"{sid}-toy"]["eval"]
    assert "bm25_history" not in plan["baseline_keys"][f"{sid}-popular"]["eval"]
    from flows.compare import eval_keys

    assert "bm25_history" not in eval_keys(params)


def test_a_registered_fusion_source_is_a_choice_and_ranks_through_dense_side(toy_source) -> None:
    params = load_params(ROOT / "params.yaml", ["retriever.fusion.sources=[toy_source, bm25]"])
    assert params["retriever"]["fusion"]["sources"] == ["toy_source", "bm25"]
    auto = fusion_config(deep_merge(params, {"retriever": {"item_head": False, "fusion": {"sources": "auto"}}}))[
        "sources"]
    assert auto == ["zero_shot", "bm25", "toy_source"]              # registration order; learned needs item_head
    dec = object()
    assert retrieve.dense_side(dec, "toy_source", 7, 2) == "ranked"
    assert toy_source == [(dec, 7, {"bm25_history": 2})]


def test_an_unregistered_fusion_source_is_refused_naming_the_registered_ones() -> None:
    with pytest.raises(ConfigError, match=r"must be auto, none or a list of distinct learned \| zero_shot \| bm25, "
                                          r"got \['toy_source'\]"):
        load_params(ROOT / "params.yaml", ["retriever.fusion.sources=[toy_source]"])


def test_a_registered_group_order_orders_the_items_of_a_sid(toy_order, monkeypatch) -> None:
    assert load_params(ROOT / "params.yaml", ["eval.group_order=toy_order"])["eval"]["group_order"] == "toy_order"
    assert retrieve.group_order({"eval": {"group_order": "toy_order"}}) == "toy_order"
    seen = []
    monkeypatch.setattr(retrieve, "beam_items", lambda sid_index, scores, catalog, q, i: seen.append((q, i)))
    dec = SimpleNamespace(learned_query=None, sid_index=None, scores=None, catalog=None)
    retrieve.generated_ranking(dec, "toy_order")
    retrieve.generated_ranking(dec, "popularity")
    assert seen == [("q", "i"), (None, None)]


def test_evaluate_code_deps_cover_the_runners_a_registration_names() -> None:
    """The runners are 'module:function' strings (so checking params imports no torch): the stage deps
    follow them, so editing a baseline still makes `evaluate` stale."""
    from components.runtime.stage_deps import ImportGraph

    deps = ImportGraph(ROOT).code_deps(["step:evaluate"])
    for module in ("classic", "two_tower", "sasrec", "registry"):
        assert f"components/baselines/{module}.py" in deps
    assert "components/retrieval/rankings.py" in deps


def test_docs_tables_are_the_registrations() -> None:
    text = (ROOT / "docs" / "EXTENDING.md").read_text()
    assert baselines_table() in text
    assert rankings_table() in text


@pytest.mark.slow
def test_a_registered_baseline_runs_on_the_smoke_data_and_is_a_row_of_the_evaluation(toy, smoke_embedded) -> None:
    """evaluate_all (the evaluate step's baselines) and the comparison's compare_baseline stage give the toy
    its row, with the metrics of the ranking its runner returned (the popular one's); the comparison's
    aggregate (`sa2crq compare --variants none`) reads the stored files and makes it a row of the table."""
    from components.evaluation.evaluate import evaluate_all, load_eval_inputs
    from flows import compare

    params = deep_merge(smoke_embedded, {"eval": {"baselines": ["popular", "toy"], "bootstrap": 0,
                                                  "compare_dir": "compare-toy-baseline"}})
    results, deciles = evaluate_all(params, load_eval_inputs(params), ["popular", "toy"], generative=False)
    assert list(results) == ["popular", "Toy (popular)"]
    same = json.dumps(results["popular"], sort_keys=True)   # NaN intervals (bootstrap 0) compare as text
    assert json.dumps(results["Toy (popular)"], sort_keys=True) == same
    assert results["popular"]["overall"]["metrics"]["recall@all"]["mean"] > 0
    stored = compare.run_baseline(params, "toy", 1)
    assert json.dumps(stored, sort_keys=True) == same
    assert compare.baseline_file(params, "toy", 1).name == "toy-seed1.json"
    assert np.isfinite(deciles["Toy (popular)"].select_dtypes("number").to_numpy()).all()

    compare.run_baseline(params, "popular", 1)
    rows = compare.aggregate(params, [], [1], "sa2crq compare --variants none")
    popular, toy_label = get_baseline("popular").row, get_baseline("toy").row
    assert list(dict.fromkeys(rows.index.get_level_values("method"))) == [popular, toy_label]
    pd.testing.assert_frame_equal(rows.loc[toy_label], rows.loc[popular])
    assert rows.loc[(toy_label, "overall"), "recall@all"] == stored["overall"]["metrics"]["recall@all"]["mean"] > 0
    assert rows.loc[(toy_label, "overall"), "seeds"] == 1
    written = json.loads(compare.results_file(params).read_text())
    assert len(written["rows"]) == 2 and written["rows"][1]["name"] == toy_label   # popular's row: a display name
