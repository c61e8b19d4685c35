"""``s3delta pafi-mask MODEL --density D [--ranking global] [--eligible linear,norm] -o MASK [--structure S]``."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("pafi-mask", help="the task-agnostic PaFi mask of a backbone (smallest |w|), once per backbone")
    p.add_argument("model", metavar="MODEL", help="model directory or hub id (needs the weights)")
    p.add_argument("--density", type=float, required=True, help="fraction of eligible entries that train")
    p.add_argument("--ranking", default="global", choices=("global", "per-matrix"))
    p.add_argument("--eligible", default="linear", help="comma-separated site kinds: linear, norm")
    p.add_argument("-o", "--output", required=True, metavar="MASK.safetensors")
    p.add_argument("--structure", metavar="S.json", help="also write the PaFi baseline structure for this mask")
    p.set_defaults(func=run)


def stored_dtype(source: str) -> str:
    """fp32 | bf16 | fp16: the ``dtype`` a model's config.json records (fp32 when it records none)."""
    from ..backbones.loading import load_config

    config = load_config(source)
    stored = str(getattr(config, "dtype", None) or "float32").removeprefix("torch.")
    return {"bfloat16": "bf16", "float16": "fp16"}.get(stored, "fp32")


def run(args) -> int:
    from ..errors import ConfigError

    if not 0 < args.density < 1:  # before an 11B backbone loads for minutes
        raise ConfigError(f"--density must be in (0, 1), got {args.density}")
    from ..config import ModelConfig
    from ..engine.backbone import load_backbone, resolve_source
    from ..structure.builders import Backbone
    from ..structure.pafi import compute_mask, mask_structure, save_mask, weights_probe

    cfg = ModelConfig(name_or_path=args.model)
    source = resolve_source(cfg)
    # In the dtype the checkpoint stores: the ranking reads exactly the stored values (each tensor is
    # upcast on its own), and a bf16 checkpoint is not doubled in memory (LLaMA-70B: 140 GB, not 280).
    model = load_backbone(cfg, source=source, dtype=stored_dtype(source), ds_config={})
    backbone = Backbone.from_model(model, args.model)
    eligible = tuple(e.strip() for e in args.eligible.split(",") if e.strip())
    mask = compute_mask(model, backbone.site_map, args.density, args.ranking, eligible)
    probe = weights_probe(model, backbone.site_map, mask)
    save_mask(
        mask,
        args.output,
        backbone=backbone,
        density=args.density,
        ranking=args.ranking,
        eligible=eligible,
        probe=probe,
    )
    n = sum(int(v.numel()) for v in mask.values())
    print(f"wrote {args.output}: {n:,} trainable entries over {len(mask)} tensors ({args.ranking} ranking)")
    if args.structure:
        from ..structure.pafi import load_mask

        mask, meta = load_mask(args.output, backbone)
        mask_structure(backbone, mask, meta).save(args.structure)
        print(f"wrote {args.structure}: retrain it with retrain.pafi_mask={args.output}")
    return 0
