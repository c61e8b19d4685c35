#!/usr/bin/env bash
# ---- the lines to edit for your cluster ---------------------------------------------------------
# sbatch reads the #SBATCH lines below without running bash, so they cannot use variables. Edit
# them here, or override any of them when submitting (options on the sbatch command line win):
#   sbatch --nodes=4 --gpus-per-node=4 --cpus-per-task=32 --partition=gpu slurm/search.sh ...
#   --gpus-per-node  GPUs on each node: one torchrun per node starts one rank per GPU. Sites that
#                    count GPUs as generic resources write --gres=gpu:8 instead (replace the line).
#   --cpus-per-task  CPUs of the node's one task, shared by its ranks: about 8 per GPU (data
#                    loading; the optimizer step with zero3_offload).
#   --time; add --partition, --account or --mem where the site needs them.
#   --signal=USR1@300: five minutes before the time limit every rank finishes its step, writes a
#                    checkpoint and the job requeues itself (S3DELTA_REQUEUE=0: it just stops);
#                    a preemption's SIGTERM writes the checkpoint the same way.
#SBATCH --job-name=s3delta-search
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=USR1@300
#SBATCH --requeue
# -------------------------------------------------------------------------------------------------
#
# Search a structure across nodes:
#   sbatch [--nodes N] slurm/search.sh CONFIG.yaml [MODEL] [DS_CONFIG] [section.key=value ...] [--resume]
#     MODEL       model dir or hub id (default: the config's model.name_or_path; "" to skip)
#     DS_CONFIG   auto | zero2 | zero3 | zero3_offload | zero3_cpu | zero3_multinode | path.json
#                 (default: the config's `deepspeed`, which is auto unless the YAML sets it: ZeRO-2
#                 when the frozen backbone fits next to the trainable state on a GPU, ZeRO-3
#                 otherwise)
#     MODEL and DS_CONFIG are read until the first section.key=value or --flag; a DS_CONFIG name
#     (or a .json holding zero_optimization) in MODEL's place is the DS_CONFIG.
# Environment (passed through): OUTPUT_DIR (default: the config's output_dir, else
# runs/search-<jobid>), NPROC_PER_NODE (default: GPUs per node, else 2), S3DELTA_MASTER_PORT
# (default: from the job id; an inherited MASTER_PORT is ignored), S3DELTA_MASTER_ADDR (default: the
# job's first node), S3DELTA_VENV (a virtualenv to activate).
# A requeued job (preemption, node failure) resumes from its newest checkpoint by itself. To continue
# a run in a new job, point OUTPUT_DIR (or the config's output_dir) at its directory and add --resume.
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: sbatch slurm/search.sh CONFIG.yaml [MODEL] [DS_CONFIG] [section.key=value ...]" >&2
  exit 2
fi
[ -n "${S3DELTA_VENV:-}" ] && source "$S3DELTA_VENV/bin/activate"
config=$1; model=""; ds=""
shift
is_ds_config() {  # `sbatch slurm/x.sh FILE zero3` used to load a model called zero3
  case $1 in
    auto | zero2 | zero3 | zero3_offload | zero3_cpu | zero3_multinode) return 0 ;;
    *.json) [ -f "$1" ] && grep -q '"zero_optimization"' "$1" ;;
    *) return 1 ;;
  esac
}
if [ $# -gt 0 ] && [[ $1 != *=* && $1 != -* ]]; then
  if is_ds_config "$1"; then ds=$1; else model=$1; fi
  shift
fi
if [ -z "$ds" ] && [ $# -gt 0 ] && [[ $1 != *=* && $1 != -* ]]; then ds=$1; shift; fi
args=(--config "$config")
[ -n "${OUTPUT_DIR:-}" ] && args+=(output_dir="$OUTPUT_DIR")
[ -n "$model" ] && args+=(model.name_or_path="$model")
# Without DS_CONFIG the run config's `deepspeed` decides (auto picks the strategy for the model).
[ -n "$ds" ] && args+=(deepspeed="$ds")
# The first node of this job, unless S3DELTA_MASTER_ADDR names another: a MASTER_ADDR left in the
# submitting shell (sbatch passes the environment on) would point torchrun at a stale host.
export MASTER_ADDR=${S3DELTA_MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
echo "[s3delta] job $SLURM_JOB_ID: $SLURM_NNODES node(s), master $MASTER_ADDR; search ${args[*]} $*"
# One task per node; that task runs torchrun for the node's ranks; any failing task ends the job.
# Slurm 22.05-23.02's srun does not inherit the job's --cpus-per-task: without it the step would
# get one CPU per task, shared by all of the node's ranks.
# --nodes/--ntasks too: an sbatch --ntasks-per-node=8 (a GPU-job habit) would otherwise make srun
# start 8 torchruns per node, all but one failing on the rendezvous port.
# --export=ALL: under sbatch --export=NONE, srun inherits SLURM_EXPORT_ENV=NONE and would start the
# ranks without the virtualenv and the variables set above
step=(--export=ALL --kill-on-bad-exit=1 --nodes="$SLURM_NNODES" --ntasks="$SLURM_NNODES" --ntasks-per-node=1)
[ -n "${SLURM_CPUS_PER_TASK:-}" ] && step+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
srun "${step[@]}" python -m s3delta_ds.run.slurm search "${args[@]}" "$@"
