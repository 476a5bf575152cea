"""Mixout (Lee, Cho and Kang, ICLR 2020): dropout that falls back to the pretrained weights.

For a linear layer with weight w (out x in), its value w^0 before fine-tuning, and a mix
probability p, every training forward pass uses

    M ~ Bernoulli(1 - p)  per input column j, shared by all rows (shape (1, in))
    w_mix = ((1 - M) * w^0 + M * w - p * w^0) / (1 - p)
          = w^0 + M * (w - w^0) / (1 - p)

so a column is replaced by its pretrained value with probability p, and E[w_mix] = w. "Per
input column" is what the authors' code draws (github.com/bloodwass/mixout, mixout/mixout.py:
one Bernoulli row `noise[0]`, repeated over the output dimension): it is dropout's "drop
every outgoing weight of an input unit" with w^0 in place of 0. Evaluation uses w itself
(the expectation), so eval mode is deterministic. Biases are not mixed.

As in Lee et al.'s experiments (Section 6) and the authors' Hugging Face example
(example_huggingface.py), mixout replaces dropout: every `nn.Linear` of the encoder, the pooler
and the head becomes a `MixLinear`, and every dropout probability is set to 0, attention-
probability dropout included (`SelfAttention.attn_dropout`, a float, as SDPA takes it). The
new head mixes with its own initial value (Lee et al., Section 6.2: mixout(w_0) for the
randomly initialised output layer). Q, K and V are three linear layers, as in Hugging Face's
BERT that the authors' example patches, so each draws its own column mask.

Default p = 0.9: the value of the authors' own examples (example.py, example_huggingface.py);
their BERT-Large experiments on RTE, MRPC, CoLA and STS-B, the tasks of Hua et al.'s Table 1,
use mixout(w_pre, p) with p in {0.7, 0.8, 0.9}.

Gradient: autograd differentiates w_mix, so a kept column gets dL/dw = dL/dw_mix / (1 - p).
The authors' hand-written backward returns dL/dw_mix * M, without the 1/(1 - p); Adam is
invariant to that constant scale (up to its eps), gradient-norm clipping is not.

The swap keeps the very same Parameter objects, so an optimizer built before or after setup
sees the same parameters, and `save_pretrained` writes the usual names (w^0 is a
non-persistent buffer).
"""
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from bert.errors import InputError
from bert.model import SelfAttention
from regularizers.base import Regularizer


@dataclass
class MixoutOptions:
    p: float = field(default=0.9, metadata={
        "help": "mix probability p: chance that an input column of a weight matrix is reset to "
                "its pretrained value in a training step; in [0, 1)"})

    def __post_init__(self):
        if not 0 <= self.p < 1:
            raise InputError(f"--mixout-p must be in [0, 1), got {self.p}")


class MixLinear(nn.Linear):
    """nn.Linear whose weight, in training, is mixed with a fixed target w^0 (see module doc)."""

    @classmethod
    def from_linear(cls, linear: nn.Linear, p: float, generator: torch.Generator) -> "MixLinear":
        # Built on the meta device (nothing allocated), then given the layer's own Parameters.
        mix = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        mix.weight, mix.bias = linear.weight, linear.bias
        mix.register_buffer("target", linear.weight.detach().clone(), persistent=False)   # w^0
        mix.p, mix.generator = p, generator
        return mix

    def mixed_weight(self):
        keep = torch.full((1, self.in_features), 1 - self.p, device=self.weight.device)
        M = torch.bernoulli(keep, generator=self.generator).to(self.weight.dtype)   # (1, in)
        return self.target + M * (self.weight - self.target) / (1 - self.p)          # (out, in)

    def forward(self, x):
        if not self.training or self.p == 0:
            return F.linear(x, self.weight, self.bias)
        return F.linear(x, self.mixed_weight(), self.bias)

    def extra_repr(self):
        return f"{super().extra_repr()}, mixout={self.p}"


def apply_mixout(model: nn.Module, p: float, generator: torch.Generator) -> int:
    """Swap every nn.Linear for a MixLinear and set every dropout to 0; returns the swap count."""
    swapped = 0
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, child_name, MixLinear.from_linear(child, p, generator))
                swapped += 1
            elif isinstance(child, nn.Dropout):
                child.p = 0.0
        if isinstance(parent, SelfAttention):
            parent.attn_dropout = 0.0
    return swapped


class Mixout(Regularizer):
    name = "mixout"
    Options = MixoutOptions

    def setup(self, model, seed):
        device = next(model.parameters()).device
        self.generator = torch.Generator(device=device)           # shared by every MixLinear
        self.generator.manual_seed(seed)
        apply_mixout(model, self.options.p, self.generator)
