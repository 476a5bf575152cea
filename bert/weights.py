"""Hugging Face checkpoints <-> our modules, with every name mapped explicitly.

Loading reads `model.safetensors` from a checkpoint folder in HF layout. It accepts the variants
found in the wild: keys with or without the `bert.` prefix (BertModel vs BertFor* checkpoints),
legacy `LayerNorm.gamma/beta` names (the original TF conversion), a checkpoint without the
pooler, and pretraining heads (`cls.*`) that fine-tuning does not use. Every tensor's shape is
checked against the config, and what was not used is reported, never silently dropped.

Saving writes what `transformers.BertForSequenceClassification.from_pretrained(dir)` loads
unchanged: config.json, model.safetensors with HF names, and the tokenizer files.
"""
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bert.config import BertConfig
from bert.errors import InputError

# ours -> HF, outside the layer stack. HF names are those of `BertModel` (no `bert.` prefix).
EMBEDDINGS_AND_POOLER = {
    "embeddings.word_embeddings.weight": "embeddings.word_embeddings.weight",
    "embeddings.position_embeddings.weight": "embeddings.position_embeddings.weight",
    "embeddings.token_type_embeddings.weight": "embeddings.token_type_embeddings.weight",
    "embeddings.layer_norm.weight": "embeddings.LayerNorm.weight",
    "embeddings.layer_norm.bias": "embeddings.LayerNorm.bias",
    "pooler.dense.weight": "pooler.dense.weight",
    "pooler.dense.bias": "pooler.dense.bias",
}

# ours -> HF inside layer i (`layers.{i}.` here, `encoder.layer.{i}.` there).
LAYER = {
    "attention.query.weight": "attention.self.query.weight",
    "attention.query.bias": "attention.self.query.bias",
    "attention.key.weight": "attention.self.key.weight",
    "attention.key.bias": "attention.self.key.bias",
    "attention.value.weight": "attention.self.value.weight",
    "attention.value.bias": "attention.self.value.bias",
    "attention.out.weight": "attention.output.dense.weight",
    "attention.out.bias": "attention.output.dense.bias",
    "attention_norm.weight": "attention.output.LayerNorm.weight",
    "attention_norm.bias": "attention.output.LayerNorm.bias",
    "ffn.up.weight": "intermediate.dense.weight",
    "ffn.up.bias": "intermediate.dense.bias",
    "ffn.down.weight": "output.dense.weight",
    "ffn.down.bias": "output.dense.bias",
    "ffn_norm.weight": "output.LayerNorm.weight",
    "ffn_norm.bias": "output.LayerNorm.bias",
}

HEAD = {"classifier.weight": "classifier.weight", "classifier.bias": "classifier.bias"}

# Checkpoint entries that are not parameters of an encoder for fine-tuning.
IGNORED_PREFIXES = ("cls.",)                      # masked-LM and next-sentence pretraining heads
IGNORED_KEYS = ("embeddings.position_ids", "embeddings.token_type_ids")   # buffers, not weights


def name_map(num_layers: int) -> dict:
    """Every parameter of our BertModel -> its HF name."""
    names = dict(EMBEDDINGS_AND_POOLER)
    for i in range(num_layers):
        for ours, hf in LAYER.items():
            names[f"layers.{i}.{ours}"] = f"encoder.layer.{i}.{hf}"
    return names


@dataclass
class LoadReport:
    folder: str
    loaded: int = 0
    missing: list = field(default_factory=list)      # ours, left at their initial values
    unexpected: list = field(default_factory=list)   # in the file, used by nothing here
    ignored: list = field(default_factory=list)      # known extras (pretraining heads, buffers)
    notes: list = field(default_factory=list)

    def __str__(self):
        lines = [f"loaded {self.loaded} tensors from {self.folder}"]
        lines += [f"  note: {n}" for n in self.notes]
        if self.ignored:
            lines.append(f"  ignored {len(self.ignored)} pretraining-only entries "
                         f"({', '.join(sorted({k.split('.')[0] + '.*' if k.startswith('cls.') else k for k in self.ignored}))})")
        if self.unexpected:
            lines.append(f"  unexpected (unused): {', '.join(self.unexpected[:10])}"
                         + (f" and {len(self.unexpected) - 10} more" if len(self.unexpected) > 10 else ""))
        if self.missing:
            lines.append(f"  not in the checkpoint (freshly initialised): {', '.join(self.missing)}")
        return "\n".join(lines)


def normalize_key(key: str) -> str:
    """HF key variants -> the BertModel naming used in the map above."""
    if key.startswith("bert."):
        key = key[len("bert."):]
    if ".LayerNorm.gamma" in key or key.endswith("LayerNorm.gamma"):
        key = key.replace("LayerNorm.gamma", "LayerNorm.weight")
    if key.endswith("LayerNorm.beta"):
        key = key.replace("LayerNorm.beta", "LayerNorm.bias")
    return key


def read_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    if not path.is_file():
        other = [p.name for p in path.parent.glob("*.bin")] + [p.name for p in path.parent.glob("*.h5")]
        hint = f" (found {', '.join(other)}: only safetensors is read; convert it first)" if other else ""
        raise InputError(f"{path}: model.safetensors not found{hint}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError(f"{path}: not a readable safetensors file ({e}); "
                         "it may be truncated: delete it and download again") from None


def load_pretrained(name_or_path, build, num_labels: int | None, verbose: bool = True):
    """Fill the module that `build(config)` makes from an HF checkpoint folder or name: a
    BertModel (num_labels None) or a BertClassifier (bert/model.py's from_pretrained methods;
    this file knows their parameter names, not their classes).

    A classifier head found in the checkpoint is loaded when its shape fits (re-evaluating a
    fine-tuned run); otherwise the head starts from N(0, 0.02^2) and zero bias.
    """
    from bert.hub import resolve
    folder = resolve(str(name_or_path))
    config = BertConfig.from_json(folder / "config.json")
    file = folder / "model.safetensors"
    raw = read_safetensors(file)

    model = build(config)
    bert = model if num_labels is None else model.bert
    report = LoadReport(folder=str(folder))

    tensors, raw_names = {}, {}
    for key, tensor in raw.items():
        k = normalize_key(key)
        if k in IGNORED_KEYS or k.startswith(IGNORED_PREFIXES):
            report.ignored.append(key)
        else:
            tensors[k], raw_names[k] = tensor, key

    targets = {f"{'' if num_labels is None else 'bert.'}{ours}": hf
               for ours, hf in name_map(config.num_hidden_layers).items()}
    if num_labels is not None:
        targets.update(HEAD)
    params = dict(model.named_parameters())
    used = set()
    with torch.no_grad():
        for ours, hf in targets.items():
            if hf not in tensors:
                report.missing.append(ours)
                continue
            value, expected = tensors[hf], tuple(params[ours].shape)
            if ours.startswith("classifier.") and tuple(value.shape) != expected:
                report.notes.append(f"checkpoint head {tuple(value.shape)} does not fit "
                                    f"num_labels={num_labels}: a new head is initialised")
                report.missing.append(ours)
                used.add(hf)
                continue
            if tuple(value.shape) != expected:
                raise InputError(f"{file}: tensor {raw_names[hf]} has shape {tuple(value.shape)}, "
                                 f"but config.json gives {ours} the shape {expected}")
            params[ours].copy_(value.to(params[ours].dtype))
            used.add(hf)
            report.loaded += 1
    report.unexpected = sorted(raw_names[k] for k in tensors if k not in used)

    # Only the pooler and the head may be absent: anything else means a broken or foreign file.
    encoder_missing = [m for m in report.missing if ".pooler." not in f".{m}" and "classifier." not in m]
    if encoder_missing:
        shown = ", ".join(encoder_missing[:6]) + (f" and {len(encoder_missing) - 6} more" if len(encoder_missing) > 6 else "")
        raise InputError(f"{file}: missing encoder weights: {shown}")
    if any(".pooler." in f".{m}" for m in report.missing):
        with torch.no_grad():            # BERT's init for what is absent, as model.init_weights
            dense = bert.pooler.dense
            dense.weight.copy_(torch.randn(dense.weight.shape) * config.initializer_range)
            dense.bias.zero_()
        report.notes.append("the checkpoint has no pooler: pooler.dense starts from N(0, 0.02^2)")
    if num_labels is not None and "classifier.weight" in report.missing:
        model.init_head()
    if verbose:
        print(report, file=sys.stderr)
    model.load_report = report
    model.source_folder = folder
    return model


def hf_state_dict(model) -> dict:
    """Our classifier's weights under BertForSequenceClassification's names."""
    ours = dict(model.state_dict())
    out = {f"bert.{hf}": ours[f"bert.{name}"]
           for name, hf in name_map(model.config.num_hidden_layers).items()}
    for name, hf in HEAD.items():
        out[hf] = ours[name]
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in out.items()}


def save_pretrained(model, out_dir, tokenizer=None, label_names=None):
    """Write config.json, model.safetensors (and tokenizer files) in HF's layout.

    Files are written under temporary names and renamed, so an interrupted save never leaves a
    half-written model.safetensors that looks complete.
    """
    from safetensors.torch import save_file
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = model.num_labels
    names = list(label_names) if label_names else [f"LABEL_{i}" for i in range(n)]
    if len(names) != n:
        raise ValueError(f"{len(names)} label names for {n} labels")
    config = model.config.to_dict()
    config.update({
        "architectures": ["BertForSequenceClassification"],
        "model_type": "bert",
        "id2label": {str(i): name for i, name in enumerate(names)},
        "label2id": {name: i for i, name in enumerate(names)},
        "problem_type": "regression" if n == 1 else "single_label_classification",
    })
    if config.get("classifier_dropout") is None:
        config.pop("classifier_dropout", None)

    tmp = out / "model.safetensors.tmp"
    save_file(hf_state_dict(model), str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / "model.safetensors")
    tmp = out / "config.json.tmp"
    tmp.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out / "config.json")
    if tokenizer is not None:
        tokenizer.save(out)
