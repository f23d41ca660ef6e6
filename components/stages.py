"""The pipeline's steps by name: DVC stages, flows and the CLI all resolve them here."""
from __future__ import annotations

import importlib
from typing import Callable

STEPS: dict[str, str] = {
    "prepare": "components.prepare:run_prepare",
    "embed": "components.embed:run_embed",
    "train_head": "components.tokenizer_stages:run_train_head",
    "train_tail": "components.tokenizer_stages:run_train_tail",
    "assign_ids": "components.tokenizer_stages:run_assign_ids",
    "train_retriever": "components.retriever_train:run_train_retriever",
    "evaluate": "components.evaluate:run_evaluate",
}


def get_step(name: str) -> Callable[[dict], dict]:
    """Import and return the function for a step, with a clear error for unknown names."""
    if name not in STEPS:
        raise KeyError(f"unknown step {name!r}; steps are: {', '.join(STEPS)}")
    module, func = STEPS[name].split(":")
    return getattr(importlib.import_module(module), func)
