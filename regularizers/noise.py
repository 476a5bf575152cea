"""FT+Noise: fine-tuning on noise-perturbed hidden states, the ablation of Hua et al.'s Table 2.

Section 5.1: "we inject noise directly to the output of a specific layer, and then use the
perturbed representation to conduct propagation and then calculate loss" -- a vector-space data
augmentation with no term that asks the outputs to stay put. With x^b the input of layer b
(b = 1: the embedding output), exactly where LNSR injects its noise,

    eps ~ N(0, sigma^2)  element-wise        (or relative_sigma, as in LNSR)
    loss = task_loss( f^{b,L}(x^b + eps) )   in training; evaluation sees no noise.

So the ablation differs from LNSR in one thing only: the noisy pass carries the task loss
instead of a stability penalty. The noise options and their defaults are LNSR's.

How: `setup` registers a forward hook on the module that produces x^b (the embeddings for
b = 1, layer b-1 otherwise), so the loop's single forward pass *is* the perturbed one and
`penalty` adds nothing. `outputs.hidden_states[b - 1]` then holds x^b + eps. The noise comes
from its own generator, seeded by the run's seed, so dropout masks are the same as under FT:
with sigma = 0 a run is FT exactly (at the same `--precision`: `auto` gives FT bf16 where
the hardware has it, FT+Noise always fp32).
"""
from dataclasses import dataclass, field

import torch

from bert.errors import InputError
from regularizers.base import Regularizer
from regularizers.lnsr import LNSROptions, sample_noise


@dataclass
class NoiseOptions:
    layer: int = field(default=1, metadata={
        "help": "b, the layer whose input receives the noise (1 = the embedding output; 1..L), as --lnsr-layer"})
    sigma: float = field(default=LNSROptions.sigma, metadata={
        "help": "standard deviation of the Gaussian noise eps (absolute), as --lnsr-sigma"})
    relative_sigma: float | None = field(default=None, metadata={
        "help": "if set, noise std per token = this * ||x_b|| / sqrt(H) (overrides --noise-sigma)"})

    def __post_init__(self):
        if self.sigma < 0:
            raise InputError(f"--noise-sigma must be >= 0, got {self.sigma}")
        if self.relative_sigma is not None and self.relative_sigma < 0:
            raise InputError(f"--noise-relative-sigma must be >= 0, got {self.relative_sigma}")
        if self.layer < 1:
            raise InputError(f"--noise-layer must be >= 1, got {self.layer}")


class FTNoise(Regularizer):
    name = "noise"
    needs_fp32 = True
    Options = NoiseOptions

    def check(self, config):
        b, L = self.options.layer, config.num_hidden_layers
        if not 1 <= b <= L:
            raise InputError(f"--noise-layer {b} is outside 1..{L} for this {L}-layer model")

    def setup(self, model, seed):
        self.check(model.config)
        b = self.options.layer
        device = next(model.parameters()).device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        produces_x_b = model.bert.embeddings if b == 1 else model.bert.layers[b - 2]
        self.hook = produces_x_b.register_forward_hook(self.add_noise)

    def add_noise(self, module, inputs, x_b):
        """Forward hook: the returned tensor replaces x^b for the rest of the pass."""
        if not module.training:
            return None
        o = self.options
        return x_b + sample_noise(x_b, o.sigma, o.relative_sigma, self.generator)
