"""Every kind of broken GLUE file stops with InputError("path:line: what is wrong")."""

import subprocess
import sys
from pathlib import Path

import pytest

import glue
from bert.errors import InputError

RTE_HEADER = "index\tsentence1\tsentence2\tlabel"
STS_HEADER = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"


def sts_row(score):
    return f"0\tmain-captions\tMSRvid\t2012test\t0001\tnone\tnone\tA plane is taking off.\tA plane takes off.\t{score}"


# (task, split, file contents, line of the problem, what the message says)
CASES = {
    "cola wrong column count": (
        "cola", "train", "gj04\t1\t\tGood.\ngj04\t0\tBad.\n", 2, "expected 4 tab-separated columns, found 3"),
    "cola label outside the label set": (
        "cola", "dev", "gj04\t1\t\tGood.\ngj04\t1\t\tFine.\ngj04\t2\t\tOdd.", 3, "label '2' is not one of 0, 1"),
    "cola empty line": (
        "cola", "train", "gj04\t1\t\tGood.\n\ngj04\t1\t\tFine.\n", 2, "found an empty line"),
    "rte label outside the label set": (
        "rte", "dev", f"{RTE_HEADER}\n0\tA.\tB.\tentailment\n1\tA.\tB.\tneutral\n", 3,
        "label 'neutral' is not one of entailment, not_entailment"),
    "rte extra column": (
        "rte", "train", f"{RTE_HEADER}\n0\tA.\tB.\tentailment\textra\n", 2, "expected 4 tab-separated columns, found 5"),
    "rte header without a needed column": (
        "rte", "train", "index\tsentence1\tsentence2\n0\tA.\tB.\n", 1, "the header has no 'label' column"),
    "rte empty split (header only)": (
        "rte", "train", f"{RTE_HEADER}\n", 1, "no examples in the file"),
    "rte empty file": (
        "rte", "dev", "", 1, "the file is empty"),
    "mrpc wrong column count after the BOM header": (
        "mrpc", "train", "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\tA.\tB.\n0\t3\t4\tC.\n", 3,
        "expected 5 tab-separated columns, found 4"),
    "sts-b score not a number": (
        "sts-b", "train", f"{STS_HEADER}\n{sts_row('5.000')}\n{sts_row('high')}\n", 3, "score 'high' is not a number"),
    "sts-b score above 5": (
        "stsb", "dev", f"{STS_HEADER}\n{sts_row('5.5')}\n", 2, "score 5.5 is outside [0, 5]"),
    "sts-b score below 0": (
        "STS-B", "train", f"{STS_HEADER}\n{sts_row('4')}\n{sts_row('-0.1')}", 3, "score -0.1 is outside [0, 5]"),
    "sts-b score nan": (
        "sts-b", "train", f"{STS_HEADER}\n{sts_row('nan')}\n", 2, "score nan is outside [0, 5]"),
    "sts-b missing score": (
        "sts-b", "train", f"{STS_HEADER}\n{sts_row('')[:-1]}\n", 2, "expected 10 tab-separated columns, found 9"),
    "mnli label outside the label set": (
        "mnli", "dev_mismatched", "index\tsentence1\tsentence2\tgold_label\n0\tA.\tB.\t-\n", 2,
        "label '-' is not one of contradiction, entailment, neutral"),
    "qqp label outside the label set (malformed rows are skipped, bad labels are not)": (
        "qqp", "dev", "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n1\t2\t3\tA?\tB?\tyes\n", 2,
        "label 'yes' is not one of 0, 1"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_file_gives_file_and_line(case, tmp_path):
    task, split, contents, line, what = CASES[case]
    path = glue.data.task_file(task, split, tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text(contents, encoding="utf-8")
    with pytest.raises(InputError) as error:
        glue.load_examples(task, split, tmp_path)
    message = str(error.value)
    assert message.startswith(f"{path}:{line}: "), message
    assert what in message
    assert "\n" not in message


def test_invalid_utf8_gives_file_and_line(tmp_path):
    path = tmp_path / "RTE" / "train.tsv"
    path.parent.mkdir()
    path.write_bytes(f"{RTE_HEADER}\n0\tA.\tB.\tentailment\n1\tCaf\xe9.\tB.\tentailment\n".encode("latin-1"))
    with pytest.raises(InputError, match=rf"^{path}:3: not valid UTF-8"):
        glue.load_examples("rte", "train", tmp_path)


def test_qqp_file_of_only_malformed_rows_is_an_empty_split(tmp_path):
    path = tmp_path / "QQP" / "train.tsv"
    path.parent.mkdir()
    path.write_text("id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n1\t2\t3\tA?\n", encoding="utf-8")
    with pytest.raises(InputError, match=rf"^{path}:2: no examples"):
        glue.load_examples("qqp", "train", tmp_path)


def test_command_line_prints_one_line_not_a_traceback(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-m", "glue.download", "colaa", "--data-dir", str(tmp_path)],
                            cwd=repo, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: unknown GLUE task 'colaa' (known: CoLA, SST-2, MRPC, STS-B, QQP, MNLI, QNLI, RTE, WNLI, AX)"]
