"""Search a sparse delta structure at a parameter budget (S3Delta), on DeepSpeed.

    deepspeed --num_gpus 2 s3delta_ds/search.py --config examples/tiny_t5.yaml [section.key=value ...]
    torchrun --nproc_per_node 2 s3delta_ds/search.py --config ...
    python -m s3delta_ds.search --config ...            # one process

Writes to ``output_dir``: structure.json, gates.csv, heatmap.png, metrics.jsonl, tb/, summary.json,
config.yaml, ds_config.json and checkpoints/ (``--resume`` continues from the newest).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

if __name__ == "__main__" and not __package__:  # run as a file by a launcher: import the package, not siblings
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch
from tqdm import tqdm

from s3delta_ds import builders
from s3delta_ds.checkpoint import latest_checkpoint, load_run_checkpoint, save_run_checkpoint
from s3delta_ds.config import RunConfig
from s3delta_ds.data import BatchStream, split_halves
from s3delta_ds.engine import zero
from s3delta_ds.engine.bilevel import BiLevel, check_mode
from s3delta_ds.engine.gatelogits import GateLogits
from s3delta_ds.evaluate import evaluate
from s3delta_ds.gates import check_budget, discretise, probabilities
from s3delta_ds.objective import DeltaModel
from s3delta_ds.recipe import prepare, script_main
from s3delta_ds.report import MetricsLog, gates_csv, heatmap
from s3delta_ds.structure import atomic_write_text
from s3delta_ds.supernet import DeltaSpec, GateContext, attach, freeze_backbone


def run_search(cfg: RunConfig, *, resume: bool = False) -> dict:
    """The whole search on this rank (collective). Returns the summary (on every rank)."""
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
    attach(rt.model, rt.site_map, [DeltaSpec(c.site, c.type, c.kwargs, c.index) for c in space.candidates], ctx)
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
    bilevel = BiLevel(engine, gates, mode=sc.mode, device=rt.device)

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
    state = {"step": 0, "best_score": float("-inf"), "best_step": -1, "best_logits": None, "step_times": []}
    ckpt_dir = rt.out / "checkpoints"
    if resume:
        client = load_run_checkpoint(engine, ckpt_dir)
        gates.load_state_dict(client["gates"])
        for name, s in streams.items():
            s.load_state_dict(client["streams"][name])
        state = client["state"]
        rt.log(f"resumed from {latest_checkpoint(ckpt_dir)} at step {state['step']}")

    metrics = MetricsLog(rt.out, rt.is_main)
    main_metric = rt.task.metric

    def checkpoint() -> None:
        client = {
            "gates": gates.state_dict(),
            "streams": {k: s.state_dict() for k, s in streams.items()},
            "state": state,
        }
        save_run_checkpoint(engine, ckpt_dir, state["step"], client)

    bar = tqdm(total=sc.steps, initial=state["step"], disable=not rt.is_main, desc="search", dynamic_ncols=True)
    module.train()
    while state["step"] < sc.steps:
        step = state["step"]
        t0 = time.perf_counter()
        stats = bilevel.step(streams["weights"].next(), streams["gates"].next(), step)
        state["step_times"].append(time.perf_counter() - t0)
        state["step"] = step + 1
        bar.update(1)
        if state["step"] % sc.log_every == 0:
            stats["lr"] = float(engine.get_lr()[0])
            metrics.log(state["step"], "search", stats)
            bar.set_postfix(delta=f"{stats['delta_loss']:.3f}", gate=f"{stats['gate_loss']:.3f}")
        if state["step"] % sc.eval_every == 0 or state["step"] == sc.steps:
            ctx.z = gates.eval_p()  # evaluate the supernet with z = p, as the original does
            result = evaluate(
                module, rt.data["validation"], rt.collate, rt.task, batch_size=sc.eval_batch_size, device=rt.device
            )
            if result[main_metric] >= state["best_score"]:
                state.update(
                    best_score=result[main_metric],
                    best_step=state["step"],
                    best_logits=gates.logits.detach().cpu().clone(),
                )
            metrics.log(state["step"], "validation", {**result, "best": state["best_score"]})
            bar.write(
                f"step {state['step']}: validation {main_metric} {result[main_metric]:.4f} "
                f"(best {state['best_score']:.4f} @ {state['best_step']})"
            ) if rt.is_main else None
            if sc.checkpoint_every == 0:
                checkpoint()
        if sc.checkpoint_every and state["step"] % sc.checkpoint_every == 0:
            checkpoint()
    bar.close()
    metrics.close()
    return finish(rt, cfg, space, gates, state, engine_stage=stage)


def finish(rt, cfg: RunConfig, space, gates: GateLogits, state: dict, engine_stage: int) -> dict:
    """Discretise the best-validation gates at the budget and write the run's outputs (rank 0)."""
    sc = cfg.search
    logits = state["best_logits"]
    p, _ = probabilities(logits.double(), gates.n, gates.budget, sc.beta)
    times = state["step_times"][1:] or state["step_times"]
    search_meta = {
        "method": f"s3delta-{sc.mode}",
        "task": rt.task.name,
        "space": sc.space,
        "seed": cfg.seed,
        "steps": sc.steps,
        "micro_batch_size": sc.micro_batch_size,
        "grad_accum": sc.grad_accum,
        "world_size": rt.world,
        "zero_stage": engine_stage,
        "dtype": rt.dtype,
        "lr": sc.lr,
        "gate_lr": sc.gate_lr,
        "beta": sc.beta,
        "temperature": sc.temperature,
        "metric": rt.task.metric,
        "score": state["best_score"],
        "best_step": state["best_step"],
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
        "best_step": state["best_step"],
        "metric": rt.task.metric,
        "median_step_s": statistics.median(times),
        "world_size": rt.world,
        "zero_stage": engine_stage,
        "steps": sc.steps,
    }
    if rt.is_main:
        structure.save(rt.out / "structure.json")
        chosen = set(discretise(p.tolist(), space.params, gates.budget))
        gates_csv(rt.out / "gates.csv", space, logits, p, chosen)
        heatmap(rt.out / "heatmap.png", space, p, title=f"{rt.task.name}: gate p at step {state['best_step']}")
        atomic_write_text(rt.out / "summary.json", json.dumps(summary, indent=2) + "\n")
        rt.log(
            f"structure: {len(structure.modules)} modules, {structure.budget.used:,} of {gates.budget:,.0f} "
            f"parameters; best validation {rt.task.metric} {state['best_score']:.4f} at step {state['best_step']}; "
            f"median step {summary['median_step_s']:.3f}s -> {rt.out / 'structure.json'}"
        )
    zero.barrier()
    return summary


def main(argv: list[str] | None = None) -> int:
    return script_main(run_search, argv, prog="s3delta_ds/search.py")


if __name__ == "__main__":
    sys.exit(main())
