"""evaluate.py summarize: statistics against numpy/scipy on hand-made run folders."""
import json

import numpy as np
import pytest
from scipy import stats

import evaluate
import run_records

FT = [0.70, 0.66, 0.71, 0.64]
LNSR = [0.72, 0.73, 0.69, 0.74, 0.75]


def make_runs(root, task="RTE", metric="acc", **methods):
    for method, values in methods.items():
        for seed, v in enumerate(values, 1):
            d = root / task / method / f"seed{seed}"
            d.mkdir(parents=True)
            (d / "config.json").write_text("{}")
            (d / "results.json").write_text(json.dumps(
                {"task": task, "method": method, "seed": seed, "metric": metric,
                 "dev": {metric: v, "other": 0.0}, "train_seconds": 1.0}))


def test_statistics_equal_numpy_and_scipy(tmp_path):
    make_runs(tmp_path, ft=FT, lnsr=LNSR)
    runs, problems = evaluate.read_runs(tmp_path)
    assert problems == [] and len(runs) == 9
    table = evaluate.summarize(runs)
    row = table["RTE"]["lnsr"]
    values = 100 * np.array(LNSR)
    assert row["n"] == 5
    assert row["mean"] == pytest.approx(values.mean())
    assert row["std"] == pytest.approx(values.std(ddof=1))
    assert row["median"] == pytest.approx(np.median(values))
    assert (row["min"], row["max"]) == pytest.approx((values.min(), values.max()))
    expected_p = stats.ttest_ind(values, 100 * np.array(FT), equal_var=False).pvalue
    assert row["p_vs_ft"] == pytest.approx(expected_p, rel=1e-9)
    assert table["RTE"]["ft"]["p_vs_ft"] is None


def test_markdown_table_is_shaped_like_table_1(tmp_path, capsys):
    make_runs(tmp_path, ft=FT, lnsr=LNSR)
    make_runs(tmp_path, task="CoLA", metric="mcc", ft=[0.5, 0.52], lnsr=[0.55, 0.56])
    assert evaluate.main(["summarize", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0]
    assert header.index("RTE mean") < header.index("CoLA mean")           # the paper's task order
    lnsr_line = next(line for line in out.splitlines() if line.startswith("| lnsr |"))
    assert f"{100 * np.mean(LNSR):.2f}" in lnsr_line and f"{100 * max(LNSR):.2f}" in lnsr_line
    assert evaluate.main(["summarize", str(tmp_path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["CoLA"]["lnsr"]["mean"] == pytest.approx(55.5)


def test_corrupt_or_missing_results_are_reported_and_skipped(tmp_path, capsys):
    make_runs(tmp_path, ft=FT, lnsr=LNSR)
    (tmp_path / "RTE" / "lnsr" / "seed1" / "results.json").write_text("{not json")
    (tmp_path / "RTE" / "lnsr" / "seed2" / "results.json").write_text(json.dumps({"task": "RTE"}))
    (tmp_path / "RTE" / "lnsr" / "seed3" / "results.json").unlink()
    failed = tmp_path / "RTE" / "lnsr" / "seed9"
    failed.mkdir()
    (failed / "config.json").write_text("{}")
    (failed / "failed.json").write_text(json.dumps({"status": "failed", "reason": "loss became nan"}))
    assert evaluate.main(["summarize", str(tmp_path), "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["RTE"]["lnsr"]["n"] == 2
    for text in ("seed1/results.json: unreadable", "seed2/results.json: missing", "seed3: no results.json",
                 "seed9: failed (loss became nan)"):
        assert text in captured.err


def test_empty_folder_is_a_clear_error(tmp_path, capsys):
    assert evaluate.main(["summarize", str(tmp_path)]) == 2
    assert "no readable results.json" in capsys.readouterr().err
    assert evaluate.main(["summarize", str(tmp_path / "missing")]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_runs_with_other_settings_get_their_own_rows_and_duplicates_count_once(tmp_path, capsys):
    make_runs(tmp_path / "a", ft=FT)
    make_runs(tmp_path / "b", lnsr=LNSR)
    make_runs(tmp_path / "c", lnsr=[0.5, 0.6])
    for seed in (1, 2):                       # the "c" runs used another sigma
        path = tmp_path / "c" / "RTE" / "lnsr" / f"seed{seed}" / "results.json"
        r = json.loads(path.read_text())
        r["method_options"] = {"sigma": 0.1, "layer": 1}
        path.write_text(json.dumps(r))
    for seed in range(1, 6):
        path = tmp_path / "b" / "RTE" / "lnsr" / f"seed{seed}" / "results.json"
        r = json.loads(path.read_text())
        r["method_options"] = {"sigma": 0.01, "layer": 1}
        path.write_text(json.dumps(r))
    make_runs(tmp_path / "copy", ft=FT[:2])   # the same ft seeds 1-2 again, elsewhere
    runs, problems = evaluate.read_runs(tmp_path)
    assert sum("not counted twice" in p for p in problems) == 2
    table = evaluate.summarize(runs)["RTE"]
    assert set(table) == {"ft", "lnsr (sigma=0.01)", "lnsr (sigma=0.1)"}
    assert table["ft"]["n"] == 4 and table["lnsr (sigma=0.1)"]["n"] == 2
    assert table["lnsr (sigma=0.01)"]["mean"] == pytest.approx(100 * np.mean(LNSR))


def test_json_has_null_not_nan_for_a_single_run(tmp_path, capsys):
    make_runs(tmp_path, ft=[0.7])
    assert evaluate.main(["summarize", str(tmp_path), "--json"]) == 0
    out = capsys.readouterr().out
    assert "NaN" not in out and json.loads(out)["RTE"]["ft"]["std"] is None


def test_several_folders_are_read_as_one_collection(tmp_path, capsys):
    # Two rounds of a sweep in two output folders, summarized together; a run repeated in the
    # second folder is reported and counted once.
    make_runs(tmp_path / "round2", ft=FT)
    make_runs(tmp_path / "round3", lnsr=LNSR, ft=FT[:1])
    assert evaluate.main(["summarize", str(tmp_path / "round2"), str(tmp_path / "round3"), "--json"]) == 0
    captured = capsys.readouterr()
    table = json.loads(captured.out)["RTE"]
    assert table["ft"]["n"] == 4 and table["lnsr"]["n"] == 5
    assert table["lnsr"]["p_vs_ft"] == pytest.approx(
        stats.ttest_ind(100 * np.array(LNSR), 100 * np.array(FT), equal_var=False).pvalue)
    assert captured.err.count("not counted twice") == 1
    # A missing folder among several is named, and nothing is printed as a table.
    assert evaluate.main(["summarize", str(tmp_path / "round2"), str(tmp_path / "nope")]) == 2
    captured = capsys.readouterr()
    assert "nope: not a folder" in captured.err and captured.out == ""


def test_runs_with_other_training_settings_are_not_mixed(tmp_path, capsys):
    # ft on the full set and ft on 500 examples (a sweep's setting, in config.json), same seeds:
    # two rows, nothing dropped as a duplicate, and lnsr on 500 is compared with ft on 500.
    make_runs(tmp_path / "full", ft=FT)
    make_runs(tmp_path / "small", ft=[0.5, 0.52, 0.49], lnsr=[0.55, 0.56, 0.58])
    for config in (tmp_path / "small").rglob("config.json"):
        config.write_text(json.dumps({"settings": {"max_train_samples": 500, "lr": 2e-5}}))
    for config in (tmp_path / "full").rglob("config.json"):
        config.write_text(json.dumps({"settings": {"max_train_samples": None, "lr": 2e-5}}))
    runs, problems = evaluate.read_runs(tmp_path)
    assert problems == [] and len(runs) == 10
    table = evaluate.summarize(runs)["RTE"]
    assert set(table) == {"ft (max_train_samples=None)", "ft (max_train_samples=500)", "lnsr"}
    assert table["ft (max_train_samples=None)"]["n"] == 4
    assert table["lnsr"]["p_vs_ft"] == pytest.approx(
        stats.ttest_ind([55, 56, 58], [50, 52, 49], equal_var=False).pvalue, rel=1e-9)


def test_a_config_that_is_not_an_object_and_a_train_entry_without_the_metric(tmp_path, capsys):
    run = tmp_path / "RTE" / "ft" / "seed1"
    run.mkdir(parents=True)
    (run / "config.json").write_text("[1, 2]")
    assert evaluate.main([str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "unreadable" in err[0]
    make_runs(tmp_path / "gap", ft=FT)
    path = tmp_path / "gap" / "RTE" / "ft" / "seed1" / "results.json"
    r = json.loads(path.read_text())
    r["train"] = {"other": 0.9}                   # no train value of the main metric
    path.write_text(json.dumps(r))
    runs, _ = evaluate.read_runs(tmp_path / "gap")
    row = evaluate.summarize(runs)["RTE"]["ft"]
    assert row["n"] == 4 and "gap" not in row


def test_per_run_table_lists_every_seed_and_the_range_of_training_times(tmp_path, capsys):
    make_runs(tmp_path, ft=FT, lnsr=LNSR)
    for seed, seconds in [(1, 250.4), (2, 912.6), (3, 300.0)]:
        path = tmp_path / "RTE" / "lnsr" / f"seed{seed}" / "results.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "train_seconds": seconds}))
    assert evaluate.main(["summarize", str(tmp_path), "--per-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    lnsr = next(line for line in lines if line.startswith("| RTE | lnsr | 5 |"))
    assert "| 72.00, 73.00, 69.00, 74.00, 75.00 | 1, 2, 3, 4, 5 |" in lnsr
    assert lnsr.endswith("| 1-913 s |")               # seeds 4 and 5 kept the 1.0 s of make_runs
    ft = next(line for line in lines if line.startswith("| RTE | ft | 4 |"))
    assert ft.endswith("| 1 s |")


def test_paired_columns_equal_ttest_rel_and_a_hand_computed_interval(tmp_path, capsys):
    """Seeds 1-4 of ft and 1-5 of lnsr, plus an lnsr folder with seed 7 alone: the paired
    comparison uses seeds 1-4 and reports seed 5 as unmatched."""
    make_runs(tmp_path, ft=FT, lnsr=LNSR)
    assert evaluate.main(["summarize", str(tmp_path), "--json"]) == 0
    paired = json.loads(capsys.readouterr().out)["RTE"]["lnsr"]["paired_vs_ft"]
    ft, lnsr = 100 * np.array(FT), 100 * np.array(LNSR[:4])
    d = lnsr - ft                                                  # 2, 7, -2, 10
    assert paired["n"] == 4 and paired["unmatched_seeds"] == [5] and paired["wins"] == 3
    assert paired["mean_diff"] == pytest.approx(4.25)
    assert paired["p"] == pytest.approx(stats.ttest_rel(lnsr, ft).pvalue, rel=1e-9)
    # By hand: std(d, ddof=1) = sqrt(((2-4.25)^2 + (7-4.25)^2 + (-2-4.25)^2 + (10-4.25)^2) / 3),
    # t_{0.975, 3} = 3.182446305 (a t table), half width = t * std / sqrt(4).
    std = np.sqrt((2.25 ** 2 + 2.75 ** 2 + 6.25 ** 2 + 5.75 ** 2) / 3)
    half = 3.182446305 * std / 2
    assert paired["ci95"] == pytest.approx([4.25 - half, 4.25 + half], rel=1e-8)
    assert paired["ci95"] == pytest.approx(list(stats.ttest_rel(lnsr, ft).confidence_interval()), rel=1e-8)
    assert paired["r"] == pytest.approx(stats.pearsonr(lnsr, ft).statistic, rel=1e-9)
    assert evaluate.main(["summarize", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("| RTE | lnsr | 4 |"))
    assert f"| 4.25 | [{4.25 - half:.2f}, {4.25 + half:.2f}] |" in line and line.endswith(f"| 3/4 | {paired['r']:.2f} | 5 |")


def test_seeds_keeps_only_those_seeds_and_says_nothing_of_the_others(tmp_path, capsys):
    """--seeds 1-3 on seeds 1-5 (seed 6 of lnsr unfinished) prints what summarizing a folder
    that holds only seeds 1-3 prints, and does not report the unfinished run of another seed."""
    make_runs(tmp_path / "all", ft=FT + [0.60], lnsr=LNSR)
    (tmp_path / "all" / "RTE" / "lnsr" / "seed6").mkdir()
    (tmp_path / "all" / "RTE" / "lnsr" / "seed6" / "config.json").write_text("{}")
    make_runs(tmp_path / "three", ft=FT[:3], lnsr=LNSR[:3])
    assert evaluate.main(["summarize", str(tmp_path / "three"), "--per-run"]) == 0
    expected = capsys.readouterr().out
    assert evaluate.main(["summarize", str(tmp_path / "all"), "--per-run", "--seeds", "1-3"]) == 0
    captured = capsys.readouterr()
    assert captured.out == expected and "| 1, 2, 3 |" in expected
    assert captured.err == ""
    assert evaluate.main(["summarize", str(tmp_path / "all"), "--seeds", "1-6"]) == 0
    assert "seed6: no results.json" in capsys.readouterr().err
    assert evaluate.main(["summarize", str(tmp_path / "all"), "--seeds", "7-9"]) == 2
    assert evaluate.main(["summarize", str(tmp_path / "all"), "--seeds", "3-1"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["error: " + f"{tmp_path / 'all'}: no readable results.json below for seeds 7-9",
                   "error: --seeds: 3-1 counts down; write 1-3"]


def test_paired_comparison_edge_cases():
    one = evaluate.paired_comparison({1: 50.0, 2: 60.0}, {1: 40.0, 3: 45.0})
    assert one["n"] == 1 and one["mean_diff"] == 10.0 and one["ci95"] is None and one["p"] is None
    assert one["unmatched_seeds"] == [2, 3] and one["wins"] == 1
    same = evaluate.paired_comparison({1: 50.0, 2: 60.0}, {1: 50.0, 2: 60.0})
    assert same["mean_diff"] == 0.0 and same["ci95"] == [0.0, 0.0] and same["p"] is None and same["wins"] == 0
    none = evaluate.paired_comparison({1: 50.0}, {2: 40.0})
    assert none["n"] == 0 and none["mean_diff"] is None


def test_losses_table_gives_first_and_last_logged_loss_and_penalty(tmp_path, capsys):
    make_runs(tmp_path, ft=FT[:2], lnsr=LNSR[:2])
    logs = {("lnsr", 1): [(0.70, 0.20), (0.60, 0.05), (0.50, 0.04)], ("lnsr", 2): [(0.68, 0.10), (0.40, 0.02)],
            ("ft", 1): [(0.69, 0.0), (0.30, 0.0)]}                  # ft seed 2 has no log: left out
    for (method, seed), lines in logs.items():
        (tmp_path / "RTE" / method / f"seed{seed}" / "log.jsonl").write_text("".join(
            json.dumps({"step": 20 * (i + 1), "loss": loss, "penalty": penalty}) + "\n"
            for i, (loss, penalty) in enumerate(lines)))
    assert evaluate.main(["summarize", str(tmp_path), "--losses"]) == 0
    rows = {line.split(" | ")[1]: line for line in capsys.readouterr().out.splitlines()
            if line.startswith("| RTE |") and line.count("|") == 10}
    assert rows["lnsr"] == "| RTE | lnsr | 2 | 0.6900 | 0.15 | 0.217 | 0.4500 | 0.03 | 0.0667 |"
    assert rows["ft"] == "| RTE | ft | 1 | 0.6900 | 0 | 0 | 0.3000 | 0 | 0 |"


def test_collapsed_runs_are_labelled_in_every_summarize_table(tmp_path, capsys):
    """A run whose dev predictions are all one class (or STS-B scores that do not vary) is marked
    in the summary, the detail, the paired and the --per-run tables; runs without a recorded
    spread (made before it was recorded) and runs with two classes are not."""
    make_runs(tmp_path, ft=FT[:3], lnsr=LNSR[:3])
    spreads = {("ft", 1): {"class_counts": {"0": 150, "1": 127}},
               ("lnsr", 1): {"class_counts": {"1": 277}},          # collapsed
               ("lnsr", 2): {"class_counts": {"0": 200, "1": 77}}}   # lnsr seed 3: no spread recorded
    for run_dir in (tmp_path / "RTE").glob("*/seed*"):             # for --losses
        (run_dir / "log.jsonl").write_text('{"step": 1, "loss": 0.7, "penalty": 0.01}\n'
                                           '{"step": 2, "loss": 0.5, "penalty": 0.02}\n')
    for (method, seed), spread in spreads.items():
        path = tmp_path / "RTE" / method / f"seed{seed}" / "results.json"
        results = json.loads(path.read_text())
        path.write_text(json.dumps({**results, "dev_predictions": spread}))
    assert run_records.one_answer({"dev_predictions": {"std": 4e-4}}) == "constant dev scores (std 4.0e-04)"
    assert run_records.one_answer({"dev_predictions": {"std": 2e-3}}) is None
    table = evaluate.summarize(evaluate.read_runs(tmp_path)[0])
    assert (table["RTE"]["lnsr"]["collapsed"], table["RTE"]["ft"]["collapsed"]) == (1, 0)
    for extra in ([], ["--per-run"], ["--losses"]):
        assert evaluate.main(["summarize", str(tmp_path), *extra]) == 0
        out = capsys.readouterr().out
        tables = [block for block in out.split("\n\n") if block.startswith("|")]
        for block in tables:
            lnsr_rows = [line for line in block.splitlines() if "| lnsr" in line]
            assert lnsr_rows and all("(1/3 runs collapsed to one answer)" in line for line in lnsr_rows), block
        assert "| ft (" not in out                                    # ft is not marked


# ----------------------------------------------------------------------------- the command line

def parsers():
    import analysis
    return {"": evaluate.run_parser(), "summarize": evaluate.summarize_parser(),
            "boxplot": evaluate.boxplot_parser(), "noise-stability": analysis.noise_stability_parser()}


def test_evaluate_alone_shows_every_subcommand_in_its_usage(capsys):
    with pytest.raises(SystemExit) as stop:
        evaluate.main([])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    usage, error = err.split("\nevaluate.py: error: ")
    assert usage.startswith("usage: evaluate.py [-h] RUN_DIR")
    for sub in evaluate.SUBCOMMANDS:
        assert f"evaluate.py {sub} " in usage
        assert sub in error
    # The usage is written by hand: it must name every option the parsers know.
    forms = {}                                       # subcommand ("" for a run folder) -> its usage
    for form in usage.split("evaluate.py ")[1:]:
        first = form.split()[0]
        forms["" if first.startswith("[") else first] = form
    for sub in ("", "summarize", "boxplot"):
        for action in parsers()[sub]._actions:
            for flag in action.option_strings[:1]:
                assert flag in forms[sub] or flag == "-h", (sub, flag)   # SUBCOMMAND --help is a line


def test_every_option_of_every_subcommand_has_help_and_splits_are_listed():
    for sub, parser in parsers().items():
        for action in parser._actions:
            assert action.help, (sub, action.option_strings or action.dest)
    assert parsers()[""]._option_string_actions["--split"].choices == ["dev", "test"]
    split = parsers()["noise-stability"]._option_string_actions["--split"]
    assert {"train", "dev", "test", "dev_matched", "dev_mismatched"} <= set(split.choices)
    assert all(name in split.help for name in split.choices)
