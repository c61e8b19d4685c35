"""Slurm glue: one ``srun`` task per node runs this module, which starts torchrun with the node's
ranks (``slurm/search.sh`` and ``slurm/retrain.sh`` do exactly that), and a hostfile generator
for ``deepspeed --num_nodes N --hostfile H``.

Why torchrun per node rather than ``deepspeed --launcher slurm``: DeepSpeed's slurm launcher needs
a hostfile anyway and does not set RANK/LOCAL_RANK (it falls back to MPI discovery). torchrun needs
only the first node's address, a port and this node's index, all of which Slurm provides.
The other robust pattern, one Slurm task per rank (``srun --ntasks-per-node=G python -m
s3delta_ds.search``), also works: ``engine.zero.init_distributed`` maps SLURM_PROCID/SLURM_LOCALID/
SLURM_NTASKS to RANK/LOCAL_RANK/WORLD_SIZE when MASTER_ADDR/MASTER_PORT are exported.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from ..errors import DistributedSetupError
from ..util import slurm_count

SCRIPTS = ("search", "retrain")


def hostnames(nodelist: str | None = None) -> list[str]:
    """Expand a Slurm node list (default: this job's) with ``scontrol show hostnames``."""
    nodelist = nodelist or os.environ.get("SLURM_JOB_NODELIST")
    if not nodelist:
        raise DistributedSetupError("no node list: run inside a Slurm allocation or pass one (e.g. 'gpu[01-04]')")
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as e:
        raise DistributedSetupError(f"cannot expand the node list {nodelist!r} with scontrol: {e}") from e
    hosts = [h for h in out.stdout.split() if h]
    if not hosts:
        raise DistributedSetupError(f"scontrol returned no hosts for {nodelist!r}")
    return hosts


def _int_env(name: str) -> int:
    value = os.environ[name]
    try:
        n = int(value)
    except ValueError:
        n = -1
    if n <= 0:
        raise DistributedSetupError(f"${name} must be a positive integer, got {value!r}")
    return n


def local_slots() -> int:
    """Ranks per node: $NPROC_PER_NODE, else the GPUs here, else $SLURM_GPUS_ON_NODE, else 2 (CPU)."""
    if os.environ.get("NPROC_PER_NODE"):
        return _int_env("NPROC_PER_NODE")
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.device_count() > 0:
            return torch.cuda.device_count()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    gpus = slurm_count(os.environ.get("SLURM_GPUS_ON_NODE"))  # "8", "a100:8", "8(x2)"; 0 = none
    return gpus if gpus is not None else 2


def hostfile(nodelist: str | None = None, slots: int | None = None) -> str:
    """DeepSpeed hostfile text (``host slots=N`` per line) for a Slurm allocation."""
    slots = slots or local_slots()
    return "".join(f"{h} slots={slots}\n" for h in hostnames(nodelist))


def master_port() -> int:
    """$S3DELTA_MASTER_PORT, else a port derived from the job id (every node computes the same one),
    in 20000-31999: below Linux's ephemeral range (32768+), where a busy node may already use it.
    Never an inherited $MASTER_PORT: sbatch passes the submitting shell's environment on, and a
    MASTER_PORT left there by an earlier torchrun would give every job on the node the same port."""
    if os.environ.get("S3DELTA_MASTER_PORT"):
        return _int_env("S3DELTA_MASTER_PORT")
    return 20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 12000


def run_args(script: str, args: list[str]) -> tuple[list[str], list[str]]:
    """The entry point's arguments for this start of the job, and what was added (to print).

    * Neither the config nor the overrides name an ``output_dir``: ``runs/<script>-<job id>``, one
      directory per job. A config's own ``output_dir`` is never overridden, unless it is the
      default ``runs/default`` that ``s3delta config`` writes into every template (every job of
      such a config, its search and its retrain, would share one directory).
    * A requeued job (``SLURM_RESTART_COUNT`` > 0: preemption, a node failure, ``scontrol
      requeue``) keeps its job id and its directory: when the directory's claim records this job
      id, it continues from the newest complete checkpoint (``--resume``), or starts over
      (``overwrite=true``) when the first attempt died before writing one. A directory another
      run claimed is left to the usual refusal.

    Raises:
        ConfigError: an unreadable config (the entry point would refuse it too).
    """
    import argparse

    import yaml

    from ..config import load_run_config
    from ..errors import ConfigError
    from ..util import read_run_claim
    from .checkpoint import CHECKPOINTS, latest_checkpoint

    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--config")
    p.add_argument("--resume", action="store_true")
    known, rest = p.parse_known_args(args)
    overrides = [a for a in rest if "=" in a and not a.startswith("-")]
    added: list[str] = []
    raw = {}
    if known.config:
        try:
            raw = yaml.safe_load(Path(known.config).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"cannot read config {known.config}: {e}") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"config {known.config} must be a YAML mapping at the top level")
    from ..config import RunConfig

    named = raw.get("output_dir") not in (None, RunConfig().output_dir)
    if not any(o.startswith("output_dir=") for o in overrides) and not named:
        added.append(f"output_dir=runs/{script}-{os.environ.get('SLURM_JOB_ID', '0')}")
    restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
    if not known.resume and restarts.isdigit() and int(restarts) > 0:
        out = Path(load_run_config(known.config, overrides + added).output_dir)
        claim = read_run_claim(out) or {}
        # only a directory this job claimed: never another run's that happens to sit at the path
        if claim.get("slurm_job_id") == os.environ.get("SLURM_JOB_ID"):
            added.append("--resume" if latest_checkpoint(out / CHECKPOINTS) is not None else "overwrite=true")
    return [*args, *added], added


def torchrun_command(script: str, args: list[str]) -> list[str]:
    """The torchrun command for this node of the job (run once per node by srun)."""
    if script not in SCRIPTS:
        raise DistributedSetupError(f"unknown entry point {script!r}; one of {', '.join(SCRIPTS)}")
    for var in ("SLURM_JOB_NODELIST", "SLURM_NNODES", "SLURM_NODEID"):
        if var not in os.environ:
            raise DistributedSetupError(f"{var} is not set: run this through srun inside sbatch/salloc")
    if os.environ.get("SLURM_LOCALID", "0") != "0":  # a second task on this node: a second torchrun
        raise DistributedSetupError(
            f"this is task {os.environ['SLURM_LOCALID']} on its node, and each node runs one torchrun: launch one "
            'task per node (srun --nodes="$SLURM_NNODES" --ntasks="$SLURM_NNODES" --ntasks-per-node=1)'
        )
    master = os.environ.get("MASTER_ADDR") or hostnames()[0]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        os.environ["SLURM_NNODES"],
        "--node_rank",
        os.environ["SLURM_NODEID"],
        "--nproc_per_node",
        str(local_slots()),
        "--master_addr",
        master,
        "--master_port",
        str(master_port()),
        "--max_restarts",
        "0",
        "--module",
        f"s3delta_ds.{script}",
        *args,
    ]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in SCRIPTS:
        print(
            f"usage: srun python -m s3delta_ds.run.slurm {{{','.join(SCRIPTS)}}} [--config C.yaml] [key=value ...]",
            file=sys.stderr,
        )
        return 2
    from ..errors import ConfigError

    try:
        args, added = run_args(argv[0], argv[1:])
        cmd = torchrun_command(argv[0], args)
    except (DistributedSetupError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if added and os.environ.get("SLURM_NODEID", "0") == "0":
        restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
        print(f"[s3delta slurm] start {int(restarts) + 1 if restarts.isdigit() else 1}: added {' '.join(added)}")
    # Fail fast instead of hanging when a peer dies: NCCL errors become exceptions.
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    print(
        f"[s3delta slurm] node {os.environ['SLURM_NODEID']}/{os.environ['SLURM_NNODES']}: {' '.join(cmd)}", flush=True
    )
    # `#SBATCH --signal=USR1@T` signals every process of the step: torchrun, which does not handle
    # SIGUSR1, would die of it and take the workers down before they checkpoint. An ignored signal
    # stays ignored across exec; the workers set their own handler while they train (run.signals).
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    os.execv(cmd[0], cmd)
    return 0  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
