"""Mid-run checkpoints (checkpoint.py): a run stopped by SIGTERM, SIGINT or SIGKILL goes on from
its checkpoint and ends with the same bits as a run never stopped; a checkpoint it cannot use is
refused in one line.

The runs use a tiny random BERT (tiny.tiny_checkpoint) with the embedded model's tokenizer on
real RTE rows, so that a run of a few hundred steps takes about a second.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import checkpoint
import optim
import tiny
import train

ROOT = Path(__file__).resolve().parents[1]
GLUE_DIR = tiny.GLUE_DIR
pytestmark = tiny.NEEDS_RTE_AND_EMBEDDED_MODEL

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# 64 examples in batches of 2, 3 epochs: 96 steps of a few milliseconds each.
LONG = ["--max-train-samples", "64", "--batch-size", "2", "--epochs", "3"]
# 12 examples in batches of 4, 1.5 epochs: 5 steps, the last in the second epoch.
SHORT = ["--max-train-samples", "12", "--batch-size", "4", "--epochs", "1.5"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny.tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model")


def args(model_dir, out, *extra):
    return ["--task", "rte", "--model", str(model_dir), "--data-dir", str(GLUE_DIR), "--max-eval-samples", "16",
            "--max-seq-length", "32", "--log-every", "1", "--threads", "1", "--output-dir", str(out), *extra]


def run_of(out, method="lnsr", seed=1) -> Path:
    return Path(out) / "RTE" / method / f"seed{seed}"


def outcome(run_dir):
    """results.json but its wall time, every log line but its wall time, the predictions."""
    results = json.loads((run_dir / "results.json").read_text())
    results.pop("train_seconds")
    log = [{k: v for k, v in record.items() if k != "elapsed"}
           for record in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines())]
    return results, log, json.loads((run_dir / "dev_predictions.json").read_text())


def logged_steps(run_dir) -> int:
    try:
        return len((run_dir / "log.jsonl").read_text().splitlines())
    except FileNotFoundError:
        return 0


@pytest.fixture(scope="module")
def never_stopped(model_dir, tmp_path_factory):
    """The LONG lnsr run, trained without a stop (in this process: the stopped runs are made in
    processes of their own, so that the bits are also compared across processes)."""
    out = tmp_path_factory.mktemp("never-stopped")
    assert train.main(args(model_dir, out, *LONG, "--method", "lnsr")) == 0
    return outcome(run_of(out))


def start_and_freeze(command, run_dir, steps=3):
    """Start train.py and stop it (SIGSTOP) once it has logged `steps` steps; the step it has
    reached is then known, and a signal sent now lands in the middle of the run."""
    process = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *command], env=ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while logged_steps(run_dir) < steps and process.poll() is None and time.time() < deadline:
        time.sleep(0.001)
    os.kill(process.pid, signal.SIGSTOP)
    return process


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stopped_run_goes_on_from_its_checkpoint_with_the_same_bits(model_dir, tmp_path, never_stopped, signum,
                                                                      capsys):
    command = args(model_dir, tmp_path, *LONG, "--method", "lnsr")
    run_dir = run_of(tmp_path)
    process = start_and_freeze(command, run_dir)
    reached = logged_steps(run_dir)
    assert 3 <= reached < 96, "the run ended before it could be stopped"
    os.kill(process.pid, signum)
    os.kill(process.pid, signal.SIGCONT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, stderr[-2000:]
    last = stderr.strip().splitlines()[-1]
    assert f"stopped by {signal.Signals(signum).name} after step" in last and "checkpoint.pt" in last, last
    saved = checkpoint.read(run_dir, {})
    assert saved["step"] >= reached and logged_steps(run_dir) == saved["step"]
    assert not (run_dir / "results.json").exists()

    capsys.readouterr()
    assert train.main(command) == 0                                 # the same command again
    assert f"goes on from its checkpoint at step {saved['step']}/96" in capsys.readouterr().err
    results, log, predictions = outcome(run_dir)
    assert [r["step"] for r in log] == list(range(1, 97))          # step 1 logged once, none twice
    assert (results, log, predictions) == never_stopped             # bit for bit
    assert not checkpoint.path_of(run_dir).exists()                 # removed once the run finished
    config = json.loads((run_dir / "config.json").read_text())
    assert config["resumed_at_steps"] == [saved["step"]]


def test_a_killed_worker_s_run_goes_on_from_its_last_periodic_checkpoint_after_the_claim_timeout(
        model_dir, tmp_path, never_stopped, capsys):
    command = args(model_dir, tmp_path, *LONG, "--method", "lnsr", "--checkpoint-steps", "10",
                   "--claim-timeout", "2")
    run_dir = run_of(tmp_path)
    victim = start_and_freeze(command, run_dir, steps=12)
    os.kill(victim.pid, signal.SIGKILL)                 # no handler runs: nothing is saved now
    victim.communicate(timeout=60)
    saved = checkpoint.read(run_dir, {})
    assert saved["step"] % 10 == 0 and saved["step"] < logged_steps(run_dir)
    # As a worker on another machine would leave its claim: only the heartbeat's age tells
    # that it died, so the run is taken over after --claim-timeout.
    claim_file = run_dir / "claim.1.json"
    claim = json.loads(claim_file.read_text())
    claim.update(machine="another-machine", worker="another-machine:1")
    claim_file.write_text(json.dumps(claim))
    os.utime(claim_file)
    capsys.readouterr()
    assert train.main(command) == 0                     # another worker, the same command
    assert f"goes on from its checkpoint at step {saved['step']}/96" in capsys.readouterr().err
    assert outcome(run_dir) == never_stopped
    assert not list(run_dir.glob("claim*")) and not checkpoint.path_of(run_dir).exists()


def stop_each_run_at(step, monkeypatch):
    """Send this process SIGINT when a run logs `step`, once per run."""
    stopped = set()
    log = train.RunFiles.log

    def log_and_stop(self, record):
        log(self, record)
        if record["step"] == step and self.dir not in stopped:
            stopped.add(self.dir)
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(train.RunFiles, "log", log_and_stop)
    return stopped


@pytest.mark.parametrize("extra", [
    ["--methods", "ft,lnsr,noise,mixout,smart,r3f,l2sp"],
    ["--method", "lnsr", "--lnsr-dropout", "independent", "--dropout-stream", "run"],
    ["--method", "lnsr", "--lnsr-estimator", "jvp"],
])
def test_every_method_goes_on_from_a_checkpoint_with_the_same_bits(model_dir, tmp_path, monkeypatch, capsys, extra):
    """Each method's own state comes back: its random streams (LNSR's noise, Mixout's masks,
    SMART's and R3F's perturbations), SMART's teacher, and with --dropout-stream run the global
    generator that draws every dropout mask. Each run is stopped at step 2 of 5 (in the first
    epoch: the rest of that epoch's data order is replayed) and the command run again."""
    command = args(model_dir, tmp_path / "stopped", *SHORT, *extra)
    assert train.main(args(model_dir, tmp_path / "never", *SHORT, *extra)) == 0
    stopped = stop_each_run_at(2, monkeypatch)
    stops = 0
    while (status := train.main(command)) == 128 + signal.SIGINT:
        stops += 1
    assert status == 0
    runs = sorted(p.parent for p in (tmp_path / "never").rglob("results.json"))
    assert stops == len(runs) == len(stopped) >= 1
    for run in runs:
        again = tmp_path / "stopped" / run.relative_to(tmp_path / "never")
        assert json.loads((again / "config.json").read_text())["resumed_at_steps"] == [2]
        assert outcome(again) == outcome(run), run


@pytest.fixture
def stopped_run(model_dir, tmp_path, monkeypatch):
    """A run stopped after step 2 with its checkpoint, and the command that made it."""
    command = args(model_dir, tmp_path / "out", *SHORT, "--method", "lnsr")
    stop_each_run_at(2, monkeypatch)
    assert train.main(command) == 128 + signal.SIGINT
    monkeypatch.undo()
    return command, run_of(tmp_path / "out")


def files_in(folder):
    return {p: p.stat().st_mtime_ns for p in Path(folder).rglob("*")}


def refused(command, capsys, folder) -> str:
    before = files_in(folder)
    assert train.main(command) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert files_in(folder) == before                 # nothing created, nothing touched
    return err[0]


def test_a_checkpoint_of_other_settings_is_refused_in_one_line(stopped_run, capsys):
    command, run_dir = stopped_run
    capsys.readouterr()
    for extra in ([], ["--dry-run"]):
        line = refused(command + ["--lr", "3e-05", *extra], capsys, run_dir.parents[2])
        assert line.startswith(f"error: {run_dir / 'checkpoint.pt'}: saved by a run with other settings")
        assert "lr: 2e-05 there, 3e-05 now" in line and "delete it" in line


def test_a_checkpoint_of_the_other_lnsr_estimator_is_refused_and_one_from_before_the_option_is_not(
        stopped_run, capsys):
    """--lnsr-estimator is a setting of the run: a difference run's checkpoint does not go on as a
    jvp run. A checkpoint written before the option existed counts as the difference estimator."""
    command, run_dir = stopped_run
    capsys.readouterr()
    line = refused(command + ["--lnsr-estimator", "jvp"], capsys, run_dir.parents[2])
    assert "saved by a run with other settings" in line and "'estimator': 'difference'" in line
    path = checkpoint.path_of(run_dir)
    state = torch.load(path, weights_only=True)
    del state["settings"]["method_options"]["estimator"]
    torch.save(state, path)
    refused(command + ["--lnsr-estimator", "jvp"], capsys, run_dir.parents[2])
    assert train.main(command) == 0 and not path.exists()


def test_a_damaged_checkpoint_is_refused_in_one_line(stopped_run, capsys, tmp_path):
    command, run_dir = stopped_run
    capsys.readouterr()
    path = checkpoint.path_of(run_dir)
    whole = path.read_bytes()
    state = torch.load(path, weights_only=True)
    weight = state["model"]["bert.embeddings.word_embeddings.weight"]
    # One flipped byte inside a tensor's data: the zip and the pickle still read, the CRC does not.
    at = whole.find(weight.view(-1)[1000:1004].numpy().tobytes())
    assert at > 0
    flipped = bytearray(whole)
    flipped[at] ^= 0xFF
    for damaged, expected in ((whole[:len(whole) // 2], "damaged, cannot be read"),
                              (b"not a checkpoint" * 8, "damaged, cannot be read"),
                              (bytes(flipped), "bert.embeddings.word_embeddings.weight fails its checksum")):
        path.write_bytes(damaged)
        line = refused(command, capsys, run_dir.parents[2])
        assert line.startswith(f"error: {path}: ") and expected in line and "delete it" in line, line
    torch.save({**state, "format": checkpoint.FORMAT + 1}, path)
    line = refused(command, capsys, run_dir.parents[2])
    assert f"format {checkpoint.FORMAT + 1}" in line and "delete it" in line, line
    # With the original file back, the run goes on and finishes.
    path.write_bytes(whole)
    assert train.main(command) == 0 and not path.exists()


@pytest.mark.parametrize("fused", [True, False])
def test_the_optimizer_and_schedule_go_on_from_their_state_dicts(fused):
    def make():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
        opt = optim.AdamNoBiasCorrection(optim.parameter_groups(model, 0.01), lr=1e-2, fused=fused)
        return model, opt, optim.LinearWarmupDecay(opt, total_steps=10, warmup_fraction=0.2)

    def step(model, opt, sched, i):
        x = torch.linspace(-1, 1, 8).view(2, 4) * (i + 1)
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        opt.step()
        sched.step()

    model, opt, sched = make()
    for i in range(6):
        step(model, opt, sched, i)
    other, other_opt, other_sched = make()
    for i in range(3):
        step(other, other_opt, other_sched, i)
    # Saved after step 3 and loaded into a fresh copy: steps 4-6 give the same bits.
    fresh, fresh_opt, fresh_sched = make()
    fresh.load_state_dict(other.state_dict())
    fresh_opt.load_state_dict(other_opt.state_dict())
    fresh_sched.load_state_dict(other_sched.state_dict())
    assert fresh_sched.get_last_lr() == other_sched.get_last_lr()
    for i in range(3, 6):
        step(fresh, fresh_opt, fresh_sched, i)
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("which", [1, 2], ids=["while scoring dev", "while scoring the training set"])
def test_a_signal_while_evaluating_saves_the_trained_state_and_the_run_ends_the_same(model_dir, tmp_path,
                                                                                     monkeypatch, capsys, which):
    """SIGINT at the second batch of the run's first (dev) or second (--eval-train) scoring pass:
    the command exits 130 with a checkpoint at the last step, and run again it scores from that
    state, ending as a run never stopped."""
    extra = [*SHORT, "--method", "lnsr", "--eval-train", "--eval-batch-size", "4"]
    assert train.main(args(model_dir, tmp_path / "never", *extra)) == 0
    passes, predict = [], train.predict

    def predict_and_stop(*a, on_batch=None, **k):
        passes.append(len(passes) + 1)
        here = passes[-1] == which

        def stop_at_the_second_batch(i, n):
            if here and i == 1:
                os.kill(os.getpid(), signal.SIGINT)
            on_batch(i, n)
        return predict(*a, on_batch=stop_at_the_second_batch, **k)

    monkeypatch.setattr(train, "predict", predict_and_stop)
    command = args(model_dir, tmp_path / "stopped", *extra)
    assert train.main(command) == 128 + signal.SIGINT
    run_dir = run_of(tmp_path / "stopped")
    assert torch.load(checkpoint.path_of(run_dir), weights_only=False)["step"] == 5     # trained to the end
    assert not (run_dir / "results.json").exists()
    monkeypatch.undo()
    capsys.readouterr()
    assert train.main(command) == 0
    assert "goes on from its checkpoint at step 5/5" in capsys.readouterr().err
    assert json.loads((run_dir / "config.json").read_text())["resumed_at_steps"] == [5]
    assert outcome(run_dir) == outcome(run_of(tmp_path / "never"))
    assert not checkpoint.path_of(run_dir).exists()
