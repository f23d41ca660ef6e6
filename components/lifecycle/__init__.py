"""A model's life after training: kept versions and the promotion journal that swaps the live one
(versions.py), the GTO model registry (registry.py). No flow: the retrain flow and the CLI (`sa2crq
promote`, `recover`, `versions`) call it, and it stands on runtime and the SID tables alone."""
