"""How cost grows with the catalog: 10k -> 100k -> 1M items, with log-log growth exponents.

Per catalog size n, in a fresh subprocess (own peak RSS):
  assign     SA2CRQ Tokenizer.assign on n synthetic clustered embeddings (bench.common; the
             tokenizer is trained once on a 20k sample by the pipeline's own steps);
  catalog    SidCatalog.build from the assigned code lists (group items by SID);
  trie       SidTrie.build from the catalog's distinct SIDs (tables' size in MiB as well);
  decode     constrained beam search, B=100, the `small` retriever (random weights) over the
             trie: p50/p99 latency at batch 1 and queries/s at batch 64.
The same catalog / trie / decode steps also run on a synthetic high-diversity SID table
(bench.common.synthetic_sid_table: nearly every item its own SID), the worst case for the
trie. The growth exponent is the least-squares slope of log(cost) on log(n).

    .venv/bin/python bench/bench_scale.py [--sizes 10000 100000 1000000] [--threads 1]
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import (
    cached_tokenizer,
    data_file,
    loglog_slope,
    measure_peak,
    print_table,
    run_json_subprocess,
    set_threads,
    stats,
    synthetic_sid_table,
    write_result,
)

BEAM = 100


def catalog_trie_decode(codes: list[list[int]], sizes: list[int], n_queries: tuple[int, int], seed: int) -> dict:
    """Build the catalog and the trie from code lists, then time constrained decoding on them."""
    from common import ROOT, clustered_embeddings

    from components.retrieval.constrained_decoding import SidTrie
    from components.retrieval.retriever import RetrieverModel, decode, model_config
    from components.runtime.config import load_params
    from components.tokenizers.sid_vocab import SidCatalog

    n = len(codes)
    ids = np.array([f"i{i}" for i in range(n)], dtype=object)
    pop = np.ones(n, dtype=np.int64)
    catalog, cat_s, cat_mb = measure_peak(lambda: SidCatalog.build(ids, pop, codes, len(sizes)))
    trie, trie_s, trie_peak = measure_peak(lambda: SidTrie.from_catalog(catalog, tuple(sizes)))
    trie_mb = sum(t.numel() * t.element_size() for t in trie.tables) / 2**20
    rp = load_params(ROOT / "params.yaml")["retriever"]
    torch.manual_seed(seed)
    model = RetrieverModel(model_config(dict(rp, backbone="small"), tuple(sizes), 384, 20)).eval()
    model.catalog, model.trie = catalog, trie
    q = torch.from_numpy(clustered_embeddings(max(n_queries[0], 64 * n_queries[1]), seed=seed + 7))[:, None, :]

    def batch(lo: int, hi: int) -> dict:
        return {"kind": "text", "x": q[lo:hi], "mask": torch.ones(hi - lo, 1, dtype=torch.bool)}

    decode(model, batch(0, 1), BEAM)
    one = []
    for i in range(n_queries[0]):
        t0 = time.perf_counter()
        decode(model, batch(i, i + 1), BEAM)
        one.append(time.perf_counter() - t0)
    many = []
    for i in range(n_queries[1]):
        t0 = time.perf_counter()
        decode(model, batch(64 * i, 64 * i + 64), BEAM)
        many.append(time.perf_counter() - t0)
    s1, s64 = stats(one), stats(many)
    return {"n_sids": int(catalog.n_sids), "catalog_s": cat_s, "catalog_peak_mb": cat_mb, "trie_s": trie_s,
            "trie_peak_mb": trie_peak, "trie_mb": trie_mb, "b1_p50_ms": 1e3 * s1["p50"], "b1_p99_ms": 1e3 * s1["p99"],
            "b64_qps": 64 / s64["p50"]}


def worker(data: str, tok_file: str, threads: int, seed: int, n_queries: tuple[int, int]) -> dict:
    """All measurements for one catalog size, in this fresh process."""
    set_threads(threads)
    from components.tokenizers.sid_tokenizer import load_tokenizer

    tok = load_tokenizer({}, tok_file)
    x = np.load(data)
    tok.assign(x[:1000])
    (codes, lengths), assign_s, assign_mb = measure_peak(functools.partial(tok.assign, x))
    n = len(x)
    del x
    code_lists = [c[:k] for c, k in zip(codes.tolist(), lengths.tolist())]
    assigned = catalog_trie_decode(code_lists, tok.sizes, n_queries, seed)
    synth = catalog_trie_decode([list(s) for s in synthetic_sid_table(n, tok.sizes, seed=seed)], tok.sizes,
                                n_queries, seed)
    return {"n": n, "assign_s": assign_s, "assign_peak_mb": assign_mb,
            "mean_len": float(np.mean(lengths)), "assigned": assigned, "synthetic": synth}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=5, help="tokenizer training epochs")
    ap.add_argument("--queries", type=int, nargs=2, default=[50, 3], metavar=("B1", "B64"),
                    help="timed decode calls at batch 1 / batch 64 per size")
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "sa2crq_bench"))
    ap.add_argument("--worker", nargs=2, metavar=("DATA", "TOKENIZER"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.threads, args.seed, tuple(args.queries))))
        return
    set_threads(args.threads)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    tok_file = cached_tokenizer(workdir, "sa2crq", args.seed, args.epochs)
    results = []
    for n in args.sizes:
        res = run_json_subprocess([__file__, "--threads", str(args.threads), "--seed", str(args.seed), "--queries",
                                   *map(str, args.queries), "--worker", str(data_file(workdir, n, args.seed)),
                                   str(tok_file)], timeout=1800)
        results.append(res)
        print(f"  n={n}: {json.dumps(res)}", flush=True)
    rows = []
    for table in ("assigned", "synthetic"):
        for r in results:
            t = r[table]
            rows.append({"table": table, "n": r["n"], "n_sids": t["n_sids"],
                         "assign_s": r["assign_s"] if table == "assigned" else None,
                         "assign_mb": r["assign_peak_mb"] if table == "assigned" else None,
                         "build_s": t["catalog_s"] + t["trie_s"], "catalog_s": t["catalog_s"], "trie_s": t["trie_s"],
                         "trie_mb": t["trie_mb"], "build_peak_mb": max(t["catalog_peak_mb"], t["trie_peak_mb"]),
                         "b1_p50_ms": t["b1_p50_ms"], "b1_p99_ms": t["b1_p99_ms"], "b64_qps": t["b64_qps"]})
    ns = [r["n"] for r in results]
    slopes = {"assign_s": loglog_slope(ns, [r["assign_s"] for r in results]),
              "assign_peak_mb": loglog_slope(ns, [max(r["assign_peak_mb"], 1e-3) for r in results])}
    for table in ("assigned", "synthetic"):
        for key in ("catalog_s", "trie_s", "trie_mb", "b1_p50_ms"):
            slopes[f"{table}.{key}"] = loglog_slope(ns, [max(r[table][key], 1e-9) for r in results])
        slopes[f"{table}.build_s"] = loglog_slope(ns, [r[table]["catalog_s"] + r[table]["trie_s"] for r in results])
        slopes[f"{table}.b64_s_per_query"] = loglog_slope(ns, [1 / r[table]["b64_qps"] for r in results])
    cols = ["table", "n", "n_sids", "assign_s", "assign_mb", "catalog_s", "trie_s", "trie_mb", "build_peak_mb",
            "b1_p50_ms", "b1_p99_ms", "b64_qps"]
    print_table([{k: v for k, v in r.items() if v is not None} for r in rows], cols,
                f"Cost vs catalog size (SA2CRQ tokenizer, synthetic data, B={BEAM}, {args.threads} thread(s))")
    print_table([{"cost": k, "exponent": v} for k, v in slopes.items()], ["cost", "exponent"], "Growth exponents (log-log slope)")
    path = write_result("scale", {"config": {k: v for k, v in vars(args).items() if k != "worker"},
                                  "data": "synthetic clustered embeddings (bench.common), not real data",
                                  "rows": rows, "exponents": slopes, "raw": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
