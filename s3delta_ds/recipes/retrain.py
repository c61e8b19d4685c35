"""The retrain recipe: a structure (searched, random, manual or transferred) attached ungated with
its exact init, trained with one optimizer on the full training split, selected on validation
(tested at the selected step), and saved as ``deltas.safetensors``; or every backbone weight
trained (``retrain.full_finetune``, the baseline; nothing saved)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..config import RunConfig
from ..data import BatchStream
from ..engine import zero
from ..engine.backbone import DTYPES
from ..engine.bilevel import delta_update
from ..run.checkpoint import (
    geometry,
    latest_checkpoint,
    load_deltas,
    load_run_checkpoint,
    restore_checkpoint_files,
    save_deltas,
    save_run_checkpoint,
)
from ..run.evaluate import evaluate
from ..run.plan import RunPlan
from ..run.preflight import preflight_retrain
from ..run.report import MetricsLog
from ..run.runtime import check_resume_facts, model_source, prepare, released_on_failure
from ..run.signals import StopRequest, stopped
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

DELTA_FILE = "deltas.safetensors"


class RetrainRecipe:
    """``setup()`` → ``train()`` → ``finish()``, every step collective (call on every rank)."""

    def __init__(self, cfg: RunConfig, *, resume: bool = False):
        # names, structure and family checked before anything is written
        self.cfg, self._structure = preflight_retrain(cfg)
        self.resume = resume

    def setup(self) -> None:
        """The plan (sized by the structure), the runtime, the deltas and their engine, the data
        stream and the resumed state."""
        _, world = zero.init_distributed()
        elastic = None
        if self.resume:  # on another number of ranks: the accumulation that keeps the global batch
            self.cfg, elastic = resume_geometry(self.cfg, "retrain", world)
        cfg, rc, structure = self.cfg, self.cfg.retrain, self._structure
        self.plan = plan = RunPlan.for_retrain(cfg, model_source(cfg), structure)
        self.rt = rt = prepare(cfg, rc, resume=self.resume, kind="retrain", plan=plan)
        with released_on_failure(rt, self.resume):  # a setup that fails leaves no claimed directory
            if elastic:
                rt.log(elastic)
            specs = masks = None
            if structure is not None:
                structure.check_backbone(rt.site_map)
                specs = structure.specs()
                if rc.pafi_mask:
                    from ..structure.pafi import check_weights, load_mask

                    masks, meta = load_mask(rc.pafi_mask, rt.backbone)
                    check_weights(meta, rt.model, rt.site_map, rc.pafi_mask, gather=zero.gathered)
            self.pipe = pipe = build_pipeline(
                rt.model,
                rt.site_map,
                specs,
                objective=rt.objective,
                dtype=DTYPES[rt.dtype],
                ds_config=rt.ds_config,
                lr=rc.lr,
                weight_decay=rc.weight_decay,
                total_steps=rc.steps,
                seed=cfg.seed,  # fresh init, identical on every rank
                head=rt.family.head_modules,
                masks=masks,
            )
            rt.log(
                f"retraining {'full fine-tuning' if structure is None else rc.structure}: {pipe.trainable:,} trainable "
                f"parameters ({100 * pipe.trainable / plan.num_params:.5f}% of the backbone)"
            )
            self.stream = BatchStream(
                rt.data["train"],
                micro_batch=rc.micro_batch_size,
                grad_accum=rc.grad_accum,
                rank=rt.rank,
                world=rt.world,
                seed=cfg.seed,
                collate=rt.collate,
                name="train",
            )
            self.state = LoopState()
            self.ckpt_dir = rt.out / CHECKPOINTS
            if self.resume:
                self.load_checkpoint()
                rt.write_resolved_configs()  # accepted: this launch's configs are the run's now
            self.metrics = MetricsLog(rt.out, rt.is_main, resumed_at=self.state.step if self.resume else None)

    def train(self) -> bool:
        """The retrain loop. Returns False when the launch stopped early (``retrain.stop_after``);
        raises RunStopped after a signal's checkpoint."""
        rc, state, rt, engine, module = self.cfg.retrain, self.state, self.rt, self.pipe.engine, self.pipe.module
        start, bar = state.step, progress_bar(rc, state, "retrain", rt.is_main)
        module.train()
        try:
            with StopRequest() as signals:
                while state.step < rc.steps:
                    t0 = time.perf_counter()
                    lr = float(engine.get_lr()[0])  # this step's: DeepSpeed steps the schedule in it
                    loss = delta_update(engine, module, self.stream.next(), rt.device)
                    state.step_times.append(time.perf_counter() - t0)
                    state.step += 1
                    bar.update(1)
                    if state.step % rc.log_every == 0:
                        log_step(self.metrics, bar, state.step, "retrain", {"loss": loss, "lr": lr})
                    evaluated = state.step % rc.eval_every == 0 or state.step == rc.steps
                    if evaluated:
                        self.evaluate()
                    stop, signalled = stop_early(rc, state.step, start), signals.agreed()
                    if checkpoint_due(rc, state.step, evaluated) or stop or signalled:
                        self.save_checkpoint()
                    if signalled:  # preemption or the time limit: this step's checkpoint is written
                        raise stopped(signalled, state.step, rt.is_main, rt.log)
                    if stop:
                        rt.log(stop_note(rc, state.step))
                        return False
                return True
        finally:
            bar.close()
            self.metrics.close()

    def evaluate(self) -> None:
        """Validation; at a new best, the test split too, and the deltas saved."""
        rt, state, metric = self.rt, self.state, self.rt.task.metric
        result = self._evaluate("validation")
        if state.is_better(result, metric):
            state.select(result, metric, test=None if self._test_at_end else self._evaluate("test"))
            if self.plan.structure is not None:
                meta = {
                    "structure": self.plan.structure.digest(),
                    "backbone": rt.backbone.info.name_or_path,
                    "config_hash": rt.backbone.info.config_hash,
                    "step": str(state.step),
                }
                save_deltas(rt.model, rt.out / DELTA_FILE, head_prefixes=rt.family.head_modules, metadata=meta)
        self.metrics.log(state.step, "validation", {**result, "best": state.best_score})
        rt.log(
            f"step {state.step}: validation {metric} {result[metric]:.4f} loss {result['loss']:.4f} "
            f"(best: step {state.best_step})"
        )

    @property
    def _kept_files(self) -> tuple[Path, ...]:
        """The best step's deltas: written at a new best, between checkpoints."""
        return (self.rt.out / DELTA_FILE,) if self.plan.structure is not None else ()

    def save_checkpoint(self) -> None:
        client = {"stream": self.stream.state_dict(), "state": self.state.state_dict(), "facts": self.rt.resume_facts}
        batch = geometry(self.cfg.retrain, self.rt.world)
        save_run_checkpoint(
            self.pipe.engine, self.ckpt_dir, self.state.step, client, batch=batch, files=self._kept_files
        )

    def load_checkpoint(self) -> None:
        ckpt = latest_checkpoint(self.ckpt_dir)
        client = load_run_checkpoint(self.pipe.engine, self.ckpt_dir)
        check_resume_facts(self.rt, client.get("facts"))
        self.stream.load_state_dict(client["stream"])
        self.state.load_state_dict(client["state"])
        if self.rt.is_main:  # a deltas file newer than the checkpoint is not its best step's
            restore_checkpoint_files(ckpt, self._kept_files)
        zero.barrier()
        self.rt.log(f"resumed from {ckpt} at step {self.state.step}")

    @property
    def _test_at_end(self) -> bool:
        return self.cfg.retrain.test_at == "end" and self.plan.structure is not None

    def _test_selected(self) -> None:
        """``retrain.test_at=end``: reload the selected step's deltas (the ones saved at the best
        validation step) and score the test split once. Collective."""
        rt = self.rt
        if self.state.test is None and self._test_at_end:
            load_deltas(
                rt.model,
                rt.out / DELTA_FILE,
                head_prefixes=rt.family.head_modules,
                structure_digest=self.plan.structure.digest(),
            )
            self.state.test = self._evaluate("test")
            rt.log(f"test scored on the deltas of step {self.state.best_step}")

    def finish(self) -> dict:
        """Write summary.json (and the structure next to the deltas) on rank 0. Returns the summary
        on every rank."""
        self.state.check_selected("metric")
        self._test_selected()
        rt, state, structure, metric = self.rt, self.state, self.plan.structure, self.rt.task.metric
        summary = self._summary()
        if rt.is_main:
            if structure is not None:
                structure.save(rt.out / "structure.json")
            atomic_write_text(rt.out / "summary.json", json.dumps(summary, indent=2) + "\n")
            rt.log(
                f"retrain done: validation {metric} {state.best_score:.4f} at step {state.best_step}, test "
                f"{metric} {summary['test_score']:.4f}; median step {summary['median_step_s']:.3f}s"
                + ("" if structure is None else f"; deltas -> {rt.out / DELTA_FILE}")
            )
        zero.barrier()
        return summary

    def _evaluate(self, split: str) -> dict:
        rt = self.rt
        return evaluate(
            self.pipe.module,
            rt.data[split],
            rt.collate,
            rt.task,
            batch_size=self.cfg.retrain.eval_batch_size,
            device=rt.device,
            label_scoring=self.cfg.data.label_scoring,
        )

    def _summary(self) -> dict:
        cfg, rc, rt, state, structure = self.cfg, self.cfg.retrain, self.rt, self.state, self.plan.structure
        trainable, metric = self.pipe.trainable, rt.task.metric
        return {
            "structure": rc.structure,
            "full_finetune": structure is None,
            "trainable_params": trainable,
            "trainable_relative": trainable / self.plan.num_params,
            "params_used": structure.budget.used if structure else trainable,
            "task": rt.task.name,
            "split_seed": cfg.data.split_seed,
            "label_scoring": cfg.data.label_scoring,
            "metric": metric,
            "validation_score": state.best_score,
            "best_step": state.best_step,
            "test_score": state.test[metric],
            "test": state.test,
            "median_step_s": state.median_step_s(),
            "world_size": rt.world,
            "zero_stage": zero.zero_stage(rt.ds_config),
            "steps": rc.steps,
            "deltas": None if structure is None else str(rt.out / DELTA_FILE),
            "frozen_bytes_rank0": self.pipe.frozen_bytes_rank0,
        }
