"""``s3delta search`` / ``s3delta retrain``: the entry scripts, in this process or on N local ranks.

    s3delta search --config examples/tiny_t5.yaml [--nproc 2] [section.key=value ...]
    s3delta retrain --config ... retrain.structure=STRUCTURE.json [--nproc 2]

Inside a launcher (deepspeed, torchrun, srun) leave ``--nproc`` out: each rank runs the command.
"""

from __future__ import annotations

import argparse


def _ranks(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of ranks (0: run in this process)")
    return n


def register(sub) -> None:
    for name, help_ in (("search", "search a structure at a budget"), ("retrain", "retrain a structure")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--config", help="YAML run config (see examples/)")
        p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
        p.add_argument(
            "--nproc",
            type=_ranks,
            default=0,
            help="start N local ranks with the DeepSpeed launcher (default: run in this process)",
        )
        p.add_argument("overrides", nargs="*", metavar="section.key=value")
        p.set_defaults(func=run, script=name)


def run(args) -> int:
    forwarded = ([f"--config={args.config}"] if args.config else []) + (["--resume"] if args.resume else [])
    forwarded += list(args.overrides)
    if args.nproc:
        from ..config import load_run_config
        from ..run.launch import launch
        from ..run.preflight import check_before_launch

        check_before_launch(args.script, load_run_config(args.config, args.overrides), resume=args.resume)

        return launch(args.script, forwarded, args.nproc)
    if args.script == "search":
        from ..search import main
    else:
        from ..retrain import main
    return main(forwarded)
