"""`sa2crq compare` on DVC: the comparison's runs are stages of experiments/dvc.yaml.

DVC decides what is stale; this module only writes what DVC reads. A comparison ("set") is
one out_dir: `outputs` (params.yaml's dataset; prepared/ and embeddings/ come from dvc.yaml's
prepare and embed), `outputs-cf` (`-s dataset=climate-fever -s out_dir=outputs-cf`), or any
out_dir a user compares a catalog in (the set then has prepare and embed stages of its own).
`sa2crq compare` writes the set into experiments/compare.yaml: its command and overrides, one
entry per (variant, seed) run and per baseline, and for each the params it reads
(flows.compare.variant_keys / eval_keys / baseline_keys), which are the stages' DVC params.
Then it runs `dvc repro` on the set's aggregate stage, which brings up to date every run, baseline
and input it reads, and shows the progress. Each stage re-reads params.yaml with the set's
overrides and stops if compare.yaml no longer matches them (edited params.yaml, then a bare
`dvc repro`): a run never trains on params other than the ones DVC recorded. The plan holds paths
relative to the project (`portable`), so a clone with the data at the same relative place resumes it.

Only the full comparison (every variant, seed and baseline params.yaml lists, `subset_of`) writes
the committed plan and results/<dataset>.json. A subset (`--variants TIGER -s eval.seeds=[0]`) is
planned in experiments/scratch/ (not committed; DVC refuses git-ignored stage files) as the set
'<set>__subset', runs in <out_dir>/<compare_dir>/_subset/ and writes its results file there (or to
`--results FILE`): a quick look never replaces the headline table or its plan.
"""
from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml
from tqdm import tqdm

from components.runtime.atomic import atomic_path
from components.runtime.config import load_params
from components.runtime.errors import ConfigError, Sa2crqError, UnknownNameError
from components.runtime.paths import out_path
from components.runtime.stage_deps import ImportGraph, code_diff, is_code, sync_dvc_file
from flows.compare import (
    TRAIN_STEPS,
    aggregate,
    baseline_file,
    baseline_keys,
    curves_file,
    dataset_title,
    eval_keys,
    evaluate_variant,
    pick_variants,
    recall_file,
    results_file,
    results_name,
    run_baseline,
    seeded,
    train_variant,
    variant_keys,
    variant_params,
)
from flows.step_io import PIPELINE_OUT

DVC_FILE = Path("experiments/dvc.yaml")
PLAN = DVC_FILE.with_name("compare.yaml")
SETS_FILE = DVC_FILE.parent / "sets" / "dvc.yaml"   # per set: aggregate_<set> (+ prepare_<set>, embed_<set>)
# plan sections keyed by stage item; the *_keys sections are the stages' params
SECTIONS = ("sets", "runs", "baselines", "input_keys", "variant_keys", "eval_keys", "baseline_keys",
            "aggregate_keys")
# what each kind of comparison stage runs (`sa2crq compare-step KIND`); its code deps are the modules these
# import (components/runtime/stage_deps.py), in experiments/dvc.yaml and sets/dvc.yaml alike (`sa2crq deps`)
CODE_ROOTS = {
    "prepare": ("step:prepare",),
    "embed": ("step:embed",),
    "train": ("flows.compare:train_variant", *(f"step:{step}" for step in TRAIN_STEPS)),
    "evaluate": ("flows.compare:evaluate_variant",),
    "baseline": ("flows.compare:run_baseline",),
    "aggregate": ("flows.compare:aggregate",),
}
CODE_DIR = Path(__file__).resolve().parents[1]   # the project these modules are in
TABLES = ("results.md", "results_long.csv", "summary.csv", "summary.json", "sid_stats.csv", "curves.csv", "curves.png")
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)   # libyaml: the committed plan is 2,000+ lines
HEADER = ("# Written by `sa2crq compare` (flows/compare_dvc.py); read by experiments/dvc.yaml. Do not edit:\n"
          "# change params.yaml or the command's -s flags and run `sa2crq compare` again.\n")
SCRATCH_HEADER = ("# Written by `sa2crq compare` for a comparison of a subset (flows/compare_dvc.py). Not committed:\n"
                  "# delete experiments/scratch/ any time; the full comparison's plan is experiments/compare.yaml.\n")
SUBSET = "__subset"      # a subset's set id: '<set>__subset' (key() never gives '__', so no out_dir's id)
SWEEP = "__sweep"        # a sweep's set id: '<set>__sweep' (flows/sweep_flow.py: grid points as variants)
SCRATCH_SETS = (SUBSET, SWEEP)   # the set ids planned in experiments/scratch/
SUBSET_DIR = "_subset"   # under <out_dir>/<compare_dir>/ (slug() never starts a variant's folder with '_')
# the params that choose what a comparison covers: a subset of params.yaml's lists is planned in scratch
SELECTION = ("eval.variants", "eval.seeds", "eval.baselines", "profile")


@dataclass(frozen=True)
class PlanFiles:
    """Where a set's plan lives: its compare.yaml, the dvc.yaml of its set stages and of its run stages."""

    plan: Path
    sets: Path
    runs: Path


COMMITTED = PlanFiles(PLAN, SETS_FILE, DVC_FILE)
_SCRATCH_DVC = DVC_FILE.parent / "scratch" / "dvc.yaml"   # the run stages (DVC_FILE's, rewritten) and the set stages
SCRATCH = PlanFiles(_SCRATCH_DVC.with_name("compare.yaml"), _SCRATCH_DVC, _SCRATCH_DVC)


def scratch_suffix(sid: str) -> str:
    """'__subset' or '__sweep' for a set planned in experiments/scratch/, '' for a committed one."""
    return next((suffix for suffix in SCRATCH_SETS if sid.endswith(suffix)), "")


def plan_files(sid: str) -> PlanFiles:
    """The files of a set: a subset's and a sweep's live in experiments/scratch/."""
    return SCRATCH if scratch_suffix(sid) else COMMITTED


def key(text: str) -> str:
    """A stage-name-safe key: 'SA2CRQ (own scorer)' -> 'sa2crq_own_scorer', 'outputs-cf' -> 'outputs_cf'."""
    return re.sub(r"[^a-z0-9]+", "_", str(text).lower()).strip("_")


def _inside(path: str, name: str) -> str:
    """`path` relative to the project root: DVC tracks outputs inside the project only."""
    out = Path(path)
    rel = Path(os.path.relpath(out.resolve(), Path.cwd().resolve())) if out.is_absolute() else out
    if rel.parts[:1] == ("..",) or not rel.parts:
        raise ConfigError(name, f"{out}: `sa2crq compare` keeps its outputs in DVC, so this must be a folder "
                                "inside the project (e.g. -s out_dir=outputs-mine)")
    return rel.as_posix()


def input_keys(params: dict) -> dict:
    """What prepare and embed read (the catalog's name aside): a set whose inputs differ from dvc.yaml's needs
    an out_dir of its own."""
    from flows.compare import NOT_RUN_EMBED_KEYS, drop_naming

    return drop_naming({"dataset": params["dataset"], "data": copy.deepcopy(params["data"]),
                        "embed": {k: v for k, v in params["embed"].items() if k not in NOT_RUN_EMBED_KEYS}})


def stage_kind(stage: str) -> str:
    """What a comparison stage runs, by its name: compare_train (experiments/dvc.yaml) -> train,
    aggregate_outputs_cf (sets/dvc.yaml) -> aggregate."""
    return stage.removeprefix("compare_") if stage.startswith("compare_") else stage.split("_", 1)[0]


def code_deps(kind: str) -> list[str]:
    """The code deps of a comparison stage of this kind: every project module it imports, read from the
    code that runs (CODE_DIR), whatever folder the plan is written in."""
    return ImportGraph(CODE_DIR).code_deps(CODE_ROOTS[kind])


def _input_deps(params: dict) -> list[str]:
    if params["dataset"] == "generic":
        files = [params["data"]["generic"][k] for k in ("items", "queries")]
        missing = [f for f in files if not f or not Path(f).is_file()]
        if missing:
            raise ConfigError("data.generic", f"dataset generic reads data.generic.items and .queries; "
                                              f"no such file: {missing}")
    else:
        files = [params["data"]["root"]]
    return [*files, *code_deps("prepare")]


def _input_sets(sid: str) -> list[tuple[str, PlanFiles]]:
    """The sets whose prepare / embed stages a scratch set may read instead of its own: its out_dir's
    committed set, then the other scratch set of that out_dir (one stage writes an out_dir's prepared/)."""
    base = sid.removesuffix(scratch_suffix(sid))
    return [(base, COMMITTED), *((base + suffix, SCRATCH) for suffix in SCRATCH_SETS if base + suffix != sid)]


def _shared_inputs(sid: str, out_dir: str, params: dict) -> bool:
    """Whether a scratch set reads the inputs another set of its out_dir prepares (stopping when they are
    another catalog's: one out_dir holds one prepared catalog)."""
    for owner, files in _input_sets(sid):
        stored = read_plan(files)["input_keys"].get(owner)
        if stored is None:
            continue
        if stored != input_keys(params):
            raise ConfigError("out_dir", f"{out_dir}/ holds the prepared data of comparison {owner!r} "
                                         f"({files.plan}); a comparison on other data or embeddings needs an out_dir "
                                         "of its own (e.g. -s out_dir=outputs-mine)")
        return True
    return False


def plan_set(params: dict, params_file: str, overrides: list[str], variants: list[dict], command: str,
             subset: bool = False, results: str | None = None, suffix: str = SUBSET) -> tuple[str, dict]:
    """The set of these params: its id and its entry in every plan section. A `subset` set has the id
    '<set>__subset' (`suffix`; a sweep's: '<set>__sweep') and writes its results file to `results`, or to
    results.json in its compare_dir (run_compare gives it params whose eval.compare_dir is <compare_dir>/_subset)."""
    out_dir = _inside(params["out_dir"], "out_dir")
    sid = key(out_dir) + (suffix if subset else "")
    files = plan_files(sid)
    ev = params["eval"]
    seeds = [int(s) for s in ev["seeds"]]
    plan: dict = {name: {} for name in SECTIONS}
    stages: dict = {}   # the set's stages in its sets file
    if os.path.normpath(out_dir) == PIPELINE_OUT:
        main = load_params(params_file)
        if input_keys(main) != input_keys(params):
            raise ConfigError("out_dir", f"{out_dir}/ holds dvc.yaml's prepared data for {params_file} as it is; "
                                         "a comparison on other data or embeddings needs an out_dir of its own "
                                         "(e.g. -s out_dir=outputs-mine)")
    elif subset and _shared_inputs(sid, out_dir, params):
        pass          # the prepare / embed stages of another set of this out_dir
    else:
        plan["input_keys"][sid] = input_keys(params)
        keys = [{files.plan.as_posix(): [f"input_keys.{sid}"]}]
        stages[f"prepare_{sid}"] = {"cmd": f"sa2crq compare-step prepare --set {sid}", "wdir": "../..",
                                    "deps": _input_deps(params), "params": keys, "outs": [f"{out_dir}/prepared"]}
        stages[f"embed_{sid}"] = {"cmd": f"sa2crq compare-step embed --set {sid}", "wdir": "../..",
                                  "deps": [f"{out_dir}/prepared", *code_deps("embed")], "params": keys,
                                  "outs": [f"{out_dir}/embeddings"]}
    rel = dict(params, out_dir=out_dir)
    deps = [f"{out_dir}/prepared", f"{out_dir}/embeddings"]
    for variant in variants:
        vkey = key(variant["name"])
        p = variant_params(rel, variant, seeds[0])
        plan["variant_keys"][f"{sid}-{vkey}"] = variant_keys(p)
        plan["eval_keys"][f"{sid}-{vkey}"] = eval_keys(p)
        for seed in seeds:
            run_dir = Path(variant_params(rel, variant, seed)["out_dir"]).as_posix()
            plan["runs"][f"{sid}-{vkey}-s{seed}"] = {"set": sid, "variant": vkey, "seed": seed, "out_dir": out_dir,
                                                     "dir": run_dir}
            deps += [f"{run_dir}/eval", f"{run_dir}/plots"]
    for name in ev["baselines"]:
        plan["baseline_keys"][f"{sid}-{name}"] = baseline_keys(rel, name)
        for seed in (seeds if seeded(name) else seeds[:1]):
            bid = f"{sid}-{name}" + (f"-s{seed}" if seeded(name) else "")
            file = baseline_file(rel, name, seed).as_posix()
            plan["baselines"][bid] = {"set": sid, "name": name, "seed": seed, "out_dir": out_dir, "file": file}
            deps.append(file)
    if not subset:
        results = f"{_inside(str(ev['results_dir'] or 'results'), 'eval.results_dir')}/{results_name(rel)}.json"
    elif results is None:
        results = f"{out_dir}/{ev['compare_dir']}/results.json"
    tables = [f"{out_dir}/{ev['compare_dir']}/{name}" for name in TABLES]
    plan["sets"][sid] = {
        "out_dir": out_dir, "params_file": params_file, "overrides": list(overrides), "command": command,
        "variants": [v["name"] for v in variants], "results": results}
    stages[f"aggregate_{sid}"] = {
        "cmd": f"sa2crq compare-step aggregate --set {sid}", "wdir": "../..",
        "deps": deps + code_deps("aggregate"), "params": [{files.plan.as_posix(): [f"aggregate_keys.{sid}"]}],
        "outs": tables + [{curves_file(Path(results)).as_posix(): {"cache": False}},
                          {recall_file(Path(results)).as_posix(): {"cache": False}}],
        "metrics": [{results: {"cache": False}}]}
    plan["stages"] = stages
    plan["aggregate_keys"][sid] = {
        "dataset": params["dataset"], "title": dataset_title(params), "command": command, "seeds": seeds,
        "variants": [v["name"] for v in variants], "baselines": list(ev["baselines"]),
        "eval": {k: ev[k] for k in ("ks", "deep_ks", "budgets", "headline_k", "compare_dir", "results_dir")},
        "retriever_beam": params["retriever"]["beam"]}
    return sid, plan


def read_plan(files: PlanFiles = COMMITTED) -> dict:
    if not files.plan.exists():
        return {name: {} for name in SECTIONS}
    plan = yaml.load(files.plan.read_text(), Loader=_LOADER) or {}
    return {name: dict(plan.get(name) or {}) for name in SECTIONS}


def _set_entries(plan: dict, sid: str) -> dict:
    """One set's entries of every section (keys are the set id or start with '<set id>-')."""
    return {name: {k: v for k, v in plan[name].items() if k == sid or k.startswith(f"{sid}-")} for name in SECTIONS}


def _all_stages(files: PlanFiles) -> dict:
    """Every stage in a plan's sets file (in scratch, the run stages too)."""
    if not files.sets.exists():
        return {}
    return dict((yaml.load(files.sets.read_text(), Loader=_LOADER) or {}).get("stages") or {})


def _set_stages(sid: str | None, files: PlanFiles = COMMITTED) -> dict:
    """One set's stages in its sets file (None: every set's)."""
    stages = {name: stage for name, stage in _all_stages(files).items() if "foreach" not in stage}
    if sid is None:
        return stages
    return {name: stages[name] for name in _stage_keys(sid) if name in stages}


def _stage_keys(sid: str) -> list[str]:
    return [f"{kind}_{sid}" for kind in ("prepare", "embed", "aggregate")]


class _PlainDumper(getattr(yaml, "CSafeDumper", yaml.SafeDumper)):
    """No anchors / aliases: a value two entries share is written out in both (the file reads and
    diffs the same whatever objects the params happened to share)."""

    def ignore_aliases(self, data: object) -> bool:
        return True


def _dump(path: Path, data: dict, flow: bool | None) -> None:
    header = SCRATCH_HEADER if path.parent == SCRATCH.plan.parent else HEADER
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(header + yaml.dump(data, Dumper=_PlainDumper, sort_keys=False, default_flow_style=flow,
                                          width=120))


def _replace(old: dict, mine, new: dict) -> dict:
    """`old` with the entries `mine` picks replaced by `new`, where the first of them was: rewriting
    a set leaves the files' order (and their diff) alone."""
    out: dict = {}
    placed = False
    for k, v in old.items():
        if not mine(k):
            out[k] = v
        elif not placed:
            out.update(new)
            placed = True
    if not placed:
        out.update(new)
    return out


def _scratch_run_stages() -> dict:
    """experiments/dvc.yaml's run stages (train, evaluate, baseline), reading the scratch plan: a
    subset's runs are stages of experiments/scratch/dvc.yaml, so they never touch the committed lock."""
    stages = (yaml.safe_load(DVC_FILE.read_text()) or {})["stages"]
    out = {}
    for name, stage in stages.items():
        do = dict(stage["do"], wdir="../..")
        do["params"] = [{SCRATCH.plan.as_posix() if path == PLAN.as_posix() else path: keys
                         for path, keys in entry.items()} for entry in do.get("params") or []]
        out[name] = dict(stage, do=do)
    return out


def _outs(stage: dict) -> list[str]:
    return [next(iter(out)) if isinstance(out, dict) else out
            for out in (stage.get("metrics") or []) + (stage.get("outs") or [])]


def _check_outs(sid: str, stages: dict, generic: bool) -> None:
    """Stop before DVC does when another set's stage writes one of this set's outputs (DVC refuses a
    path that two stages write: a second comparison of the same dataset or catalog name, or --results naming
    another's file), saying what gives this one files of its own (another out_dir would not)."""
    owner = {out: name for files in (COMMITTED, SCRATCH) for name, stage in _set_stages(None, files).items()
             if name not in _stage_keys(sid) for out in _outs(stage)}
    if scratch_suffix(sid):
        way_out = "give this subset's results a file of its own (--results FILE)"
    else:
        way_out = ("give this catalog a name of its own (-s data.generic.name=NAME) or " if generic else "") + \
            "write its results to another folder (-s eval.results_dir=FOLDER)"
    for stage in stages.values():
        for out in _outs(stage):
            if out in owner:
                raise Sa2crqError(f"{out}: already written by stage {owner[out]!r} of another comparison; {way_out}")


def _release_inputs(sid: str) -> None:
    """The committed set `sid` now prepares and embeds its out_dir: its subset's and sweep's own input stages go."""
    plan = read_plan(SCRATCH)
    scratch = [sid + suffix for suffix in SCRATCH_SETS if sid + suffix in plan["input_keys"]]
    if not scratch:
        return
    for name in scratch:
        del plan["input_keys"][name]
    _dump(SCRATCH.plan, plan, None)
    gone = {f"{kind}_{name}" for name in scratch for kind in ("prepare", "embed")}
    stages = {k: v for k, v in _all_stages(SCRATCH).items() if k not in gone}
    _dump(SCRATCH.sets, {"vars": ["compare.yaml"], "stages": stages}, False)


def write_plan(sid: str, entries: dict) -> None:
    """Replace one set's entries in its compare.yaml and its stages in its sets file, keeping the other sets'."""
    files = plan_files(sid)
    if files is COMMITTED and sid in entries["input_keys"]:
        _release_inputs(sid)
    _check_outs(sid, entries["stages"], entries["aggregate_keys"][sid]["dataset"] == "generic")
    plan = read_plan(files)
    for name in SECTIONS:
        plan[name] = _replace(plan[name], lambda k: k == sid or k.startswith(f"{sid}-"), entries[name])
    _dump(files.plan, plan, None)
    _write_sets(files, _replace(_set_stages(None, files), lambda k: k in _stage_keys(sid), entries["stages"]))


def _write_sets(files: PlanFiles, stages: dict) -> None:
    """The sets file: the sets' stages (in scratch, after experiments/dvc.yaml's run stages)."""
    if files is SCRATCH:
        _dump(files.sets, {"vars": ["compare.yaml"], "stages": {**_scratch_run_stages(), **stages}}, False)
        return
    _dump(files.sets, {"stages": stages}, False)


def sync_code_deps(check: bool = False) -> dict[str, dict[str, list[str]]]:
    """Rewrite the code deps of every comparison stage from CODE_ROOTS: experiments/dvc.yaml's run stages
    (its comments kept) and the sets' stages, as plan_set writes them (so load_set finds its plan
    unchanged). Returns the stages whose code deps were off (`check`: and changes nothing)."""
    run_stages = (yaml.safe_load(DVC_FILE.read_text()) or {})["stages"]
    off = sync_dvc_file(DVC_FILE, {name: CODE_ROOTS[stage_kind(name)] for name in run_stages}, check, CODE_DIR)
    for files in (COMMITTED, SCRATCH):
        stages, changed = _set_stages(None, files), False
        for name, stage in stages.items():
            want = code_deps(stage_kind(name))
            diff = code_diff(want, stage["deps"])
            if diff is not None:
                off[f"{files.sets.as_posix()}:{name}"], changed = diff, True
                stage["deps"] = [d for d in stage["deps"] if not is_code(d)] + want
        if changed and not check:
            _write_sets(files, stages)
    return off


def load_set(sid: str) -> tuple[dict, list[dict], dict]:
    """A stage's view of its set: params.yaml with the set's overrides, its variants and its plan entry.

    Stops when the plan was written for other params than the params file now gives."""
    files = plan_files(sid)
    plan = read_plan(files)
    entry = plan["sets"].get(sid)
    if entry is None:
        raise UnknownNameError(f"{files.plan}: no comparison {sid!r} (sets: {', '.join(plan['sets']) or 'none'}); "
                               "run `sa2crq compare`")
    params = load_params(entry["params_file"], entry["overrides"])
    by_name = {v["name"]: v for v in params["eval"]["variants"] or []}
    chosen = [by_name[n] for n in entry["variants"] if n in by_name]
    subset = files is SCRATCH
    _, fresh = plan_set(params, entry["params_file"], entry["overrides"], chosen, entry["command"], subset=subset,
                        results=entry["results"] if subset else None, suffix=scratch_suffix(sid))
    stored = {**_set_entries(plan, sid), "stages": _set_stages(sid, files)}
    if stored != fresh:
        section = next(name for name in fresh if stored[name] != fresh[name])
        raise Sa2crqError(f"{files.plan}: section {section!r} of comparison {sid!r} no longer matches "
                          f"{entry['params_file']}; run `sa2crq compare` (it rewrites the plan, then DVC reruns "
                          "what changed)")
    return params, chosen, entry


def run_step(kind: str, sid: str, variant: str | None = None, seed: int | None = None,
             baseline: str | None = None) -> dict:
    """`sa2crq compare-step KIND --set S ...`: what one stage of experiments/dvc.yaml runs."""
    from components.pipeline.stages import get_step

    params, variants, entry = load_set(sid)
    if kind in ("prepare", "embed"):
        get_step(kind)(params)
        return {"step": kind, "set": sid}
    if kind == "aggregate":
        table = aggregate(params, variants, params["eval"]["seeds"], entry["command"], results=Path(entry["results"]))
        return {"set": sid, "methods": list(dict.fromkeys(table.index.get_level_values(0))),
                "results": entry["results"]}
    if seed is None:
        raise UnknownNameError(f"compare-step {kind}: --seed is required")
    if kind == "baseline":
        run_baseline(params, str(baseline), int(seed))
        return {"baseline": baseline, "seed": seed}
    chosen = [v for v in variants if key(v["name"]) == variant]
    if not chosen:
        raise UnknownNameError(f"comparison {sid!r} has no variant {variant!r}; "
                               f"variants: {', '.join(key(v['name']) for v in variants)}")
    if kind == "train":
        train_variant(params, chosen[0], int(seed))
    elif kind == "evaluate":
        evaluate_variant(params, chosen[0], int(seed))
    else:
        raise UnknownNameError(f"compare-step {kind!r}: one of prepare, embed, train, evaluate, baseline, aggregate")
    return {kind: chosen[0]["name"], "seed": seed}


def stage_names(sid: str, plan: dict) -> list[str]:
    """Every stage of one set (DVC targets), upstream first."""
    files = plan_files(sid)
    runs = [r for r, item in plan["runs"].items() if item["set"] == sid]
    names = [f"compare_train@{r}" for r in runs] + [f"compare_evaluate@{r}" for r in runs]
    names += [f"compare_baseline@{b}" for b, item in plan["baselines"].items() if item["set"] == sid]
    own = [f"{files.sets}:{kind}_{sid}" for kind in ("prepare", "embed") if sid in plan["input_keys"]]
    return own + [f"{files.runs}:{name}" for name in names] + [f"{files.sets}:aggregate_{sid}"]


def input_stages(sid: str, plan: dict) -> list[str]:
    """The stages that prepare and embed a set's out_dir: its own, another set's of that out_dir (a scratch
    set's), or dvc.yaml's."""
    others = _input_sets(sid) if scratch_suffix(sid) else []
    owner, files = next(((o, f) for o, f in [(sid, plan_files(sid)), *others] if o in read_plan(f)["input_keys"]),
                        (None, None))
    if owner is None:
        return ["prepare", "embed"]
    return [f"{files.sets}:{kind}_{owner}" for kind in ("prepare", "embed")]


def _stage_files() -> list[Path]:
    return [DVC_FILE, SETS_FILE] + ([SCRATCH.sets] if SCRATCH.sets.exists() else [])


def _dvc(args: list[str]) -> list[str]:
    """dvc from this interpreter's environment (the stages' `sa2crq` lives beside it)."""
    exe = Path(sys.executable).with_name("dvc")
    return [str(exe) if exe.exists() else "dvc", *args]


def _dvc_env() -> dict:
    return dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


def _again(sid: str, plan: dict) -> str:
    """The command that planned the set (`sa2crq compare ...` or `sa2crq sweep ...`), to run again."""
    return f"`{plan['sets'].get(sid, {}).get('command', 'sa2crq compare')}` with the same flags"


def repro(sid: str, plan: dict, targets: list[str] | None = None) -> int:
    """`dvc repro` of the set's aggregate stage (and so of everything it reads), or of `targets`,
    with a progress bar: one tick per stage DVC checks, named while it runs; the stages' own output
    passes through. Returns how many stages ran."""
    names = stage_names(sid, plan)
    total = len(names) + (0 if sid in plan["input_keys"] else 2)   # the inputs of dvc.yaml or the committed set
    cmd = _dvc(["repro", *(targets or [f"{plan_files(sid).sets}:aggregate_{sid}"])])
    print(f"+ dvc {' '.join(cmd[1:])}", flush=True)
    stage_line = re.compile(r"^(?:Running stage|Stage) '([^']+)'")
    ran = 0
    with tqdm(total=total if targets is None else None, desc=f"compare {sid}", unit="stage", file=sys.stderr) as bar, \
            subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_dvc_env()) as proc:
        for line in proc.stdout:
            match = stage_line.match(line)
            if match:
                bar.update(1)
                bar.set_postfix_str(match.group(1).split(":")[-1])
                ran += line.startswith("Running stage")
            if not line.startswith("Stage '"):           # "didn't change, skipping": the bar says it
                tqdm.write(line.rstrip("\n"), file=sys.stdout)
        rc = proc.wait()
    if rc != 0:
        raise Sa2crqError(f"{plan_files(sid).sets}: `dvc repro` of comparison {sid!r} stopped (its error is above); "
                          f"{_again(sid, plan)} resumes, finished stages are kept")
    return ran


def _status(targets: list[str]) -> dict:
    """`dvc status --json` of these targets: the changed ones, with what changed."""
    if not targets:
        return {}
    proc = subprocess.run(_dvc(["status", "--json", *targets]), capture_output=True, text=True, env=_dvc_env())
    if proc.returncode != 0:
        raise Sa2crqError(f"{DVC_FILE}: `dvc status` failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(proc.stdout or "{}")


def _stale(targets: list[str]) -> list[str]:
    """The targets `dvc status` reports changed (deps, params, outs or command)."""
    changed = _status(targets)
    return [t for t in targets if t in changed]


def repro_parallel(sid: str, plan: dict, jobs: int) -> int:
    """The set's stale runs, `jobs` at a time (`dvc repro` runs one stage at a time): first the
    inputs, then wave by wave (every stale train stage, then evaluate, then baseline) each stage's
    own command in a process of its own, recorded with `dvc commit` as `dvc repro` records it; then
    `dvc repro` of the aggregate, which finds the runs up to date."""
    from concurrent.futures import ThreadPoolExecutor

    from dvc.repo import Repo

    names = stage_names(sid, plan)
    ran = repro(sid, plan, input_stages(sid, plan))
    with Repo() as repo:
        stages = {stage.addressing: stage for path in _stage_files() for stage in repo.stage.collect(str(path))}
    for kind in ("train", "evaluate", "baseline"):
        stale = _stale([n for n in names if f":compare_{kind}@" in n])
        if not stale:
            continue

        def run(name: str) -> int:
            stage = stages[name]
            for out in stage.outs:                        # as dvc repro does: no leftovers of the last run
                path = Path(out.fs_path)
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
            return subprocess.call(stage.cmd, shell=True, cwd=stage.wdir, env=_dvc_env())

        with tqdm(total=len(stale), desc=f"compare {sid} {kind}", unit="stage", file=sys.stderr) as bar, \
                ThreadPoolExecutor(max_workers=jobs) as pool:
            codes = []
            for code in pool.map(run, stale):
                bar.update(1)
                codes.append(code)
        done = [n for n, code in zip(stale, codes) if code == 0]
        failed = [n.split(":")[-1] for n, code in zip(stale, codes) if code != 0]
        if done and subprocess.call(_dvc(["commit", "--force", "--quiet", *done]), env=_dvc_env()) != 0:
            raise Sa2crqError(f"{plan_files(sid).runs}: `dvc commit` of comparison {sid!r} failed (its error is above)")
        if failed:
            raise Sa2crqError(f"{plan_files(sid).runs}: comparison {sid!r}: {', '.join(failed)} failed (errors above); the "
                              f"others are recorded, {_again(sid, plan)} resumes")
        ran += len(stale)
    return ran + repro(sid, plan)


def stage_outs(repo, kind: str = "outs") -> dict[str, list[str]]:
    """The outputs (or `kind="deps"`: dependencies) of every comparison stage, by DVC target (one
    parse of each file: collecting stage by stage re-parses it each time)."""
    return {stage.addressing: [item.fs_path for item in getattr(stage, kind)]
            for path in _stage_files() for stage in repo.stage.collect(str(path))}


def unrecorded_runs(sid: str, plan: dict) -> list[str]:
    """Trained runs on disk that DVC would train again: missing from the set's dvc.lock (finished
    before the comparison ran on DVC) or with outputs that differ from it (trained outside DVC)."""
    from dvc.repo import Repo

    lock_file = plan_files(sid).runs.with_name("dvc.lock")
    locked = (yaml.load(lock_file.read_text(), Loader=_LOADER) or {}).get("stages", {}) if lock_file.exists() else {}
    with Repo() as repo:
        outs = stage_outs(repo)
    trains = [n for n in stage_names(sid, plan) if ":compare_train@" in n]
    on_disk = [n for n in trains if all(Path(out).exists() for out in outs[n])]
    unlocked = [n for n in on_disk if n.split(":", 1)[1] not in locked]
    modified = [n for n, changes in _status([n for n in on_disk if n not in unlocked]).items()
                if any("modified" in change.get("changed outs", {}).values() for change in changes
                       if isinstance(change, dict))]
    return unlocked + modified


def adopt(sid: str, plan: dict) -> dict:
    """Record the set's finished runs as they are (`dvc commit`): stages whose outputs and inputs
    all exist enter experiments/dvc.lock and the DVC cache without running; the others will run
    (an aggregate over a variant that has not run yet, too)."""
    from dvc.repo import Repo

    done, missing = [], []
    with Repo() as repo:
        outs, deps = stage_outs(repo), stage_outs(repo, "deps")
        for name in stage_names(sid, plan):
            (done if all(Path(path).exists() for path in outs[name] + deps[name]) else missing).append(name)
    if done:
        rc = subprocess.call(_dvc(["commit", "--force", *done]), env=_dvc_env())
        if rc != 0:
            raise Sa2crqError(f"{plan_files(sid).runs}: `dvc commit` of comparison {sid!r} failed (its error is above)")
    return {"adopted": len(done), "to_run": missing}


def compare_command(params_file: str, overrides: list[str], names: str | None) -> str:
    """The command the results file names: what decides the results (params file, variants,
    overrides), however it was typed (`--jobs`, `--adopt` or `python -m` aside)."""
    args = ["sa2crq", "compare"] + (["--params", params_file] if params_file != "params.yaml" else [])
    args += ["--variants", names] if names is not None else []
    args += [x for o in overrides for x in ("-s", o)]
    return " ".join(map(shlex.quote, args))


def _selects(override: str) -> bool:
    """Whether a -s override chooses what the comparison covers (SELECTION, or a section holding one)."""
    name = override.partition("=")[0].strip()
    return any(name == sel or sel.startswith(f"{name}.") or name.startswith(f"{sel}.") for sel in SELECTION)


def subset_of(params: dict, params_file: str, overrides: list[str], variants: list[dict]) -> list[str]:
    """How this comparison falls short of the full one, params_file's own eval.variants, eval.seeds and
    eval.baselines under its own profile (the other overrides kept: -s dataset=climate-fever is still
    full); empty for the full comparison. Order does not matter; a variant counts with its params."""
    ref = load_params(params_file, [o for o in overrides if not _selects(o)])["eval"]
    ev, own_variants = params["eval"], list(ref.get("variants") or [])
    canon = lambda items: sorted(json.dumps(i, sort_keys=True, default=str) for i in items)  # noqa: E731
    differs = []
    if canon(variants) != canon(own_variants):
        differs.append(f"variants {[v['name'] for v in variants]} of {len(own_variants)}")
    for name in ("seeds", "baselines"):
        if canon(ev[name]) != canon(ref[name]):
            differs.append(f"{name} {list(ev[name])} of {list(ref[name])}")
    return differs


def _relative(path: str) -> str:
    """An absolute path relative to the project root (the current folder), '..' where it lies outside."""
    try:
        return Path(os.path.relpath(path, Path.cwd())).as_posix()
    except ValueError:      # another drive (Windows): no relative path
        return path


def portable(params_file: str, overrides: list[str]) -> tuple[str, list[str]]:
    """The params file and the -s overrides with every absolute path made relative to the project root, as the
    plan and the results file's command keep them: a clone on another machine with the data at the same
    relative place resumes the plan, and typing a path absolute or relative plans the same set."""
    def value(override: str) -> str:
        name, sep, raw = override.partition("=")
        return f"{name}{sep}{_relative(raw.strip())}" if sep and os.path.isabs(raw.strip()) else override

    return (_relative(params_file) if os.path.isabs(params_file) else params_file), [value(o) for o in overrides]


def _scratch_results(path: str, full: str) -> str:
    """--results FILE: a .json inside the project (DVC records it) that is not the full comparison's."""
    out = Path(path)
    rel = Path(os.path.relpath(out.resolve(), Path.cwd().resolve())) if out.is_absolute() else out
    if out.suffix != ".json" or rel.parts[:1] == ("..",):
        raise Sa2crqError(f"--results {path}: must be a .json file inside the project (DVC records it; the curves "
                          "go beside it as <name>-curves.png), e.g. --results outputs/my-look.json")
    if os.path.normpath(rel) == os.path.normpath(full):
        raise Sa2crqError(f"--results {path}: that is the full comparison's results file; a subset writes elsewhere")
    return rel.as_posix()


def run_compare(params: dict, params_file: str, overrides: list[str], opt_variants: str | None = None,
                opt_adopt: bool = False, opt_jobs: int = 1, opt_results: str | None = None) -> dict:
    """`sa2crq compare`: write the set's plan, then `dvc repro` it, `opt_jobs` runs at a time (or,
    with --adopt, record the runs already on disk without running anything).

    The full comparison writes the committed plan and results/<dataset>.json; a subset (subset_of)
    runs as '<set>__subset' in experiments/scratch/ and <out_dir>/<compare_dir>/_subset/, writing
    its results file there or to `opt_results`, and says so before it starts. Absolute paths in the params
    file's name and the overrides are planned relative to the project (portable)."""
    if not DVC_FILE.exists():
        raise FileNotFoundError(f"{DVC_FILE}: missing (run `sa2crq compare` from the project root)")
    relative = portable(params_file, overrides)
    if relative != (params_file, list(overrides)):   # paths of this machine: the plan keeps them relative
        params_file, overrides = relative
        params = load_params(params_file, overrides)
    variants = pick_variants(list(params["eval"].get("variants") or []), opt_variants)
    if not variants and not params["eval"]["baselines"]:
        raise ConfigError("eval.variants", "no variants and no baselines to compare")
    command = compare_command(params_file, overrides, opt_variants)
    differs = subset_of(params, params_file, overrides, variants)
    full_results = results_file(params).as_posix()
    if not differs and opt_results:
        raise Sa2crqError(f"--results {opt_results}: this is the full comparison of {params_file}, it writes "
                          f"{full_results}; --results names the file of a subset (--variants, -s eval.seeds=[...], "
                          "-s eval.baselines=[...])")
    plan_overrides, results = list(overrides), None
    if differs:
        plan_overrides.append(f"eval.compare_dir={params['eval']['compare_dir']}/{SUBSET_DIR}")
        params = load_params(params_file, plan_overrides)
        results = _scratch_results(opt_results, full_results) if opt_results else None
    sid, entries = plan_set(params, params_file, plan_overrides, variants, command, subset=bool(differs),
                            results=results)
    write_plan(sid, entries)
    results = entries["sets"][sid]["results"]
    note = {"full": not differs}
    if differs:
        note["note"] = (f"a subset of {params_file}'s comparison ({'; '.join(differs)}): planned in "
                        f"{SCRATCH.plan.parent}/, results in {results}; {full_results} is written only by the "
                        "full comparison")
        print(f"sa2crq compare: {note['note']}", file=sys.stderr, flush=True)
    plan = read_plan(plan_files(sid))
    if opt_adopt:
        return {"set": sid, "plan": str(plan_files(sid).plan), **adopt(sid, plan), "results": results, **note}
    unrecorded = unrecorded_runs(sid, plan)
    if unrecorded:   # DVC would retrain them: hours of finished work
        names = ", ".join(n.split("@")[-1] for n in unrecorded[:3]) + (" ..." if len(unrecorded) > 3 else "")
        raise Sa2crqError(f"comparison {sid!r}: {len(unrecorded)} trained run(s) on disk that "
                          f"{plan_files(sid).runs.with_name('dvc.lock')} does not record ({names}); `sa2crq compare "
                          "--adopt` with the same flags records them as they are, or delete a run's folder to train "
                          "it again")
    ran = repro(sid, plan) if opt_jobs <= 1 else repro_parallel(sid, plan, opt_jobs)
    root = out_path(params, params["eval"]["compare_dir"])
    return {"set": sid, "stages_run": ran, "runs": len(variants) * len(params["eval"]["seeds"]),
            "markdown": str(root / "results.md"), "results": results, **note}
