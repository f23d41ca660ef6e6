"""Issue 22 parts 1 and 5 (tokenizer methods): a method is one registration.

Before, a new tokenizer method touched about 8 files (METHODS in tokenizer_stages.py and again in
the schema, 16 branches on the method name, compare.py's key tables, a test keeping the two METHODS
equal). Now components/tokenizers/registry.py holds the registrations; these tests register a toy
method from this module alone and show that the schema, the tokenizer steps, the comparison's
planning and the docs table all take it, and that the built-in methods come from the registry too.
"""
from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from components.runtime.config import load_params
from components.runtime.config_schema import integer, section
from components.runtime.errors import ConfigError
from components.tokenizers.registry import TokenizerMethod, get_method, methods, methods_table, register, unregister

ROOT = Path(__file__).resolve().parents[2]
TOY = ["tokenizer.method=toy", "tokenizer.toy.iters=1"]


def toy_train_head(run) -> None:
    """The toy: `tokenizer.toy.iters` k-means iterations per layer (rqkmeans, barely trained), through the
    public context; its own key is checked by the section it registers."""
    from components.tokenizers.rq_kmeans import fit_rq_kmeans
    from components.tokenizers.tokenizer_stages import make_tokenizer

    quantizer = fit_rq_kmeans(run.x, run.cfg.sizes, run.cfg.seed, niter=run.params["tokenizer"]["toy"]["iters"])
    run.ckpt["tokenizer"] = make_tokenizer(run.cfg, None, quantizer, run.version).state()
    run.summary["n_train"] = len(run.x)


@pytest.fixture
def toy() -> Iterator[TokenizerMethod]:
    method = register(TokenizerMethod("toy", toy_train_head, section=section("Toy", iters=integer(1)),
                                      doc=("one k-means pass", "marker file only", "fixed")))
    yield method
    unregister("toy")


def test_builtin_methods_come_from_the_registry() -> None:
    """One list of methods (no second METHODS to keep equal): the schema's choices, the switches
    tokenizer_config reads and compare's method-specific keys all read the registrations."""
    from flows.compare import tokenizer_tables

    assert list(methods()) == ["rqkmeans", "rqvae", "acrq", "sarq", "sa2crq", "import"]
    assert [n for n, m in methods().items() if m.adaptive] == ["sarq", "sa2crq"]
    assert [n for n, m in methods().items() if m.two_stage] == ["acrq", "sa2crq"]
    assert [n for n, m in methods().items() if m.collision_token] == ["rqkmeans", "rqvae"]
    specific, earlier, only_when = tokenizer_tables()
    assert set(specific) == {"sarq", "extension_sizes", "head_encoder", "stage2_items", "import_unknown"}
    assert earlier == {("tokenizer", "accelerator"): "auto", ("tokenizer", "head_encoder"): "head",
                       ("tokenizer", "stage2_items"): "tail_and_cold"}
    assert list(only_when) == [("tokenizer", "sarq", "target_items_per_sid")]
    hits = [p.relative_to(ROOT).as_posix() for p in (ROOT / "components").rglob("*.py")
            if re.search(r"^\s*\w*METHODS\s*=", p.read_text(), re.M)]
    assert hits == ["components/tokenizers/builtin.py"]


def test_docs_tables_are_the_registrations() -> None:
    for doc in ("TOKENIZERS.md", "EXTENDING.md"):
        assert methods_table() in (ROOT / "docs" / doc).read_text(), f"docs/{doc}: paste registry.methods_table()"


def test_a_registered_method_is_a_choice_of_the_schema(toy) -> None:
    """The schema reads the names when it checks: toy passes while registered, fails after; its own
    section is checked like any block (one line naming the key), required when toy is the method."""
    assert load_params(ROOT / "params.yaml", ["profile=smoke", *TOY])["tokenizer"]["toy"] == {"iters": 1}
    for overrides, key, message in (
            (["tokenizer.method=toy"], "tokenizer.toy", "missing"),
            ([*TOY, "tokenizer.toy.iters=0"], "tokenizer.toy.iters", "must be an integer >= 1, got 0"),
            ([*TOY, "tokenizer.toy.iterz=2"], "tokenizer.toy.iterz", "unknown key")):
        with pytest.raises(ConfigError, match=re.escape(f"'{key}': {message}")):
            load_params(ROOT / "params.yaml", overrides)
    assert "| `toy` | one k-means pass | marker file only | fixed |" in methods_table()
    unregister("toy")
    try:
        with pytest.raises(ConfigError, match=r"'tokenizer.method': must be one of rqkmeans .* import, got 'toy'"):
            load_params(ROOT / "params.yaml", ["tokenizer.method=toy"])
    finally:
        register(toy)


def test_a_registered_method_is_a_row_of_compare_planning(toy, monkeypatch) -> None:
    """`sa2crq compare --variants Toy,RQ-KMeans` plans a run per seed for the toy, whose run key keeps
    none of the keys only other methods read (tuning SA2CRQ does not retrain the toy)."""
    from flows import compare_dvc

    monkeypatch.chdir(ROOT)
    overrides = ["profile=smoke", "out_dir=outputs-toy", "eval.seeds=[0,1]", "eval.baselines=[]",
                 "tokenizer.toy.iters=1"]
    params = load_params("params.yaml", overrides)
    variant = {"name": "Toy", "params": {"tokenizer": {"method": "toy"}}}
    params["eval"]["variants"] = [*params["eval"]["variants"], variant]
    chosen = compare_dvc.pick_variants(params["eval"]["variants"], "Toy,RQ-KMeans")
    sid, plan = compare_dvc.plan_set(params, "params.yaml", overrides, chosen, "sa2crq compare")
    assert [(r["variant"], r["seed"]) for r in plan["runs"].values()] == [
        ("toy", 0), ("toy", 1), ("rq_kmeans", 0), ("rq_kmeans", 1)]
    toy_key = plan["variant_keys"][f"{sid}-toy"]["tokenizer"]
    assert (toy_key["method"], toy_key["toy"]) == ("toy", {"iters": 1})
    assert not {"sarq", "extension_sizes", "head_encoder", "stage2_items", "import_unknown"} & set(toy_key)
    assert "toy" not in plan["variant_keys"][f"{sid}-rq_kmeans"]["tokenizer"]   # toy's own block: toy's key alone


@pytest.mark.slow
def test_a_registered_method_runs_through_the_steps_and_is_a_row_of_the_comparison(toy, smoke_embedded) -> None:
    """tokenizer_config reads the toy's switches (one stage, fixed length, no collision token); train_head /
    train_tail / assign_ids on the smoke data: the toy's SIDs are the codes of its own quantizer (the
    shared assign_ids encodes with the tokenizer the hook stored). train_retriever and evaluate then run on
    them, and `sa2crq compare --variants Toy`'s stages (compare_evaluate, compare_aggregate) make the toy a
    row of the comparison with the evaluation's numbers. All in the variant's run folder, as `compare` lays it out."""
    import json

    import torch

    from components.evaluation.evaluate import load_eval_inputs
    from components.pipeline.stages import get_step
    from components.runtime.config import deep_merge
    from components.runtime.paths import out_path
    from components.runtime.torch_files import load_weights
    from components.tokenizers.rq_kmeans import fit_rq_kmeans
    from components.tokenizers.sid_table import live_version
    from components.tokenizers.sid_tokenizer import load_checkpoint
    from components.tokenizers.tokenizer_stages import _version, tokenizer_config
    from flows import compare

    variant = {"name": "Toy", "params": {"tokenizer": {"method": "toy", "toy": {"iters": 1}}}}
    base = deep_merge(smoke_embedded, {"retriever": {"epochs": 1}, "eval": {"baselines": [], "bootstrap": 0,
                                                                            "compare_dir": "compare-toy-tokenizer"}})
    base["eval"]["variants"] = [*base["eval"]["variants"], variant]
    (chosen,) = compare.pick_variants(base["eval"]["variants"], "Toy")
    params = compare.variant_params(base, chosen, 0)       # <out_dir>/compare-toy-tokenizer/toy/seed0
    run_dir = Path(params["out_dir"])
    run_dir.mkdir(parents=True)
    for name in compare.LINKED:                            # the set's prepared data and embeddings, as compare links them
        (run_dir / name).symlink_to(out_path(base, name), target_is_directory=True)

    cfg = tokenizer_config(params)
    assert (cfg.method, cfg.adaptive, cfg.two_stage, cfg.sizes) == ("toy", False, False, [16, 32, 64])
    with pytest.raises(ConfigError, match=r"only for fixed-length methods \('rqkmeans', 'rqvae'\)"):
        tokenizer_config({**params, "tokenizer": {**params["tokenizer"], "collision_token": True}})
    assert get_step("train_head")(params)["method"] == "toy"
    assert get_step("train_tail")(params) == {"method": "toy", "stage2": False}
    summary = get_step("assign_ids")(params)
    table = pd.read_parquet(out_path(params, "sids", "sid_table.parquet"))
    assert summary["n_items"] == len(table) and table["version"].str.startswith("toy-").all()
    x = np.load(out_path(params, "embeddings", "items.npy"))
    quantizer = fit_rq_kmeans(x, [16, 32, 64], params["seed"], niter=1)
    expected = quantizer(torch.from_numpy(x.astype(np.float32)), n_layers=3).codes.numpy()
    assert np.array_equal(np.stack(table["codes"].to_numpy()), expected)
    assert load_checkpoint(out_path(params, "tokenizer", "tail.pt"))["stage2"] is False
    # toy's own block is no part of another method's version: adding a method keeps the others' SIDs
    rqkmeans = {**params, "tokenizer": {**params["tokenizer"], "method": "rqkmeans"}}
    without = {**rqkmeans, "tokenizer": {k: v for k, v in rqkmeans["tokenizer"].items() if k != "toy"}}
    assert _version(rqkmeans, tokenizer_config(rqkmeans)) == _version(without, tokenizer_config(without))
    assert get_method("toy").two_stage is False

    # the retriever learns the toy's SIDs and the evaluation ranks through them (it refuses another version)
    get_step("train_retriever")(params)
    trained_on = load_weights(run_dir / "retriever" / "model.pt", keys=("config",))["config"]["sid_version"]
    assert trained_on == live_version(run_dir) == table["version"].iloc[0] and trained_on.startswith("toy-")
    assert get_step("evaluate")(params)["methods"] == ["toy", "toy (unconstrained)"]
    evaluated = json.loads((run_dir / "eval" / "results.json").read_text())
    assert evaluated["context"]["tokenizer"] == "toy"
    n_test = len(load_eval_inputs(params).test)
    k = int(params["eval"]["headline_k"])
    for result in evaluated["methods"].values():
        assert result["overall"]["n_queries"] == n_test
        recalls = [s["mean"] for name, s in result["overall"]["metrics"].items() if name.startswith("recall@")]
        assert len(recalls) >= 2 and all(0 <= r <= 1 for r in recalls)
    assert evaluated["methods"]["toy"]["overall"]["metrics"][f"recall@{k}"]["mean"] > 0   # the SIDs retrieve items
    assert evaluated["methods"]["toy (unconstrained)"]["overall"]["metrics"]["hallucination"]["mean"] >= 0

    # `sa2crq compare --variants Toy`: the run's compare_evaluate stage, then the aggregate of what it stored
    run = compare.evaluate_variant(base, chosen, 0)
    assert json.dumps(run["constrained"], sort_keys=True) == json.dumps(evaluated["methods"]["toy"], sort_keys=True)
    rows = compare.aggregate(base, [chosen], [0], "sa2crq compare --variants Toy")
    assert list(dict.fromkeys(rows.index.get_level_values("method"))) == ["Toy"]
    overall = rows.loc[("Toy", "overall")]
    assert overall["seeds"] == 1 and overall[f"recall@{k}"] == run["constrained"]["overall"]["metrics"][f"recall@{k}"]["mean"]
    assert overall["hallucination"] == run["unconstrained"]["overall"]["metrics"]["hallucination"]["mean"]
    stored = json.loads(compare.results_file(base).read_text())
    assert [row["name"] for row in stored["rows"]] == ["Toy"]
