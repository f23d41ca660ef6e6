"""Issue 25, the params slice: one precedence (params.yaml < profile < -s), `sa2crq run` locking before
params.yaml changes, the schema refusing what cannot work, bounded YAML, safe out_dirs, --params paths.

Each probe states what the user did and what they must get: the value they set, or one line
(`sa2crq: error: ...`, exit status 2) naming the key, file or path, with nothing changed."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from dvc.utils.cli_parse import to_path_overrides  # imported once here: DVC's own -S handling, warm for the tests
from dvc.utils.hydra import apply_overrides

from components.runtime.config import MAX_YAML_NODES, dvc_set_params, load_params
from components.runtime.errors import BusyError, DataError, Sa2crqError
from components.runtime.locks import HELD_ENV, LOCK_FILE, lock_folder, lock_for_children
from components.tokenizers.sid_table import MAX_IMPORT_CODE, read_import
from flows.flow_params import apply_overrides as flow_overrides
from sa2crq.cli import main

ROOT = Path(__file__).resolve().parents[2]
PARAMS = ROOT / "params.yaml"


def dvc_writes(path: Path, sets: list[str]) -> None:
    """What `dvc exp run -S s1 -S s2 ...` does to params.yaml before it runs any stage."""
    for file, overrides in to_path_overrides(sets).items():
        assert file == "params.yaml"
        apply_overrides(path, overrides)


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A copy of params.yaml in a scratch working folder (what `sa2crq run` sees from a checkout)."""
    shutil.copy(PARAMS, tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def smoke_project(project) -> Path:
    """The state the README's `sa2crq run --profile smoke` leaves: params.yaml holds profile: smoke."""
    dvc_writes(project / "params.yaml", ["profile=smoke"])
    assert load_params(project / "params.yaml")["retriever"]["beam"] == 10   # the smoke profile's beam
    return project


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sa2crq: error: ") and "Traceback" not in err, err
    return lines[0]


@contextlib.contextmanager
def within(seconds: float) -> Iterator[None]:
    """Fail the test (instead of hanging) when the block runs longer than seconds."""
    def expire(*_):
        raise TimeoutError(f"took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ---- finding 4: -s beats the active profile, in every path ------------------------------------


def test_run_set_beats_the_profile_in_the_stages(smoke_project, monkeypatch):
    """Finding 4: after `sa2crq run --profile smoke`, `sa2crq run -s retriever.beam=5` must run the
    stages with beam 5 (the smoke profile sets 10): the -S list DVC gets makes params.yaml resolve to 5."""
    calls = []

    def fake_dvc(cmd):
        calls.append(cmd)
        assert cmd[:3] == ["dvc", "exp", "run"]
        dvc_writes(Path("params.yaml"), [cmd[i + 1] for i, x in enumerate(cmd) if x == "-S"])
        return 0

    monkeypatch.setattr("subprocess.call", fake_dvc)
    assert main(["run", "-s", "retriever.beam=5"]) == 0
    assert len(calls) == 1
    stages = load_params("params.yaml")   # what the resolve_params stage reads: the file alone
    assert stages["retriever"]["beam"] == 5 and stages["profile"] == "smoke"
    assert stages["retriever"]["epochs"] == 2   # the rest of the profile still applies


@pytest.mark.parametrize("sets,key,value", [
    (["retriever.beam=5"], "retriever.beam", 5),
    (["retriever.fusion={beam: 20}"], "retriever.fusion.beam", 20),           # a block the profile sets below
    (["tokenizer.codebook_sizes=[8, 16, 32]"], "tokenizer.codebook_sizes", [8, 16, 32]),
    (["seed=3"], "seed", 3),                                                  # a key the profile leaves alone
    (["profile=default", "retriever.beam=5"], "retriever.beam", 5),
    (["profiles.smoke.retriever.beam=7", "retriever.beam=5"], "retriever.beam", 5),
])
def test_dvc_sets_resolve_as_load_params_does(smoke_project, sets, key, value):
    """The -S list, applied the way DVC applies it, gives the stages what `load_params(path, sets)` gives."""
    path = smoke_project / "params.yaml"
    wanted = load_params(path, sets)
    dvc_writes(path, dvc_set_params(path, sets))
    got = load_params(path)
    for part in key.split("."):
        got, wanted = got[part], wanted[part]
    assert got == wanted == value


def test_run_with_profile_and_set_in_one_call(project, monkeypatch):
    """`sa2crq run --profile smoke -s retriever.beam=5` from the committed params.yaml: beam 5."""
    monkeypatch.setattr("subprocess.call", lambda cmd: dvc_writes(
        Path("params.yaml"), [cmd[i + 1] for i, x in enumerate(cmd) if x == "-S"]) or 0)
    assert main(["run", "--profile", "smoke", "-s", "retriever.beam=5"]) == 0
    stages = load_params("params.yaml")
    assert (stages["profile"], stages["retriever"]["beam"], stages["retriever"]["eval_beam"]) == ("smoke", 5, 10)


@pytest.mark.parametrize("value,part", [
    ("a,b", "dvc exp run -S cannot apply"),                        # a Hydra sweep: DVC refuses it after 40 s
    ("${oc.env:HOME}", "`dvc exp run -S` would give the stages"),  # Hydra resolves it, load_params does not
])
def test_run_refuses_a_set_dvc_would_write_differently(project, monkeypatch, capsys, value, part):
    """Extra probe: a value DVC cannot apply, or applies as something else, stops before DVC with one line."""
    monkeypatch.setattr("subprocess.call", lambda cmd: pytest.fail(f"dvc ran: {cmd}"))
    before = Path("params.yaml").read_bytes()
    assert main(["run", "-s", f"data.generic.items={value}"]) == 2
    assert part in one_line(capsys.readouterr().err)
    assert Path("params.yaml").read_bytes() == before


def test_stage_resolve_params_and_flows_agree_on_the_precedence(smoke_project, monkeypatch, capsys, tmp_path):
    """Finding 4: `sa2crq stage`, `sa2crq resolve-params` and a flow's overrides all give -s the last word."""
    out = tmp_path / "out"
    monkeypatch.setattr("components.pipeline.stages.get_step",
                        lambda name: lambda params: {"beam": params["retriever"]["beam"]})
    assert main(["stage", "evaluate", "-s", "retriever.beam=5", "-s", f"out_dir={out}"]) == 0
    assert json.loads(capsys.readouterr().out) == {"beam": 5}
    assert main(["resolve-params", "-s", "retriever.beam=5", "-s", f"out_dir={out}"]) == 0
    assert yaml.safe_load((out / "params.resolved.yaml").read_text())["retriever"]["beam"] == 5
    assert flow_overrides(load_params("params.yaml"), ["retriever.beam=5"])["retriever"]["beam"] == 5
    committed = load_params(PARAMS)   # a flow started from the committed params with profile=smoke
    assert flow_overrides(committed, ["profile=smoke", "retriever.beam=5"])["retriever"]["beam"] == 5
    assert flow_overrides(committed, ["profile=smoke"])["retriever"]["beam"] == 10


# ---- finding 5: two `sa2crq run` at once -----------------------------------------------------


def test_second_run_is_refused_before_params_yaml_changes(project, monkeypatch, capsys):
    """Finding 5: while another run holds outputs/'s lock, `sa2crq run -s ...` exits 2 with our one
    line, runs no DVC, and leaves params.yaml byte for byte as it was."""
    monkeypatch.setattr("subprocess.call", lambda cmd: pytest.fail(f"dvc ran: {cmd}"))
    (project / "outputs").mkdir()
    before = Path("params.yaml").read_bytes()
    fd = os.open(project / "outputs" / LOCK_FILE, os.O_RDWR | os.O_CREAT)   # another open file: another holder
    try:
        os.write(fd, b"4242 2024-01-01 00:00:00\n")
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert main(["run", "-s", "retriever.beam=5"]) == 2
    finally:
        os.close(fd)
    line = one_line(capsys.readouterr().err)
    assert "outputs/: another sa2crq run holds the lock (pid 4242" in line
    assert Path("params.yaml").read_bytes() == before


HOLDER_CHILD = """
import os, sys
from components.runtime.errors import BusyError
from components.runtime.locks import HELD_ENV, lock_folder
folder = sys.argv[1]
with lock_folder(folder, wait=0):
    print("stage re-entered", flush=True)
for forged in ("1 " + os.path.realpath(folder), None):   # another pid, then no variable at all
    if forged is None:
        os.environ.pop(HELD_ENV)
    else:
        os.environ[HELD_ENV] = forged
    try:
        with lock_folder(folder, wait=0):
            print("entered without the holder", flush=True)
    except BusyError:
        print("refused", flush=True)
"""


def test_only_the_holders_children_re_enter_its_lock(tmp_path, monkeypatch):
    """Finding 5, in-process: a lock held by pid P (another open file, stamped P) is re-entered when
    SA2CRQ_LOCK_HELD names P and this folder (a stage `sa2crq run` started), and refused when it
    names another pid or folder, or is unset."""
    out = tmp_path / "outputs"
    out.mkdir()
    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT)
    try:
        os.write(fd, f"{os.getppid()} 2024-01-01 00:00:00\n".encode())
        fcntl.flock(fd, fcntl.LOCK_EX)
        monkeypatch.setenv(HELD_ENV, f"{os.getppid()} {out.resolve()}")
        with lock_folder(out, wait=0) as held:
            assert held == out
        for forged in (f"{os.getppid() + 1} {out.resolve()}", f"{os.getppid()} {tmp_path}"):
            monkeypatch.setenv(HELD_ENV, forged)
            with pytest.raises(BusyError), lock_folder(out, wait=0):
                pass
        monkeypatch.delenv(HELD_ENV)
        with pytest.raises(BusyError), lock_folder(out, wait=0):
            pass
    finally:
        os.close(fd)
    with lock_for_children({"out_dir": str(out)}):   # what `sa2crq run` hands its DVC stages
        assert os.environ[HELD_ENV] == f"{os.getpid()} {out.resolve()}"
    assert HELD_ENV not in os.environ


@pytest.mark.slow   # a fresh interpreter importing the lock module takes ~1 s
def test_stages_of_the_run_re_enter_its_lock(tmp_path):
    """Finding 5: `sa2crq run` holds the lock across DVC; the stages it starts (other processes)
    re-enter it, and only they: a process whose variable names another pid, or none, is refused."""
    out = tmp_path / "outputs"
    with lock_for_children({"out_dir": str(out)}):
        res = subprocess.run([sys.executable, "-c", HOLDER_CHILD, str(out)], capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split("\n")[:3] == ["stage re-entered", "refused", "refused"]
    assert "SA2CRQ_LOCK_HELD" not in os.environ


# ---- finding 8: floats are finite; finding 12: ranges and divisibility -----------------------


@pytest.mark.parametrize("override,key,part", [
    ("retriever.lr=.inf", "retriever.lr", "must be a number in (0, 1]"),
    ("retriever.lr=1e308", "retriever.lr", "must be a number in (0, 1]"),
    ("retriever.lr=.nan", "retriever.lr", "must be a number in (0, 1]"),
    ("tokenizer.lr=-.inf", "tokenizer.lr", "must be a number in (0, 1]"),
    ("flows.retrain.lr=.inf", "flows.retrain.lr", "must be null (= retriever.lr) or a number in (0, 1]"),
    ("retriever.weight_decay=1e308", "retriever.weight_decay", "must be a number in [0, 10]"),
    ("retriever.grad_clip=.inf", "retriever.grad_clip", "must be a finite number"),
    ("tokenizer.sarq.target_items_per_sid=.inf", "tokenizer.sarq.target_items_per_sid", "must be a finite number"),
    ("eval.sasrec.neg_alpha=1e308", "eval.sasrec.neg_alpha", "must be a number in [0, 10]"),
    ("retriever.fusion.weights=[.inf, 1]", "retriever.fusion.weights", "finite sum"),
    ("flows.retrain.grow_threshold=.inf", "flows.retrain.grow_threshold", "must be auto, null"),
    ("flows.retry_delay_s=1e308", "flows.retry_delay_s", "must be a number in [0, 86400]"),
    ("retriever.n_heads=3", "retriever.n_heads", "must divide retriever.d_model (128) into equal attention heads"),
    ("eval.sasrec.heads=3", "eval.sasrec.heads", "must divide eval.sasrec.dim (64)"),
    ("retriever.d_model=1000000000000", "retriever.d_model", "must be at most 8192"),
    ("retriever.beam=1000000000", "retriever.beam", "must be at most 10000 (beam search keeps"),
    ("eval.bootstrap=1000000000", "eval.bootstrap", "must be at most 100000"),
    ("seed=100000000000000000000", "seed", "must be at most 4294967295 (numpy and torch seeds are 32-bit)"),
    ("seed=4294967296", "seed", "must be at most"),
    ("eval.seeds=[0, 4294967296]", "eval.seeds", "each must be at most"),
    ("data.split_seed=4294967296", "data.split_seed", "must be at most"),
    ("tokenizer.codebook_sizes=[64, 128, 1000000000000]", "tokenizer.codebook_sizes", "each must be at most 65536"),
    ("retriever.ff_dim=10000000000", "retriever.ff_dim", "must be at most 65536"),
    ("retriever.batch_size=10000000000", "retriever.batch_size", "must be at most 65536"),
    ("profiles.smoke.retriever.beam=1000000000", "profiles.smoke.retriever.beam", "must be at most 10000"),
    ("profiles.smoke.retriever.n_heads=5", "profiles.smoke.retriever.n_heads", "must divide"),
])
def test_schema_refuses_what_cannot_work(override, key, part, monkeypatch, capsys):
    """Findings 8 and 12: a value that diverges or crashes later stops up front with one line naming it."""
    monkeypatch.setattr("components.pipeline.stages.get_step", lambda name: pytest.fail(f"step {name} ran"))
    assert main(["stage", "train_retriever", "--params", str(PARAMS), "-s", override]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"sa2crq: error: params.yaml '{key}': ") and part in line, line


@pytest.mark.parametrize("override", ["seed=4294967295", "retriever.beam=10000", "retriever.n_heads=8",
                                      "retriever.d_model=8192", "eval.bootstrap=100000", "tokenizer.sarq.tau=.inf",
                                      "retriever.lr=1", "tokenizer.codebook_sizes=[64, 128, 65536]"])
def test_schema_keeps_the_values_at_the_bounds(override):
    """The bounds are generous: the edge values still load (tau .inf means fixed length)."""
    load_params(PARAMS, [override])


def test_imported_codes_are_bounded(tmp_path):
    """Finding 12: an imported SID table with codes around 1e12 (train_retriever would ask for 512 TB)
    is a DataError naming the file, the column and the row; the bound itself is accepted."""
    path = tmp_path / "ids.json"
    path.write_text(json.dumps({"a": [1, 2], "b": [3, 10**12]}))
    with pytest.raises(DataError, match=rf"{path}, column 'codes', rows \[1\]: codes must be at most 65535"):
        read_import(path, ["a", "b"])
    path.write_text(json.dumps({"a": [1, 2], "b": [3, MAX_IMPORT_CODE]}))
    assert read_import(path, ["a", "b"]) == [[1, 2], [3, MAX_IMPORT_CODE]]
    path.write_text(json.dumps({"a": [1, 2], "b": [3], "zz": []}))   # hypothesis found it: a dropped row's codes
    with pytest.warns(UserWarning, match="dropped 1 item ids"):      # are never read (max of [] raised ValueError)
        assert read_import(path, ["a", "b"], unknown="drop") == [[1, 2], [3]]


# ---- finding 9 (out_dir): no system folder, not inside data/ ---------------------------------


def _system_link(tmp_path: Path) -> str:
    link = tmp_path / "looks-harmless"
    link.symlink_to("/etc")
    return str(link)


def _data_link(tmp_path: Path) -> str:
    link = tmp_path / "outlink"
    link.symlink_to(ROOT / "data")
    return str(link / "run")


@pytest.mark.parametrize("out_dir", ["/", "/etc", "/proc/self", "/usr/lib/sa2crq", "/var/lib/x", "/dev/shm/o",
                                     "/tmp/../etc/x", "data", "data/runs/1", "outputs/../data", _system_link,
                                     _data_link])
def test_out_dir_must_not_be_a_system_folder_or_inside_data(out_dir, tmp_path, monkeypatch, capsys):
    """Finding 9: out_dir=/etc (or a link or `..` path to it, or into the DVC-tracked data/) is one
    line naming out_dir; nothing is created there."""
    out_dir = out_dir(tmp_path) if callable(out_dir) else out_dir
    monkeypatch.chdir(ROOT)   # data.root is `data`, relative to the project root
    monkeypatch.setattr("components.pipeline.stages.get_step", lambda name: pytest.fail(f"step {name} ran"))
    assert main(["stage", "prepare", "-s", f"out_dir={out_dir}"]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"sa2crq: error: params.yaml 'out_dir': {out_dir}")
    assert "system folder" in line or "inside data.root data/" in line


@pytest.mark.parametrize("out_dir", ["outputs", "/var/tmp/sa2crq-out", "experiments/out"])
def test_out_dir_elsewhere_is_kept(out_dir, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert load_params(PARAMS, [f"out_dir={out_dir}"])["out_dir"] == out_dir


# ---- finding 11: YAML alias bombs --------------------------------------------------------------


def _bomb(levels: int = 9) -> str:
    names = [f"l{i}" for i in range(levels)]
    lines = [f"{names[0]}: &{names[0]} [" + ", ".join(["x"] * 9) + "]"]
    lines += [f"{n}: &{n} [" + ", ".join([f"*{p}"] * 9) + "]" for p, n in zip(names, names[1:])]
    return "\n".join(lines) + "\n"


def test_params_alias_bomb_fails_fast(tmp_path, capsys):
    """Finding 11: a params file with a 9-level alias bomb (9**9 values) used to run for minutes and
    gigabytes; it is now one line at once."""
    path = tmp_path / "bomb.yaml"
    path.write_text(PARAMS.read_text() + _bomb())
    with within(5):
        assert main(["stage", "prepare", "--params", str(path)]) == 2
    line = one_line(capsys.readouterr().err)
    assert f"{path}: YAML aliases expand to more than {MAX_YAML_NODES:,} values" in line


def test_override_alias_bomb_and_self_reference_fail_fast(capsys):
    """Finding 11 (the -s values are YAML too): a bomb in one override value, and an alias inside
    itself, are one line naming the key."""
    value = "{" + _bomb().strip().replace("\n", ", ") + "}"
    with within(5):
        assert main(["stage", "prepare", "--params", str(PARAMS), "-s", f"eval.ks={value}"]) == 2
    assert "params.yaml 'eval.ks': YAML aliases expand to more than" in one_line(capsys.readouterr().err)
    with within(5), pytest.raises(Sa2crqError, match="a YAML alias refers to the value that contains it"):
        load_params(PARAMS, ["eval.ks=&a [1, *a]"])


def test_aliases_within_the_bound_still_load(tmp_path):
    """A params file that shares a block through an anchor loads as before."""
    text = PARAMS.read_text().replace("  ks: [1, 5, 10, 50, 100]", "  ks: &ks [1, 5, 10, 50, 100]")
    text = text.replace("  deep_ks: [200, 500]", "  deep_ks: *ks")
    assert "&ks" in text and "*ks" in text
    path = tmp_path / "params.yaml"
    path.write_text(text)
    assert load_params(path)["eval"]["deep_ks"] == [1, 5, 10, 50, 100]


# ---- finding 14 (--params): a folder, an unreadable or binary file -----------------------------


def test_params_that_is_a_folder_is_one_line(tmp_path, capsys):
    """Finding 14: `--params <a folder>` printed an IsADirectoryError traceback."""
    assert main(["stage", "prepare", "--params", str(tmp_path)]) == 2
    assert one_line(capsys.readouterr().err) == (f"sa2crq: error: {tmp_path}: is a folder, not a params file "
                                                 "(--params takes a YAML file)")


def test_params_unreadable_or_binary_is_one_line(tmp_path, monkeypatch, capsys):
    """Finding 14: a params file the OS refuses to read (here: as root, simulated), or that is not
    text, is one line naming it."""
    path = tmp_path / "params.yaml"
    path.write_bytes(b"\xff\xfe\x00binary")
    assert main(["stage", "prepare", "--params", str(path)]) == 2
    assert one_line(capsys.readouterr().err) == f"sa2crq: error: {path}: not a text file (params must be UTF-8 YAML)"
    path.write_text("seed: 0\n")
    real_read = Path.read_text

    def refuse(self, *args, **kwargs):
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real_read(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", refuse)
    assert main(["stage", "prepare", "--params", str(path)]) == 2
    assert one_line(capsys.readouterr().err) == (f"sa2crq: error: {path}: cannot read the params file: "
                                                 "Permission denied")


def test_run_refuses_params_dvc_would_not_read(project, tmp_path, monkeypatch, capsys):
    """Extra probe: `sa2crq run --params other.yaml` ran dvc.yaml on params.yaml, ignoring the file."""
    monkeypatch.setattr("subprocess.call", lambda cmd: pytest.fail(f"dvc ran: {cmd}"))
    other = tmp_path / "other.yaml"
    shutil.copy(PARAMS, other)
    assert main(["run", "--params", str(other)]) == 2
    assert "`sa2crq run` runs dvc.yaml, whose stages read params.yaml" in one_line(capsys.readouterr().err)



# ---- the same through real DVC: a one-stage project ------------------------------------------

# with {hold}: the stage then waits (at most 120 s) for a file `release` in the project, so a test
# holds the run's lock exactly as long as it needs it
HOLD = " && for i in $(seq 1200); do [ -e release ] && break; sleep 0.1; done"
DVC_YAML = """stages:
  resolve_params:
    cmd: sa2crq resolve-params{hold}
    params:
      - params.yaml:
    outs:
      - outputs/params.resolved.yaml
"""


def _dvc_project(root: Path) -> dict[str, str]:
    """A git + DVC project holding params.yaml and dvc.yaml's first stage (which takes the out_dir
    lock, as every stage does); the environment to run `sa2crq` in it."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "DVC_NO_ANALYTICS": "1"}
    env.pop(HELD_ENV, None)
    shutil.copy(PARAMS, root / "params.yaml")
    (root / "dvc.yaml").write_text(DVC_YAML.format(hold=""))
    (root / ".gitignore").write_text("/outputs\n")
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        subprocess.run(cmd, cwd=root, env=env, check=True, capture_output=True)
    return env


def _text(path: Path) -> str:
    return path.read_text() if path.exists() else ""


@pytest.mark.slow   # git, dvc init and three `dvc exp run`s: 10-20 s
def test_real_dvc_run_set_beats_profile_and_second_run_is_refused(tmp_path):
    """Findings 4 and 5 through DVC itself: the stage (another process) re-enters the run's lock;
    `-s retriever.beam=5` after `--profile smoke` reaches params.resolved.yaml; a second run while
    the first holds the lock exits 2 with our line and leaves params.yaml as it was."""
    env = _dvc_project(tmp_path)
    sa2crq = [str(Path(sys.executable).parent / "sa2crq")]

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(sa2crq + ["run", *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)

    for args in (["--profile", "smoke"], ["-s", "retriever.beam=5"]):
        res = run(*args)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    resolved = yaml.safe_load((tmp_path / "outputs" / "params.resolved.yaml").read_text())
    assert (resolved["profile"], resolved["retriever"]["beam"], resolved["retriever"]["epochs"]) == ("smoke", 5, 2)

    (tmp_path / "dvc.yaml").write_text(DVC_YAML.format(hold=HOLD))
    first = subprocess.Popen(sa2crq + ["run", "-s", "retriever.beam=6"], cwd=tmp_path, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    resolved_file = tmp_path / "outputs" / "params.resolved.yaml"
    try:
        deadline = time.monotonic() + 120   # its stage has run (and holds) once the file says beam 6
        while first.poll() is None and time.monotonic() < deadline and "beam: 6" not in _text(resolved_file):
            time.sleep(0.1)
        assert first.poll() is None and "beam: 6" in _text(resolved_file)
        before = (tmp_path / "params.yaml").read_bytes()
        second = run("-s", "retriever.beam=7")
        assert second.returncode == 2
        line = one_line(second.stderr)
        assert f"outputs/: another sa2crq run holds the lock (pid {first.pid}," in line
        assert (tmp_path / "params.yaml").read_bytes() == before
    finally:
        (tmp_path / "release").touch()
        out, err = first.communicate(timeout=300)
    assert first.returncode == 0, out[-2000:] + err[-2000:]
