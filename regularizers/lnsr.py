"""LNSR: Layer-wise Noise Stability Regularization (Hua et al., Section 3.1, Algorithm 1).

With x^b the input of layer b (b = 1: the embedding output) and f^{b,r} the layers b..r,

    eps ~ N(0, sigma^2)  element-wise, same shape as x^b                     (Alg. 1, line 6)
    R = sum_{r=b..L} lambda_r * || f^{b,r}(x^b + eps) - f^{b,r}(x^b) ||^2     (Eq. 2, line 10)

per example, averaged over the batch together with the task loss, and added to it (line 13).
Read literally, line 13 adds the whole batch's sum R-hat to every example's term, |B| times our
mean. We read R inside the batch average, as the loss is; under the literal reading the
paper's lambda_r = 1 would be our lambda_r = |B|: a constant factor that the strength absorbs.
The paper uses lambda_r = 1 for every r (Section 5.4) and injects noise "at the first layer"
(Section 4.4), which we read as b = 1: noise on the embedding output, the input of layer 1.

Dropout in the noisy pass: two readings. The model is in training mode, so f^{b,r} carries
dropout masks m. The paper's Eq. 3 treats f as deterministic and never says which masks the
noisy pass uses; there are two ways to read Algorithm 1's "forward pass given x and x~":

    shared       R = sum_r lambda_r || f^{b,r}(x^b + eps; m) - f^{b,r}(x^b; m)  ||^2
    independent  R = sum_r lambda_r || f^{b,r}(x^b + eps; m') - f^{b,r}(x^b; m) ||^2,  m' drawn anew

`--lnsr-dropout shared` (the noisy pass replays the clean pass's masks m: a hook records the
RNG state as the clean pass enters layer b, and the noisy pass starts from it, in
regularizers/replay.py) measures the injected noise and nothing else: with sigma = 0, R is exactly 0, in training mode too. `independent` is what
running a Hugging Face model twice in training mode does: R then also measures, and mostly
measures, the disagreement between two dropout draws (on MiniLM with sigma = 0, about 3434
under "sum" and 0.32 under "mean"), a consistency regulariser under dropout.

Two estimators of R (`--lnsr-estimator`), the same eps, masks m, lambda_r, reduction and padding
mask in both. With J^{b,r}(x^b) = d f^{b,r} / d x^b, the Jacobian of layers b..r at x^b:

    difference   R = sum_{r=b..L} lambda_r || f^{b,r}(x^b + eps) - f^{b,r}(x^b) ||^2    (Eq. 2, as written)
    jvp          R = sum_{r=b..L} lambda_r || J^{b,r}(x^b) eps ||^2                     (its first-order term)

Section 3.2 expands the difference by Taylor (Eq. 5), f(x + eps) - f(x) = J eps + 1/2 eps^T H eps
+ O(eps^3), so that

    || f(x + eps) - f(x) ||^2 = || J eps ||^2 + (J eps) . (eps^T H eps) + O(sigma^4),
    E_eps || J eps ||^2 = sigma^2 || J ||_F^2                                           (Eq. 7)

and R is sigma^2 ||J||_F^2 plus a Hessian term (Eq. 10): a Tikhonov regularizer on the Jacobian of
layers b..L. The two estimators agree when f is one deterministic function of x^b (shared masks,
or eval mode) and sigma is small: for one draw of eps they differ by the cross term, a relative
O(sigma) (on MiniLM at sigma 1e-4, about 4e-5 in float64), and in expectation over eps by a
relative O(sigma^2), as the cross term's mean is 0. With independent masks the difference is
not a derivative of anything, so `jvp` needs `--lnsr-dropout shared`. tests/test_lnsr_jvp.py checks
Eq. 5 (the ratio of the two tends to 1, its gap shrinking linearly in sigma), Eq. 7 (against
the full Jacobian) and the gradient of `jvp` (against finite differences).

They differ in arithmetic. The difference subtracts two nearly equal passes: at sigma 1e-4 on
the embedding output (about 2e-4 of a value) bf16 (2^-8) and TF32 (2^-11) round the noise away,
so it needs full fp32 (numerics.numeric_recipe). `jvp` computes J eps directly, by forward-mode
differentiation through layers b..L (torch.func.jvp: one pass that carries, next to every
activation, its derivative in the direction eps), so its rounding error is relative to J eps
itself: on MiniLM under bf16 autocast it stays within 0.5% of its fp32 value, where the
difference comes out 600-1200 times too large. The backward pass reaches the weights of layers
b..L through the jvp, and those below through x^b. Its price is arithmetic: the jvp pass
computes each activation and its tangent, and the backward pass goes through both; on the
benchmark's batch 1.53 times the difference's matrix products, 2.16 times its step time in fp32
on a CPU (docs/SPEED.md, "LNSR's two estimators").
Forward mode follows the same layers once with the same masks; the double-backward identity
would build a vector-Jacobian graph and differentiate it again. torch.func.jvp rather than
torch.autograd.forward_ad's dual tensors: under the latter, torch's forward-mode rule for softmax
cannot be differentiated again (torch 2.13). Layers b..L compute attention and LayerNorm as plain
tensor operations, in the clean pass too (bert/speed.py::write_out): SDPA's fused kernels have no
forward-mode rule, the written-out attention cannot reproduce a fused kernel's dropout masks (so
the clean pass is written out as well), and differentiating
the fused LayerNorm's forward-mode rule gives wrong gradients (pytorch/pytorch#196700).

How the code maps to it:
- difference: f^{b,r}(x^b) for r = b..L are the clean forward pass's hidden states, reused: only
  the noisy branch f^{b,r}(x^b + eps) runs layers b..L a second time. Gradients flow through
  both branches; the formula has no stop-gradient.
- jvp: one pass of layers b..L at x^b (`jacobian_vector_products`) gives J^{b,r}(x^b) eps for
  every r; gradients flow through J and through x^b.
- Padding positions are masked out of the norm.
- `reduction="sum"` is the squared L2 norm over all real tokens and hidden units, as written in
  Eq. 2; `"mean"` divides it by (real tokens x H), which makes a sigma carry over between models
  of different width and between short and long inputs.
- sigma is absolute, or with `relative_sigma` a fraction of each token's hidden-state scale:
  sigma_t = relative_sigma * ||x^b_t|| / sqrt(H), so that ||eps_t|| ~ relative_sigma * ||x^b_t||
  (the 5%-of-the-norm noise of the paper's Figure 1 is relative_sigma = 0.05).

Which flags give which reading (docs/LNSR_READINGS.md compares them, paired by seed):
- literal (the default): shared masks, "sum", sigma = 0.0001;
- two-pass: --lnsr-dropout independent --lnsr-reduction mean (sigma 0.0001);
- Figure-1 noise: --lnsr-reduction mean --lnsr-relative-sigma 0.05 (shared masks).
Result on MiniLM-L6, 5 paired seeds per task and arm (docs/RESULTS.md, "Which reading"): no
reading behaves like the paper, so the literal reading stays the default, as the protocol fixed
before the runs: it is Eq. 2 as written, and it too scores like ft (Table 1). Two-pass
over-regularizes: its penalty starts at a quarter to a third of the task loss, it collapses on
CoLA (MCC 0 on 5 of 5 seeds), and it scores 5.27 (RTE) and 6.62 (MRPC) points below ft, with
intervals wholly below 0. Figure-1 noise scores like ft: its paired differences are -1.73 (RTE),
+0.27 (MRPC), -0.54 (CoLA) and -0.27 (STS-B), every interval across 0.
The paper gives no numeric sigma. The default, 0.0001 with `reduction="sum"`, is the best of
three pre-registered sweeps on MiniLM-L6 (docs/SIGMA_SWEEP.md: 0.00001 to 0.01), though by seed
noise only: no sigma measurably beat plain fine-tuning there, and 0.001 and above hurt. Under
"sum" the penalty grows with the number of tokens, the width H and the number of layers, so for
BERT-Large it is not a tuned value. Choose it on held-out training data (`train.py --holdout`)
by the penalty's size against the task loss at the start, logged from the first step and drawn
by `evaluate.py dose`, and measured before any run by `evaluate.py penalty-size --vary
lnsr-sigma ...` (penalty_size.py): on MiniLM-L6 at a recipe tuned for it (AdamW, lr 5e-5,
6 epochs), no strength of either reading beat ft on average over held-out RTE and CoLA, and
from a few percent of the loss on both readings cost 9 to 22 points on a task or stopped learning
(docs/RESULTS.md, "Tuned fairly", stage 2). On dev (stage 3, four tasks, five paired seeds)
neither reading at its selected strength behaved like the paper, so the protocol recommends
neither. Paired differences against ft: shared masks at sigma 1e-4, +1.59 (CoLA), +0.28 (MRPC),
-0.87 (RTE) and -0.06 (STS-B), every 95% interval across 0; independent masks at lambda 0.01
under "mean", +1.22 (CoLA, interval [0.05, 2.38]), -0.14 (MRPC), -0.87 (RTE) and +0.01
(STS-B). LNSR at sigma 0 (its penalty exactly 0) leads ft on CoLA by about as much, +1.44,
and against ft with its dropout masks drawn anew the readings' CoLA leads are +0.29 and -0.08:
ft's five CoLA runs score lower than five other draws of its masks. On MiniLM-L6 LNSR adds
nothing established; the default stays Eq. 2 as written.
Run the difference estimator in fp32: bf16 and TF32 round noise of sigma 1e-4 away
(numerics.numeric_recipe); the jvp estimator may run in bf16.
"""
import math
from dataclasses import dataclass, field

import torch

from bert.errors import InputError
from bert.speed import write_out
from regularizers.base import Regularizer
from regularizers.replay import DropoutReplay


@dataclass
class LNSROptions:
    layer: int = field(default=1, metadata={
        "help": "b, the layer whose input receives the noise (1 = the embedding output; 1..L)"})
    sigma: float = field(default=0.0001, metadata={
        "help": "standard deviation of the Gaussian noise eps (absolute)"})
    relative_sigma: float | None = field(default=None, metadata={
        "help": "if set, noise std per token = this * ||x_b|| / sqrt(H) (overrides --lnsr-sigma)"})
    weights: str = field(default="1", metadata={
        "help": "lambda_r for r = b..L: one number for all layers, or L-b+1 comma-separated numbers"})
    reduction: str = field(default="sum", metadata={
        "help": "'sum': squared L2 norm over tokens and hidden units, as in Eq. 2; "
                "'mean': the same divided by (tokens x H)"})
    dropout: str = field(default="shared", metadata={
        "help": "dropout masks of the noisy pass: 'shared' replays the clean pass's (R measures the "
                "noise alone; sigma 0 gives R = 0); 'independent' draws its own, as running the model "
                "twice in training mode does (R also measures two dropout draws' disagreement)"})
    estimator: str = field(default="difference", metadata={
        "help": "'difference': Eq. 2 as written, the noisy pass minus the clean one (needs fp32: bf16 "
                "and TF32 round sigma's noise away); 'jvp': its first-order term ||J eps||^2 as a "
                "Jacobian-vector product, equal to 'difference' up to the Hessian's contribution "
                "(Section 3.2; for one draw of eps, of relative order sigma), and exact enough in bf16 "
                "(needs --lnsr-dropout shared)"})

    def __post_init__(self):
        if self.sigma < 0:
            raise InputError(f"--lnsr-sigma must be >= 0, got {self.sigma}")
        if self.relative_sigma is not None and self.relative_sigma < 0:
            raise InputError(f"--lnsr-relative-sigma must be >= 0, got {self.relative_sigma}")
        if self.layer < 1:
            raise InputError(f"--lnsr-layer must be >= 1, got {self.layer}")
        if self.reduction not in ("sum", "mean"):
            raise InputError(f"--lnsr-reduction must be 'sum' or 'mean', got {self.reduction!r}")
        if self.dropout not in ("shared", "independent"):
            raise InputError(f"--lnsr-dropout must be 'shared' or 'independent', got {self.dropout!r}")
        if self.estimator not in ("difference", "jvp"):
            raise InputError(f"--lnsr-estimator must be 'difference' or 'jvp', got {self.estimator!r}")
        if self.estimator == "jvp" and self.dropout == "independent":
            raise InputError("--lnsr-estimator jvp needs --lnsr-dropout shared: with independent masks "
                             "the difference of the two passes is not a derivative")
        try:
            self.lambdas = [float(w) for w in str(self.weights).split(",")]
        except ValueError:
            raise InputError(f"--lnsr-weights: expected numbers separated by commas, got {self.weights!r}") from None
        if not all(math.isfinite(w) for w in self.lambdas):     # float() reads 'nan' and 'inf'
            raise InputError(f"--lnsr-weights must be finite numbers, got {self.weights}")
        if any(w < 0 for w in self.lambdas):
            raise InputError(f"--lnsr-weights must be >= 0, got {self.weights}")


def sample_noise(x_b, sigma, relative_sigma, generator):
    """eps ~ N(0, sigma^2) element-wise, or scaled per token by the hidden state's norm."""
    eps = torch.randn(x_b.shape, generator=generator, device=x_b.device, dtype=x_b.dtype)
    if relative_sigma is None:
        return eps * sigma
    H = x_b.shape[-1]
    token_scale = x_b.detach().norm(dim=-1, keepdim=True) / H ** 0.5           # (B, T, 1)
    return eps * (relative_sigma * token_scale)


def jacobian_vector_products(bert, x_b, eps, attn_mask, b):
    """J^{b,r}(x^b) eps for r = b..L, by forward-mode differentiation through layers b..L.

    The function differentiated is `run_layers` from b; the caller runs this inside the replay
    of the clean pass's dropout masks. Its outputs at x^b (the first value jvp returns) are the
    clean hidden states again and are not used.
    """
    def layers_b_to_L(x):                                                     # f^{b,r}, r = b..L
        return tuple(bert.run_layers(x, attn_mask, b))
    _, J_eps = torch.func.jvp(layers_b_to_L, (x_b,), (eps,))
    return J_eps


def squared_norm(delta, token_mask, reduction):
    """|| delta ||^2 per example over real tokens and hidden units: (B, T, H) -> (B,)."""
    squared = delta.pow(2) * token_mask                                       # (B, T, H)
    per_example = squared.sum(dim=(1, 2))                                     # (B,)
    if reduction == "mean":
        per_example = per_example / (token_mask.sum(dim=(1, 2)) * delta.shape[-1])
    return per_example


class LNSR(Regularizer):
    name = "lnsr"
    Options = LNSROptions
    reads_hidden_states = True             # every layer b..L, at every position

    @property
    def needs_fp32(self):
        # A difference of two nearly equal passes drowns in bf16's and TF32's rounding; J eps,
        # computed directly, rounds relative to itself.
        return self.options.estimator == "difference"

    def check(self, config):
        o, L = self.options, config.num_hidden_layers
        if not 1 <= o.layer <= L:
            raise InputError(f"--lnsr-layer {o.layer} is outside 1..{L} for this {L}-layer model")
        n = L - o.layer + 1
        if len(o.lambdas) not in (1, n):
            raise InputError(f"--lnsr-weights has {len(o.lambdas)} values; layers {o.layer}..{L} "
                             f"need 1 or {n}")

    def setup(self, model, seed):
        o = self.options
        self.check(model.config)
        n = model.config.num_hidden_layers - o.layer + 1
        self.lambdas = o.lambdas * n if len(o.lambdas) == 1 else o.lambdas      # lambda_r, r = b..L
        # Shared masks: the clean pass's state of the RNG as it enters layer b, for the second
        # pass through layers b..L (regularizers/replay.py).
        self.replay = DropoutReplay(model.bert.layers[o.layer - 1], enabled=o.dropout == "shared")
        # jvp: layers b..L compute attention and LayerNorm as plain tensor operations, which
        # forward mode differentiates correctly, in the clean pass too (bert/speed.py::write_out).
        if o.estimator == "jvp":
            for layer in model.bert.layers[o.layer - 1:]:
                write_out(layer)
        device = next(model.parameters()).device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def penalty(self, model, batch, outputs):
        o, b = self.options, self.options.layer
        x_b = outputs.hidden_states[b - 1]                                      # (B, T, H)
        eps = sample_noise(x_b, o.sigma, o.relative_sigma, self.generator)       # line 6
        with self.replay.extra_passes(), self.replay.replay():                  # masks m, or m' anew
            if o.estimator == "difference":
                noisy = model.bert.run_layers(x_b + eps, outputs.attn_mask, b)    # lines 7-8: f^{b,r}(x~)
                clean = outputs.hidden_states[b:]                                 # f^{b,r}(x^b)
                deltas = [noisy_r - clean_r for noisy_r, clean_r in zip(noisy, clean)]
            else:                                                                 # J^{b,r}(x^b) eps
                deltas = jacobian_vector_products(model.bert, x_b, eps, outputs.attn_mask, b)
        token_mask = batch["attention_mask"][:, :, None].to(x_b.dtype)            # (B, T, 1)
        R = 0.0                                                                   # line 4: R-hat <- 0
        for lambda_r, delta_r in zip(self.lambdas, deltas):                       # lines 9-11
            R = R + lambda_r * squared_norm(delta_r, token_mask, o.reduction)     # (B,)
        return R.mean()                         # line 13's batch average (a reading: see the top)
