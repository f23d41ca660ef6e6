"""Shared benchmark plumbing: thread pinning, timing with medians, peak memory, synthetic data, JSON.

The machines are shared and noisy, so every benchmark times peers and ours in the same process
with warm-up and several repetitions, and reports medians and ratios rather than single runs.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def set_threads(n: int) -> None:
    """Pin torch / BLAS / faiss to n threads so peer and ours compete on equal terms."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)
    import torch

    torch.set_num_threads(n)
    try:
        import faiss

        faiss.omp_set_num_threads(n)
    except ImportError:
        pass


def time_reps(fn: Callable[[], Any], reps: int = 5, warmup: int = 1) -> list[float]:
    """Wall seconds of `reps` calls of fn after `warmup` discarded calls."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def stats(xs: Sequence[float]) -> dict[str, float]:
    """Median, p99, min and count of a sample of timings (seconds)."""
    a = np.asarray(xs, dtype=float)
    return {"p50": float(np.median(a)), "p99": float(np.percentile(a, 99)), "min": float(a.min()), "n": int(a.size)}


def loglog_slope(sizes: Sequence[float], values: Sequence[float]) -> float:
    """Growth exponent: least-squares slope of log(value) on log(size)."""
    x, y = np.log(np.asarray(sizes, float)), np.log(np.asarray(values, float))
    return float(np.polyfit(x, y, 1)[0])


def rss_kb() -> tuple[int, int]:
    """(current RSS, peak RSS since the last reset) in KiB, from /proc/self/status."""
    cur = peak = 0
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                cur = int(line.split()[1])
            elif line.startswith("VmHWM:"):
                peak = int(line.split()[1])
    return cur, peak


def reset_peak_rss() -> None:
    """Reset the kernel's high-water RSS mark so the next peak belongs to the code measured."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def measure_peak(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """Run fn once; return (result, seconds, peak RSS above the pre-call RSS in MiB)."""
    reset_peak_rss()
    before, _ = rss_kb()
    t0 = time.perf_counter()
    result = fn()
    secs = time.perf_counter() - t0
    _, peak = rss_kb()
    return result, secs, max(0, peak - before) / 1024.0


def run_json_subprocess(args: list[str], timeout: float = 600) -> dict:
    """Run `python <args>` in a fresh process (clean allocator, own peak RSS); parse its last stdout line as JSON."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"subprocess {args} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def clustered_embeddings(
    n: int,
    d: int = 384,
    seed: int = 0,
    n_topics: int = 32,
    zipf_a: float = 1.2,
    centre_spread: float = 1.0,
    item_spread: float = 0.7,
    chunk: int = 100_000,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Synthetic L2-normalised float32 embeddings with long-tail cluster sizes (not real data).

    Two levels, like real catalogs: `n_topics` topic centres, each with sub-cluster centres
    around it; sub-cluster sizes follow a Zipf law (a few huge clusters, a long tail of tiny
    ones). `centre_spread` / `item_spread` are the noise norms relative to the unit topic /
    centre vectors (defaults: nearest-neighbour cosine about 0.7, mean cosine about 0.06; roughly
    like MiniLM on product text). Generated in float32 chunks so 1M x 384 fits in about 1.5 GiB. `out` may be a
    preallocated (n, d) float32 array or memmap.
    """
    rng = np.random.default_rng(seed)
    n_clusters = max(n_topics, n // 100)
    topics = rng.standard_normal((n_topics, d)).astype(np.float32)
    topics /= np.linalg.norm(topics, axis=1, keepdims=True)
    parent = rng.integers(0, n_topics, n_clusters)
    centres = topics[parent] + centre_spread / np.sqrt(d) * rng.standard_normal((n_clusters, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    weights = 1.0 / np.arange(1, n_clusters + 1) ** zipf_a
    weights /= weights.sum()
    x = out if out is not None else np.empty((n, d), dtype=np.float32)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        ids = rng.choice(n_clusters, size=m, p=weights)
        block = centres[ids] + rng.standard_normal((m, d), dtype=np.float32) * np.float32(item_spread / np.sqrt(d))
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        x[start : start + m] = block
    return x


def synthetic_sid_table(
    n_items: int,
    codebook_sizes: Sequence[int] = (64, 128, 256),
    length_probs: Sequence[float] = (0.05, 0.35, 0.60),
    seed: int = 0,
    zipf_a: float = 1.1,
) -> list[tuple[int, ...]]:
    """Variable-length SIDs shaped like SARQ output (synthetic): Zipf-skewed codes per layer,
    children of each prefix permuted by a prefix hash, lengths drawn from `length_probs`."""
    rng = np.random.default_rng(seed)
    n_layers = len(codebook_sizes)
    lengths = rng.choice(np.arange(1, n_layers + 1), size=n_items, p=np.asarray(length_probs) / np.sum(length_probs))
    codes = np.zeros((n_items, n_layers), dtype=np.int64)
    prefix_hash = np.zeros(n_items, dtype=np.int64)
    for layer, k in enumerate(codebook_sizes):
        w = 1.0 / np.arange(1, k + 1) ** zipf_a
        rank = rng.choice(k, size=n_items, p=w / w.sum())
        codes[:, layer] = (rank + prefix_hash * 7919) % k
        prefix_hash = (prefix_hash * 1_000_003 + codes[:, layer] + 1) % (2**31 - 1)
    return [tuple(int(c) for c in codes[i, : lengths[i]]) for i in range(n_items)]


def load_real_sid_table() -> tuple[list[tuple[int, ...]], tuple[int, ...]] | None:
    """The pipeline's outputs/sids/sid_table.parquet as code tuples, with meta.json's per-layer
    codebook sizes (extensions included); None when the pipeline has not written them."""
    sids_dir = ROOT / "outputs" / "sids"
    if not (sids_dir / "sid_table.parquet").exists() or not (sids_dir / "meta.json").exists():
        return None
    import pandas as pd

    df = pd.read_parquet(sids_dir / "sid_table.parquet")
    meta = json.loads((sids_dir / "meta.json").read_text())
    sizes = tuple(int(k) for k in meta["codebook_sizes"][: int(meta["max_len"])])
    return [tuple(int(c) for c in codes[:length]) for codes, length in zip(df["codes"], df["length"])], sizes


def environment() -> dict[str, Any]:
    """What the figures depend on: host, cores, library versions, commit."""
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "numpy": np.__version__,
    }
    try:
        import faiss

        info["faiss"] = faiss.__version__
    except ImportError:
        pass
    try:
        info["commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT, timeout=10
        ).stdout.strip()
    except OSError:
        pass
    return info


def write_result(name: str, payload: dict[str, Any]) -> Path:
    """Write bench/results/<name>.json atomically with a timestamp, the command and the environment."""
    from components.runtime.atomic import write_json

    doc = {
        "benchmark": name,
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "environment": environment(),
        **payload,
    }
    path = RESULTS / f"{name}.json"
    write_json(doc, path)
    return path


def print_table(rows: Iterable[dict[str, Any]], columns: Sequence[str], title: str = "") -> None:
    """Print rows as a fixed-width text table (floats to 4 significant digits)."""
    rows = list(rows)

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    if title:
        print(f"\n{title}")
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def synthetic_popularity(n: int, seed: int = 0) -> np.ndarray:
    """Long-tail interaction counts: floor(lognormal(0, 1.5)); about 50% of items are cold and
    with head_share 0.5 about 5% are head (enough head items to train Stage 1 on a sample)."""
    return np.floor(np.random.default_rng(seed).lognormal(0.0, 1.5, size=n)).astype(np.int64)


def train_tokenizer(method: str, x: np.ndarray, workdir: Path, seed: int = 0, epochs: int = 3,
                    overrides: Sequence[str] = ()) -> Path:
    """Train a tokenizer through the pipeline's own steps (train_head, train_tail) on synthetic
    items in `workdir`, and save it with save_tokenizer; returns the file (load_tokenizer reads it).

    Sizes and the SARQ settings come from params.yaml; only the epochs are cut for benchmarking."""
    import pandas as pd

    from components.data.prepare import label_groups
    from components.pipeline.stages import get_step
    from components.runtime.atomic import write_npy, write_parquet
    from components.runtime.config import load_params
    from components.tokenizers.sid_tokenizer import load_tokenizer, save_tokenizer

    params = load_params(ROOT / "params.yaml", [
        f"out_dir={workdir}", f"seed={seed}", f"tokenizer.method={method}", f"tokenizer.epochs_head={epochs}",
        f"tokenizer.epochs_tail={epochs}", f"tokenizer.epochs_full={epochs}", "tokenizer.sarq.warmup_epochs=1",
        *overrides])
    pop = synthetic_popularity(len(x), seed)
    items = pd.DataFrame({"item_id": [f"i{i}" for i in range(len(x))], "text": "synthetic", "popularity": pop,
                          "group": label_groups(pop, float(params["data"]["head_share"]))})
    write_parquet(items, Path(workdir) / "prepared" / "items.parquet")
    write_npy(np.ascontiguousarray(x, dtype=np.float32), Path(workdir) / "embeddings" / "items.npy")
    get_step("train_head")(params)
    get_step("train_tail")(params)
    path = Path(workdir) / f"tokenizer_{method}.pt"
    save_tokenizer(load_tokenizer(params), path)
    return path


TRAIN_SEED_OFFSET = 100   # the tokenizers' training sample is drawn apart from the benchmark data


def cached_tokenizer(workdir: Path, method: str, seed: int, epochs: int) -> Path:
    """workdir/tokenizer_<method>.pt, trained on a 20k synthetic sample the first time it is asked for."""
    import tempfile

    path = Path(workdir) / f"tokenizer_{method}_s{seed}_e{epochs}.pt"
    if not path.exists():
        sample = clustered_embeddings(20_000, seed=seed + TRAIN_SEED_OFFSET)
        with tempfile.TemporaryDirectory(dir=workdir) as tmp:
            train_tokenizer(method, sample, Path(tmp), seed=seed, epochs=epochs).rename(path)
    return path


def data_file(workdir: Path, n: int, seed: int) -> Path:
    """Synthetic embeddings for n rows as a float32 .npy in workdir (generated once, in chunks,
    straight to disk, so 1M rows never need two copies in memory)."""
    path = Path(workdir) / f"emb_{n}_s{seed}.npy"
    if not path.exists():
        tmp = path.with_name(path.stem + ".partial.npy")
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, 384))
        clustered_embeddings(n, seed=seed, out=out)
        out.flush()
        del out
        tmp.rename(path)
    return path
