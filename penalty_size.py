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

on the first K batches train.py would train on (at most one epoch's), with the same seed, dropout
masks, noise and numeric recipe, in training mode: batch t gives the very bits train.py's step t
would at theta_0 (tests/test_penalty_size.py holds them equal). The first log.jsonl line of a run
reports the same ratio averaged over steps 1..--log-every, while theta moves with the warm-up;
this command gives it before any run, for many strengths, in a few forward passes each.

On MiniLM-L6 at the tuned recipe (docs/RESULTS.md, "Tuned fairly", stage 2), strengths whose
penalty was a few percent of the task loss or more cost 9 to 22 points on held-out data or stopped
learning, and below 1% none beat ft. Use this to place a held-out grid (`--holdout`) on your own
model, not to choose a strength by itself.
"""
import argparse
import json
import time
from dataclasses import dataclass

import torch

import glue
import train
from bert.errors import InputError
from cli import build_parser, method_options, replace_flag, run_settings
from numerics import apply_recipe, autocast, native_bf16, numeric_recipe
from progress import StatusLine, format_seconds
from scoring import MODEL_INPUTS, task_loss, to_device
from sweep import check_command, load_data

DEFAULT_BATCHES = 8


def measure(args, spec, data, method_name: str, seed: int, batches: int, on_batch=lambda done, total: None) -> dict:
    """The task loss and the penalty at theta_0 on each of the first `batches` training batches,
    computed as train.py's steps compute them, with no update between batches; on_batch(done,
    total) is called after each. Gradients stay on: some penalties take a gradient inside (SMART's
    ascent step), and the values wanted are train.py's."""
    settings = run_settings(args, spec, method_name, seed)
    method_cls, options = method_options(method_name, args)
    method = method_cls(options)
    model = train.initial_model(data, spec, method, seed, settings["init_seed"], data.device)
    model.train()
    train_set = data.train.subset(args.max_train_samples, args.train_fraction,
                                  train.stream_seed(settings["data_seed"], "subset"))
    first_epoch = glue.batches(train_set, args.batch_size, seed=train.stream_seed(settings["data_seed"], "order"),
                               epoch=0)
    plan = first_epoch[:batches]
    losses, penalties = [], []
    for step, batch in enumerate(plan):
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
        on_batch(step + 1, len(plan))
    loss, penalty = sum(losses) / len(losses), sum(penalties) / len(penalties)
    return {"method": method_name, "method_options": settings["method_options"], "seed": seed,
            "batches": len(losses), "loss": loss, "penalty": penalty,
            "ratio": penalty / loss if loss else None, "precision": settings["precision"],
            "per_batch": {"loss": losses, "penalty": penalties}}


class OneLineParser(argparse.ArgumentParser):
    """argparse, with its errors as one line (InputError) instead of a usage and an error line."""

    def error(self, message):
        raise InputError(f"{message} (see {self.prog} --help)")


def parser():
    p = OneLineParser(
        prog="evaluate.py penalty-size", allow_abbrev=False,    # the rest are train.py's flags
        usage="%(prog)s --task TASK [--vary FLAG VALUE [VALUE ...]] [--batches K] [--json] [train.py flags]",
        description="A method's penalty against the task loss at the start of training, on the first "
                    "K batches that train.py would train on, without training (see penalty_size.py). "
                    "Every train.py flag is taken as train.py takes it (--model, --method, --lnsr-sigma, "
                    "--holdout, --batch-size, --seed, ...); flags about output are ignored.")
    p.add_argument("--vary", nargs="+", action="append", metavar=("FLAG", "VALUE"), default=None,
                   help="measure once per VALUE, with the method's flag --FLAG set to it "
                        "(e.g. --vary lnsr-sigma 1e-5 1e-4 1e-3)")
    p.add_argument("--batches", type=int, default=DEFAULT_BATCHES,
                   help=f"how many training batches to average over, at most one epoch's "
                        f"(default: {DEFAULT_BATCHES})")
    p.add_argument("--json", action="store_true", help="print the measurements as JSON, with every batch's values")
    return p


@dataclass
class Plan:
    """What one penalty-size command measures, settled before any model or data is loaded."""
    method: str
    seed: int
    batches: int
    varied: str                 # the method flag --vary sets, without its dashes ("" without --vary)
    measured: list              # [(value of the varied flag, or "", train.py's parsed args)]
    spec: object                # the task (glue.TaskSpec)
    device: torch.device
    model_note: str | None      # the line saying which model was taken by default
    as_json: bool


def plan(argv) -> Plan:
    """Every check of the command's flags: train.py's (sweep.check_command), per value of --vary."""
    own, train_argv = parser().parse_known_args(argv)
    if own.batches < 1:
        raise InputError(f"--batches must be >= 1, got {own.batches}")
    train_parser = build_parser(train.TrainConfig())
    train_parser.error = OneLineParser.error.__get__(train_parser)      # its errors in one line too
    vary = own.vary or [[""]]
    if len(vary) > 1:
        raise InputError("give --vary once: one method flag and its values")
    varied, *values = vary[0]
    varied = varied.removeprefix("--")
    if varied:
        # A method's option only: the data and the model stay those of the command.
        action = train_parser._option_string_actions.get("--" + varied)
        if action is None or "__" not in action.dest or action.nargs == 0:
            raise InputError(f"--vary {varied}: give a method's flag that takes a value, e.g. lnsr-sigma, "
                             "lnsr-weights, r3f-weight (python train.py --help lists them)")
        if not values:
            raise InputError(f"--vary {varied}: give one or more values after the flag")
        measured = [(v, train_parser.parse_args(replace_flag(train_argv, "--" + varied, v))) for v in values]
    else:
        measured = [("", train_parser.parse_args(train_argv))]
    first = measured[0][1]
    if first.methods or first.seeds or first.data_parallel:
        raise InputError("penalty-size measures one method at one seed in one process: give --method and "
                         "--seed (not --methods, --seeds or --data-parallel), and --vary for several strengths")
    method = first.method or "lnsr"
    if varied and action.dest.split("__")[0] != method:
        owner = action.dest.split("__")[0]
        raise InputError(f"--vary {varied} is a flag of {owner}, but the method measured is {method} "
                         f"(--method {owner}?)")
    for _, args in measured:
        spec, device, model_note = check_command(args)
        # The numeric recipe train.py would give this value's command alone.
        method_cls, options = method_options(method, args)
        args.recipe = numeric_recipe(args.precision, [method_cls(options)], device.type, native_bf16(device))
    seed = first.seed if first.seed is not None else 1
    return Plan(method, seed, own.batches, varied, measured, spec, device, model_note, own.json)


def markdown(rows, varied: str) -> str:
    head = ["method"] + ([varied] if varied else []) + ["precision", "batches", "task loss", "penalty",
                                                        "penalty / loss", "penalty / loss per batch (min-max)"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 2) + "---|"]
    for r in rows:
        per_batch = [p / l for p, l in zip(r["per_batch"]["penalty"], r["per_batch"]["loss"]) if l]
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.3g} ({100 * r['ratio']:.3g}%)"
        cells = [r["method"]] + ([r[varied]] if varied else []) + [
            r["precision"], str(r["batches"]), f"{r['loss']:.4f}", f"{r['penalty']:.4g}", ratio,
            f"{min(per_batch):.3g}-{max(per_batch):.3g}" if per_batch else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cmd_penalty_size(argv) -> int:
    todo = plan(argv)
    status = StatusLine()
    if todo.model_note:
        status.say(todo.model_note)
    first = todo.measured[0][1]
    if first.threads:
        torch.set_num_threads(first.threads)
    data = load_data(first, todo.spec, todo.device, status, argv)
    rows, started, finished_batches = [], time.time(), 0
    for i, (value, args) in enumerate(todo.measured, start=1):
        cls, options = method_options(todo.method, args)
        cls(options).check(data.pretrained.config)
        what = f"{todo.method}{f' at --{todo.varied} {value}' if todo.varied else ''} ({i} of {len(todo.measured)})"

        def progress(done, total):
            # Every value costs about the same: the seconds per batch so far price the rest.
            elapsed = time.time() - started
            left = elapsed / (finished_batches + done) * ((len(todo.measured) - i) * total + total - done)
            status.status(f"measuring {what}: batch {done}/{total} | elapsed {format_seconds(elapsed)}, "
                          f"all done in about {format_seconds(left)}", force=done == total)

        status.status(f"measuring {what} ...", force=True)
        apply_recipe(args.recipe)
        row = measure(args, todo.spec, data, todo.method, todo.seed, todo.batches, on_batch=progress)
        finished_batches += row["batches"]
        rows.append({todo.varied: value, **row} if todo.varied else row)
    status.end()
    print(json.dumps(rows, indent=2) if todo.as_json else markdown(rows, todo.varied))
    return 0
