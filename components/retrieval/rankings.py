"""Fusion sources and group orders by registration: each declares itself once, with
`register_source(FusionSource(...))` / `register_group_order(GroupOrder(...))`; the fusion's choices
(components/retrieval/fusion.py), the params schema's choices (`retriever.fusion.sources`,
`eval.group_order`), the ranking (components/retrieval/retrieve.py) and the docs table read them
(docs/EXTENDING.md).

A fusion source is a ranking fused with the generated list (weighted reciprocal-rank fusion); a group
order orders the items that share one decoded SID. The built-in ones are registered at the end of this
module, in the order of the choices (`sources: auto` keeps that order). Their functions are callables or
'module:function' references, imported when they run, so checking params does not import torch.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from components.runtime import extensions

SOURCE_KIND = "fusion_source"
ORDER_KIND = "group_order"


@dataclass(frozen=True)
class FusionSource:
    """One fusion source (`retriever.fusion.sources: [<name>, ...]`).

    ranker(dec, depth, options) -> components.retrieval.fusion.Ranked: the top `depth` items of every
    decoded query (dec: components.retrieval.retrieve.Decoded), best first; options: the chosen fusion's
    settings (bm25_history). needs_item_head: it reads the retriever's learned item scorer, so it is
    only in `sources: auto` with retriever.item_head: true, and refused without. doc: the docs table's cell."""

    name: str
    ranker: Callable[[Any, int, dict], Any] | str
    needs_item_head: bool = False
    doc: str = ""

    def rank(self, dec: Any, depth: int, options: dict) -> Any:
        return extensions.resolve(self.ranker)(dec, depth, options)


@dataclass(frozen=True)
class GroupOrder:
    """One order of the items inside a decoded SID (`eval.group_order: <name>`), used when the retriever has
    no item scorer (its scorer orders them otherwise).

    vectors(dec) -> (query vectors (N, d), item vectors (I, d)): items follow the dot product with their
    query; (None, None): popularity desc, then item_id. doc: the docs table's cell."""

    name: str
    vectors: Callable[[Any], tuple[Any, Any]] | str
    doc: str = ""

    def query_and_item_vectors(self, dec: Any) -> tuple[Any, Any]:
        return extensions.resolve(self.vectors)(dec)


def register_source(source: FusionSource) -> FusionSource:
    """Make `source` a choice of retriever.fusion.sources."""
    extensions.register(SOURCE_KIND, source.name, source)
    return source


def unregister_source(name: str) -> None:
    """Drop a registration (one made for a while, e.g. by a test)."""
    extensions.unregister(SOURCE_KIND, name)


def sources() -> dict[str, FusionSource]:
    """Every registered fusion source by name, the built-in ones first."""
    return {name: extensions.entry(SOURCE_KIND, name) for name in extensions.names(SOURCE_KIND)}


def register_group_order(order: GroupOrder) -> GroupOrder:
    """Make `order` a choice of eval.group_order."""
    extensions.register(ORDER_KIND, order.name, order)
    return order


def unregister_group_order(name: str) -> None:
    """Drop a registration (one made for a while, e.g. by a test)."""
    extensions.unregister(ORDER_KIND, name)


def group_orders() -> dict[str, GroupOrder]:
    """Every registered group order by name, the built-in ones first."""
    return {name: extensions.entry(ORDER_KIND, name) for name in extensions.names(ORDER_KIND)}


def rankings_table() -> str:
    """The markdown table of docs/EXTENDING.md (fusion sources, then group orders), from the registrations."""
    rows = ["| kind | name | what |", "|---|---|---|"]
    rows += [f"| fusion source | `{s.name}` | {s.doc} |" for s in sources().values()]
    rows += [f"| group order | `{o.name}` | {o.doc} |" for o in group_orders().values()]
    return "\n".join(rows)


# ---- the built-in fusion sources and group orders, in the order of their choices --------------------
register_source(FusionSource("learned", "components.retrieval.retrieve:learned_side", needs_item_head=True,
                             doc="the retriever's learned item scorer (components/retrieval/item_scorer.py)"))
register_source(FusionSource("zero_shot", "components.retrieval.retrieve:zero_shot_side",
                             doc="cosine over the frozen text embeddings (the dense baseline's vectors)"))
register_source(FusionSource("bm25", "components.retrieval.retrieve:bm25_side",
                             doc="BM25 over item text (history queries: their last `bm25_history` items' text)"))
register_group_order(GroupOrder("popularity", "components.retrieval.retrieve:popularity_vectors",
                                doc="popularity desc, then item_id (the data contract's default)"))
register_group_order(GroupOrder("similarity", "components.retrieval.retrieve:similarity_vectors",
                                doc="cosine between the query's vector and the item embedding"))
