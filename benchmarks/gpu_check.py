"""The GPU check's stages (started by benchmarks/gpu_check.sh, which installs the carried wheels first).

    python benchmarks/gpu_check.py [--out DIR] [--work DIR] [--budget-s S] [--only NAME,...] [--dry-run]

Each stage is one line of ``STAGES``: a function that runs its commands by a deadline and returns
its result. benchmarks/gpu_check_runner.py writes each result file ``$OUT/<name>.json`` (or ``.txt``)
the moment the stage finishes and rewrites ``$OUT/summary.json`` after each, so whatever finished
comes back even when the time runs out. A failing stage does not stop the next. The exit code is 0
when every stage passed.

``--dry-run`` runs the same stages in a CPU form (tiny-t5, 3 steps, DS_ACCELERATOR=cpu), to test
the orchestration anywhere. See docs/gpu-check.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_check_runner import (  # noqa: E402
    ROOT,
    Context,
    Stage,
    free_port,
    fresh,
    read_json,
    run_all,
    run_command,
)

# -- the run shared by search and retrain --------------------------------------------------------

# One GPU: random-init T5 v1.1 base (248M parameters) in bf16, the embedded T5 tokenizer (its ids fit
# T5's vocabulary; the hub is out of reach), deepspeed=auto (ZeRO-2 when the backbone fits: it does).
GPU_RUN = [
    "model.name_or_path=t5-v1_1-base",
    "model.random_init=true",
    "model.tokenizer=tiny-t5",
    "model.dtype=bf16",
    "deepspeed=auto",
    "data.task=tiny-sentiment",
]
GPU_SEARCH = ["search.steps=50", "search.eval_every=25", "search.log_every=10", "search.micro_batch_size=16"]
GPU_RETRAIN = ["retrain.steps=50", "retrain.eval_every=25", "retrain.log_every=10", "retrain.micro_batch_size=16"]
# The same keys in a CPU form: tiny-t5 in fp32, 3 steps, few evaluation examples.
DRY_RUN = [
    "model.name_or_path=tiny-t5",
    "model.random_init=false",
    "model.tokenizer=tiny-t5",
    "model.dtype=fp32",
    "deepspeed=auto",
    "data.task=tiny-sentiment",
    "data.max_eval_examples=16",
]
DRY_SEARCH = ["search.steps=3", "search.eval_every=3", "search.log_every=1", "search.micro_batch_size=4",
              "search.budget=0.02", "search.eval_batch_size=16"]  # fmt: skip
DRY_RETRAIN = ["retrain.steps=3", "retrain.eval_every=3", "retrain.log_every=1", "retrain.micro_batch_size=4",
               "retrain.eval_batch_size=16"]  # fmt: skip


def _run_facts(ctx: Context, run_dir: Path, summary: dict | None) -> tuple[dict, list[str]]:
    """What the run directory says about devices and dtypes, and the problems found in it."""
    problems = []
    ds = read_json(run_dir / "ds_config.json") or {}
    facts = {
        "zero_stage": ds.get("zero_optimization", {}).get("stage"),
        "bf16": ds.get("bf16", {}).get("enabled"),
    }
    if summary is None:
        return facts, ["no summary.json (the run did not finish)"]
    median = summary.get("median_step_s")
    if not (isinstance(median, (int, float)) and median > 0):
        problems.append(f"median_step_s is {median!r}")
    if not ctx.dry_run and facts["bf16"] is not True:
        problems.append(f"the resolved DeepSpeed config has bf16.enabled={facts['bf16']!r}, expected true")
    return facts, problems


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


# -- stages ------------------------------------------------------------------------------------

ENV_PROBE = r"""
import importlib, importlib.metadata as md, json, os, platform, sys
r = {"python": sys.version.split()[0], "executable": sys.executable, "platform": platform.platform()}
def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None
r["packages"] = {n: version(n) for n in ("torch", "deepspeed", "transformers", "datasets", "accelerate",
    "safetensors", "tokenizers", "sentencepiece", "pydantic", "pydantic-core", "typing-extensions", "pyarrow",
    "fsspec", "huggingface-hub", "numpy", "peft", "pytest")}
import torch
r["torch"] = {"version": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
              "device_count": torch.cuda.device_count()}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    r["torch"].update(device=p.name, capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2**30, 1),
                      multiprocessors=p.multi_processor_count, bf16=torch.cuda.is_bf16_supported(),
                      nccl=".".join(map(str, torch.cuda.nccl.version())), cudnn=torch.backends.cudnn.version())
for mod in ("deepspeed", "transformers", "datasets", "s3delta_ds"):
    try:
        m = importlib.import_module(mod)
        r.setdefault("imports", {})[mod] = getattr(m, "__file__", None)
    except Exception as e:
        r.setdefault("import_errors", {})[mod] = f"{type(e).__name__}: {e}"
try:
    from deepspeed.accelerator import get_accelerator
    a = get_accelerator()
    r["deepspeed_accelerator"] = {"name": a.device_name(), "comm_backend": a.communication_backend_name()}
except Exception as e:
    r["deepspeed_accelerator"] = {"error": f"{type(e).__name__}: {e}"}
r["env"] = {k: os.environ.get(k) for k in ("DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR", "PYTHONPATH", "CUDA_HOME",
                                          "CUDA_VISIBLE_DEVICES", "S3DELTA_GPU_WHEELS")}
print("GPU_CHECK_JSON " + json.dumps(r))
"""


def env_report(ctx: Context, until: float) -> dict:
    """nvidia-smi, nvcc, and what Python sees: versions, the device, DeepSpeed's accelerator."""
    parts, probe = [], None
    for cmd, limit in ((["nvidia-smi"], 20), (["nvcc", "--version"], 10), ([ctx.python, "-c", ENV_PROBE], 90)):
        try:
            done = run_command(ctx, cmd, until=min(until, time.monotonic() + limit), log=ctx.work / f"env-{cmd[0]}.log")
        except FileNotFoundError:
            parts.append(f"$ {cmd[0]}\n(not found on PATH)\n")
            continue
        body = done.output
        for line in done.output.splitlines():
            if line.startswith("GPU_CHECK_JSON "):
                probe = json.loads(line[len("GPU_CHECK_JSON ") :])
                body = body.replace(line, json.dumps(probe, indent=2))
        parts.append(body + ("" if done.ok else f"[exit {done.rc}{', timed out' if done.timed_out else ''}]\n"))
    probe = probe or {}
    torch_info = probe.get("torch", {})
    accel = probe.get("deepspeed_accelerator", {}).get("name")
    problems = [f"cannot import {m}: {e}" for m, e in probe.get("import_errors", {}).items()]
    if not probe:
        problems.append("the Python probe did not report")
    want = "cpu" if ctx.dry_run else "cuda"
    if accel != want:
        problems.append(f"DeepSpeed's accelerator is {accel!r}, expected {want!r}")
    if not ctx.dry_run and not torch_info.get("cuda_available"):
        problems.append("torch.cuda.is_available() is False")
    wheels = os.environ.get("S3DELTA_GPU_WHEELS")
    header = f"# s3delta_ds GPU check: environment ({'dry run' if ctx.dry_run else 'GPU'})\n"
    header += f"# carried wheels: {wheels or 'none installed'}\n"
    if problems:
        header += "".join(f"# PROBLEM: {p}\n" for p in problems)
    return {
        "ok": not problems,
        "text": header + "\n".join(parts),
        "brief": {
            "device": torch_info.get("device"),
            "torch": torch_info.get("version"),
            "cuda": torch_info.get("cuda"),
            "deepspeed": probe.get("packages", {}).get("deepspeed"),
            "transformers": probe.get("packages", {}).get("transformers"),
            "accelerator": accel,
            "problems": problems,
        },
    }


def unit_tests(ctx: Context, until: float) -> dict:
    """pytest on the CUDA tests (every one skipped, with its reason, in a dry run on the CPU)."""
    xml = ctx.work / "01-unit.xml"
    cmd = [ctx.python, "-m", "pytest", "tests/test_cuda.py", "-v", "-rs", "-p", "no:cacheprovider", f"--junitxml={xml}"]
    done = run_command(ctx, cmd, until=until, log=ctx.work / "01-unit.log")
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    try:
        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in counts}
    except (OSError, ET.ParseError, AttributeError):
        pass
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    problems = []
    if not done.ok:
        problems.append(f"pytest exited {done.rc}" + (" (timed out)" if done.timed_out else ""))
    if not ctx.dry_run and (counts["skipped"] or not counts["passed"]):
        problems.append(f"on the GPU every test must run: {counts['passed']} passed, {counts['skipped']} skipped")
    status = "".join(f"# PROBLEM: {p}\n" for p in problems)
    return {"ok": not problems, "timed_out": done.timed_out, "text": status + done.output, "brief": counts}


def search(ctx: Context, until: float) -> dict:
    """A search of tiny-sentiment on one GPU through the real entry point, in one process (NCCL world of one)."""
    run_dir = fresh(ctx.work / "search")
    args = (DRY_RUN + DRY_SEARCH) if ctx.dry_run else (GPU_RUN + GPU_SEARCH)
    cmd = [ctx.python, "-m", "s3delta_ds.search", *args, f"output_dir={run_dir}", "overwrite=true"]
    done = run_command(ctx, cmd, until=until, log=ctx.work / "02-search.log")
    summary = read_json(run_dir / "summary.json")
    facts, problems = _run_facts(ctx, run_dir, summary)
    structure = read_json(run_dir / "structure.json") or {}
    meta = structure.get("search", {})
    if summary is not None:
        if not (summary.get("modules", 0) > 0 and 0 < summary.get("params_used", 0) <= summary.get("budget_params", 0)):
            problems.append(f"structure: {summary.get('modules')} modules, {summary.get('params_used')} parameters")
        if not _finite(summary.get("search_score")):
            problems.append(f"search_score is {summary.get('search_score')!r}")
        if not ctx.dry_run and meta.get("dtype") != "bf16":
            problems.append(f"the search ran in {meta.get('dtype')!r}, expected bf16")
    if not done.ok:
        problems.insert(0, f"exit {done.rc}" + (" (timed out)" if done.timed_out else ""))
    by_type: dict[str, int] = {}
    for m in structure.get("modules", []):
        by_type[m.get("type", "?")] = by_type.get(m.get("type", "?"), 0) + 1
    return {
        "ok": not problems,
        "timed_out": done.timed_out,
        "problems": problems,
        "launcher": "python -m s3delta_ds.search",
        "dtype": meta.get("dtype"),
        **facts,
        "modules_by_type": by_type,
        "summary": summary,
        **done.record(),
        "brief": {
            "wall_s": round(done.seconds, 1),
            "median_step_s": (summary or {}).get("median_step_s"),
            "zero_stage": facts["zero_stage"],
        },
    }


def retrain(ctx: Context, until: float) -> dict:
    """Retrain the searched structure under the DeepSpeed launcher on one GPU (a manual LoRA structure
    when the search left none, so this stage stays independent of the last)."""
    structure = ctx.work / "search" / "structure.json"
    source = "searched"
    model = "tiny-t5" if ctx.dry_run else "t5-v1_1-base"
    prep = None
    if not structure.is_file():
        structure, source = ctx.work / "manual-lora.json", "manual lora (the search left no structure)"
        prep = run_command(
            ctx,
            [ctx.python, "-m", "s3delta_ds", "structure", "manual", model, "--preset", "lora", "-o", str(structure)],
            until=min(until, time.monotonic() + 60),
            log=ctx.work / "03-structure.log",
        )
    run_dir = fresh(ctx.work / "retrain")
    args = (DRY_RUN + DRY_RETRAIN) if ctx.dry_run else (GPU_RUN + GPU_RETRAIN)
    cmd = [
        ctx.python,
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        "1",
        "--master_port",
        str(free_port()),
        "s3delta_ds/retrain.py",
        *args,
        f"retrain.structure={structure}",
        f"output_dir={run_dir}",
        "overwrite=true",
    ]
    done = run_command(ctx, cmd, until=until, log=ctx.work / "03-retrain.log")
    summary = read_json(run_dir / "summary.json")
    facts, problems = _run_facts(ctx, run_dir, summary)
    deltas_bytes = None
    if summary is not None:
        deltas = Path(summary.get("deltas") or run_dir / "deltas.safetensors")
        deltas_bytes = deltas.stat().st_size if deltas.is_file() else None
        if not deltas_bytes or deltas_bytes < 1024:  # an empty safetensors file is tens of bytes
            problems.append(f"deltas file {deltas}: {deltas_bytes} bytes")
        if not _finite(summary.get("test_score")):
            problems.append(f"test_score is {summary.get('test_score')!r}")
    if not done.ok:
        problems.insert(0, f"exit {done.rc}" + (" (timed out)" if done.timed_out else ""))
    return {
        "ok": not problems,
        "timed_out": done.timed_out,
        "problems": problems,
        "launcher": "deepspeed.launcher.runner --num_gpus 1",
        "structure_source": source,
        "structure_command": prep.record(tail=1000) if prep else None,
        **facts,
        "deltas_bytes": deltas_bytes,
        "summary": summary,
        **done.record(),
        "brief": {
            "wall_s": round(done.seconds, 1),
            "median_step_s": (summary or {}).get("median_step_s"),
            "structure": source,
        },
    }


DRY_PLAIN_STAGE = "xxl"  # in a dry run, the step stage that launches the plain variants


def _step_stage(shape: str):
    """``benchmarks/step.py`` on a random-init ``shape`` in bf16 (variants a, b, c, c2, d, d2, then c2 and
    d2 with activation checkpointing), one process on one GPU. step.py rewrites its JSON after every
    variant, so a stage stopped at its limit still brings back what it measured.

    A dry run measures the same tiny shape in both stages, so it splits the work instead of repeating
    it: the first stage launches the plain variants, the second the checkpointed one (every code path
    once, in half the launches)."""

    def run(ctx: Context, until: float) -> dict:
        out = ctx.work / f"step-{shape}"
        if ctx.dry_run:
            shape_args = ["--shape", "tiny", "--steps", "1", "--warmup", "1"]
            launches = [("c,c2,d,d2", "off")] if shape == DRY_PLAIN_STAGE else [("c2", "on")]
        else:
            shape_args = ["--shape", shape, "--steps", "3", "--warmup", "1"]
            launches = [("a,b,c,c2,d,d2", "off"), ("c2,d2", "on")]
        runs = []
        for variants, mode in launches:
            cmd = [ctx.python, "benchmarks/step.py", *shape_args, "--variants", variants,
                   "--gradient-checkpointing", mode, "--out", str(out.with_name(out.name + f"-{mode}"))]  # fmt: skip
            runs.append(run_command(ctx, cmd, until=until, log=ctx.work / f"step-{shape}-{mode}.log"))
            if time.monotonic() >= until:
                break
        results = [read_json(out.with_name(out.name + f"-{mode}").with_suffix(".json")) for _, mode in launches]
        variants = {k: v for r in results if r for k, v in r["variants"].items()}
        problems = [f"exit {d.rc}" + (" (timed out)" if d.timed_out else "") for d in runs if not d.ok]
        want = [k if mode == "off" else f"{k}+ckpt" for names, mode in launches for k in names.split(",")]
        missing = [k for k in want if k not in variants]
        if missing:
            problems.append(f"no measurement for {', '.join(missing)}")
        over = [k for k, v in variants.items() if v["mfu"] > 1]
        if over:
            problems.append(f"MFU above 100% for {', '.join(over)}")
        first = next((r for r in results if r), {})
        return {
            "ok": not problems,
            "timed_out": any(d.timed_out for d in runs),
            "problems": problems,
            "results": results,
            "commands": [d.record(tail=1500) for d in runs],
            "brief": {
                "median_s": {k: round(v["median_s"], 4) for k, v in variants.items()},
                "mfu": {k: round(v["mfu"], 3) for k, v in variants.items()},
                "ratios": {k: round(v, 3) for r in results if r for k, v in r["ratios"].items() if v is not None},
                "matmul_peak_tflops": round(first.get("matmul_peak_flops", 0) / 1e12, 1),
            },
        }

    return run


# The checks, in order; one line each. Stages that need another's output fall back to something of
# their own (retrain → a manual structure) so that a failure does not cascade.
STAGES = (
    Stage(name="00-env", timeout_s=45, run=env_report, text=True),
    Stage(name="01-unit", timeout_s=75, run=unit_tests, text=True),
    Stage(name="02-search", timeout_s=75, run=search),
    Stage(name="03-retrain", timeout_s=60, run=retrain),
    Stage(name="04-step-xxl", timeout_s=110, run=_step_stage("xxl")),
    Stage(name="05-step-llama-7b", timeout_s=85, run=_step_stage("llama-7b")),
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/gpu_check.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "runs" / "gpu_check"), help="result files")
    p.add_argument("--work", default=None, help="run directories and logs (default: runs/gpu_check-work)")
    p.add_argument("--budget-s", type=float, default=None, help="overall limit (default 450 on a GPU, 420 dry)")
    p.add_argument("--only", default=None, help="comma-separated stage names to run (default: all)")
    p.add_argument("--dry-run", action="store_true", help="every stage in a CPU form (tiny-t5, 3 steps)")
    args = p.parse_args(argv)
    stages = STAGES
    if args.only:
        wanted = args.only.split(",")
        unknown = sorted(set(wanted) - {s.name for s in STAGES})
        if unknown:
            p.error(f"unknown stage(s) {', '.join(unknown)}; stages: {', '.join(s.name for s in STAGES)}")
        stages = tuple(s for s in STAGES if s.name in wanted)
    return run_all(
        stages,
        out=Path(args.out).resolve(),
        work=Path(args.work or ROOT / "runs" / "gpu_check-work").resolve(),
        dry_run=args.dry_run,
        budget_s=args.budget_s or (420.0 if args.dry_run else 450.0),
    )


if __name__ == "__main__":
    sys.exit(main())
