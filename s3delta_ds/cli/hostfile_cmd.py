"""``s3delta hostfile [-o FILE] [--slots N] [--nodelist L]``: a DeepSpeed hostfile from a Slurm allocation."""

from __future__ import annotations

from ..util import atomic_write_text


def register(sub) -> None:
    p = sub.add_parser("hostfile", help="write a DeepSpeed hostfile for this Slurm allocation (scontrol)")
    p.add_argument("-o", "--output", help="file to write (default: print)")
    p.add_argument("--slots", type=int, default=None, help="ranks per node (default: GPUs here, else 2)")
    p.add_argument("--nodelist", default=None, help="Slurm node list (default: $SLURM_JOB_NODELIST)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..run.slurm import hostfile

    text = hostfile(args.nodelist, args.slots)
    if args.output:
        atomic_write_text(args.output, text)
        print(f"wrote {args.output}: {text.count(chr(10))} node(s)")
    else:
        print(text, end="")
    return 0
