#!/usr/bin/env bash
# The test suite in two tiers: ruff, lint-imports and the fast tier (unit and property tests, about 2 minutes), then the
# slow tier (real training: the smoke pipeline, cornac SASRec, DDP). Under 10 minutes on 2 cores in all.
#   bash scripts/test.sh              lint (ruff, import layers), fast tier, slow tier (what CI runs)
#   bash scripts/test.sh fast         lint and the fast tier only
#   bash scripts/test.sh slow         the slow tier only
#   bash scripts/test.sh [tier] ARGS  ARGS go to pytest, e.g. `bash scripts/test.sh fast -k sarq`
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --data   # the tests read amazon-scientific and climate-fever, whatever params.yaml's dataset
source .venv/bin/activate
export WANDB_MODE=${WANDB_MODE:-disabled}
tier=all
case "${1:-}" in fast|slow|all) tier=$1; shift ;; esac

pytest_tier() {  # a tier that ARGS leave empty is not a failure (pytest exit 5: no tests collected)
  local rc=0
  python -m pytest -q -m "$1" "${@:2}" || rc=$?
  [ "$rc" -eq 5 ] && rc=0
  return "$rc"
}

if [ "$tier" != slow ]; then
  echo "[test] ruff check"
  ruff check .
  echo "[test] lint-imports (the layers in pyproject.toml [tool.importlinter], no import cycle)"
  lint-imports --no-logo
  echo "[test] fast tier"
  pytest_tier "not slow" "$@"
fi
if [ "$tier" != fast ]; then
  echo "[test] slow tier"
  pytest_tier slow "$@"
fi
