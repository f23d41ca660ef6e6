"""SID assignment throughput and peak memory: our tokenizers against faiss ResidualQuantizer.

Data: synthetic clustered embeddings (bench.common.clustered_embeddings: d=384, Zipf cluster
sizes; NOT real data), 100k and 1M rows, written once to float32 .npy files in --workdir.
Our tokenizers are trained by the pipeline's own train_head / train_tail steps on a separate
20k-row sample (params.yaml sizes: codebooks 64/128/256, extensions 16/32/64, latent 64,
tau 6; epochs cut to --epochs) and loaded with load_tokenizer.
  sarq            Tokenizer.assign: MLP encoder 384->64, greedy RQ over 64/128/256, SARQ depths
  acrq            Tokenizer.assign with anchors+extensions (80/160/320 rows), fixed length 3
  sa2crq          Tokenizer.assign: ACRQ codebooks + frozen head path table (the method)
  sa2crq-new      assign_new_items(grow_threshold=None): the new-item path, layer by layer
  faiss-384       faiss.ResidualQuantizer(384, nbits 6/7/8).compute_codes on the raw input,
                  max_beam_size=1 (greedy, like ours); trained on 10k rows (not timed)
  faiss-latent64  the same on the SARQ tokenizer's 64-d latents (latents computed untimed):
                  isolates the quantization step from our encoder
Every (method, size) run is a fresh subprocess (own allocator, own peak RSS): it loads the
data, warms up on 1,000 rows, resets the kernel's peak-RSS mark (/proc/self/clear_refs),
then times one full pass; peak_mb = peak RSS above the RSS before the pass. Methods run
round-robin, --rounds times per size; figures are medians.

    .venv/bin/python bench/bench_assign.py [--sizes 100000 1000000] [--rounds 3 1] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from common import (
    TRAIN_SEED_OFFSET,
    cached_tokenizer,
    clustered_embeddings,
    data_file,
    measure_peak,
    print_table,
    run_json_subprocess,
    set_threads,
    stats,
    write_result,
)

NBITS = (6, 7, 8)   # 64 / 128 / 256 rows per layer
METHODS = ("sarq", "acrq", "sa2crq", "sa2crq-new", "faiss-384", "faiss-latent64")


def faiss_rq(d: int, train: np.ndarray, seed: int):
    """A greedy (beam 1) faiss residual quantizer with 64/128/256 codes per layer, trained on `train`."""
    import faiss

    nbits = faiss.UInt64Vector()
    for b in NBITS:
        nbits.push_back(b)
    index = faiss.IndexResidualQuantizer(d, nbits)
    index.rq.max_beam_size = 1
    index.rq.verbose = False
    index.rq.cp.seed = seed
    index.train(np.ascontiguousarray(train, dtype=np.float32))
    return index


def prepare(workdir: Path, seed: int, epochs: int) -> dict[str, str]:
    """Train (once) our tokenizers and the two faiss quantizers; return their files."""
    import faiss

    from components.tokenizers.sid_tokenizer import load_tokenizer

    files = {}
    sample = clustered_embeddings(20_000, seed=seed + TRAIN_SEED_OFFSET)
    for method in ("sarq", "acrq", "sa2crq"):
        files[method] = str(cached_tokenizer(workdir, method, seed, epochs))
    for name, d in (("faiss-384", 384), ("faiss-latent64", 64)):
        path = workdir / f"{name}_s{seed}.faiss"
        if not path.exists():
            train = sample[:10_000]
            if d == 64:
                train = load_tokenizer({}, files["sarq"]).latents(train).numpy()
            faiss.write_index(faiss_rq(d, train, seed), str(path))
        files[name] = str(path)
    return files


def worker(method: str, data: str, files: dict[str, str], threads: int) -> dict:
    """One timed full pass in this (fresh) process; prints nothing but the JSON result."""
    set_threads(threads)
    import faiss

    from components.tokenizers.sid_tokenizer import assign_new_items, load_tokenizer

    x = np.load(data)
    n = len(x)
    if method.startswith("faiss"):
        index = faiss.read_index(files[method])   # keep the index alive: rq is a view into it
        rq = index.rq
        rq.max_beam_size = 1
        if method == "faiss-latent64":
            tok = load_tokenizer({}, files["sarq"])
            x = np.concatenate([tok.latents(x[i:i + 100_000]).numpy() for i in range(0, n, 100_000)])
        fn = lambda a: rq.compute_codes(np.ascontiguousarray(a))  # noqa: E731
    else:
        tok = load_tokenizer({}, files[method.removesuffix("-new")])
        if method.endswith("-new"):
            fn = lambda a: assign_new_items(tok, a, None)  # noqa: E731
        else:
            fn = tok.assign
    fn(x[:1000])
    _, secs, peak = measure_peak(lambda: fn(x))
    return {"method": method, "n": n, "secs": secs, "peak_mb": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--rounds", type=int, nargs="+", default=[3, 1], help="round-robin rounds per size")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=5, help="tokenizer training epochs (cost of assignment does not depend on them)")
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "sa2crq_bench"))
    ap.add_argument("--worker", nargs=3, metavar=("METHOD", "DATA", "FILES_JSON"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        method, data, files = args.worker
        print(json.dumps(worker(method, data, json.loads(files), args.threads)))
        return
    set_threads(args.threads)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    files = prepare(workdir, args.seed, args.epochs)
    rows = []
    for n, rounds in zip(args.sizes, args.rounds + [args.rounds[-1]] * len(args.sizes)):
        data = data_file(workdir, n, args.seed)
        runs: dict[str, list[dict]] = {m: [] for m in args.methods}
        for r in range(rounds):
            for m in args.methods:
                res = run_json_subprocess([__file__, "--threads", str(args.threads), "--worker", m, str(data),
                                           json.dumps(files)])
                runs[m].append(res)
                print(f"  n={n} round {r}: {m} {res['secs']:.2f}s peak {res['peak_mb']:.0f} MB", flush=True)
        for m, rs in runs.items():
            s = stats([x["secs"] for x in rs])
            rows.append({"n": n, "method": m, "secs_p50": s["p50"], "items_per_s": n / s["p50"],
                         "peak_mb": float(np.median([x["peak_mb"] for x in rs])), "rounds": s["n"]})
        faiss_ips = next(r["items_per_s"] for r in rows if r["n"] == n and r["method"] == "faiss-384") \
            if "faiss-384" in args.methods else None
        for r in rows:
            if r["n"] == n and faiss_ips:
                r["vs_faiss384"] = r["items_per_s"] / faiss_ips
    cols = ["n", "method", "secs_p50", "items_per_s", "vs_faiss384", "peak_mb", "rounds"]
    print_table(rows, cols, f"SID assignment, synthetic clustered d=384, {args.threads} thread(s)")
    path = write_result("assign", {"config": {k: v for k, v in vars(args).items() if k != "worker"},
                                   "data": "synthetic clustered embeddings (bench.common), not real data",
                                   "faiss": "ResidualQuantizer nbits 6/7/8, max_beam_size=1 (greedy)",
                                   "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
