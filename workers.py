"""Many processes, one sweep: runs claimed through the output folder, and data-parallel runs.

There are two ways to put more than one process on a grid of runs (docs/CLUSTER.md has the
commands for one 8-GPU node, a SLURM job array and a pre-emption).

**Seeds in parallel: workers share a grid.** Any number of copies of one train.py command share
its grid through the `--output-dir` they all see: copies started by hand, the ranks of
`torchrun --nproc_per_node=8`, the tasks of `srun`, or the tasks of a SLURM job array. They
need no connection to one another. Before a worker trains a run, it claims the run:

- *claim*: it creates `<run>/claim.1.json`, holding its host, pid, start time and a random
  nonce. The file is written whole under a name of its own and then hard-linked into place;
  the link is atomic and fails if the file exists, on a local disk and on NFS. So exactly one
  worker succeeds, and no reader ever sees a half-written claim.
- *heartbeat*: while the run makes progress, a thread touches the claim file (its mtime is the
  heartbeat) every `--claim-timeout / 5` seconds. A worker whose run stops moving (hung in a
  collective, say) stops beating.
- *release*: when the run ends, with results.json or failed.json written, the worker deletes
  its own claim file.
- *skip*: a run with results.json is finished. A run whose newest claim has a heartbeat
  younger than `--claim-timeout` belongs to a live worker. The worker comes back to it after its
  own list, and waits until it is finished or taken over. A run that failed (failed.json) since
  the worker started is not retried by it; running the command again retries it.
- *take over*: a claim with an older heartbeat, or one whose pid no longer runs on this machine,
  belongs to a worker that died (killed, pre-empted, or its machine gone). Taking over means
  creating the next generation, `claim.<n+1>.json`, in the same exclusive way, so of several
  workers that judge one claim dead exactly one wins. The winner deletes the older
  generations, and the run goes on from its last checkpoint (checkpoint.py), or from step 1
  if it has none. A worker that was only stalled finds a newer
  generation at its next heartbeat, abandons the run and writes nothing more to it.

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

def machine_id() -> str:
    """The host, its boot and this process's pid namespace: pids mean the same thing only where
    all three agree (two containers can share a host name, not their pids)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        pid_namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        boot, pid_namespace = "?", "?"
    return f"{socket.gethostname()}/{boot}/{pid_namespace}"


def claim_files(run_dir: Path) -> list:
    """[(generation, path)] of the run's claim files, oldest first."""
    found = []
    try:
        for path in Path(run_dir).glob("claim.*.json"):
            middle = path.name[len("claim."):-len(".json")]
            if middle.isdigit():
                found.append((int(middle), path))
    except OSError:
        return []
    return sorted(found)


def read_claim(run_dir: Path) -> dict | None:
    """The run's current claim, the newest generation: its record, with `generation`, and
    `heartbeat`, the time its file was last touched."""
    for generation, path in reversed(claim_files(run_dir)):
        try:
            heartbeat = path.stat().st_mtime
        except OSError:                      # deleted a moment ago: look at the one before
            continue
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            record = {}
        record = record if isinstance(record, dict) else {}
        return {**record, "generation": generation, "heartbeat": heartbeat}
    return None


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
    if claim.get("machine") == machine_id():
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
    """A run this worker holds, as claim.<generation>.json. Its heartbeat thread touches that
    file until `release`, as long as the run makes progress (`progress()`, called at every
    step); `lost` turns true if a newer generation took the run over."""

    def __init__(self, run_dir: Path, generation: int, interval: float, timeout: float):
        self.dir, self.generation = Path(run_dir), generation
        self.path = self.dir / f"claim.{generation}.json"
        self.lost, self.timeout, self.last_progress = False, timeout, time.time()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.beat, args=(interval,), daemon=True)
        self.thread.start()

    def progress(self):
        self.last_progress = time.time()

    def owned(self) -> bool:
        """No newer claim, and ours still there (a listing that fails proves nothing)."""
        files = claim_files(self.dir)
        if not files:
            return self.path.exists()
        return files[-1][0] == self.generation

    def beat(self, interval):
        while not self.stop.wait(interval):
            try:
                if not self.owned():
                    self.lost = True
                    return
                # A worker whose run stopped moving (hung in a collective, a dead data loader)
                # stops beating, so that another worker takes the run over.
                if time.time() - self.last_progress < self.timeout:
                    os.utime(self.path)
            except Exception:                # the next beat tries again (ESTALE, EACCES, ...)
                pass

    def release(self):
        self.stop.set()
        self.thread.join()
        self.path.unlink(missing_ok=True)   # our own generation only: never another's claim


def claim_run(run_dir: Path, timeout: float, since: float = 0.0) -> Claim | str:
    """Claim the run in run_dir for this worker, or say why not: finished, failed during this
    sweep (a failed.json newer than `since`, the time this worker started), or held by a live
    worker ("claimed by ...")."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    for _ in range(5):
        if (run_dir / "results.json").exists():
            return "finished"
        try:
            if (run_dir / "failed.json").stat().st_mtime >= since:
                return "failed in this sweep (failed.json); run the command again to retry it"
        except FileNotFoundError:
            pass
        current = read_claim(run_dir)
        if current is not None and not is_stale(current, timeout):
            return describe_claim(current)
        # Free, or its worker is gone: the next generation's file is ours if we create it first.
        generation = 1 if current is None else current["generation"] + 1
        record = {"worker": worker_name(), "host": socket.gethostname(), "machine": machine_id(),
                  "pid": os.getpid(), "started": time.time(), "nonce": uuid.uuid4().hex}
        if not write_new(run_dir / f"claim.{generation}.json", record):
            continue                         # another worker was first: look again
        for older, path in claim_files(run_dir):
            if older < generation:           # dead claims: their workers abandon the run
                path.unlink(missing_ok=True)
        claim = Claim(run_dir, generation, interval=max(0.5, timeout / 5), timeout=timeout)
        if (run_dir / "results.json").exists():   # finished between our check and the claim
            claim.release()
            return "finished"
        return claim
    current = read_claim(run_dir)
    return describe_claim(current) if current else "claimed by another worker"


# ----------------------------------------------------------------------------- data parallel

def weights_fingerprint(model) -> str:
    """A hash of every parameter's bytes: two ranks' are equal only if their weights are."""
    import hashlib
    import torch
    digest = hashlib.sha256()
    for p in model.parameters():
        digest.update(p.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


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

    def any(self, flags: list) -> list:
        return list(flags)

    def gather(self, obj) -> list:
        return [obj]

    def hold_the_same_weights(self, model) -> bool:
        return True

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

    def any(self, flags: list) -> list:
        """For each flag, whether it is true on any rank (all ranks get the answer)."""
        import torch
        t = torch.tensor([int(bool(f)) for f in flags], device=self.device)
        self.dist.all_reduce(t, op=self.dist.ReduceOp.MAX)
        return [bool(x) for x in t.tolist()]

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        out = [None] * self.world
        self.dist.all_gather_object(out, obj)
        return out

    def hold_the_same_weights(self, model) -> bool:
        """Whether every rank's weights equal rank 0's, bit for bit (on every rank)."""
        return len(set(self.gather(weights_fingerprint(model)))) == 1

    def barrier(self):
        self.dist.barrier()

    def close(self):
        # Every rank leaves its last collective before any rank tears the group down and exits:
        # a peer's sockets closing under a rank still inside gloo can abort that rank.
        self.dist.barrier()
        self.dist.destroy_process_group()
