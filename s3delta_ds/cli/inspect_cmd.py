"""``s3delta inspect STRUCTURE.json [--json]``: validate and summarise a structure."""

from __future__ import annotations

import sys

from ..structure import Structure
from ._format import fmt_int, print_json, table


def register(sub) -> None:
    p = sub.add_parser("inspect", help="validate and summarise a structure JSON")
    p.add_argument("structure", metavar="STRUCTURE.json")
    p.add_argument("--json", action="store_true", help="print a JSON object instead of text")
    p.add_argument(
        "--budgets",
        metavar="R1,R2,...",
        help="also show the structures the same search gives at these relative budgets (from stored p)",
    )
    p.add_argument("--plot", metavar="PNG", help="with --budgets: plot parameters per delta type against the budget")
    p.add_argument("--write", metavar="DIR", help="with --budgets: write each structure as DIR/structure_<budget>.json")
    p.set_defaults(func=run)


def _budgets(text: str) -> list[float]:
    from ..errors import ConfigError

    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--budgets must be comma-separated numbers, e.g. 1e-4,5e-5; got {text!r}") from None
    if not values:
        raise ConfigError("--budgets is empty")
    bad = [v for v in values if not 0 < v < 1]  # nan too
    if bad:
        raise ConfigError(
            f"--budgets are fractions of the backbone, each between 0 and 1 (e.g. 1e-4); got {', '.join(map(str, bad))}"
        )
    return values


def sweep(args, structure: Structure) -> int:
    from pathlib import Path

    from ..errors import BudgetError
    from ..structure.transfer import rediscretise

    results, refused = [], []
    for b in _budgets(args.budgets):  # one budget below the cheapest candidate must not sink the table
        try:
            results.append((b, rediscretise(structure, b)))
        except BudgetError as e:
            refused.append((b, str(e)))
    if refused:
        cheapest = min((c.params for c in structure.candidates), default=0)
        floor = cheapest / structure.backbone.num_params
        for b, why in refused:
            print(f"budget {b:g}: no structure ({why}); the smallest relative budget that fits one is {floor:.3g}",
                  file=sys.stderr)  # fmt: skip
        if not results:
            return 2
    if args.write:
        for b, s in results:
            s.save(Path(args.write) / f"structure_{b:g}.json")
    if args.plot:
        from ..run.report import budget_sweep_plot

        budget_sweep_plot(Path(args.plot), [(b, s.summary()) for b, s in results])
    if args.json:
        print_json([{"budget": b, **s.summary()} for b, s in results])
        return 0
    types = sorted({t for _, s in results for t in s.summary()["by_type"]})
    rows = []
    for b, s in results:
        summ = s.summary()
        rows.append(
            [f"{b:g}", fmt_int(b * summ["backbone_params"]), fmt_int(summ["params_used"]), str(summ["modules"])]
            + [str(summ["by_type"].get(t, {}).get("count", 0)) for t in types]
        )
    print(f"{args.structure}: structures at other budgets from the stored gate probabilities (no re-search)\n")
    print(table(rows, ["budget", "budget params", "params used", "modules", *types]))
    return 0


def run(args) -> int:
    if not args.budgets and (args.plot or args.write):
        from ..errors import ConfigError

        flag = "--plot" if args.plot else "--write"
        raise ConfigError(f"{flag} works with --budgets (the sweep it plots or writes), e.g. --budgets 1e-4,5e-5")
    structure = Structure.load(args.structure)
    if args.budgets:
        return sweep(args, structure)
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
