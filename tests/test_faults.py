"""Fault behaviour: a rank killed with SIGKILL ends the whole job (non-zero, within 60 s) instead of
leaving its peers hanging in a collective, and ``--resume`` then finishes with exactly the
uninterrupted run's gates (bit for bit), deltas and metrics rows. Also the multi-"node" launch without ssh (``--no_ssh
--node_rank``) on one machine."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from .launching import ROOT, TINY, alphas, command, deltas, env, free_port, max_diff, run

pytestmark = pytest.mark.distributed

FAULT = [
    *TINY,
    "search.steps=16",
    "search.eval_every=16",
    "search.checkpoint_every=2",
    "search.micro_batch_size=2",
    "zero_stage=3",
]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference")
    run("deepspeed", "search", [*FAULT, f"output_dir={out}"])
    return out


def _rank_pid(out: Path, rank: int) -> int | None:
    """The pid of the worker process of ``rank`` of the run writing to ``out``."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if (
            f"output_dir={out}".encode() in cmdline
            and f"RANK={rank}".encode() in environ
            and any(b"search" in c for c in cmdline)
            and b"torch.distributed.run" not in cmdline
            and b"deepspeed.launcher.runner" not in cmdline
        ):
            if not any(c.startswith(b"--world_info") for c in cmdline):  # not deepspeed's per-node launcher
                return int(pid)
    return None


@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun"])
def test_killed_rank_ends_the_job_and_resume_matches(launcher, reference, tmp_path):
    out = tmp_path / "run"
    args = [*FAULT, f"output_dir={out}"]
    log = (tmp_path / "log.txt").open("w")
    proc = subprocess.Popen(
        command(launcher, "search", args),
        env=env(),
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 300
        while not (out / "checkpoints" / "step-00000004" / "COMPLETE").exists():
            assert proc.poll() is None, (tmp_path / "log.txt").read_text()[-3000:]
            assert time.time() < deadline, "no checkpoint at step 4 within 300 s"
            time.sleep(0.1)
        pid = _rank_pid(out, 1)
        assert pid is not None, "could not find rank 1"
        os.kill(pid, signal.SIGKILL)
        killed = time.time()
        rc = proc.wait(timeout=120)
        elapsed = time.time() - killed
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    assert rc != 0, "the job must fail when a rank dies"
    assert elapsed < 60, f"the job took {elapsed:.1f}s to exit after a rank died"
    assert not (out / "structure.json").exists()

    run(launcher, "search", ["--resume", *args])
    ours, ref = json.loads((out / "structure.json").read_text()), json.loads((reference / "structure.json").read_text())
    assert [(m["site"], m["type"]) for m in ours["modules"]] == [(m["site"], m["type"]) for m in ref["modules"]]
    # on the same ranks the resumed run is the uninterrupted one, bit for bit (gates) and to 1e-7
    # (deltas): the checkpoint holds the trainable state, both data streams and every rank's RNG
    assert torch.equal(alphas(out), alphas(reference))
    supernet = "supernet_deltas.safetensors"
    assert max_diff(deltas(out / supernet), deltas(reference / supernet)) < 1e-7
    # the rows the killed launch wrote after its checkpoint are replaced, not duplicated
    assert _rows(out) == _rows(reference)


def _rows(run_dir: Path) -> list[tuple]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["phase"], round(r.get("delta_loss", r.get("loss", 0.0)), 4)) for r in rows]


def test_two_nodes_without_ssh_on_one_machine(tmp_path):
    """``deepspeed --hostfile H --no_ssh --node_rank i``: one launcher per "node" (here both local)."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    out = tmp_path / "run"
    port = str(free_port())
    base = [*TINY, "search.micro_batch_size=2", f"output_dir={out}"]
    script = str(ROOT / "s3delta_ds" / "search.py")

    def node(rank: int) -> subprocess.Popen:
        cmd = command("deepspeed", "search", [])[:3] + [
            "--hostfile",
            str(hostfile),
            "--no_ssh",
            "--node_rank",
            str(rank),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            port,
            script,
            *base,
        ]
        return subprocess.Popen(cmd, env=env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    nodes = [node(1), node(0)]
    outputs = [p.communicate(timeout=600)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], outputs[1][-3000:] + outputs[0][-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["zero_stage"] == 3


def test_a_non_finite_loss_on_one_rank_stops_every_rank_together(tmp_path):
    """Rank 1's loss alone is NaN: both ranks raise TrainingError in the gate pass and in the delta
    pass, at once (the finiteness rides on an all-reduce), instead of rank 0 blocking in the next
    collective until the process group's 60 s timeout."""
    out = tmp_path / "report"
    run("torchrun", str(ROOT / "tests" / "distributed" / "nonfinite_probe.py"), [str(out)], 2, timeout=300)
    for rank in (0, 1):
        report = json.loads(Path(f"{out}.rank{rank}.json").read_text())
        for phase in ("gate", "delta"):
            assert report[phase]["error"] == "TrainingError", (rank, phase, report)
            assert "non-finite loss" in report[phase]["message"]
            assert report[phase]["seconds"] < 30, (rank, phase, report)


def test_sigterm_writes_a_checkpoint_at_the_next_step(tmp_path):
    """Preemption (Slurm's SIGTERM, which torchrun forwards to its workers): the ranks agree on the
    next step, write its checkpoint and leave, so no step since the last periodic checkpoint is
    lost (here there is none before the end). Resuming a checkpoint of any step is the
    uninterrupted run: test_killed_rank_ends_the_job_and_resume_matches."""
    out = tmp_path / "run"
    args = [*FAULT, f"output_dir={out}", "search.checkpoint_every=0"]  # a checkpoint only at evaluations (16)
    log_path = tmp_path / "log.txt"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            command("torchrun", "search", args), env=env(), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            deadline = time.time() + 300
            while not _logged_step(out, 3):
                assert proc.poll() is None, log_path.read_text()[-3000:]
                assert time.time() < deadline, "no step 3 within 300 s"
                time.sleep(0.1)
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    text = log_path.read_text()
    saved = sorted(p.name for p in (out / "checkpoints").glob("step-*") if (p / "COMPLETE").exists())
    assert len(saved) == 1, (saved, text[-3000:])
    step = int(saved[0].removeprefix("step-"))
    assert 3 <= step < 16 and f"SIGTERM received: stopped at step {step}" in text
    assert not (out / "structure.json").exists()
    state = torch.load(out / "checkpoints" / saved[0] / "state.pt", map_location="cpu", weights_only=False)
    assert state["step"] == state["client"]["state"]["step"] == step


def _logged_step(out: Path, step: int) -> bool:
    metrics = out / "metrics.jsonl"
    try:
        return any(json.loads(line).get("step", 0) >= step for line in metrics.read_text().splitlines() if line)
    except (OSError, json.JSONDecodeError):
        return False


def test_sigusr1_in_a_slurm_job_requeues_it(tmp_path, monkeypatch):
    """--signal=USR1@T: after the checkpoint, rank 0 requeues its own job (the requeued start resumes)."""
    from s3delta_ds.run.signals import requeue_after

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" > {tmp_path / "called"}\n')
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    said = []
    requeue_after(signal.SIGTERM, True, said.append)  # preemption: Slurm's policy decides
    requeue_after(signal.SIGUSR1, False, said.append)  # not rank 0
    assert not (tmp_path / "called").exists() and said == []
    requeue_after(signal.SIGUSR1, True, said.append)
    assert (tmp_path / "called").read_text() == "requeue 77\n" and "requeued job 77" in said[0]
    monkeypatch.setenv("S3DELTA_REQUEUE", "0")
    (tmp_path / "called").unlink()
    requeue_after(signal.SIGUSR1, True, said.append)
    assert not (tmp_path / "called").exists()


def test_a_signal_stopped_launch_exits_75_and_resumes_to_the_end(tmp_path):
    """SIGUSR1 (the time limit is near) reaches the worker alone, as under Slurm's --signal (the
    launcher ignores it): the launch checkpoints and exits with 75, never 0, so a job chained with
    afterok does not start on a search without a structure; --resume then finishes with 0."""
    out = tmp_path / "run"
    args = [*FAULT, f"output_dir={out}", "search.checkpoint_every=0"]
    log_path = tmp_path / "log.txt"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            command("python", "search", args, 1), env=env(), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            deadline = time.time() + 300
            while not _logged_step(out, 2):
                assert proc.poll() is None, log_path.read_text()[-3000:]
                assert time.time() < deadline, "no step 2 within 300 s"
                time.sleep(0.1)
            proc.send_signal(signal.SIGUSR1)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    text = log_path.read_text()
    assert proc.returncode == 75, text[-3000:]
    assert "SIGUSR1 received: stopped at step" in text and "error:" not in text
    assert not (out / "structure.json").exists()
    assert [p.name for p in (out / "checkpoints").glob("step-*") if (p / "COMPLETE").exists()]
    resumed = run("python", "search", [*args, "--resume"], 1)
    assert resumed.returncode == 0 and (out / "structure.json").exists()


def test_every_rank_waits_for_rank_0s_requeue_before_it_exits(tmp_path):
    """Slurm's --signal=USR1 reaches every worker (torchrun ignores it). All ranks stop at one step,
    and exit 75; a rank that exited while rank 0's `scontrol requeue` still ran made torchrun kill
    rank 0's process group, scontrol with it: the job ended FAILED instead of requeued."""
    out = tmp_path / "run"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    called = tmp_path / "called"
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\nsleep 4\necho "$@" > {called}\n')
    (bin_dir / "scontrol").chmod(0o755)
    extra = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242"}
    args = [*FAULT, f"output_dir={out}", "search.checkpoint_every=0"]
    log_path = tmp_path / "log.txt"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            command("torchrun", "search", args), env=env(extra), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            deadline = time.time() + 300
            while not _logged_step(out, 2):
                assert proc.poll() is None, log_path.read_text()[-3000:]
                assert time.time() < deadline, "no step 2 within 300 s"
                time.sleep(0.1)
            for rank in (0, 1):
                os.kill(_rank_pid(out, rank), signal.SIGUSR1)
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    text = log_path.read_text()
    assert called.read_text() == "requeue 4242\n", text[-3000:]
    assert "requeued job 4242" in text and proc.returncode != 0
