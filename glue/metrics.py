"""The GLUE metrics: accuracy, F1, Matthews correlation, Pearson and Spearman correlation.

Written out from their definitions with numpy, so a reader can check each against its formula
(the tests check them against the formulas and scipy.stats):

    accuracy  = mean(pred == label)
    F1        = 2 TP / (2 TP + FP + FN)            positive class = 1 (MRPC, QQP)
    MCC       = (TP TN - FP FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN))     (Matthews, 1975)
                and for K classes Gorodkin's (2004) generalisation over the confusion matrix C:
                (c s - sum_k p_k t_k) / sqrt((s^2 - sum_k p_k^2)(s^2 - sum_k t_k^2)),
                c = trace(C), s = number of examples, t_k / p_k = true / predicted count of k
    Pearson   = cov(x, y) / (std(x) std(y))
    Spearman  = Pearson of the ranks, tied values sharing their average rank

Conventions where a formula divides by zero (a constant prediction, a single class): MCC, F1,
Pearson and Spearman are 0.0, never NaN; "no better than chance" is what such a predictor
scores, and a NaN would poison every mean and standard deviation over seeds. (scikit-learn
uses the same 0.0 for MCC and F1; scipy returns NaN for a constant input's correlations.)

Values are fractions ([0, 1] or [-1, 1]), not percentages. The paired metrics the paper reports
for MRPC and STS-B are plain means: acc_and_f1 = (acc + f1) / 2 and
pearson_and_spearman = (pearson + spearman) / 2 (Hua et al., Table 4).
"""

import math

import numpy as np

from bert.errors import InputError
from glue.tasks import get_task


def accuracy(predictions, labels) -> float:
    predictions, labels = _as_arrays(predictions, labels)
    return float(np.mean(predictions == labels))


def f1_score(predictions, labels, positive: int = 1) -> float:
    predictions, labels = _as_arrays(predictions, labels)
    tp = int(np.sum((predictions == positive) & (labels == positive)))
    fp = int(np.sum((predictions == positive) & (labels != positive)))
    fn = int(np.sum((predictions != positive) & (labels == positive)))
    denominator = 2 * tp + fp + fn
    return 2 * tp / denominator if denominator else 0.0


def matthews_corrcoef(predictions, labels) -> float:
    predictions, labels = _as_arrays(predictions, labels)
    classes = np.union1d(predictions, labels)
    predicted = np.searchsorted(classes, predictions)
    true = np.searchsorted(classes, labels)
    confusion = np.zeros((len(classes), len(classes)), dtype=np.float64)   # (true, predicted)
    np.add.at(confusion, (true, predicted), 1)
    s = confusion.sum()
    c = np.trace(confusion)
    t_k = confusion.sum(axis=1)
    p_k = confusion.sum(axis=0)
    numerator = c * s - p_k @ t_k
    denominator = math.sqrt((s * s - p_k @ p_k) * (s * s - t_k @ t_k))
    return float(numerator / denominator) if denominator else 0.0


def pearson(x, y) -> float:
    x, y = _as_arrays(x, y, dtype=np.float64)
    dx, dy = x - x.mean(), y - y.mean()
    denominator = math.sqrt(float(dx @ dx) * float(dy @ dy))
    if denominator == 0.0:
        return 0.0
    return float(np.clip(dx @ dy / denominator, -1.0, 1.0))


def average_ranks(x) -> np.ndarray:
    """1-based ranks of x; tied values all get the mean of the ranks they span."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    # Start of each run of equal values, and the average rank over that run.
    run_starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    run_ends = np.r_[run_starts[1:], len(x)]                   # exclusive
    run_rank = (run_starts + 1 + run_ends) / 2.0              # mean of ranks start+1 .. end
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat(run_rank, run_ends - run_starts)
    return ranks


def spearman(x, y) -> float:
    x, y = _as_arrays(x, y, dtype=np.float64)
    return pearson(average_ranks(x), average_ranks(y))


def compute_metrics(task: str, predictions, labels) -> dict[str, float]:
    """Every metric of the task (see TaskSpec.metrics), the task's main metric among them.

    predictions: class ids (ints) for classification tasks, scores (floats) for STS-B.
    labels: the same, as in Example.label.
    """
    spec = get_task(task)
    if spec.is_regression:
        r, rho = pearson(predictions, labels), spearman(predictions, labels)
        return {"pearson": r, "spearman": rho, "pearson_and_spearman": (r + rho) / 2}
    predictions, labels = _as_arrays(predictions, labels)
    if predictions.dtype.kind == "f":
        if not np.all(predictions == np.round(predictions)):
            raise InputError(f"{spec.name}: predictions must be class ids, got non-integer values")
        predictions = predictions.astype(np.int64)
    results = {"acc": accuracy(predictions, labels)}
    if "f1" in spec.metrics:
        results["f1"] = f1_score(predictions, labels)
        results["acc_and_f1"] = (results["acc"] + results["f1"]) / 2
    if "mcc" in spec.metrics:
        results["mcc"] = matthews_corrcoef(predictions, labels)
    return results


def _as_arrays(a, b, dtype=None) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(_to_list(a), dtype=dtype).reshape(-1)
    b = np.asarray(_to_list(b), dtype=dtype).reshape(-1)
    if len(a) != len(b):
        raise InputError(f"got {len(a)} predictions for {len(b)} labels")
    if len(a) == 0:
        raise InputError("no predictions to score")
    if dtype is not None and not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise InputError("predictions or labels contain NaN or infinity")
    return a, b


def _to_list(values):
    """Accept lists, numpy arrays and (CPU or GPU) torch tensors without importing torch."""
    if hasattr(values, "detach"):
        return values.detach().cpu().numpy()
    return values
