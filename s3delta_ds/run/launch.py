"""Start the entry scripts under the DeepSpeed launcher from Python (``s3delta search --nproc N``,
``s3delta demo``): the same command a user would type, with a free rendezvous port."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ..util import free_port

SCRIPTS = {name: str(Path(__file__).resolve().parents[1] / f"{name}.py") for name in ("search", "retrain")}


def launcher_command(script: str, args: list[str], nproc: int, master_port: int | None = None) -> list[str]:
    return [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        str(nproc),
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
