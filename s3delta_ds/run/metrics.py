"""Task metrics from scikit-learn and SciPy. Each returns named scores; the task's ``metric`` is the
main score (model selection), and the secondary scores the original reports come along."""

from __future__ import annotations

from collections.abc import Sequence


def _sk():
    from sklearn import metrics

    return metrics


def _values(task_words: Sequence[str] | None, ids: Sequence[int]) -> list[float]:
    return [float(task_words[i]) for i in ids] if task_words else [float(i) for i in ids]


def compute(
    metric: str, preds: Sequence[int], labels: Sequence[int], label_words: Sequence[str] | None = None
) -> dict[str, float]:
    """Scores of ``preds`` against ``labels`` (class indices). For "pearson" (STS-B) the classes are
    read back as the numbers their label words spell. ``f1_macro`` averages over every class of the
    task (``label_words``), as T5's and Compacter's ``mean_multiclass_f1`` does: a class that a
    small split lacks, and that nothing predicts, counts 0 instead of dropping out of the mean."""
    if len(labels) == 0:
        raise ValueError("no examples to score")
    m = _sk()
    acc = float(m.accuracy_score(labels, preds))
    if metric == "accuracy":
        return {"accuracy": acc}
    if metric == "f1":
        return {"f1": float(m.f1_score(labels, preds, pos_label=1, zero_division=0)), "accuracy": acc}
    if metric == "f1_macro":
        classes = list(range(len(label_words))) if label_words else None
        f1 = m.f1_score(labels, preds, labels=classes, average="macro", zero_division=0)
        return {"f1_macro": float(f1), "accuracy": acc}
    if metric == "matthews":
        return {"matthews": float(m.matthews_corrcoef(labels, preds)), "accuracy": acc}
    if metric == "pearson":
        from scipy import stats

        x, y = _values(label_words, preds), _values(label_words, labels)
        if len(set(x)) < 2 or len(set(y)) < 2:  # a constant prediction has no correlation: score it 0
            return {"pearson": 0.0, "spearman": 0.0}
        return {"pearson": float(stats.pearsonr(x, y)[0]), "spearman": float(stats.spearmanr(x, y)[0])}
    raise ValueError(f"unknown metric {metric!r}; known: accuracy, f1, f1_macro, matthews, pearson")
