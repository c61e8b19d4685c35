"""``s3delta space MODEL_OR_CONFIG --space S [--json]``: the candidates of a space on a backbone."""

from __future__ import annotations

from ..method.space import SPACES
from ..structure.builders import Backbone
from ._format import fmt_int, print_json, table


def register(sub) -> None:
    p = sub.add_parser("space", help="list the candidates of a search space on a backbone (config only, no weights)")
    p.add_argument(
        "model",
        metavar="MODEL_OR_CONFIG",
        help="model directory, config.json, shipped shape (e.g. t5-large, llama-2-70b) or hub id",
    )
    p.add_argument("--space", default="mixed", choices=sorted(SPACES), help="search space (default: mixed)")
    p.add_argument("--json", action="store_true", help="print a JSON object instead of a table")
    p.add_argument("--candidates", action="store_true", help="also list every candidate (site, type, params)")
    p.set_defaults(func=run)


def run(args) -> int:
    backbone = Backbone.plan(args.model)
    space = backbone.space(args.space)
    summary = space.summary()
    if args.json:
        if args.candidates:
            summary["candidate_list"] = [
                {"index": c.index, "site": c.site, "type": c.type, "kwargs": dict(c.kwargs), "params": c.params}
                for c in space.candidates
            ]
        print_json(summary)
        return 0
    depths = ", ".join(f"{k} {v}" for k, v in summary["depths"].items())
    print(
        f"{args.model}: family {summary['family']}, {fmt_int(summary['backbone_params'])} parameters, layers: {depths}"
    )
    print(
        f"space {args.space!r}: {summary['candidates']} candidates, {fmt_int(summary['params'])} parameters "
        f"({100 * summary['fraction_of_backbone']:.4f}% of the backbone) if all were on\n"
    )
    rows = [[t, str(v["count"]), fmt_int(v["params"])] for t, v in summary["by_type"].items()]
    print(table(rows, ["type", "count", "params"]))
    if space.inert:
        kinds = sorted({(t, why) for _, t, why in space.inert})
        print(f"\nleft out: {len(space.inert)} candidates that cannot change the output")
        for t, why in kinds:
            print(f"  {t}: {why}")
    if args.candidates:
        print()
        print(
            table(
                [[str(c.index), c.site, c.type, fmt_int(c.params)] for c in space.candidates],
                ["#", "site", "type", "params"],
            )
        )
    return 0
