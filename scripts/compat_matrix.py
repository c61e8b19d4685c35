"""Generate the compatibility matrix (ZeRO stage × precision × family × search/retrain) by running
every cell for real: 2 DeepSpeed ranks on the CPU (gloo), tiny random backbones, one launch per
family (its precisions run one after another in it). Writes docs/compatibility.md and the README
block between the markers.

    python scripts/compat_matrix.py [--out DIR] [--check]    # --check: fail if README differs
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = {"T5": "tiny-t5", "LLaMA": "tiny-llama"}
PRECISIONS = ("fp32", "bf16", "4bit", "8bit")
START, END = "<!-- compat-matrix:start -->", "<!-- compat-matrix:end -->"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(model: str, precisions: list[str], family_dir: Path, env: dict) -> str | None:
    """One 2-rank launch running ``precisions`` in turn; None when it ended cleanly, else why not."""
    cmd = [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        "2",
        "--master_port",
        str(_port()),
        "--module",
        "s3delta_ds.run.compat",
        "--model",
        model,
        "--precision",
        ",".join(precisions),
        "--out",
        str(family_dir),
    ]
    try:
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600 * len(precisions))
    except subprocess.TimeoutExpired:
        return "timed out"
    return None if proc.returncode == 0 else f"launch failed (exit {proc.returncode})"


def run_all(out: Path) -> list[dict]:
    """Every family in one launch (one start-up for its four precisions). A precision the launch
    did not finish (a crash or hang in it, or in one before it) is relaunched alone, so one broken
    precision cannot blank the rows after it, and its row names its own failure."""
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }
    records = []
    for family, model in FAMILIES.items():
        family_dir = out / model
        for old in family_dir.glob("compat-*.json"):  # a reused --out must not show an older run's rows
            old.unlink()
        errors = dict.fromkeys(PRECISIONS, _launch(model, list(PRECISIONS), family_dir, env))
        for precision in PRECISIONS:
            if not (family_dir / f"compat-{precision}.json").exists():
                errors[precision] = _launch(model, [precision], family_dir, env)
        for precision in PRECISIONS:
            result = family_dir / f"compat-{precision}.json"
            if result.exists():
                record = json.loads(result.read_text())
            else:
                why = errors[precision] or "launch ended without a result"
                record = {"model": model, "precision": precision, "cells": {}, "launch_error": why}
            record["family"] = family
            records.append(record)
            cells = ", ".join(f"{k} {v['status']}" for k, v in record["cells"].items())
            print(f"[compat] {family} {precision}: " + (cells or record["launch_error"]), flush=True)
    return records


def render(records: list[dict]) -> str:
    cols = [f"{m} ZeRO-{s}" for m in ("search", "retrain") for s in (0, 2, 3)]
    lines = [
        "| family | precision | " + " | ".join(cols) + " | frozen bytes on rank 0 (ZeRO-0 → ZeRO-3) |",
        "|---|---|" + "---|" * len(cols) + "---|",
    ]
    errors = []
    for r in records:
        cells = []
        for m in ("search", "retrain"):
            for s in (0, 2, 3):
                c = r["cells"].get(f"{m}-z{s}")
                if c is None:
                    cells.append(f"✗ ({r.get('launch_error', 'not run')})")
                elif c["status"] == "ok":
                    cells.append("✓")
                else:
                    errors.append(c["error"])
                    cells.append(f"✗ [{len(errors)}]")
        z0, z3 = r["cells"].get("search-z0", {}), r["cells"].get("search-z3", {})
        mem = (
            f"{z0['frozen_bytes_rank0']:,} → {z3['frozen_bytes_rank0']:,}"
            if z0.get("status") == "ok" and z3.get("status") == "ok"
            else "—"
        )
        lines.append(f"| {r['family']} | {r['precision']} | " + " | ".join(cells) + f" | {mem} |")
    for i, e in enumerate(errors, 1):
        lines.append(f"\n[{i}] `{e}`")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="scratch directory (default: a temp dir)")
    p.add_argument("--check", action="store_true", help="exit 1 if README.md does not show this matrix")
    args = p.parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="s3delta-compat-"))
    table = render(run_all(out))
    header = (
        "Generated by `python scripts/compat_matrix.py` (2 DeepSpeed ranks, CPU/gloo, tiny random T5 and "
        "LLaMA; `tests/test_compat_matrix.py` regenerates it and fails if this table is stale). 4bit = NF4 "
        "with double quantization, computing and stored in the model dtype (fp32 in this matrix); 8bit = "
        "LLM.int8. bitsandbytes loads a quantized backbone whole on every rank; ZeRO-3 then partitions it.\n\n"
    )
    readme = (ROOT / "README.md").read_text()
    if args.check:
        current = readme.split(START)[1].split(END)[0].strip() if START in readme else ""
        return 0 if current == (header + table).strip() else 1
    (ROOT / "docs").mkdir(exist_ok=True)
    (ROOT / "docs" / "compatibility.md").write_text("# Compatibility matrix\n\n" + header + table)
    if START in readme:
        before, rest = readme.split(START)
        after = rest.split(END)[1]
        (ROOT / "README.md").write_text(f"{before}{START}\n{header}{table}{END}{after}")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
