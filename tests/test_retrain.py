"""Retraining on new items: frozen SIDs, fine-tuning with replay, checks, promotion, versions."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import plain_retriever

from components.lifecycle.versions import (
    CHECKS_RECORD,
    JOURNAL,
    VERSIONED,
    live_version,
    promote,
    recover,
    run_recover,
    show_versions,
)
from components.runtime.errors import BusyError, DataError
from components.runtime.locks import LOCK_FILE
from components.tokenizers.sid_table import changed_sids, read_sid_table
from flows.flow_params import apply_overrides
from flows.retrain_checks import decide, index_queries, recall_at

# the smoke retriever is weak (old recall@10 of a few percent on 200 queries), so a drop of a
# few queries is noise: the test allows 0.05 and checks the promotion path end to end
RETRAIN = ["flows.retrain.lr=0.003", "flows.retrain.max_old_recall_drop=0.05", "flows.retrain.grow_threshold=null"]


@pytest.fixture(scope="module")
def retrained(tmp_path_factory, trained, prefect_server) -> dict:
    from flows.retrain_flow import retrain_flow

    work = tmp_path_factory.mktemp("retrain") / "out"
    shutil.copytree(trained["params"]["out_dir"], work)
    params = apply_overrides({**trained["params"], "out_dir": str(work)}, RETRAIN)
    before = {"table": read_sid_table(work / "sids" / "sid_table.parquet"), "version": live_version(work),
              "model": (work / "retriever" / "model.pt").read_bytes()}
    result = retrain_flow(params=params, opt_new_items=str(trained["new_items"]))
    new_ids = pd.read_json(trained["new_items"], lines=True, dtype={"item_id": str})["item_id"].tolist()
    return {"params": params, "result": result, "before": before, "work": work, "new_ids": new_ids}


@pytest.mark.slow
def test_retrain_promotes_with_old_sids_unchanged(retrained):
    work, result, before = retrained["work"], retrained["result"], retrained["before"]
    assert result["promoted"], result["reason"]
    assert live_version(work) == result["candidate"] != before["version"]
    live = read_sid_table(work / "sids" / "sid_table.parquet")
    assert changed_sids(before["table"], live) == []
    new_rows = live[live["item_id"].isin(retrained["new_ids"])]
    assert len(new_rows) == len(retrained["new_ids"]) and (new_rows["stage"] == "new").all()
    assert live["item_id"].tolist() == pd.read_parquet(work / "prepared" / "items.parquet")["item_id"].tolist()
    assert len(np.load(work / "embeddings" / "items.npy")) == len(live)
    # the previous version is kept whole, and the live retriever is the fine-tuned one
    kept = work / "versions" / before["version"]
    assert all((kept / name).is_dir() for name in VERSIONED)
    assert read_sid_table(kept / "sids" / "sid_table.parquet").equals(before["table"])
    assert (kept / "retriever" / "model.pt").read_bytes() == before["model"]
    assert (work / "retriever" / "model.pt").read_bytes() != before["model"]
    history = json.loads((work / "versions" / "history.json").read_text())
    assert history[-1]["candidate"] == result["candidate"] and history[-1]["promoted"]
    # the registry (GTO tags in work/registry, a tmp out_dir's own repository) names the candidate prod
    registry = show_versions(work)
    assert registry["prod"] == result["candidate"] == result["registry"]["prod"]
    assert [v["version"] for v in registry["versions"]] == [result["candidate"], before["version"]]
    assert json.loads((work / "metrics" / "retrain.json").read_text())["candidate"] == result["candidate"]


@pytest.mark.slow
def test_new_items_become_retrievable(retrained):
    """Fine-tuning teaches the new items: their indexing queries find them far more often than
    the live model did before; the reported figure is what the promoted model gives."""
    checks, params, work = retrained["result"]["checks"], retrained["params"], retrained["work"]
    new = checks["new_index"]
    print(f"\nrecall@{checks['k']}: old test {checks['old_test']}, old items {checks['old_index']}, new items {new}")
    assert new["after"] >= 0.2 and new["after"] > new["before"] + 0.1
    items = pd.read_parquet(work / "prepared" / "items.parquet")
    queries = index_queries(items, retrained["new_ids"], history_kind=True)
    assert recall_at(params, queries, items, checks["k"], work) == pytest.approx(new["after"])


@pytest.mark.slow
def test_known_items_are_refused(retrained, tmp_path):
    """Items already in the catalog are bad input: DataError names the file and column; nothing changes."""
    from flows.retrain_flow import retrain_flow

    work = retrained["work"]
    version = live_version(work)
    bad = tmp_path / "again.jsonl"
    pd.DataFrame({"item_id": retrained["new_ids"][:2], "text": ["x", "y"]}).to_json(bad, orient="records", lines=True)
    with pytest.raises(DataError, match="already in the catalog") as err:
        retrain_flow(params=retrained["params"], opt_new_items=str(bad))
    assert err.value.column == "item_id" and err.value.file == str(bad)
    assert live_version(work) == version


def test_decide_names_the_failing_check():
    ok = {"k": 10, "sids_stable": True, "old_test": {"before": 0.5, "after": 0.49, "drop": 0.01},
          "old_index": {"before": 0.8, "after": 0.8, "drop": 0.0}, "new_index": {"before": 0.0, "after": 0.6}}
    assert decide(ok, 0.02, 0.5) == (True, "all checks passed")
    dropped = {**ok, "old_index": {"before": 0.8, "after": 0.7, "drop": 0.1}}
    passed, reason = decide(dropped, 0.02, 0.5)
    assert not passed and "old_index" in reason
    assert not decide(ok, 0.02, 0.7)[0]
    assert decide({**ok, "sids_stable": False}, 0.02, 0.0) == (False, "issued SIDs changed")


def _version_tree(root: Path, version: str, mark: str) -> None:
    """A version's folders; its retriever/ holds the record of passed retrain checks a candidate needs."""
    for name in VERSIONED:
        (root / name).mkdir(parents=True, exist_ok=True)
        (root / name / "mark.txt").write_text(mark)
    (root / "sids" / "meta.json").write_text(json.dumps({"version": version}))
    (root / "retriever" / CHECKS_RECORD).write_text(json.dumps({"candidate": version, "passed": True}))


def test_promote_swaps_and_rolls_back(tmp_path, monkeypatch):
    import components.lifecycle.versions

    out = tmp_path / "out"
    _version_tree(out, "v1", "old")
    _version_tree(out / "versions" / "v1.r1", "v1.r1", "new")
    # a crash in the middle of the moves: everything goes back where it was
    real_move, calls = components.lifecycle.versions._move, []

    def failing(src: Path, dst: Path) -> None:
        calls.append(src)
        if len(calls) == 7:
            raise OSError("disk full")
        real_move(src, dst)

    monkeypatch.setattr(components.lifecycle.versions, "_move", failing)
    with pytest.raises(OSError):
        promote(out, "v1.r1")
    monkeypatch.setattr(components.lifecycle.versions, "_move", real_move)
    assert live_version(out) == "v1" and (out / "retriever" / "mark.txt").read_text() == "old"
    assert (out / "versions" / "v1.r1" / "retriever" / "mark.txt").read_text() == "new"
    assert not (out / "versions" / JOURNAL).exists()
    # the real promotion, then a rollback with the same function
    assert promote(out, "v1.r1") == "v1"
    assert live_version(out) == "v1.r1" and (out / "tokenizer" / "mark.txt").read_text() == "new"
    assert (out / "versions" / "v1" / "tokenizer" / "mark.txt").read_text() == "old"
    assert show_versions(out)["prod"] == "v1.r1"
    assert promote(out, "v1") == "v1.r1"
    assert (out / "sids" / "mark.txt").read_text() == "old"
    # the rollback is prod assigned back to the first registered version, in GTO's tags
    registry = show_versions(out)
    assert registry["prod"] == "v1" and [v["version"] for v in registry["versions"]] == ["v1.r1", "v1"]
    assert [v["stages"] for v in registry["versions"]] == [[], ["prod"]]


def test_recover_undoes_a_promotion_cut_short(tmp_path):
    """A journal left by a killed process is rolled back on the next start."""
    out = tmp_path / "out"
    _version_tree(out, "v1", "old")
    _version_tree(out / "versions" / "v2", "v2", "new")
    keep = out / "versions" / "v1"
    keep.mkdir()
    (out / "prepared").rename(keep / "prepared")
    (out / "versions" / JOURNAL).write_text(json.dumps(
        {"from": "v1", "to": "v2", "moves": [[str(out / "prepared"), str(keep / "prepared")]]}))
    assert recover(out) is True
    assert (out / "prepared" / "mark.txt").read_text() == "old"
    assert not (out / "versions" / JOURNAL).exists() and recover(out) is False


def _marks(root: Path) -> set[str]:
    return {(root / name / "mark.txt").read_text() for name in VERSIONED}


def _promotion_killed(out: Path, version: str, after_moves: int | None) -> None:
    """promote() in a forked process that SIGKILLs itself right after its `after_moves`-th rename
    (0: before the first, once the journal is written; all of them: before the journal says
    `moved`; None: inside the registry step, after every rename)."""
    import components.lifecycle.versions

    pid = os.fork()
    if pid == 0:
        try:
            real_move, done = components.lifecycle.versions._move, []

            def move(src: Path, dst: Path) -> None:
                if after_moves == 0:
                    os.kill(os.getpid(), signal.SIGKILL)
                real_move(src, dst)
                done.append(src)
                if len(done) == after_moves:
                    os.kill(os.getpid(), signal.SIGKILL)

            def register(reg, name: str) -> None:
                os.kill(os.getpid(), signal.SIGKILL)

            components.lifecycle.versions._move = move
            components.lifecycle.versions._register = register
            promote(out, version)
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


@pytest.mark.parametrize("after_moves", range(len(VERSIONED) * 2 + 1))
def test_promotion_killed_at_any_point_is_rolled_back(tmp_path, after_moves):
    """kill -9 between any two renames of a promotion: `recover` (the next retrain's first act,
    or `sa2crq recover`) puts every live folder back, the candidate stays whole, the registry
    still names the old version prod, and the candidate can be promoted again."""
    out = tmp_path / "out"
    _version_tree(out, "v1", "old")
    _version_tree(out / "versions" / "v1.r1", "v1.r1", "new")
    _promotion_killed(out, "v1.r1", after_moves)
    assert (out / "versions" / JOURNAL).exists()
    assert run_recover({"out_dir": str(out)}) == {"out_dir": str(out), "recovered": True, "live": "v1"}
    assert _marks(out) == {"old"} and _marks(out / "versions" / "v1.r1") == {"new"}
    assert not (out / "versions" / JOURNAL).exists() and not (out / "versions" / "v1").exists()
    assert show_versions(out)["prod"] == "v1"
    assert promote(out, "v1.r1") == "v1" and _marks(out) == {"new"} and _marks(out / "versions" / "v1") == {"old"}
    assert show_versions(out)["prod"] == "v1.r1"


def test_promotion_killed_after_the_renames_is_finished(tmp_path):
    """kill -9 once every folder moved, while the registry records it: `recover` rolls forward
    (the new version live and prod, the old one kept), as an uninterrupted promotion would."""
    out = tmp_path / "out"
    _version_tree(out, "v1", "old")
    _version_tree(out / "versions" / "v1.r1", "v1.r1", "new")
    _promotion_killed(out, "v1.r1", None)
    assert json.loads((out / "versions" / JOURNAL).read_text())["moved"] is True
    assert run_recover({"out_dir": str(out)}) == {"out_dir": str(out), "recovered": True, "live": "v1.r1"}
    assert _marks(out) == {"new"} and _marks(out / "versions" / "v1") == {"old"}
    assert not (out / "versions" / JOURNAL).exists() and not (out / "versions" / "v1.r1").exists()
    assert show_versions(out)["prod"] == "v1.r1"


def test_promotion_journal_holds_the_whole_plan_before_the_first_move(tmp_path, monkeypatch):
    import components.lifecycle.versions

    out = tmp_path / "out"
    _version_tree(out, "v1", "old")
    _version_tree(out / "versions" / "v1.r1", "v1.r1", "new")
    real_move, seen = components.lifecycle.versions._move, []

    def move(src: Path, dst: Path) -> None:
        seen.append(json.loads((out / "versions" / JOURNAL).read_text())["moves"])
        real_move(src, dst)

    monkeypatch.setattr(components.lifecycle.versions, "_move", move)
    promote(out, "v1.r1")
    assert len(seen) == 2 * len(VERSIONED) and all(plan == seen[0] for plan in seen)
    assert len(seen[0]) == 2 * len(VERSIONED)


def _catalog_out(out: Path) -> None:
    """A live version whose catalog has items a, b, c (enough for retrain to read new items)."""
    _version_tree(out, "v1", "old")
    pd.DataFrame({"item_id": ["a", "b", "c"], "text": ["x", "y", "z"], "popularity": [3, 2, 0],
                  "group": ["head", "tail", "cold"]}).to_parquet(out / "prepared" / "items.parquet")


def _snapshot(out: Path) -> dict[str, bytes]:
    """Every file under out with its bytes (the lock file's holder stamp aside)."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != LOCK_FILE}


HOSTILE = {
    "known.jsonl": '{"item_id": "d", "text": "new"}\n{"item_id": "b", "text": "again"}\n',
    "empty.jsonl": "",
    "malformed.jsonl": '{"item_id": "d", "text": "new"}\n{"item_id": "e", "text": \n',
    "duplicate.jsonl": '{"item_id": "d", "text": "one"}\n{"item_id": "d", "text": "two"}\n',
    "no_text.csv": "item_id,title\nd,new\n",
    "blank_text.csv": "item_id,text\nd,\n",
    "items.txt": "d new\n",
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_new_items_are_refused_before_anything_changes(name, smoke_params, prefect_server, tmp_path):
    from flows.retrain_flow import retrain_flow

    out = tmp_path / "out"
    _catalog_out(out)
    bad = tmp_path / name
    bad.write_text(HOSTILE[name])
    before = _snapshot(out)
    with pytest.raises(DataError) as err:
        retrain_flow(params={**smoke_params, "out_dir": str(out)}, opt_new_items=str(bad))
    assert err.value.file == str(bad)
    assert _snapshot(out) == before


def test_retrain_of_a_busy_out_dir_is_refused(smoke_params, prefect_server, tmp_path):
    """A stage (or another retrain) holds the out_dir: the retrain stops at once, changing nothing."""
    from flows.retrain_flow import retrain_flow

    out = tmp_path / "out"
    _catalog_out(out)
    new = tmp_path / "new.jsonl"
    new.write_text('{"item_id": "d", "text": "new"}\n')
    before = _snapshot(out)
    hold = "import sys\nfrom components.runtime.locks import lock_folder\nwith lock_folder(sys.argv[1]):\n" \
           "    print('held', flush=True)\n    sys.stdin.read()\n"
    holder = subprocess.Popen([sys.executable, "-c", hold, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(BusyError, match=f"pid {holder.pid}"):
            retrain_flow(params={**smoke_params, "out_dir": str(out)}, opt_new_items=str(new))
    finally:
        holder.stdin.close()
        holder.wait()
    assert _snapshot(out) == before


def test_grown_vocabulary_keeps_learned_tokens():
    """After extension rows grow, old SIDs score exactly as before: learned rows move with their token."""
    from components.retrieval.query_encoders import HISTORY
    from components.retrieval.retriever import RetrieverModel, model_config
    from flows.retriever_finetune import load_grown, token_map

    rp = {"backbone": "small", "d_model": 16, "n_heads": 2, "n_layers": 1, "ff_dim": 32, "dropout": 0.0, "n_memory": 1}
    torch.manual_seed(0)
    old = RetrieverModel(model_config(plain_retriever(**rp), (4, 4), 8, 3)).eval()
    new = RetrieverModel(model_config(plain_retriever(**rp), (6, 5), 8, 3)).eval()
    assert load_grown(new, old.state_dict(), (4, 4)) > 0
    mapping = token_map(old.vocab, new.vocab)
    assert mapping[3:7].tolist() == [3, 4, 5, 6] and mapping[7:11].tolist() == [9, 10, 11, 12]
    x = torch.randn(2, 3, 8)
    dec_old = torch.tensor([[1, 4], [1, 6]])                    # BOS, then a layer-0 code
    batch = {"kind": HISTORY, "x": x, "mask": torch.ones(2, 3, dtype=torch.bool)}
    with torch.no_grad():
        a = old({**batch, "dec_in": dec_old})
        b = new({**batch, "dec_in": torch.from_numpy(mapping)[dec_old]})
    cols = torch.from_numpy(mapping)
    finite = torch.isfinite(a)
    assert torch.allclose(a[finite], b[:, :, cols][finite], atol=1e-5)
