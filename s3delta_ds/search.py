"""Search a sparse delta structure at a parameter budget (S3Delta), on DeepSpeed.

    deepspeed --num_gpus 2 s3delta_ds/search.py --config examples/tiny_t5.yaml [section.key=value ...]
    torchrun --nproc_per_node 2 s3delta_ds/search.py --config ...
    python -m s3delta_ds.search --config ...            # one process

Writes to ``output_dir``: structure.json, gates.csv, heatmap.png, supernet_deltas.safetensors,
metrics.jsonl, tb/, summary.json, config.yaml, ds_config.json and checkpoints/ (``--resume``
continues from the newest complete one).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:  # run as a file by a launcher: import the package, not siblings
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch

from s3delta_ds import builders
from s3delta_ds.checkpoint import latest_checkpoint, load_run_checkpoint, save_deltas, save_run_checkpoint
from s3delta_ds.config import RunConfig
from s3delta_ds.data import BatchStream, split_halves
from s3delta_ds.engine import zero
from s3delta_ds.engine.backbone import DTYPES
from s3delta_ds.engine.bilevel import BiLevel, check_mode
from s3delta_ds.engine.gatelogits import GateLogits
from s3delta_ds.evaluate import evaluate
from s3delta_ds.gates import check_budget, discretise, probabilities
from s3delta_ds.objective import DeltaModel
from s3delta_ds.preflight import preflight_search
from s3delta_ds.recipe import frozen_bytes, is_better, new_state, prepare, script_main, train_loop
from s3delta_ds.report import MetricsLog, gates_csv, heatmap
from s3delta_ds.structure import atomic_write_text
from s3delta_ds.supernet import DeltaSpec, GateContext, attach, cast_deltas, freeze_backbone

SUPERNET_DELTAS = "supernet_deltas.safetensors"


def run_search(cfg: RunConfig, *, resume: bool = False) -> dict | None:
    """The whole search on this rank (collective). Returns the summary on every rank (None when the
    launch stopped early because of ``search.stop_after``)."""
    cfg = preflight_search(cfg)  # names checked before anything is written or loaded
    sc = cfg.search
    rt = prepare(cfg, sc, resume=resume, kind="search")
    stage = zero.zero_stage(rt.ds_config)
    check_mode(sc.mode, stage)
    space = rt.backbone.space(sc.space)
    budget = builders.absolute_budget(sc.budget, rt.backbone.info.num_params)
    check_budget(space.params, budget)
    rt.log(
        f"space {sc.space}: {len(space)} candidates, {space.total_params:,} parameters if all on; budget "
        f"{sc.budget:g} = {budget:,.0f} parameters; mode {sc.mode}"
    )

    ctx = GateContext()
    torch.manual_seed(cfg.seed)  # identical delta init on every rank and in every ZeRO stage
    specs = [DeltaSpec(c.site, c.type, c.kwargs, c.index) for c in space.candidates]
    attach(rt.model, rt.site_map, specs, ctx, gather=zero.gathered, register_external=zero.register_external)
    cast_deltas(rt.model, DTYPES[rt.dtype])
    freeze_backbone(rt.model, rt.family.head_modules)
    module = DeltaModel(rt.model, rt.objective, ctx)
    params = [p for p in module.parameters() if p.requires_grad]
    engine = zero.build_engine(
        module, params, lr=sc.lr, weight_decay=sc.weight_decay, total_steps=sc.steps, ds_config=rt.ds_config
    )
    gates = GateLogits(
        space.params,
        budget,
        lr=sc.gate_lr,
        clip=sc.gate_clip,
        total_steps=sc.steps,
        beta=sc.beta,
        temperature=sc.temperature,
        seed=cfg.seed,
        device=rt.device,
    )
    bilevel = BiLevel(engine, gates, mode=sc.mode, virtual_step=sc.virtual_step, device=rt.device)
    rank0_bytes = zero.broadcast_object(frozen_bytes(module))  # frozen backbone bytes held by rank 0

    weights_half, gates_half = split_halves(rt.data["train"], cfg.seed)
    streams = {
        name: BatchStream(
            half,
            micro_batch=sc.micro_batch_size,
            grad_accum=sc.grad_accum,
            rank=rt.rank,
            world=rt.world,
            seed=cfg.seed + k,
            collate=rt.collate,
            name=f"{name} half",
        )
        for k, (name, half) in enumerate((("weights", weights_half), ("gates", gates_half)))
    }
    state = new_state(best_logits=None)
    ckpt_dir = rt.out / "checkpoints"
    if resume:
        client = load_run_checkpoint(engine, ckpt_dir)
        gates.load_state_dict(client["gates"])
        for name, s in streams.items():
            s.load_state_dict(client["streams"][name])
        state = client["state"]
        rt.log(f"resumed from {latest_checkpoint(ckpt_dir)} at step {state['step']}")
    metrics = MetricsLog(rt.out, rt.is_main)

    def step_fn(step: int) -> dict:
        stats = bilevel.step(streams["weights"].next(), streams["gates"].next(), step)
        return {**stats, "lr": float(engine.get_lr()[0])}

    def eval_fn() -> None:
        ctx.z = gates.eval_p()  # the supernet with z = p, as the original evaluates during search
        result = evaluate(
            module,
            rt.data["validation"],
            rt.collate,
            rt.task,
            batch_size=sc.eval_batch_size,
            device=rt.device,
            label_scoring=cfg.data.label_scoring,
        )
        if is_better(result, state, rt.task.metric, sc.select):
            state.update(
                best_score=result[rt.task.metric],
                best_loss=result["loss"],
                best_step=state["step"],
                best_logits=gates.logits.detach().cpu().clone(),
            )
        metrics.log(state["step"], "validation", {**result, "best": state["best_score"]})
        rt.log(
            f"step {state['step']}: validation {rt.task.metric} {result[rt.task.metric]:.4f} loss "
            f"{result['loss']:.4f} (selected: step {state['best_step']})"
        )

    def checkpoint_fn() -> None:
        client = {
            "gates": gates.state_dict(),
            "streams": {k: s.state_dict() for k, s in streams.items()},
            "state": state,
        }
        save_run_checkpoint(engine, ckpt_dir, state["step"], client)

    module.train()
    finished = train_loop(
        rt, sc, state, desc="search", step_fn=step_fn, eval_fn=eval_fn, checkpoint_fn=checkpoint_fn, metrics=metrics
    )
    metrics.close()
    if not finished:
        return None
    save_deltas(
        rt.model,
        rt.out / SUPERNET_DELTAS,
        head_prefixes=rt.family.head_modules,
        metadata={"kind": "supernet", "step": str(state["step"])},
    )
    return finish(rt, cfg, space, gates, state, stage, rank0_bytes)


def finish(rt, cfg: RunConfig, space, gates: GateLogits, state: dict, stage: int, rank0_bytes: int) -> dict:
    """Discretise the selected gates at the budget and write the run's outputs (rank 0)."""
    sc = cfg.search
    logits = state["best_logits"]
    p, _ = probabilities(logits.double(), gates.n, gates.budget, sc.beta)
    times = state["step_times"][1:] or state["step_times"]
    search_meta = {
        "method": f"s3delta-{sc.mode}",
        "task": rt.task.name,
        "space": sc.space,
        "seed": cfg.seed,
        "split_seed": cfg.data.split_seed,
        "label_scoring": cfg.data.label_scoring,
        "steps": sc.steps,
        "micro_batch_size": sc.micro_batch_size,
        "grad_accum": sc.grad_accum,
        "world_size": rt.world,
        "zero_stage": stage,
        "dtype": rt.dtype,
        "lr": sc.lr,
        "gate_lr": sc.gate_lr,
        "beta": sc.beta,
        "temperature": sc.temperature,
        **({"virtual_step": sc.virtual_step} if sc.mode == "second-order" else {}),
        "select": sc.select,
        "metric": rt.task.metric,
        "score": state["best_score"],
        "validation_loss": state["best_loss"],
        "selected_step": state["best_step"],
        "deepspeed": rt.ds_source,
    }
    structure = builders.searched(space, rt.backbone.info, p.tolist(), logits.tolist(), sc.budget, search=search_meta)
    summary = {
        "structure": str(rt.out / "structure.json"),
        "budget": sc.budget,
        "budget_params": gates.budget,
        "params_used": structure.budget.used,
        "modules": len(structure.modules),
        "search_score": state["best_score"],
        "selected_step": state["best_step"],
        "task": rt.task.name,
        "split_seed": cfg.data.split_seed,
        "label_scoring": cfg.data.label_scoring,
        "metric": rt.task.metric,
        "median_step_s": statistics.median(times),
        "world_size": rt.world,
        "zero_stage": stage,
        "steps": sc.steps,
        "candidates": len(space),
        "frozen_bytes_rank0": rank0_bytes,
    }
    if rt.is_main:
        structure.save(rt.out / "structure.json")
        chosen = set(discretise(p.tolist(), space.params, gates.budget))
        gates_csv(rt.out / "gates.csv", space, logits, p, chosen)
        heatmap(rt.out / "heatmap.png", space, p, title=f"{rt.task.name}: gate p at step {state['best_step']}")
        atomic_write_text(rt.out / "summary.json", json.dumps(summary, indent=2) + "\n")
        rt.log(
            f"structure: {len(structure.modules)} modules, {structure.budget.used:,} of {gates.budget:,.0f} "
            f"parameters (gates of step {state['best_step']}, validation {rt.task.metric} "
            f"{state['best_score']:.4f}); median step {summary['median_step_s']:.3f}s -> {rt.out / 'structure.json'}"
        )
    zero.barrier()
    return summary


def main(argv: list[str] | None = None) -> int:
    return script_main(run_search, argv, prog="s3delta_ds/search.py")


if __name__ == "__main__":
    sys.exit(main())
