"""evaluate.py boxplot, curves and dose, checked on the data each figure draws, from hand-made run folders."""
import json

import numpy as np
import pytest

import analysis
import evaluate


def make_run(root, task, method, seed, score, curves=(), first=(0.7, 0.0), options=None, scored="held_out"):
    """A run folder as train.py writes it: results.json, config.json and log.jsonl."""
    folder = root / task / method / f"seed{seed}"
    folder.mkdir(parents=True)
    metric = "acc"
    results = {"task": task, "method": method, "seed": seed, "metric": metric, "scored": scored,
               scored: {metric: score}, "method_options": options or {}}
    (folder / "results.json").write_text(json.dumps(results))
    settings = {"model": "minilm-l6", "lr": 1e-4, "holdout": 0.2 if scored == "held_out" else None,
                "method_options": options or {}}
    (folder / "config.json").write_text(json.dumps({"settings": settings}))
    lines = [{"step": 20, "epoch": 0.3, "loss": first[0], "penalty": first[1], "lr": 1e-4}]
    for epoch, (held, train) in enumerate(curves, start=1):
        lines.append({"step": 70 * epoch, "epoch": float(epoch),
                      "curves": {scored: {"metric": held, "loss": 0.6}, "train_sample": {"metric": train, "loss": 0.5}}})
    (folder / "log.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_curves_draw_one_line_per_arm_and_set_through_the_seed_means(tmp_path):
    make_run(tmp_path, "RTE", "ft", 1, 0.60, curves=[(55, 60), (60, 80)])
    make_run(tmp_path, "RTE", "ft", 2, 0.62, curves=[(57, 62), (62, 90)])
    make_run(tmp_path, "RTE", "lnsr", 1, 0.61, curves=[(56, 58), (61, 70)], options={"sigma": 0.001})
    make_run(tmp_path, "RTE", "lnsr", 2, 0.63, curves=[(58, 60), (63, 74)], options={"sigma": 0.001})
    make_run(tmp_path, "CoLA", "ft", 1, 0.40)                     # no curves: not drawn
    runs, problems = evaluate.read_runs(tmp_path)
    assert not problems
    groups = evaluate.curve_groups(runs)
    assert list(groups) == ["RTE"]
    fig = analysis.plot_curves(groups, {"RTE": "acc"}, tmp_path / "curves.png")
    try:
        (ax,) = fig.axes
        drawn = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}
        assert drawn == {"ft, held-out": ([1.0, 2.0], [56.0, 61.0]),
                         "ft, train sample": ([1.0, 2.0], [61.0, 85.0]),
                         "lnsr, held-out": ([1.0, 2.0], [57.0, 62.0]),
                         "lnsr, train sample": ([1.0, 2.0], [59.0, 72.0])}
        styles = {line.get_label(): line.get_linestyle() for line in ax.get_lines()}
        assert styles["ft, held-out"] == "-" and styles["ft, train sample"] == "--"
        # The band spans the seeds: min and max of ft's held-out points at epoch 2 are 60 and 62.
        bands = [c.get_paths()[0].vertices for c in ax.collections]
        assert any(np.isclose(v[:, 1].min(), 55) and np.isclose(v[:, 1].max(), 62) for v in bands)
    finally:
        analysis.close(fig)
    assert evaluate.main(["curves", str(tmp_path), "--output", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").stat().st_size > 0


def test_a_curves_legend_of_long_labels_stands_beside_the_panel_a_short_one_inside(tmp_path):
    points = {"dev": {1: [50.0, 52.0], 2: [55.0, 57.0]}, "train_sample": {1: [60.0, 62.0], 2: [80.0, 84.0]}}
    for labels, outside in ((["ft", "lnsr"], False),
                            (["ft", "lnsr (dropout=independent, reduction=mean, weights=0.01)"], True)):
        fig = analysis.plot_curves({"RTE": {label: points for label in labels}}, {"RTE": "acc"}, tmp_path / "c.png")
        try:
            fig.canvas.draw()
            (ax,) = fig.axes
            legend, panel = ax.get_legend().get_window_extent(), ax.get_window_extent()
            assert (legend.x0 >= panel.x1) == outside, labels
        finally:
            analysis.close(fig)


def test_an_arm_keeps_its_color_in_a_panel_where_another_arm_is_missing(tmp_path):
    points = {"dev": {1: [50.0], 2: [55.0]}}
    groups = {"RTE": {"ft": points, "shared": points, "independent": points},
              "CoLA": {"ft": points, "independent": points}}
    fig = analysis.plot_curves(groups, {"RTE": "acc", "CoLA": "mcc"}, tmp_path / "c.png")
    try:
        colors = [{line.get_label(): line.get_color() for line in ax.get_lines()} for ax in fig.axes]
        assert colors[1] == {k: colors[0][k] for k in ("ft, dev", "independent, dev")}
        assert len(set(colors[0].values())) == 3
    finally:
        analysis.close(fig)


def test_boxplot_draws_each_row_s_seeds_under_a_wrapped_label_that_no_neighbour_overlaps(tmp_path):
    shared = {"dropout": "shared", "reduction": "sum", "weights": "1"}
    independent = {"dropout": "independent", "reduction": "mean", "weights": "0.01"}
    for seed, (ft, a, b) in enumerate([(0.60, 0.59, 0.61), (0.62, 0.60, 0.64), (0.58, 0.63, 0.57)], start=1):
        make_run(tmp_path, "RTE", "ft", seed, ft, scored="dev")
        make_run(tmp_path / "shared", "RTE", "lnsr", seed, a, options=shared, scored="dev")
        make_run(tmp_path / "independent", "RTE", "lnsr", seed, b, options=independent, scored="dev")
    runs, problems = evaluate.read_runs(tmp_path)
    assert not problems
    groups = evaluate.score_groups(runs)
    labels = ["ft", "lnsr (dropout=independent, reduction=mean, weights=0.01)",
              "lnsr (dropout=shared, reduction=sum, weights=1)"]
    assert list(groups["RTE"]) == labels
    fig = analysis.plot_boxplot(groups, {"RTE": "acc"}, tmp_path / "box.png")
    try:
        ax = fig.axes[0]
        dots = {line.get_label(): list(line.get_ydata()) for line in ax.get_lines() if line.get_marker() == "o"}
        assert dots == {"ft": pytest.approx([60.0, 62.0, 58.0]), labels[1]: pytest.approx([61.0, 64.0, 57.0]),
                        labels[2]: pytest.approx([59.0, 60.0, 63.0])}
        ticks = [t.get_text() for t in ax.get_xticklabels()]
        assert [" ".join(t.split("\n")) for t in ticks] == labels          # wrapped, nothing lost
        assert max(len(line) for t in ticks for line in t.split("\n")) <= analysis.BOX_LABEL_CHARS
        fig.canvas.draw()
        extents = [t.get_window_extent() for t in ax.get_xticklabels()]
        assert all(left.x1 < right.x0 for left, right in zip(extents, extents[1:]))   # no overlap
    finally:
        analysis.close(fig)
    assert (tmp_path / "box.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dose_draws_each_reading_s_strengths_against_the_penalty_ratio(tmp_path):
    for seed, score in ((1, 0.60), (2, 0.64)):
        make_run(tmp_path, "RTE", "ft", seed, score)
    # Two strengths of the shared reading, two seeds each; the ratio is penalty / loss of line 1.
    for sigma, penalty, scores in ((0.001, 0.007, (0.61, 0.65)), (0.002, 0.28, (0.50, 0.54))):
        for seed, score in zip((1, 2), scores):
            make_run(tmp_path / sigma.__str__(), "RTE", "lnsr", seed, score, first=(0.7, penalty * (1 + seed / 10)),
                     options={"sigma": sigma, "dropout": "shared", "reduction": "sum"})
    runs, _ = evaluate.read_runs(tmp_path)
    groups = evaluate.dose_groups(runs)
    assert set(groups["RTE"]) == {"ft", "lnsr dropout=shared reduction=sum"}
    fig = analysis.plot_dose(groups, {"RTE": "acc"}, tmp_path / "dose.png")
    try:
        (ax,) = fig.axes
        means = next(line for line in ax.get_lines() if line.get_label() == "lnsr dropout=shared reduction=sum")
        ratios = [0.007 * 1.1 / 0.7, 0.007 * 1.2 / 0.7], [0.28 * 1.1 / 0.7, 0.28 * 1.2 / 0.7]
        assert np.allclose(means.get_xdata(), [np.mean(ratios[0]), np.mean(ratios[1])])
        assert np.allclose(means.get_ydata(), [63.0, 52.0])
        ft_line = next(line for line in ax.get_lines() if line.get_label().startswith("ft mean"))
        assert np.allclose(ft_line.get_ydata(), 62.0)
        assert ax.get_xscale() == "log"
    finally:
        analysis.close(fig)
    assert evaluate.main(["dose", str(tmp_path), "--output", str(tmp_path / "d.png")]) == 0


def test_dose_refuses_held_out_and_dev_runs_in_one_figure(tmp_path, capsys):
    make_run(tmp_path / "held", "RTE", "ft", 1, 0.60, first=(0.7, 0.0))
    make_run(tmp_path / "held", "RTE", "lnsr", 1, 0.61, first=(0.7, 0.01), options={"sigma": 0.001})
    make_run(tmp_path / "dev", "RTE", "ft", 1, 0.58, first=(0.7, 0.0), scored="dev")
    assert evaluate.main(["dose", str(tmp_path), "--output", str(tmp_path / "d.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "scored on dev and held_out" in err[0]
    assert not (tmp_path / "d.png").exists()
    assert evaluate.main(["dose", str(tmp_path / "held"), "--output", str(tmp_path / "d.png")]) == 0


def test_curves_without_curve_lines_is_one_line_exit_2(tmp_path, capsys):
    make_run(tmp_path, "RTE", "ft", 1, 0.6)
    assert evaluate.main(["curves", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no run has learning curves" in err[0]
    assert not (tmp_path / "curves.png").exists()
