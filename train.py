"""Fine-tune BERT on a GLUE task with LNSR or a baseline: one run of the paper's Algorithm 1.

    python train.py --task cola                                  # the paper's setup (BERT-Large, LNSR)
    python train.py --task rte --model minilm-l6 --methods ft,lnsr --seeds 1-3   # CPU quick start

Read top to bottom: the paper's recipe (`TrainConfig`), then `train_one`, one run: data, model
(`initial_model`, line 1), method, and the loop of Algorithm 1, whose line numbers the comments
give. The rest of the command lives beside this file, each module with one job, imported one way:

    cli.py        the flags (every default below is one), checks that refuse bad values
    sweep.py      the runs of a command: methods x seeds, claims, resuming, status lines
    numerics.py   device and precision policy (one numeric recipe for every arm)
    scoring.py    task loss, predictions, learning-curve points
    checkpoint.py mid-run checkpoints; run_records.py the files of a run

For every (method, seed) the run goes to <output-dir>/<task>/<method>/seed<N>/ with config.json,
log.jsonl and results.json (see README.md).
"""
import dataclasses
import math
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch

import checkpoint
import cli
import glue
import optim
import sweep
from cli import method_options, run_settings
from numerics import autocast, started_as_script
from run_records import RunFailed, RunFiles, versions
from scoring import CURVE_TRAIN_SAMPLE, MODEL_INPUTS, curve_point, predict, prediction_spread, task_loss, to_device
from workers import SingleProcess


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The paper's fine-tuning recipe (Section 4.3); what it leaves open (length, weight decay,
    clipping) follows Devlin et al.'s BERT code. Each field is the default of the flag of the
    same name (cli.py)."""
    lr: float = 2e-5                 # tau, the peak learning rate
    batch_size: int = 32             # |B|
    epochs: float = 3                # N
    warmup: float = 0.1              # linear warm-up over this fraction of the steps, then linear decay
    optimizer: str = "adam"          # Adam without bias correction (optim.py), as BERT's code
    weight_decay: float = 0.01       # decoupled, not on biases and LayerNorms
    max_grad_norm: float = 1.0       # clip the gradient's norm
    max_seq_length: int = 128        # tokens per example
    eval_batch_size: int = 64


# One --seed drives several random streams. Giving two generators the same integer would
# correlate them (the head's initial weights would equal the first noise draws, scaled), so
# each purpose gets its own seed derived from the run's.
STREAMS = {"head": 1, "dropout": 2, "noise": 3, "order": 4, "subset": 5}


EVAL_SUBSET_SEED = 0      # every seed of a sweep is scored on the same dev examples


def stream_seed(seed: int, stream: str, *more: int) -> int:
    """The seed of one random stream of a run, e.g. (seed, "dropout", step, rank)."""
    return int(np.random.SeedSequence([seed, STREAMS[stream], *more]).generate_state(1)[0])


def quiet(phase, done, total, logged):
    """A report callback that shows nothing (see sweep.Reporter)."""


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
              "threads": torch.get_num_threads(), "versions": versions(),
              # as in the environment: what glibc read at the start, unless the process changed it
              "glibc_tunables": os.environ.get("GLIBC_TUNABLES")}
    if saved:
        config["resumed_at_steps"] = saved["loop"]["resumed_at_steps"] + [saved["step"]]
    files.start(config, records=saved["log"] if saved else ())
    # A data-parallel run's ranks draw their own dropout masks and noise; one process keeps
    # the streams of a serial run.
    per_rank = () if ranks.world == 1 else (ranks.rank,)

    method = method_cls(options)
    # Algorithm 1, line 1: initialize theta (the pretrained encoder, a new classifier head).
    model = initial_model(data, spec, method, seed, init_seed, device, per_rank)

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
        while step < total_steps:                                  # line 2: for epoch = 1..N
            plan = glue.batches(train, args.batch_size, seed=stream_seed(data_seed, "order"), epoch=epoch)
            for batch in plan[position:]:                          # line 3: for minibatch B ~ D
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
                    outputs = forward(*(batch[k] for k in MODEL_INPUTS))       # line 8: f(x), the clean pass
                    loss = task_loss(outputs.logits, batch["labels"], spec.is_regression)   # L(f(x), y)
                    # Lines 4-12: R-hat (line 8's noisy pass included), averaged over the batch as
                    # the loss is (R-hat / |B|). LNSR draws eps, runs f(x + eps) and sums the layers'
                    # lambda ||f(x + eps) - f(x)||^2 (regularizers/lnsr.py); other methods
                    # return their own penalty, ft none.
                    penalty = method.penalty(model, batch, outputs)
                total = loss if penalty is None else loss + penalty
                if step == 0 and not torch.isfinite(total):      # one look at step 1: a bad input
                    reason = first_step_problem(model, batch, loss, penalty, method_name, options)
                    files.fail(reason, 1)
                    raise RunFailed(reason)
                if weight != 1.0:                # a data-parallel rank's share of the batch mean
                    total = total * weight
                total.backward()                                  # line 13: g = grad [L + R-hat]
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()                                  # line 14: theta <- theta - tau g (Adam)
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
    # DDP averages each step's whole gradient, the penalty's too, so every rank of a data-parallel
    # run ends with the same theta; a rank that does not would make rank 0's scores a guess.
    if not ranks.hold_the_same_weights(model):
        reason = "the data-parallel ranks' weights differ after training: their gradients were not all averaged"
        files.fail(reason, step)
        checkpoint.remove(run_dir)
        raise RunFailed(reason)
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


def initial_model(data, spec, method, seed: int, init_seed: int, device, per_rank=()):
    """Algorithm 1, line 1: initialize theta, the pretrained encoder and a new classifier head,
    with the method set up on it (its noise stream, Mixout's layers, L2-SP's anchor)."""
    from bert.model import BertClassifier
    torch.manual_seed(stream_seed(seed, "dropout"))          # dropout draws from the global RNG
    model = BertClassifier(data.pretrained.config, spec.num_labels)
    model.load_state_dict(data.pretrained.state_dict())
    model.load_report = data.pretrained.load_report      # which weights the checkpoint lacked (L2-SP)
    model.init_head(torch.Generator().manual_seed(stream_seed(init_seed, "head")))
    model.to(device)
    model.bert.cls_only_last_layer = not method.reads_hidden_states
    method.setup(model, stream_seed(seed, "noise", *per_rank))
    return model


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


def main(argv=None):
    """The command: parse the flags, then run every (method, seed) with `train_one` (sweep.py).
    SIGINT and SIGTERM make the run in progress save a checkpoint and stop (checkpoint.py)."""
    from_command_line = argv is None and started_as_script(__file__)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = cli.build_parser(TrainConfig()).parse_args(argv)
    stop = checkpoint.StopRequest()
    if not args.dry_run:
        stop.install()
    try:
        return sweep.run_command(args, argv, stop, train_one, restart=from_command_line)
    finally:
        stop.uninstall()


if __name__ == "__main__":
    sys.exit(main())
