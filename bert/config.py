"""BertConfig: the numbers that fix a BERT's shape, read from a Hugging Face config.json.

Field names follow Hugging Face's `BertConfig` so a config.json maps onto it one to one.
"""
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from bert.errors import InputError


@dataclass
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768            # H
    num_hidden_layers: int = 12       # L
    num_attention_heads: int = 12     # heads; head size = H / heads
    intermediate_size: int = 3072     # feed-forward width, 4H
    hidden_act: str = "gelu"          # exact (erf) GELU, as in the original BERT
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    initializer_range: float = 0.02   # std of N(0, std^2) for freshly initialised weights
    classifier_dropout: float | None = None  # None: use hidden_dropout_prob, like HF

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads != 0:
            raise InputError(
                f"hidden_size {self.hidden_size} is not a multiple of "
                f"num_attention_heads {self.num_attention_heads}")
        if self.hidden_act not in ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu"):
            raise InputError(f"hidden_act {self.hidden_act!r} is not supported "
                             "(gelu, gelu_new, gelu_pytorch_tanh, relu)")

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d: dict) -> "BertConfig":
        """Take the fields we know; ignore the rest (architectures, model_type, ...)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def from_json(cls, path) -> "BertConfig":
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: config.json not found")
        d = read_json_object(path)
        if d.get("model_type", "bert") != "bert":
            raise InputError(f"{path}: model_type is {d['model_type']!r}, expected 'bert'")
        try:
            return cls.from_dict(d)
        except TypeError as e:
            raise InputError(f"{path}: {e}") from None

    def to_dict(self) -> dict:
        return asdict(self)


def read_json_object(path: Path) -> dict:
    """A JSON file that must hold an object; errors name the file and line."""
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(d, dict):
        raise InputError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d


# Shapes of the models we name. The weights themselves come from bert/hub.py.
PRESETS = {
    "bert-large-uncased-whole-word-masking": BertConfig(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
    "bert-large-uncased": BertConfig(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
    "bert-base-uncased": BertConfig(),
    "minilm-l6": BertConfig(
        hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
}


def preset(name: str) -> BertConfig:
    """The config of a named model, for building a randomly initialised model of that shape."""
    if name not in PRESETS:
        raise InputError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
    return BertConfig(**asdict(PRESETS[name]))
