"""The second pass of a penalty, with the clean pass's dropout masks: one mechanism for LNSR's
shared reading, SMART and R3F.

A penalty that compares a perturbed pass with the clean one (LNSR: f(x^b + eps) against f(x^b);
SMART and R3F: the logits at x^1 + delta against the clean logits) measures the perturbation
alone only if both passes drop the same units. Every dropout mask is drawn from torch's global
random generator (bert/speed.py), so the masks of a pass are fixed by the generator's state when
the pass starts. Hence:

    record:  as the clean training pass reaches `module` (the model, or LNSR's layer b), a
             forward pre-hook keeps the generator's state;
    replay:  a second pass run inside `replay()` starts from that state, so every dropout in it
             draws the mask the clean pass drew at the same place, and the generator is put back
             as it was afterwards, so later steps see the randomness they would have seen anyway.

The invariant, tested through the masks themselves in tests/test_replay.py: at a given seed and
step, a replayed pass draws the clean pass's masks, layer by layer; with no perturbation
(sigma = 0, delta = 0) its outputs equal the clean pass's, and LNSR's R is exactly 0.

Passes a penalty runs for itself (SMART's ascent steps, a pass with fresh masks) go inside
`extra_passes()`, so that they never overwrite the clean pass's record.
"""
import contextlib

import torch


def rng_state(device):
    """Everything the dropout masks of the next few operations depend on."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


@contextlib.contextmanager
def replayed_rng(state, device):
    """Inside: the generators as `rng_state` recorded them. After: as they were before."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        cpu_state, cuda_state = state
        torch.set_rng_state(cpu_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state, device)
        yield


class DropoutReplay:
    """Records the generator's state as the clean training pass enters `module`; `replay()`
    runs a second pass from it. With enabled=False, `replay()` does nothing: the second pass
    draws its own masks (LNSR's independent reading, `--r3f-shared-dropout` off)."""

    def __init__(self, module: torch.nn.Module, enabled: bool = True):
        self.enabled, self.state, self.recording = enabled, None, True
        if enabled:                       # a disabled replay never reads the record
            module.register_forward_pre_hook(self.record)

    def record(self, module, inputs):
        if module.training and self.recording:
            device = next(module.parameters()).device
            self.state = (rng_state(device), device)

    @contextlib.contextmanager
    def extra_passes(self):
        """Forward passes in here are not the step's clean pass: the record stays the clean one."""
        self.recording = False
        try:
            yield
        finally:
            self.recording = True

    @contextlib.contextmanager
    def replay(self):
        """A pass in here draws the recorded clean pass's masks (when enabled)."""
        if not self.enabled or self.state is None:
            yield
            return
        state, device = self.state
        with replayed_rng(state, device):
            yield
