"""Retrain a structure (searched, random, manual or transferred) from fresh init, on DeepSpeed.

    deepspeed --num_gpus 2 s3delta_ds/retrain.py --config examples/tiny_t5.yaml retrain.structure=runs/x/structure.json
    python -m s3delta_ds.retrain --config ... [section.key=value ...]

Deltas are attached ungated with their exact init, trained with one optimizer on the full training
split, selected on validation, and saved as ``deltas.safetensors`` (only the trained weights,
gathered from ZeRO-3 and verified). ``retrain.full_finetune=true`` trains every backbone weight
instead (the fine-tuning baseline; nothing is saved). Writes summary.json with test scores at the
best validation step.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:  # run as a file by a launcher: import the package, not siblings
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from s3delta_ds.config import RunConfig
from s3delta_ds.recipes.retrain import DELTA_FILE, RetrainRecipe
from s3delta_ds.run.runtime import script_main

__all__ = ["DELTA_FILE", "main", "run_retrain"]


def run_retrain(cfg: RunConfig, *, resume: bool = False) -> dict | None:
    """Retrain on this rank (collective). Returns the summary on every rank (None when the launch
    stopped early because of ``retrain.stop_after``)."""
    recipe = RetrainRecipe(cfg, resume=resume)
    recipe.setup()
    return recipe.finish() if recipe.train() else None


def main(argv: list[str] | None = None) -> int:
    return script_main(run_retrain, argv, prog="s3delta_ds/retrain.py")


if __name__ == "__main__":
    sys.exit(main())
else:  # ``s3delta_ds.retrain(...)``: the public API calls this module (see api.callable_module)
    from s3delta_ds import api

    api.callable_module(__name__, api.retrain)
