"""One small spec per GLUE task: where its files are, which columns hold what, its labels, its metric.

The file layouts are those of the original GLUE distribution (the folders the classic
`download_glue_data.py` produces), which is also what the classic GLUE processors of BERT and
HuggingFace read:

    CoLA   train/dev, no header: source | label | original label ('*' or empty) | sentence
           test: index | sentence
    SST-2  sentence | label                               test: index | sentence
    MRPC   Quality | #1 ID | #2 ID | #1 String | #2 String (a byte-order mark before "Quality")
                                                          test: index | #1 ID | #2 ID | ...
    STS-B  index | genre | filename | year | old_index | source1 | source2 | sentence1 |
           sentence2 | score (a float in [0, 5])          test: without score
    QQP    id | qid1 | qid2 | question1 | question2 | is_duplicate    test: id | question1 | question2
    MNLI   index | promptID | pairID | genre | 4 parse columns | sentence1 | sentence2 | label1 |
           (dev only: label2 .. label5 |) gold_label     test: up to sentence2
    QNLI   index | question | sentence | label           test: without label
    RTE    index | sentence1 | sentence2 | label         test: without label
    WNLI   index | sentence1 | sentence2 | label (0/1)   test: without label
    AX     diagnostic/diagnostic.tsv: index | sentence1 | sentence2 (test only; MNLI's labels)

Files with a header are read by column *name* (looked up in the header), so every row must have
as many columns as the header. CoLA's train/dev files have no header and are read by position.

Sources: Wang et al. 2019, "GLUE: A Multi-Task Benchmark and Analysis Platform for Natural
Language Understanding" (tasks, metrics, submission files); Table 4 of Hua et al. (the paper's
metric per task).
"""

from dataclasses import dataclass, field

from bert.errors import InputError


@dataclass(frozen=True)
class FileLayout:
    """How one split's file is laid out.

    Columns are header names when `has_header`, else 0-based positions (CoLA train/dev).
    `index` is the column holding the row's id; without one, the 0-based row number is used.
    """
    file: str                               # file name inside the task folder, e.g. "train.tsv"
    has_header: bool
    text_a: str | int
    text_b: str | int | None = None
    label: str | int | None = None          # None: unlabeled (test files)
    index: str | int | None = None
    num_columns: int | None = None          # only for files without a header


@dataclass(frozen=True)
class TaskSpec:
    name: str                               # canonical name, e.g. "CoLA"
    dir_name: str                           # folder under the data dir, e.g. "CoLA"
    num_labels: int                         # 1 for regression (STS-B)
    label_names: list[str] | None           # labels as written in the files; class id = position
    is_regression: bool
    main_metric: str                        # the paper's / GLUE's headline metric for the task
    metrics: tuple[str, ...]                # every key compute_metrics returns for the task
    splits: dict[str, FileLayout]           # "train", "dev", "test" (MNLI: dev_matched, ...)
    aliases: dict[str, str] = field(default_factory=dict)      # e.g. MNLI "dev" -> "dev_matched"
    submission_files: dict[str, str] = field(default_factory=dict)   # test split -> "CoLA.tsv"
    # QQP only: the QQP train file of the first GLUE release has rows that do not split into
    # the header's six columns, and the classic GLUE processors skip any row they cannot index.
    # We skip rows with the wrong column count too (and print how many, and where), but still
    # reject a label outside {0, 1}.
    skip_malformed_rows: bool = False

    @property
    def has_text_b(self) -> bool:
        return next(iter(self.splits.values())).text_b is not None

    @property
    def dev_splits(self) -> list[str]:
        """The labeled evaluation splits: ["dev"], or MNLI's matched and mismatched dev sets."""
        return [s for s in self.splits if s.startswith("dev")]

    @property
    def test_splits(self) -> list[str]:
        return [s for s in self.splits if s.startswith("test")]

    def split_layout(self, split: str) -> tuple[str, FileLayout]:
        """Resolve a split name (or alias) to (canonical split name, its layout)."""
        key = self.aliases.get(split.lower(), split.lower())
        if key not in self.splits:
            known = ", ".join(list(self.splits) + list(self.aliases))
            raise InputError(f"{self.name} has no split '{split}' (known: {known})")
        return key, self.splits[key]


BINARY = ["0", "1"]
ENTAILMENT = ["entailment", "not_entailment"]
MNLI_LABELS = ["contradiction", "entailment", "neutral"]   # the order of the classic processors
CLASSIFICATION_METRICS = ("acc",)
F1_METRICS = ("acc", "f1", "acc_and_f1")
CORRELATION_METRICS = ("pearson", "spearman", "pearson_and_spearman")


def _pair_layouts(a: str, b: str, label: str, index: str | None = "index") -> dict[str, FileLayout]:
    """train/dev/test for the common case: labeled train/dev files, test without the label column."""
    return {
        "train": FileLayout("train.tsv", True, a, b, label, index),
        "dev": FileLayout("dev.tsv", True, a, b, label, index),
        "test": FileLayout("test.tsv", True, a, b, None, "index"),
    }


def _mnli_layouts() -> dict[str, FileLayout]:
    labeled = dict(has_header=True, text_a="sentence1", text_b="sentence2", label="gold_label", index="index")
    unlabeled = dict(has_header=True, text_a="sentence1", text_b="sentence2", label=None, index="index")
    return {
        "train": FileLayout("train.tsv", **labeled),
        "dev_matched": FileLayout("dev_matched.tsv", **labeled),
        "dev_mismatched": FileLayout("dev_mismatched.tsv", **labeled),
        "test_matched": FileLayout("test_matched.tsv", **unlabeled),
        "test_mismatched": FileLayout("test_mismatched.tsv", **unlabeled),
    }


TASKS: dict[str, TaskSpec] = {
    "CoLA": TaskSpec(
        name="CoLA", dir_name="CoLA", num_labels=2, label_names=BINARY, is_regression=False,
        main_metric="mcc", metrics=("mcc", "acc"),
        splits={
            # source, label, original label ('*' or empty), sentence; no header, no id column
            "train": FileLayout("train.tsv", False, text_a=3, label=1, num_columns=4),
            "dev": FileLayout("dev.tsv", False, text_a=3, label=1, num_columns=4),
            "test": FileLayout("test.tsv", True, text_a="sentence", index="index"),
        },
        submission_files={"test": "CoLA.tsv"},
    ),
    "SST-2": TaskSpec(
        name="SST-2", dir_name="SST-2", num_labels=2, label_names=BINARY, is_regression=False,
        main_metric="acc", metrics=CLASSIFICATION_METRICS,
        splits={
            "train": FileLayout("train.tsv", True, text_a="sentence", label="label"),
            "dev": FileLayout("dev.tsv", True, text_a="sentence", label="label"),
            "test": FileLayout("test.tsv", True, text_a="sentence", index="index"),
        },
        submission_files={"test": "SST-2.tsv"},
    ),
    "MRPC": TaskSpec(
        name="MRPC", dir_name="MRPC", num_labels=2, label_names=BINARY, is_regression=False,
        main_metric="acc_and_f1", metrics=F1_METRICS,
        splits=_pair_layouts("#1 String", "#2 String", "Quality", index=None),
        submission_files={"test": "MRPC.tsv"},
    ),
    "STS-B": TaskSpec(
        name="STS-B", dir_name="STS-B", num_labels=1, label_names=None, is_regression=True,
        main_metric="pearson_and_spearman", metrics=CORRELATION_METRICS,
        splits=_pair_layouts("sentence1", "sentence2", "score"),
        submission_files={"test": "STS-B.tsv"},
    ),
    "QQP": TaskSpec(
        name="QQP", dir_name="QQP", num_labels=2, label_names=BINARY, is_regression=False,
        main_metric="acc_and_f1", metrics=F1_METRICS,
        splits={
            "train": FileLayout("train.tsv", True, "question1", "question2", "is_duplicate", "id"),
            "dev": FileLayout("dev.tsv", True, "question1", "question2", "is_duplicate", "id"),
            "test": FileLayout("test.tsv", True, "question1", "question2", None, "id"),
        },
        submission_files={"test": "QQP.tsv"},
        skip_malformed_rows=True,
    ),
    "MNLI": TaskSpec(
        name="MNLI", dir_name="MNLI", num_labels=3, label_names=MNLI_LABELS, is_regression=False,
        main_metric="acc", metrics=CLASSIFICATION_METRICS,
        splits=_mnli_layouts(),
        aliases={"dev": "dev_matched", "test": "test_matched"},
        submission_files={"test_matched": "MNLI-m.tsv", "test_mismatched": "MNLI-mm.tsv"},
    ),
    "QNLI": TaskSpec(
        name="QNLI", dir_name="QNLI", num_labels=2, label_names=ENTAILMENT, is_regression=False,
        main_metric="acc", metrics=CLASSIFICATION_METRICS,
        splits=_pair_layouts("question", "sentence", "label"),
        submission_files={"test": "QNLI.tsv"},
    ),
    "RTE": TaskSpec(
        name="RTE", dir_name="RTE", num_labels=2, label_names=ENTAILMENT, is_regression=False,
        main_metric="acc", metrics=CLASSIFICATION_METRICS,
        splits=_pair_layouts("sentence1", "sentence2", "label"),
        submission_files={"test": "RTE.tsv"},
    ),
    "WNLI": TaskSpec(
        name="WNLI", dir_name="WNLI", num_labels=2, label_names=BINARY, is_regression=False,
        main_metric="acc", metrics=CLASSIFICATION_METRICS,
        splits=_pair_layouts("sentence1", "sentence2", "label"),
        submission_files={"test": "WNLI.tsv"},
    ),
    # The diagnostic set: test only, predicted with an MNLI model, scored by GLUE with R3 (MCC).
    "AX": TaskSpec(
        name="AX", dir_name="diagnostic", num_labels=3, label_names=MNLI_LABELS, is_regression=False,
        main_metric="mcc", metrics=("mcc", "acc"),
        splits={"test": FileLayout("diagnostic.tsv", True, "sentence1", "sentence2", None, "index")},
        submission_files={"test": "AX.tsv"},
    ),
}


def _key(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


_LOOKUP = {_key(name): spec for name, spec in TASKS.items()}
_LOOKUP.update({"sst": TASKS["SST-2"], "sts": TASKS["STS-B"], "diagnostic": TASKS["AX"]})


def get_task(name: str) -> TaskSpec:
    """The spec of a task by name, case-insensitive and ignoring '-'/'_' ('sts-b', 'stsb', 'STS-B')."""
    spec = _LOOKUP.get(_key(str(name)))
    if spec is None:
        raise InputError(f"unknown GLUE task '{name}' (known: {', '.join(TASKS)})")
    return spec
