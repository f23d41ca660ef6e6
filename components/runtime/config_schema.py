"""The schema of params.yaml: every key with its type, range or choices, in one place.

Each section is a pydantic model that refuses unknown keys; each field is one rule whose
message says what the key takes, so a bad value stops up front with one line such as
`params.yaml 'retriever.beam': must be an integer >= 1, got 'ten'` instead of failing (or
being used silently) deep inside a step. Adding a key = one keyword in its `section` here
plus its line in params.yaml. Rules check one value each; checks across keys (headline_k in
ks, sizes per layer) stay with the code that reads them.
"""
import difflib
import math
from collections.abc import Callable
from typing import Annotated, Any, get_args

from pydantic import BaseModel, ConfigDict, PlainValidator, ValidationError, create_model
from pydantic_core import PydanticCustomError

from components.runtime.errors import ConfigError
from components.runtime.steps import STEPS

# ---- rules: one value each; the message is what the key accepts --------------------------


def rule(message: str, ok: Callable[[Any], bool]) -> Any:
    """A field type that keeps the value as it is when ok(value), else fails with message."""
    def check(value: Any) -> Any:
        if not ok(value):
            raise PydanticCustomError("sa2crq", message)  # no context: the message is used as written
        return value

    return Annotated[Any, PlainValidator(check)]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)


def _note(note: str) -> str:
    return f" ({note})" if note else ""


def integer(ge: int, note: str = "") -> Any:
    return rule(f"must be an integer >= {ge}{_note(note)}", lambda v: _is_int(v) and v >= ge)


def number(lo: float = -math.inf, hi: float = math.inf, lo_open: bool = False, hi_open: bool = False,
           note: str = "") -> Any:
    """A real number in a range; open ends exclude the bound (tau > 0, dropout in [0, 1))."""
    def ok(v: Any) -> bool:
        return _is_number(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)

    return rule(f"must be a number {_range_text(lo, hi, lo_open, hi_open)}{_note(note)}", ok)


def _range_text(lo: float, hi: float, lo_open: bool, hi_open: bool) -> str:
    if hi == math.inf:
        return f"{'>' if lo_open else '>='} {lo:g}"
    return f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"


def int_list(ge: int, empty_ok: bool = False) -> Any:
    return rule(f"must be a {'' if empty_ok else 'non-empty '}list of integers >= {ge}",
                lambda v: isinstance(v, list) and (empty_ok or bool(v)) and all(_is_int(x) and x >= ge for x in v))


def choice(*options: Any) -> Any:
    return rule(f"must be one of {' | '.join(map(str, options))}", lambda v: _one_of(v, options))


def choice_list(*options: str) -> Any:
    return rule(f"must be a list from {' | '.join(options)}",
                lambda v: isinstance(v, list) and all(_one_of(x, options) for x in v))


def _one_of(v: Any, options: tuple) -> bool:
    return not isinstance(v, bool) and v in options  # True == 1 must not pass for an option 1


def text(empty_ok: bool = True) -> Any:
    return rule("must be a string" if empty_ok else "must be a non-empty string",
                lambda v: isinstance(v, str) and (empty_ok or bool(v.strip())))


FLAG = rule("must be true or false", lambda v: isinstance(v, bool))
POSITIVE = number(0, lo_open=True)
SHARE = number(0, 1)
PATIENCE = integer(0, "0 = no early stopping")
THREADS = integer(1)


def _tau(v: Any) -> bool:
    return v is None or v == "auto" or (_is_number(v) and v > 0)


def _fusion_sources(v: Any) -> bool:
    if isinstance(v, str):
        return v in ("auto", "none")
    return isinstance(v, list) and bool(v) and all(_one_of(s, SOURCES) for s in v) and len(set(v)) == len(v)


def _fusion_weights(v: Any) -> bool:
    return v == "auto" or (isinstance(v, list) and bool(v) and all(_is_number(w) and w >= 0 for w in v) and sum(v) > 0)


def _rrf_ks(v: Any) -> bool:
    values = v if isinstance(v, list) else [v]
    return bool(values) and all(_is_int(k) and k >= 1 for k in values) and len(set(values)) == len(values)


def _dropouts(v: Any) -> bool:
    values = v if isinstance(v, list) else [v]
    return bool(values) and all(_is_number(d) and 0 <= d < 1 for d in values)


def _devices(v: Any) -> bool:
    return v == "auto" or (_is_int(v) and (v >= 1 or v == -1)) or (
        isinstance(v, list) and bool(v) and all(_is_int(d) and d >= 0 for d in v))


# choices mirrored from the modules that use them (tests/test_config_schema.py keeps them equal)
DATASETS = ("amazon-scientific", "climate-fever", "generic")
METHODS = ("rqkmeans", "rqvae", "acrq", "sarq", "sa2crq", "import")
BACKBONES = ("small", "t5", "pretrained")
SOURCES = ("learned", "zero_shot", "bm25")
BASELINES = ("bm25", "dense", "popular", "two_tower", "sasrec", "sasrec_text")
GROUP_ORDERS = ("popularity", "similarity")
SASREC_LOSSES = ("ce", "bce", "bpr", "bpr-max", "top1")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")
PRECISIONS = ("64-true", "32-true", "16-true", "16-mixed", "bf16-true", "bf16-mixed", "transformer-engine",
              "transformer-engine-float16", "64", "32", "16", "bf16", 64, 32, 16)


# ---- sections: one model per block of params.yaml ------------------------------------------


class Section(BaseModel):
    """A block of params.yaml: these keys, no others."""
    model_config = ConfigDict(extra="forbid")


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
)

Data = section(
    "Data",
    root=text(empty_ok=False),
    max_history=integer(1),
    head_share=number(0, 1, lo_open=True),
    max_users=integer(0, "0 = all"),
    split_seed=integer(0),
    climate_fever=ClimateFever,
    generic=Generic,
)

Embed = section(
    "Embed",
    batch_size=integer(1),
    max_chars=integer(1),
    normalize=FLAG,
    num_threads=THREADS,
    cache=FLAG,
    cache_every_batches=integer(1),
)

Sarq = section(
    "Sarq",
    tau=rule("must be auto or a number > 0 (.inf = fixed length)", _tau),
    target_items_per_sid=number(1),  # tau: auto aims at this many items per SID
    min_len=integer(1),
    max_len=integer(1),
    smoothing=POSITIVE,
    popularity_weighted=FLAG,
    unique_head=FLAG,
    warmup_epochs=integer(0),
    reestimate_every=integer(1),
)

Tokenizer = section(
    "Tokenizer",
    method=choice(*METHODS),
    codebook_sizes=int_list(1),
    extension_sizes=int_list(0, empty_ok=True),
    latent_dim=integer(1),
    hidden_dims=int_list(1, empty_ok=True),
    beta=number(0),
    lr=POSITIVE,
    batch_size=integer(1),
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
    sources=rule(f"must be auto, none or a list of distinct {' | '.join(SOURCES)}", _fusion_sources),
    weights=rule("must be auto or a list of numbers >= 0 (generated list first) with a positive sum",
                 _fusion_weights),
    depth=integer(1),
    rrf_k=rule("must be an integer >= 1 or a list of distinct ones (each tried on validation)", _rrf_ks),
    bm25_history=integer(1),
    beam=integer(1),
    val_max_queries=integer(0, "0 = all"),
)

Trainer = section(
    "Trainer",
    accelerator=choice(*ACCELERATORS),
    devices=rule("must be auto, an integer >= 1, -1 (all) or a list of device indices", _devices),
    num_nodes=integer(1),
    strategy=text(empty_ok=False),
    precision=choice(*PRECISIONS),
)

Retriever = section(
    "Retriever",
    backbone=choice(*BACKBONES),
    pretrained_path=text(),
    d_model=integer(1),
    n_heads=integer(1),
    n_layers=integer(1),
    decoder_layers=integer(1),
    ff_dim=integer(1),
    dropout=number(0, 1, hi_open=True),
    n_memory=integer(1),
    history_sid_tokens=FLAG,
    item_id_embeddings=FLAG,
    finetune_text_encoder=FLAG,
    item_head=FLAG,
    item_head_weight=number(0),
    item_head_encoder=choice("shared", "own"),
    cold_item_rows=choice("text", "learned"),
    fusion=Fusion,
    indexing_pairs=FLAG,
    lr=POSITIVE,
    weight_decay=number(0),
    warmup_steps=integer(0),
    grad_clip=number(0, note="0 = no clipping"),
    batch_size=integer(1),
    epochs=integer(1),
    patience=PATIENCE,
    beam=integer(1),
    eval_beam=integer(1),
    val_max_queries=integer(0, "0 = all"),
    decode_batch_size=integer(1),
    num_threads=THREADS,
    trainer=Trainer,
)

TwoTower = section(
    "TwoTower",
    epochs=integer(1),
    patience=PATIENCE,
    batch_size=integer(1),
    lr=POSITIVE,
    temperature=POSITIVE,
    accelerator=choice(*ACCELERATORS),
)

Sasrec = section(
    "Sasrec",
    dim=integer(1),
    blocks=integer(1),
    heads=integer(1),
    max_len=integer(1),
    loss=choice(*SASREC_LOSSES),
    num_neg=integer(1),
    neg_alpha=number(0),
    lr=POSITIVE,
    batch_size=integer(1),
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
    ks=int_list(1),
    deep_ks=int_list(1, empty_ok=True),
    headline_k=integer(1),
    bootstrap=integer(0, "0 = no intervals"),
    seeds=int_list(0),
    group_order=choice(*GROUP_ORDERS),
    threads=THREADS,
    exclude_history=FLAG,
    baselines=choice_list(*BASELINES),
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
    start=choice(*STEPS),
    stop=choice(*STEPS),
    report=rule("must be a list of metric key patterns",
                lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)),
)

Retrain = section(
    "Retrain",
    grow_threshold=rule("must be auto, null (never grow) or a number > 0",
                        lambda v: v is None or v == "auto" or (_is_number(v) and v > 0)),
    grow_quantile=number(0, 1, lo_open=True),
    epochs=integer(1),
    batch_size=integer(1),
    new_repeats=integer(1),
    replay_ratio=number(0),
    lr=rule("must be null (= retriever.lr) or a number > 0", lambda v: v is None or (_is_number(v) and v > 0)),
    recall_k=integer(1),
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
    retry_delay_s=number(0),
    task_runner=choice("threads", "dask"),
    max_workers=integer(1),
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
    port=rule("must be an integer port 1-65535", lambda v: _is_int(v) and 1 <= v <= 65535),
    max_batch=integer(1),
    max_wait_ms=number(0),
    k_default=integer(1),
    k_max=integer(1),
    beam_default=integer(1),
    beam_max=integer(1),
    max_history_items=integer(1),
    max_text_chars=integer(1),
    max_body_bytes=integer(1),
    reload_every_s=number(0, note="0 = only POST /admin/reload"),
    exclude_history=FLAG,
    item_text_chars=integer(1),
    request_log=text(),
    request_log_outside_out_dir=FLAG,
    ab=ServeAB,
)

Params = section(
    "Params",
    dataset=choice(*DATASETS),
    profile=text(empty_ok=False),
    seed=integer(0),
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


def check_params(params: dict, where: str = "") -> None:
    """Raise ConfigError for the first bad key of a whole params tree (keys `_...` are internal).

    `where` prefixes the reported key: an overlay is checked merged over valid params, so its
    errors are named inside the overlay (`profiles.smoke.retriever.beam`)."""
    tree = {k: v for k, v in params.items() if not str(k).startswith("_")}
    try:
        Params.model_validate(tree)
    except ValidationError as exc:
        errors = exc.errors()
        first = min(errors, key=lambda e: e["type"] != "extra_forbidden")  # a typo: its "did you mean" first
        key = where + _dotted(first["loc"])
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise ConfigError(key, _message(first) + more) from None
    names = [v["name"] for v in tree["eval"]["variants"]]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ConfigError(f"{where}eval.variants[{i}].name", f"{name!r} names an earlier variant too")


def _dotted(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _message(error: dict) -> str:
    kind, value = error["type"], error.get("input")
    if kind == "extra_forbidden":
        return "unknown key" + _suggestion(error["loc"])
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


def _suggestion(loc: tuple) -> str:
    """' (did you mean 'retriever.beam'?)' for a near-miss of a known key, else ''."""
    model: Any = Params
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
    return f" (did you mean '{_dotted((*loc[:-1], close[0]))}'?)"
