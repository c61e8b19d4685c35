"""Backbone families and site maps. ``family_for(config)`` picks the family of a HF config."""

from __future__ import annotations

from ..errors import BackboneError
from .base import Family, Site, SiteDims, SiteMap, format_site, parse_site
from .bert import BertFamily
from .llama import LlamaFamily
from .t5 import T5Family

FAMILIES: dict[str, Family] = {f.name: f for f in (T5Family(), LlamaFamily(), BertFamily())}


def supported() -> str:
    return "; ".join(f.describe() for f in FAMILIES.values())


def get_family(name: str) -> Family:
    """The family registered as ``name`` (``t5``, ``llama``, ``bert``)."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise BackboneError(f"unknown backbone family {name!r}; supported families: {supported()}") from None


def family_for(config) -> Family:
    """The family whose ``model_types`` include ``config.model_type``.

    Raises:
        BackboneError: the architecture is not supported (the message lists what is).
    """
    model_type = getattr(config, "model_type", None)
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    arch = ", ".join(getattr(config, "architectures", None) or []) or "?"
    raise BackboneError(
        f"unsupported architecture: model_type {model_type!r} (architectures: {arch}); "
        f"supported families: {supported()}"
    )


__all__ = [
    "FAMILIES",
    "Family",
    "Site",
    "SiteDims",
    "SiteMap",
    "family_for",
    "format_site",
    "get_family",
    "parse_site",
    "supported",
]
