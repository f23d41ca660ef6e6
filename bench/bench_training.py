"""RQ-VAE epoch time: our components.tokenizers.rqvae against vector-quantize-pytorch's ResidualVQ.

Same sizes on both sides: 384 -> MLP [256, 128] -> 64-dim latent, codebooks (64, 128, 256),
batch 256, Adam lr 1e-3, beta 0.25, on synthetic clustered embeddings (bench.common).
Rows:
  ours/lightning  components.tokenizers.rqvae.fit: the tokenizer as the pipeline trains it (Lightning,
                  dead-code re-seeding, epoch-end bookkeeping);
  ours/plain      the same RQVAE.losses in a bare PyTorch loop (isolates Lightning overhead);
  vqtorch         the same MLPs around vector_quantize_pytorch.ResidualVQ (its default EMA
                  codebooks, k-means init, dead-code replacement) in a bare PyTorch loop.
The three run round-robin, epoch by epoch (load swings hit all alike); epoch time = median
over the timed epochs after one warm-up epoch (which holds vector-quantize-pytorch's k-means init).

    .venv/bin/python bench/bench_training.py [--n 30000] [--epochs 3] [--threads 1]
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Iterator

import torch
from common import clustered_embeddings, print_table, set_threads, stats, write_result
from torch import nn

SIZES = (64, 128, 256)
HIDDEN = [256, 128]
LATENT = 64
BATCH = 256
LR = 1e-3
BETA = 0.25


def _batches(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return list(torch.randperm(n, generator=g).split(BATCH))


def ours_model(x: torch.Tensor, seed: int, cls: type | None = None) -> nn.Module:
    """Our RQVAE (or a subclass), k-means initialised from the encoded data as the pipeline does."""
    from components.tokenizers.quantizer import ResidualQuantizer, init_rows_kmeans
    from components.tokenizers.rqvae import RQVAE, TrainSpec

    torch.manual_seed(seed)
    model = (cls or RQVAE)(x.shape[1], HIDDEN, LATENT, ResidualQuantizer(list(SIZES), LATENT))
    model.spec = TrainSpec(epochs=1, batch_size=BATCH, lr=LR, beta=BETA, reseed_every=5, seed=seed)
    with torch.no_grad():
        init_rows_kmeans(model.quantizer, model.encoder(x), seed=seed, niter=10)
    return model


def epochs_ours_lightning(x: torch.Tensor, seed: int) -> Iterator[float]:
    """Per-epoch wall times of components.tokenizers.rqvae.fit (one fit call per epoch, timed by the
    epoch hooks, so the trainer's start-up is not counted)."""
    from components.tokenizers.rqvae import RQVAE, TrainSpec, fit

    marks: list[float] = []

    class Timed(RQVAE):
        def on_train_epoch_start(self) -> None:
            marks.append(time.perf_counter())
            super().on_train_epoch_start()

        def on_train_epoch_end(self) -> None:
            super().on_train_epoch_end()
            marks.append(time.perf_counter())

    model = ours_model(x, seed, Timed)
    epoch = 0
    while True:
        spec = TrainSpec(epochs=1, batch_size=BATCH, lr=LR, beta=BETA, reseed_every=5, seed=seed + epoch)
        fit(model, x, spec, sarq=None, init_kmeans=False, progress=False)
        model.train()
        epoch += 1
        yield marks[-1] - marks[-2]


def _plain_epochs(model: nn.Module, loss_fn, x: torch.Tensor, seed: int) -> Iterator[float]:
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=LR)
    epoch = 0
    while True:
        t0 = time.perf_counter()
        for idx in _batches(len(x), seed + epoch):
            loss = loss_fn(x[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        epoch += 1
        yield time.perf_counter() - t0


def epochs_ours_plain(x: torch.Tensor, seed: int) -> Iterator[float]:
    """RQVAE.losses in a bare loop: the model's own cost without the trainer."""
    model = ours_model(x, seed)
    return _plain_epochs(model, lambda b: model.losses(b)["loss"], x, seed)


class VQTorchRQVAE(nn.Module):
    """The same MLP encoder / decoder around vector-quantize-pytorch's ResidualVQ."""

    def __init__(self, in_dim: int):
        super().__init__()
        from vector_quantize_pytorch import ResidualVQ

        from components.tokenizers.rqvae import mlp

        self.encoder = mlp([in_dim, *HIDDEN, LATENT])
        self.decoder = mlp([LATENT, *reversed(HIDDEN), in_dim])
        self.rvq = ResidualVQ(dim=LATENT, codebook_size=SIZES, kmeans_init=True, kmeans_iters=10,
                              threshold_ema_dead_code=2, commitment_weight=BETA)

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        z = self.encoder(x)
        z_hat, _codes, commit = self.rvq(z)
        return ((x - self.decoder(z_hat)) ** 2).sum(1).mean() + commit.sum()


def epochs_vqtorch(x: torch.Tensor, seed: int) -> Iterator[float]:
    torch.manual_seed(seed)
    model = VQTorchRQVAE(x.shape[1])
    return _plain_epochs(model, model.loss, x, seed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=30_000, help="synthetic training items")
    ap.add_argument("--epochs", type=int, default=3, help="timed epochs per method (after 1 warm-up)")
    ap.add_argument("--threads", type=int, default=1, help="1 by default: on a shared, overloaded 2-core box two OpenMP threads spin against each other (50x slower)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    set_threads(args.threads)
    x = torch.from_numpy(clustered_embeddings(args.n, seed=args.seed))
    runs = {"vqtorch": epochs_vqtorch(x, args.seed), "ours/plain": epochs_ours_plain(x, args.seed),
            "ours/lightning": epochs_ours_lightning(x, args.seed)}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for epoch in range(args.epochs + 1):       # round-robin, epoch by epoch; epoch 0 is warm-up
        for name, it in runs.items():
            t = next(it)
            print(f"  epoch {epoch} {name}: {t:.2f}s", flush=True)
            if epoch > 0:
                times[name].append(t)
    rows = []
    for name, ts in times.items():
        s = stats(ts)
        rows.append({"method": name, "epoch_s_p50": s["p50"], "epoch_s_min": s["min"], "epochs": s["n"],
                     "items_per_s": args.n / s["p50"]})
    peer = rows[0]["epoch_s_p50"]
    for r in rows:
        r["speedup_vs_vqtorch"] = peer / r["epoch_s_p50"]
    cols = ["method", "epoch_s_p50", "epoch_s_min", "items_per_s", "speedup_vs_vqtorch", "epochs"]
    print_table(rows, cols, f"RQ-VAE epoch time, {args.n} synthetic items, batch {BATCH}, {args.threads} threads")
    path = write_result("training", {"config": {**vars(args), "sizes": SIZES, "hidden": HIDDEN, "latent": LATENT,
                                                "batch": BATCH, "data": "synthetic clustered (bench.common)"},
                                     "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
