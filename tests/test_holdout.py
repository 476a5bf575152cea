"""train.py --holdout: hyperparameters chosen on a fixed part of the training set, never on dev.

The runs use a tiny random BERT with the embedded model's tokenizer (tiny.tiny_checkpoint) on
real RTE rows."""
import json
import shutil

import pytest

import evaluate
import glue
from bert.errors import InputError
import tiny
import train

GLUE_DIR = tiny.GLUE_DIR
pytestmark = tiny.NEEDS_RTE_AND_EMBEDDED_MODEL


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny.tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """RTE's training file, and in place of dev.tsv a folder: opening it as a file fails."""
    folder = tmp_path_factory.mktemp("glue")
    (folder / "RTE").mkdir()
    shutil.copy(GLUE_DIR / "RTE" / "train.tsv", folder / "RTE" / "train.tsv")
    (folder / "RTE" / "dev.tsv").mkdir()
    return folder


def command(model_dir, data_dir, out, *extra):
    return ["--task", "rte", "--model", str(model_dir), "--data-dir", str(data_dir), "--holdout", "0.1",
            "--max-train-samples", "16", "--max-eval-samples", "32", "--batch-size", "8", "--epochs", "1",
            "--max-seq-length", "32", "--threads", "1", "--output-dir", str(out), *extra]


def test_holdout_split_is_disjoint_whole_fixed_and_moves_with_the_fraction():
    for total, fraction in ((2490, 0.1), (2490, 0.2), (7, 0.5), (10, 0.05)):
        kept, held_out = glue.holdout_split(total, fraction)
        assert sorted(kept + held_out) == list(range(total))         # together the whole set ...
        assert not set(kept) & set(held_out)                           # ... and disjoint
        assert len(held_out) == max(1, round(fraction * total))
        assert (kept, held_out) == glue.holdout_split(total, fraction)   # no seed of a run enters
    assert glue.holdout_split(2490, 0.1)[1] != glue.holdout_split(2490, 0.2)[1]
    with pytest.raises(InputError, match="must be in"):
        glue.holdout_split(10, 1.0)


def test_a_holdout_run_never_opens_dev_and_says_what_it_scored(model_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "runs"
    assert train.main(command(model_dir, data_dir, out, "--methods", "ft,lnsr", "--seeds", "1-2")) == 0
    assert "held-out" in capsys.readouterr().err
    fingerprints = set()
    for method in ("ft", "lnsr"):
        for seed in (1, 2):
            run = out / "RTE" / method / f"seed{seed}"
            results = json.loads((run / "results.json").read_text())
            assert results["scored"] == "held_out" and "dev" not in results     # no dev score at all
            assert results["n_held_out"] == 32 and results["held_out"]["acc"] >= 0
            assert (run / "held_out_predictions.json").exists() and not (run / "dev_predictions.json").exists()
            settings = json.loads((run / "config.json").read_text())["settings"]
            assert settings["holdout"] == 0.1
            fingerprints.add(settings["holdout_fingerprint"])
    # One split for every seed and method, and it is the split glue.holdout_split names.
    held_out = glue.holdout_split(len(glue.load_examples("rte", "train", data_dir)), 0.1)[1]
    assert fingerprints == {glue.split_fingerprint(held_out)}
    # Another fraction, another split.
    assert train.main(command(model_dir, data_dir, tmp_path / "other", "--method", "ft", "--holdout", "0.2")) == 0
    other = json.loads((tmp_path / "other" / "RTE" / "ft" / "seed1" / "config.json").read_text())
    assert other["settings"]["holdout_fingerprint"] not in fingerprints


def test_summarize_labels_held_out_rows_and_never_mixes_them_with_dev(model_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "runs"
    assert train.main(command(model_dir, data_dir, out / "held", "--method", "ft", "--seeds", "1-2")) == 0
    dev_command = command(model_dir, GLUE_DIR, out / "dev", "--method", "ft", "--seeds", "1-2")
    at = dev_command.index("--holdout")
    del dev_command[at:at + 2]                           # the same runs, scored on dev
    assert train.main(dev_command) == 0
    runs, problems = evaluate.read_runs(out)
    assert len(runs) == 4 and not problems
    table = evaluate.summarize(runs)["RTE"]
    assert len(table) == 2 and all(row["n"] == 2 for row in table.values())   # two rows, never mixed
    held = [row for row in table.values() if row["held_out"]]
    assert len(held) == 1 and sorted(held[0]["run_dirs"]) == sorted(str(p) for p in (out / "held").rglob("seed*"))
    capsys.readouterr()
    assert evaluate.main(["summarize", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("scored on held-out training data, not dev") >= 2


def test_learning_curves_are_logged_each_epoch_and_change_nothing_else(model_dir, data_dir, tmp_path):
    """--curves: one log line per epoch with the metric and task loss of the held-out set and of
    the fixed training sample. The last point equals the run's own held-out result and a loss
    computed here from the saved model; the training itself is the same bits as without it."""
    import torch
    import torch.nn.functional as F
    from bert.model import BertClassifier
    from bert.tokenizer import Tokenizer
    base = command(model_dir, data_dir, tmp_path / "plain", "--method", "lnsr", "--epochs", "2")
    assert train.main(base) == 0
    with_curves = command(model_dir, data_dir, tmp_path / "curves", "--method", "lnsr", "--epochs", "2",
                          "--curves", "--save-model")
    assert train.main(with_curves) == 0
    read = lambda out: [json.loads(line) for line in (out / "RTE" / "lnsr" / "seed1" / "log.jsonl").read_text().splitlines()]
    plain, curved = read(tmp_path / "plain"), read(tmp_path / "curves")
    points = [line for line in curved if "curves" in line]
    assert [p["epoch"] for p in points] == [1.0, 2.0]                       # 16 examples / 8 = 2 steps an epoch
    assert [line for line in curved if "curves" not in line] == [
        {**line, "elapsed": c["elapsed"]} for line, c in zip(plain, [x for x in curved if "curves" not in x])]
    run = tmp_path / "curves" / "RTE" / "lnsr" / "seed1"
    results = json.loads((run / "results.json").read_text())
    last = points[-1]["curves"]
    assert set(last) == {"held_out", "train_sample"}
    assert last["held_out"]["metric"] == pytest.approx(100 * results["held_out"]["acc"])
    # The held-out loss, recomputed from the saved model with one padded batch per example.
    examples = glue.load_examples("rte", "train", data_dir)
    held_out = [examples[i] for i in glue.holdout_split(len(examples), 0.1)[1]]
    held_out = [held_out[i] for i in glue.subset_indices(len(held_out), n=32, seed=train.EVAL_SUBSET_SEED)]
    model = BertClassifier.from_pretrained(run / "model", num_labels=2, verbose=False).eval()
    features = glue.encode(held_out, Tokenizer.from_dir(run / "model"), 32)
    losses = []
    with torch.no_grad():
        for i in range(len(held_out)):
            batch = glue.collate(features, [i])
            logits = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]).logits
            losses.append(F.cross_entropy(logits, batch["labels"]).item())
    assert last["held_out"]["loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    # The training sample: 16 training examples here (fewer than CURVE_TRAIN_SAMPLE), all of them.
    assert 0 <= last["train_sample"]["metric"] <= 100 and last["train_sample"]["loss"] > 0
