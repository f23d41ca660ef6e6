"""Probes of issue 25 on the online service: malformed requests (finding 16) and where the request
log may be written (finding 9). The service is conftest.py's `server`: a real uvicorn server on a
free loopback port with a tiny trained retriever, so a body goes through every layer a client's does."""
from __future__ import annotations

import copy

import httpx
import pytest

from components.runtime.errors import ConfigError
from components.serving.app import MAX_DEPTH, MAX_INT_DIGITS, nesting_depth
from components.serving.settings import serve_settings

GOOD = b'{"history": ["it001"], '


def _malformed() -> list[tuple[str, bytes, int, str]]:
    """(probe, raw body, status, field named in the answer)."""
    nested = b"[" * 20_000 + b"]" * 20_000
    return [
        ("lone surrogate in text", b'{"text": "\\ud800 microscope"}', 422, "text"),
        ("lone surrogate in a history id", b'{"history": ["it001", "\\udfff"]}', 422, "history[1]"),
        ("lone surrogate in request_id", GOOD + b'"request_id": "\\ud800"}', 422, "request_id"),
        ("lone surrogate in user_id", GOOD + b'"user_id": "a\\udc00"}', 422, "user_id"),
        ("20k nested arrays", nested, 400, "body"),
        ("20k nested arrays as k", GOOD + b'"k": ' + nested + b"}", 400, "body"),
        ("nesting one past the limit", b'{"history": ' + b"[" * MAX_DEPTH + b"]" * MAX_DEPTH + b"}", 400, "body"),
        ("5000-digit k", GOOD + b'"k": ' + b"9" * 5000 + b"}", 422, "body"),
        ("4000-digit beam", GOOD + b'"beam": -' + b"9" * 4000 + b"}", 422, "body"),
        ("k one digit past the limit", GOOD + b'"k": 1' + b"0" * MAX_INT_DIGITS + b"}", 422, "body"),
        ("k as a float", GOOD + b'"k": 5.0}', 422, "k"),
        ("k as a bool", GOOD + b'"k": true}', 422, "k"),
        ("k as 1e999", GOOD + b'"k": 1e999}', 422, "k"),
        ("beam as NaN", GOOD + b'"beam": NaN}', 400, "body"),
        ("beam as -Infinity", GOOD + b'"beam": -Infinity}', 400, "body"),
        ("beam as a huge int", GOOD + b'"beam": 99999999999999999999}', 422, "beam"),
        ("history with null", b'{"history": ["it001", null]}', 422, "history[1]"),
        ("history with a number", b'{"history": [3]}', 422, "history[0]"),
        ("history with an object", b'{"history": [{"id": "it001"}]}', 422, "history[0]"),
        ("history as an object", b'{"history": {"a": "it001"}}', 422, "history"),
        ("text as a list", b'{"text": ["a"]}', 422, "text"),
        ("invalid UTF-8", b'{"text": "\xff\xfe"}', 400, "body"),
        ("UTF-8-encoded surrogate", b'{"text": "\xed\xa0\x80"}', 400, "body"),
        ("a JSON string, not an object", b'"it001"', 422, "body"),
        ("null body", b"null", 422, "body"),
    ]


@pytest.mark.parametrize(("probe", "body", "status", "field"), _malformed(), ids=[m[0] for m in _malformed()])
def test_malformed_request_gets_a_4xx_naming_the_field(server, probe, body, status, field):
    """Finding 16: every malformed body is refused with one 4xx naming its field, never a 500, and the
    service keeps answering. A fresh connection per probe, so a 500 cannot hide behind a closed one."""
    with httpx.Client(base_url=server["srv"].url, timeout=60) as client:
        res = client.post("/retrieve", content=body, headers={"content-type": "application/json"})
        assert (res.status_code, res.json()["field"]) == (status, field), res.text[:300]
        assert res.json()["detail"].startswith(f"{field}: ") and len(res.json()["detail"]) < 300
        assert client.post("/retrieve", json={"history": ["it001"], "k": 3}).status_code == 200


def test_nesting_depth_ignores_brackets_inside_strings_and_is_linear():
    assert nesting_depth('{"a": ["[[[", "x\\"[[{", "\\\\"], "b": {}}') == 2
    assert nesting_depth('"[[[["') == 0 and nesting_depth("") == 0
    assert nesting_depth("[" * 20_000 + "]" * 20_000) == 20_000
    assert nesting_depth('"' + '\\"' * 32_000) == 0      # an unterminated string of escapes: no backtracking


def _params_with_log(versions: dict, tmp_path, log: str, outside_ok: bool = False) -> dict:
    params = copy.deepcopy(versions["params"])
    params["out_dir"] = str(tmp_path / "out")
    params["serve"].update({"request_log": log, "request_log_outside_out_dir": outside_ok})
    return params


@pytest.mark.parametrize("log", ["/tmp/sa2crq-elsewhere.jsonl", "../escaped.jsonl", "serve/../../escaped.jsonl",
                                 "linked/requests.jsonl"])
def test_request_log_outside_out_dir_is_refused_unless_allowed(versions, tmp_path, log):
    """Finding 9: serve.request_log resolves under out_dir (absolute paths, `..` and links checked
    resolved), or serve_settings stops with one ConfigError naming the key and the opt-in."""
    (tmp_path / "out").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "out" / "linked").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match=r"serve\.request_log.*outside out_dir.*request_log_outside_out_dir") as err:
        serve_settings(_params_with_log(versions, tmp_path, log))
    assert "\n" not in str(err.value)
    allowed = serve_settings(_params_with_log(versions, tmp_path, log, outside_ok=True))
    assert allowed.request_log == tmp_path / "out" / log
    inside = serve_settings(_params_with_log(versions, tmp_path, "serve/requests.jsonl"))
    assert inside.request_log == tmp_path / "out" / "serve" / "requests.jsonl"
