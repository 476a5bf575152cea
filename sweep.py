"""The runs of one train.py command: methods x seeds, each claimed, trained (by train.py's
`train_one`, handed in), skipped when finished, or picked up from its checkpoint; the data and
model loaded once for all of them; status lines with the time left; --dry-run.

train.py imports this module and passes it `train_one`, so that the arrows point one way: the
grid knows how to schedule runs, not how a run trains.
"""
import argparse
import json
import math
import os
import re
import shlex
import signal
import sys
import time
import types
from pathlib import Path

import torch

import checkpoint
import glue
from cli import check_args, default_model, method_options, parse_methods, replace_flag, run_settings, variant_name
from numerics import (apply_recipe, keep_freed_memory, make_deterministic, native_bf16, numeric_recipe, pick_device,
                      restart_without_small_block_caches)
from progress import GridClock, StatusLine, format_seconds
from bert.errors import InputError
from run_records import (RunFailed, one_answer, parse_seeds, scored_set, seed_folder, settings_differences,
                         with_legacy_settings, write_json)
from workers import Claim, DataParallel, SingleProcess, claim_run, describe_claim, read_claim, worker_name


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

    def __init__(self, args, spec, data, todo, ranks, status, clock, started, train_one, stop=None):
        self.args, self.spec, self.data, self.todo = args, spec, data, todo
        self.train_one = train_one           # train.train_one: one run, start to finish
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
            r = self.train_one(method_args, self.spec, method_name, seed, self.data, run_dir, report, self.ranks,
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


def check_command(args) -> tuple:
    """The checks of a command's flags that need no model or data, and what they settle: the
    task's spec, the device and the model (the default one with a line saying so, or None)."""
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
    # The world size each run records: torchrun's, which the process group will have.
    args.data_parallel_ranks = int(os.environ.get("WORLD_SIZE", 1)) if args.data_parallel else 1
    model_note = None
    if args.model is None:
        args.model, model_note = default_model(device)
    return spec, device, model_note


def run_command(args, argv, stop, train_one, restart=False) -> int:
    """train.main() with the signal handlers in place: every run of the command, each trained by
    `train_one` (train.py). Returns the exit status. With `restart` (train.py started as a
    script, numerics.started_as_script), a CPU command starts again once its flags are checked,
    with glibc's caches of small blocks off (numerics.restart_without_small_block_caches)."""
    status = StatusLine()
    try:
        spec, device, model_note = check_command(args)
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
        if restart and not args.dry_run and device.type == "cpu":   # before any output or process group
            stop.uninstall()               # the new process installs its own; none is lost in exec
            restart_without_small_block_caches()
            stop.install()                 # still this process: no restart was made
        # A dry run starts no process group; it still checks finished runs against the world size.
        ranks = DataParallel(device) if args.data_parallel and not args.dry_run else SingleProcess()
        if not ranks.is_main:
            status = StatusLine(quiet=True)           # rank 0 speaks for the run
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
        grid = Grid(args, spec, data, todo, ranks, status, clock, started=time.time(), train_one=train_one,
                    stop=stop)
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
