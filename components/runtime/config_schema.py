"""The schema of params.yaml: every key with its type, range or choices, in one place.

Each section is a pydantic model that refuses unknown keys; each field is one rule whose
message says what the key takes, so a bad value stops up front with one line such as
`params.yaml 'retriever.beam': must be an integer >= 1, got 'ten'` instead of failing (or
being used silently) deep inside a step. Adding a key = one keyword in its `section` here
plus its line in params.yaml. Rules check one value each; checks across keys (attention heads
dividing the width, a tokenizer method's lengths and curriculum, the fusion's weights per source,
the service's defaults under its maxima) are check_across's, so every check of params runs here,
once. `typed_params` returns the checked tree as typed sections (`.tokenizer.sarq.tau`): the steps
read their section from it, with no checks or defaults of their own.

Bounds: floats are finite (`.inf`, `nan` and overflowing values such as `1e308` for a learning
rate make a run diverge or crash). Sizes that allocate memory have a generous upper bound, far
above anything useful on one machine, so an absurd value fails here with a line saying why,
not as an allocation error deep in a step (the bounds below, each with its reason). Seeds fit
numpy's and torch's 32-bit seeds.
"""
import difflib
import functools
import json
import math
import re
from collections.abc import Callable
from typing import Annotated, Any, get_args

from pydantic import BaseModel, ConfigDict, PlainValidator, ValidationError, create_model
from pydantic_core import PydanticCustomError

from components.runtime.errors import ConfigError
from components.runtime.extensions import entry as extension_entry
from components.runtime.extensions import names as extension_names

# ---- rules: one value each; the message is what the key accepts --------------------------


def rule(message: str, ok: Callable[[Any], bool], limit: tuple[Callable[[Any], bool], str] | None = None) -> Any:
    """A field type that keeps the value as it is when ok(value), else fails with message; limit =
    (within, message): a value ok accepts but not within fails with that message (a bound, with why)."""
    def check(value: Any) -> Any:
        if not ok(value):
            raise PydanticCustomError("sa2crq", message)  # no context: the message is used as written
        if limit is not None and not limit[0](value):
            raise PydanticCustomError("sa2crq", limit[1])
        return value

    return Annotated[Any, PlainValidator(check)]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)


def _is_finite(v: Any) -> bool:
    return _is_number(v) and math.isfinite(v)


def _note(note: str) -> str:
    return f" ({note})" if note else ""


def _at_most(le: int | float | None, why: str) -> tuple[Callable[[Any], bool], str] | None:
    """A rule's upper bound (see the module's Bounds), or None for no bound."""
    return None if le is None else (lambda v: v <= le, f"must be at most {le if isinstance(le, int) else f'{le:g}'} ({why})")


def integer(ge: int, note: str = "", le: int | None = None, why: str = "") -> Any:
    """An integer >= ge; with le, also <= le (why: what a larger value would do)."""
    return rule(f"must be an integer >= {ge}{_note(note)}", lambda v: _is_int(v) and v >= ge, _at_most(le, why))


def number(lo: float = -math.inf, hi: float = math.inf, lo_open: bool = False, hi_open: bool = False,
           note: str = "") -> Any:
    """A finite real number in a range; open ends exclude the bound (tau > 0, dropout in [0, 1))."""
    def ok(v: Any) -> bool:
        return _is_number(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)

    return rule(f"must be a number {_range_text(lo, hi, lo_open, hi_open)}{_note(note)}", ok,
                (math.isfinite, f"must be a finite number{_note(note)}"))


def _range_text(lo: float, hi: float, lo_open: bool, hi_open: bool) -> str:
    if hi == math.inf:
        return f"{'>' if lo_open else '>='} {lo:g}"
    return f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"


def int_list(ge: int, empty_ok: bool = False, le: int | None = None, why: str = "") -> Any:
    """A list of integers >= ge; with le, each also <= le."""
    bound = _at_most(le, why)
    return rule(f"must be a {'' if empty_ok else 'non-empty '}list of integers >= {ge}",
                lambda v: isinstance(v, list) and (empty_ok or bool(v)) and all(_is_int(x) and x >= ge for x in v),
                bound and (lambda v: all(bound[0](x) for x in v), f"each {bound[1]}"))


def choice(*options: Any) -> Any:
    return rule(f"must be one of {' | '.join(map(str, options))}", lambda v: _one_of(v, options))


def _one_of(v: Any, options: tuple) -> bool:
    return not isinstance(v, bool) and v in options  # True == 1 must not pass for an option 1


def registered(kind: str) -> Any:
    """A choice among the names registered for `kind` (components/runtime/extensions.py: e.g. the
    tokenizer methods), read when a value is checked, so a method registered anywhere is a choice."""
    def check(value: Any) -> Any:
        options = extension_names(kind)
        if not _one_of(value, options):
            raise PydanticCustomError("sa2crq", f"must be one of {' | '.join(options)}")
        return value

    return Annotated[Any, PlainValidator(check)]


def text(empty_ok: bool = True) -> Any:
    return rule("must be a string" if empty_ok else "must be a non-empty string",
                lambda v: isinstance(v, str) and (empty_ok or bool(v.strip())))


FLAG = rule("must be true or false", lambda v: isinstance(v, bool))
POSITIVE = number(0, lo_open=True)
SHARE = number(0, 1)
PATIENCE = integer(0, "0 = no early stopping")

# Bounds (module docstring): generous limits on what one machine can hold, each with its reason.
SEED_MAX = 2**32 - 1   # numpy.random.default_rng / torch.manual_seed take 32-bit seeds in practice
THREADS = integer(1, le=1024, why="threads of one process")
SEED = integer(0, le=SEED_MAX, why="numpy and torch seeds are 32-bit")
SEEDS = int_list(0, le=SEED_MAX, why="numpy and torch seeds are 32-bit")
WIDTH = integer(1, le=8192, why="model width: embedding and attention matrices grow with its square")
LAYERS = integer(1, le=256, why="transformer layers; each holds its own weights")
FF_DIM = integer(1, le=65536, why="feed-forward width of each layer")
BATCH = integer(1, le=65536, why="examples held in memory at once, with their activations")
BEAM = integer(1, le=10000, why="beam search keeps this many prefixes per query and scores each against the "
                                "whole code vocabulary")
TOP_K = integer(1, le=100000, why="items ranked and held per query")
TOP_KS = int_list(1, le=100000, why="items ranked and held per query")
CODES = int_list(1, le=65536, why="codes per layer; each is an embedding row and a k-means centroid")
EXTENSION_CODES = int_list(0, empty_ok=True, le=65536, why="codes per layer; each is an embedding row")
HIDDEN = int_list(1, empty_ok=True, le=65536, why="width of a hidden layer")
HISTORY = integer(1, le=10000, why="history items per query; each is held as input tokens")
LR = number(0, 1, lo_open=True, note="a step size above 1 makes training diverge")
LOSS_WEIGHT = number(0, 1e6, note="a loss weight; a larger one overflows float32 losses")
SECONDS = number(0, 86400, note="a day at most; time.sleep overflows on absurd values")


def _tau(v: Any) -> bool:
    return v is None or v == "auto" or v == math.inf or (_is_number(v) and math.isfinite(v) and v > 0)


def registered_list(kind: str) -> Any:
    """A list of names registered for `kind` (components/runtime/extensions.py: e.g. the baselines), read
    when a value is checked, as `registered`."""
    def check(value: Any) -> Any:
        options = extension_names(kind)
        if not (isinstance(value, list) and all(_one_of(x, options) for x in value)):
            raise PydanticCustomError("sa2crq", f"must be a list from {' | '.join(options)}")
        return value

    return Annotated[Any, PlainValidator(check)]


def _fusion_sources(value: Any) -> Any:
    """retriever.fusion.sources: auto, none or a list of distinct registered fusion sources."""
    options = extension_names("fusion_source")
    ok = value in ("auto", "none") if isinstance(value, str) else (
        isinstance(value, list) and bool(value) and all(_one_of(s, options) for s in value)
        and len(set(value)) == len(value))
    if not ok:
        raise PydanticCustomError("sa2crq", f"must be auto, none or a list of distinct {' | '.join(options)}")
    return value


def _fusion_weights(v: Any) -> bool:
    return v == "auto" or (isinstance(v, list) and bool(v) and all(_is_finite(w) and w >= 0 for w in v)
                           and 0 < sum(v) < math.inf)


def _rrf_ks(v: Any) -> bool:
    values = v if isinstance(v, list) else [v]
    return bool(values) and all(_is_int(k) and k >= 1 for k in values) and len(set(values)) == len(values)


def _dropouts(v: Any) -> bool:
    values = v if isinstance(v, list) else [v]
    return bool(values) and all(_is_finite(d) and 0 <= d < 1 for d in values)


# strategies whose DDP wrapper would stop at the first unused parameter: every batch holds one query kind,
# so the other kind's encoder (and, on history-only data, the text path) gets no gradient
NEEDS_UNUSED = ("ddp", "ddp_spawn", "ddp_fork", "ddp_notebook")


def _strategy(value: Any) -> Any:
    """retriever.trainer.strategy: a Lightning strategy name, not one that stops at unused parameters."""
    if not isinstance(value, str) or not value.strip():
        raise PydanticCustomError("sa2crq", "must be a non-empty string")
    if value in NEEDS_UNUSED:
        raise PydanticCustomError("sa2crq", f"{value} stops at the encoder a batch's query kind leaves unused; "
                                            f"use {value}_find_unused_parameters_true")
    return value


def _objective(v: Any) -> bool:
    return v == "balanced" or isinstance(v, dict) and bool(v) and all(
        isinstance(k, str) and k.startswith("recall@") and k[7:].isdigit() and int(k[7:]) >= 1
        and _is_finite(w) and w >= 0 for k, w in v.items()) and sum(v.values()) > 0


def _devices(v: Any) -> bool:
    return v == "auto" or (_is_int(v) and (v >= 1 or v == -1)) or (
        isinstance(v, list) and bool(v) and all(_is_int(d) and d >= 0 for d in v))


# choices mirrored from the modules that use them (tests/test_config_schema.py keeps them equal)
BACKBONES = ("small", "t5", "pretrained")
SASREC_LOSSES = ("ce", "bce", "bpr", "bpr-max", "top1")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")
PRECISIONS = ("64-true", "32-true", "16-true", "16-mixed", "bf16-true", "bf16-mixed", "transformer-engine",
              "transformer-engine-float16", "64", "32", "16", "bf16", 64, 32, 16)


# ---- sections: one model per block of params.yaml ------------------------------------------


class Section(BaseModel):
    """A block of params.yaml: these keys, no others; frozen (typed_params hands one checked tree to every step)."""
    model_config = ConfigDict(extra="forbid", frozen=True)


def section(name: str, /, **fields: Any) -> type[BaseModel]:
    """The model of one block: each keyword is a key with its rule or nested section (required unless optional)."""
    return create_model(name, __base__=Section,
                        **{key: f if isinstance(f, tuple) else (f, ...) for key, f in fields.items()})


def optional(field: Any) -> tuple:
    """A key that params.yaml may leave out."""
    return (field, None)


ClimateFever = section(
    "ClimateFever",
    valid_frac=number(0, 1, hi_open=True),
    test_frac=number(0, 1, hi_open=True),
)

Generic = section(
    "Generic",
    items=text(),
    queries=text(),
    # names the catalog's results file, plots and report (components/evaluation/results_file.py catalog_name);
    # left out: the items file's folder name. No run reads it (flows/compare.py NAMING_KEYS).
    name=optional(rule("must be lowercase letters, digits and '-' (it names results/generic-<name>.json), e.g. my-shop",
                       lambda v: isinstance(v, str) and re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", v) is not None)),
)

Data = section(
    "Data",
    root=text(empty_ok=False),
    max_history=HISTORY,
    head_share=number(0, 1, lo_open=True),
    max_users=integer(0, "0 = all"),
    split_seed=SEED,
    climate_fever=ClimateFever,
    generic=Generic,
)

Embed = section(
    "Embed",
    batch_size=BATCH,
    max_chars=integer(1),
    normalize=FLAG,
    num_threads=THREADS,
    cache=FLAG,
    cache_every_batches=integer(1),
    # what runs MiniLM (components/data/embed.py BACKENDS, DEFAULT_BACKEND): torch = sentence-transformers fp32;
    # onnx / onnx-int8 = ONNX Runtime, faster on CPU (bench/bench_embed.py). Left out of params.yaml: torch
    backend=(choice("torch", "onnx", "onnx-int8"), "torch"),
)

Sarq = section(
    "Sarq",
    tau=rule("must be auto or a number > 0 (.inf = fixed length)", _tau),
    target_items_per_sid=number(1),  # tau: auto aims at this many items per SID
    min_len=integer(1),
    max_len=integer(1),
    smoothing=number(0, 1e6, lo_open=True, note="additive counts per child"),
    popularity_weighted=FLAG,
    unique_head=FLAG,
    warmup_epochs=integer(0),
    reestimate_every=integer(1),
)

Tokenizer = section(
    "Tokenizer",
    method=registered("tokenizer_method"),   # components/tokenizers/registry.py
    codebook_sizes=CODES,
    extension_sizes=EXTENSION_CODES,
    latent_dim=WIDTH,
    hidden_dims=HIDDEN,
    beta=LOSS_WEIGHT,
    lr=LR,
    batch_size=BATCH,
    epochs_head=integer(1),
    epochs_tail=integer(1),
    stage2_items=choice("tail_and_cold", "tail"),
    head_encoder=choice("head", "all"),
    epochs_full=integer(1),
    dead_code_reseed_every=integer(0, "0 = never"),
    kmeans_iters=integer(1),
    threads=THREADS,
    sarq=Sarq,
    import_path=text(),
    import_unknown=choice("error", "drop"),
    collision_token=FLAG,
    accelerator=choice(*ACCELERATORS),
)

Fusion = section(
    "Fusion",
    sources=Annotated[Any, PlainValidator(_fusion_sources)],   # components/retrieval/rankings.py
    weights=rule("must be auto or a list of numbers >= 0 (generated list first) with a positive, finite sum",
                 _fusion_weights),
    depth=TOP_K,
    rrf_k=rule("must be an integer >= 1 or a list of distinct ones (each tried on validation)", _rrf_ks),
    bm25_history=integer(1),
    beam=BEAM,
    val_max_queries=integer(0, "0 = all"),
    objective=rule("must be balanced or map recall@K (K >= 1) to weights >= 0 with a positive sum, e.g. "
                   "{recall@10: 1.0}",
                   _objective),
    use_generated=FLAG,
)

Trainer = section(
    "Trainer",
    accelerator=choice(*ACCELERATORS),
    devices=rule("must be auto, an integer >= 1, -1 (all) or a list of device indices", _devices),
    num_nodes=integer(1),
    strategy=Annotated[Any, PlainValidator(_strategy)],
    precision=choice(*PRECISIONS),
)

Retriever = section(
    "Retriever",
    backbone=choice(*BACKBONES),
    pretrained_path=text(),
    d_model=WIDTH,
    n_heads=integer(1, "must divide d_model"),
    n_layers=LAYERS,
    decoder_layers=LAYERS,
    ff_dim=FF_DIM,
    dropout=number(0, 1, hi_open=True),
    n_memory=integer(1, le=1024, why="memory vectors per text query, each an input token"),
    history_sid_tokens=FLAG,
    item_id_embeddings=FLAG,
    finetune_text_encoder=rule(
        "must be false: fine-tuning the MiniLM text encoder would re-encode every query and item text with "
        "gradients each epoch, about 100x the cost of the trainable projection over the frozen embeddings that "
        "this project trains", lambda v: v is False),
    item_head=FLAG,
    item_head_weight=LOSS_WEIGHT,
    item_head_encoder=choice("shared", "own"),
    item_head_negatives=optional(rule(
        "must be auto | full | an integer >= 1 (uniform negatives per step of a sampled softmax)",
        lambda v: v in ("auto", "full") or (_is_int(v) and v >= 1))),
    cold_item_rows=choice("text", "learned"),
    fusion=Fusion,
    indexing_pairs=FLAG,
    lr=LR,
    weight_decay=number(0, 10, note="each step shrinks weights by lr x weight_decay"),
    warmup_steps=integer(0),
    grad_clip=number(0, note="0 = no clipping"),
    batch_size=BATCH,
    epochs=integer(1),
    patience=PATIENCE,
    beam=BEAM,
    eval_beam=BEAM,
    val_max_queries=integer(0, "0 = all"),
    decode_batch_size=BATCH,
    num_threads=THREADS,
    trainer=Trainer,
)

TwoTower = section(
    "TwoTower",
    epochs=integer(1),
    patience=PATIENCE,
    warmup_steps=integer(0, "0 = no warm-up"),
    min_steps=integer(0, "optimizer steps before early stopping may end training; 0 = none"),
    logq=FLAG,
    batch_size=BATCH,
    lr=LR,
    temperature=POSITIVE,
    accelerator=choice(*ACCELERATORS),
)

Sasrec = section(
    "Sasrec",
    dim=WIDTH,
    blocks=LAYERS,
    heads=integer(1, "must divide dim"),
    max_len=HISTORY,
    loss=choice(*SASREC_LOSSES),
    num_neg=integer(1, le=1000000, why="shared negatives scored per batch"),
    neg_alpha=number(0, 10, note="sampling by popularity ** neg_alpha"),
    lr=LR,
    batch_size=BATCH,
    dropout=rule("must be a number in [0, 1) or a non-empty list of them", _dropouts),
    epochs=integer(1),
    eval_every=integer(1),
    patience=PATIENCE,
    val_metric=choice("recall", "ndcg"),
    threads=THREADS,
)

Variant = section(
    "Variant",
    name=text(empty_ok=False),
    params=rule("must be a mapping of params keys (merged over params.yaml)",
                lambda v: v is None or isinstance(v, dict)),
)

Eval = section(
    "Eval",
    ks=TOP_KS,
    deep_ks=int_list(1, empty_ok=True, le=100000, why="items ranked and held per query"),
    budgets=int_list(1, le=100000, why="items ranked and held per query"),
    headline_k=TOP_K,
    bootstrap=integer(0, "0 = no intervals", le=100000, why="resamples x queries are drawn at once"),
    seeds=SEEDS,
    group_order=registered("group_order"),   # components/retrieval/rankings.py
    threads=THREADS,
    exclude_history=FLAG,
    baselines=registered_list("baseline"),   # components/baselines/registry.py
    bm25_history=integer(1),
    dense_history=integer(1),
    two_tower=TwoTower,
    sasrec=Sasrec,
    compare_dir=text(empty_ok=False),
    results_dir=text(empty_ok=False),
    variants=list[Variant],
)

Wandb = section(
    "Wandb",
    mode=choice("offline", "online", "disabled"),
    project=text(empty_ok=False),
)

Sweep = section(
    "Sweep",
    report=rule("must be a list of metric key patterns",
                lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)),
)

Retrain = section(
    "Retrain",
    grow_threshold=rule("must be auto, null (never grow) or a number > 0",
                        lambda v: v is None or v == "auto" or (_is_finite(v) and v > 0)),
    grow_quantile=number(0, 1, lo_open=True),
    epochs=integer(1),
    batch_size=BATCH,
    new_repeats=integer(1, le=10000, why="copies of each new item's pair per epoch"),
    replay_ratio=number(0, 1000, note="old pairs replayed per new pair"),
    lr=rule("must be null (= retriever.lr) or a number in (0, 1] (a step size above 1 makes training diverge)",
            lambda v: v is None or (_is_finite(v) and 0 < v <= 1)),
    recall_k=TOP_K,
    eval_queries=integer(1),
    eval_items=integer(1),
    max_old_recall_drop=SHARE,
    min_new_recall=SHARE,
    promote=FLAG,
)

Schedule = section(
    "Schedule",
    cron=text(),
    new_items=text(),
    event=text(empty_ok=False),
)

Flows = section(
    "Flows",
    retries=integer(0),
    retry_delay_s=SECONDS,
    task_runner=choice("threads", "dask"),
    max_workers=integer(1, le=1024, why="parallel sweep points, each a process or thread"),
    dask_address=text(),
    sweep=Sweep,
    retrain=Retrain,
    schedule=Schedule,
)

ServeAB = section(
    "ServeAB",
    out_dir=text(),
    share=SHARE,
)

Serve = section(
    "Serve",
    host=text(empty_ok=False),
    port=rule("must be an integer port 0-65535 (0 = any free port)", lambda v: _is_int(v) and 0 <= v <= 65535),
    max_batch=integer(1),
    max_wait_ms=number(0, 1000, note="a request waits this long for a batch to fill: a second at most"),
    k_default=TOP_K,
    k_max=TOP_K,
    beam_default=BEAM,
    beam_max=BEAM,
    max_history_items=integer(1),
    max_text_chars=integer(1),
    max_body_bytes=integer(1024, "a request body of a few history items needs a kilobyte"),
    reload_every_s=number(0, 86400, note="0 = only POST /admin/reload; a day at most"),
    exclude_history=FLAG,
    item_text_chars=integer(1),
    request_log=text(),
    request_log_outside_out_dir=FLAG,
    ab=ServeAB,
)

Params = section(
    "Params",
    dataset=registered("dataset"),   # components/data/adapters.py
    profile=text(empty_ok=False),
    seed=SEED,
    out_dir=text(empty_ok=False),
    data=Data,
    embed=Embed,
    tokenizer=Tokenizer,
    retriever=Retriever,
    eval=Eval,
    wandb=Wandb,
    flows=Flows,
    serve=Serve,
    profiles=rule("must map each profile name to a mapping of params keys (an overlay)",
                  lambda v: isinstance(v, dict) and all(isinstance(o, dict) for o in v.values())),
)


# ---- checking ----------------------------------------------------------------------------


def check_params(params: dict, where: str = "", across: bool = True) -> None:
    """Raise ConfigError for the first bad key of a whole params tree (keys `_...` are internal).

    `where` prefixes the reported key: an overlay is checked merged over valid params, so its
    errors are named inside the overlay (`profiles.smoke.retriever.beam`). `across=False` leaves out the
    checks across sections that a method or source choice brings (check_across): an overlay that meets the
    base only badly (a variant choosing sarq over a base's collision token) is refused when it runs, as the
    root of its own params, not whenever any command loads params.yaml."""
    _checked(params, where, across)


def typed_params(params: dict) -> BaseModel:
    """The params tree checked into typed sections (`typed_params(p).retriever.fusion.depth`), once per
    distinct tree in a process: steps read their sections here instead of re-parsing with defaults of their
    own. A tokenizer method's own block (`tokenizer.<method>`) is checked by its section but read as a dict
    (`params["tokenizer"][name]`): the registration, not this schema, knows its keys."""
    return _typed(json.dumps({k: v for k, v in params.items() if not str(k).startswith("_")},
                             sort_keys=True, default=repr))


@functools.lru_cache(maxsize=32)
def _typed(text: str) -> BaseModel:
    return _checked(json.loads(text), "", True)


def _checked(params: dict, where: str, across: bool) -> BaseModel:
    tree, sections = _method_sections({k: v for k, v in params.items() if not str(k).startswith("_")})
    model = _validate(Params, tree, where)
    for path, (section_model, value) in sections.items():
        if value is None:
            block, name = path.split(".", 1)
            chooser = "tokenizer.method" if block == "tokenizer" else "eval.baselines"
            raise ConfigError(f"{where}{path}", f"missing ({chooser} chooses {name}, which reads this section)")
        _validate(section_model, value, f"{where}{path}.")
    names = [v["name"] for v in tree["eval"]["variants"]]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ConfigError(f"{where}eval.variants[{i}].name", f"{name!r} names an earlier variant too")
    check_across(tree, where, across)
    return model


def _validate(model: type[BaseModel], tree: Any, where: str) -> BaseModel:
    """`tree` as `model`, or ConfigError for its first bad key, named `where` + its path."""
    try:
        return model.model_validate(tree)
    except ValidationError as exc:
        errors = exc.errors()
        first = min(errors, key=lambda e: e["type"] != "extra_forbidden")  # a typo: its "did you mean" first
        key = where + _dotted(first["loc"])
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise ConfigError(key, _message(first, model, "" if model is Params else where) + more) from None


def _method_sections(tree: dict) -> tuple[dict, dict[str, tuple[Any, Any]]]:
    """`tree` without the blocks that registrations declare as their own sections, and those blocks with their
    models, keyed by their path: `tokenizer.<name>` of a tokenizer method (components/tokenizers/registry.py
    TokenizerMethod.section), required when it is the chosen method; `eval.<name>` of a baseline
    (components/baselines/registry.py Baseline.section), required while it is in eval.baselines. A block of
    an extension not chosen is checked when present and may be left out."""
    sections: dict[str, tuple[Any, Any]] = {}
    for block, kind, chosen in (("tokenizer", "tokenizer_method", lambda b: [b.get("method")]),
                                ("eval", "baseline", lambda b: b.get("baselines") or [])):
        body = tree.get(block)
        if not isinstance(body, dict):
            continue
        picked = chosen(body)
        own = {}
        for name in extension_names(kind):
            model = getattr(extension_entry(kind, name), "section", None)
            if model is not None and (name in body or (isinstance(picked, list) and name in picked)):
                own[name] = model
        if own:
            sections.update({f"{block}.{name}": (model, body.get(name)) for name, model in own.items()})
            tree = {**tree, block: {k: v for k, v in body.items() if k not in own}}
    return tree, sections


# (width, heads) pairs: attention splits the width into equal heads, so a model whose heads do not
# divide it cannot be built (it would fail in train_retriever / the SASRec rows, after the data steps)
HEAD_PAIRS = (("retriever", "d_model", "n_heads"), ("eval.sasrec", "dim", "heads"))


def check_across(tree: dict, where: str = "", choices: bool = True) -> None:
    """ConfigError for keys that are valid alone but cannot work together (valid single values assumed);
    `choices=False`: the attention heads only (see check_params)."""
    for block, width_key, heads_key in HEAD_PAIRS:
        section_values = tree
        for part in block.split("."):
            section_values = section_values[part]
        width, heads = section_values[width_key], section_values[heads_key]
        if width % heads:
            raise ConfigError(f"{where}{block}.{heads_key}",
                              f"must divide {block}.{width_key} ({width}) into equal attention heads, got {heads}")
    if not choices:
        return
    if tree["eval"]["headline_k"] not in tree["eval"]["ks"]:
        raise ConfigError(f"{where}eval.headline_k", f"{tree['eval']['headline_k']} must be one of eval.ks "
                                                     f"{tree['eval']['ks']}")
    _check_tokenizer(tree["tokenizer"], where)
    _check_fusion(tree["retriever"], where)
    serve = tree["serve"]
    for key, top in (("k_default", "k_max"), ("beam_default", "beam_max")):
        if serve[key] > serve[top]:
            raise ConfigError(f"{where}serve.{key}", f"must be an integer between 1 and {serve[top]} (serve.{top}), "
                                                     f"got {serve[key]!r}")


def method_flag(method: str, flag: str) -> bool:
    """A registered tokenizer method's switch (adaptive, two_stage, collision_token: components/tokenizers/
    registry.py), read from its registration."""
    return bool(getattr(extension_entry("tokenizer_method", method), flag, False))


def _check_tokenizer(tok: dict, where: str) -> None:
    """The method's switches against the layer keys: SARQ lengths within the layers (adaptive methods), the
    ACRQ curriculum K_1 <= ... <= K_L (small early codebooks hold coarse semantics) and one extension size
    per layer (two-stage methods), TIGER's collision token only where every SID has the same length."""
    method, sizes, ext = tok["method"], tok["codebook_sizes"], tok["extension_sizes"]
    if method_flag(method, "adaptive"):
        min_len, max_len = tok["sarq"]["min_len"], tok["sarq"]["max_len"]
        if not min_len <= max_len:
            raise ConfigError(f"{where}tokenizer.sarq.min_len",
                              f"need 1 <= min_len <= max_len, got {min_len}, {max_len}")
        if max_len > len(sizes):
            raise ConfigError(f"{where}tokenizer.sarq.max_len",
                              f"{max_len} exceeds the number of layers in tokenizer.codebook_sizes ({len(sizes)})")
        sizes, ext = sizes[:max_len], ext[:max_len]   # layers beyond L_max are never built
    if method_flag(method, "two_stage"):
        for layer in range(1, len(sizes)):
            if sizes[layer] < sizes[layer - 1]:
                raise ConfigError(f"{where}tokenizer.codebook_sizes",
                                  f"ACRQ needs non-decreasing sizes; layer {layer + 1} ({sizes[layer]}) < "
                                  f"layer {layer} ({sizes[layer - 1]}) in {sizes}")
        if len(ext) != len(sizes):
            raise ConfigError(f"{where}tokenizer.extension_sizes",
                              f"needs {len(sizes)} non-negative integers (one per layer), got {ext}")
    if tok["collision_token"] and not method_flag(method, "collision_token"):
        fixed = tuple(n for n in extension_names("tokenizer_method") if method_flag(n, "collision_token"))
        raise ConfigError(f"{where}tokenizer.collision_token",
                          f"only for fixed-length methods {fixed}, not tokenizer.method={method}")


def fusion_sources(retriever: dict) -> list[str]:
    """retriever.fusion.sources resolved: `auto` = every registered source the retriever can feed (a source
    reading the learned item scorer needs retriever.item_head), `none` = no fusion."""
    sources = retriever["fusion"]["sources"]
    if sources == "none":
        return []
    if sources == "auto":
        return [name for name in extension_names("fusion_source")
                if retriever["item_head"] or not _needs_item_head(name)]
    return list(sources)


def _needs_item_head(source: str) -> bool:
    return bool(getattr(extension_entry("fusion_source", source), "needs_item_head", False))


def _check_fusion(retriever: dict, where: str) -> None:
    sources, weights = fusion_sources(retriever), retriever["fusion"]["weights"]
    for name in sources:
        if _needs_item_head(name) and not retriever["item_head"]:
            raise ConfigError(f"{where}retriever.fusion.sources", f"{name} needs retriever.item_head: true")
    if weights != "auto" and len(weights) != len(sources) + 1:
        raise ConfigError(f"{where}retriever.fusion.weights", "must be auto or a list of non-negative numbers, one for "
                          f"the generated list and one per source {sources}, got {weights!r}")


def _dotted(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _message(error: dict, model: type[BaseModel], prefix: str) -> str:
    kind, value = error["type"], error.get("input")
    if kind == "extra_forbidden":
        return "unknown key" + _suggestion(error["loc"], model, prefix)
    if kind == "missing":
        return "missing (params.yaml must set every key; components/runtime/config_schema.py lists them)"
    if kind in ("model_type", "dict_type"):
        return f"must be a mapping of keys, got {_shown(value)}"
    if kind == "list_type":
        return f"must be a list, got {_shown(value)}"
    return f"{error['msg']}, got {_shown(value)}"  # our rules' messages (type 'sa2crq')


def _shown(value: Any) -> str:
    shown = repr(value)
    return shown if len(shown) <= 60 else shown[:57] + "..."


def _suggestion(loc: tuple, root: type[BaseModel], prefix: str) -> str:
    """' (did you mean 'retriever.beam'?)' for a near-miss of a known key of `root` (Params, or a registration's
    own section, whose path starts with `prefix`), else ''."""
    model: Any = root
    for part in loc[:-1]:
        if isinstance(part, int):  # a list item: the list's item model
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return ""
        model = get_args(field.annotation)[0] if get_args(field.annotation) else field.annotation
    known = list(getattr(model, "model_fields", {}))
    close = difflib.get_close_matches(str(loc[-1]), known, n=1)
    if not close:
        return ""
    return f" (did you mean '{prefix}{_dotted((*loc[:-1], close[0]))}'?)"
