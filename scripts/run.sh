#!/usr/bin/env bash
# The main job: the whole pipeline on the default dataset (amazon-scientific) through `dvc repro`.
# Extra arguments go to `sa2crq run`, e.g. `bash scripts/run.sh --dataset climate-fever`.
set -euo pipefail
cd "$(dirname "$0")/.."
# the built-in data is pulled when this run reads it: params.yaml's dataset, or the one named here
setup=()
prev=""
for arg in "$@"; do
  [ "$prev" = --dataset ] && setup=(--dataset "$arg")
  case "$arg" in --dataset=*|dataset=*) setup=(--dataset "${arg#*=}") ;; esac   # --dataset=D, -s dataset=D
  prev=$arg
done
bash scripts/setup.sh ${setup[@]+"${setup[@]}"}
source .venv/bin/activate
start=$(date +%s)
sa2crq run "$@"
echo "[run] wall time: $(( $(date +%s) - start )) s"
