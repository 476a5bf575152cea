"""The CPU speed machinery of bert/model.py, behind small seams, and the written-out layers.

model.py is written as BERT's math; where that math would be slow on a CPU, it calls one of the
seams below, which computes the same values another way. None of them changes a result: the
parity tests hold model.py equal to Hugging Face's BertModel, and tests/test_fast_paths.py holds
each seam equal to the plain computation. What each buys, measured on the project's 2-core CPU
(docs/SPEED.md, "What changed"):

- `Dropout` / `dropout`: masks from random integers. torch's CPU dropout fills a float tensor
  with `bernoulli_`, element by element; comparing 32-bit random integers with a threshold draws
  the same Bernoulli(1 - p) masks several times faster (change 1). On a GPU torch's fused
  dropout runs.
- `attend`: softmax(Q K^T / sqrt(d) + mask) V. In training on a CPU it is written out, so that
  the attention probabilities go through the fast dropout above; everywhere else it is torch's
  scaled_dot_product_attention (on a CPU with dropout, SDPA takes the same written-out path,
  with torch's slower masks).
- `LayerNorm`, `write_out`: the layers that LNSR's jvp estimator differentiates in forward mode
  (torch.func.jvp) compute attention and LayerNorm as plain tensor operations, in every pass.
  SDPA's fused kernels have no forward-mode rule, and their dropout masks cannot be replayed
  outside them; torch's fused LayerNorm has one, but differentiating it again (the backward pass
  through a jvp) gives wrong gradients (pytorch/pytorch#196700; tests/test_lnsr.py gradchecks it).
- `token_rows`: the real tokens alone. No real token reads a padding position (attention masks
  padding keys), so on a CPU every projection, the feed-forward block and the LayerNorms run on
  the N real tokens gathered into an (N, H) matrix, and a layer's output is 0 at padding
  (changes 3, 6 and 10: GLUE batches with dynamic padding are up to half padding). On a GPU the
  padded rows are computed: finding the real rows (`nonzero`) would make the host wait for the
  device at every pass.

The fourth shortcut, the [CLS]-only last layer, is in model.py itself (`cls_only_last_layer`,
one `if` in `Layer.forward`): about 5/6 of one layer's work when only the logits are read.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------- dropout

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


def dropout(x, p: float, training: bool):
    """Inverted dropout: zero each element with probability p, scale the rest by 1/(1-p).

    A plain product with the mask, so that autograd's own rules differentiate it, in reverse
    and in forward mode (torch.func.jvp), and backward saves the mask alone.
    """
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or not 0.0 < p < 1.0:
        return F.dropout(x, p, training=True)
    keep, scale = keep_mask(x.shape, p, x.device)
    return x * keep.to(x.dtype).mul_(scale)                       # mask: 0 or 1/(1-p), in x's dtype


class Dropout(nn.Dropout):
    """nn.Dropout with the fast CPU masks above (same `p` attribute, same semantics)."""

    def forward(self, x):
        return dropout(x, self.p, self.training)


# ----------------------------------------------------------------------------- attention

def attend(q, k, v, attn_mask, p: float, written_out: bool = False):
    """softmax(Q K^T / sqrt(d) + mask) V with dropout p on the probabilities.

    q: (B, h, Tq, d); k, v: (B, h, T, d); attn_mask: (B, 1, 1, T) bool (True = a real token) or
    None. Returns (B, h, Tq, d). Written out as tensor operations in training on a CPU, and
    wherever `written_out` asks for it; torch's scaled_dot_product_attention elsewhere.
    """
    if written_out or (p > 0.0 and q.device.type == "cpu"):
        d = q.shape[-1]
        scores = (q * d ** -0.5) @ k.transpose(-1, -2)                      # (B, h, Tq, T)
        if attn_mask is not None:        # -inf before the softmax: weight 0 on padding
            scores.add_(torch.zeros(attn_mask.shape, dtype=scores.dtype, device=q.device)
                        .masked_fill_(~attn_mask, float("-inf")))           # (B, 1, 1, T)
        return dropout(scores.softmax(dim=-1), p, True) @ v
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)


# ----------------------------------------------------------------------------- written out

class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm, or with `written_out` set, the same normalisation as plain tensor operations
    (biased variance, as nn.LayerNorm), whose forward-mode derivative autograd can differentiate."""
    written_out = False

    def forward(self, x):
        if not self.written_out:
            return super().forward(x)
        centered = x - x.mean(dim=-1, keepdim=True)
        variance = centered.pow(2).mean(dim=-1, keepdim=True)
        return centered * torch.rsqrt(variance + self.eps) * self.weight + self.bias


def write_out(module: nn.Module, on: bool = True):
    """Set `written_out` on every part of `module` that has one: its attention product
    (`attend`) and its LayerNorms."""
    for part in module.modules():
        if hasattr(part, "written_out"):
            part.written_out = on


# ----------------------------------------------------------------------------- token rows

class AllPositions:
    """Rows are the (B, T, H) hidden states themselves: every position, padding included."""

    def rows(self, x):                   # (B, T, H) -> (B, T, H)
        return x

    def grid(self, rows):                # (B, T, H) -> (B, T, H)
        return rows


class RealTokens:
    """Rows are the N real tokens of a padded batch, gathered into an (N, H) matrix."""

    def __init__(self, attn_mask):       # (B, 1, 1, T) bool
        self.B, self.T = attn_mask.shape[0], attn_mask.shape[-1]
        self.index = attn_mask.reshape(self.B * self.T).nonzero().squeeze(1)      # (N,)

    def rows(self, x):                   # (B, T, H) -> (N, H)
        # index_select, not x[index]: the same rows, but a plain row copy instead of advanced
        # indexing's general path, several times faster on a CPU (docs/SPEED.md, change 10).
        return x.reshape(self.B * self.T, x.shape[-1]).index_select(0, self.index)

    def grid(self, rows):                # (N, H) -> (B, T, H), 0 at padding
        H = rows.shape[-1]
        return rows.new_zeros(self.B * self.T, H).index_copy_(0, self.index, rows).view(self.B, self.T, H)


def token_rows(attn_mask, device):
    """The rows a layer's projections run on: the real tokens alone on a CPU with padding,
    every position elsewhere."""
    if attn_mask is None or device.type != "cpu":
        return AllPositions()
    return RealTokens(attn_mask)
