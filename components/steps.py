"""Step names and the functions behind them: DVC stages, flows, the CLI and the params
schema (`flows.pipeline.start` / `stop`) read this one table; its own module so the schema can
name the steps without importing what runs them."""
from __future__ import annotations

STEPS: dict[str, str] = {
    "prepare": "components.prepare:run_prepare",
    "embed": "components.embed:run_embed",
    "train_head": "components.tokenizer_stages:run_train_head",
    "train_tail": "components.tokenizer_stages:run_train_tail",
    "assign_ids": "components.tokenizer_stages:run_assign_ids",
    "train_retriever": "components.retriever_train:run_train_retriever",
    "evaluate": "components.evaluate:run_evaluate",
}
