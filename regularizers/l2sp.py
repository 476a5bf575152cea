"""L2-SP: L2 penalty towards the starting point (Li, Grandvalet and Davoine, ICML 2018).

With w_S the parameters that came from the pretrained checkpoint, w_S^0 their values before
fine-tuning, and w_new the parameters the checkpoint did not have (the classifier head),

    Omega(w) = alpha/2 * || w_S - w_S^0 ||^2  +  beta/2 * || w_new ||^2

is added to the task loss, so its gradient is alpha * (w - w^0) on w_S and beta * w on w_new.
Hua et al. use it as a baseline (Section 4.2, Table 1; their text drops the squares, Li et al.'s
definition and code have them). Defaults alpha = beta = 0.01 are those of the method authors'
public code (github.com/holyseven/TransferLearningClassification, run_exp.py:
--weight_decay_rate 0.01 for existing layers, --weight_decay_rate2 0.01 for new layers).

Which parameters: every parameter that came from the checkpoint, biases and LayerNorm included
(the `weight_decay_mode 101` variant of the authors' code; its default mode 1 penalises only
weight kernels). The head is always new: train.py re-initialises it. When the model carries
bert/weights.py's `load_report`, what it lists as missing (a pooler the checkpoint lacked, then
initialised afresh) is new too.

Decoupled weight decay. train.py's optimizer also applies decoupled weight decay (default 0.01,
the training recipe every method shares) to weight matrices: w <- w - lr * wd * w after each
Adam step. That pulls towards 0 while L2-SP pulls towards w^0. The default keeps both, so L2-SP
runs under the same recipe as the other rows of Table 1; the decay is weak in this setting (the
learning rate summed over a 3-epoch RTE run is ~2e-3, times wd = 0.01 shrinks each weight by
~2e-5 of its value). In Li et al. L2-SP *replaces* plain L2 decay: for that, pass
`--weight-decay 0`. Note also that Omega enters through the gradient, so Adam rescales it per
parameter like any other loss term (Loshchilov and Hutter, 2019, on L2 versus decoupled decay).
"""
from dataclasses import dataclass, field

import torch

from bert.errors import InputError
from regularizers.base import Regularizer


@dataclass
class L2SPOptions:
    alpha: float = field(default=0.01, metadata={
        "help": "alpha: weight of ||w - w0||^2 / 2 over the parameters that came from the checkpoint"})
    beta: float = field(default=0.01, metadata={
        "help": "beta: weight of ||w||^2 / 2 over the new parameters (the classifier head)"})

    def __post_init__(self):
        for name in ("alpha", "beta"):
            if getattr(self, name) < 0:
                raise InputError(f"--l2sp-{name} must be >= 0, got {getattr(self, name)}")


def is_new(name: str, missing: set) -> bool:
    """The head, and anything the checkpoint did not provide, started from a fresh init."""
    return name.startswith("classifier.") or name in missing


class SquaredDistance(torch.autograd.Function):
    """sum_i ||w_i - c_i||^2 over lists of tensors, and its gradient 2 (w_i - c_i).

    The same as `sum((w - c).pow(2).sum() for w, c in ...)`, but with one _foreach_ kernel per
    line over all ~100 tensors instead of an autograd graph of three ops per tensor: for
    MiniLM's 22.7M parameters that graph cost as much as a tenth of the training step.
    """

    @staticmethod
    def forward(ctx, centers, *ws):
        diffs = torch._foreach_sub(ws, centers)                        # w_i - c_i
        ctx.save_for_backward(*diffs)
        squared_norms = torch._foreach_norm(diffs, 2.0, dtype=torch.float64)   # exact enough to square
        return torch.stack(squared_norms).pow(2).sum().float()

    @staticmethod
    def backward(ctx, grad):
        diffs = ctx.saved_tensors
        return (None, *torch._foreach_mul(diffs, 2 * grad))


def squared_distance(ws, centers):
    if not ws:
        return torch.zeros(())
    return SquaredDistance.apply(centers, *ws)


class L2SP(Regularizer):
    name = "l2sp"
    Options = L2SPOptions

    def setup(self, model, seed):
        report = getattr(model, "load_report", None)
        missing = set(report.missing) if report is not None else set()
        # (w, w^0) pairs; w^0 is a frozen copy taken before the first step.
        self.w_S = [p for n, p in model.named_parameters() if not is_new(n, missing)]
        self.w_S0 = [p.detach().clone() for p in self.w_S]
        self.w_new = [p for n, p in model.named_parameters() if is_new(n, missing)]
        self.zeros = [torch.zeros_like(p) for p in self.w_new]

    def penalty(self, model, batch, outputs):
        o = self.options
        drift = squared_distance(self.w_S, self.w_S0)                  # ||w_S - w_S^0||^2
        size = squared_distance(self.w_new, self.zeros)               # ||w_new||^2
        return o.alpha / 2 * drift + o.beta / 2 * size
