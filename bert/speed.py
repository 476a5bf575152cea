"""The CPU speed machinery of bert/model.py, behind small seams, and the written-out layers.

model.py is written as BERT's math; where that math would be slow on a CPU, it calls one of the
seams below, which computes the same values another way. None of them changes a result beyond
rounding: forward values are the plain computation's bit for bit, and the gradients that a seam
sums in another order (`row_bucket`, `softmax_dropout`) differ in the last bits. The parity
tests hold model.py equal to Hugging Face's BertModel, and tests/test_fast_paths.py holds each
seam equal to the plain computation.
What each buys is measured in docs/SPEED.md ("What changed", under the names given here):

- `Dropout` / `dropout`: masks from random integers. torch's CPU dropout fills a float tensor
  with `bernoulli_`, element by element; comparing 32-bit random integers with a threshold draws
  the same Bernoulli(1 - p) masks several times faster ("Dropout masks from random integers").
  On a GPU torch's fused dropout runs.
  model.py's `SelfAttention.attend` writes the attention out in training on a CPU so that its
  probabilities go through these masks (elsewhere torch's scaled_dot_product_attention runs; on
  a CPU with dropout SDPA takes the same written-out path, with torch's slower masks).
  `softmax_dropout` there keeps no mask for the backward pass ("The attention's dropout keeps
  no mask").
- `gelu_linear`: the feed-forward block's W_2 GELU(h) keeps h alone for the backward pass and
  computes GELU(h) again there, the same bits ("GELU computed again").
- `LayerNorm`, `write_out`: the layers that LNSR's jvp estimator differentiates in forward mode
  (torch.func.jvp) compute attention and LayerNorm as plain tensor operations, in every pass.
  SDPA's fused kernels have no forward-mode rule, and their dropout masks cannot be replayed
  outside them; torch's fused LayerNorm has one, but differentiating it again (the backward pass
  through a jvp) gives wrong gradients (pytorch/pytorch#196700; tests/test_lnsr.py gradchecks it).
- `token_rows`: the real tokens alone. No real token reads a padding position (attention masks
  padding keys), so on a CPU every projection, the feed-forward block and the LayerNorms run on
  the N real tokens gathered into an (N, H) matrix, and a layer's output is 0 at padding: GLUE
  batches with dynamic padding are up to half padding ("Padding rows are skipped"). N differs
  from batch to batch, and so would the size of every (N, H) and (N, 4H) tensor, which
  fragments the CPU heap until it grows without bound; so the row count is rounded up to one of
  a few sizes with padding positions whose results are dropped ("Row counts in buckets"). A
  layer's output rows go to the next layer as they are, without a gather from the (B, T, H)
  grid that hidden_states holds ("Rows passed from layer to layer"). On a
  GPU the padded rows are computed: finding the real rows (`nonzero`) would make the host wait
  for the device at every pass.

One more shortcut, the [CLS]-only last layer, is in model.py itself (`cls_only_last_layer`,
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


def dropout(x, p: float, training: bool, real_rows: int | None = None):
    """Inverted dropout: zero each element with probability p, scale the rest by 1/(1-p).

    A plain product with the mask, so that autograd's own rules differentiate it, in reverse
    and in forward mode (torch.func.jvp), and backward saves the mask alone.

    real_rows: x holds token rows (`RealTokens.rows`): real tokens in its first real_rows rows,
    then padding positions that fill the row bucket. Masks are drawn for the real rows alone, so
    each real token gets the mask it would get without the bucket, and the random stream moves
    on by as much; the extra rows are zeroed.
    """
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or not 0.0 < p < 1.0:
        return F.dropout(x, p, training=True)
    if real_rows is None or real_rows == x.shape[0]:
        keep, scale = keep_mask(x.shape, p, x.device)
        return x * keep.to(x.dtype).mul_(scale)                   # mask: 0 or 1/(1-p), in x's dtype
    keep, scale = keep_mask((real_rows, *x.shape[1:]), p, x.device)
    mask = x.new_zeros(x.shape)                  # the real rows' masks; the bucket's extra rows: 0
    mask[:real_rows] = keep
    mask[:real_rows].mul_(scale)
    return x * mask


def softmax_dropout(scores, p: float, training: bool):
    """dropout(softmax(scores)) over the last dimension: the attention's dropped probabilities.

    Plainly `dropout(scores.softmax(-1), p, training)`, which keeps three tensors of the
    attention map's size for the backward pass: P (for the softmax's derivative), the mask (for
    dropout's) and dropout(P) (for the product with V). On a CPU in training one autograd
    Function computes the same values (the same masks, the same bits) and keeps P and dropout(P)
    alone, a third less of the step's largest tensors, because the mask m (0 or 1/(1-p) per
    element) enters the backward pass only through m * P = dropout(P). With g the gradient
    that reaches dropout(P):

        g' = g * m                                     dropout's derivative
        dS = P * (g' - rowsum(g' * P))                 the softmax's
           = g * dropout(P) - P * rowsum(g * dropout(P))

    Written out (`write_out`: forward-mode differentiation) the plain composition runs, and in
    bf16 too: there the product g * dropout(P), rounded to bf16 before its row sum, made the
    scores' gradient a little less accurate than torch's softmax backward, which multiplies in
    fp32 (relative error 0.38% against 0.29%, both against a float64 reference). In fp32 the
    two are equally accurate (1.30e-7 and 1.31e-7).
    """
    full_precision = scores.dtype in (torch.float32, torch.float64)
    if not (training and 0.0 < p < 1.0 and scores.device.type == "cpu" and full_precision) or written_out():
        return dropout(scores.softmax(dim=-1), p, training)
    return _SoftmaxDropout.apply(scores, p)


class _SoftmaxDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores, p):
        probs = scores.softmax(dim=-1)                                   # P
        dropped = dropout(probs, p, training=True)                       # dropout(P): no graph here
        ctx.save_for_backward(probs, dropped)
        return dropped

    @staticmethod
    def backward(ctx, grad):
        probs, dropped = ctx.saved_tensors
        grad_times_dropped = grad * dropped                              # g * dropout(P)
        row_sums = grad_times_dropped.sum(dim=-1, keepdim=True)
        return grad_times_dropped.addcmul_(probs, row_sums, value=-1), None


def gelu_linear(hidden, linear: nn.Linear, approximate: str):
    """linear(GELU(hidden)): the feed-forward block's W_2 GELU(W_1 a), given hidden = W_1 a.

    Plainly `linear(F.gelu(hidden))`, which keeps two tensors of the block's (N, 4H) size for the
    backward pass: hidden, for GELU's derivative, and GELU(hidden), for W_2's gradient. On a CPU
    in fp32 training one autograd Function computes the same values and keeps hidden alone; its
    backward pass computes GELU(hidden) again (the same call, the same bits) for

        dW_2 = g^T GELU(hidden)          db_2 = sum of g over the rows
        d hidden = GELU'(hidden) * (g W_2)

    each with the operation autograd's own rules use, so every gradient is the plain
    composition's bit for bit (tests/test_fast_paths.py). The recomputation is one GELU over the
    block's (N, 4H) values per layer and pass, 0-2% of a MiniLM step, which rows passed from
    layer to layer (`RealTokens.rows`) more than pay back on padded batches; the tensor it spares
    is the step's largest after the attention maps ("GELU computed again", docs/SPEED.md).

    The plain composition runs where the Function would not fit: written out (forward-mode
    differentiation: the Function has no forward-mode rule, so torch.func transforms of a
    layer need `write_out`), under autocast or in other precisions, on a GPU, with no gradient
    to keep, and when `linear` is not a plain nn.Linear or has hooks, forward or backward, of
    its own or global (Mixout replaces it; an analysis may watch it).
    """
    module_hooks = nn.modules.module
    plain = (written_out() or not torch.is_grad_enabled() or hidden.device.type != "cpu"
             or hidden.dtype != torch.float32 or torch.is_autocast_enabled("cpu")
             or type(linear) is not nn.Linear
             or linear._forward_hooks or linear._forward_pre_hooks
             or linear._backward_hooks or linear._backward_pre_hooks
             or module_hooks._global_forward_hooks or module_hooks._global_forward_pre_hooks
             or module_hooks._global_backward_hooks or module_hooks._global_backward_pre_hooks)
    if plain:
        return linear(F.gelu(hidden, approximate=approximate))
    return _GeluLinear.apply(hidden, linear.weight, linear.bias, approximate)


class _GeluLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, approximate):
        ctx.approximate = approximate
        ctx.save_for_backward(hidden, weight)                           # not GELU(hidden)
        return F.linear(F.gelu(hidden, approximate=approximate), weight, bias)

    @staticmethod
    def backward(ctx, grad):
        hidden, weight = ctx.saved_tensors
        grad_rows = grad.reshape(-1, grad.shape[-1])                     # (N, H): F.linear's own flattening
        grad_hidden = grad_weight = grad_bias = None
        if ctx.needs_input_grad[1]:
            activated = F.gelu(hidden, approximate=ctx.approximate)      # computed again: same bits
            grad_weight = grad_rows.t().mm(activated.reshape(-1, activated.shape[-1]))   # (H, 4H)
            del activated                                                # before grad_activated
        if ctx.needs_input_grad[2]:
            grad_bias = grad_rows.sum(0)                                 # (H,)
        if ctx.needs_input_grad[0]:
            grad_activated = grad_rows.mm(weight).view(hidden.shape)     # (..., 4H)
            grad_hidden = torch.ops.aten.gelu_backward(grad_activated, hidden, approximate=ctx.approximate)
        return grad_hidden, grad_weight, grad_bias, None


class Dropout(nn.Dropout):
    """nn.Dropout with the fast CPU masks above (same `p` attribute, same semantics), and
    `real_rows` for token rows in a bucket (see `dropout`)."""

    def forward(self, x, real_rows=None):
        return dropout(x, self.p, self.training, real_rows)


# ----------------------------------------------------------------------------- written out

# How many modules passed to `write_out` are running their forward pass now (they nest: a layer
# inside a model). A count, not a flag on the model: the choice belongs to the caller, and the
# model's modules keep no state for it.
_written_out_depth = 0


def written_out() -> bool:
    """True while a module passed to `write_out` runs its forward pass: attention
    (bert/model.py::SelfAttention.attend) and LayerNorm then compute as plain tensor operations."""
    return _written_out_depth > 0


def write_out(module: nn.Module):
    """From now on, `module`'s forward passes compute attention and LayerNorm as plain tensor
    operations: forward-mode differentiation (torch.func.jvp) differentiates them correctly, and
    the attention's dropout masks come from the global generator, where a replay can reproduce
    them (SDPA's fused kernels draw their own). Done with forward hooks on `module`, which
    leave the module's attributes and signature alone; returns their handles (`.remove()` undoes).
    """
    def enter(module, args):
        global _written_out_depth
        _written_out_depth += 1

    def leave(module, args, output):                # also when the forward pass raises
        global _written_out_depth
        _written_out_depth -= 1

    return [module.register_forward_pre_hook(enter), module.register_forward_hook(leave, always_call=True)]


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm, or inside a written-out module (`write_out`), the same normalisation as plain
    tensor operations (biased variance, as nn.LayerNorm), whose forward-mode derivative autograd
    can differentiate again."""

    def forward(self, x):
        if not written_out():
            return super().forward(x)
        centered = x - x.mean(dim=-1, keepdim=True)
        variance = centered.pow(2).mean(dim=-1, keepdim=True)
        return centered * torch.rsqrt(variance + self.eps) * self.weight + self.bias


# ----------------------------------------------------------------------------- token rows

# Significant bits kept by row_bucket: a row count is rounded up by less than 1/2^(ROW_BITS-1)
# of itself, and between n and 2n there are at most 2^(ROW_BITS-1) row counts.
ROW_BITS = 5


def row_bucket(n: int) -> int:
    """n rounded up to its ROW_BITS most significant bits: 2125 -> 2176, 1470 -> 1472, 21 -> 21.

    Why: each batch of dynamically padded text has its own number of real tokens N, so each
    step's (N, H) and (N, 4H) tensors have sizes no earlier step had. glibc's heap, which keeps
    freed blocks for reuse (numerics.keep_freed_memory), then finds no hole of the right size:
    larger holes are split, the leftovers are too small for the next (B, h, T, T) attention map,
    and the heap grows at every few steps, for as long as the run goes on. With row counts from
    a short list the blocks freed by one step fit the next one with the same count (docs/SPEED.md,
    "Row counts in buckets" and "Memory on a CPU"). The price: 2-3% more rows on GLUE's batches.

    Every value of the forward pass, every dropout mask and the random stream are bit for bit
    those of the N rows alone (tests/test_fast_paths.py). Gradients that sum over the rows can
    round differently: the weight gradients of the projections (a product over the rows, which
    the BLAS blocks by the row count; relative differences about 1e-7 on MiniLM, one thread)
    and, with several threads, LayerNorm's (torch splits their sums among the threads by rows,
    relative 2e-6). A run is as deterministic as before, but not bit for bit a run of the code
    without buckets: 4-step MiniLM runs differ from step 4 in the last digits of the loss.
    """
    step = 1 << max(0, n.bit_length() - ROW_BITS)
    return -(-n // step) * step


class AllPositions:
    """Rows are the (B, T, H) hidden states themselves: every position, padding included."""
    real_rows = None                     # no extra rows to leave out of dropout

    def __init__(self, attn_mask):       # (B, 1, 1, T) bool, or None: nothing is padded
        self.attn_mask = attn_mask

    def rows(self, x):                   # (B, T, H) -> (B, T, H)
        return x

    def grid(self, rows):                # (B, T, H) -> (B, T, H)
        return rows


class RealTokens:
    """Rows are the N real tokens of a padded batch, gathered into an (R, H) matrix: the real
    tokens first, then R - N padding positions, R = row_bucket(N) (or every position, if the
    batch has fewer). The extra rows are computed like the rest and dropped by `grid`: a layer's
    output stays 0 at padding, and no real token reads them (attention masks padding keys, and
    everything else works row by row), so each real token's values are those of the N rows alone
    (the gradients' sums over rows may round differently, see `row_bucket`).
    """

    def __init__(self, attn_mask):       # (B, 1, 1, T) bool
        self.attn_mask = attn_mask
        self.B, self.T = attn_mask.shape[0], attn_mask.shape[-1]
        real = attn_mask.reshape(self.B * self.T)                                # (B*T,)
        self.real = real.nonzero().squeeze(1)                                    # (N,)
        self.real_rows = N = len(self.real)
        extra = min(row_bucket(N), self.B * self.T) - N
        self.index = torch.cat([self.real, (~real).nonzero().squeeze(1)[:extra]]) if extra else self.real
        self.last_grid = None            # (grid, its version, the rows it was made from): see rows

    def rows(self, x):                   # (B, T, H) -> (R, H)
        # A layer's output grid comes back as the next layer's input: then its rows are the rows
        # `grid` made it from, with no copy here and no scatter in the backward pass. The real
        # rows are the same values; the bucket's extra rows hold the previous layer's results
        # at those padding positions instead of 0, which no real token reads and whose
        # gradients are 0. A hook that replaced the grid (LNSR's noise, SMART's perturbation)
        # or changed it in place (its version moved; not through `.data`, which autograd does
        # not see either) gets its own rows gathered. The price: in autograd's graph the grid
        # is a side output, so a gradient taken with respect to hidden_states[r], 1 <= r < L,
        # holds what its own readers send it, not what reaches it through later layers (take
        # gradients with respect to a tensor added in a hook instead, as SMART does).
        if self.last_grid is not None:
            grid, version, rows = self.last_grid
            if x is grid and x._version == version:
                return rows
        # index_select, not x[index]: the same rows, but a plain row copy instead of advanced
        # indexing's general path, several times faster on a CPU (docs/SPEED.md, "Rows
        # gathered with `index_select`").
        return x.reshape(self.B * self.T, x.shape[-1]).index_select(0, self.index)

    def grid(self, rows):                # (R, H) -> (B, T, H): the real rows in place, 0 at padding
        H = rows.shape[-1]
        grid = (rows.new_zeros(self.B * self.T, H).index_copy_(0, self.real, rows[:self.real_rows])
                .view(self.B, self.T, H))
        if not grid.is_inference():      # inference-mode tensors keep no version counter
            self.last_grid = (grid, grid._version, rows)
        return grid


def token_rows(attn_mask, device):
    """How a padded batch's tokens are laid out for the layers: the padding mask the attention
    reads (`.attn_mask`) and the rows the projections run on, the real tokens alone on a CPU
    with padding, every position elsewhere."""
    if attn_mask is None or device.type != "cpu":
        return AllPositions(attn_mask)
    return RealTokens(attn_mask)
