"""The shipped Slurm scripts, submitted with a real ``sbatch --wait`` to a one-node Slurm cluster
started for the test session (2 ranks on the CPU)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from s3delta_ds import builders
from s3delta_ds.checkpoint import verify_delta_file
from s3delta_ds.structure import Structure

from .launching import ROOT, TINY, deltas, env
from .slurm_cluster import SlurmCluster, missing_binaries

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    missing = missing_binaries()
    if missing:
        if os.environ.get("S3DELTA_REQUIRE_SLURM") == "1":
            pytest.fail(f"Slurm binaries missing: {missing} (apt-get install slurm-wlm munge)")
        pytest.skip(f"Slurm is not installed here ({', '.join(missing)} missing); .ci/run installs it")
    c = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    c.start()
    yield c
    c.stop()


def job_env(**extra) -> dict:
    e = env(extra)
    e["PATH"] = f"{Path(sys.executable).parent}:{e['PATH']}"  # the job runs this virtualenv's python
    return e


@pytest.fixture(scope="module")
def structure(tmp_path_factory) -> Path:
    plan = builders.Backbone.plan("tiny-t5")
    return builders.manual(plan, "lora").save(tmp_path_factory.mktemp("structure") / "lora.json")


def test_sbatch_retrain_two_ranks(cluster, structure, tmp_path):
    out = tmp_path / "run"
    log = tmp_path / "job.out"
    proc = cluster.sbatch(
        [
            f"--output={log}",
            f"--chdir={ROOT}",
            "slurm/retrain.sh",
            str(structure),
            "tiny-t5",
            "zero3_cpu",
            *TINY,
            "retrain.micro_batch_size=2",
        ],
        cwd=ROOT,
        env=job_env(OUTPUT_DIR=str(out), NPROC_PER_NODE="2"),
    )
    text = log.read_text() if log.exists() else ""
    assert proc.returncode == 0, proc.stderr + text[-4000:]
    assert "[s3delta slurm] node 0/1" in text and "--nproc_per_node 2" in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["zero_stage"] == 3
    s = Structure.load(structure)
    d = deltas(out / "deltas.safetensors")
    assert sum(v.numel() for v in d.values()) == s.budget.used
    verify_delta_file(out / "deltas.safetensors", {k: tuple(v.shape) for k, v in d.items()})


def test_sbatch_usage_error_exits_2(cluster, tmp_path):
    log = tmp_path / "job.out"
    proc = cluster.sbatch([f"--output={log}", f"--chdir={ROOT}", "slurm/retrain.sh"], cwd=ROOT, env=job_env())
    assert proc.returncode == 2
    assert "usage: sbatch slurm/retrain.sh" in log.read_text()


def test_one_task_per_rank_mode_and_hostfile(cluster, structure, tmp_path):
    """srun with one task per rank: SLURM_PROCID/SLURM_NTASKS become RANK/WORLD_SIZE; and the hostfile."""
    out, log, hosts = tmp_path / "run", tmp_path / "job.out", tmp_path / "hostfile"
    script = tmp_path / "job.sh"
    script.write_text(
        "\n".join(
            [
                "#!/bin/bash",
                "set -euo pipefail",
                f"s3delta hostfile --slots 2 -o {hosts}",
                "export MASTER_ADDR=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n1) MASTER_PORT=$((20000 + "
                "SLURM_JOB_ID % 20000))",
                "srun --kill-on-bad-exit=1 python -m s3delta_ds.retrain "
                + " ".join(
                    [
                        f"retrain.structure={structure}",
                        f"output_dir={out}",
                        *TINY,
                        "retrain.micro_batch_size=2",
                        "deepspeed=zero3_cpu",
                    ]
                ),
                "",
            ]
        )
    )
    proc = cluster.sbatch([f"--output={log}", f"--chdir={ROOT}", "--ntasks=2", str(script)], cwd=ROOT, env=job_env())
    assert proc.returncode == 0, proc.stderr + log.read_text()[-4000:]
    assert hosts.read_text() == f"{cluster.host} slots=2\n"
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2
