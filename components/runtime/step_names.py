"""The pipeline's step names, in run order. The params schema checks `flows.pipeline.start` / `stop`
against them without importing a step; components/pipeline/steps.py builds its table from them."""
from __future__ import annotations

STEP_NAMES: tuple[str, ...] = ("prepare", "embed", "train_head", "train_tail", "assign_ids", "train_retriever",
                               "evaluate")
