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

Two shortcuts skip work whose result nobody reads (same values wherever they are read):
on the CPU, every projection, the feed-forward block and the LayerNorms run on the real tokens
only, so a layer's output is 0 at padding positions (Hugging Face computes values there that
every later step masks out); and with `cls_only_last_layer` the last layer computes the [CLS]
position only.

Weight names differ from Hugging Face's where a shorter name reads better; bert/weights.py maps
between the two explicitly.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from bert.config import BertConfig
from bert.weights import load_pretrained, save_pretrained

ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),                       # exact, erf-based: BERT's own
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


# ----------------------------------------------------------------------------- dropout
#
# Dropout is BERT's only source of training-time randomness, and on a CPU drawing its masks is
# expensive: torch's dropout calls bernoulli_ on a float tensor, element by element. Drawing
# 64 random bits per two elements and comparing each 32-bit half with a threshold gives the same
# Bernoulli(1 - p) masks several times faster. On a GPU torch's fused kernel is used.

def keep_mask(shape, p: float, device) -> tuple:
    """A bool mask, True with probability 1 - p, and 1 / (that probability), the dropout scale.

    Each element compares 32 uniform random bits u (an int32, uniform on [-2^31, 2^31)) with
    a threshold: it is dropped when u + 2^31 < round(p * 2^32), which happens with probability
    p_drop = round(p * 2^32) / 2^32, within 2^-33 of p (float32's own uniform has 24 bits).
    The bits come from torch's global generator, so seeding and `rng_state` replay apply.
    """
    n = math.prod(shape)
    threshold = round(p * 2**32)
    words = torch.empty((n + 1) // 2, dtype=torch.int64, device=device).random_(-2**63, None)
    bits = words.view(torch.int32)[:n].view(shape)                   # uniform on [-2^31, 2^31)
    return bits >= threshold - 2**31, 2**32 / (2**32 - threshold)


class _DropoutFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p):
        keep, scale = keep_mask(x.shape, p, x.device)
        mask = keep.to(x.dtype).mul_(scale)                       # 0 or 1/(1-p), in x's dtype
        ctx.save_for_backward(mask)
        return x * mask

    @staticmethod
    def backward(ctx, grad):
        mask, = ctx.saved_tensors
        return grad * mask, None


def dropout(x, p: float, training: bool):
    """Inverted dropout: zero each element with probability p, scale the rest by 1/(1-p)."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or not 0.0 < p < 1.0:
        return F.dropout(x, p, training=True)
    return _DropoutFunction.apply(x, p)


class Dropout(nn.Dropout):
    """nn.Dropout with the fast CPU masks above (same `p` attribute, same semantics)."""

    def forward(self, x):
        return dropout(x, self.p, self.training)


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

    def forward(self, x, attn_mask, cls_query=None, real_rows=None):
        """x: (B, T, H) -> (B, T, H); with cls_query, (B, 1, H).

        attn_mask is (B, 1, 1, T) bool (True = a real token) or None when nothing is padded.
        cls_query: the (B, 1, H) rows that make the queries, [CLS] alone (the last layer when only
        the pooler reads it); keys and values still come from every token.
        real_rows: the (N,) indices of the real tokens among the B*T positions. x then holds
        those tokens alone, (N, H), and so does the output (unless cls_query is given): the
        projections skip the padding. Padding positions enter the attention product with
        q = k = v = 0; as keys they are masked, and their query rows are dropped.
        """
        if real_rows is None:
            B, T, H = x.shape
        else:
            B, T, H = attn_mask.shape[0], attn_mask.shape[-1], x.shape[-1]

        def split_heads(projected):                     # (B, T, H) or (N, H) -> (B, h, T, d)
            if real_rows is not None:
                projected = projected.new_zeros(B * T, H).index_copy_(0, real_rows, projected)
            return projected.view(B, -1, self.n_heads, self.head_size).transpose(1, 2)

        k, v = split_heads(self.key(x)), split_heads(self.value(x))                  # (B, h, T, d)
        if cls_query is None:
            q = split_heads(self.query(x))                                            # (B, h, T, d)
        else:
            q = self.query(cls_query).view(B, 1, self.n_heads, self.head_size).transpose(1, 2)
        p = self.attn_dropout if self.training else 0.0
        if p > 0.0 and x.device.type == "cpu":
            # softmax(Q K^T / sqrt(d) + mask) V written out: on a CPU, SDPA with dropout takes
            # this same path internally, but with torch's slower dropout masks.
            scores = (q * self.head_size ** -0.5) @ k.transpose(-1, -2)           # (B, h, Tq, T)
            if attn_mask is not None:   # -inf before the softmax: weight 0 on padding
                scores.add_(torch.zeros(attn_mask.shape, dtype=scores.dtype, device=x.device)
                            .masked_fill_(~attn_mask, float("-inf")))      # (B, 1, 1, T)
            y = dropout(scores.softmax(dim=-1), p, True) @ v                          # (B, h, Tq, d)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)
        y = y.transpose(1, 2).reshape(B, -1, H)                                       # (B, Tq, H)
        if real_rows is not None and cls_query is None:
            y = y.reshape(B * T, H).index_select(0, real_rows)                        # (N, H)
        return self.out(y)


class FeedForward(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.up = nn.Linear(config.hidden_size, config.intermediate_size)      # W_1: H -> 4H
        self.down = nn.Linear(config.intermediate_size, config.hidden_size)    # W_2: 4H -> H
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, x):
        return self.down(self.act(self.up(x)))


class Layer(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = SelfAttention(config)
        self.attention_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.ffn = FeedForward(config)
        self.ffn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def forward(self, x, attn_mask, cls_only=False):                           # x: (B, T, H)
        cls_query = x[:, :1] if cls_only else None                              # (B, 1, H)
        if attn_mask is None or x.device.type != "cpu":
            attended = self.attention(x, attn_mask, cls_query)                 # (B, 1 or T, H)
            return self.after_attention(x if cls_query is None else cls_query, attended)
        # Padding positions are never read by a real token (attention masks them out as keys),
        # so on the CPU the layer runs on the real tokens only: the Q, K, V and output
        # projections, the feed-forward block and the LayerNorms. With dynamic padding, GLUE
        # batches are up to half padding. Output rows at padding are set to 0. (On a GPU the
        # padded rows are computed: finding the real rows with nonzero() would make the host
        # wait for the device at every layer.)
        B, T, H = x.shape
        real = attn_mask.reshape(B * T).nonzero().squeeze(1)                    # (N,) row ids
        # index_select, not x[real]: the same rows, but a plain row copy instead of advanced
        # indexing's general path, several times faster on a CPU (docs/SPEED.md, change 10).
        x_real = x.reshape(B * T, H).index_select(0, real)                      # (N, H)
        attended = self.attention(x_real, attn_mask, cls_query, real_rows=real)  # (N, H) or (B, 1, H)
        if cls_only:
            return self.after_attention(cls_query, attended)                   # (B, 1, H)
        y = self.after_attention(x_real, attended)                             # (N, H)
        return y.new_zeros(B * T, H).index_copy_(0, real, y).view(B, T, H)

    def after_attention(self, x, attended):                                     # (..., H) each
        x = self.attention_norm(x + self.dropout(attended))
        return self.ffn_norm(x + self.dropout(self.ffn(x)))


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
                                             # the last (B, 1, H) with cls_only_last_layer
    attn_mask: torch.Tensor | None           # (B, 1, 1, T) bool, or None (no padding)
    rng_snapshot: object = None              # RNG state before layer `rng_snapshot_layer`


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


def rng_state(device):
    """Everything the dropout masks of the next few ops depend on."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


class BertModel(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.layers = nn.ModuleList([Layer(config) for _ in range(config.num_hidden_layers)])
        self.pooler = Pooler(config)
        # A regularizer that re-runs layers b..L (LNSR, FT+Noise) sets this to b, so that the
        # forward pass records the RNG state before layer b and the second pass can replay the
        # very same dropout masks: the two passes then differ only by the injected noise.
        self.rng_snapshot_layer: int | None = None
        # The pooler reads the [CLS] position of the last layer and nothing else, so unless
        # someone needs x^{L+1} at every position, the last layer can compute that one position:
        # its keys and values still come from every token, but its query, output projection and
        # feed-forward run on one row instead of T. Same logits and gradients, about 5/6 of one
        # layer's work saved. Off by default (hidden_states[L] is then (B, 1, H)); train.py turns
        # it on for methods that read only the logits, and for evaluation.
        self.cls_only_last_layer = False

    def forward(self, input_ids, token_type_ids=None, attention_mask=None) -> BertOutput:
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        attn_mask = attention_mask_for_sdpa(attention_mask)
        x = self.embeddings(input_ids, token_type_ids)                           # x^1: (B, T, H)
        hidden_states = [x]
        snapshot = None
        L = len(self.layers)
        for b, layer in enumerate(self.layers, start=1):
            if b == self.rng_snapshot_layer and self.training:
                snapshot = rng_state(x.device)
            x = layer(x, attn_mask, cls_only=self.cls_only_last_layer and b == L)
            hidden_states.append(x)
        return BertOutput(last_hidden_state=x, pooler_output=self.pooler(x),
                          hidden_states=tuple(hidden_states), attn_mask=attn_mask,
                          rng_snapshot=snapshot)

    def run_layers(self, x_b, attn_mask, b: int, rng_snapshot=None) -> list:
        """f^{b,r}(x_b) for r = b..L: the outputs of layers b..L given x_b, the input of layer b.

        attn_mask is the forward pass's `BertOutput.attn_mask`. With `rng_snapshot` (from the
        same forward pass) the dropout masks are those of the forward pass, and the global RNG is
        left as it was, so a replay never shifts the randomness of later steps. Without it this is
        an ordinary pass through those layers: fresh dropout masks from the global RNG.
        """
        L = len(self.layers)
        if not 1 <= b <= L:
            raise ValueError(f"layer b={b} is outside 1..{L}")
        if rng_snapshot is None:
            return self._run_layers(x_b, attn_mask, b)
        with torch.random.fork_rng(devices=[x_b.device] if x_b.device.type == "cuda" else []):
            cpu_state, cuda_state = rng_snapshot
            torch.set_rng_state(cpu_state)
            if cuda_state is not None:
                torch.cuda.set_rng_state(cuda_state, x_b.device)
            return self._run_layers(x_b, attn_mask, b)

    def _run_layers(self, x, attn_mask, b):
        outputs = []
        for layer in self.layers[b - 1:]:
            x = layer(x, attn_mask)
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
    rng_snapshot: object = None


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
                                pooler_output=out.pooler_output, attn_mask=out.attn_mask,
                                rng_snapshot=out.rng_snapshot)

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
