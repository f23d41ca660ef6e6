"""Issue 25 probes on model versions (findings 1, 2, 3 and 10).

1: a promotion "version" that is a path (`../../victim`, an absolute path, `a/b`, empty, dots) is
   one line and exit 2 before anything moves; `recover` refuses a journal whose moves leave out_dir.
2: a retrain's candidate never reuses a kept, registered or leftover name (retrain, rollback,
   retrain gave `.r1` twice and overwrote the kept one).
3: a candidate that never passed its checks (killed retrain, failed checks, no record) is promoted
   only with --force, which says so; a registered version whose files changed is never promoted.
10: the same retrain from the same base gives the same model: new texts that share a cache key
   are encoded once (the first retrain no longer gives duplicates two vectors that later retrains,
   reading the cache, collapse to one), and each numeric step runs on its configured thread count.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import flows.retrain_flow as rf
from components.lifecycle.versions import (
    CHECKS_RECORD,
    JOURNAL,
    NOT_PROMOTED,
    UNCHECKED,
    VERSIONED,
    live_version,
    next_version,
    promote,
    show_versions,
)
from components.runtime.errors import Sa2crqError
from components.runtime.locks import LOCK_FILE

PARAMS = str(Path(__file__).resolve().parents[2] / "params.yaml")


def _tree(root: Path, version: str, mark: str, checked: bool = True) -> None:
    for name in VERSIONED:
        (root / name).mkdir(parents=True, exist_ok=True)
        (root / name / "mark.txt").write_text(mark)
    (root / "sids" / "meta.json").write_text(json.dumps({"version": version}))
    if checked:
        (root / "retriever" / CHECKS_RECORD).write_text(json.dumps({"candidate": version, "passed": True}))


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != LOCK_FILE}


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    from sa2crq.cli import main

    capsys.readouterr()   # what earlier steps printed (progress bars) is not this command's output
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sa2crq: error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def scene(tmp_path) -> dict:
    """out (live v1, a checked candidate v1.r1) beside a victim folder holding another model."""
    out, victim = tmp_path / "out", tmp_path / "victim"
    _tree(out, "v1", "live")
    _tree(out / "versions" / "v1.r1", "v1.r1", "candidate")
    _tree(victim, "victim", "victim")
    return {"root": tmp_path, "out": out, "victim": victim, "args": ["--params", PARAMS, "-s", f"out_dir={out}"]}


@pytest.mark.parametrize("name", ["../../victim", "ABS", "a/b", "", ".", "..", "v1.r1/../v1.r1", "v1..r1",
                                  ".hidden", "x" * 101])
def test_promote_refuses_a_path_version_before_anything_moves(scene, capsys, name):
    """Finding 1: `sa2crq promote ../../victim` renamed every folder first, then refused."""
    if name == "ABS":
        name = str(scene["victim"])
    before = _snapshot(scene["root"])
    rc, out, err = _cli(capsys, "promote", name, *scene["args"])
    assert _snapshot(scene["root"]) == before
    assert not (scene["out"] / "registry").exists() and not (scene["out"] / "versions" / JOURNAL).exists()
    assert rc == 2 and out == "" and "not a version name" in _one_line(err)


def test_recover_refuses_a_journal_whose_moves_leave_out_dir(scene, capsys):
    """Finding 1: the journal a path version left behind listed moves through `../..`, and `recover`
    made the foreign model prod; now it is refused, nothing moves, the journal stays for inspection."""
    out, victim = scene["out"], scene["victim"]
    kept = out / "versions" / "v1"
    kept.mkdir(parents=True)
    moves = []
    for name in VERSIONED:   # the state after the old promotion's renames: the victim's folders live in out
        (out / name).rename(kept / name)
        (victim / name).rename(out / name)
        moves += [[str(out / name), str(kept / name)], [str(out / "versions" / ".." / ".." / "victim" / name),
                                                        str(out / name)]]
    for moved in (True, False):
        (out / "versions" / JOURNAL).write_text(json.dumps({"from": "v1", "to": "../../victim", "moves": moves,
                                                            "moved": moved}))
        before = _snapshot(scene["root"])
        rc, _, err = _cli(capsys, "recover", *scene["args"])
        assert rc == 2 and "not a promotion journal" in _one_line(err) and _snapshot(scene["root"]) == before
        (out / "versions" / JOURNAL).write_text(json.dumps({"from": "v1", "to": "v1.r1", "moves": moves,
                                                            "moved": moved}))
        before = _snapshot(scene["root"])
        rc, _, err = _cli(capsys, "recover", *scene["args"])
        assert rc == 2 and "leaves the folders of" in _one_line(err)
        assert _snapshot(scene["root"]) == before
    assert not (out / "registry").exists()


def test_next_version_skips_kept_registered_and_leftover_names(scene):
    """Finding 2: the next candidate name is above every name taken in versions/, the registry and
    the history: a rollback and a retrain gave `.r1` again and overwrote the kept `.r1`."""
    out = scene["out"]
    assert next_version(out, "v1") == "v1.r2"                    # v1.r1 is kept
    (out / "versions" / "v1.r3").mkdir()                          # a killed retrain's leftover (marker only)
    (out / "versions" / "v1.r3" / UNCHECKED).write_text("{}")
    assert next_version(out, "v1") == "v1.r4"
    (out / "versions" / "history.json").write_text(json.dumps([{"candidate": "v1.r6", "previous": "v1"}]))
    assert next_version(out, "v1") == "v1.r7"
    assert next_version(out, "v1.r1") == "v1.r7"                  # one numbering per tokenizer build
    assert next_version(out, "other") == "other.r1"


def test_a_registered_name_is_not_reused(scene):
    """Finding 2: the registry remembers every version it registered: once v1.r1 is live its folder
    under versions/ is gone, and only the registry still says the name is taken."""
    out = scene["out"]
    assert promote(out, "v1.r1") == "v1" and not (out / "versions" / "v1.r1").exists()
    assert next_version(out, "v1") == "v1.r2"


@pytest.mark.parametrize("marker", [UNCHECKED, NOT_PROMOTED, "no record"])
def test_an_unchecked_candidate_needs_force_and_then_says_so(scene, capsys, marker):
    """Finding 3: a killed retrain's leftover (UNCHECKED.json, or no record of passed checks from
    older code) or a failed candidate is refused; --force promotes it and the output says so."""
    out, cand = scene["out"], scene["out"] / "versions" / "v1.r1"
    (cand / "retriever" / CHECKS_RECORD).unlink()
    if marker != "no record":
        (cand / marker).write_text(json.dumps({"reason": "old_index recall@10 fell by 0.3"}))
    before = _snapshot(scene["root"])
    rc, _, err = _cli(capsys, "promote", "v1.r1", *scene["args"])
    line = _one_line(err)
    assert rc == 2 and ("never passed" in line or "failed the retrain checks" in line)
    assert "--force" in line and _snapshot(scene["root"]) == before and live_version(out) == "v1"
    rc, printed, _ = _cli(capsys, "promote", "v1.r1", "--force", *scene["args"])
    result = json.loads(printed)
    assert rc == 0 and result["live"] == "v1.r1" and "--force" in result["forced"]
    assert show_versions(out)["prod"] == "v1.r1"


def test_a_forced_version_stays_marked_unchecked(scene):
    """A forced candidate with no record of passed checks gets an UNCHECKED marker in versions/<v>/,
    which meets the version again when a rollback moves it back there: it needs --force again."""
    out, cand = scene["out"], scene["out"] / "versions" / "v1.r1"
    (cand / "retriever" / CHECKS_RECORD).unlink()
    assert promote(out, "v1.r1", force=True) == "v1"
    assert "--force" in json.loads((cand / UNCHECKED).read_text())["why"]


def test_a_registered_version_whose_files_changed_is_never_promoted(scene, capsys):
    """Finding 3: the registry and the disk must agree: a kept, registered version whose bytes are
    not the ones its registration recorded is refused, --force or not, naming the file."""
    out = scene["out"]
    assert promote(out, "v1.r1") == "v1"
    (out / "versions" / "v1" / "retriever" / "mark.txt").write_text("replaced")
    before = _snapshot(scene["root"])
    for force in ([], ["--force"]):
        rc, _, err = _cli(capsys, "promote", "v1", *force, *scene["args"])
        assert rc == 2 and "retriever/mark.txt" in _one_line(err) and "registered version" in err
        assert _snapshot(scene["root"]) == before


def test_a_kept_folder_whose_sids_name_another_version_is_refused(scene):
    """A folder renamed by hand would make the registry record one name for another version's SIDs."""
    out = scene["out"]
    (out / "versions" / "v1.r1").rename(out / "versions" / "v1.r9")
    with pytest.raises(Sa2crqError, match="its SIDs are version 'v1.r1'"):
        promote(out, "v1.r9")
    assert live_version(out) == "v1"


def test_retrain_steps_run_on_their_configured_threads(smoke_params, monkeypatch):
    """Finding 10: the retrain encoded the new items and assigned their SIDs on whatever thread
    count the process had (the machine's default in a fresh process, 1 after an earlier fine-tune),
    and float sums can differ with it; each step now runs on its pipeline step's count."""
    seen = {}

    def encode(texts, *args, **kwargs):
        seen["embed"] = torch.get_num_threads()
        return np.zeros((len(texts), 4), np.float32), len(texts)

    def assign(tok, emb, threshold):
        seen["assign"] = torch.get_num_threads()
        return [[0]] * len(emb), None, {"rows_added": [0]}

    monkeypatch.setattr(rf, "encode_cached", encode)
    monkeypatch.setattr(rf, "text_cache", lambda params: None)
    monkeypatch.setattr(rf, "load_tokenizer", lambda params: None)
    monkeypatch.setattr(rf, "load_matrix", lambda path: None)
    monkeypatch.setattr(rf, "grow_threshold", lambda cfg, tok, emb: None)
    monkeypatch.setattr(rf, "assign_new_items", assign)
    monkeypatch.setattr(rf, "write_candidate", lambda *args: {})
    params = {**smoke_params, "embed": {**smoke_params["embed"], "num_threads": 2},
              "tokenizer": {**smoke_params["tokenizer"], "threads": 1}}
    ambient = torch.get_num_threads()
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            seen.clear()
            rf.embed_task.fn(params, ["a", "b"])
            rf.candidate_task.fn(params, {"grow_threshold": None}, Path("base"), Path("cand"),
                                 pd.DataFrame({"item_id": ["a"]}), np.zeros((1, 4), np.float32), "v1.r1")
            assert seen == {"embed": 2, "assign": 1} and torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(ambient)


def _embed_params(smoke_params: dict, out: Path) -> dict:
    return {**smoke_params, "out_dir": str(out), "embed": {**smoke_params["embed"], "batch_size": 2, "cache": True}}


# a long text, then one text twice, then a short one: in batches of 2, the duplicates fall in two batches
TEXTS = ["a long description of laboratory glassware: beakers, flasks and pipettes", "a graduated cylinder",
         "a graduated cylinder", "tongs"]


def test_duplicate_new_texts_get_one_vector_fresh_or_cached(smoke_params, tmp_path, monkeypatch):
    """Finding 10, the cause: two new items with one text (up to embed.max_chars) encoded in two
    batches got two vectors (a batch's padding moves a vector), both stored under one cache key;
    every later retrain read one vector back for both, so the first retrain's SIDs and model
    differed from all later ones. The encoder here is a stand-in with that padding effect."""
    import zlib

    import components.data.embed as embed

    def encode(texts, batch_size=64, max_chars=1000, normalize=True, progress=None, backend="torch"):
        longest = max(len(t) for t in texts)
        return np.array([[zlib.crc32(t.encode()) % 997, 1e-3 * longest] + [0.0] * 382 for t in texts], np.float32)

    monkeypatch.setattr(embed, "encode_texts", encode)
    monkeypatch.setattr(embed, "one_shot_order", lambda texts, max_chars=1000: np.arange(len(texts)))
    params = _embed_params(smoke_params, tmp_path / "out")
    fresh = rf.embed_task.fn(params, TEXTS)
    cached = rf.embed_task.fn(params, TEXTS)
    assert np.array_equal(fresh[1], fresh[2]) and np.array_equal(fresh, cached)


@pytest.mark.slow
def test_duplicate_new_texts_real_encoder(smoke_params, tmp_path):
    """The same with the real encoder: the first retrain's vectors are the ones a later one reads back."""
    params = _embed_params(smoke_params, tmp_path / "out")
    fresh = rf.embed_task.fn(params, TEXTS)
    assert np.array_equal(fresh, rf.embed_task.fn(params, TEXTS)) and np.array_equal(fresh[1], fresh[2])


RETRAIN = ["flows.retrain.lr=0.003", "flows.retrain.max_old_recall_drop=0.05", "flows.retrain.grow_threshold=null"]


def _weights(path: Path) -> tuple[dict, dict]:
    blob = torch.load(path, map_location="cpu", weights_only=True)
    return blob["state_dict"], {k: v for k, v in blob["config"].items() if k != "sid_version"}


@pytest.mark.slow
def test_killed_retrain_rollback_and_retrain_keep_every_version(tmp_path_factory, trained, prefect_server,
                                                               monkeypatch, capsys):
    """Findings 2, 3 and 10 on the real retrain (smoke pipeline):
    a retrain cut short after its fine-tune leaves `.r1` marked UNCHECKED (not promotable without
    --force); the next retrain takes `.r2`; after a rollback, a third retrain takes `.r3` and the
    kept `.r2` keeps its bytes and its registration; all three fine-tunes of the same base, the
    first one in this process included, give the same weights."""
    from flows.flow_params import apply_overrides

    work = tmp_path_factory.mktemp("versions_probe") / "out"
    shutil.copytree(trained["params"]["out_dir"], work)
    params = apply_overrides({**trained["params"], "out_dir": str(work)}, RETRAIN)
    base = live_version(work)
    args = ["--params", PARAMS, "-s", f"out_dir={work}"]
    new_items = str(trained["new_items"])

    class Killed(RuntimeError):
        """Stands in for kill -9 once the model is written: the flow runs none of its code after it."""

    def killed(*a, **k):
        raise Killed

    monkeypatch.setattr(rf, "decide", killed)
    with pytest.raises(Killed):
        rf.retrain_flow(params=params, opt_new_items=new_items)
    monkeypatch.undo()
    leftover = work / "versions" / f"{base}.r1"
    assert (leftover / UNCHECKED).exists() and (leftover / "retriever" / "model.pt").exists()
    rc, _, err = _cli(capsys, "promote", f"{base}.r1", *args)
    assert rc == 2 and "never passed" in _one_line(err) and live_version(work) == base

    first = rf.retrain_flow(params=params, opt_new_items=new_items)
    assert first["candidate"] == f"{base}.r2" and first["promoted"], first["reason"]
    assert promote(work, base) == f"{base}.r2"                                # rollback
    kept = _snapshot(work / "versions" / f"{base}.r2")
    second = rf.retrain_flow(params=params, opt_new_items=new_items)
    assert second["candidate"] == f"{base}.r3" and second["promoted"]
    assert _snapshot(work / "versions" / f"{base}.r2") == kept
    assert [v["version"] for v in show_versions(work)["versions"]] == [f"{base}.r3", f"{base}.r2", base]

    # one base, one retrain: the same weights each time (the version name in the config aside)
    models = [leftover / "retriever" / "model.pt", work / "versions" / f"{base}.r2" / "retriever" / "model.pt",
              work / "retriever" / "model.pt"]
    (w1, c1), *rest = [_weights(m) for m in models]
    for w, c in rest:
        assert c == c1 and w.keys() == w1.keys() and all(torch.equal(w[k], w1[k]) for k in w1)

    # the kept .r2 still matches its registration: promoting it back is an ordinary rollback
    assert promote(work, f"{base}.r2") == f"{base}.r3" and live_version(work) == f"{base}.r2"
    rc, printed, _ = _cli(capsys, "promote", f"{base}.r1", "--force", *args)
    assert rc == 0 and "UNCHECKED" in json.loads(printed)["forced"]
