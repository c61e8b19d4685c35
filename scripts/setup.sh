#!/usr/bin/env bash
# Create .venv and install s3delta_ds with its test extras.
# torch goes in first so everything else resolves against it: on the CPU machines this project is
# developed on, torch==2.13.0 is a local CPU wheel, while a bare `torch` requirement would pull a
# multi-GB CUDA build. GPU users: set TORCH_SPEC (e.g. TORCH_SPEC="torch==2.13.0") or pre-install.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -d .venv ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
python -m pip install -q -e ".[test]"
python -c "import torch, deepspeed, transformers; print('installed: torch', torch.__version__, '| deepspeed', deepspeed.__version__, '| transformers', transformers.__version__)"
