"""Mid-run checkpoints: a run stopped by Ctrl-C, a SLURM pre-emption (SIGTERM) or a crash goes on
from its last checkpoint, and on the CPU ends with the same bits as a run never stopped.

A run's training loop is a pure function of its settings and seed (train.py seeds every random
stream), so continuing it exactly needs everything that changed since step 0:

    model weights                     theta_t
    optimizer moments and schedule    m_t, v_t; the learning rate's step t
    step                              t; the epoch and the position in its data order follow from
                                      it (an epoch's batches are a pure function of seed and epoch)
    random streams, per rank          torch's global generator (dropout), CUDA's, and the method's
                                      own (LNSR's noise, Mixout's masks, SMART's start point)
    method state                      what a method learns besides theta (SMART's teacher)
    loss sums since the last log line, the log lines so far, the training seconds so far

`<run>/checkpoint.pt` holds all of it. It is written aside and renamed into place, so a reader
sees the previous checkpoint or the new one, never half of one. Each tensor's CRC-32 is stored
beside it and checked on loading, and the settings the run was made with are compared with
today's: a damaged file, one written by a run with other settings or in another format is
refused in one line (InputError), never silently used. The file is removed when the run has
finished (results.json written) or failed; `--save-model` is separate.

With `--data-parallel` rank 0 writes, every rank reads, and each rank gets back its own random
streams (gathered from all ranks when the checkpoint is written).

`StopRequest` turns SIGINT and SIGTERM into "save a checkpoint at the end of this step, then
exit"; a second signal, or one that arrives while no run is training, stops at once.
"""
import os
import signal
import time
import zlib
from pathlib import Path

import torch

from bert.errors import InputError
from run_records import settings_differences, with_legacy_settings

FORMAT = 1                  # raise when the layout of the saved dict changes
NAME = "checkpoint.pt"


def path_of(run_dir) -> Path:
    return Path(run_dir) / NAME


# ----------------------------------------------------------------------------- when to save

class Schedule:
    """Periodic checkpoints: every `minutes` of wall time and/or every `steps` steps (0: never)."""

    def __init__(self, minutes: float, steps: int):
        self.minutes, self.steps = minutes, steps
        self.last = time.time()

    def due(self, step: int) -> bool:
        by_steps = self.steps > 0 and step % self.steps == 0
        by_time = self.minutes > 0 and time.time() - self.last >= 60 * self.minutes
        return by_steps or by_time

    def saved(self):
        self.last = time.time()


class StopRequest:
    """SIGINT (Ctrl-C) and SIGTERM (kill, SLURM pre-emption and requeue), caught.

    While a run trains (`training` is True) the first signal only sets `signum`: the loop saves a
    checkpoint at the end of the step and raises RunStopped. Outside a run, or at a second
    signal, the handler raises KeyboardInterrupt at once: there is nothing to save, or the user
    insists.
    """

    def __init__(self):
        self.signum = None
        self.training = False
        self.previous = {}

    def install(self):
        for signum in (signal.SIGINT, signal.SIGTERM):
            self.previous[signum] = signal.signal(signum, self.handle)

    def uninstall(self):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}

    def handle(self, signum, frame):
        first = self.signum is None
        self.signum = signum
        if not (first and self.training):
            raise KeyboardInterrupt

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "a signal"


class RunStopped(Exception):
    """The run saved a checkpoint because a signal asked it to stop."""

    def __init__(self, signum: int, step: int, total_steps: int, path: Path):
        self.signum, self.step, self.total_steps, self.path = signum, step, total_steps, path
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}/{total_steps}: "
                         f"saved {path}")


# ----------------------------------------------------------------------------- what is saved

def random_streams(method, device) -> dict:
    """This process's random streams: torch's global generator, CUDA's, the method's own."""
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "method": {name: g.get_state() for name, g in method.generators().items()}}


def set_random_streams(streams: dict, method, device):
    torch.set_rng_state(streams["torch"])
    if device.type == "cuda" and streams["cuda"] is not None:
        torch.cuda.set_rng_state(streams["cuda"], device)
    generators = method.generators()
    if set(generators) != set(streams["method"]):
        raise InputError(f"the checkpoint's random streams ({', '.join(streams['method']) or 'none'}) are not "
                         f"this method's ({', '.join(generators) or 'none'})")
    for name, state in streams["method"].items():
        generators[name].set_state(state)


def capture(*, settings, step, model, optimizer, scheduler, method, ranks, device, loop, log) -> dict | None:
    """The run's state after `step` steps. Every rank calls it (the random streams of all ranks
    are gathered); rank 0 gets the dict, the others None."""
    streams = ranks.gather(random_streams(method, device))
    if not ranks.is_main:
        return None
    return {"format": FORMAT, "settings": settings, "step": step, "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "method": method.state_dict(), "random_streams": streams, "loop": loop, "log": log}


def restore(state, *, model, optimizer, scheduler, method, ranks, device):
    """Put a checkpoint's state into a freshly set-up run (model loaded, method set up)."""
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        method.load_state_dict(state["method"])
    except (RuntimeError, KeyError, ValueError, IndexError, AttributeError) as e:
        raise InputError(f"the checkpoint does not fit this model or method ({str(e).splitlines()[0]}); "
                         "delete it to start the run over") from None
    streams = state["random_streams"]
    if len(streams) != ranks.world:
        raise InputError(f"the checkpoint holds the random streams of {len(streams)} processes, this run "
                         f"has {ranks.world}")
    set_random_streams(streams[ranks.rank], method, device)


# ----------------------------------------------------------------------------- on disk

def tensors_of(obj, prefix=""):
    """(name, tensor) for every tensor in nested dicts, lists and tuples, in a fixed order."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from tensors_of(v, f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from tensors_of(v, f"{prefix}/{i}")


def crc32(tensor: torch.Tensor) -> int:
    data = tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()
    return zlib.crc32(memoryview(data))


def save(run_dir, state: dict):
    """Write the checkpoint aside, then rename it over the old one (atomic on one file system)."""
    path = path_of(run_dir)
    tmp = path.with_name(f"{NAME}.{os.getpid()}.tmp")
    state = {**state, "crc32": {name: crc32(t) for name, t in tensors_of(state)}}
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read(run_dir, settings: dict) -> dict | None:
    """The run's checkpoint, or None if it has none. Refused in one line (InputError) if it is
    damaged (every tensor's CRC-32 is checked), in another format, or was written with settings
    other than `settings` (only the keys both have are compared). The tensors are mapped from
    the file, not copied."""
    path = path_of(run_dir)
    if not path.exists():
        return None
    where = f"{path}: "
    delete = "; delete it to start the run over"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:               # truncated, not a zip, bad pickle: all mean damaged
        raise InputError(f"{where}damaged, cannot be read ({str(e).splitlines()[0][:120]}){delete}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else None
        raise InputError(f"{where}written in checkpoint format {found!r}, this code reads format {FORMAT}{delete}")
    try:
        # Settings added after the checkpoint was written count as they were then (run_records.py).
        saved_settings, step = with_legacy_settings(state["settings"]), int(state["step"])
        sums = state["crc32"]
    except (KeyError, TypeError, ValueError):
        raise InputError(f"{where}damaged, parts are missing{delete}") from None
    common = {k: v for k, v in settings.items() if k in saved_settings}
    differ = settings_differences(saved_settings, common)
    if differ:
        raise InputError(f"{where}saved by a run with other settings ({'; '.join(differ[:3])}){delete}, "
                         "or use another --output-dir")
    found = {name: crc32(t) for name, t in tensors_of({k: v for k, v in state.items() if k != "crc32"})}
    if found != sums:
        bad = next((n for n in sums if found.get(n) != sums[n]), None) or next(iter(set(found) - set(sums)))
        raise InputError(f"{where}damaged, tensor {bad.lstrip('/')} fails its checksum{delete}")
    state["step"] = step
    return state


def remove(run_dir):
    path_of(run_dir).unlink(missing_ok=True)
