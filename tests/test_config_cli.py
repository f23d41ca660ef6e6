"""params.yaml loading, overrides and the CLI's help and error handling."""
from __future__ import annotations

from pathlib import Path

import pytest

from components.runtime.config import load_params, params_hash, parse_override
from components.runtime.errors import ConfigError
from sa2crq.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]


def test_override_parses_yaml_values():
    assert parse_override("tokenizer.sarq.tau=4.5") == {"tokenizer": {"sarq": {"tau": 4.5}}}
    assert parse_override("tokenizer.codebook_sizes=[8,16]") == {"tokenizer": {"codebook_sizes": [8, 16]}}
    with pytest.raises(ValueError, match="key.path=value"):
        parse_override("no_equals_sign")


def test_smoke_profile_overlays_and_overrides_win():
    default = load_params(ROOT / "params.yaml")
    smoke = load_params(ROOT / "params.yaml", ["profile=smoke"])
    assert smoke["data"]["max_users"] > 0
    assert smoke["data"]["max_users"] != default["data"]["max_users"]
    forced = load_params(ROOT / "params.yaml", ["profile=smoke", "data.max_users=7"])
    assert forced["data"]["max_users"] == 7
    # sections the profile does not touch are kept
    assert smoke["tokenizer"]["method"] == default["tokenizer"]["method"]


def test_unknown_profile_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"'profile': must be one of default \| smoke, got 'nope'"):
        load_params(ROOT / "params.yaml", ["profile=nope"])


def test_params_hash_changes_with_values():
    a = load_params(ROOT / "params.yaml")
    b = load_params(ROOT / "params.yaml", ["tokenizer.sarq.tau=1.0"])
    assert params_hash(a) != params_hash(b)
    assert params_hash(a, ("data",)) == params_hash(b, ("data",))


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for command in ("run", "stage", "steps", "retrain", "candidates", "sweep"):
        assert command in text


def test_unknown_step_exits_2_with_names(capsys):
    assert main(["stage", "nope", "--params", str(ROOT / "params.yaml")]) == 2
    err = capsys.readouterr().err
    assert "unknown step 'nope'" in err and "prepare" in err


def test_missing_params_file_exits_2(tmp_path, capsys):
    assert main(["stage", "prepare", "--params", str(tmp_path / "missing.yaml")]) == 2
    assert "params file not found" in capsys.readouterr().err


def test_sa2crq_steps_lists_every_stage_of_dvc_yaml(capsys):
    """`sa2crq steps` names every stage dvc.yaml runs, resolve_params (the first, not a pipeline step) too."""
    from pathlib import Path

    import yaml

    from sa2crq.cli import main

    stages = yaml.safe_load((Path(__file__).resolve().parents[1] / "dvc.yaml").read_text())["stages"]
    assert main(["steps"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert set(stages) <= set(listed) and listed[0] == "resolve_params"
