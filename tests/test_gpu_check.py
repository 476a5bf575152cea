"""benchmarks/gpu_check.py, the prepared GPU check, run on the CPU with its tiny model so that
it never rots, and shown to fail when a defect is planted in what it checks."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tiny

ROOT = Path(__file__).resolve().parents[1]
GLUE_DIR = ROOT.parent / "shared" / "glue_data"
pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not (GLUE_DIR / "RTE" / "train.tsv").exists(),
                                reason=f"GLUE data not found at {GLUE_DIR}")
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402

SMALL = ["--device", "cpu", "--small", "--data-dir", str(GLUE_DIR)]


def test_the_whole_check_passes_on_the_cpu(tmp_path):
    """The command as the README gives it, in a process of its own: every section, exit 0."""
    out = tmp_path / "table.md"
    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py", *SMALL, "--output", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    table = out.read_text()
    assert table.strip() == done.stdout.strip()
    checks = [line for line in table.splitlines() if line.endswith(("| pass |", "| FAIL |"))]
    assert len(checks) == 11 and all(line.endswith("| pass |") for line in checks)
    for section in ("| parity |", "| precision |", "| speed |", "| train.py |"):
        assert section in table
    assert "| speed | train step ours lnsr jvp bf16, batch 8 x 32: time, TFLOP/s, peak memory |" in table
    assert "| speed | train step lnsr: jvp in bf16 / difference in fp32 (time; peak memory) |" in table
    assert "all 11 checks passed" in table


def failed_checks(capsys, *sections):
    code = gpu_check.main(SMALL + ["--sections", ",".join(sections)])
    out = capsys.readouterr().out
    return code, [line.split(" | ")[1] for line in out.splitlines() if line.endswith("| FAIL |")]


def test_a_noisy_pass_with_fresh_dropout_masks_fails(monkeypatch, capsys):
    import contextlib
    from regularizers.replay import DropoutReplay
    monkeypatch.setattr(DropoutReplay, "replay", lambda self: contextlib.nullcontext())
    code, failed = failed_checks(capsys, "precision")
    assert code == 1 and "LNSR penalty, sigma 0, training mode, shared masks" in failed


def test_a_jvp_estimator_that_subtracts_two_passes_fails_in_bf16(monkeypatch, capsys):
    """J eps computed as f(x + eps) - f(x): in bf16 it is rounding, and the check says so."""
    from regularizers import lnsr

    def subtracted(bert, x_b, eps, attn_mask, b):
        noisy = bert.run_layers(x_b + eps, attn_mask, b)
        clean = bert.run_layers(x_b, attn_mask, b)
        return [n - c for n, c in zip(noisy, clean)]
    monkeypatch.setattr(lnsr, "jacobian_vector_products", subtracted)
    code, failed = failed_checks(capsys, "precision")
    assert code == 1 and len(failed) == 1
    assert failed[0].startswith("LNSR penalty at sigma 1e-4, eval mode: jvp in bf16 / difference in fp32")


def test_a_model_that_differs_from_hf_fails(monkeypatch, capsys):
    import bert.model
    monkeypatch.setitem(bert.model.GELUS, "gelu", "tanh")
    code, failed = failed_checks(capsys, "parity")
    assert code == 1 and failed == ["ours vs transformers' BertModel on cpu, max abs diff"]


def test_matrix_products_that_round_like_tf32_fail(monkeypatch, capsys):
    """A device whose fp32 products round to TF32 whatever the switch says: the penalty stops
    following sigma^2, and the check says so; the fp32 difference penalty that the jvp estimator
    is held against is then rounding too."""
    linear = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear",
                        lambda x, w, b=None: linear(tiny.round_to_tf32(x), tiny.round_to_tf32(w), b))
    code, failed = failed_checks(capsys, "precision")
    assert code == 1 and len(failed) == 2 and failed[0].startswith("LNSR penalty at sigma 1e-4 / at 1e-5")
    assert failed[1].startswith("LNSR penalty at sigma 1e-4, eval mode: jvp in bf16 / difference in fp32")


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    assert gpu_check.main(["--device", "cpu", "--small", "--data-dir", str(tmp_path)]) == 2
    assert "no RTE/train.tsv" in capsys.readouterr().err
    assert gpu_check.main(SMALL + ["--sections", "parity,speeed"]) == 2
    assert "speeed" in capsys.readouterr().err


def test_a_section_that_raises_is_a_fail_row_and_the_next_section_still_runs(monkeypatch, capsys):
    def broken(*args):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    monkeypatch.setattr(gpu_check, "check_parity", broken)
    code = gpu_check.main(SMALL + ["--sections", "parity,precision"])
    captured = capsys.readouterr()
    assert code == 1
    assert "| parity | the section raised | RuntimeError: CUDA error: an illegal memory access" in captured.out
    assert "LNSR penalty, sigma 0, training mode, shared masks | 0 | exactly 0 | pass |" in captured.out
    assert "LNSR penalty, sigma 0, training mode, shared masks: 0 pass" in captured.err    # shown as it came
