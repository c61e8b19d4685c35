"""``s3delta demo --out DIR``: search + retrain (+ a random baseline) on the embedded tiny default."""

from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("demo", help="run a real search and retrain on the embedded tiny default (CPU, 2 ranks)")
    p.add_argument("--out", required=True, help="output directory (refused if not empty, unless --overwrite)")
    p.add_argument("--nproc", type=int, default=2, help="local DeepSpeed ranks (default 2)")
    p.add_argument(
        "--overwrite", action="store_true", help="replace an earlier demo's directory (never one holding other files)"
    )
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. search.steps=50")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..run.demo import describe, run_demo

    print(describe(run_demo(Path(args.out), nproc=args.nproc, overwrite=args.overwrite, overrides=args.overrides)))
    return 0
