"""The online service end to end: a real uvicorn server on a free loopback port, a trained tiny retriever.

Two versions of one synthetic catalog (tests/helpers.py's, with MiniLM-sized vectors so text
queries work), t1 and t2, each with its own trained retriever. Answers are checked against
`retrieve` called directly on the same files; the reload test switches the live folders the way a
promotion renames them while requests keep coming.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
import time
from pathlib import Path

import httpx
import pandas as pd
import pytest
from helpers import serve_params, wait_ready

from components.lifecycle.versions import VERSIONED, end_candidate, promote
from components.ranking.metrics import drop_history_items
from components.retrieval.retrieve import CANDIDATE_COLUMNS, retrieve
from components.runtime.errors import ConfigError
from components.serving.engine import ITEM_FIELDS, cut_text, queries_frame
from components.serving.history import exclude_history
from components.serving.request_log import read_request_log
from components.serving.schema import Job, RetrieveRequest, check_request
from components.serving.server import ServerThread
from components.serving.settings import serve_settings
from components.serving.traffic import variant_for
from components.serving.versions import LoadedVersion, VersionChanged, load_version
from flows.candidates_flow import variant_task


async def _post_all(url: str, bodies: list) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        return await asyncio.gather(*(client.post("/retrieve", json=b) for b in bodies))


def _expected(params: dict, query: Job, out_dir: Path) -> list[dict]:
    """`retrieve` cut at k; with exclude_history, minus the history (ranks closed up), and when that
    leaves fewer than k items, from a beam widened by the history's length (components/serving/history.py)."""
    queries = queries_frame([query])
    ranked = retrieve(params, queries, beam=query.beam, out_dir=out_dir)
    if query.exclude_history:
        kept = drop_history_items(ranked, queries)
        if len(kept) < min(query.k, len(ranked)):
            wide = retrieve(params, queries, beam=query.beam + len(set(query.history)), out_dir=out_dir)
            kept = drop_history_items(wide, queries)
        ranked = kept
    return ranked[ranked["rank"] < query.k][["rank", "item_id", "sid", "score"]].to_dict("records")


def test_answers_equal_retrieve_and_requests_are_batched(server):
    """Concurrent history queries (two beams) and a text query, each as `retrieve` ranks it."""
    params, out = server["params"], Path(server["params"]["out_dir"])
    queries = pd.read_parquet(out / "prepared" / "queries.parquet")
    bodies = [{"history": list(h), "k": 5 + i % 3, "beam": (5, 10)[i % 2], "request_id": q}
              for i, (q, h) in enumerate(zip(queries["query_id"], queries["history"]))]
    bodies.append({"text": "a microscope slide set", "k": 7, "request_id": "text-1"})
    before = server["client"].get("/stats").json()
    responses = asyncio.run(_post_all(server["srv"].url, bodies))
    assert [r.status_code for r in responses] == [200] * len(bodies)
    settings = server["settings"]
    for body, res in zip(bodies, responses):
        got = res.json()
        job = Job(body["request_id"], None, "A", body.get("text"), tuple(body.get("history", ())), body["k"],
                  body.get("beam", settings.beam_default), settings.exclude_history)
        assert (got["request_id"], got["version"], got["k"], got["beam"]) == (job.request_id, "t1", job.k, job.beam)
        assert got["items"] == _expected(params, job, out)
    stats = server["client"].get("/stats").json()
    assert stats["requests"] - before["requests"] == len(bodies)
    assert stats["batches"] - before["batches"] < len(bodies)          # concurrent requests shared decodes
    assert 1 < stats["largest_batch"] <= settings.max_batch
    log = read_request_log(settings.request_log)
    assert tuple(log.columns) == (*CANDIDATE_COLUMNS, "version")
    logged = log[log["query_id"] == "text-1"]
    assert logged[["rank", "item_id", "sid", "score"]].to_dict("records") == responses[-1].json()["items"]


def _bad_requests(settings) -> list[tuple[object, int, str]]:
    """(body, status, field named in the answer); bytes are sent as they are."""
    good = ["it001"]
    return [
        (b"{not json", 400, "body"), (b"", 400, "body"), ([1, 2], 422, "body"),
        ({}, 422, "text"), ({"text": "  "}, 422, "text"), ({"history": []}, 422, "history"),
        ({"history": good, "text": "both"}, 422, "text"), ({"history": ["no-such-item"]}, 422, "history"),
        ({"history": [7]}, 422, "history[0]"), ({"history": good, "extra": 1}, 422, "extra"),
        ({"history": good, "k": 0}, 422, "k"), ({"history": good, "k": settings.k_max + 1}, 422, "k"),
        ({"history": good, "k": "5"}, 422, "k"), ({"history": good, "beam": 0}, 422, "beam"),
        ({"history": good, "beam": settings.beam_max + 1}, 422, "beam"),
        ({"history": good * (settings.max_history_items + 1)}, 413, "history"),
        ({"text": "x" * (settings.max_text_chars + 1)}, 413, "text"),
        ({"text": "x", "user_id": "y" * settings.max_body_bytes}, 413, "body"),
    ]


def test_bad_requests_get_4xx_naming_the_field(server):
    client, settings = server["client"], server["settings"]
    for body, status, field in _bad_requests(settings):
        res = client.post("/retrieve", content=body) if isinstance(body, bytes) else client.post("/retrieve", json=body)
        assert (res.status_code, res.json()["field"]) == (status, field), body
        assert res.json()["detail"].startswith(f"{field}: ")
    # an unknown item in a batch fails that request alone; the worker keeps serving
    mixed = asyncio.run(_post_all(server["srv"].url, [{"history": ["it002"]}, {"history": ["nope"]},
                                                      {"history": ["it003", "it004"]}]))
    assert [r.status_code for r in mixed] == [200, 422, 200]
    assert client.post("/retrieve", json={"history": ["it001"], "k": 3}).json()["items"]


def _stage_version(live: Path, src: Path, name: str) -> None:
    """Copy version `src` to live/versions/<name>/, where the retrain flow leaves a candidate."""
    for part in VERSIONED:
        if (src / part).exists():
            shutil.copytree(src / part, live / "versions" / name / part)
        else:  # the synthetic versions have no tokenizer; promotion moves every versioned folder
            (live / "versions" / name / part).mkdir(parents=True)
    end_candidate(live / "versions" / name, {"source": "test"}, passed=True)  # as a retrain that passed its checks


def test_reload_on_promotion_drops_no_request(versions):
    """The poller picks up a promoted version, /admin/reload a rollback; requests keep succeeding meanwhile."""
    root = versions["root"]
    live = root / "reload-live"
    shutil.copytree(root / "t1", live)
    (live / "tokenizer").mkdir(exist_ok=True)
    _stage_version(live, root / "t2", "t2")
    params = serve_params(versions, live, reload_every_s=0.3)
    with ServerThread(params) as srv, httpx.Client(base_url=srv.url, timeout=60) as client:
        wait_ready(client)

        async def traffic(until: str) -> list[tuple[int, str | None]]:
            """Requests 4 at a time until version `until` answers (and 20 s at most)."""
            seen: list[tuple[int, str | None]] = []
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and (not seen or seen[-1][1] != until):
                for res in await _post_all(srv.url, [{"history": ["it001", f"it{i:03d}"]} for i in range(4)]):
                    seen.append((res.status_code, res.json().get("version")))
            return seen

        async def promote_during_traffic() -> list[tuple[int, str | None]]:
            task = asyncio.create_task(traffic("t2"))
            await asyncio.sleep(0.2)
            await asyncio.to_thread(promote, live, "t2")     # the retrain flow's promotion
            return await task

        seen = asyncio.run(promote_during_traffic())
        assert {status for status, _ in seen} == {200}
        assert seen[0][1] == "t1" and seen[-1][1] == "t2"
        job = Job("q", None, "A", None, ("it001", "it004"), 10, 20, exclude_history=True)
        assert client.post("/retrieve", json={"history": list(job.history)}).json()["items"] == \
            _expected(params, job, live)

        assert promote(live, "t1") == "t2"                  # roll back, reload on demand
        assert client.post("/admin/reload").json()["A"]["version"] == "t1"
        assert client.post("/retrieve", json={"history": ["it001"]}).json()["version"] == "t1"


def test_serve_params_are_checked_before_the_port_opens(versions):
    params = serve_params(versions, versions["root"] / "t1", k_default=500)
    with pytest.raises(ConfigError, match="'serve.k_default': must be an integer between 1 and 100"):
        serve_settings(params)
    del params["serve"]["max_wait_ms"]
    with pytest.raises(ConfigError, match="serve.max_wait_ms"):
        serve_settings(params)


def test_a_half_promoted_out_dir_is_not_loaded(versions, tmp_path):
    """The SID table of one version beside the retriever of another: refused, so the slot keeps its version."""
    shutil.copytree(versions["root"] / "t1", tmp_path / "mixed")
    shutil.rmtree(tmp_path / "mixed" / "sids")
    shutil.copytree(versions["root"] / "t2" / "sids", tmp_path / "mixed" / "sids")
    with pytest.raises(VersionChanged, match="retriever trained on 't1'"):
        load_version(versions["params"], tmp_path / "mixed")


def test_ab_split_is_stable_per_user_and_logged(versions):
    root = versions["root"]
    params = serve_params(versions, root / "t1", ab={"out_dir": str(root / "t2"), "share": 0.5},
                     request_log=str(root / "ab" / "requests.jsonl"), request_log_outside_out_dir=True)
    users = [f"user{i}" for i in range(24)] * 2
    with ServerThread(params) as srv, httpx.Client(base_url=srv.url, timeout=60) as client:
        assert wait_ready(client)["versions"] == {"A": "t1", "B": "t2"}
        responses = asyncio.run(_post_all(srv.url, [{"history": ["it002"], "user_id": u, "k": 5} for u in users]))
    answers = [r.json() for r in responses]
    assert {a["variant"] for a in answers} == {"A", "B"}
    for user, a in zip(users, answers):
        assert a["variant"] == variant_for(user, 0.5)
        assert a["version"] == {"A": "t1", "B": "t2"}[a["variant"]]
    b = next(a for a in answers if a["variant"] == "B")
    assert b["items"] == _expected(params, Job("b", None, "B", None, ("it002",), 5, b["beam"], True), root / "t2")
    log = read_request_log(root / "ab" / "requests.jsonl")
    assert log.groupby("query_id")["variant"].first().to_dict() == {a["request_id"]: a["variant"] for a in answers}
    assert (log["version"] == log["variant"].map({"A": "t1", "B": "t2"})).all()


def test_exclude_history_per_request_and_by_default(server):
    """Issue 27: a history query gets its own items back only with "exclude_history": false; the
    default is serve.exclude_history (true in params.yaml), and exclusion still answers k items."""
    client, params, settings = server["client"], server["params"], server["settings"]
    out, history = Path(params["out_dir"]), ("it004", "it006")
    kept = client.post("/retrieve", json={"history": list(history), "k": 5, "exclude_history": False}).json()
    assert kept["items"] == _expected(params, Job("q", None, "A", None, history, 5, settings.beam_default), out)
    assert set(history) & {item["item_id"] for item in kept["items"]}          # the case the issue reports
    dropped = client.post("/retrieve", json={"history": list(history), "k": 5, "exclude_history": True}).json()
    assert not set(history) & {item["item_id"] for item in dropped["items"]}
    assert [item["rank"] for item in dropped["items"]] == list(range(5))
    job = Job("q", None, "A", None, history, 5, settings.beam_default, exclude_history=True)
    assert dropped["items"] == _expected(params, job, out)
    assert client.post("/retrieve", json={"history": list(history), "k": 5}).json()["items"] == dropped["items"]
    assert settings.exclude_history is True
    request = RetrieveRequest(history=list(history))
    assert check_request(request, dataclasses.replace(settings, exclude_history=False)).exclude_history is False
    assert check_request(RetrieveRequest(history=["it001"], exclude_history=False), settings).exclude_history is False
    res = client.post("/retrieve", json={"history": ["it001"], "exclude_history": "yes"})
    assert (res.status_code, res.json()["field"]) == (422, "exclude_history")


def test_exclusion_keeps_k_items_from_a_wider_beam():
    """A query left with fewer than k items is decoded again with beam + its distinct history items;
    a query that lost nothing, or still has k, is not."""
    def ranking(query_id: str, items: list[str]) -> pd.DataFrame:
        return pd.DataFrame({"query_id": query_id, "rank": range(len(items)), "item_id": items,
                             "score": [-float(r) for r in range(len(items))], "sid": "0-0"})

    ranked = pd.concat([ranking("0", ["a", "b", "c"]), ranking("1", ["a", "d", "e", "f"]), ranking("2", ["x"])])
    queries = pd.DataFrame({"query_id": ["0", "1", "2"], "history": [["a", "b", "a"], ["a"], ["q"]]})
    calls = []

    def decode(sub: pd.DataFrame, beam: int) -> pd.DataFrame:
        calls.append((list(sub["query_id"]), beam))
        return ranking("0", ["a", "c", "b", "g", "h"])

    out = exclude_history(ranked, queries, 3, 3, decode)
    assert calls == [(["0"], 5)]                          # beam 3 + 2 distinct history items, query 0 alone
    assert list(out["query_id"]) == ["0"] * 3 + ["1"] * 3 + ["2"]
    assert list(out["item_id"]) == ["c", "g", "h", "d", "e", "f", "x"]
    assert list(out["rank"]) == [0, 1, 2, 0, 1, 2, 0] and list(out.columns) == list(ranked.columns)


def test_fields_text_adds_cut_item_text_and_plain_answers_are_unchanged(server):
    """Issue 27: "fields": ["text"] adds each item's text (cut to serve.item_text_chars) and logs it;
    a request without the new keys answers exactly the keys and values it answered before."""
    client, params, settings = server["client"], server["params"], server["settings"]
    out = Path(params["out_dir"])
    body = {"history": ["it001", "it004"], "k": 4, "beam": 10, "exclude_history": False, "request_id": "plain"}
    plain = client.post("/retrieve", json=body).json()
    assert list(plain) == ["request_id", "variant", "version", "k", "beam", "items"]
    assert all(list(item) == list(ITEM_FIELDS) for item in plain["items"])
    assert plain["items"] == _expected(params, Job("q", None, "A", None, ("it001", "it004"), 4, 10), out)
    texted = client.post("/retrieve", json={**body, "fields": ["text"], "request_id": "texted"}).json()
    assert list(texted) == list(plain)
    assert [{f: item[f] for f in ITEM_FIELDS} for item in texted["items"]] == plain["items"]
    catalog = pd.read_parquet(out / "prepared" / "items.parquet").set_index("item_id")["text"]
    assert [item["text"] for item in texted["items"]] == [cut_text(catalog[item["item_id"]], settings.item_text_chars)
                                                         for item in texted["items"]]
    logged = {(rec := json.loads(line))["query_id"]: rec for line in settings.request_log.read_text().splitlines()}
    assert logged["texted"]["items"] == texted["items"] and logged["plain"]["items"] == plain["items"]
    assert logged["plain"]["exclude_history"] is False
    assert cut_text("abcdef", 4) == "abc…" and cut_text("abcd", 4) == "abcd"
    for fields in (["title"], "text", [1]):
        res = client.post("/retrieve", json={"history": ["it001"], "fields": fields})
        assert res.status_code == 422 and res.json()["field"].startswith("fields"), fields


def test_candidates_exclude_history_both_settings(versions):
    """`sa2crq candidates` (its per-version task): history items kept or left out, k candidates either way."""
    params, t1 = versions["params"], versions["root"] / "t1"
    queries = pd.DataFrame({"query_id": ["a", "b"], "history": [["it004", "it006"], ["it001"]], "text": [None, None],
                            "targets": [[], []], "emb_row": [-1, -1]})
    kept, _ = variant_task.fn(params, "A", str(t1), queries, 6, exclude=False)
    dropped, _ = variant_task.fn(params, "A", str(t1), queries, 6, exclude=True)
    for frame in (kept, dropped):
        assert (frame.groupby("query_id").size() == 6).all()
    pairs = {(q, i) for q, h in zip(queries["query_id"], queries["history"]) for i in h}
    assert pairs & set(zip(kept["query_id"], kept["item_id"]))
    assert not pairs & set(zip(dropped["query_id"], dropped["item_id"]))
    expected = drop_history_items(retrieve(params, queries, beam=6, out_dir=t1), queries, 6)
    pd.testing.assert_frame_equal(dropped.drop(columns="variant"), expected[list(dropped.drop(columns="variant"))])


def test_engine_widens_the_beam_for_a_request_the_exclusion_left_short(monkeypatch):
    """The engine's exclusion: a request with fewer than k items left is decoded once more, alone, with
    beam + its distinct history items; a request that keeps its history is answered from the first decode."""
    from components.serving import engine as engine_module
    from components.serving.engine import Engine

    rankings = {3: ["a", "b", "c"], 5: ["a", "c", "b", "g", "h"]}
    decoded = []

    def ranked(dec: tuple[pd.DataFrame, int], order: str) -> pd.DataFrame:
        queries, beam = dec
        decoded.append((list(queries["query_id"]), beam))
        items = rankings[beam]
        return pd.DataFrame({"query_id": [q for q in queries["query_id"] for _ in items], "rank": list(range(len(items)))
                             * len(queries), "item_id": items * len(queries), "score": 0.5, "sid": "0-0"})

    monkeypatch.setattr(engine_module, "decode_with", lambda params, ctx, queries, beam: (queries, beam))
    monkeypatch.setattr(engine_module, "ranked_items", ranked)
    jobs = [Job("x", None, "A", None, ("a", "b", "a"), 3, 3, exclude_history=True),
            Job("y", None, "A", None, ("a", "b"), 3, 3, exclude_history=False)]
    loaded = LoadedVersion("v", Path("."), None)
    items = Engine({"retriever": {"num_threads": 1}, "eval": {"group_order": "popularity"}}, {}, None, 200)._items(
        loaded, jobs, 3, widen=True)
    assert decoded == [(["0", "1"], 3), (["0"], 5)]
    assert [[(i["rank"], i["item_id"]) for i in its] for its in items] == [
        [(0, "c"), (1, "g"), (2, "h")], [(0, "a"), (1, "b"), (2, "c")]]
