"""docs/lnsr_regime_rules.py: the stage-1 rule of docs/LNSR_REGIME.md on hand-made tables."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("lnsr_regime_rules", ROOT / "docs" / "lnsr_regime_rules.py")
rules = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rules)


def row(mean, collapsed=0, n=2):
    return {"mean": mean, "train_mean": 90.0, "collapsed": collapsed, "n": n}


def test_the_best_average_shortfall_wins_and_ties_go_to_fewer_epochs_then_adam_then_the_smaller_lr():
    table = {
        ("adamw", 5e-5, 6.0): {"RTE": row(60.0), "CoLA": row(40.0)},      # best: score 0
        ("adamw", 1e-4, 3.0): {"RTE": row(59.5), "CoLA": row(39.4)},      # -0.55: ties, fewer epochs
        ("adam", 5e-5, 3.0): {"RTE": row(59.6), "CoLA": row(39.2)},       # -0.60: ties, adam
        ("adam", 2e-5, 3.0): {"RTE": row(58.0), "CoLA": row(38.0)},       # -2.0: out of the tie
    }
    ranking = rules.stage1_ranking(table)
    assert ranking[0][0] == ("adam", 5e-5, 3.0)
    assert [round(score, 2) for _, score, _ in ranking[1:]] == [0.0, -0.55, -2.0]
    table[("adam", 2e-5, 3.0)] = {"RTE": row(59.9), "CoLA": row(39.3)}   # -0.40: ties, smaller lr
    assert rules.stage1_ranking(table)[0][0] == ("adam", 2e-5, 3.0)


def test_collapsed_and_incomplete_cells_are_not_ranked():
    table = {
        ("adamw", 5e-5, 6.0): {"RTE": row(70.0, collapsed=1), "CoLA": row(40.0)},
        ("adamw", 1e-4, 6.0): {"RTE": row(65.0, n=1), "CoLA": row(45.0, n=1)},
        ("adamw", 2e-5, 3.0): {"RTE": row(80.0)},
        ("adam", 2e-5, 3.0): {"RTE": row(55.0), "CoLA": row(35.0)},
    }
    ranking = rules.stage1_ranking(table)
    assert ranking[0][:2] == (("adam", 2e-5, 3.0), (55.0 - 55.0 + 35.0 - 35.0) / 2)
    assert {cell: why for cell, score, why in ranking[1:]} == {
        ("adamw", 5e-5, 6.0): "a run collapsed",
        ("adamw", 1e-4, 6.0): "not complete: a task or a seed missing",
        ("adamw", 2e-5, 3.0): "not complete: a task or a seed missing"}
