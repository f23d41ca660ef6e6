"""RQ-VAE (TIGER) as a Lightning module, with SARQ depth masks and ACRQ frozen parts.

One class serves every trained tokenizer stage: one-stage RQ-VAE / SARQ on all items,
ACRQ Stage 1 on head items and Stage 2 on tail items (encoder and decoder frozen, anchors
frozen, only extension rows train). Losses sum only up to each item's depth L(i).

Training is Lightning's: a DataModule gives seeded shuffled batches of training-item indices,
dead-code re-seeding and SARQ path-table re-estimation are callbacks (`ReseedDeadCodes`,
`ReestimatePathTable`) at each epoch's end, and the epoch's mean losses go to the loggers
(CSV under out_dir, W&B unless disabled) and to `TrainSpec.history`. The accelerator is a
param (`tokenizer.accelerator`, default auto); the item vectors follow the model's device.

`fit(..., recon_x=...)` (ACRQ Stage 1 with `tokenizer.head_encoder: all`): the steps are
those of head-only training (same head batches, same epochs), and each step adds a plain
autoencoder loss ||x - D(E(x))||^2 over one slice of a shuffled pass over `recon_x` (all
items; one pass per epoch). Encoder and decoder learn every item's text; the codebooks
(k-means init, codebook loss, commitment, dead-row re-seeding, path table) see head items only.
"""
from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass, field

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from components.runtime.divergence import StopOnDivergence
from components.runtime.train_loggers import line_progress
from components.tokenizers.quantizer import ResidualQuantizer, depth_mask, init_rows_kmeans, reseed_dead_rows, rq_losses
from components.tokenizers.sarq import PathTable, choose_tau, stop_depths

KMEANS_SAMPLE = 65536  # items encoded for the k-means init of the codebooks (all, for catalogs this small)


def mlp(dims: list[int]) -> nn.Sequential:
    """Linear layers with ReLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


@dataclass
class SarqSpec:
    """Adaptive depth: tau / L_min / L_max, and how the path table is (re-)estimated."""

    tau: float
    min_len: int
    max_len: int
    smoothing: float
    warmup_epochs: int = 0
    reestimate_every: int = 1
    weights: Tensor | None = None      # per training item, for the table
    frozen_table: PathTable | None = None  # Stage 2: the head table, never re-estimated
    target_items_per_sid: float | None = None  # tau: auto; tau is re-chosen at each estimation
    tau_items: Tensor | None = None  # tau: auto: items whose SIDs meet the target (default: the training items)


@dataclass
class TrainSpec:
    epochs: int
    batch_size: int
    lr: float
    beta: float
    reseed_every: int
    seed: int
    kmeans_iters: int = 20
    accelerator: str = "auto"
    history: list[dict] = field(default_factory=list)


class RQVAE(L.LightningModule):
    """Encoder MLP -> residual quantizer -> decoder MLP, trained with STE."""

    def __init__(self, in_dim: int, hidden_dims: list[int], latent_dim: int, quantizer: ResidualQuantizer):
        super().__init__()
        self.save_hyperparameters(ignore=["quantizer"])
        self.in_dim, self.hidden_dims, self.latent_dim = int(in_dim), list(hidden_dims), int(latent_dim)
        self.encoder = mlp([self.in_dim, *self.hidden_dims, self.latent_dim])
        self.decoder = mlp([self.latent_dim, *reversed(self.hidden_dims), self.in_dim])
        self.quantizer = quantizer
        self.spec: TrainSpec | None = None
        self.sarq: SarqSpec | None = None
        self.table: PathTable | None = None
        self.train_x: Tensor | None = None
        self.recon_x: Tensor | None = None          # head_encoder=all: reconstruction-only items
        self._recon_gen: torch.Generator | None = None
        self._recon_slices: tuple[Tensor, ...] = ()
        self._epoch_sums: dict[str, float] = {}
        self.epoch_notes: dict = {}   # what this epoch's callbacks did (re-seeded rows), for the history row

    # ---- depth -------------------------------------------------------------------------
    def depths(self, codes: Tensor) -> Tensor:
        """L(i) from the current path table; full depth without SARQ or before warm-up ends."""
        full = torch.full((codes.shape[0],), codes.shape[1], dtype=torch.int64, device=codes.device)
        if self.sarq is None or self.table is None:
            return full
        info = self.table.information(codes.cpu())
        return stop_depths(info, self.sarq.tau, self.sarq.min_len, self.sarq.max_len).to(codes.device)

    # ---- forward / loss ----------------------------------------------------------------
    def losses(self, x: Tensor) -> dict[str, Tensor]:
        z = self.encoder(x)
        out = self.quantizer(z)
        mask = depth_mask(self.depths(out.codes), self.quantizer.n_layers)
        z_hat, codebook, commit = rq_losses(out, z, mask, self.spec.beta if self.spec else 0.25)
        recon = ((x - self.decoder(z_hat)) ** 2).sum(1).mean()
        return {"loss": recon + codebook + commit, "recon": recon, "codebook": codebook, "commit": commit}

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        parts = self.losses(self.train_x[batch[0]])
        if self.recon_x is not None:
            xa = self.recon_x[self._recon_slices[batch_idx % len(self._recon_slices)]]
            parts["recon_all"] = ((xa - self.decoder(self.encoder(xa))) ** 2).sum(1).mean()
            parts["loss"] = parts["loss"] + parts["recon_all"]
        n = batch[0].numel()
        for key, value in parts.items():
            self._epoch_sums[key] = self._epoch_sums.get(key, 0.0) + float(value.detach()) * n
        self._epoch_sums["n"] = self._epoch_sums.get("n", 0.0) + n
        self.log("loss", parts["loss"], prog_bar=True, on_step=True, on_epoch=False)
        return parts["loss"]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.Adam(params, lr=self.spec.lr)

    # ---- epoch end: dead codes, path tables ----------------------------------------------
    @torch.no_grad()
    def full_pass(self):
        out = self.quantizer(self.encoder(self.train_x))
        return out, depth_mask(self.depths(out.codes), self.quantizer.n_layers)

    def on_fit_start(self) -> None:
        """The item vectors go where the model is (a no-op on the CPU)."""
        self.train_x = self.train_x.to(self.device)
        if self.recon_x is not None:
            self.recon_x = self.recon_x.to(self.device)

    def on_train_epoch_start(self) -> None:
        self._epoch_sums, self.epoch_notes = {}, {}
        if self.recon_x is not None:  # this epoch's pass over all items, one slice per head step
            steps = max(1, math.ceil(len(self.train_x) / self.spec.batch_size))
            order = torch.randperm(len(self.recon_x), generator=self._recon_gen).to(self.device)
            self._recon_slices = order.tensor_split(min(steps, len(order)))

    @torch.no_grad()
    def on_train_epoch_end(self) -> None:
        """The epoch's mean losses (and what the callbacks did, which run before this hook) as
        one history row; the losses also go to the loggers."""
        epoch = self.current_epoch + 1
        n = max(self._epoch_sums.pop("n", 1.0), 1.0)
        means = {k: v / n for k, v in self._epoch_sums.items()}
        self.spec.history.append({"epoch": epoch, **means, **self.epoch_notes})
        self.log_dict({f"epoch_{k}": v for k, v in means.items()}, on_step=False, on_epoch=True)

    @torch.no_grad()
    def reestimate_table(self) -> None:
        """Path table from the full-depth codes of all training items (not their truncated SIDs);
        with `tau: auto`, tau is chosen again for the new table, on the items SIDs are meant for
        (Stage 1 trains on head items, but its tau also decides the tail's lengths)."""
        codes = self.quantizer(self.encoder(self.train_x)).codes.cpu()
        self.table = PathTable.build(codes, self.quantizer.sizes, self.sarq.smoothing, self.sarq.weights)
        if self.sarq.target_items_per_sid is not None:
            if self.sarq.tau_items is not None:
                codes = self.quantizer(self.encoder(self.sarq.tau_items.float().to(self.train_x.device))).codes.cpu()
            self.sarq.tau = choose_tau(self.table.information(codes), codes, self.sarq.target_items_per_sid,
                                       self.sarq.min_len, self.sarq.max_len)

    # ---- persistence ---------------------------------------------------------------------
    def state(self) -> dict:
        return {"in_dim": self.in_dim, "hidden_dims": self.hidden_dims, "latent_dim": self.latent_dim,
                "encoder": {k: v.detach().clone() for k, v in self.encoder.state_dict().items()},
                "decoder": {k: v.detach().clone() for k, v in self.decoder.state_dict().items()},
                "quantizer": self.quantizer.state()}

    @classmethod
    def from_state(cls, state: dict) -> RQVAE:
        model = cls(state["in_dim"], state["hidden_dims"], state["latent_dim"],
                    ResidualQuantizer.from_state(state["quantizer"]))
        model.encoder.load_state_dict(state["encoder"])
        model.decoder.load_state_dict(state["decoder"])
        return model


class ReseedDeadCodes(Callback):
    """Every `every` epochs but the last, move trainable codebook rows no item used onto the
    residuals their codes serve worst (quantizer.reseed_dead_rows); the counts per layer go
    to the epoch's history row."""

    def __init__(self, every: int):
        self.every = every

    @torch.no_grad()
    def on_train_epoch_end(self, trainer: L.Trainer, model: RQVAE) -> None:
        epoch = trainer.current_epoch + 1
        if epoch % self.every == 0 and epoch < trainer.max_epochs:
            out, mask = model.full_pass()
            model.epoch_notes["reseeded"] = reseed_dead_rows(model.quantizer, out, mask)


class ReestimatePathTable(Callback):
    """SARQ: after `warmup_epochs`, every `reestimate_every` epochs, estimate the path table
    (and, with tau: auto, tau) again from the current codes (runs after ReseedDeadCodes)."""

    def __init__(self, warmup_epochs: int, every: int):
        self.warmup_epochs, self.every = warmup_epochs, max(1, every)

    def on_train_epoch_end(self, trainer: L.Trainer, model: RQVAE) -> None:
        epoch = trainer.current_epoch + 1
        if epoch >= self.warmup_epochs and (epoch - self.warmup_epochs) % self.every == 0:
            model.reestimate_table()


class TokenizerData(L.LightningDataModule):
    """Training-item indices in a shuffled order drawn from the seed (the model indexes its vectors)."""

    def __init__(self, n_items: int, batch_size: int, seed: int):
        super().__init__()
        self.n_items, self.batch_size, self.seed = n_items, batch_size, seed

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.arange(self.n_items)), batch_size=self.batch_size, shuffle=True,
                          generator=torch.Generator().manual_seed(self.seed))


def _quiet_lightning() -> None:
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")


def fit(model: RQVAE, x: Tensor, spec: TrainSpec, sarq: SarqSpec | None, init_kmeans: bool,
        progress: bool = True, recon_x: Tensor | None = None, loggers: list[Logger] | None = None) -> dict:
    """Train `model` on x (rows = training items) on `spec.accelerator`; returns a summary with
    the loss history.

    k-means initialises the trainable codebook rows from an encoded sample first; with SARQ
    the path table is re-estimated on schedule (or stays the frozen one given) and is
    re-estimated once more at the end, then frozen in `model.table`. `recon_x`: items whose
    reconstruction the encoder and decoder also learn, without the quantizer (module docstring)."""
    _quiet_lightning()
    L.seed_everything(spec.seed, workers=True, verbose=False)
    model.spec, model.sarq, model.train_x = spec, sarq, x.float()
    model.recon_x = None if recon_x is None or len(recon_x) == 0 else recon_x.float()
    model._recon_gen = torch.Generator().manual_seed(spec.seed + 1)
    model.table = sarq.frozen_table if sarq is not None else None
    if init_kmeans:
        sample = torch.randperm(len(x), generator=torch.Generator().manual_seed(spec.seed))[:KMEANS_SAMPLE]
        with torch.no_grad():
            init_rows_kmeans(model.quantizer, model.encoder(model.train_x[sample.sort().values]),
                             seed=spec.seed, niter=spec.kmeans_iters)
    start = time.perf_counter()
    if spec.epochs > 0 and len(x) > 0:
        # first: re-seeding and the path table must not run on a diverged model
        callbacks: list[Callback] = [StopOnDivergence("tokenizer training", "tokenizer.lr")]
        if spec.reseed_every > 0:
            callbacks.append(ReseedDeadCodes(spec.reseed_every))
        if sarq is not None and sarq.frozen_table is None:
            callbacks.append(ReestimatePathTable(sarq.warmup_epochs, sarq.reestimate_every))
        callbacks += line_progress(progress)
        was_deterministic = torch.are_deterministic_algorithms_enabled()
        try:
            trainer = L.Trainer(max_epochs=spec.epochs, accelerator=spec.accelerator, devices=1,
                                logger=loggers or False, callbacks=callbacks, enable_checkpointing=False,
                                enable_model_summary=False, deterministic=True, enable_progress_bar=progress,
                                num_sanity_val_steps=0)
            trainer.fit(model, datamodule=TokenizerData(len(x), spec.batch_size, spec.seed))
        finally:  # Lightning sets the flag process-wide; a later GPU step in the same process must not inherit it
            torch.use_deterministic_algorithms(was_deterministic)
        model.cpu()
        model.train_x = x.float()
    if sarq is not None and sarq.frozen_table is None:
        model.reestimate_table()
    model.train_x = model.recon_x = model._recon_gen = None
    model._recon_slices = ()
    model.eval()
    return {"epochs": spec.epochs, "wall_s": round(time.perf_counter() - start, 2),
            "final": spec.history[-1] if spec.history else {}}
