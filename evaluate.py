"""Evaluate fine-tuned runs and summarize many of them the way the paper reports results.

    python evaluate.py runs/RTE/lnsr/seed1                 # re-evaluate a run saved with --save-model
    python evaluate.py runs/RTE/lnsr/seed1 --split test    # write GLUE test predictions (RTE.tsv)
    python evaluate.py summarize runs                      # Table 1: mean, std, max over seeds, p-values
    python evaluate.py summarize runs --json               # the same numbers as JSON
    python evaluate.py summarize runs --per-run            # ... and every run's score and time
    python evaluate.py boxplot runs --output docs/figure2.png   # Figure 2 (needs matplotlib)
    python evaluate.py noise-stability --model minilm-l6 --task mrpc   # Figure 1 (see analysis.py)
    python evaluate.py penalty-size --task rte --vary lnsr-sigma 1e-4 1e-3   # where sigma puts the penalty

The summary reads every <task>/<method>/seed<N>/results.json below the folder. Per task and
method it gives n, mean, std (sample standard deviation, ddof = 1), median, min, max of the
task's main dev metric (in percent, as the paper's tables), and the p-value of Welch's t-test
(unequal variances) of that method's scores against plain fine-tuning (`ft`) with the same run
settings (RUN_SETTINGS: runs that differ in data size, lr, precision, ... get rows of their own). Folders whose
results.json is missing, unreadable or incomplete are listed and skipped.
"""
import argparse
import json
import math
import sys
import warnings
from pathlib import Path

import numpy as np

from bert.errors import InputError, existing_folder
from run_records import legacy_method_options, one_answer, parse_seeds, scored_set, seed_folder, with_legacy_settings
from workers import describe_claim, read_claim

SUBCOMMANDS = ("summarize", "boxplot", "curves", "dose", "noise-stability", "penalty-size")
PAPER_TASK_ORDER = ["RTE", "MRPC", "CoLA", "STS-B"]
REQUIRED_KEYS = ("task", "method", "seed", "metric")     # and the scored set's metrics (run_records.scored_set)
# The settings of a run (train.py flags, from its config.json) that change what its score means.
# Runs that differ in any of them never share a row, and a method is compared with the ft runs
# of the same settings. Seeds, the device and the evaluation batch size are left out.
RUN_SETTINGS = ("model", "epochs", "batch_size", "lr", "warmup", "weight_decay", "optimizer",
                "max_grad_norm", "max_seq_length", "max_train_samples", "train_fraction",
                "max_eval_samples", "precision", "allow_tf32", "dropout_stream",
                "data_parallel_ranks", "holdout")


# ----------------------------------------------------------------------------- summaries

def read_runs(*roots: Path, seeds=None):
    """(runs, problems): every readable results.json below the roots, and what was wrong elsewhere.

    Several roots are read as one collection (two rounds of a sweep, say): a run that repeats the
    task, method, options and seed of one already read is reported and not counted twice. With
    seeds (a set), only run folders seed<N> with N in seeds are read.
    """
    for root in roots:
        if not root.is_dir():
            raise InputError(f"{root}: not a folder")
    folders = None if seeds is None else {seed_folder(s) for s in seeds}
    config_files = sorted(c for root in roots for c in root.rglob("config.json")
                          if folders is None or c.parent.name in folders)
    results_files = sorted(r for root in roots for r in root.rglob("results.json")
                           if folders is None or r.parent.name in folders)
    runs, problems, seen = [], [], {}
    for config in config_files:
        run_dir = config.parent
        if run_dir.name == "model":                    # a saved checkpoint's config, not a run
            continue
        results = run_dir / "results.json"
        if (run_dir / "failed.json").exists():
            try:
                reason = json.loads((run_dir / "failed.json").read_text())["reason"]
            except (OSError, ValueError, KeyError):
                reason = "see failed.json"
            problems.append(f"{run_dir}: failed ({reason})")
        elif not results.exists():
            claim = read_claim(run_dir)
            problems.append(f"{run_dir}: no results.json: " + (
                f"{describe_claim(claim)} (training now, or its worker died: another takes it over "
                "after --claim-timeout)" if claim else "unfinished, and nobody holds a claim on it"))
    for results in results_files:
        try:
            r = json.loads(results.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            problems.append(f"{results}: unreadable ({e})")
            continue
        missing = [k for k in REQUIRED_KEYS if not isinstance(r, dict) or k not in r]
        scored = scored_set(r) if isinstance(r, dict) else "dev"
        if not missing and scored not in r:
            missing = [scored]
        if missing:
            problems.append(f"{results}: missing {', '.join(missing)}")
            continue
        value = r[scored].get(r["metric"]) if isinstance(r[scored], dict) else None
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            problems.append(f"{results}: {scored}[{r['metric']!r}] is not a number")
            continue
        r["_value"] = 100.0 * value
        settings = run_settings(results.parent / "config.json", r)
        r["_settings"] = json.dumps(settings, sort_keys=True)
        options = legacy_method_options(r["method"], r.get("method_options"))
        r["_options"] = json.dumps({**options, **settings}, sort_keys=True)
        key = (r["task"], r["method"], r["_options"], r["seed"])
        if key in seen:
            problems.append(f"{results}: the same task, method, options and seed as {seen[key]}; not counted twice")
            continue
        seen[key] = results.parent
        r["_dir"] = str(results.parent)
        runs.append(r)
    return runs, problems


def run_settings(config_file: Path, results: dict) -> dict:
    """The RUN_SETTINGS of a run: from its config.json, else (hand-made folders) results.json."""
    try:
        settings = with_legacy_settings(json.loads(config_file.read_text(encoding="utf-8")).get("settings") or {})
    except (OSError, UnicodeDecodeError, ValueError, AttributeError, TypeError):
        settings = {}
    found = {k: settings.get(k, results.get(k)) for k in RUN_SETTINGS if k in settings or k in results}
    # Held-out scores never share a row with dev scores: the scored set is part of the settings.
    found["scored"] = scored_set(results)
    # Figure 4's rows: 15%, 30%, 50% and the full training set (None in a run's files).
    found["train_fraction"] = found.get("train_fraction") or 1.0
    return found


def welch_p(a, b):
    """Two-sided p-value of Welch's t-test, or None where it is undefined."""
    from scipy import stats
    if len(a) < 2 or len(b) < 2:
        return None
    if np.std(a) == 0 and np.std(b) == 0:
        return None
    with warnings.catch_warnings():      # scipy warns when one group is constant; p is still defined
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def paired_comparison(values: dict, baseline: dict) -> dict:
    """A method against the baseline on the seeds both have: {seed: score} each.

    d_s = method_s - baseline_s on the n matched seeds. mean_diff is the mean of d, the 95%
    interval is mean_diff -/+ t_{0.975, n-1} * std(d, ddof=1) / sqrt(n), p is the paired t-test's
    two-sided p-value (scipy.stats.ttest_rel), wins counts the seeds with d_s > 0 (a tie is not a
    win), and r is the correlation of the two sides' scores across seeds: how much pairing
    removes (the variance of d is var(a) + var(b) - 2 r sd(a) sd(b)). Seeds that only one side
    has are left out and listed.
    """
    from scipy import stats
    seeds = sorted(set(values) & set(baseline))
    d = np.array([values[s] - baseline[s] for s in seeds], dtype=np.float64)
    a, b = (np.array([side[s] for s in seeds], dtype=np.float64) for side in (values, baseline))
    out = {"n": len(seeds), "mean_diff": float(d.mean()) if len(d) else None, "ci95": None, "p": None,
           "wins": int((d > 0).sum()), "r": None,
           "unmatched_seeds": sorted(set(values) ^ set(baseline))}
    if len(d) >= 2:
        half_width = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
        out["ci95"] = [float(d.mean() - half_width), float(d.mean() + half_width)]
        if d.std() > 0:
            out["p"] = float(stats.ttest_rel(a, b).pvalue)
        if len(d) >= 3 and a.std() > 0 and b.std() > 0:
            out["r"] = float(np.corrcoef(a, b)[0, 1])
    return out


def describe(values):
    v = np.asarray(values, dtype=np.float64)
    return {"n": int(v.size), "mean": float(v.mean()),
            "std": float(v.std(ddof=1)) if v.size > 1 else float("nan"),
            "median": float(np.median(v)), "min": float(v.min()), "max": float(v.max())}


def variant_labels(runs):
    """Row labels: the method's name, plus the options that differ where one method was run
    with several settings (a sigma sweep, say), so different settings never share a row."""
    by_method = {}
    for r in runs:
        by_method.setdefault((r["task"], r["method"]), set()).add(r["_options"])
    labels = {}
    for (task, method), variants in by_method.items():
        dicts = {v: json.loads(v) for v in variants}
        keys = sorted({k for d in dicts.values() for k in d
                       if len({json.dumps(x.get(k)) for x in dicts.values()}) > 1})
        for v, d in dicts.items():
            labels[(task, method, v)] = method + (" (" + ", ".join(f"{k}={shown(d.get(k))}" for k in keys) + ")"
                                                  if keys else "")
    return labels


def shown(value):
    """An option's value in a label: 6.0 and 6 (a --methods variant's epochs, the global flag's)
    both as 6."""
    return f"{value:g}" if isinstance(value, float) else value


def summarize(runs, baseline="ft"):
    """{task: {row label: stats}} with p-values against the baseline method of the same task."""
    labels = variant_labels(runs)
    groups = {}
    for r in runs:
        label = labels[(r["task"], r["method"], r["_options"])]
        groups.setdefault(r["task"], {}).setdefault(label, []).append(r)
    table = {}
    for task, by_label in groups.items():
        table[task] = {}
        for label, rs in by_label.items():
            # Compared with the baseline run with the same settings (fraction of the data, ...).
            base_label = next((lab for lab, b in by_label.items()
                               if b[0]["method"] == baseline and b[0]["_settings"] == rs[0]["_settings"]), None)
            base = [r["_value"] for r in by_label[base_label]] if base_label else []
            rs = sorted(rs, key=lambda r: r["seed"])
            values = [r["_value"] for r in rs]
            row = describe(values)
            row["metric"] = rs[0]["metric"]
            row["seeds"] = [r["seed"] for r in rs]
            row["values"] = values                               # in seed order, for --per-run
            row["train_seconds"] = [r.get("train_seconds") for r in rs]
            row["run_dirs"] = [r.get("_dir") for r in rs]
            row["p_vs_" + baseline] = welch_p(values, base) if label != base_label else None
            if base_label and label != base_label:
                row["paired_vs_" + baseline] = paired_comparison(
                    {r["seed"]: r["_value"] for r in rs}, {b["seed"]: b["_value"] for b in by_label[base_label]})
            row["partial"] = any(r.get("partial") for r in rs)
            row["held_out"] = any(scored_set(r) == "held_out" for r in rs)
            row["collapsed"] = sum(one_answer(r) is not None for r in rs)     # runs with one answer
            if all(isinstance(r.get("train"), dict) and r["metric"] in r["train"] for r in rs):
                train = [100.0 * r["train"][r["metric"]] for r in rs]
                row["train_mean"] = float(np.mean(train))
                row["gap"] = row["train_mean"] - row["mean"]
            table[task][label] = row
    return table


def method_order(labels):
    known = ["ft", "l2sp", "mixout", "smart", "r3f", "noise", "lnsr"]
    method = lambda label: label.split(" (")[0]
    return sorted(labels, key=lambda m: (known.index(method(m)) if method(m) in known else len(known), m))


def task_order(tasks):
    return sorted(tasks, key=lambda t: (PAPER_TASK_ORDER.index(t) if t in PAPER_TASK_ORDER else 99, t))


def fmt(x, digits=2):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def fmt_p(p):
    return "-" if p is None else (f"{p:.2g}" if p >= 1e-3 else f"{p:.1e}")


def flags(row) -> str:
    """What makes a row unlike full runs, for every table: a subset of the data, collapsed runs."""
    notes = (["scored on held-out training data, not dev"] if row.get("held_out") else []) + \
        (["partial data"] if row.get("partial") else []) + \
        ([f"{row['collapsed']}/{row['n']} runs collapsed to one answer"] if row.get("collapsed") else [])
    return f" ({'; '.join(notes)})" if notes else ""


def markdown(table, baseline="ft"):
    tasks = task_order(table)
    methods = method_order({m for t in tasks for m in table[t]})
    # One label per method across the tasks: partial anywhere, collapsed runs counted over all.
    merged = lambda rows: {"partial": any(r["partial"] for r in rows), "held_out": any(r["held_out"] for r in rows),
                           "n": sum(r["n"] for r in rows),
                           "collapsed": sum(r.get("collapsed", 0) for r in rows)}
    marked = {m: flags(merged([table[t][m] for t in tasks if m in table[t]])) for m in methods}
    lines = ["| method | " + " | ".join(f"{t} mean | {t} std | {t} max" for t in tasks) + " |",
             "|---|" + "---:|" * (3 * len(tasks))]
    for m in methods:
        cells = []
        for t in tasks:
            row = table[t].get(m)
            cells += [fmt(row["mean"]), fmt(row["std"]), fmt(row["max"])] if row else ["", "", ""]
        lines.append(f"| {m}{marked[m]} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"| task | metric | method | n | mean | std | median | min | max | p vs {baseline} (Welch) |")
    lines.append("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for t in tasks:
        for m in method_order(table[t]):
            row = table[t][m]
            lines.append(f"| {t} | {row['metric']} | {m}{flags(row)} | {row['n']} | {fmt(row['mean'])} | "
                         f"{fmt(row['std'])} | {fmt(row['median'])} | {fmt(row['min'])} | "
                         f"{fmt(row['max'])} | {fmt_p(row['p_vs_' + baseline])} |")
    key = "paired_vs_" + baseline
    if any(key in row for t in tasks for row in table[t].values()):
        lines += ["", f"| task | method | paired seeds | mean diff vs {baseline} | 95% CI | p (paired t) | "
                      f"wins | r with {baseline} | unmatched seeds |", "|---|---|---:|---:|---|---:|---:|---:|---|"]
        for t in tasks:
            for m in method_order(table[t]):
                paired = table[t][m].get(key)
                if paired:
                    ci = "-" if paired["ci95"] is None else f"[{fmt(paired['ci95'][0])}, {fmt(paired['ci95'][1])}]"
                    unmatched = ", ".join(map(str, paired["unmatched_seeds"])) or "-"
                    lines.append(f"| {t} | {m}{flags(table[t][m])} | {paired['n']} | {fmt(paired['mean_diff'])} | {ci} | "
                                 f"{fmt_p(paired['p'])} | {paired['wins']}/{paired['n']} | "
                                 f"{fmt(paired['r'])} | {unmatched} |")
    if any("gap" in row for t in tasks for row in table[t].values()):
        lines += ["", "| task | method | train | eval | gap |", "|---|---|---:|---:|---:|"]
        for t in tasks:
            for m in method_order(table[t]):
                row = table[t][m]
                if "gap" in row:
                    lines.append(f"| {t} | {m}{flags(row)} | {fmt(row['train_mean'])} | {fmt(row['mean'])} | {fmt(row['gap'])} |")
    return "\n".join(lines)


def seconds_range(seconds):
    known = [s for s in seconds if isinstance(s, (int, float))]
    if not known:
        return "-"
    low, high = round(min(known)), round(max(known))
    return f"{low} s" if low == high else f"{low}-{high} s"


def per_run_markdown(table):
    """One line per task and method: the score of every seed and the range of training times,
    so that a report can show each run next to the summary it came from."""
    tasks = task_order(table)
    lines = ["| task | method | n | dev metric per seed | seeds | training time per run |",
             "|---|---|---:|---|---|---:|"]
    for t in tasks:
        for m in method_order(table[t]):
            row = table[t][m]
            scores = ", ".join(fmt(v) for v in row["values"])
            seeds = ", ".join(str(s) for s in row["seeds"])
            lines.append(f"| {t} | {m}{flags(row)} | {row['n']} | {scores} | {seeds} | {seconds_range(row['train_seconds'])} |")
    return "\n".join(lines)


def log_ends(run_dir) -> tuple | None:
    """(loss, penalty) of the first and of the last line of a run's log.jsonl, or None."""
    try:
        lines = [json.loads(line) for line in (Path(run_dir) / "log.jsonl").read_text().splitlines() if line.strip()]
        lines = [line for line in lines if "loss" in line]       # not the learning curves' lines
        first, last = lines[0], lines[-1]
        return (first["loss"], first["penalty"]), (last["loss"], last["penalty"]), (first["step"], last["step"])
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None


def losses_markdown(table):
    """The penalty's size against the task loss at the start and the end of training: the
    first and last log.jsonl lines (each a mean over --log-every steps), averaged over seeds."""
    lines = ["| task | method | runs | first logged step: loss | penalty | penalty / loss | "
             "last logged step: loss | penalty | penalty / loss |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for t in task_order(table):
        for m in method_order(table[t]):
            ends = [e for e in map(log_ends, table[t][m].get("run_dirs") or []) if e]
            if not ends:
                continue
            (l0, p0), (l1, p1) = ([float(np.mean([e[i][j] for e in ends])) for j in (0, 1)] for i in (0, 1))
            ratio = lambda p, l: f"{p / l:.3g}" if l else "-"
            lines.append(f"| {t} | {m}{flags(table[t][m])} | {len(ends)} | {l0:.4f} | {p0:.4g} | {ratio(p0, l0)} | "
                         f"{l1:.4f} | {p1:.4g} | {ratio(p1, l1)} |")
    return "\n".join(lines)


def add_seeds_flag(p):
    p.add_argument("--seeds", default=None,
                   help="only the runs of these seeds (1-4, 1,3,5, 1-3,7): for example the complete seeds "
                        "of a sweep still running (default: every seed found)")


def read_selected_runs(args):
    """The runs below args.dir (problems reported on stderr), kept to args.seeds if given."""
    seeds = set(parse_seeds(args.seeds)) if args.seeds else None
    runs, problems = read_runs(*map(Path, args.dir), seeds=seeds)
    for line in problems:
        print(f"skipped: {line}", file=sys.stderr)
    if not runs:
        raise InputError(f"{', '.join(args.dir)}: no readable results.json below"
                         + (f" for seeds {args.seeds}" if args.seeds else ""))
    return runs


def summarize_parser():
    p = argparse.ArgumentParser(prog="evaluate.py summarize",
                                description="Mean, std, median, min, max and Welch p-values over seeds.")
    p.add_argument("dir", nargs="+", help="one or more folders of runs (train.py --output-dir), read as one collection")
    p.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    p.add_argument("--baseline", default="ft", help="method the p-values compare against")
    p.add_argument("--per-run", action="store_true",
                   help="also list every run: its dev score, seed, and training time (results.json)")
    p.add_argument("--losses", action="store_true",
                   help="also the task loss and the penalty at the first and last logged step (log.jsonl), "
                        "averaged over seeds: how strong a regularizer is next to the loss it is added to")
    add_seeds_flag(p)
    return p


def cmd_summarize(argv):
    args = summarize_parser().parse_args(argv)
    runs = read_selected_runs(args)
    table = summarize(runs, args.baseline)
    if args.json:
        # JSON has no NaN: an undefined statistic (the std of one run) is null.
        clean = {t: {m: {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
                     for m, row in rows.items()} for t, rows in table.items()}
        print(json.dumps(clean, indent=2))
    else:
        print(markdown(table, args.baseline))
        if args.per_run:
            print()
            print(per_run_markdown(table))
        if args.losses:
            print()
            print(losses_markdown(table))
    return 0


# ----------------------------------------------------------------------------- figures

def score_groups(runs):
    """{task: {row label: [main metric in %, by seed]}}, with summarize's row labels and order."""
    labels = variant_labels(runs)
    groups = {}
    for r in sorted(runs, key=lambda r: r["seed"]):
        label = labels[(r["task"], r["method"], r["_options"])]
        groups.setdefault(r["task"], {}).setdefault(label, []).append(r["_value"])
    order = PAPER_TASK_ORDER
    tasks = sorted(groups, key=lambda t: (order.index(t) if t in order else len(order), t))
    return {t: {m: groups[t][m] for m in method_order(groups[t])} for t in tasks}


def boxplot_parser():
    return figure_parser("boxplot", "Figure 2 of Hua et al.: per task, a box plot of the main dev metric over "
                                    "seeds for each method (rows as in summarize).", "boxplot.png")


def cmd_boxplot(argv):
    return plot_command(argv, boxplot_parser, "boxplot.png", draw_boxplot)


def draw_boxplot(runs, args, output):
    import analysis
    metrics = {r["task"]: r["metric"] for r in runs}
    analysis.close(analysis.plot_boxplot(score_groups(runs), metrics, output, args.title))


def curve_points(run_dir) -> list:
    """The learning-curve lines of a run's log.jsonl (train.py --curves): [(epoch, {set: {metric,
    loss}})], in order; empty for a run made without --curves."""
    try:
        lines = (Path(run_dir) / "log.jsonl").read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    points = []
    for line in lines:
        record = json.loads(line) if line.strip() else {}
        if isinstance(record.get("curves"), dict):
            points.append((float(record["epoch"]), record["curves"]))
    return points


def curve_groups(runs) -> dict:
    """{task: {row label: {set: {epoch: [metric by seed]}}}}: the learning curves of every run
    with summarize's row labels; set is the scored set (dev or held_out) or train_sample."""
    labels = variant_labels(runs)
    groups = {}
    for r in sorted(runs, key=lambda r: r["seed"]):
        label = labels[(r["task"], r["method"], r["_options"])]
        for epoch, sets in curve_points(r["_dir"]):
            for name, point in sets.items():
                by_epoch = groups.setdefault(r["task"], {}).setdefault(label, {}).setdefault(name, {})
                by_epoch.setdefault(epoch, []).append(point["metric"])
    return {t: {m: groups[t][m] for m in method_order(groups[t])} for t in task_order(groups)}


def dose_groups(runs, baseline="ft") -> dict:
    """{task: {series: [(penalty/loss at the start, score, seed, strength)]}} for the
    dose-response figure: one series per method and reading (dropout, reduction, layer), one
    point per run, `strength` naming its sigma, relative_sigma, weights (lambda) or another
    method's strength; the baseline's runs are in the series `baseline`.
    The ratio is the first log.jsonl line's penalty over its task loss (both means over the first
    --log-every steps)."""
    strengths = {"sigma", "relative_sigma", "weights", "alpha", "beta", "weight", "mu", "p", "lambda_"}
    groups = {}
    for r in runs:
        ends = log_ends(r["_dir"]) if r.get("_dir") else None
        if ends is None:
            continue
        (loss, penalty), _, _ = ends
        options = json.loads(r["_options"])
        series = baseline if r["method"] == baseline else r["method"] + "".join(
            f" {k}={v}" for k, v in sorted(options.items()) if k in ("dropout", "reduction", "layer"))
        strength = ", ".join(f"{k}={v}" for k, v in sorted(options.items()) if k in strengths)
        groups.setdefault(r["task"], {}).setdefault(series, []).append(
            (penalty / loss if loss else float("nan"), r["_value"], r["seed"], strength))
    return {t: groups[t] for t in task_order(groups)}


def figure_parser(name, description, default_file):
    """The parser of a figure subcommand: run folders, --output, --title, --seeds."""
    p = argparse.ArgumentParser(prog=f"evaluate.py {name}", description=description)
    p.add_argument("dir", nargs="+", help="one or more folders of runs (train.py --output-dir), read as one "
                                          "collection, as summarize reads them")
    p.add_argument("--output", default=None, help=f"PNG file (default: <first dir>/{default_file})")
    p.add_argument("--title", default="", help="a title over the plot")
    add_seeds_flag(p)
    return p


def curves_parser():
    return figure_parser("curves", "Learning curves (the paper's Figure 3) of runs made with train.py --curves: "
                                   "per task, the main metric at the end of every epoch on the scored set "
                                   "(solid) and on a fixed training sample (dashed), mean over seeds with the "
                                   "min-max band, one color per row of summarize.", "curves.png")


def dose_parser():
    p = figure_parser("dose", "The strength as a dial: per task, each run's score against its penalty's size "
                              "relative to the task loss at the start of training (first log.jsonl line), one "
                              "series per method and reading, ft as a horizontal line (its mean).", "dose.png")
    p.add_argument("--baseline", default="ft", help="the method drawn as a horizontal line")
    return p


def plot_command(argv, parser, default_name, draw):
    """Shared by boxplot, curves and dose: parse, read the runs, check matplotlib and --output,
    then draw(runs, args, output)."""
    import analysis
    args = parser().parse_args(argv)
    try:
        analysis.pyplot()
    except ImportError:
        raise InputError("figures need matplotlib, an optional extra: pip install matplotlib") from None
    runs = read_selected_runs(args)
    output = Path(args.output) if args.output else Path(args.dir[0]) / default_name
    if not output.parent.is_dir():
        raise InputError(f"--output {output}: folder {output.parent} does not exist")
    draw(runs, args, output)
    print(f"wrote {output}", file=sys.stderr)
    return 0


def draw_curves(runs, args, output):
    import analysis
    groups = curve_groups(runs)
    if not groups:
        raise InputError(f"{', '.join(args.dir)}: no run has learning curves (train.py --curves)")
    analysis.close(analysis.plot_curves(groups, {r["task"]: r["metric"] for r in runs}, output, args.title))


def draw_dose(runs, args, output):
    import analysis
    sets = sorted({scored_set(r) for r in runs})
    if len(sets) > 1:          # held-out scores choose a strength; dev scores are reported
        raise InputError(f"{', '.join(args.dir)}: the runs are scored on {' and '.join(sets)}; a dose-response "
                         "figure compares runs scored on one set: give folders of one kind (or --seeds)")
    groups = dose_groups(runs, args.baseline)
    if not groups:
        raise InputError(f"{', '.join(args.dir)}: no run has a log.jsonl to read the penalty from")
    analysis.close(analysis.plot_dose(groups, {r["task"]: r["metric"] for r in runs}, output, args.title,
                                      args.baseline))


# ----------------------------------------------------------------------------- one run

def run_parser():
    # The usage lists the subcommands too: `python evaluate.py` alone shows every way to call it.
    p = argparse.ArgumentParser(
        prog="evaluate.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="%(prog)s [-h] RUN_DIR [--split {dev,test}] [--data-dir DATA_DIR] [--batch-size BATCH_SIZE]\n"
              "                   [--device {auto,cpu,cuda}]\n"
              "       %(prog)s summarize DIR [DIR ...] [--json] [--baseline BASELINE] [--per-run] [--losses]\n"
              "                   [--seeds SEEDS]\n"
              "       %(prog)s boxplot DIR [DIR ...] [--output OUTPUT] [--title TITLE] [--seeds SEEDS]\n"
              "       %(prog)s curves DIR [DIR ...] [--output OUTPUT] [--title TITLE] [--seeds SEEDS]\n"
              "       %(prog)s dose DIR [DIR ...] [--output OUTPUT] [--title TITLE] [--baseline BASELINE]\n"
              "                   [--seeds SEEDS]\n"
              "       %(prog)s noise-stability [--model MODEL] [--run RUN] [--task TASK] [options]\n"
              "       %(prog)s penalty-size --task TASK [--vary FLAG VALUE ...] [--batches K] [train.py flags]\n"
              "       %(prog)s SUBCOMMAND --help",
        description="Re-evaluate a run saved with train.py --save-model (below), or one of:\n"
                    "  summarize DIR...     Table 1: mean, std, max over seeds, Welch and paired p-values\n"
                    "  boxplot DIR          Figures 2 and 5: score distributions per task (matplotlib)\n"
                    "  curves DIR           Figure 3: learning curves of runs made with --curves (matplotlib)\n"
                    "  dose DIR             score against the penalty's size at the start (matplotlib)\n"
                    "  noise-stability      Figure 1: how injected noise spreads through the layers\n"
                    "  penalty-size         a strength's penalty / task loss at the start, without training\n"
                    "`python evaluate.py SUBCOMMAND --help` explains each.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder (<output-dir>/<task>/<method>/seed<N>)")
    p.add_argument("--split", choices=["dev", "test"], default="dev",
                   help="dev: print the metrics; test: write GLUE predictions into <run>/predictions")
    p.add_argument("--data-dir", default=None, help="GLUE data folder (default: the run's own setting)")
    p.add_argument("--batch-size", type=int, default=64, help="evaluation batch size (default: 64)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: cuda when available (default: auto)")
    return p


def cmd_run(argv):
    p = run_parser()
    if not argv:
        p.error(f"give a run folder, or a subcommand: {', '.join(SUBCOMMANDS)}")
    args = p.parse_args(argv)
    if args.data_dir is not None:
        existing_folder(args.data_dir, "--data-dir")

    import glue
    from bert.model import BertClassifier
    from bert.tokenizer import Tokenizer
    from numerics import NumericRecipe, apply_recipe, pick_device
    from scoring import predict

    run_dir = Path(args.run_dir)
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise InputError(f"{run_dir}: not a run folder (no config.json)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        settings = config["settings"]
        settings["task"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise InputError(f"{config_path}: unreadable ({type(e).__name__}: {e})") from None
    model_dir = run_dir / "model"
    if not (model_dir / "model.safetensors").is_file():
        raise InputError(f"{run_dir}: no saved model (train with --save-model to keep one)")
    spec = glue.get_task(settings["task"])
    device = pick_device(args.device)
    model = BertClassifier.from_pretrained(model_dir, num_labels=spec.num_labels, verbose=False).to(device)
    tokenizer = Tokenizer.from_dir(model_dir)
    data_dir = args.data_dir or config.get("data_dir")
    splits = spec.dev_splits if args.split == "dev" else spec.test_splits
    glue.ensure_task_data(spec.name, data_dir, splits=splits)
    precision = settings.get("precision", "fp32")
    apply_recipe(NumericRecipe(precision, bool(settings.get("allow_tf32", False))))   # as the run trained
    for s in splits:
        examples = glue.load_examples(spec.name, s, data_dir)
        features = glue.encode(examples, tokenizer, settings.get("max_seq_length", 128))
        preds = predict(model, features, args.batch_size, device, precision)
        if args.split == "dev":
            metrics = glue.compute_metrics(spec.name, preds, features.labels)
            print(json.dumps({"task": spec.name, "split": s, **metrics}, indent=2))
        else:
            path = glue.write_test_predictions(spec.name, preds, examples, run_dir / "predictions", split=s)
            print(f"wrote {path}")
    return 0


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "summarize":
            return cmd_summarize(argv[1:])
        if argv and argv[0] == "boxplot":
            return cmd_boxplot(argv[1:])
        if argv and argv[0] == "curves":
            return plot_command(argv[1:], curves_parser, "curves.png", draw_curves)
        if argv and argv[0] == "dose":
            return plot_command(argv[1:], dose_parser, "dose.png", draw_dose)
        if argv and argv[0] == "noise-stability":
            import analysis
            return analysis.cmd_noise_stability(argv[1:])
        if argv and argv[0] == "penalty-size":
            import penalty_size
            return penalty_size.cmd_penalty_size(argv[1:])
        return cmd_run(argv)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
