"""Inference latency: the base model, a structure attached (unmerged), the same structure merged,
and HiWi unmerged / merged. Merged models must cost what the base costs (ratio ≈ 1 within noise).

    python benchmarks/latency.py                       # tiny-t5 and a t5-small shape (random weights), CPU
    python benchmarks/latency.py --shapes tiny-t5 --reps 50

Timings are interleaved (one forward of every variant per round) so machine noise hits all of them
alike; the table reports medians and ratios to the base measured in the same rounds.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.contention import contention, contention_note, warn_if_contended  # noqa: E402
from s3delta_ds.artifacts.merge import merge  # noqa: E402
from s3delta_ds.backbones.loading import build_model, load_config  # noqa: E402
from s3delta_ds.method.gates import random_structure  # noqa: E402
from s3delta_ds.method.supernet import DeltaSpec, attach, delta_parameters  # noqa: E402
from s3delta_ds.structure.builders import Backbone  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def _model(shape: str, seed: int = 0):
    torch.manual_seed(seed)
    m = build_model(load_config(shape))
    m.eval()
    return m


def _structure(plan: Backbone, types: tuple[str, ...], budget: float, seed: int) -> list[DeltaSpec]:
    cands = [c for c in plan.space("mixed+pafi+hiwi").candidates if c.type in types]
    n = [c.params for c in cands]
    absolute = budget * plan.info.num_params
    chosen = range(len(cands)) if absolute >= sum(n) else random_structure(n, absolute, seed)
    return [DeltaSpec(cands[i].site, cands[i].type, cands[i].kwargs) for i in chosen]


def _variants(shape: str, budget: float) -> dict[str, torch.nn.Module]:
    out = {"base": _model(shape)}
    for name, types in (("structure", ("lora", "lnfit", "pafi")), ("hiwi", ("hiwi",))):
        for merged in (False, True):
            m = _model(shape)
            plan = Backbone.from_model(m, shape)
            attach(m, plan.site_map, _structure(plan, types, budget, seed=1))
            with torch.no_grad():
                for _, p in delta_parameters(m):
                    p.normal_(0, 0.01)
            if merged:
                report = merge(m, plan.site_map)
                assert report.complete, report.kept
            out[f"{name} {'merged' if merged else 'unmerged'}"] = m
    return out


def _batch(model, batch: int, seq: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, min(model.config.vocab_size, 200), (batch, seq), generator=g)
    b = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if model.config.is_encoder_decoder:
        b["decoder_input_ids"] = ids[:, : max(1, seq // 4)]
    return b


def measure(shape: str, *, budget: float, batch: int, seq: int, reps: int, warmup: int = 3) -> dict:
    variants = _variants(shape, budget)
    inputs = _batch(variants["base"], batch, seq)
    times = {k: [] for k in variants}
    with torch.inference_mode():
        ref = variants["base"](**inputs).logits
        merged_out = variants["structure merged"](**inputs).logits
        unmerged_out = variants["structure unmerged"](**inputs).logits
        for r in range(warmup + reps):
            for name, m in variants.items():
                t0 = time.perf_counter()
                m(**inputs)
                if r >= warmup:
                    times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["base"])
    rows = {
        name: {"median_ms": 1000 * statistics.median(t), "ratio_to_base": statistics.median(t) / base}
        for name, t in times.items()
    }
    return {
        "shape": shape,
        "params": sum(p.numel() for p in variants["base"].parameters()),
        "batch": batch,
        "seq": seq,
        "reps": reps,
        "budget": budget,
        "variants": rows,
        "merged_vs_unmerged_max_abs_diff": float((merged_out - unmerged_out).abs().max()),
        "structure_changes_output": bool((unmerged_out - ref).abs().max() > 0),
    }


def table(results: list[dict], machine: dict | None = None) -> str:
    lines = [
        "# Inference latency (CPU)",
        "",
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; medians of interleaved rounds; ratio = variant / base, same rounds.",
        "",
        *([note, ""] if (note := contention_note(machine)) else []),
        "| shape | params | batch × seq | variant | median ms | ratio to base |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        for name, v in r["variants"].items():
            lines.append(
                f"| {r['shape']} | {r['params']:,} | {r['batch']} × {r['seq']} | {name} | "
                f"{v['median_ms']:.2f} | {v['ratio_to_base']:.3f} |"
            )
    lines += [
        "",
        "Merged outputs vs unmerged (max |Δ|): "
        + ", ".join(f"{r['shape']} {r['merged_vs_unmerged_max_abs_diff']:.1e}" for r in results),
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="tiny-t5,t5-small")
    p.add_argument("--budget", type=float, default=1e-3, help="size of the random structures")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--out", default=str(RESULTS / "latency"))
    args = p.parse_args(argv)
    machine = contention()
    warn_if_contended(machine)
    results = []
    for shape in args.shapes.split(","):
        budget = max(args.budget, 0.02) if shape.startswith("tiny") else args.budget
        results.append(measure(shape, budget=budget, batch=args.batch, seq=args.seq, reps=args.reps))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"contention": machine, "shapes": results}, indent=2) + "\n")
    text = table(results, machine)
    out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
