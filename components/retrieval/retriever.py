"""The generative retriever: query encoder + seq2seq backbone over SID tokens.

`RetrieverModel` (a plain nn.Module, what is saved and served) scores SID tokens with the
per-depth vocabulary mask (depth t may emit only layer-t codes or END), trains by teacher
forcing with cross-entropy, and is the step decoder of `constrained_decoding.beam_search`.
`RetrieverModule` is its LightningModule: training loop and validation Recall@K each epoch
(components/retrieval/best_epoch.py keeps the best epoch with Lightning's callbacks). Checkpoint = {"state_dict", "config"} (json-able config), loadable
with torch.load(weights_only=True).
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from components.retrieval.constrained_decoding import BeamResult, SidTrie, beam_search
from components.retrieval.item_scorer import ItemScorer, negatives_for, sampled_candidates
from components.retrieval.query_encoders import QueryEncoder
from components.retrieval.seq2seq_backbones import HFSeq2Seq, SmallSeq2Seq
from components.runtime.atomic import write_torch
from components.runtime.errors import ConfigError
from components.runtime.torch_files import load_weights
from components.tokenizers.sid_vocab import BOS, END, PAD, SidCatalog, SidVocab


def model_config(rp: dict, codebook_sizes: tuple[int, ...], emb_dim: int, max_history: int, n_items: int = 0) -> dict:
    """The json-able description a checkpoint needs to rebuild the model (n_items sizes the
    item-id embedding table when `retriever.item_id_embeddings` is on)."""
    backbone = rp["backbone"]
    cfg = {"backbone": backbone, "codebook_sizes": [int(k) for k in codebook_sizes], "emb_dim": int(emb_dim),
           "max_history": int(max_history), "d_model": int(rp["d_model"]), "n_heads": int(rp["n_heads"]),
           "n_layers": int(rp["n_layers"]), "ff_dim": int(rp["ff_dim"]), "dropout": float(rp["dropout"]),
           "decoder_layers": int(rp.get("decoder_layers") or rp["n_layers"]),
           "n_memory": int(rp["n_memory"]), "history_sid_tokens": bool(rp["history_sid_tokens"]),
           "n_item_ids": int(n_items) if rp["item_id_embeddings"] else 0,
           "hf_config": None}
    if rp["item_head"]:  # only when on: checkpoints and runs without it stay as they were
        cfg["item_head"] = True
        cfg["item_head_weight"] = float(rp["item_head_weight"])
        if rp["item_head_encoder"] == "own":  # only when not the default: older configs stay as they were
            cfg["item_head_encoder"] = "own"
        if rp["cold_item_rows"] == "text":  # absent in older checkpoints: they keep learned rows
            cfg["cold_item_rows"] = "text"
        negatives = negatives_for(rp.get("item_head_negatives"), n_items)
        if negatives:  # only when sampled: full-softmax configs stay as they were
            cfg["item_negatives"] = negatives
    vocab = SidVocab(tuple(cfg["codebook_sizes"]))
    if backbone == "t5":
        from transformers import T5Config

        t5 = T5Config(vocab_size=vocab.size, d_model=cfg["d_model"], d_kv=cfg["d_model"] // cfg["n_heads"],
                      d_ff=cfg["ff_dim"], num_layers=cfg["n_layers"], num_decoder_layers=cfg["decoder_layers"],
                      num_heads=cfg["n_heads"],
                      dropout_rate=cfg["dropout"], pad_token_id=PAD, eos_token_id=END, decoder_start_token_id=BOS)
        cfg["hf_config"] = json.loads(t5.to_json_string())
    elif backbone == "pretrained":
        path = Path(str(rp.get("pretrained_path") or ""))
        if not str(rp.get("pretrained_path") or "") or not path.is_dir():
            raise ConfigError("retriever.pretrained_path", f"must be a local checkpoint folder, got {str(path)!r}")
        from transformers import AutoConfig

        hf = AutoConfig.from_pretrained(path, local_files_only=True)
        if not getattr(hf, "is_encoder_decoder", False) or not hasattr(hf, "d_model"):
            raise ConfigError("retriever.pretrained_path", f"{path} is not an encoder-decoder with d_model")
        hf.vocab_size = vocab.size
        cfg["hf_config"] = json.loads(hf.to_json_string())
        cfg["d_model"] = int(hf.d_model)
        cfg["pretrained_path"] = str(path)
    return cfg


def _hf_model(cfg: dict, load_pretrained: bool) -> nn.Module:
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    vocab_size = SidVocab(tuple(cfg["codebook_sizes"])).size
    if load_pretrained:
        model = AutoModelForSeq2SeqLM.from_pretrained(cfg["pretrained_path"], local_files_only=True)
        model.resize_token_embeddings(vocab_size)
        return model
    hf = dict(cfg["hf_config"])
    config = AutoConfig.for_model(hf.pop("model_type"), **hf)
    return AutoModelForSeq2SeqLM.from_config(config)


class QueryTower(nn.Module):
    """The item scorer's own query encoder (`retriever.item_head_encoder: own`): the same query
    inputs and encoder sizes as the retriever's, separate weights. Shared, the scorer's loss cost
    the SID decoder about 0.01 validation R@10 on amazon-scientific (RESULTS.md)."""

    def __init__(self, config: dict):
        super().__init__()
        d = config["d_model"]
        self.query = QueryEncoder(config["emb_dim"], d, config["n_memory"], config["max_history"], config["dropout"],
                                  int(config.get("n_item_ids", 0)))
        layer = nn.TransformerEncoderLayer(d, config["n_heads"], config["ff_dim"], config["dropout"],
                                           activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, config["n_layers"], norm=nn.LayerNorm(d),
                                             enable_nested_tensor=False)

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(encoder states (N, M, d), mask (N, M)) for the scorer's pooling."""
        memory, mask = self.query(batch)
        return self.encoder(memory, src_key_padding_mask=~mask), mask


class RetrieverModel(nn.Module):
    """Query -> SID scores; also the step decoder that beam search drives."""

    def __init__(self, config: dict, load_pretrained: bool = False):
        super().__init__()
        self.config = copy.deepcopy(config)
        self.vocab = SidVocab(tuple(config["codebook_sizes"]))
        d = config["d_model"]
        self.query = QueryEncoder(config["emb_dim"], d, config["n_memory"], config["max_history"], config["dropout"],
                                  int(config.get("n_item_ids", 0)))
        if config["backbone"] == "small":
            self.backbone: nn.Module = SmallSeq2Seq(self.vocab.size, self.vocab.max_len, d, config["n_heads"],
                                                    config["n_layers"], config["ff_dim"], config["dropout"],
                                                    config.get("decoder_layers"))
        else:
            self.backbone = HFSeq2Seq(_hf_model(config, load_pretrained and config["backbone"] == "pretrained"))
        bias = np.where(self.vocab.layer_mask(), 0.0, float("-inf")).astype(np.float32)
        self.register_buffer("layer_bias", torch.from_numpy(bias), persistent=False)
        # built last, and only when on, so a retriever without it draws the same initial weights as before
        self.scorer = ItemScorer(config["emb_dim"], d, int(config.get("n_item_ids", 0))) \
            if config.get("item_head") else None
        # item_head_encoder own: the scorer reads its own query encoder, so its loss does not reshape the SID encoder
        self.scorer_tower = QueryTower(config) if config.get("item_head_encoder") == "own" else None
        self.item_emb: torch.Tensor | None = None
        self.text_only: torch.Tensor | None = None
        self.target_share: torch.Tensor | None = None
        self.catalog: SidCatalog | None = None
        self.trie: SidTrie | None = None

    def attach_items(self, item_emb: np.ndarray, popularity: np.ndarray | None = None) -> None:
        """Frozen text embeddings of the catalog in item-row order (the item scorer reads them), and
        the items' training interactions: with `cold_item_rows: text` the items without any score by
        their text alone (see ItemScorer.item_vectors)."""
        self.item_emb = torch.as_tensor(np.asarray(item_emb, dtype=np.float32))
        self.text_only = None
        if popularity is not None:   # the sampled softmax's in-batch proposal: how often each item is a target
            pop = torch.as_tensor(np.asarray(popularity, dtype=np.float64)).clamp_min(0)
            self.target_share = (pop / pop.sum() if pop.sum() > 0 else torch.full_like(pop, 1 / len(pop))).float()
        if self.config.get("cold_item_rows") == "text" and popularity is not None:
            self.text_only = torch.as_tensor(np.asarray(popularity) == 0)

    def attach_catalog(self, catalog: SidCatalog) -> None:
        """Issued SIDs to decode into (rebuild after new items get SIDs; no retraining needed)."""
        if catalog.max_len != self.vocab.max_len:
            raise ValueError(f"catalog SIDs have max_len {catalog.max_len}, the model {self.vocab.max_len}")
        self.catalog = catalog
        self.trie = SidTrie.from_catalog(catalog, self.vocab.codebook_sizes)

    def encode_query(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Memory vectors of a batch; history items also carry the sum of their SID token
        embeddings (shared with the decoder) when `history_sid_tokens` is on. Indexing pairs never
        see their own SID (the task would become copying instead of content -> SID)."""
        memory, mask = self.query(batch)
        if self.config.get("history_sid_tokens") and "hist_tokens" in batch and not batch.get("indexing", False):
            tokens = batch["hist_tokens"]                               # (N, L, max_len), PAD = 0
            emb = self.token_embedding(tokens) * (tokens != PAD).unsqueeze(-1)
            memory = memory + emb.sum(2)
        return memory, mask

    def token_embedding(self, tokens: torch.Tensor) -> torch.Tensor:
        if isinstance(self.backbone, SmallSeq2Seq):
            return self.backbone.tok(tokens)
        return self.backbone.model.get_input_embeddings()(tokens)

    def forward(self, batch: dict) -> torch.Tensor:
        """Teacher-forced logits (N, max_len, V), tokens outside each depth's layer at -inf."""
        return self._forward(batch)[0]

    def _forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """SID logits, and the item scorer's query vectors when the retriever has one (one encoder pass)."""
        memory, mask = self.encode_query(batch)
        enc = self.backbone.encode(memory, mask)
        logits = self.backbone(memory, mask, batch["dec_in"], enc=enc)
        if self.scorer is None:
            qvec = None
        elif self.scorer_tower is not None:
            qvec = self.scorer.query_vectors(*self.scorer_tower(batch))
        else:
            qvec = self.scorer.query_vectors(enc, mask)
        return logits + self.layer_bias[: logits.shape[1]], qvec

    def loss(self, batch: dict) -> torch.Tensor:
        """SID cross-entropy; with the item scorer, plus item_head_weight x its softmax loss over the catalog
        (sampled, with log-Q, when the config has item_negatives: see item_scorer.sampled_candidates)."""
        logits, qvec = self._forward(batch)
        loss = F.cross_entropy(logits.flatten(0, 1), batch["target"].flatten(), ignore_index=PAD)
        if qvec is None:
            return loss
        target = batch["target_item"]
        if self.config.get("item_negatives"):
            if self.target_share is None:
                raise ValueError("a sampled item scorer needs attach_items(item_emb, popularity) first")
            rows, target, log_q = sampled_candidates(target, self.target_share, int(self.config["item_negatives"]))
            item_logits = self.scorer.logits(qvec, self.item_vectors(rows)) - log_q
        else:
            item_logits = self.scorer.logits(qvec, self.item_vectors())
        return loss + self.config["item_head_weight"] * F.cross_entropy(item_logits, target)

    # --- item scorer (config item_head)
    def item_vectors(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Unit vectors of every catalog item (or of `rows` only)."""
        if self.scorer is None or self.item_emb is None:
            raise ValueError("the item scorer needs item_head on and attach_items(item_emb) first")
        device = self.layer_bias.device
        text_only = None if self.text_only is None else self.text_only.to(device)
        return self.scorer.item_vectors(self.item_emb.to(device), text_only, None if rows is None else rows.to(device))

    def on_device(self, batch: dict) -> dict:
        """The batch's tensors on the model's device (a no-op where they are already)."""
        device = self.layer_bias.device
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def query_vectors(self, batch: dict) -> torch.Tensor:
        """The item scorer's unit query vectors (N, d) for a batch (eval mode is the caller's job)."""
        batch = self.on_device(batch)
        if self.scorer_tower is not None:
            return self.scorer.query_vectors(*self.scorer_tower(batch))
        memory, mask = self.encode_query(batch)
        return self.scorer.query_vectors(self.backbone.encode(memory, mask), mask)

    # --- StepDecoder protocol (constrained_decoding.beam_search)
    def start(self, batch: dict) -> dict:
        memory, mask = self.encode_query(batch)
        return self.backbone.start(memory, mask)

    def step(self, state: dict, tokens: torch.Tensor, depth: int, columns: torch.Tensor) -> torch.Tensor:
        logits = self.backbone.step(state, tokens, depth, columns) + self.layer_bias[depth, columns]
        return logits.log_softmax(-1)

    def reorder(self, state: dict, index: torch.Tensor) -> dict:
        return self.backbone.reorder(state, index)


def _net(model: nn.Module) -> RetrieverModel:
    return model.net if isinstance(model, RetrieverModule) else model


def decode(model: nn.Module, batch: dict, beam: int, constrained: bool = True) -> BeamResult:
    """Beam search for a batch; constrained decoding needs `attach_catalog` first."""
    net = _net(model)
    if constrained and net.trie is None:
        raise ValueError("constrained decoding needs the issued SIDs: call model.attach_catalog(catalog)")
    was_training = net.training
    if was_training:  # switching modes walks every submodule: skip it when serving
        net.eval()
    batch = net.on_device(batch)
    try:
        return beam_search(net, batch, net.vocab, beam, net.trie if constrained else None)
    finally:
        if was_training:
            net.train()


def generate_sids(model: nn.Module, batch: dict, beam: int, constrained: bool = True
                  ) -> tuple[list[list[tuple[int, ...]]], list[list[float]]]:
    """Per query: the decoded SIDs (best first, distinct) and their summed log-probabilities."""
    return decode(model, batch, beam, constrained).to_lists()


def save_retriever(model: nn.Module, path: str | Path) -> None:
    net = _net(model)
    write_torch({"state_dict": net.state_dict(), "config": net.config}, path)


def load_retriever(path: str | Path) -> RetrieverModel:
    """Rebuild from a checkpoint written by save_retriever (no pretrained download needed)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no retriever checkpoint (run the train_retriever step first)")
    blob = load_weights(path, keys=("state_dict", "config"), rerun="the train_retriever step")
    net = RetrieverModel(blob["config"])
    net.load_state_dict(blob["state_dict"])
    net.eval()
    return net


class RetrieverModule(L.LightningModule):
    """Training loop; validation = constrained beam search, item-level Recall@K per epoch."""

    def __init__(self, net: RetrieverModel, lr: float, weight_decay: float, eval_beam: int, val_k: int = 10,
                 warmup_steps: int = 0, total_steps: int | None = 0):
        """total_steps: the cosine schedule's length; None = the trainer's estimate (epochs x this
        rank's batches, so a multi-process run decays over its own steps); 0 = no schedule."""
        super().__init__()
        self.save_hyperparameters(ignore=["net"])
        self.net = net
        self.lr, self.weight_decay, self.eval_beam, self.val_k = lr, weight_decay, eval_beam, val_k
        self.warmup_steps, self.total_steps = warmup_steps, total_steps
        self.curve: list[dict] = []
        self._losses: list[float] = []
        self._hits: list[np.ndarray] = []
        self._last_recall = float("nan")
        self._epoch_start = time.perf_counter()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.net.loss(batch)
        self._losses.append(float(loss.detach()))
        self.log("train_loss", loss, prog_bar=True, batch_size=len(batch["x"]))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        result = beam_search(self.net, batch, self.net.vocab, self.eval_beam, self.net.trie)
        targets = batch["targets"].cpu().numpy()
        ranks = self.net.catalog.target_ranks(result.sid_index.cpu().numpy(), targets)
        valid = targets >= 0
        self._hits.append(((ranks < self.val_k) & valid).sum(1) / valid.sum(1))

    def on_validation_epoch_end(self) -> None:
        self._last_recall = float(np.concatenate(self._hits).mean()) if self._hits else float("nan")
        self._hits = []
        if not self.trainer.sanity_checking:
            self.log(f"val_recall@{self.val_k}", self._last_recall, prog_bar=True)

    def on_train_epoch_start(self) -> None:
        self._epoch_start = time.perf_counter()

    def on_train_epoch_end(self) -> None:
        """One curve row per epoch (the best epoch is kept by ModelCheckpoint, components/retrieval/best_epoch.py)."""
        recall, self._last_recall = self._last_recall, float("nan")
        train_loss = float(np.mean(self._losses)) if self._losses else float("nan")
        self._losses = []
        self.curve.append({"epoch": int(self.current_epoch), "train_loss": train_loss, f"val_recall@{self.val_k}": recall})
        rank_zero_info(f"retriever epoch {self.current_epoch}: train_loss {train_loss:.4f}, "
                       f"val_recall@{self.val_k} {recall:.4f}, {time.perf_counter() - self._epoch_start:.1f} s")

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        total = int(self.trainer.estimated_stepping_batches) if self.total_steps is None else self.total_steps
        if total <= 0:
            return opt
        warm = max(self.warmup_steps, 1)

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            return 0.5 * (1 + np.cos(np.pi * min(1.0, (step - warm) / max(1, total - warm))))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
