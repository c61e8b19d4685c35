"""Checks and defaults resolved before a run writes or loads anything.

A misspelt space, task or DeepSpeed config, a malformed structure, or a structure made for another
model family must fail in a second, before the process group, the backbone load and the data
encoding, and must leave no ``config.yaml`` behind (so the corrected rerun is not refused as
"not empty"). Defaults that depend on the run kind are filled in here, once, and said out loud:

* ``data.task`` unset: search uses the embedded ``tiny-sentiment``; retrain uses the task the
  structure was searched on (its search metadata), and refuses to guess when there is none.
* ``model.name_or_path`` unset: search uses the embedded ``tiny-t5``; retrain uses the backbone the
  structure was made (or transferred) for.

Every rank runs this identically (it reads only files and the config), so every rank fails alike.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from ..config import RunConfig, SearchConfig
from ..errors import ConfigError, StructureError
from ..structure import Structure

DEFAULT_MODEL = "tiny-t5"
DEFAULT_TASK = "tiny-sentiment"
DEFAULT_BUDGET = 0.02  # of the embedded tiny-t5: ~3.6k parameters, as examples/tiny_t5.yaml


def _embedded_budget(name: str, space: str) -> float:
    """``DEFAULT_BUDGET``, or half of what the space's candidates hold on the tiny model when that
    is less: every LoRA candidate of tiny-t5 together is 1.98%, so ``search.space=lora`` (the space
    a PEFT export asks for) was refused at 2% as "nothing to search"."""
    from ..errors import S3DeltaError
    from ..structure.builders import Backbone

    plan = Backbone.plan(name)
    try:
        share = sum(plan.space(space).params) / plan.info.num_params
    except S3DeltaError:  # an unknown space: refused by name below
        return DEFAULT_BUDGET
    return DEFAULT_BUDGET if DEFAULT_BUDGET < share / 2 else float(f"{share / 2:.2g}")


def log0(msg: str) -> None:
    """Print once per job: this runs before the process group exists, on every rank."""
    if os.environ.get("RANK", "0") == "0":
        print(msg, flush=True)


def _replace(cfg: RunConfig, section: str, **values) -> RunConfig:
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **values)})


def from_accelerate(cfg: RunConfig, log=log0) -> RunConfig:
    """Under ``accelerate launch`` with a DeepSpeed plugin, ``deepspeed=auto`` takes the plugin's
    config file (or its ZeRO stage) instead of guessing: the user already chose."""
    if cfg.deepspeed != "auto" or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() != "true":
        return cfg
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    if path:
        log(f"[s3delta] accelerate launch: DeepSpeed config from the plugin, {path}")
        return dataclasses.replace(cfg, deepspeed=path)
    if stage in ("0", "1", "2", "3"):
        log(f"[s3delta] accelerate launch: ZeRO stage {stage} from the plugin")
        template = "zero3" if stage == "3" else "zero2"
        zero_stage = cfg.zero_stage if cfg.zero_stage is not None else int(stage)
        return dataclasses.replace(cfg, deepspeed=template, zero_stage=zero_stage)
    return cfg


def check_quantized_types(cfg: RunConfig, types, where: str) -> None:
    """Refuse, before a backbone loads, delta types that read a quantized backbone's weights.

    PaFi trains entries of the frozen weight and HiWi (target=weight) adapts it: under
    ``model.quantize`` those weights are packed 4/8-bit storage. Attaching refuses them too, but
    only after a 70B backbone has loaded for minutes on every rank.

    Args:
        types: (type name, kwargs) pairs, from a search space's rules (each rule reaches at least
            one quantized projection) or a structure's modules on quantized hosts.
        where: what the pairs came from, for the message.
    """
    if cfg.model.quantize is None:
        return
    from ..deltas import delta_class
    from ..deltas.base import build_config

    refused = set()
    for type_name, kwargs in types:
        cls = delta_class(type_name)
        reads_weight = getattr(cls, "binds_to_weight", False) or (
            getattr(cls, "uses_base_weight", False) and build_config(cls, kwargs).target != "bias"
        )
        if reads_weight:
            refused.add(type_name if type_name != "hiwi" else "hiwi (target=weight)")
    if refused:
        raise ConfigError(
            f"{where} has {', '.join(sorted(refused))}, which need the backbone's full-precision weights, and "
            f"model.quantize={cfg.model.quantize} packs them: unset model.quantize, or search a space without pafi "
            "and hiwi (search.space=mixed) / retrain a structure without them (hiwi target=bias is fine)"
        )


def _check_positions(config, source_length: int) -> None:
    """An encoder with learned absolute positions (BERT, RoBERTa) cannot read more tokens than its
    position table holds: the first step failed with a size mismatch, after the output directory
    was claimed. T5 (relative) and RoPE decoders have no such table."""
    relative = (getattr(config, "position_embedding_type", None) or "absolute") != "absolute"
    if relative or config.model_type not in ("bert", "roberta"):
        return
    table = config.max_position_embeddings
    if config.model_type == "roberta":  # positions start after the padding index
        table -= (config.pad_token_id or 0) + 1
    if source_length > table:
        raise ConfigError(
            f"data.max_source_length={source_length} exceeds the {table} positions this {config.model_type} model "
            f"reads (max_position_embeddings): set data.max_source_length={table} or less"
        )


def _check_common(cfg: RunConfig, log=log0) -> str:
    """Task, DeepSpeed config and model family; returns the model's family name."""
    from ..backbones import family_for
    from ..backbones.loading import check_stored_quantization, load_config
    from ..data import resolve_task

    task = resolve_task(cfg.data)
    if cfg.deepspeed != "auto":
        from ..engine import zero

        zero.read_ds_config(cfg.deepspeed)
    config = load_config(cfg.model.name_or_path, cfg.model.gguf_file)  # a GGUF file: its metadata
    if not cfg.model.random_init and cfg.model.gguf_file is None:
        check_stored_quantization(config, cfg.model.quantize, cfg.model.name_or_path)
    family = family_for(config).name
    _check_positions(config, cfg.data.max_source_length or task.max_source_length)
    if family == "t5" and cfg.model.dtype == "fp16":
        log(
            "warning: model.dtype=fp16 on a T5: T5's feed-forward activations exceed fp16's range (transformers "
            "keeps its wo in fp32 for that, and DeepSpeed's fp16 engine casts it), so losses may turn NaN. "
            "Use model.dtype=bf16, or fp32 on a GPU without bf16"
        )
    return family


def preflight_search(cfg: RunConfig, log=log0) -> RunConfig:
    """Resolve the search's defaults and validate every name in ``cfg``.

    Raises:
        ConfigError, SearchSpaceError, BackboneError: a name that does not exist (the message lists
            the valid ones).
    """
    from ..backbones.loading import EMBEDDED
    from ..method.space import rules_of

    unset = cfg.model.name_or_path is None
    if unset:
        cfg = _replace(cfg, "model", name_or_path=DEFAULT_MODEL)
    # the default budget is made for real backbones: below a tiny model's cheapest module, so an
    # embedded model named outright (model.name_or_path=tiny-t5) gets the same budget as unset
    if cfg.model.name_or_path in EMBEDDED and cfg.search.budget == SearchConfig().budget:
        budget = _embedded_budget(cfg.model.name_or_path, cfg.search.space)
        cfg = _replace(cfg, "search", budget=budget)
        said = "model.name_or_path not set: using" if unset else "model.name_or_path is"
        log(
            f"[s3delta search] {said} the embedded {cfg.model.name_or_path} at search.budget={budget:g} "
            f"(the default {SearchConfig().budget:g} is for real backbones)"
        )
    if cfg.data.task is None:
        cfg = _replace(cfg, "data", task=DEFAULT_TASK)
    rules = rules_of(cfg.search.space)
    check_quantized_types(cfg, ((r.delta, r.kwargs) for r in rules), f"search.space={cfg.search.space}")
    cfg = from_accelerate(cfg, log)
    _check_common(cfg, log)
    return cfg


def preflight_retrain(cfg: RunConfig, log=log0) -> tuple[RunConfig, Structure | None]:
    """Load and validate the structure, take the task and model from it when the config has none,
    and refuse a structure made for another model family.

    Returns:
        The resolved config and the loaded structure (None for full fine-tuning).

    Raises:
        ConfigError: no structure, or no task anywhere; StructureError: a malformed structure or a
            family mismatch; BackboneError: an unknown model.
    """
    rc = cfg.retrain
    if rc.structure is None and not rc.full_finetune:
        raise ConfigError("retrain.structure must name a structure JSON (or set retrain.full_finetune=true)")
    if rc.full_finetune and (rc.structure or rc.pafi_mask):
        given = "retrain.structure" if rc.structure else "retrain.pafi_mask"
        raise ConfigError(
            f"retrain.full_finetune=true trains every backbone weight, so {given} would be ignored: set "
            f"{given}=null for the full fine-tuning baseline, or drop retrain.full_finetune to retrain the structure"
        )
    structure = Structure.load(rc.structure) if rc.structure else None
    searched_task = (structure.search.get("task") if structure else None) or None
    if structure is not None and not structure.modules:
        raise StructureError(f"{rc.structure} has no modules: nothing to train")
    if cfg.model.name_or_path is None:
        name = structure.backbone.name_or_path if structure else DEFAULT_MODEL
        if Path(name).is_file() and not cfg.model.random_init:  # a bare config.json: shapes, no weights
            raise ConfigError(
                f"{rc.structure} was planned on the config file {name}, which holds no weights: "
                "pass model.name_or_path=MODEL (a model directory or hub id)"
            )
        cfg = _replace(cfg, "model", name_or_path=name)
        log(f"[s3delta retrain] model.name_or_path not set: using {name} (the structure's backbone)")
    if cfg.data.task is None:
        if searched_task is None:
            raise ConfigError(
                "data.task is not set and the structure records no search task "
                f"({rc.structure or 'full fine-tuning'}): pass data.task=NAME (or a --config that sets it)"
            )
        if searched_task == "custom":  # the structure names the task, not the files and template
            raise ConfigError(
                f"{rc.structure} was searched on your own data (data.task=custom), and a structure records "
                "the task's name, not its files: pass the search's config (--config mine.yaml; with "
                "slurm/retrain.sh, CONFIG=mine.yaml)"
            )
        cfg = _replace(cfg, "data", task=searched_task)
        log(f"[s3delta retrain] data.task not set: using {searched_task} (the structure's search task)")
    elif searched_task is not None and searched_task != cfg.data.task:
        log(f"[s3delta retrain] the structure was searched on task {searched_task}; retraining on {cfg.data.task}")
    cfg = from_accelerate(cfg, log)
    family = _check_common(cfg, log)
    if structure is not None and family and family != structure.backbone.family:
        raise StructureError(
            f"{rc.structure} is for a {structure.backbone.family} backbone but model {cfg.model.name_or_path} is "
            f"{family}, and structures map only within a family: pass a {structure.backbone.family} model, or "
            f"search a structure on a {family} backbone"
        )
    if structure is not None and family:
        # depths and widths too, on the meta device: a t5-base structure on tiny-t5 used to fail only
        # after the output directory was written, and the corrected rerun was refused as "not empty"
        from ..structure.builders import Backbone

        planned = Backbone.plan(cfg.model.name_or_path, cfg.model.gguf_file)
        structure.check_backbone(planned.site_map)
        _check_pafi_mask(cfg, structure, planned)
        # transformers keeps a class's _keep_in_fp32_modules (T5: every "wo") out of bitsandbytes
        keep = set(getattr(planned.model, "_keep_in_fp32_modules", None) or ())
        hosts = ((m, planned.site_map.path(m.site)) for m in structure.modules)
        quantized = ((m.type, m.kwargs) for m, path in hosts if path.rsplit(".", 1)[-1] not in keep)
        check_quantized_types(cfg, quantized, str(rc.structure))
    if structure is not None:
        _warn_split(cfg, structure, log)
    return cfg, structure


def check_before_launch(script: str, cfg: RunConfig, *, resume: bool) -> None:
    """What ``s3delta search|retrain --nproc N`` checks in its own process before it starts the
    ranks: the preflight, a search's budget, the output directory, the tokenizer, and the user's
    own data files (read and checked as the run reads them: paths, columns, labels). A typo used to surface
    after ~30 s of launcher start-up, once per rank, among the launcher's lines. The ranks check
    it all again (they may also be started by deepspeed, torchrun or srun, which run none of this).

    Raises:
        ConfigError, StructureError, BackboneError, SearchSpaceError, BudgetError, DataError: as the
            run would.
    """
    from .runtime import check_output_dir

    if script == "search":
        cfg = checked_search(cfg)
    else:
        cfg, _ = preflight_retrain(cfg, log=_quiet)
    check_output_dir(Path(cfg.output_dir), resume=resume, overwrite=cfg.overwrite)
    _check_inputs(cfg)


def checked_search(cfg: RunConfig) -> RunConfig:
    """The search's preflight and budget check, quietly (rank 0 says the resolved defaults once the
    run starts). Returns the resolved config: its budget is the one the search will use."""
    from ..engine.backbone import resolve_source
    from .plan import searchable_space

    cfg = preflight_search(cfg, log=_quiet)
    searchable_space(cfg, resolve_source(cfg.model))
    return cfg


def _quiet(msg: str) -> None:
    return None


def _check_inputs(cfg: RunConfig) -> None:
    """Load the tokenizer and read the user's own files (``data.train_file``..., ``data.data_dir``)
    as rank 0 will: seconds (a 400k-row CSV takes ~7), against half a minute of launcher start-up
    before a missing column, or a hub model with no local copy offline, was named. Shipped and hub data are left to
    the ranks (known good; a hub load is the download itself)."""
    from ..data import load_rows, load_tokenizer, resolve_task
    from ..structure.builders import Backbone

    family = Backbone.plan(cfg.model.name_or_path, cfg.model.gguf_file).site_map.family.name
    load_tokenizer(family, cfg.model.name_or_path, cfg.model.tokenizer, cfg.model.gguf_file)
    task = resolve_task(cfg.data)
    if task.files or cfg.data.data_dir is not None:
        load_rows(task, cfg.data.data_dir, split_seed=cfg.data.split_seed)


def _check_pafi_mask(cfg: RunConfig, structure: Structure, backbone) -> None:
    """Globally ranked PaFi needs the backbone's mask, with the structure's counts: found here,
    not at attach time, after the output directory was written."""
    if not any(m.type == "pafi" and m.kwargs.get("ranking") == "global" for m in structure.modules):
        return
    if cfg.retrain.pafi_mask is None:
        raise ConfigError(
            f"{cfg.retrain.structure} holds globally ranked PaFi modules: pass retrain.pafi_mask=MASK, the "
            "`s3delta pafi-mask` file its counts came from"
        )
    from ..structure.pafi import check_mask

    check_mask(cfg.retrain.pafi_mask, structure, backbone)


def _warn_split(cfg: RunConfig, structure: Structure, log) -> None:
    """A structure chosen on validation rows that this retrain may test on would flatter it."""
    search = structure.search
    if not str(search.get("method", "")).startswith("s3delta") or search.get("task") != cfg.data.task:
        return
    # structures written before data.split_seed existed split with the run seed
    searched = search.get("split_seed", search.get("seed"))
    if searched is not None and searched != cfg.data.split_seed:
        log(
            f"[s3delta retrain] WARNING: the structure was searched with data split seed {searched}, this retrain "
            f"uses data.split_seed={cfg.data.split_seed}: its test rows may include validation rows that chose the "
            f"structure. Set data.split_seed={searched} to retrain on the search's split."
        )
