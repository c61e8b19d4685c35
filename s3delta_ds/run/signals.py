"""Stop at the next step boundary when the scheduler asks, after writing a checkpoint.

Slurm sends SIGTERM when it preempts or cancels a job (SIGKILL follows after ``KillWait``, 30 s by
default; torchrun forwards SIGTERM to its workers and also kills them 30 s later), and, with
``#SBATCH --signal=USR1@T``, SIGUSR1 T seconds before the time limit. Without this, every step since
the last periodic checkpoint was lost. A rank that receives either signal latches it; after each
step the ranks agree (one all-reduce of the latched signal), the step's checkpoint is written (the
trainable state only: seconds even beside a 70B backbone) and the loop returns as ``stop_after``
does. After SIGUSR1 inside a Slurm job, rank 0 requeues the job (``scontrol requeue``), and the
requeued start resumes the checkpoint by itself (:func:`run.slurm.run_args`);
``S3DELTA_REQUEUE=0`` leaves that to the user.

A stopped launch exits with :data:`EXIT_STOPPED` (75, sysexits' EX_TEMPFAIL: "try again"), never 0:
Slurm would record the job COMPLETED and start the jobs that depend on it with ``afterok`` (the
retrain after the search) on a run that has no structure yet. torchrun reports any non-zero worker
exit as its own exit code 1; the DeepSpeed launcher passes the 75 on.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading

from ..engine import zero
from ..errors import RunStopped

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
EXIT_STOPPED = 75


class StopRequest:
    """Latches :data:`STOP_SIGNALS` while a training loop runs (a context manager; the previous
    handlers come back on exit, so the Python API leaves a notebook's handlers as they were).
    Handlers can only be set from the main thread: elsewhere nothing is latched."""

    def __init__(self) -> None:
        self.received = 0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._latch)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _latch(self, signum: int, frame) -> None:
        self.received = self.received or signum

    def agreed(self) -> int:
        """The signal any rank received (0: none). Collective: every rank calls it after every step."""
        return zero.max_over_ranks(self.received)


def stop_note(signum: int, step: int) -> str:
    name = signal.Signals(signum).name
    return f"{name} received: stopped at step {step} after writing its checkpoint; continue with --resume"


def stopped(signum: int, step: int, is_main: bool, log) -> RunStopped:
    """After the step's checkpoint: say so, requeue the Slurm job where that is asked for, and
    return the error the loop raises (the launch exits with :data:`EXIT_STOPPED`)."""
    note = stop_note(signum, step)
    log(note)
    requeue_after(signum, is_main, log)
    # Every rank waits for rank 0's requeue: a rank that exited first would make the launcher
    # (torchrun, DeepSpeed's, srun --kill-on-bad-exit) kill rank 0 with its scontrol mid-call.
    zero.barrier()
    return RunStopped(note, signum, step)


def requeue_after(signum: int, is_main: bool, log) -> None:
    """After SIGUSR1 (the time limit is near) in a Slurm job: requeue it, on rank 0. A preempted job
    (SIGTERM) is requeued, or not, by Slurm's own policy."""
    job = os.environ.get("SLURM_JOB_ID")
    if signum != signal.SIGUSR1 or not job or not is_main or os.environ.get("S3DELTA_REQUEUE", "1") == "0":
        return
    try:
        proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        log(f"could not requeue job {job} ({e}): submit again with --resume")
        return
    if proc.returncode == 0:
        log(f"requeued job {job}: its next start resumes this checkpoint")
    else:
        log(f"scontrol requeue {job} failed ({proc.stderr.strip()}): submit again with --resume")
