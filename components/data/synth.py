"""`sa2crq synth`: a synthetic recommendation catalog of any size, in the generic format (README "Data contract").

Why: the pipeline has to be run at 100k to 10M items, and no public catalog of that size ships with the project.
The catalog is made to look like amazon-scientific where that matters for cost and quality (text length and words,
items per user, a Zipf popularity with a long tail and cold items), and to have a structure a model can learn and a
test can check (docs/SCALING.md "Synthetic catalogs").

The generative process, seeded and vectorised (time and memory linear in items + users; the item texts are written
in chunks):
- **Topics.** N items are split evenly into topics of about `topic_size` items. Each topic takes one of
  amazon-scientific's category paths (in a seeded order, so topics differ until the paths run out) and one brand.
- **Text.** An item's title and description have the word counts of a random amazon-scientific item; their words
  are drawn from the titles and descriptions of the topic's category (the rest from the whole catalog), and laid
  out as the amazon adapter lays out its text ("title. Brand: b. Categories: a, b. description").
- **Popularity.** Item weights are Zipf, (rank)^-zipf over a random ranking. A `cold` share of the items are new:
  they never appear in a training position, only as a held-out target.
- **Users.** A history length drawn from amazon-scientific's users (5 to 78 items); 1 to 4 topics per user, chosen
  by topic weight. Each next item stays in the current topic with probability `stay`, else moves to one of the
  user's topics; with probability `explore` it comes from the whole catalog instead. Within a topic, items are
  drawn by weight; no item twice for one user.
- **Planted ground truth.** The last two items of each sequence (valid, test) continue the same chain, so a model
  that learns the user's topics beats most-popular. Queries are laid out as amazon-scientific's (leave-last-out,
  query id `u<user>-<position>`); items carry their `topic`.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from components.data.readers import read_json
from components.runtime.atomic import atomic_dir
from components.runtime.errors import DataError, Sa2crqError

SOURCE = "amazon-scientific"
FILES = ("items.jsonl", "queries.jsonl", "synth.json")
MIN_ITEMS = 50        # below this a topic cannot give a user its distinct items
CHUNK = 8192          # items per text chunk (fixed: the bytes must not depend on it)
SLACK = 8             # extra draws per phase, so that dropping repeats still leaves each user's length
ROUNDS = 10           # users a round leaves short are drawn again this often at most
TOKEN = re.compile(r"\w[\w'&/+.%-]*\w|\w")


@dataclass(frozen=True)
class Knobs:
    """The process's shape; the defaults put a 10k-item catalog near amazon-scientific (docs/SCALING.md)."""
    zipf: float = 0.65            # item weight = rank^-zipf
    topic_size: int = 100         # items per topic
    cold: float = 0.01            # share of items that are new: held-out targets only
    stay: float = 0.8             # next item in the same topic
    explore: float = 0.1          # next item from the whole catalog, by weight
    extra_topics: float = 1.0     # a user's topics: 1 + Poisson(extra_topics), at most max_topics
    max_topics: int = 4
    title_background: float = 0.1   # share of title words drawn from the whole catalog, not the topic's category
    text_background: float = 0.3   # the same for the description


@dataclass(frozen=True)
class Vocabulary:
    """amazon-scientific's words by category path: what the synthetic texts are composed of.

    title / desc hold the token ids of every item's title / description, category by category; a category's
    tokens are title[title_at[c]: title_at[c] + title_len[c]]. Per source item: brand, title and description
    word counts; per source user: history length."""
    words: np.ndarray
    paths: list[str]
    title: np.ndarray
    title_at: np.ndarray
    title_len: np.ndarray
    desc: np.ndarray
    desc_at: np.ndarray
    desc_len: np.ndarray
    brands: np.ndarray
    title_words: np.ndarray
    desc_words: np.ndarray
    user_lengths: np.ndarray


def _tokens(text: object) -> list[str]:
    return TOKEN.findall(str(text or ""))


def load_vocabulary(folder: Path) -> Vocabulary:
    """Read amazon-scientific's item and interaction files (DataError naming the file when they do not fit)."""
    item_file, inter_file = folder / "Scientific.item.json", folder / "Scientific.inter.json"
    meta, inter = read_json(item_file), read_json(inter_file)
    if not isinstance(meta, dict) or not meta or not all(isinstance(m, dict) for m in meta.values()):
        raise DataError(item_file, "expected a non-empty JSON object {item index: {title, ...}}")
    if not isinstance(inter, dict) or not inter or not all(isinstance(s, list) for s in inter.values()):
        raise DataError(inter_file, "expected a non-empty JSON object {user index: [item index, ...]}")
    records = list(meta.values())
    paths = sorted({str(m.get("categories") or "").strip() for m in records})
    path_of = np.array([paths.index(str(m.get("categories") or "").strip()) for m in records])
    titles = [_tokens(m.get("title")) for m in records]
    descs = [_tokens(m.get("description")) for m in records]
    words = sorted({w for toks in titles + descs for w in toks})
    if not words:
        raise DataError(item_file, "no words in the titles and descriptions")
    index = {w: i for i, w in enumerate(words)}
    by_path = np.argsort(path_of, kind="stable")

    def streams(per_item: list[list[str]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        counts = np.bincount(path_of, weights=[len(t) for t in per_item], minlength=len(paths)).astype(np.int64)
        flat = np.array([index[w] for i in by_path for w in per_item[i]], dtype=np.int64)
        return flat, np.concatenate([[0], np.cumsum(counts)[:-1]]), counts

    title, title_at, title_len = streams(titles)
    desc, desc_at, desc_len = streams(descs)
    return Vocabulary(words=np.array(words, dtype=object), paths=paths, title=title, title_at=title_at,
                      title_len=title_len, desc=desc, desc_at=desc_at, desc_len=desc_len,
                      brands=np.array([str(m.get("brand") or "").strip() for m in records], dtype=object),
                      title_words=np.array([max(len(t), 1) for t in titles], dtype=np.int64),
                      desc_words=np.array([len(t) for t in descs], dtype=np.int64),
                      user_lengths=np.array([max(len(s), 4) for s in inter.values()], dtype=np.int64))


# --------------------------------------------------------------------------- the process
@dataclass(frozen=True)
class Catalog:
    """Items (topic, weights, new or not) and the sequences, before any text is written."""
    topic: np.ndarray          # per item
    is_new: np.ndarray         # per item: held-out targets only
    path_of_topic: np.ndarray
    brand_of_topic: np.ndarray
    users: np.ndarray          # per kept user: its index among the users drawn
    seq_at: np.ndarray         # user k's items are seq[seq_at[k]: seq_at[k + 1]], oldest first
    seq: np.ndarray


def _items(n_items: int, vocab: Vocabulary, knobs: Knobs, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """Topic, Zipf weight and new flag per item; category path and brand per topic."""
    n_topics = max(1, round(n_items / knobs.topic_size))
    topic = rng.permutation(n_items) % n_topics
    weight = (rng.permutation(n_items) + 1.0) ** -knobs.zipf
    # new items: never the heaviest of their topic, so every topic keeps items to train on
    top = np.zeros(n_items, dtype=bool)
    by_weight = np.lexsort((-weight, topic))
    top[by_weight[np.r_[0, np.flatnonzero(np.diff(topic[by_weight])) + 1]]] = True
    candidates = np.flatnonzero(~top)
    is_new = np.zeros(n_items, dtype=bool)
    is_new[rng.permutation(candidates)[: min(round(knobs.cold * n_items), len(candidates))]] = True
    path_of_topic = rng.permutation(len(vocab.paths))[np.arange(n_topics) % len(vocab.paths)]
    brand_of_topic = vocab.brands[rng.integers(len(vocab.brands), size=n_topics)]
    return topic, weight, is_new, path_of_topic, brand_of_topic


class _Sampler:
    """Weighted draws of items within a topic or over the whole catalog, by binary search on cumulative weights
    (items ordered by topic; a topic's zero-weight items last, so a rounding overshoot stays on a drawable one)."""

    def __init__(self, topic: np.ndarray, weight: np.ndarray, n_topics: int):
        self.order = np.lexsort((weight == 0, topic))
        w = weight[self.order]
        self.cum = np.cumsum(w)
        start = np.searchsorted(topic[self.order], np.arange(n_topics))
        self.lo = np.where(start > 0, self.cum[np.maximum(start - 1, 0)], 0.0)
        self.total = np.bincount(topic, weights=weight, minlength=n_topics)
        self.last = start + np.bincount(topic, weights=weight > 0, minlength=n_topics).astype(np.int64) - 1
        self.last_any = int(np.flatnonzero(w > 0)[-1])

    def draw(self, topics: np.ndarray, anywhere: np.ndarray, u: np.ndarray) -> np.ndarray:
        target = np.where(anywhere, u * self.cum[-1], self.lo[topics] + u * self.total[topics])
        pos = np.searchsorted(self.cum, target, side="right")
        return self.order[np.minimum(pos, np.where(anywhere, self.last_any, self.last[topics]))]


def _first_per_user(user: np.ndarray, keys: np.ndarray, candidate: np.ndarray, want: np.ndarray) -> np.ndarray:
    """Among the candidate positions (in order), each user's first `want[user]` items not seen before in `keys`."""
    first = np.zeros(len(keys), dtype=bool)
    first[np.unique(keys, return_index=True)[1]] = True
    keep = first & candidate
    rank = np.cumsum(keep) - 1
    user_start = np.searchsorted(user, user)
    before = np.where(user_start > 0, np.cumsum(keep)[np.maximum(user_start - 1, 0)], 0)
    return keep & (rank - before < want[user])


def _draw_users(n_users: int, samplers: tuple[_Sampler, _Sampler], n_items: int, vocab: Vocabulary, knobs: Knobs,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One round for n_users users: (ok per user, length per ok user, their items, user by user). Training items
    come from the warm items, then two held-out items from all of them; a user left without 2 distinct training
    and 2 held-out items (a topic dominated by one item) is not ok."""
    n_topics = len(samplers[0].total)
    n_train = vocab.user_lengths[rng.integers(len(vocab.user_lengths), size=n_users)] - 2
    n_topic = 1 + np.minimum(rng.poisson(knobs.extra_topics, size=n_users), knobs.max_topics - 1)
    picks = np.searchsorted(np.cumsum(samplers[0].total), rng.random((n_users, knobs.max_topics))
                            * samplers[0].total.sum(), side="right")
    picks = np.minimum(picks, n_topics - 1)
    # positions: per user n_train + SLACK training draws, then 2 + SLACK held-out draws
    n_pos = n_train + 2 + 2 * SLACK
    user = np.repeat(np.arange(n_users), n_pos)
    start = np.concatenate([[0], np.cumsum(n_pos)[:-1]])
    held = np.arange(len(user)) - start[user] >= (n_train + SLACK)[user]
    switch = rng.random(len(user)) >= knobs.stay
    switch[start] = True
    slot = np.floor(rng.random(len(user)) * n_topic[user]).astype(np.int64)
    slot = slot[np.maximum.accumulate(np.where(switch, np.arange(len(user)), 0))]
    topics = picks[user, slot]
    anywhere = rng.random(len(user)) < knobs.explore
    u = rng.random(len(user))
    item = np.where(held, samplers[1].draw(topics, anywhere, u), samplers[0].draw(topics, anywhere, u))
    keys = user * np.int64(n_items) + item
    kept_train = _first_per_user(user, keys, ~held, n_train)
    both = kept_train | held
    kept_held = np.zeros(len(user), dtype=bool)
    kept_held[both] = _first_per_user(user[both], keys[both], held[both], np.full(n_users, 2))
    ok = (np.bincount(user[kept_train], minlength=n_users) >= 2) & (np.bincount(user[kept_held], minlength=n_users) == 2)
    kept = (kept_train | kept_held) & ok[user]
    return ok, np.bincount(user[kept], minlength=n_users)[ok], item[kept]


def _sequences(n_users: int, topic: np.ndarray, weight: np.ndarray, is_new: np.ndarray, vocab: Vocabulary,
               knobs: Knobs, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(kept users, seq_at, seq), users in order: the users a round leaves out are drawn again (ROUNDS at most)."""
    n_topics = int(topic.max()) + 1
    samplers = _Sampler(topic, np.where(is_new, 0.0, weight), n_topics), _Sampler(topic, weight, n_topics)
    todo = np.arange(n_users)
    users, lengths, seqs = [], [], []
    for _ in range(ROUNDS):
        ok, length, seq = _draw_users(len(todo), samplers, len(topic), vocab, knobs, rng)
        users.append(todo[ok])
        lengths.append(length)
        seqs.append(seq)
        todo = todo[~ok]
        if not len(todo):
            break
    users_all, length_all, seq_all = np.concatenate(users), np.concatenate(lengths), np.concatenate(seqs)
    order = np.argsort(users_all, kind="stable")
    at = np.concatenate([[0], np.cumsum(length_all)])
    seq_at = np.concatenate([[0], np.cumsum(length_all[order])])
    gather = np.repeat(at[:-1][order] - seq_at[:-1], length_all[order]) + np.arange(seq_at[-1])
    return users_all[order], seq_at, seq_all[gather]


def _rngs(seed: int) -> list[np.random.Generator]:
    """Independent streams for the items, the users and the texts: the items and texts of (n_items, seed) do not
    change with the number of users."""
    return [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3)]


def generate(n_items: int, n_users: int, seed: int, vocab: Vocabulary, knobs: Knobs = Knobs()) -> Catalog:
    """The catalog's structure (texts are drawn while writing, chunk by chunk: write_catalog)."""
    rng_items, rng_users, _ = _rngs(seed)
    topic, weight, is_new, path_of_topic, brand_of_topic = _items(n_items, vocab, knobs, rng_items)
    users, seq_at, seq = _sequences(n_users, topic, weight, is_new, vocab, knobs, rng_users)
    return Catalog(topic=topic, is_new=is_new, path_of_topic=path_of_topic, brand_of_topic=brand_of_topic,
                   users=users, seq_at=seq_at, seq=seq)


# --------------------------------------------------------------------------- text and files
def _draw_words(counts: np.ndarray, paths: np.ndarray, stream: np.ndarray, at: np.ndarray, length: np.ndarray,
                background: float, rng: np.random.Generator) -> np.ndarray:
    """counts[i] token ids for item i: from its category path's stream, or (with `background`, or when the path
    has none) from the whole stream."""
    path = np.repeat(paths, counts)
    anywhere = (rng.random(len(path)) < background) | (length[path] == 0)
    u = rng.random(len(path))
    pos = np.where(anywhere, np.floor(u * len(stream)), at[path] + np.floor(u * length[path])).astype(np.int64)
    return stream[pos]


def _category_text(path: str) -> str:
    return ", ".join(c.strip() for c in path.split(",") if c.strip())


def item_texts(catalog: Catalog, vocab: Vocabulary, lo: int, hi: int, knobs: Knobs,
               rng: np.random.Generator) -> list[str]:
    """Texts of items lo..hi-1, laid out as the amazon adapter's (title. Brand: b. Categories: a, b. description)."""
    template = rng.integers(len(vocab.title_words), size=hi - lo)
    n_title, n_desc = vocab.title_words[template], vocab.desc_words[template]
    topics = catalog.topic[lo:hi]
    paths = catalog.path_of_topic[topics]
    title = vocab.words[_draw_words(n_title, paths, vocab.title, vocab.title_at, vocab.title_len,
                                    knobs.title_background, rng)].tolist()
    desc = vocab.words[_draw_words(n_desc, paths, vocab.desc, vocab.desc_at, vocab.desc_len,
                                   knobs.text_background, rng)].tolist()
    t_at, d_at = np.concatenate([[0], np.cumsum(n_title)]), np.concatenate([[0], np.cumsum(n_desc)])
    cats = [_category_text(p) for p in vocab.paths]
    texts = []
    for k, (t, p) in enumerate(zip(topics.tolist(), paths.tolist())):
        brand = catalog.brand_of_topic[t]
        parts = [" ".join(title[t_at[k]: t_at[k + 1]]), f"Brand: {brand}" if brand else "",
                 f"Categories: {cats[p]}" if cats[p] else "", " ".join(desc[d_at[k]: d_at[k + 1]])]
        texts.append(". ".join(x for x in parts if x))
    return texts


def write_catalog(catalog: Catalog, vocab: Vocabulary, folder: Path, seed: int, knobs: Knobs) -> None:
    """items.jsonl (item_id, text, topic) in chunks of CHUNK items, and queries.jsonl (leave-last-out)."""
    rng = _rngs(seed)[2]
    n_items = len(catalog.topic)
    with open(folder / "items.jsonl", "w", encoding="utf-8") as fh:
        for lo in range(0, n_items, CHUNK):
            hi = min(lo + CHUNK, n_items)
            texts = item_texts(catalog, vocab, lo, hi, knobs, rng)
            fh.writelines(json.dumps({"item_id": f"i{i}", "text": text, "topic": t}, ensure_ascii=False) + "\n"
                          for i, text, t in zip(range(lo, hi), texts, catalog.topic[lo:hi].tolist()))
    ids = np.array([f"i{i}" for i in range(n_items)], dtype=object)
    with open(folder / "queries.jsonl", "w", encoding="utf-8") as fh:
        for k, user in enumerate(catalog.users.tolist()):
            seq = ids[catalog.seq[catalog.seq_at[k]: catalog.seq_at[k + 1]]].tolist()
            n = len(seq)
            fh.writelines(json.dumps({"query_id": f"u{user}-{pos}", "order": pos,
                                      "split": "test" if pos == n - 1 else "valid" if pos == n - 2 else "train",
                                      "history": seq[:pos], "targets": [seq[pos]]}) + "\n" for pos in range(1, n))


def _check_out(out: Path) -> None:
    """Refuse a path that is a file, or a folder holding anything but a synthetic catalog (it is replaced whole)."""
    if out.exists() and not out.is_dir():
        raise Sa2crqError(f"{out}: is a file; --out names the folder the catalog is written to")
    other = sorted(p.name for p in out.iterdir() if p.name not in FILES) if out.is_dir() else []
    if other:
        raise Sa2crqError(f"{out}: holds other files ({', '.join(other[:3])}); the catalog replaces its folder "
                          "whole: choose a new or empty folder")


def synthesize(n_items: int, n_users: int, seed: int, out: Path, source: Path, knobs: Knobs = Knobs()) -> dict:
    """Write the catalog to `out` (a temporary folder renamed into place: no partial output) and describe it."""
    out = Path(out)
    _check_out(out)
    vocab = load_vocabulary(source)
    catalog = generate(n_items, n_users, seed, vocab, knobs)
    summary = {"items": n_items, "users": int(len(catalog.users)), "users_asked": n_users, "seed": seed,
               "interactions": int(len(catalog.seq)), "topics": int(catalog.topic.max()) + 1,
               "new_items": int(catalog.is_new.sum()), "source": SOURCE, "knobs": asdict(knobs)}
    with atomic_dir(out) as tmp:
        write_catalog(catalog, vocab, tmp, seed, knobs)
        (tmp / "synth.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary


# --------------------------------------------------------------------------- statistics
def catalog_stats(items: pd.DataFrame, queries: pd.DataFrame, head_share: float) -> dict:
    """What docs/SCALING.md compares, from a loader's (items, queries): items per user (query id `u<user>-<pos>`,
    the largest position + 1), the head (most popular items holding head_share of training interactions) and the
    tail's share of them, the top 1% of items' share, cold items (no training interaction), and item text length in
    words (whitespace-separated)."""
    from components.data.prepare import label_groups

    pop = items["popularity"].to_numpy(dtype=np.int64)
    groups = label_groups(pop, head_share)
    per_user = queries.groupby(queries["query_id"].str.rsplit("-", n=1).str[0])["order"].max() + 1
    words = items["text"].str.split().str.len()
    top = np.sort(pop)[::-1][: max(1, len(pop) // 100)]
    return {"items": int(len(items)), "users": int(len(per_user)), "train_interactions": int(pop.sum()),
            "items_per_user_mean": round(float(per_user.mean()), 2),
            "items_per_user_median": float(per_user.median()),
            "head_items_share": round(float(np.mean(groups == "head")), 4),
            "top1pct_items_interaction_share": round(float(top.sum() / max(pop.sum(), 1)), 4),
            "tail_interaction_share": round(float(pop[groups == "tail"].sum() / max(pop.sum(), 1)), 4),
            "cold_share": round(float(np.mean(groups == "cold")), 4),
            "text_words_mean": round(float(words.mean()), 1), "text_words_median": float(words.median())}


def compare_stats(params: dict, folder: Path) -> dict:
    """catalog_stats of the catalog in `folder` and of amazon-scientific, both read by the project's loaders."""
    from components.data.adapters import load_amazon_scientific, load_generic

    head_share = float(params["data"]["head_share"])
    generic = {**params, "data": {**params["data"], "max_users": 0,
                                  "generic": {"items": str(folder / "items.jsonl"),
                                              "queries": str(folder / "queries.jsonl")}}}
    amazon = {**params, "data": {**params["data"], "max_users": 0}}
    return {"synthetic": catalog_stats(*load_generic(generic), head_share),
            SOURCE: catalog_stats(*load_amazon_scientific(amazon), head_share)}


def _whole(name: str, value: object, minimum: int) -> int:
    text = str(value).strip()
    if not text.isdigit() or int(text) < minimum:
        raise Sa2crqError(f"synth: {name} must be an integer >= {minimum}, got {value!r}")
    return int(text)


def run_synth(params: dict, opt_items: object = None, opt_users: object = None, opt_seed: object = 0,
              opt_out: str | None = None, opt_stats: bool = False) -> dict:
    """`sa2crq synth`: check the arguments, write the catalog, and say how to run the pipeline on it; with
    opt_stats, its statistics beside amazon-scientific's. The words come from <data.root>/amazon-scientific."""
    if opt_items is None or opt_users is None:
        raise Sa2crqError("synth: --items N and --users U are required")
    n_items, n_users = _whole("--items", opt_items, MIN_ITEMS), _whole("--users", opt_users, 1)
    seed = _whole("--seed", opt_seed, 0)
    source = Path(params["data"]["root"]) / SOURCE
    if not source.is_dir():
        raise DataError(source, "dataset folder not found: the synthetic text is made of its words "
                                "(run `dvc pull` or set data.root)")
    out = Path(opt_out) if opt_out else Path(params["out_dir"]) / "synth" / f"n{n_items}-u{n_users}-s{seed}"
    summary = synthesize(n_items, n_users, seed, out, source)
    result = {"out": str(out), **summary,
              "run": f"sa2crq run -s dataset=generic -s data.generic.items={out / 'items.jsonl'} "
                     f"-s data.generic.queries={out / 'queries.jsonl'}"}
    if opt_stats:
        result["stats"] = compare_stats(params, out)
    return result
