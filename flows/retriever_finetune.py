"""Fine-tune a trained retriever on new items with replay of old pairs (the retrain flow's step).

Starts from the live checkpoint. When new items grew extension rows, the SID vocabulary
grows: every token of the old vocabulary keeps its learned rows (moved to its new id),
new codes start from the fresh initialisation. Training examples = the new items'
indexing pairs repeated `new_repeats` times (a few new items need many gradient steps) +
a seeded sample of old pairs (training and indexing pairs), `replay_ratio` old pairs per
new pair, so old items are not forgotten. Validation = old validation queries
plus the new items' indexing queries; the best epoch is kept. The examples, model and
training loop are the retriever's own (components.retrieval.retriever_train / retriever).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from components.retrieval.best_epoch import Loaders, fit_best_epoch
from components.retrieval.retriever import RetrieverModel, RetrieverModule, save_retriever
from components.retrieval.retriever_data import BucketBatchSampler, ExampleDataset, Examples
from components.retrieval.retriever_train import VAL_K, prepare_training, trainer_args
from components.runtime.errors import DataError
from components.runtime.paths import out_path
from components.runtime.torch_files import load_weights
from components.tokenizers.sid_vocab import N_SPECIAL, SidVocab


def token_map(old: SidVocab, new: SidVocab) -> np.ndarray:
    """New token id of every old token (specials keep theirs; layer codes move by offsets)."""
    mapping = np.arange(old.size, dtype=np.int64)
    for layer, (o_off, n_off, k) in enumerate(zip(old.offsets, new.offsets, old.codebook_sizes)):
        if new.codebook_sizes[layer] < k:
            raise ValueError(f"layer {layer}: codebook shrank from {k} to {new.codebook_sizes[layer]}")
        mapping[o_off:o_off + k] = n_off + np.arange(k)
    mapping[:N_SPECIAL] = np.arange(N_SPECIAL)
    return mapping


def load_grown(net: RetrieverModel, old_state: dict, old_sizes: tuple[int, ...]) -> int:
    """Load an old checkpoint into a model whose vocabulary may have grown; returns rows moved."""
    old_vocab, new_vocab = SidVocab(tuple(old_sizes)), net.vocab
    mapping = torch.from_numpy(token_map(old_vocab, new_vocab))
    state = net.state_dict()
    moved = 0
    for key, value in old_state.items():
        target = state[key]
        if value.shape == target.shape:
            state[key] = value
        elif (value.shape[0] == old_vocab.size and target.shape[0] == new_vocab.size
              and value.shape[1:] == target.shape[1:]):
            grown = target.clone()
            grown[mapping] = value
            state[key] = grown
            moved += 1
        else:
            raise ValueError(f"checkpoint tensor {key} {tuple(value.shape)} does not fit the model {tuple(target.shape)}")
    net.load_state_dict(state)
    return moved


def replay_split(examples: Examples, new_rows: np.ndarray, repeats: int, ratio: float,
                 seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(positions of the new items' indexing pairs, each `repeats` times; a seeded sample of
    old pairs, `ratio` per repeated new pair, without replacement)."""
    is_new = (examples.query < 0) & np.isin(examples.sid, new_rows)
    new_idx = np.repeat(np.flatnonzero(is_new), max(1, repeats))
    old_idx = np.flatnonzero(~is_new)
    n_replay = min(len(old_idx), int(round(ratio * len(new_idx))))
    replay = np.sort(np.random.default_rng(seed).choice(old_idx, n_replay, replace=False))
    return new_idx, replay


def finetune_retriever(params: dict, init_checkpoint: Path, new_item_ids: list[str], cfg: dict) -> tuple[RetrieverModel, dict]:
    """Fine-tune the checkpoint on params' out_dir (the candidate version); writes retriever/model.pt.

    cfg = params flows.retrain: epochs, batch_size, new_repeats, replay_ratio, lr (null = retriever.lr).
    """
    rp = params["retriever"]
    seed, _, inputs, (examples, valid, text_vectors, counts) = prepare_training(params)
    new_rows = inputs.item_index.get_indexer(new_item_ids)
    if (new_rows < 0).any():
        missing = [i for i, r in zip(new_item_ids, new_rows) if r < 0]
        raise DataError(out_path(params, "prepared", "items.parquet"), f"{len(missing)} new items are missing, "
                        f"e.g. {missing[:5]} (run catalog_update first)", column="item_id")
    new_idx, replay = replay_split(examples, new_rows, int(cfg["new_repeats"]), float(cfg["replay_ratio"]), seed)
    train = examples.take(np.sort(np.concatenate([new_idx, replay])))
    val = Examples.concat([valid, examples.take(np.unique(new_idx))])

    blob = load_weights(init_checkpoint, keys=("state_dict", "config"), rerun="the train_retriever step")
    config = dict(blob["config"])
    config["codebook_sizes"] = [int(k) for k in inputs.codebook_sizes]
    config["sid_version"] = inputs.sid_version
    if config.get("hf_config"):
        config["hf_config"] = {**config["hf_config"], "vocab_size": SidVocab(tuple(inputs.codebook_sizes)).size}
    net = RetrieverModel(config)
    moved = load_grown(net, blob["state_dict"], tuple(blob["config"]["codebook_sizes"]))
    net.attach_catalog(inputs.catalog)
    if net.scorer is not None:
        net.attach_items(inputs.item_emb, inputs.catalog.popularity)   # new items: text vector + the shared zero id row

    epochs = int(cfg["epochs"])
    sampler = BucketBatchSampler(train.bucket_keys(), int(cfg["batch_size"]), shuffle=True, seed=seed)
    train_dl = DataLoader(ExampleDataset(train, text_vectors, inputs.item_emb, net.vocab, inputs.catalog),
                          sampler=sampler, batch_size=None)
    val_dl = DataLoader(ExampleDataset(val, text_vectors, inputs.item_emb, net.vocab, inputs.catalog),
                        sampler=BucketBatchSampler(val.bucket_keys(), int(rp["decode_batch_size"]), shuffle=False),
                        batch_size=None)
    lr = float(cfg.get("lr") or rp["lr"])
    module = RetrieverModule(net, lr=lr, weight_decay=float(rp["weight_decay"]),
                             eval_beam=int(rp["eval_beam"]), val_k=VAL_K)
    start = time.perf_counter()
    # one process: a short fine-tune inside a flow (a `ddp` launcher would re-run the whole flow per rank)
    single = {**trainer_args(rp, epochs, False, out_path(params, "lightning")), "strategy": "auto", "devices": 1,
              "num_nodes": 1}
    fit = fit_best_epoch(module, single, Loaders(train_dl, val_dl), f"val_recall@{VAL_K}", 0,
                         job="retrain fine-tune", keys="flows.retrain.lr (null = retriever.lr)")
    seconds = time.perf_counter() - start
    net.eval()
    save_retriever(net, out_path(params, "retriever", "model.pt"))
    return net, {"epochs": epochs, "lr": lr, "best_epoch": fit.best_epoch,
                 f"best_val_recall@{VAL_K}": fit.best_score, "n_new_pairs": int(len(new_idx)),
                 "n_steps": int(epochs * len(sampler)),
                 "n_replay_pairs": int(len(replay)), "vocab_tensors_grown": moved,
                 "train_seconds": round(seconds, 2), "index_kind": counts["index_kind"]}
