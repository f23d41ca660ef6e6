"""embed.backend (issue 24): the ONNX Runtime backends agree with sentence-transformers fp32, a text's ONNX
vector never depends on its batch, the vector cache never serves one backend's vector to another, the
export is made once, and a bad backend is one line naming the key.

The fast tests use the machine's exported models (~/.cache/sa2crq, made on first use: about 10 s once)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT

import components.data.embed as embed
from components.data.embed import BACKENDS, DEFAULT_BACKEND, MODEL_NAME, encode_texts, load_encoder, run_embed
from components.data.embed_cache import EmbedCache
from components.data.prepare import run_prepare
from components.runtime.config import load_params
from components.runtime.config_schema import typed_params
from components.runtime.errors import ConfigError
from flows.retrain_flow import torch_threads
from sa2crq.cli import main

PARAMS = str(ROOT / "params.yaml")
TEXTS = ["Cordless drill with two 18 V batteries and a charger. Brand: Voltix. Categories: Tools, Power Drills",
         "Nitrile lab gloves, powder free, size M, box of 100. Categories: Lab Supplies, Gloves",
         "A digital caliper, 150 mm, stainless steel, with a large LCD display",
         "Heavy duty staples for a staple gun, 1/4 inch, 1000 count"]


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", a.astype(np.float64), b.astype(np.float64))


@pytest.fixture(scope="module")
def fp32() -> np.ndarray:
    return encode_texts(TEXTS, batch_size=2)


def test_onnx_backends_agree_with_torch_fp32(fp32):
    onnx, int8 = (encode_texts(TEXTS, backend=b) for b in ("onnx", "onnx-int8"))
    assert onnx.dtype == int8.dtype == np.float32 and onnx.shape == int8.shape == fp32.shape
    np.testing.assert_allclose(np.linalg.norm(int8, axis=1), 1.0, atol=1e-5)
    assert _cos(onnx, fp32).min() > 0.99999        # the same model: float rounding apart
    assert _cos(int8, fp32).min() >= 0.99          # int8 weights: close, not equal
    assert not np.allclose(int8, fp32, atol=1e-3)


@pytest.mark.parametrize("backend", ["onnx", "onnx-int8"])
def test_onnx_vector_of_a_text_does_not_depend_on_its_batch(backend):
    together = encode_texts(TEXTS, backend=backend)
    alone = np.concatenate([encode_texts([t], backend=backend) for t in reversed(TEXTS)])[::-1]
    assert np.array_equal(together, alone)
    with torch_threads(1):    # one worker or two: the same bytes
        assert np.array_equal(encode_texts(TEXTS, backend=backend), together)


def test_torch_backend_is_sentence_transformers_as_before(fp32):
    """The default backend's bytes are one SentenceTransformer.encode call's (it sorts by length itself)."""
    direct = load_encoder().encode(TEXTS, batch_size=2, normalize_embeddings=True, convert_to_numpy=True)
    assert np.array_equal(fp32, direct)


def test_schema_and_module_agree_on_the_backends():
    params = load_params(PARAMS)
    assert "backend" not in params["embed"]                      # not in params.yaml: no stage or run key moves
    assert typed_params(params).embed.backend == DEFAULT_BACKEND == "torch"
    for backend in BACKENDS:
        assert typed_params(load_params(PARAMS, [f"embed.backend={backend}"])).embed.backend == backend


def test_unknown_backend_is_one_line_naming_the_key(monkeypatch, capsys):
    monkeypatch.setattr("components.pipeline.stages.get_step", lambda name: pytest.fail("the step ran"))
    assert main(["stage", "embed", "--params", PARAMS, "-s", "embed.backend=onnx-fp16"]) == 2
    err = capsys.readouterr().err
    assert err == "sa2crq: error: params.yaml 'embed.backend': must be one of torch | onnx | onnx-int8, got 'onnx-fp16'\n"
    with pytest.raises(ConfigError, match=r"^params.yaml 'embed.backend': must be one of torch \| onnx \| onnx-int8"):
        encode_texts(TEXTS, backend="gpu")


def test_torch_cache_keys_are_unchanged_and_backends_key_apart(tmp_path):
    old = hashlib.sha256(json.dumps([MODEL_NAME, 1000, True, TEXTS[0]], ensure_ascii=False).encode()).hexdigest()
    keys = {b: EmbedCache(tmp_path, MODEL_NAME, 1000, True, 384, b).key(TEXTS[0])
            for b in (None, "onnx/r1", "onnx-int8/r1", "onnx-int8/r2")}
    assert keys[None] == old                 # existing torch caches stay valid
    assert len(set(keys.values())) == 4


def _catalog(root: Path, *extra: str) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    (root / "items.csv").write_text("item_id,text\n" + "".join(f"i{k},\"{t}\"\n" for k, t in enumerate(TEXTS)))
    (root / "q.csv").write_text("query_id,split,history,target\nq1,train,i0,i1\nq2,valid,i1,i2\nq3,test,i2,i3\n")
    params = load_params(ROOT / "params.yaml", [
        "dataset=generic", f"out_dir={root / 'out'}", "embed.batch_size=2",
        f"data.generic.items={root / 'items.csv'}", f"data.generic.queries={root / 'q.csv'}", *extra])
    run_prepare(params)
    return params


def test_cache_never_serves_one_backends_vectors_to_another(tmp_path, fp32):
    torch_params = _catalog(tmp_path)
    int8_params = _catalog(tmp_path, "embed.backend=onnx-int8")
    items = tmp_path / "out" / "embeddings" / "items.npy"
    assert run_embed(torch_params)["n_encoded"] == 4
    first = np.load(items)
    stats = run_embed(int8_params)          # same out_dir and cache folder, other backend: all encoded again
    assert stats["n_encoded"] == 4 and stats["n_cached"] == 0 and stats["backend"] == "onnx-int8"
    int8 = np.load(items)
    assert np.array_equal(int8, encode_texts(TEXTS, backend="onnx-int8"))
    assert run_embed(int8_params)["n_cached"] == 4 and np.array_equal(np.load(items), int8)
    again = run_embed(torch_params)
    assert again["n_cached"] == 4 and again["backend"] == "torch"
    assert np.array_equal(np.load(items), first)


@pytest.mark.slow
def test_export_happens_once_into_the_cache_folder(tmp_path, monkeypatch):
    """Written whole under SA2CRQ_CACHE_DIR (no temporaries left), keyed by weights and recipe, then reused."""
    monkeypatch.setenv(embed.CACHE_ENV, str(tmp_path))
    embed.onnx_session.cache_clear()
    try:
        path = embed.onnx_model_file("onnx-int8")
        assert path.parent.parent == tmp_path and embed.ONNX_RECIPE in path.parent.name
        assert embed.weights_digest()[:16] in path.parent.name
        assert sorted(p.name for p in path.parent.iterdir()) == ["model-fp32.onnx", "model-int8.onnx"]
        monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: pytest.fail("exported twice"))
        assert embed.onnx_model_file("onnx-int8") == path and embed.onnx_model_file("onnx") == path.parent / \
            "model-fp32.onnx"
        assert embed._encode_onnx(TEXTS[:1], "onnx-int8", show=False).shape == (1, 384)
    finally:
        embed.onnx_session.cache_clear()      # later tests load the machine's models again
