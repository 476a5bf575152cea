"""GLUE: task specs, reading the original TSV files, batching, the official metrics, downloads.

    import glue
    examples = glue.load_examples("rte", "dev")                # list[glue.Example]
    scores = glue.compute_metrics("rte", predictions, [e.label for e in examples])
"""

from glue.data import (
    Example,
    Features,
    batch_order,
    batches,
    check_examples,
    collate,
    default_data_dir,
    encode,
    holdout_split,
    load_examples,
    split_fingerprint,
    subsample,
    subset_indices,
    task_file,
    write_test_predictions,
)
from glue.metrics import accuracy, compute_metrics, f1_score, matthews_corrcoef, pearson, spearman
from glue.tasks import TASKS, TaskSpec, get_task


def ensure_task_data(task: str, data_dir=None, splits=None):
    """Download a task's files into data_dir when missing (see glue/download.py); its folder.

    Imported on first use, so that `import glue` needs no network library and
    `python -m glue.download` runs the module only once.
    """
    from glue.download import ensure_task_data as ensure
    return ensure(task, data_dir, splits)


__all__ = [
    "Example", "Features", "TASKS", "TaskSpec", "accuracy", "batch_order", "batches", "check_examples", "collate",
    "compute_metrics", "default_data_dir", "encode", "ensure_task_data", "f1_score", "get_task",
    "holdout_split", "load_examples", "matthews_corrcoef", "pearson", "spearman", "split_fingerprint",
    "subsample", "subset_indices", "task_file", "write_test_predictions",
]
