"""The run plan: what a search or retrain will do, resolved once at start-up, before the output
directory, the backbone or any file is touched, and read by every later stage.

The parameter count comes from the meta-device planner (``Backbone.plan``): the model built from
its config with no weights, which counts exactly what the loaded backbone counts (tested for every
family, quantized too). So the budget, the space and the DeepSpeed strategy are all known, and
checked, before the weights load; nothing downstream converts or checks them again.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ModelConfig, RunConfig
from ..engine import zero
from ..errors import BudgetError
from ..method.gates import check_budget
from ..method.space import SearchSpace
from ..structure import Structure
from ..structure.builders import Backbone, absolute_budget, budget_range


@dataclass(frozen=True, kw_only=True, slots=True)
class RunPlan:
    """Every derived fact a run acts on. Build it with :meth:`for_search` / :meth:`for_retrain`."""

    kind: str
    """"search", "retrain", or "setup" (tools and probes that assemble their own pipeline)."""
    source: str
    """Where the weights come from: a directory (the embedded defaults, materialised) or a hub id."""
    num_params: int
    """Backbone parameters, task head excluded (what a relative budget is a fraction of)."""
    task: str
    deepspeed: str
    """The DeepSpeed config name or path; ``deepspeed=auto`` resolved."""
    strategy: str | None
    """Why ``deepspeed=auto`` chose it (None when the config named one)."""
    trainable: int
    """Parameters the optimizer will own (sizes ``deepspeed=auto``): every candidate of the space
    (search), the structure's modules (retrain), or the whole model (full fine-tuning)."""
    space: SearchSpace | None = None
    """Search: the enumerated candidates."""
    budget: float | None = None
    """Search: the budget as a fraction of ``num_params``."""
    budget_params: float | None = None
    """Search: the budget in parameters, checked to be reachable in ``space``."""
    structure: Structure | None = None
    """Retrain: the structure to train (None for full fine-tuning)."""

    @classmethod
    def for_search(cls, cfg: RunConfig, source: str) -> RunPlan:
        """Enumerate the space and convert and check the budget.

        Raises:
            BudgetError: a budget no structure (or the gate equation) can meet.
        """
        num_params, space, budget_params = searchable_space(cfg, source)
        return cls._with_strategy(
            cfg,
            kind="search",
            source=source,
            num_params=num_params,
            trainable=space.total_params,  # the supernet: every candidate trains
            space=space,
            budget=cfg.search.budget,
            budget_params=budget_params,
        )

    @classmethod
    def for_retrain(cls, cfg: RunConfig, source: str, structure: Structure | None) -> RunPlan:
        """Size the run by what it trains: the structure, or every weight (full fine-tuning)."""
        planner = Backbone.plan(source, cfg.model.gguf_file)
        if structure is None:
            trainable = sum(p.numel() for p in planner.model.parameters())
        else:
            trainable = structure.budget.used
        return cls._with_strategy(
            cfg,
            kind="retrain",
            source=source,
            num_params=planner.info.num_params,
            trainable=trainable,
            structure=structure,
        )

    @classmethod
    def for_setup(cls, cfg: RunConfig, source: str) -> RunPlan:
        """For callers that assemble their own pipeline on a prepared runtime (probes, checks): no
        budget, sized like a search of ``cfg.search.space``."""
        planner = Backbone.plan(source, cfg.model.gguf_file)
        space = planner.space(cfg.search.space)
        return cls._with_strategy(
            cfg,
            kind="setup",
            source=source,
            num_params=planner.info.num_params,
            trainable=space.total_params,
            space=space,
        )

    @classmethod
    def _with_strategy(cls, cfg: RunConfig, **fields) -> RunPlan:
        name, why = cfg.deepspeed, None
        if name == "auto":
            name, why = auto_strategy(cfg.model, fields["num_params"], fields["trainable"], stage=cfg.zero_stage)
        return cls(task=cfg.data.task, deepspeed=name, strategy=why, **fields)


def searchable_space(cfg: RunConfig, source: str) -> tuple[int, SearchSpace, float]:
    """The backbone's parameter count, the enumerated space and the budget in parameters, checked
    to be reachable: the only budget check of a search (also run by ``s3delta search --nproc N``
    before it starts the ranks). Needs no process group.

    Raises:
        BudgetError: a budget no structure (or the gate equation) can meet, said in the unit the
            user set, with the range this model and space allow.
    """
    planner = Backbone.plan(source, cfg.model.gguf_file)
    num_params = planner.info.num_params
    space = planner.space(cfg.search.space)
    budget_params = absolute_budget(cfg.search.budget, num_params)
    try:
        check_budget(space.params, budget_params)
    except BudgetError as e:  # say it in the unit the user set
        if not space.params:
            raise
        fits = budget_range(space.params, num_params)
        where = f"the budget must lie in [{fits[0]:.3g}, {fits[1]:.3g}]" if fits else "no budget leaves a choice"
        raise BudgetError(
            f"search.budget={cfg.search.budget:g} of {cfg.model.name_or_path}'s {num_params:,} parameters: "
            f"{e}. On this model and space ({cfg.search.space}) {where}"
        ) from None
    return num_params, space, budget_params


def auto_strategy(model: ModelConfig, num_params: int, trainable: int, stage: int | None = None) -> tuple[str, str]:
    """``deepspeed=auto``: the frozen backbone's bytes (from the planner's count and the storage
    dtype) and the trainable state decide replication or ZeRO-3, and the ranks per node whether
    ZeRO-3 takes hpZ (``engine.zero.choose_strategy``). Needs the process group (joined before the plan)."""
    per_param = {"4bit": 0.5, "8bit": 1.0}.get(model.quantize or "", 2.0 if model.dtype in ("bf16", "fp16") else 4.0)
    if model.dtype == "auto" and not model.quantize:  # what resolve_dtype will load: fp32 without bf16 (V100, T4)
        per_param = 2.0 if zero.accelerator_has_bf16() else 4.0
    local = zero.min_over_ranks(zero.local_world_size() or 0)  # 0: unknown (on any rank)
    return zero.choose_strategy(
        int(num_params * per_param),
        trainable,
        zero.device_memory_bytes(),  # the smallest rank's: every rank must choose the same
        world=zero.world(),
        local_world=local or None,
        stage=stage,
    )
