"""Load test of the online service (`components/serving/`): p50 / p99 and QPS at 1, 8, 32 users.

The service runs in this process on a free loopback port (`ServerThread`), serving the live
retriever of --out-dir; locust (headless, a subprocess, FastHttpUser, no think time) sends the
out_dir's test-split histories. Each run is bounded by --seconds and --max-requests. Two service
configurations run in the same command: `batched` (params.yaml's serve block) and `unbatched`
(max_batch 1), so the batching gain reads as a ratio on the same noisy machine.

    .venv/bin/pip install -r bench/requirements.txt
    .venv/bin/python bench/bench_service.py --out-dir outputs     # ~5 min
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, set_threads, write_result

LOCUSTFILE = ROOT / "bench" / "locustfile_service.py"
CONFIGS = {"batched": {}, "unbatched": {"max_batch": 1, "max_wait_ms": 0}}


def request_bodies(out_dir: Path, n: int, k: int) -> list[dict]:
    import pandas as pd

    queries = pd.read_parquet(out_dir / "prepared" / "queries.parquet")
    test = queries[queries["split"] == "test"].sample(frac=1.0, random_state=0).head(n)
    return [{"history": list(h), "k": k} if len(h) else {"text": t, "k": k}
            for h, t in zip(test["history"], test["text"])]


def run_locust(url: str, users: int, seconds: int, max_requests: int, bodies: Path, work: Path) -> dict:
    """One headless locust run; the aggregated row of its CSV stats."""
    prefix = work / f"locust_u{users}"
    env = {**os.environ, "SA2CRQ_BENCH_QUERIES": str(bodies), "SA2CRQ_BENCH_MAX_REQUESTS": str(max_requests)}
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", url, "-u", str(users),
           "-r", str(users), "-t", f"{seconds}s", "--reset-stats", "--only-summary", "--csv", str(prefix),
           "--exit-code-on-error", "0", "--loglevel", "WARNING"]
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=seconds + 60)
    with open(f"{prefix}_stats.csv", newline="") as fh:
        row = next(r for r in csv.DictReader(fh) if r["Name"] == "Aggregated")
    return {"users": users, "requests": int(row["Request Count"]), "failures": int(row["Failure Count"]),
            "qps": float(row["Requests/s"]), "p50_ms": float(row["50%"]), "p99_ms": float(row["99%"])}


def bench_config(params: dict, name: str, args: argparse.Namespace, bodies: Path, work: Path) -> list[dict]:
    import httpx

    from components.serving.server import ServerThread

    params = copy.deepcopy(params)
    params["serve"].update({"reload_every_s": 0, "request_log": str(work / f"{name}.jsonl"), **CONFIGS[name]})
    rows = []
    with ServerThread(params) as srv, httpx.Client(base_url=srv.url, timeout=60) as client:
        while client.get("/ready").status_code != 200:
            time.sleep(0.1)
        for body in json.loads(bodies.read_text())[:20]:           # warm-up
            client.post("/retrieve", json=body).raise_for_status()
        for users in args.users:
            before = client.get("/stats").json()
            row = run_locust(srv.url, users, args.seconds, args.max_requests, bodies, work)
            after = client.get("/stats").json()
            batches = max(after["batches"] - before["batches"], 1)
            row.update(config=name, mean_batch=round((after["requests"] - before["requests"]) / batches, 2),
                       batch_ms=round(1000 * (after["busy_s"] - before["busy_s"]) / batches, 1),
                       version=after["versions"]["A"])
            rows.append(row)
            print(f"{name:9s} users {users:3d}: {row['qps']:7.1f} q/s, p50 {row['p50_ms']:6.1f} ms, "
                  f"p99 {row['p99_ms']:6.1f} ms, mean batch {row['mean_batch']} ({row['batch_ms']} ms), "
                  f"failures {row['failures']}",
                  flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-dir", default=str(ROOT / "outputs"), help="an out_dir with a live version")
    ap.add_argument("--users", type=int, nargs="+", default=[1, 2, 4, 8, 32])
    ap.add_argument("--seconds", type=int, default=20, help="locust run time per point")
    ap.add_argument("--max-requests", type=int, default=20000, help="a point stops after this many requests")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--p99-target-ms", type=float, default=50.0)
    args = ap.parse_args(argv)
    set_threads(args.threads)
    from components.config import load_params

    load_start = os.getloadavg()
    out_dir = Path(args.out_dir)
    params = load_params(ROOT / "params.yaml", [f"out_dir={out_dir}", f"retriever.num_threads={args.threads}"])
    with tempfile.TemporaryDirectory(prefix="sa2crq_bench_service_") as tmp:
        work = Path(tmp)
        bodies = work / "bodies.json"
        bodies.write_text(json.dumps(request_bodies(out_dir, 2000, params["serve"]["k_default"])))
        rows = [row for name in args.configs for row in bench_config(params, name, args, bodies, work)]
    within = [r for r in rows if r["p99_ms"] < args.p99_target_ms and not r["failures"]]
    best = {name: max((r["qps"] for r in within if r["config"] == name), default=None) for name in args.configs}
    print(f"highest QPS with p99 < {args.p99_target_ms:g} ms: {best}")
    path = write_result("bench_service", {
        "out_dir": str(out_dir), "serve": params["serve"], "configs": CONFIGS, "seconds": args.seconds,
        "max_requests": args.max_requests, "load_average_start_end": [load_start, os.getloadavg()], "rows": rows,
        f"best_qps_p99_under_{args.p99_target_ms:g}ms": best})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
