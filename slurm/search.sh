#!/usr/bin/env bash
#SBATCH --job-name=s3delta-search
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=2
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
##SBATCH --gres=gpu:8            # GPU clusters: uncomment (one torchrun per node starts one rank per GPU)
#
# Search a structure across nodes, ZeRO-3 by default:
#   sbatch [--nodes N] slurm/search.sh CONFIG.yaml [MODEL] [DS_CONFIG] [section.key=value ...]
#     MODEL       model dir or hub id (default: the config's model.name_or_path)
#     DS_CONFIG   zero3 | zero3_offload | zero2 | zero3_cpu | path.json (default zero3)
# Environment (passed through): OUTPUT_DIR (default runs/search-<jobid>), NPROC_PER_NODE (default:
# GPUs per node, else 2), MASTER_PORT (default: from the job id), S3DELTA_VENV (a virtualenv to
# activate). Add --resume to continue a run from its newest checkpoint.
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: sbatch slurm/search.sh CONFIG.yaml [MODEL] [DS_CONFIG] [section.key=value ...]" >&2
  exit 2
fi
[ -n "${S3DELTA_VENV:-}" ] && source "$S3DELTA_VENV/bin/activate"
config=$1; model=${2:-}; ds=${3:-zero3}
shift $(( $# < 3 ? $# : 3 ))
args=(--config "$config" deepspeed="$ds" output_dir="${OUTPUT_DIR:-runs/search-$SLURM_JOB_ID}")
[ -n "$model" ] && args+=(model.name_or_path="$model")
export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
echo "[s3delta] job $SLURM_JOB_ID: $SLURM_NNODES node(s), master $MASTER_ADDR; search ${args[*]} $*"
srun --kill-on-bad-exit=1 --ntasks-per-node=1 python -m s3delta_ds.slurm search "${args[@]}" "$@"
