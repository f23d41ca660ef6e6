"""Issue 22 item 1 (baselines): a baseline with settings of its own declares its `eval.<name>` block in its
registration, as a tokenizer method declares `tokenizer.<name>`: no edit of the schema's `Eval`.

Before, such a baseline needed its keys added to components/runtime/config_schema.py's `Eval` (which refuses
unknown keys). Now `Baseline(section=...)` is checked with the rest of params (one line naming the key),
required while the baseline is in eval.baselines, and its block is part of its comparison run key only.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from components.baselines.registry import Baseline, get_baseline, register_baseline, unregister_baseline
from components.runtime.config import load_params
from components.runtime.config_schema import integer, section
from components.runtime.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def deep_runner(params: dict, data, k: int) -> pd.DataFrame:
    """The popular ranking cut to the toy's own `eval.deep_toy.keep` items."""
    frame = get_baseline("popular").run(params, data, k)
    return frame[frame["rank"] < params["eval"]["deep_toy"]["keep"]]


@pytest.fixture
def deep_toy() -> Iterator[Baseline]:
    baseline = register_baseline(Baseline("deep_toy", deep_runner, section=section("DeepToy", keep=integer(1)),
                                          doc="a test's toy with its own block"))
    yield baseline
    unregister_baseline("deep_toy")


def test_a_baseline_section_is_checked_with_params_and_required_while_chosen(deep_toy) -> None:
    assert deep_toy.reads == ("deep_toy",)   # its block is what it reads
    chosen = "eval.baselines=[popular, deep_toy]"
    with pytest.raises(ConfigError, match=r"'eval.deep_toy': missing \(eval.baselines chooses deep_toy"):
        load_params(ROOT / "params.yaml", [chosen])
    with pytest.raises(ConfigError, match=r"'eval.deep_toy.keep': must be an integer >= 1, got 0"):
        load_params(ROOT / "params.yaml", [chosen, "eval.deep_toy.keep=0"])
    with pytest.raises(ConfigError, match=r"'eval.deep_toy.kep': unknown key \(did you mean"):
        load_params(ROOT / "params.yaml", [chosen, "eval.deep_toy.kep=3"])
    params = load_params(ROOT / "params.yaml", [chosen, "eval.deep_toy.keep=3"])
    assert params["eval"]["deep_toy"] == {"keep": 3}
    # not chosen: the block may stay (checked) or go
    load_params(ROOT / "params.yaml", ["eval.deep_toy.keep=3"])
    with pytest.raises(ConfigError, match="'eval.deep_toy.keep'"):
        load_params(ROOT / "params.yaml", ["eval.deep_toy.keep=-1"])


@pytest.mark.slow   # smoke_embedded: the real prepare and embed (shared by the slow tier)
def test_a_baseline_section_is_in_its_run_key_only_and_its_runner_reads_it(deep_toy, smoke_embedded) -> None:
    from components.evaluation.evaluate import evaluate_all, load_eval_inputs
    from components.runtime.config import resolve_params
    from flows import compare_dvc
    from flows.compare import eval_keys

    overrides = ["profile=smoke", "out_dir=outputs-deep-toy", "eval.baselines=[popular, deep_toy]",
                 "eval.deep_toy.keep=2"]
    params = load_params(ROOT / "params.yaml", overrides)
    sid, plan = compare_dvc.plan_set(params, str(ROOT / "params.yaml"), overrides, [], "sa2crq compare")
    assert plan["baseline_keys"][f"{sid}-deep_toy"]["eval"]["deep_toy"] == {"keep": 2}
    assert "deep_toy" not in plan["baseline_keys"][f"{sid}-popular"]["eval"]
    assert "deep_toy" not in eval_keys(params)   # no variant run depends on it

    run = resolve_params(smoke_embedded, ["eval.baselines=[popular, deep_toy]", "eval.deep_toy.keep=2",
                                          "eval.bootstrap=0"])
    results, _ = evaluate_all(run, load_eval_inputs(run), ["popular", "deep_toy"], generative=False)
    ret_per = {name: results[name]["overall"]["metrics"]["ret_per"]["mean"] for name in ("popular", "deep_toy")}
    assert ret_per["deep_toy"] == 2 < ret_per["popular"]
