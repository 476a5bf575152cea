"""BERT (Devlin et al., 2019) in plain PyTorch: the encoder that LNSR regularizes.

One forward pass, as the paper's Section 3.1 names its pieces:

    x^1 = Embeddings(input_ids, token_type_ids)                 input of layer 1, (B, T, H)
    x^{r+1} = Layer_r(x^r)               for r = 1..L           output of layer r = input of r+1
    pooled = tanh(W_p x^{L+1}[:, 0] + b_p)                     the [CLS] vector, (B, H)
    logits = W_c dropout(pooled) + b_c                          (B, num_labels)

`f^{b,r}` of the paper is "run layers b..r", which `BertModel.run_layers` does from any b.
`hidden_states` holds the L+1 tensors x^1 (the embedding output), x^2, ..., x^{L+1}, exactly
as Hugging Face's `output_hidden_states=True`, so `hidden_states[b - 1]` is the input of layer b
and `hidden_states[r]` the output of layer r.

Each layer is post-LayerNorm, as in the original BERT:
    a = LayerNorm(x + Dropout(Attention(x)))
    y = LayerNorm(a + Dropout(W_2 GELU(W_1 a)))

The attention formula is `SelfAttention.attend`, one `if` between the written-out product and
torch's fused kernel. Speed tricks sit behind seams from bert/speed.py, out of the way of the
math: `Dropout` and `softmax_dropout` (fast CPU masks; the attention's keeps no mask for the
backward pass), `gelu_linear` (the feed-forward block keeps W_1 a alone for the backward pass
and computes its GELU again there) and `token_rows` (on a CPU, projections and the feed-forward block run on the
real tokens alone, with a few padding rows that round their count up to a bucket, so a layer's
output is 0 at padding, where Hugging Face computes values that every later step masks out).
One more, `cls_only_last_layer`, lets the last layer compute the [CLS] position alone. None
changes a value that is read. A caller can have a layer's attention and LayerNorms computed as
plain tensor operations (bert/speed.py::write_out, hooks from outside the model), for
forward-mode differentiation (LNSR's jvp estimator).

Weight names differ from Hugging Face's where a shorter name reads better; bert/weights.py maps
between the two explicitly.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from bert.config import BertConfig
from bert.speed import Dropout, LayerNorm, gelu_linear, softmax_dropout, token_rows, written_out   # the seams, bert/speed.py
from bert.weights import load_pretrained, save_pretrained

GELUS = {"gelu": "none",                 # exact, erf-based: BERT's own
         "gelu_new": "tanh",               # F.gelu's `approximate` for each GELU of config.hidden_act
         "gelu_pytorch_tanh": "tanh"}


class Embeddings(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids, token_type_ids):
        T = input_ids.shape[1]
        positions = torch.arange(T, device=input_ids.device)                      # (T,)
        x = (self.word_embeddings(input_ids)                                     # (B, T, H)
             + self.token_type_embeddings(token_type_ids)
             + self.position_embeddings(positions))
        return self.dropout(self.layer_norm(x))


class SelfAttention(nn.Module):
    """Multi-head self-attention: softmax(Q K^T / sqrt(d) + mask) V per head, then a projection.

    Q, K and V are three `nn.Linear`s, as in BERT and in Hugging Face's checkpoints. That lets
    the [CLS]-only last layer compute one query per example, and gives Mixout (which replaces
    each `nn.Linear`) a mask of its own for each, as in Lee et al.'s code.
    """

    def __init__(self, config: BertConfig):
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.head_size = config.head_size
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.out = nn.Linear(config.hidden_size, config.hidden_size)
        self.attn_dropout = config.attention_probs_dropout_prob

    def split_heads(self, x):                                   # (B, T, H) -> (B, h, T, d)
        B, T, _ = x.shape
        return x.view(B, T, self.n_heads, self.head_size).transpose(1, 2)

    def forward(self, rows, tokens, cls_query=None):
        """rows -> rows: the tokens' hidden states as `tokens` lays them out, (B, T, H) or the
        real tokens alone, (R, H) (bert/speed.py::token_rows, which also holds the padding mask).
        With cls_query, the (B, 1, H) [CLS] rows that make the queries, the output is (B, 1, H);
        keys and values still come from every token.
        """
        k = self.split_heads(tokens.grid(self.key(rows)))                       # (B, h, T, d)
        v = self.split_heads(tokens.grid(self.value(rows)))                     # (B, h, T, d)
        q = self.split_heads(tokens.grid(self.query(rows)) if cls_query is None
                             else self.query(cls_query))                        # (B, h, Tq, d)
        y = self.attend(q, k, v, tokens.attn_mask)                              # (B, h, Tq, d)
        B, h, Tq, d = y.shape
        y = y.transpose(1, 2).reshape(B, Tq, h * d)                             # (B, Tq, H)
        return self.out(y if cls_query is not None else tokens.rows(y))

    def attend(self, q, k, v, attn_mask):
        """softmax(Q K^T / sqrt(d) + mask) V, with dropout on the probabilities P.

        q: (B, h, Tq, d); k, v: (B, h, T, d); attn_mask: (B, 1, 1, T) bool (True = a real token)
        or None. Written out in training on a CPU (the fast dropout masks of bert/speed.py) and
        inside a module that bert/speed.py::write_out asks for plain tensor operations;
        elsewhere the same math in torch's fused kernel.
        """
        p = self.attn_dropout if self.training else 0.0
        if not (written_out() or (p > 0.0 and q.device.type == "cpu")):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)
        scores = (q * self.head_size ** -0.5) @ k.transpose(-1, -2)            # (B, h, Tq, T)
        if attn_mask is not None:        # -inf before the softmax: weight 0 on padding keys
            padding = torch.zeros_like(attn_mask, dtype=scores.dtype).masked_fill_(~attn_mask, float("-inf"))
            scores.add_(padding)                                               # (B, 1, 1, T)
        dropped_probs = softmax_dropout(scores, p, self.training)              # dropout(P): (B, h, Tq, T)
        return dropped_probs @ v                                               # dropout(P) V


class FeedForward(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.up = nn.Linear(config.hidden_size, config.intermediate_size)      # W_1: H -> 4H
        self.down = nn.Linear(config.intermediate_size, config.hidden_size)    # W_2: 4H -> H
        self.gelu = GELUS.get(config.hidden_act)                               # None: ReLU

    def forward(self, x):                                       # (..., H) -> (..., 4H) -> (..., H)
        hidden = self.up(x)                                                    # W_1 x: (..., 4H)
        if self.gelu is None:
            return self.down(F.relu(hidden))
        return gelu_linear(hidden, self.down, self.gelu)        # W_2 GELU(W_1 x), bert/speed.py


class Layer(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = SelfAttention(config)
        self.attention_norm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.ffn = FeedForward(config)
        self.ffn_norm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def forward(self, x, tokens, cls_only=False):                              # x: (B, T, H)
        rows = tokens.rows(x)                         # (B, T, H), or (R, H): real tokens alone
        if cls_only:          # only the pooler reads this layer: [CLS] makes the only queries
            cls = x[:, :1]                                                       # (B, 1, H)
            return self.after_attention(cls, self.attention(rows, tokens, cls))
        y = self.after_attention(rows, self.attention(rows, tokens), tokens.real_rows)
        return tokens.grid(y)                                                    # (B, T, H)

    def after_attention(self, x, attended, real_rows=None):
        # real_rows: how many of the rows are real tokens, for the dropout masks (bert/speed.py)
        x = self.attention_norm(x + self.dropout(attended, real_rows))   # a = LN(x + Dropout(Attention(x)))
        return self.ffn_norm(x + self.dropout(self.ffn(x), real_rows))   # y = LN(a + Dropout(FFN(a)))


class Pooler(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, last_hidden):                                               # (B, T, H)
        return torch.tanh(self.dense(last_hidden[:, 0]))                          # (B, H)


@dataclass
class BertOutput:
    last_hidden_state: torch.Tensor          # (B, T, H); (B, 1, H) with cls_only_last_layer
    pooler_output: torch.Tensor              # (B, H)
    hidden_states: tuple                     # L+1 tensors (B, T, H): x^1 (embeddings) .. x^{L+1},
                                             # the last (B, 1, H) with cls_only_last_layer. On a
                                             # CPU with padding, x^2..x^L are side outputs in
                                             # autograd's graph: their gradients come from their
                                             # readers, not from later layers (RealTokens.rows)
    attn_mask: torch.Tensor | None           # (B, 1, 1, T) bool, or None (no padding)


def attention_mask_for_sdpa(attention_mask):
    """(B, T) 0/1 padding mask -> (B, 1, 1, T) bool for every query row, or None.

    None when nothing is padded, so SDPA can skip the masking work. That check reads the mask on
    the host, which would stall a GPU's queue every step, so on a GPU the mask is always passed.
    """
    if attention_mask is None:
        return None
    if attention_mask.device.type == "cpu" and bool(attention_mask.all()):
        return None
    return attention_mask.bool()[:, None, None, :]


class BertModel(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.layers = nn.ModuleList([Layer(config) for _ in range(config.num_hidden_layers)])
        self.pooler = Pooler(config)
        # The pooler reads the [CLS] position of the last layer and nothing else, so unless
        # someone needs x^{L+1} at every position, the last layer can compute that one position:
        # its keys and values still come from every token, but its query, output projection and
        # feed-forward run on one row instead of T. Same logits and gradients, about 5/6 of one
        # layer's work saved. Off by default; when on, hidden_states[L] is (B, 1, H). train.py
        # turns it on for methods that read only the logits, and scoring.logits_of for evaluation.
        self.cls_only_last_layer = False

    def forward(self, input_ids, token_type_ids=None, attention_mask=None) -> BertOutput:
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        attn_mask = attention_mask_for_sdpa(attention_mask)
        x = self.embeddings(input_ids, token_type_ids)                           # x^1: (B, T, H)
        hidden_states = [x]
        L = len(self.layers)
        tokens = token_rows(attn_mask, x.device)        # every position, or the real tokens alone
        for r, layer in enumerate(self.layers, start=1):
            x = layer(x, tokens, cls_only=self.cls_only_last_layer and r == L)
            hidden_states.append(x)
        return BertOutput(last_hidden_state=x, pooler_output=self.pooler(x),
                          hidden_states=tuple(hidden_states), attn_mask=attn_mask)

    def run_layers(self, x_b, attn_mask, b: int) -> list:
        """f^{b,r}(x_b) for r = b..L: the outputs of layers b..L given x_b, the input of layer b.

        attn_mask is the forward pass's `BertOutput.attn_mask`. In training mode the dropout
        masks are drawn from the global RNG like any pass's; a regularizer that wants the clean
        pass's masks runs this inside its replay (regularizers/replay.py).
        """
        L = len(self.layers)
        if not 1 <= b <= L:
            raise ValueError(f"layer b={b} is outside 1..{L}")
        tokens, outputs, x = token_rows(attn_mask, x_b.device), [], x_b
        for layer in self.layers[b - 1:]:
            x = layer(x, tokens)
            outputs.append(x)
        return outputs

    @classmethod
    def from_pretrained(cls, name_or_path, verbose=True) -> "BertModel":
        return load_pretrained(name_or_path, build=cls, num_labels=None, verbose=verbose)


@dataclass
class ClassifierOutput:
    logits: torch.Tensor                     # (B, num_labels)
    hidden_states: tuple                     # as BertOutput.hidden_states
    pooler_output: torch.Tensor              # (B, H)
    attn_mask: torch.Tensor | None           # (B, 1, 1, T) bool, or None


class BertClassifier(nn.Module):
    """BERT + dropout + a linear head on the pooled [CLS] vector (num_labels = 1: regression)."""

    def __init__(self, config: BertConfig, num_labels: int):
        super().__init__()
        self.config = config
        self.num_labels = num_labels
        self.bert = BertModel(config)
        p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = Dropout(p)
        self.classifier = nn.Linear(config.hidden_size, num_labels)

    def forward(self, input_ids, token_type_ids=None, attention_mask=None) -> ClassifierOutput:
        out = self.bert(input_ids, token_type_ids, attention_mask)
        logits = self.classifier(self.dropout(out.pooler_output))                 # (B, num_labels)
        return ClassifierOutput(logits=logits, hidden_states=out.hidden_states,
                                pooler_output=out.pooler_output, attn_mask=out.attn_mask)

    def init_head(self, generator: torch.Generator | None = None):
        """N(0, 0.02^2) weights and zero bias, as the paper (Appendix A) and BERT do.

        A separate generator lets `--init-seed` fix the head without touching other randomness.
        """
        with torch.no_grad():
            w = torch.randn(self.classifier.weight.shape, generator=generator)
            self.classifier.weight.copy_(w * self.config.initializer_range)
            self.classifier.bias.zero_()

    @classmethod
    def from_pretrained(cls, name_or_path, num_labels: int, verbose=True) -> "BertClassifier":
        return load_pretrained(name_or_path, build=lambda config: cls(config, num_labels),
                               num_labels=num_labels, verbose=verbose)

    def save_pretrained(self, out_dir, tokenizer=None, label_names=None):
        save_pretrained(self, out_dir, tokenizer=tokenizer, label_names=label_names)


def init_weights(module: nn.Module, std: float = 0.02, generator: torch.Generator | None = None):
    """BERT's initialisation for a model built from scratch: N(0, std^2) weights, zero biases,
    LayerNorm at identity. Used for randomly initialised models (tests, benchmarks)."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=generator) * std)
                if isinstance(m, nn.Linear):
                    m.bias.zero_()
            elif isinstance(m, nn.LayerNorm):
                m.weight.fill_(1.0)
                m.bias.zero_()
