"""What a recipe's loop carries from step to step and into every checkpoint, and when it logs,
evaluates, saves and stops."""

from __future__ import annotations

import dataclasses
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import RunConfig, TrainConfig
from ..errors import TrainingError
from ..run.checkpoint import CHECKPOINTS, resume_grad_accum


@dataclass(kw_only=True, slots=True)
class LoopState:
    """The loop's state: the step, the model selection on validation, the step times, and what each
    recipe keeps of its selected step (the search's gate logits, the retrain's test scores)."""

    step: int = 0
    """Optimizer steps done."""
    best_score: float = -math.inf
    best_loss: float = math.inf
    best_step: int = -1
    """The selected step (-1: none yet)."""
    step_times: list[float] = field(default_factory=list)
    best_logits: torch.Tensor | None = None
    """Search: the gate logits (num_candidates,) of the selected step."""
    test: dict | None = None
    """Retrain: the test scores at the selected step."""

    def is_better(self, result: dict, metric: str, select: str = "metric") -> bool:
        """Model selection on validation: the metric (ties → lower loss), the loss, or always the latest."""
        if select == "last":
            return True
        if select == "loss":
            return result["loss"] <= self.best_loss
        if result[metric] != self.best_score:
            return result[metric] > self.best_score
        return result["loss"] <= self.best_loss

    def select(self, result: dict, metric: str, **kept) -> None:
        """Make the current step the selected one; ``kept``: ``best_logits`` or ``test``."""
        self.best_score, self.best_loss, self.best_step = result[metric], result["loss"], self.step
        for name, value in kept.items():
            setattr(self, name, value)

    def check_selected(self, select: str) -> None:
        """Raise when no evaluation could be selected (every score it compared was NaN), instead
        of failing on the missing best step after the whole run.

        Raises:
            TrainingError: no selected step.
        """
        if self.best_step < 0:
            by = "loss" if select == "loss" else "metric"
            raise TrainingError(
                f"no validation step could be selected: every evaluation's {by} was not a number (NaN), so the run "
                "has no best step to keep (metrics.jsonl has each evaluation). An fp16 overflow in evaluation or a "
                "diverged run: use model.dtype=bf16 or fp32, or a lower learning rate"
            )

    def median_step_s(self) -> float:
        """The median step time, the first (warm-up) step left out when there are others."""
        return statistics.median(self.step_times[1:] or self.step_times)

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, state[f.name])


def resume_geometry(cfg: RunConfig, section: str, world: int) -> tuple[RunConfig, str | None]:
    """``--resume``: the run config with the gradient accumulation that keeps the newest checkpoint's
    global batch on ``world`` ranks (``section``: "search" or "retrain"), and the line saying so when
    it resumes on another number of ranks (None otherwise).

    Raises:
        ConfigError: no whole accumulation keeps the global batch.
    """
    tc: TrainConfig = getattr(cfg, section)
    acc, note = resume_grad_accum(Path(cfg.output_dir) / CHECKPOINTS, tc, world, section)
    if acc != tc.grad_accum:
        cfg = dataclasses.replace(cfg, **{section: dataclasses.replace(tc, grad_accum=acc)})
    return cfg, note


def checkpoint_due(tc: TrainConfig, step: int, evaluated: bool) -> bool:
    """Every ``checkpoint_every`` steps, or after every evaluation when it is 0."""
    return step % tc.checkpoint_every == 0 if tc.checkpoint_every else evaluated


def stop_early(tc: TrainConfig, step: int, start: int) -> bool:
    """``stop_after`` steps done in this launch, and steps left for a resumed one."""
    return bool(tc.stop_after) and step - start >= tc.stop_after and step < tc.steps


def stop_note(tc: TrainConfig, step: int) -> str:
    return f"stopping after {tc.stop_after} steps (stop_after) at step {step}; continue with --resume"


def progress_bar(tc: TrainConfig, state: LoopState, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=tc.steps, initial=state.step, disable=not enabled, desc=desc, dynamic_ncols=True, mininterval=2)


def log_step(metrics, bar, step: int, phase: str, stats: dict[str, float]) -> None:
    """``stats`` into metrics.jsonl / tensorboard, and the losses onto the progress bar."""
    metrics.log(step, phase, stats)
    bar.set_postfix({k: f"{v:.3f}" for k, v in stats.items() if k.endswith("loss")})
