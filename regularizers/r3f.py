"""R3F (Aghajanyan et al., 2020): SMART's smoothness term with random, not adversarial, noise.

"Better Fine-Tuning by Reducing Representational Collapse" (ICLR 2021). Not in Hua et al.'s
tables; their Section 5.4 discusses it next to SMART.

With e the token embeddings (the word-embedding lookup, before position and segment embeddings
and LayerNorm) and f(e) the logits,

    z ~ U(-eps, eps)  element-wise      (or N(0, eps^2) with --r3f-noise normal)
    penalty = lambda * ( KL(f(e) || f(e + z)) + KL(f(e + z) || f(e)) )   KL between softmaxes

averaged over the batch, with the gradient through both passes. Defaults are those of the
authors' public code (github.com/facebookresearch/fairseq, examples/rxf/rxf_src/
sentence_prediction_r3f.py): --eps 1e-5, --noise-type uniform, --r3f-lambda 1.0 (its README's
RTE example uses 0.7). As there, the noisy pass adds z to a detached copy of e, so the word
embeddings get gradient from the clean pass only.

Regression (STS-B): fairseq's criterion adds nothing for regression targets (R3F is then plain
fine-tuning). Here the penalty is lambda * (f(e) - f(e + z))^2, the squared difference of the two
predicted scores averaged over the batch, the same substitute SMART's code uses; --r3f-weight 0
gives fairseq's behaviour.

Dropout: as in fairseq, the noisy pass draws fresh dropout masks, so the penalty also measures
(and penalises) the disagreement between two dropout draws; at eps = 1e-5 that is nearly all of
it (on MiniLM at the start of RTE fine-tuning: ~1e-4 with fresh masks, ~1e-13 with the clean
pass's masks). `--r3f-shared-dropout` makes the noisy pass replay the clean pass's masks, so the
penalty measures the noise alone, as the equation reads; then eps = 0 gives exactly 0.
"""
from dataclasses import dataclass, field

import torch

from bert.errors import InputError
from regularizers.base import Regularizer
from regularizers.replay import DropoutReplay
from regularizers.smart import Perturbation, divergence, model_inputs


@dataclass
class R3FOptions:
    weight: float = field(default=1.0, metadata={
        "help": "lambda: weight of the symmetric KL between clean and noisy predictions"})
    eps: float = field(default=1e-5, metadata={
        "help": "noise scale: half-width of the uniform noise, or std of the normal noise"})
    noise: str = field(default="uniform", metadata={
        "help": "noise distribution on the token embeddings: 'uniform' or 'normal'"})
    shared_dropout: bool = field(default=False, metadata={
        "help": "the noisy pass reuses the clean pass's dropout masks (default: fresh masks, as fairseq)"})

    def __post_init__(self):
        if self.weight < 0:
            raise InputError(f"--r3f-weight must be >= 0, got {self.weight}")
        if self.eps < 0:
            raise InputError(f"--r3f-eps must be >= 0, got {self.eps}")
        if self.noise not in ("uniform", "normal"):
            raise InputError(f"--r3f-noise must be 'uniform' or 'normal', got {self.noise!r}")


class R3F(Regularizer):
    name = "r3f"
    needs_fp32 = True
    Options = R3FOptions

    def setup(self, model, seed):
        device = next(model.parameters()).device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        self.replay = DropoutReplay(model, enabled=self.options.shared_dropout)
        self.perturbation = Perturbation(model.bert.embeddings.word_embeddings, detach=True)

    def sample_noise(self, shape, device):
        o = self.options
        if o.noise == "uniform":
            u = torch.rand(shape, generator=self.generator, device=device)
            return (2 * u - 1) * o.eps                                              # U(-eps, eps)
        return o.eps * torch.randn(shape, generator=self.generator, device=device)

    def penalty(self, model, batch, outputs):
        if self.options.weight == 0:
            return None
        B, T = batch["input_ids"].shape
        z = self.sample_noise((B, T, model.config.hidden_size), outputs.logits.device)   # (B, T, H)
        with self.replay.extra_passes(), self.replay.replay(), self.perturbation.added(z):
            noisy = model(*model_inputs(batch)).logits
        return self.options.weight * divergence(outputs.logits, noisy, regression=model.num_labels == 1)
