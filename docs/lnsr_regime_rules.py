"""The decision rules of docs/LNSR_REGIME.md, applied to committed runs.

    python docs/lnsr_regime_rules.py stage1 results/regime/stage1/adam results/regime/stage1/adamw

Stage 1 (the ft recipe, held-out only). For each cell (optimizer, lr, epochs) and task, the
held-out mean over the seeds; a cell's score is the average over the tasks of (its mean minus the
best mean on that task among the cells that can be ranked). A cell in which any run collapsed to
one answer on the held-out set is out. The chosen recipe is the best-scoring cell; cells within 1.0 point of it tie, and
among ties the one with fewer epochs wins, then the paper's optimizer (adam), then the smaller lr.
A cell is ranked once it has every task and every seed (as many as the most complete cell).
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import evaluate  # noqa: E402

TIE = 1.0                      # points: cells within this much of the best tie


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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("stage", choices=["stage1"])
    p.add_argument("dirs", nargs="+", help="folders of runs (searched recursively)")
    args = p.parse_args(argv)
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
