"""docs/lnsr_regime_rules.py: the rules of docs/LNSR_REGIME.md's stages 1 and 2 on hand-made
tables and run folders, the report's stage-1 table against the committed runs, and the protocol's
runs themselves (held-out scores alone, made from the committed protocol)."""
import importlib.util
from pathlib import Path

import pytest

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


FT = {("RTE", 1): 60.0, ("RTE", 2): 58.0, ("CoLA", 1): 30.0, ("CoLA", 2): 32.0}


def runs_at(*diffs, collapsed=()):
    """LNSR runs at the ft runs' (task, seed), each its ft score plus a difference."""
    return {key: (FT[key] + d, key in collapsed) for key, d in zip(sorted(FT), diffs)}


def test_stage2_the_largest_mean_paired_difference_wins_and_ties_go_to_the_weaker_strength():
    lnsr = {
        ("shared", 1e-4): runs_at(0.0, 0.0, 0.0, 0.4),          # +0.10, ties with 1e-3: weaker
        ("shared", 1e-3): runs_at(0.5, 0.5, 0.5, 0.5),          # +0.50, the best
        ("shared", 2e-3): runs_at(-2.0, -1.0, 0.0, -1.0),       # -1.00
        ("independent", 0.1): runs_at(-1.0, -1.0, -1.0, -1.0),  # -1.00: selected although negative
        ("independent", 0.3): runs_at(-3.0, -2.0, -3.0, -2.0),  # -2.50
    }
    ranking = rules.stage2_ranking(FT, lnsr)
    assert [(s, round(d, 2)) for s, d, _, _ in ranking["shared"]] == [(1e-4, 0.1), (1e-3, 0.5), (2e-3, -1.0)]
    assert [(s, round(d, 2)) for s, d, _, _ in ranking["independent"]] == [(0.1, -1.0), (0.3, -2.5)]
    lnsr[("shared", 1e-4)] = runs_at(0.0, 0.0, 0.0, -0.4)       # -0.10: 0.6 behind, out of the tie
    assert rules.stage2_ranking(FT, lnsr)["shared"][0][0] == 1e-3


def test_stage2_strengths_with_a_collapsed_run_or_a_missing_run_are_not_ranked():
    lnsr = {
        ("shared", 1e-4): runs_at(0.0, 0.0, 0.0, 0.0),
        ("shared", 1e-3): runs_at(5.0, 5.0, 5.0, 5.0, collapsed={("RTE", 2)}),
        ("shared", 2e-3): dict(list(runs_at(9.0, 9.0, 9.0, 9.0).items())[:3]),
    }
    ranking = rules.stage2_ranking(FT, lnsr)["shared"]
    assert ranking[0][:2] == (1e-4, 0.0)
    assert {s: why for s, _, why, _ in ranking[1:]} == {
        1e-3: "a run collapsed", 2e-3: "not complete: a task or a seed missing"}


def test_stage2_reads_the_reading_and_strength_from_the_method_options():
    shared = {"method": "lnsr", "method_options": {"sigma": 0.001, "dropout": "shared", "weights": "1"}}
    independent = {"method": "lnsr", "method_options": {"sigma": 0.0001, "dropout": "independent",
                                                        "weights": "0.03", "reduction": "mean"}}
    assert rules.reading_and_strength(shared) == ("shared", 0.001)
    assert rules.reading_and_strength(independent) == ("independent", 0.03)


def report_lines() -> list:
    return (ROOT / "docs" / "RESULTS.md").read_text(encoding="utf-8").splitlines()


def test_the_stage1_table_in_the_report_is_what_the_rule_prints_from_the_committed_runs(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert rules.main(["stage1", "results/regime/stage1/adam", "results/regime/stage1/adamw"]) == 0
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ada")]
    report = report_lines()
    assert len(printed) == 8 and all(line in report for line in printed)


def test_the_stage3_rows_in_the_report_are_what_the_rule_prints_from_the_committed_runs(capsys, monkeypatch):
    """An arm's stage-3 tables in the report (its signature per task and its verdict) are the
    rows the rule prints now from results/regime/stage3, all of them and nothing else."""
    monkeypatch.chdir(ROOT)
    assert rules.main(["stage3", "results/regime/stage3"]) == 0
    printed = capsys.readouterr().out.splitlines()
    report = report_lines()
    of_arm = lambda lines, arm: [line for line in lines if line.startswith(f"| {arm} |")
                                 or any(line.startswith(f"| {t} | {arm} |") for t in rules.STAGE3_TASKS)]
    covered = 0
    for arm in ("shared sigma 0.0001", "independent lambda 0.01"):
        in_report = of_arm(report, arm)
        if in_report:
            covered += 1
            assert in_report == of_arm(printed, arm) and len(in_report) == 5
    assert covered >= 1, "the report's stage-3 tables were not found"


def test_the_stage2_table_in_the_report_is_what_the_rule_prints_from_the_committed_runs(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert rules.main(["stage2", "results/regime/stage2", "--ft", "results/regime/stage1/adamw/RTE/ft-epochs6-lr5e-05",
                       "results/regime/stage1/adamw/CoLA/ft-epochs6-lr5e-05"]) == 0
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    report = report_lines()
    assert len(printed) == 10 and all(line in report for line in printed)


def test_stage2_command_on_run_folders(tmp_path, capsys, monkeypatch):
    """The command end to end: LNSR runs made from stage 1's chosen ft runs (their files, with
    the method and a score changed), ranked against those ft runs; runs at another recipe refused."""
    import json
    import shutil
    monkeypatch.chdir(ROOT)
    chosen = [f"results/regime/stage1/adamw/{task}/ft-epochs6-lr5e-05" for task in ("RTE", "CoLA")]
    for ft_dir in chosen:
        for seed_dir in sorted(Path(ft_dir).glob("seed*")):
            for sigma, shift in ((1e-4, -0.002), (1e-3, 0.01)):
                run = tmp_path / "stage2" / f"shared-sigma{sigma:g}" / Path(ft_dir).parent.name / "lnsr" / seed_dir.name
                shutil.copytree(seed_dir, run)
                options = {"layer": 1, "sigma": sigma, "relative_sigma": None, "weights": "1",
                           "reduction": "sum", "dropout": "shared"}
                for name in ("config.json", "results.json"):
                    d = json.loads((run / name).read_text())
                    target = d["settings"] if name == "config.json" else d
                    target.update(method="lnsr", method_options=options)
                    if name == "results.json":
                        d["held_out"][d["metric"]] += shift
                    (run / name).write_text(json.dumps(d))
    assert rules.main(["stage2", str(tmp_path / "stage2"), "--ft", *chosen]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| shared")]
    assert rows[0].startswith("| shared | sigma 0.001 |") and rows[0].endswith("| 4 | +1.00 **selected** |")
    assert rows[1].endswith("| 4 | -0.20 |")
    other_recipe = ["results/regime/stage1/adamw/RTE/ft-epochs6-lr0.0001"]
    assert rules.main(["stage2", str(tmp_path / "stage2"), "--ft", *other_recipe]) == 2
    assert "not made at the recipe of the ft runs" in capsys.readouterr().err


def test_protocol_runs_score_held_out_alone_and_were_made_from_the_committed_protocol():
    """Issue 27's third point: no stage-1 or stage-2 run has a dev score, every run was made from
    one commit, and that commit holds docs/LNSR_REGIME.md, committed before the first run folder."""
    import json
    import subprocess
    runs = sorted((ROOT / "results" / "regime").glob("stage[12]/**/results.json"))
    assert len(runs) >= 32
    commits = set()
    for results in runs:
        r = json.loads(results.read_text(encoding="utf-8"))
        assert r["scored"] == "held_out" and "held_out" in r, results
        assert not {"dev", "dev_predictions"} & set(r), results
        config = json.loads((results.parent / "config.json").read_text(encoding="utf-8"))
        commits.add(config["versions"]["git_commit"])
    assert len(commits) == 1
    protocol_commit = commits.pop()
    git = lambda *args: subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    if git("rev-parse", "--is-shallow-repository").stdout.strip() != "false":
        pytest.skip("needs the repository's history (a full clone)")
    assert git("cat-file", "-e", f"{protocol_commit}:docs/LNSR_REGIME.md").returncode == 0
    first_run = git("log", "--diff-filter=A", "--format=%H", "--", "results/regime").stdout.split()[-1]
    assert git("merge-base", "--is-ancestor", protocol_commit, first_run).returncode == 0
    assert protocol_commit != first_run


def cell(dev, train):
    """A stage-3 cell from per-seed dev and train scores (seeds 1..n)."""
    return {"dev": dict(enumerate(dev, 1)), "train": dict(enumerate(train, 1)), "collapsed": 0}


FT_DEV = [60.0, 58.0, 62.0, 59.0, 61.0]
FT_TRAIN = [95.0] * 5


def stage3_cells(arms: dict) -> dict:
    """{task: {arm: cell}} with ft at FT_DEV and FT_TRAIN on every task, and the arms given as
    {arm: {task: (dev differences from ft per seed, train score)}}."""
    cells = {t: {"ft": cell(FT_DEV, FT_TRAIN)} for t in rules.STAGE3_TASKS}
    for arm, per_task in arms.items():
        for task, (diffs, train) in per_task.items():
            cells[task][arm] = cell([f + d for f, d in zip(FT_DEV, diffs)], [train] * 5)
    return cells


UP = [1.0, 1.2, 0.8, 1.1, 0.9]          # a clear gain: interval above 0
SMALL_UP = [0.5, -0.3, 0.4, 0.2, 0.1]   # positive mean, interval spanning 0
DOWN = [-1.0, -1.2, -0.8, -1.1, -0.9]   # interval below 0


def test_stage3_an_arm_meeting_the_three_rules_is_recommended_once_each_reading_is_judged():
    arm = {"RTE": (UP, 90.0), "MRPC": (SMALL_UP, 90.0), "CoLA": (SMALL_UP, 96.0), "STS-B": (SMALL_UP, 94.0)}
    verdicts, recommended, unstarted = rules.stage3_verdicts(stage3_cells({"shared sigma 0.0003": arm}))
    assert verdicts["shared sigma 0.0003"]["decision"]["behaves"] and unstarted == ["independent"]
    assert recommended is None                        # the independent reading could still do better
    worse = {t: (DOWN, 90.0) for t in rules.STAGE3_TASKS}
    verdicts, recommended, unstarted = rules.stage3_verdicts(
        stage3_cells({"shared sigma 0.0003": arm, "independent lambda 0.01": worse}))
    assert not verdicts["independent lambda 0.01"]["decision"]["behaves"] and unstarted == []
    d = verdicts["shared sigma 0.0003"]["decision"]
    assert d["rule1"] == (True, ["RTE", "MRPC", "CoLA", "STS-B"], ["RTE"])
    assert d["rule2"] == (True, [])
    assert d["rule3"] == (True, ["RTE", "MRPC", "STS-B"])
    assert d["behaves"] and recommended == "shared sigma 0.0003"
    # The signature on RTE, against values computed here: train 90 vs 95, dev mean +1, std of
    # the dev scores (ddof 1), gap.
    import statistics
    s = verdicts["shared sigma 0.0003"]["signature"]["RTE"]
    arm_dev = [f + u for f, u in zip(FT_DEV, UP)]
    assert s["a"] == (True, 90.0, 95.0)
    assert s["b"][0] and s["b"][1:] == pytest.approx((statistics.mean(arm_dev), statistics.mean(FT_DEV)))
    assert s["c"][1:] == pytest.approx((statistics.stdev(arm_dev), statistics.stdev(FT_DEV)))
    assert s["c"][0] == (statistics.stdev(arm_dev) < statistics.stdev(FT_DEV))
    assert s["d"] == (True, pytest.approx(90.0 - statistics.mean(arm_dev)), pytest.approx(95.0 - statistics.mean(FT_DEV)))


def test_stage3_each_rule_can_fail_and_the_larger_mean_difference_wins_between_two():
    good = {"RTE": (UP, 90.0), "MRPC": (SMALL_UP, 90.0), "CoLA": (SMALL_UP, 90.0), "STS-B": (SMALL_UP, 90.0)}
    arms = {
        "shared b good": good,
        "independent a better": {**good, "MRPC": (UP, 90.0)},             # sorts first: the tie-break is by value
        "shared c no interval above 0": {t: (SMALL_UP, 90.0) for t in rules.STAGE3_TASKS},
        "shared d positive on 2 tasks": {**good, "CoLA": (DOWN[::-1], 90.0),
                                         "STS-B": ([-0.5, 0.3, -0.4, -0.2, -0.1], 90.0)},
        "shared e one interval below 0": {**good, "STS-B": (DOWN, 90.0)},  # still positive on 3 tasks
        "shared f train lower on 2 tasks": {**good, "CoLA": (SMALL_UP, 96.0), "STS-B": (SMALL_UP, 95.0)},  # 95 ties ft
    }
    verdicts, recommended, _ = rules.stage3_verdicts(stage3_cells(arms))
    behaves = {arm: v["decision"]["behaves"] for arm, v in verdicts.items()}
    assert behaves == {"independent a better": True, "shared b good": True, "shared c no interval above 0": False,
                       "shared d positive on 2 tasks": False, "shared e one interval below 0": False,
                       "shared f train lower on 2 tasks": False}
    assert verdicts["shared c no interval above 0"]["decision"]["rule1"] == (False, list(rules.STAGE3_TASKS), [])
    assert verdicts["shared d positive on 2 tasks"]["decision"]["rule1"] == (False, ["RTE", "MRPC"], ["RTE"])
    assert verdicts["shared e one interval below 0"]["decision"]["rule2"] == (False, ["STS-B"])
    assert verdicts["shared f train lower on 2 tasks"]["decision"]["rule3"] == (False, ["RTE", "MRPC"])
    # A tie is not lower:
    assert verdicts["shared f train lower on 2 tasks"]["signature"]["STS-B"]["a"] == (False, 95.0, 95.0)
    assert recommended == "independent a better"


def test_stage3_judges_no_arm_before_every_pair_is_in():
    arm = {t: (UP, 90.0) for t in rules.STAGE3_TASKS}
    judged = lambda cells: rules.stage3_verdicts(cells)[0]["independent lambda 0.01"]["decision"] is not None
    assert judged(stage3_cells({"independent lambda 0.01": arm}))
    both = {"independent lambda 0.01": arm, "shared sigma 0.0001": arm}
    assert rules.stage3_verdicts(stage3_cells(both))[1] == "independent lambda 0.01"   # a tie: first by name
    cells = stage3_cells(both)
    del cells["CoLA"]["independent lambda 0.01"]["dev"][5]                 # a seed missing
    assert not judged(cells) and rules.stage3_verdicts(cells)[1] is None  # the shared arm waits for it
    cells = stage3_cells({"independent lambda 0.01": arm})
    del cells["CoLA"]["independent lambda 0.01"]["train"][2]               # a train score missing
    assert not judged(cells)
    cells = stage3_cells({"independent lambda 0.01": arm})
    cells["RTE"]["independent lambda 0.01"]["dev"][6] = 70.0                # a seed ft does not have
    cells["RTE"]["independent lambda 0.01"]["train"][6] = 90.0
    assert not judged(cells)
    cells = stage3_cells({"independent lambda 0.01": arm})
    del cells["MRPC"]["ft"]["dev"][4], cells["MRPC"]["ft"]["train"][4]     # ft incomplete
    assert not judged(cells)
    cells = stage3_cells({"independent lambda 0.01": {t: v for t, v in arm.items() if t != "STS-B"}})
    assert not judged(cells)


def test_stage3_reproduces_the_readings_report_from_its_committed_runs(capsys, monkeypatch):
    """The readings comparison (docs/RESULTS.md, "The paper's signature, arm by arm" and the
    decision rule after it) was tabulated before this rule was code: the code must print the same
    parts and verdicts from the same 60 runs."""
    monkeypatch.chdir(ROOT)
    assert rules.main(["stage3", "results/readings"]) == 0
    out = capsys.readouterr().out
    report = (ROOT / "docs" / "RESULTS.md").read_text(encoding="utf-8")
    names = {"independent lambda 1": "two-pass", "shared relative sigma 0.05": "Figure-1 noise"}
    signature_rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| ") and ": " in line and " vs " in line]
    assert len(signature_rows) == 8
    for cols in signature_rows:
        task, arm, parts = cols[0][2:], cols[1], cols[6:10]
        assert f"| {task} | {names[arm]} | {' | '.join(parts)} |" in report
    verdicts = [line for line in out.splitlines() if line.endswith("**no** |")]
    assert len(verdicts) == 2
    for line in verdicts:
        arm = line.split(" | ")[0][2:]
        assert line.replace(arm, names[arm], 1) in report
    assert "Recommendation: none" in out
    assert "independent lambda 1 does not train on CoLA: 5 of its 5 runs collapsed" in out
    assert rules.main(["stage3", "results/readings/ft", "results/readings/two-pass/RTE"]) == 0
    out = capsys.readouterr().out
    assert "not judged: no independent lambda 1 runs on MRPC" in out
    assert "Recommendation: not decided; stage 3 is not complete." in out
    # One reading judged, the other without a finished run: that reading is not yet beaten.
    assert rules.main(["stage3", "results/readings/ft", "results/readings/figure1"]) == 0
    out = capsys.readouterr().out
    assert sum(line.endswith("**no** |") for line in out.splitlines()) == 1
    assert "| independent reading | - | - | - | not judged: no finished runs |" in out
    assert "Recommendation: not decided; stage 3 is not complete." in out


def test_stage3_refuses_two_runs_in_one_place(capsys, monkeypatch):
    """Runs of two recipes (here: two folders of ft runs) would overwrite each other's seeds."""
    monkeypatch.chdir(ROOT)
    assert rules.main(["stage3", "results/readings/ft", "results/glue/RTE/ft"]) == 2
    assert "two runs of ft, RTE, seed" in capsys.readouterr().err


def test_stage3_refuses_held_out_runs(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert rules.main(["stage3", "results/regime/stage1/adamw/RTE/ft-epochs6-lr5e-05"]) == 2
    assert "scored on held-out data" in capsys.readouterr().err
