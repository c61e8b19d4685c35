"""s3delta_ds: Sparse Structure Search for Delta Tuning (S3Delta / S3PET) on DeepSpeed ZeRO-3.

The public API is ``__all__`` (documented in docs/python-api.md); every other module and name is
internal and may change. Importing the package has no side effects (no GPU, environment or logging
setup), and the public names load on first use, so ``import s3delta_ds`` stays instant.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> module that defines it (loaded on first access, PEP 562)
_PUBLIC = {
    "attach": "api",
    "load": "api",
    "embedded_model": "api",
    "search": "search",  # the launcher modules themselves, made callable (see api.callable_module)
    "retrain": "retrain",
    "run_config": "api",
    "Structure": "structure",
    "Backbone": "structure.builders",
    "enumerate_space": "method.space",
    "SPACES": "method.space",
    "S3DeltaError": "errors",
    "RunStopped": "errors",
}

__all__ = [
    "RunStopped",
    "S3DeltaError",
    "SPACES",
    "Backbone",
    "Structure",
    "__version__",
    "attach",
    "embedded_model",
    "enumerate_space",
    "load",
    "retrain",
    "run_config",
    "search",
]

if TYPE_CHECKING:
    from .api import attach, load, retrain, run_config, search  # search/retrain: callable modules at run time
    from .errors import RunStopped, S3DeltaError
    from .method.space import SPACES, enumerate_space
    from .structure import Structure
    from .structure.builders import Backbone


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 's3delta_ds' has no attribute {name!r}")
    module = importlib.import_module(f".{_PUBLIC[name]}", __name__)
    value = module if _PUBLIC[name] == name else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
