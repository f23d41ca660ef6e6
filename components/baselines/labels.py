"""The row names of the baselines in results, reports and the comparison: kept with the baselines, so a
baseline names its own row without importing the evaluation that runs it."""
from __future__ import annotations

# row names of baselines whose key is not their name (components/baselines/sasrec.py); the others keep their key
BASELINE_LABELS = {"sasrec": "SASRec", "sasrec_text": "SASRec + text"}


def baseline_label(name: str) -> str:
    """The row name of a baseline key in results, reports and the comparison."""
    return BASELINE_LABELS.get(name, name)
