"""The two recipes (torchtune's shape): ``SearchRecipe`` and ``RetrainRecipe``, each
``setup()`` → ``train()`` → ``finish()``. The launcher entry points stay ``s3delta_ds/search.py``
and ``s3delta_ds/retrain.py``."""

from .retrain import RetrainRecipe
from .search import SearchRecipe

__all__ = ["RetrainRecipe", "SearchRecipe"]
