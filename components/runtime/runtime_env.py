"""Offline-first environment defaults, set before heavy imports (see shared/docs/OFFLINE.md)."""
from __future__ import annotations

import os
from pathlib import Path

_DEFAULTS = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_UI_ENABLED": "false",
    "PREFECT_LOGGING_LEVEL": "WARNING",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
}


def set_offline_defaults(root: str | os.PathLike = ".") -> None:
    """Set offline defaults unless the user already chose a value (setdefault semantics)."""
    root = Path(root).resolve()
    for key, value in _DEFAULTS.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("PREFECT_HOME", str(root / ".prefect"))
    wandb_dir = root / "runs" / "wandb"  # W&B's own cache and settings; runs go under out_dir (paths.wandb_dir)
    for key in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        os.environ.setdefault(key, str(wandb_dir))
