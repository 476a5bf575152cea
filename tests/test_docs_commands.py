"""The commands in the reports (docs/RESULTS.md, docs/SIGMA_SWEEP.md, docs/LNSR_READINGS.md) and
in README.md run as written from a clone.

Training takes hours, so train.py commands are checked with --dry-run: every flag is parsed and
validated, and every run folder the command names that is committed under results/ must hold a
run made with exactly these settings (train.py compares them with the run's config.json). The
summaries are run for real, and every Table-1-shaped row in a report must be a line that one of
the report's own summarize commands prints from the committed run folders, so a number in a
report cannot drift from the runs behind it.
"""
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import analysis
import evaluate
import cli
import sweep
import train

ROOT = Path(__file__).resolve().parent.parent
REPORTS = [ROOT / "docs" / "RESULTS.md", ROOT / "docs" / "SIGMA_SWEEP.md", ROOT / "docs" / "LNSR_READINGS.md",
           ROOT / "README.md"]
# Protocols name runs before they exist: while a protocol's sweep runs, list its report and
# section here, so that its commands must parse and every committed run must match them but runs
# still to come are allowed there alone. Running now: none.
PROTOCOLS = ()
TASKS = ("CoLA", "MRPC", "RTE", "STS-B")


def bash_blocks(text):
    return re.findall(r"```bash\n(.*?)```", text, re.S)


def commands(path, with_sections=False):
    """Every `python train.py|evaluate.py ...` line of a report's bash blocks, as argv lists, with
    the variables of enclosing `for x in a b c; do` loops expanded to every value (and, with
    with_sections, the "## " heading each stands under)."""
    found = []
    text = path.read_text(encoding="utf-8")
    for block in bash_blocks(text):
        headings = re.findall(r"^## (.+)$", text[:text.index(block)], re.M)
        section = headings[-1] if headings else ""
        loops = {}
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            loop = re.match(r"for (\w+) in (.+); do$", line)
            assignment = re.match(r"(\w+)=(\S+)$", line)
            if assignment:                            # D=../shared/glue_data
                loops[assignment[1]] = [assignment[2]]
            elif loop:
                loops[loop[1]] = loop[2].split()
            elif line == "done" and loops:
                loops.popitem()
            elif line.startswith(("python train.py", "python evaluate.py")):
                names = [n for n in loops if re.search(rf"\${n}\b", line)]
                for values in itertools.product(*(loops[n] for n in names)):
                    expanded = line
                    for n, v in zip(names, values):
                        expanded = re.sub(rf"\${n}\b", v, expanded)
                    argv = shlex.split(expanded)[1:]
                    found.append((section, argv) if with_sections else argv)
    return found


GUIDES = [ROOT / "docs" / "USAGE.md", ROOT / "docs" / "CLUSTER.md"]


def guide_train_commands(path):
    """The train.py commands of a guide, run by python or torchrun, in fenced bash blocks or in
    indented code, with `for x in a b c; do` loops expanded: the argv after train.py."""
    text = path.read_text(encoding="utf-8")
    # An indented code block: lines of 4 spaces and more (a continued command indents further).
    indented = [textwrap.dedent(block) for block in re.findall(r"((?:^    \S.*\n(?:^     +\S.*\n)*)+)", text, re.M)]
    found = []
    for block in bash_blocks(text) + indented:
        loops = {}
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            loop = re.match(r"for (\w+) in (.+); do$", line)
            if loop:
                loops[loop[1]] = loop[2].split()
            elif re.match(r"(python|torchrun)\b.*\btrain\.py\b", line):
                names = [n for n in loops if re.search(rf"\$\{{?{n}\b", line)]
                for values in itertools.product(*(loops[n] for n in names)):
                    expanded = line
                    for n, v in zip(names, values):
                        expanded = re.sub(rf"\$\{{?{n}\b\}}?", v, expanded)
                    argv = shlex.split(expanded)
                    found.append(argv[argv.index("train.py") + 1:])
    return found


@pytest.mark.parametrize("guide", GUIDES, ids=lambda p: p.name)
def test_the_guides_train_commands_parse_and_dry_run(guide, tmp_path, monkeypatch, capsys):
    """docs/USAGE.md and docs/CLUSTER.md: every train.py command is a valid command. A
    --data-parallel one needs torchrun's ranks, so it is parsed only; the others dry-run (in an
    empty folder, where their output folders do not exist: every run is listed as to run)."""
    found = guide_train_commands(guide)
    assert found, f"{guide.name}: no train.py commands found"
    monkeypatch.chdir(tmp_path)
    for argv in found:
        if "--data-parallel" in argv:
            cli.build_parser(train.TrainConfig()).parse_args(argv)
        else:
            assert train.main(argv + ["--dry-run"]) == 0, (argv, capsys.readouterr().err)
    assert not list(tmp_path.iterdir()), "a dry run created files"


def all_commands():
    return [(path.name, section, argv) for path in REPORTS for section, argv in commands(path, True)]


def test_the_reports_have_commands_to_check():
    scripts = [argv[0] for _, _, argv in all_commands()]
    assert scripts.count("train.py") >= 10 and scripts.count("evaluate.py") >= 5


@pytest.fixture
def at_repository_root(monkeypatch):
    monkeypatch.chdir(ROOT)
    # The committed runs were made on a CPU with native bf16 (docs/RESULTS.md, "Setup"), where
    # --precision auto gives ft, l2sp and mixout bf16: check them as that machine read them.
    monkeypatch.setattr(sweep, "native_bf16", lambda device: True)


@pytest.mark.parametrize("report, section, argv", [c for c in all_commands() if c[2][0] == "train.py"],
                         ids=lambda x: " ".join(x[1:]) if isinstance(x, list) else None)
def test_train_commands_parse_and_match_their_committed_runs(report, section, argv, at_repository_root, capsys):
    assert train.main(argv[1:] + ["--dry-run"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    output_dir = argv[argv.index("--output-dir") + 1] if "--output-dir" in argv else "runs"
    if output_dir.startswith("results/"):
        # A committed sweep holds every run its command names, unless the report lists the
        # command under "Still missing".
        pending = [line for line in out.splitlines() if line.endswith("to run")]
        assert not pending or section == "Still missing" or (report, section) in PROTOCOLS, \
            f"{report}, {section}: runs not committed: {pending[:3]}"


def summarize_outputs(report_path, capsys):
    outputs = []
    for argv in commands(report_path):
        if argv[:2] == ["evaluate.py", "summarize"]:
            assert evaluate.main(argv[1:]) == 0
            outputs.append(capsys.readouterr().out)
    return outputs


@pytest.mark.parametrize("report", REPORTS, ids=lambda p: p.name)
def test_every_summary_row_in_a_report_is_printed_by_its_summarize_commands(report, at_repository_root, capsys):
    printed = {line.strip() for out in summarize_outputs(report, capsys) for line in out.splitlines()}
    rows = [line.strip() for line in report.read_text(encoding="utf-8").splitlines()
            if line.startswith(tuple(f"| {t} |" for t in TASKS))]
    # Rows of the summary (10 cells), its paired and --losses tables (9 cells) and of --per-run
    # (6 cells); hand-made comparison tables (other shapes) are not summarize output.
    checked = [r for r in rows if r.count("|") - 1 in (6, 9, 10)]
    assert checked or report.name != "RESULTS.md", f"{report.name}: no summarize rows found"
    missing = [r for r in checked if r not in printed]
    assert not missing, f"{report.name}: rows that no summarize command prints now:\n" + "\n".join(missing)


def test_figure_commands_run(at_repository_root, tmp_path, capsys):
    """boxplot and noise-stability for real (outputs to a temporary folder, noise-stability on a
    few examples); noise-stability on a fine-tuned run needs the --save-model run made by a
    train.py command earlier in the same report."""
    report_commands = commands(ROOT / "docs" / "RESULTS.md")
    saved_runs = set()
    for argv in report_commands:
        if argv[0] == "train.py" and "--save-model" in argv:
            args = cli.build_parser(train.TrainConfig()).parse_args(argv[1:])
            method = args.method or args.methods
            saved_runs.add(f"{args.output_dir}/{train.glue.get_task(args.task).name}/{method}/seed{args.seed}")
        if argv[:2] == ["evaluate.py", "boxplot"]:
            out = argv.index("--output") + 1
            png = tmp_path / "boxplot.png"
            assert evaluate.main(argv[1:out] + [str(png)] + argv[out + 1:]) == 0
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        if argv[:2] == ["evaluate.py", "noise-stability"]:
            args = analysis.noise_stability_parser().parse_args(argv[2:])
            if args.run:
                assert args.run in saved_runs, f"{args.run}: no train.py --save-model command before it"
                continue
            out = argv.index("--output-dir") + 1
            assert evaluate.main(argv[1:out] + [str(tmp_path / "noise")] + argv[out + 1:]
                                 + ["--max-samples", "4"]) == 0
            assert (tmp_path / "noise" / "noise_stability.png").is_file()


def test_readme_methods_table_scores_are_the_committed_runs(at_repository_root):
    # README's Methods table repeats RESULTS.md's RTE and MRPC means in another shape; it must
    # not drift from the runs either.
    runs, _ = evaluate.read_runs(ROOT / "results" / "glue")
    table = evaluate.summarize(runs)
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| (\w+) \| [\d.]+ \| [\d.]+ \| (.+?) \| (.+?) \| (.+) \| (.+) \|$", readme, re.M)
    assert len(rows) == 7, "README's Methods table not found"
    for method, rte, mrpc, rte_seconds, mrpc_seconds in rows:
        for task, cell, seconds in (("RTE", rte, rte_seconds), ("MRPC", mrpc, mrpc_seconds)):
            row = table[task][method]
            assert cell == f"{evaluate.fmt(row['mean'])} +- {evaluate.fmt(row['std'])} ({row['n']})", (method, task)
            assert seconds == evaluate.seconds_range(row["train_seconds"]), (method, task)
    # The Results section's ft-against-lnsr line per task.
    bullets = re.findall(r"^  - (\S+) .*?([\d.]+) against ([\d.]+) \(p = ([\d.]+)\)", readme, re.M)
    assert sorted(task for task, *_ in bullets) == ["CoLA", "MRPC", "RTE", "STS-B"]
    for task, ft, lnsr, p in bullets:
        assert (ft, lnsr) == (evaluate.fmt(table[task]["ft"]["mean"]), evaluate.fmt(table[task]["lnsr"]["mean"])), task
        assert p == f"{table[task]['lnsr']['p_vs_ft']:.2f}", task


def run_queue(tmp_path, *args, environment=None):
    """docs/regime_stage3_queue.sh with a `python` on PATH that records each train.py command
    (its argv and GLIBC_TUNABLES) instead of training, and runs any other python for real.
    Returns the exit status, stderr and the recorded commands."""
    shim, record = tmp_path / "bin", tmp_path / "train_commands"
    shim.mkdir(exist_ok=True)
    record.write_text("")
    (shim / "python").write_text(
        '#!/bin/sh\n'
        f'if [ "$1" != train.py ]; then exec "{sys.executable}" "$@"; fi\n'
        f'printf "%s\\0" "$GLIBC_TUNABLES" "$@" >> "{record}"\n'
        f'printf "\\n" >> "{record}"\n')
    (shim / "python").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("ARMS", "GLIBC_TUNABLES")}
    env.update({"PATH": f"{shim}:{os.environ['PATH']}", **(environment or {})})
    done = subprocess.run(["bash", str(ROOT / "docs" / "regime_stage3_queue.sh"), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    issued = [line.split("\0") for line in record.read_text().split("\0\n") if line]
    return done.returncode, done.stderr, [(argv[1:], argv[0]) for argv in issued]


def run_of(argv):
    """(arm, task, seed) of a train.py command the queue issued: the arm is its output folder."""
    value = lambda flag: argv[argv.index(flag) + 1]
    return Path(value("--output-dir")).name, value("--task"), value("--seeds")


def queue_order(arms_in_order):
    return [(arm, task, str(seed)) for arms in arms_in_order for seed in range(1, 6)
            for task in ("rte", "mrpc", "cola", "sts-b") for arm in arms]


def test_the_stage3_queue_issues_the_report_s_commands_in_priority_order(tmp_path, at_repository_root, capsys):
    """docs/regime_stage3_queue.sh (how stage 3's runs were made) runs exactly the report's stage-3
    commands, one seed per command, seed by seed with ft and the shared reading first, with
    glibc's caches off; each dry-runs against the committed runs (a committed run must have been
    made with exactly those settings)."""
    status, stderr, issued = run_queue(tmp_path, str(ROOT), "out",
                                       environment={"GLIBC_TUNABLES": "glibc.malloc.check=0"})
    assert status == 0, stderr
    parse = lambda argv: vars(cli.build_parser(train.TrainConfig()).parse_args(argv))
    report = [parse(argv[1:]) for argv in commands(ROOT / "docs" / "RESULTS.md")
              if argv[0] == "train.py" and any(a.startswith("results/regime/stage3/") for a in argv)]
    assert len(report) == 12
    runs = []
    for argv, tunables in issued:
        assert argv[0] == "train.py" and tunables == \
            "glibc.malloc.check=0:glibc.malloc.tcache_count=0:glibc.malloc.mxfast=0"
        output_dir = Path(argv[argv.index("--output-dir") + 1])
        assert output_dir.parent == tmp_path / "out"                     # relative to where it started
        committed = argv[1:]
        committed[committed.index("--output-dir") + 1] = f"results/regime/stage3/{output_dir.name}"
        assert Path(argv[argv.index("--data-dir") + 1]) == (ROOT / ".." / "shared" / "glue_data").resolve()
        committed[committed.index("--data-dir") + 1] = "../shared/glue_data"
        assert {**parse(committed), "seeds": "1-5"} in report, argv
        runs.append(run_of(argv))
        assert train.main(committed + ["--dry-run"]) == 0, capsys.readouterr().err
    assert runs == queue_order([("ft", "shared"), ("independent",)])


def test_the_stage3_queue_passes_over_a_live_worker_s_run_until_the_end_and_skips_finished_ones(tmp_path):
    import workers
    out = tmp_path / "out"
    held, dead, finished = (out / "independent" / "RTE" / "lnsr" / "seed1", out / "ft" / "MRPC" / "ft" / "seed2",
                            out / "shared" / "CoLA" / "lnsr" / "seed3")
    for folder in (held, dead, finished):
        folder.mkdir(parents=True)
    claim = {"pid": os.getpid(), "machine": workers.machine_id(), "worker": "test"}
    (held / "claim.1.json").write_text(json.dumps(claim))                          # this process: alive
    (dead / "claim.1.json").write_text(json.dumps({**claim, "machine": "elsewhere"}))
    os.utime(dead / "claim.1.json", (time.time() - 660, time.time() - 660))          # 11 minutes silent
    (finished / "results.json").write_text("{}")
    status, stderr, issued = run_queue(tmp_path, str(ROOT), str(out))
    assert status == 0, stderr
    runs = [run_of(argv) for argv, _ in issued]
    expected = [r for r in queue_order([("ft", "shared"), ("independent",)])
                if r not in (("independent", "rte", "1"), ("shared", "cola", "3"))]
    assert runs == expected + [("independent", "rte", "1")]


def test_the_stage3_queue_walks_only_the_arms_asked_for_and_refuses_bad_input(tmp_path):
    status, _, issued = run_queue(tmp_path, str(ROOT), "out", environment={"ARMS": "independent"})
    assert status == 0
    assert [run_of(argv) for argv, _ in issued] == queue_order([("independent",)])
    status, stderr, issued = run_queue(tmp_path, str(ROOT), "out", environment={"ARMS": "indep"})
    assert status == 2 and "unknown arm 'indep'" in stderr and not issued
    status, stderr, issued = run_queue(tmp_path, str(ROOT))
    assert status == 2 and stderr.startswith("usage: ") and len(stderr.splitlines()) == 1 and not issued
