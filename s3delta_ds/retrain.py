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

import json
import statistics
import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:  # run as a file by a launcher: import the package, not siblings
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch

from s3delta_ds.checkpoint import latest_checkpoint, load_run_checkpoint, save_deltas, save_run_checkpoint
from s3delta_ds.config import RunConfig
from s3delta_ds.data import BatchStream
from s3delta_ds.engine import zero
from s3delta_ds.engine.backbone import DTYPES
from s3delta_ds.engine.bilevel import delta_update
from s3delta_ds.evaluate import evaluate
from s3delta_ds.objective import DeltaModel
from s3delta_ds.preflight import preflight_retrain
from s3delta_ds.recipe import frozen_bytes, is_better, new_state, prepare, script_main, train_loop
from s3delta_ds.report import MetricsLog
from s3delta_ds.structure import atomic_write_text
from s3delta_ds.supernet import attach, cast_deltas, freeze_backbone

DELTA_FILE = "deltas.safetensors"


def run_retrain(cfg: RunConfig, *, resume: bool = False) -> dict | None:
    """Retrain on this rank (collective). Returns the summary on every rank (None when the launch
    stopped early because of ``retrain.stop_after``)."""
    cfg, structure = preflight_retrain(cfg)  # names, structure and family checked before anything is written
    rc = cfg.retrain
    rt = prepare(cfg, rc, resume=resume, kind="retrain")
    head = rt.family.head_modules
    if structure is not None:
        structure.check_backbone(rt.site_map)
        torch.manual_seed(cfg.seed)  # fresh init, identical on every rank
        masks = None
        if rc.pafi_mask:
            from s3delta_ds.pafi import load_mask

            masks, _ = load_mask(rc.pafi_mask, rt.backbone)
        attach(
            rt.model,
            rt.site_map,
            structure.specs(),
            gather=zero.gathered,
            register_external=zero.register_external,
            masks=masks,
        )
        cast_deltas(rt.model, DTYPES[rt.dtype])
        trainable = freeze_backbone(rt.model, head)
    else:
        rt.model.requires_grad_(True)
        trainable = sum(zero.full_numel(p) for p in rt.model.parameters())
    rt.log(
        f"retraining {'full fine-tuning' if structure is None else rc.structure}: {trainable:,} trainable "
        f"parameters ({100 * trainable / rt.backbone.info.num_params:.5f}% of the backbone)"
    )
    module = DeltaModel(rt.model, rt.objective)
    params = [p for p in module.parameters() if p.requires_grad]
    engine = zero.build_engine(
        module, params, lr=rc.lr, weight_decay=rc.weight_decay, total_steps=rc.steps, ds_config=rt.ds_config
    )
    rank0_bytes = zero.broadcast_object(frozen_bytes(module))  # frozen backbone bytes held by rank 0
    stream = BatchStream(
        rt.data["train"],
        micro_batch=rc.micro_batch_size,
        grad_accum=rc.grad_accum,
        rank=rt.rank,
        world=rt.world,
        seed=cfg.seed,
        collate=rt.collate,
        name="train",
    )
    state = new_state(test=None)
    ckpt_dir = rt.out / "checkpoints"
    if resume:
        client = load_run_checkpoint(engine, ckpt_dir)
        stream.load_state_dict(client["stream"])
        state = client["state"]
        rt.log(f"resumed from {latest_checkpoint(ckpt_dir)} at step {state['step']}")

    metrics = MetricsLog(rt.out, rt.is_main)
    metric = rt.task.metric
    delta_meta = {
        "structure": structure.digest() if structure else "full-finetune",
        "backbone": rt.backbone.info.name_or_path,
        "config_hash": rt.backbone.info.config_hash,
    }

    def checkpoint() -> None:
        save_run_checkpoint(engine, ckpt_dir, state["step"], {"stream": stream.state_dict(), "state": state})

    def run_eval(split: str) -> dict:
        return evaluate(
            module,
            rt.data[split],
            rt.collate,
            rt.task,
            batch_size=rc.eval_batch_size,
            device=rt.device,
            label_scoring=cfg.data.label_scoring,
        )

    def step_fn(step: int) -> dict:
        return {"loss": delta_update(engine, module, stream.next(), rt.device), "lr": float(engine.get_lr()[0])}

    def eval_fn() -> None:
        result = run_eval("validation")
        if is_better(result, state, metric):
            state.update(
                best_score=result[metric], best_loss=result["loss"], best_step=state["step"], test=run_eval("test")
            )
            if structure is not None:
                save_deltas(
                    rt.model,
                    rt.out / DELTA_FILE,
                    head_prefixes=head,
                    metadata={**delta_meta, "step": str(state["step"])},
                )
        metrics.log(state["step"], "validation", {**result, "best": state["best_score"]})
        rt.log(
            f"step {state['step']}: validation {metric} {result[metric]:.4f} loss {result['loss']:.4f} "
            f"(best: step {state['best_step']})"
        )

    module.train()
    finished = train_loop(
        rt, rc, state, desc="retrain", step_fn=step_fn, eval_fn=eval_fn, checkpoint_fn=checkpoint, metrics=metrics
    )
    metrics.close()
    if not finished:
        return None
    times = state["step_times"][1:] or state["step_times"]
    summary = {
        "structure": rc.structure,
        "full_finetune": structure is None,
        "trainable_params": trainable,
        "trainable_relative": trainable / rt.backbone.info.num_params,
        "params_used": structure.budget.used if structure else trainable,
        "task": rt.task.name,
        "split_seed": cfg.data.split_seed,
        "label_scoring": cfg.data.label_scoring,
        "metric": metric,
        "validation_score": state["best_score"],
        "best_step": state["best_step"],
        "test_score": state["test"][metric],
        "test": state["test"],
        "median_step_s": statistics.median(times),
        "world_size": rt.world,
        "zero_stage": zero.zero_stage(rt.ds_config),
        "steps": rc.steps,
        "deltas": None if structure is None else str(rt.out / DELTA_FILE),
        "frozen_bytes_rank0": rank0_bytes,
    }
    if rt.is_main:
        if structure is not None:
            structure.save(rt.out / "structure.json")
        atomic_write_text(rt.out / "summary.json", json.dumps(summary, indent=2) + "\n")
        rt.log(
            f"retrain done: validation {metric} {state['best_score']:.4f} at step {state['best_step']}, test "
            f"{metric} {summary['test_score']:.4f}; median step {summary['median_step_s']:.3f}s"
            + ("" if structure is None else f"; deltas -> {rt.out / DELTA_FILE}")
        )
    zero.barrier()
    return summary


def main(argv: list[str] | None = None) -> int:
    return script_main(run_retrain, argv, prog="s3delta_ds/retrain.py")


if __name__ == "__main__":
    sys.exit(main())
