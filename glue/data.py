"""GLUE data: TSV files -> examples -> token ids -> dynamically padded batches, and back to
submission files.

    examples = load_examples("rte", "train")                  # list[Example]
    features = encode(examples, tokenizer, max_seq_length=128)
    for batch in batches(features, batch_size=32, seed=0, epoch=epoch, bucket=True):
        batch["input_ids"]                                     # (B, T), T = longest in the batch

Reading. The GLUE files are tab-separated without any quoting: MRPC, STS-B and MNLI sentences
contain unbalanced '"' characters, so a CSV reader with its default quoting would merge rows. We
split each line on '\\t', strip a UTF-8 byte-order mark (MRPC starts with one), accept '\\r\\n'
line ends and a last line without '\\n', and check every row: its column count, its label, and
for STS-B a score that is a number in [0, 5]. Any problem ends with InputError("path:line: what").

Batching. Padding every batch to 128 tokens wastes most of the compute on GLUE's short
sentences; each batch is instead padded to its own longest sequence ("dynamic padding"), and
`bucket=True` additionally groups examples of similar length (the idea behind fairseq's and
tensor2tensor's length bucketing) so that little padding is left at all. Order is a pure
function of (seed, epoch), so a run can be repeated, and every example appears exactly once per
epoch. benchmarks/bench_padding.py measures what this saves.
"""

import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bert.errors import InputError
from glue.tasks import FileLayout, TaskSpec, get_task


@dataclass
class Example:
    text_a: str
    text_b: str | None                  # None for single-sentence tasks (CoLA, SST-2)
    label: int | float | None           # class id, STS-B score, or None on test files
    index: str | int                    # the file's id column, else the 0-based row number
    line: int                           # 1-based line in the file, for messages


def default_data_dir() -> Path:
    """$GLUE_DIR if set, else ./data/glue (one sub-folder per task, as GLUE distributes them)."""
    return Path(os.environ.get("GLUE_DIR") or Path("data") / "glue")


def task_file(task: str, split: str, data_dir=None) -> Path:
    spec = get_task(task)
    _, layout = spec.split_layout(split)
    return Path(data_dir or default_data_dir()) / spec.dir_name / layout.file


def load_examples(task: str, split: str, data_dir=None) -> list[Example]:
    """Read one split of a GLUE task. split: "train", "dev", "test"; MNLI also "dev_matched",
    "dev_mismatched", "test_matched", "test_mismatched" ("dev" means dev_matched).

    Missing files are an error here; `glue.ensure_task_data` downloads them first.
    """
    spec = get_task(task)
    _, layout = spec.split_layout(split)
    data_dir = Path(data_dir or default_data_dir())
    path = data_dir / spec.dir_name / layout.file
    if not path.is_file():
        raise InputError(
            f"{path}: file not found; download the {spec.name} data with "
            f"`python -m glue.download {spec.name} --data-dir {data_dir}` "
            f"(or set GLUE_DIR / --data-dir to the folder that holds {spec.dir_name}/)")
    return read_examples(path, spec, layout)


def read_examples(path: Path, spec: TaskSpec, layout: FileLayout) -> list[Example]:
    """Parse and validate one GLUE TSV file (see the module docstring for the rules)."""
    rows = list(_read_tsv_lines(path))                 # [(line number, text)]
    if not rows:
        raise InputError(f"{path}:1: the file is empty")

    if layout.has_header:
        header_line, header = rows[0][0], rows[0][1].split("\t")
        rows = rows[1:]
        num_columns = len(header)
        columns = {}
        for role in ("text_a", "text_b", "label", "index"):
            name = getattr(layout, role)
            if name is None:
                continue
            if name not in header:
                raise InputError(f"{path}:{header_line}: the header has no '{name}' column "
                                 f"(found: {', '.join(header)}); is this the {spec.name} file?")
            columns[role] = header.index(name)
    else:
        num_columns = layout.num_columns
        columns = {role: getattr(layout, role) for role in ("text_a", "text_b", "label", "index")
                   if getattr(layout, role) is not None}

    examples, skipped = [], []
    for line_number, text in rows:
        fields = text.split("\t")
        if len(fields) != num_columns:
            if spec.skip_malformed_rows:
                skipped.append(line_number)
                continue
            what = "an empty line" if text == "" else f"{len(fields)}"
            raise InputError(f"{path}:{line_number}: expected {num_columns} tab-separated columns, "
                             f"found {what}")
        label = None
        if "label" in columns:
            label = _parse_label(fields[columns["label"]], spec, f"{path}:{line_number}")
        examples.append(Example(
            text_a=fields[columns["text_a"]],
            text_b=fields[columns["text_b"]] if "text_b" in columns else None,
            label=label,
            index=fields[columns["index"]] if "index" in columns else len(examples) + len(skipped),
            line=line_number,
        ))

    if skipped:
        shown = ", ".join(str(n) for n in skipped[:5]) + (", ..." if len(skipped) > 5 else "")
        print(f"{path}: skipped {len(skipped)} malformed row(s) (lines {shown}), as the classic "
              f"GLUE processors do", file=sys.stderr)
    if not examples:
        last_line = rows[-1][0] if rows else 1
        raise InputError(f"{path}:{last_line}: no examples in the file (an empty split)")
    return examples


def _read_tsv_lines(path: Path):
    """Yield (1-based line number, line without its line end) for every line of the file."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[:error.start].count(b"\n") + 1
        raise InputError(f"{path}:{line}: not valid UTF-8 ({error.reason})") from None
    text = text.removeprefix("\ufeff")                 # MRPC's byte-order mark
    lines = text.split("\n")
    if lines[-1] == "":                                # the file ends with '\n'
        lines.pop()
    for number, line in enumerate(lines, start=1):
        yield number, line.removesuffix("\r")


def _parse_label(value: str, spec: TaskSpec, where: str) -> int | float:
    if spec.is_regression:
        try:
            score = float(value)
        except ValueError:
            raise InputError(f"{where}: score '{value}' is not a number") from None
        if not 0.0 <= score <= 5.0:                    # also rejects nan
            raise InputError(f"{where}: score {value} is outside [0, 5]")
        return score
    if value not in spec.label_names:
        raise InputError(f"{where}: label '{value}' is not one of {', '.join(spec.label_names)}")
    return spec.label_names.index(value)


# ----------------------------------------------------------------------------------------------
# Few-sample subsets (the paper's Figure 4 trains on 15%, 30% and 50% of CoLA and STS-B)

def subsample(examples: list[Example], fraction: float | None = None, n: int | None = None,
              seed: int = 0) -> list[Example]:
    """A seeded uniform random subset, in the original order.

    Give either fraction (0 < fraction <= 1, rounded to the nearest count) or n. For one seed the
    subsets are nested: the 15% subset is part of the 30% one, which is part of the 50% one, so
    a curve over fractions changes only the amount of data, not which examples are drawn.
    """
    return [examples[i] for i in subset_indices(len(examples), fraction=fraction, n=n, seed=seed)]


def subset_indices(total: int, fraction: float | None = None, n: int | None = None,
                   seed: int = 0) -> list[int]:
    """The sorted positions kept by `subsample` (also used on already-encoded features)."""
    if (fraction is None) == (n is None):
        raise InputError("subsample: give exactly one of fraction and n")
    if fraction is not None:
        if not 0.0 < fraction <= 1.0:
            raise InputError(f"subsample: fraction must be in (0, 1], got {fraction}")
        n = max(1, round(fraction * total))
    if not 0 < n <= total:
        raise InputError(f"subsample: n must be in [1, {total}], got {n}")
    permutation = np.random.default_rng(seed).permutation(total)
    return np.sort(permutation[:n]).tolist()


HOLDOUT_SPLIT_SEED = 2021     # one fixed split per task and fraction, whatever a run's seed


def holdout_split(total: int, fraction: float) -> tuple[list[int], list[int]]:
    """(trained_on, held_out): the sorted positions of a training set of `total` examples, with
    round(fraction * total) of them held out. A pure function of total and fraction (the seed is
    fixed), so every seed and method of a sweep holds out the same examples; the two parts are
    disjoint and together the whole set."""
    if not 0.0 < fraction < 1.0:
        raise InputError(f"holdout fraction must be in (0, 1), got {fraction}")
    held_out = subset_indices(total, fraction=fraction, seed=HOLDOUT_SPLIT_SEED)
    if len(held_out) == total:
        raise InputError(f"holdout fraction {fraction} of {total} examples leaves none to train on")
    held = set(held_out)
    return [i for i in range(total) if i not in held], held_out


def split_fingerprint(indices: list[int]) -> str:
    """A short name for a set of example positions: equal sets, equal names."""
    import hashlib
    return hashlib.sha256(",".join(map(str, sorted(indices))).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# Token ids

@dataclass
class Features:
    input_ids: list[list[int]]          # [CLS] a [SEP] (b [SEP]), unpadded, at most max_seq_length
    token_type_ids: list[list[int]]     # 0 for [CLS] a [SEP], 1 for b [SEP]
    labels: list                        # class ids, STS-B scores, or all None (test files)
    pad_id: int
    is_regression: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.input_ids]


def check_examples(examples: list[Example]):
    """What encode needs of a list of examples: some, all single sentences or all pairs."""
    if not examples:
        raise InputError("encode: no examples")
    has_b = [e.text_b is not None for e in examples]
    if any(has_b) and not all(has_b):
        raise InputError("encode: some examples have a second sentence and some do not")


def encode(examples: list[Example], tokenizer, max_seq_length: int = 128) -> Features:
    """Tokenize examples (as pairs when the task has two sentences), truncated to max_seq_length.

    `tokenizer` is a bert.tokenizer.Tokenizer (or anything with its encode_batch and pad_id):
    longest-first truncation of the pair, no padding; padding happens per batch in batches().
    """
    check_examples(examples)
    texts_a = [e.text_a for e in examples]
    texts_b = [e.text_b for e in examples] if examples[0].text_b is not None else None
    encoded = tokenizer.encode_batch(texts_a, texts_b, max_length=max_seq_length)
    labels = [e.label for e in examples]
    return Features(
        input_ids=[list(ids) for ids, _ in encoded],
        token_type_ids=[list(types) for _, types in encoded],
        labels=labels,
        pad_id=tokenizer.pad_id,
        is_regression=any(isinstance(label, float) for label in labels),
    )


# ----------------------------------------------------------------------------------------------
# Batches

BUCKET_CHUNK_BATCHES = 50     # bucketing sorts by length within chunks of this many batches


def batch_order(lengths: list[int], batch_size: int, seed: int | None = None, epoch: int = 0,
                bucket: bool = False) -> list[list[int]]:
    """Which example positions go into which batch, in order. A pure function of its arguments.

    seed None: the original order (evaluation), or with bucket=True sorted by length, longest
    first. Otherwise shuffled with a generator seeded by (seed, epoch); bucket=True then sorts
    each chunk of BUCKET_CHUNK_BATCHES batches by length, cuts it into batches and shuffles the
    order of all batches, so batches hold similar lengths but still come in random order.
    """
    if batch_size < 1:
        raise InputError(f"batch size must be at least 1, got {batch_size}")
    lengths = np.asarray(lengths)
    n = len(lengths)
    if seed is None:
        order = np.argsort(-lengths, kind="stable") if bucket else np.arange(n)
        return [order[i:i + batch_size].tolist() for i in range(0, n, batch_size)]

    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n)
    if not bucket:
        return [order[i:i + batch_size].tolist() for i in range(0, n, batch_size)]
    chunk = batch_size * BUCKET_CHUNK_BATCHES
    groups = []
    for start in range(0, n, chunk):
        part = order[start:start + chunk]
        part = part[np.argsort(lengths[part], kind="stable")]
        groups.extend(part[i:i + batch_size] for i in range(0, len(part), batch_size))
    # Only the very last group may be short; shuffling moves it anywhere in the epoch, which is
    # harmless (the contract is "the last batch *may* be smaller", and a loss is a batch mean).
    return [groups[i].tolist() for i in rng.permutation(len(groups))]


def collate(features: Features, example_ids: list[int], pad_to: int | None = None) -> dict:
    """One batch of tensors, padded on the right to the longest sequence (or to pad_to)."""
    longest = max(len(features.input_ids[i]) for i in example_ids)
    T = longest if pad_to is None else pad_to
    if T < longest:
        raise InputError(f"pad_to={pad_to} is shorter than a sequence of {longest} tokens")
    B = len(example_ids)
    # Fill numpy arrays row by row, then hand them to torch in one piece (no per-row tensors).
    input_ids = np.full((B, T), features.pad_id, dtype=np.int64)          # (B, T)
    token_type_ids = np.zeros((B, T), dtype=np.int64)                      # (B, T)
    attention_mask = np.zeros((B, T), dtype=np.int64)                      # (B, T)
    for row, i in enumerate(example_ids):
        n = len(features.input_ids[i])
        input_ids[row, :n] = features.input_ids[i]
        token_type_ids[row, :n] = features.token_type_ids[i]
        attention_mask[row, :n] = 1
    batch = {
        "input_ids": torch.from_numpy(input_ids),
        "token_type_ids": torch.from_numpy(token_type_ids),
        "attention_mask": torch.from_numpy(attention_mask),
        "example_ids": torch.tensor(example_ids, dtype=torch.long),          # (B,)
    }
    labels = [features.labels[i] for i in example_ids]
    if all(label is not None for label in labels):                         # test files: no labels
        dtype = torch.float32 if features.is_regression else torch.long
        batch["labels"] = torch.tensor(labels, dtype=dtype)                 # (B,)
    return batch


def batches(features: Features, batch_size: int, seed: int | None = None, epoch: int = 0,
            bucket: bool = False, pad_to: int | None = None) -> list[dict]:
    """All batches of one epoch (see batch_order for the order and collate for the tensors).

    Each batch: input_ids, token_type_ids, attention_mask (B, T) long; labels (B,) long, or
    float32 for regression (absent for unlabeled test features); example_ids (B,) long, the
    positions in `features`, so predictions can be mapped back to examples.
    """
    plan = batch_order(features.lengths, batch_size, seed=seed, epoch=epoch, bucket=bucket)
    return [collate(features, ids, pad_to=pad_to) for ids in plan]


# ----------------------------------------------------------------------------------------------
# Test-set predictions in the GLUE submission format

def write_test_predictions(task: str, predictions, examples: list[Example], out_dir,
                           split: str = "test") -> Path:
    """Write `<out_dir>/<CoLA.tsv|MNLI-m.tsv|...>` with columns index<TAB>prediction.

    Classification predictions are class ids, written as the task's label strings
    ('entailment', ...; '0'/'1' for CoLA, SST-2, MRPC, QQP, WNLI). STS-B scores are clipped to
    [0, 5] and written with 3 decimals. MNLI needs split="test_matched" or "test_mismatched"
    (plain "test" means matched). The file is written to a temporary name and then renamed,
    so it is never left half-written.
    """
    spec = get_task(task)
    split, _ = spec.split_layout(split)
    if split not in spec.submission_files:
        raise InputError(f"{spec.name}: '{split}' is not a test split "
                         f"(choose from {', '.join(spec.submission_files)})")
    predictions = predictions.detach().cpu().tolist() if hasattr(predictions, "detach") else list(predictions)
    if len(predictions) != len(examples):
        raise InputError(f"{spec.name}: {len(predictions)} predictions for {len(examples)} examples")

    lines = ["index\tprediction"]
    for example, prediction in zip(examples, predictions):
        if spec.is_regression:
            value = float(prediction)
            if math.isnan(value):
                raise InputError(f"{spec.name}: prediction for index {example.index} is NaN")
            lines.append(f"{example.index}\t{min(max(value, 0.0), 5.0):.3f}")
        else:
            if int(prediction) != prediction or not 0 <= int(prediction) < spec.num_labels:
                raise InputError(f"{spec.name}: prediction {prediction} for index {example.index} "
                                 f"is not a class id in [0, {spec.num_labels})")
            lines.append(f"{example.index}\t{spec.label_names[int(prediction)]}")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / spec.submission_files[split]
    partial = path.with_name(path.name + ".partial")
    partial.write_text("\n".join(lines) + "\n", encoding="utf-8")
    partial.replace(path)
    return path
