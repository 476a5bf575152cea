"""Run folders on disk: writing a run's files, reading older runs as they were made, and the
seed lists that name run folders (seed<N>).

`RunFiles` writes a run's config.json, log.jsonl, results.json (or failed.json) and
dev_predictions.json, each whole or not at all.

A setting added to train.py after runs were committed is missing from those runs' config.json.
Each such setting is listed here with the value those runs were made with, so that resuming a
sweep (train.py) and summarizing it (evaluate.py) read an old run as what it was, never as
today's default.
"""
import json
import os
from pathlib import Path

from bert.errors import InputError


def parse_seeds(text: str) -> list:
    """'1-25' -> [1..25]; '1,3,5' -> [1, 3, 5]; '1-3,7' -> [1, 2, 3, 7]."""
    seeds = []
    for part in str(text).split(","):
        part = part.strip()
        try:
            if "-" in part[1:]:
                lo, hi = part.split("-", 1) if not part.startswith("-") else (part, "")
                lo, hi = int(lo), int(hi)
                if hi < lo:
                    raise InputError(f"--seeds: {part} counts down; write {hi}-{lo}")
                seeds.extend(range(lo, hi + 1))
            else:
                seeds.append(int(part))
        except ValueError:
            raise InputError(f"--seeds: cannot read {text!r} (examples: 1-25, 1,3,5, 1-3,7)") from None
    if len(set(seeds)) != len(seeds):
        raise InputError(f"--seeds: {text!r} names a seed twice")
    if any(s < 0 for s in seeds):
        raise InputError(f"--seeds: seeds must be >= 0, got {text!r}")
    return seeds


def seed_folder(seed: int) -> str:
    """The name of a run's folder: <output-dir>/<task>/<method>/seed<N>."""
    return f"seed{seed}"


def settings_differences(old: dict, new: dict) -> list:
    """'key: old there, new now' for every key of `new` whose value differs from `old`'s, values
    compared as JSON (a tuple equals the list it was saved as)."""
    as_json = lambda value: json.loads(json.dumps(value, default=str))
    return [f"{k}: {old.get(k)!r} there, {v!r} now" for k, v in new.items() if as_json(old.get(k)) != as_json(v)]


def write_json(path: Path, obj):
    """Write, then rename: a reader never sees half a file."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")     # one per process: never shared
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


class RunFiles:
    """The files of one run folder. With writes=False (ranks other than 0 of a data-parallel
    run) every method does nothing."""

    def __init__(self, run_dir: Path, writes: bool = True):
        self.dir, self.writes, self.log_file = Path(run_dir), writes, None
        self.records = []                # the log so far, for a mid-run checkpoint

    def start(self, config: dict, records: list = ()):
        """A new run, or with `records` (the log lines of a checkpoint) a run that goes on:
        log.jsonl is rewritten to hold exactly those lines, and later lines follow them."""
        self.records = list(records)
        if not self.writes:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        for stale in ("results.json", "failed.json", "log.jsonl", "dev_predictions.json",
                      "held_out_predictions.json"):
            (self.dir / stale).unlink(missing_ok=True)
        write_json(self.dir / "config.json", config)
        self.log_file = open(self.dir / "log.jsonl", "w", encoding="utf-8")
        for record in self.records:
            self.log_file.write(json.dumps(record) + "\n")
        self.log_file.flush()

    def log(self, record: dict):
        self.records.append(record)
        if self.log_file is not None:
            self.log_file.write(json.dumps(record) + "\n")
            self.log_file.flush()

    def close(self):
        if self.log_file is not None:
            self.log_file.close()
            self.log_file = None

    def fail(self, reason: str, step: int | None = None):
        self.close()
        if self.writes:
            write_json(self.dir / "failed.json", {"status": "failed", "step": step, "reason": reason})

    def finish(self, results: dict, predictions: list, scored: str = "dev"):
        """<scored>_predictions.json first (dev, or holdout): a run is finished once results.json
        is there."""
        if self.writes:
            write_json(self.dir / f"{scored}_predictions.json", predictions)
            write_json(self.dir / "results.json", results)


# train.py flags added later -> the behaviour of every run made before them.
LEGACY_SETTINGS = {
    # A record without it drew all dropout masks of a run from one stream seeded once.
    "dropout_stream": "run",
    # A record without it ran on a CPU, where TF32 does not exist.
    "allow_tf32": False,
    "deterministic": False,
    # ... and in one process each: --data-parallel came later.
    "data_parallel_ranks": 1,
    # ... and scored on the dev set, without learning curves: --holdout and --curves came later.
    "holdout": None,
    "curves": False,
}
# method -> its options added later -> the behaviour before them.
LEGACY_METHOD_OPTIONS = {
    # the noisy pass always replayed the clean pass's masks, and the penalty was Eq. 2's difference
    "lnsr": {"dropout": "shared", "estimator": "difference"},
}


def with_legacy_settings(settings: dict) -> dict:
    """A config.json's "settings", with every later-added setting filled in as it was then."""
    filled = {**LEGACY_SETTINGS, **settings}
    if "method_options" in settings or settings.get("method") in LEGACY_METHOD_OPTIONS:
        filled["method_options"] = legacy_method_options(settings.get("method"),
                                                         settings.get("method_options"))
    return filled


def legacy_method_options(method, options) -> dict:
    """A run's method options, with options added later filled in as they were then."""
    return {**LEGACY_METHOD_OPTIONS.get(method, {}), **(options or {})}


def scored_set(results: dict) -> str:
    """Which set a run was scored on, the key of its metrics in results.json: "dev", or
    "held_out" (train.py --holdout: a fixed part of the training set). Runs made before
    --holdout existed were scored on dev."""
    return results.get("scored", "dev")


def one_answer(results: dict) -> str | None:
    """How a run collapsed to one answer, from its results.json, or None: every prediction on
    the scored set the same class, or STS-B scores with a standard deviation below 1e-3 (labels
    span 0-5). Runs made before prediction spreads were recorded are never marked."""
    scored = scored_set(results)
    name = "held-out" if scored == "held_out" else scored
    spread = results.get(f"{scored}_predictions")
    if not isinstance(spread, dict):
        return None
    counts = spread.get("class_counts")
    if isinstance(counts, dict) and len(counts) == 1:
        return f"every {name} prediction is class {next(iter(counts))}"
    std = spread.get("std")
    if isinstance(std, (int, float)) and std < 1e-3:
        return f"constant {name} scores (std {std:.1e})"
    return None


class RunFailed(Exception):
    """A run that could not finish (a loss that is not finite): failed.json says why."""


def versions() -> dict:
    """The software a run was made with, and the commit of this checkout, for config.json."""
    import platform
    import subprocess
    import tokenizers
    import torch
    v = {"python": platform.python_version(), "torch": torch.__version__,
         "tokenizers": tokenizers.__version__, "platform": platform.platform()}
    try:
        v["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                         cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        v["git_commit"] = None
    return v
