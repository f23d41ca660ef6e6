"""Trie-constrained beam search: ours against two peers on the same model weights.

Model: components.retrieval.retriever.RetrieverModel with backbone `t5` (a T5ForConditionalGeneration
built from a T5Config, random init, sizes from params.yaml `retriever`), text queries
(synthetic 384-d query vectors -> the model's own query projection). Random weights do not
change the work a beam search does: every step scores all live beams and masks by the trie.
  ours      components.retrieval.retriever.decode -> constrained_decoding.beam_search (vectorised trie
            tables; with T5 the model recomputes the 1-3 token SID prefix each step);
  hf        the same T5 weights through transformers `generate(num_beams=B,
            prefix_allowed_tokens_fn=...)` with a precomputed prefix -> allowed-tokens dict
            (the usual GENRE/TIGER recipe), length_penalty=0 (summed log-probs, like ours);
  dicttrie  a plain Python beam search with a dict trie over the same T5 (encoder run once,
            each step one batched forward over all live beams, then Python loops over
            beams and trie children). It scores exactly like ours, so its output must equal
            ours: the `agree_*` columns check that.
  ours-small  our default backbone (`small`: own Transformer with a KV cache), no HF twin,
            same search code: what the pipeline's default model costs. When the pipeline has
            trained one (outputs/retriever/model.pt with outputs/sids), that model decodes its
            own SID table from history queries (recent catalog items, 1-8 long, mean 4.5, as in
            amazon-scientific); else random weights from params.yaml sizes, text queries. The
            `model` column says which.
Methods are timed round-robin on the same batches (load swings hit all alike).
Columns: lat_vs_ours = latency / ours (T5) latency (peers > 1: ours is faster);
hf_lat_ratio = HF generate latency / this method's latency (the speed-up over HF).
cpu_* / qps_cpu: the same from process CPU time (with 1 thread, close to what a dedicated
core would give on this shared machine; wall time includes waiting for the CPU).
Latency: batch 1 = per-query wall time over many queries; batch 64 = wall time of one
batch call (each query waits for its batch); q/s = queries / median batch time.
SID table: outputs/sids/sid_table.parquet when present, else a synthetic SARQ-like table
(4,344 items, codebook sizes 64/128/256, lengths 1-3; bench.common.synthetic_sid_table).

    .venv/bin/python bench/bench_decoding.py [--beams 20 100] [--batches 1 64] [--threads 2]
"""
from __future__ import annotations

import argparse
import heapq
import time
from typing import TYPE_CHECKING

import numpy as np
import torch
from common import (
    ROOT,
    clustered_embeddings,
    load_real_sid_table,
    print_table,
    set_threads,
    stats,
    synthetic_sid_table,
    write_result,
)

if TYPE_CHECKING:
    from components.tokenizers.sid_vocab import SidVocab

SIZES = (64, 128, 256)
PEERS = ("hf", "dicttrie")


def build_model(backbone: str, sids: list[tuple[int, ...]], sizes: tuple[int, ...], seed: int) -> torch.nn.Module:
    """A RetrieverModel over `sids` with params.yaml's retriever sizes and the given backbone."""
    from components.retrieval.retriever import RetrieverModel, model_config
    from components.runtime.config import load_params
    from components.tokenizers.sid_vocab import SidCatalog

    rp = dict(load_params(ROOT / "params.yaml")["retriever"], backbone=backbone)
    torch.manual_seed(seed)
    model = RetrieverModel(model_config(rp, sizes, 384, 20)).eval()
    n = len(sids)
    catalog = SidCatalog.build(np.array([f"i{i}" for i in range(n)], dtype=object), np.ones(n, np.int64),
                               [list(s) for s in sids], len(sizes))
    model.attach_catalog(catalog)
    return model


def trained_small() -> tuple[torch.nn.Module, np.ndarray] | None:
    """The pipeline's trained retriever with its SID catalog, and the item embeddings its
    history queries are made of; None when the pipeline has not trained one."""
    import json

    import pandas as pd

    from components.retrieval.retriever import load_retriever
    from components.tokenizers.sid_vocab import SidCatalog

    out = ROOT / "outputs"
    files = [out / "retriever" / "model.pt", out / "sids" / "sid_table.parquet", out / "sids" / "meta.json",
             out / "embeddings" / "items.npy"]
    if not all(f.exists() for f in files):
        return None
    net = load_retriever(files[0])
    table = pd.read_parquet(files[1])
    max_len = int(json.loads(files[2].read_text())["max_len"])
    codes = [list(c[:n]) for c, n in zip(table["codes"], table["length"])]
    net.attach_catalog(SidCatalog.build(table["item_id"].astype(str).to_numpy(), np.ones(len(table), np.int64),
                                        codes, max_len))
    return net, np.load(files[3]).astype(np.float32)


def history_batches(item_emb: np.ndarray, n: int, seed: int) -> list[dict]:
    """n one-query history batches (recent items first, 1-8 long) to slice batches from."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 9, n)
    rows = rng.integers(0, len(item_emb), (n, 8))
    mask = np.arange(8)[None, :] < lengths[:, None]
    rows = np.where(mask, rows, -1)
    return [{"kind": "history", "x": torch.from_numpy(item_emb[np.maximum(rows[i : i + 1], 0)]),
             "mask": torch.from_numpy(mask[i : i + 1]), "hist_items": torch.from_numpy(rows[i : i + 1])}
            for i in range(n)]


def concat(batches: list[dict]) -> dict:
    return {"kind": "history", **{k: torch.cat([b[k] for b in batches]) for k in ("x", "mask", "hist_items")}}


def text_batch(x: np.ndarray) -> dict:
    t = torch.from_numpy(np.ascontiguousarray(x))[:, None, :]
    return {"kind": "text", "x": t, "mask": torch.ones(t.shape[:2], dtype=torch.bool)}


# ---- peer (a): Hugging Face generate + prefix_allowed_tokens_fn ---------------------------------
def allowed_tokens_dict(sids: list[tuple[int, ...]], vocab: SidVocab) -> dict[tuple[int, ...], list[int]]:
    """Decoder token prefix (BOS first) -> allowed next token ids (END where an issued SID ends)."""
    from components.tokenizers.sid_vocab import BOS, END

    nxt: dict[tuple[int, ...], set[int]] = {}
    for sid in set(sids):
        toks = (BOS, *(vocab.offsets[d] + c for d, c in enumerate(sid)))
        for t in range(1, len(toks)):
            nxt.setdefault(toks[:t], set()).add(toks[t])
        if len(sid) < vocab.max_len:
            nxt.setdefault(toks, set()).add(END)
    return {k: sorted(v) for k, v in nxt.items()}


def hf_generate(model: torch.nn.Module, batch: dict, beam: int, allowed: dict[tuple[int, ...], list[int]]) -> list[list[tuple[int, ...]]]:
    from components.tokenizers.sid_vocab import BOS, END, PAD

    fallback = [END]

    def prefix_fn(_batch_id: int, input_ids: torch.Tensor) -> list[int]:
        return allowed.get(tuple(input_ids.tolist()), fallback)

    with torch.inference_mode():
        memory, mask = model.query(batch)
        out = model.backbone.model.generate(
            inputs_embeds=memory, attention_mask=mask.long(), num_beams=beam, num_return_sequences=beam,
            max_new_tokens=model.vocab.max_len, prefix_allowed_tokens_fn=prefix_fn, do_sample=False,
            length_penalty=0.0, early_stopping=True, decoder_start_token_id=BOS, eos_token_id=END, pad_token_id=PAD)
    offsets = model.vocab.offsets
    seqs = []
    for row in out.tolist():
        codes = []
        for d, tok in enumerate(row[1:]):
            if tok in (END, PAD):
                break
            codes.append(tok - offsets[d])
        seqs.append(tuple(codes))
    return [seqs[q * beam:(q + 1) * beam] for q in range(len(seqs) // beam)]


# ---- peer (b): plain Python dict-trie beam search over the same T5 --------------------------------
def dict_trie(sids: list[tuple[int, ...]]) -> tuple[dict[tuple[int, ...], list[int]], set[tuple[int, ...]]]:
    """Code prefix -> child codes, and the set of issued SIDs."""
    children: dict[tuple[int, ...], set[int]] = {}
    for sid in set(sids):
        for t in range(len(sid)):
            children.setdefault(sid[:t], set()).add(sid[t])
    return {k: sorted(v) for k, v in children.items()}, set(sids)


def dict_trie_beam_search(model: torch.nn.Module, batch: dict, beam: int, trie: tuple[dict, set]) -> list[list[tuple[int, ...]]]:
    """Beam search with Python lists and a dict trie; finished SIDs compete with live beams
    (same rule as ours), scores = log-softmax over the depth's layer columns (same as ours)."""
    from components.tokenizers.sid_vocab import BOS

    children, issued = trie
    vocab = model.vocab
    t5 = model.backbone.model
    with torch.inference_mode():
        memory, mask = model.query(batch)
        enc = t5.get_encoder()(inputs_embeds=memory, attention_mask=mask.long()).last_hidden_state
        n = enc.shape[0]
        live: list[list[tuple[float, tuple[int, ...]]]] = [[(0.0, ())] for _ in range(n)]
        done: list[list[tuple[float, tuple[int, ...]]]] = [[] for _ in range(n)]
        for depth in range(vocab.max_len):
            owners = [q for q in range(n) for _ in live[q]]
            if not owners:
                break
            prefixes = [p for q in range(n) for _, p in live[q]]
            dec = torch.tensor([[BOS, *(vocab.offsets[d] + c for d, c in enumerate(p))] for p in prefixes])
            own = torch.tensor(owners)
            logits = t5(encoder_outputs=(enc[own],), attention_mask=mask.long()[own], decoder_input_ids=dec,
                        use_cache=False).logits[:, -1]
            cols = torch.from_numpy(vocab.layer_columns(depth))
            logp = (logits[:, cols] + model.layer_bias[depth, cols]).log_softmax(-1).numpy()
            end_col = len(cols) - 1
            row = 0
            for q in range(n):
                cand = [(s, p, True) for s, p in done[q]]
                for score, prefix in live[q]:
                    lp = logp[row]
                    row += 1
                    for c in children.get(prefix, ()):
                        cand.append((score + float(lp[c]), prefix + (c,), False))
                    if depth > 0 and prefix in issued:
                        cand.append((score + float(lp[end_col]), prefix, True))
                top = heapq.nlargest(beam, cand, key=lambda c: c[0])
                done[q] = [(s, p) for s, p, fin in top if fin or len(p) == vocab.max_len]
                live[q] = [(s, p) for s, p, fin in top if not fin and len(p) < vocab.max_len]
    out = []
    for q in range(n):
        final = sorted(done[q] + live[q], key=lambda c: -c[0])[:beam]
        out.append([p for _, p in final])
    return out


def ours(model: torch.nn.Module, batch: dict, beam: int) -> list[list[tuple[int, ...]]]:
    from components.retrieval.retriever import decode

    return decode(model, batch, beam).to_lists()[0]


# ---- harness ---------------------------------------------------------------------------------------
def measure_round_robin(methods: dict, queries: np.ndarray, beam: int, batch: int, rounds: dict[str, int]
                        ) -> tuple[dict[str, dict], dict[str, list]]:
    """Time every method on the same batches, interleaved call by call, so load swings on a
    shared machine hit all methods alike. Method m runs in the first rounds[m] rounds; one
    untimed warm-up call each first. Returns per-method latency stats and outputs."""
    for fn in methods.values():
        fn(text_batch(queries[:batch]), beam)
    times: dict[str, list[float]] = {m: [] for m in methods}
    cpu: dict[str, list[float]] = {m: [] for m in methods}
    outs: dict[str, list] = {m: [] for m in methods}
    for i in range(max(rounds.values())):
        b = text_batch(queries[(i * batch) % len(queries):][:batch])
        for name, fn in methods.items():
            if i >= rounds[name]:
                continue
            t0, c0 = time.perf_counter(), time.process_time()
            outs[name].extend(fn(b, beam))
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    res = {}
    for name, ts in times.items():
        s = stats(ts)
        c = stats(cpu[name])
        res[name] = {"lat_p50_ms": 1e3 * s["p50"], "lat_p99_ms": 1e3 * s["p99"], "qps": batch / s["p50"],
                     "cpu_p50_ms": 1e3 * c["p50"], "cpu_p99_ms": 1e3 * c["p99"], "qps_cpu": batch / c["p50"],
                     "calls": s["n"]}
    return res, outs


def agreement(a: list[list[tuple]], b: list[list[tuple]]) -> tuple[float, float]:
    """(share of queries with the same top-1 SID, mean overlap of the returned SID sets)."""
    n = min(len(a), len(b))
    top1 = np.mean([bool(a[i]) and bool(b[i]) and a[i][0] == b[i][0] for i in range(n)])
    overlap = np.mean([len(set(a[i]) & set(b[i])) / max(1, len(set(a[i]) | set(b[i]))) for i in range(n)])
    return float(top1), float(overlap)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--beams", type=int, nargs="+", default=[20, 100])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--threads", type=int, default=1, help="1 by default: on a shared, overloaded 2-core box two OpenMP threads spin against each other (50x slower)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ours-calls", type=int, nargs=2, default=[200, 10], metavar=("B1", "B64"),
                    help="timed calls for ours at batch 1 / larger batches")
    ap.add_argument("--peer-calls", type=int, nargs=2, default=[30, 3], metavar=("B1", "B64"),
                    help="timed calls for the peers at batch 1 / larger batches")
    args = ap.parse_args()
    set_threads(args.threads)
    real = load_real_sid_table()
    if real is not None:
        (sids, sizes), source = real, "outputs/sids/sid_table.parquet"
    else:
        sids, sizes = synthetic_sid_table(4344, SIZES, seed=args.seed), SIZES
        source = "synthetic (4344 items, 64/128/256, len 1-3)"
    queries = clustered_embeddings(2000, seed=args.seed + 1)
    t5 = build_model("t5", sids, sizes, args.seed)
    allowed = allowed_tokens_dict(sids, t5.vocab)
    trie = dict_trie(sids)
    trained = trained_small() if real is not None else None
    if trained is not None:
        small, item_emb = trained
        small_model = "trained (outputs/retriever/model.pt), history queries"
        pool = history_batches(item_emb, 2000, args.seed + 2)
        # the batch the harness passes is a text batch of the same size: swap in as many history queries
        cursor = {"i": 0}

        def small_fn(b: dict, B: int) -> list:
            n = int(b["x"].shape[0])
            start = cursor["i"] % (len(pool) - n)
            cursor["i"] += n
            return ours(small, concat(pool[start : start + n]), B)
    else:
        small = build_model("small", sids, sizes, args.seed)
        small_model = "random weights (params.yaml sizes), text queries"

        def small_fn(b: dict, B: int) -> list:
            return ours(small, b, B)
    print(f"ours-small: {small_model}", flush=True)
    methods = {
        "ours": lambda b, B: ours(t5, b, B),
        "hf": lambda b, B: hf_generate(t5, b, B, allowed),
        "dicttrie": lambda b, B: dict_trie_beam_search(t5, b, B, trie),
        "ours-small": small_fn,
    }
    rows = []
    for B in args.beams:
        for bs in args.batches:
            i = 0 if bs == 1 else 1
            rounds = {m: (args.peer_calls if m in PEERS else args.ours_calls)[i] for m in methods}
            res, outs = measure_round_robin(methods, queries, B, bs, rounds)
            for name, r in res.items():
                row = {"beam": B, "batch": bs, "method": name, **r,
                       "lat_vs_ours": r["lat_p50_ms"] / res["ours"]["lat_p50_ms"],
                       "hf_lat_ratio": res["hf"]["lat_p50_ms"] / r["lat_p50_ms"]}
                if name in PEERS:
                    row["agree_top1"], row["agree_set"] = agreement(outs["ours"], outs[name])
                rows.append(row)
                print(f"  B={B} batch={bs} {name}: {r}", flush=True)
    cols = ["beam", "batch", "method", "lat_p50_ms", "lat_p99_ms", "qps", "cpu_p50_ms", "cpu_p99_ms", "qps_cpu", "lat_vs_ours", "hf_lat_ratio", "agree_top1", "agree_set",
            "calls"]
    print_table(rows, cols, f"Constrained beam search, {len(set(sids))} distinct SIDs ({source}), {args.threads} threads")
    path = write_result("decoding", {"config": {**vars(args), "sid_table": source, "small_model": small_model,
                                                "t5_model": "random weights (params.yaml sizes), text queries",
                                                "n_items": len(sids),
                                                "n_sids": len(set(sids)), "codebook_sizes": sizes}, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
