"""Fine-tuning methods by name. Adding a method: write regularizers/<name>.py with a
`Regularizer` subclass (see base.py) and add one line to METHODS below."""
import importlib

from bert.errors import InputError

# name -> "module:Class". Imported on first use, so one method's extra code never slows another.
METHODS = {
    "ft": "regularizers.base:FineTune",
    "lnsr": "regularizers.lnsr:LNSR",
    "l2sp": "regularizers.l2sp:L2SP",
    "mixout": "regularizers.mixout:Mixout",
    "smart": "regularizers.smart:SMART",
    "noise": "regularizers.noise:FTNoise",
    "r3f": "regularizers.r3f:R3F",
}


def method_class(name: str):
    if name not in METHODS:
        raise InputError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
    module, cls = METHODS[name].split(":")
    return getattr(importlib.import_module(module), cls)
