"""`sa2crq compare` on DVC (experiments/dvc.yaml, flows/compare_dvc.py): what each run's stage
depends on, adopting finished runs, and a stale plan. The runs' outputs are stand-in files here
(`dvc commit` records them as `--adopt` does); test_compare_runs_through_dvc trains for real, a
subset of the comparison that leaves the committed results and plan alone."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, data_root

from components.runtime.config import load_params
from components.runtime.errors import ConfigError, Sa2crqError
from flows import compare_dvc
from sa2crq.cli import main

BASE = ["profile=smoke", "out_dir=outputs-t", "eval.seeds=[0,1]", "eval.baselines=[popular,two_tower]"]


def _dvc(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    return subprocess.run(["dvc", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


COMMITTED = ("experiments/compare.yaml", "experiments/sets/dvc.yaml", "experiments/dvc.lock",
             "results/amazon-scientific.json", "results/amazon-scientific-curves.png")


def _project(root: Path, data: bool = False, committed: bool = False) -> Path:
    """The files the comparison's stages name (code, params, experiments/dvc.yaml) in a git + DVC repo;
    `committed`: with the committed plan, its lock and the results files too."""
    for name in ("components", "flows"):
        shutil.copytree(ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("params.yaml", "experiments/dvc.yaml", ".dvc/config", *(COMMITTED if committed else ())):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, root / name)
    if data:
        shutil.copytree(data_root(), root / "data", ignore=shutil.ignore_patterns("*.md"))
    else:
        (root / "data").mkdir()
        (root / "data" / "stand-in.txt").write_text("data")
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    return root


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    root = _project(tmp_path / "project")
    monkeypatch.chdir(root)
    return root


def _plan(overrides: list[str], variants: str | None = None) -> tuple[str, dict]:
    params = load_params("params.yaml", overrides)
    chosen = compare_dvc.pick_variants(list(params["eval"]["variants"]), variants)
    sid, entries = compare_dvc.plan_set(params, "params.yaml", overrides, chosen, "sa2crq compare")
    compare_dvc.write_plan(sid, entries)
    return sid, compare_dvc.read_plan()


def _stand_in_outputs(sid: str, plan: dict) -> None:
    """A file in every output of the set's stages (a folder where the out names one)."""
    from dvc.repo import Repo

    with Repo() as repo:
        outs = compare_dvc.stage_outs(repo)
        for name in compare_dvc.stage_names(sid, plan):
            for out in outs[name]:
                path = Path(out)
                target = path if path.suffix else path / "part.bin"
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(f"stand-in for {name}")


def _stale(root: Path) -> set[str]:
    status = _dvc(["status", "--json", "experiments/dvc.yaml", "experiments/sets/dvc.yaml"], root)
    assert status.returncode == 0, status.stderr
    return {name.split(":")[-1] for name in json.loads(status.stdout or "{}")}


def _edit_params(root: Path, edit) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    edit(params)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.mark.slow   # real dvc commands (about 10-25 s)
def test_dvc_reruns_only_the_runs_whose_params_they_read_changed(project: Path):
    def smoke_lists(params: dict) -> None:      # BASE is then params.yaml's full comparison, not a subset
        params["profile"] = "smoke"
        params["profiles"]["smoke"]["eval"].update(seeds=[0, 1], baselines=["popular", "two_tower"])

    _edit_params(project, smoke_lists)
    sid, plan = _plan(BASE)
    assert sid == "outputs_t"
    _stand_in_outputs(sid, plan)
    params = load_params("params.yaml", BASE)
    # finished runs DVC has not recorded are not retrained behind the user's back
    with pytest.raises(Sa2crqError, match="4 trained run.* does not record .*sa2crq compare --adopt"):
        compare_dvc.run_compare(params, "params.yaml", BASE)
    adopted = compare_dvc.run_compare(params, "params.yaml", BASE, opt_adopt=True)
    runs = [f"{v}-s{s}" for v in ("rq_kmeans", "sa2crq_tau_6") for s in (0, 1)]
    assert adopted["adopted"] == 2 + 2 * len(runs) + 3 + 1 and adopted["to_run"] == []
    # a run not on disk yet is left to run, and so is the aggregate that reads it
    shutil.rmtree(project / "outputs-t/compare/sa2crq_tau_6/seed1/eval")
    partial = compare_dvc.adopt(sid, plan)
    assert partial["to_run"] == ["experiments/dvc.yaml:compare_evaluate@outputs_t-sa2crq_tau_6-s1",
                                 "experiments/sets/dvc.yaml:aggregate_outputs_t"]
    _stand_in_outputs(sid, plan)
    assert _stale(project) == set()                                      # adopted: nothing to run
    model = project / "outputs-t/compare/rq_kmeans/seed1/retriever/part.bin"
    model.write_text("trained outside DVC")
    assert compare_dvc.unrecorded_runs(sid, plan) == ["experiments/dvc.yaml:compare_train@outputs_t-rq_kmeans-s1"]
    model.write_text("stand-in for experiments/dvc.yaml:compare_train@outputs_t-rq_kmeans-s1")

    # keys no run reads: the baselines list, a baseline's own settings, W&B, flows, serving
    _plan(BASE[:-1] + ["eval.baselines=[popular]", "eval.two_tower.epochs=9", "wandb.mode=disabled",
                       "flows.max_workers=7", "serve.port=9000"])
    assert _stale(project) == {"aggregate_outputs_t"}

    # the evaluation's settings re-evaluate every run and retrain none
    _plan(BASE + ["eval.bootstrap=20"])
    stale = _stale(project)
    assert {f"compare_evaluate@outputs_t-{r}" for r in runs} <= stale
    assert not {name for name in stale if name.startswith("compare_train@")}

    # one variant's params retrain that variant alone
    def tau(params: dict) -> None:
        params["profiles"]["smoke"]["eval"]["variants"][1]["params"]["tokenizer"]["sarq"]["tau"] = 5.0

    _edit_params(project, tau)
    _plan(BASE)
    stale = _stale(project)
    assert {"compare_train@outputs_t-sa2crq_tau_6-s0", "compare_train@outputs_t-sa2crq_tau_6-s1"} <= stale
    assert not {name for name in stale if "rq_kmeans" in name or name.startswith("compare_baseline@")}


def test_a_stage_refuses_a_plan_params_yaml_no_longer_matches(project: Path, capsys):
    sid, _ = _plan(BASE)
    _edit_params(project, lambda p: p["retriever"].update(lr=p["retriever"]["lr"] * 2))   # not in the smoke profile
    with pytest.raises(Sa2crqError, match="compare.yaml: section 'variant_keys' .* run `sa2crq compare`"):
        compare_dvc.run_step("train", sid, variant="rq_kmeans", seed=0)
    assert main(["compare-step", "train", "--set", sid, "--variant", "rq_kmeans", "--seed", "0"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "compare.yaml" in err


def test_a_users_catalog_gets_its_own_inputs_and_title(project: Path, tmp_path):
    (project / "mine").mkdir()
    (project / "mine" / "items.csv").write_text("item_id,text\ni1,a red lamp\ni2,a blue chair\n")
    (project / "mine" / "queries.csv").write_text("query_id,split,history,target\nq1,train,i1,i2\n")
    generic = ["dataset=generic", "data.generic.items=mine/items.csv", "data.generic.queries=mine/queries.csv"]
    with pytest.raises(ConfigError, match="'out_dir'.*an out_dir of its own"):
        _plan(generic)                                         # outputs/ is dvc.yaml's, on params.yaml's data
    with pytest.raises(ConfigError, match="'out_dir'.*inside the project"):
        _plan(generic + [f"out_dir={tmp_path / 'elsewhere'}"])
    sid, plan = _plan(generic + ["out_dir=outputs-mine"])
    stages = yaml.safe_load((project / "experiments/sets/dvc.yaml").read_text())["stages"]
    assert stages[f"prepare_{sid}"]["deps"][:2] == ["mine/items.csv", "mine/queries.csv"]
    assert stages[f"embed_{sid}"]["outs"] == ["outputs-mine/embeddings"]
    assert plan["aggregate_keys"][sid]["title"] == "mine (generic catalog: items.csv, queries.csv)"
    assert plan["sets"][sid]["results"] == "results/generic-mine.json"        # named by the items' folder
    assert compare_dvc.stage_names(sid, plan)[:2] == [f"experiments/sets/dvc.yaml:prepare_{sid}",
                                                      f"experiments/sets/dvc.yaml:embed_{sid}"]
    _plan(BASE)                                                # a second set keeps the first one's stages
    assert f"aggregate_{sid}" in yaml.safe_load((project / "experiments/sets/dvc.yaml").read_text())["stages"]


def test_a_catalogs_name_names_its_results_and_reruns_nothing_else(project: Path):
    """data.generic.name names the results file, its plots and the title; no run reads it, so naming a
    catalog changes the aggregate's keys alone. A second set of the same name stops before DVC, saying what
    works (another name or results folder; another out_dir would not)."""
    (project / "mine").mkdir()
    (project / "mine" / "items.csv").write_text("item_id,text\ni1,a red lamp\ni2,a blue chair\n")
    (project / "mine" / "queries.csv").write_text("query_id,split,history,target\nq1,train,i1,i2\n")
    generic = ["dataset=generic", "data.generic.items=mine/items.csv", "data.generic.queries=mine/queries.csv",
               "out_dir=outputs-mine"]
    sid, unnamed = _plan(generic)
    sid, named = _plan(generic + ["data.generic.name=shop-2"])
    assert named["sets"][sid]["results"] == "results/generic-shop-2.json"
    assert named["aggregate_keys"][sid]["title"] == "shop-2 (generic catalog: items.csv, queries.csv)"
    outs = yaml.safe_load((project / "experiments/sets/dvc.yaml").read_text())["stages"][f"aggregate_{sid}"]["outs"]
    assert {"results/generic-shop-2-curves.png": {"cache": False}} in outs
    assert {"results/generic-shop-2-recall-at-k.png": {"cache": False}} in outs
    for section in ("input_keys", "variant_keys", "eval_keys", "baseline_keys", "runs", "baselines"):
        assert named[section] == unnamed[section], section
    with pytest.raises(Sa2crqError, match=r"results/generic-shop-2.json: already written by stage 'aggregate_"
                                          r"outputs_mine' .*-s data.generic.name=NAME.*-s eval.results_dir="):
        _plan([*generic[:-1], "out_dir=outputs-mine2", "data.generic.name=shop-2"])
    assert _plan([*generic[:-1], "out_dir=outputs-mine2", "data.generic.name=shop-3"])[0] == "outputs_mine2"
    with pytest.raises(ConfigError, match=r"'data.generic.name': must be lowercase letters, digits and '-'"):
        load_params("params.yaml", generic + ["data.generic.name=My Shop"])


def _summary(stdout: str) -> dict:
    """The command's own JSON summary: the last object printed (the stages print theirs before it)."""
    return json.loads(stdout[stdout.rindex("\n{\n") + 1:])


@pytest.mark.slow
def test_compare_runs_through_dvc(tmp_path, smoke_embed_cache):
    """The real thing on the smoke slice: `sa2crq compare --jobs 2` of one variant and one seed
    reproduces its inputs, the run and a baseline (each stage's command beside DVC, then `dvc
    commit`), then the aggregate; then DVC finds every stage up to date. A subset (issue 27): its
    plan is experiments/scratch/, its results <out_dir>/compare/_subset/results.json, and the
    committed results/amazon-scientific.json and plan keep their bytes. (The embed stage reads the smoke
    catalog's cached vectors.)"""
    root = _project(tmp_path / "project", data=True, committed=True)
    shutil.copytree(smoke_embed_cache, root / "outputs-t" / "embed_cache")
    before = {name: (root / name).read_bytes() for name in COMMITTED}
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               PYTHONPATH=str(root))
    cmd = [sys.executable, "-m", "sa2crq.cli", "compare", "--variants", "RQ-KMeans", "-s", "profile=smoke",
           "-s", "out_dir=outputs-t", "-s", "eval.baselines=[popular]", "-s", "data.max_users=150",
           "-s", "tokenizer.epochs_head=2", "-s", "tokenizer.epochs_tail=1", "-s", "retriever.epochs=1"]
    first = subprocess.run(cmd + ["--jobs", "2"], cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    summary = _summary(first.stdout)
    assert summary["stages_run"] == 6          # prepare, embed, train, evaluate, popular, aggregate
    assert summary["full"] is False and summary["results"] == "outputs-t/compare/_subset/results.json"
    assert "results in outputs-t/compare/_subset/results.json" in first.stderr
    assert {name: (root / name).read_bytes() for name in COMMITTED} == before
    doc = json.loads((root / summary["results"]).read_text())
    assert [r["name"] for r in doc["rows"]] == ["RQ-KMeans", "most popular"]
    assert doc["command"] == "sa2crq " + shlex.join(cmd[3:])          # as typed, --jobs aside
    assert "compare outputs_t__subset" in first.stderr                   # the progress bar
    status = _dvc(["status", "--json", "experiments/scratch/dvc.yaml"], root)
    assert status.returncode == 0 and json.loads(status.stdout) == {}      # what --jobs ran, DVC records as done


def _jsonl_catalog(folder: Path, seed: int) -> list[Path]:
    """A small catalog of one's own in the documented JSONL format, with the usual file names: 60 items and
    30 users' next-item queries (two train, one valid, one test each)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    words = ["red", "blue", "lamp", "chair", "book", "novel", "desk", "green", "poem", "table", "song", "map"]
    items = [{"item_id": f"i{j}", "text": f"{words[j % 12]} {words[(5 * j + seed) % 12]} thing {j}"} for j in range(60)]
    queries = []
    for user in range(30):
        seq = [f"i{int(j)}" for j in rng.integers(0, 60, 5)]
        for pos, split in ((1, "train"), (2, "train"), (3, "valid"), (4, "test")):
            queries.append({"query_id": f"u{user}-{pos}", "split": split, "history": seq[:pos], "target": seq[pos]})
    folder.mkdir(parents=True)
    files = [folder / "items.jsonl", folder / "queries.jsonl"]
    for path, rows in zip(files, (items, queries)):
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return files


def _generic(files: list[Path], out_dir: str) -> list[str]:
    return ["dataset=generic", f"data.generic.items={files[0]}", f"data.generic.queries={files[1]}",
            f"out_dir={out_dir}"]


def test_the_plan_holds_paths_relative_to_the_project(project: Path, tmp_path):
    """Issue 26: a catalog (and the params file) named by absolute paths is planned relative to the project,
    '..' outside it, so no path of this machine enters the plan or the command the results file names
    (run_compare plans what `portable` gives; the slow test below runs it)."""
    files = _jsonl_catalog(tmp_path / "catalogs" / "shop", seed=0)
    params_file, overrides = compare_dvc.portable(str(project / "params.yaml"),
                                                  _generic(files, str(project / "outputs-shop")))
    assert (params_file, overrides) == ("params.yaml", [
        "dataset=generic", "data.generic.items=../catalogs/shop/items.jsonl",
        "data.generic.queries=../catalogs/shop/queries.jsonl", "out_dir=outputs-shop"])
    assert compare_dvc.compare_command(params_file, overrides, None) == (
        "sa2crq compare -s dataset=generic -s data.generic.items=../catalogs/shop/items.jsonl "
        "-s data.generic.queries=../catalogs/shop/queries.jsonl -s out_dir=outputs-shop")
    sid, plan = _plan(overrides)
    assert sid == "outputs_shop" and plan["sets"][sid]["results"] == "results/generic-shop.json"
    texts = [(project / name).read_text() for name in ("experiments/compare.yaml", "experiments/sets/dvc.yaml")]
    assert all(str(tmp_path) not in text for text in texts) and "../catalogs/shop/items.jsonl" in texts[1]
    assert compare_dvc.load_set(sid)[0]["data"]["generic"]["items"] == "../catalogs/shop/items.jsonl"


@pytest.mark.slow   # two real comparisons on DVC (prepare, embed, train, evaluate, a baseline, aggregate): minutes
def test_two_catalogs_compare_side_by_side_and_a_copy_elsewhere_resumes(tmp_path):
    """Issue 26 acceptance: two catalogs of one's own (JSONL files of the same names in two folders beside the
    project, named by absolute paths) compared in a row in one checkout, each a full comparison (params.yaml:
    the smoke recipe, one variant, one seed, one baseline), write two results files, plots and titles side by
    side. Then the project and the catalogs, copied to another folder (the first one gone, as on another
    machine), resume both plans: DVC finds every stage up to date and `sa2crq compare` runs none."""
    work = tmp_path / "first"
    root = _project(work / "project")
    shutil.copytree(ROOT / "sa2crq", root / "sa2crq", ignore=shutil.ignore_patterns("__pycache__"))

    def small(params: dict) -> None:
        params["profile"] = "smoke"
        smoke = params["profiles"]["smoke"]
        smoke["eval"].update(seeds=[0], baselines=["popular"], variants=[smoke["eval"]["variants"][0]])
        smoke["tokenizer"].update(codebook_sizes=[8, 8, 8], epochs_head=2, epochs_tail=1)
        smoke["retriever"].update(epochs=1)

    _edit_params(root, small)
    catalogs = {name: _jsonl_catalog(work / "catalogs" / name, seed) for seed, name in enumerate(("shop", "library"))}

    def compare(project: Path, files: list[Path], out_dir: str) -> dict:
        env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                   PYTHONPATH=str(project))
        flags = [x for o in _generic(files, out_dir) for x in ("-s", o)]
        run = subprocess.run([sys.executable, "-m", "sa2crq.cli", "compare", *flags], cwd=project, env=env,
                             capture_output=True, text=True, timeout=1200)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        return _summary(run.stdout)

    for name, files in catalogs.items():
        summary = compare(root, files, f"outputs-{name}")
        assert summary["full"] is True and summary["stages_run"] == 6     # prepare, embed, train, evaluate, ...
        assert summary["results"] == f"results/generic-{name}.json"
    for name in catalogs:
        doc = json.loads((root / f"results/generic-{name}.json").read_text())
        assert (doc["dataset"], doc["catalog"]) == ("generic", name)
        assert [r["name"] for r in doc["rows"]] == ["RQ-KMeans", "most popular"]
        assert (root / f"results/generic-{name}-curves.png").exists()
        assert (root / f"results/generic-{name}-recall-at-k.png").exists()
        title = (root / f"outputs-{name}/compare/results.md").read_text().splitlines()[0]
        assert title == f"# Tokenizer comparison on {name} (generic catalog: items.jsonl, queries.jsonl)"
    plan_files = ("experiments/compare.yaml", "experiments/sets/dvc.yaml", "experiments/dvc.lock",
                  "experiments/sets/dvc.lock")
    assert all(str(work) not in (root / name).read_text() for name in plan_files)

    elsewhere = tmp_path / "second"
    shutil.copytree(work, elsewhere, symlinks=True)
    shutil.rmtree(work)
    copy = elsewhere / "project"
    plan = {name: (copy / name).read_bytes() for name in plan_files}
    assert _stale(copy) == set()
    for name in catalogs:
        files = [elsewhere / "catalogs" / name / path.name for path in catalogs[name]]
        assert compare(copy, files, f"outputs-{name}")["stages_run"] == 0
    assert {name: (copy / name).read_bytes() for name in plan_files} == plan
