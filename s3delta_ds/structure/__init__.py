"""Structure JSON v1: the product's main artifact. What was chosen, where, and why (every
candidate's gate probability), for which backbone and budget, by which search.

Validated on load with messages that name the bad field (``modules[3].params: ...``), written
atomically (temp file + rename), and laid out for diffs: one module or candidate per line.
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from ..backbones import FAMILIES, SiteMap, format_site, parse_site
from ..backbones.loading import BackboneInfo
from ..deltas import DELTAS, build_config, config_kwargs, resolve
from ..errors import S3DeltaError, StructureError
from ..method.supernet import DeltaSpec
from ..util import atomic_write_text, strict_json

FORMAT = "s3delta-structure"
VERSION = 1
KINDS = ("searched", "random", "manual", "transferred")
_TOP_KEYS = (
    "format",
    "version",
    "kind",
    "backbone",
    "space",
    "budget",
    "search",
    "modules",
    "candidates",
    "provenance",
    "versions",
    "created",
)
_REQUIRED = ("format", "version", "kind", "backbone", "budget", "modules")


@dataclass(frozen=True)
class ModuleChoice:
    site: str
    type: str
    kwargs: Mapping[str, Any]
    params: int

    def to_dict(self) -> dict:
        return {"site": self.site, "type": self.type, "kwargs": dict(self.kwargs), "params": self.params}


@dataclass(frozen=True)
class CandidateRecord:
    """A candidate of the search with its final gate logit α and probability p."""

    site: str
    type: str
    kwargs: Mapping[str, Any]
    params: int
    alpha: float | None
    p: float

    def to_dict(self) -> dict:
        return {
            "site": self.site,
            "type": self.type,
            "kwargs": dict(self.kwargs),
            "params": self.params,
            "alpha": self.alpha,
            "p": self.p,
        }


@dataclass(frozen=True)
class Budget:
    """``relative`` × backbone parameters = ``absolute``; ``used`` = Σ params of the modules."""

    relative: float | None
    absolute: float | None
    used: int

    def to_dict(self) -> dict:
        return {"relative": self.relative, "absolute": self.absolute, "used": self.used}


class _DuplicateKey(ValueError):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    """json's object hook: a key written twice (a hand edit pasted a second "modules") is an error;
    json.loads would keep the last one silently."""
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def library_versions() -> dict[str, str]:
    """The versions a structure records (a fresh dict each call: callers may edit theirs)."""
    return dict(_installed_versions())


@functools.cache
def _installed_versions() -> dict[str, str]:
    # Read once per process: each metadata lookup scans every distribution on sys.path (~3 ms),
    # and every Structure (a transfer, a scaled preset, a study's plan) records them.
    out = {}
    for pkg in ("s3delta_ds", "torch", "transformers", "deepspeed"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


@dataclass(frozen=True)
class Structure:
    kind: str
    backbone: BackboneInfo
    budget: Budget
    modules: tuple[ModuleChoice, ...]
    space: str | None = None
    candidates: tuple[CandidateRecord, ...] = ()
    search: Mapping[str, Any] = field(default_factory=dict)
    provenance: Mapping[str, Any] = field(default_factory=dict)
    versions: Mapping[str, str] = field(default_factory=library_versions)
    created: str = field(default_factory=_now)

    # -- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "kind": self.kind,
            "backbone": self.backbone.to_dict(),
            "space": self.space,
            "budget": self.budget.to_dict(),
            # strict JSON (e.g. a search's -inf "best score" before any evaluation): null, in the
            # file and in the digest alike
            "search": strict_json(dict(self.search)),
            "modules": [m.to_dict() for m in self.modules],
            "candidates": [c.to_dict() for c in self.candidates],
            "provenance": strict_json(dict(self.provenance)),
            "versions": dict(self.versions),
            "created": self.created,
        }

    def dumps(self) -> str:
        """Pretty JSON with one module / candidate per line (stable order, pleasant to diff)."""
        d = self.to_dict()
        parts = []
        for key, value in d.items():
            if key in ("modules", "candidates") and value:
                rows = ",\n".join("    " + json.dumps(v) for v in value)
                text = "[\n" + rows + "\n  ]"
            else:
                text = json.dumps(value, indent=2).replace("\n", "\n  ")
            parts.append(f"  {json.dumps(key)}: {text}")
        return "{\n" + ",\n".join(parts) + "\n}\n"

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically: a reader never sees a half-written file, even if we are killed."""
        return atomic_write_text(path, self.dumps())

    def digest(self) -> str:
        """sha256 of the canonical JSON (whitespace-independent): names this exact structure."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()
        return "sha256:" + hashlib.sha256(blob).hexdigest()

    def modules_digest(self) -> str:
        """sha256 of what a retrain trains: the modules (site, type, settings, size), in order. Not
        ``created``, versions, gates or provenance: a preset saved again, or a file without
        ``created`` (the loader stamps it), is the same structure to train."""
        blob = json.dumps([m.to_dict() for m in self.modules], sort_keys=True, separators=(",", ":")).encode()
        return "sha256:" + hashlib.sha256(blob).hexdigest()

    @classmethod
    def load(cls, path: str | os.PathLike) -> Structure:
        """Read and validate a structure file.

        Raises:
            StructureError: unreadable, not JSON, or any field invalid (the message names it).
        """
        src = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise StructureError(f"{src}: cannot read ({e.strerror or e})") from e
        except UnicodeDecodeError as e:
            raise StructureError(f"{src}: not a text file (invalid UTF-8 at byte {e.start})") from e
        try:
            d = json.loads(text, object_pairs_hook=_no_duplicate_keys)
        except _DuplicateKey as e:
            twice = f"the key {e.args[0]!r} appears twice in one object (JSON keeps the last)"
            raise StructureError(f"{src}: {twice}") from e
        except json.JSONDecodeError as e:
            from ..config import run_config_hint

            hint = run_config_hint(src, "structure")
            raise StructureError(f"{src}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}{hint}") from e
        return cls.from_dict(d, source=src)

    @classmethod
    def from_dict(cls, d: Any, source: str = "structure") -> Structure:
        return _Validator(source).structure(d)

    # -- use -----------------------------------------------------------------------------------
    def transfer(self, target, budget: float | None = None) -> Structure:
        """This structure mapped onto another backbone of the family (by relative depth) and
        re-discretised at ``budget`` (relative; default: this one's). ``target``: a ``Backbone`` or
        anything ``Backbone.plan`` takes (``"t5-v1_1-xxl"``, a model directory, a config.json).
        A manual preset is rebuilt on the target and takes no ``budget``; a random baseline is drawn
        again there (its space and seed, at its relative budget or ``budget``); a structure edited by
        hand without gate probabilities maps its modules as they are and takes no ``budget``."""
        from .builders import Backbone
        from .transfer import transfer

        return transfer(self, target if isinstance(target, Backbone) else Backbone.plan(str(target)), budget)

    def rediscretise(self, relative: float) -> Structure:
        """The structure the same search gives at another relative budget, from the stored p."""
        from .transfer import rediscretise

        return rediscretise(self, relative)

    def specs(self) -> list[DeltaSpec]:
        """The chosen modules as ungated delta specs (for retraining)."""
        return [DeltaSpec(m.site, m.type, m.kwargs) for m in self.modules]

    def check_backbone(self, site_map: SiteMap) -> None:
        """Raise unless every module fits ``site_map`` with exactly the recorded parameter count.

        A structure made for another backbone (other family, depth or widths) must go through
        ``s3delta transfer`` first; this says so instead of attaching something else.
        """
        fam = site_map.family.name
        if fam != self.backbone.family:
            raise StructureError(
                f"structure is for a {self.backbone.family} backbone but this one is {fam}; "
                "use `s3delta transfer` to map it"
            )
        for i, m in enumerate(self.modules):
            try:
                site = site_map.site(m.site)
                _, _, n = resolve(m.type, m.kwargs, site.dims, m.site)
            except S3DeltaError as e:
                raise StructureError(
                    f"modules[{i}] does not fit this backbone ({e}); the structure was made for "
                    f"{self.backbone.name_or_path} (depths {self.backbone.depths}): use `s3delta transfer`"
                ) from e
            if n != m.params:
                raise StructureError(
                    f"modules[{i}] ({m.site} {m.type}) has {n} parameters on this backbone but the structure "
                    f"records {m.params}: it was made for {self.backbone.name_or_path} "
                    f"(hidden size {self.backbone.hidden_size}); use `s3delta transfer` to map it"
                )

    def summary(self) -> dict[str, Any]:
        per_type: dict[str, dict[str, int]] = {}
        per_layer: dict[str, int] = {}
        for m in self.modules:
            t = per_type.setdefault(m.type, {"count": 0, "params": 0})
            t["count"] += 1
            t["params"] += m.params
            stack, layer, _ = parse_site(m.site)
            key = f"{stack}.{layer}" if layer is not None else f"{stack}.-"
            per_layer[key] = per_layer.get(key, 0) + 1
        return {
            "kind": self.kind,
            "family": self.backbone.family,
            "backbone": self.backbone.name_or_path,
            "backbone_params": self.backbone.num_params,
            "space": self.space,
            "budget_relative": self.budget.relative,
            "budget_absolute": self.budget.absolute,
            "params_used": self.budget.used,
            "used_relative": self.budget.used / self.backbone.num_params,
            "modules": len(self.modules),
            "candidates": len(self.candidates),
            "by_type": per_type,
            "modules_per_layer": per_layer,
        }


class _Validator:
    """Checks a decoded structure dict field by field; every message starts with the field path."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, where: str, msg: str):
        raise StructureError(f"{self.source}: {where}: {msg}")

    def obj(self, v, where) -> dict:
        if not isinstance(v, dict):
            self.fail(where, f"expected an object, got {type(v).__name__}")
        return v

    def string(self, v, where) -> str:
        if not isinstance(v, str) or not v:
            self.fail(where, f"expected a non-empty string, got {v!r}")
        return v

    def pos_int(self, v, where, allow_zero=False) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if allow_zero else 1):
            self.fail(where, f"expected a {'non-negative' if allow_zero else 'positive'} integer, got {v!r}")
        return v

    def number(self, v, where, *, nullable=False, lo=None, hi=None, hi_open=False, positive=False) -> float | None:
        if v is None and nullable:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            self.fail(where, f"expected a finite number, got {v!r}")
        if positive and v <= 0:
            self.fail(where, f"expected a positive number, got {v!r}")
        if (lo is not None and v < lo) or (hi is not None and (v >= hi if hi_open else v > hi)):
            upper = f"{'<' if hi_open else '<='} {hi}"
            bounds = f">= {lo}" if hi is None else upper if lo is None else f"in [{lo}, {hi}]"
            self.fail(where, f"expected a number {bounds}, got {v!r}")
        return float(v)

    def structure(self, d) -> Structure:
        self.obj(d, "top level")
        unknown = sorted(set(d) - set(_TOP_KEYS))
        if unknown:
            self.fail("top level", f"unknown keys {unknown}; valid keys: {', '.join(_TOP_KEYS)}")
        for key in _REQUIRED:
            if key not in d:
                self.fail(key, "missing required field")
        if d["format"] != FORMAT:
            self.fail("format", f"expected {FORMAT!r}, got {d['format']!r} (is this a structure file?)")
        if type(d["version"]) is not int or d["version"] != VERSION:
            self.fail("version", f"unsupported version {d['version']!r}; this s3delta_ds reads version {VERSION}")
        if not isinstance(d["kind"], str) or d["kind"] not in KINDS:
            self.fail("kind", f"expected one of {', '.join(KINDS)}, got {d['kind']!r}")
        backbone = self.backbone(d["backbone"])
        space = d.get("space")
        if space is not None:
            from ..method.space import SPACES

            if self.string(space, "space") not in SPACES:
                self.fail("space", f"unknown search space {space!r}; known spaces: {', '.join(SPACES)}")
        modules = self.entries(d["modules"], "modules", backbone, with_gate=False)
        candidates = self.entries(d.get("candidates") or [], "candidates", backbone, with_gate=True)
        if candidates and (space is None or d["kind"] == "manual"):
            self.fail(
                "candidates",
                "a manual structure, or one without a space, has no gates: candidates belong to a searched one",
            )
        if candidates:
            # a structure with gates is a choice among its candidates: transfer and re-discretisation
            # map the candidates only, so a module outside them (edited in by hand) would vanish
            offered = {(c.site, c.type): (dict(c.kwargs), c.params) for c in candidates}
            for i, m in enumerate(modules):
                twin = offered.get((m.site, m.type))
                if twin is not None and twin[0] != dict(m.kwargs):
                    self.fail(
                        f"modules[{i}].kwargs",
                        f"{dict(m.kwargs)}, but the candidate {m.site} {m.type} has {twin[0]} (a structure with gates "
                        "chooses among its candidates: edit the candidates too, or drop them to make a manual one)",
                    )
                if twin is not None and twin[1] != m.params:
                    self.fail(
                        f"modules[{i}].params",
                        f"{m.params:,}, but the candidate {m.site} {m.type} {twin[0]} has {twin[1]:,} parameters",
                    )
                if twin is None:
                    self.fail(
                        f"modules[{i}]",
                        f"{m.site} {m.type} {dict(m.kwargs)} is not one of the structure's candidates (a structure "
                        "with gates chooses among them; edit the candidates too, or drop them to make a manual one)",
                    )
        budget = self.budget(d["budget"], modules)
        for key in ("search", "provenance", "versions"):
            if d.get(key) is not None:
                self.obj(d[key], key)
        created = d.get("created") or _now()
        self.string(created, "created")
        return Structure(
            kind=d["kind"],
            backbone=backbone,
            budget=budget,
            modules=modules,
            space=space,
            candidates=candidates,
            search=d.get("search") or {},
            provenance=d.get("provenance") or {},
            versions=d.get("versions") or {},
            created=created,
        )

    def backbone(self, b) -> BackboneInfo:
        b = self.obj(b, "backbone")
        for key in ("family", "name_or_path", "model_type", "config_hash", "num_params", "depths", "hidden_size"):
            if key not in b:
                self.fail(f"backbone.{key}", "missing required field")
        if self.string(b["family"], "backbone.family") not in FAMILIES:
            self.fail("backbone.family", f"unknown family {b['family']!r}; supported: {', '.join(FAMILIES)}")
        depths = self.obj(b["depths"], "backbone.depths")
        if not depths:
            self.fail("backbone.depths", "expected at least one stack")
        for stack, depth in depths.items():
            self.pos_int(depth, f"backbone.depths.{stack}")
        h = self.string(b["config_hash"], "backbone.config_hash")
        if not re.fullmatch(r"sha256:[0-9a-f]{64}", h):
            self.fail("backbone.config_hash", f"expected 'sha256:<hex>', got {h!r}")
        return BackboneInfo(
            family=b["family"],
            name_or_path=self.string(b["name_or_path"], "backbone.name_or_path"),
            model_type=self.string(b["model_type"], "backbone.model_type"),
            config_hash=h,
            num_params=self.pos_int(b["num_params"], "backbone.num_params"),
            depths=dict(depths),
            hidden_size=self.pos_int(b["hidden_size"], "backbone.hidden_size"),
        )

    def entries(self, rows, name, backbone: BackboneInfo, with_gate: bool):
        if not isinstance(rows, list):
            self.fail(name, f"expected a list, got {type(rows).__name__}")
        out, seen = [], set()
        for i, row in enumerate(rows):
            where = f"{name}[{i}]"
            row = self.obj(row, where)
            required = ("site", "type", "kwargs", "params") + (("p",) if with_gate else ())
            for key in required:
                if key not in row:
                    self.fail(f"{where}.{key}", "missing required field")
            allowed = set(required) | ({"alpha"} if with_gate else set())
            extra = sorted(set(row) - allowed)
            if extra:
                self.fail(where, f"unknown keys {extra}; valid keys: {', '.join(sorted(allowed))}")
            site = self.string(row["site"], f"{where}.site")
            try:
                stack, layer, component = parse_site(site)
            except S3DeltaError as e:
                self.fail(f"{where}.site", str(e))
            canonical = format_site(stack, layer, component)
            if canonical != site:  # "encoder.03.attn.q" is no site's name
                self.fail(f"{where}.site", f"malformed site name {site!r}: write {canonical!r}")
            if stack not in backbone.depths:
                self.fail(f"{where}.site", f"stack {stack!r} is not in backbone.depths {sorted(backbone.depths)}")
            if layer is not None and layer >= backbone.depths[stack]:
                self.fail(
                    f"{where}.site", f"layer {layer} is out of range: {stack} has {backbone.depths[stack]} layers"
                )
            type_name = self.string(row["type"], f"{where}.type")
            if type_name not in DELTAS:
                self.fail(f"{where}.type", f"unknown delta type {type_name!r}; known: {', '.join(DELTAS)}")
            kwargs = self.obj(row["kwargs"], f"{where}.kwargs")
            for key, value in kwargs.items():  # JSON's NaN/Infinity would pass "alpha <= 0" checks
                if isinstance(value, float) and not math.isfinite(value):
                    self.fail(f"{where}.kwargs.{key}", f"expected a finite number, got {value!r}")
            try:
                cfg = build_config(DELTAS[type_name], kwargs)
            except S3DeltaError as e:
                self.fail(f"{where}.kwargs", str(e))
            params = self.pos_int(row["params"], f"{where}.params")
            if (site, type_name) in seen:
                self.fail(where, f"duplicate entry for site {site!r} and type {type_name!r}")
            seen.add((site, type_name))
            if with_gate:
                p = self.number(row["p"], f"{where}.p", lo=0.0, hi=1.0)
                alpha = self.number(row.get("alpha"), f"{where}.alpha", nullable=True)
                out.append(CandidateRecord(site, type_name, config_kwargs(cfg), params, alpha, p))
            else:
                out.append(ModuleChoice(site, type_name, config_kwargs(cfg), params))
        return tuple(out)

    def budget(self, b, modules) -> Budget:
        b = self.obj(b, "budget")
        extra = sorted(set(b) - {"relative", "absolute", "used"})
        if extra:
            self.fail("budget", f"unknown keys {extra}; valid keys: relative, absolute, used")
        if "used" not in b:
            self.fail("budget.used", "missing required field")
        rel = self.number(b.get("relative"), "budget.relative", nullable=True, positive=True, hi=1.0, hi_open=True)
        absolute = self.number(b.get("absolute"), "budget.absolute", nullable=True, positive=True)
        used = self.pos_int(b["used"], "budget.used", allow_zero=True)
        total = sum(m.params for m in modules)
        if used != total:
            self.fail("budget.used", f"is {used} but the modules add up to {total} parameters")
        if absolute is not None and used > absolute:
            self.fail("budget.used", f"{used} parameters exceed the budget of {absolute:g}")
        return Budget(rel, absolute, used)
