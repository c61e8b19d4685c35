"""Where a ZeRO-3 step's time goes on a frozen backbone: the same retrain and search steps as
benchmarks/step.py (variants c/c2, d/d2), timed under ZeRO-3 and under ZeRO-2 (replicated backbone)
in one process, then ZeRO-3 profiled with cProfile and its time attributed to DeepSpeed's module
hooks (fetch, release, bookkeeping), the all-gathers inside them, and the rest (the model itself).

    python benchmarks/zero3_profile.py --shape tiny            # one rank
    deepspeed --num_gpus 2 benchmarks/zero3_profile.py --shape base   # 2 ranks (DS_ACCELERATOR=cpu)

cProfile inflates many small Python calls, so the shares are read against the untraced ZeRO-3/ZeRO-2
ratio measured first. Writes benchmarks/results/zero3-profile-<shape>-w<ranks>-<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks import step as S  # noqa: E402
from benchmarks.contention import contention, contention_note, warn_if_contended  # noqa: E402
from s3delta_ds.engine import zero  # noqa: E402

# cProfile entries (file fragment, function) whose cumulative time is one bucket; the buckets are
# disjoint call trees of DeepSpeed's ZeRO-3 machinery.
BUCKETS = {
    "pre-forward hooks (fetch)": [("parameter_offload.py", "_pre_forward_module_hook")],
    "post-forward hooks (release)": [("parameter_offload.py", "_post_forward_module_hook")],
    "pre-backward hooks (fetch)": [("parameter_offload.py", "_run_before_backward_function")],
    "post-backward hooks (release)": [("parameter_offload.py", "_run_after_backward_function")],
}
GATHERS = [("partition_parameters.py", "all_gather_coalesced")]


def _median_time(step, n: int, warmup: int, device) -> float:
    return statistics.median(S.time_steps(step, n, warmup, device))


def _cum(stats: pstats.Stats, keys) -> float:
    total = 0.0
    for (file, _, func), (_, _, _, ct, _) in stats.stats.items():
        if any(file.endswith(f) and func == name for f, name in keys):
            total += ct
    return total


def profile(step, n: int) -> dict:
    pr = cProfile.Profile()
    pr.enable()
    t0 = time.perf_counter()
    for i in range(n):
        step(1000 + i)
    wall = time.perf_counter() - t0
    pr.disable()
    st = pstats.Stats(pr)
    out = {name: _cum(st, keys) / wall for name, keys in BUCKETS.items()}
    out["all-gathers (inside the fetches)"] = _cum(st, GATHERS) / wall
    calls = sum(cc for (file, _, func), (cc, *_rest) in st.stats.items() if func == "_pre_forward_module_hook")
    return {"shares": out, "profiled_s_per_step": wall / n, "module_forward_hooks_per_step": calls / n}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="tiny", choices=sorted(S.SHAPES))
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    zero.init_distributed()
    machine = contention()
    if zero.rank() == 0:
        warn_if_contended(machine)
    device = zero.device()
    gpu = device.type != "cpu"
    dtype, dtype_name = (torch.bfloat16, "bf16") if gpu else (torch.float32, "fp32")
    bsz, src, tgt = (16, 256, 32) if gpu else (4, 64, 32)
    batch = S.batch_for(S.load_config(S.SHAPES[args.shape]), bsz, src, tgt, device)
    rows = {}
    for kind, search in (("retrain", False), ("search", True)):
        times = {}
        for stage in (2, 3):
            zero.restore_functional_linear()
            step, *_ = S.variant_s3delta(args.shape, dtype, batch, device, bsz, dtype_name, stage=stage, search=search)
            times[stage] = _median_time(step, args.steps, 2, device)
            if stage == 3:
                prof = profile(step, max(2, args.steps // 2))
        rows[kind] = {"zero2_s": times[2], "zero3_s": times[3], "ratio": times[3] / times[2], **prof}
    result = {"shape": args.shape, "world": zero.world(), "device": "gpu" if gpu else "cpu", "rows": rows}
    result["contention"] = machine
    if zero.rank() == 0:
        out = ROOT / "benchmarks" / "results" / f"zero3-profile-{args.shape}-w{zero.world()}-{result['device']}"
        out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        out.with_suffix(".md").write_text(render(result))
        print(render(result))
    zero.destroy()
    return 0


def render(r: dict) -> str:
    lines = [
        f"# ZeRO-3 cost profile: {r['shape']}, {r['world']} rank(s), {r['device']}",
        "",
        *([note, ""] if (note := contention_note(r.get("contention"))) else []),
        "| step | ZeRO-2 s | ZeRO-3 s | ZeRO-3/ZeRO-2 | module forward hooks/step | "
        + " | ".join(next(iter(r["rows"].values()))["shares"])
        + " |",
        "|---|---|---|---|---|" + "---|" * len(next(iter(r["rows"].values()))["shares"]),
    ]
    for kind, v in r["rows"].items():
        shares = " | ".join(f"{100 * x:.0f}%" for x in v["shares"].values())
        lines.append(
            f"| {kind} | {v['zero2_s']:.4f} | {v['zero3_s']:.4f} | {v['ratio']:.2f} | "
            f"{v['module_forward_hooks_per_step']:.0f} | {shares} |"
        )
    lines += ["", "Shares are of the profiled ZeRO-3 step time (cProfile, which inflates small calls)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
