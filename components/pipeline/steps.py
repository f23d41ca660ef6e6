"""Step names and the functions behind them: DVC stages, flows and the CLI read this one table.
Each entry imports its module when it is called, with a plain import: `sa2crq --help` names the
steps without loading torch, and no layer finds another through strings. The names and their order
are components/runtime/step_names.py (the params schema checks `flows.pipeline.start` / `stop`
against them without importing this table); a step is a function here named there."""
from __future__ import annotations

from collections.abc import Callable

from components.runtime.step_names import STEP_NAMES


def prepare(params: dict) -> dict:
    """components.data.prepare.run_prepare: the dataset -> contract tables with head / tail / cold labels."""
    from components.data.prepare import run_prepare

    return run_prepare(params)


def embed(params: dict) -> dict:
    """components.data.embed.run_embed: frozen MiniLM vectors of items and text queries."""
    from components.data.embed import run_embed

    return run_embed(params)


def train_head(params: dict) -> dict:
    """components.tokenizers.tokenizer_stages.run_train_head: Stage 1, the head tokenizer."""
    from components.tokenizers.tokenizer_stages import run_train_head

    return run_train_head(params)


def train_tail(params: dict) -> dict:
    """components.tokenizers.tokenizer_stages.run_train_tail: Stage 2, the tail on frozen head anchors."""
    from components.tokenizers.tokenizer_stages import run_train_tail

    return run_train_tail(params)


def assign_ids(params: dict) -> dict:
    """components.tokenizers.tokenizer_stages.run_assign_ids: every item's SID, and the SID statistics."""
    from components.tokenizers.tokenizer_stages import run_assign_ids

    return run_assign_ids(params)


def train_retriever(params: dict) -> dict:
    """components.retrieval.retriever_train.run_train_retriever: the generative retriever, best validation epoch."""
    from components.retrieval.retriever_train import run_train_retriever

    return run_train_retriever(params)


def evaluate(params: dict) -> dict:
    """components.evaluation.evaluate.run_evaluate: the retriever and the baselines on the test split."""
    from components.evaluation.evaluate import run_evaluate

    return run_evaluate(params)


STEPS: dict[str, Callable[[dict], dict]] = {name: globals()[name] for name in STEP_NAMES}
