"""``s3delta structure random|manual ...``: baseline structures as structure JSON v1."""

from __future__ import annotations

from ..method.space import SPACES
from ..structure import builders
from ..structure.builders import MANUAL_PRESETS, Backbone
from ._format import fmt_int


def register(sub) -> None:
    p = sub.add_parser("structure", help="make a baseline structure (random at a budget, or a manual preset)")
    kinds = p.add_subparsers(dest="kind", required=True, metavar="KIND")
    r = kinds.add_parser("random", help="random candidates of a space until nothing more fits the budget")
    r.add_argument("model", metavar="MODEL_OR_CONFIG")
    r.add_argument("--space", default="mixed", choices=sorted(SPACES))
    r.add_argument("--budget", type=float, required=True, help="fraction of backbone parameters, e.g. 1e-4")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("-o", "--output", required=True, help="structure JSON to write")
    r.set_defaults(func=run_random)
    m = kinds.add_parser("manual", help="a standard manual structure")
    m.add_argument("model", metavar="MODEL_OR_CONFIG")
    m.add_argument("--preset", required=True, choices=sorted(MANUAL_PRESETS))
    m.add_argument("-o", "--output", required=True, help="structure JSON to write")
    m.set_defaults(func=run_manual)


def _report(structure, path) -> None:
    s = structure.summary()
    print(
        f"wrote {path}: {s['modules']} modules, {fmt_int(s['params_used'])} parameters "
        f"({100 * s['used_relative']:.5f}% of {fmt_int(s['backbone_params'])})"
    )


def run_random(args) -> int:
    backbone = Backbone.plan(args.model)
    structure = builders.random_baseline(backbone.space(args.space), backbone.info, args.budget, args.seed)
    _report(structure, structure.save(args.output))
    return 0


def run_manual(args) -> int:
    structure = builders.manual(Backbone.plan(args.model), args.preset)
    _report(structure, structure.save(args.output))
    return 0
