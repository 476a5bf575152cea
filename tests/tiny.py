"""A tiny random BERT classifier and a padded batch, shared by the regularizer tests."""
import torch

from bert.config import BertConfig
from bert.model import BertClassifier, init_weights


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
