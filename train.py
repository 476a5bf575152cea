"""Fine-tune BERT on a GLUE task with LNSR or a baseline: the paper's Algorithm 1, end to end.

    python train.py --task cola                                  # the paper's setup (BERT-Large, LNSR)
    python train.py --task rte --model minilm-l6 --methods ft,lnsr --seeds 1-3   # CPU quick start

For every (method, seed) the run goes to <output-dir>/<task>/<method>/seed<N>/ with config.json,
log.jsonl and results.json (see README.md). A run whose results.json exists is skipped, so a
sweep that was stopped picks up where it left off.

The loop, per batch (Algorithm 1, lines 3-14):
    outputs = model(batch)                                   one clean forward pass
    loss = task_loss(outputs.logits, labels) + method.penalty(model, batch, outputs)
    loss.backward(); clip the gradient norm at 1.0; optimizer step; scheduler step
"""
import argparse
import ctypes
import dataclasses
import json
import math
import os
import platform
import re
import shlex
import signal
import sys
import time
import types
import typing
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import checkpoint
import glue
import optim
import regularizers
from progress import GridClock, StatusLine, format_seconds
from bert.errors import InputError, existing_folder, folder_to_write
from run_records import (RunFiles, one_answer, parse_seeds, scored_set, seed_folder, settings_differences,
                         with_legacy_settings, write_json)
from workers import Claim, DataParallel, SingleProcess, claim_run, describe_claim, local_index, read_claim, worker_name

PAPER_MODEL = "bert-large-uncased-whole-word-masking"


# ----------------------------------------------------------------------------- command line

def option_fields(method_cls):
    return dataclasses.fields(method_cls.Options) if method_cls.Options else ()


def flag_type(options_cls, field):
    """int, float, str, bool or 'X | None' annotations -> the type argparse converts to."""
    t = typing.get_type_hints(options_cls)[field.name]
    if isinstance(t, types.UnionType):                     # float | None -> float
        t = next(a for a in t.__args__ if a is not type(None))
    return t


def add_method_flags(parser):
    """One typed flag per hyperparameter of every registered method: --<method>-<field>."""
    for name in regularizers.METHODS:
        cls = regularizers.method_class(name)
        fields = option_fields(cls)
        if not fields:
            continue
        doc = cls.__doc__ or sys.modules[cls.__module__].__doc__ or ""
        group = parser.add_argument_group(f"{name} options", doc.strip().splitlines()[0])
        for f in fields:
            t = flag_type(cls.Options, f)
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            flag = f"--{name}-{f.name.replace('_', '-')}"
            help_text = f.metadata.get("help", "")
            if t is bool:
                group.add_argument(flag, dest=f"{name}__{f.name}", default=default,
                                   action=argparse.BooleanOptionalAction, help=help_text)
            else:
                group.add_argument(flag, dest=f"{name}__{f.name}", type=t, default=default,
                                   metavar=t.__name__.upper(), help=help_text)


def method_options(name, args):
    cls = regularizers.method_class(name)
    if not cls.Options:
        return cls, None
    values = {f.name: getattr(args, f"{name}__{f.name}") for f in option_fields(cls)}
    return cls, cls.Options(**values)


def build_parser():
    p = argparse.ArgumentParser(
        description="Fine-tune BERT on a GLUE task with LNSR (Hua et al.) or a baseline. "
                    "Defaults reproduce the paper's setup (Section 4.3); max length, weight decay and "
                    "clipping, which the paper leaves to BERT's recipe, follow Devlin et al.'s code.",
        formatter_class=HelpFormatter)
    p.add_argument("--task", required=True,
                   help="GLUE task: cola, mrpc, rte, sts-b (the paper's), or sst-2, qnli, qqp, mnli, wnli")
    p.add_argument("--model", default=None,
                   help="a checkpoint folder in Hugging Face layout, a Hub repo id, or a preset: "
                        "bert-large-uncased-whole-word-masking (the paper's), bert-large-uncased, "
                        "bert-base-uncased, minilm-l6 (small, offline, for CPUs). Default: the paper's "
                        "model on a GPU, minilm-l6 on a machine without one (config.json records which)")
    m = p.add_mutually_exclusive_group()
    m.add_argument("--method", help="one method: " + ", ".join(regularizers.METHODS) + " (default: lnsr)")
    m.add_argument("--methods", help="several methods, comma-separated, run one after another; a method "
                                     "may carry training settings of its own (epochs, lr, warmup, "
                                     "weight_decay, batch_size), e.g. the paper's Table 2: "
                                     "ft,ft:epochs=4,noise,lnsr (run folder ft-epochs4)")
    s = p.add_mutually_exclusive_group()
    s.add_argument("--seed", type=int, help="the seed of a single run; it fixes head init, data order, "
                                            "dropout and noise (default: 1)")
    s.add_argument("--seeds", help="several seeds: 1-25, 1,3,5 or 1-3,7")
    p.add_argument("--dropout-stream", choices=["step", "run"], default="step",
                   help="step: the dropout masks of step t are drawn from a stream seeded by (seed, t) "
                        "alone, so runs of one seed are paired: every method that keeps the clean pass "
                        "sees ft's masks in layers 1..L-1 at every step; run: one stream seeded once "
                        "per run, as all runs made before 2026-12-02 (results/glue)")
    p.add_argument("--data-seed", type=int, default=None,
                   help="seed for data order and subsets only (default: --seed)")
    p.add_argument("--init-seed", type=int, default=None,
                   help="seed for the classifier head's initialisation only (default: --seed)")
    p.add_argument("--epochs", type=float, default=3, help="training epochs")
    p.add_argument("--batch-size", type=int, default=32, help="training batch size")
    p.add_argument("--eval-batch-size", type=int, default=64, help="evaluation batch size")
    p.add_argument("--lr", type=float, default=2e-5, help="peak learning rate")
    p.add_argument("--warmup", type=float, default=0.1, help="fraction of steps for linear warm-up")
    p.add_argument("--weight-decay", type=float, default=0.01, help="decoupled weight decay")
    p.add_argument("--optimizer", choices=["adam", "adamw"], default="adam",
                   help="adam: Adam without bias correction (the paper's); adamw: torch.optim.AdamW")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient-norm clipping")
    p.add_argument("--max-seq-length", type=int, default=128, help="truncate inputs to this many tokens")
    p.add_argument("--data-dir", default=None,
                   help="an existing GLUE data folder with <Task>/train.tsv etc.; a task missing there is "
                        "downloaded into it. Default: $GLUE_DIR, else data/glue (made when a download "
                        "succeeds)")
    p.add_argument("--output-dir", default="runs", help="where run folders are written")
    p.add_argument("--save-model", action="store_true",
                   help="save the fine-tuned model (HF layout) in <run>/model for evaluate.py")
    p.add_argument("--max-train-samples", type=int, default=None,
                   help="train on a seeded random subset of this many examples (quick runs)")
    p.add_argument("--train-fraction", type=float, default=None,
                   help="train on a seeded random fraction of the training set (few-sample runs)")
    p.add_argument("--max-eval-samples", type=int, default=None,
                   help="evaluate on a seeded random subset of this many dev (or held-out) examples")
    p.add_argument("--holdout", type=float, default=None, metavar="FRACTION",
                   help="hold out this fraction of the training set, train on the rest and score the "
                        "held-out part in place of dev: to choose lr, sigma or lambda without touching the "
                        "dev set you report. The split depends on the task and the fraction only (the same "
                        "for every seed and method); the dev file is never opened; results.json names the "
                        "scored set (\"scored\": \"held_out\") and config.json the split's fingerprint")
    p.add_argument("--eval-train", action="store_true",
                   help="also report the metric on the training set at the end (generalization gap)")
    p.add_argument("--curves", action="store_true",
                   help="learning curves (the paper's Figure 3): at the end of every epoch, log the main "
                        f"metric and task loss on the scored set (dev or held-out) and on a fixed sample of "
                        f"{CURVE_TRAIN_SAMPLE} training examples (log.jsonl lines with \"curves\"; drawn by "
                        "evaluate.py curves)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: cuda when available")
    p.add_argument("--precision", choices=["auto", "fp32", "tf32", "bf16"], default="auto",
                   help="the format of matrix products, one for every run of the command (weights and "
                        "optimizer stay fp32). fp32: full fp32, also on a GPU (no TF32). tf32 (CUDA only): "
                        "TF32 tensor cores for fp32 products. bf16: bfloat16 autocast. auto: bf16 if every "
                        "method of the command tolerates it and the hardware computes it natively (a CUDA "
                        "GPU with bf16, a CPU with avx512_bf16 or amx_bf16), else fp32. lnsr, noise, smart "
                        "and r3f perturb by less than bf16's and TF32's rounding step, so with any of them "
                        "auto is fp32 for every arm and bf16 or tf32 are refused; lnsr with "
                        "--lnsr-estimator jvp is the exception (it never subtracts two passes). "
                        "config.json records the resolved precision and whether TF32 was allowed")
    p.add_argument("--deterministic", action="store_true",
                   help="CUDA: deterministic kernels only (torch.use_deterministic_algorithms and "
                        "CUBLAS_WORKSPACE_CONFIG=:4096:8, set before CUDA starts), so that repeating a run "
                        "on the same GPU gives the same bits, at some cost in speed; without it, GPU runs "
                        "differ between repeats in the last digits (README, 'On a GPU'). CPU runs are "
                        "repeatable either way")
    p.add_argument("--claim-timeout", type=float, default=600,
                   help="seconds without a heartbeat after which another worker's claim on a run counts "
                        "as dead and the run is taken over (workers.py; heartbeats every timeout / 5)")
    p.add_argument("--data-parallel", action="store_true",
                   help="under torchrun: all ranks train each run together (DistributedDataParallel, the "
                        "--batch-size split across ranks); without it every rank is a worker of its own "
                        "on the shared grid (docs/CLUSTER.md)")
    p.add_argument("--checkpoint-minutes", type=float, default=10, metavar="MIN",
                   help="save a mid-run checkpoint (<run>/checkpoint.pt) every this many minutes; 0: only "
                        "when stopped. Ctrl-C or SIGTERM (a SLURM pre-emption) always saves one at the end "
                        "of the step; the same command then goes on from it, with the same bits on a CPU. "
                        "It is removed when the run finishes")
    p.add_argument("--checkpoint-steps", type=int, default=0, metavar="N",
                   help="also save a checkpoint every this many steps (0: by time only)")
    p.add_argument("--log-every", type=int, default=20, help="write a log.jsonl line every N steps")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    p.add_argument("--dry-run", action="store_true",
                   help="check the flags, list the runs this command makes (finished ones are checked "
                        "against their config.json and marked) and stop before loading data or model")
    add_method_flags(p)
    return p


# ----------------------------------------------------------------------------- utilities

def versions():
    import tokenizers
    v = {"python": platform.python_version(), "torch": torch.__version__,
         "tokenizers": tokenizers.__version__, "platform": platform.platform()}
    try:
        import subprocess
        v["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                         cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        v["git_commit"] = None
    return v


class HelpFormatter(argparse.HelpFormatter):
    """Appends '(default: X)' to a flag's help once, and not when there is no default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "(default" not in text \
                and action.option_strings:
            text += " (default: %(default)s)"
        return text


def task_loss(logits, labels, is_regression):
    if is_regression:          # STS-B: MSE between a (B,) prediction and a (B,) target
        return F.mse_loss(logits.squeeze(-1).float(), labels.float())
    return F.cross_entropy(logits.float(), labels)


def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


MODEL_INPUTS = ("input_ids", "token_type_ids", "attention_mask")


@torch.no_grad()
def logits_of(model, features, batch_size, device, precision, on_batch=None):
    """(example_ids, logits) per batch, in eval mode, longest examples first: batches of similar
    lengths waste the least padding. on_batch(done, total), if given, is called before each
    batch (progress lines). Leaves the model in eval mode."""
    model.eval()
    cls_only = model.bert.cls_only_last_layer
    model.bert.cls_only_last_layer = True                 # only the logits are read here
    n_batches = math.ceil(len(features.input_ids) / batch_size)
    try:
        for i, batch in enumerate(glue.batches(features, batch_size, seed=None, bucket=True)):
            if on_batch is not None:
                on_batch(i, n_batches)
            batch = to_device(batch, device)
            with autocast(device, precision):
                logits = model(*(batch[k] for k in MODEL_INPUTS)).logits.float()      # (B, labels)
            yield batch["example_ids"].tolist(), logits
    finally:
        model.bert.cls_only_last_layer = cls_only


def predict(model, features, batch_size, device, precision, on_batch=None):
    """Predictions in the order of `features`: class ids, or scores for regression."""
    out = [None] * len(features.input_ids)
    for ids, logits in logits_of(model, features, batch_size, device, precision, on_batch):
        preds = logits.squeeze(-1) if model.num_labels == 1 else logits.argmax(-1)
        for i, p in zip(ids, preds.tolist()):
            out[i] = p
    return out


def score_set(model, features, spec, batch_size, device, precision) -> dict:
    """The task's main metric (in percent) and mean task loss of the model on `features`: one
    point of a learning curve."""
    out, loss_sum = [None] * len(features.input_ids), 0.0
    for ids, logits in logits_of(model, features, batch_size, device, precision):
        labels = torch.tensor([features.labels[i] for i in ids], device=logits.device,
                              dtype=torch.float32 if spec.is_regression else torch.long)
        loss_sum += task_loss(logits, labels, spec.is_regression).item() * len(ids)
        preds = logits.squeeze(-1) if model.num_labels == 1 else logits.argmax(-1)
        for i, p in zip(ids, preds.tolist()):
            out[i] = p
    metric = glue.compute_metrics(spec.name, out, features.labels)[spec.main_metric]
    return {"metric": 100.0 * metric, "loss": loss_sum / len(out)}


def autocast(device, precision):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def prediction_spread(predictions, is_regression) -> dict:
    """How the dev predictions spread, to tell a run that collapsed to one answer: how many
    examples each class got (classification), or the scores' standard deviation (regression)."""
    if is_regression:
        return {"std": float(np.std(np.asarray(predictions, dtype=np.float64)))}
    classes, counts = np.unique(np.asarray(predictions), return_counts=True)
    return {"class_counts": {str(int(c)): int(n) for c, n in zip(classes, counts)}}


# ----------------------------------------------------------------------------- one run

# One --seed drives several random streams. Giving two generators the same integer would
# correlate them (the head's initial weights would equal the first noise draws, scaled), so
# each purpose gets its own seed derived from the run's.
STREAMS = {"head": 1, "dropout": 2, "noise": 3, "order": 4, "subset": 5}
# A method in --methods may carry training settings of its own, for ablations such as the paper's
# Table 2 (FT for 4 epochs next to FT, FT+Noise and LNSR for 3): "ft:epochs=4". Only settings of
# the training loop: the data and the model are loaded once for every run of a command.
VARIANT_SETTINGS = {"epochs": float, "lr": float, "warmup": float, "weight_decay": float,
                    "batch_size": int}


def parse_methods(text: str) -> list:
    """'ft,ft:epochs=4,lnsr' -> [("ft", {}), ("ft", {"epochs": 4.0}), ("lnsr", {})]."""
    methods = []
    for item in str(text).split(","):
        name, *overrides = [part.strip() for part in item.split(":")]
        if not name:
            continue
        settings = {}
        for override in overrides:
            key, _, value = override.partition("=")
            key = key.strip().replace("-", "_")
            if key not in VARIANT_SETTINGS or not value:
                raise InputError(f"--methods: cannot read {item!r}: after the method, give "
                                 f"setting=value with a setting among {', '.join(VARIANT_SETTINGS)} "
                                 "(example: ft:epochs=4)")
            try:
                settings[key] = VARIANT_SETTINGS[key](value)
            except ValueError:
                raise InputError(f"--methods: {key} in {item!r} is not a number") from None
            if not math.isfinite(settings[key]):
                raise InputError(f"--methods: {key} in {item!r} must be a finite number, "
                                 f"got {settings[key]}")
        methods.append((name, settings))
    if len({variant_name(n, s) for n, s in methods}) != len(methods):
        raise InputError(f"--methods: {text!r} names a method twice")
    return methods


def variant_name(method: str, settings: dict) -> str:
    """The run folder's name: the method, plus its own settings ("ft-epochs4")."""
    return method + "".join(f"-{k.replace('_', '-')}{v:g}" for k, v in sorted(settings.items()))


EVAL_SUBSET_SEED = 0      # every seed of a sweep is scored on the same dev examples
CURVE_TRAIN_SAMPLE = 512  # training examples scored at each epoch's end with --curves


def stream_seed(seed: int, stream: str, *more: int) -> int:
    """The seed of one random stream of a run, e.g. (seed, "dropout", step, rank)."""
    return int(np.random.SeedSequence([seed, STREAMS[stream], *more]).generate_state(1)[0])


class Split:
    """One split's examples, tokenized when a run asks for them: a run on a subset
    (--max-train-samples, --train-fraction, --max-eval-samples) tokenizes only its own rows, and
    each subset is tokenized once per command. Tokenizing is per example, so a subset's features
    are exactly those rows of the whole split's."""

    def __init__(self, examples, tokenizer, max_seq_length: int):
        glue.check_examples(examples)                # an unusable file fails before any run
        self.examples, self.tokenizer, self.max_seq_length = examples, tokenizer, max_seq_length
        self.encoded = {}                            # kept rows (None: all) -> glue.Features

    def __len__(self):
        return len(self.examples)

    def subset(self, n=None, fraction=None, seed=0) -> "glue.Features":
        """A seeded random subset, in the original order (as glue.subsample); all of it by default."""
        total = len(self.examples)
        keep = None
        if not (n is None and fraction is None or (n is not None and n >= total)):
            keep = tuple(glue.subset_indices(total, n=n, fraction=None if n is not None else fraction, seed=seed))
        if keep not in self.encoded:
            rows = self.examples if keep is None else [self.examples[i] for i in keep]
            self.encoded[keep] = glue.encode(rows, self.tokenizer, self.max_seq_length)
        return self.encoded[keep]


# Flags that do not change what a run computes.
NOT_SETTINGS = ("method", "methods", "seed", "seeds", "output_dir", "threads", "log_every", "save_model",
                "data_dir", "recipe", "dry_run", "claim_timeout", "data_parallel", "checkpoint_minutes",
                "checkpoint_steps")


def run_settings(args, spec, method_name, seed) -> dict:
    """Everything that defines one run's result, as recorded in its config.json."""
    method_cls, options = method_options(method_name, args)
    settings = {k: v for k, v in vars(args).items() if k not in NOT_SETTINGS and "__" not in k}
    settings.update(task=spec.name, method=method_name, seed=seed,
                    precision=args.recipe.precision, allow_tf32=args.recipe.allow_tf32,
                    data_seed=args.data_seed if args.data_seed is not None else seed,
                    init_seed=args.init_seed if args.init_seed is not None else seed,
                    method_options=dataclasses.asdict(options) if options else {})
    return settings


def check_finished_run(run_dir: Path, settings: dict):
    """A finished run is only skipped when it was made with the same settings."""
    try:
        old = with_legacy_settings(json.loads((run_dir / "config.json").read_text(encoding="utf-8"))["settings"])
    except (OSError, ValueError, KeyError, TypeError):
        raise InputError(f"{run_dir}: has results.json but no readable config.json; "
                         "delete the folder to run it again") from None
    differ = settings_differences(old, settings)
    if differ:
        raise InputError(f"{run_dir} holds a finished run with other settings ({'; '.join(differ[:3])}); "
                         "use another --output-dir")


def quiet(phase, done, total, logged):
    """A report callback that shows nothing (see `Reporter`)."""


def train_one(args, spec, method_name, seed, data, run_dir: Path, report=quiet, ranks=SingleProcess(),
              stop: checkpoint.StopRequest | None = None):
    """Fine-tune one model; write config.json, log.jsonl and results.json into run_dir.

    report(phase, done, total, logged) is called at every training step ("train"), before every
    evaluation batch ("dev", "training"), before a checkpoint or the files are written
    ("checkpoint", "write") and once if the run goes on from a checkpoint ("resume", at its
    step), with the last logged loss, penalty and lr. `ranks` is workers.SingleProcess, or
    workers.DataParallel when all torchrun ranks train this run: then each rank trains on its
    share of every batch, and rank 0 alone evaluates and writes. A run with a checkpoint.pt goes
    on from it (checkpoint.py); with `stop` (a checkpoint.StopRequest), a signal makes it save a
    checkpoint at the end of the step and raise checkpoint.RunStopped."""
    from bert.model import BertClassifier

    settings = run_settings(args, spec, method_name, seed)
    data_seed, init_seed = settings["data_seed"], settings["init_seed"]
    method_cls, options = method_options(method_name, args)
    train = data.train.subset(args.max_train_samples, args.train_fraction, stream_seed(data_seed, "subset"))
    dev = data.dev.subset(args.max_eval_samples, None, EVAL_SUBSET_SEED)
    partial = len(train.input_ids) < len(data.train) or len(dev.input_ids) < len(data.dev)
    scored = data.scored                                  # "dev", or "held_out" (--holdout)
    settings.update({"n_train": len(train.input_ids), f"n_{scored}": len(dev.input_ids)})
    if data.holdout_fingerprint:
        settings["holdout_fingerprint"] = data.holdout_fingerprint
    device = data.device
    saved = checkpoint.read(run_dir, settings)           # every rank reads; None for a new run
    files = RunFiles(run_dir, writes=ranks.is_main)
    config = {"settings": settings, "data_dir": args.data_dir, "device": str(device),
              "threads": torch.get_num_threads(), "versions": versions()}
    if saved:
        config["resumed_at_steps"] = saved["loop"]["resumed_at_steps"] + [saved["step"]]
    files.start(config, records=saved["log"] if saved else ())
    # A data-parallel run's ranks draw their own dropout masks and noise; one process keeps
    # the streams of a serial run.
    per_rank = () if ranks.world == 1 else (ranks.rank,)

    torch.manual_seed(stream_seed(seed, "dropout"))          # dropout draws from the global RNG
    model = BertClassifier(data.pretrained.config, spec.num_labels)
    model.load_state_dict(data.pretrained.state_dict())
    model.load_report = data.pretrained.load_report      # which weights the checkpoint lacked (L2-SP)
    model.init_head(torch.Generator().manual_seed(stream_seed(init_seed, "head")))
    model.to(device)
    method = method_cls(options)
    model.bert.cls_only_last_layer = not method.reads_hidden_states
    method.setup(model, stream_seed(seed, "noise", *per_rank))

    train_sample = None
    if args.curves:                      # the same training examples at every epoch's end
        keep = glue.subset_indices(len(train), n=min(CURVE_TRAIN_SAMPLE, len(train)), seed=EVAL_SUBSET_SEED)
        train_sample = glue.Features([train.input_ids[i] for i in keep], [train.token_type_ids[i] for i in keep],
                                     [train.labels[i] for i in keep], train.pad_id, train.is_regression)

    steps_per_epoch = math.ceil(len(train.input_ids) / args.batch_size)
    total_steps = max(1, math.ceil(steps_per_epoch * args.epochs))
    optimizer = optim.make_optimizer(model, args.optimizer, args.lr, args.weight_decay)
    scheduler = optim.LinearWarmupDecay(optimizer, total_steps, args.warmup)
    logged = {}                          # the last log line's loss, penalty and lr, for progress
    # Sums kept on the device and read every --log-every steps: no host sync per step.
    sum_loss = torch.zeros((), device=device)
    sum_penalty = torch.zeros((), device=device)
    step, since_log, seconds_before, resumed_at = 0, 0, 0.0, []
    if saved:                            # go on where the checkpoint left off
        checkpoint.restore(saved, model=model, optimizer=optimizer, scheduler=scheduler, method=method,
                           ranks=ranks, device=device)
        loop = saved["loop"]
        step, since_log, seconds_before = saved["step"], loop["since_log"], loop["train_seconds"]
        resumed_at, logged = loop["resumed_at_steps"] + [step], loop["logged"]
        sum_loss.copy_(loop["sum_loss"])
        sum_penalty.copy_(loop["sum_penalty"])
        report("resume", step, total_steps, logged)
    forward = ranks.wrap(model)          # the clean pass; DDP averages gradients over ranks
    every = checkpoint.Schedule(args.checkpoint_minutes, args.checkpoint_steps)

    def save_checkpoint():
        report("checkpoint", step, total_steps, logged)      # this worker must still hold the run
        loop = {"since_log": since_log, "sum_loss": sum_loss, "sum_penalty": sum_penalty,
                "train_seconds": time.time() - start, "resumed_at_steps": resumed_at, "logged": logged}
        state = checkpoint.capture(settings=settings, step=step, model=model, optimizer=optimizer,
                                   scheduler=scheduler, method=method, ranks=ranks, device=device,
                                   loop=loop, log=files.records)
        if ranks.is_main:
            checkpoint.save(run_dir, state)
        every.saved()

    model.train()
    start = time.time() - seconds_before
    epoch, position = divmod(step, steps_per_epoch)      # where the data order picks up
    if stop is not None:
        stop.training = True
    try:
        while step < total_steps:
            plan = glue.batches(train, args.batch_size, seed=stream_seed(data_seed, "order"), epoch=epoch)
            for batch in plan[position:]:
                if step >= total_steps:
                    break
                batch, weight = ranks.local_part(batch)          # the whole batch in one process
                batch = to_device(batch, device)
                if args.dropout_stream == "step":
                    # Dropout at step t depends on (seed, t) alone, not on how many masks the
                    # method drew before: ft and LNSR of one seed share every clean-pass mask
                    # below the last layer, and their scores can be compared seed by seed.
                    torch.manual_seed(stream_seed(seed, "dropout", step, *per_rank))
                with autocast(device, settings["precision"]):
                    outputs = forward(*(batch[k] for k in MODEL_INPUTS))
                    loss = task_loss(outputs.logits, batch["labels"], spec.is_regression)
                    penalty = method.penalty(model, batch, outputs)
                total = loss if penalty is None else loss + penalty
                if step == 0 and not torch.isfinite(total):      # one look at step 1: a bad input
                    reason = first_step_problem(model, batch, loss, penalty, method_name, options)
                    files.fail(reason, 1)
                    raise RunFailed(reason)
                if weight != 1.0:                # a data-parallel rank's share of the batch mean
                    total = total * weight
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                method.after_step(model)
                scheduler.step()
                step += 1
                since_log += 1
                share = weight / ranks.world     # so that the sum over ranks is the batch's mean
                sum_loss += loss.detach() * share if share != 1.0 else loss.detach()
                if penalty is not None:
                    sum_penalty += penalty.detach() * share if share != 1.0 else penalty.detach()
                log_step = step % args.log_every == 0 or step == total_steps
                if log_step:
                    mean_loss = ranks.all_sum(sum_loss).item() / since_log
                    mean_penalty = ranks.all_sum(sum_penalty).item() / since_log
                    if not (math.isfinite(mean_loss) and math.isfinite(mean_penalty)):
                        reason = (f"loss became {mean_loss} (penalty {mean_penalty}) by step {step}; "
                                  "try a smaller --lr or noise scale")
                        files.fail(reason, step)
                        checkpoint.remove(run_dir)       # retrying starts over, not from a bad state
                        raise RunFailed(reason)
                    lr = scheduler.get_last_lr()[0]
                    files.log({"step": step, "epoch": round(step / steps_per_epoch, 3), "loss": mean_loss,
                               "penalty": mean_penalty, "lr": lr, "elapsed": round(time.time() - start, 2)})
                    logged = {"loss": f"{mean_loss:.4f}", "penalty": f"{mean_penalty:.4g}", "lr": f"{lr:.2e}"}
                    sum_loss.zero_()
                    sum_penalty.zero_()
                    since_log = 0
                if args.curves and ranks.is_main and (step % steps_per_epoch == 0 or step == total_steps):
                    files.log(curve_point(model, spec, dev, scored, train_sample, step, steps_per_epoch,
                                          args.eval_batch_size, device, settings["precision"]))
                    model.train()
                report("train", step, total_steps, logged)
                # One process looks at every step; the ranks of a data-parallel run agree at the
                # log steps, where they meet anyway.
                if ranks.world == 1 or log_step:
                    stopping, due = ranks.any([stop is not None and stop.requested, every.due(step)])
                    if stopping or due:
                        save_checkpoint()
                    if stopping:
                        raise checkpoint.RunStopped(stop.signum or signal.SIGTERM, step, total_steps,
                                                    checkpoint.path_of(run_dir))
            epoch, position = epoch + 1, 0
    finally:
        if stop is not None:
            stop.training = False
    files.close()
    train_seconds = time.time() - start
    if not ranks.is_main:                # rank 0 evaluates the whole dev set and writes
        ranks.barrier()
        return None

    def on_eval_batch(phase, i, n):
        # A signal while one process evaluates: the trained state is saved, so that the run goes
        # on with its evaluation (a data-parallel run goes on from its last checkpoint instead).
        if stop is not None and stop.requested and ranks.world == 1:
            save_checkpoint()
            raise checkpoint.RunStopped(stop.signum, step, total_steps, checkpoint.path_of(run_dir))
        report(phase, i, n, logged)

    if stop is not None:
        stop.training = True
    try:
        dev_predictions = predict(model, dev, args.eval_batch_size, device, settings["precision"],
                                  on_batch=lambda i, n: on_eval_batch(scored, i, n))
        train_predictions = None
        if args.eval_train:
            train_predictions = predict(model, train, args.eval_batch_size, device, settings["precision"],
                                        on_batch=lambda i, n: on_eval_batch("training", i, n))
    finally:
        if stop is not None:
            stop.training = False
    dev_metrics = glue.compute_metrics(spec.name, dev_predictions, dev.labels)
    results = {"task": spec.name, "method": method_name, "seed": seed, "metric": spec.main_metric,
               "scored": scored, scored: dev_metrics,
               f"{scored}_predictions": prediction_spread(dev_predictions, spec.is_regression),
               "train_seconds": round(train_seconds, 2), "steps": total_steps,
               "n_train": len(train.input_ids), f"n_{scored}": len(dev.input_ids),
               "partial": partial,
               "max_train_samples": args.max_train_samples, "train_fraction": args.train_fraction,
               "max_eval_samples": args.max_eval_samples, "method_options": settings["method_options"]}
    if train_predictions is not None:
        results["train"] = glue.compute_metrics(spec.name, train_predictions, train.labels)
    report("write", 0, 1, logged)           # last check that this worker still holds the run
    if args.save_model:
        model.save_pretrained(run_dir / "model", tokenizer=data.tokenizer, label_names=spec.label_names)
    files.finish(results, dev_predictions, scored)
    checkpoint.remove(run_dir)
    ranks.barrier()
    return results


def curve_point(model, spec, scored_features, scored, train_sample, step, steps_per_epoch, batch_size,
                device, precision) -> dict:
    """A log.jsonl line of the learning curves: metric (percent) and mean task loss on the scored
    set and on the fixed training sample, at this step (the end of an epoch)."""
    return {"step": step, "epoch": round(step / steps_per_epoch, 3),
            "curves": {scored: score_set(model, scored_features, spec, batch_size, device, precision),
                       "train_sample": score_set(model, train_sample, spec, batch_size, device, precision)}}


def first_step_problem(model, batch, loss, penalty, method_name, options) -> str:
    """Which input made the first step's loss non-finite: before any update, the weights, the
    labels or the method's options are to blame, not the learning rate."""
    bad = lambda t: not bool(torch.isfinite(t).all())
    if bad(loss):
        weights = [name for name, p in model.named_parameters() if bad(p)]
        if weights:
            return (f"the task loss is {loss.item()} at step 1: the model's weights hold NaN or inf "
                    f"({', '.join(weights[:3])}{', ...' if len(weights) > 3 else ''}); check the checkpoint")
        if bad(batch["labels"].float()):
            return f"the task loss is {loss.item()} at step 1: a label of the first batch is NaN or inf"
        return (f"the task loss is {loss.item()} at step 1 with finite weights and labels: the model's "
                "activations overflow (check --precision and the checkpoint)")
    values = dataclasses.asdict(options) if options is not None else {}
    return (f"the {method_name} penalty is {penalty.item()} at step 1 (the task loss is {loss.item():.4f}): "
            f"its options ({', '.join(f'{k}={v}' for k, v in values.items())}) make it overflow")


class RunFailed(Exception):
    pass


# ----------------------------------------------------------------------------- the grid

def pick_device(name):
    """cuda when available (auto); under torchrun or srun, the GPU of this process's local rank."""
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available (use --device cpu)")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and local_index() is not None:
        torch.cuda.set_device(local_index() % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(name)


def cpu_flags() -> set:
    """The CPU's feature flags from /proc/cpuinfo (Linux); empty elsewhere."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return set(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
    except OSError:
        return set()


def native_bf16(device) -> bool:
    """Does the hardware compute bf16 matrix products natively?"""
    if device.type == "cuda":               # emulated bf16 (before Ampere) is slower than fp32
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


@dataclasses.dataclass(frozen=True)
class NumericRecipe:
    """How every run of one command computes: the format of its matrix products."""
    precision: str           # "fp32", "tf32" (CUDA: fp32 storage, TF32 tensor-core products) or "bf16"
    allow_tf32: bool         # torch.backends.cuda.matmul.allow_tf32 during the runs


def numeric_recipe(requested: str, methods, device_type: str, native: bool) -> NumericRecipe:
    """The precision policy: one recipe for every arm of a command, the strictest any arm needs.

    `methods` are the command's arms, Regularizer objects with their options.
    - Methods that perturb inputs or hidden states (`Regularizer.needs_fp32`: lnsr with its
      default difference estimator, noise, smart, r3f) need full fp32. LNSR's sigma 1e-4 on the
      embedding output (elements of size ~0.5) is ~2e-4 of a value, below the rounding error of
      both bf16 (up to 2^-8 ~ 4e-3 of a value, 7 mantissa bits) and TF32 (2^-11 ~ 5e-4, 10
      mantissa bits): in either format the penalty measures rounding error, not the noise
      (tests/test_train.py measures both). So with such a method, fp32 products stay fp32 on a
      GPU too: no TF32. `lnsr --lnsr-estimator jvp` computes J eps directly, without subtracting
      two passes, and tolerates both (tests/test_lnsr.py).
    - Table 1 compares arms trained alike, so a command's arms share one recipe: `auto` picks
      bf16 only if every arm tolerates it and the hardware computes it natively (a CUDA GPU with
      bf16, a CPU with avx512_bf16 or amx_bf16; elsewhere bf16 is emulated, slower than fp32),
      and full fp32 otherwise. `auto` never picks TF32.
    - An explicit format that some arm cannot take is refused before any work.
    """
    strict = sorted({method.name for method in methods if method.needs_fp32})
    if requested in ("bf16", "tf32") and strict:
        jvp = " or --lnsr-estimator jvp" if "lnsr" in strict else ""
        raise InputError(f"--precision {requested} with {', '.join(strict)}: its perturbations are below "
                         f"{requested}'s resolution, so its penalty would measure rounding error; "
                         f"use fp32 (auto picks it){jvp}")
    if requested == "tf32" and device_type != "cuda":
        raise InputError("--precision tf32: TF32 is a format of CUDA tensor cores; on a CPU use fp32 or bf16")
    if requested == "auto":
        requested = "bf16" if native and not strict else "fp32"
    return NumericRecipe(precision=requested, allow_tf32=requested == "tf32")


def make_deterministic():
    """Deterministic kernels for CUDA. cuBLAS reads its workspace setting when its first handle is
    made, so this runs before anything touches the GPU."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)


def apply_recipe(recipe: NumericRecipe):
    """Set torch's global switches for fp32 matrix products (they only matter on CUDA)."""
    torch.backends.cuda.matmul.allow_tf32 = recipe.allow_tf32
    torch.backends.cudnn.allow_tf32 = recipe.allow_tf32


def keep_freed_memory():
    """Ask glibc to keep the large blocks a training step frees, for the next step to reuse.

    Every step allocates and frees the same large tensors (a (32, 12, 128, 128) attention map is
    25 MB). By default glibc may hand such blocks back to the kernel when they are freed (blocks
    above its mmap threshold are unmapped; the heap's top is trimmed), and the next step then
    page-faults the same memory back in, zero-filled by the kernel. Measured for LNSR on MiniLM,
    batch 32 x 128: about 0.2 GB of page faults and 0.3-0.6 s of kernel time per step. A fixed
    32 MiB mmap threshold (glibc's largest) and a 1 GiB trim threshold keep those blocks in the
    heap. Linux with glibc only; elsewhere, or if libc cannot be loaded, this does nothing.

    The price is memory: batches of changing shapes fragment the heap, and a run's resident
    memory grows (docs/USAGE.md, "Memory on a CPU grows during a run"). A user who sets glibc's
    own MALLOC_MMAP_THRESHOLD_ or MALLOC_TRIM_THRESHOLD_ has chosen otherwise: then this does nothing.
    """
    if not sys.platform.startswith("linux") or {"MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"} & set(os.environ):
        return
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3          # from glibc's <malloc.h>
    mallopt(M_MMAP_THRESHOLD, 32 * 2**20)
    mallopt(M_TRIM_THRESHOLD, 2**30)


def load_data(args, spec, device, status, argv):
    """Load the checkpoint and tokenize once for the whole grid of runs, before any run starts,
    so that a bad model or data folder stops the command without leaving half-made runs."""
    from bert.hub import resolve
    from bert.model import BertClassifier
    from bert.tokenizer import Tokenizer
    status.say(f"loading model {args.model} and {spec.name} data ...")
    model_error = data_error = None
    try:
        model_dir = resolve(args.model)
    except InputError as e:
        model_error = e
    try:
        splits = ["train"] if args.holdout else ["train", "dev"]     # a held-out run never opens dev
        glue.ensure_task_data(spec.name, args.data_dir, splits=splits)   # downloads what is missing
    except InputError as e:
        data_error = e
    if model_error or data_error:
        raise InputError(cannot_start(args, spec, argv, model_error, data_error))
    pretrained = BertClassifier.from_pretrained(model_dir, num_labels=spec.num_labels, verbose=False)
    positions = pretrained.config.max_position_embeddings
    if args.max_seq_length > positions:
        raise InputError(f"--max-seq-length {args.max_seq_length}: {args.model} has {positions} positions")
    tokenizer = Tokenizer.from_dir(model_dir)
    train_examples = glue.load_examples(spec.name, "train", args.data_dir)
    scored, fingerprint = "dev", None
    if args.holdout:                      # the scored set is a fixed part of the training set
        kept, held_out = glue.holdout_split(len(train_examples), args.holdout)
        dev_examples = [train_examples[i] for i in held_out]
        train_examples = [train_examples[i] for i in kept]
        scored, fingerprint = "held_out", glue.split_fingerprint(held_out)
    else:
        dev_examples = glue.load_examples(spec.name, "dev", args.data_dir)
    train = Split(train_examples, tokenizer, args.max_seq_length)
    dev = Split(dev_examples, tokenizer, args.max_seq_length)
    status.say(f"{spec.name}: {len(train)} training and {len(dev)} {SCORED_NAMES[scored]} examples, "
               f"{args.model} with {pretrained.config.num_hidden_layers} layers")
    return types.SimpleNamespace(train=train, dev=dev, tokenizer=tokenizer, pretrained=pretrained,
                                 device=device, scored=scored, holdout_fingerprint=fingerprint)


SCORED_NAMES = {"dev": "dev", "held_out": "held-out"}      # what the scored set is called in messages


def cannot_start(args, spec, argv, model_error, data_error) -> str:
    """One line: what could not be had, and the command that works without a network."""
    from bert.hub import EMBEDDED
    missing = []
    if model_error:
        missing.append(f"model {args.model}: " + str(model_error).splitlines()[0].removesuffix(" Looked at:"))
    if data_error:
        reason = re.search(r"\(([^()]*)\)", str(data_error))
        data_dir = args.data_dir or glue.default_data_dir()
        missing.append(f"{spec.name} data: not in {data_dir}, and the download failed"
                       + (f" ({reason[1]})" if reason else f" ({data_error})"))
    offline = replace_flag(argv, "--model", EMBEDDED) if model_error else list(argv)
    if data_error:
        offline = replace_flag(offline, "--data-dir", "DIR")
        how = (f"put {spec.dir_name}/{spec.splits['train'].file} and {spec.dir_name}/{spec.splits['dev'].file} "
               f"in a folder DIR (`python -m glue.download {spec.name} --data-dir DIR` fetches them "
               "where there is internet), then run")
    else:
        how = "this works"
    return f"cannot start: {'; '.join(missing)}. Offline, {how}: python train.py {shlex.join(offline)}"


def replace_flag(argv, flag, value) -> list:
    """argv with `flag value` set (replaced if present, as `flag v` or `flag=v`, else added)."""
    out, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
        elif a == flag:
            skip = True
        elif not a.startswith(flag + "="):
            out.append(a)
    return out + [flag, value]


def default_model(device) -> tuple:
    """The paper's BERT-Large on a GPU; elsewhere the embedded MiniLM, and a line that says so."""
    from bert.hub import EMBEDDED
    if device.type == "cuda":
        return PAPER_MODEL, None
    return EMBEDDED, (f"no GPU here: training the embedded MiniLM-L6 ({EMBEDDED}, 6 layers), not the paper's "
                      f"BERT-Large; --model {PAPER_MODEL} asks for that")


def flag_of(dest: str) -> str:
    """The command-line flag of an argparse dest: max_grad_norm -> --max-grad-norm,
    lnsr__relative_sigma (a method option) -> --lnsr-relative-sigma."""
    return "--" + dest.replace("__", "-").replace("_", "-")


def check_finite_numbers(args):
    """argparse's float() reads 'nan', 'inf' and '-inf'; no setting of a run means either, and a
    NaN passes every range check below (every comparison with it is false)."""
    for dest, value in vars(args).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise InputError(f"{flag_of(dest)} must be a finite number, got {value}")


def check_method_flags(args):
    """Every method's flags, also those of methods this command does not run: a value that one
    method would refuse is refused whichever methods run (its options check it)."""
    for name in regularizers.METHODS:
        method_options(name, args)


def check_args(args):
    check_finite_numbers(args)
    check_method_flags(args)
    folder_to_write(args.output_dir, "--output-dir")
    if args.data_dir is not None:         # read from, or downloaded into: it must be there
        existing_folder(args.data_dir, "--data-dir")
    for name in ("epochs", "batch_size", "eval_batch_size", "lr", "max_seq_length", "log_every",
                 "max_grad_norm"):
        if getattr(args, name) <= 0:
            raise InputError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    for name in ("seed", "data_seed", "init_seed"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            raise InputError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.train_fraction is not None and args.max_train_samples is not None:
        raise InputError("give --train-fraction or --max-train-samples, not both")
    if args.holdout is not None and not 0 < args.holdout < 1:
        raise InputError(f"--holdout must be in (0, 1), got {args.holdout}")
    if args.train_fraction is not None and not 0 < args.train_fraction <= 1:
        raise InputError(f"--train-fraction must be in (0, 1], got {args.train_fraction}")
    for name in ("max_train_samples", "max_eval_samples"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise InputError(f"--{name.replace('_', '-')} must be > 0")
    if not 0 <= args.warmup < 1:
        raise InputError(f"--warmup must be in [0, 1), got {args.warmup}")
    if args.weight_decay < 0:
        raise InputError(f"--weight-decay must be >= 0, got {args.weight_decay}")
    if args.threads is not None and args.threads < 1:
        raise InputError(f"--threads must be >= 1, got {args.threads}")
    if args.claim_timeout <= 0:
        raise InputError(f"--claim-timeout must be > 0, got {args.claim_timeout}")
    if args.checkpoint_minutes < 0 or args.checkpoint_steps < 0:
        raise InputError("--checkpoint-minutes and --checkpoint-steps must be >= 0 (0: off)")


class Reporter:
    """A run's status line: its place in the grid, its phase, and the time left for it all."""

    def __init__(self, status, clock, index, label, claim=None):
        self.status, self.clock, self.index, self.label = status, clock, index, label
        self.claim = claim                   # this worker's claim on the run, if it holds one
        self.start = time.time()
        self.train_seconds = 0.0
        self.steps = 0
        self.first_step = 0                  # > 0 when the run went on from a checkpoint

    def __call__(self, phase, done, total, logged):
        if self.claim is not None:
            self.claim.progress()            # the heartbeat goes on only while the run moves
            writes = phase in ("write", "checkpoint")
            if self.claim.lost or (writes and not self.claim.owned()):
                raise RunAbandoned("another worker took it over; this worker writes nothing more to it")
        if phase in ("write", "checkpoint"):
            return
        if phase == "resume":
            self.first_step = self.steps = done
            self.status.say(f"{self.label} goes on from its checkpoint at step {done}/{total}")
            return
        elapsed = time.time() - self.start
        if phase == "train":
            self.train_seconds, self.steps = elapsed, done
            text = f"{self.label} step {done}/{total}" + "".join(f" {k} {v}" for k, v in logged.items())
            force = done == self.first_step + 1 or done == total
        else:
            text = f"{self.label} evaluating the {phase} set: batch {done + 1}/{total}"
            force = done == 0
        left = self.clock.seconds_left(self.index, self.steps, self.train_seconds,
                                       steps_timed=self.steps - self.first_step)
        text += f" | elapsed {format_seconds(elapsed)}" + (
            f", all runs done in about {format_seconds(left)}" if left is not None else "")
        self.status.status(text, force)

    def finished(self, train_seconds):
        self.status.end()
        self.clock.finished(self.index, self.train_seconds, time.time() - self.start,
                            steps_timed=self.steps - self.first_step)


class RunAbandoned(Exception):
    """Another worker took this run over (this one stalled past --claim-timeout)."""


class Grid:
    """The runs of one command, each claimed, trained or skipped by `train_or_skip`."""

    def __init__(self, args, spec, data, todo, ranks, status, clock, started, stop=None):
        self.args, self.spec, self.data, self.todo = args, spec, data, todo
        self.ranks, self.status, self.clock, self.started = ranks, status, clock, started
        self.stop = stop                     # a checkpoint.StopRequest: signals save and stop the run
        self.trained, self.failed, self.others = [], 0, 0

    def train_or_skip(self, i) -> str:
        """"trained", "failed", "done" (by another worker) or "held" (by a live one)."""
        method_name, folder, method_args, seed = self.todo[i]
        run_dir = Path(self.args.output_dir) / self.spec.name / folder / seed_folder(seed)
        name = f"{self.spec.name} {folder} seed {seed}"
        # Claim the run before training it (workers.py): other copies of this command skip it.
        claim = claim_run(run_dir, self.args.claim_timeout, self.started) if self.ranks.is_main else None
        why_not = self.ranks.decide(None if isinstance(claim, Claim) else claim)
        if why_not is not None:
            held = why_not.startswith("claimed")
            if not held:
                self.status.say(f"skipped {name}: {why_not}")
                self.clock.skipped(i)
                self.others += 1
            return "held" if held else "done"
        self.status.say(f"run {i + 1}/{len(self.todo)}: {name} -> {run_dir}")
        # One process abandons a run it lost at its next step; the ranks of a data-parallel run
        # would have to agree on that at every step, so they keep going (only a stall past
        # --claim-timeout loses a claim).
        mine = claim if isinstance(claim, Claim) and self.ranks.world == 1 else None
        report = Reporter(self.status, self.clock, i, f"[{name}]", mine)
        try:
            r = train_one(method_args, self.spec, method_name, seed, self.data, run_dir, report, self.ranks,
                          self.stop)
        except (checkpoint.RunStopped, InputError):
            self.status.end()
            raise                            # the run stays unfinished, to go on next time
        except RunFailed as e:
            self.status.say(f"run failed: {e}")
            self.failed += 1
            return "failed"
        except RunAbandoned as e:
            self.status.say(f"abandoned {name}: {e}")
            return "held"                    # visited again until its new owner finishes it
        except Exception as e:                # a bug or the machine (out of memory): on record
            self.status.end()
            if self.ranks.is_main:
                write_json(run_dir / "failed.json", {"status": "failed", "reason": f"{type(e).__name__}: {e}"})
            raise
        finally:
            if isinstance(claim, Claim):
                claim.release()
        self.trained.append(name)
        if r is not None:
            report.finished(r["train_seconds"])
            self.status.say(run_summary(r, self.data))
        return "trained"


def run_summary(r, data) -> str:
    """The line printed when a run ends: its dev score and what makes it unlike a full run."""
    scored = scored_set(r)
    name = SCORED_NAMES[scored]
    line = f"  {name} {r['metric']} = {r[scored][r['metric']]:.4f}  ({r['train_seconds']:.0f} s)"
    notes = []
    answer = one_answer(r)
    if answer:
        notes.append(f"collapsed: {answer}")
    if r["n_train"] < len(data.train):
        notes.append(f"trained on {r['n_train']} of {len(data.train)} examples")
    if r[f"n_{scored}"] < len(data.dev):
        notes.append(f"scored on {r[f'n_{scored}']} of {len(data.dev)} {name} examples")
    return line + (f"  [{'; '.join(notes)}]" if notes else "")


def planned_steps(args, n_train_full: int) -> int:
    """The training steps of one run: the same count train_one computes."""
    n = n_train_full
    if args.max_train_samples is not None:
        n = min(n, args.max_train_samples)
    elif args.train_fraction is not None:
        n = len(glue.subset_indices(n_train_full, fraction=args.train_fraction, seed=0))
    return max(1, math.ceil(math.ceil(n / args.batch_size) * args.epochs))


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    stop = checkpoint.StopRequest()
    if not args.dry_run:
        stop.install()
    try:
        return run_command(args, argv, stop)
    finally:
        stop.uninstall()


def run_command(args, argv, stop) -> int:
    """main() with the signal handlers in place: the exit status."""
    status = StatusLine()
    try:
        check_args(args)
        if args.deterministic and not args.dry_run:
            make_deterministic()
        spec = glue.get_task(args.task)
        for split in ("train",) if args.holdout else ("train", "dev"):   # AX is test-only: say so now
            spec.split_layout(split)
        device = pick_device(args.device)
        if args.data_parallel and args.dropout_stream != "step":
            raise InputError("--data-parallel needs --dropout-stream step (each rank seeds its own "
                             "dropout at every step)")
        ranks = DataParallel(device) if args.data_parallel and not args.dry_run else SingleProcess()
        # A dry run starts no process group; it still checks finished runs against the world size.
        args.data_parallel_ranks = (int(os.environ.get("WORLD_SIZE", 1)) if args.data_parallel and args.dry_run
                                    else ranks.world)
        if not ranks.is_main:
            status = StatusLine(quiet=True)           # rank 0 speaks for the run
        model_note = None
        if args.model is None:
            args.model, model_note = default_model(device)
        variants = parse_methods(args.methods or args.method or "lnsr")
        # Unknown names and bad values fail before any work; then one recipe for every arm.
        arms = [method_cls(options) for method_cls, options in (method_options(m, args) for m, _ in variants)]
        args.recipe = numeric_recipe(args.precision, arms, device.type, native_bf16(device))
        apply_recipe(args.recipe)
        methods = []                              # (method, run folder name, the run's args)
        for m, own_settings in variants:
            method_args = argparse.Namespace(**{**vars(args), **own_settings})
            check_args(method_args)
            methods.append((m, variant_name(m, own_settings), method_args))
        seeds = parse_seeds(args.seeds) if args.seeds else [args.seed if args.seed is not None else 1]
        if model_note:                            # said once every flag has been checked
            status.say(model_note)
        if args.threads:
            torch.set_num_threads(args.threads)
        keep_freed_memory()
        runs = [(m, folder, method_args, s) for m, folder, method_args in methods for s in seeds]
        todo = []                                 # indices into runs
        for i, (m, folder, method_args, s) in enumerate(runs):
            run_dir = Path(args.output_dir) / spec.name / folder / seed_folder(s)
            finished = (run_dir / "results.json").exists()
            saved = None
            if finished:
                check_finished_run(run_dir, run_settings(method_args, spec, m, s))
            else:
                todo.append(i)
                # A checkpoint this run cannot use stops the command now, not hours into the grid.
                saved = checkpoint.read(run_dir, run_settings(method_args, spec, m, s))
            if args.dry_run:
                held = None if finished else read_claim(run_dir)
                state = "to run" + (f", from its checkpoint at step {saved['step']}" if saved else "")
                print(f"{run_dir}: " + ("finished, same settings" if finished else
                                        f"{state} ({describe_claim(held)})" if held else state))
        if args.dry_run:
            print(f"{len(runs)} runs, {len(todo)} to run (dry run: nothing was trained)", file=sys.stderr)
            return 0
        # Ranks of one data-parallel run follow rank 0's list: a run another worker finishes
        # while they look must not put them out of step.
        todo = [runs[i] for i in ranks.decide(todo)]
        if len(todo) < len(runs):
            status.say(f"{len(runs) - len(todo)} of {len(runs)} runs already have results.json: skipped")
        if not todo:
            ranks.close()
            return 0
        if not ranks.is_main:                     # rank 0 downloads what is missing, then the rest read
            ranks.barrier()
        data = load_data(args, spec, device, status, argv)
        if ranks.is_main:
            ranks.barrier()
        for m in {m for m, *_ in todo}:           # options that do not fit this model: before any run
            method_cls, options = method_options(m, args)
            method_cls(options).check(data.pretrained.config)
        clock = GridClock([(m, planned_steps(a, len(data.train))) for m, _, a, _ in todo])
        grid = Grid(args, spec, data, todo, ranks, status, clock, started=time.time(), stop=stop)
        pending = list(range(len(todo)))
        while pending:
            # Runs that live workers hold are visited again until they are finished, or taken
            # over here if their worker dies (workers.py), so that no run is left untrained.
            pending = [i for i in pending if grid.train_or_skip(i) == "held"]
            if pending:
                status.status(f"waiting for {len(pending)} run(s) that other workers hold", force=True)
                time.sleep(min(5.0, args.claim_timeout / 5))
        status.end()
        if ranks.is_main:
            status.say(f"{worker_name()} trained {len(grid.trained)} run(s)"
                       + (f": {', '.join(grid.trained)}" if grid.trained else "")
                       + (f"; {grid.others} finished or failed by other workers" if grid.others else ""))
        ranks.close()
        failed = grid.failed
        return 1 if failed else 0
    except InputError as e:
        status.end()
        print(f"error: {e}", file=sys.stderr)
        return 2
    except checkpoint.RunStopped as e:
        status.end()
        print(f"\n{e}; the same command goes on from there", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        status.end()
        print("\ninterrupted: finished runs and saved checkpoints are kept; the same command goes on "
              "from there", file=sys.stderr)
        return 128 + (stop.signum or signal.SIGINT)


if __name__ == "__main__":
    sys.exit(main())
