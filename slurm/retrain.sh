#!/usr/bin/env bash
#SBATCH --job-name=s3delta-retrain
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=2
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
##SBATCH --gres=gpu:8            # GPU clusters: uncomment (one torchrun per node starts one rank per GPU)
#
# Retrain a structure across nodes, ZeRO-3 by default:
#   sbatch [--nodes N] slurm/retrain.sh STRUCTURE.json [MODEL] [DS_CONFIG] [section.key=value ...]
#     MODEL       model dir or hub id (default: the run config's model.name_or_path)
#     DS_CONFIG   zero3 | zero3_offload | zero2 | zero3_cpu | path.json (default zero3)
# Environment (passed through): CONFIG (a YAML run config), OUTPUT_DIR (default runs/retrain-<jobid>),
# NPROC_PER_NODE (default: GPUs per node, else 2), MASTER_PORT (default: from the job id),
# S3DELTA_VENV (a virtualenv to activate).
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: sbatch slurm/retrain.sh STRUCTURE.json [MODEL] [DS_CONFIG] [section.key=value ...]" >&2
  exit 2
fi
[ -n "${S3DELTA_VENV:-}" ] && source "$S3DELTA_VENV/bin/activate"
structure=$1; model=${2:-}; ds=${3:-zero3}
shift $(( $# < 3 ? $# : 3 ))
args=(retrain.structure="$structure" deepspeed="$ds" output_dir="${OUTPUT_DIR:-runs/retrain-$SLURM_JOB_ID}")
[ -n "$model" ] && args+=(model.name_or_path="$model")
[ -n "${CONFIG:-}" ] && args=(--config "$CONFIG" "${args[@]}")
export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
echo "[s3delta] job $SLURM_JOB_ID: $SLURM_NNODES node(s), master $MASTER_ADDR; retrain ${args[*]} $*"
# one task per node; that task runs torchrun for the node's ranks; any failing task ends the job
srun --kill-on-bad-exit=1 --ntasks-per-node=1 python -m s3delta_ds.slurm retrain "${args[@]}" "$@"
