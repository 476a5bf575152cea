"""SMART (Jiang et al., ACL 2020): adversarial smoothness plus a Bregman proximal point term.

Smoothness-inducing adversarial regularization, and a proximal term that keeps the model near a
momentum (moving-average) teacher.

With x = x^1 the embedding output, f(x; theta) the logits, and l_s the symmetric KL divergence
l_s(P, Q) = KL(P||Q) + KL(Q||P) between the two softmax distributions (squared error for
regression), the term added to the task loss is

    R_s = l_s( f(x; theta), f(x + delta; theta) )                 adversarial smoothness
        delta_0 ~ N(0, sigma^2)                                   random start (Alg. 1)
        g_k = grad_delta l_s( f(x), f(x + delta_k) )              K ascent steps
        delta_{k+1} = delta_k + eta * g_k / (||g_k||_inf + eps_n)  inf-norm taken per token
    D   = l_s( f(x; theta), f(x; theta_tilde) )                   Bregman divergence
        theta_tilde <- beta * theta_tilde + (1 - beta) * theta     momentum, after every update

    penalty = lambda_s * R_s + mu * D

averaged over the batch. Defaults, from the public code (github.com/namisan/mt-dnn,
mt_dnn/perturbation.py, `SmartPerturbation`): sigma = 1e-5 (`noise_var`, used as a standard
deviation), eta = 1e-3 (`step_size`; note mt-dnn's train.py flag `--adv_step_size` defaults to
1e-5), eps_n = 1e-6 (`epsilon`), inf-norm (`norm_p`), K = 1 (`k`), lambda_s = 1 (train.py
`--adv_alpha`). The public code has no proximal term; mu = 1 and beta = 0.99 are from the paper
(Section 5, implementation details; it raises beta to 0.999 after the first 10% of the updates,
which a method that does not know the run length cannot do: pass --smart-beta to change it).

Choices, and where they differ from the public code:
- delta perturbs the embedding output x^1 (after the embeddings' LayerNorm and dropout) and the
  perturbed x^1 + delta goes straight into layer 1: position embeddings and LayerNorm are not
  applied a second time (mt-dnn's `inputs_embeds` path re-adds them).
- The ascent step follows the paper's Algorithm 1 with the code's normalisation: the gradient
  of l_s, a normalised step of size eta added to the random start. The paper then projects onto
  an eps-ball; the public code does not, and neither does this file. The public code
  (mt_dnn/perturbation.py at commit 0d6201e) differs in three details: its ascent gradient is
  that of the one-sided KL(f(x) || f(x + delta)); its final perturbation is the normalised step
  alone (eta * g, without the random start); and it zeroes delta at padding positions (no effect
  here: padding is masked out as a key, and its outputs are never read). (The latest mt-dnn
  instead normalises delta + eta * g itself to unit inf-norm per token, a far larger one.)
- The final l_s detaches each KL's target, as mt-dnn's `SymKlCriterion`; the ascent uses the
  full gradient of l_s with respect to delta; D's gradient is the full one (the teacher is a
  constant).
- Dropout. mt-dnn runs the perturbed passes with fresh dropout masks, so R_s also measures the
  disagreement between two dropout draws; at these perturbation sizes that is nearly all of it
  (on MiniLM at the start of RTE fine-tuning R_s is ~1e-4 with fresh masks and ~1e-14 with the
  clean pass's masks). The default does as the public code. `--smart-shared-dropout` makes the
  perturbed passes replay the clean pass's masks, so that R_s measures the perturbation alone
  (then delta = 0 gives exactly 0).
- The teacher is a copy of the model taken at setup, run in the student's mode (training) and
  always with the clean pass's dropout masks, so D measures how far the parameters moved and
  nothing else: it is exactly 0 before the first update. (The public code has no proximal term
  to follow here.) The teacher never receives gradients.
"""
import contextlib
import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from bert.errors import InputError
from regularizers.base import Regularizer
from regularizers.replay import DropoutReplay


@dataclass
class SMARTOptions:
    weight: float = field(default=1.0, metadata={
        "help": "lambda_s: weight of the adversarial smoothness term"})
    noise_std: float = field(default=1e-5, metadata={
        "help": "sigma: standard deviation of the random start delta_0"})
    step_size: float = field(default=1e-3, metadata={
        "help": "eta: size of each normalised ascent step on delta"})
    norm_eps: float = field(default=1e-6, metadata={
        "help": "eps_n in g / (||g||_inf + eps_n), the step's normalisation"})
    steps: int = field(default=1, metadata={
        "help": "K: number of ascent steps"})
    proximal: bool = field(default=True, metadata={
        "help": "add the Bregman proximal point term mu * D(f_theta, f_teacher)"})
    mu: float = field(default=1.0, metadata={
        "help": "mu: weight of the Bregman proximal point term"})
    beta: float = field(default=0.99, metadata={
        "help": "beta: momentum of the teacher, theta_t <- beta * theta_t + (1 - beta) * theta"})
    shared_dropout: bool = field(default=False, metadata={
        "help": "the perturbed passes reuse the clean pass's dropout masks (default: fresh masks, "
                "as the public code)"})

    def __post_init__(self):
        for name in ("weight", "noise_std", "step_size", "norm_eps", "mu"):
            if getattr(self, name) < 0:
                raise InputError(f"--smart-{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.norm_eps == 0:
            raise InputError("--smart-norm-eps must be > 0 (it keeps g / ||g||_inf finite)")
        if self.steps < 1:
            raise InputError(f"--smart-steps must be >= 1, got {self.steps}")
        if not 0 <= self.beta <= 1:
            raise InputError(f"--smart-beta must be in [0, 1], got {self.beta}")


# ----------------------------------------------------------------------------- divergences

def symmetric_kl(a, b, detach_targets: bool):
    """KL(A||B) + KL(B||A) between softmax(a) and softmax(b), (B, C) logits -> mean over the batch.

    detach_targets: each KL's first argument is a constant, so KL(A||B) sends gradient to b
    only and KL(B||A) to a only (mt-dnn's SymKlCriterion); else the full gradient.
    """
    log_a, log_b = F.log_softmax(a.float(), dim=-1), F.log_softmax(b.float(), dim=-1)
    ta, tb = (log_a.detach(), log_b.detach()) if detach_targets else (log_a, log_b)
    kl_ab = (ta.exp() * (ta - log_b)).sum(-1)                                 # (B,)
    kl_ba = (tb.exp() * (tb - log_a)).sum(-1)
    return (kl_ab + kl_ba).mean()


def divergence(a, b, regression: bool, detach_targets: bool = False):
    """l_s: symmetric KL for classification; squared error for a regression score."""
    if regression:
        return (a.float() - b.float()).pow(2).mean()
    return symmetric_kl(a, b, detach_targets)


# ----------------------------------------------------------------------------- second passes

class Perturbation:
    """A forward hook that adds `delta` to a module's output while `added(delta)` is open.

    detach: add it to a constant copy of the output (no gradient through that module in the
    perturbed pass), as fairseq's R3F does with the token embeddings.
    """

    def __init__(self, module, detach: bool = False):
        self.delta, self.detach = None, detach
        self.handle = module.register_forward_hook(self.hook)

    def hook(self, module, inputs, output):
        if self.delta is None:
            return None
        return (output.detach() if self.detach else output) + self.delta

    @contextlib.contextmanager
    def added(self, delta):
        self.delta = delta
        try:
            yield
        finally:
            self.delta = None


def model_inputs(batch):
    return batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]


# ----------------------------------------------------------------------------- the method

class SMART(Regularizer):
    name = "smart"
    needs_fp32 = True
    Options = SMARTOptions

    def setup(self, model, seed):
        o = self.options
        if o.proximal:   # copied before any hook is registered on the model
            self.teacher = copy.deepcopy(model).requires_grad_(False)
            self.teacher_params = list(self.teacher.parameters())
            self.student_params = list(model.parameters())
        device = next(model.parameters()).device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        self.replay = DropoutReplay(model)                                  # for the teacher, at least
        self.perturbation = Perturbation(model.bert.embeddings)           # delta is added to x^1

    def logits_at(self, model, batch, delta):
        """f(x^1 + delta): the whole model again, delta added to the embedding output."""
        masks = self.replay.replay() if self.options.shared_dropout else contextlib.nullcontext()
        with masks, self.perturbation.added(delta):
            return model(*model_inputs(batch)).logits

    def adversarial_delta(self, model, batch, clean_logits):
        """delta_K from the random start by K normalised ascent steps on l_s; a constant."""
        o = self.options
        regression = model.num_labels == 1
        B, T = batch["input_ids"].shape
        shape = (B, T, model.config.hidden_size)
        delta = o.noise_std * torch.randn(shape, generator=self.generator, device=clean_logits.device)
        for _ in range(o.steps):
            delta.requires_grad_()
            loss = divergence(clean_logits.detach(), self.logits_at(model, batch, delta), regression)
            g, = torch.autograd.grad(loss, delta)                                    # (B, T, H)
            g_inf = g.abs().amax(dim=-1, keepdim=True)                               # (B, T, 1)
            delta = (delta + o.step_size * g / (g_inf + o.norm_eps)).detach()
        return delta

    def penalty(self, model, batch, outputs):
        o = self.options
        regression = model.num_labels == 1
        clean = outputs.logits
        total = clean.new_zeros((), dtype=torch.float32)
        with self.replay.extra_passes():
            if o.weight > 0:
                delta = self.adversarial_delta(model, batch, clean)
                adv = self.logits_at(model, batch, delta)
                total = total + o.weight * divergence(clean, adv, regression, detach_targets=True)
            if o.proximal and o.mu > 0:
                self.teacher.train(model.training)
                with torch.no_grad(), self.replay.replay():          # the clean pass's masks
                    teacher = self.teacher(*model_inputs(batch)).logits
                total = total + o.mu * divergence(clean, teacher, regression)
        return total

    @torch.no_grad()
    def after_step(self, model):
        if self.options.proximal:   # theta_tilde <- theta_tilde + (1 - beta) (theta - theta_tilde)
            torch._foreach_lerp_(self.teacher_params, self.student_params, 1 - self.options.beta)
