"""The frozen tokenizer: encode items to SIDs, reconstruct, and give new items SIDs.

Used by `assign_ids` for the catalog and by the retraining flow for new items. A new item
goes through the same frozen encoder, anchors and extensions (and, for SARQ methods, the
frozen head path table); extension rows grow only where a residual is farther than
`grow_threshold` from every row of its layer, so no issued SID ever changes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from components.runtime.atomic import write_torch
from components.runtime.errors import ConfigError
from components.runtime.paths import out_path
from components.runtime.torch_files import load_weights
from components.tokenizers.quantizer import ResidualQuantizer
from components.tokenizers.rqvae import RQVAE
from components.tokenizers.sarq import PathTable, stop_depths

ASSIGN_BLOCK = 4096   # rows per block in Tokenizer.assign: cache-sized (block, K) distance matrices


@dataclass
class Tokenizer:
    """A trained tokenizer; `model` is None for RQ-KMeans (identity encoder, no decoder)."""

    method: str
    quantizer: ResidualQuantizer
    model: RQVAE | None
    table: PathTable | None
    tau: float
    min_len: int
    max_len: int
    version: str
    anchor_sizes: list[int]

    @property
    def sizes(self) -> list[int]:
        return self.quantizer.sizes

    @torch.no_grad()
    def latents(self, x: np.ndarray) -> Tensor:
        xt = torch.as_tensor(np.asarray(x, dtype=np.float32))
        return xt if self.model is None else self.model.encoder(xt)

    def depths(self, codes: Tensor) -> Tensor:
        """SARQ stop rule on the frozen table; fixed length without a table."""
        if self.table is None:
            return torch.full((codes.shape[0],), self.max_len, dtype=torch.int64)
        return stop_depths(self.table.information(codes), self.tau, self.min_len, self.max_len)

    @torch.no_grad()
    def assign(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Full-depth codes (N, L) and SID lengths (N,).

        Rows go through in blocks of ASSIGN_BLOCK: each row's codes depend on that row alone,
        and the (block, K) distance temporaries stay cache-sized, so time grows linearly with
        N and peak memory does not grow with N x K."""
        x = np.asarray(x, dtype=np.float32)
        codes = np.empty((len(x), self.max_len), dtype=np.int64)
        lengths = np.empty(len(x), dtype=np.int64)
        for lo in range(0, len(x), ASSIGN_BLOCK):
            block = self.quantizer(self.latents(x[lo:lo + ASSIGN_BLOCK]), n_layers=self.max_len).codes
            codes[lo:lo + len(block)] = block.numpy()
            lengths[lo:lo + len(block)] = self.depths(block).numpy()
        return codes, lengths

    @torch.no_grad()
    def reconstruction_error(self, x: np.ndarray, codes: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """||x - D(sum_{l <= L(i)} C_l[c_l])||^2 per item, in the input space."""
        c = torch.as_tensor(codes, dtype=torch.int64)
        z_q = torch.zeros(len(c), self.quantizer.dim)
        for layer in range(c.shape[1]):
            keep = torch.as_tensor(lengths > layer)
            z_q[keep] += self.quantizer.codebook(layer)[c[keep, layer]]
        x_hat = z_q if self.model is None else self.model.decoder(z_q)
        return ((torch.as_tensor(np.asarray(x, dtype=np.float32)) - x_hat) ** 2).sum(1).numpy()

    @torch.no_grad()
    def residual_distances(self, x: np.ndarray) -> np.ndarray:
        """(N, L) Euclidean distance from each layer's residual to its nearest row: the scale
        on which `grow_threshold` is read."""
        out = self.quantizer(self.latents(x), n_layers=self.max_len)
        return (out.residuals - out.quantized).norm(dim=-1).numpy()

    def state(self) -> dict:
        return {"method": self.method, "quantizer": self.quantizer.state(),
                "model": None if self.model is None else self.model.state(),
                "table": None if self.table is None else self.table.state(),
                "tau": self.tau, "min_len": self.min_len, "max_len": self.max_len,
                "version": self.version, "anchor_sizes": list(self.anchor_sizes)}

    @classmethod
    def from_state(cls, state: dict) -> Tokenizer:
        model = None if state["model"] is None else RQVAE.from_state(state["model"])
        quantizer = model.quantizer if model is not None else ResidualQuantizer.from_state(state["quantizer"])
        if model is not None:
            model.eval()
        table = None if state["table"] is None else PathTable.from_state(state["table"])
        return cls(state["method"], quantizer, model, table, float(state["tau"]), int(state["min_len"]),
                   int(state["max_len"]), state["version"], list(state["anchor_sizes"]))


def save_checkpoint(obj: dict, path: str | Path) -> None:
    """torch.save of plain dicts / tensors / lists, written atomically."""
    write_torch(obj, path)


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: tokenizer checkpoint not found (run train_head / train_tail first)")
    return load_weights(path, rerun="train_head / train_tail")


def save_tokenizer(tokenizer: Tokenizer, path: str | Path) -> None:
    """Persist a tokenizer (for instance after new items grew extension rows)."""
    save_checkpoint({"tokenizer": tokenizer.state()}, path)


def load_tokenizer(params: dict, path: str | Path | None = None) -> Tokenizer:
    """The frozen tokenizer of a run: tokenizer/tail.pt when Stage 2 trained one, else
    tokenizer/head.pt; or the file at `path` written by `save_tokenizer`."""
    if path is not None:
        return Tokenizer.from_state(load_checkpoint(path)["tokenizer"])
    head = load_checkpoint(out_path(params, "tokenizer", "head.pt"))
    tail = load_checkpoint(out_path(params, "tokenizer", "tail.pt"))
    if tail.get("version") != head.get("version"):
        raise ConfigError("tokenizer", f"tokenizer/tail.pt ({tail.get('version')}) does not belong to "
                                       f"tokenizer/head.pt ({head.get('version')}): run train_tail again")
    if tail.get("tokenizer") is not None:
        return Tokenizer.from_state(tail["tokenizer"])
    if head.get("tokenizer") is None:
        raise ConfigError("tokenizer.method", f"method {head.get('method')!r} has no tokenizer to encode items with")
    return Tokenizer.from_state(head["tokenizer"])


@torch.no_grad()
def assign_new_items(tokenizer: Tokenizer, embeddings: np.ndarray,
                     grow_threshold: float | None) -> tuple[list[list[int]], np.ndarray, dict]:
    """SIDs for new items with the frozen tokenizer, growing extension rows where needed.

    Layer by layer, an item still quantizing (its path information has not exceeded tau)
    whose residual lies farther than `grow_threshold` (Euclidean, latent space) from every
    row gets a new extension row at its residual; later far items within the threshold of
    that row share it (leader clustering in item order, deterministic). Anchors and
    existing rows never move. Returns (codes per item, lengths, grown) with
    grown = {"rows_added": per layer, "codebook_sizes": per layer after growth}."""
    if grow_threshold is not None and (not math.isfinite(grow_threshold) or grow_threshold <= 0):
        raise ValueError(f"grow_threshold must be a positive number or None, got {grow_threshold}")
    r = tokenizer.latents(embeddings)
    n = r.shape[0]
    codes = torch.zeros(n, tokenizer.max_len, dtype=torch.int64)
    active = torch.ones(n, dtype=torch.bool)
    added = []
    for layer in range(tokenizer.max_len):
        book = tokenizer.quantizer.codebook(layer)
        idx, d2 = ResidualQuantizer.nearest(r, book)
        dist = d2.sqrt()
        grown = 0
        if grow_threshold is not None:
            far = active & (dist > grow_threshold)
            while bool(far.any()):
                leader = int(torch.nonzero(far)[0])
                row = r[leader].clone()
                tokenizer.quantizer.extend(layer, row[None, :])
                new_idx = tokenizer.quantizer.sizes[layer] - 1
                d_new = (r - row).norm(dim=1)
                closer = d_new < dist
                idx = torch.where(closer, torch.full_like(idx, new_idx), idx)
                dist = torch.minimum(dist, d_new)
                far = active & (dist > grow_threshold)
                grown += 1
            book = tokenizer.quantizer.codebook(layer)
        added.append(grown)
        codes[:, layer] = idx
        r = r - book[idx]
        if tokenizer.table is not None:
            info = tokenizer.table.information(codes[:, : layer + 1])[:, -1]
            active = active & ((info <= tokenizer.tau) | (layer + 1 < tokenizer.min_len))
    lengths = tokenizer.depths(codes).numpy()
    code_lists = [codes[i, : lengths[i]].tolist() for i in range(n)]
    return code_lists, lengths, {"rows_added": added, "codebook_sizes": tokenizer.sizes}
