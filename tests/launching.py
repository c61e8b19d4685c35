"""Launch the entry scripts the way users do (deepspeed launcher, torchrun, plain python) from tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from s3delta_ds.util import free_port  # noqa: F401 - tests import it from here

ROOT = Path(__file__).resolve().parents[1]
MODULES = {"export": "s3delta_ds.artifacts.export"}  # `python -m` paths that are not s3delta_ds.<script>
SCRIPTS = {"search": ROOT / "s3delta_ds" / "search.py", "retrain": ROOT / "s3delta_ds" / "retrain.py"}

# A small, fast, fp32 configuration of the embedded tiny default.
TINY = [
    "search.steps=6",
    "search.eval_every=6",
    "search.log_every=1",
    "search.budget=0.02",
    "search.lr=3e-3",
    "search.select=last",
    "data.max_eval_examples=24",
    "search.eval_batch_size=8",
    "retrain.steps=6",
    "retrain.eval_every=3",
    "retrain.lr=3e-3",
    "retrain.eval_batch_size=8",
    "model.dtype=fp32",
    "deepspeed=zero3_cpu",  # the tests' ZeRO-3 config (persistence threshold 0: tiny models really partition)
    "model.name_or_path=tiny-t5",
    "data.task=tiny-sentiment",
]


def env(extra: dict | None = None) -> dict:
    """The launches' environment: this one, on CPU and offline, without an outer Slurm allocation's
    variables (a suite run inside salloc would otherwise launch as that job: per-job output
    directories, ``scontrol requeue`` on SIGUSR1); a test that means Slurm passes them in ``extra``."""
    e = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    e.update(
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
    )
    e.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    e.update(extra or {})
    return e


def command(launcher: str, script: str, args: list[str], nproc: int = 2) -> list[str]:
    """``script``: "search", "retrain", or a path to any script."""
    port = str(free_port())
    path = str(SCRIPTS.get(script, script))
    if launcher == "deepspeed":
        return [
            sys.executable,
            "-m",
            "deepspeed.launcher.runner",
            "--num_gpus",
            str(nproc),
            "--master_port",
            port,
            path,
            *args,
        ]
    if launcher == "torchrun":
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "--master_port",
            port,
            path,
            *args,
        ]
    if launcher == "python":
        return [sys.executable, "-m", MODULES.get(script, f"s3delta_ds.{script}"), *args]
    if launcher == "accelerate":
        return [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(accelerate_config(nproc)),
            "--main_process_port",
            port,
            path,
            *args,
        ]
    raise ValueError(launcher)


def accelerate_config(nproc: int) -> Path:
    """An ``accelerate config`` file: CPU, ``nproc`` processes, the DeepSpeed plugin with the
    tests' ZeRO-3 json (what a user's ``accelerate config`` answers would write)."""
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="s3delta-accelerate-")) / "accelerate.yaml"
    path.write_text(
        "compute_environment: LOCAL_MACHINE\n"
        "distributed_type: DEEPSPEED\n"
        "deepspeed_config:\n"
        f"  deepspeed_config_file: {ROOT / 'ds_configs' / 'zero3_cpu.json'}\n"
        "  zero3_init_flag: false\n"
        "num_machines: 1\n"
        f"num_processes: {nproc}\n"
        "machine_rank: 0\n"
        "use_cpu: true\n"
    )
    return path


def run(
    launcher: str,
    script: str,
    args: list[str],
    nproc: int = 2,
    *,
    check: bool = True,
    timeout: int = 600,
    extra_env: dict | None = None,
) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        command(launcher, script, args, nproc),
        env=env(extra_env),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{launcher} {script} {args} exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def alphas(run_dir: Path) -> torch.Tensor:
    structure = json.loads((run_dir / "structure.json").read_text())
    return torch.tensor([c["alpha"] for c in structure["candidates"]], dtype=torch.float64)


def deltas(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


# A bias added to attention *keys* shifts every logit of a query by the same amount, so softmax makes its
# gradient exactly zero in exact arithmetic; Adam turns the float round-off there into lr-sized steps in
# random directions. Those tensors carry no trajectory information and are left out of comparisons.
NO_GRADIENT = ("attn.k/bitfit",)


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], skip: tuple[str, ...] = NO_GRADIENT) -> float:
    assert set(a) == set(b), sorted(set(a) ^ set(b))[:5]
    keys = [k for k in a if not any(s in k for s in skip)]
    assert keys, "nothing left to compare"
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in keys)
