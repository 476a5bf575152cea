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

The class below writes this update out line by line. By default it runs the same math in
torch's fused Adam kernel (`fused_adam_step`: one pass over memory instead of about twenty; the
step of a 22M-parameter model is memory-bound); tests/test_optim.py checks both against a float64
hand computation and against each other.

Schedule: linear warm-up from 0 over the first 10% of the steps, then linear decay to 0,
as `transformers.get_linear_schedule_with_warmup`.
"""
from collections import defaultdict

import torch


class AdamNoBiasCorrection:
    """The update of the module docstring, written out line by line in `step`. With `fused=True`
    (the default) `step` hands the same math to torch's fused Adam kernel instead, a speed seam
    (`fused_adam_step`, below the class); tests/test_optim.py holds the two equal.

    It keeps torch.optim's interface (param_groups, state, step, zero_grad) without subclassing
    torch.optim.Optimizer: the base class imports torch._dynamo on its first call, about 1.2 s
    of every training process on a 2-core CPU, for a compiler this loop never uses.
    """

    def __init__(self, params, lr=2e-5, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, fused=True):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        groups = list(params)
        if not groups:
            raise ValueError("the optimizer got an empty parameter list")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        self.param_groups = [{**defaults, **group, "params": list(group["params"])} for group in groups]
        self.state = defaultdict(dict)   # parameter -> {"m", "v"}
        self.fused = fused
        self._steps = {}            # device -> the constant t of NO_BIAS_CORRECTION_STEP

    def zero_grad(self, set_to_none=True):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.detach_().zero_()

    def state_dict(self) -> dict:
        """m and v of every parameter by its position in the groups, and the groups' settings."""
        params = [p for group in self.param_groups for p in group["params"]]
        return {"state": {i: {k: self.state[p][k] for k in ("m", "v")} for i, p in enumerate(params)
                          if self.state[p]},
                "param_groups": [{k: v for k, v in group.items() if k != "params"} for group in self.param_groups]}

    def load_state_dict(self, state: dict):
        groups = state["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"{len(groups)} parameter groups saved, {len(self.param_groups)} here")
        for group, saved in zip(self.param_groups, groups):
            group.update(saved)
        params = [p for group in self.param_groups for p in group["params"]]
        self.state.clear()
        for i, moments in state["state"].items():
            p = params[int(i)]
            for k in ("m", "v"):
                if moments[k].shape != p.shape:
                    raise ValueError(f"moment {k} of parameter {i} has shape {tuple(moments[k].shape)}, "
                                     f"the parameter {tuple(p.shape)}")
                self.state[p][k] = moments[k].to(device=p.device, dtype=p.dtype, copy=True)
            if not self.fused:
                self.state[p]["denom"] = torch.empty_like(p)

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            for p in params:
                if not self.state[p]:
                    self.state[p]["m"] = torch.zeros_like(p)
                    self.state[p]["v"] = torch.zeros_like(p)
                    if not self.fused:
                        self.state[p]["denom"] = torch.empty_like(p)   # reused: no fresh buffer per step
            m = [self.state[p]["m"] for p in params]
            v = [self.state[p]["v"] for p in params]
            beta1, beta2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            if not self.fused:
                # The docstring's update. Each _foreach_ op applies its line to every parameter
                # of the group at once (one kernel launch per line instead of one per parameter).
                denom = [self.state[p]["denom"] for p in params]
                torch._foreach_lerp_(m, grads, 1 - beta1)               # m <- beta1 m + (1-beta1) g
                torch._foreach_mul_(v, beta2)                           # v <- beta2 v + (1-beta2) g^2
                torch._foreach_addcmul_(v, grads, grads, value=1 - beta2)
                torch._foreach_copy_(denom, v)
                torch._foreach_sqrt_(denom)                             # sqrt(v) + eps
                torch._foreach_add_(denom, eps)
                torch._foreach_addcdiv_(params, m, denom, value=-lr)    # w <- w - lr m / (sqrt(v) + eps)
            else:
                fused_adam_step(params, grads, m, v, lr, beta1, beta2, eps, self._step_count(params[0].device))
            if wd:
                torch._foreach_mul_(params, 1 - lr * wd)                # decoupled, after the update

    def _step_count(self, device):
        if device not in self._steps:
            self._steps[device] = torch.tensor(NO_BIAS_CORRECTION_STEP, device=device)
        return self._steps[device]


# ----------------------------------------------------------------------------- the fused seam

# Adam's bias correction divides by 1 - beta^t. At t = 2^40, beta1^t and beta2^t underflow to
# exactly 0 (0.999^(2^40) < 1e-400000), so both divisors are exactly 1: a kernel that applies
# the correction computes the uncorrected update when told that t is this large.
NO_BIAS_CORRECTION_STEP = 2.0 ** 40


def fused_adam_step(params, grads, m, v, lr, beta1, beta2, eps, step_count):
    """`AdamNoBiasCorrection.step`'s update, in one pass over memory per parameter.

    Why: the step is memory-bound; the eight _foreach_ lines read and write every
    parameter-sized tensor about twenty times, torch's fused Adam kernel seven. The kernel's bias
    correction is switched off by telling it t = NO_BIAS_CORRECTION_STEP (`step_count`), and its
    weight decay (which it would add to the gradient) is 0: the decoupled decay is applied
    afterwards in `step`, as on the plain path.
    """
    torch._fused_adam_(params, grads, m, v, [], [step_count] * len(params),
                       lr=lr, beta1=beta1, beta2=beta2, weight_decay=0.0, eps=eps,
                       amsgrad=False, maximize=False)


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


class LinearWarmupDecay:
    """lr at step t = base lr * factor(t): t / warmup during the warm-up, then
    (total - t) / (total - warmup) down to 0. Set on every parameter group at construction
    (t = 0) and after each `step()`, as torch's LambdaLR does (without its import of
    torch._dynamo, see AdamNoBiasCorrection)."""

    def __init__(self, optimizer, total_steps, warmup_fraction=0.1):
        self.optimizer = optimizer
        self.total_steps = total_steps
        self.warmup = int(warmup_fraction * total_steps)
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.t = 0
        self._set_lrs()

    def factor(self, step):
        if step < self.warmup:
            return step / max(1, self.warmup)
        return max(0.0, (self.total_steps - step) / max(1, self.total_steps - self.warmup))

    def _set_lrs(self):
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base_lr * self.factor(self.t)

    def step(self):
        self.t += 1
        self._set_lrs()

    def state_dict(self) -> dict:
        return {"t": self.t}

    def load_state_dict(self, state: dict):
        self.t = int(state["t"])
        self._set_lrs()

    def get_last_lr(self):
        return [group["lr"] for group in self.optimizer.param_groups]
