"""GLUE's metrics, from scikit-learn and SciPy rather than by hand: accuracy (SST-2, RTE),
Matthews correlation (CoLA), F1 and accuracy (MRPC), Pearson and Spearman (STS-B)."""

from __future__ import annotations

import numpy as np

# The metric a task is judged by on the GLUE leaderboard, by the usual names of its tasks.
MAIN_METRIC = {"cola": "matthews", "mrpc": "f1", "qqp": "f1", "stsb": "pearson", "sts-b": "pearson"}


def main_metric(task: str, kind: str) -> str:
    if kind == "regression":
        return "pearson"
    return MAIN_METRIC.get(task.lower(), "accuracy")


def classification_metrics(predictions: np.ndarray, labels: np.ndarray, positive: int = 1) -> dict[str, float]:
    """accuracy, Matthews correlation and, for two classes, F1 of class `positive`."""
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    predictions, labels = np.asarray(predictions), np.asarray(labels)
    out = {"accuracy": float(accuracy_score(labels, predictions)),
           "matthews": float(matthews_corrcoef(labels, predictions))}
    if len(set(labels.tolist()) | set(predictions.tolist())) <= 2:
        out["f1"] = float(f1_score(labels, predictions, pos_label=positive, zero_division=0))
    return out


def regression_metrics(scores: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """Pearson and Spearman correlation (0 where the scores are constant: no correlation)."""
    from scipy.stats import pearsonr, spearmanr

    scores, targets = np.asarray(scores, dtype=np.float64), np.asarray(targets, dtype=np.float64)
    if np.ptp(scores) == 0 or np.ptp(targets) == 0:
        return {"pearson": 0.0, "spearman": 0.0}
    return {"pearson": float(pearsonr(scores, targets).statistic),
            "spearman": float(spearmanr(scores, targets).statistic)}


def task_metrics(kind: str, outputs: np.ndarray, targets: np.ndarray, positive: int = 1) -> dict[str, float]:
    """Every metric of a task from its outputs: logits or probabilities [rows, classes]
    (classification) or scores [rows] / [rows, 1] (regression)."""
    outputs = np.asarray(outputs)
    if kind == "regression":
        return regression_metrics(outputs.reshape(len(outputs), -1)[:, 0], targets)
    return classification_metrics(outputs.argmax(axis=-1), targets, positive)
