"""One prepared check of the GPU path: correctness, precision, speed and an end-to-end run.

Every real user trains BERT-Large on a GPU, and a GPU is lent to this project only now and
then, for minutes. This script is what to run when one is: it needs no network and no
pretrained weights (only torch, transformers, safetensors and tokenizers, and a GLUE folder with
RTE), takes a few minutes on one H100/H200, prints one Markdown table and exits 1 if any check
fails. The same script runs in the test suite on the CPU with a tiny model, so it cannot rot:

    python benchmarks/gpu_check.py --data-dir data/glue                    # a GPU machine
    python benchmarks/gpu_check.py --device cpu --small --data-dir ../shared/glue_data

What it checks (rows with a limit are checks; the others are measurements):

  parity       fp32, eval mode, a padded batch, a randomly initialised BERT-Large-shaped model:
               every hidden state of our BertModel on the device against the same model on the
               CPU and against transformers' BertModel on the device (real tokens: our CPU path
               leaves padding rows at 0, which nothing reads).
  precision    LNSR in training mode with dropout on: with sigma 0 and shared masks the penalty
               is exactly 0 (the noisy pass replays the clean pass's dropout masks through the
               device's RNG), with independent masks it is not (dropout is really on); in the
               policy's recipe (numerics.numeric_recipe: full fp32 for LNSR) the penalty at sigma
               1e-4 is about 100 times the one at 1e-5, as sigma^2 says, which fails if the
               device rounds the noise away; and the penalty with TF32 forced on, over the
               policy's: what TF32 would do to it. LNSR's jvp estimator (--lnsr-estimator jvp):
               the policy gives it bf16 where the device computes bf16 natively, and in eval
               mode (dropout off: the estimators' attention draws its dropout masks by different
               kernels on a GPU) its penalty under bf16 autocast is within 5% of the difference
               estimator's in fp32, where the difference estimator's own bf16 penalty is rounding.
  speed        one training step (forward, loss, backward, clipping, optimizer step; batch 32 x
               128, the first quarter of the rows padded to half) for ft and LNSR (the difference
               estimator) in the policy's precision, for ft in bf16 and for LNSR with the jvp
               estimator in bf16, ours against transformers' BertForSequenceClassification with
               the same weights; the eval forward; peak memory of each; achieved TFLOP/s against
               the card's dense bf16 and fp32 rates; the jvp step in bf16 over the difference step
               in fp32, which is what the paper's grid gains. Model FLOPs: a forward pass is
               F = L x (2 B T (4 H^2 + 2 H I) + 4 B T^2 H); an ft step is 3 F, an LNSR step 6 F
               (the noisy pass, and backward through both branches), an LNSR jvp step
               3 (2 F + F_t): the clean pass, the jvp pass's values and tangents, F_t = F +
               L x 4 B T^2 H (a tangent through Q K^T and through the product with V is two
               products each), and backward through all of it.
  train.py     end to end on the device: a random checkpoint written with transformers'
               save_pretrained (plus a WordPiece vocabulary built from RTE's training text),
               `train.py --task rte --methods ft,lnsr --max-train-samples 256 --epochs 1
               --deterministic`, both runs finishing with results.json and recording the same
               recipe (fp32, TF32 off, deterministic); then its LNSR run once more: the same
               losses and penalties, bit for bit.

A section that raises becomes one FAIL row and the next section still runs; every row is also
shown on stderr as soon as it is made, and a train.py process that hangs is stopped after
TRAIN_TIMEOUT seconds. The GLUE folder travels with the command: copy RTE/ into the checkout
(e.g. data/glue/RTE, which git ignores) if the GPU machine has no copy of its own.

--small swaps BERT-Large for a 2-layer model of width 64 and shortens the timing, so that the
whole script takes seconds on a CPU.
"""
import argparse
import collections
import datetime
import json
import math
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))        # bench_step, beside this file
ROOT = Path(__file__).resolve().parents[1]

import bench_step  # noqa: E402  (puts the repository root on sys.path)
import torch  # noqa: E402

import glue  # noqa: E402
import optim  # noqa: E402
import numerics  # noqa: E402
import scoring  # noqa: E402
import train  # noqa: E402
from bert.model import BertClassifier, BertModel  # noqa: E402
from regularizers.base import FineTune  # noqa: E402
from regularizers.lnsr import LNSR, LNSROptions  # noqa: E402

BERT_LARGE = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                  initializer_range=0.05)
SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=10000,
             initializer_range=0.2)
TRAIN_TIMEOUT = 300           # seconds for one train.py process; a hung one is a FAIL row, not a hang
PARITY_LIMIT = 1e-4           # max |difference| of any hidden state (unit-scale values), fp32
SIGMA_SQUARED_RANGE = (50, 200)   # penalty(1e-4) / penalty(1e-5); sigma^2 says 100
# Dense peak rates in TFLOP/s from NVIDIA's data sheets, (bf16 tensor cores, fp32 without
# TF32), matched against torch.cuda.get_device_name in this order.
PEAK_TFLOPS = [("H200 NVL", 835, 60), ("H200", 989, 67), ("H100 NVL", 835, 60), ("H100 PCIe", 756, 51),
               ("H100", 989, 67), ("A100", 312, 19.5), ("L40S", 362, 92), ("A10", 125, 31)]


@dataclass
class Row:
    section: str
    what: str
    value: str
    limit: str = ""
    ok: bool | None = None           # None: a measurement, not a check

    @property
    def status(self) -> str:
        return "" if self.ok is None else ("pass" if self.ok else "FAIL")


def say(text):
    print(text, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- models and data

def random_checkpoint(folder: Path, shape: dict, data_dir: Path) -> Path:
    """A randomly initialised BertForSequenceClassification in HF's layout (transformers'
    save_pretrained), with a WordPiece vocabulary from RTE's training text beside it.

    The weights' std (`initializer_range` of the shape) is larger than BERT's 0.02: with 0.02 the
    residual connections carry nearly everything, so a wrong activation or matrix products
    rounded to TF32 change the hidden states by less than the parity limit and the penalty by
    about 1%. Too large, and the random model is chaotic: at 0.2, 24 layers of width 1024 amplify
    fp32 rounding to 1e-2 (fp32 against fp64 on the CPU) and sigma 1e-4 is no longer small
    (penalty ratio 26 for 1e-4 / 1e-5 in fp64), so correct kernels would fail. Measured on the CPU:
    - the 2 x 64 model at 0.2: a tanh GELU planted moves the hidden states by 8.6e-4, TF32
      rounding multiplies the LNSR penalty 13-fold (14-fold on pretrained MiniLM);
    - BERT-Large at 0.05: fp32 against fp64 8.7e-6 (limit 1e-4), penalty ratio 95 (sigma^2: 100),
      a tanh GELU 4.5e-3, TF32 rounding multiplies the penalty 459-fold.
    """
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    bench_step.save_random_checkpoint(shape, folder)
    (folder / "vocab.txt").write_text("\n".join(rte_vocabulary(data_dir)) + "\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}), encoding="utf-8")
    return folder


def rte_vocabulary(data_dir: Path, size: int = 8000) -> list:
    """BERT's special tokens, every character alone and as a ##piece, and RTE's commonest
    words: enough for WordPiece to encode any RTE text without [UNK] for most words."""
    counts = collections.Counter()
    for example in glue.load_examples("rte", "train", data_dir):
        for text in (example.text_a, example.text_b or ""):
            counts.update(re.findall(r"\w+|[^\w\s]", text.lower()))
    chars = sorted({c for word in counts for c in word})
    words = [w for w, _ in counts.most_common(size) if len(w) > 1]
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + ["##" + c for c in chars] + words


def padded_batch(vocab_size, batch_size, length, device):
    return bench_step.make_batch(vocab_size, batch_size, length, device)


# ----------------------------------------------------------------------------- the sections

def check_parity(folder: Path, device, shape_name: str, batch_size, length) -> list:
    from transformers import BertModel as HFBertModel
    numerics.apply_recipe(numerics.NumericRecipe("fp32", False))
    ours_cpu = BertModel.from_pretrained(folder, verbose=False).eval()
    ours = BertModel.from_pretrained(folder, verbose=False).to(device).eval()
    hf = HFBertModel.from_pretrained(folder, attn_implementation="sdpa", dtype=torch.float32).to(device).eval()
    batch = padded_batch(ours.config.vocab_size, batch_size, length, torch.device("cpu"))
    inputs = [batch[k] for k in scoring.MODEL_INPUTS]
    real = batch["attention_mask"].bool()                                      # (B, T)
    with torch.no_grad():
        on_cpu = ours_cpu(*inputs).hidden_states
        on_device = ours(*(x.to(device) for x in inputs)).hidden_states
        reference = hf(**{k: batch[k].to(device) for k in scoring.MODEL_INPUTS},
                       output_hidden_states=True).hidden_states
    worst = lambda a, b: max(float((x.cpu()[real] - y.cpu()[real]).abs().max()) for x, y in zip(a, b))
    vs_cpu, vs_hf = worst(on_device, on_cpu), worst(on_device, reference)
    L = len(on_device) - 1
    return [Row("parity", f"ours on {device.type} vs ours on CPU, {shape_name}, {L + 1} hidden states, max abs diff",
                f"{vs_cpu:.2e}", f"<= {PARITY_LIMIT:.0e}", vs_cpu <= PARITY_LIMIT),
            Row("parity", f"ours vs transformers' BertModel on {device.type}, max abs diff",
                f"{vs_hf:.2e}", f"<= {PARITY_LIMIT:.0e}", vs_hf <= PARITY_LIMIT)]


def lnsr_penalty(model, batch, seed=0, precision="fp32", **options) -> float:
    torch.manual_seed(seed)                          # the same dropout masks for every call
    method = LNSR(LNSROptions(**options))
    method.setup(model, seed)
    with torch.no_grad(), numerics.autocast(model.classifier.weight.device, precision):
        outputs = model(*(batch[k] for k in scoring.MODEL_INPUTS))
        return float(method.penalty(model, batch, outputs))


def check_precision(folder: Path, device, batch_size, length) -> list:
    native = numerics.native_bf16(device)
    recipe = numerics.numeric_recipe("auto", [FineTune(), LNSR(LNSROptions())], device.type, native)
    jvp_recipe = numerics.numeric_recipe("auto", [FineTune(), LNSR(LNSROptions(estimator="jvp"))], device.type, native)
    model = BertClassifier.from_pretrained(folder, num_labels=2, verbose=False).to(device).train()
    batch = padded_batch(model.config.vocab_size, batch_size, length, device)
    numerics.apply_recipe(recipe)
    shared_zero = lnsr_penalty(model, batch, sigma=0.0)
    independent_zero = lnsr_penalty(model, batch, sigma=0.0, dropout="independent")
    p4, p5 = lnsr_penalty(model, batch, sigma=1e-4), lnsr_penalty(model, batch, sigma=1e-5)
    numerics.apply_recipe(numerics.NumericRecipe("fp32", True))             # TF32 forced on
    p4_tf32 = lnsr_penalty(model, batch, sigma=1e-4)
    numerics.apply_recipe(recipe)
    model.eval()
    difference_fp32 = lnsr_penalty(model, batch, sigma=1e-4)
    difference_bf16 = lnsr_penalty(model, batch, sigma=1e-4, precision="bf16")
    jvp_bf16 = lnsr_penalty(model, batch, sigma=1e-4, precision="bf16", estimator="jvp")
    model.train()
    jvp_ratio = jvp_bf16 / difference_fp32 if difference_fp32 > 0 else math.inf
    low, high = SIGMA_SQUARED_RANGE
    ratio = p4 / p5 if p5 > 0 else math.inf
    expected_jvp = "bf16" if native else "fp32"
    return [Row("precision", f"policy for --methods ft,lnsr on {device.type}",
                f"{recipe.precision}, TF32 {'on' if recipe.allow_tf32 else 'off'}", "fp32, TF32 off",
                (recipe.precision, recipe.allow_tf32) == ("fp32", False)),
            Row("precision", "LNSR penalty, sigma 0, training mode, shared masks", f"{shared_zero:.3g}",
                "exactly 0", shared_zero == 0.0),
            Row("precision", "LNSR penalty, sigma 0, training mode, independent masks", f"{independent_zero:.3g}",
                "> 0 (dropout is on)", independent_zero > 0.0),
            Row("precision", f"LNSR penalty at sigma 1e-4 / at 1e-5, policy's recipe ({p4:.3g} / {p5:.3g})",
                f"{ratio:.1f}", f"{low}-{high} (sigma^2: 100)", low <= ratio <= high),
            Row("precision", f"LNSR penalty at sigma 1e-4, TF32 forced on / policy's ({p4_tf32:.3g} / {p4:.3g})",
                f"{p4_tf32 / p4:.2f}" if p4 > 0 else "-"),
            Row("precision", f"policy for --methods ft,lnsr --lnsr-estimator jvp on {device.type} "
                f"({'native' if native else 'no native'} bf16)", f"{jvp_recipe.precision}, TF32 "
                f"{'on' if jvp_recipe.allow_tf32 else 'off'}", f"{expected_jvp}, TF32 off",
                (jvp_recipe.precision, jvp_recipe.allow_tf32) == (expected_jvp, False)),
            Row("precision", f"LNSR penalty at sigma 1e-4, eval mode: jvp in bf16 / difference in fp32 "
                f"({jvp_bf16:.3g} / {difference_fp32:.3g})", f"{jvp_ratio:.4f}", "0.95-1.05",
                0.95 <= jvp_ratio <= 1.05),
            Row("precision", f"LNSR penalty at sigma 1e-4, eval mode: difference in bf16 / in fp32 "
                f"({difference_bf16:.3g} / {difference_fp32:.3g})",
                f"{difference_bf16 / difference_fp32:.1f}" if difference_fp32 > 0 else "-")]


def forward_flops(config, B, T) -> float:
    H, I, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    return L * (2 * B * T * (4 * H * H + 2 * H * I) + 4 * B * T * T * H)


def tangent_flops(config, B, T) -> float:
    """The matrix products that carry a tangent through the layers: one per projection, two per
    attention product (Q_t K^T + Q K_t^T, P_t V + P V_t)."""
    return forward_flops(config, B, T) + config.num_hidden_layers * 4 * B * T * T * config.hidden_size


def peak_rates(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next(((bf16, fp32) for key, bf16, fp32 in PEAK_TFLOPS if key in name), None)


def peak_bytes(fn, device) -> int | None:
    """Peak device memory of one fn() above what was allocated before it (CUDA only). fn runs
    once before: its first call also allocates gradients and the optimizer's moments, which
    every later step reuses."""
    fn()
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def check_speed(folder: Path, device, settings, batch_size, length) -> list:
    ours, hf = bench_step.load_pair(folder, device)
    batch = padded_batch(ours.config.vocab_size, batch_size, length, device)
    ours_opt, hf_opt = optim.make_optimizer(ours, "adam"), optim.make_optimizer(hf, "adam")
    lnsr_model = BertClassifier.from_pretrained(folder, num_labels=2, verbose=False).to(device)
    lnsr_model.bert.cls_only_last_layer = False                      # LNSR reads every position
    lnsr_opt = optim.make_optimizer(lnsr_model, "adam")
    lnsr = LNSR(LNSROptions())
    lnsr.setup(lnsr_model, 0)
    jvp_model = BertClassifier.from_pretrained(folder, num_labels=2, verbose=False).to(device)
    jvp_model.bert.cls_only_last_layer = False
    jvp_opt = optim.make_optimizer(jvp_model, "adam")
    jvp = LNSR(LNSROptions(estimator="jvp"))
    jvp.setup(jvp_model, 0)
    policy = "fp32"                   # numerics.numeric_recipe for any command with LNSR's difference in it
    F = forward_flops(ours.config, batch_size, length)
    steps = {
        f"ours ft {policy}": (partial(bench_step.ours_train_step, ours, ours_opt, FineTune(), batch, policy, device), 3 * F),
        f"HF ft {policy}": (partial(bench_step.hf_train_step, hf, hf_opt, batch, policy, device), 3 * F),
        f"ours lnsr difference {policy}": (partial(bench_step.ours_train_step, lnsr_model, lnsr_opt, lnsr, batch, policy, device), 6 * F),
        "ours ft bf16": (partial(bench_step.ours_train_step, ours, ours_opt, FineTune(), batch, "bf16", device), 3 * F),
        "HF ft bf16": (partial(bench_step.hf_train_step, hf, hf_opt, batch, "bf16", device), 3 * F),
        "ours lnsr jvp bf16": (partial(bench_step.ours_train_step, jvp_model, jvp_opt, jvp, batch, "bf16", device),
                               3 * (2 * F + tangent_flops(ours.config, batch_size, length))),
    }
    for model in (ours, hf, lnsr_model, jvp_model):
        model.train()
    numerics.apply_recipe(numerics.NumericRecipe("fp32", False))
    memory = {name: peak_bytes(fn, device) for name, (fn, _) in steps.items()}   # also the warm-up
    times = bench_step.median_times({name: fn for name, (fn, _) in steps.items()}, settings, device)
    for model in (ours, hf):
        model.eval()
    evals = bench_step.median_times({
        f"ours eval {policy}": partial(bench_step.ours_eval_forward, ours, batch, policy, device),
        f"HF eval {policy}": partial(bench_step.hf_eval_forward, hf, batch, policy, device)}, settings, device)
    rates = peak_rates(device)
    rows = []
    for name, (fn, flops) in steps.items():
        tflops = flops / times[name] / 1e12
        peak = "" if rates is None else f" = {100 * tflops / (rates[0] if 'bf16' in name else rates[1]):.0f}% of " \
                                         f"{rates[0] if 'bf16' in name else rates[1]} peak"
        mib = "-" if memory[name] is None else f"{memory[name] / 2**20:.0f} MiB"
        rows.append(Row("speed", f"train step {name}, batch {batch_size} x {length}: time, TFLOP/s, peak memory",
                        f"{times[name] * 1e3:.1f} ms, {tflops:.3g} TFLOP/s{peak}, {mib}"))
    for precision in (policy, "bf16"):
        rows.append(Row("speed", f"train step ft {precision}: ours / HF",
                        f"{times[f'ours ft {precision}'] / times[f'HF ft {precision}']:.2f}"))
    rows.append(Row("speed", f"train step lnsr (difference) / ft, ours, {policy}",
                    f"{times[f'ours lnsr difference {policy}'] / times[f'ours ft {policy}']:.2f}"))
    rows.append(Row("speed", f"train step lnsr: jvp in bf16 / difference in {policy} (time; peak memory)",
                    f"{times['ours lnsr jvp bf16'] / times[f'ours lnsr difference {policy}']:.2f}"
                    + ("" if memory["ours lnsr jvp bf16"] is None else
                       f"; {memory['ours lnsr jvp bf16'] / memory[f'ours lnsr difference {policy}']:.2f}")))
    rows.append(Row("speed", f"eval forward {policy}: ours, HF, ours / HF",
                    f"{evals[f'ours eval {policy}'] * 1e3:.1f} ms, {evals[f'HF eval {policy}'] * 1e3:.1f} ms, "
                    f"{evals[f'ours eval {policy}'] / evals[f'HF eval {policy}']:.2f}"))
    return rows


def run_train(*extra) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "train.py"), "--task", "rte", *extra]
    say("  $ " + " ".join(command[1:]))
    try:
        return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=TRAIN_TIMEOUT)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(command, 124, "", f"timed out after {TRAIN_TIMEOUT} s")


def check_train(folder: Path, out: Path, device, data_dir: Path, n_train) -> list:
    """The grid as a user runs it, with --deterministic; then its LNSR run once more, which must
    repeat it bit for bit (LNSR, not ft: the policy's fp32 recipe and the dropout replay are
    what a comparison needs to repeat)."""
    common = ["--model", str(folder), "--data-dir", str(data_dir), "--device", device.type,
              "--epochs", "1", "--log-every", "1", "--max-train-samples", str(n_train), "--deterministic"]
    done = run_train(*common, "--methods", "ft,lnsr", "--output-dir", str(out / "grid"))
    recipes, finished = [], []
    for m in ("ft", "lnsr"):
        run_dir = out / "grid" / "RTE" / m / "seed1"
        finished.append((run_dir / "results.json").is_file())
        if (run_dir / "config.json").is_file():
            settings = json.loads((run_dir / "config.json").read_text())["settings"]
            recipes.append((settings["precision"], settings["allow_tf32"], settings["deterministic"]))
    ok = done.returncode == 0 and all(finished)
    rows = [Row("train.py", f"--methods ft,lnsr --max-train-samples {n_train} --epochs 1 --deterministic: "
                "results.json for both", "yes" if ok else f"no (exit {done.returncode}: {tail(done.stderr)})",
                "both", ok),
            Row("train.py", "what both config.json record: (precision, TF32, deterministic)",
                ", ".join(map(str, recipes)) or "-", "(fp32, False, True) twice", recipes == [("fp32", False, True)] * 2)]
    again = run_train(*common, "--method", "lnsr", "--output-dir", str(out / "again"))
    logs = []
    for output, process in (("grid", done), ("again", again)):
        log = out / output / "RTE" / "lnsr" / "seed1" / "log.jsonl"
        logs.append([(r["loss"], r["penalty"]) for r in map(json.loads, log.read_text().splitlines())]
                    if process.returncode == 0 and log.is_file() else tail(process.stderr))
    same = isinstance(logs[0], list) and len(logs[0]) > 1 and logs[0] == logs[1]
    rows.append(Row("train.py", "lnsr again with --deterministic: the same loss and penalty at every step",
                    "same" if same else f"differ: {logs[0]} / {logs[1]}"[:300], "same", same))
    return rows


def tail(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:200] if lines else ""


# ----------------------------------------------------------------------------- the report

def run_section(name, check) -> list:
    """The section's rows, each also shown at once; a section that raises is one FAIL row, and the
    sections after it still run (a GPU is lent for minutes: one crash must not lose the table)."""
    try:
        rows = check()
    except Exception as error:                                       # noqa: BLE001 (reported as a FAIL)
        rows = [Row(name, "the section raised", f"{type(error).__name__}: {error}"[:300], "no error", False)]
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    for r in rows:
        say(f"  {r.what}: {r.value} {r.status}")
    return rows


def machine(device) -> str:
    text = bench_step.machine_description(device)
    return f"{text}; torch {torch.__version__}" + (f", CUDA {torch.version.cuda}" if device.type == "cuda" else "")


def markdown(rows, device, argv) -> str:
    lines = [f"gpu_check, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; {machine(device)}",
             f"command: python benchmarks/gpu_check.py {' '.join(argv)}", "",
             "| section | what | value | limit | check |", "|---|---|---|---|---|"]
    lines += [f"| {r.section} | {r.what} | {r.value} | {r.limit} | {r.status} |" for r in rows]
    failed = [r for r in rows if r.ok is False]
    lines += ["", f"{len(failed)} of {sum(r.ok is not None for r in rows)} checks failed" if failed
              else f"all {sum(r.ok is not None for r in rows)} checks passed"]
    return "\n".join(lines)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="where to check (default: cuda)")
    p.add_argument("--small", action="store_true",
                   help="a 2-layer model of width 64 instead of BERT-Large, and short timings (the test suite)")
    p.add_argument("--data-dir", required=True, help="a GLUE folder holding RTE/train.tsv and RTE/dev.tsv")
    p.add_argument("--sections", default="parity,precision,speed,train",
                   help="comma-separated sections to run (default: all four)")
    p.add_argument("--output", help="also write the table to this file")
    return p.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    sections = set(args.sections.split(","))
    if sections - {"parity", "precision", "speed", "train"}:
        print(f"error: --sections: unknown {', '.join(sorted(sections - {'parity', 'precision', 'speed', 'train'}))}",
              file=sys.stderr)
        return 2
    data_dir = Path(args.data_dir)
    if not (data_dir / "RTE" / "train.tsv").is_file():
        print(f"error: --data-dir {data_dir}: no RTE/train.tsv there", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: no CUDA device is available (use --device cpu --small)", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    shape, shape_name = (SMALL, "2 x 64 (small)") if args.small else (BERT_LARGE, "BERT-Large shape")
    # Sizes: (parity batch, precision batch, speed batch, train.py examples).
    if args.small:
        settings, sizes = bench_step.Settings(warmup=1, reps=1), ((2, 32), (4, 32), (8, 32), 64)
    else:
        settings, sizes = bench_step.Settings(warmup=3, reps=10), ((4, 128), (8, 128), (32, 128), 256)
    parity_batch, precision_batch, speed_batch, n_train = sizes
    rows = []
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        folder = random_checkpoint(Path(tmp) / "model", shape, data_dir)
        checks = {"parity": partial(check_parity, folder, device, shape_name, *parity_batch),
                  "precision": partial(check_precision, folder, device, *precision_batch),
                  "speed": partial(check_speed, folder, device, settings, *speed_batch),
                  "train": partial(check_train, folder, Path(tmp), device, data_dir, n_train)}
        for name, check in checks.items():
            if name in sections:
                say(f"{name} ...")
                rows += run_section(name, check)
    report = markdown(rows, device, argv)
    print(report)
    if args.output:
        Path(args.output).write_text(report + "\n", encoding="utf-8")
    return 1 if any(r.ok is False for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
