"""Quality benchmark: does the searched structure beat manual and random structures at equal budgets,
and how close does it come to full fine-tuning? On real pretrained weights and real labelled data
(`s3delta fetch-assets`), or, with --smoke, on the embedded tiny defaults (CI).

    python benchmarks/quality.py --smoke                              # CI: the whole pipeline, tiny
    python benchmarks/quality.py                                      # MiniLM + SmolLM2, 2 tasks, 2 budgets, 3 seeds
    python benchmarks/quality.py --backbones minilm --tasks rt-sentiment --seeds 0

For each (backbone, task, seed): full fine-tuning and the manual structures at their own size
(LoRA r=8 on q,v; BitFit; LNFit; LowRankAdapter; Adapter; PaFi 0.5%; HiWi on FFN weights); for
each budget also LoRA, Adapter, LRA, PaFi and HiWi resized to the budget, a random structure of
the `mixed` space at the budget, and the searched structure at the budget (search, then retrain
from fresh init). Every method trains with the same
steps, batch and learning rate (full fine-tuning with its own lower rate), is selected on
validation, and is reported on test. One JSON file per run; `report()` writes the markdown table.
Runs whose JSON exists are skipped, so an interrupted benchmark continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from s3delta_ds import builders  # noqa: E402
from s3delta_ds.assets import asset_path  # noqa: E402
from s3delta_ds.config import load_run_config  # noqa: E402
from s3delta_ds.structure import Structure  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
MANUAL = ("lora", "bitfit", "lnfit", "lra", "adapter", "pafi", "hiwi")
SCALED = ("lora", "adapter", "lra", "pafi", "hiwi")


@dataclass(frozen=True)
class Setup:
    """How one backbone is trained in this benchmark (sizes trimmed for 2 CPU cores)."""

    model: str
    steps: int
    batch: int
    eval_every: int
    val: int
    test: int
    lr: float
    full_lr: float
    train: int | None = None
    dtype: str = "fp32"


SETUPS = {
    "minilm": Setup(
        str(asset_path("models", "all-MiniLM-L6-v2")),
        steps=80,
        batch=16,
        eval_every=40,
        val=300,
        test=800,
        lr=2e-3,
        full_lr=1e-4,
    ),
    "smollm2": Setup(
        str(asset_path("models", "SmolLM2-135M-Instruct")),
        steps=24,
        batch=8,
        eval_every=12,
        val=48,
        test=120,
        lr=1e-3,
        full_lr=2e-5,
        dtype="bf16",  # its native dtype; bf16 matmuls are ~1.6x faster on AVX512-BF16 CPUs (fp32 master weights)
    ),
    # --smoke: the embedded tiny defaults (no downloads)
    "tiny-bert": Setup("tiny-bert", steps=6, batch=8, eval_every=3, val=24, test=24, lr=3e-3, full_lr=1e-3),
    "tiny-llama": Setup("tiny-llama", steps=6, batch=8, eval_every=3, val=24, test=24, lr=3e-3, full_lr=1e-3),
}


def _overrides(setup: Setup, task: str, seed: int, out: Path, lr: float) -> list[str]:
    common = [
        f"model.name_or_path={setup.model}",
        f"data.task={task}",
        f"data.max_eval_examples={setup.val}",
        f"data.max_test_examples={setup.test}",
        f"seed={seed}",
        f"output_dir={out}",
        "overwrite=true",
        "zero_stage=0",
        f"model.dtype={setup.dtype}",
    ]
    if setup.train:
        common.append(f"data.max_train_examples={setup.train}")
    for section in ("search", "retrain"):
        common += [
            f"{section}.steps={setup.steps}",
            f"{section}.micro_batch_size={setup.batch}",
            f"{section}.eval_every={setup.eval_every}",
            f"{section}.lr={lr}",
            f"{section}.eval_batch_size=32",
            f"{section}.log_every={setup.eval_every}",
        ]
    return common


def _retrain(setup, task, seed, work: Path, structure: Path | None) -> dict:
    from s3delta_ds.retrain import run_retrain

    lr = setup.full_lr if structure is None else setup.lr
    extra = ["retrain.full_finetune=true"] if structure is None else [f"retrain.structure={structure}"]
    cfg = load_run_config(None, [*_overrides(setup, task, seed, work / "retrain", lr), *extra])
    return run_retrain(cfg)


def _search(setup, task, seed, work: Path, budget: float) -> Path:
    from s3delta_ds.search import run_search

    cfg = load_run_config(
        None,
        [*_overrides(setup, task, seed, work / "search", setup.lr), "search.space=mixed", f"search.budget={budget}"],
    )
    run_search(cfg)
    return work / "search" / "structure.json"


def run_one(backbone: str, task: str, method: str, budget: float | None, seed: int, work: Path) -> dict | None:
    """Train one method; returns its result record (None: the method does not fit the budget)."""
    setup = SETUPS[backbone]
    plan = builders.Backbone.plan(setup.model)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    structure_path = work / "structure.json"
    if method == "full":
        structure_path = None
    elif method == "searched":
        structure_path = _search(setup, task, seed, work, budget)
    else:
        if method == "random":
            s = builders.random_baseline(plan.space("mixed"), plan.info, budget, seed)
        elif budget is not None:
            s = builders.scaled_manual(plan, method, budget)
        else:
            s = builders.manual(plan, method)
        if s is None:
            return None
        s.save(structure_path)
    summary = _retrain(setup, task, seed, work, structure_path)
    params = summary["trainable_params"]
    return {
        "backbone": backbone,
        "task": task,
        "method": method,
        "budget": budget,
        "seed": seed,
        "dtype": setup.dtype,
        "trainable_params": params,
        "relative": summary["trainable_relative"],
        "delta_params": None if structure_path is None else Structure.load(structure_path).budget.used,
        "metric": summary["metric"],
        "validation": summary["validation_score"],
        "test": summary["test_score"],
        "test_all": summary["test"],
        "best_step": summary["best_step"],
        "steps": summary["steps"],
        "time_s": round(time.time() - t0, 1),
        "scaled": None
        if structure_path is None or method in ("searched", "random")
        else Structure.load(structure_path).search.get("scaled"),
    }


def plan_runs(backbones, tasks, budgets, seeds, scaled=SCALED) -> list[tuple]:
    runs = []
    for backbone in backbones:
        for task in tasks:
            for seed in seeds:
                runs += [(backbone, task, m, None, seed) for m in ("full", *MANUAL)]
                for budget in budgets:
                    runs += [(backbone, task, m, budget, seed) for m in (*scaled, "random", "searched")]
    return runs


def result_path(out: Path, backbone, task, method, budget, seed) -> Path:
    tag = method if budget is None else f"{method}@{budget:g}"
    return out / backbone / task / f"{tag}-s{seed}.json"


def _fmt(values: list[float]) -> str:
    if not values:
        return "—"
    mean = statistics.mean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def report(out: Path, md: Path, title: str) -> str:
    """The markdown table: mean ± std over seeds of the test score, % of full fine-tuning, parameters."""
    rows = [json.loads(p.read_text()) for p in sorted(out.rglob("*.json"))]
    lines = [
        f"# {title}",
        "",
        "Test score (×100, mean ± std over seeds) at the best validation step; "
        "`% FT` = mean score / mean full fine-tuning score; `params` = trainable parameters "
        "(mean over seeds; classification heads excluded from structures' budgets but trained).",
        "",
    ]
    for backbone in sorted({r["backbone"] for r in rows}):
        for task in sorted({r["task"] for r in rows if r["backbone"] == backbone}):
            sel = [r for r in rows if r["backbone"] == backbone and r["task"] == task and not r.get("skipped")]
            if not sel:
                continue
            metric = sel[0]["metric"]
            full = [r["test"] for r in sel if r["method"] == "full"]
            full_mean = statistics.mean(full) if full else None
            lines += [
                f"## {backbone} · {task} ({metric})",
                "",
                "| budget | method | test | % FT | params | seeds |",
                "|---|---|---|---|---|---|",
            ]
            groups: dict[tuple, list[dict]] = {}
            for r in sel:
                groups.setdefault((r["budget"] if r["budget"] is not None else -1.0, r["method"]), []).append(r)
            order = {m: i for i, m in enumerate(("full", *MANUAL, "random", "searched"))}
            for (budget, method), rs in sorted(
                groups.items(), key=lambda kv: (kv[0][0] >= 0, -kv[0][0], order.get(kv[0][1], 9))
            ):
                tests = [r["test"] for r in rs]
                pct = f"{100 * statistics.mean(tests) / full_mean:.1f}%" if full_mean else "—"
                params = statistics.mean(r["trainable_params"] for r in rs)
                label = "own size" if budget < 0 else f"{budget:g}"
                name = method if rs[0].get("scaled") is None else f"{method} {rs[0]['scaled']}"
                lines.append(f"| {label} | {name} | {_fmt(tests)} | {pct} | {params:,.0f} | {len(rs)} |")
            skipped = sorted(
                {
                    (r["method"], r["budget"])
                    for r in rows
                    if r["backbone"] == backbone and r["task"] == task and r.get("skipped")
                }
            )
            if skipped:
                lines += ["", "Does not fit the budget: " + ", ".join(f"{m} at {b:g}" for m, b in skipped) + "."]
            lines.append("")
    notes = md.with_name(md.stem + "-notes.md")
    if notes.exists():  # the analysis of these numbers, written by whoever ran them
        lines += ["", notes.read_text().strip()]
    text = "\n".join(lines)
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(text + "\n")
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny embedded backbones and task, 1 seed (CI)")
    p.add_argument("--backbones", default="minilm,smollm2")
    p.add_argument("--tasks", default="rt-sentiment,bb-strategyqa")
    p.add_argument("--budgets", default="1e-3,1e-4")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument(
        "--methods",
        default=None,
        help="only these methods (e.g. full,lora,random,searched); the rest can follow in a later pass",
    )
    p.add_argument(
        "--scaled",
        default=",".join(SCALED),
        help="manual types also resized to each budget ('' for none; their own-size rows always run)",
    )
    p.add_argument("--out", default=None, help="result directory (default benchmarks/results/quality[-smoke])")
    p.add_argument("--work", default=None, help="scratch directory for run outputs (default: a temp dir)")
    args = p.parse_args(argv)
    if args.smoke:
        args.backbones, args.tasks, args.budgets, args.seeds = (
            "tiny-bert,tiny-llama",
            "tiny-sentiment",
            "0.02,0.01",
            "0",
        )
    out = Path(args.out or RESULTS / ("quality-smoke" if args.smoke else "quality"))
    md = out.with_suffix(".md")
    work = Path(args.work or os.environ.get("TMPDIR", "/tmp")) / f"s3delta-quality-{os.getpid()}"
    runs = plan_runs(
        args.backbones.split(","),
        args.tasks.split(","),
        [float(b) for b in args.budgets.split(",")],
        [int(s) for s in args.seeds.split(",")],
        [m for m in args.scaled.split(",") if m],
    )
    if args.methods:
        keep = set(args.methods.split(","))
        runs = [r for r in runs if r[2] in keep]
    print(f"[quality] {len(runs)} runs -> {out}", flush=True)
    for i, (backbone, task, method, budget, seed) in enumerate(runs):
        path = result_path(out, backbone, task, method, budget, seed)
        if path.exists():
            continue
        t0 = time.time()
        record = run_one(backbone, task, method, budget, seed, work / f"{i}")
        if record is None:
            record = {
                "backbone": backbone,
                "task": task,
                "method": method,
                "budget": budget,
                "seed": seed,
                "skipped": "does not fit the budget",
            }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=1) + "\n")
        print(
            f"[quality] {i + 1}/{len(runs)} {backbone} {task} {method} {budget} s{seed}: "
            f"{record.get('test', record.get('skipped'))} ({time.time() - t0:.0f}s)",
            flush=True,
        )
    print(report(out, md, "Quality benchmark" + (" (smoke)" if args.smoke else "")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
