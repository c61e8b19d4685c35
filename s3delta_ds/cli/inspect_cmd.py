"""``s3delta inspect STRUCTURE.json [--json]``: validate and summarise a structure."""

from __future__ import annotations

from ..structure import Structure
from ._format import fmt_int, print_json, table


def register(sub) -> None:
    p = sub.add_parser("inspect", help="validate and summarise a structure JSON")
    p.add_argument("structure", metavar="STRUCTURE.json")
    p.add_argument("--json", action="store_true", help="print a JSON object instead of text")
    p.set_defaults(func=run)


def run(args) -> int:
    structure = Structure.load(args.structure)
    s = structure.summary()
    if args.json:
        print_json(s)
        return 0
    budget = (
        ""
        if s["budget_absolute"] is None
        else (f" of a budget of {fmt_int(s['budget_absolute'])} ({s['budget_relative']:.3g} of the backbone)")
    )
    print(
        f"{args.structure}: valid {s['kind']} structure for {s['backbone']} ({s['family']}, "
        f"{fmt_int(s['backbone_params'])} parameters), space {s['space']}"
    )
    print(
        f"{s['modules']} modules, {fmt_int(s['params_used'])} parameters used{budget}; "
        f"{s['candidates']} candidates recorded\n"
    )
    print(
        table(
            [[t, str(v["count"]), fmt_int(v["params"])] for t, v in s["by_type"].items()], ["type", "modules", "params"]
        )
    )
    print()
    print(table([[k, str(v)] for k, v in s["modules_per_layer"].items()], ["layer", "modules"]))
    return 0
