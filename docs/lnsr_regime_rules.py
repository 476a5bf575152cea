"""The decision rules of docs/LNSR_REGIME.md, applied to committed runs.

    python docs/lnsr_regime_rules.py stage1 results/regime/stage1/adam results/regime/stage1/adamw
    python docs/lnsr_regime_rules.py stage2 results/regime/stage2 \
        --ft results/regime/stage1/adamw/RTE/ft-epochs6-lr5e-05 results/regime/stage1/adamw/CoLA/ft-epochs6-lr5e-05

Stage 1 (the ft recipe, held-out only). For each cell (optimizer, lr, epochs) and task, the
held-out mean over the seeds; a cell's score is the average over the tasks of (its mean minus the
best mean on that task among the cells that can be ranked). A cell in which any run collapsed to
one answer on the held-out set is out. The chosen recipe is the best-scoring cell; cells within 1.0 point of it tie, and
among ties the one with fewer epochs wins, then the paper's optimizer (adam), then the smaller lr.
A cell is ranked once it has every task and every seed (as many as the most complete cell).

Stage 2 (the strength, held-out only, at the stage-1 recipe). For each reading (shared: masks
replayed; independent: fresh masks) and strength (sigma for shared, lambda for independent), the
paired difference against ft (same task and seed: stage 1's runs of the chosen cell), averaged
over its runs. A strength with any collapsed run is out. Each reading's selected strength has the
largest average difference; strengths within 0.5 points of it tie, and the weaker one wins. It is
selected even if its difference is not positive. A strength is ranked once it has a run for every
(task, seed) that ft has.

Stage 3 (the test, dev scores, full training sets): each arm (a reading at its selected strength)
against ft, per task, with the paper's signature (a) a lower mean train metric, (b) a higher dev
mean, (c) a lower dev std, (d) a narrower train-dev gap, and the decision rule of
docs/LNSR_READINGS.md. An arm behaves like the paper if all three hold over the tasks:
  1. its mean paired difference against ft is positive on at least 3 tasks, and its 95% interval
     lies wholly above 0 on at least 1;
  2. on no task does its 95% interval lie wholly below 0;
  3. its mean train metric is below ft's on at least 3 tasks.
If one arm behaves like the paper it is the recommendation; if both do, the one with the larger
paired difference averaged over the tasks; if neither does, none is. The recommendation is decided
only when every arm is judged and each reading has one: if the budget drops the independent
reading (LNSR_REGIME.md), it stays undecided, and the report judges by the shared reading alone
and says so. An arm is judged once it and ft each have a dev and a train score for every task
and for seeds 1-5; runs of two recipes in one call are refused. An arm that collapses on 3 or
more of a task's seeds is reported as not training there (the collapsed runs stay in every
statistic).

    python docs/lnsr_regime_rules.py stage3 results/regime/stage3
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import evaluate  # noqa: E402
from run_records import one_answer, scored_set  # noqa: E402

STAGE3_TASKS = ("RTE", "MRPC", "CoLA", "STS-B")
STAGE3_SEEDS = 5
STAGE3_READINGS = ("shared", "independent")   # the recommendation waits for an arm of each
TIE = 1.0                      # points: stage-1 cells within this much of the best tie
STRENGTH_TIE = 0.5             # points: stage-2 strengths within this much of the best tie


def cell_of(run_dir) -> tuple:
    """(optimizer, lr, epochs) of a run, from its config.json."""
    s = json.loads((Path(run_dir) / "config.json").read_text(encoding="utf-8"))["settings"]
    return s["optimizer"], float(s["lr"]), float(s["epochs"])


def cell_table(summary: dict) -> dict:
    """{cell: {task: {"mean", "train_mean", "collapsed", "n"}}} from `evaluate.summarize`."""
    table = {}
    for task, rows in summary.items():
        for row in rows.values():
            cells = {cell_of(d) for d in row["run_dirs"]}
            assert len(cells) == 1, f"one row holds runs of several cells: {cells}"
            table.setdefault(cells.pop(), {})[task] = {k: row[k] for k in ("mean", "train_mean", "collapsed", "n")}
    return table


def stage1_ranking(table: dict) -> list:
    """Cells ranked by the stage-1 rule: [(cell, score or None, why not ranked)], the chosen first.
    The best mean on a task is taken over the cells that can be ranked."""
    tasks = sorted({t for per_task in table.values() for t in per_task})
    seeds = max(row["n"] for per_task in table.values() for row in per_task.values())
    eligible, out = {}, []
    for cell, per_task in table.items():
        if set(per_task) != set(tasks) or any(per_task[t]["n"] != seeds for t in tasks):
            out.append((cell, None, "not complete: a task or a seed missing"))
        elif any(per_task[t]["collapsed"] for t in tasks):
            out.append((cell, None, "a run collapsed"))
        else:
            eligible[cell] = per_task
    if not eligible:
        return out
    best = {t: max(per_task[t]["mean"] for per_task in eligible.values()) for t in tasks}
    ranked = [(cell, sum(per_task[t]["mean"] - best[t] for t in tasks) / len(tasks), "")
              for cell, per_task in eligible.items()]
    top = max(score for _, score, _ in ranked)
    ties = [r for r in ranked if r[1] >= top - TIE]
    optimizer, lr, epochs = 0, 1, 2
    chosen = min(ties, key=lambda r: (r[0][epochs], r[0][optimizer] != "adam", r[0][lr]))
    rest = sorted((r for r in ranked if r is not chosen), key=lambda r: -r[1])
    return [chosen] + rest + out


def reading_and_strength(run: dict) -> tuple:
    """("shared", sigma) or ("independent", lambda) of an LNSR run's results.json."""
    o = run.get("method_options") or {}
    if run.get("method") != "lnsr" or o.get("relative_sigma") is not None:
        raise ValueError(f"{run.get('_dir')}: not an LNSR run with an absolute sigma")
    if o.get("dropout", "shared") == "shared":
        return "shared", float(o.get("sigma", 1e-4))
    return "independent", float(o.get("weights", "1"))


def stage2_ranking(ft: dict, lnsr: dict) -> dict:
    """{reading: [(strength, mean paired difference or None, why not ranked, n)], selected first}.

    ft: {(task, seed): score}; lnsr: {(reading, strength): {(task, seed): (score, collapsed)}}.
    """
    by_reading = {}
    for (reading, strength), runs in lnsr.items():
        if set(runs) != set(ft):
            entry = (strength, None, "not complete: a task or a seed missing", len(runs))
        elif any(collapsed for _, collapsed in runs.values()):
            entry = (strength, None, "a run collapsed", len(runs))
        else:
            diff = sum(score - ft[key] for key, (score, _) in runs.items()) / len(runs)
            entry = (strength, diff, "", len(runs))
        by_reading.setdefault(reading, []).append(entry)
    ranking = {}
    for reading, entries in by_reading.items():
        ranked = [e for e in entries if e[1] is not None]
        out = sorted((e for e in entries if e[1] is None), key=lambda e: e[0])
        if not ranked:
            ranking[reading] = out
            continue
        top = max(e[1] for e in ranked)
        chosen = min((e for e in ranked if e[1] >= top - STRENGTH_TIE), key=lambda e: e[0])
        rest = sorted((e for e in ranked if e is not chosen), key=lambda e: -e[1])
        ranking[reading] = [chosen] + rest + out
    return ranking


def task_mean(scores: dict, task: str) -> str:
    """The mean of {(task, seed): score} over one task's seeds, as the table shows it."""
    values = [score for (t, _), score in scores.items() if t == task]
    return f"{sum(values) / len(values):.2f}" if values else "-"


def stage2(dirs, ft_dirs) -> int:
    ft_runs, problems = evaluate.read_runs(*map(Path, ft_dirs))
    runs, more = evaluate.read_runs(*map(Path, dirs))
    for problem in problems + more:
        print(f"skipped: {problem}", file=sys.stderr)
    recipes = {cell_of(r["_dir"]) for r in ft_runs}
    if any(r["method"] != "ft" for r in ft_runs) or len(recipes) != 1:
        print("error: --ft must hold the ft runs of one recipe (stage 1's chosen cell)", file=sys.stderr)
        return 2
    other = [r["_dir"] for r in runs if cell_of(r["_dir"]) not in recipes]
    if other:
        print(f"error: {other[0]}: not made at the recipe of the ft runs {recipes.pop()}", file=sys.stderr)
        return 2
    ft = {(r["task"], r["seed"]): r["_value"] for r in ft_runs}
    lnsr = {}
    for r in runs:
        lnsr.setdefault(reading_and_strength(r), {})[(r["task"], r["seed"])] = (r["_value"], one_answer(r) is not None)
    tasks = sorted({t for t, _ in ft})
    print("| reading | strength | " + " | ".join(f"{t} held-out" for t in tasks) +
          " | runs | mean difference against ft |")
    print("|---|---:|" + "---:|" * len(tasks) + "---:|---:|")
    print("| ft (stage 1) | - | " + " | ".join(task_mean(ft, t) for t in tasks) + f" | {len(ft)} | - |")
    for reading, entries in sorted(stage2_ranking(ft, lnsr).items(), key=lambda kv: kv[0] != "shared"):
        for i, (strength, diff, why, n) in enumerate(entries):
            scores = {key: score for key, (score, _) in lnsr[(reading, strength)].items()}
            cols = [task_mean(scores, t) for t in tasks]
            name = "sigma" if reading == "shared" else "lambda"
            mark = " **selected**" if i == 0 and diff is not None else ""
            shown = f"{diff:+.2f}{mark}" if diff is not None else why
            print(f"| {reading} | {name} {strength:g} | {' | '.join(cols)} | {n} | {shown} |")
    return 0


def arm_of(run: dict) -> str:
    """"ft", or the reading and its strength: "shared sigma 0.0001", "independent lambda 0.03"."""
    if run.get("method") == "ft":
        return "ft"
    options = run.get("method_options") or {}
    if run.get("method") == "lnsr" and options.get("relative_sigma") is not None:     # Figure 1's noise scale
        return f"{options.get('dropout', 'shared')} relative sigma {float(options['relative_sigma']):g}"
    reading, strength = reading_and_strength(run)
    return f"{reading} {'sigma' if reading == 'shared' else 'lambda'} {strength:g}"


def reading_of(arm: str) -> str:
    """"shared" or "independent": the first word of every LNSR arm's name (arm_of)."""
    return arm.split()[0]


def stage3_cells(runs) -> dict:
    """{task: {arm: {"dev": {seed: score}, "train": {seed: score}, "collapsed": count}}}, in
    percent. Raises ValueError where two runs would fill one (task, arm, seed): runs of two
    recipes, or of two settings that one arm name does not tell apart."""
    cells, seen = {}, {}
    for r in runs:
        key = (r["task"], arm_of(r), r["seed"])
        if key in seen:
            raise ValueError(f"{r['_dir']} and {seen[key]}: two runs of {key[1]}, {key[0]}, seed {key[2]}")
        seen[key] = r["_dir"]
        cell = cells.setdefault(r["task"], {}).setdefault(key[1], {"dev": {}, "train": {}, "collapsed": 0})
        cell["dev"][r["seed"]] = r["_value"]
        if isinstance(r.get("train"), dict) and r["metric"] in r["train"]:
            cell["train"][r["seed"]] = 100.0 * r["train"][r["metric"]]
        cell["collapsed"] += one_answer(r) is not None
    return cells


def signature(cell: dict, ft: dict) -> dict:
    """The paper's signature on one task: {part: (holds, arm's value, ft's value)}.

    Each side's means and std are over its own seeds (unpaired, as Tables 1 and 3 show them);
    rules 1 and 2 below use the paired differences instead. The gap is signed, train - dev."""
    mean = lambda d: evaluate.describe(list(d.values()))["mean"]      # the statistics Table 1's rows use
    std = lambda d: evaluate.describe(list(d.values()))["std"]
    value = {"a": lambda c: mean(c["train"]),                       # (a) train metric: lower
             "b": lambda c: mean(c["dev"]),                         # (b) dev mean: higher
             "c": lambda c: std(c["dev"]),                          # (c) dev std: lower
             "d": lambda c: mean(c["train"]) - mean(c["dev"])}      # (d) gap: narrower
    paper_wants_higher = {"a": False, "b": True, "c": False, "d": False}
    out = {}
    for part, of in value.items():
        arm_value, ft_value = of(cell), of(ft)
        holds = arm_value > ft_value if paper_wants_higher[part] else arm_value < ft_value
        out[part] = (holds, arm_value, ft_value)
    return out


def decision(paired: dict, signatures: dict) -> dict:
    """The decision rule over the tasks, from each task's paired comparison (evaluate's
    paired_comparison) and signature:
    {"rule1": (holds, tasks with a positive difference, tasks with the interval above 0),
     "rule2": (holds, tasks with the interval below 0),
     "rule3": (holds, tasks with a lower train metric), "behaves": all three hold}."""
    positive = [t for t, p in paired.items() if p["mean_diff"] > 0]
    above = [t for t, p in paired.items() if p["ci95"] is not None and p["ci95"][0] > 0]
    below = [t for t, p in paired.items() if p["ci95"] is not None and p["ci95"][1] < 0]
    lower_train = [t for t, s in signatures.items() if s["a"][0]]
    rules = {"rule1": (len(positive) >= 3 and len(above) >= 1, positive, above),
             "rule2": (not below, below),
             "rule3": (len(lower_train) >= 3, lower_train)}
    rules["behaves"] = all(rules[k][0] for k in ("rule1", "rule2", "rule3"))
    return rules


def why_not_judged(cells: dict, arm: str) -> str:
    """"" when the arm can be judged: ft and the arm each have a dev and a train score for every
    task and for seeds 1..STAGE3_SEEDS, no more and no fewer; otherwise what is missing."""
    seeds = set(range(1, STAGE3_SEEDS + 1))
    for task in STAGE3_TASKS:
        for side in ("ft", arm):
            c = cells.get(task, {}).get(side)
            if c is None:
                return f"no {side} runs on {task}"
            if set(c["dev"]) != seeds or set(c["train"]) != seeds:
                return (f"{side} on {task}: dev scores of seeds {sorted(c['dev'])} and train scores of "
                        f"seeds {sorted(c['train'])}, where the protocol has seeds {sorted(seeds)}")
    return ""


def stage3_verdicts(cells: dict) -> tuple:
    """({arm: {"paired", "signature", "not_judged", "decision", "mean_diff"}}, recommended arm or
    None, the readings with no arm yet). Every arm is shown; only one with every (task, seed) pair
    is judged. An arm is recommended only when the recommendation is decided: every arm judged and
    an arm of each reading among them. If two arms behave like the paper, the larger paired
    difference averaged over the tasks wins (an exact tie: the first by name)."""
    arms = sorted({a for per_task in cells.values() for a in per_task if a != "ft"})
    verdicts = {}
    for arm in arms:
        tasks = [t for t in STAGE3_TASKS if arm in cells.get(t, {}) and "ft" in cells[t]]
        paired = {t: evaluate.paired_comparison(cells[t][arm]["dev"], cells[t]["ft"]["dev"]) for t in tasks}
        signatures = {t: signature(cells[t][arm], cells[t]["ft"]) for t in tasks
                      if cells[t][arm]["train"] and cells[t]["ft"]["train"]}
        why = why_not_judged(cells, arm)
        verdicts[arm] = {"paired": paired, "signature": signatures, "not_judged": why,
                         "decision": None if why else decision(paired, signatures),
                         "mean_diff": None if why else sum(p["mean_diff"] for p in paired.values()) / len(paired)}
    # A reading without a finished run has no arm yet; it keeps the recommendation open too.
    unstarted = [r for r in STAGE3_READINGS if not any(reading_of(a) == r for a in arms)]
    decided = is_decided(verdicts, unstarted)
    behaving = [a for a, v in verdicts.items() if decided and v["decision"]["behaves"]]
    recommended = max(behaving, key=lambda a: verdicts[a]["mean_diff"]) if behaving else None
    return verdicts, recommended, unstarted


def is_decided(verdicts: dict, unstarted: list) -> bool:
    """Whether the recommendation can be made: every arm judged, and no reading without one."""
    return not unstarted and all(v["decision"] for v in verdicts.values())


def does_not_train(cells: dict) -> list:
    """LNSR_READINGS.md: an arm that collapses on 3 or more of a task's seeds does not train there."""
    return [(task, arm, c["collapsed"], len(c["dev"])) for task in STAGE3_TASKS
            for arm, c in sorted(cells.get(task, {}).items()) if c["collapsed"] >= 3]


def signature_cell(part) -> str:
    holds, arm_value, ft_value = part
    return f"{'yes' if holds else 'no'}: {evaluate.fmt(arm_value)} vs {evaluate.fmt(ft_value)}"


def stage3(dirs) -> int:
    runs, problems = evaluate.read_runs(*map(Path, dirs))
    for problem in problems:
        print(f"skipped: {problem}", file=sys.stderr)
    held_out = [r["_dir"] for r in runs if scored_set(r) == "held_out"]
    if held_out:
        print(f"error: {held_out[0]}: scored on held-out data; stage 3 scores dev", file=sys.stderr)
        return 2
    try:
        cells = stage3_cells(runs)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    verdicts, recommended, unstarted = stage3_verdicts(cells)
    fmt = evaluate.fmt
    print("| task | arm | seeds | mean diff vs ft | 95% CI | wins | (a) lower train | (b) higher dev mean | "
          "(c) lower dev std | (d) narrower gap | collapsed runs |")
    print("|---|---|---:|---:|---|---:|---|---|---|---|---:|")
    for arm, v in verdicts.items():
        for task, p in v["paired"].items():
            ci = "-" if p["ci95"] is None else f"[{fmt(p['ci95'][0])}, {fmt(p['ci95'][1])}]"
            s = v["signature"].get(task)
            parts = " | ".join(signature_cell(s[k]) for k in "abcd") if s else "- | - | - | -"
            print(f"| {task} | {arm} | {p['n']} | {fmt(p['mean_diff'])} | {ci} | {p['wins']}/{p['n']} | {parts} | "
                  f"{cells[task][arm]['collapsed']} |")
    for task, arm, collapsed, n in does_not_train(cells):
        print(f"\n{arm} does not train on {task}: {collapsed} of its {n} runs collapsed to one answer.")
    print()
    print("| arm | 1. diff > 0 on >= 3 tasks, CI above 0 on >= 1 | 2. no CI wholly below 0 | "
          "3. train below ft's on >= 3 tasks | behaves like the paper |")
    print("|---|---|---|---|---|")
    names = lambda tasks: ", ".join(tasks) or "none"
    for arm, v in verdicts.items():
        d = v["decision"]
        if d is None:
            print(f"| {arm} | - | - | - | not judged: {v['not_judged']} |")
            continue
        ok = lambda rule: "yes" if d[rule][0] else "no"
        print(f"| {arm} | {ok('rule1')}: positive on {names(d['rule1'][1])}; above 0 on {names(d['rule1'][2])} | "
              f"{ok('rule2')}: below 0 on {names(d['rule2'][1])} | {ok('rule3')}: below on {names(d['rule3'][1])} | "
              f"**{'yes' if d['behaves'] else 'no'}** |")
    for reading in unstarted:
        print(f"| {reading} reading | - | - | - | not judged: no finished runs |")
    print()
    if not is_decided(verdicts, unstarted):
        print("Recommendation: not decided; stage 3 is not complete.")
    elif recommended:
        print(f"Recommendation: {recommended} (mean paired difference over the tasks "
              f"{verdicts[recommended]['mean_diff']:+.2f}).")
    else:
        print("Recommendation: none; no reading behaves like the paper at its selected strength.")
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("stage", choices=["stage1", "stage2", "stage3"])
    p.add_argument("dirs", nargs="+", help="folders of runs (searched recursively)")
    p.add_argument("--ft", nargs="+", default=[], metavar="DIR",
                   help="stage2: folders of the ft runs of stage 1's chosen cell, every task")
    args = p.parse_args(argv)
    if args.stage == "stage2":
        if not args.ft:
            p.error("stage2 needs --ft")
        return stage2(args.dirs, args.ft)
    if args.stage == "stage3":
        return stage3(args.dirs)
    runs, problems = evaluate.read_runs(*map(Path, args.dirs))
    for problem in problems:
        print(f"skipped: {problem}", file=sys.stderr)
    table = cell_table(evaluate.summarize(runs))
    tasks = sorted({t for per_task in table.values() for t in per_task})
    print("| optimizer | lr | epochs | " + " | ".join(f"{t} held-out | {t} train" for t in tasks) + " | score |")
    print("|---|---:|---:|" + "---:|---:|" * len(tasks) + "---:|")
    for i, (cell, score, why) in enumerate(stage1_ranking(table)):
        per_task = table[cell]
        cols = " | ".join(f"{per_task[t]['mean']:.2f} | {per_task[t]['train_mean']:.2f}" if t in per_task else "- | -"
                          for t in tasks)
        mark = " **chosen**" if i == 0 and score is not None else ""
        shown = f"{score:+.2f}{mark}" if score is not None else why
        print(f"| {cell[0]} | {cell[1]:g} | {cell[2]:g} | {cols} | {shown} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
