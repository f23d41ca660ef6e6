"""Load test of the online service (`components/serving/`): QPS, p50 / p99 at 1-32 users, one promotion under load.

The service runs in this process on a free loopback port (`ServerThread`), serving a temporary copy
of --out-dir's live version (the folders a version is made of, `components.lifecycle.versions.VERSIONED`; a
promotion renames folders, so --out-dir itself is only read). locust (headless, a subprocess,
FastHttpUser, no think time) sends the out_dir's test-split histories at beam --beam. Each point is
bounded by --seconds and --max-requests. Two service configurations run in the same command:
`batched` (params.yaml's serve block) and `unbatched` (max_batch 1), so the batching gain reads as
a ratio on the same noisy machine.

Promotion under load: after the first configuration's sweep, a second version is prepared in the
copy (`reissue`) and promoted with `components.lifecycle.versions.promote` half-way through an extra point at
--promote-users; the service's own poller (every --reload-every-s) swaps it in. Every request of
the run must succeed (exit status 1 otherwise).

    .venv/bin/pip install -r bench/requirements.txt
    .venv/bin/python bench/bench_service.py --out-dir outputs     # ~4 min
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from common import ROOT, set_threads, write_result

LOCUSTFILE = ROOT / "bench" / "locustfile_service.py"
CONFIGS = {"batched": {}, "unbatched": {"max_batch": 1, "max_wait_ms": 0}}


def request_bodies(out_dir: Path, n: int, k: int, beam: int) -> list[dict]:
    import pandas as pd

    queries = pd.read_parquet(out_dir / "prepared" / "queries.parquet")
    test = queries[queries["split"] == "test"].sample(frac=1.0, random_state=0).head(n)
    return [{"history": list(h), "k": k, "beam": beam} if len(h) else {"text": t, "k": k, "beam": beam}
            for h, t in zip(test["history"], test["text"])]


def copy_live(src: Path, dst: Path) -> Path:
    """The live version's folders of src, copied to dst (the benchmark promotes in its own copy)."""
    from components.lifecycle.versions import VERSIONED

    for name in VERSIONED:
        shutil.copytree(src / name, dst / name)
    return dst


def reissue(params: dict, out_dir: Path) -> str:
    """Prepare versions/<next version>/ in out_dir: the live version re-issued under a new id; returns the id.

    The retrain flow's candidate writer with no new items writes prepared/, embeddings/, tokenizer/
    and sids/ (meta `version` = the new id, `parent` = the live one), and the checkpoint is saved
    again with `sid_version` = the new id: the same weights and answers, under a version the
    service's checks (live version = SID table = checkpoint) accept as new."""
    import numpy as np
    import pandas as pd

    from components.lifecycle.versions import live_version, next_version, versions_dir
    from components.retrieval.retriever import load_retriever, save_retriever
    from components.tokenizers.sid_tokenizer import load_tokenizer
    from flows.catalog_update import write_candidate

    version = next_version(live_version(out_dir))
    cand = versions_dir(out_dir) / version
    dim = np.load(out_dir / "embeddings" / "items.npy", mmap_mode="r").shape[1]
    no_items = pd.DataFrame({"item_id": pd.Series(dtype=str), "text": pd.Series(dtype=str)})
    write_candidate(out_dir, cand, no_items, np.zeros((0, dim), np.float32), [], load_tokenizer(params), version)
    net = load_retriever(out_dir / "retriever" / "model.pt")
    net.config["sid_version"] = version
    save_retriever(net, cand / "retriever" / "model.pt")
    return version


def wait_until(check: Callable[[], bool], what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(0.05)


def promote_midway(client, out_dir: Path, version: str, seconds: int) -> dict:
    """Once locust's requests arrive, let half the point pass, promote `version` and wait until
    the service serves it (its poller reloads; nothing here calls /admin/reload)."""
    from components.lifecycle.versions import promote

    served = client.get("/stats").json()["requests"]
    wait_until(lambda: client.get("/stats").json()["requests"] > served, "locust's first request")
    traffic = time.monotonic()
    time.sleep(seconds / 2)
    before = promote(out_dir, version)
    promoted = time.monotonic()
    wait_until(lambda: client.get("/stats").json()["versions"]["A"] == version, f"the service to serve {version}")
    return {"version_before": before, "version_after": version, "promoted_at_s": round(promoted - traffic, 2),
            "swapped_after_s": round(time.monotonic() - promoted, 2)}


def run_locust(url: str, users: int, args: argparse.Namespace, bodies: Path, prefix: Path,
               during: Callable[[], dict] | None = None) -> dict:
    """One headless locust run (`during` is called while it runs); its aggregated CSV row and tally."""
    tally = prefix.with_suffix(".tally.json")
    env = {**os.environ, "SA2CRQ_BENCH_QUERIES": str(bodies), "SA2CRQ_BENCH_MAX_REQUESTS": str(args.max_requests),
           "SA2CRQ_BENCH_TALLY": str(tally)}
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", url, "-u", str(users),
           "-r", str(users), "-t", f"{args.seconds}s", "--reset-stats", "--only-summary", "--csv", str(prefix),
           "--exit-code-on-error", "0", "--loglevel", "WARNING"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        extra = during() if during else {}
        out, _ = proc.communicate(timeout=args.seconds + 60)
    finally:
        proc.kill()
    if proc.returncode:
        raise RuntimeError(f"locust failed ({proc.returncode}): {out[-2000:]}")
    with open(f"{prefix}_stats.csv", newline="") as fh:
        row = next(r for r in csv.DictReader(fh) if r["Name"] == "Aggregated")
    counts = json.loads(tally.read_text())
    return {"users": users, "requests": int(row["Request Count"]), "failures": int(row["Failure Count"]),
            "qps": float(row["Requests/s"]), "p50_ms": float(row["50%"]), "p99_ms": float(row["99%"]),
            "failed_incl_spawn": counts["failed"], "served_by": counts["versions"], **extra}


def bench_config(params: dict, name: str, args: argparse.Namespace, bodies: Path, work: Path,
                 promote_to: str | None) -> list[dict]:
    """The --users sweep on one service configuration; with `promote_to`, then the promotion point."""
    import httpx

    from components.serving.server import ServerThread

    params = copy.deepcopy(params)
    params["serve"].update({"reload_every_s": args.reload_every_s, "request_log": str(work / f"{name}.jsonl"),
                            "request_log_outside_out_dir": True, **CONFIGS[name]})   # the log goes to a temp folder
    out_dir = Path(params["out_dir"])
    requests = json.loads(bodies.read_text())
    points = [(users, False) for users in args.users] + ([(args.promote_users, True)] if promote_to else [])
    rows = []
    with ServerThread(params) as srv, httpx.Client(base_url=srv.url, timeout=60) as client:
        wait_until(lambda: client.get("/ready").status_code == 200, "the service to load its version")
        for body in requests[:20]:                                  # warm-up
            client.post("/retrieve", json=body).raise_for_status()
        for users, promotion in points:
            before = client.get("/stats").json()
            probe = client.post("/retrieve", json=requests[0]).json()
            during = (lambda: promote_midway(client, out_dir, promote_to, args.seconds)) if promotion else None
            row = run_locust(srv.url, users, args, bodies, work / f"{name}_u{users}{'_promotion' * promotion}", during)
            after = client.get("/stats").json()
            batches = max(after["batches"] - before["batches"], 1)
            row.update(config=name, point="promotion" if promotion else "sweep",
                       mean_batch=round((after["requests"] - before["requests"]) / batches, 2),
                       batch_ms=round(1000 * (after["busy_s"] - before["busy_s"]) / batches, 1),
                       version=after["versions"]["A"])
            if promotion:       # the same weights under a new id: the answers must not change
                again = client.post("/retrieve", json=requests[0]).json()
                row["same_answers"] = again["items"] == probe["items"]
                row["probe_versions"] = [probe["version"], again["version"]]
            rows.append(row)
            print(f"{name:9s} users {users:3d}{' (promotion)' if promotion else ''}: {row['qps']:7.1f} q/s, "
                  f"p50 {row['p50_ms']:6.1f} ms, p99 {row['p99_ms']:6.1f} ms, mean batch {row['mean_batch']} "
                  f"({row['batch_ms']} ms), failed {row['failed_incl_spawn']}, served by {row['served_by']}", flush=True)
            if promotion:
                print(f"  promoted {row['version_before']} -> {row['version_after']} {row['promoted_at_s']} s into "
                      f"the point, served {row['swapped_after_s']} s later; same answers: {row['same_answers']}")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-dir", default=str(ROOT / "outputs"), help="an out_dir with a live version (only read)")
    ap.add_argument("--beam", type=int, default=100, help="beam width sent with every request")
    ap.add_argument("--users", type=int, nargs="+", default=[1, 2, 4, 8, 32])
    ap.add_argument("--promote-users", type=int, default=8,
                    help="users of the extra point (first configuration) during which a second version is promoted")
    ap.add_argument("--reload-every-s", type=float, default=1.0, help="the service's poll of the live version")
    ap.add_argument("--seconds", type=int, default=20, help="locust run time per point")
    ap.add_argument("--max-requests", type=int, default=20000, help="a point stops after this many requests")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--p99-target-ms", type=float, default=50.0)
    args = ap.parse_args(argv)
    set_threads(args.threads)
    from components.lifecycle.versions import live_version
    from components.runtime.config import load_params

    load_start = os.getloadavg()
    source = Path(args.out_dir)
    with tempfile.TemporaryDirectory(prefix="sa2crq_bench_service_") as tmp:
        work = Path(tmp)
        out_dir = copy_live(source, work / "out")
        params = load_params(ROOT / "params.yaml", [f"out_dir={out_dir}", f"retriever.num_threads={args.threads}"])
        if not 1 <= args.beam <= params["serve"]["beam_max"]:
            ap.error(f"--beam must be between 1 and serve.beam_max ({params['serve']['beam_max']})")
        first = live_version(out_dir)
        second = reissue(params, out_dir)
        bodies = work / "bodies.json"
        bodies.write_text(json.dumps(request_bodies(out_dir, 2000, params["serve"]["k_default"], args.beam)))
        print(f"beam {args.beam}, k {params['serve']['k_default']}, {args.seconds} s a point; serving a copy of "
              f"{source} ({first}); second version {second} prepared", flush=True)
        rows = [row for i, name in enumerate(args.configs)
                for row in bench_config(params, name, args, bodies, work, second if i == 0 else None)]
    failed = sum(r["failed_incl_spawn"] for r in rows)
    within = [r for r in rows if r["point"] == "sweep" and r["p99_ms"] < args.p99_target_ms and not r["failures"]]
    best = {name: max((r["qps"] for r in within if r["config"] == name), default=None) for name in args.configs}
    print(f"beam {args.beam}: highest QPS with p99 < {args.p99_target_ms:g} ms: {best}; failed requests: {failed}")
    path = write_result("bench_service", {
        "out_dir": str(source), "versions": [first, second], "beam": args.beam, "serve": params["serve"],
        "configs": CONFIGS, "seconds": args.seconds, "max_requests": args.max_requests,
        "reload_every_s": args.reload_every_s, "load_average_start_end": [load_start, os.getloadavg()],
        "failed_requests": failed, "rows": rows, f"best_qps_p99_under_{args.p99_target_ms:g}ms": best})
    print(f"wrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
