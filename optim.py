"""The paper's optimizer and learning-rate schedule (Section 4.3), written out.

Adam without bias correction and with decoupled weight decay: the "Hugging Face edition Adam"
(`transformers.AdamW(correct_bias=False)`, the BERTAdam of Devlin et al.) that the paper uses.
For each parameter w with gradient g, at every step:

    m <- beta1 * m + (1 - beta1) * g
    v <- beta2 * v + (1 - beta2) * g^2
    w <- w - lr * m / (sqrt(v) + eps)           no 1/(1 - beta^t) bias correction
    w <- w - lr * weight_decay * w              decoupled decay, not added to g

Without bias correction the first updates are small (m starts at 0), a warm-up of its own;
Mosbach et al. (2020) tie this to fine-tuning instability, which is what the paper studies.

Schedule: linear warm-up from 0 over the first 10% of the steps, then linear decay to 0,
as `transformers.get_linear_schedule_with_warmup`.
"""
import torch


class AdamNoBiasCorrection(torch.optim.Optimizer):
    def __init__(self, params, lr=2e-5, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            for p in params:
                if not self.state[p]:
                    self.state[p]["m"] = torch.zeros_like(p)
                    self.state[p]["v"] = torch.zeros_like(p)
                    self.state[p]["denom"] = torch.empty_like(p)   # reused: no fresh buffer per step
            m = [self.state[p]["m"] for p in params]
            v = [self.state[p]["v"] for p in params]
            denom = [self.state[p]["denom"] for p in params]
            beta1, beta2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            # The _foreach_ ops apply each line to the whole list of tensors at once (one kernel
            # launch per line instead of one per parameter); the math is the docstring's.
            torch._foreach_lerp_(m, grads, 1 - beta1)               # m = beta1 m + (1-beta1) g
            torch._foreach_mul_(v, beta2)
            torch._foreach_addcmul_(v, grads, grads, value=1 - beta2)
            torch._foreach_copy_(denom, v)
            torch._foreach_sqrt_(denom)                             # sqrt(v) + eps
            torch._foreach_add_(denom, eps)
            torch._foreach_addcdiv_(params, m, denom, value=-lr)
            if wd:
                torch._foreach_mul_(params, 1 - lr * wd)


def parameter_groups(model, weight_decay):
    """Decay every weight matrix; not biases and LayerNorm weights (as BERT does)."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            exempt = name == "bias" or isinstance(module, torch.nn.LayerNorm)
            (no_decay if exempt else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model, name="adam", lr=2e-5, weight_decay=0.01):
    groups = parameter_groups(model, weight_decay)
    if name == "adam":
        return AdamNoBiasCorrection(groups, lr=lr, betas=(0.9, 0.999), eps=1e-6)
    if name == "adamw":   # PyTorch's AdamW: with bias correction
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-6, foreach=True)
    raise ValueError(f"unknown optimizer {name!r}")


def linear_warmup_decay(optimizer, total_steps, warmup_fraction=0.1):
    warmup = int(warmup_fraction * total_steps)

    def factor(step):
        if step < warmup:
            return step / max(1, warmup)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
