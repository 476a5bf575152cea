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
import sys
import time
import types
import typing
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import glue
import optim
import regularizers
from progress import GridClock, StatusLine, format_seconds
from bert.errors import InputError, existing_folder, folder_to_write
from run_records import RunFiles, one_answer, parse_seeds, seed_folder, with_legacy_settings, write_json
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
                   help="evaluate on a seeded random subset of this many dev examples")
    p.add_argument("--eval-train", action="store_true",
                   help="also report the metric on the training set at the end (generalization gap)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: cuda when available")
    p.add_argument("--precision", choices=["auto", "fp32", "tf32", "bf16"], default="auto",
                   help="the format of matrix products, one for every run of the command (weights and "
                        "optimizer stay fp32). fp32: full fp32, also on a GPU (no TF32). tf32 (CUDA only): "
                        "TF32 tensor cores for fp32 products. bf16: bfloat16 autocast. auto: bf16 if every "
                        "method of the command tolerates it and the hardware computes it natively (a CUDA "
                        "GPU with bf16, a CPU with avx512_bf16 or amx_bf16), else fp32. lnsr, noise, smart "
                        "and r3f perturb by less than bf16's and TF32's rounding step, so with any of them "
                        "auto is fp32 for every arm and bf16 or tf32 are refused. config.json records the "
                        "resolved precision and whether TF32 was allowed")
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
def predict(model, features, batch_size, device, precision, on_batch=None):
    """Predictions in the order of `features`: class ids, or scores for regression.

    on_batch(done, total), if given, is called before each batch (progress lines)."""
    model.eval()
    cls_only = model.bert.cls_only_last_layer
    model.bert.cls_only_last_layer = True                 # only the logits are read here
    n = len(features.input_ids)
    out = [None] * n
    n_batches = math.ceil(n / batch_size)
    # Longest first: batches of similar lengths waste the least padding.
    for i, batch in enumerate(glue.batches(features, batch_size, seed=None, bucket=True)):
        if on_batch is not None:
            on_batch(i, n_batches)
        batch = to_device(batch, device)
        with autocast(device, precision):
            logits = model(*(batch[k] for k in MODEL_INPUTS)).logits.float()
        preds = logits.squeeze(-1) if model.num_labels == 1 else logits.argmax(-1)
        for i, p in zip(batch["example_ids"].tolist(), preds.tolist()):
            out[i] = p
    model.bert.cls_only_last_layer = cls_only
    return out


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
        methods.append((name, settings))
    if len({variant_name(n, s) for n, s in methods}) != len(methods):
        raise InputError(f"--methods: {text!r} names a method twice")
    return methods


def variant_name(method: str, settings: dict) -> str:
    """The run folder's name: the method, plus its own settings ("ft-epochs4")."""
    return method + "".join(f"-{k.replace('_', '-')}{v:g}" for k, v in sorted(settings.items()))


EVAL_SUBSET_SEED = 0      # every seed of a sweep is scored on the same dev examples


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
                "data_dir", "recipe", "dry_run", "claim_timeout", "data_parallel")


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
    differ = [f"{k}: {old.get(k)!r} there, {v!r} now" for k, v in settings.items()
              if json.loads(json.dumps(old.get(k), default=str)) != json.loads(json.dumps(v, default=str))]
    if differ:
        raise InputError(f"{run_dir} holds a finished run with other settings ({'; '.join(differ[:3])}); "
                         "use another --output-dir")


def quiet(phase, done, total, logged):
    """A report callback that shows nothing (see `Reporter`)."""


def train_one(args, spec, method_name, seed, data, run_dir: Path, report=quiet, ranks=SingleProcess()):
    """Fine-tune one model; write config.json, log.jsonl and results.json into run_dir.

    report(phase, done, total, logged) is called at every training step ("train"), before every
    evaluation batch ("dev", "training") and before the files are written ("write"), with the last
    logged loss, penalty and lr. `ranks` is
    workers.SingleProcess, or workers.DataParallel when all torchrun ranks train this run: then
    each rank trains on its share of every batch, and rank 0 alone evaluates and writes."""
    from bert.model import BertClassifier

    settings = run_settings(args, spec, method_name, seed)
    data_seed, init_seed = settings["data_seed"], settings["init_seed"]
    method_cls, options = method_options(method_name, args)
    train = data.train.subset(args.max_train_samples, args.train_fraction, stream_seed(data_seed, "subset"))
    dev = data.dev.subset(args.max_eval_samples, None, EVAL_SUBSET_SEED)
    partial = len(train.input_ids) < len(data.train) or len(dev.input_ids) < len(data.dev)
    settings.update(n_train=len(train.input_ids), n_dev=len(dev.input_ids))
    device = data.device
    files = RunFiles(run_dir, writes=ranks.is_main)
    files.start({"settings": settings, "data_dir": args.data_dir, "device": str(device),
                 "threads": torch.get_num_threads(), "versions": versions()})
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
    forward = ranks.wrap(model)          # the clean pass; DDP averages gradients over ranks

    steps_per_epoch = math.ceil(len(train.input_ids) / args.batch_size)
    total_steps = max(1, math.ceil(steps_per_epoch * args.epochs))
    optimizer = optim.make_optimizer(model, args.optimizer, args.lr, args.weight_decay)
    scheduler = optim.LinearWarmupDecay(optimizer, total_steps, args.warmup)
    logged = {}                          # the last log line's loss, penalty and lr, for progress

    model.train()
    start, step, epoch = time.time(), 0, 0
    # Sums kept on the device and read every --log-every steps: no host sync per step.
    sum_loss = torch.zeros((), device=device)
    sum_penalty = torch.zeros((), device=device)
    since_log = 0
    while step < total_steps:
        for batch in glue.batches(train, args.batch_size, seed=stream_seed(data_seed, "order"), epoch=epoch):
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
            if weight != 1.0:                # a data-parallel rank's share of the batch mean
                total = total * weight
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
            # Only the weights and Adam's state outlive a step. Kept until the next step replaces
            # them, its gradients and hidden states would sit in the middle of the heap while that
            # step's forward pass allocates around them (docs/SPEED.md, "Memory on a CPU").
            optimizer.zero_grad(set_to_none=True)
            del outputs, loss, penalty, total
            if step % args.log_every == 0 or step == total_steps:
                mean_loss = ranks.all_sum(sum_loss).item() / since_log
                mean_penalty = ranks.all_sum(sum_penalty).item() / since_log
                if not (math.isfinite(mean_loss) and math.isfinite(mean_penalty)):
                    reason = (f"loss became {mean_loss} (penalty {mean_penalty}) by step {step}; "
                              "try a smaller --lr or noise scale")
                    files.fail(reason, step)
                    raise RunFailed(reason)
                lr = scheduler.get_last_lr()[0]
                files.log({"step": step, "epoch": round(step / steps_per_epoch, 3), "loss": mean_loss,
                           "penalty": mean_penalty, "lr": lr, "elapsed": round(time.time() - start, 2)})
                logged = {"loss": f"{mean_loss:.4f}", "penalty": f"{mean_penalty:.4g}", "lr": f"{lr:.2e}"}
                sum_loss.zero_()
                sum_penalty.zero_()
                since_log = 0
            report("train", step, total_steps, logged)
        epoch += 1
    files.close()
    train_seconds = time.time() - start
    if not ranks.is_main:                # rank 0 evaluates the whole dev set and writes
        ranks.barrier()
        return None

    dev_predictions = predict(model, dev, args.eval_batch_size, device, settings["precision"],
                              on_batch=lambda i, n: report("dev", i, n, logged))
    dev_metrics = glue.compute_metrics(spec.name, dev_predictions, dev.labels)
    results = {"task": spec.name, "method": method_name, "seed": seed, "metric": spec.main_metric,
               "dev": dev_metrics, "dev_predictions": prediction_spread(dev_predictions, spec.is_regression),
               "train_seconds": round(train_seconds, 2), "steps": total_steps,
               "n_train": len(train.input_ids), "n_dev": len(dev.input_ids),
               "partial": partial,
               "max_train_samples": args.max_train_samples, "train_fraction": args.train_fraction,
               "max_eval_samples": args.max_eval_samples, "method_options": settings["method_options"]}
    if args.eval_train:
        train_predictions = predict(model, train, args.eval_batch_size, device, settings["precision"],
                                    on_batch=lambda i, n: report("training", i, n, logged))
        results["train"] = glue.compute_metrics(spec.name, train_predictions, train.labels)
    report("write", 0, 1, logged)           # last check that this worker still holds the run
    if args.save_model:
        model.save_pretrained(run_dir / "model", tokenizer=data.tokenizer, label_names=spec.label_names)
    files.finish(results, dev_predictions)
    ranks.barrier()
    return results


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


def numeric_recipe(requested: str, method_classes, device_type: str, native: bool) -> NumericRecipe:
    """The precision policy: one recipe for every arm of a command, the strictest any arm needs.

    - Methods that perturb inputs or hidden states (`Regularizer.needs_fp32`: lnsr, noise, smart,
      r3f) need full fp32. LNSR's sigma 1e-4 on the embedding output (elements of size ~0.5) is
      ~2e-4 of a value, below the rounding error of both bf16 (up to 2^-8 ~ 4e-3 of a value, 7
      mantissa bits) and TF32 (2^-11 ~ 5e-4, 10 mantissa bits): in either format the penalty
      measures rounding error, not the noise (tests/test_train.py measures both). So with such a
      method, fp32 products stay fp32 on a GPU too: no TF32.
    - Table 1 compares arms trained alike, so a command's arms share one recipe: `auto` picks
      bf16 only if every arm tolerates it and the hardware computes it natively (a CUDA GPU with
      bf16, a CPU with avx512_bf16 or amx_bf16; elsewhere bf16 is emulated, slower than fp32),
      and full fp32 otherwise. `auto` never picks TF32.
    - An explicit format that some arm cannot take is refused before any work.
    """
    strict = sorted({cls.name for cls in method_classes if cls.needs_fp32})
    if requested in ("bf16", "tf32") and strict:
        raise InputError(f"--precision {requested} with {', '.join(strict)}: its perturbations are below "
                         f"{requested}'s resolution, so its penalty would measure rounding error; "
                         "use fp32 (auto picks it)")
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
        glue.ensure_task_data(spec.name, args.data_dir, splits=["train", "dev"])   # downloads what is missing
    except InputError as e:
        data_error = e
    if model_error or data_error:
        raise InputError(cannot_start(args, spec, argv, model_error, data_error))
    pretrained = BertClassifier.from_pretrained(model_dir, num_labels=spec.num_labels, verbose=False)
    positions = pretrained.config.max_position_embeddings
    if args.max_seq_length > positions:
        raise InputError(f"--max-seq-length {args.max_seq_length}: {args.model} has {positions} positions")
    tokenizer = Tokenizer.from_dir(model_dir)
    train = Split(glue.load_examples(spec.name, "train", args.data_dir), tokenizer, args.max_seq_length)
    dev = Split(glue.load_examples(spec.name, "dev", args.data_dir), tokenizer, args.max_seq_length)
    status.say(f"{spec.name}: {len(train)} training and {len(dev)} dev examples, "
               f"{args.model} with {pretrained.config.num_hidden_layers} layers")
    return types.SimpleNamespace(train=train, dev=dev, tokenizer=tokenizer, pretrained=pretrained,
                                 device=device)


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


def check_args(args):
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


class Reporter:
    """A run's status line: its place in the grid, its phase, and the time left for it all."""

    def __init__(self, status, clock, index, label, claim=None):
        self.status, self.clock, self.index, self.label = status, clock, index, label
        self.claim = claim                   # this worker's claim on the run, if it holds one
        self.start = time.time()
        self.train_seconds = 0.0
        self.steps = 0

    def __call__(self, phase, done, total, logged):
        if self.claim is not None:
            self.claim.progress()            # the heartbeat goes on only while the run moves
            if self.claim.lost or (phase == "write" and not self.claim.owned()):
                raise RunAbandoned("another worker took it over; this worker writes nothing more to it")
        if phase == "write":
            return
        elapsed = time.time() - self.start
        if phase == "train":
            self.train_seconds, self.steps = elapsed, done
            text = f"{self.label} step {done}/{total}" + "".join(f" {k} {v}" for k, v in logged.items())
            force = done == 1 or done == total
        else:
            text = f"{self.label} evaluating the {phase} set: batch {done + 1}/{total}"
            force = done == 0
        left = self.clock.seconds_left(self.index, self.steps, self.train_seconds)
        text += f" | elapsed {format_seconds(elapsed)}" + (
            f", all runs done in about {format_seconds(left)}" if left is not None else "")
        self.status.status(text, force)

    def finished(self, train_seconds):
        self.status.end()
        self.clock.finished(self.index, train_seconds, time.time() - self.start)


class RunAbandoned(Exception):
    """Another worker took this run over (this one stalled past --claim-timeout)."""


class Grid:
    """The runs of one command, each claimed, trained or skipped by `train_or_skip`."""

    def __init__(self, args, spec, data, todo, ranks, status, clock, started):
        self.args, self.spec, self.data, self.todo = args, spec, data, todo
        self.ranks, self.status, self.clock, self.started = ranks, status, clock, started
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
            r = train_one(method_args, self.spec, method_name, seed, self.data, run_dir, report, self.ranks)
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
    line = f"  dev {r['metric']} = {r['dev'][r['metric']]:.4f}  ({r['train_seconds']:.0f} s)"
    notes = []
    answer = one_answer(r)
    if answer:
        notes.append(f"collapsed: {answer}")
    if r["n_train"] < len(data.train):
        notes.append(f"trained on {r['n_train']} of {len(data.train)} examples")
    if r["n_dev"] < len(data.dev):
        notes.append(f"scored on {r['n_dev']} of {len(data.dev)} dev examples")
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
    status = StatusLine()
    try:
        check_args(args)
        if args.deterministic and not args.dry_run:
            make_deterministic()
        spec = glue.get_task(args.task)
        for split in ("train", "dev"):            # AX is test-only: say so before loading a model
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
        classes = [method_options(m, args)[0] for m, _ in variants]
        args.recipe = numeric_recipe(args.precision, classes, device.type, native_bf16(device))
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
            if finished:
                check_finished_run(run_dir, run_settings(method_args, spec, m, s))
            else:
                todo.append(i)
            if args.dry_run:
                held = None if finished else read_claim(run_dir)
                print(f"{run_dir}: " + ("finished, same settings" if finished else
                                        f"to run ({describe_claim(held)})" if held else "to run"))
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
        grid = Grid(args, spec, data, todo, ranks, status, clock, started=time.time())
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
    except KeyboardInterrupt:
        status.end()
        print("\ninterrupted: finished runs are kept; run the same command again to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
