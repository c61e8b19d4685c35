"""Search a sparse delta structure at a parameter budget (S3Delta), on DeepSpeed.

    deepspeed --num_gpus 2 s3delta_ds/search.py --config examples/tiny_t5.yaml [section.key=value ...]
    torchrun --nproc_per_node 2 s3delta_ds/search.py --config ...
    python -m s3delta_ds.search --config ...            # one process

Writes to ``output_dir``: structure.json, gates.csv, heatmap.png, supernet_deltas.safetensors,
metrics.jsonl, tb/, summary.json, config.yaml, ds_config.json and checkpoints/ (``--resume``
continues from the newest complete one).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:  # run as a file by a launcher: import the package, not siblings
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from s3delta_ds.config import RunConfig
from s3delta_ds.recipes.search import SUPERNET_DELTAS, SearchRecipe
from s3delta_ds.run.runtime import script_main

__all__ = ["SUPERNET_DELTAS", "main", "run_search"]


def run_search(cfg: RunConfig, *, resume: bool = False) -> dict | None:
    """The whole search on this rank (collective). Returns the summary on every rank (None when the
    launch stopped early because of ``search.stop_after``)."""
    recipe = SearchRecipe(cfg, resume=resume)
    recipe.setup()
    return recipe.finish() if recipe.train() else None


def main(argv: list[str] | None = None) -> int:
    return script_main(run_search, argv, prog="s3delta_ds/search.py")


if __name__ == "__main__":
    sys.exit(main())
else:  # ``s3delta_ds.search(...)``: the public API calls this module (see api.callable_module)
    from s3delta_ds import api

    api.callable_module(__name__, api.search)
