"""``s3delta export RUN (--merge [--keep-unmergeable] | --peft [--partial]) -o OUT``."""

from __future__ import annotations

import sys
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("export", help="merge a retrained structure into the backbone, or export it for PEFT")
    p.add_argument("run", metavar="RUN", help="a retrain output directory (structure.json + deltas.safetensors)")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--merge", action="store_true", help="fold the deltas into the weights: a plain HF model")
    mode.add_argument("--peft", action="store_true", help="PEFT adapters: LoRA, LN tuning, IA3 (a folder each)")
    p.add_argument(
        "--keep-unmergeable",
        action="store_true",
        help="with --merge: write deltas that cannot be folded beside the model instead of refusing",
    )
    p.add_argument("--partial", action="store_true", help="with --peft: export only what PEFT can express")
    p.add_argument(
        "--full-precision-base",
        action="store_true",
        help="with --merge on a quantized run: merge into the unquantized weights of the same checkpoint",
    )
    p.add_argument("--max-shard-gb", type=float, default=None, help="with --merge: safetensors shard size (default 5)")
    p.add_argument(
        "--dtype",
        choices=("auto", "fp32", "bf16", "fp16"),
        default="auto",
        help="with --merge: the saved weights' dtype (auto: the backbone checkpoint's own; the merge runs in fp32)",
    )
    p.add_argument("-o", "--output", required=True, metavar="OUT")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..artifacts.export import check_mode_flags, export_merged, rounding_warning, shard_bytes
    from ..artifacts.peft_export import export_peft

    check_mode_flags(args)
    out = Path(args.output)
    if args.merge:
        r = export_merged(
            Path(args.run),
            out,
            keep_unmergeable=args.keep_unmergeable,
            max_shard_bytes=shard_bytes(args.max_shard_gb),
            full_precision_base=args.full_precision_base,
            dtype=args.dtype,
        )
        loads = f"AutoModel*.from_pretrained({str(out)!r})"
        if r["kept"]:  # the merged folder alone is not the trained model
            loads += f", then s3delta_ds.load(model, {str(out / 'unmerged')!r}) for the deltas kept beside it"
        print(f"merged {r['merged']} deltas into {out} ({len(r['files'])} safetensors file(s), {r['dtype']}); {loads}")
        warning = rounding_warning(r)
        if warning:
            print(warning, file=sys.stderr)
        if r["kept"]:
            more = f", ... ({len(r['kept']) - 8} more)" if len(r["kept"]) > 8 else ""
            print(f"kept {len(r['kept'])} unmergeable deltas in {out / 'unmerged'}: {', '.join(r['kept'][:8])}{more}")
        return 0
    r = export_peft(Path(args.run), out, partial=args.partial)
    listed = ", ".join(f"{kind} -> {path}" for kind, path in r["adapters"].items())
    print(f"PEFT adapters: {listed} (base {r['base']!r})")
    print(f"together they are the trained model; load them in this order (also in {out / 'README.md'}):")
    print("    " + r["load"].rstrip("\n").replace("\n", "\n    "))
    if r["not_exported"]:
        print(f"not expressible in PEFT, left out: {', '.join(r['not_exported'][:10])}")
    return 0
