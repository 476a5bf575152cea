"""Many processes, one sweep: runs claimed through the output folder, and data-parallel runs.

There are two ways to put more than one process on a grid of runs (docs/CLUSTER.md has the
commands for one 8-GPU node, a SLURM job array and a pre-emption).

**Seeds in parallel: workers share a grid.** Any number of copies of one train.py command share
its grid through the `--output-dir` they all see: copies started by hand, the ranks of
`torchrun --nproc_per_node=8`, the tasks of `srun`, or the tasks of a SLURM job array. They
need no connection to one another. Before a worker trains a run, it claims the run:

- *claim*: it writes its record (host, pid, start time, a heartbeat and a random nonce) to a
  file of its own and hard-links that file to `<run>/claim.json`. The link is atomic and fails
  if claim.json exists, on a local disk and on NFS, so exactly one worker succeeds, and no
  reader ever sees a half-written claim.
- *heartbeat*: while the run trains, a thread rewrites the heartbeat every
  `--claim-timeout / 5` seconds, after checking that the claim still carries its nonce. If
  another worker took the run over (this one stalled past the timeout), the run is abandoned
  and writes nothing more.
- *release*: when the run ends, with results.json or failed.json written, claim.json is
  deleted, if it is still this worker's.
- *skip*: a run with results.json is finished. A run whose claim has a heartbeat younger than
  `--claim-timeout` belongs to a live worker; the worker comes back to it after its own list,
  and waits until it is finished or taken over. A run that failed (failed.json) since the
  worker started is not retried by it; running the command again retries it.
- *take over*: a claim with an older heartbeat, or a claim from a pid that no longer runs on
  this host, belongs to a worker that died (killed, pre-empted, or its machine gone). A worker
  renames that claim aside (os.rename is atomic: one worker moves it) and checks that what it
  moved carries the dead claim's nonce. If it does not, another worker had just taken the run
  over; the claim is linked back and the run left alone. Otherwise it claims the run as above,
  and the run starts from scratch.

Heartbeats are wall-clock times written by one host and read by others, so the hosts' clocks
must agree to well within `--claim-timeout` (NTP keeps them within milliseconds). A run's result
depends on its settings and seed alone, because every run seeds its own random streams. A grid
split among any number of workers therefore gives the same bits as a serial sweep on the same
hardware and thread count.

**One run on all ranks: `--data-parallel`.** Under torchrun every rank trains the same run. The
clean forward pass goes through DistributedDataParallel, which averages the gradients. Each
global batch of `--batch-size` examples, drawn in the single-process order, is split into
contiguous shares, one per rank. Rank r's loss, a mean over its n_r examples, is weighted by
n_r * W / N. The average over the W ranks is then the mean over all N examples, even when the
last batch of an epoch does not divide evenly. A rank with no example in a batch runs the
batch's first example with weight 0, so that every rank takes part in every step.
Regularizers get the plain model: their extra passes (LNSR's noisy pass, SMART's perturbed
ones) add to the same gradients DDP averages. Each rank draws dropout masks of its own, seeded
by (seed, step, rank). Rank 0 claims the run, evaluates the whole dev set and writes every file;
the other ranks write nothing.
"""
import datetime
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

CLAIM = "claim.json"


# ----------------------------------------------------------------------------- who we are

def local_index() -> int | None:
    """This process's index on its machine, from torchrun (LOCAL_RANK) or SLURM (SLURM_LOCALID):
    the GPU it uses."""
    for name in ("LOCAL_RANK", "SLURM_LOCALID"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return None


def worker_name() -> str:
    """host:pid, plus the torchrun rank or SLURM array task where there is one."""
    name = f"{socket.gethostname()}:{os.getpid()}"
    if os.environ.get("RANK"):
        name += f" rank {os.environ['RANK']}"
    if os.environ.get("SLURM_ARRAY_TASK_ID"):
        name += f" array task {os.environ['SLURM_ARRAY_TASK_ID']}"
    return name


# ----------------------------------------------------------------------------- claims

def read_claim(run_dir: Path) -> dict | None:
    try:
        claim = json.loads((run_dir / CLAIM).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return claim if isinstance(claim, dict) else None


def claim_age(claim: dict) -> float:
    """Seconds since the claim's last heartbeat."""
    try:
        return time.time() - float(claim["heartbeat"])
    except (KeyError, TypeError, ValueError):
        return float("inf")


def is_stale(claim: dict, timeout: float) -> bool:
    """A claim whose worker is gone: no heartbeat for `timeout` seconds, or a dead pid here."""
    if claim_age(claim) > timeout:
        return True
    if claim.get("host") == socket.gethostname():
        try:
            os.kill(int(claim["pid"]), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, KeyError, TypeError, ValueError):
            pass
    return False


def describe_claim(claim: dict) -> str:
    return f"claimed by {claim.get('worker', '?')}, heartbeat {claim_age(claim):.0f} s ago"


def write_new(path: Path, record: dict) -> bool:
    """Create `path` holding `record`, whole, only if it does not exist: the record goes to a
    file of its own, which is then hard-linked to `path` (atomic, and it fails if `path`
    exists). A reader never sees an empty or half-written claim."""
    tmp = path.with_name(f"{path.name}.{record['nonce']}.tmp")
    tmp.write_text(json.dumps(record), encoding="utf-8")
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


class Claim:
    """A run this worker holds. Its heartbeat thread runs until `release`; `lost` turns true if
    another worker took the run over (this one stalled past the timeout)."""

    def __init__(self, run_dir: Path, record: dict, interval: float):
        self.path, self.record, self.lost = run_dir / CLAIM, record, False
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.beat, args=(interval,), daemon=True)
        self.thread.start()

    def owned(self) -> bool:
        held = read_claim(self.path.parent)
        return held is not None and held.get("nonce") == self.record["nonce"]

    def beat(self, interval):
        while not self.stop.wait(interval):
            if not self.owned():
                if (self.path.parent / CLAIM).exists():      # someone else's now
                    self.lost = True
                    return
                continue                     # unreadable for a moment (NFS): try again
            self.record["heartbeat"] = time.time()
            tmp = self.path.with_name(f"{CLAIM}.{self.record['nonce']}.beat")
            try:
                tmp.write_text(json.dumps(self.record), encoding="utf-8")
                os.replace(tmp, self.path)
            except OSError:                  # a transient error: the next beat tries again
                tmp.unlink(missing_ok=True)

    def release(self):
        self.stop.set()
        self.thread.join()
        if self.owned():                     # never delete another worker's claim
            self.path.unlink(missing_ok=True)


def claim_run(run_dir: Path, timeout: float, since: float = 0.0) -> Claim | str:
    """Claim the run in run_dir for this worker, or say why not: finished, failed during this
    sweep (a failed.json newer than `since`, the time this worker started), or held by a live
    worker."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for _ in range(5):
        if (run_dir / "results.json").exists():
            return "finished"
        failed = run_dir / "failed.json"
        if failed.exists() and failed.stat().st_mtime >= since:
            return "failed in this sweep (failed.json); run the command again to retry it"
        now = time.time()
        record = {"worker": worker_name(), "host": socket.gethostname(), "pid": os.getpid(),
                  "started": now, "heartbeat": now, "nonce": uuid.uuid4().hex}
        if write_new(run_dir / CLAIM, record):
            if (run_dir / "results.json").exists():  # finished between our check and the claim
                (run_dir / CLAIM).unlink(missing_ok=True)
                return "finished"
            return Claim(run_dir, record, interval=max(0.5, timeout / 5))
        held = read_claim(run_dir)
        if held is None:                     # unreadable: stale only once its file is old
            try:
                if time.time() - (run_dir / CLAIM).stat().st_mtime <= timeout:
                    return "claimed by another worker (its claim is being written)"
            except FileNotFoundError:
                continue
        elif not is_stale(held, timeout):
            return describe_claim(held)
        # Its worker is gone. Move the claim aside; if what was moved is not the claim judged
        # dead (another worker took the run over meanwhile), put it back and leave the run.
        aside = run_dir / f"{CLAIM}.{record['nonce']}.stale"
        try:
            os.rename(run_dir / CLAIM, aside)
        except FileNotFoundError:
            continue
        moved = read_claim_file(aside)
        if held is not None and (moved is None or moved.get("nonce") != held.get("nonce")):
            try:
                os.link(aside, run_dir / CLAIM)
            except FileExistsError:
                pass
            aside.unlink(missing_ok=True)
            return describe_claim(moved) if moved else "claimed by another worker"
        aside.unlink(missing_ok=True)
    held = read_claim(run_dir)
    return describe_claim(held) if held else "claimed by another worker"


def read_claim_file(path: Path) -> dict | None:
    try:
        claim = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return claim if isinstance(claim, dict) else None


# ----------------------------------------------------------------------------- data parallel

class SingleProcess:
    """The interface of DataParallel for one process: every batch whole, nothing to reduce."""
    rank, world, is_main = 0, 1, True

    def local_part(self, batch: dict):
        return batch, 1.0

    def wrap(self, model):
        return model

    def all_sum(self, tensor):
        return tensor

    def decide(self, value):
        return value

    def barrier(self):
        pass

    def close(self):
        pass


class DataParallel:
    """All torchrun ranks train one run: gloo on CPUs, nccl on GPUs (see the module docstring)."""

    def __init__(self, device):
        import torch.distributed as dist
        from bert.errors import InputError
        missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
        if missing:
            raise InputError(f"--data-parallel: start the command with torchrun ({', '.join(missing)} "
                             "not set), e.g. torchrun --nproc_per_node=2 train.py ... --data-parallel")
        self.dist = dist
        # The other ranks wait at a barrier while rank 0 evaluates (the whole training set too,
        # with --eval-train): far longer than the default collective timeout on a big task.
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(hours=6))
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        self.device = device

    def local_part(self, batch: dict):
        """This rank's contiguous share of a global batch, and the weight n_r * W / N of its mean."""
        n = len(batch["labels"])
        lo, hi = n * self.rank // self.world, n * (self.rank + 1) // self.world
        if hi == lo:                         # no example for this rank: run one, weigh it 0
            return {k: v[:1] for k, v in batch.items()}, 0.0
        return {k: v[lo:hi] for k, v in batch.items()}, (hi - lo) * self.world / n

    def wrap(self, model):
        from torch.nn.parallel import DistributedDataParallel
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def all_sum(self, tensor):
        self.dist.all_reduce(tensor)
        return tensor

    def decide(self, value):
        """Rank 0's value, on every rank."""
        box = [value]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self):
        self.dist.barrier()

    def close(self):
        self.dist.destroy_process_group()
