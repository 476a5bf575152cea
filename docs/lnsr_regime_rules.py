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
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import evaluate  # noqa: E402
from run_records import one_answer  # noqa: E402

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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("stage", choices=["stage1", "stage2"])
    p.add_argument("dirs", nargs="+", help="folders of runs (searched recursively)")
    p.add_argument("--ft", nargs="+", default=[], metavar="DIR",
                   help="stage2: folders of the ft runs of stage 1's chosen cell, every task")
    args = p.parse_args(argv)
    if args.stage == "stage2":
        if not args.ft:
            p.error("stage2 needs --ft")
        return stage2(args.dirs, args.ft)
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
