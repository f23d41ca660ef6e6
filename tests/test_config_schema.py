"""The params schema and the error boundary: every bad value stops up front with one line, exit 2."""
from __future__ import annotations

import math
import os
import shutil
import socket
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from components.runtime import config_schema as schema
from components.runtime.config import deep_merge, load_params, resolve_params
from components.runtime.errors import ConfigError, Sa2crqError
from components.runtime.prefect_api import check_prefect_api
from flows.flow_params import apply_overrides
from sa2crq.cli import main

ROOT = Path(__file__).resolve().parents[1]
PARAMS = str(ROOT / "params.yaml")


@pytest.fixture(scope="module")
def base() -> dict:
    return load_params(PARAMS)


@pytest.fixture
def no_step(monkeypatch):
    """A bad value must stop before the step runs: running it fails the test."""
    def refuse(name):
        raise AssertionError(f"step {name} ran: the params check let a bad value through")

    monkeypatch.setattr("components.pipeline.stages.get_step", refuse)


# ---- params.yaml as committed ----------------------------------------------------------------


def test_committed_params_and_every_overlay_validate(base):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    schema.check_params(raw)
    for name, overlay in raw["profiles"].items():
        schema.check_params(deep_merge(raw, overlay), f"profiles.{name}.")
        for variant in overlay.get("eval", {}).get("variants", []):
            schema.check_params(deep_merge(deep_merge(raw, overlay), variant["params"] or {}), f"{variant['name']}: ")
    for variant in raw["eval"]["variants"]:
        schema.check_params(deep_merge(raw, variant["params"] or {}), f"{variant['name']}: ")
    assert load_params(PARAMS, ["profile=smoke"])["_profile"] == "smoke"


def test_schema_precisions_are_what_lightning_accepts():
    """Not a mirror of our own constant: Lightning's accepted precisions can change with its version."""
    from lightning.fabric.plugins.precision.precision import _PRECISION_INPUT

    lightning = {v for group in typing.get_args(_PRECISION_INPUT) for v in typing.get_args(group)}
    assert set(schema.PRECISIONS) == lightning


# ---- bad values: one line naming the key, exit 2 --------------------------------------------

PROBES = [
    # (override, key named, message part)
    ("profile=nope", "profile", "must be one of default | smoke, got 'nope'"),
    ("foo", "foo", "must look like key.path=value"),
    ("a=[1", "a", "cannot read '[1' as a YAML value"),
    ("data.max_users=abc", "data.max_users", "must be an integer >= 0 (0 = all), got 'abc'"),
    ("retriever.beam=ten", "retriever.beam", "must be an integer >= 1, got 'ten'"),
    ("retriever.beam=0", "retriever.beam", "must be an integer >= 1, got 0"),
    ("retriever.beam=-5", "retriever.beam", "got -5"),
    ("retriever.beam=2.5", "retriever.beam", "got 2.5"),
    ("retriever.batch_size=0", "retriever.batch_size", "must be an integer >= 1"),
    ("tokenizer.sarq.tau=-1", "tokenizer.sarq.tau", "must be auto or a number > 0"),
    ("tokenizer.sarq.tau=.nan", "tokenizer.sarq.tau", "got nan"),
    ("tokenizer.sarq.target_items_per_sid=0", "tokenizer.sarq.target_items_per_sid", "must be a number >= 1"),
    ("retriever.epochs=-1", "retriever.epochs", "must be an integer >= 1, got -1"),
    ("retriever.patience=-1", "retriever.patience", "(0 = no early stopping)"),
    ("retriever.bem=5", "retriever.bem", "unknown key (did you mean 'retriever.beam'?)"),
    ("retriever.fusion.sorces=none", "retriever.fusion.sorces", "did you mean 'retriever.fusion.sources'"),
    ("retriever.fusion.sources=[learned,dense]", "retriever.fusion.sources", "a list of distinct learned | zero_shot"),
    ("retriever.fusion.weights=[1,-1]", "retriever.fusion.weights", "must be auto or a list of numbers >= 0"),
    ("retriever.dropout=1", "retriever.dropout", "must be a number in [0, 1)"),
    ("retriever.item_head=yes please", "retriever.item_head", "must be true or false"),
    ("retriever.backbone=big", "retriever.backbone", "must be one of small | t5 | pretrained"),
    ("tokenizer.method=vq", "tokenizer.method", "must be one of rqkmeans | rqvae | acrq | sarq | sa2crq | import"),
    ("tokenizer.codebook_sizes=[]", "tokenizer.codebook_sizes", "must be a non-empty list of integers >= 1"),
    ("dataset=movies", "dataset", "must be one of amazon-scientific | climate-fever | generic"),
    ("eval.baselines=[bm25,bm26]", "eval.baselines", "must be a list from bm25 | dense"),
    ("eval.sasrec.dropout=[]", "eval.sasrec.dropout", "a non-empty list of them"),
    ("flows.retrain.grow_threshold=-1", "flows.retrain.grow_threshold", "must be auto, null (never grow)"),
    ("flows.sweep.report=5", "flows.sweep.report", "must be a list of metric key patterns"),
    ("retriever=5", "retriever", "must be a mapping of keys, got 5"),
    ("eval.variants=[{name: X, params: {retriever: {beam: 0}}}]", "eval.variants[0].params.retriever.beam",
     "must be an integer >= 1, got 0"),
    ("eval.variants=[{name: X, params: {}}, {name: X, params: {}}]", "eval.variants[1].name", "an earlier variant"),
    ("eval.variants=[{params: {}}]", "eval.variants[0].name", "missing"),
    ("eval.variants=[{nam: X, params: {}}]", "eval.variants[0].nam", "did you mean 'eval.variants[0].name'?"),
    ("profiles.smoke.retriever.beam=ten", "profiles.smoke.retriever.beam", "must be an integer >= 1, got 'ten'"),
    ("profiles.smoke.profile=default", "profiles.smoke.profile", "an overlay cannot choose or define profiles"),
    # keys valid alone that cannot work together: checked with the rest (check_across), not by the step
    ("retriever.fusion.weights=[0.5,0.5]", "retriever.fusion.weights", "one per source ['learned', 'zero_shot', 'bm25']"),
    ("tokenizer.sarq.max_len=9", "tokenizer.sarq.max_len", "9 exceeds the number of layers"),
    ("tokenizer.sarq.min_len=5", "tokenizer.sarq.min_len", "need 1 <= min_len <= max_len"),
    ("tokenizer.codebook_sizes=[64,32,192]", "tokenizer.codebook_sizes", "ACRQ needs non-decreasing sizes"),
    ("tokenizer.extension_sizes=[2,2]", "tokenizer.extension_sizes", "needs 3 non-negative integers (one per layer)"),
    ("tokenizer.collision_token=true", "tokenizer.collision_token", "only for fixed-length methods ('rqkmeans', 'rqvae')"),
    ("eval.headline_k=7", "eval.headline_k", "7 must be one of eval.ks [1, 5, 10"),
    ("serve.k_default=100000", "serve.k_default", "must be an integer between 1 and 100 (serve.k_max)"),
]


@pytest.mark.parametrize("override,key,part", PROBES, ids=[p[0] for p in PROBES])
def test_bad_value_exits_2_with_one_line_naming_the_key(override, key, part, no_step, capsys):
    assert main(["stage", "prepare", "--params", PARAMS, "-s", override]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"sa2crq: error: params.yaml '{key}': ")
    assert part in err


def test_bad_value_in_a_real_subprocess_is_one_line():
    """What a DVC stage runs: `sa2crq stage prepare`, here with a bad override."""
    exe = shutil.which("sa2crq")
    cmd = [exe] if exe else [sys.executable, "-m", "sa2crq.cli"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("SA2CRQ_DEBUG", None)
    run = subprocess.run(cmd + ["stage", "prepare", "-s", "retriever.beam=ten"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr == "sa2crq: error: params.yaml 'retriever.beam': must be an integer >= 1, got 'ten'\n"
    debug = subprocess.run(cmd + ["--debug", "stage", "prepare", "-s", "retriever.beam=ten"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "ConfigError" in debug.stderr


def test_debug_flag_and_env_reraise(no_step, monkeypatch):
    with pytest.raises(ConfigError, match="retriever.beam"):
        main(["--debug", "stage", "prepare", "--params", PARAMS, "-s", "retriever.beam=0"])
    with pytest.raises(ConfigError, match="retriever.beam"):
        main(["stage", "prepare", "--debug", "--params", PARAMS, "-s", "retriever.beam=0"])
    monkeypatch.setenv("SA2CRQ_DEBUG", "1")
    with pytest.raises(ConfigError, match="retriever.beam"):
        main(["stage", "prepare", "--params", PARAMS, "-s", "retriever.beam=0"])


def test_usage_errors_exit_2_and_bugs_keep_their_traceback(monkeypatch):
    for argv in (["stage"], ["nope"], ["candidates", "--a", "a", "--b", "b", "--queries", "q", "--k", "0"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2

    def buggy(params):
        raise RuntimeError("a bug")

    monkeypatch.setattr("components.pipeline.stages.get_step", lambda name: buggy)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["stage", "prepare", "--params", PARAMS])


def test_run_checks_params_before_dvc(monkeypatch, capsys):
    monkeypatch.setattr("subprocess.call", lambda cmd: pytest.fail(f"dvc ran: {cmd}"))
    assert main(["run", "--params", PARAMS, "--profile", "tiny"]) == 2
    assert "'profile': must be one of default | smoke, got 'tiny'" in capsys.readouterr().err


@pytest.mark.parametrize("text,problem", [("a: [1\n", "not readable as YAML"), ("- 1\n- 2\n", "must be a mapping"),
                                          ("a: 1\na: 2\n", "duplicate key")])
def test_unreadable_params_file_is_one_line(tmp_path, capsys, text, problem):
    (tmp_path / "params.yaml").write_text(text)
    assert main(["stage", "prepare", "--params", str(tmp_path / "params.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and problem in err and str(tmp_path / "params.yaml") in err


def test_every_key_is_required(base):
    params = deep_merge(base, {})
    del params["retriever"]["beam"]
    with pytest.raises(ConfigError, match=r"'retriever.beam': missing"):
        schema.check_params(params)


def test_a_variant_meeting_the_base_badly_is_refused_when_it_runs_not_on_load(base):
    """Cross-key checks (a method's lengths, a source needing the item scorer) judge the params a run
    resolves: a variant that chooses sarq over a base asking for TIGER's collision token loads with the
    base (other commands must not stop on it) and is refused, naming the key, once it is the run's root."""
    variant = {"name": "X", "params": {"tokenizer": {"method": "sarq"}}}
    over = resolve_params(base, ["tokenizer.method=rqvae", "tokenizer.collision_token=true",
                                 f"eval.variants=[{{name: X, params: {variant['params']}}}]"])
    with pytest.raises(ConfigError, match="'tokenizer.collision_token': only for fixed-length methods"):
        resolve_params(over, [{"tokenizer": {"method": "sarq"}}])


def test_typed_params_are_the_checked_sections_once_per_tree(base):
    """The steps read typed, frozen sections of the checked tree; one tree is checked once per process (the
    same object comes back), another tree (an override) gets its own, and a bad tree never gets one."""
    typed = schema.typed_params(base)
    assert typed.tokenizer.sarq.tau == base["tokenizer"]["sarq"]["tau"]
    assert typed.retriever.fusion.depth == base["retriever"]["fusion"]["depth"]
    assert schema.typed_params(deep_merge(base, {})) is typed
    other = schema.typed_params(resolve_params(base, ["retriever.fusion.depth=7"]))
    assert other.retriever.fusion.depth == 7 and typed.retriever.fusion.depth != 7
    with pytest.raises(Exception, match="frozen"):
        typed.retriever.fusion.depth = 3
    with pytest.raises(ConfigError, match="'retriever.fusion.depth': must be an integer >= 1"):
        schema.typed_params(deep_merge(base, {"retriever": {"fusion": {"depth": 0}}}))


# ---- accepted values ------------------------------------------------------------------------

GOOD = ["tokenizer.sarq.tau=auto", "tokenizer.sarq.tau=.inf", "tokenizer.sarq.tau=3",
        "tokenizer.sarq.target_items_per_sid=2.5", "retriever.lr=1e-3", "retriever.patience=0",
        "retriever.fusion.sources=none", "retriever.fusion.sources=[zero_shot]", "retriever.fusion.weights=[0.4,0.3,0.2,0.1]",
        "flows.retrain.grow_threshold=null", "flows.retrain.lr=0.001", "eval.sasrec.dropout=0.3", "data.max_users=0",
        "retriever.trainer.precision=bf16-mixed", "retriever.trainer.devices=auto", "eval.variants=[]",
        "eval.baselines=[]"]


@pytest.mark.parametrize("override", GOOD)
def test_documented_values_are_accepted(base, override):
    resolve_params(base, [override])


def test_yaml_numbers_follow_omegaconf(base):
    assert resolve_params(base, ["retriever.lr=1e-3"])["retriever"]["lr"] == 0.001   # PyYAML would read a string
    assert math.isinf(resolve_params(base, ["tokenizer.sarq.tau=.inf"])["tokenizer"]["sarq"]["tau"])


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=-10**6, max_value=10**6))
def test_beam_takes_exactly_the_integers_from_1_to_10000(base, beam):
    if 1 <= beam <= 10000:
        assert resolve_params(base, [f"retriever.beam={beam}"])["retriever"]["beam"] == beam
    elif beam < 1:
        with pytest.raises(ConfigError, match=rf"'retriever.beam': must be an integer >= 1, got {beam}$"):
            resolve_params(base, [f"retriever.beam={beam}"])
    else:   # issue 25 finding 12: a beam no machine can hold stops here
        with pytest.raises(ConfigError, match=rf"'retriever.beam': must be at most 10000 .*, got {beam}$"):
            resolve_params(base, [f"retriever.beam={beam}"])


# ---- one override path: flows and sweeps --------------------------------------------------


def test_flow_override_profile_overlays_the_profile(base):
    """A flow's overrides=['profile=smoke'] runs the smoke configuration, as `-s profile=smoke` does."""
    smoke = load_params(PARAMS, ["profile=smoke"])
    via_flow = apply_overrides(base, ["profile=smoke"])
    assert via_flow == smoke
    assert via_flow["data"]["max_users"] == 400 and via_flow["retriever"]["epochs"] == 2
    assert apply_overrides(base, ["profile=smoke", "data.max_users=7"])["data"]["max_users"] == 7
    # overrides given with the profile stay put when a flow applies more overrides later
    forced = load_params(PARAMS, ["profile=smoke", "data.max_users=9"])
    assert apply_overrides(forced, ["retriever.beam=3"])["data"]["max_users"] == 9
    assert base["_profile"] == "default" and base["data"]["max_users"] == 0  # the input is untouched
    with pytest.raises(ConfigError, match="already have profile 'smoke' overlaid"):
        apply_overrides(smoke, ["profile=default"])


FLOWS = [
    ("flows.pipeline_flow", "pipeline_flow", {}),
    ("flows.train_head_flow", "train_head_flow", {}),
    ("flows.train_tail_flow", "train_tail_flow", {}),
    ("flows.train_retriever_flow", "train_retriever_flow", {}),
    ("flows.evaluate_flow", "evaluate_flow", {}),
    ("flows.retrain_flow", "retrain_flow", {"opt_new_items": "new.jsonl"}),
    ("flows.candidates_flow", "candidates_flow", {"opt_a": "a", "opt_b": "b", "opt_queries": "q.jsonl"}),
    ("flows.sweep_flow", "sweep_points_flow", {"grid": ["seed=[0,1]"]}),
    ("flows.sweep_flow", "sweep_flow", {"opt_grid": ["seed=[0,1]"]}),
]


@pytest.mark.parametrize("module,name,kwargs", FLOWS, ids=[f[1] for f in FLOWS])
def test_each_flow_checks_its_params_first(tmp_path, module, name, kwargs):
    import importlib

    entry = getattr(importlib.import_module(module), name)
    body = getattr(entry, "fn", entry)  # the flow's own function: no Prefect server needed
    # empty folders: a flow that skipped the check fails at its first read instead of training
    params = load_params(PARAMS, [f"out_dir={tmp_path / 'out'}", f"data.root={tmp_path / 'data'}"])
    with pytest.raises(ConfigError, match=r"'retriever.beam': must be an integer >= 1, got 'ten'"):
        body(params=params, overrides=["retriever.beam=ten"], **kwargs)


def test_sweep_checks_every_point_before_running(base):
    from flows.sweep_flow import grid_points, parse_grid, point_overrides, sweep_flow

    with pytest.raises(ConfigError, match=r"'retriever.beam': must be an integer >= 1, got 0"):
        sweep_flow(params=base, opt_grid=["retriever.beam=[5,0]"])
    points = grid_points(parse_grid(["tokenizer.sarq.tau=[3,.inf]", "retriever.lr=[1e-3]"]))
    taus = [apply_overrides(base, point_overrides(p))["tokenizer"]["sarq"]["tau"] for p in points]
    assert taus == [3, math.inf] and points[0]["retriever.lr"] == 0.001


# ---- an unreachable Prefect server ----------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("argv", [["retrain", "--new-items", "new.jsonl"], ["sweep", "--grid", "seed=[0,1]"],
                                  ["candidates", "--a", "a", "--b", "b", "--queries", "q.jsonl"]])
def test_flow_commands_fail_fast_on_a_dead_prefect_server(argv, monkeypatch, capsys):
    url = f"http://127.0.0.1:{_closed_port()}/api"
    monkeypatch.setenv("PREFECT_API_URL", url)
    start = time.monotonic()
    assert main(argv + ["--params", PARAMS]) == 2
    err = capsys.readouterr().err
    assert time.monotonic() - start < 10
    assert err.count("\n") == 1 and f"Prefect server {url} (PREFECT_API_URL) does not answer" in err


def test_a_silent_prefect_server_times_out():
    with socket.socket() as server:  # accepts connections (the kernel's backlog) but never replies
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        url = f"http://127.0.0.1:{server.getsockname()[1]}/api"
        start = time.monotonic()
        with pytest.raises(Sa2crqError, match="does not answer within 0.5 s"):
            check_prefect_api(url, timeout_s=0.5)
        assert time.monotonic() - start < 5


def test_a_live_prefect_server_passes(prefect_server):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        check_prefect_api(str(client.api_url))
