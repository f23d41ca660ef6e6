"""Ranked retrieval with the trained generative retriever.

`generate` decodes each query into B SIDs (constrained by the trie of issued SIDs, or
unconstrained to measure hallucination). `retrieve` expands every decoded SID into all the
items that share it, giving the ranked-results frame of docs/ARCHITECTURE.md; the number
of items per query is Ret-Per. Inside one SID, items follow `eval.group_order`: popularity
(desc, then item_id; the contract's default) or similarity (cosine between the query's
vector and the item embedding, which lets tail and cold items of a shared SID rise).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from components.ranking.bm25 import Bm25Index, bm25_query_texts
from components.retrieval.fusion import Ranked, dense_ranking, fuse
from components.retrieval.rankings import group_orders
from components.retrieval.rankings import sources as fusion_sources
from components.retrieval.retriever import RetrieverModel, decode, load_retriever
from components.retrieval.retriever_data import (
    KIND_TEXT,
    BucketBatchSampler,
    ExampleDataset,
    RetrieverInputs,
    load_inputs,
    query_examples,
)
from components.runtime.errors import ConfigError, DataError
from components.runtime.paths import out_path
from components.tokenizers.sid_vocab import SidCatalog, sid_string

# A/B candidates (flows/candidates_flow.py, the service's request log): a ranked frame plus the variant
CANDIDATE_COLUMNS = ("query_id", "variant", "rank", "item_id", "score", "sid")


def _text_vectors(queries: pd.DataFrame, query_emb: np.ndarray, params: dict) -> tuple[np.ndarray, np.ndarray]:
    """Rows of text queries into a vector matrix: queries.npy rows, or fresh MiniLM encodings for
    text queries without an emb_row (new queries that the embed step never saw)."""
    text = queries["text"] if "text" in queries.columns else pd.Series([None] * len(queries), index=queries.index)
    has_text = text.notna().to_numpy() & (text.astype(str).str.strip() != "").to_numpy()
    hist_n = queries["history"].map(len).to_numpy() if "history" in queries.columns else np.zeros(len(queries), int)
    is_text = has_text & (hist_n == 0)
    emb_row = queries["emb_row"].to_numpy(dtype=np.int64) if "emb_row" in queries.columns \
        else np.full(len(queries), -1, np.int64)
    bad = is_text & (emb_row >= len(query_emb))
    if bad.any():
        raise DataError("prepared/queries.parquet", f"emb_row outside embeddings/queries.npy ({len(query_emb)} rows)",
                        column="emb_row", rows=np.flatnonzero(bad).tolist())
    fresh = is_text & (emb_row < 0)
    rows = np.where(is_text, emb_row, -1)
    if not fresh.any():
        return query_emb, rows
    from components.data.embed import backend_of, encode_texts

    emb = params.get("embed", {})
    new = encode_texts(text[fresh].astype(str).tolist(), batch_size=int(emb.get("batch_size", 64)),
                       max_chars=int(emb.get("max_chars", 1000)), normalize=bool(emb.get("normalize", True)),
                       backend=backend_of(emb))   # the backend that made the catalog's vectors
    rows[fresh] = len(query_emb) + np.arange(int(fresh.sum()))
    return np.concatenate([query_emb, new]), rows


@dataclass
class DecodeContext:
    """A retriever with its version's catalog attached, and what every decode of it reuses: loaded
    once, so a service answers each batch without rereading files or rebuilding catalog-sized arrays."""

    model: RetrieverModel
    inputs: RetrieverInputs
    learned_items: np.ndarray | None   # the item scorer's item vectors (None without the scorer)
    unit_items: np.ndarray             # unit-length frozen item embeddings (the zero_shot dense side)
    bm25: Bm25Index | None = None      # BM25 over item text (the bm25 side), built on first use

    def lexical(self) -> Bm25Index:
        if self.bm25 is None:
            self.bm25 = Bm25Index(self.inputs.items["text"])
        return self.bm25


def load_context(params: dict, model: RetrieverModel | None = None, out_dir: str | Path | None = None
                 ) -> DecodeContext:
    """Read the version in out_dir (params' out_dir by default) and attach its catalog to the retriever."""
    root = Path(out_dir) if out_dir is not None else out_path(params)
    inputs = load_inputs(params, root, with_queries=False)
    if model is None:
        model = load_retriever(root / "retriever" / "model.pt")
    model = getattr(model, "net", model)
    if tuple(model.vocab.codebook_sizes) != tuple(inputs.codebook_sizes):
        known = model.vocab.codebook_sizes
        big = np.flatnonzero((inputs.catalog.codes >= np.asarray(known)[None, :]).any(1))
        if len(big):
            raise DataError(root / "sids" / "sid_table.parquet", f"SIDs use codes beyond the model's codebook sizes "
                            f"{list(known)}: retrain the retriever", column="codes", rows=big.tolist())
    model.attach_catalog(inputs.catalog)
    learned = None
    if model.scorer is not None:
        model.attach_items(inputs.item_emb, inputs.catalog.popularity)
        with torch.no_grad():
            learned = model.item_vectors().cpu().numpy()
    item = inputs.item_emb
    unit = (item / np.maximum(np.linalg.norm(item, axis=1, keepdims=True), 1e-12)).astype(np.float32)
    ctx = DecodeContext(model, inputs, learned, unit)
    if "bm25" in (model.config.get("fusion") or {}).get("sources", []):
        ctx.lexical()  # a service answers its first request without indexing the catalog
    return ctx


def _decode_all(params: dict, model: RetrieverModel, dataset: ExampleDataset, beam: int, constrained: bool
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Decode every query; return (sid_index, scores, codes, lengths, learned query vectors or None) in query order."""
    rp = params["retriever"]
    torch.set_num_threads(int(rp["num_threads"]))
    n, max_len = len(dataset), model.vocab.max_len
    sid_index = np.full((n, beam), -1, dtype=np.int64)
    scores = np.full((n, beam), -np.inf, dtype=np.float32)
    codes = np.full((n, beam, max_len), -1, dtype=np.int64)
    lengths = np.zeros((n, beam), dtype=np.int64)
    qvecs = np.zeros((n, model.config["d_model"]), dtype=np.float32) if model.scorer is not None else None
    sampler = BucketBatchSampler(dataset.ex.bucket_keys(), int(rp["decode_batch_size"]), shuffle=False)
    was_training = model.training
    model.eval()
    try:
        for idx in tqdm(sampler, desc="decode", disable=len(sampler) < 20):
            batch = dataset[idx]
            res = decode(model, batch, beam, constrained)
            sid_index[idx], scores[idx] = res.sid_index.cpu().numpy(), res.scores.cpu().numpy()
            codes[idx], lengths[idx] = res.codes.cpu().numpy(), res.lengths.cpu().numpy()
            if qvecs is not None:
                with torch.no_grad():
                    qvecs[idx] = model.query_vectors(batch).cpu().numpy()
    finally:
        model.train(was_training)
    return sid_index, scores, codes, lengths, qvecs


@dataclass
class Decoded:
    """Beams of every query (N, B), in query order; sid_index is -1 where no item holds the SID.

    unit_items: the frozen item embeddings at unit length (the zero_shot dense side). With the
    retriever's item scorer: its query vectors (N, d) and item vectors (I, d), and the fusion the
    checkpoint chose on validation (components/retrieval/fusion.py)."""

    query_ids: np.ndarray
    sid_index: np.ndarray
    scores: np.ndarray
    codes: np.ndarray
    lengths: np.ndarray
    dataset: ExampleDataset
    catalog: SidCatalog
    unit_items: np.ndarray
    learned_query: np.ndarray | None = None
    learned_items: np.ndarray | None = None
    fusion: dict | None = None
    queries: pd.DataFrame | None = None     # the decoded queries (the bm25 side reads their text / history)
    context: DecodeContext | None = None


def group_order(params: dict) -> str:
    order = str(params["eval"]["group_order"])
    known = tuple(group_orders())
    if order not in known:
        raise ConfigError("eval.group_order", f"must be one of {known}, got {order!r}")
    return order


def decode_queries(params: dict, queries: pd.DataFrame, *, model: RetrieverModel | None = None,
                   beam: int | None = None, constrained: bool = True, out_dir: str | Path | None = None) -> Decoded:
    """Beam-search every query once; `ranked_items` and `generated_sids` are two views of the result."""
    return decode_with(params, load_context(params, model, out_dir), queries, beam=beam, constrained=constrained)


def decode_with(params: dict, ctx: DecodeContext, queries: pd.DataFrame, *, beam: int | None = None,
                constrained: bool = True) -> Decoded:
    """`decode_queries` on an already loaded version (the online service calls this per batch)."""
    beam = int(beam or params["retriever"]["beam"])
    model, catalog = ctx.model, ctx.inputs.catalog
    vectors, text_rows = _text_vectors(queries, ctx.inputs.query_emb, params)
    examples = query_examples(queries, ctx.inputs.item_index, text_rows, model.config["max_history"])
    dataset = ExampleDataset(examples, vectors, ctx.inputs.item_emb, model.vocab, catalog)
    sid_index, scores, codes, lengths, qvecs = _decode_all(params, model, dataset, beam, constrained)
    if not constrained:
        found = catalog.find(codes.reshape(-1, codes.shape[2]), lengths.reshape(-1)).reshape(sid_index.shape)
        sid_index = np.where(np.isfinite(scores), found, -1)
    return Decoded(queries["query_id"].astype(str).to_numpy(), sid_index, scores, codes, lengths, dataset, catalog,
                   ctx.unit_items, qvecs, ctx.learned_items, model.config.get("fusion"), queries, ctx)


def generated_sids(dec: Decoded) -> pd.DataFrame:
    """One row per (query, decoded SID): query_id, beam_rank, sid, score, sid_index (-1 = no item has it)."""
    q, b = np.nonzero(np.isfinite(dec.scores))
    return pd.DataFrame({
        "query_id": dec.query_ids[q],
        "beam_rank": b.astype(np.int64),
        "sid": [sid_string(c[:n]) for c, n in zip(dec.codes[q, b], dec.lengths[q, b])],
        "score": dec.scores[q, b].astype(float),
        "sid_index": dec.sid_index[q, b].astype(np.int64),
    })


def ranked_items(dec: Decoded, order: str = "popularity") -> pd.DataFrame:
    """Ranked results (query_id, rank, item_id, score, sid).

    Items of one SID follow the item scorer when the retriever has one (`order` otherwise); with a
    fusion chosen on validation, the generated list is fused with the dense ranking (score = fused)."""
    generated = generated_ranking(dec, order)
    fusion = dec.fusion or {"sources": []}
    if not fusion["sources"] or fusion["weights"][0] == 1.0:
        return ranked_frame(dec.query_ids, generated, dec.catalog)
    dense = [dense_side(dec, source, int(fusion["depth"]), int(fusion.get("bm25_history", 3)))
             for source in fusion["sources"]]
    if fusion.get("use_generated", True) is False:   # the ablation: the generated list takes no part at all
        fused = fuse(dense, fusion["weights"][1:], int(fusion["rrf_k"]), len(dec.catalog.item_ids))
        return ranked_frame(dec.query_ids, fused, dec.catalog)
    fused = fuse([generated] + dense, fusion["weights"], int(fusion["rrf_k"]), len(dec.catalog.item_ids))
    return ranked_frame(dec.query_ids, fused, dec.catalog)


def generated_ranking(dec: Decoded, order: str = "popularity") -> Ranked:
    """The decoded SIDs expanded into items (learned order inside a SID when the scorer exists)."""
    if dec.learned_query is not None:
        vecs = (dec.learned_query, dec.learned_items)
    else:
        vecs = group_orders()[order].query_and_item_vectors(dec)
    return beam_items(dec.sid_index, dec.scores, dec.catalog, *vecs)


def dense_side(dec: Decoded, source: str, depth: int, bm25_history: int = 3) -> Ranked:
    """A ranking beside the generated one for the fusion: the registered fusion source `source`
    (components/retrieval/rankings.py), its top `depth` items per decoded query."""
    return fusion_sources()[source].rank(dec, depth, {"bm25_history": bm25_history})


# ---- the built-in fusion sources and group orders (registered in components/retrieval/rankings.py) ----
def bm25_side(dec: Decoded, depth: int, options: dict) -> Ranked:
    """BM25 over item text (history queries: their last `bm25_history` items' text, as the BM25 baseline)."""
    if dec.context is None or dec.queries is None:
        raise ConfigError("retriever.fusion.sources", "bm25 needs the decoded queries and their catalog")
    texts = bm25_query_texts(dec.queries, dec.context.inputs.items, int(options["bm25_history"]))
    rows, scores = dec.context.lexical().top(texts, depth)
    return Ranked(rows.reshape(-1), scores.reshape(-1), np.full(len(rows), rows.shape[1], dtype=np.int64))


def learned_side(dec: Decoded, depth: int, options: dict) -> Ranked:
    """The retriever's learned item scorer (retriever.item_head)."""
    if dec.learned_query is None:
        raise ConfigError("retriever.fusion.sources", "learned needs a retriever trained with item_head: true")
    return dense_ranking(dec.learned_query, dec.learned_items, depth)


def zero_shot_side(dec: Decoded, depth: int, options: dict) -> Ranked:
    """The frozen text embeddings: cosine between the query's vector and every item's."""
    return dense_ranking(query_vectors(dec.dataset), dec.unit_items, depth)


def popularity_vectors(dec: Decoded) -> tuple[None, None]:
    """No vectors: items of one SID follow popularity desc, then item_id."""
    return None, None


def similarity_vectors(dec: Decoded) -> tuple[np.ndarray, np.ndarray]:
    """The query's vector and the frozen item embeddings: items of one SID follow their cosine."""
    return query_vectors(dec.dataset), dec.dataset.item_emb


def generate(params: dict, queries: pd.DataFrame, *, model: RetrieverModel | None = None, beam: int | None = None,
             constrained: bool = False, out_dir: str | Path | None = None) -> pd.DataFrame:
    """One row per (query, decoded SID): query_id, beam_rank, sid, score, sid_index (-1 = no item has it)."""
    return generated_sids(decode_queries(params, queries, model=model, beam=beam, constrained=constrained,
                                         out_dir=out_dir))


def hallucination_rate(generated: pd.DataFrame) -> float:
    """Mean over queries of the share of generated SIDs that match no issued SID."""
    if generated.empty:
        return 0.0
    return float((generated["sid_index"] < 0).groupby(generated["query_id"]).mean().mean())


def query_vectors(dataset: ExampleDataset, last_n: int = 5) -> np.ndarray:
    """One unit vector per query: its text embedding, or the mean of its last `last_n` history items."""
    ex = dataset.ex
    vecs = np.zeros((len(ex), dataset.item_emb.shape[1]), dtype=np.float32)
    text = ex.kind == KIND_TEXT
    vecs[text] = dataset.text_vectors[ex.vec_row[text]]
    hist = np.flatnonzero(~text)
    if len(hist):
        cols = np.arange(ex.hist.shape[1])[None, :]
        keep = (cols < ex.hist_len[hist, None]) & (cols >= ex.hist_len[hist, None] - last_n)
        rows = np.where(keep, ex.hist[hist], 0)
        vecs[hist] = (dataset.item_emb[rows] * keep[..., None]).sum(1) / keep.sum(1, keepdims=True)
    return vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)


def beam_items(sid_index: np.ndarray, scores: np.ndarray, catalog: SidCatalog,
               query_vecs: np.ndarray | None = None, item_vecs: np.ndarray | None = None) -> Ranked:
    """Expand beams (N, B) of sid indices into ranked item rows (vectorised); score = the SID's beam score.

    Items of one SID follow popularity desc then item_id; given query and item vectors they
    follow the dot product with the query instead (popularity order breaks ties).
    """
    valid = (sid_index >= 0) & np.isfinite(scores)
    sizes = np.where(valid, catalog.group_sizes()[np.maximum(sid_index, 0)], 0)
    flat_sizes = sizes.reshape(-1)
    total = int(flat_sizes.sum())
    sid_rep = np.repeat(sid_index.reshape(-1), flat_sizes)
    within = np.arange(total) - np.repeat(np.cumsum(flat_sizes) - flat_sizes, flat_sizes)
    item_rows = catalog.group_items[catalog.group_ptr[sid_rep] + within]
    if query_vecs is not None and item_vecs is not None:
        beam_rep = np.repeat(np.arange(flat_sizes.size), flat_sizes)
        sim = np.einsum("ij,ij->i", query_vecs[beam_rep // sid_index.shape[1]], item_vecs[item_rows])
        item_rows = item_rows[np.lexsort((within, -sim, beam_rep))]
    return Ranked(item_rows.astype(np.int64), np.repeat(scores.reshape(-1), flat_sizes).astype(np.float32),
                  sizes.sum(1).astype(np.int64))


def ranked_frame(query_ids: np.ndarray, ranked: Ranked, catalog: SidCatalog) -> pd.DataFrame:
    """The data contract's ranked-results frame of flat ranked item rows (sid = each item's SID)."""
    return pd.DataFrame({
        "query_id": np.repeat(np.asarray(query_ids, dtype=object), ranked.per_query).astype(str),
        "rank": ranked.rank.astype(np.int64),
        "item_id": catalog.item_ids[ranked.items].astype(str),
        "score": ranked.scores.astype(float),
        "sid": catalog.sid_text[catalog.item_sid[ranked.items]].astype(str),
    })


def ranked_from_beams(query_ids: np.ndarray, sid_index: np.ndarray, scores: np.ndarray, catalog: SidCatalog,
                      query_vecs: np.ndarray | None = None, item_vecs: np.ndarray | None = None) -> pd.DataFrame:
    """Ranked item frame of beams (N, B) of sid indices (see `beam_items` for the order inside a SID)."""
    return ranked_frame(query_ids, beam_items(sid_index, scores, catalog, query_vecs, item_vecs), catalog)


def retrieve(params: dict, queries: pd.DataFrame, *, model: RetrieverModel | None = None, beam: int | None = None,
             constrained: bool = True, out_dir: str | Path | None = None) -> pd.DataFrame:
    """Ranked results (query_id, rank, item_id, score, sid) for `queries` (data-contract format).

    Inside one SID, items follow `eval.group_order`. Unconstrained decoding drops generated SIDs
    that no item holds (see `generate` to count them).
    """
    order = group_order(params)
    return ranked_items(decode_queries(params, queries, model=model, beam=beam, constrained=constrained,
                                       out_dir=out_dir), order)


def retrieve_at_least(params: dict, queries: pd.DataFrame, k: int, *, beam: int | None = None,
                      model: RetrieverModel | None = None) -> pd.DataFrame:
    """`retrieve` (constrained) with at least `k` items for every query the catalog can fill: a query whose
    beam of `beam` SIDs holds fewer items is decoded once more with a beam of `k` SIDs, which reaches k
    items because every issued SID holds at least one. So each query costs one decode when its first beam
    reaches k (a fused list, or SIDs shared by several items), at most two otherwise; the deeper list
    replaces the first one whole (its top is the larger beam's, never worse in sequence score)."""
    beam = int(beam or params["retriever"]["beam"])
    ranked = retrieve(params, queries, model=model, beam=beam)
    if beam >= k:
        return ranked
    counts = ranked.groupby("query_id").size().reindex(queries["query_id"].astype(str), fill_value=0)
    short = queries[(counts < k).to_numpy()]
    if short.empty:
        return ranked
    deeper = retrieve(params, short, model=model, beam=k)
    kept = ranked[~ranked["query_id"].isin(set(short["query_id"].astype(str)))]
    order = {q: i for i, q in enumerate(queries["query_id"].astype(str))}
    out = pd.concat([kept, deeper], ignore_index=True)
    return out.sort_values(["query_id", "rank"], key=lambda c: c.map(order) if c.name == "query_id" else c,
                           kind="stable").reset_index(drop=True)


def retrieve_and_generate(params: dict, queries: pd.DataFrame, *, beam: int | None = None, constrained: bool = True
                          ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`retrieve` and `generate` from one decode: evaluation needs both views of unconstrained decoding
    (recall and hallucination), and decoding once halves its cost and keeps the two consistent."""
    order = group_order(params)
    dec = decode_queries(params, queries, beam=beam, constrained=constrained)
    return ranked_items(dec, order), generated_sids(dec)
