"""analysis.py: Figure 1's noise attenuation against a hook-based computation, the 5% noise norm,
the files and plots of `evaluate.py noise-stability` and `boxplot`, and summaries across the
few-sample fractions (Figure 4), injection layers (Figure 5) and train/eval gaps (Table 3)."""
import csv
import json
import re
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

import analysis
import evaluate
import glue
from bert.config import BertConfig
from bert.model import BertClassifier, BertModel, init_weights
from bert.tokenizer import Tokenizer

GLUE_DIR = Path(__file__).resolve().parents[2] / "shared" / "glue_data"
TINY = dict(vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def tiny_bert(std=0.3, seed=0):
    """A random 3-layer BERT. Weights larger than BERT's 0.02 make every layer change its input
    a lot, so a measurement that skipped or repeated a layer would show."""
    model = BertModel(BertConfig(**TINY))
    init_weights(model, std=std, generator=torch.Generator().manual_seed(seed))
    return model.eval()


def tiny_features(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = [[2] + torch.randint(5, 100, (n - 2,), generator=g).tolist() + [3] for n in lengths]
    types = [[0] * (n // 2) + [1] * (n - n // 2) for n in lengths]
    return glue.Features(input_ids=ids, token_type_ids=types, labels=[0] * len(lengths), pad_id=0)


def hooked_reference(bert, features, ratio, seed):
    """Figure 1 computed another way: each example alone (no padding), the noise added by a
    forward hook on the module whose output is h_k, the full forward pass run again."""
    L = bert.config.num_hidden_layers
    modules = [bert.embeddings, *bert.layers]                  # modules[k] outputs h_k
    per_example = []                                           # (L+1, L+1, 2) each; NaN where r < k
    for i, (ids, types) in enumerate(zip(features.input_ids, features.token_type_ids)):
        args = (torch.tensor([ids]), torch.tensor([types]), torch.ones(1, len(ids), dtype=torch.long))
        with torch.no_grad():
            clean = bert(*args).hidden_states
        rows = np.full((L + 1, L + 1, 2), np.nan)
        for k in range(L + 1):
            seed_ki = int(np.random.SeedSequence([seed, k, i]).generate_state(1, np.uint64)[0])

            def add_noise(module, inputs, output):
                g = torch.randn(output.shape[1:], generator=torch.Generator().manual_seed(seed_ki))
                g = g.to(output.dtype)
                return output + ratio * output.norm() / g.norm() * g

            handle = modules[k].register_forward_hook(add_noise)
            with torch.no_grad():
                noisy = bert(*args).hidden_states
            handle.remove()
            for r in range(k, L + 1):
                d = (noisy[r] - clean[r]).norm().item()
                rows[k, r] = (d / clean[r].norm().item(), d)
        per_example.append(rows)
    mean = np.mean(per_example, axis=0)
    return mean[..., 0], mean[..., 1]                          # relative, absolute


def test_attenuation_matches_hooks_on_unpadded_examples():
    bert = tiny_bert().double()
    features = tiny_features([5, 9, 12, 4, 7, 10, 3])
    batches = glue.batches(features, batch_size=3, bucket=True)       # padded, examples reordered
    assert any(bool((b["attention_mask"] == 0).any()) for b in batches)
    att = analysis.measure_noise_attenuation(bert, batches, noise_ratio=0.05, seed=11)
    relative, absolute = hooked_reference(bert, features, 0.05, seed=11)
    assert att.n_examples == 7
    np.testing.assert_array_equal(np.isnan(att.relative), np.isnan(relative))   # r < k: no value
    np.testing.assert_allclose(att.relative, relative, rtol=1e-9)
    np.testing.assert_allclose(att.absolute, absolute, rtol=1e-9)
    # The noise really travels: every layer above the injection point moves, by different amounts.
    above = att.relative[np.triu_indices(4, k=1)]
    assert (above > 1e-3).all() and len(set(np.round(above, 6))) == len(above)


def test_injected_noise_has_exactly_the_requested_norm():
    torch.manual_seed(0)
    h = torch.randn(4, 6, 32) * torch.rand(4, 1, 1) * 10                     # (B, T, H) fp32
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3, [1] * 5 + [0], [1, 0, 0, 0, 0, 0]])
    seeds = [analysis.noise_seed(0, 2, i) for i in range(4)]
    eps = analysis.scaled_noise(h, mask, 0.05, seeds)
    assert eps.dtype == h.dtype and eps.shape == h.shape
    real = mask.bool()
    for j in range(4):
        clean_norm = h[j][real[j]].double().norm()
        assert eps[j][real[j]].double().norm().item() == pytest.approx(0.05 * clean_norm.item(), rel=1e-6)
        assert (eps[j][~real[j]] == 0).all()                            # no noise on padding
    # The same seeds give the same noise; the noise of other layers or examples differs.
    assert torch.equal(eps, analysis.scaled_noise(h, mask, 0.05, seeds))
    other = analysis.scaled_noise(h, mask, 0.05, [analysis.noise_seed(0, 3, i) for i in range(4)])
    assert not torch.allclose(eps, other)


def test_measurement_starts_each_curve_at_the_noise_ratio():
    bert = tiny_bert()                                                     # fp32, as the command runs
    batches = glue.batches(tiny_features([6, 11, 8, 5]), batch_size=2, bucket=True)
    att = analysis.measure_noise_attenuation(bert, batches, noise_ratio=0.05, seed=0)
    np.testing.assert_allclose(np.diag(att.relative), 0.05, rtol=1e-5)
    np.testing.assert_allclose(np.diag(att.absolute), 0.05 * att.clean_norm, rtol=1e-5)
    rows = att.rows()
    assert len(rows) == 10 and {(r["injection_layer"], r["layer"]) for r in rows} == \
        {(k, r) for k in range(4) for r in range(k, 4)}


# ----------------------------------------------------------------------------- the command

def save_tiny_checkpoint(folder: Path):
    """A tiny random BertClassifier in HF layout with a WordPiece vocabulary of 100 tokens."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *letters, *("##" + c for c in letters),
             "the", "is", "of", "and", "to", "in", "was", "for", "on"]
    vocab += [f"w{i}" for i in range(100 - len(vocab))]
    folder.mkdir(parents=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = Tokenizer.from_dir(folder)
    model = BertClassifier(BertConfig(**TINY), num_labels=2)
    init_weights(model, std=0.3, generator=torch.Generator().manual_seed(1))
    model.save_pretrained(folder, tokenizer=tokenizer)
    return folder


needs_glue = pytest.mark.skipif(not (GLUE_DIR / "RTE" / "dev.tsv").is_file(),
                                reason=f"GLUE data not found at {GLUE_DIR}")


@needs_glue
def test_noise_stability_command_writes_csv_and_json(tmp_path, monkeypatch, capsys):
    ckpt = save_tiny_checkpoint(tmp_path / "tiny")
    run = tmp_path / "runs" / "RTE" / "ft" / "seed1"                 # a run folder around the same weights
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"settings": {"task": "RTE", "max_seq_length": 64},
                                                 "data_dir": str(GLUE_DIR)}))
    (run / "results.json").write_text(json.dumps({"metric": "acc", "dev": {"acc": 0.625}}))
    (run / "model").symlink_to(ckpt, target_is_directory=True)
    monkeypatch.setitem(sys.modules, "matplotlib", None)               # as if it were not installed
    out = tmp_path / "out"
    argv = ["noise-stability", "--model", str(ckpt), "--run", str(run), "--max-samples", "6",
            "--batch-size", "4", "--seed", "3", "--output-dir", str(out)]
    assert evaluate.main(argv) == 0
    captured = capsys.readouterr()
    assert "pip install matplotlib" in captured.err and not (out / "noise_stability.png").exists()

    rows = list(csv.DictReader((out / "noise_stability.csv").open()))
    assert len(rows) == 2 * 10                                          # 2 models x (k, r >= k)
    assert {r["kind"] for r in rows} == {"pretrained", "fine-tuned"}
    data = json.loads((out / "noise_stability.json").read_text())
    assert data["task"] == "RTE" and data["split"] == "dev" and data["noise_ratio"] == 0.05
    pretrained, finetuned = data["models"]
    assert finetuned["dev_score"] == "dev acc 62.50" and pretrained["n_examples"] == 6
    # The same weights and the same --seed: the same noise and the same numbers (the head is ignored).
    assert pretrained["curves"] == finetuned["curves"]
    assert [c["relative"][0] for c in pretrained["curves"]] == pytest.approx([0.05] * 4, rel=1e-5)
    first = next(r for r in rows if r["kind"] == "pretrained" and r["injection_layer"] == "1" and r["layer"] == "3")
    assert float(first["relative_distance"]) == pytest.approx(pretrained["curves"][1]["relative"][2], rel=1e-12)

    # The numbers are those of the measurement itself on the same examples.
    examples = glue.load_examples("RTE", "dev", GLUE_DIR)
    keep = glue.subset_indices(len(examples), n=6, seed=0)
    features = glue.encode([examples[i] for i in keep], Tokenizer.from_dir(ckpt), 64)
    batches = glue.batches(features, 4, bucket=True)
    for b in batches:
        b["example_ids"] = torch.tensor(keep)[b["example_ids"]]
    att = analysis.measure_noise_attenuation(BertModel.from_pretrained(ckpt, verbose=False), batches, 0.05, 3)
    got = [c["absolute"] for c in finetuned["curves"]]
    assert got == [pytest.approx(att.absolute[k, k:].tolist(), rel=1e-6) for k in range(4)]


def requirement_names(path: Path) -> set:
    lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
    return {re.split(r"[<>=!~ \[]", line)[0].lower() for line in lines if line and not line.startswith("-")}


def test_matplotlib_is_needed_by_the_tests_and_not_to_train_or_evaluate():
    """The tests install it (no plot test skips for want of it); a run without it only misses
    the figures, with one line that says how to get them (the tests above and below)."""
    root = Path(__file__).resolve().parents[1]
    assert "matplotlib" in requirement_names(root / "requirements-test.txt")
    assert "matplotlib" not in requirement_names(root / "requirements.txt")


@needs_glue
def test_noise_stability_png_is_a_real_png(tmp_path):
    ckpt = save_tiny_checkpoint(tmp_path / "tiny")
    out = tmp_path / "out"
    assert evaluate.main(["noise-stability", "--model", str(ckpt), "--task", "rte", "--data-dir", str(GLUE_DIR),
                          "--max-samples", "4", "--output-dir", str(out)]) == 0
    assert (out / "noise_stability.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("args, message", [
    ([], "give --model"),
    (["--model", "./no-such-model"], "folder not found"),
    (["--run", "nowhere"], "not a run folder"),
    (["--model", "minilm-l6", "--task", "rte", "--noise-ratio", "0"], "--noise-ratio must be > 0"),
    (["--model", "minilm-l6", "--task", "rte", "--noise-ratio", "nan"], "--noise-ratio must be a finite number"),
    (["--model", "minilm-l6", "--task", "rte", "--noise-ratio", "inf"], "--noise-ratio must be a finite number"),
])
def test_bad_input_is_one_line_and_exit_2(args, message, capsys):
    assert evaluate.main(["noise-stability", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


# ----------------------------------------------------------------------------- summaries and box plots

def write_run(root, task, method, seed, value, metric="acc", fraction=None, options=None, train=None):
    d = root / (f"f{fraction}" if fraction else "full") / task / method / f"seed{seed}"
    d.mkdir(parents=True)
    (d / "config.json").write_text("{}")
    r = {"task": task, "method": method, "seed": seed, "metric": metric, "dev": {metric: value},
         "train_seconds": 1.0, "train_fraction": fraction, "method_options": options or {}}
    if train is not None:
        r["train"] = {metric: train}
    (d / "results.json").write_text(json.dumps(r))


SCORES = {  # (method, fraction) -> dev scores by seed
    ("ft", None): [0.60, 0.62, 0.58], ("lnsr", None): [0.64, 0.63, 0.66],
    ("ft", 0.15): [0.40, 0.45, 0.38], ("lnsr", 0.15): [0.50, 0.52, 0.47],
}


def test_summarize_keeps_fractions_apart_and_compares_like_with_like(tmp_path):
    for (method, fraction), values in SCORES.items():
        for seed, v in enumerate(values, 1):          # the same seeds in every fraction: none dropped
            write_run(tmp_path, "CoLA", method, seed, v, "mcc", fraction)
    runs, problems = evaluate.read_runs(tmp_path)
    assert problems == [] and len(runs) == 12
    table = evaluate.summarize(runs)["CoLA"]
    assert set(table) == {"ft (train_fraction=1)", "lnsr (train_fraction=1)",
                          "ft (train_fraction=0.15)", "lnsr (train_fraction=0.15)"}
    few = table["lnsr (train_fraction=0.15)"]
    assert few["mean"] == pytest.approx(100 * np.mean(SCORES[("lnsr", 0.15)]))
    # p-value against ft on the same 15%, not against ft on the full set
    expected = stats.ttest_ind(100 * np.array(SCORES[("lnsr", 0.15)]), 100 * np.array(SCORES[("ft", 0.15)]),
                               equal_var=False).pvalue
    assert few["p_vs_ft"] == pytest.approx(expected, rel=1e-9)
    assert table["ft (train_fraction=0.15)"]["p_vs_ft"] is None


def test_summarize_rows_per_injection_layer_and_the_generalization_gap(tmp_path):
    for seed, (dev, train) in enumerate([(0.70, 0.95), (0.68, 0.97)], 1):
        write_run(tmp_path, "RTE", "ft", seed, dev, train=train)
    for layer, devs in {1: [0.72, 0.74], 6: [0.71, 0.69]}.items():
        for seed, v in enumerate(devs, 1):
            write_run(tmp_path / f"b{layer}", "RTE", "lnsr", seed, v, options={"layer": layer, "sigma": 0.01},
                      train=0.9)
    runs, _ = evaluate.read_runs(tmp_path)
    table = evaluate.summarize(runs)["RTE"]
    assert set(table) == {"ft", "lnsr (layer=1)", "lnsr (layer=6)"}     # no fraction label: all full
    assert table["ft"]["train_mean"] == pytest.approx(96.0)
    assert table["ft"]["gap"] == pytest.approx(96.0 - 69.0)
    assert table["lnsr (layer=6)"]["gap"] == pytest.approx(90.0 - 70.0)
    text = evaluate.markdown(evaluate.summarize(runs))
    assert "| RTE | ft | 96.00 | 69.00 | 27.00 |" in text


def test_box_plot_groups_and_png(tmp_path, monkeypatch, capsys):
    for (method, fraction), values in SCORES.items():
        for seed, v in enumerate(values, 1):
            write_run(tmp_path, "CoLA", method, seed, v, "mcc", fraction)
    write_run(tmp_path, "RTE", "ft", 1, 0.7)
    runs, _ = evaluate.read_runs(tmp_path)
    groups = evaluate.score_groups(runs)
    assert list(groups) == ["RTE", "CoLA"]                              # the paper's task order
    assert list(groups["CoLA"]) == ["ft (train_fraction=0.15)", "ft (train_fraction=1)",
                                    "lnsr (train_fraction=0.15)", "lnsr (train_fraction=1)"]
    assert groups["CoLA"]["lnsr (train_fraction=0.15)"] == pytest.approx([50.0, 52.0, 47.0])

    out = tmp_path / "box.png"
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "matplotlib", None)
        assert evaluate.main(["boxplot", str(tmp_path), "--output", str(out)]) == 2
        assert "pip install matplotlib" in capsys.readouterr().err and not out.exists()
    assert evaluate.main(["boxplot", str(tmp_path), "--output", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG_MAGIC
    width, height = struct.unpack(">II", out.read_bytes()[16:24])       # the PNG's IHDR chunk
    assert width <= 1600 and height > width / 2                   # two tasks: two rows, one above the other
