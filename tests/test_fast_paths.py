"""The two shortcuts of bert/model.py that make a CPU training step faster, against references.

* Dropout masks drawn from 32-bit random integers (`keep_mask`, `dropout`): the drop rate is p
  (binomial tolerance), the kept values are scaled by exactly 1 / (1 - p_drop), the gradient is
  the same mask, a seed fixes the masks, and the explicit attention path that applies it equals
  scaled_dot_product_attention when nothing is dropped.
* `cls_only_last_layer`: the last layer computes the [CLS] position only; logits and every
  parameter's gradient equal those of the full computation (float64, 1e-10), and in training
  its dropout masks, drawn for fewer positions, give the logits the same distribution.
* Row buckets (`row_bucket`, `RealTokens`): the extra padding rows change no bit of any value,
  gradient or dropout mask, nor the random stream (float32, training mode, LNSR's second pass).
* `gelu_linear`: W_2 GELU(h) keeping h alone for the backward pass gives the plain composition's
  values and gradients bit for bit, and keeps one (N, 4H) tensor instead of two.
* Rows passed from layer to layer (`RealTokens.rows` of a grid it made): no bit of any value or
  gradient changes, and a hook that replaces or edits a layer's output is seen.
* `write_out`: a layer's attention and LayerNorms as plain tensor operations (for LNSR's jvp
  estimator) give the same hidden states and gradients as torch's fused kernels, with the same
  dropout masks in training.
"""
import math

import pytest
import torch
import torch.nn as nn

from bert import model as bert_model
from bert import speed
from bert.speed import (Dropout, LayerNorm, dropout, gelu_linear, keep_mask, row_bucket, softmax_dropout,
                        write_out, written_out)
import tiny

# With p this small, round(p * 2^32) = 0: nothing is dropped and the scale is exactly 1, but the
# training-mode code path (explicit attention with dropout) still runs.
NOTHING_DROPPED = 1e-12


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_drop_rate_is_p_in_both_halves_of_each_random_word(p):
    torch.manual_seed(0)
    n = 1 << 22
    keep, scale = keep_mask((n,), p, torch.device("cpu"))
    # Each 64-bit word feeds two neighbours; a bad split of its bits would bias one of them.
    for part in (keep[0::2], keep[1::2]):
        dropped = 1.0 - part.double().mean().item()
        sigma = math.sqrt(p * (1 - p) / part.numel())
        assert abs(dropped - p) < 5 * sigma, (dropped, p)
    assert scale == pytest.approx(1 / (1 - p), rel=1e-9)


def test_neighbouring_masks_are_independent():
    torch.manual_seed(1)
    keep, _ = keep_mask((1 << 22,), 0.5, torch.device("cpu"))
    both = (keep[0::2] & keep[1::2]).double().mean().item()
    assert abs(both - 0.25) < 5 * math.sqrt(0.25 * 0.75 / (1 << 21))


def test_dropout_values_scale_and_gradient():
    torch.manual_seed(2)
    x = torch.rand(64, 1000, dtype=torch.float64) + 1.0              # no zeros of its own
    x.requires_grad_(True)
    y = dropout(x, 0.1, training=True)
    kept = y != 0
    scale = 2**32 / (2**32 - round(0.1 * 2**32))
    assert torch.equal(y[kept], x[kept] * scale)
    weights = torch.randn_like(y)
    (y * weights).sum().backward()
    assert torch.equal(x.grad, torch.where(kept, weights * scale, 0.0))


def test_dropout_off_in_eval_and_at_p0_and_seeded():
    x = torch.randn(8, 16)
    assert dropout(x, 0.1, training=False) is x
    assert dropout(x, 0.0, training=True) is x
    torch.manual_seed(3)
    a = Dropout(0.3).train()(x)
    torch.manual_seed(3)
    assert torch.equal(a, Dropout(0.3).train()(x))
    assert not torch.equal(a, Dropout(0.3).train()(x))


def attention_scores(dtype):
    torch.manual_seed(6)
    scores = torch.randn(2, 3, 7, 7, dtype=dtype) * 3
    scores[1, :, :, 4:] = float("-inf")                                  # padding keys
    return scores.requires_grad_(True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_softmax_dropout_equals_dropout_of_the_softmax(dtype):
    """The same values and masks (bits) and random stream; the gradient within rounding."""
    runs = []
    for fn in (lambda s: dropout(s.softmax(dim=-1), 0.3, True), lambda s: softmax_dropout(s, 0.3, True)):
        scores = attention_scores(dtype)
        torch.manual_seed(7)
        dropped = fn(scores)
        rng = torch.get_rng_state()
        dropped.backward(torch.linspace(-2, 2, dropped.numel(), dtype=dtype).view_as(dropped))
        runs.append((dropped, rng, scores.grad))
    (plain, plain_rng, plain_grad), (fused, fused_rng, fused_grad) = runs
    assert fused.grad_fn.name().endswith("_SoftmaxDropoutBackward")     # really the Function
    assert torch.equal(fused, plain) and torch.equal(fused_rng, plain_rng)
    assert (plain == 0).any() and torch.equal(fused_grad[1, :, :, 4:], torch.zeros_like(fused_grad[1, :, :, 4:]))
    tolerance = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(fused_grad, plain_grad, atol=tolerance, rtol=0)


def test_softmax_dropout_in_bf16_is_the_plain_composition():
    scores = attention_scores(torch.float32).detach().bfloat16().requires_grad_(True)
    torch.manual_seed(7)
    plain = dropout(scores.softmax(dim=-1), 0.3, True)
    torch.manual_seed(7)
    fused = softmax_dropout(scores, 0.3, True)
    assert torch.equal(fused, plain) and fused.grad_fn.name() == plain.grad_fn.name()


def test_softmax_dropout_gradient_equals_finite_differences():
    def with_fixed_masks(scores):
        torch.manual_seed(8)
        return softmax_dropout(scores, 0.3, True)
    torch.autograd.gradcheck(with_fixed_masks, (attention_scores(torch.float64)[:1, :1],))


def tensors_kept(run, numel):
    """How many distinct tensors of `numel` elements autograd keeps for the backward pass of run()."""
    storages = set()
    def pack(t):
        if t.numel() == numel:
            storages.add(t.untyped_storage().data_ptr())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return len(storages)


def test_softmax_dropout_keeps_no_mask_for_the_backward_pass():
    """Tensors of the attention map's size that autograd keeps for dropout(softmax(S)) V:
    P, the mask and dropout(P) written out; P and dropout(P) through softmax_dropout."""
    def kept(fn):
        scores, v = attention_scores(torch.float32), torch.randn(2, 3, 7, 5, requires_grad=True)
        return tensors_kept(lambda: fn(scores) @ v, scores.numel())
    assert kept(lambda s: dropout(s.softmax(dim=-1), 0.3, True)) == 3
    assert kept(lambda s: softmax_dropout(s, 0.3, True)) == 2


def two_pass_step(num_layers, layer_1_hook=None):
    """An LNSR-like training step on the tiny padded batch: a clean pass, a second pass of every
    layer from x^1 + 0.01, loss = sum of logits^2 + the squared differences of the two passes.
    Returns the loss, both passes' hidden states and every gradient. layer_1_hook: a forward
    hook on layer 1 (its return value replaces the layer's output)."""
    torch.manual_seed(0)
    model = tiny.tiny_model(num_layers=num_layers)
    model.train()
    if layer_1_hook is not None:
        model.bert.layers[0].register_forward_hook(layer_1_hook)
    batch = tiny.tiny_batch(T=10, pad=(0, 3, 6))
    torch.manual_seed(1)
    out = tiny.forward(model, batch)
    noisy = model.bert.run_layers(out.hidden_states[0] + 0.01, out.attn_mask, 1)
    loss = out.logits.square().sum() + sum((n - c).square().sum() for n, c in zip(noisy, out.hidden_states[1:]))
    loss.backward()
    return [loss.detach(), *out.hidden_states, *noisy] + [p.grad for p in model.parameters()]


def feed_forward_step(fn, shape, approximate, seed=3):
    """fn(hidden, linear) on fixed random inputs, its backward pass: output and gradients."""
    torch.manual_seed(seed)
    hidden = (torch.randn(shape) * 2).requires_grad_(True)              # GELU's curved part and tails
    linear = nn.Linear(shape[-1], 6)
    out = fn(hidden, linear, approximate)
    out.backward(torch.randn(out.shape))
    return out, out.grad_fn.name(), [hidden.grad, linear.weight.grad, linear.bias.grad]


plain_gelu_linear = lambda hidden, linear, approximate: linear(nn.functional.gelu(hidden, approximate=approximate))


@pytest.mark.parametrize("shape", [(37, 24), (3, 11, 24)])             # token rows; (B, T, 4H)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_linear_equals_the_plain_composition_bit_for_bit(shape, approximate):
    plain, plain_fn, plain_grads = feed_forward_step(plain_gelu_linear, shape, approximate)
    fused, fused_fn, fused_grads = feed_forward_step(gelu_linear, shape, approximate)
    assert fused_fn == "_GeluLinearBackward" and plain_fn != fused_fn          # really the Function
    bits = lambda t: t.reshape(-1).view(torch.int32)
    assert torch.equal(bits(fused), bits(plain))
    for a, b in zip(plain_grads, fused_grads):
        assert a.shape == b.shape and torch.equal(bits(a), bits(b))


def test_gelu_linear_gradient_equals_finite_differences():
    """float64 runs the plain composition, so the Function itself is checked here directly."""
    hidden = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)
    for approximate in ("none", "tanh"):
        torch.autograd.gradcheck(lambda h, w, b: speed._GeluLinear.apply(h, w, b, approximate),
                                 (hidden, weight, bias))


def test_gelu_linear_keeps_one_tensor_of_the_block_s_size():
    """Tensors of (N, 4H) size that autograd keeps: h and GELU(h) written out, h alone fused."""
    def kept(fn):
        hidden, linear = torch.randn(37, 24, requires_grad=True), nn.Linear(24, 6)
        return tensors_kept(lambda: fn(hidden, linear, "none"), hidden.numel())
    assert kept(plain_gelu_linear) == 2
    assert kept(gelu_linear) == 1


def test_gelu_linear_runs_the_plain_composition_where_the_function_does_not_fit():
    """Hooks on the linear layer, forward and backward, still fire, a linear that is not nn.Linear's own forward
    (Mixout's) runs its own, and bf16, no-grad and written-out passes take the plain path."""
    class Scaled(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2
    hidden = torch.randn(4, 8, requires_grad=True)
    linear = nn.Linear(8, 3)
    seen = []
    linear.register_forward_hook(lambda m, inputs, out: seen.append(out.shape))
    assert gelu_linear(hidden, linear, "none").grad_fn.name() == "AddmmBackward0" and seen == [(4, 3)]
    scaled = Scaled(8, 3)
    linear_alone = nn.functional.linear(nn.functional.gelu(hidden), scaled.weight, scaled.bias)
    torch.testing.assert_close(gelu_linear(hidden, scaled, "none"), 2 * linear_alone)
    plain_linear = nn.Linear(8, 3)
    assert gelu_linear(hidden.bfloat16(), plain_linear.bfloat16(), "none").grad_fn.name() == "AddmmBackward0"
    watched, backward_seen = nn.Linear(8, 3), []
    watched.register_full_backward_hook(lambda m, grad_in, grad_out: backward_seen.append(1))
    gelu_linear(hidden, watched, "none").sum().backward()
    assert backward_seen == [1]
    with torch.no_grad():
        assert gelu_linear(hidden, nn.Linear(8, 3), "none").grad_fn is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert gelu_linear(hidden, nn.Linear(8, 3), "none").dtype == torch.bfloat16


def test_model_step_with_gelu_linear_equals_the_plain_feed_forward_bit_for_bit(monkeypatch):
    """A training step of LNSR's two passes with and without the seam: the same loss and
    gradients, bit for bit, on the tiny model."""
    runs, backward_nodes = [], []
    for feed_forward in (gelu_linear, plain_gelu_linear):
        def recorded(hidden, linear, approximate, feed_forward=feed_forward):
            out = feed_forward(hidden, linear, approximate)
            backward_nodes.append(out.grad_fn.name())
            return out
        monkeypatch.setattr(bert_model, "gelu_linear", recorded)
        runs.append(two_pass_step(num_layers=2))
    assert backward_nodes == ["_GeluLinearBackward"] * 4 + ["AddmmBackward0"] * 4      # 2 layers, 2 passes
    bits = lambda t: t.reshape(-1).view(torch.int32)
    assert all(torch.equal(bits(a), bits(b)) for a, b in zip(*runs))


@pytest.mark.parametrize("pad", [(0, 0, 0), (0, 3, 6)])
def test_explicit_training_attention_equals_sdpa(pad):
    model = tiny.tiny_model(num_layers=2, dropout=NOTHING_DROPPED, heads=4).double()
    batch = tiny.tiny_batch(pad=pad)
    train_out = tiny.forward(model.train(), batch)                # explicit softmax path
    eval_out = tiny.forward(model.eval(), batch)                  # scaled_dot_product_attention
    for a, b in zip(train_out.hidden_states, eval_out.hidden_states):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def cls_only_run(cls_only, train):
    model = tiny.tiny_model(num_layers=3, dropout=NOTHING_DROPPED, heads=4).double()
    model.train(train)
    model.bert.cls_only_last_layer = cls_only
    batch = tiny.tiny_batch()
    out = tiny.forward(model, batch)
    out.logits.pow(2).sum().backward()
    return out, {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("train", [False, True])
def test_cls_only_last_layer_same_logits_and_gradients(train):
    full, full_grads = cls_only_run(False, train)
    short, short_grads = cls_only_run(True, train)
    torch.testing.assert_close(short.logits, full.logits, atol=1e-12, rtol=0)
    torch.testing.assert_close(short.pooler_output, full.pooler_output, atol=1e-12, rtol=0)
    assert short.hidden_states[-1].shape[1] == 1
    torch.testing.assert_close(short.hidden_states[-1], full.hidden_states[-1][:, :1], atol=1e-12, rtol=0)
    for a, b in zip(short.hidden_states[:-1], full.hidden_states[:-1]):
        assert torch.equal(a, b)
    for name, grad in full_grads.items():
        assert grad is not None, name
        torch.testing.assert_close(short_grads[name], grad, atol=1e-10, rtol=0, msg=name)


def training_logits(cls_only, draws, seed, attention_p, hidden_p):
    """The logits of `draws` training-mode forward passes of one batch, (draws, B * 2), with
    dropout `attention_p` on the attention probabilities and `hidden_p` everywhere else."""
    model = tiny.tiny_model(num_layers=2, dropout=hidden_p).double().train()
    for attention in (layer.attention for layer in model.bert.layers):
        attention.attn_dropout = attention_p
    model.bert.cls_only_last_layer = cls_only
    batch = tiny.tiny_batch()
    torch.manual_seed(seed)
    with torch.no_grad():
        return torch.stack([tiny.forward(model, batch).logits.flatten() for _ in range(draws)]).numpy()


@pytest.mark.parametrize("attention_p, hidden_p", [(0.5, 0.0), (0.0, 0.1)], ids=["attention", "hidden"])
def test_cls_only_last_layer_draws_dropout_from_the_same_distribution(attention_p, hidden_p):
    """With real dropout the two last layers draw different masks (their shapes differ), so no
    run is replayed bit for bit; what must hold is that [CLS]'s masks are drawn alike: each logit
    has the same mean and spread over many draws (Welch's t and Levene's test, scipy). A missing
    or misscaled mask on the attention probabilities or on the hidden rows moves the spread.
    Each dropout is tested alone, so that the other's noise does not hide it."""
    from scipy import stats
    full = training_logits(False, 2000, 0, attention_p, hidden_p)
    short = training_logits(True, 2000, 1, attention_p, hidden_p)
    assert not (full[:1] == short[:1]).all()                          # really different draws
    for logit in range(full.shape[1]):
        a, b = full[:, logit], short[:, logit]
        assert stats.ttest_ind(a, b, equal_var=False).pvalue > 1e-4, (logit, a.mean(), b.mean())
        assert stats.levene(a, b).pvalue > 1e-4, (logit, a.std(), b.std())


def rows_seen(model, batch, module_name):
    """Rows of the input of each layer's `module_name` (ffn, attention.query, attention.out)."""
    rows = []
    for layer in model.bert.layers:
        layer.get_submodule(module_name).register_forward_hook(
            lambda m, inputs, out: rows.append(inputs[0].reshape(-1, inputs[0].shape[-1]).shape[0]))
    tiny.forward(model, batch)
    return rows


def test_padding_rows_and_cls_only_really_skip_work():
    """The projections and the feed-forward see the real tokens only, and in the last layer the
    query, the output projection and the feed-forward one row per example (keys and values still
    need every token)."""
    batch = tiny.tiny_batch(T=10, pad=(0, 3, 6))                    # 10 + 7 + 4 = 21 real tokens
    names = ("ffn", "attention.query", "attention.key", "attention.value", "attention.out")
    for name in names:
        model = tiny.tiny_model(num_layers=2).eval()
        assert rows_seen(model, batch, name) == [21, 21], name
    expected_cls_only = {"ffn": [21, 3], "attention.query": [21, 3], "attention.key": [21, 21],
                         "attention.value": [21, 21], "attention.out": [21, 3]}
    for name, rows in expected_cls_only.items():
        model = tiny.tiny_model(num_layers=2).eval()
        model.bert.cls_only_last_layer = True
        assert rows_seen(model, batch, name) == rows, name


@pytest.mark.parametrize("train", [False, True])
def test_padded_batch_equals_examples_run_one_by_one(train):
    """Logits and gradients of a padded batch (padding rows skipped after attention) equal the
    sum over the examples run alone, unpadded (float64, 1e-10)."""
    batch = tiny.tiny_batch(T=10, pad=(0, 3, 6))
    model = tiny.tiny_model(num_layers=2, dropout=NOTHING_DROPPED, heads=4).double().train(train)
    logits = tiny.forward(model, batch).logits
    logits.pow(2).sum().backward()
    batched = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    for i in range(3):
        n = int(batch["attention_mask"][i].sum())
        one = {k: v[i:i + 1, :n] for k, v in batch.items() if k != "labels"}
        single = tiny.forward(model, one).logits
        torch.testing.assert_close(single, logits[i:i + 1], atol=1e-12, rtol=0)
        single.pow(2).sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(batched[name], p.grad, atol=1e-10, rtol=0, msg=name)


def test_lnsr_reads_every_layer_and_the_model_computes_the_full_last_layer_unless_told():
    # LNSR's penalty reads layers b..L at every position, so train.py must not let the last layer
    # compute [CLS] alone for it; any method that says so gets the same (tests/test_train.py,
    # a method defined in a test).
    import regularizers
    assert regularizers.method_class("lnsr").reads_hidden_states
    assert bert_model.BertModel(tiny.tiny_model().config).cls_only_last_layer is False


def test_row_bucket_rounds_up_to_few_sizes():
    assert [row_bucket(n) for n in (1, 21, 31, 32, 33, 1470, 2048, 2125, 2656)] == \
        [1, 21, 31, 32, 34, 1472, 2048, 2176, 2688]
    counts = range(1, 5000)
    assert all(n <= row_bucket(n) < n * (1 + 2 ** -(speed.ROW_BITS - 1)) for n in counts)
    assert len({row_bucket(n) for n in range(1025, 2049)}) == 2 ** (speed.ROW_BITS - 1)   # 1088 .. 2048


def bucketed_step(monkeypatch, bucket):
    """One float32 LNSR training step with dropout on; the values it returns, and its rows."""
    from regularizers.lnsr import LNSR, LNSROptions
    monkeypatch.setattr(speed, "row_bucket", bucket)
    model = tiny.tiny_model(num_layers=3, dropout=0.1, heads=4).train()
    batch = tiny.tiny_batch(T=40, pad=(0, 13, 31))                  # 40 + 27 + 9 = 76 real tokens
    rows = []
    model.bert.layers[0].ffn.register_forward_hook(lambda m, inputs, out: rows.append(inputs[0].shape[0]))
    method = LNSR(LNSROptions(sigma=0.01))
    method.setup(model, seed=5)
    torch.manual_seed(7)
    out = tiny.forward(model, batch)
    loss = torch.nn.functional.cross_entropy(out.logits, batch["labels"]) + method.penalty(model, batch, out)
    loss.backward()
    values = [out.logits, loss, *out.hidden_states, torch.get_rng_state()]
    return values, {n: p.grad for n, p in model.named_parameters()}, rows


def test_bucketed_rows_change_no_bit_of_any_value_or_gradient(monkeypatch):
    """The extra rows are computed and dropped; every real token's value, every gradient, the
    dropout masks and the random stream are bit for bit those of the real rows alone, on this
    tiny model and one thread. At MiniLM's size the projections' weight gradients, sums over the
    rows that the BLAS blocks by the row count, round differently in the last bits, and with
    several threads LayerNorm's too (bert/speed.py::row_bucket); values and masks do not."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        plain, plain_grads, plain_rows = bucketed_step(monkeypatch, lambda n: n)
        coarse = lambda n: -(-n // 32) * 32                               # 76 -> 96: 20 extra rows
        bucketed, bucketed_grads, bucketed_rows = bucketed_step(monkeypatch, coarse)
    finally:
        torch.set_num_threads(threads)
    assert plain_rows == [76, 76] and bucketed_rows == [96, 96]          # clean and noisy pass
    bits = lambda t: t.detach().reshape(-1).view(torch.uint8)
    for a, b in zip(plain, bucketed):
        assert torch.equal(bits(a), bits(b))
    for name, grad in plain_grads.items():
        assert torch.equal(bits(grad), bits(bucketed_grads[name])), name
    layer_outputs = bucketed[3:-1]                                        # x^2 .. x^{L+1}
    assert all(torch.count_nonzero(x[2, 9:]) == 0 for x in layer_outputs)   # 0 at padding


def rows_step(monkeypatch, reuse_rows, noise=None):
    """An LNSR-like step (clean pass, noisy pass from layer 1) on the tiny padded batch: the
    hidden states, the loss and every gradient; reuse_rows=False gathers every layer's rows
    from its input grid. noise: a forward hook's addition to layer 1's output."""
    monkeypatch.setattr(speed, "row_bucket", lambda n: -(-n // 32) * 32)    # 21 -> 32: 11 extra rows
    if not reuse_rows:
        monkeypatch.setattr(speed.RealTokens, "grid", lambda self, rows: uncached_grid(self, rows))
    hook = None if noise is None else (lambda m, inputs, out: out + noise)
    step = two_pass_step(num_layers=3, layer_1_hook=hook)
    monkeypatch.undo()
    return step


def uncached_grid(tokens, rows):
    H = rows.shape[-1]
    return (rows.new_zeros(tokens.B * tokens.T, H).index_copy_(0, tokens.real, rows[:tokens.real_rows])
            .view(tokens.B, tokens.T, H))


@pytest.mark.parametrize("noise", [None, 0.5])
def test_rows_passed_from_layer_to_layer_change_no_bit(monkeypatch, noise):
    """A layer's output rows go to the next layer as they are (no gather): every hidden state,
    the loss and every gradient bit for bit those of gathering the rows from each grid, also
    with a forward hook that replaces a layer's output. The row bucket's extra rows, which hold
    padding positions' values instead of 0 when reused, are there."""
    bits = lambda t: t.detach().reshape(-1).view(torch.int32)
    reused = rows_step(monkeypatch, True, noise)
    gathered = rows_step(monkeypatch, False, noise)
    assert len(reused) == len(gathered)
    assert all(torch.equal(bits(a), bits(b)) for a, b in zip(reused, gathered))


def test_rows_are_reused_only_for_the_grid_made_from_them():
    """The next layer's query reads the previous layer's LayerNorm output itself, unless a hook
    replaced the layer's output or changed it in place: then the rows are gathered again and
    carry the change."""
    def first_rows_of_layer_2(change):
        torch.manual_seed(0)
        model = tiny.tiny_model(num_layers=2)
        model.eval()
        seen = {}
        model.bert.layers[0].ffn_norm.register_forward_hook(lambda m, i, out: seen.__setitem__("made", out))
        model.bert.layers[1].attention.query.register_forward_pre_hook(lambda m, args: seen.__setitem__("read", args[0]))
        if change is not None:
            model.bert.layers[0].register_forward_hook(change)
        tiny.forward(model, tiny.tiny_batch(T=10, pad=(0, 3, 6)))
        return seen["made"], seen["read"]
    made, read = first_rows_of_layer_2(None)
    assert read is made
    made, read = first_rows_of_layer_2(lambda m, i, out: out + 1.0)
    assert read is not made and torch.equal(read[:21], made[:21] + 1.0)
    made, read = first_rows_of_layer_2(lambda m, i, out: out.add_(1.0))
    assert read is not made and torch.equal(read[:21], made[:21] + 1.0)


def test_rows_passed_under_inference_mode_equal_no_grad():
    """Inference-mode tensors keep no version counter: their rows are gathered as before."""
    model, batch = tiny.tiny_model(num_layers=3).eval(), tiny.tiny_batch(T=10, pad=(0, 3, 6))
    with torch.no_grad():
        expected = tiny.forward(model, batch)
    with torch.inference_mode():
        got = tiny.forward(model, batch)
    assert all(torch.equal(a, b) for a, b in zip(expected.hidden_states, got.hidden_states))
    assert torch.equal(expected.logits, got.logits)


def test_written_out_layer_norm_equals_torch_s():
    torch.manual_seed(4)
    norm = LayerNorm(16, eps=1e-12).double()
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = (torch.randn(3, 5, 16, dtype=torch.float64) * 3 + 1).requires_grad_(True)
    fused = norm(x)
    fused.pow(3).sum().backward()
    fused_grads = [t.grad.clone() for t in (x, norm.weight, norm.bias)]
    for t in (x, norm.weight, norm.bias):
        t.grad = None
    hooks = write_out(norm)
    written_out = norm(x)
    written_out.pow(3).sum().backward()
    assert not torch.equal(written_out, fused)                           # really another path
    torch.testing.assert_close(written_out, fused, atol=1e-12, rtol=0)
    for fused_grad, t in zip(fused_grads, (x, norm.weight, norm.bias)):
        torch.testing.assert_close(t.grad, fused_grad, atol=1e-10, rtol=0)
    for hook in hooks:                                                   # undone: torch's again
        hook.remove()
    assert torch.equal(norm(x), fused)


def test_write_out_holds_inside_the_modules_forward_pass_alone():
    """The choice lives in hooks, not in the model: outside the written-out layer's forward pass
    (before, after, in the layers around it, and after a forward pass that raised) torch's
    kernels run again."""
    model = tiny.tiny_model(num_layers=3, heads=4).eval()
    seen = {}
    for i, layer in enumerate(model.bert.layers):
        layer.attention.register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(i, written_out()))
    write_out(model.bert.layers[1])
    assert not written_out()
    tiny.forward(model, tiny.tiny_batch())
    assert seen == {0: False, 1: True, 2: False} and not written_out()
    assert not any(vars(layer).get("written_out") for layer in model.modules())   # no flag on the model
    failing = nn.Linear(2, 2)
    write_out(failing)
    with pytest.raises(RuntimeError):
        failing(torch.zeros(3))                                          # wrong width: raises
    assert not written_out()


@pytest.mark.parametrize("train", [False, True])
def test_written_out_layers_equal_the_fused_ones(train):
    """Every hidden state and gradient, eval mode (SDPA otherwise) and training mode (the same
    dropout masks drawn: the same seed gives the same values)."""
    runs = []
    for written in (False, True):
        model = tiny.tiny_model(num_layers=3, heads=4).double().train(train)
        if written:
            write_out(model)
        torch.manual_seed(9)
        out = tiny.forward(model, tiny.tiny_batch())
        out.hidden_states[-1].pow(2).sum().backward()
        runs.append((out.hidden_states, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (fused, fused_grads), (written, written_grads) = runs
    assert any(not torch.equal(a, b) for a, b in zip(fused[1:], written[1:]))      # really another path
    for a, b in zip(fused, written):
        torch.testing.assert_close(b, a, atol=1e-12, rtol=0)
    assert fused_grads.keys() == written_grads.keys()
    for name, grad in fused_grads.items():
        torch.testing.assert_close(written_grads[name], grad, atol=1e-10, rtol=0, msg=name)
