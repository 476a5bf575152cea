"""LNSR (regularizers/lnsr.py) against a naive reference and its defining properties.

The naive reference is Algorithm 1 done the long way: two complete forward passes of the model
from the token ids, one clean and one with eps added to x^b by a forward hook, both started
from the same RNG state so that they draw identical dropout masks. LNSR instead reuses the
clean pass and re-runs layers b..L once; the two must agree.
"""
import pytest
import torch

import tiny
from bert.errors import InputError
from regularizers import lnsr as lnsr_module
from regularizers.lnsr import LNSR, LNSROptions

L = 4
tiny_batch, forward = tiny.tiny_batch, tiny.forward


def tiny_model(seed=0, dropout=0.1):
    return tiny.tiny_model(num_layers=L, seed=seed, dropout=dropout, heads=4)


def lnsr_penalty(model, batch, seed=5, **options):
    method = LNSR(LNSROptions(**options))
    method.setup(model, seed)
    outputs = forward(model, batch)
    return method.penalty(model, batch, outputs), outputs


def naive_penalty(model, batch, b, sigma, seed=5, lambdas=None, reduction="sum", rng_seed=123,
                  relative_sigma=None):
    """Two full forward passes with identical dropout masks; eps added to x^b by a hook. With
    relative_sigma, token t's noise has norm about relative_sigma * ||x^b_t||: its standard
    deviation is relative_sigma * ||x^b_t|| / sqrt(H)."""
    torch.manual_seed(rng_seed)
    clean = forward(model, batch).hidden_states
    x_b = clean[b - 1]
    eps = torch.randn(x_b.shape, generator=torch.Generator().manual_seed(seed), dtype=x_b.dtype)
    if relative_sigma is None:
        eps = eps * sigma
    else:
        H = x_b.shape[-1]
        for i in range(x_b.shape[0]):
            for t in range(x_b.shape[1]):
                eps[i, t] *= relative_sigma * torch.linalg.vector_norm(x_b[i, t].detach()) / H ** 0.5
    # x^b is the output of the embeddings (b = 1) or of layer b-1.
    module = model.bert.embeddings if b == 1 else model.bert.layers[b - 2]
    hook = module.register_forward_hook(lambda mod, inp, out: out + eps)
    torch.manual_seed(rng_seed)
    noisy = forward(model, batch).hidden_states
    hook.remove()
    mask = batch["attention_mask"][:, :, None].to(x_b.dtype)
    lambdas = lambdas or [1.0] * (L - b + 1)
    R = torch.zeros(x_b.shape[0], dtype=x_b.dtype)
    for lam, r in zip(lambdas, range(b, L + 1)):
        per_example = ((noisy[r] - clean[r]) ** 2 * mask).sum(dim=(1, 2))
        if reduction == "mean":
            per_example = per_example / (mask.sum(dim=(1, 2)) * x_b.shape[-1])
        R = R + lam * per_example
    return R.mean()


def test_dropout_is_really_on_in_these_tests():
    model = tiny_model().train()
    batch = tiny_batch()
    a, b = forward(model, batch).hidden_states[-1], forward(model, batch).hidden_states[-1]
    assert not torch.equal(a, b)


def test_sigma_zero_gives_exactly_zero_in_training_mode():
    model = tiny_model().train()
    for b in range(1, L + 1):
        R, _ = lnsr_penalty(model, tiny_batch(), layer=b, sigma=0.0)
        assert R.item() == 0.0


@pytest.mark.parametrize("b", range(1, L + 1))
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_equals_two_full_forward_passes_with_identical_dropout(b, reduction):
    model = tiny_model().train()
    batch = tiny_batch()
    torch.manual_seed(123)                   # the RNG state the reference starts both passes from
    R, _ = lnsr_penalty(model, batch, layer=b, sigma=0.05, reduction=reduction)
    reference = naive_penalty(model, batch, b, sigma=0.05, reduction=reduction)
    assert R.item() > 0
    torch.testing.assert_close(R, reference, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("estimator", ["difference", "jvp"])
def test_padding_positions_do_not_change_it(monkeypatch, estimator):
    """The same sentences with 5 more padding positions (and the same noise on real tokens)."""
    model = tiny_model().eval()              # no dropout: the two batches differ in shape
    short = tiny_batch(T=10)
    long = {k: v for k, v in short.items()}
    for key in ("input_ids", "token_type_ids", "attention_mask"):
        long[key] = torch.cat([short[key], torch.zeros(3, 5, dtype=torch.long)], dim=1)
    eps_long = torch.randn(3, 15, 32, generator=torch.Generator().manual_seed(0)) * 0.05
    monkeypatch.setattr(lnsr_module, "sample_noise",
                        lambda x_b, *args: eps_long[:, :x_b.shape[1]] if x_b.shape[1] == 10 else eps_long)
    R_short, _ = lnsr_penalty(model, short, layer=1, sigma=0.05, estimator=estimator)
    R_long, _ = lnsr_penalty(model, long, layer=1, sigma=0.05, estimator=estimator)
    assert R_short.item() > 0
    torch.testing.assert_close(R_short, R_long, rtol=1e-5, atol=1e-6)
    if estimator == "jvp":
        return
    # The noise does reach the padded positions of x^b; on the CPU the layers then skip those
    # rows (both branches output 0 there), on a GPU they compute them and the mask drops them.
    method = LNSR(LNSROptions(layer=1, sigma=0.05))
    method.setup(model, 0)
    out = forward(model, long)
    noisy = model.bert.run_layers(out.hidden_states[0] + eps_long, out.attn_mask, 1)
    padded = (long["attention_mask"] == 0)
    assert (noisy[-1] - out.hidden_states[-1])[~padded].abs().max() > 1e-3
    assert not noisy[-1][padded].any() and not out.hidden_states[-1][padded].any()


@pytest.mark.parametrize("estimator", ["difference", "jvp"])
def test_gradient_reaches_layers_b_to_L_and_the_embeddings(estimator):
    b = 3
    model = tiny_model().train()
    R, _ = lnsr_penalty(model, tiny_batch(), layer=b, sigma=0.05, estimator=estimator)
    R.backward()
    for i in range(b - 1, L):                # layers b..L (0-based b-1..L-1)
        for name, p in model.bert.layers[i].named_parameters():
            if i == L - 1 and name == "ffn_norm.bias":
                # The top LayerNorm's shift is added to both branches and cancels in their
                # difference (and J does not depend on it): its gradient is exactly zero.
                assert p.grad is None or p.grad.abs().sum() == 0
            else:
                assert p.grad is not None and p.grad.abs().sum() > 0, f"layer {i + 1} {name}"
    # The embeddings and layers below b only enter through x^b, i.e. through both branches.
    assert model.bert.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    assert model.bert.layers[0].ffn.up.weight.grad.abs().sum() > 0
    # Nothing above the encoder is involved.
    assert model.classifier.weight.grad is None and model.bert.pooler.dense.weight.grad is None


def test_zero_weight_removes_that_layers_term():
    model = tiny_model().train()
    batch = tiny_batch()
    torch.manual_seed(123)
    R, _ = lnsr_penalty(model, batch, layer=2, sigma=0.05, weights="1,0,2")
    reference = naive_penalty(model, batch, 2, sigma=0.05, lambdas=[1.0, 0.0, 2.0])
    torch.testing.assert_close(R, reference, rtol=1e-6, atol=1e-6)
    torch.manual_seed(123)
    R_all, _ = lnsr_penalty(model, batch, layer=2, sigma=0.05, weights="1,1,2")
    torch.manual_seed(123)
    R_middle_only, _ = lnsr_penalty(model, batch, layer=2, sigma=0.05, weights="0,1,0")
    torch.testing.assert_close(R_all - R, R_middle_only, rtol=1e-5, atol=1e-7)   # exactly that term
    assert R_middle_only.item() > 0


def test_relative_sigma_scales_noise_with_each_token_s_norm():
    """Token norms spanning a factor of 1000 within each example: every token's noise is the
    same N(0, 1) draw times 0.05 ||x_t|| / sqrt(H), and its norm is about 5% of the token's."""
    scales = torch.logspace(-1, 2, 7)                                            # per token
    x = torch.randn(2, 7, 4096, generator=torch.Generator().manual_seed(1)) * scales[None, :, None]
    eps = lnsr_module.sample_noise(x, 0.0, 0.05, torch.Generator().manual_seed(0))
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    for i in range(2):
        for t in range(7):
            expected = z[i, t] * 0.05 * torch.linalg.vector_norm(x[i, t]) / 64
            torch.testing.assert_close(eps[i, t], expected)
    ratio = eps.norm(dim=-1) / x.norm(dim=-1)                                   # (B, T)
    assert ratio.min().item() > 0.045 and ratio.max().item() < 0.055         # H = 4096: close to 5%


def test_relative_sigma_penalty_equals_two_full_forward_passes():
    model = tiny_model().train()
    batch = tiny_batch()
    torch.manual_seed(123)
    R, _ = lnsr_penalty(model, batch, layer=2, sigma=0.0, relative_sigma=0.05)
    reference = naive_penalty(model, batch, 2, sigma=0.0, relative_sigma=0.05)
    assert R.item() > 0
    torch.testing.assert_close(R, reference, rtol=1e-6, atol=1e-6)


def test_bad_options_are_one_line_errors():
    with pytest.raises(InputError, match="sigma"):
        LNSROptions(sigma=-1.0)
    with pytest.raises(InputError, match="reduction"):
        LNSROptions(reduction="max")
    with pytest.raises(InputError, match="weights"):
        LNSROptions(weights="1,x")
    model = tiny_model()
    with pytest.raises(InputError, match="outside 1..4"):
        LNSR(LNSROptions(layer=5)).setup(model, 0)
    with pytest.raises(InputError, match="need 1 or 4"):
        LNSR(LNSROptions(weights="1,1")).setup(model, 0)


def test_gradients_equal_the_two_pass_reference():
    """Every parameter's gradient, not just the penalty's value, matches Algorithm 1 done the
    long way: so both branches carry gradient exactly as the formula says. In float64, so that
    the two summation orders agree to 1e-10."""
    b = 2
    model = tiny_model().train().double()
    batch = tiny_batch()
    torch.manual_seed(123)
    R, _ = lnsr_penalty(model, batch, layer=b, sigma=0.05)
    R.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    naive_penalty(model, batch, b, sigma=0.05).backward()
    reference = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert ours.keys() == reference.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], reference[name], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("estimator", ["difference", "jvp"])
def test_only_layers_b_to_L_run_a_second_time(estimator):
    b = 3
    model = tiny_model().train()
    calls = [0] * L
    for i, layer in enumerate(model.bert.layers):
        layer.register_forward_hook(lambda mod, inp, out, i=i: calls.__setitem__(i, calls[i] + 1))
    embedding_calls = []
    model.bert.embeddings.register_forward_hook(lambda *a: embedding_calls.append(1))
    lnsr_penalty(model, tiny_batch(), layer=b, sigma=0.05, estimator=estimator)
    assert calls == [1] * (b - 1) + [2] * (L - b + 1)
    assert len(embedding_calls) == 1


@pytest.mark.parametrize("b", [1, 3])
@pytest.mark.parametrize("dropout", ["shared", "independent"])
def test_noisy_pass_masks_are_the_clean_pass_masks_only_when_shared(monkeypatch, b, dropout):
    model = tiny_model().train()
    drawn = tiny.record_masks(monkeypatch)
    torch.manual_seed(7)
    R, _ = lnsr_penalty(model, tiny_batch(), layer=b, sigma=0.0, dropout=dropout)
    clean = [m for step, p, r, m in drawn if p == "clean" and r >= b]      # layers b..L, in order
    noisy = [m for step, p, r, m in drawn if p == "noisy"]
    # Each layer draws attention dropout and two hidden dropouts: the lists are not trivial.
    assert len(noisy) == len(clean) == 3 * (L - b + 1)
    assert all(0 < m.float().mean() < 1 for m in clean)
    same = [torch.equal(c, n) for c, n in zip(clean, noisy)]
    if dropout == "shared":
        assert all(same) and R.item() == 0.0
    else:
        assert not any(same) and R.item() > 0          # sigma 0: R is two dropout draws' distance


def test_independent_dropout_with_sigma_zero_is_the_distance_of_two_dropout_draws():
    """sigma 0, independent masks: R equals || f(x; m') - f(x; m) ||^2 of two full forward
    passes from consecutive RNG states, computed by hand."""
    b = 1
    model = tiny_model().train()
    batch = tiny_batch()
    torch.manual_seed(11)
    R, outputs = lnsr_penalty(model, batch, layer=b, sigma=0.0, dropout="independent", reduction="mean")
    torch.manual_seed(11)
    clean = forward(model, batch).hidden_states
    # The noisy pass draws the next masks of the global stream, after the clean pass's.
    noisy = model.bert.run_layers(clean[b - 1], clean_attn := outputs.attn_mask, b)
    mask = batch["attention_mask"][:, :, None].float()
    per_example = sum(((n - c) ** 2 * mask).sum(dim=(1, 2)) / (mask.sum(dim=(1, 2)) * n.shape[-1])
                      for n, c in zip(noisy, clean[b:]))
    assert clean_attn is not None
    torch.testing.assert_close(R, per_example.mean(), rtol=1e-6, atol=0)


def test_dropout_option_is_checked():
    with pytest.raises(InputError, match="--lnsr-dropout"):
        LNSROptions(dropout="fresh")
