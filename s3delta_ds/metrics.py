"""Task metrics. Each returns a dict of named scores; ``main`` names the one used for model selection."""

from __future__ import annotations

from collections.abc import Sequence


def accuracy(preds: Sequence[int], labels: Sequence[int]) -> float:
    if not labels:
        raise ValueError("no examples to score")
    return sum(int(p == y) for p, y in zip(preds, labels, strict=True)) / len(labels)


METRICS = {"accuracy": accuracy}


def compute(metric: str, preds: Sequence[int], labels: Sequence[int]) -> dict[str, float]:
    try:
        fn = METRICS[metric]
    except KeyError:
        raise ValueError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}") from None
    return {metric: float(fn(preds, labels))}
