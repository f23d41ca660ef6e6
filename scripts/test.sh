#!/usr/bin/env bash
# The test suite (smoke-sized data, few epochs; under 10 minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source .venv/bin/activate
export WANDB_MODE=${WANDB_MODE:-disabled}
exec python -m pytest -q "$@"
