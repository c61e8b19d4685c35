"""A real one-node Slurm cluster for tests: munged, slurmctld and slurmd from Debian's slurm-wlm
and munge packages, all as root, with ports, sockets, state and logs in a temporary directory.

``.ci/run`` installs the packages. Without them the Slurm tests skip, unless
S3DELTA_REQUIRE_SLURM=1 (set by .ci/run), where they fail.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from s3delta_ds.util import free_port

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "sinfo", "scontrol")

# The shipped scripts ask for GPUs (#SBATCH --gpus-per-node=8 --cpus-per-task=64); this cluster has
# none and few CPUs. Options on the sbatch command line override the script's #SBATCH lines, and
# --gpus-per-node=0 is the form a cluster without GRES accepts (--gres=none, --gres=gpu:0 and
# --gpus=0 are rejected: "Invalid generic resource (gres) specification").
CPU_ONLY = ["--gpus-per-node=0", "--cpus-per-task=2"]


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]


class SlurmCluster:
    def __init__(self, root: Path):
        self.root = root
        self.run_dir = root / "run"
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.host = socket.gethostname()

    def _exe(self, name: str) -> str:
        return shutil.which(name) or str(Path("/usr/sbin", name))

    def start(self) -> None:
        for d in ("run", "state", "spool", "log"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        self.run_dir.chmod(0o755)
        key = self.root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        sock = self.run_dir / "munge.sock"
        subprocess.run(
            [
                self._exe("munged"),
                "--force",
                f"--key-file={key}",
                f"--socket={sock}",
                f"--pid-file={self.run_dir / 'munged.pid'}",
                f"--log-file={self.root / 'log' / 'munged.log'}",
                f"--seed-file={self.run_dir / 'munged.seed'}",
            ],
            check=True,
        )
        r = self.root
        self.conf.write_text(
            "\n".join(
                [
                    "ClusterName=s3delta-test",
                    f"SlurmctldHost={self.host}",
                    f"SlurmctldPort={free_port('')}",
                    f"SlurmdPort={free_port('')}",
                    "SlurmUser=root",
                    "SlurmdUser=root",
                    "AuthType=auth/munge",
                    f"AuthInfo=socket={sock}",
                    "CredType=cred/munge",
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_Core",
                    "SchedulerType=sched/backfill",
                    "MpiDefault=none",
                    "ReturnToService=2",
                    "KillWait=5",
                    f"StateSaveLocation={r / 'state'}",
                    f"SlurmdSpoolDir={r / 'spool'}",
                    f"SlurmctldPidFile={self.run_dir / 'slurmctld.pid'}",
                    f"SlurmdPidFile={self.run_dir / 'slurmd.pid'}",
                    f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
                    f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
                    "JobCompType=jobcomp/none",
                    "AccountingStorageType=accounting_storage/none",
                    "JobAcctGatherType=jobacct_gather/none",
                    f"NodeName={self.host} CPUs={os.cpu_count()} State=UNKNOWN",
                    "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
                    "",
                ]
            )
        )
        subprocess.run([self._exe("slurmctld"), "-f", str(self.conf)], check=True, env=self.env)
        subprocess.run([self._exe("slurmd"), "-f", str(self.conf)], check=True, env=self.env)
        deadline = time.time() + 60
        while time.time() < deadline:
            out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, env=self.env).stdout
            if out.strip() in ("idle", "mix", "alloc"):
                return
            time.sleep(0.5)
        raise RuntimeError(f"slurm did not come up: sinfo says {out!r}; logs in {self.root / 'log'}")

    def sbatch(self, args: list[str], *, cwd: Path, env: dict | None = None, timeout: int = 900):
        """``sbatch --wait`` → CompletedProcess (returncode = the job's exit code)."""
        return subprocess.run(
            ["sbatch", "--wait", *args],
            cwd=cwd,
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def stop(self) -> None:
        """Stop the daemons by their pids (slurmd, slurmctld, then munged)."""
        for name in ("slurmd", "slurmctld", "munged"):
            pid_file = self.run_dir / f"{name}.pid"
            if not pid_file.exists():
                continue
            pid = int(pid_file.read_text().split()[0])
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            for _ in range(100):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            else:
                os.kill(pid, signal.SIGKILL)
