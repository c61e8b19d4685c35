"""The shipped Slurm scripts: their GPU directives and argument handling (no Slurm needed), and a
real ``sbatch --wait`` to a one-node Slurm cluster started for the test session (2 ranks on the CPU,
the scripts' GPU directives overridden on the command line)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from s3delta_ds.run.checkpoint import verify_delta_file
from s3delta_ds.structure import Structure, builders

from .launching import ROOT, TINY, deltas, env
from .slurm_cluster import CPU_ONLY, SlurmCluster, missing_binaries

pytestmark = pytest.mark.distributed

SCRIPTS = ("search.sh", "retrain.sh")


def directives(script: Path) -> dict[str, str]:
    """The ``#SBATCH --key=value`` lines sbatch reads (those before the first command)."""
    found = {}
    for line in script.read_text().splitlines()[1:]:
        if line.startswith("#SBATCH "):
            key, _, value = line.split()[1].partition("=")
            found[key] = value
        elif line.strip() and not line.startswith("#"):
            break
    return found


@pytest.mark.parametrize("name", SCRIPTS)
def test_scripts_ask_for_gpus_and_cpus_to_feed_them(name):
    d = directives(ROOT / "slurm" / name)
    gpus = int(d["--gpus-per-node"])
    assert gpus >= 1 and int(d["--cpus-per-task"]) >= 4 * gpus, d
    assert d["--ntasks-per-node"] == "1"  # one torchrun per node (s3delta_ds.run.slurm)


def srun_args(tmp_path: Path, script: str, argv: list[str]) -> list[str]:
    """Run a shipped script with bash under a fake job environment; return what it passes to srun."""
    fake = tmp_path / "venv" / "bin"
    fake.mkdir(parents=True)
    (fake / "srun").write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$SRUN_ARGS"\n')
    (fake / "srun").chmod(0o755)
    (fake / "activate").write_text(f'PATH="{fake}:$PATH"\n')
    job = {"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n1", "SLURM_NNODES": "1", "SLURM_CPUS_PER_TASK": "64"}
    e = {**os.environ, **job, "S3DELTA_MASTER_ADDR": "n1", "S3DELTA_VENV": str(fake.parent)}
    e["SRUN_ARGS"] = str(tmp_path / "a")
    e["MASTER_ADDR"] = "stale-host"  # left in the submitting shell: never the job's master
    for var in ("CONFIG", "OUTPUT_DIR"):  # the scripts read these from the environment
        e.pop(var, None)
    proc = subprocess.run(["bash", f"slurm/{script}", *argv], cwd=ROOT, env=e, check=True, capture_output=True)
    assert "master n1;" in proc.stdout.decode()
    return (tmp_path / "a").read_text().splitlines()


@pytest.mark.parametrize(
    "script,argv,expected",
    [
        # no DS_CONFIG: nothing overrides the run config's `deepspeed` (auto by default)
        # no OUTPUT_DIR: the config's output_dir, else runs/<script>-<job id> (s3delta_ds.run.slurm)
        ("search.sh", ["c.yaml"], ["--config", "c.yaml"]),
        ("retrain.sh", ["s.json"], ["retrain.structure=s.json"]),
        (
            "search.sh",
            ["c.yaml", "org/model", "search.steps=3", "--resume"],
            [
                "--config",
                "c.yaml",
                "model.name_or_path=org/model",
                "search.steps=3",
                "--resume",
            ],
        ),
        # asked for explicitly
        (
            "search.sh",
            ["c.yaml", "org/model", "zero3"],
            ["--config", "c.yaml", "model.name_or_path=org/model", "deepspeed=zero3"],
        ),
        (
            "retrain.sh",
            ["s.json", "", "zero2", "retrain.steps=3"],
            ["retrain.structure=s.json", "deepspeed=zero2", "retrain.steps=3"],
        ),
        # a DS config in MODEL's place (it used to load a model called zero3)
        ("retrain.sh", ["s.json", "zero3"], ["retrain.structure=s.json", "deepspeed=zero3"]),
        (
            "search.sh",
            ["c.yaml", "zero3_multinode", "search.steps=3"],
            ["--config", "c.yaml", "deepspeed=zero3_multinode", "search.steps=3"],
        ),
        (
            "retrain.sh",
            ["s.json", "ds_configs/zero3.json"],
            ["retrain.structure=s.json", "deepspeed=ds_configs/zero3.json"],
        ),
        # a model's config.json is a model
        (
            "search.sh",
            ["c.yaml", "tests/nope/config.json", "zero2"],
            ["--config", "c.yaml", "model.name_or_path=tests/nope/config.json", "deepspeed=zero2"],
        ),
    ],
)
def test_scripts_leave_deepspeed_to_the_run_config_unless_asked(script, argv, expected, tmp_path):
    args = srun_args(tmp_path, script, argv)
    # srun gets the job's CPUs explicitly (Slurm 22.05-23.02's srun does not inherit them)
    # one task per node whatever --ntasks(-per-node) the job was submitted with, and the script's
    # environment (its virtualenv, MASTER_ADDR) even under sbatch --export=NONE
    step = ["--export=ALL", "--kill-on-bad-exit=1", "--nodes=1", "--ntasks=1", "--ntasks-per-node=1"]
    assert args[:8] == [*step, "--cpus-per-task=64", "python", "-m"]
    assert args[8:10] == ["s3delta_ds.run.slurm", script.removesuffix(".sh")]
    assert args[10:] == expected


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_pass_output_dir_only_when_set_and_append_to_the_log(script, tmp_path, monkeypatch):
    monkeypatch.setenv("OUTPUT_DIR", "runs/mine")
    fake = tmp_path / "venv" / "bin"
    fake.mkdir(parents=True)
    (fake / "srun").write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$SRUN_ARGS"\n')
    (fake / "srun").chmod(0o755)
    (fake / "activate").write_text(f'PATH="{fake}:$PATH"\n')
    job = {"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n1", "SLURM_NNODES": "1", "S3DELTA_MASTER_ADDR": "n1"}
    e = {**os.environ, **job, "S3DELTA_VENV": str(fake.parent), "SRUN_ARGS": str(tmp_path / "a")}
    subprocess.run(["bash", f"slurm/{script}", "x"], cwd=ROOT, env=e, check=True, capture_output=True)
    assert "output_dir=runs/mine" in (tmp_path / "a").read_text().splitlines()
    # a requeued job writes on into its log instead of truncating the first attempt's
    assert directives(ROOT / "slurm" / script)["--open-mode"] == "append"
    # five minutes' notice before the time limit: a checkpoint, then a requeue (run.signals)
    assert directives(ROOT / "slurm" / script)["--signal"] == "USR1@300"
    assert "--requeue" in directives(ROOT / "slurm" / script)


def _job(monkeypatch, restarts: int) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURM_RESTART_COUNT", str(restarts))


def test_run_args_default_output_dir_is_per_job_and_never_overrides_the_config(tmp_path, monkeypatch):
    from s3delta_ds.run.slurm import run_args

    _job(monkeypatch, 0)
    assert run_args("search", ["search.steps=3"]) == (
        ["search.steps=3", "output_dir=runs/search-42"],
        ["output_dir=runs/search-42"],
    )
    config = tmp_path / "c.yaml"
    config.write_text("output_dir: runs/rte-base\n")
    assert run_args("search", ["--config", str(config)]) == (["--config", str(config)], [])
    assert run_args("retrain", ["output_dir=here"])[1] == []
    # `s3delta config custom > mine.yaml` writes the default: every job of it would share runs/default
    config.write_text("output_dir: runs/default\n")
    assert run_args("retrain", ["--config", str(config)])[1] == ["output_dir=runs/retrain-42"]


def _run_dir(out: Path, monkeypatch, *, checkpoint: bool, job: str = "42") -> None:
    """A run's directory as prepare_output_dir leaves it, claimed by Slurm job ``job``."""
    from s3delta_ds.run.checkpoint import COMPLETE
    from s3delta_ds.run.runtime import prepare_output_dir

    monkeypatch.setenv("SLURM_JOB_ID", job)
    prepare_output_dir(out, resume=False, overwrite=False)
    (out / "config.yaml").write_text("x")
    (out / "ds_config.json").write_text("{}")
    if checkpoint:
        (out / "checkpoints" / "step-00000004").mkdir(parents=True)
        (out / "checkpoints" / "step-00000004" / COMPLETE).write_text("{}")


@pytest.mark.parametrize(
    "restarts,state,added",
    [
        (0, "checkpoint", []),  # a first start never resumes on its own
        (1, "checkpoint", ["--resume"]),  # requeued after a checkpoint: continue it
        (2, "started", ["overwrite=true"]),  # requeued before the first checkpoint: start over
        (1, "none", []),  # requeued before anything was written
        (1, "other job", []),  # a run of another job sits at the path: never resumed or deleted
    ],
)
def test_run_args_requeued_job_resumes_or_starts_over(tmp_path, monkeypatch, restarts, state, added):
    from s3delta_ds.run.slurm import run_args

    _job(monkeypatch, restarts)
    out = tmp_path / "run"
    if state != "none":
        _run_dir(out, monkeypatch, checkpoint=state != "started", job="7" if state == "other job" else "42")
        monkeypatch.setenv("SLURM_JOB_ID", "42")
    args = ["retrain.structure=s.json", f"output_dir={out}"]
    assert run_args("retrain", args) == ([*args, *added], added)
    assert run_args("retrain", [*args, "--resume"])[1] == []  # asked for already


def test_run_args_refuses_an_unreadable_config(tmp_path, monkeypatch):
    from s3delta_ds.errors import ConfigError
    from s3delta_ds.run.slurm import main, run_args

    _job(monkeypatch, 1)
    for text, said in (("a: [1", "cannot read config"), ("5\n", "must be a YAML mapping")):
        config = tmp_path / "c.yaml"
        config.write_text(text)
        with pytest.raises(ConfigError, match=said):
            run_args("search", ["--config", str(config)])
    assert main(["search", "--config", str(tmp_path / "missing.yaml")]) == 2


def test_two_runs_started_on_one_directory_cannot_both_claim_it(tmp_path):
    from s3delta_ds.util import claim_run_dir, read_run_claim

    assert claim_run_dir(tmp_path, {"slurm_job_id": "1"})
    assert not claim_run_dir(tmp_path, {"slurm_job_id": "2"})  # O_EXCL: the second start loses
    assert read_run_claim(tmp_path) == {"slurm_job_id": "1"}
    assert claim_run_dir(tmp_path, {"slurm_job_id": "3"}, replace=True)  # a resume by another job
    assert read_run_claim(tmp_path) == {"slurm_job_id": "3"}


def test_hostfile_prints_nothing_but_the_hostfile_and_refuses_a_bad_slot_count(tmp_path, monkeypatch, capsys):
    """`s3delta hostfile -o hosts && deepspeed --hostfile hosts ...`: status goes to stderr, and a
    malformed $NPROC_PER_NODE is an error naming it, not a traceback."""
    from s3delta_ds.cli import main

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text('#!/bin/sh\nprintf "n1\\nn2\\n"\n')
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    hosts = tmp_path / "hosts"
    assert main(["hostfile", "--slots", "4", "--nodelist", "n[1-2]", "-o", str(hosts)]) == 0
    out, err = capsys.readouterr()
    assert out == "" and "wrote" in err
    assert hosts.read_text() == "n1 slots=4\nn2 slots=4\n"
    assert main(["hostfile", "--slots", "4", "--nodelist", "n[1-2]"]) == 0
    assert capsys.readouterr().out == "n1 slots=4\nn2 slots=4\n"
    monkeypatch.setenv("NPROC_PER_NODE", "abc")
    assert main(["hostfile", "--nodelist", "n[1-2]"]) == 2
    assert "$NPROC_PER_NODE must be a positive integer, got 'abc'" in capsys.readouterr().err


@pytest.mark.parametrize("state,refused", [("RUNNING", True), ("PENDING", True), ("", False), ("COMPLETED", False)])
def test_a_directory_another_live_job_owns_cannot_be_resumed_or_overwritten(tmp_path, monkeypatch, state, refused):
    """Job 100 is requeued (or still running) and will resume its directory itself: a second job's
    --resume (or overwrite=true) there would write it twice; once 100 has ended it may."""
    from s3delta_ds.errors import ConfigError
    from s3delta_ds.run.runtime import check_output_dir

    out = tmp_path / "run"
    _run_dir(out, monkeypatch, checkpoint=True, job="100")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "squeue").write_text(f'#!/bin/sh\n[ "$3" = 100 ] && printf "{state}\\n"\nexit 0\n')
    (bin_dir / "squeue").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "200")
    for kwargs in ({"resume": True, "overwrite": False}, {"resume": False, "overwrite": True}):
        if refused:
            with pytest.raises(ConfigError, match=f"belongs to Slurm job 100 \\({state}\\)"):
                check_output_dir(out, **kwargs)
        else:
            check_output_dir(out, **kwargs)
    monkeypatch.setenv("SLURM_JOB_ID", "100")  # the job itself, requeued: its own directory
    check_output_dir(out, resume=True, overwrite=False)


def test_a_directory_a_live_run_on_this_host_owns_cannot_be_resumed(tmp_path):
    from s3delta_ds.errors import ConfigError
    from s3delta_ds.run.runtime import check_output_dir
    from s3delta_ds.util import claim_run_dir

    out = tmp_path / "run"
    out.mkdir()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "s3delta_ds.search"])
    try:
        # under a loaded suite this failed once (no refusal): wait until the child's command line is
        # readable as the check reads it, so a slow start cannot pass for "not an s3delta process"
        deadline = time.monotonic() + 30
        while b"s3delta" not in Path(f"/proc/{live.pid}/cmdline").read_bytes():
            assert live.poll() is None and time.monotonic() < deadline, "the stand-in run did not start"
            time.sleep(0.05)
        claim_run_dir(out, {"slurm_job_id": None, "host": socket.gethostname(), "pid": live.pid})
        with pytest.raises(ConfigError, match=f"belongs to process {live.pid} on this host"):
            check_output_dir(out, resume=True, overwrite=False)
    finally:
        live.kill()
        live.wait()
    check_output_dir(out, resume=True, overwrite=False)  # it has ended


@pytest.mark.parametrize("gpus,slots", [("a100:8", 8), ("8(x2)", 8), ("4", 4), ("0", 2)])
def test_local_slots_read_slurms_gpu_count_as_the_engine_does(gpus, slots, monkeypatch):
    from s3delta_ds.run.slurm import local_slots

    monkeypatch.delenv("NPROC_PER_NODE", raising=False)
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", gpus)
    assert local_slots() == slots  # this machine has no GPU: the Slurm count decides, 0 falls to 2


@pytest.mark.parametrize("visible,local_id,expected", [(8, 3, 3), (1, 3, 0), (2, 3, 1), (0, 3, 3)])
def test_one_task_per_rank_with_per_task_gpu_binding_uses_a_visible_device(visible, local_id, expected, monkeypatch):
    """srun --gpus-per-task=1: task 3 sees one GPU, cuda:0; LOCAL_RANK=3 made DeepSpeed bind cuda:3."""
    from s3delta_ds.engine import zero

    class Accelerator:
        def device_count(self):
            return visible

    monkeypatch.setattr(zero, "device_type", lambda: "cuda")
    monkeypatch.setattr(zero, "get_accelerator", Accelerator)
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE"):  # set first: monkeypatch restores what it set
        monkeypatch.setenv(var, "")  # (a RANK left behind made a later test's Slurm ranks both rank 3)
        monkeypatch.delenv(var)
    monkeypatch.setenv("MASTER_ADDR", "n1")
    for var, value in {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": str(local_id)}.items():
        monkeypatch.setenv(var, value)
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    zero._env_from_slurm()
    assert (os.environ["RANK"], os.environ["LOCAL_RANK"]) == ("3", str(expected))


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
    """No DS_CONFIG: the run keeps ``deepspeed=auto``, which replicates the tiny backbone (ZeRO-2)."""
    out = tmp_path / "run"
    log = tmp_path / "job.out"
    proc = cluster.sbatch(
        [
            *CPU_ONLY,
            f"--output={log}",
            f"--chdir={ROOT}",
            "slurm/retrain.sh",
            str(structure),
            "tiny-t5",
            *[a for a in TINY if not a.startswith("deepspeed=")],
            "data.task=tiny-sentiment",
            "retrain.micro_batch_size=2",
        ],
        cwd=ROOT,
        env=job_env(OUTPUT_DIR=str(out), NPROC_PER_NODE="2"),
    )
    text = log.read_text() if log.exists() else ""
    assert proc.returncode == 0, proc.stderr + text[-4000:]
    assert "[s3delta slurm] node 0/1" in text and "--nproc_per_node 2" in text
    assert "deepspeed=auto: " in text and yaml.safe_load((out / "config.yaml").read_text())["deepspeed"] == "auto"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["zero_stage"] == 2
    s = Structure.load(structure)
    d = deltas(out / "deltas.safetensors")
    assert sum(v.numel() for v in d.values()) == s.budget.used
    verify_delta_file(out / "deltas.safetensors", {k: tuple(v.shape) for k, v in d.items()})


def test_sbatch_usage_error_exits_2(cluster, tmp_path):
    log = tmp_path / "job.out"
    proc = cluster.sbatch(
        [*CPU_ONLY, f"--output={log}", f"--chdir={ROOT}", "slurm/retrain.sh"], cwd=ROOT, env=job_env()
    )
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
                        "data.task=tiny-sentiment",
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


def test_a_process_outside_an_srun_step_is_one_run_not_rank_0_of_the_job(monkeypatch):
    """The batch (or salloc) shell of a --ntasks=2 job has SLURM_NTASKS=2 and SLURM_PROCID=0 but no
    step: a plain `s3delta search` there was mapped to rank 0 of 2 and waited for a rank 1."""
    from s3delta_ds.engine import zero

    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "SLURM_STEP_ID"):
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    monkeypatch.setenv("MASTER_ADDR", "n1")
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    zero._env_from_slurm()
    assert "RANK" not in os.environ and "WORLD_SIZE" not in os.environ


def test_the_scripts_hand_their_environment_to_the_ranks():
    """Under sbatch --export=NONE srun inherits SLURM_EXPORT_ENV=NONE: without --export=ALL the ranks
    started with the system python and none of the variables the script sets."""
    from .launching import ROOT

    for script in ("search.sh", "retrain.sh"):
        step = next(line for line in (ROOT / "slurm" / script).read_text().splitlines() if line.startswith("step=("))
        assert "--export=ALL" in step, script


def test_the_rendezvous_port_ignores_an_inherited_master_port(monkeypatch):
    """sbatch hands the submitting shell's environment on: a MASTER_PORT an earlier torchrun left
    there gave every job on a node one port (the second job's rendezvous failed or joined the
    first's). The port comes from the job id unless S3DELTA_MASTER_PORT names one."""
    from s3delta_ds.errors import DistributedSetupError
    from s3delta_ds.run.slurm import master_port

    monkeypatch.setenv("SLURM_JOB_ID", "12345")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setenv("S3DELTA_MASTER_PORT", "")
    monkeypatch.delenv("S3DELTA_MASTER_PORT")
    assert master_port() == 20000 + 12345 % 12000
    monkeypatch.setenv("SLURM_JOB_ID", "12346")
    assert master_port() == 20000 + 12346 % 12000  # two jobs, two ports
    monkeypatch.setenv("S3DELTA_MASTER_PORT", "23456")
    assert master_port() == 23456
    monkeypatch.setenv("S3DELTA_MASTER_PORT", "x")
    with pytest.raises(DistributedSetupError, match=r"\$S3DELTA_MASTER_PORT must be a positive integer"):
        master_port()
