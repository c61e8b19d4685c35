"""The search recipe: a gated supernet of every candidate, trained bi-level (gate logits on one half
of the training data, delta weights on the other), selected on validation, and discretised once at
the budget into ``structure.json``."""

from __future__ import annotations

import json
import time

from ..config import RunConfig
from ..data import BatchStream, split_halves
from ..engine import zero
from ..engine.backbone import DTYPES
from ..engine.bilevel import BiLevel, check_mode
from ..engine.gatelogits import GateLogits, GateLossScale
from ..method.gates import discretise, probabilities
from ..method.supernet import DeltaSpec, GateContext
from ..run.checkpoint import geometry, latest_checkpoint, load_run_checkpoint, save_deltas, save_run_checkpoint
from ..run.evaluate import evaluate
from ..run.plan import RunPlan
from ..run.preflight import preflight_search
from ..run.report import MetricsLog, gates_csv, heatmap
from ..run.runtime import check_resume_facts, model_source, prepare, released_on_failure
from ..run.signals import StopRequest, stopped
from ..structure import Structure, builders
from ..util import atomic_write_text
from .pipeline import build_pipeline
from .state import (
    CHECKPOINTS,
    LoopState,
    checkpoint_due,
    log_step,
    progress_bar,
    resume_geometry,
    stop_early,
    stop_note,
)

SUPERNET_DELTAS = "supernet_deltas.safetensors"


class SearchRecipe:
    """``setup()`` → ``train()`` → ``finish()``, every step collective (call on every rank)."""

    def __init__(self, cfg: RunConfig, *, resume: bool = False):
        self.cfg = preflight_search(cfg)  # names checked before anything is written or loaded
        self.resume = resume

    def setup(self) -> None:
        """The plan (space, budget, strategy: checked before anything is written), the runtime, the
        supernet and its engine, the gate logits, the two data streams, and the resumed state."""
        _, world = zero.init_distributed()
        elastic = None
        if self.resume:  # on another number of ranks: the accumulation that keeps the global batch
            self.cfg, elastic = resume_geometry(self.cfg, "search", world)
        cfg, sc = self.cfg, self.cfg.search
        self.plan = plan = RunPlan.for_search(cfg, model_source(cfg))
        self.rt = rt = prepare(cfg, sc, resume=self.resume, kind="search", plan=plan)
        with released_on_failure(rt, self.resume):  # a setup that fails leaves no claimed directory
            self.stage = zero.zero_stage(rt.ds_config)
            check_mode(sc.mode, self.stage)
            if elastic:
                rt.log(elastic)
            space = plan.space
            rt.log(
                f"space {sc.space}: {len(space)} candidates, {space.total_params:,} parameters if all on; budget "
                f"{sc.budget:g} = {plan.budget_params:,.0f} parameters; mode {sc.mode}"
            )
            self.ctx = GateContext()
            self.pipe = build_pipeline(
                rt.model,
                rt.site_map,
                [DeltaSpec(c.site, c.type, c.kwargs, c.index) for c in space.candidates],
                objective=rt.objective,
                dtype=DTYPES[rt.dtype],
                ds_config=rt.ds_config,
                lr=sc.lr,
                weight_decay=sc.weight_decay,
                total_steps=sc.steps,
                seed=cfg.seed,
                head=rt.family.head_modules,
                ctx=self.ctx,
            )
            self.gates = GateLogits(
                space.params,
                plan.budget_params,
                lr=sc.gate_lr,
                clip=sc.gate_clip,
                total_steps=sc.steps - sc.gate_warmup_steps,
                beta=sc.beta,
                temperature=sc.temperature,
                seed=cfg.seed,
                device=rt.device,
                optimizer=sc.gate_optimizer,
                shift_gradient=sc.shift_gradient,
                loss_scale=GateLossScale.from_ds_config(rt.ds_config),
            )
            self.bilevel = BiLevel(
                self.pipe.engine, self.gates, mode=sc.mode, virtual_step=sc.virtual_step, device=rt.device
            )
            self.streams = self._streams()
            self.state = LoopState()
            self.ckpt_dir = rt.out / CHECKPOINTS
            if self.resume:
                self.load_checkpoint()
                rt.write_resolved_configs()  # accepted: this launch's configs are the run's now
            self.metrics = MetricsLog(rt.out, rt.is_main, resumed_at=self.state.step if self.resume else None)

    def train(self) -> bool:
        """The search loop. Returns False when the launch stopped early (``search.stop_after``);
        raises RunStopped after a signal's checkpoint."""
        sc, state, gates = self.cfg.search, self.state, self.gates
        start, bar = state.step, progress_bar(sc, state, "search", self.rt.is_main)
        self.pipe.module.train()
        try:
            with StopRequest() as signals:
                while state.step < sc.steps:
                    t0 = time.perf_counter()
                    weight_batches, gate_batches = self.streams["weights"].next(), self.streams["gates"].next()
                    # Gates first, on their own half of the training data (the original's order): a
                    # gradient on the batches the weights were just fitted to would favour overfitting.
                    gate_loss = None  # search.gate_warmup: the delta weights train alone first
                    if state.step >= sc.gate_warmup_steps:
                        gate_loss = self.bilevel.gate_update(weight_batches, gate_batches, state.step)
                    lr = float(self.pipe.engine.get_lr()[0])  # this step's: DeepSpeed steps the schedule in it
                    delta_loss = self.bilevel.delta_step(weight_batches, state.step)  # a fresh gate sample
                    state.step_times.append(time.perf_counter() - t0)
                    state.step += 1
                    bar.update(1)
                    if state.step % sc.log_every == 0:
                        stats = {"delta_loss": delta_loss}
                        if gate_loss is not None:
                            stats["gate_loss"] = gate_loss
                        if gate_loss is not None and gates.last_grad_norm is not None:  # not warm-up, not skipped
                            stats["gate_grad_norm"] = gates.last_grad_norm
                        if gates.loss_scale.enabled:  # fp16: the gate pass's own scale and its skipped steps
                            stats |= {
                                "gate_loss_scale": gates.loss_scale.scale,
                                "gate_skipped": gates.loss_scale.skipped,
                            }
                        log_step(self.metrics, bar, state.step, "search", {**stats, "lr": lr})
                    evaluated = state.step % sc.eval_every == 0 or state.step == sc.steps
                    if evaluated:
                        self.evaluate()
                    stop, signalled = stop_early(sc, state.step, start), signals.agreed()
                    if checkpoint_due(sc, state.step, evaluated) or stop or signalled:
                        self.save_checkpoint()
                    if signalled:  # preemption or the time limit: this step's checkpoint is written
                        raise stopped(signalled, state.step, self.rt.is_main, self.rt.log)
                    if stop:
                        self.rt.log(stop_note(sc, state.step))
                        return False
                return True
        finally:
            bar.close()
            self.metrics.close()

    def evaluate(self) -> None:
        """Validation of the supernet with z = p (as the original evaluates during search); keeps the
        gate logits of the selected step."""
        rt, sc, state, metric = self.rt, self.cfg.search, self.state, self.rt.task.metric
        self.ctx.z = self.gates.eval_p()
        result = evaluate(
            self.pipe.module,
            rt.data["validation"],
            rt.collate,
            rt.task,
            batch_size=sc.eval_batch_size,
            device=rt.device,
            label_scoring=self.cfg.data.label_scoring,
        )
        # During search.gate_warmup the gates have not moved (every logit 0, every p equal): a step
        # there would select an arbitrary structure (the first candidates in site order), so only
        # the steps after the first gate step can be selected.
        gated = state.step > sc.gate_warmup_steps
        if gated and state.is_better(result, metric, sc.select):
            state.select(result, metric, best_logits=self.gates.logits.detach().cpu().clone())
        self.metrics.log(state.step, "validation", {**result, "best": state.best_score})
        selected = f"step {state.best_step}" if state.best_step >= 0 else "none yet, the gates are warming up"
        rt.log(
            f"step {state.step}: validation {metric} {result[metric]:.4f} loss {result['loss']:.4f} "
            f"(selected: {selected})"
        )

    def save_checkpoint(self) -> None:
        client = {
            "gates": self.gates.state_dict(),
            "streams": {k: s.state_dict() for k, s in self.streams.items()},
            "state": self.state.state_dict(),
            "facts": self.rt.resume_facts,
        }
        batch = geometry(self.cfg.search, self.rt.world)
        save_run_checkpoint(self.pipe.engine, self.ckpt_dir, self.state.step, client, batch=batch)

    def load_checkpoint(self) -> None:
        client = load_run_checkpoint(self.pipe.engine, self.ckpt_dir)
        check_resume_facts(self.rt, client.get("facts"))
        self.gates.load_state_dict(client["gates"])
        for name, s in self.streams.items():
            s.load_state_dict(client["streams"][name])
        self.state.load_state_dict(client["state"])
        self.rt.log(f"resumed from {latest_checkpoint(self.ckpt_dir)} at step {self.state.step}")

    def finish(self) -> dict:
        """Discretise the selected gates at the budget, once, and write the run's outputs (rank 0).
        Returns the summary on every rank."""
        rt, sc, plan, state, space = self.rt, self.cfg.search, self.plan, self.state, self.plan.space
        save_deltas(
            rt.model,
            rt.out / SUPERNET_DELTAS,
            head_prefixes=rt.family.head_modules,
            metadata={"kind": "supernet", "step": str(state.step)},
        )
        state.check_selected(sc.select)
        logits = state.best_logits
        p, _ = probabilities(logits.double(), self.gates.n, plan.budget_params, sc.beta, check=False)
        # structure and gates.csv
        chosen = discretise(p.tolist(), space.params, plan.budget_params, check=False, logits=logits.tolist())
        structure = builders.from_indices(
            space,
            rt.backbone.info,
            chosen,
            kind="searched",
            relative=plan.budget,
            absolute=plan.budget_params,
            p=p.tolist(),
            alpha=logits.tolist(),
            search=self._search_meta(),
        )
        summary = self._summary(structure)
        if rt.is_main:
            structure.save(rt.out / "structure.json")
            gates_csv(rt.out / "gates.csv", space, logits, p, set(chosen))
            heatmap(rt.out / "heatmap.png", space, p, title=f"{rt.task.name}: gate p at step {state.best_step}")
            atomic_write_text(rt.out / "summary.json", json.dumps(summary, indent=2) + "\n")
            rt.log(
                f"structure: {len(structure.modules)} modules, {structure.budget.used:,} of {plan.budget_params:,.0f} "
                f"parameters (gates of step {state.best_step}, validation {rt.task.metric} "
                f"{state.best_score:.4f}); median step {summary['median_step_s']:.3f}s -> {rt.out / 'structure.json'}"
            )
        zero.barrier()
        return summary

    # -- pieces --------------------------------------------------------------------------------
    def _streams(self) -> dict[str, BatchStream]:
        """The training split halved: one half steps the delta weights, the other the gates."""
        cfg, sc, rt = self.cfg, self.cfg.search, self.rt
        halves = zip(("weights", "gates"), split_halves(rt.data["train"], cfg.seed), strict=True)
        return {
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
            for k, (name, half) in enumerate(halves)
        }

    def _search_meta(self) -> dict:
        cfg, sc, rt, state = self.cfg, self.cfg.search, self.rt, self.state
        return {
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
            "zero_stage": self.stage,
            "dtype": rt.dtype,
            "lr": sc.lr,
            "gate_lr": sc.gate_lr,
            "gate_optimizer": sc.gate_optimizer,
            "gate_warmup": sc.gate_warmup,
            "shift_gradient": sc.shift_gradient,
            "beta": sc.beta,
            "temperature": sc.temperature,
            **({"virtual_step": sc.virtual_step} if sc.mode == "second-order" else {}),
            "select": sc.select,
            "metric": rt.task.metric,
            "score": state.best_score,
            "validation_loss": state.best_loss,
            "selected_step": state.best_step,
            "deepspeed": rt.ds_source,
        }

    def _summary(self, structure: Structure) -> dict:
        cfg, sc, rt, state = self.cfg, self.cfg.search, self.rt, self.state
        return {
            "structure": str(rt.out / "structure.json"),
            "budget": sc.budget,
            "budget_params": self.plan.budget_params,
            "params_used": structure.budget.used,
            "modules": len(structure.modules),
            "search_score": state.best_score,
            "selected_step": state.best_step,
            "task": rt.task.name,
            "split_seed": cfg.data.split_seed,
            "label_scoring": cfg.data.label_scoring,
            "metric": rt.task.metric,
            "median_step_s": state.median_step_s(),
            "world_size": rt.world,
            "zero_stage": self.stage,
            "steps": sc.steps,
            "candidates": len(self.plan.space),
            "frozen_bytes_rank0": self.pipe.frozen_bytes_rank0,
        }
