"""docs/WALKTHROUGH.md maps the paper to the code: every file, function and test it names must
exist, so that the map cannot drift from the territory."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WALKTHROUGH = ROOT / "docs" / "WALKTHROUGH.md"
REFERENCE = re.compile(r"`([\w./-]+\.py)(?:::([\w.]+))?`")


def defined_names(path: Path) -> set:
    """Top-level functions and classes, and Class.method for every method."""
    names = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            names.update(f"{node.name}.{item.name}" for item in node.body
                         if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)))
    return names


def references(text: str) -> list:
    return REFERENCE.findall(text)


def test_references_are_found_in_the_text():
    assert references("see `train.py::main` and `bert/speed.py`, not `x.txt`") == \
        [("train.py", "main"), ("bert/speed.py", "")]


def test_every_file_function_and_test_it_names_exists():
    refs = references(WALKTHROUGH.read_text(encoding="utf-8"))
    assert len(refs) >= 60                        # the tables are there
    missing = []
    for file, name in refs:
        path = ROOT / file
        if not path.is_file():
            missing.append(file)
        elif name and name not in defined_names(path):
            missing.append(f"{file}::{name}")
    assert not missing, "WALKTHROUGH.md names what does not exist: " + ", ".join(sorted(set(missing)))


def test_every_line_of_algorithm_1_and_every_baseline_is_mapped():
    text = WALKTHROUGH.read_text(encoding="utf-8")
    # Algorithm 1 has 16 numbered lines; 15-16 close the loops. Every line from 1 to 14 is
    # mapped, once.
    section = text[text.index("## Algorithm 1, line by line"):text.index("## Section 4.3")]
    mapped = []
    for first, last in re.findall(r"^\| (\d+)(?:-(\d+))?:", section, flags=re.M):
        mapped += range(int(first), int(last or first) + 1)
    assert sorted(mapped) == list(range(1, 15)), mapped
    for method in ("| FT |", "| L2-SP |", "| Mixout |", "| SMART |", "| FT+Noise (Table 2) |"):
        assert method in text, method
    for eq in ("Eq. 1", "Eq. 2", "Eq. 3", "Eq. 4", "Eq. 5", "Eq. 6", "Eq. 7", "Eq. 8-9", "Eq. 10", "Eq. 11"):
        assert eq in text, eq


def test_train_py_reads_as_one_run_of_algorithm_1():
    """train.py is the file a reader opens next to Algorithm 1: at most about 400 lines, the
    paper's recipe as one dataclass near the top, and the optimizer step within the first 200."""
    lines = (ROOT / "train.py").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 400
    first = lambda text: next(i for i, line in enumerate(lines, 1) if text in line)
    assert first("class TrainConfig") <= 60
    assert first("optimizer.step()") <= 200
    assert first("total.backward()") < first("optimizer.step()")
    # The comments number Algorithm 1's lines as the WALKTHROUGH table does (16 lines, R-hat <- 0
    # is line 4), and as regularizers/lnsr.py does.
    assert "line 13: g" in lines[first("total.backward()") - 1]
    assert "line 14: theta" in lines[first("optimizer.step()") - 1]
    lnsr = (ROOT / "regularizers" / "lnsr.py").read_text(encoding="utf-8")
    assert "line 4: R-hat <- 0" in lnsr and "(Alg. 1, line 6)" in lnsr
