#!/usr/bin/env bash
# The project's test command (README and .ci/run): lint, then the whole suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
ruff check .
python -m pytest -q --durations=25 "$@"
