"""evaluate.py penalty-size: a strength's penalty against the task loss at theta_0, without training.

Checked against train.py itself (its step 1, logged with --log-every 1, is the command's batch 1)
and against the penalty's form: linear in lambda, quadratic in sigma for small noise. The runs
use a tiny random BERT with the embedded model's tokenizer (tiny.tiny_checkpoint) on real RTE rows."""
import json
from pathlib import Path

import pytest

import evaluate
import tiny
import train

GLUE_DIR = tiny.GLUE_DIR
pytestmark = tiny.NEEDS_RTE_AND_EMBEDDED_MODEL


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny.tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model")


def flags(model_dir, *extra):
    return ["--task", "rte", "--model", str(model_dir), "--data-dir", str(GLUE_DIR), "--max-train-samples", "24",
            "--batch-size", "8", "--max-seq-length", "32", "--threads", "1", *extra]


def measured(capsys, model_dir, *extra):
    assert evaluate.main(["penalty-size", *flags(model_dir, *extra), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


METHODS = {
    "ft": ["--method", "ft"],
    "lnsr": ["--method", "lnsr", "--lnsr-sigma", "0.01"],
    "two-pass": ["--method", "lnsr", "--lnsr-dropout", "independent", "--lnsr-reduction", "mean",
                 "--lnsr-weights", "0.1"],
    "smart": ["--method", "smart"],              # its penalty needs gradients: measured with them on
    "r3f": ["--method", "r3f"],
    "lnsr, one dropout stream per run": ["--method", "lnsr", "--lnsr-sigma", "0.01", "--dropout-stream", "run"],
    "two-pass, one dropout stream per run": ["--method", "lnsr", "--lnsr-dropout", "independent",
                                             "--dropout-stream", "run"],
    "lnsr, own data and head seeds, held out": ["--method", "lnsr", "--lnsr-sigma", "0.01", "--data-seed", "7",
                                                "--init-seed", "9", "--holdout", "0.2"],
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_batch_is_train_py_s_step_at_theta_0(model_dir, tmp_path, capsys, method):
    """train.py at lr 1e-30 keeps theta_0 to the last bit (every update is below the weights'
    rounding), so its steps 1-3 are what this command measures on batches 1-3."""
    extra = [*METHODS[method], "--seed", "3"]
    [row] = measured(capsys, model_dir, *extra, "--batches", "3")
    out = tmp_path / "runs"
    assert train.main(flags(model_dir, *extra, "--epochs", "1", "--log-every", "1", "--lr", "1e-30",
                            "--output-dir", str(out))) == 0
    capsys.readouterr()
    run = next(out.glob("RTE/*/seed3"))
    steps = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()[:3]]
    assert [s["step"] for s in steps] == [1, 2, 3]
    assert row["per_batch"]["loss"] == [s["loss"] for s in steps]
    assert row["per_batch"]["penalty"] == [s["penalty"] for s in steps]
    assert (row["penalty"] > 0) == (not method.startswith("ft"))
    assert row["precision"] == json.loads((run / "config.json").read_text())["settings"]["precision"]


def test_each_value_is_measured_in_the_precision_train_py_gives_it(model_dir, capsys, monkeypatch):
    """On a CPU with native bf16, `auto` gives the jvp estimator bf16 and the difference fp32
    (numerics.numeric_recipe): --vary across the two must not put both in one recipe."""
    import penalty_size
    monkeypatch.setattr(penalty_size, "native_bf16", lambda device: True)
    both = measured(capsys, model_dir, "--method", "lnsr", "--vary", "lnsr-estimator", "jvp", "difference",
                    "--batches", "1")
    assert [r["precision"] for r in both] == ["bf16", "fp32"]
    for row, estimator in zip(both, ("jvp", "difference")):
        [alone] = measured(capsys, model_dir, "--method", "lnsr", "--lnsr-estimator", estimator, "--batches", "1")
        assert (alone["precision"], alone["loss"], alone["penalty"]) == (row["precision"], row["loss"], row["penalty"])


def test_the_penalty_is_linear_in_lambda_and_quadratic_in_small_sigma(model_dir, capsys):
    by_lambda = measured(capsys, model_dir, *METHODS["two-pass"], "--vary", "lnsr-weights", "0.05", "0.1", "0.4")
    assert [r["lnsr-weights"] for r in by_lambda] == ["0.05", "0.1", "0.4"]
    assert len({r["loss"] for r in by_lambda}) == 1                       # the same batches and masks
    base = by_lambda[0]["penalty"]
    assert by_lambda[1]["penalty"] == pytest.approx(2 * base, rel=1e-6)
    assert by_lambda[2]["penalty"] == pytest.approx(8 * base, rel=1e-6)
    assert by_lambda[2]["ratio"] == pytest.approx(by_lambda[2]["penalty"] / by_lambda[2]["loss"])
    # Shared masks: f(x + sigma g) - f(x) = sigma J g + O(sigma^2), so R = sigma^2 ||J g||^2 + ...
    by_sigma = measured(capsys, model_dir, "--method", "lnsr", "--vary", "lnsr-sigma", "1e-3", "2e-3", "1e-2")
    small = by_sigma[0]["penalty"]
    assert by_sigma[1]["penalty"] / small == pytest.approx(4, rel=0.02)
    assert by_sigma[2]["penalty"] / small == pytest.approx(100, rel=0.05)


def test_it_measures_the_batches_asked_for_and_no_more_than_there_are(model_dir, capsys):
    [row] = measured(capsys, model_dir, "--method", "lnsr", "--batches", "2")
    assert row["batches"] == 2 and len(row["per_batch"]["penalty"]) == 2
    [row] = measured(capsys, model_dir, "--method", "lnsr", "--batches", "50")
    assert row["batches"] == 3                                            # 24 examples in batches of 8
    assert row["loss"] == pytest.approx(sum(row["per_batch"]["loss"]) / 3)
    assert evaluate.main(["penalty-size", *flags(model_dir, "--method", "lnsr", "--vary", "lnsr-sigma",
                                                  "1e-4", "1e-3")]) == 0
    printed = capsys.readouterr()
    # Progress on stderr, a line at each value's last batch with the time left for all of them.
    done = [line for line in printed.err.splitlines() if ": batch 3/3 |" in line]
    assert len(done) == 2 and done[0].startswith("measuring lnsr at --lnsr-sigma 1e-4 (1 of 2)")
    assert done[1].endswith("all done in about 0:00")
    table = printed.out.splitlines()
    assert table[0].startswith("| method | lnsr-sigma | precision | batches |") and len(table) == 4
    assert table[2].startswith("| lnsr | 1e-4 | fp32 | 3 |") and table[3].startswith("| lnsr | 1e-3 | fp32 | 3 |")


@pytest.mark.parametrize("extra, message", [
    (["--vary", "lr", "1e-4"], "give a method's flag"),
    (["--vary", "lnsr-no-such", "1"], "give a method's flag"),
    (["--vary", "lnsr-sigma"], "give one or more values"),
    (["--vary", "lnsr-sigma", "1e-4", "nan"], "--lnsr-sigma must be a finite number"),
    (["--vary", "lnsr-sigma", "1e-4", "x"], "argument --lnsr-sigma: invalid float value: 'x'"),
    (["--seeds", "1-3"], "one method at one seed"),
    (["--batches", "0"], "--batches must be >= 1"),
    (["--epochs", "-1"], "--epochs must be > 0"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--vary"], "--vary: expected at least one argument"),
    (["--batches", "x"], "--batches: invalid int value: 'x'"),
    (["--vary", "lnsr-sigma", "1e-4", "--vary", "lnsr-layer", "2"], "give --vary once"),
    (["--data-parallel"], "in one process"),
    (["--task", "ax"], "AX"),
    (["--task", "nosuch"], "nosuch"),
])
def test_bad_input_is_one_line_and_writes_nothing(model_dir, tmp_path, monkeypatch, capsys, extra, message):
    monkeypatch.chdir(tmp_path)
    assert evaluate.main(["penalty-size", *flags(model_dir, "--method", "lnsr", *extra)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_several_methods_or_another_method_s_flag_are_one_line_too(model_dir, capsys):
    assert evaluate.main(["penalty-size", *flags(model_dir, "--methods", "ft,lnsr")]) == 2
    assert "one method at one seed" in capsys.readouterr().err
    assert evaluate.main(["penalty-size", *flags(model_dir, "--method", "ft", "--vary", "lnsr-sigma", "1e-4")]) == 2
    assert capsys.readouterr().err == ("error: --vary lnsr-sigma is a flag of lnsr, but the method measured is ft "
                                       "(--method lnsr?)\n")


def test_a_measurement_writes_no_file(model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    measured(capsys, model_dir, "--method", "lnsr", "--batches", "1", "--output-dir", "runs")
    assert list(tmp_path.iterdir()) == []


def test_every_penalty_size_command_in_the_docs_is_valid(monkeypatch):
    """The commands USAGE.md, RESULTS.md and README.md show (loops and variables expanded) pass
    every check the command makes before loading a model (a BERT-Large one is for a GPU)."""
    import itertools
    import re
    import shlex

    import penalty_size
    from test_docs_commands import commands
    root = Path(__file__).resolve().parents[1]
    usage = (root / "docs" / "USAGE.md").read_text(encoding="utf-8").replace("\\\n", " ")
    found = [shlex.split(line.split("  #")[0])[3:]
             for line in re.findall(r"python evaluate\.py penalty-size [^\n`]*", usage)]
    for report in (root / "docs" / "RESULTS.md", root / "README.md"):
        found += [argv[2:] for argv in commands(report) if argv[:2] == ["evaluate.py", "penalty-size"]]
    assert len(found) >= 7
    monkeypatch.chdir(root)
    for argv in found:
        todo = penalty_size.plan(argv)
        values = list(itertools.takewhile(lambda a: not a.startswith("--"), argv[argv.index("--vary") + 2:]))
        assert [value for value, _ in todo.measured] == values
