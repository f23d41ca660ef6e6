#!/usr/bin/env bash
# The main job: the whole pipeline on the default dataset (amazon-scientific) through `dvc repro`.
# Extra arguments go to `sa2crq run`, e.g. `bash scripts/run.sh --dataset climate-fever`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source .venv/bin/activate
start=$(date +%s)
sa2crq run "$@"
echo "[run] wall time: $(( $(date +%s) - start )) s"
