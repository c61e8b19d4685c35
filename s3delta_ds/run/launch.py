"""Start the entry scripts under the DeepSpeed launcher from Python (``s3delta search --nproc N``,
``s3delta demo``): the same command a user would type, with a free rendezvous port."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ..errors import DistributedSetupError
from ..util import free_port

SCRIPTS = {name: str(Path(__file__).resolve().parents[1] / f"{name}.py") for name in ("search", "retrain")}


def device_selection(nproc: int, visible: str | None, cuda: bool) -> list[str]:
    """The launcher's flags for ``nproc`` local ranks. ``--num_gpus N`` makes the DeepSpeed launcher
    drop CUDA_VISIBLE_DEVICES and start on devices 0..N-1: a user who set CUDA_VISIBLE_DEVICES=2,3
    to keep off a colleague's GPUs 0 and 1 landed on them. With visible devices, ``--include``
    names the first ``nproc`` of them instead (the launcher reads that as physical ids).

    Raises:
        DistributedSetupError: more ranks than visible devices, or devices named by UUID or MIG id,
            which the DeepSpeed launcher cannot select (torchrun keeps CUDA_VISIBLE_DEVICES as is).
    """
    ids = [d.strip() for d in (visible or "").split(",") if d.strip()]
    if not cuda or not ids:  # the CPU accelerator ignores CUDA_VISIBLE_DEVICES; none set: all devices
        return ["--num_gpus", str(nproc)]
    if not all(d.isdigit() for d in ids):
        raise DistributedSetupError(
            f"CUDA_VISIBLE_DEVICES={visible} names devices by UUID or MIG id, which the DeepSpeed launcher "
            f"cannot select: use integer ids, or start the ranks with torchrun --nproc_per_node {nproc} "
            "-m s3delta_ds.search (or s3delta_ds.retrain)"
        )
    if nproc > len(ids):
        raise DistributedSetupError(
            f"--nproc {nproc} but CUDA_VISIBLE_DEVICES={visible} makes {len(ids)} device(s) visible: "
            f"use --nproc {len(ids)} or make more devices visible"
        )
    return ["--include", f"localhost:{','.join(ids[:nproc])}"]


def _cuda() -> bool:
    """Whether the launcher will pick the CUDA accelerator (DeepSpeed's own choice, without importing it)."""
    if os.environ.get("DS_ACCELERATOR", "cuda") != "cuda":
        return False
    import torch

    return torch.cuda.is_available()


def launcher_command(script: str, args: list[str], nproc: int, master_port: int | None = None) -> list[str]:
    return [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        *device_selection(nproc, os.environ.get("CUDA_VISIBLE_DEVICES"), _cuda()),
        "--master_port",
        str(master_port or free_port()),
        SCRIPTS[script],
        *args,
    ]


def launch(script: str, args: list[str], nproc: int) -> int:
    """Run ``script`` on ``nproc`` local ranks; returns the launcher's exit code."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.call(launcher_command(script, args, nproc), env=env)
