#!/usr/bin/env bash
# Packaging check (run by .ci/run): build the wheel, install it into a fresh virtualenv outside the
# repository, and run a short search and a retrain of the embedded task from there. An editable
# install reads files from the checkout and hides missing package data (the ds_configs/ templates
# once were); this cannot.
#   bash scripts/wheel_check.sh            # TORCH_SPEC overrides the torch requirement as in setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
work=$(mktemp -d "${TMPDIR:-/tmp}/s3delta-wheel.XXXXXX")
trap 'rm -rf "$work"' EXIT
PY=${PYTHON:-python3}

"$PY" -m venv "$work/venv"
. "$work/venv/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
# build from a copy: setuptools writes build/ next to the sources, and the checkout stays clean
mkdir "$work/src"
tar -C "$repo" --exclude=./.venv --exclude=./.git --exclude=./runs --exclude=./.cache --exclude=./build -cf - . |
  tar -C "$work/src" -xf -
python -m pip wheel -q --no-deps -w "$work/dist" "$work/src"
python -m pip install -q "$work"/dist/s3delta_ds-*.whl

cd "$work"  # nothing of the checkout is importable from here
python - <<'EOF'
import s3delta_ds, pathlib
where = pathlib.Path(s3delta_ds.__file__).resolve()
assert "site-packages" in where.parts, f"s3delta_ds imported from {where}, not from the installed wheel"
print(f"installed wheel: s3delta_ds {s3delta_ds.__version__} at {where.parent}")
EOF
export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$repo/.cache/torch_extensions}
short=(search.steps=4 search.eval_every=2 search.budget=0.02 retrain.steps=4 retrain.eval_every=2
       data.max_train_examples=64 data.max_eval_examples=32 deepspeed=zero3_cpu)
s3delta search --nproc 2 "${short[@]}" output_dir=runs/search   # the launcher path, from site-packages
s3delta retrain "${short[@]}" retrain.structure=runs/search/structure.json output_dir=runs/retrain
python - <<'EOF'
import json
s = json.load(open("runs/search/summary.json"))
r = json.load(open("runs/retrain/summary.json"))
assert s["modules"] > 0 and r["trainable_params"] == s["params_used"], (s, r)
print(f"wheel check passed: searched {s['modules']} modules ({s['params_used']:,} parameters), "
      f"retrained test {r['metric']} {r['test_score']:.3f}")
EOF
