"""Rows of the compatibility matrix: run search and retrain under ZeRO stages 0, 2 and 3 for one
backbone and each precision asked for, in one launch, and record what works (and the error users
get when it does not) in ``compat-<precision>.json``. ``scripts/compat_matrix.py`` launches every
family once with 2 ranks (all precisions: one start-up instead of four) and renders the table that
README.md shows.

    deepspeed --num_gpus 2 --module s3delta_ds.run.compat --model tiny-t5 --precision fp32,4bit --out DIR
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

from ..config import load_run_config
from ..engine import zero
from ..structure.builders import Backbone, manual

PRECISIONS = {
    "fp32": ["model.dtype=fp32"],
    "bf16": ["model.dtype=bf16"],
    "4bit": ["model.dtype=fp32", "model.quantize=4bit"],
    "8bit": ["model.dtype=fp32", "model.quantize=8bit"],
}
STAGES = (0, 2, 3)
_TINY = [
    "search.steps=2",
    "search.eval_every=2",
    "search.budget=0.02",
    "search.micro_batch_size=2",
    "retrain.steps=2",
    "retrain.eval_every=2",
    "retrain.micro_batch_size=2",
    "data.max_eval_examples=8",
    "search.eval_batch_size=8",
    "retrain.eval_batch_size=8",
    "deepspeed=zero3_cpu",
    "data.task=tiny-sentiment",
]


def _first_line(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip().splitlines()[0]
    return text[:200]


def run_cell(model: str, precision: str, stage: int, mode: str, out: Path, structure: Path) -> dict:
    from ..retrain import run_retrain
    from ..search import run_search

    overrides = [
        f"model.name_or_path={model}",
        *PRECISIONS[precision],
        *_TINY,
        f"zero_stage={stage}",
        f"output_dir={out / f'{mode}-z{stage}'}",
        "overwrite=true",
    ]
    if mode == "retrain":
        overrides.append(f"retrain.structure={structure}")
    try:
        cfg = load_run_config(None, overrides)
        summary = (run_search if mode == "search" else run_retrain)(cfg)
        return {"status": "ok", "frozen_bytes_rank0": summary["frozen_bytes_rank0"], "step_s": summary["median_step_s"]}
    except Exception as e:  # noqa: BLE001 - every failure is a result here, recorded with its message
        if zero.rank() == 0:
            traceback.print_exc()
        return {"status": "error", "error": _first_line(e)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m s3delta_ds.run.compat")
    p.add_argument("--model", required=True)
    p.add_argument("--precision", required=True, help=f"comma-separated, of {', '.join(PRECISIONS)}")
    p.add_argument("--out", required=True)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    precisions = args.precision.split(",")
    unknown = [x for x in precisions if x not in PRECISIONS]
    if unknown:
        p.error(f"unknown precision(s) {unknown}; known: {', '.join(PRECISIONS)}")
    out = Path(args.out)
    zero.init_distributed()
    structure = out / "lora.json"
    if zero.rank() == 0:
        manual(Backbone.plan(args.model), "lora").save(structure)
    zero.barrier()
    for precision in precisions:
        results = {}
        for stage in STAGES:
            for mode in ("search", "retrain"):
                cell = run_cell(args.model, precision, stage, mode, out / precision, structure)
                results[f"{mode}-z{stage}"] = cell
                print(f"[compat] {args.model} {precision} {mode} ZeRO-{stage}: {cell}", flush=True)
        if zero.rank() == 0:  # written as each precision ends: a later crash keeps the rows before it
            record = {"model": args.model, "precision": precision, "world": zero.world(), "cells": results}
            (out / f"compat-{precision}.json").write_text(json.dumps(record, indent=2) + "\n")
    zero.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
