"""BERT's WordPiece tokenizer: a thin wrapper over Hugging Face's `tokenizers` library (Rust).

Text becomes ids in four steps, as in the original BERT (Devlin et al., 2019, and Google's
`tokenization.py`):

    normalize      clean control characters, split out Chinese characters, lowercase and
                   strip accents (uncased models only)
    pre-tokenize   split on whitespace and punctuation
    WordPiece      greedy longest-match-first sub-words: "unaffable" -> un ##aff ##able
    template       [CLS] A [SEP]          token_type_ids 0 ... 0
                   [CLS] A [SEP] B [SEP]  token_type_ids 0 ... 0 1 ... 1

A model folder gives either a ready `tokenizer.json` (used as is) or only `vocab.txt` (+
`tokenizer_config.json`), from which we build the same pipeline. Ids equal those of
`transformers.AutoTokenizer` with `truncation=True`; tests/test_tokenizer.py checks this on
GLUE dev sets.

Truncation of a pair is "longest first": tokens come off the longer of the two texts. When
both are too long and the budget is odd, the `tokenizers` library (and so HF's fast tokenizers)
gives the extra token to the text that was longer to begin with (to B on a tie); Google's
original `_truncate_seq_pair` and HF's pure-Python tokenizer give it to A on a tie. We follow
the fast tokenizers, which is what HF's `run_glue.py` uses.
"""
import json
import os
import threading
from pathlib import Path

import tokenizers
from tokenizers import decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece

from bert.config import read_json_object
from bert.errors import InputError

# tokenizer_config.json keys of the special tokens, with BERT's defaults.
SPECIAL_TOKENS = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]",
                  "cls_token": "[CLS]", "mask_token": "[MASK]"}


class Tokenizer:
    """Text -> (input_ids, token_type_ids) for BERT, and back.

    `encode` never pads: batches are padded later, to their own longest example.
    """

    def __init__(self, backend: tokenizers.Tokenizer, do_lower_case: bool = True,
                 strip_accents: bool | None = None, tokenize_chinese_chars: bool = True,
                 model_max_length: int = 512, special_tokens: dict | None = None):
        self._backend = backend
        # A tokenizer.json may ask for padding (all-MiniLM-L6-v2's pads everything to 128) and
        # truncation; neither may decide our results, so padding goes and truncation is set on
        # every call. The lock keeps "set truncation, encode" atomic across threads.
        self._backend.no_padding()
        self._backend.no_truncation()
        self._lock = threading.Lock()
        # What tokenizer_config.json says, kept so that save() writes it back.
        self.do_lower_case = do_lower_case
        self.strip_accents = strip_accents
        self.tokenize_chinese_chars = tokenize_chinese_chars
        self.model_max_length = model_max_length
        self.special_tokens = {**SPECIAL_TOKENS, **(special_tokens or {})}

        def id_of(key):
            token_id = backend.token_to_id(self.special_tokens[key])
            if token_id is None:
                raise InputError(f"the vocabulary has no {key} {self.special_tokens[key]!r}")
            return token_id

        self.pad_id = id_of("pad_token")
        self.cls_id = id_of("cls_token")
        self.sep_id = id_of("sep_token")
        self.unk_id = id_of("unk_token")
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)

    # ---- loading -------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, model_dir) -> "Tokenizer":
        """Load tokenizer.json if the folder has one, else build the tokenizer from vocab.txt."""
        model_dir = Path(model_dir)
        tokenizer_json, vocab_txt = model_dir / "tokenizer.json", model_dir / "vocab.txt"
        if not tokenizer_json.is_file() and not vocab_txt.is_file():
            raise InputError(f"{model_dir}: no tokenizer.json or vocab.txt in this folder")
        config = _read_tokenizer_config(model_dir / "tokenizer_config.json")
        special_tokens = {key: _token_text(config[key]) for key in SPECIAL_TOKENS if config.get(key)}
        do_lower_case = config.get("do_lower_case", True)
        strip_accents = config.get("strip_accents")
        tokenize_chinese_chars = config.get("tokenize_chinese_chars", True)
        # HF writes a huge number (int(1e30)) when a model has no length limit.
        model_max_length = config.get("model_max_length", 512)
        if not isinstance(model_max_length, int) or model_max_length > 1_000_000:
            model_max_length = 512

        if tokenizer_json.is_file():
            backend = _load_tokenizer_json(tokenizer_json)
            # The file's normalizer is what runs; report its settings, not the config's.
            normalizer = json.loads(backend.to_str()).get("normalizer") or {}
            if normalizer.get("type") == "BertNormalizer":
                do_lower_case = normalizer.get("lowercase", do_lower_case)
                strip_accents = normalizer.get("strip_accents", strip_accents)
                tokenize_chinese_chars = normalizer.get("handle_chinese_chars", tokenize_chinese_chars)
        else:
            vocab = _read_vocab(vocab_txt)
            tokens = {**SPECIAL_TOKENS, **special_tokens}
            for key in ("unk_token", "cls_token", "sep_token"):  # the ones the pipeline needs
                if tokens[key] not in vocab:
                    raise InputError(f"{vocab_txt}: the vocabulary has no {key} {tokens[key]!r}")
            backend = _build_wordpiece(vocab, tokens, do_lower_case, strip_accents,
                                       tokenize_chinese_chars)
        try:
            return cls(backend, do_lower_case, strip_accents, tokenize_chinese_chars,
                       model_max_length, special_tokens)
        except InputError as e:
            raise InputError(f"{model_dir}: {e}") from None

    @classmethod
    def from_pretrained(cls, name_or_path) -> "Tokenizer":
        """A model name (downloaded once, then cached) or a local folder."""
        from bert import hub  # imported here so that the tokenizer does not need the network code
        return cls.from_dir(hub.resolve(name_or_path))

    # ---- text -> ids ---------------------------------------------------------------------

    def encode(self, text_a: str, text_b: str | None = None,
               max_length: int = 128) -> tuple[list[int], list[int]]:
        """[CLS] a [SEP] (b [SEP]), at most max_length tokens; returns (input_ids, token_type_ids)."""
        self._check_max_length(max_length, text_b is not None)
        with self._lock:
            self._backend.enable_truncation(max_length, strategy="longest_first")
            encoding = self._backend.encode(text_a, text_b)
        return encoding.ids, encoding.type_ids

    def encode_batch(self, texts_a: list[str], texts_b: list[str] | None = None,
                     max_length: int = 128) -> list[tuple[list[int], list[int]]]:
        """encode() on every item, run in parallel by the Rust library."""
        if texts_b is None:
            inputs = list(texts_a)
        else:
            if len(texts_a) != len(texts_b):
                raise ValueError(f"texts_a has {len(texts_a)} items but texts_b has {len(texts_b)}")
            inputs = list(zip(texts_a, texts_b))
        self._check_max_length(max_length, texts_b is not None)
        with self._lock:
            self._backend.enable_truncation(max_length, strategy="longest_first")
            encodings = self._backend.encode_batch(inputs)
        return [(e.ids, e.type_ids) for e in encodings]

    def _check_max_length(self, max_length: int, is_pair: bool):
        # Below the number of special tokens the library silently stops truncating at all.
        n_special = self._backend.num_special_tokens_to_add(is_pair)
        if max_length < n_special:
            kind = "a sentence pair" if is_pair else "a sentence"
            raise InputError(f"max_length {max_length} is too small: {kind} needs "
                             f"{n_special} positions for [CLS] and [SEP] alone")

    # ---- ids -> text ---------------------------------------------------------------------

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Join WordPieces back into text ("un ##aff ##able" -> "unaffable"), lowercased if
        the model is uncased. Same default as HF: special tokens are kept."""
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # ---- saving --------------------------------------------------------------------------

    def save(self, out_dir):
        """Write tokenizer.json, vocab.txt, tokenizer_config.json and special_tokens_map.json,
        the files `transformers.AutoTokenizer.from_pretrained(out_dir)` reads."""
        with self._lock:
            clean = tokenizers.Tokenizer.from_str(self._backend.to_str())
        clean.no_truncation()
        clean.no_padding()
        vocab = clean.get_vocab(with_added_tokens=True)
        tokens = sorted(vocab, key=vocab.get)
        if [vocab[t] for t in tokens] != list(range(len(tokens))):
            raise ValueError("the vocabulary ids are not 0..N-1, so vocab.txt cannot hold them")
        config = {
            "tokenizer_class": "BertTokenizer",
            "do_lower_case": self.do_lower_case,
            "strip_accents": self.strip_accents,
            "tokenize_chinese_chars": self.tokenize_chinese_chars,
            "model_max_length": self.model_max_length,
            **self.special_tokens,
        }
        files = {
            "tokenizer.json": clean.to_str(pretty=True),
            "vocab.txt": "".join(t + "\n" for t in tokens),
            "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False) + "\n",
            "special_tokens_map.json": json.dumps(self.special_tokens, indent=2) + "\n",
        }
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            _write_atomically(out_dir / name, text)

    # A threading.Lock cannot be pickled (DataLoader workers, copy.deepcopy): drop and remake it.
    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()


def _build_wordpiece(vocab: dict, special_tokens: dict, do_lower_case: bool,
                     strip_accents: bool | None, tokenize_chinese_chars: bool) -> tokenizers.Tokenizer:
    """The pipeline of Google's BERT tokenization.py, the same one HF builds from a vocab.txt."""
    unk, cls, sep = special_tokens["unk_token"], special_tokens["cls_token"], special_tokens["sep_token"]
    backend = tokenizers.Tokenizer(WordPiece(vocab, unk_token=unk, continuing_subword_prefix="##",
                                             max_input_chars_per_word=100))
    backend.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=tokenize_chinese_chars,
        strip_accents=strip_accents,  # None: strip accents exactly when lowercasing
        lowercase=do_lower_case)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}",
        pair=f"{cls} $A {sep} $B:1 {sep}:1",
        special_tokens=[(cls, vocab[cls]), (sep, vocab[sep])])
    backend.decoder = decoders.WordPiece(prefix="##")
    # Special tokens written in the text ("[SEP]") stay whole, as in HF; only those the
    # vocabulary has, so that no new id appears.
    backend.add_special_tokens([t for t in special_tokens.values() if t in vocab])
    return backend


def _load_tokenizer_json(path: Path) -> tokenizers.Tokenizer:
    try:
        backend = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # the library raises a bare Exception with serde's message
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"{path}: not a valid tokenizer.json ({reason})") from None
    if not isinstance(backend.model, WordPiece):
        raise InputError(f"{path}: the model is {type(backend.model).__name__}, "
                         "but BERT needs a WordPiece tokenizer")
    return backend


def _read_vocab(path: Path) -> dict:
    """One token per line, id = line number; like HF's load_vocab, only the newline is stripped."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text (byte {e.start})") from None
    vocab = {line.rstrip("\n"): i for i, line in enumerate(lines)}
    if not vocab:
        raise InputError(f"{path}: the vocabulary is empty")
    return vocab


def _read_tokenizer_config(path: Path) -> dict:
    return read_json_object(path) if path.is_file() else {}


def _token_text(value) -> str:
    """A special token in tokenizer_config.json is a string or an AddedToken dict."""
    return value["content"] if isinstance(value, dict) else str(value)


def _write_atomically(path: Path, text: str):
    """Write a temporary file, then rename it: a crash never leaves a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text, encoding="utf-8", newline="\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
