"""glue.download against a local HTTP server on 127.0.0.1: a task zip, MRPC assembled from the MSR
paraphrase files (rebuilding ../shared/glue_data/MRPC byte for byte), a mirror that fails over,
the offline message, and interrupted or broken downloads that leave nothing behind."""

import http.server
import io
import socket
import threading
import zipfile
from pathlib import Path

import pytest

import glue
from bert.errors import InputError
from glue import download

SHARED_GLUE = Path(__file__).resolve().parents[2] / "shared" / "glue_data"
needs_shared = pytest.mark.skipif(not (SHARED_GLUE / "MRPC" / "train.tsv").is_file(),
                                  reason=f"the GLUE files are not in {SHARED_GLUE}")


class Server:
    """Serves `files` (name -> bytes); names in `truncated` announce their full size but stop
    halfway, as a dropped connection does."""

    def __init__(self):
        self.files, self.truncated, self.requests = {}, set(), []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                name = self.path.lstrip("/")
                server.requests.append(name)
                if name not in server.files:
                    self.send_error(404)
                    return
                body = server.files[name]
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[:len(body) // 2] if name in server.truncated else body)
                if name in server.truncated:
                    self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(monkeypatch):
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    served = Server()
    monkeypatch.setenv(download.MIRROR_ENV, served.url)
    yield served
    served.close()


def zip_bytes(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def rte_zip() -> bytes:
    header = "index\tsentence1\tsentence2\tlabel\n"
    return zip_bytes({
        "RTE/train.tsv": (header + "0\tA dog runs.\tAn animal runs.\tentailment\n").encode(),
        "RTE/dev.tsv": (header + "0\tA cat sleeps.\tA cat runs.\tnot_entailment\n").encode(),
        "RTE/test.tsv": b"index\tsentence1\tsentence2\n0\tX.\tY.\n",
    })


def leftovers(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_task_zip_is_downloaded_and_extracted(server, tmp_path, capsys):
    server.files["RTE.zip"] = rte_zip()
    folder = glue.ensure_task_data("rte", tmp_path)
    assert folder == tmp_path / "RTE"
    assert leftovers(tmp_path) == ["RTE", "RTE/dev.tsv", "RTE/test.tsv", "RTE/train.tsv"]
    assert glue.load_examples("rte", "train", tmp_path)[0].text_b == "An animal runs."
    assert "RTE.zip  471 B / 471 B  100.0%" in capsys.readouterr().err   # progress on stderr
    # Present files are not fetched again.
    server.requests.clear()
    assert glue.ensure_task_data("RTE", tmp_path) == folder and server.requests == []
    # A task not yet there is fetched, then read.
    server.files["WNLI.zip"] = zip_bytes({f"WNLI/{s}.tsv": b"index\tsentence1\tsentence2\tlabel\n0\tA.\tB.\t1\n"
                                          for s in ("train", "dev")} | {"WNLI/test.tsv": b"index\tsentence1\tsentence2\n0\tA.\tB.\n"})
    glue.ensure_task_data("wnli", tmp_path)
    assert glue.load_examples("wnli", "dev", tmp_path)[0].label == 1


@needs_shared
def test_real_cola_zip_round_trip(server, tmp_path):
    files = {f"CoLA/{s}.tsv": (SHARED_GLUE / "CoLA" / f"{s}.tsv").read_bytes() for s in ("train", "dev", "test")}
    files["CoLA/original/raw/in_domain_train.tsv"] = files["CoLA/train.tsv"]
    server.files["CoLA.zip"] = zip_bytes(files)
    glue.ensure_task_data("cola", tmp_path)
    for split in ("train", "dev", "test"):
        assert (tmp_path / "CoLA" / f"{split}.tsv").read_bytes() == (SHARED_GLUE / "CoLA" / f"{split}.tsv").read_bytes()
    assert len(glue.load_examples("cola", "train", tmp_path)) == 8551


def test_the_next_url_is_tried_when_one_fails(server, tmp_path, monkeypatch):
    monkeypatch.delenv(download.MIRROR_ENV)
    monkeypatch.setitem(download.URLS, "RTE.zip", [server.url + "/gone/RTE.zip", server.url + "/RTE.zip"])
    server.files["RTE.zip"] = rte_zip()
    glue.ensure_task_data("rte", tmp_path)
    assert server.requests == ["gone/RTE.zip", "RTE.zip"]
    assert (tmp_path / "RTE" / "train.tsv").is_file()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_offline_gives_a_clear_message_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    url = closed_port_url()
    monkeypatch.setenv(download.MIRROR_ENV, url)
    with pytest.raises(InputError) as error:
        glue.ensure_task_data("cola", tmp_path)
    message = str(error.value)
    assert f"{url}/CoLA.zip (connection failed)" in message
    assert "offline" in message and f"unzip it into {tmp_path}" in message
    assert leftovers(tmp_path) == []
    with pytest.raises(InputError, match=r"msr_paraphrase_train\.txt.*place it in .*MRPC"):
        glue.ensure_task_data("mrpc", tmp_path)
    assert leftovers(tmp_path) == []


def test_interrupted_download_leaves_nothing_behind(server, tmp_path):
    server.files["RTE.zip"] = rte_zip() + bytes(50_000)
    server.truncated.add("RTE.zip")
    with pytest.raises(InputError, match=r"could not download RTE\.zip: .*broke off mid-download"):
        glue.ensure_task_data("rte", tmp_path)
    assert leftovers(tmp_path) == []


def test_a_download_that_is_not_a_zip_leaves_nothing_behind(server, tmp_path):
    server.files["RTE.zip"] = b"<html>quota exceeded</html>"
    with pytest.raises(InputError, match=r"RTE\.zip: the download is not a valid zip archive"):
        glue.ensure_task_data("rte", tmp_path)
    server.files["RTE.zip"] = zip_bytes({"RTE/train.tsv": b"x"})
    with pytest.raises(InputError, match="no folder in the archive holds train.tsv, dev.tsv, test.tsv"):
        glue.ensure_task_data("rte", tmp_path)
    assert leftovers(tmp_path) == []


def test_diagnostic_set(server, tmp_path):
    server.files["AX.tsv"] = b"index\tsentence1\tsentence2\n0\tThe cat sat.\tNo cat sat.\n"
    assert glue.ensure_task_data("ax", tmp_path) == tmp_path / "diagnostic"
    assert glue.load_examples("ax", "test", tmp_path)[0].text_b == "No cat sat."


# ---- MRPC ---------------------------------------------------------------------------------

def msr_sources_from_glue_files(mrpc: Path) -> dict[str, bytes]:
    """Recreate the three GLUE/SentEval source files from the GLUE MRPC files.

    msr_paraphrase_train.txt: GLUE's train and dev rows, interleaved (any interleaving that keeps
    each file's order splits back into the same two files), with the corpus header and its
    byte-order mark, '\\r\\n' line ends as in the Microsoft release. msr_paraphrase_test.txt: the
    test pairs with a label column. mrpc_dev_ids.tsv: the (#1 ID, #2 ID) of each dev row.
    """
    def rows(name):
        return (mrpc / name).read_text(encoding="utf-8").split("\n")[1:-1]
    header = (mrpc / "train.tsv").read_text(encoding="utf-8").split("\n")[0]
    train, dev, test = rows("train.tsv"), rows("dev.tsv"), rows("test.tsv")
    assert header.startswith("\ufeffQuality")
    merged = []
    for i, row in enumerate(train):
        merged.append(row)
        if i % 9 == 4 and dev:
            merged.append(dev.pop(0))
    merged += dev
    test_rows = [f"{i % 2}\t" + row.split("\t", 1)[1] for i, row in enumerate(test)]
    dev_ids = [row.split("\t")[1] + "\t" + row.split("\t")[2] for row in rows("dev.tsv")]
    return {
        "msr_paraphrase_train.txt": "\r\n".join([header] + merged + [""]).encode("utf-8"),
        "msr_paraphrase_test.txt": "\r\n".join([header] + test_rows + [""]).encode("utf-8"),
        "mrpc_dev_ids.tsv": "\n".join(dev_ids + [""]).encode("utf-8"),
    }


@needs_shared
def test_mrpc_is_rebuilt_byte_for_byte(server, tmp_path):
    server.files.update(msr_sources_from_glue_files(SHARED_GLUE / "MRPC"))
    folder = glue.ensure_task_data("mrpc", tmp_path)
    for split in ("train", "dev", "test"):
        assert (folder / f"{split}.tsv").read_bytes() == (SHARED_GLUE / "MRPC" / f"{split}.tsv").read_bytes(), split
    assert leftovers(tmp_path) == ["MRPC", "MRPC/dev.tsv", "MRPC/test.tsv", "MRPC/train.tsv"]
    assert len(glue.load_examples("mrpc", "dev", tmp_path)) == 408


def test_mrpc_split_by_dev_ids_on_a_small_corpus(tmp_path, monkeypatch):
    # Placed by hand in <data_dir>/MRPC: no server, no network; dev_ids.tsv is accepted too.
    monkeypatch.setenv(download.MIRROR_ENV, closed_port_url())
    mrpc = tmp_path / "MRPC"
    mrpc.mkdir()
    header = "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String"
    (mrpc / "msr_paraphrase_train.txt").write_bytes("\r\n".join([
        header, "1\t10\t11\tA \"quoted.\tB.", "0\t12\t13\tC.\tD. ", "1\t14\t15\tE.\tF.", "0\t13\t12\tG.\tH.", ""]).encode())
    (mrpc / "msr_paraphrase_test.txt").write_bytes("\r\n".join([header, "1\t20\t21\tI.\tJ.", "0\t22\t23\tK.\tL.", ""]).encode())
    (mrpc / "dev_ids.tsv").write_text("12\t13\n14\t15\n")
    glue.ensure_task_data("mrpc", tmp_path)
    read = lambda name: (mrpc / name).read_bytes().decode("utf-8")
    # Pairs are matched in order: (13, 12) is not the dev pair (12, 13). Rows are stripped.
    assert read("train.tsv") == f"{header}\n1\t10\t11\tA \"quoted.\tB.\n0\t13\t12\tG.\tH.\n"
    assert read("dev.tsv") == f"{header}\n0\t12\t13\tC.\tD.\n1\t14\t15\tE.\tF.\n"
    assert read("test.tsv") == "index\t#1 ID\t#2 ID\t#1 String\t#2 String\n0\t20\t21\tI.\tJ.\n1\t22\t23\tK.\tL.\n"
    assert [e.label for e in glue.load_examples("mrpc", "dev", tmp_path)] == [0, 1]


def test_mrpc_bad_source_row_names_file_and_line(tmp_path):
    mrpc = tmp_path / "MRPC"
    mrpc.mkdir()
    header = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"
    (mrpc / "msr_paraphrase_train.txt").write_text(f"{header}\n1\t10\t11\tA.\tB.\n0\t12\tC.\n")
    (mrpc / "msr_paraphrase_test.txt").write_text(f"{header}\n1\t20\t21\tI.\tJ.\n")
    (mrpc / "mrpc_dev_ids.tsv").write_text("10\t11\n")
    with pytest.raises(InputError, match=rf"^{mrpc / 'msr_paraphrase_train.txt'}:3: expected 5 tab-separated"):
        glue.ensure_task_data("mrpc", tmp_path)
    assert leftovers(tmp_path) == ["MRPC", "MRPC/mrpc_dev_ids.tsv", "MRPC/msr_paraphrase_test.txt",
                                   "MRPC/msr_paraphrase_train.txt"]


def test_command_line(server, tmp_path, capsys):
    server.files["RTE.zip"] = rte_zip()
    assert download.main(["rte", "--data-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "RTE")
    assert download.main(["nope", "--data-dir", str(tmp_path)]) == 2


def test_offline_variable_forbids_downloading(tmp_path, monkeypatch):
    monkeypatch.setenv("LNSR_OFFLINE", "1")
    monkeypatch.setenv("GLUE_DOWNLOAD_URL", "http://127.0.0.1:9")       # would be refused anyway
    with pytest.raises(InputError, match="LNSR_OFFLINE=1 forbids downloading"):
        glue.ensure_task_data("rte", tmp_path)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []   # no scratch left
    assert not (tmp_path / "RTE" / "train.tsv").exists()
