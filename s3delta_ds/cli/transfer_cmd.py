"""``s3delta transfer SRC.json --to MODEL_OR_CONFIG [--budget R] -o OUT.json``."""

from __future__ import annotations

from ..structure import Structure
from ..structure.builders import Backbone
from ..structure.transfer import transfer
from ._format import fmt_int, table


def register(sub) -> None:
    p = sub.add_parser("transfer", help="map a structure to another backbone of the same family and re-discretise it")
    p.add_argument("source", metavar="SRC.json")
    p.add_argument(
        "--to",
        required=True,
        metavar="MODEL_OR_CONFIG",
        help="target model dir, config.json, shipped shape (e.g. t5-v1_1-xxl) or hub id; no weights needed",
    )
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        help="relative budget on the target (default: the source's relative budget); for searched structures "
        "and random baselines (drawn again on the target with their space and seed); a manual preset is rebuilt "
        "at its own settings, a hand-edited structure maps its modules as they are",
    )
    p.add_argument("-o", "--output", required=True, metavar="OUT.json")
    p.set_defaults(func=run)


def run(args) -> int:
    source = Structure.load(args.source)
    target = Backbone.plan(args.to)
    out = transfer(source, target, args.budget)
    out.save(args.output)
    src_s, out_s = source.summary(), out.summary()
    print(
        f"{args.source} ({src_s['backbone']}, depths {source.backbone.depths}) -> {args.to} "
        f"(depths {target.info.depths}), rule {out.provenance['rule']}"
    )
    rows = [
        [
            "source",
            fmt_int(src_s["backbone_params"]),
            f"{src_s['used_relative']:.3g}",
            str(src_s["modules"]),
            fmt_int(src_s["params_used"]),
        ],
        [
            "target",
            fmt_int(out_s["backbone_params"]),
            f"{out_s['used_relative']:.3g}",
            str(out_s["modules"]),
            fmt_int(out_s["params_used"]),
        ],
    ]
    print(table(rows, ["", "backbone params", "used / backbone", "modules", "params used"]))
    print(f"wrote {args.output}")
    return 0
