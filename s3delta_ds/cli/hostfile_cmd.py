"""``s3delta hostfile [-o FILE] [--slots N] [--nodelist L]``: a DeepSpeed hostfile from a Slurm allocation."""

from __future__ import annotations

import os

from ..util import atomic_write_text


def register(sub) -> None:
    p = sub.add_parser("hostfile", help="write a DeepSpeed hostfile for this Slurm allocation (scontrol)")
    p.add_argument("-o", "--output", help="file to write (default: print)")
    p.add_argument("--slots", type=int, default=None, help="ranks per node (default: GPUs here, else 2)")
    p.add_argument("--nodelist", default=None, help="Slurm node list (default: $SLURM_JOB_NODELIST)")
    p.set_defaults(func=run)


def run(args) -> int:
    """Status lines go to stderr: stdout is the hostfile itself (or nothing with -o)."""
    import sys

    from ..run.slurm import hostfile, local_slots

    if args.slots is None and not os.environ.get("NPROC_PER_NODE") and not _gpus_known():
        print(
            f"note: no GPUs visible here and no $SLURM_GPUS_ON_NODE: slots={local_slots()} per node "
            "(pass --slots N, or run this on a compute node)",
            file=sys.stderr,
        )
    if args.slots is not None and args.slots < 1:
        from ..errors import ConfigError

        raise ConfigError(f"--slots must be at least 1 (ranks per node), got {args.slots}")
    text = hostfile(args.nodelist, args.slots)
    if args.output:
        atomic_write_text(args.output, text)
        print(f"wrote {args.output}: {text.count(chr(10))} node(s)", file=sys.stderr)
    else:
        print(text, end="")
    return 0


def _gpus_known() -> bool:
    import torch

    return bool(os.environ.get("SLURM_GPUS_ON_NODE")) or torch.cuda.is_available()
