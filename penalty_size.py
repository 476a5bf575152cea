"""Where a strength puts the dial: a method's penalty against the task loss at the start of
training, measured without training. Run it through evaluate.py, with train.py's own flags:

    python evaluate.py penalty-size --task rte --model minilm-l6 --method lnsr --vary lnsr-sigma 1e-5 1e-4 1e-3
    python evaluate.py penalty-size --task rte --model bert-large-uncased-whole-word-masking --holdout 0.2 \\
        --method lnsr --vary lnsr-sigma 1e-5 1e-4 1e-3 --batches 20           # on a GPU

A regularizer acts through the size of its penalty R against the task loss L, and one sigma gives
penalties of very different sizes on different models. Eq. 2 (Hua et al., Section 3.1),

    R = sum_{r=b}^{L} lambda_r ||f^{b,r}(x^b + eps) - f^{b,r}(x^b)||^2,     eps ~ N(0, sigma^2 I),

sums squared distances over the layers above b and over each layer's tokens and hidden units, so R
grows with the depth, the width, and how much the model amplifies noise (the paper's Figure 1:
BERT-Large's upper layers amplify it, MiniLM-L6's damp it). This command measures, for the model
train.py starts from (Algorithm 1, line 1: `train.initial_model`),

    penalty / loss = mean_t R(theta_0; B_t) / mean_t L(f(x; theta_0), y)          t = 1..K,

on the first K batches train.py would train on, with the same seed, dropout masks and noise, in
training mode. Batch 1 is exactly train.py's step 1. The first log.jsonl line of a run reports the
same ratio averaged over steps 1..--log-every, while theta moves with the warm-up; this command
gives it before any run, for many strengths, in a few forward passes each.

On MiniLM-L6 at the tuned recipe (docs/RESULTS.md, "Tuned fairly", stage 2), strengths whose
penalty was a few percent of the task loss or more cost 9 to 16 points on held-out data or stopped
learning; the weakest (about 0.1%) tied ft. Use this to place a held-out grid (`--holdout`) on
your own model, not to choose a strength by itself.
"""
import argparse
import json
import math

import torch

import glue
import train
from bert.errors import InputError
from cli import build_parser, check_args, default_model, method_options, replace_flag, run_settings
from numerics import apply_recipe, autocast, native_bf16, numeric_recipe, pick_device
from progress import StatusLine
from scoring import MODEL_INPUTS, task_loss, to_device
from sweep import load_data

DEFAULT_BATCHES = 8


def measure(args, spec, data, method_name: str, seed: int, batches: int) -> dict:
    """The task loss and the penalty at theta_0 on each of the first `batches` training batches,
    computed as train.py's steps compute them (no update between batches)."""
    settings = run_settings(args, spec, method_name, seed)
    method_cls, options = method_options(method_name, args)
    method = method_cls(options)
    model = train.initial_model(data, spec, method, seed, settings["init_seed"], data.device)
    model.train()
    train_set = data.train.subset(args.max_train_samples, args.train_fraction,
                                  train.stream_seed(settings["data_seed"], "subset"))
    plan = glue.batches(train_set, args.batch_size, seed=train.stream_seed(settings["data_seed"], "order"), epoch=0)
    losses, penalties = [], []
    for step, batch in enumerate(plan[:batches]):
        batch = to_device(batch, data.device)
        if args.dropout_stream == "step":                  # as train.py's step `step`
            torch.manual_seed(train.stream_seed(seed, "dropout", step))
        with autocast(data.device, settings["precision"]):
            outputs = model(*(batch[k] for k in MODEL_INPUTS))
            loss = task_loss(outputs.logits, batch["labels"], spec.is_regression)
            penalty = method.penalty(model, batch, outputs)
        losses.append(loss.item())
        penalties.append(0.0 if penalty is None else penalty.item())
        del outputs, loss, penalty
    loss, penalty = sum(losses) / len(losses), sum(penalties) / len(penalties)
    return {"method": method_name, "method_options": settings["method_options"], "seed": seed,
            "batches": len(losses), "loss": loss, "penalty": penalty,
            "ratio": penalty / loss if loss else math.nan,
            "per_batch": {"loss": losses, "penalty": penalties}}


def parser():
    p = argparse.ArgumentParser(
        prog="evaluate.py penalty-size", allow_abbrev=False,    # the rest are train.py's flags
        usage="%(prog)s --task TASK [--vary FLAG VALUE [VALUE ...]] [--batches K] [--json] [train.py flags]",
        description="A method's penalty against the task loss at the start of training, on the first "
                    "K batches that train.py would train on, without training (see penalty_size.py). "
                    "Every train.py flag is taken as train.py takes it (--model, --method, --lnsr-sigma, "
                    "--holdout, --batch-size, --seed, ...); flags about output are ignored.")
    p.add_argument("--vary", nargs="+", metavar=("FLAG", "VALUE"), default=None,
                   help="measure once per VALUE, with the method's flag --FLAG set to it "
                        "(e.g. --vary lnsr-sigma 1e-5 1e-4 1e-3)")
    p.add_argument("--batches", type=int, default=DEFAULT_BATCHES,
                   help=f"how many training batches to average over (default: {DEFAULT_BATCHES})")
    p.add_argument("--json", action="store_true", help="print the measurements as JSON, with every batch's values")
    return p


def settings_to_measure(train_argv, vary, train_parser) -> list:
    """[(label, parsed train.py args)], one per value of --vary (one, unlabelled, without it)."""
    if not vary:
        return [("", train_parser.parse_args(train_argv))]
    flag, *values = vary
    flag = "--" + flag.removeprefix("--")
    if not values:
        raise InputError(f"--vary {flag.removeprefix('--')}: give one or more values after the flag")
    # A method's option only: the data, the model and the numeric recipe stay those of the command.
    action = train_parser._option_string_actions.get(flag)
    if action is None or "__" not in action.dest or action.nargs == 0:
        raise InputError(f"--vary {flag.removeprefix('--')}: give a method's flag that takes a value, "
                         "e.g. lnsr-sigma, lnsr-weights, noise-sigma (python train.py --help lists them)")
    return [(value, train_parser.parse_args(replace_flag(train_argv, flag, value))) for value in values]


def markdown(rows, varied: str) -> str:
    head = f"| method | {varied} | batches | task loss | penalty | penalty / loss | per batch |" if varied else \
        "| method | batches | task loss | penalty | penalty / loss | per batch |"
    lines = [head, "|---|" + ("---:|" if varied else "") + "---:|---:|---:|---:|---|"]
    for label, r in rows:
        per_batch = [p / l for p, l in zip(r["per_batch"]["penalty"], r["per_batch"]["loss"]) if l]
        spread = f"{min(per_batch):.3g}-{max(per_batch):.3g}" if per_batch else "-"
        cells = [r["method"]] + ([label] if varied else []) + [
            str(r["batches"]), f"{r['loss']:.4f}", f"{r['penalty']:.4g}", f"{r['ratio']:.3g} ({100 * r['ratio']:.3g}%)",
            spread]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cmd_penalty_size(argv) -> int:
    own, train_argv = parser().parse_known_args(argv)
    if own.batches < 1:
        raise InputError(f"--batches must be >= 1, got {own.batches}")
    train_parser = build_parser(train.TrainConfig())

    def one_line(message):               # in place of argparse's usage of all of train.py's flags
        raise InputError(f"{message} (python train.py --help lists train.py's flags)")
    train_parser.error = one_line
    measured = settings_to_measure(train_argv, own.vary, train_parser)
    first = measured[0][1]
    if first.methods or first.seeds:
        raise InputError("penalty-size measures one method at one seed: give --method and --seed, "
                         "and --vary for several strengths")
    method_name = first.method or "lnsr"
    if own.vary:
        owner = train_parser._option_string_actions["--" + own.vary[0].removeprefix("--")].dest.split("__")[0]
        if owner != method_name:
            raise InputError(f"--vary {own.vary[0].removeprefix('--')} is a flag of {owner}, "
                             f"but the method measured is {method_name} (--method {owner}?)")
    seed = first.seed if first.seed is not None else 1
    spec = glue.get_task(first.task)
    device = pick_device(first.device)
    status = StatusLine()
    for _, args in measured:
        check_args(args)
        method_options(method_name, args)
    model_note = None
    if first.model is None:
        first.model, model_note = default_model(device)
    arms = [cls(options) for cls, options in (method_options(method_name, args) for _, args in measured)]
    recipe = numeric_recipe(first.precision, arms, device.type, native_bf16(device))
    apply_recipe(recipe)
    for _, args in measured:
        args.model, args.recipe = first.model, recipe
    if model_note:
        status.say(model_note)
    if first.threads:
        torch.set_num_threads(first.threads)
    data = load_data(first, spec, device, status, train_argv)
    for method in arms:
        method.check(data.pretrained.config)
    varied = own.vary[0].removeprefix("--") if own.vary else ""
    rows = []
    for i, (label, args) in enumerate(measured, start=1):
        status.status(f"measuring {method_name}{f' at --{varied} {label}' if label else ''} "
                      f"({i} of {len(measured)}) on {own.batches} batches ...", force=True)
        rows.append((label, measure(args, spec, data, method_name, seed, own.batches)))
    status.end()
    if own.json:
        print(json.dumps([{**({varied: label} if varied else {}), **r} for label, r in rows], indent=2))
    else:
        print(markdown(rows, varied))
    return 0

