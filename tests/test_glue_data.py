"""Reading GLUE: the original files of CoLA, MRPC, RTE and STS-B (../shared/glue_data), small files
in the official formats of the other tasks, task names, few-sample subsets and submission files."""

import collections
from pathlib import Path

import pytest

import glue
from bert.errors import InputError

SHARED_GLUE = Path(__file__).resolve().parents[2] / "shared" / "glue_data"
needs_shared = pytest.mark.skipif(not (SHARED_GLUE / "CoLA" / "train.tsv").is_file(),
                                  reason=f"the GLUE files are not in {SHARED_GLUE}")


# Rows and label balance as documented in ../shared/glue_data/SOURCES.md (label name: count).
EXPECTED = {
    ("CoLA", "train"): (8551, {"1": 6023, "0": 2528}),
    ("CoLA", "dev"): (1043, {"1": 721, "0": 322}),
    ("MRPC", "train"): (3668, {"1": 2474, "0": 1194}),
    ("MRPC", "dev"): (408, {"1": 279, "0": 129}),
    ("RTE", "train"): (2490, {"entailment": 1249, "not_entailment": 1241}),
    ("RTE", "dev"): (277, {"entailment": 146, "not_entailment": 131}),
}


@needs_shared
@pytest.mark.parametrize("task, split", list(EXPECTED))
def test_row_counts_and_label_balance(task, split):
    rows, balance = EXPECTED[(task, split)]
    examples = glue.load_examples(task, split, SHARED_GLUE)
    assert len(examples) == rows
    names = glue.get_task(task).label_names
    assert collections.Counter(names[e.label] for e in examples) == balance


@needs_shared
def test_sts_b_counts_and_scores():
    for split, rows in [("train", 5749), ("dev", 1500)]:
        examples = glue.load_examples("STS-B", split, SHARED_GLUE)
        assert len(examples) == rows
        scores = [e.label for e in examples]
        assert all(isinstance(s, float) for s in scores)
        assert min(scores) == 0.0 and max(scores) == 5.0
    first = glue.load_examples("sts-b", "dev", SHARED_GLUE)[0]
    assert (first.text_a, first.text_b, first.label, first.index) == (
        "A man with a hard hat is dancing.", "A man wearing a hard hat is dancing.", 5.0, "0")


@needs_shared
def test_test_files_are_read_without_labels():
    for task, rows in [("CoLA", 1063), ("MRPC", 1725), ("RTE", 3000), ("STS-B", 1379)]:
        examples = glue.load_examples(task, "test", SHARED_GLUE)
        assert len(examples) == rows
        assert all(e.label is None for e in examples)
        assert [e.index for e in examples[:3]] == ["0", "1", "2"]


@needs_shared
def test_quirks_of_the_original_files():
    # CoLA has no header: the first data row is line 1, and the sentence is the 4th column.
    cola = glue.load_examples("cola", "train", SHARED_GLUE)
    assert (cola[0].line, cola[0].index, cola[0].text_b) == (1, 0, None)
    assert cola[0].text_a == "Our friends won't buy this analysis, let alone the next one we propose."
    # CoLA dev ends without a newline: its last row is still read, whole.
    cola_dev = glue.load_examples("cola", "dev", SHARED_GLUE)
    assert cola_dev[-1].line == 1043 and cola_dev[-1].text_a.endswith(".")
    # MRPC: the header starts with a byte-order mark, and quotes are text, not CSV quoting.
    mrpc = glue.load_examples("mrpc", "dev", SHARED_GLUE)
    assert mrpc[0].line == 2
    assert mrpc[0].text_b == '"The foodservice pie business does not fit our long-term growth strategy.'
    assert mrpc[0].label == 1 and mrpc[0].index == 0
    assert sum(e.text_a.count('"') % 2 for e in glue.load_examples("mrpc", "train", SHARED_GLUE)) > 0
    # RTE: labels are strings, mapped to their position in label_names.
    rte = glue.load_examples("RTE", "train", SHARED_GLUE)
    assert rte[0].label == glue.get_task("rte").label_names.index("not_entailment") == 1
    assert next(e for e in rte if e.index == "2164").text_a.startswith('"That film')


def test_task_names_are_case_insensitive():
    for name in ["sts-b", "stsb", "STS-B", "StS_b", "sts"]:
        assert glue.get_task(name).name == "STS-B"
    for name in ["cola", "CoLA", "COLA"]:
        assert glue.get_task(name) is glue.TASKS["CoLA"]
    assert glue.get_task("sst2").name == "SST-2"
    assert glue.get_task("diagnostic").name == "AX"
    with pytest.raises(InputError, match="unknown GLUE task 'colaa'.*CoLA, SST-2, MRPC"):
        glue.get_task("colaa")
    with pytest.raises(InputError, match="RTE has no split 'validation'"):
        glue.load_examples("rte", "validation", "/nonexistent")


def test_task_specs():
    sts = glue.get_task("sts-b")
    assert (sts.num_labels, sts.is_regression, sts.label_names) == (1, True, None)
    cola = glue.get_task("cola")
    assert (cola.num_labels, cola.label_names, cola.has_text_b) == (2, ["0", "1"], False)
    assert glue.get_task("mnli").dev_splits == ["dev_matched", "dev_mismatched"]
    assert glue.get_task("rte").dev_splits == ["dev"] and glue.get_task("rte").has_text_b


def test_default_data_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("GLUE_DIR", raising=False)
    assert glue.default_data_dir() == Path("data") / "glue"
    monkeypatch.setenv("GLUE_DIR", str(tmp_path))
    assert glue.default_data_dir() == tmp_path


def test_missing_file_says_how_to_get_it(tmp_path):
    with pytest.raises(InputError) as error:
        glue.load_examples("rte", "train", tmp_path)
    message = str(error.value)
    assert message.startswith(f"{tmp_path / 'RTE' / 'train.tsv'}: file not found")
    assert "python -m glue.download RTE" in message


# ---- the other GLUE tasks, on small files in their official formats -----------------------

def write(path: Path, lines: list[str], end: str = "\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(end.join(lines).encode("utf-8") + end.encode())
    return path


MNLI_COLUMNS = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
                "sentence1_parse\tsentence2_parse\tsentence1\tsentence2")


def mnli_row(i, premise, hypothesis, labels=()):
    parses = "\t".join(["( x )"] * 4)
    return "\t".join([str(i), "31193", f"31193{i}n", "government", parses, premise, hypothesis, *labels])


def test_other_tasks_in_their_official_formats(tmp_path, capsys):
    write(tmp_path / "SST-2" / "train.tsv", ["sentence\tlabel", "it 's a charming journey . \t1", "a sometimes tedious film . \t0"])
    write(tmp_path / "SST-2" / "test.tsv", ["index\tsentence", "0\tuneasy mishmash of styles and genres ."])
    write(tmp_path / "QNLI" / "dev.tsv", ["index\tquestion\tsentence\tlabel",
                                          "0\tWhat came into force?\tAs of that day, the new constitution came into force.\tentailment",
                                          "1\tWho?\tNobody knows.\tnot_entailment"])
    write(tmp_path / "QQP" / "train.tsv", [
        "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate",
        "201359\t303345\t303346\tWhy are African-Americans so beautiful?\tWhy are hispanics so beautiful?\t0",
        "363\t727\t728\tWhat is the \"best\" way",                  # a question with a line break
        "to learn?\tHow do I learn?\t1",                             # ... splits one row in two
        "172974\t266948\t175089\tIs there a reason why we should travel alone?\tWhat are some reasons to travel alone?\t1",
    ])
    write(tmp_path / "QQP" / "test.tsv", ["id\tquestion1\tquestion2", "0\tWhat?\tWhy?"])
    write(tmp_path / "MNLI" / "train.tsv", [MNLI_COLUMNS + "\tlabel1\tgold_label",
                                            mnli_row(0, "The new rights are nice enough", "Everyone really likes the newest benefits ", ["neutral", "neutral"])])
    write(tmp_path / "MNLI" / "dev_matched.tsv", [MNLI_COLUMNS + "\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label",
                                                  mnli_row(0, "A", "B", ["neutral", "entailment", "neutral", "neutral", "neutral", "neutral"])])
    write(tmp_path / "MNLI" / "dev_mismatched.tsv", [MNLI_COLUMNS + "\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label",
                                                     mnli_row(7, "C", "D", ["contradiction"] * 6)])
    write(tmp_path / "MNLI" / "test_mismatched.tsv", [MNLI_COLUMNS, mnli_row(5, "E", "F")])
    write(tmp_path / "WNLI" / "train.tsv", ["index\tsentence1\tsentence2\tlabel",
                                            "0\tI stuck a pin through a carrot.\tThe carrot had a hole.\t1"], end="\r\n")
    write(tmp_path / "diagnostic" / "diagnostic.tsv", ["index\tsentence1\tsentence2", "0\tThe cat sat.\tThe cat did not sit."])

    sst = glue.load_examples("SST-2", "train", tmp_path)
    assert [(e.text_a, e.text_b, e.label, e.index) for e in sst] == [
        ("it 's a charming journey . ", None, 1, 0), ("a sometimes tedious film . ", None, 0, 1)]
    assert glue.load_examples("sst-2", "test", tmp_path)[0].index == "0"

    qnli = glue.load_examples("qnli", "dev", tmp_path)
    assert [(e.text_a, e.label) for e in qnli] == [("What came into force?", 0), ("Who?", 1)]
    assert qnli[0].text_b.startswith("As of that day")

    qqp = glue.load_examples("qqp", "train", tmp_path)
    assert [(e.index, e.label, e.line) for e in qqp] == [("201359", 0, 2), ("172974", 1, 5)]
    assert "skipped 2 malformed row(s) (lines 3, 4)" in capsys.readouterr().err
    assert glue.load_examples("qqp", "test", tmp_path)[0].text_b == "Why?"

    mnli = glue.load_examples("mnli", "train", tmp_path)
    assert (mnli[0].text_a, mnli[0].text_b, mnli[0].label) == (
        "The new rights are nice enough", "Everyone really likes the newest benefits ", 2)
    # "dev" means matched; the gold label is the last column, not label1.
    assert glue.load_examples("mnli", "dev", tmp_path)[0].label == 2
    assert glue.load_examples("mnli", "dev_mismatched", tmp_path)[0].label == 0
    assert glue.load_examples("mnli", "test_mismatched", tmp_path)[0].index == "5"

    wnli = glue.load_examples("wnli", "train", tmp_path)                    # '\r\n' line ends
    assert (wnli[0].text_b, wnli[0].label) == ("The carrot had a hole.", 1)
    ax = glue.load_examples("ax", "test", tmp_path)
    assert (ax[0].text_a, ax[0].text_b, ax[0].label) == ("The cat sat.", "The cat did not sit.", None)


# ---- few-sample subsets -----------------------------------------------------------------------

def make_examples(n):
    return [glue.Example(f"sentence {i}", None, i % 2, i, i + 1) for i in range(n)]


def test_subsample_fractions_are_seeded_nested_and_ordered():
    examples = make_examples(8551)                                          # CoLA's train size
    subsets = {f: glue.subsample(examples, fraction=f, seed=3) for f in (0.15, 0.3, 0.5)}
    assert [len(s) for s in subsets.values()] == [round(0.15 * 8551), round(0.3 * 8551), round(0.5 * 8551)]
    ids = {f: [e.index for e in s] for f, s in subsets.items()}
    assert all(i == sorted(i) for i in ids.values())                        # original order kept
    assert len(set(ids[0.3])) == len(ids[0.3])                              # no duplicates
    assert set(ids[0.15]) < set(ids[0.3]) < set(ids[0.5])                   # nested
    assert ids[0.3] == [e.index for e in glue.subsample(examples, fraction=0.3, seed=3)]
    assert ids[0.3] != [e.index for e in glue.subsample(examples, fraction=0.3, seed=4)]
    assert len(glue.subsample(examples, n=100, seed=0)) == 100
    assert len(glue.subsample(examples, fraction=1.0)) == 8551


def test_subsample_rejects_bad_arguments():
    examples = make_examples(10)
    for kwargs in [{}, {"fraction": 0.5, "n": 3}, {"fraction": 0.0}, {"fraction": 1.5}, {"n": 11}, {"n": 0}]:
        with pytest.raises(InputError):
            glue.subsample(examples, **kwargs)


# ---- submission files ---------------------------------------------------------------------

def read_lines(path):
    return path.read_text(encoding="utf-8").splitlines()


def test_write_test_predictions_in_glue_format(tmp_path):
    pair = [glue.Example("a", "b", None, str(i), i + 2) for i in range(3)]
    path = glue.write_test_predictions("rte", [1, 0, 1], pair, tmp_path)
    assert path == tmp_path / "RTE.tsv"
    assert read_lines(path) == ["index\tprediction", "0\tnot_entailment", "1\tentailment", "2\tnot_entailment"]

    single = [glue.Example("a", None, None, str(i), i + 2) for i in range(3)]
    assert read_lines(glue.write_test_predictions("cola", [1, 0, 1], single, tmp_path)) == [
        "index\tprediction", "0\t1", "1\t0", "2\t1"]
    assert read_lines(glue.write_test_predictions("STS-B", [-0.3, 2.34567, 5.2], pair, tmp_path)) == [
        "index\tprediction", "0\t0.000", "1\t2.346", "2\t5.000"]
    assert glue.write_test_predictions("mnli", [0, 1, 2], pair, tmp_path, split="test_mismatched").name == "MNLI-mm.tsv"
    assert read_lines(tmp_path / "MNLI-mm.tsv")[1:] == ["0\tcontradiction", "1\tentailment", "2\tneutral"]
    assert glue.write_test_predictions("mnli", [0, 1, 2], pair, tmp_path).name == "MNLI-m.tsv"
    assert glue.write_test_predictions("ax", [0, 1, 2], pair, tmp_path).name == "AX.tsv"
    names = {glue.get_task(t).submission_files.get("test") for t in glue.TASKS}
    assert names == {"CoLA.tsv", "SST-2.tsv", "MRPC.tsv", "STS-B.tsv", "QQP.tsv", "QNLI.tsv", "RTE.tsv",
                     "WNLI.tsv", "AX.tsv", None}
    assert not list(tmp_path.glob("*.partial"))


def test_write_test_predictions_rejects_bad_predictions(tmp_path):
    pair = [glue.Example("a", "b", None, str(i), i + 2) for i in range(2)]
    with pytest.raises(InputError, match="3 predictions for 2 examples"):
        glue.write_test_predictions("rte", [0, 1, 1], pair, tmp_path)
    with pytest.raises(InputError, match="not a class id"):
        glue.write_test_predictions("rte", [0, 2], pair, tmp_path)
    with pytest.raises(InputError, match="not a test split"):
        glue.write_test_predictions("rte", [0, 1], pair, tmp_path, split="dev")
    assert not (tmp_path / "RTE.tsv").exists()
