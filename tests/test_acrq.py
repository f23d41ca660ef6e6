"""ACRQ: curriculum check, frozen anchors, stable head SIDs, growth for new items."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from tokenizer_fixtures import make_catalog, run_tokenizer, tiny_params

from components.runtime.errors import ConfigError
from components.tokenizers.acrq import anchored_model
from components.tokenizers.quantizer import ResidualQuantizer, init_rows_kmeans
from components.tokenizers.rqvae import RQVAE, TrainSpec, fit
from components.tokenizers.sid_tokenizer import Tokenizer, assign_new_items, load_checkpoint, load_tokenizer
from components.tokenizers.tokenizer_stages import tokenizer_config


@pytest.mark.parametrize("method", ["acrq", "sa2crq"])
def test_decreasing_codebook_sizes_rejected(tmp_path, method):
    with pytest.raises(ConfigError, match="tokenizer.codebook_sizes") as exc:
        tiny_params(tmp_path, method, "tokenizer.codebook_sizes=[8,4,8]")
    assert exc.value.key == "tokenizer.codebook_sizes"
    # one-stage methods have no curriculum
    assert tokenizer_config(tiny_params(tmp_path, "rqvae", "tokenizer.codebook_sizes=[8,4,8]")).sizes == [8, 4, 8]


def test_extension_sizes_need_one_entry_per_layer(tmp_path):
    with pytest.raises(ConfigError, match="tokenizer.extension_sizes"):
        tiny_params(tmp_path, "acrq", "tokenizer.extension_sizes=[2,2]")


def test_stage2_keeps_anchor_rows_bit_identical_and_moves_extensions():
    torch.manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(120, 12), dim=1)
    head = RQVAE(12, [16], 6, ResidualQuantizer([4, 8], 6))
    fit(head, x[:40], TrainSpec(epochs=2, batch_size=16, lr=1e-2, beta=0.25, reseed_every=1, seed=0), None,
        init_kmeans=True, progress=False)
    model = anchored_model(head, [3, 3])
    with torch.no_grad():
        init_rows_kmeans(model.quantizer, model.encoder(x[40:]), seed=0, niter=5)
    ext_before = [e.detach().clone() for e in model.quantizer.ext]
    enc_before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    fit(model, x[40:], TrainSpec(epochs=3, batch_size=16, lr=1e-2, beta=0.25, reseed_every=1, seed=0), None,
        init_kmeans=False, progress=False)
    for layer in range(2):
        assert torch.equal(model.quantizer.anchor(layer), head.quantizer.codebook(layer).detach())
        assert not torch.equal(model.quantizer.ext[layer].detach(), ext_before[layer])
    assert all(torch.equal(v, enc_before[k]) for k, v in model.encoder.state_dict().items())
    assert model.quantizer.sizes == [7, 11]


@pytest.fixture(scope="module")
def sa2crq_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sa2crq")
    items, x = make_catalog(out)
    params = tiny_params(out, "sa2crq")
    table = run_tokenizer(params)
    return params, items, x, table


def test_head_sids_identical_before_and_after_stage2(sa2crq_run):
    params, items, x, table = sa2crq_run
    head_ckpt = load_checkpoint(f"{params['out_dir']}/tokenizer/head.pt")
    stage1 = Tokenizer.from_state(head_ckpt["tokenizer"])
    is_head = (items["group"] == "head").to_numpy()
    codes, lengths = stage1.assign(x[is_head])
    issued = head_ckpt["issued"]
    # Stage 1 issues its own codes; unique_head may only lengthen them
    assert np.array_equal(issued["codes"].numpy(), codes) and (issued["lengths"].numpy() >= lengths).all()
    expected = [c[:n].tolist() for c, n in zip(codes, issued["lengths"].numpy())]
    got = table.loc[is_head, "codes"].tolist()
    assert got == expected
    assert set(table.loc[is_head, "stage"]) == {"head"} and set(table.loc[~is_head, "stage"]) == {"tail"}
    # head codes index anchor rows only; some tail item uses an extension row
    tail_tok = load_tokenizer(params)
    anchors = tail_tok.anchor_sizes
    assert all(c < anchors[l] for row in got for l, c in enumerate(row))
    assert any(c >= anchors[l] for row in table.loc[~is_head, "codes"] for l, c in enumerate(row))
    # and the Stage-2 tokenizer has the same anchors as Stage 1's codebooks
    for layer in range(3):
        assert torch.equal(tail_tok.quantizer.anchor(layer), stage1.quantizer.codebook(layer).detach())


def test_new_items_grow_extension_rows_only_when_far(sa2crq_run):
    params, items, x, table = sa2crq_run
    tok = load_tokenizer(params)
    sizes = list(tok.sizes)
    anchors = [tok.quantizer.anchor(layer).clone() for layer in range(3)]
    near = x[:5]
    codes_near, _, grown = assign_new_items(tok, near, grow_threshold=1e6)
    assert grown["rows_added"] == [0, 0, 0] and tok.sizes == sizes
    rng = np.random.default_rng(1)
    far = (rng.normal(size=(3, x.shape[1])) * 50).astype(np.float32)
    codes_far, lengths, grown = assign_new_items(tok, far, grow_threshold=1e-3)
    assert grown["rows_added"][0] >= 1 and tok.sizes[0] == sizes[0] + grown["rows_added"][0]
    assert all(c[0] >= sizes[0] for c in codes_far)
    assert all(len(c) == n for c, n in zip(codes_far, lengths))
    for layer in range(3):
        assert torch.equal(tok.quantizer.anchor(layer), anchors[layer])
    # items encoded before the growth keep their codes
    again, _, _ = assign_new_items(tok, near, grow_threshold=None)
    assert again == codes_near
