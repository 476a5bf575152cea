"""Wall time of one small grid: one worker with all the threads against workers with one each.

    python benchmarks/bench_workers.py --data-dir ../shared/glue_data

The grid is 4 runs: ft and lnsr, seeds 1 and 2, RTE, the embedded MiniLM, 256 training examples
for one epoch (8 steps of 32) and the whole dev set. Per repetition it times, from a clean output
folder each time:

  serial   one `train.py` process with --threads N (N = --workers, default 2);
  workers  N `train.py` processes at once, --threads 1 each, sharing the grid by claims.

The repetitions alternate the two, so that a drift of the machine hits both alike. It prints a
Markdown table: each configuration's wall times, their median, and workers / serial.
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GRID = ["--task", "rte", "--model", "minilm-l6", "--methods", "ft,lnsr", "--seeds", "1-2",
        "--max-train-samples", "256", "--epochs", "1"]


def timed_grid(data_dir, out: Path, workers: int, threads: int) -> float:
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, str(ROOT / "train.py"), *GRID, "--data-dir", str(data_dir),
               "--output-dir", str(out), "--threads", str(threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    procs = [subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(workers)]
    errors = [p.communicate()[1] for p in procs]
    seconds = time.perf_counter() - start
    if any(p.returncode for p in procs):
        raise SystemExit("a train.py process failed:\n" + "\n".join(e[-1500:] for e in errors))
    finished = sorted(out.rglob("results.json"))
    if len(finished) != 4:
        raise SystemExit(f"{len(finished)} of 4 runs finished")
    return seconds


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True, help="a GLUE folder with RTE/")
    p.add_argument("--workers", type=int, default=2, help="workers, and the serial run's threads")
    p.add_argument("--reps", type=int, default=2, help="repetitions of each configuration")
    args = p.parse_args(argv)
    times = {"serial": [], "workers": []}
    with tempfile.TemporaryDirectory(prefix="bench_workers_") as tmp:
        for rep in range(args.reps):
            order = ["serial", "workers"] if rep % 2 == 0 else ["workers", "serial"]
            for name in order:
                workers, threads = (1, args.workers) if name == "serial" else (args.workers, 1)
                seconds = timed_grid(args.data_dir, Path(tmp) / name, workers, threads)
                times[name].append(seconds)
                print(f"  {name}: {seconds:.1f} s", file=sys.stderr, flush=True)
    n = args.workers
    print(f"4-run grid (ft, lnsr x seeds 1-2; RTE, minilm-l6, 256 examples, 1 epoch), {args.reps} repetitions, "
          f"{os.cpu_count()} logical cores\n")
    print("| configuration | wall times | median |")
    print("|---|---|---:|")
    labels = {"serial": f"1 worker x {n} threads", "workers": f"{n} workers x 1 thread"}
    for name in ("serial", "workers"):
        print(f"| {labels[name]} | {', '.join(f'{t:.1f} s' for t in times[name])} | "
              f"{statistics.median(times[name]):.1f} s |")
    ratio = statistics.median(times["workers"]) / statistics.median(times["serial"])
    print(f"\nworkers / serial: {ratio:.2f}")


if __name__ == "__main__":
    main()
