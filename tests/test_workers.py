"""Many processes on one grid (workers.py): claims, a killed worker, torchrun, --data-parallel.

Every test compares with a serial run of the same grid on the same thread count. A run's
results.json must be the serial run's but for its wall time, and its log.jsonl losses the same
bits (with --data-parallel, dropout off: within 1e-5, as the reduction order differs).

The runs use a tiny random BERT (tiny.tiny_checkpoint) with the embedded model's tokenizer on
real RTE rows: what is tested is how processes share and split runs, not the model, and a
process then spends its time starting rather than training.
"""
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import evaluate
import tiny
import workers

ROOT = Path(__file__).resolve().parents[1]
GLUE_DIR = tiny.GLUE_DIR
pytestmark = tiny.NEEDS_RTE_AND_EMBEDDED_MODEL

TINY = ["--task", "rte", "--data-dir", str(GLUE_DIR), "--max-train-samples", "16", "--max-eval-samples", "16",
        "--batch-size", "8", "--epochs", "1", "--max-seq-length", "32", "--log-every", "1", "--threads", "1"]
RUNS = [f"{m}/seed{s}" for m in ("ft", "lnsr") for s in (1, 2)]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def train_command(out, *extra):
    return [sys.executable, str(ROOT / "train.py"), *TINY, "--output-dir", str(out), *extra]


def run_serial(out, *extra):
    done = subprocess.run(train_command(out, *extra), env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def results_of(out, run):
    """results.json without its wall time, log.jsonl's losses and penalties, the predictions."""
    d = Path(out) / "RTE" / run
    results = json.loads((d / "results.json").read_text())
    results.pop("train_seconds")
    log = [(r["step"], r["loss"], r["penalty"]) for r in map(json.loads, (d / "log.jsonl").read_text().splitlines())]
    return results, log, json.loads((d / "dev_predictions.json").read_text())


def trained_by(stderr: str) -> list:
    line = next(line for line in stderr.splitlines() if " trained " in line and "run(s)" in line)
    return [] if ": " not in line.split("run(s)")[1] else \
        [n.strip() for n in line.split("run(s): ")[1].split(";")[0].split(",")]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny.tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def grid(model_dir):
    return ["--model", str(model_dir), "--methods", "ft,lnsr", "--seeds", "1-2"]


@pytest.fixture(scope="module")
def serial(tmp_path_factory, grid):
    out = tmp_path_factory.mktemp("serial")
    run_serial(out, *grid)
    return out


def test_two_workers_share_a_grid_and_each_run_is_trained_once(tmp_path, grid, serial):
    out = tmp_path / "shared"
    # A worker that finds the other's runs held looks again after --claim-timeout / 5: 2 s here,
    # not the default's 5 s. A run is taken over only after a 10 s stall of its worker.
    command = train_command(out, *grid, "--claim-timeout", "10")
    procs = [subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-1500:] for _, err in outputs]
    by_worker = [trained_by(err) for _, err in outputs]
    names = sorted(n for w in by_worker for n in w)
    assert names == sorted(f"RTE {m} seed {s}" for m in ("ft", "lnsr") for s in (1, 2))   # once each
    for run in RUNS:
        assert results_of(out, run) == results_of(serial, run), run
        assert not list((out / "RTE" / run).glob("claim*"))              # released


# train.py, but the process stops itself (SIGSTOP) right after its run writes its first log line:
# a kill sent once that line is there lands after step 1 and before step 2, however fast the
# steps are.
FREEZE_AFTER_THE_FIRST_LOG_LINE = """if True:
    import os, signal, sys
    import train
    log = train.RunFiles.log

    def log_and_freeze(self, record):
        log(self, record)
        os.kill(os.getpid(), signal.SIGSTOP)

    train.RunFiles.log = log_and_freeze
    sys.exit(train.main(sys.argv[1:]))
"""


def test_a_killed_worker_s_run_is_taken_over_after_the_claim_timeout(tmp_path, model_dir, serial, capsys):
    out = tmp_path / "shared"
    longer = ["--model", str(model_dir), "--method", "lnsr", "--seed", "1", "--claim-timeout", "2"]
    victim = subprocess.Popen([sys.executable, "-c", FREEZE_AFTER_THE_FIRST_LOG_LINE,
                               *train_command(out, *longer)[2:]], cwd=ROOT, env=ENV,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = out / "RTE" / "lnsr" / "seed1" / "log.jsonl"
    deadline = time.time() + 300
    while not (log.exists() and log.read_text().strip()) and victim.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    run_dir = out / "RTE" / "lnsr" / "seed1"
    assert len(log.read_text().splitlines()) == 1                # killed in the middle of its 2 steps
    claim_file = run_dir / "claim.1.json"
    assert claim_file.exists() and not (run_dir / "results.json").exists()
    # The claim as a worker on another machine would leave it: its pid cannot be checked here,
    # so only the heartbeat's age tells that it died.
    claim = json.loads(claim_file.read_text())
    claim.update(machine="another-machine", worker="another-machine:1")
    claim_file.write_text(json.dumps(claim))
    # Half-written runs count nowhere: summarize lists the claim and counts no run.
    runs, problems = evaluate.read_runs(out)
    assert runs == [] and any("claimed by another-machine:1" in p for p in problems)
    # While the heartbeat is fresh the run is not taken: the worker waits for it. Once the
    # heartbeat stops (the dead worker's last beat), the run is taken over after the timeout and
    # finished as a serial run would. The beat is kept fresh until the worker says it waits, so
    # that a slow start (a loaded machine) cannot outlast the timeout before the worker looks.
    beating = threading.Event()
    beating.set()

    def heartbeat():
        while beating.is_set():
            try:
                os.utime(claim_file)
            except FileNotFoundError:
                return
            time.sleep(0.2)

    threading.Thread(target=heartbeat, daemon=True).start()
    late = subprocess.Popen(train_command(out, *longer), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    stderr, last_beat = [], None
    try:
        for line in late.stderr:
            stderr.append(line)
            if last_beat is None and "waiting for 1 run(s) that other workers hold" in line:
                beating.clear()
                last_beat = time.time()
    finally:
        beating.clear()
        late.wait(timeout=600)
    stderr = "".join(stderr)
    assert late.returncode == 0, stderr[-2000:]
    assert last_beat is not None, stderr[-2000:]                   # it waited ...
    assert time.time() - last_beat > 2 and trained_by(stderr) == ["RTE lnsr seed 1"]   # ... then took over
    assert results_of(out, "lnsr/seed1") == results_of(serial, "lnsr/seed1")
    assert not list(run_dir.glob("claim*"))


def test_a_dead_pid_on_this_machine_is_taken_over_at_once(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run_dir / "claim.1.json").write_text(json.dumps({"worker": "w", "machine": workers.machine_id(),
                                                      "pid": dead.pid}))
    claim = workers.claim_run(run_dir, timeout=3600)
    assert isinstance(claim, workers.Claim) and claim.generation == 2
    assert [p.name for p in run_dir.iterdir()] == ["claim.2.json"]          # the dead one is gone
    assert json.loads((run_dir / "claim.2.json").read_text())["pid"] == os.getpid()
    claim.release()
    assert not list(run_dir.iterdir())
    # A live claim is left alone; a finished run is never claimed.
    assert isinstance(first := workers.claim_run(run_dir, 3600), workers.Claim)
    assert workers.claim_run(run_dir, 3600).startswith("claimed by")
    first.release()
    (run_dir / "results.json").write_text("{}")
    assert workers.claim_run(run_dir, 3600) == "finished"


def torchrun(nproc, out, *extra):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(ROOT / "train.py"), *TINY, "--output-dir", str(out), *extra]
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_torchrun_ranks_are_workers_of_one_grid(tmp_path, model_dir, serial):
    out = tmp_path / "torchrun"
    # --claim-timeout 10: a rank that finds the other's run held looks again after 2 s, not 5 s.
    done = torchrun(2, out, "--model", str(model_dir), "--methods", "ft,lnsr", "--seeds", "1",
                    "--claim-timeout", "10")
    for run in ("ft/seed1", "lnsr/seed1"):
        assert results_of(out, run) == results_of(serial, run), run
    trained = [int(n) for n in re.findall(r"trained (\d+) run\(s\)", done.stderr)]
    # A rank that starts after the other has trained both runs finds nothing left to do.
    found_done = done.stderr.count("2 of 2 runs already have results.json: skipped")
    assert len(trained) + found_done == 2 and sum(trained) == 2   # two ranks, each run once


def test_local_part_splits_every_batch_in_order_and_the_weights_give_the_mean():
    import torch

    class Ranks(workers.DataParallel):
        def __init__(self, rank, world):                 # no process group: the arithmetic only
            self.rank, self.world = rank, world

    for n, world in ((8, 2), (7, 2), (5, 3), (1, 2)):
        batch = {"labels": torch.arange(n), "input_ids": torch.arange(n)[:, None].repeat(1, 3)}
        parts = [Ranks(r, world).local_part(batch) for r in range(world)]
        real = [p["labels"].tolist() for p, w in parts if w > 0]
        assert sum(real, []) == list(range(n))                          # every example once, in order
        assert sum(w for _, w in parts) == pytest.approx(world)         # the DDP average is the mean
        assert all(len(p["labels"]) >= 1 for p, _ in parts)             # every rank takes a step


@pytest.fixture(scope="module")
def no_dropout_model(tmp_path_factory):
    """The tiny model with dropout 0: then every rank computes exactly what one process does."""
    return tiny.tiny_checkpoint(tmp_path_factory.mktemp("tiny-no-dropout") / "model", dropout=0.0)


def test_data_parallel_on_two_processes_is_one_process_without_dropout(tmp_path, no_dropout_model, monkeypatch,
                                                                       capsys):
    # LNSR: its clean pass runs under DistributedDataParallel and its noisy pass beside it.
    grid = ["--model", str(no_dropout_model), "--method", "lnsr", "--lnsr-sigma", "0", "--seed", "1",
            "--max-train-samples", "20"]                     # 20 = 8 + 8 + 4: the last batch uneven too
    run_serial(tmp_path / "one", *grid)
    torchrun(2, tmp_path / "two", *grid, "--data-parallel")
    one, two = results_of(tmp_path / "one", "lnsr/seed1"), results_of(tmp_path / "two", "lnsr/seed1")
    assert [s for s, _, _ in one[1]] == [s for s, _, _ in two[1]] == [1, 2, 3]
    for (_, loss_1, penalty_1), (_, loss_2, penalty_2) in zip(one[1], two[1]):
        assert abs(loss_1 - loss_2) < 1e-5 and penalty_1 == penalty_2 == 0.0
    assert one[2] == two[2]                                     # the same dev predictions
    config = json.loads((tmp_path / "two" / "RTE" / "lnsr" / "seed1" / "config.json").read_text())
    assert config["settings"]["data_parallel_ranks"] == 2
    # A dry run of the same command under torchrun's world size finds them finished.
    import train
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert train.main(TINY + grid + ["--output-dir", str(tmp_path / "two"), "--data-parallel", "--dry-run"]) == 0
    assert capsys.readouterr().out.count("finished, same settings") == 1


def test_data_parallel_with_dropout_runs_every_method_and_keeps_lnsr_sigma_zero_at_zero(tmp_path, model_dir):
    methods = "lnsr,l2sp,mixout,smart,noise,r3f"
    done = torchrun(2, tmp_path, "--model", str(model_dir), "--methods", methods, "--lnsr-sigma", "0",
                    "--seed", "1", "--data-parallel", "--max-train-samples", "12", "--max-eval-samples", "8")
    _, log, _ = results_of(tmp_path, "lnsr/seed1")
    assert [penalty for _, _, penalty in log] == [0.0, 0.0]         # replayed masks on each rank
    assert "trained 6 run(s)" in done.stderr
    for m in methods.split(",")[1:]:
        results, log, predictions = results_of(tmp_path, f"{m}/seed1")
        assert len(log) == 2 and len(predictions) == results["n_dev"] == 8
        assert all(penalty > 0 for _, _, penalty in log) or m in ("mixout", "noise"), m


def test_ranks_whose_weights_differ_fail_the_run(tmp_path, model_dir, monkeypatch):
    """The check itself, in one process: ranks that report two fingerprints fail the run in
    failed.json, and it leaves no results."""
    import sweep
    import train
    import workers

    class TwoRanksThatDisagree(workers.SingleProcess):
        world = 2

        def local_part(self, batch):
            return batch, 1.0

        def hold_the_same_weights(self, model):
            return len({workers.weights_fingerprint(model), "another rank's weights"}) == 1

    monkeypatch.setattr(sweep, "SingleProcess", TwoRanksThatDisagree)
    assert train.main(TINY + ["--model", str(model_dir), "--method", "ft", "--seed", "1", "--max-train-samples", "8",
                              "--output-dir", str(tmp_path)]) == 1
    failed = json.loads((tmp_path / "RTE" / "ft" / "seed1" / "failed.json").read_text())
    assert "ranks' weights differ" in failed["reason"]
    assert not (tmp_path / "RTE" / "ft" / "seed1" / "results.json").exists()


def test_a_data_parallel_run_stopped_by_sigterm_goes_on_from_its_checkpoint_with_the_same_bits(tmp_path,
                                                                                                  model_dir):
    """torchrun passes SIGTERM to every rank; the ranks agree to stop at a log step, rank 0 saves
    every rank's random streams, and each rank reads its own back: dropout on, the same bits.
    LNSR at its default sigma: the noisy pass's gradient is averaged over the ranks with the
    clean pass's, or the ranks' weights differ after training and train.py fails the run (as it
    does with DistributedDataParallel left out)."""
    import checkpoint
    grid = ["--model", str(model_dir), "--method", "lnsr", "--seed", "1", "--data-parallel",
            "--max-train-samples", "32", "--batch-size", "4", "--epochs", "3", "--log-every", "2"]
    torchrun(2, tmp_path / "never", *grid)
    run_dir = tmp_path / "stopped" / "RTE" / "lnsr" / "seed1"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(ROOT / "train.py"), *TINY, "--output-dir", str(tmp_path / "stopped"), *grid,
               "--checkpoint-steps", "6"]
    agent = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not checkpoint.path_of(run_dir).exists() and agent.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    agent.send_signal(signal.SIGTERM)
    agent.wait(timeout=120)
    saved = checkpoint.read(run_dir, {})
    assert 6 <= saved["step"] < 24 and len(saved["random_streams"]) == 2
    assert not (run_dir / "results.json").exists()
    torchrun(2, tmp_path / "stopped", *grid)
    assert results_of(tmp_path / "stopped", "lnsr/seed1") == results_of(tmp_path / "never", "lnsr/seed1")
    assert not checkpoint.path_of(run_dir).exists()


def test_data_parallel_outside_torchrun_is_a_one_line_error(tmp_path):
    done = subprocess.run(train_command(tmp_path / "x", "--model", "minilm-l6", "--data-parallel"),
                          env={k: v for k, v in ENV.items() if k not in ("RANK", "MASTER_ADDR")},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1].startswith("error: --data-parallel: start")
    assert not (tmp_path / "x").exists()


def test_two_workers_judging_one_dead_claim_never_both_hold_the_run(tmp_path):
    """The race of a take-over: both workers found the same dead claim; the first creates the
    next generation; the second, trying to create that same generation, fails and finds the
    live claim."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    dead_file = run_dir / "claim.1.json"
    dead_file.write_text(json.dumps({"worker": "gone", "machine": "another-machine", "pid": 1}))
    os.utime(dead_file, (0, 0))                                  # no heartbeat since 1970
    dead = workers.read_claim(run_dir)
    first = workers.claim_run(run_dir, timeout=10)
    assert isinstance(first, workers.Claim) and first.generation == 2
    real_read = workers.read_claim
    seen = iter([dead])                  # the second worker read the dead claim a moment ago
    workers.read_claim = lambda d: next(seen, None) or real_read(d)
    try:
        second = workers.claim_run(run_dir, timeout=10)
    finally:
        workers.read_claim = real_read
    assert isinstance(second, str) and second.startswith("claimed by")
    assert first.owned() and [p.name for p in run_dir.iterdir()] == ["claim.2.json"]
    first.release()


def test_a_worker_that_lost_its_claim_stops_and_leaves_the_new_one(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    claim = workers.claim_run(run_dir, timeout=2.5)          # heartbeat every 0.5 s
    newer = run_dir / "claim.2.json"                         # taken over while this one stalled
    newer.write_text(json.dumps({"worker": "the new owner"}))
    time.sleep(1.2)
    assert claim.lost and not claim.owned()
    claim.release()
    assert [p.name for p in run_dir.iterdir()] == ["claim.2.json"]


def test_a_claim_whose_run_stopped_moving_stops_beating(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    claim = workers.claim_run(run_dir, timeout=1.0)          # heartbeat every 0.5 s
    time.sleep(1.6)                                          # no progress() since the claim
    assert workers.claim_age(workers.read_claim(run_dir)) > 1.0
    assert isinstance(workers.claim_run(run_dir, timeout=1.0), workers.Claim)   # taken over
    assert claim.lost or not claim.owned()
    claim.release()


def test_a_run_that_failed_in_this_sweep_is_not_retried_but_an_older_failure_is(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "failed.json").write_text("{}")
    assert workers.claim_run(run_dir, 60, since=time.time() - 60).startswith("failed in this sweep")
    retry = workers.claim_run(run_dir, 60, since=time.time() + 60)
    assert isinstance(retry, workers.Claim)
    retry.release()
