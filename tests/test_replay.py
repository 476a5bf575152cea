"""The one mechanism for second passes with the clean pass's dropout masks
(regularizers/replay.py), checked through the masks themselves: every mask the dropout code
draws is recorded, and the masks of a replayed pass are compared with the clean pass's.

LNSR's shared reading is checked the same way, layer by layer and with R = 0 at sigma 0, in
tests/test_lnsr.py::test_noisy_pass_masks_are_the_clean_pass_masks_only_when_shared.
"""
import pytest
import torch

import tiny
from regularizers.r3f import R3F, R3FOptions
from regularizers.replay import DropoutReplay
from regularizers.smart import SMART, SMARTOptions

L = 3


def masks(drawn) -> list:
    """The masks alone, in the order drawn, from tiny.record_masks's records."""
    return [mask for *_, mask in drawn]


def same_masks(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("b", [1, 2, 3])
def test_a_replayed_pass_from_layer_b_draws_the_clean_masks_and_leaves_the_rng_where_it_was(monkeypatch, b):
    model = tiny.tiny_model(num_layers=L).train()
    replay = DropoutReplay(model.bert.layers[b - 1])
    batch = tiny.tiny_batch()
    drawn = tiny.record_masks(monkeypatch)
    torch.manual_seed(0)
    with torch.no_grad():
        clean = tiny.forward(model, batch)
        clean_masks = masks(drawn)
        rng_after_clean = torch.get_rng_state()
        drawn.clear()
        with replay.extra_passes(), replay.replay():
            again = model.bert.run_layers(clean.hidden_states[b - 1], clean.attn_mask, b)
        assert torch.equal(torch.get_rng_state(), rng_after_clean)     # later steps not shifted
        # Layers b..L draw three masks each (attention, two hidden); the clean pass drew the
        # embedding output's mask first and the classifier's last.
        assert len(drawn) == 3 * (L - b + 1)
        assert same_masks(masks(drawn), clean_masks[1 + 3 * (b - 1):-1])
        for r, (x, x_clean) in enumerate(zip(again, clean.hidden_states[b:]), start=b):
            assert torch.equal(x, x_clean), f"layer {r}"
        drawn.clear()
        fresh = model.bert.run_layers(clean.hidden_states[b - 1], clean.attn_mask, b)   # no replay
        assert not any(torch.equal(x, y) for x, y in zip(masks(drawn), clean_masks[1 + 3 * (b - 1):-1]))
        assert not torch.equal(fresh[0], clean.hidden_states[b])


def test_passes_outside_the_clean_one_do_not_overwrite_its_record(monkeypatch):
    model = tiny.tiny_model(num_layers=L).train()
    replay = DropoutReplay(model)
    batch = tiny.tiny_batch()
    drawn = tiny.record_masks(monkeypatch)
    with torch.no_grad():
        tiny.forward(model, batch)
        clean_masks = masks(drawn)
        with replay.extra_passes():
            tiny.forward(model, batch)                # a pass with fresh masks, not recorded
        drawn.clear()
        with replay.extra_passes(), replay.replay():
            tiny.forward(model, batch)
    assert same_masks(masks(drawn), clean_masks)


def smart_method(shared_dropout):
    return SMART(SMARTOptions(shared_dropout=shared_dropout, steps=1, noise_std=1e-3))


def r3f_method(shared_dropout):
    return R3F(R3FOptions(shared_dropout=shared_dropout, eps=1e-3))


def clean_and_penalty_masks(monkeypatch, make, shared_dropout):
    """The masks of a clean training pass, those of the method's penalty after it, and whether
    the global RNG ended where the clean pass left it."""
    model = tiny.tiny_model(num_layers=L).train()
    method = make(shared_dropout=shared_dropout)
    method.setup(model, seed=3)
    batch = tiny.tiny_batch()
    drawn = tiny.record_masks(monkeypatch)
    torch.manual_seed(0)
    outputs = tiny.forward(model, batch)
    clean_masks = masks(drawn)
    rng_after_clean = torch.get_rng_state()
    drawn.clear()
    method.penalty(model, batch, outputs)
    return clean_masks, masks(drawn), torch.equal(torch.get_rng_state(), rng_after_clean)


@pytest.mark.parametrize("make, passes", [(smart_method, 3), (r3f_method, 1)])
def test_smart_and_r3f_perturbed_passes_draw_the_clean_pass_masks(monkeypatch, make, passes):
    """SMART: one ascent pass, the pass at delta_K and the teacher's; R3F: the noisy pass. Each
    draws, mask for mask, what the clean pass drew, and the global RNG ends where it was."""
    clean_masks, drawn, rng_unmoved = clean_and_penalty_masks(monkeypatch, make, shared_dropout=True)
    assert rng_unmoved
    assert len(drawn) == passes * len(clean_masks) and len(clean_masks) == 3 * L + 2
    for k in range(passes):
        assert same_masks(drawn[k * len(clean_masks):(k + 1) * len(clean_masks)], clean_masks), f"pass {k + 1}"


@pytest.mark.parametrize("make", [smart_method, r3f_method])
def test_without_shared_dropout_the_perturbed_pass_draws_its_own_masks(monkeypatch, make):
    clean_masks, drawn, _ = clean_and_penalty_masks(monkeypatch, make, shared_dropout=False)
    first_pass = drawn[:len(clean_masks)]
    assert not any(torch.equal(x, y) for x, y in zip(first_pass, clean_masks))
