"""How the settings in a run's config.json read today, for runs made before a setting existed.

A setting added to train.py after runs were committed is missing from those runs' config.json.
Each such setting is listed here with the value those runs were made with, so that resuming a
sweep (train.py) and summarizing it (evaluate.py) read an old run as what it was, never as
today's default.
"""

# train.py flags added later -> the behaviour of every run made before them.
LEGACY_SETTINGS = {
    # Runs before 2026-12-02 drew all dropout masks of a run from one stream seeded once.
    "dropout_stream": "run",
    # Runs before 2026-12-02 ran on CPUs only, where TF32 does not exist, and had no such flag.
    "allow_tf32": False,
    "deterministic": False,
}
# method -> its options added later -> the behaviour before them.
LEGACY_METHOD_OPTIONS = {
    "lnsr": {"dropout": "shared"},        # the noisy pass always replayed the clean pass's masks
}


def with_legacy_settings(settings: dict) -> dict:
    """A config.json's "settings", with every later-added setting filled in as it was then."""
    filled = {**LEGACY_SETTINGS, **settings}
    if "method_options" in settings or settings.get("method") in LEGACY_METHOD_OPTIONS:
        filled["method_options"] = legacy_method_options(settings.get("method"),
                                                         settings.get("method_options"))
    return filled


def legacy_method_options(method, options) -> dict:
    """A run's method options, with options added later filled in as they were then."""
    return {**LEGACY_METHOD_OPTIONS.get(method, {}), **(options or {})}


def one_answer(results: dict) -> str | None:
    """How a run collapsed to one answer, from its results.json, or None: every dev prediction
    the same class, or STS-B scores with a standard deviation below 1e-3 (labels span 0-5).
    Runs made before prediction spreads were recorded (2026-12-02) are never marked."""
    spread = results.get("dev_predictions")
    if not isinstance(spread, dict):
        return None
    counts = spread.get("class_counts")
    if isinstance(counts, dict) and len(counts) == 1:
        return f"every dev prediction is class {next(iter(counts))}"
    std = spread.get("std")
    if isinstance(std, (int, float)) and std < 1e-3:
        return f"constant dev scores (std {std:.1e})"
    return None
