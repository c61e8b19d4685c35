"""``s3delta demo``: the README's main job on the embedded tiny default.

A real search on a tiny random T5 with 2 DeepSpeed ranks on the CPU (ZeRO-3), the found structure
retrained from fresh init, a random structure at the same budget retrained the same way for
comparison, and a summary of everything (budget, parameters, scores, step times, world size).
"""

from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path

from ..config import load_run_config
from ..errors import ConfigError, S3DeltaError
from ..structure import Structure, builders
from ..util import atomic_write_text
from .launch import launch
from .preflight import checked_search
from .signals import EXIT_STOPPED

DEMO_CONFIG = str(resources.files("s3delta_ds") / "assets" / "demo.yaml")


def _run(script: str, args: list[str], nproc: int, what: str) -> None:
    rc = launch(script, ["--config", DEMO_CONFIG, *args], nproc)
    if rc == EXIT_STOPPED:
        raise S3DeltaError(
            f"the demo's {what} was stopped by a signal (exit code {rc}); run the demo again with --overwrite"
        )
    if rc != 0:
        raise S3DeltaError(
            f"the demo's {what} failed (exit code {rc}); its output is above. Run the demo again with --overwrite"
        )


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


#: Everything a demo writes into its directory: --overwrite deletes nothing else.
DEMO_NAMES = frozenset(
    {"search", "retrain", "random", "structure.json", "heatmap.png", "random_structure.json", "summary.json"}
)


def _check_replaceable(out: Path) -> None:
    """--overwrite deletes the whole directory: only ever an earlier demo's (``--out .`` or a data
    folder must not go with it)."""
    if not out.is_dir():
        raise ConfigError(f"{out} is not a directory")
    others = sorted(p.name for p in out.iterdir() if p.name not in DEMO_NAMES)
    if others:
        shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        raise ConfigError(
            f"{out} holds files the demo did not write ({shown}): --overwrite only replaces a demo's "
            "directory; pick another --out"
        )
    if Path.cwd().resolve().is_relative_to(out.resolve()):
        raise ConfigError(f"--overwrite would delete {out}, which holds the current directory")


def run_demo(out: Path, *, nproc: int = 2, overwrite: bool = False, overrides: list[str] | None = None) -> dict:
    """Search, retrain, and a random baseline into ``out``. Returns the summary."""
    overrides = list(overrides or [])
    # the overrides and the budget checked before anything is launched or removed; the resolved
    # budget (the embedded model's, for the space) is the random baseline's too
    cfg = checked_search(load_run_config(DEMO_CONFIG, overrides))
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(f"{out} is not empty: pass --overwrite to replace it (runs are never mixed)")
        _check_replaceable(out)
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)

    _run("search", [f"output_dir={out / 'search'}", *overrides], nproc, "search")
    searched = out / "search" / "structure.json"
    _run("retrain", [f"output_dir={out / 'retrain'}", f"retrain.structure={searched}", *overrides], nproc, "retrain")

    structure = Structure.load(searched)
    plan = builders.Backbone.plan(cfg.model.name_or_path)
    random_structure = builders.random_baseline(plan.space(cfg.search.space), plan.info, cfg.search.budget, cfg.seed)
    random_path = random_structure.save(out / "random_structure.json")
    _run(
        "retrain",
        [f"output_dir={out / 'random'}", f"retrain.structure={random_path}", *overrides],
        nproc,
        "retrain of the random baseline",
    )

    shutil.copyfile(searched, out / "structure.json")
    shutil.copyfile(out / "search" / "heatmap.png", out / "heatmap.png")
    search, retrain, random_ = (_load(out / d / "summary.json") for d in ("search", "retrain", "random"))
    summary = {
        "budget": cfg.search.budget,
        "budget_params": search["budget_params"],
        "params_used": structure.budget.used,
        "modules": len(structure.modules),
        "backbone_params": structure.backbone.num_params,
        "metric": retrain["metric"],
        "search_score": search["search_score"],
        "retrain_validation": retrain["validation_score"],
        "retrain_test": retrain["test_score"],
        "random_params_used": random_structure.budget.used,
        "random_test": random_["test_score"],
        "search_step_s": search["median_step_s"],
        "retrain_step_s": retrain["median_step_s"],
        "world_size": search["world_size"],
        "zero_stage": search["zero_stage"],
        "search_steps": search["steps"],
        "retrain_steps": retrain["steps"],
        "paths": {
            "structure": str(out / "structure.json"),
            "heatmap": str(out / "heatmap.png"),
            "deltas": retrain["deltas"],
            "search": str(out / "search"),
            "retrain": str(out / "retrain"),
            "random": str(out / "random"),
        },
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def describe(summary: dict) -> str:
    m = summary["metric"]
    p = summary["paths"]
    return "\n".join(
        [
            "",
            f"S3Delta demo: {summary['world_size']} ranks, ZeRO stage {summary['zero_stage']}, budget "
            f"{summary['budget']:g} of {summary['backbone_params']:,} backbone parameters",
            f"  searched structure: {summary['modules']} modules, {summary['params_used']:,} parameters; "
            f"retrained test {m} {summary['retrain_test']:.4f} (validation {summary['retrain_validation']:.4f})",
            f"  random structure:   {summary['random_params_used']:,} parameters; retrained test {m} "
            f"{summary['random_test']:.4f}",
            f"  median step: search {summary['search_step_s']:.3f}s, retrain {summary['retrain_step_s']:.3f}s",
            f"  structure {p['structure']}",
            f"  heatmap   {p['heatmap']}",
            f"  deltas    {p['deltas']}",
            f"  summary   {Path(p['structure']).with_name('summary.json')}",
        ]
    )
