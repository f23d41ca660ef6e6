"""Probes of issue 27 item 1 and issue 25 finding 17: what `sa2crq compare` may overwrite.

A comparison of a subset (fewer variants, seeds or baselines than params.yaml lists) is planned
in experiments/scratch/ and writes its results under <out_dir>/compare/_subset/ (or --results
FILE): the committed results/<dataset>.json and the committed plan keep their bytes. Results
files are named by catalog, so two `dataset=generic` comparisons live side by side. DVC itself
is stood in for here (test_compare_dvc.py::test_compare_runs_through_dvc runs it for real).
"""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import yaml

from components.ranking.metrics import GROUPS
from components.runtime.config import load_params
from components.runtime.errors import Sa2crqError
from flows import compare_dvc
from sa2crq.cli import main

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ("experiments/compare.yaml", "experiments/sets/dvc.yaml", "experiments/dvc.lock",
             "results/amazon-scientific.json", "results/amazon-scientific-curves.png")
QUICK = ["eval.seeds=[0]", "eval.baselines=[popular]"]


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """params.yaml, experiments/ and results/ as committed, in a folder of their own."""
    root = tmp_path / "project"
    for name in ("params.yaml", "experiments/dvc.yaml", *COMMITTED):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, root / name)
    (root / "data").mkdir()
    monkeypatch.chdir(root)
    return root


def _yaml(text: str) -> dict:
    return yaml.load(text, Loader=yaml.CSafeLoader)                 # the committed plan is 2,000+ lines


@pytest.fixture
def empty_project(tmp_path, monkeypatch) -> Path:
    """params.yaml and experiments/dvc.yaml, no comparison planned yet."""
    root = tmp_path / "empty"
    for name in ("params.yaml", "experiments/dvc.yaml"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, root / name)
    monkeypatch.chdir(root)
    return root


def _snapshot(root: Path) -> dict[str, bytes]:
    return {name: (root / name).read_bytes() for name in COMMITTED}


def _stand_in_dvc(monkeypatch, ran: list[str]) -> None:
    """DVC stood in for: `dvc repro` of a set runs its stages' commands in this process, the
    training and evaluation replaced by a stored result; nothing is recorded as unrecorded."""
    def result(score: float) -> dict:
        return {g: {"n_queries": 4, "metrics": {"recall@10": {"mean": score}, "hallucination": {"mean": 0.1}}}
                for g in ("overall", *GROUPS)}

    def evaluate(params: dict, variant: dict, seed: int) -> None:
        run = Path(compare_dvc.variant_params(params, variant, seed)["out_dir"])
        (run / "eval").mkdir(parents=True)
        (run / "eval" / "compare_run.json").write_text(json.dumps(
            {"name": variant["name"], "seed": seed, "constrained": result(0.5), "unconstrained": result(0.0),
             "sid_stats": {}}))

    def baseline(params: dict, name: str, seed: int) -> None:
        path = compare_dvc.baseline_file(params, name, seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"name": name, "result": result(0.25)}))

    def repro(sid: str, plan: dict, targets: list[str] | None = None) -> int:
        for name in compare_dvc.stage_names(sid, plan):
            ran.append(name)
            stage = name.split(":")[-1]
            kind, _, item = stage.partition("@")
            if kind == "compare_evaluate":
                run = plan["runs"][item]
                compare_dvc.run_step("evaluate", sid, variant=run["variant"], seed=run["seed"])
            elif kind == "compare_baseline":
                compare_dvc.run_step("baseline", sid, baseline=plan["baselines"][item]["name"],
                                     seed=plan["baselines"][item]["seed"])
            elif kind.startswith("aggregate_"):
                compare_dvc.run_step("aggregate", sid)
        return len(ran)

    loaded: dict = {}

    def load(path: str, overrides: list[str] | None = None) -> dict:     # each stage re-reads params.yaml: once here
        key = (str(path), tuple(overrides or ()))
        if key not in loaded:
            loaded[key] = load_params(path, overrides)
        return copy.deepcopy(loaded[key])

    monkeypatch.setattr(compare_dvc, "load_params", load)
    monkeypatch.setattr(compare_dvc, "evaluate_variant", evaluate)
    monkeypatch.setattr(compare_dvc, "run_baseline", baseline)
    monkeypatch.setattr(compare_dvc, "repro", repro)
    monkeypatch.setattr(compare_dvc, "unrecorded_runs", lambda sid, plan: [])


def test_a_one_variant_one_seed_comparison_leaves_the_committed_results_and_plan_alone(project, monkeypatch,
                                                                                      capsys):
    """Issue 27 item 1: `sa2crq compare --variants TIGER -s eval.seeds=[0] -s eval.baselines=[popular]`
    replaced results/amazon-scientific.json (19 rows, 3 seeds) with 2 rows of one seed, and the plan."""
    before = _snapshot(project)
    ran: list[str] = []
    _stand_in_dvc(monkeypatch, ran)
    assert main(["compare", "--variants", "TIGER", *[x for o in QUICK for x in ("-s", o)]]) == 0
    out, err = capsys.readouterr()
    summary = json.loads(out)
    assert _snapshot(project) == before                                  # the committed bytes, all of them
    assert summary["full"] is False and summary["set"] == "outputs__subset"
    assert summary["results"] == "outputs/compare/_subset/results.json"
    assert "results in outputs/compare/_subset/results.json" in err and "written only by the full" in err
    doc = json.loads((project / summary["results"]).read_text())
    assert [r["name"] for r in doc["rows"]] == ["TIGER", "most popular"] and doc["seeds"] == [0]
    assert (project / "outputs/compare/_subset/results-curves.png").stat().st_size > 0
    assert ran[-1] == "experiments/scratch/dvc.yaml:aggregate_outputs__subset"
    assert "experiments/scratch/dvc.yaml:compare_train@outputs__subset-tiger-s0" in ran
    scratch = _yaml((project / "experiments/scratch/compare.yaml").read_text())
    assert list(scratch["sets"]) == ["outputs__subset"]
    assert scratch["runs"]["outputs__subset-tiger-s0"]["dir"] == "outputs/compare/_subset/tiger/seed0"


def test_a_subset_can_name_its_own_results_file_but_not_the_committed_one(project, monkeypatch, capsys):
    before = _snapshot(project)
    _stand_in_dvc(monkeypatch, [])
    args = ["compare", "--variants", "TIGER", "-s", "eval.seeds=[0]", "-s", "eval.baselines=[]"]
    assert main([*args, "--results", "outputs/quick.json"]) == 0
    assert json.loads(capsys.readouterr().out)["results"] == "outputs/quick.json"
    assert json.loads((project / "outputs/quick.json").read_text())["seeds"] == [0]
    assert (project / "outputs/quick-curves.png").exists()
    for bad in ("results/climate-fever.json", "../elsewhere.json", "quick.csv"):
        assert main([*args, "--results", bad]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("sa2crq: error:") and bad.split("/")[-1] in err
    assert main(["compare", "--results", "outputs/quick.json"]) == 2          # the full comparison has its file
    assert "this is the full comparison" in capsys.readouterr().err
    assert _snapshot(project) == before


@pytest.mark.parametrize(("overrides", "variants", "full"), [
    ([], None, True),
    (["dataset=climate-fever", "out_dir=outputs-cf"], None, True),
    (["eval.seeds=[2,1,0]", "retriever.beam=5"], None, True),               # order and other params aside
    (["eval.seeds=[0]"], None, False),
    (["eval.baselines=[bm25]"], None, False),
    ([], "TIGER,RQ-KMeans", False),
    (["profile=smoke"], None, False),                                       # the smoke profile's own lists
    (["eval.variants=[{name: TIGER, params: {}}]"], None, False),           # a variant counts with its params
])
def test_full_means_every_variant_seed_and_baseline_params_yaml_lists(overrides, variants, full):
    params = load_params(ROOT / "params.yaml", overrides)
    chosen = compare_dvc.pick_variants(list(params["eval"]["variants"]), variants)
    assert (compare_dvc.subset_of(params, str(ROOT / "params.yaml"), overrides, chosen) == []) is full


def _plan(overrides: list[str]) -> str:
    params = load_params("params.yaml", overrides)
    chosen = compare_dvc.pick_variants(list(params["eval"]["variants"]), None)
    sid, entries = compare_dvc.plan_set(params, "params.yaml", overrides, chosen, "sa2crq compare")
    compare_dvc.write_plan(sid, entries)
    return sid


def _outs(stages: dict) -> list[str]:
    return [next(iter(o)) if isinstance(o, dict) else o
            for stage in stages.values() for o in (stage.get("outs") or []) + (stage.get("metrics") or [])]


def test_two_generic_catalogs_live_side_by_side(empty_project):
    """Finding 17: a second dataset=generic comparison failed, results/generic-curves.png being an
    output of both aggregate stages. Each catalog goes by its name (issue 26: by default its folder's)."""
    project = empty_project
    sids = [_plan(_catalog(project, name)) for name in ("a", "b")]
    plan = _yaml((project / "experiments/compare.yaml").read_text())
    assert [plan["sets"][s]["results"] for s in sids] == ["results/generic-a.json", "results/generic-b.json"]
    outs = _outs(_yaml((project / "experiments/sets/dvc.yaml").read_text())["stages"])
    assert len(outs) == len(set(outs))                                  # DVC refuses a path two stages write
    assert {"results/generic-a-curves.png", "results/generic-b-curves.png"} <= set(outs)


def test_a_second_set_writing_a_taken_results_file_is_one_line(project):
    """amazon-scientific keeps its name, so a second full comparison of it in another out_dir would
    write results/amazon-scientific.json twice: refused before DVC, naming the file and the way out."""
    before = _snapshot(project)
    with pytest.raises(Sa2crqError, match=r"results/amazon-scientific.json: already written by stage "
                                          r"'aggregate_outputs'.*eval.results_dir"):
        _plan(["out_dir=outputs-b"])
    assert _snapshot(project) == before
    assert _plan(["out_dir=outputs-b", "eval.results_dir=results-b"]) == "outputs_b"


def _catalog(root: Path, name: str) -> list[str]:
    (root / name).mkdir()
    (root / name / "items.csv").write_text("item_id,text\ni1,a red lamp\ni2,a blue chair\n")
    (root / name / "queries.csv").write_text("query_id,split,history,target\nq1,train,i1,i2\n")
    return ["dataset=generic", f"data.generic.items={name}/items.csv", f"data.generic.queries={name}/queries.csv",
            f"out_dir=outputs-{name}"]


def test_a_subset_first_then_the_full_comparison_of_a_new_catalog(empty_project):
    """A subset of a new catalog prepares and embeds its out_dir itself (in scratch); the full
    comparison of it then takes those stages over instead of writing the same outputs twice."""
    overrides = _catalog(empty_project, "a")
    plan_overrides = [*overrides, "eval.seeds=[0]", f"eval.compare_dir=compare/{compare_dvc.SUBSET_DIR}"]
    params = load_params("params.yaml", plan_overrides)
    sid, entries = compare_dvc.plan_set(params, "params.yaml", plan_overrides, params["eval"]["variants"][:1],
                                        "sa2crq compare", subset=True)
    compare_dvc.write_plan(sid, entries)
    scratch = empty_project / "experiments/scratch/dvc.yaml"
    assert {"prepare_outputs_a__subset", "embed_outputs_a__subset"} <= set(_yaml(scratch.read_text())["stages"])
    assert _plan(overrides) == "outputs_a"
    stages = {**_yaml(scratch.read_text())["stages"],
              **_yaml((empty_project / "experiments/sets/dvc.yaml").read_text())["stages"]}
    outs = _outs(stages)
    assert len(outs) == len(set(outs)) and "outputs-a/prepared" in outs
    assert compare_dvc.input_stages(sid, compare_dvc.read_plan(compare_dvc.SCRATCH)) == [
        "experiments/sets/dvc.yaml:prepare_outputs_a", "experiments/sets/dvc.yaml:embed_outputs_a"]
    assert compare_dvc.load_set(sid)[2]["results"] == "outputs-a/compare/_subset/results.json"   # still consistent
