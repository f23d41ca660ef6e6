"""The evaluate step and the comparison on a tiny synthetic run (generative retriever and training faked)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from components.evaluation import evaluate as evaluate_mod
from components.evaluation.recall_curve import recall_at_k_figure
from components.evaluation.report import results_frame, write_report
from components.evaluation.results_file import catalog_name, write_results_file
from components.runtime.atomic import write_json, write_npy, write_parquet
from components.runtime.config import load_params
from components.runtime.errors import ConfigError
from components.tokenizers.sid_table import make_sid_table, write_sid_table
from flows import compare as compare_mod

ROOT = Path(__file__).resolve().parents[1]
N_ITEMS = 30
REAL_RUN_GENERATIVE = evaluate_mod.run_generative     # the fixture below replaces it with a fake


def _write_run(out: Path, seed: int = 0) -> None:
    """prepared/, embeddings/ and sids/ for 30 items and 40 history queries."""
    rng = np.random.default_rng(seed)
    pop = np.sort(rng.integers(0, 30, N_ITEMS))[::-1]
    pop[-3:] = 0
    items = pd.DataFrame({"item_id": [f"i{j:02d}" for j in range(N_ITEMS)],
                          "text": [f"item {j} word{j % 7} thing{j % 5}" for j in range(N_ITEMS)],
                          "popularity": pop, "group": ["head"] * 6 + ["tail"] * 21 + ["cold"] * 3})
    rows = []
    for q in range(40):
        split = "train" if q < 24 else "test"
        hist = [f"i{j:02d}" for j in rng.integers(0, N_ITEMS, 3)]
        rows.append((f"q{q}", split, q, hist, None, [f"i{int(rng.integers(0, N_ITEMS)):02d}"], -1))
    queries = pd.DataFrame(rows, columns=["query_id", "split", "order", "history", "text", "targets", "emb_row"])
    emb = rng.normal(size=(N_ITEMS, 8)).astype(np.float32)
    write_parquet(items, out / "prepared" / "items.parquet")
    write_parquet(queries, out / "prepared" / "queries.parquet")
    write_npy(emb / np.linalg.norm(emb, axis=1, keepdims=True), out / "embeddings" / "items.npy")
    _write_sids(out, items)


def _write_sids(out: Path, items: pd.DataFrame) -> None:
    codes = [[j % 4, j % 3] if g == "head" else [j % 4] for j, g in enumerate(items["group"])]
    write_sid_table(make_sid_table(items["item_id"], codes, "full", "v1"), out / "sids" / "sid_table.parquet")
    write_json({"method": "sa2crq", "codebook_sizes": [4, 3], "anchor_sizes": [4, 3], "max_len": 2, "version": "v1",
                "tau": 6.0}, out / "sids" / "meta.json")


def _fake_generative(params: dict, test: pd.DataFrame) -> tuple[dict, pd.DataFrame]:
    """Constrained: the target first with seed 0, nothing with other seeds; unconstrained: only hallucinated SIDs.

    Hallucination 0.25 over all beams, 0.1 over the top headline_k, 0.5 over chance."""
    rows = [(qid, 0, t[0], 1.0, "0") for qid, t in zip(test["query_id"], test["targets"])]
    ranked = pd.DataFrame(rows, columns=["query_id", "rank", "item_id", "score", "sid"])
    empty = ranked.iloc[:0]
    ranked = ranked if params["seed"] == 0 else empty
    k = int(params["eval"]["headline_k"])
    halluc = pd.DataFrame({"hallucination": 0.25, f"hallucination@{k}": 0.1, "hallucination_norm": 0.5},
                          index=pd.Index(test["query_id"].to_numpy(), name="query_id"))
    method = params["tokenizer"]["method"]
    return {method: ranked, f"{method} (unconstrained)": empty}, halluc


@pytest.fixture
def run_params(tmp_path, monkeypatch) -> dict:
    _write_run(tmp_path)
    monkeypatch.setattr(evaluate_mod, "run_generative", _fake_generative)
    overrides = ["profile=smoke", f"out_dir={tmp_path}", "eval.bootstrap=30", "eval.ks=[1,5]", "eval.deep_ks=[10]", "eval.budgets=[5, 10]",
                 "eval.headline_k=5", "data.max_history=5", "retriever.d_model=8", "retriever.n_memory=2",
                 f"eval.results_dir={tmp_path / 'results'}"]
    return load_params(ROOT / "params.yaml", overrides)


def test_results_frame_and_report_files(tmp_path):
    stat = {"mean": 0.5, "lo": 0.4, "hi": 0.6}
    results = {"m1": {"overall": {"n_queries": 3, "metrics": {"recall@5": stat}}},
               "m2": {"overall": {"n_queries": 3, "metrics": {"recall@5": {"mean": None, "lo": None, "hi": None}}}}}
    frame = results_frame(results, ["recall@5"], ["overall"])
    assert frame.loc["m1", "R@5"] == "0.5000 [0.4000, 0.6000]" and frame.loc["m2", "R@5"] == "-"
    paths = write_report(tmp_path / "report", {"dataset": "x"}, {"Main table": frame}, {})
    md, page = Path(paths["md"]).read_text(), Path(paths["html"]).read_text()
    assert "## Main table" in md and "| m1 " in md and "0.5000 [0.4000, 0.6000]" in md
    assert "<table" in page and "0.5000 [0.4000, 0.6000]" in page


def test_run_evaluate_writes_results_report_and_metrics(run_params):
    summary = evaluate_mod.run_evaluate(run_params)
    out = Path(run_params["out_dir"])
    res = json.loads((out / "eval" / "results.json").read_text())["methods"]
    assert set(res) == {"sa2crq", "sa2crq (unconstrained)", "bm25", "dense", "popular", "two_tower"}
    assert res["sa2crq"]["overall"]["metrics"]["recall@1"]["mean"] == 1.0
    assert res["sa2crq (unconstrained)"]["overall"]["metrics"]["hallucination"]["mean"] == pytest.approx(0.25)
    assert res["sa2crq (unconstrained)"]["overall"]["metrics"]["hallucination@5"]["mean"] == pytest.approx(0.1)
    assert res["popular"]["overall"]["metrics"]["ret_per"]["mean"] == 10
    head = json.loads((out / "metrics" / "eval.json").read_text())
    assert head["sa2crq"]["recall@5"] == 1.0 and "recall@5_tail" in head["bm25"]
    assert head["sa2crq_unconstrained"]["hallucination_norm"] == pytest.approx(0.5)
    assert head["sa2crq_unconstrained"]["hallucination@5"] == pytest.approx(0.1)
    md = (out / "report" / "report.md").read_text()
    for text in ("| sa2crq ", "| two_tower ", "R@5 tail", "Table 2", "eval_recall_vs_k.png", "items_per_sid.png",
                 "Hallu@5", "Hallu/chance"):
        assert text in md
    assert (out / "plots" / "eval_recall_by_decile.png").stat().st_size > 1000
    assert "data:image/png;base64," in (out / "report" / "report.html").read_text()
    assert summary["report"]["md"].endswith("report.md")


def _fake_steps(calls: list[tuple[str, str]]):
    """get_step stand-in: records (step, out_dir); assign_ids writes sids/, train_retriever a curve and model.pt."""
    def fake_step(name: str):
        def step(p: dict) -> dict:
            calls.append((name, p["out_dir"]))
            if name == "assign_ids":
                _write_sids(Path(p["out_dir"]), pd.read_parquet(Path(p["out_dir"]) / "prepared" / "items.parquet"))
            if name == "train_retriever":
                (Path(p["out_dir"]) / "plots").mkdir(parents=True, exist_ok=True)
                pd.DataFrame({"epoch": [0, 1, 2], "train_loss": [3.0, 2.0, 1.5], "val_recall@10": [0.1, 0.3, 0.2]}
                             ).to_csv(Path(p["out_dir"]) / "plots" / "retriever_curve.csv", index=False)
                (Path(p["out_dir"]) / "retriever").mkdir(parents=True, exist_ok=True)
                (Path(p["out_dir"]) / "retriever" / "model.pt").write_bytes(b"fake")
            return {}
        return step
    return fake_step


def _compare(params: dict, variants: list[dict], seeds: list[int]) -> pd.DataFrame:
    """What the comparison's DVC stages run, in one process: every run and baseline, then the aggregate."""
    for variant in variants:
        for seed in seeds:
            compare_mod.train_variant(params, variant, seed)
            compare_mod.evaluate_variant(params, variant, seed)
    for name in params["eval"]["baselines"]:
        for seed in seeds if compare_mod.seeded(name) else seeds[:1]:
            compare_mod.run_baseline(params, name, seed)
    return compare_mod.aggregate(params, variants, seeds, "sa2crq compare")


def test_compare_runs_each_variant_and_seed_then_aggregates(run_params, monkeypatch):
    calls: list[tuple[str, str]] = []
    fake_step = _fake_steps(calls)

    import components.pipeline.stages

    monkeypatch.setattr(components.pipeline.stages, "get_step", fake_step)
    params = dict(run_params, eval={**run_params["eval"], "baselines": ["popular"]})
    variants = [{"name": "A one", "params": {"tokenizer": {"method": "rqkmeans"}}}, {"name": "B", "params": {}}]
    table = _compare(params, variants, [0, 1])
    assert len(calls) == 2 * 2 * len(compare_mod.TRAIN_STEPS)
    assert {Path(d).parent.name for _, d in calls} == {"a_one", "b"}
    row = table.loc[("A one", "overall")]
    assert row["recall@1"] == pytest.approx(0.5) and row["recall@1 std"] == pytest.approx(np.sqrt(0.5))
    assert row["seeds"] == 2
    assert row["hallucination"] == pytest.approx(0.25)
    assert row["hallucination@5"] == pytest.approx(0.1) and row["hallucination_norm"] == pytest.approx(0.5)
    assert pd.isna(table.loc[("popular", "overall"), "hallucination_norm"])
    assert ("popular", "tail") in table.index
    md = (Path(params["out_dir"]) / "compare" / "results.md").read_text()
    assert "Table 1" in md and "A one" in md and "Table 2" in md and "0.5000 ± 0.7071" in md
    head = compare_mod.headline_table(table, 5)
    assert list(head.index) == ["A one", "B", "popular"]
    assert head.loc["A one", "Hallu"] == "0.2500 ± 0.0000" and head.loc["popular", "Hallu"] == "-"
    assert head.loc["A one", "Hallu@5"] == "0.1000 ± 0.0000"
    assert head.loc["A one", "Hallu/chance"] == "0.5000 ± 0.0000"
    assert head.loc["popular", "Hallu/chance"] == "-"
    assert "## Headline: Recall@5 by target group" in md
    # results/<dataset>.json: the headline rows with mean and std over seeds, named as the issue asks
    doc = json.loads((Path(params["eval"]["results_dir"]) / f"{params['dataset']}.json").read_text())
    assert doc["dataset"] == params["dataset"] and doc["seeds"] == [0, 1] and doc["command"] == "sa2crq compare"
    assert "catalog" not in doc and "note" not in doc["rows"][0]     # built-in: the file as before issue 26
    rows = {r["name"]: r for r in doc["rows"]}
    assert list(rows) == ["A one", "B", "most popular"]
    assert rows["A one"]["hallucination"]["mean"] == pytest.approx(0.25)
    assert rows["most popular"]["hallucination"] is None                  # not a generative row
    assert rows["A one"]["hallucination@5"] == {"mean": pytest.approx(0.1), "std": 0.0}
    assert rows["A one"]["hallucination_norm"]["mean"] == pytest.approx(0.5)
    assert rows["most popular"]["hallucination@5"] is None and rows["most popular"]["hallucination_norm"] is None
    assert rows["A one"]["R@5"]["mean"] == pytest.approx(table.loc[("A one", "overall"), "recall@5"])
    assert rows["A one"]["R@5"]["std"] == pytest.approx(table.loc[("A one", "overall"), "recall@5 std"])
    assert {"R@5_head", "R@5_tail", "R@5_cold", "NDCG@5"} <= set(rows["B"])
    curves = pd.read_csv(Path(params["out_dir"]) / "compare" / "curves.csv")    # 2 variants x 2 seeds x 3 epochs
    assert len(curves) == 12 and set(curves["variant"]) == {"A one", "B"} and set(curves["seed"]) == {0, 1}
    assert (Path(params["out_dir"]) / "compare" / "curves.png").stat().st_size > 1000
    assert (Path(params["eval"]["results_dir"]) / f"{params['dataset']}-curves.png").exists()
    # the aggregate reads what the runs stored, nothing else: again over the same files, the same file
    before = (Path(params["eval"]["results_dir"]) / f"{params['dataset']}.json").read_bytes()
    monkeypatch.setattr(compare_mod, "evaluate_all", lambda *a, **k: pytest.fail("the aggregate evaluated"))
    compare_mod.aggregate(params, variants, [0, 1], "sa2crq compare")
    assert (Path(params["eval"]["results_dir"]) / f"{params['dataset']}.json").read_bytes() == before
    # a run that is not there is named, not skipped
    (Path(compare_mod.variant_params(params, variants[1], 1)["out_dir"]) / "eval" / "compare_run.json").unlink()
    with pytest.raises(FileNotFoundError, match="b/seed1/eval/compare_run.json: missing"):
        compare_mod.aggregate(params, variants, [0, 1], "sa2crq compare")


def test_a_baseline_that_does_not_apply_keeps_its_row_in_every_table(run_params, monkeypatch, tmp_path):
    """Issue 26: SASRec on a catalog without validation histories returns None; its row stays, in its place,
    with no values and the reason, in results.md, summary.csv / .json and the results file; the Recall@K
    figure leaves it out, and a comparison of nothing but skipped rows stops with one line."""
    import components.pipeline.stages

    monkeypatch.setattr(components.pipeline.stages, "get_step", _fake_steps([]))
    params = dict(run_params, eval={**run_params["eval"], "baselines": ["sasrec", "popular"]})
    table = _compare(params, [{"name": "A", "params": {}}], [0])
    note = "skipped: no histories, SASRec needs sequences"
    assert list(dict.fromkeys(table.index.get_level_values(0))) == ["A", "SASRec", "popular"]
    assert list(table.loc["SASRec"].index) == ["overall"] and table.loc[("SASRec", "overall"), "note"] == note
    assert table.loc[("SASRec", "overall"), "seeds"] == 0
    assert table.loc["SASRec"].drop(columns=["seeds", "note"]).isna().all(axis=None)
    root = Path(params["out_dir"]) / "compare"
    md = (root / "results.md").read_text()
    assert md.count("| SASRec ") == 2 and md.count(note) == 2                  # headline table and Table 1
    summary = json.loads((root / "summary.json").read_text())
    assert summary["SASRec"]["note"] == note and summary["SASRec"]["recall@5"] is None
    assert "note" not in summary["popular"] and summary["popular"]["recall@5"] is not None
    csv = pd.read_csv(root / "summary.csv")
    assert csv.loc[csv["method"] == "SASRec", "note"].tolist() == [note]
    doc = json.loads(compare_mod.results_file(params).read_text())
    rows = {r["name"]: r for r in doc["rows"]}
    assert list(rows) == ["A", "SASRec", "most popular"]
    assert rows["SASRec"]["note"] == note and rows["SASRec"]["seeds"] == 0
    assert set(rows["SASRec"]) == set(rows["most popular"]) | {"note"}
    assert all(v is None for k, v in rows["SASRec"].items() if k not in ("name", "note", "seeds"))
    assert "note" not in rows["most popular"]
    assert "SASRec" not in recall_at_k_figure(table, tmp_path / "recall.png", [5, 10])
    only_skipped = dict(params, eval={**params["eval"], "baselines": ["sasrec"]})
    with pytest.raises(ConfigError, match=rf"'eval.baselines': no row to compare: SASRec \({note}\)"):
        compare_mod.aggregate(only_skipped, [], [0], "sa2crq compare --variants none")


def test_a_users_catalog_goes_by_its_name(run_params):
    """Issue 26: a generic catalog's results file, title and `catalog` field use data.generic.name, by
    default its items file's folder; a built-in dataset keeps its name and file."""
    def generic(items: str, name: str | None = None) -> dict:
        files = {"items": items, "queries": "q.csv", **({"name": name} if name else {})}
        return dict(run_params, dataset="generic", data={**run_params["data"], "generic": files})

    assert catalog_name(run_params) == run_params["dataset"] == "amazon-scientific"
    assert compare_mod.results_file(run_params).name == "amazon-scientific.json"
    assert compare_mod.dataset_title(run_params) == "amazon-scientific"
    for items, name in (("data/shop/items.jsonl", "shop"), ("/abs/My Books_2/items.csv", "my-books-2"),
                        ("my_items.csv", "my-items"), ("../items.csv", "items")):
        assert catalog_name(generic(items)) == name
    named = generic("data/shop/items.jsonl", "kitchen")
    assert compare_mod.results_file(named).name == "generic-kitchen.json"
    assert compare_mod.dataset_title(named) == "kitchen (generic catalog: items.jsonl, q.csv)"
    table = pd.DataFrame({"recall@5": [0.5], "recall@5 std": [0.1], "seeds": [2]},
                         index=pd.MultiIndex.from_tuples([("A", "overall")], names=["method", "group"]))
    path = write_results_file(table, named, [0, 1], "sa2crq compare", {})
    doc = json.loads(path.read_text())
    assert path.name == "generic-kitchen.json" and (doc["dataset"], doc["catalog"]) == ("generic", "kitchen")
    builtin = json.loads(write_results_file(table, run_params, [0, 1], "sa2crq compare", {}).read_text())
    assert builtin["dataset"] == "amazon-scientific" and "catalog" not in builtin


def test_run_generative_reports_hallucination_three_ways(run_params, monkeypatch):
    """The real run_generative on the fake run's sids (codebooks 4 x 3; four length-1 SIDs issued, six of
    the twelve length-2 ones): chance is 0 at length 1 and 0.5 at length 2."""
    import components.retrieval.retrieve

    test = pd.DataFrame({"query_id": ["a", "b"], "targets": [["i00"], ["i01"]]})
    generated = pd.DataFrame({"query_id": ["a"] * 6 + ["b"] * 2, "beam_rank": [0, 1, 2, 3, 4, 5, 0, 1],
                              "sid": ["0-0", "3-2", "1", "0-2", "2", "3-1", "0", "1-1"],
                              "sid_index": [0, -1, 6, -1, 7, -1, 8, 1], "score": 0.0})
    ranked = pd.DataFrame(columns=["query_id", "rank", "item_id", "score", "sid"])
    monkeypatch.setattr(components.retrieval.retrieve, "retrieve", lambda *a, **k: ranked)
    monkeypatch.setattr(components.retrieval.retrieve, "retrieve_and_generate", lambda *a, **k: (ranked, generated))
    monkeypatch.setattr(evaluate_mod, "check_sid_version", lambda params: None)   # the fake run has no retriever
    frames, halluc = REAL_RUN_GENERATIVE(run_params, test)            # eval.headline_k = 5
    assert set(frames) == {"sa2crq", "sa2crq (unconstrained)"}
    assert halluc.loc["a", "hallucination"] == pytest.approx(3 / 6)
    assert halluc.loc["a", "hallucination@5"] == pytest.approx(2 / 5)
    assert halluc.loc["a", "hallucination_norm"] == pytest.approx(3 / (4 * 0.5))
    assert halluc.loc["b"].tolist() == pytest.approx([0.0, 0.0, 0.0])


def test_compare_picks_variants_by_name():
    variants = [{"name": "TIGER", "params": {}}, {"name": "SA2CRQ", "params": {}}]
    assert compare_mod.pick_variants(variants, None) == variants
    assert compare_mod.pick_variants(variants, "SA2CRQ, TIGER") == variants[::-1]
    assert compare_mod.pick_variants(variants, "none") == []
    with pytest.raises(ConfigError, match="eval.variants.*'NOPE'.*known"):
        compare_mod.pick_variants(variants, "TIGER,NOPE")


def test_variant_keys_leave_out_tokenizer_settings_the_method_never_reads(run_params):
    def key(method: str, **tok) -> dict:
        p = dict(run_params, tokenizer={**run_params["tokenizer"], "method": method, **tok})
        return compare_mod.variant_keys(p)

    tau = {"sarq": {**run_params["tokenizer"]["sarq"], "tau": 11.0}}
    assert key("rqvae", **tau) == key("rqvae")                      # TIGER does not read the SARQ block
    assert key("rqvae", extension_sizes=[1, 2, 3]) == key("rqvae")
    assert key("sa2crq", **tau) != key("sa2crq")                    # SA2CRQ does
    assert key("sa2crq", extension_sizes=[1, 2, 3]) != key("sa2crq")
    sarq = run_params["tokenizer"]["sarq"]
    target = lambda tau, t: key("sa2crq", sarq={**sarq, "tau": tau, "target_items_per_sid": t})  # noqa: E731
    assert target(8.0, 3.0) == target(8.0, 1.5)                     # read only with tau: auto
    assert target("auto", 3.0) != target("auto", 1.5)
    assert key("rqvae", codebook_sizes=[8, 8, 8]) != key("rqvae")
    # what the evaluation alone reads is not the training's: bootstrap re-evaluates, never retrains
    boot = dict(run_params, eval={**run_params["eval"], "bootstrap": 7})
    assert compare_mod.variant_keys(boot) == compare_mod.variant_keys(run_params)
    assert compare_mod.eval_keys(boot) != compare_mod.eval_keys(run_params)


def test_variant_keys_keep_runs_cached_before_the_fusion_beam_split(run_params):
    """retriever.fusion.beam equal to retriever.beam is what runs before the key did: same variant keys."""
    rp = run_params["retriever"]
    fusion = {"sources": "auto", "weights": "auto", "depth": 100, "rrf_k": 60}
    before = compare_mod.variant_keys(dict(run_params, retriever={**rp, "fusion": fusion}))
    split = dict(run_params, retriever={**rp, "fusion": {**fusion, "beam": rp["beam"]}})
    assert compare_mod.variant_keys(split) == before
    assert split["retriever"]["fusion"]["beam"] == rp["beam"]      # the params themselves keep the key
    split["retriever"]["fusion"]["beam"] = rp["beam"] + 1
    assert compare_mod.variant_keys(split) != before


def test_wandb_offline_runs_land_under_the_out_dir(tmp_path, monkeypatch):
    """An experiment's W&B files stay with its outputs (not the project's runs/); WANDB_DIR overrides."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    params = load_params(ROOT / "params.yaml", [f"out_dir={tmp_path / 'exp'}"])
    evaluate_mod.log_to_wandb(params, {"m": {"r": 1.0}}, {"t": pd.DataFrame({"a": [1]})}, {})
    assert list((tmp_path / "exp" / "wandb").glob("offline-run-*"))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "elsewhere"))
    evaluate_mod.log_to_wandb(params, {"m": {"r": 1.0}}, {}, {})
    assert list((tmp_path / "elsewhere" / "wandb").glob("offline-run-*"))
    assert len(list((tmp_path / "exp" / "wandb").glob("offline-run-*"))) == 1
