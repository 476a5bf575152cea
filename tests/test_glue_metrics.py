"""glue.metrics against independent references: the textbook formulas written with plain
Python counts, scipy.stats, and (where installed) scikit-learn; plus the edge cases where a
formula divides by zero."""

import math

import numpy as np
import pytest
import scipy.stats
import torch

import glue
from bert.errors import InputError
from glue.metrics import accuracy, average_ranks, f1_score, matthews_corrcoef, pearson, spearman


def counts(predictions, labels):
    tp = sum(1 for p, y in zip(predictions, labels) if p == 1 and y == 1)
    tn = sum(1 for p, y in zip(predictions, labels) if p == 0 and y == 0)
    fp = sum(1 for p, y in zip(predictions, labels) if p == 1 and y == 0)
    fn = sum(1 for p, y in zip(predictions, labels) if p == 0 and y == 1)
    return tp, tn, fp, fn


def mcc_formula(predictions, labels):
    tp, tn, fp, fn = counts(predictions, labels)
    denominator = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / denominator


def f1_formula(predictions, labels):
    tp, _, fp, fn = counts(predictions, labels)
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    return 2 * precision * recall / (precision + recall)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("n", [7, 100, 1043])
def test_binary_metrics_match_their_formulas(seed, n):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n).tolist()
    # A predictor that is right ~70% of the time, so every cell of the confusion matrix is used.
    predictions = [y if rng.random() < 0.7 else 1 - y for y in labels]
    # One TP, TN, FP and FN for sure, so that no formula divides by zero even for n = 7.
    labels[:4], predictions[:4] = [1, 0, 0, 1], [1, 0, 1, 0]
    assert accuracy(predictions, labels) == pytest.approx(
        sum(p == y for p, y in zip(predictions, labels)) / n, abs=1e-15)
    assert matthews_corrcoef(predictions, labels) == pytest.approx(mcc_formula(predictions, labels), abs=1e-12)
    assert f1_score(predictions, labels) == pytest.approx(f1_formula(predictions, labels), abs=1e-12)
    # For 0/1 vectors MCC is the phi coefficient: Pearson's r of the two vectors.
    assert matthews_corrcoef(predictions, labels) == pytest.approx(
        scipy.stats.pearsonr(predictions, labels)[0], abs=1e-12)


def test_multiclass_mcc_is_the_correlation_of_one_hot_predictions_and_labels():
    """Gorodkin's R_K written another way (his Eq. 3): with X and Y the one-hot (N, K) matrices
    of predictions and labels, R_K = cov(X, Y) / sqrt(cov(X, X) cov(Y, Y)), where cov(A, B) is
    the sum over classes of the covariance of A's and B's columns. For K = 2 it is the binary MCC."""
    rng = np.random.default_rng(0)

    def one_hot_correlation(predictions, labels, K):
        X, Y = np.eye(K)[predictions], np.eye(K)[labels]                         # (N, K)
        cov = lambda A, B: ((A - A.mean(0)) * (B - B.mean(0))).sum()
        return cov(X, Y) / np.sqrt(cov(X, X) * cov(Y, Y))

    for K in (2, 3, 5):
        for _ in range(10):
            labels = rng.integers(0, K, 200)
            predictions = np.where(rng.random(200) < 0.5, labels, rng.integers(0, K, 200))
            assert matthews_corrcoef(predictions, labels) == pytest.approx(
                one_hot_correlation(predictions, labels, K), abs=1e-12)


def test_multiclass_mcc_matches_scikit_learn():
    sklearn_metrics = pytest.importorskip("sklearn.metrics", reason="scikit-learn is not installed")
    rng = np.random.default_rng(0)
    for _ in range(10):
        labels = rng.integers(0, 3, 200)
        predictions = np.where(rng.random(200) < 0.5, labels, rng.integers(0, 3, 200))
        assert matthews_corrcoef(predictions, labels) == pytest.approx(
            sklearn_metrics.matthews_corrcoef(labels, predictions), abs=1e-12)
        assert f1_score(predictions % 2, labels % 2) == pytest.approx(
            sklearn_metrics.f1_score(labels % 2, predictions % 2), abs=1e-12)


@pytest.mark.parametrize("predictions, labels", [
    ([1, 1, 1, 1], [1, 0, 1, 0]),       # constant prediction
    ([0, 1, 0, 1], [1, 1, 1, 1]),       # all labels one class
    ([0, 0, 0], [0, 0, 0]),             # both constant
    ([1], [1]),                         # a single example
])
def test_mcc_zero_variance_is_zero_not_nan(predictions, labels):
    value = matthews_corrcoef(predictions, labels)
    assert value == 0.0 and not math.isnan(value)
    assert glue.compute_metrics("cola", predictions, labels)["mcc"] == 0.0


def test_mcc_extremes():
    labels = [0, 1, 1, 0, 1]
    assert matthews_corrcoef(labels, labels) == pytest.approx(1.0)
    assert matthews_corrcoef([1 - y for y in labels], labels) == pytest.approx(-1.0)


def test_f1_edge_cases():
    assert f1_score([0, 0, 0], [0, 0, 0]) == 0.0            # no positives anywhere: 0/0 -> 0
    assert f1_score([0, 0, 0], [1, 0, 1]) == 0.0            # positives never predicted
    assert f1_score([1, 1, 1, 1], [1, 0, 1, 0]) == pytest.approx(2 * 2 / (2 * 2 + 2 + 0))
    assert f1_score([1, 0, 1], [1, 0, 1]) == 1.0


@pytest.mark.parametrize("seed", range(4))
def test_correlations_match_scipy(seed):
    rng = np.random.default_rng(seed)
    labels = rng.uniform(0, 5, 300)
    predictions = labels + rng.normal(0, 1.5, 300)
    assert pearson(predictions, labels) == pytest.approx(scipy.stats.pearsonr(predictions, labels)[0], abs=1e-12)
    assert spearman(predictions, labels) == pytest.approx(scipy.stats.spearmanr(predictions, labels)[0], abs=1e-12)


def test_spearman_with_ties_matches_scipy():
    rng = np.random.default_rng(1)
    labels = np.round(rng.uniform(0, 5, 500) * 5) / 5         # STS-B-like scores: many ties
    predictions = np.round(labels + rng.normal(0, 1, 500))    # heavily tied predictions
    assert len(np.unique(predictions)) < 15
    assert spearman(predictions, labels) == pytest.approx(scipy.stats.spearmanr(predictions, labels)[0], abs=1e-12)
    assert np.array_equal(average_ranks([3, 1, 3, 2, 3]), scipy.stats.rankdata([3, 1, 3, 2, 3]))


def test_constant_predictions_give_zero_correlation_where_scipy_gives_nan():
    labels = [0.5, 2.0, 3.5, 4.0]
    with np.errstate(all="ignore"), pytest.warns(Warning):
        assert math.isnan(scipy.stats.pearsonr([2.5] * 4, labels)[0])
    scores = glue.compute_metrics("sts-b", [2.5] * 4, labels)
    assert scores == {"pearson": 0.0, "spearman": 0.0, "pearson_and_spearman": 0.0}


def test_perfect_and_anti_correlation():
    x = [0.0, 1.0, 2.5, 4.0, 5.0]
    assert pearson(x, x) == pytest.approx(1.0)
    assert spearman(x, [v ** 3 for v in x]) == pytest.approx(1.0)       # monotone, not linear
    assert pearson(x, [-v for v in x]) == pytest.approx(-1.0)


def test_compute_metrics_keys_and_main_metric_per_task():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 50).tolist()
    predictions = rng.integers(0, 2, 50).tolist()
    for task in ["CoLA", "SST-2", "MRPC", "QQP", "QNLI", "RTE", "WNLI"]:
        scores = glue.compute_metrics(task, predictions, labels)
        spec = glue.get_task(task)
        assert set(scores) == set(spec.metrics) and spec.main_metric in scores
        assert all(isinstance(v, float) for v in scores.values())
    mrpc = glue.compute_metrics("mrpc", predictions, labels)
    assert mrpc["acc_and_f1"] == pytest.approx((mrpc["acc"] + mrpc["f1"]) / 2)
    assert glue.get_task("mrpc").main_metric == "acc_and_f1"
    assert glue.get_task("cola").main_metric == "mcc"
    assert glue.get_task("rte").main_metric == "acc"
    assert glue.get_task("sts-b").main_metric == "pearson_and_spearman"
    mnli = glue.compute_metrics("mnli", rng.integers(0, 3, 50), rng.integers(0, 3, 50))
    assert set(mnli) == {"acc"}
    sts = glue.compute_metrics("stsb", [1.0, 2.0, 2.5, 4.0], [1.2, 1.8, 3.0, 3.9])
    assert sts["pearson_and_spearman"] == pytest.approx((sts["pearson"] + sts["spearman"]) / 2)
    assert sts["spearman"] == 1.0


def test_compute_metrics_accepts_tensors_and_rejects_bad_input():
    scores = glue.compute_metrics("rte", torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]))
    assert scores["acc"] == pytest.approx(2 / 3)
    with pytest.raises(InputError, match="2 predictions for 3 labels"):
        glue.compute_metrics("rte", [0, 1], [0, 1, 1])
    with pytest.raises(InputError, match="no predictions"):
        glue.compute_metrics("cola", [], [])
    with pytest.raises(InputError, match="class ids"):
        glue.compute_metrics("rte", [0.5, 1.0], [0, 1])
    with pytest.raises(InputError, match="NaN"):
        glue.compute_metrics("sts-b", [float("nan"), 1.0], [0.0, 1.0])
