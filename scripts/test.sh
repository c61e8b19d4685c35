#!/usr/bin/env bash
# The project's test command (README and .ci/run): lint, then the whole suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
ruff check .
# Two pytest workers, whole files each (module fixtures run once): measured on 2 cores, a test
# keeps ~1.3 cores busy on average (process start-up, rendezvous, single-rank stages), so a second
# file in parallel fills the idle time. S3DELTA_TEST_WORKERS=0 runs the suite in one process.
workers=${S3DELTA_TEST_WORKERS:-2}
if [ "$workers" = 0 ]; then
  python -m pytest -q --durations=25 "$@"
else
  python -m pytest -q --durations=25 -n "$workers" --dist loadfile "$@"
fi
