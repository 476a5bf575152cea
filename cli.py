"""train.py's command line: its flags (with one typed flag per method option, generated from
each method's Options dataclass), the checks that refuse bad values in one line before anything
is loaded or created, and the settings that define a run."""
import argparse
import dataclasses
import math
import sys
import types
import typing

import regularizers
from bert.errors import InputError, existing_folder, folder_to_write
from scoring import CURVE_TRAIN_SAMPLE

PAPER_MODEL = "bert-large-uncased-whole-word-masking"


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


class HelpFormatter(argparse.HelpFormatter):
    """Appends '(default: X)' to a flag's help once, and not when there is no default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "(default" not in text \
                and action.option_strings:
            text += " (default: %(default)s)"
        return text


def build_parser(recipe):
    """The flags of train.py; `recipe` (train.TrainConfig) gives the training settings' defaults."""
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
                        "per run, as the runs of results/glue were made")
    p.add_argument("--data-seed", type=int, default=None,
                   help="seed for data order and subsets only (default: --seed)")
    p.add_argument("--init-seed", type=int, default=None,
                   help="seed for the classifier head's initialisation only (default: --seed)")
    p.add_argument("--epochs", type=float, default=recipe.epochs, help="training epochs")
    p.add_argument("--batch-size", type=int, default=recipe.batch_size, help="training batch size")
    p.add_argument("--eval-batch-size", type=int, default=recipe.eval_batch_size, help="evaluation batch size")
    p.add_argument("--lr", type=float, default=recipe.lr, help="peak learning rate")
    p.add_argument("--warmup", type=float, default=recipe.warmup, help="fraction of steps for linear warm-up")
    p.add_argument("--weight-decay", type=float, default=recipe.weight_decay, help="decoupled weight decay")
    p.add_argument("--optimizer", choices=["adam", "adamw"], default=recipe.optimizer,
                   help="adam: Adam without bias correction (the paper's); adamw: torch.optim.AdamW")
    p.add_argument("--max-grad-norm", type=float, default=recipe.max_grad_norm, help="gradient-norm clipping")
    p.add_argument("--max-seq-length", type=int, default=recipe.max_seq_length,
                   help="truncate inputs to this many tokens")
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
