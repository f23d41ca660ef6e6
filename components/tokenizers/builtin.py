"""The built-in tokenizer methods, in the order of the schema's choices and the docs table; importing
this module registers them. Hooks are 'module:function' references, imported when a step runs, so
checking params (which imports this module for the names) stays free of torch and faiss. The references
are plain strings: `sa2crq deps` reads them as imports (components/runtime/stage_deps.py), so a step's DVC
deps cover the code of every method."""
from __future__ import annotations

from components.tokenizers.registry import TokenizerMethod, register

SARQ_KEYS = ("sarq",)
STAGE2_KEYS = ("extension_sizes", "head_encoder", "stage2_items")
# keys added after runs were cached, at the value that reproduces them (flows/compare.py EARLIER_BEHAVIOUR)
RQVAE_EARLIER = {("accelerator",): "auto"}
STAGE2_EARLIER = {("head_encoder",): "head", ("stage2_items",): "tail_and_cold"}
# tau: auto alone reads its target
SARQ_ONLY_WHEN = {("sarq", "target_items_per_sid"): (("sarq", "tau"), lambda tau: tau == "auto")}

RQVAE_HEAD = "components.tokenizers.rqvae_methods:train_head"
RQVAE_TAIL = "components.tokenizers.rqvae_methods:train_tail"

METHODS = (
    TokenizerMethod(
        "rqkmeans", "components.tokenizers.rq_kmeans:train_head", collision_token=True,
        doc=("layer-wise k-means on the residuals of all items (input space, no encoder)", "marker file only",
             "fixed")),
    TokenizerMethod(
        "rqvae", RQVAE_HEAD, collision_token=True, earlier_behaviour=RQVAE_EARLIER,
        doc=("RQ-VAE on all items (TIGER), `epochs_full`", "marker file only", "fixed")),
    TokenizerMethod(
        "acrq", RQVAE_HEAD, RQVAE_TAIL, reads=STAGE2_KEYS, earlier_behaviour={**RQVAE_EARLIER, **STAGE2_EARLIER},
        doc=("Stage 1: RQ-VAE on head items, curriculum sizes, `epochs_head`",
             "Stage 2: anchors + extensions on tail + cold (`stage2_items`), `epochs_tail`", "fixed")),
    TokenizerMethod(
        "sarq", RQVAE_HEAD, adaptive=True, reads=SARQ_KEYS, earlier_behaviour=RQVAE_EARLIER,
        read_only_when=SARQ_ONLY_WHEN,
        doc=("RQ-VAE + SARQ on all items, `epochs_full`", "marker file only", "adaptive")),
    TokenizerMethod(
        "sa2crq", RQVAE_HEAD, RQVAE_TAIL, adaptive=True, reads=SARQ_KEYS + STAGE2_KEYS,
        earlier_behaviour={**RQVAE_EARLIER, **STAGE2_EARLIER}, read_only_when=SARQ_ONLY_WHEN,
        doc=("Stage 1: `acrq` Stage 1 + SARQ on head",
             "Stage 2: `acrq` Stage 2 with the frozen Stage-1 path table", "adaptive")),
    TokenizerMethod(
        "import", "components.tokenizers.imported:train_head",
        assign_ids="components.tokenizers.imported:assign_ids", check="components.tokenizers.imported:check",
        reads=("import_unknown",), doc=("reads and checks `tokenizer.import_path`", "marker file only", "as given")),
)
for _method in METHODS:
    register(_method)
