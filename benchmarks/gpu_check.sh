#!/usr/bin/env bash
# GPU check of s3delta_ds on one CUDA device: environment, CUDA unit tests, a 1-GPU search and a
# retrain, each writing its result under $OUT as soon as it finishes (docs/gpu-check.md).
#
#   bash benchmarks/gpu_check.sh --prepare-wheels .cache/gpu_wheels   # here, with PyPI: the missing wheels
#   bash benchmarks/gpu_check.sh [--wheels .cache/gpu_wheels]         # on the GPU machine (results in $OUT)
#   bash benchmarks/gpu_check.sh --dry-run --out /tmp/gc              # on a CPU: every stage in a tiny form
#
# Other options go to benchmarks/gpu_check.py (--budget-s, --work, --only). Exit code 0 when every
# stage passed.
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"

# Packages the GPU image lacks (checked against the device's package list, .library/device/KINDS.md):
# DeepSpeed and its pydantic stack, hjson; datasets (which reads the task files) with dill and
# multiprocess. typing-extensions is there but maybe older than pydantic needs; a newer one is harmless.
MISSING_BINARY=(hjson pydantic pydantic-core annotated-types typing-inspection typing-extensions datasets dill multiprocess)
DEVICE_PYTHON=3.12   # the GPU image's python3

if [[ -n "${PYTHON:-}" ]]; then PY="$PYTHON"
elif [[ -x "$ROOT/.venv/bin/python" ]]; then PY="$ROOT/.venv/bin/python"
else PY=python3
fi

prepare_wheels() {
    local dir="$1" specs=() name version
    mkdir -p "$dir"
    rm -f "$dir"/*.whl
    # Pin what the local environment has: the versions the test suite ran against.
    for name in "${MISSING_BINARY[@]}" deepspeed; do
        version="$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")" || {
            echo "gpu_check: $name is not installed in $PY; run scripts/setup.sh first" >&2
            return 2
        }
        [[ "$name" == deepspeed ]] && DS_VERSION="$version" || specs+=("$name==$version")
    done
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$DEVICE_PYTHON" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$dir" "${specs[@]}" || return 1
    # DeepSpeed publishes only an sdist. DS_BUILD_OPS=0 makes a pure-Python wheel (ops JIT-compile on
    # first use); --no-build-isolation lets its setup.py import the torch installed here.
    DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$dir" "deepspeed==$DS_VERSION" || return 1
    ls -1 "$dir"
    du -sh "$dir"
}

install_wheels() {
    # --no-deps into a separate folder: nothing already installed is touched or re-resolved (the
    # image's torch, pyarrow, fsspec stay), and the folder goes first on PYTHONPATH.
    local dir="$1" site="$2"
    "$PY" -m pip install -q --no-index --find-links "$dir" --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" "$dir"/*.whl
}

ARGS=() WHEELS="" DRY=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --prepare-wheels)
            [[ $# -ge 2 ]] || { echo "gpu_check: --prepare-wheels needs a directory" >&2; exit 2; }
            prepare_wheels "$2"; exit $? ;;
        --wheels)
            [[ $# -ge 2 ]] || { echo "gpu_check: --wheels needs a directory" >&2; exit 2; }
            WHEELS="$2"; shift 2 ;;
        --dry-run) DRY=1; ARGS+=("$1"); shift ;;
        -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
        *) ARGS+=("$1"); shift ;;
    esac
done

[[ -z "$WHEELS" && $DRY -eq 0 && -d "$ROOT/.cache/gpu_wheels" ]] && WHEELS="$ROOT/.cache/gpu_wheels"
if [[ -n "$WHEELS" ]]; then
    if [[ $DRY -eq 1 ]]; then
        echo "gpu_check: --dry-run uses the local environment; not installing the wheels in $WHEELS" >&2
    elif ! compgen -G "$WHEELS/*.whl" >/dev/null; then
        echo "gpu_check: no wheels in $WHEELS (make them with --prepare-wheels $WHEELS)" >&2; exit 2
    else
        SITE="${S3DELTA_GPU_SITE:-/tmp/s3delta_gpu_site}"
        t0=$SECONDS
        names="$(cd "$WHEELS" && ls -1 ./*.whl | sed 's|^\./||' | tr '\n' ' ')"
        if log="$(install_wheels "$WHEELS" "$SITE" 2>&1)"; then
            S3DELTA_GPU_WHEELS="${names}installed in $((SECONDS - t0))s into $SITE"
        else  # go on: 00-env reports this and names what cannot be imported
            S3DELTA_GPU_WHEELS="INSTALL FAILED: $(tail -n 3 <<<"$log" | tr '\n' ' ')| wheels: $names"
            echo "gpu_check: installing the wheels from $WHEELS failed: $log" >&2
        fi
        export S3DELTA_GPU_WHEELS PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PATH="$SITE/bin:$PATH"
    fi
fi

export PYTHONUNBUFFERED=1
exec "$PY" "$ROOT/benchmarks/gpu_check.py" "${ARGS[@]}"
