"""Probes of issue 25, findings 13 and 14: bad out_dirs and damaged .npy / checkpoint files.

Each OS refusal on an out_dir (a file in the way, a read-only or full disk, no permission, a
folder that holds no files) is one line naming the path and the errno's meaning, exit 2; only
a lock another process holds is reported as a busy folder. A damaged embeddings file is one
line naming it; nothing in it is unpickled. Errnos that cannot be made for real here (root
ignores chmod) are faked at the os call that meets them.
"""
from __future__ import annotations

import ast
import errno
import os
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from components.runtime.atomic import PathError, atomic_dir, atomic_path
from components.runtime.errors import BusyError, DataError
from components.runtime.locks import LOCK_FILE, lock_folder
from components.runtime.safe_load import load_matrix
from components.tokenizers import tokenizer_stages  # noqa: F401  (imported once here, not inside a timed test)
from sa2crq.cli import main

ROOT = Path(__file__).resolve().parents[2]


def _cli(capsys, *argv: str) -> tuple[int, list[str]]:
    code = main(["resolve-params", "--params", str(ROOT / "params.yaml"), *argv])
    return code, capsys.readouterr().err.strip().splitlines()


def _refuse(monkeypatch, call: str, err: int, hit) -> None:
    """Make os.<call> fail with errno `err` on the paths `hit(path)` picks, as the OS would."""
    real = getattr(os, call)

    def fake(path, *args, **kwargs):
        if hit(Path(os.fsdecode(path))):
            raise OSError(err, os.strerror(err), os.fsdecode(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, call, fake)


# ---- finding 13: bad out_dirs ----------------------------------------------------------------

@pytest.mark.parametrize("inner", ["", "sub"])
def test_a_file_as_out_dir_is_one_line_naming_it(tmp_path, capsys, inner):
    """Before: FileExistsError / NotADirectoryError tracebacks."""
    blocker = tmp_path / "afile"
    blocker.write_text("not a folder")
    out = blocker / inner if inner else blocker
    code, err = _cli(capsys, "-s", f"out_dir={out}")
    reason = os.strerror(errno.ENOTDIR if inner else errno.EEXIST)
    assert code == 2 and len(err) == 1 and err[0].startswith(f"sa2crq: error: {out}: ") and reason in err[0], err
    assert blocker.read_text() == "not a folder"


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc")
def test_a_folder_that_holds_no_files_is_not_blamed_on_a_lock():
    """Before: `out_dir=/proc/self` said another sa2crq run held the lock."""
    with pytest.raises(PathError) as info:
        with lock_folder("/proc/self"):
            pass
    assert not isinstance(info.value, BusyError)
    assert str(info.value).startswith(f"/proc/self/{LOCK_FILE}: cannot create the lock file: ")


@pytest.mark.parametrize("err", [errno.EROFS, errno.EACCES, errno.EPERM])
@pytest.mark.parametrize("exists", [True, False])
def test_a_read_only_or_forbidden_out_dir_is_one_line(tmp_path, capsys, monkeypatch, err, exists):
    """Before: OSError tracebacks (a read-only filesystem, an immutable or foreign folder). An
    existing folder fails at its lock file, a new one at its creation; nothing is left behind."""
    out = tmp_path / "out"
    if exists:
        out.mkdir()
        _refuse(monkeypatch, "open", err, lambda p: p == out / LOCK_FILE)
    else:
        _refuse(monkeypatch, "mkdir", err, lambda p: p == out)
    code, lines = _cli(capsys, "-s", f"out_dir={out}")
    named = out / LOCK_FILE if exists else out
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"sa2crq: error: {named}: cannot ") and os.strerror(err) in lines[0], lines
    assert list(tmp_path.rglob("*")) == ([out] if exists else [])


def test_a_full_disk_when_stamping_the_lock_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    """Before: ENOSPC traceback from locks._stamp on a new out_dir."""
    out = tmp_path / "new" / "out"
    real_pwrite = os.pwrite

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", full)
    code, lines = _cli(capsys, "-s", f"out_dir={out}")
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"sa2crq: error: {out / LOCK_FILE}: cannot take the lock: No space left on device")
    assert not out.exists()
    monkeypatch.setattr(os, "pwrite", real_pwrite)
    with lock_folder(out) as folder:   # the failed attempt holds nothing
        assert (folder / LOCK_FILE).read_text().startswith(f"{os.getpid()} ")


def test_a_busy_folder_is_still_a_busy_folder(tmp_path):
    """The OS checks above must not turn real contention into a path error."""
    import subprocess
    import sys

    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from filelock import FileLock; "
                               f"l = FileLock({str(out / LOCK_FILE)!r}); l.acquire(); print('held', flush=True); "
                               "time.sleep(30)"], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(BusyError, match="another sa2crq run holds the lock"):
            with lock_folder(out, wait=0):
                pass
    finally:
        holder.kill()
        holder.wait()


def test_atomic_writes_name_the_target_not_their_temporary(tmp_path, monkeypatch):
    """An immutable folder refuses the temp folder (EPERM at mkdir of a random `.name.xxxx.tmp`):
    the line names the output, and no temporary is left."""
    target = tmp_path / "prepared"
    _refuse(monkeypatch, "mkdir", errno.EPERM, lambda p: p.parent == tmp_path and p.name.startswith(".prepared."))
    with pytest.raises(PathError, match=rf"^{target}: cannot write: {os.strerror(errno.EPERM)}"):
        with atomic_dir(target):
            pass
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_inside_a_write_names_the_target(tmp_path):
    """A write that meets ENOSPC (no file name: a short write) names the output; the old file stays."""
    target = tmp_path / "table.parquet"
    target.write_text("old")
    with pytest.raises(PathError, match=rf"^{target}: cannot write: No space left on device") as info:
        with atomic_path(target):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert info.value.errno == errno.ENOSPC and target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["table.parquet"]


def test_a_missing_input_read_inside_a_write_is_not_a_path_error(tmp_path):
    """Only the write's own failures become PathError: a file the block reads keeps its own error."""
    with pytest.raises(FileNotFoundError):
        with atomic_path(tmp_path / "out.json"):
            (tmp_path / "missing.json").read_text()


def test_dvc_refused_a_path_of_a_stage_is_one_line(tmp_path, monkeypatch):
    """A flow on the pipeline's out_dir runs `dvc repro`; DVC meeting an OS error on an out (a file
    in the way of outputs/prepared) was re-raised as DVC's ReproductionError, a traceback."""
    import dvc.repo
    from dvc.exceptions import ReproductionError

    from flows.step_io import dvc_repro

    blocked = tmp_path / "outputs" / "prepared"

    class Repo:   # dvc.repo.Repo as `dvc repro` meets the blocked out
        def __init__(self, root: str):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            return None

        def reproduce(self, target: str, run_env: dict) -> list:
            try:
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(blocked))
            except OSError as exc:
                raise ReproductionError(f"failed to reproduce '{target}'") from exc

    monkeypatch.setattr(dvc.repo, "Repo", Repo)
    with pytest.raises(PathError, match=rf"^{blocked}: cannot run dvc repro prepare: Not a directory"):
        dvc_repro(tmp_path, "prepare")


# ---- finding 14: damaged .npy files ----------------------------------------------------------

class _Evil:
    """Runs a shell command if ever unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _damage(path: Path, how: str, marker: Path) -> str:
    """Damage a saved float matrix; returns a word the error line must hold."""
    good = path.read_bytes()
    if how == "truncated":
        path.write_bytes(good[: len(good) - 37])
    elif how == "header only":
        path.write_bytes(good[:60])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "object array":
        np.save(path, np.array([[_Evil(marker), 1.0]], dtype=object), allow_pickle=True)
        return "Python objects"
    elif how == "pickle":
        path.write_bytes(pickle.dumps(_Evil(marker)))
        return "not a .npy file"
    elif how == "huge header":   # claims 4 TB: must be refused before anything is allocated
        with open(path, "wb") as fh:
            np.lib.format.write_array_header_1_0(fh, {"descr": "<f4", "fortran_order": False, "shape": (10**6, 10**6)})
            fh.write(b"\0" * 64)
    elif how == "strings":
        np.save(path, np.array([["a", "b"]]))
        return "not real numbers"
    elif how == "1-D":
        np.save(path, np.zeros(4, np.float32))
        return "2-D"
    return "truncated"


DAMAGES = ["truncated", "header only", "empty", "object array", "pickle", "huge header", "strings", "1-D"]


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_npy_is_a_data_error_naming_it(tmp_path, how):
    path = tmp_path / "items.npy"
    np.save(path, np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32))
    word = _damage(path, how, tmp_path / "pwned")
    with pytest.raises(DataError, match=word) as info:
        load_matrix(path)
    assert info.value.file == str(path) and not (tmp_path / "pwned").exists()


def test_a_good_npy_loads_as_float32_and_a_missing_one_says_so(tmp_path):
    x = np.arange(12, dtype=np.float64).reshape(6, 2)
    np.save(tmp_path / "items.npy", x)
    got = load_matrix(tmp_path / "items.npy")
    assert got.dtype == np.float32 and np.array_equal(got, x) and not isinstance(got, np.memmap)
    np.save(tmp_path / "empty.npy", np.zeros((0, 3), np.float32))
    assert load_matrix(tmp_path / "empty.npy").shape == (0, 3)
    with pytest.raises(FileNotFoundError):
        load_matrix(tmp_path / "missing.npy")


@pytest.mark.parametrize("how", ["truncated", "object array"])
def test_a_damaged_items_npy_stops_a_stage_with_one_line(tmp_path, capsys, how):
    """Before: `sa2crq stage train_head` on a truncated / object-array embeddings/items.npy printed
    a ValueError traceback."""
    out = tmp_path / "out"
    (out / "prepared").mkdir(parents=True)
    (out / "embeddings").mkdir()
    pd.DataFrame({"item_id": ["a", "b", "c"], "text": ["x", "y", "z"], "popularity": [3, 1, 0],
                  "group": ["head", "tail", "cold"]}).to_parquet(out / "prepared" / "items.parquet", index=False)
    emb = out / "embeddings" / "items.npy"
    np.save(emb, np.eye(3, 8, dtype=np.float32))
    word = _damage(emb, how, tmp_path / "pwned")
    code = main(["stage", "train_head", "--params", str(ROOT / "params.yaml"), "-s", f"out_dir={out}"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"sa2crq: error: {emb}: ") and word in lines[0], lines
    assert not (tmp_path / "pwned").exists() and not (out / "tokenizer").exists()


@pytest.mark.parametrize("reader", ["evaluate", "retriever"])
def test_the_other_readers_of_items_npy_refuse_a_damaged_one(tmp_path, reader):
    """evaluate and the retriever's inputs read items.npy / queries.npy through the same loader."""
    from components.evaluation.evaluate import load_eval_inputs
    from components.retrieval.retriever_data import load_inputs

    out = tmp_path / "out"
    (out / "prepared").mkdir(parents=True)
    (out / "embeddings").mkdir()
    pd.DataFrame({"item_id": ["a", "b"], "popularity": [1, 0]}).to_parquet(out / "prepared" / "items.parquet")
    pd.DataFrame({"query_id": ["q"], "split": ["test"]}).to_parquet(out / "prepared" / "queries.parquet")
    np.save(out / "embeddings" / "items.npy", np.eye(2, 4, dtype=np.float32))
    bad = out / "embeddings" / "queries.npy"
    np.save(bad, np.eye(1, 4, dtype=np.float32))
    _damage(bad, "truncated", tmp_path / "pwned")
    with pytest.raises(DataError, match="truncated") as info:
        (load_eval_inputs if reader == "evaluate" else load_inputs)({"out_dir": str(out)})
    assert info.value.file == str(bad)


# ---- every loader of a data file refuses pickles ---------------------------------------------

def _loads(name: str) -> list[tuple[str, ast.Call]]:
    found = []
    for folder in ("components", "flows", "sa2crq"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                        and isinstance(node.func.value, ast.Name) and node.func.value.id == name):
                    found.append((f"{path.relative_to(ROOT)}:{node.lineno}", node))
    return found


def _keyword(call: ast.Call, key: str) -> object:
    return next((k.value.value for k in call.keywords if k.arg == key and isinstance(k.value, ast.Constant)), None)


def test_every_torch_load_is_weights_only_and_every_np_load_refuses_pickles():
    """A checkpoint or .npy can carry a pickled program: every load in the code names the safe mode."""
    torch_loads, np_loads = _loads("torch"), _loads("np")
    assert torch_loads and np_loads
    assert [where for where, call in torch_loads if _keyword(call, "weights_only") is not True] == []
    assert [where for where, call in np_loads if _keyword(call, "allow_pickle") is not False] == []


def test_a_truncated_checkpoint_is_one_line_naming_it(tmp_path):
    """torch checkpoints: a truncated or garbage model.pt is a DataError naming the file."""
    import torch

    from components.runtime.torch_files import load_weights

    path = tmp_path / "model.pt"
    with open(path, "wb") as fh:
        torch.save({"state_dict": {"w": torch.zeros(64)}, "config": {}}, fh)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DataError, match="truncated or corrupt") as info:
        load_weights(path, keys=("state_dict",))
    assert info.value.file == str(path)
    path.write_bytes(b"garbage, not a checkpoint\n" * 10)
    with pytest.raises(DataError, match="truncated or corrupt|refused") as info:
        load_weights(path)
    assert info.value.file == str(path)


@pytest.mark.parametrize("step", ["embed", "train_head"])
def test_a_truncated_prepared_parquet_stops_a_stage_with_one_line(tmp_path, capsys, step):
    """Before: a truncated prepared/items.parquet gave pyarrow's ArrowInvalid traceback, which names
    neither the file nor what to do."""
    out = tmp_path / "out"
    (out / "prepared").mkdir(parents=True)
    (out / "embeddings").mkdir()
    items = out / "prepared" / "items.parquet"
    pd.DataFrame({"item_id": ["a", "b", "c"], "text": ["x", "y", "z"], "popularity": [3, 1, 0],
                  "group": ["head", "tail", "cold"]}).to_parquet(items, index=False)
    pd.DataFrame({"text": ["q"], "emb_row": [0]}).to_parquet(out / "prepared" / "queries.parquet", index=False)
    np.save(out / "embeddings" / "items.npy", np.eye(3, 8, dtype=np.float32))
    items.write_bytes(items.read_bytes()[:40])
    code = main(["stage", step, "--params", str(ROOT / "params.yaml"), "-s", f"out_dir={out}"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"sa2crq: error: {items}: not a readable parquet"), lines
    assert not (out / "tokenizer").exists()
