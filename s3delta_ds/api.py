"""The public Python API: attach a structure to your own model, load trained deltas, and run a
search or a retrain from Python with the same code path as the CLI.

    import s3delta_ds
    model = s3delta_ds.attach(model, "structure.json")        # trainable by any loop (HF Trainer too)
    model = s3delta_ds.load(model, "runs/retrain")            # + the trained deltas, like PeftModel
    summary = s3delta_ds.search("examples/tiny_t5.yaml", search__steps=50, output_dir="runs/s")
    summary = s3delta_ds.retrain("examples/tiny_t5.yaml", retrain__structure="runs/s/structure.json")

``search`` and ``retrain`` can run several times in one process (a notebook): each makes its own
process group of one rank when no launcher made one, and takes it down again, environment
included, so nothing leaks into the next call or into a later launch.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch.nn as nn

from .config import RunConfig, build_run_config, load_run_config
from .errors import CheckpointError, ConfigError
from .structure import Structure

_DELTA_FILE = "deltas.safetensors"
_PG_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")


def attach(model: nn.Module, structure: str | os.PathLike | Structure, *, pafi_mask: str | None = None) -> nn.Module:
    """Attach a structure's deltas (exact init, no gates) to a Hugging Face model, in place.

    Only the delta weights (and, for encoder classifiers, the task head) are left trainable, so any
    training loop, ``transformers.Trainer`` included, trains exactly what the structure names.

    Args:
        model: a model of a supported family (T5, LLaMA-like, BERT-like), as ``from_pretrained``
            returns it; it must have the structure's backbone shape.
        structure: a structure JSON path or a loaded ``Structure``.
        pafi_mask: the ``s3delta pafi-mask`` file, for structures with globally ranked PaFi modules
            (to train them; ``load`` needs none: the trained positions are in the delta file).
    Returns:
        The same model object.
    Raises:
        StructureError: the structure does not fit this model (another family, depth or width).
    """
    return _attach(model, structure, pafi_mask=pafi_mask, stored_positions=False)


def _attach(model: nn.Module, structure, *, pafi_mask: str | None, stored_positions: bool) -> nn.Module:
    """``attach``; ``stored_positions``: globally ranked PaFi modules take placeholder positions
    that the trained delta file's ``indices`` overwrite (``load``: no mask file needed)."""
    from .method.supernet import attach as attach_specs
    from .method.supernet import freeze_backbone
    from .structure.builders import Backbone

    structure = structure if isinstance(structure, Structure) else Structure.load(structure)
    backbone = Backbone.from_model(model)
    structure.check_backbone(backbone.site_map)
    masks = None
    if pafi_mask is not None:
        from .structure.pafi import check_weights, load_mask

        masks, meta = load_mask(pafi_mask, backbone)
        check_weights(meta, model, backbone.site_map, pafi_mask)
    elif stored_positions:
        from .structure.pafi import positions_in_deltas

        masks = positions_in_deltas(structure)
    attach_specs(model, backbone.site_map, structure.specs(), masks=masks)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    if dtype is not None:
        from .method.supernet import cast_deltas

        cast_deltas(model, dtype)
    freeze_backbone(model, backbone.site_map.family.head_modules)
    return model


def load(model: nn.Module, run_or_dir: str | os.PathLike, *, pafi_mask: str | None = None) -> nn.Module:
    """Attach a retrained structure to ``model`` and load its trained deltas (``PeftModel.from_pretrained``).

    Args:
        model: the backbone the run trained on, freshly loaded (for encoder classifiers: with the
            run's ``num_labels``; the trained head is loaded from the delta file).
        run_or_dir: a retrain output directory, or any directory holding its ``structure.json`` and
            ``deltas.safetensors``.
    Returns:
        The same model object, in eval mode; an encoder classifier trained with mean pooling
        (``model.pooling``) gets it back.
    Raises:
        CheckpointError: the directory lacks either file, the file does not match the structure, or
            a head trained on the CLS pooler is loaded into a mean-pooled model.
    """
    from .run.checkpoint import load_deltas

    root = Path(run_or_dir)
    if not root.is_dir():
        what = "is not a directory" if root.exists() else "does not exist"
        raise CheckpointError(f"{root} {what}: pass a retrain run")
    for name in ("structure.json", _DELTA_FILE):
        if not (root / name).is_file():
            raise CheckpointError(f"{root}: {name} is missing (expected a retrain output directory)")
    structure = Structure.load(root / "structure.json")
    _attach(model, structure, pafi_mask=pafi_mask, stored_positions=True)
    from .backbones import family_for

    head = family_for(model.config).head_modules
    load_deltas(model, root / _DELTA_FILE, head_prefixes=head, structure_digest=structure.digest())
    _warn_on_another_config(model, root / _DELTA_FILE)
    if head:
        _pool_as_trained(model, root)
    return model.eval()


def _warn_on_another_config(model: nn.Module, path: Path) -> None:
    """Shapes cannot tell two configs of one architecture apart (another activation, rope_theta,
    norm epsilon): the deltas load and every output drifts. A warning, not an error: a config saved
    by another transformers version can differ in keys that change nothing."""
    import warnings

    from .backbones.loading import config_hash
    from .run.checkpoint import read_delta_metadata

    meta = read_delta_metadata(path)
    recorded, now = meta.get("config_hash"), config_hash(model.config)  # quantized or not, on either side
    if recorded == config_hash(model.config, legacy=True):  # written by a quantized run before the hash left it out
        return
    if recorded is not None and recorded != now:
        warnings.warn(
            f"{path} was trained on {meta.get('backbone', 'another model')} (config {recorded[:19]}...), and this "
            f"model's config differs ({now[:19]}...): the shapes match, but if it is another model (another "
            "activation, rope_theta, or norm epsilon) its outputs will not be the run's",
            UserWarning,
            stacklevel=3,
        )


def _pool_as_trained(model: nn.Module, root: Path) -> None:
    """Give an encoder classifier the pooling its head was trained on (``model.pooling``): a head
    trained on the mean of the token states, fed the CLS pooler, silently predicts something else.
    Delta files record it; for older ones, the run's ``config.yaml`` says it."""
    from .backbones.pooling import pooling_of, use_mean_pooling
    from .run.checkpoint import read_delta_metadata

    trained = read_delta_metadata(root / _DELTA_FILE).get("pooling")
    if trained is None and (root / "config.yaml").is_file():
        from .backbones.pooling import resolve_pooling
        from .engine.backbone import resolve_source

        cfg = load_run_config(root / "config.yaml").model
        pretrained = not cfg.random_init and not cfg.gguf_file
        trained = resolve_pooling(cfg.pooling, resolve_source(cfg), pretrained=pretrained)
    if trained == "mean" and pooling_of(model) != "mean":
        use_mean_pooling(model)
    elif trained == "cls" and pooling_of(model) == "mean":
        raise CheckpointError(
            f"{root}: its head was trained on the CLS pooler, but this model pools by the mean of the token "
            "states (model.pooling=mean): load the deltas into a model without mean pooling"
        )


def search(
    config: str | os.PathLike | Mapping | RunConfig | None = None, /, *overrides: str, resume: bool = False, **keys: Any
) -> dict:
    """Run a search in this process (or on this rank of a launcher); returns its summary.

    Args:
        config: a YAML path, a nested dict like the YAML, a ``RunConfig``, or None (defaults).
        overrides: ``"section.key=value"`` strings, as on the command line.
        resume: continue the run in ``output_dir`` from its last checkpoint (the CLI's ``--resume``).
        keys: the same as keyword arguments, ``section__key=value`` (``search__steps=50``).
    Raises:
        ConfigError: the run stopped at ``search.stop_after`` (continue it with ``resume=True``).
        RunStopped: SIGTERM or SIGUSR1 stopped it after a checkpoint (continue it with ``resume=True``).
    """
    from .search import run_search

    return _run(run_search, config, overrides, keys, resume)


def retrain(
    config: str | os.PathLike | Mapping | RunConfig | None = None, /, *overrides: str, resume: bool = False, **keys: Any
) -> dict:
    """Retrain a structure in this process (``retrain__structure=PATH``); returns its summary.
    Arguments as for :func:`search`."""
    from .retrain import run_retrain

    return _run(run_retrain, config, overrides, keys, resume)


def embedded_model(name: str) -> Path:
    """The embedded tiny model ``name`` (``tiny-t5``, ``tiny-t5-v1_1``, ``tiny-llama``, ``tiny-bert``)
    as a Hugging Face model directory, for ``from_pretrained``: the weights the CLI's embedded
    default trains (random, fixed seed), written once to the cache. Offline: for trying the API,
    a notebook or a test without downloading a model.

    Raises:
        ConfigError: not an embedded model."""
    from .engine.backbone import EMBEDDED, materialise_embedded

    if name not in EMBEDDED:
        raise ConfigError(f"no embedded model {name!r}; embedded: {', '.join(EMBEDDED)}")
    return materialise_embedded(name)


def run_config(config=None, overrides=(), keys: Mapping[str, Any] | None = None) -> RunConfig:
    """The ``RunConfig`` that ``search``/``retrain`` would use, validated (``keys``: ``section__key``)."""
    dotted = {k.replace("__", "."): v for k, v in (keys or {}).items()}
    if isinstance(config, RunConfig):
        config = config.to_dict()
    if isinstance(config, Mapping):
        return build_run_config(dict(config), list(overrides), dotted)
    return build_run_config(_yaml_values(config), list(overrides), dotted)


def _yaml_values(path) -> dict:
    """The YAML file's values as written (validated later, with the overrides, as the command line
    does), or {} for the defaults."""
    from .config import read_yaml_values

    return read_yaml_values(path)


def _run(fn, config, overrides, keys, resume: bool) -> dict:
    if "config" in keys:  # search(config="run.yaml"): no setting is called config, so it is the YAML
        if config is not None:
            raise ConfigError("config given twice: as the first argument and as config=")
        config = keys.pop("config")
    cfg = run_config(config, overrides, keys)
    with _process_group():
        summary = fn(cfg, resume=resume)
    if summary is None:
        raise ConfigError(
            f"the run stopped early (stop_after) with a checkpoint in {cfg.output_dir}: continue it with the same "
            "arguments and resume=True"
        )
    return summary


@contextlib.contextmanager
def _process_group() -> Iterator[None]:
    """A launcher's process group is left alone; one this call creates is destroyed afterwards and
    the rendezvous variables it set are restored, so the next call (or launch) starts clean."""
    import torch.distributed as dist

    from .engine import zero

    # a launcher's (RANK set) or the caller's own (init_process_group before the call)
    launched = "RANK" in os.environ or (dist.is_available() and dist.is_initialized())
    saved = {k: os.environ.get(k) for k in _PG_ENV}
    try:
        yield
    finally:
        if not launched:
            zero.destroy()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def callable_module(name: str, fn) -> None:
    """Make the launcher module ``name`` (``s3delta_ds.search``) callable as ``fn``.

    ``s3delta_ds/search.py`` must stay a file the launchers run, and importing it binds the package
    attribute ``s3delta_ds.search`` to the module, so a plain function of that name could not
    survive the first import. The module itself therefore answers the call.
    """
    import sys
    import types

    module = sys.modules[name]

    class _Callable(types.ModuleType):
        __call__ = staticmethod(fn)

    module.__class__ = _Callable
