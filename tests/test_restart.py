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


def has_glibc():
    try:
        return sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (ValueError, OSError):
        return False


GLUE_DIR = tiny.GLUE_DIR
pytestmark = [*tiny.NEEDS_RTE_AND_EMBEDDED_MODEL,
              pytest.mark.skipif(not has_glibc(), reason="glibc's tunables exist on Linux with glibc only")]


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
    assert done.stderr.count("run 1/1: RTE ft seed 1") == 1, done.stderr      # nothing said twice


def test_the_user_s_own_glibc_tunables_are_kept(model_dir, tmp_path):
    done = run(train_command(model_dir, tmp_path), GLIBC_TUNABLES="")
    assert done.returncode == 0, done.stderr[-2000:]
    assert recorded_tunables(tmp_path) == ""



def test_a_program_that_calls_main_itself_is_not_started_again(model_dir, tmp_path):
    """`python -c` (like a debugger, a profiler or a notebook) owns its process: no restart."""
    command = train_command(model_dir, tmp_path)
    program = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); import train; "
               f"sys.argv = {command[1:]!r}; sys.exit(train.main())")
    done = run([sys.executable, "-c", program])
    assert done.returncode == 0, done.stderr[-2000:]
    assert recorded_tunables(tmp_path) is None


@pytest.mark.parametrize("orig_argv, argv, expected", [
    (["python", "T", "--task", "rte"], ["T", "--task", "rte"], True),
    (["python", "-u", "T", "--task", "rte"], ["T", "--task", "rte"], True),                  # torchrun's workers
    (["python", "-X", "importtime", "-W", "error", "T"], ["T"], True),
    (["python", "-m", "pdb", "T", "--task", "rte"], ["T", "--task", "rte"], False),
    (["python", "-mcProfile", "T"], ["T"], False),
    (["python", "/usr/bin/memray", "run", "T"], ["T"], False),                                # a program in front
    (["python", "-c", "import train; train.main()", "--task", "rte"], ["-c", "--task", "rte"], False),
    (["python", "-", "--task", "rte"], ["-", "--task", "rte"], False),                        # the script on stdin
    (["python", "other.py"], ["other.py"], False),
])
def test_started_as_script_knows_a_plain_python_command(tmp_path, monkeypatch, orig_argv, argv, expected):
    script = tmp_path / "train.py"
    script.write_text("")
    (tmp_path / "other.py").write_text("")
    monkeypatch.chdir(tmp_path)
    sub = lambda args: [str(script) if a == "T" else a for a in args]
    monkeypatch.setattr(sys, "orig_argv", sub(orig_argv), raising=False)
    monkeypatch.setattr(sys, "argv", sub(argv))
    assert numerics.started_as_script(str(script)) is expected
