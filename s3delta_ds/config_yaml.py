"""A complete, commented run config as YAML (``s3delta config``): every key with its value and the
documentation written under its field in ``config.py``, so a user starts from a file that already
says what each setting does (like ``tune cp``)."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
from functools import cache

import yaml

from . import config as config_module
from .config import _SECTIONS, RunConfig


@cache
def field_docs() -> dict[str, dict[str, str]]:
    """Class name → field name → the string literal written under the field (PEP 257 attribute docs)."""
    tree = ast.parse(inspect.getsource(config_module))
    out: dict[str, dict[str, str]] = {}
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        docs = out.setdefault(node.name, {})
        body = node.body
        for stmt, nxt in zip(body, body[1:], strict=False):
            if (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[stmt.target.id] = inspect.cleandoc(nxt.value.value)
    return out


def _docs_for(cls) -> dict[str, str]:
    merged: dict[str, str] = {}
    for klass in reversed(cls.__mro__):  # SearchConfig inherits TrainConfig's fields
        merged.update(field_docs().get(klass.__name__, {}))
    return merged


def _comment(text: str, indent: str) -> list[str]:
    lines = []
    for para in text.replace("``", "`").split("\n\n"):
        lines += textwrap.wrap(" ".join(para.split()), 100 - len(indent), break_on_hyphens=False) or [""]
    return [f"{indent}# {line}".rstrip() for line in lines]


def _value(v) -> str:
    return yaml.safe_dump(v, default_flow_style=True, width=1000).strip().removesuffix("...").strip()


def commented_yaml(cfg: RunConfig, header: str = "") -> str:
    """``cfg`` as YAML that ``load_run_config`` reads back to an equal config, each key commented."""
    lines = _comment(header, "") if header else []
    docs = _docs_for(RunConfig)
    for f in dataclasses.fields(RunConfig):
        value = getattr(cfg, f.name)
        if f.name in _SECTIONS:
            lines.append("")
            lines.append(f"{f.name}:")
            section_docs = _docs_for(type(value))
            for sf in dataclasses.fields(value):
                lines += _comment(section_docs.get(sf.name, ""), "  ") if sf.name in section_docs else []
                lines.append(f"  {sf.name}: {_value(getattr(value, sf.name))}")
            continue
        lines.append("")
        lines += _comment(docs[f.name], "") if f.name in docs else []
        lines.append(f"{f.name}: {_value(value)}")
    return "\n".join(lines) + "\n"
