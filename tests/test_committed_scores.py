"""Every finished run under results/ that saved its dev predictions reports the GLUE metric of
those predictions: recomputed here from the original dev files with numpy and scipy alone (no
project code), so a reported score cannot come from anything but its run's answers.
"""
import csv
import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

import tiny

ROOT = Path(__file__).resolve().parent.parent
# Finished runs only: a run being written has its predictions before its results.json.
RUNS = sorted(p.parent for p in (ROOT / "results").rglob("results.json")
              if (p.parent / "dev_predictions.json").exists())


def dev_labels(task: str) -> np.ndarray:
    """The gold labels of the original dev file, in file order."""
    with open(tiny.GLUE_DIR / task / "dev.tsv", encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if task == "CoLA":                                            # no header: source, label, mark, sentence
        return np.array([int(r[1]) for r in rows])
    rows = rows[1:]
    if task == "RTE":
        return np.array([{"entailment": 0, "not_entailment": 1}[r[-1]] for r in rows])
    if task == "MRPC":                                            # Quality first
        return np.array([int(r[0]) for r in rows])
    return np.array([float(r[-1]) for r in rows])                # STS-B: the score last


def glue_metric(task: str, predictions, labels) -> float:
    """The task's main metric (GLUE's definitions), as a fraction."""
    p, y = np.asarray(predictions), labels
    if task == "RTE":
        return float(np.mean(p == y))
    if task == "MRPC":                                            # mean of accuracy and F1 of class 1
        true_positives = np.sum((p == 1) & (y == 1))
        return float((np.mean(p == y) + 2 * true_positives / (np.sum(p == 1) + np.sum(y == 1))) / 2)
    if task == "CoLA":                                            # MCC of 0/1 labels is their correlation
        return 0.0 if p.std() == 0 else float(stats.pearsonr(p, y)[0])
    return float((stats.pearsonr(p, y)[0] + stats.spearmanr(p, y)[0]) / 2)     # STS-B


def test_there_are_committed_runs_with_predictions():
    assert len(RUNS) >= 40


@pytest.mark.skipif(not (tiny.GLUE_DIR / "RTE" / "dev.tsv").exists(), reason=f"GLUE data not found at {tiny.GLUE_DIR}")
@pytest.mark.parametrize("run", RUNS, ids=lambda p: str(p.relative_to(ROOT / "results")))
def test_a_committed_dev_score_is_the_metric_of_the_committed_predictions(run):
    results = json.loads((run / "results.json").read_text())
    predictions = json.loads((run / "dev_predictions.json").read_text())
    assert results["scored"] == "dev" and results["max_eval_samples"] is None
    labels = dev_labels(results["task"])
    assert len(predictions) == len(labels) == results["n_dev"]
    assert results["dev"][results["metric"]] == pytest.approx(glue_metric(results["task"], predictions, labels),
                                                              abs=1e-12)
