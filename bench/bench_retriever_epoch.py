"""Where one training epoch of the generative retriever goes, on a finished pipeline run.

Reads a run folder (`--run-dir`, with prepared/, embeddings/, sids/), builds the training and
validation examples exactly as the train_retriever step does (components.retrieval.retriever_train.
prepare_training) and the model as it does (RetrieverModel, small backbone), then times, batch by
batch in a bare PyTorch loop (time.perf_counter; torch CPU ops are synchronous):

  batch        ExampleDataset.__getitem__ (gather embeddings, masks, SID tokens)
  query_enc    net.encode_query (projection, recency / item-id embeddings, SID-token sums)
  encoder      the backbone's Transformer encoder over the memory vectors
  decoder+head cross keys/values, decoder layers, output head, per-depth vocabulary mask
  loss         cross-entropy
  backward     zero_grad + loss.backward()
  optim        grad-norm clipping + AdamW step + LR scheduler step (RetrieverModule's own)
  validation   one validation pass: constrained beam search (eval_beam) over the val queries,
               in the decode batches training uses, plus the Recall@K bookkeeping

then the same batches through L.Trainer.fit with RetrieverModule (the pipeline's trainer
settings, validation off), timed by the epoch hooks, for the Lightning / bare ratio.

Token statistics use every training batch: mean history length, encoder tokens (sum of history
lengths; text queries count n_memory) against decoder positions, and what a causal all-prefix
encoder (SASRec style: each user's training sequence encoded once, every prefix read off its
own position) would encode: sum over users of L_user against sum over examples of history length.

    WANDB_MODE=disabled .venv/bin/python bench/bench_retriever_epoch.py \
        [--run-dir /tmp/exp/ret_C_ids_d1] [--max-batches 60] [-s retriever.key=value ...]
"""
from __future__ import annotations

import argparse
import copy
import os
import time
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
from common import ROOT, print_table, set_threads, write_result

PARTS = ("batch", "query_enc", "encoder", "decoder+head", "loss", "backward", "optim")
DEFAULT_OVERRIDES = ("retriever.item_id_embeddings=true", "retriever.dropout=0.1")


def load_run(run_dir: Path, overrides: list[str]):
    """Params, inputs, examples and a fresh model, built as run_train_retriever builds them."""
    from components.retrieval.retriever import RetrieverModel, model_config
    from components.retrieval.retriever_train import prepare_training
    from components.runtime.config import load_params

    params = load_params(ROOT / "params.yaml", [f"out_dir={run_dir}", *DEFAULT_OVERRIDES, *overrides])
    seed, max_history, inputs, (examples, valid, text_vectors, counts) = prepare_training(params)
    config = model_config(params["retriever"], inputs.codebook_sizes, inputs.item_emb.shape[1], max_history,
                          len(inputs.items))
    config["sid_version"] = inputs.sid_version
    net = RetrieverModel(config, load_pretrained=True).train()
    net.attach_catalog(inputs.catalog)
    return params, seed, max_history, inputs, examples, valid, text_vectors, counts, net


def make_module(net, rp: dict, n_batches: int):
    from components.retrieval.retriever import RetrieverModule
    from components.retrieval.retriever_train import VAL_K

    return RetrieverModule(net, lr=float(rp["lr"]), weight_decay=float(rp.get("weight_decay", 0.0)),
                           eval_beam=int(rp["eval_beam"]), val_k=VAL_K, warmup_steps=int(rp.get("warmup_steps", 0)),
                           total_steps=int(rp["epochs"]) * n_batches)


def token_stats(examples, batches: list[np.ndarray], queries, dec_len: int, n_memory: int) -> dict:
    """Encoder / decoder token counts over all training batches, and the causal-encoder estimate."""
    from components.retrieval.retriever_data import KIND_HISTORY

    hist = examples.kind == KIND_HISTORY
    enc_tokens_ex = np.where(hist, examples.hist_len, n_memory)              # what the encoder reads per example
    is_query = examples.query >= 0
    # decoder positions: every batch is padded to the SID length (teacher forcing over max_len positions)
    dec_positions = len(examples) * dec_len
    # causal all-prefix encoder: every train query u<user>-<pos> is a prefix of its user's sequence;
    # one pass per user covers all of them. L_user = the longest (uncapped) history among the user's
    # train queries, i.e. the user's training input sequence.
    train_q = queries[queries["split"] == "train"]
    users = train_q["query_id"].astype(str).str.replace(r"-\d+$", "", regex=True)
    full_len = train_q["history"].map(lambda v: 0 if v is None else len(v)).to_numpy()
    per_user = pd_groupby_max(users.to_numpy(), full_len)
    # current cost of the same queries: one encoder pass per training pair (a query with several
    # targets is encoded once per target), histories capped at max_history
    q_hist = examples.hist_len[is_query & hist]
    current_q = int(q_hist.sum())
    one_pass = int(per_user.sum())
    batch_hist = [float(examples.hist_len[b].mean()) for b in batches if hist[b[0]]]
    return {
        "n_examples": int(len(examples)), "n_query_pairs": int(is_query.sum()),
        "n_indexing_pairs": int((~is_query).sum()), "n_batches": len(batches),
        "mean_history_len_all": float(examples.hist_len[hist].mean()) if hist.any() else 0.0,
        "mean_history_len_query_pairs": float(q_hist.mean()) if len(q_hist) else 0.0,
        "max_history_len": int(examples.hist_len.max()),
        "mean_batch_size": float(np.mean([len(b) for b in batches])),
        "n_batches_hist_len_1": int(sum(1 for b in batches if hist[b[0]] and examples.hist_len[b[0]] == 1)),
        "mean_batch_history_len": float(np.mean(batch_hist)) if batch_hist else 0.0,
        "encoder_tokens": int(enc_tokens_ex.sum()), "decoder_positions": int(dec_positions),
        "encoder_token_share": float(enc_tokens_ex.sum() / (enc_tokens_ex.sum() + dec_positions)),
        "causal": {
            "n_users": int(len(per_user)), "mean_L_user": float(per_user.mean()) if len(per_user) else 0.0,
            "current_query_encoder_tokens": current_q, "one_pass_encoder_tokens": one_pass,
            "token_ratio": float(current_q / max(one_pass, 1)),
            "current_total_encoder_tokens": int(enc_tokens_ex.sum()),
            "one_pass_total_encoder_tokens": int(enc_tokens_ex.sum() - current_q + one_pass),
            "current_attention_pairs": int((q_hist.astype(np.int64) ** 2).sum()),
            "one_pass_causal_attention_pairs": int((per_user * (per_user + 1) // 2).sum()),
        },
    }


def pd_groupby_max(keys: np.ndarray, values: np.ndarray) -> np.ndarray:
    _, inv = np.unique(keys, return_inverse=True)
    out = np.zeros(inv.max() + 1 if len(inv) else 0, dtype=np.int64)
    np.maximum.at(out, inv, values)
    return out


def split_loss(net, batch: dict, t: dict[str, float]):
    """net.loss(batch), part by part (SmallSeq2Seq.forward + RetrieverModel.forward/loss inlined)."""
    import torch.nn.functional as F

    from components.tokenizers.sid_vocab import PAD

    bb = net.backbone
    t0 = time.perf_counter()
    memory, mask = net.encode_query(batch)
    t1 = time.perf_counter()
    enc = bb.encode(memory, mask)
    t2 = time.perf_counter()
    dec_in = batch["dec_in"]
    cross_mask = mask[:, None, None, :]
    y = bb.tok(dec_in) + bb.pos.weight[: dec_in.shape[1]]
    for layer, (k, v) in zip(bb.layers, bb._cross(enc)):
        y = layer(y, k, v, cross_mask)
    logits = bb.head(bb.norm(y)) + net.layer_bias[: dec_in.shape[1]]
    t3 = time.perf_counter()
    loss = F.cross_entropy(logits.flatten(0, 1), batch["target"].flatten(), ignore_index=PAD)
    t4 = time.perf_counter()
    t["query_enc"] += t1 - t0
    t["encoder"] += t2 - t1
    t["decoder+head"] += t3 - t2
    t["loss"] += t4 - t3
    return loss


def bare_epoch(net, ds, batches: list[np.ndarray], rp: dict, n_total_batches: int) -> tuple[dict, int]:
    """Bare loop over `batches`; seconds per part and the examples seen."""
    import torch

    module = make_module(net, rp, n_total_batches)
    opt_cfg = module.configure_optimizers()
    opt, sched = (opt_cfg["optimizer"], opt_cfg["lr_scheduler"]["scheduler"]) if isinstance(opt_cfg, dict) else (opt_cfg, None)
    clip = float(rp.get("grad_clip", 1.0))
    params = [p for p in net.parameters() if p.requires_grad]
    net.train()
    t: dict[str, float] = defaultdict(float)
    n = 0
    for idx in batches:
        t0 = time.perf_counter()
        batch = ds[idx]
        t["batch"] += time.perf_counter() - t0
        loss = split_loss(net, batch, t)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t1 = time.perf_counter()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        if sched is not None:
            sched.step()
        t["backward"] += t1 - t0
        t["optim"] += time.perf_counter() - t1
        n += len(idx)
    return dict(t), n


def lightning_epoch(net, train_dl, rp: dict, n_batches: int, n_total_batches: int) -> float:
    """The same first n_batches through L.Trainer.fit (pipeline trainer settings, no validation);
    seconds between the epoch hooks (trainer start-up not counted)."""
    import lightning as L

    from components.retrieval.retriever import RetrieverModule

    marks: list[float] = []

    class Timed(RetrieverModule):
        def on_train_epoch_start(self) -> None:
            marks.append(time.perf_counter())
            super().on_train_epoch_start()

        def on_train_epoch_end(self) -> None:
            marks.append(time.perf_counter())
            super().on_train_epoch_end()

    module = Timed(net, lr=float(rp["lr"]), weight_decay=float(rp.get("weight_decay", 0.0)),
                   eval_beam=int(rp["eval_beam"]), val_k=10, warmup_steps=int(rp.get("warmup_steps", 0)),
                   total_steps=int(rp["epochs"]) * n_total_batches)
    tr = rp.get("trainer", {})
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*`isinstance.*treespec.*")
        trainer = L.Trainer(max_epochs=1, accelerator=tr.get("accelerator", "cpu"), devices=tr.get("devices", 1),
                            strategy=tr.get("strategy", "auto"), precision=tr.get("precision", "32-true"),
                            logger=False, deterministic=True, use_distributed_sampler=False,
                            enable_model_summary=False, gradient_clip_val=float(rp.get("grad_clip", 1.0)),
                            default_root_dir=str(Path(os.environ.get("TMPDIR", "/tmp")) / "bench_retriever_epoch"),
                            log_every_n_steps=10, enable_checkpointing=False, num_sanity_val_steps=0,
                            limit_train_batches=n_batches, limit_val_batches=0)
        trainer.fit(module, train_dl)
    return marks[-1] - marks[0]


def validation_pass(net, val_dl, eval_beam: int, val_k: int = 10) -> tuple[float, int, float]:
    """One validation pass as RetrieverModule.validation_step runs it: seconds, queries, recall@K."""
    import torch

    from components.retrieval.constrained_decoding import beam_search

    net.eval()
    hits, n = [], 0
    t0 = time.perf_counter()
    with torch.no_grad():
        for batch in val_dl:
            result = beam_search(net, batch, net.vocab, eval_beam, net.trie)
            ranks = net.catalog.target_ranks(result.sid_index.numpy(), batch["targets"].numpy())
            valid = batch["targets"].numpy() >= 0
            hits.append(((ranks < val_k) & valid).sum(1) / valid.sum(1))
            n += len(batch["targets"])
    secs = time.perf_counter() - t0
    net.train()
    return secs, n, float(np.concatenate(hits).mean()) if hits else float("nan")


def check_split(net, ds, idx: np.ndarray) -> float:
    """|split_loss - net.loss| on one batch in eval mode (no dropout): the inlined forward is the model's."""
    import torch

    net.eval()
    with torch.no_grad():
        batch = ds[idx]
        diff = abs(float(split_loss(net, batch, defaultdict(float))) - float(net.loss(batch)))
    net.train()
    return diff


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", default="/tmp/exp/ret_C_ids_d1", help="finished pipeline folder (prepared/, embeddings/, sids/)")
    ap.add_argument("--max-batches", type=int, default=0, help="time only the first N batches of the epoch (0 = all)")
    ap.add_argument("--max-val-batches", type=int, default=0, help="decode only the first N validation batches (0 = all)")
    ap.add_argument("--warmup-batches", type=int, default=3, help="untimed bare-loop batches first (allocator, caches)")
    ap.add_argument("--bare-reps", type=int, default=2, help="bare-loop runs (one before, the rest after Lightning); parts are their mean")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the pipeline's retriever.num_threads)")
    ap.add_argument("-s", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help=f"params override (after the defaults {', '.join(DEFAULT_OVERRIDES)})")
    args = ap.parse_args()
    os.environ.setdefault("WANDB_MODE", "disabled")
    set_threads(args.threads)
    import torch
    from torch.utils.data import DataLoader

    from components.retrieval.retriever_data import BucketBatchSampler, ExampleDataset
    from components.retrieval.seq2seq_backbones import SmallSeq2Seq

    t_load = time.perf_counter()
    run_dir = Path(args.run_dir)
    params, seed, max_history, inputs, examples, valid, text_vectors, counts, net = load_run(run_dir, args.overrides)
    torch.set_num_threads(args.threads)          # prepare_training set retriever.num_threads
    if not isinstance(net.backbone, SmallSeq2Seq):
        raise SystemExit("the part-by-part timing needs retriever.backbone=small")
    rp = params["retriever"]
    ds = ExampleDataset(examples, text_vectors, inputs.item_emb, net.vocab, inputs.catalog)
    val_ds = ExampleDataset(valid, text_vectors, inputs.item_emb, net.vocab, inputs.catalog)
    sampler = BucketBatchSampler(examples.bucket_keys(), int(rp["batch_size"]), shuffle=True, seed=seed)
    all_batches = sampler._batches()                                          # epoch 0, the order training sees
    n_total = len(all_batches)
    timed = all_batches[: args.max_batches] if args.max_batches else all_batches
    val_sampler = BucketBatchSampler(valid.bucket_keys(), int(rp.get("decode_batch_size", 64)), shuffle=False)
    if args.max_val_batches:
        class _First(BucketBatchSampler):
            def _batches(self):
                return super()._batches()[: args.max_val_batches]
        val_sampler = _First(valid.bucket_keys(), int(rp.get("decode_batch_size", 64)), shuffle=False)
    val_dl = DataLoader(val_ds, sampler=val_sampler, batch_size=None)
    load_s = time.perf_counter() - t_load
    stats_ = token_stats(examples, all_batches, inputs.queries, net.vocab.max_len, int(rp["n_memory"]))
    print(f"loaded in {load_s:.1f}s: {stats_['n_examples']} examples, {n_total} batches, "
          f"{counts['n_val_queries']} val queries; timing {len(timed)} batches", flush=True)
    split_diff = check_split(net, ds, timed[0])

    state0 = copy.deepcopy(net.state_dict())
    warm = all_batches[-args.warmup_batches:] if args.warmup_batches else []
    bare_epoch(net, ds, warm, rp, n_total)                                   # warm-up, discarded
    bare_runs: list[dict] = []

    def bare_run() -> int:
        net.load_state_dict(state0)
        torch.manual_seed(seed)
        t, n = bare_epoch(net, ds, timed, rp, n_total)
        bare_runs.append(t)
        print(f"bare loop run {len(bare_runs)}: {sum(t.values()):.2f}s for {n} examples", flush=True)
        return n

    n_seen = bare_run()

    val_s, val_n, val_recall = validation_pass(net, val_dl, int(rp["eval_beam"]))
    print(f"validation: {val_s:.2f}s for {val_n} queries", flush=True)

    net.load_state_dict(state0)
    torch.manual_seed(seed)
    train_dl = DataLoader(ds, sampler=BucketBatchSampler(examples.bucket_keys(), int(rp["batch_size"]), shuffle=True,
                                                          seed=seed), batch_size=None)
    lightning_s = lightning_epoch(net, train_dl, rp, len(timed), n_total)
    torch.set_num_threads(args.threads)
    print(f"lightning: {lightning_s:.2f}s", flush=True)
    for _ in range(args.bare_reps - 1):          # bare again after Lightning: order effects and load swings
        bare_run()
    parts = {k: float(np.mean([r.get(k, 0.0) for r in bare_runs])) for k in PARTS}
    bare_s = sum(parts.values())

    scale = stats_["n_examples"] / n_seen                                    # timed part -> whole epoch
    rows = []
    for name in PARTS:
        rows.append({"part": name, "seconds": parts.get(name, 0.0), "share_train": parts.get(name, 0.0) / bare_s,
                     "epoch_est_s": parts.get(name, 0.0) * scale})
    rows.append({"part": "train total (bare)", "seconds": bare_s, "share_train": 1.0, "epoch_est_s": bare_s * scale})
    rows.append({"part": "validation (beam)", "seconds": val_s, "share_train": val_s / bare_s, "epoch_est_s": val_s})
    rows.append({"part": "train total (Lightning)", "seconds": lightning_s, "share_train": lightning_s / bare_s,
                 "epoch_est_s": lightning_s * scale})
    epoch_bare = bare_s * scale + val_s
    for r in rows:
        r["share_epoch"] = r["epoch_est_s"] / epoch_bare if r["part"] != "train total (Lightning)" else float("nan")
    cols = ["part", "seconds", "share_train", "epoch_est_s", "share_epoch"]
    print_table(rows, cols, f"retriever epoch, {len(timed)}/{n_total} batches timed ({n_seen} examples), "
                            f"validation {val_n} queries, {args.threads} thread(s)")
    c = stats_["causal"]
    summary = {
        "examples_per_s_bare": n_seen / bare_s, "examples_per_s_lightning": n_seen / lightning_s,
        "lightning_over_bare": lightning_s / bare_s, "val_queries_per_s": val_n / val_s,
        "epoch_est_s_bare_plus_val": epoch_bare, "epoch_est_s_lightning_plus_val": lightning_s * scale + val_s,
        "bare_run_totals_s": [sum(r.values()) for r in bare_runs],
        "val_recall@10_after_timed_batches": val_recall, "split_forward_loss_diff": split_diff,
    }
    print(f"\nexamples/s bare {summary['examples_per_s_bare']:.0f}, Lightning {summary['examples_per_s_lightning']:.0f} "
          f"(Lightning / bare {summary['lightning_over_bare']:.2f}x); validation {summary['val_queries_per_s']:.0f} q/s")
    print(f"history length: mean {stats_['mean_history_len_all']:.2f} (all history examples), "
          f"{stats_['mean_history_len_query_pairs']:.2f} (query pairs); encoder tokens {stats_['encoder_tokens']} vs "
          f"decoder positions {stats_['decoder_positions']} (encoder share {stats_['encoder_token_share']:.2f})")
    print(f"causal all-prefix encoder: {c['n_users']} users, mean L_user {c['mean_L_user']:.2f}; query encoder tokens "
          f"{c['current_query_encoder_tokens']} -> {c['one_pass_encoder_tokens']} ({c['token_ratio']:.2f}x fewer); "
          f"all encoder tokens {c['current_total_encoder_tokens']} -> {c['one_pass_total_encoder_tokens']}")
    path = write_result("retriever_epoch", {
        "config": {**vars(args), "defaults": list(DEFAULT_OVERRIDES), "batch_size": int(rp["batch_size"]),
                   "d_model": int(rp["d_model"]), "n_layers": int(rp["n_layers"]),
                   "decoder_layers": int(rp.get("decoder_layers") or rp["n_layers"]), "dropout": float(rp["dropout"]),
                   "item_id_embeddings": bool(rp.get("item_id_embeddings")), "eval_beam": int(rp["eval_beam"]),
                   "max_history": max_history, "sid_version": inputs.sid_version, "sid_max_len": net.vocab.max_len,
                   "n_params": int(sum(p.numel() for p in net.parameters())), "data": f"real: {run_dir}",
                   "timed_batches": len(timed), "timed_examples": n_seen, "val_queries": val_n, "load_s": load_s},
        "rows": rows, "summary": summary, "tokens": stats_, "counts": counts})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
