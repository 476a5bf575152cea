"""The paper's analyses beyond Table 1: noise attenuation layer by layer (Figure 1) and the
distribution of scores over seeds (Figures 2 and 5). Run them through evaluate.py:

    python evaluate.py noise-stability --model minilm-l6 --task mrpc             # pretrained
    python evaluate.py noise-stability --run runs/MRPC/ft/seed1                  # fine-tuned
    python evaluate.py noise-stability --model minilm-l6 --run runs/MRPC/ft/seed1  # both, side by side
    python evaluate.py boxplot runs --output docs/figure2.png                    # Figure 2

Plots need matplotlib, an optional extra (`pip install matplotlib`); it is imported only inside
the plotting functions, and without it the numbers are still written as CSV and JSON.

## Figure 1: how noise injected at one layer travels up the network

Hua et al., Figure 1: "A curve starts at the layer where a scaled Gaussian noise is injected to
its output whose l2 norm is set to 5% of the norm of its original output." With h_r the output of
layer r for one input (r = 0: the embedding output; `hidden_states[r]`) and rho = 0.05:

    g ~ N(0, I)                     on the real tokens of h_k, zero on padding      (T, H)
    eps = rho * ||h_k|| / ||g|| * g                   so ||eps|| = rho * ||h_k|| exactly
    h~_k = h_k + eps,   h~_r = Layer_r(h~_{r-1})      for r = k+1..L  (BertModel.run_layers)
    relative_r = ||h~_r - h_r|| / ||h_r||,   absolute_r = ||h~_r - h_r||     for r = k..L

Norms are taken over all real tokens and hidden units of one example (the Frobenius norm of its
(T, H) output), and each number is averaged over the examples. The model runs in eval mode (no
dropout: only the injected noise separates the two passes), in fp32 without TF32.

Choices the caption leaves open, and ours:
- Noise scaled per example, not per token: a layer's "original output" for one input is its
  whole (T, H) matrix, and Arora et al. (2018), whose notion of noise stability the paper builds
  on, scale the noise to the norm of a layer's whole output for one input. The two readings
  differ little here: every BERT layer ends in LayerNorm, so the tokens of one example have
  similar norms, and a Gaussian g spreads its norm evenly over the tokens.
- k runs over 0..L: 0 is the embedding output, where LNSR puts its noise by default. Noise on
  the output of layer k is what `--lnsr-layer k+1` regularizes. At r = k, relative_r = rho.
- The noise of example i at layer k is drawn from its own generator, seeded by (seed, k, i), on
  the CPU: the numbers do not depend on batch size, order or device, and two models measured
  with the same --seed (pretrained and fine-tuned) get the very same noise directions.
"""
import argparse
import csv
import io
import json
import math
import os
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bert.errors import InputError, existing_folder, folder_to_write

MATPLOTLIB_HINT = "matplotlib is not installed; `pip install matplotlib` to draw the plot"


# ----------------------------------------------------------------------------- the measurement

def noise_seed(seed: int, layer: int, example_id: int) -> int:
    """The seed of one example's noise at one injection layer (independent streams per pair)."""
    return int(np.random.SeedSequence([seed, layer, example_id]).generate_state(1, np.uint64)[0])


def masked_norm(x, token_mask):
    """L2 norm over the real tokens and hidden units of each example: (B, T, H) -> (B,), fp64."""
    return (x.double() * token_mask[:, :, None]).pow(2).sum(dim=(1, 2)).sqrt()


def scaled_noise(h_k, token_mask, ratio: float, seeds: list):
    """eps with ||eps_j|| = ratio * ||h_k_j|| per example j, Gaussian on real tokens, 0 on padding.

    h_k: (B, T, H); token_mask: (B, T) 0/1; seeds: one int per example (see noise_seed).
    """
    B, T, H = h_k.shape
    real = token_mask.bool().cpu()
    g = torch.zeros(B, T, H, dtype=torch.float64)                               # (B, T, H)
    for j, s in enumerate(seeds):
        n_real = int(real[j].sum())
        g[j, real[j]] = torch.randn((n_real, H), generator=torch.Generator().manual_seed(s)).double()
    scale = ratio * masked_norm(h_k, token_mask).cpu() / masked_norm(g, real.double())   # (B,)
    return (g * scale[:, None, None]).to(device=h_k.device, dtype=h_k.dtype)


@dataclass
class Attenuation:
    """Mean distances between clean and noisy outputs; [k, r] = noise at layer k, seen at layer r.

    Entries with r < k are NaN (noise injected at k cannot reach a lower layer).
    """
    relative: np.ndarray          # (L+1, L+1): mean over examples of ||h~_r - h_r|| / ||h_r||
    absolute: np.ndarray          # (L+1, L+1): mean over examples of ||h~_r - h_r||
    clean_norm: np.ndarray        # (L+1,): mean over examples of ||h_r||
    n_examples: int
    noise_ratio: float

    def rows(self):
        """One dict per (injection layer k, layer r >= k), for CSV files and tables."""
        L = len(self.clean_norm) - 1
        return [{"injection_layer": k, "layer": r, "relative_distance": float(self.relative[k, r]),
                 "absolute_distance": float(self.absolute[k, r]), "clean_norm": float(self.clean_norm[r])}
                for k in range(L + 1) for r in range(k, L + 1)]


@torch.no_grad()
def measure_noise_attenuation(bert, batches, noise_ratio: float = 0.05, seed: int = 0) -> Attenuation:
    """Figure 1's measurement on a BertModel over batches (dicts of input_ids, token_type_ids,
    attention_mask (B, T) and example_ids (B,), the ids that seed each example's noise)."""
    L = bert.config.num_hidden_layers
    was_training = bert.training
    bert.eval()
    sum_relative = np.zeros((L + 1, L + 1))
    sum_absolute = np.zeros((L + 1, L + 1))
    sum_norm = np.zeros(L + 1)
    n = 0
    device = next(bert.parameters()).device
    for batch in batches:
        mask = batch["attention_mask"].to(device)                                # (B, T)
        out = bert(batch["input_ids"].to(device), batch["token_type_ids"].to(device), mask)
        clean = out.hidden_states                                                # L+1 x (B, T, H)
        clean_norm = [masked_norm(h, mask) for h in clean]                       # L+1 x (B,)
        ids = batch["example_ids"].tolist()
        for k in range(L + 1):
            eps = scaled_noise(clean[k], mask, noise_ratio, [noise_seed(seed, k, i) for i in ids])
            noisy_k = clean[k] + eps
            # h~_{k+1..L}: layers k+1..L on the noisy output of layer k (= the input of layer k+1)
            noisy = [noisy_k] + (bert.run_layers(noisy_k, out.attn_mask, k + 1) if k < L else [])
            for r, noisy_r in enumerate(noisy, start=k):
                distance = masked_norm(noisy_r - clean[r], mask)                 # (B,)
                sum_absolute[k, r] += distance.sum().item()
                sum_relative[k, r] += (distance / clean_norm[r]).sum().item()
        sum_norm += np.array([c.sum().item() for c in clean_norm])
        n += len(ids)
    bert.train(was_training)
    if n == 0:
        raise InputError("noise-stability: no examples to measure")
    below = np.tril(np.ones((L + 1, L + 1), dtype=bool), k=-1)                  # r < k
    relative, absolute = sum_relative / n, sum_absolute / n
    relative[below] = absolute[below] = np.nan
    return Attenuation(relative=relative, absolute=absolute, clean_norm=sum_norm / n,
                       n_examples=n, noise_ratio=noise_ratio)


# ----------------------------------------------------------------------------- the command

@dataclass
class Subject:
    """One model to measure: the pretrained encoder or a fine-tuned run's."""
    name: str                     # shown in files and plots
    kind: str                     # "pretrained" or "fine-tuned"
    model_dir: Path               # checkpoint folder (also holds the tokenizer)
    dev_score: str | None = None  # "dev acc 66.07" from the run's results.json, for the plot


def read_run(run_dir: Path) -> tuple[dict, Subject]:
    """(the run's config.json, a Subject for its saved model), or an InputError saying what is missing."""
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise InputError(f"--run {run_dir}: not a run folder (no config.json)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        config["settings"]["task"]
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(f"{config_path}: unreadable ({e})") from None
    if not (run_dir / "model" / "model.safetensors").is_file():
        raise InputError(f"--run {run_dir}: no saved model (train with --save-model to keep one)")
    score = None
    try:
        r = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
        score = f"dev {r['metric']} {100 * r['dev'][r['metric']]:.2f}"
    except (OSError, ValueError, KeyError, TypeError):
        pass                                          # the plot simply shows no score
    return config, Subject(name=str(run_dir), kind="fine-tuned", model_dir=run_dir / "model", dev_score=score)


def subject_batches(subject, spec, split, data_dir, max_seq_length, max_samples, batch_size):
    """The split tokenized with the subject's own tokenizer, in padded batches whose example_ids
    are positions in the whole split (so --max-samples keeps each example's noise)."""
    import glue
    from bert.tokenizer import Tokenizer
    examples = glue.load_examples(spec.name, split, data_dir)
    keep = list(range(len(examples)))
    if max_samples is not None and max_samples < len(examples):
        keep = glue.subset_indices(len(examples), n=max_samples, seed=0)   # train.py's dev subset
    features = glue.encode([examples[i] for i in keep], Tokenizer.from_dir(subject.model_dir), max_seq_length)
    positions = torch.tensor(keep)
    for batch in glue.batches(features, batch_size, seed=None, bucket=True):   # longest first
        batch["example_ids"] = positions[batch["example_ids"]]
        yield batch


def pick_device(name):
    # Not train.pick_device: that one turns on TF32, whose rounding (~1e-3 of the activations)
    # is a visible fraction of a 5% perturbation.
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available (use --device cpu)")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def noise_stability_parser():
    p = argparse.ArgumentParser(
        prog="evaluate.py noise-stability",
        description="Figure 1 of Hua et al.: inject Gaussian noise of a fixed fraction of a layer's "
                    "output norm at each layer and measure how far it moves every higher layer.")
    p.add_argument("--model", help="pretrained checkpoint: folder, Hub id or preset (minilm-l6, ...)")
    p.add_argument("--run", help="a run folder saved with train.py --save-model (uses <run>/model)")
    p.add_argument("--task", help="GLUE task whose sentences are fed (default: the run's task)")
    splits = split_names()
    p.add_argument("--split", default="dev", type=str.lower, choices=splits, metavar="SPLIT",
                   help="split to feed: " + ", ".join(splits) + " (the task must have it; MNLI's dev and "
                        "test are its matched ones; default: dev; labels are not needed)")
    p.add_argument("--data-dir", default=None, help="GLUE data folder (default: the run's, or $GLUE_DIR or data/glue)")
    p.add_argument("--max-samples", type=int, default=None,
                   help="measure on a seeded random subset of this many examples (train.py's dev subset)")
    p.add_argument("--max-seq-length", type=int, default=None, help="default: the run's, else 128")
    p.add_argument("--batch-size", type=int, default=32,
                   help="examples per forward pass (no effect on the result; memory and speed only)")
    p.add_argument("--noise-ratio", type=float, default=0.05,
                   help="the injected noise's L2 norm as a fraction of the layer output's, per example "
                        "(the paper's Figure 1: 0.05)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise")
    p.add_argument("--output-dir", default=None, help="default: runs/noise_stability/<task>")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: cuda when available (default: auto)")
    return p


def split_names() -> list:
    """Every split name and alias of the GLUE tasks, in the order the tasks list them."""
    from glue.tasks import TASKS
    names = {}
    for spec in TASKS.values():
        names.update(dict.fromkeys([*spec.splits, *spec.aliases]))
    return list(names)


def cmd_noise_stability(argv):
    args = noise_stability_parser().parse_args(argv)

    import glue
    from bert.hub import resolve
    from bert.model import BertModel

    if not args.model and not args.run:
        raise InputError("noise-stability: give --model (pretrained), --run (fine-tuned), or both")
    if not math.isfinite(args.noise_ratio):              # float() reads 'nan' and 'inf' too
        raise InputError(f"--noise-ratio must be a finite number, got {args.noise_ratio}")
    if args.noise_ratio <= 0:
        raise InputError(f"--noise-ratio must be > 0, got {args.noise_ratio}")
    if args.seed < 0:
        raise InputError(f"--seed must be >= 0, got {args.seed}")
    for name in ("batch_size", "max_samples", "max_seq_length"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise InputError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.data_dir is not None:
        existing_folder(args.data_dir, "--data-dir")
    if args.output_dir is not None:
        folder_to_write(args.output_dir, "--output-dir")
    subjects, run_config = [], {}
    if args.model:
        subjects.append(Subject(name=args.model, kind="pretrained", model_dir=resolve(args.model)))
    if args.run:
        run_config, subject = read_run(Path(args.run))
        subjects.append(subject)
    settings = run_config.get("settings", {})
    if not args.task and not settings:
        raise InputError("noise-stability: --task is required with --model alone")
    spec = glue.get_task(args.task or settings["task"])
    split, _ = spec.split_layout(args.split)
    data_dir = args.data_dir or run_config.get("data_dir")
    max_seq_length = args.max_seq_length or settings.get("max_seq_length", 128)
    out_dir = Path(args.output_dir or Path("runs") / "noise_stability" / spec.name)
    device = pick_device(args.device)
    glue.ensure_task_data(spec.name, data_dir, splits=[split])

    results = []
    for subject in subjects:
        bert = BertModel.from_pretrained(subject.model_dir, verbose=False).to(device)   # a head is ignored
        if max_seq_length > bert.config.max_position_embeddings:
            raise InputError(f"--max-seq-length {max_seq_length}: {subject.name} has "
                             f"{bert.config.max_position_embeddings} positions")
        batches = subject_batches(subject, spec, split, data_dir, max_seq_length, args.max_samples,
                                  args.batch_size)
        att = measure_noise_attenuation(bert, batches, args.noise_ratio, args.seed)
        results.append((subject, att))
        print(f"{subject.kind} {subject.name}: {att.n_examples} {spec.name} {split} examples, "
              f"noise {args.noise_ratio:g} x ||h_k||", file=sys.stderr)
        print(format_table(att))

    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"task": spec.name, "split": split, "noise_ratio": args.noise_ratio, "seed": args.seed,
            "max_seq_length": max_seq_length, "max_samples": args.max_samples,
            "noise": "Gaussian on the real tokens of layer k's output, scaled per example to "
                     "noise_ratio x that output's L2 norm; layer 0 is the embedding output",
            "distance": "L2 norm over real tokens and hidden units per example, averaged over examples"}
    paths = [write_csv(out_dir / "noise_stability.csv", results),
             write_json(out_dir / "noise_stability.json", meta, results)]
    try:
        paths.append(plot_noise_attenuation(results, out_dir / "noise_stability.png",
                                            title=f"{spec.name} {split}, noise {100 * args.noise_ratio:g}% of ||h_k||"))
    except ImportError:
        print(MATPLOTLIB_HINT, file=sys.stderr)
    for path in paths:
        print(f"wrote {path}", file=sys.stderr)
    return 0


def format_table(att: Attenuation) -> str:
    """Relative distances as text: one row per injection layer k, one column per layer r."""
    L = len(att.clean_norm) - 1
    lines = ["k \\ r " + "".join(f"{r:>8d}" for r in range(L + 1))]
    for k in range(L + 1):
        lines.append(f"{k:5d} " + "".join(" " * 8 if r < k else f"{att.relative[k, r]:8.4f}"
                                          for r in range(L + 1)))
    return "\n".join(lines)


def write_text_atomically(path: Path, text: str) -> Path:
    """Write, then rename: a reader never finds half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_csv(path: Path, results) -> Path:
    buf = io.StringIO()
    columns = ["model", "kind", "injection_layer", "layer", "relative_distance", "absolute_distance",
               "clean_norm", "n_examples"]
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for subject, att in results:
        for row in att.rows():
            writer.writerow({"model": subject.name, "kind": subject.kind, **row, "n_examples": att.n_examples})
    return write_text_atomically(path, buf.getvalue())


def write_json(path: Path, meta: dict, results) -> Path:
    models = []
    for subject, att in results:
        L = len(att.clean_norm) - 1
        models.append({
            "name": subject.name, "kind": subject.kind, "model_dir": str(subject.model_dir),
            "dev_score": subject.dev_score, "n_examples": att.n_examples, "num_layers": L,
            "clean_norm": att.clean_norm.tolist(),
            "curves": [{"injection_layer": k, "layers": list(range(k, L + 1)),
                        "relative": att.relative[k, k:].tolist(), "absolute": att.absolute[k, k:].tolist()}
                       for k in range(L + 1)]})
    return write_text_atomically(path, json.dumps({**meta, "models": models}, indent=2) + "\n")


# ----------------------------------------------------------------------------- plots

def pyplot():
    """matplotlib.pyplot with a file-only backend; ImportError when matplotlib is missing."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_noise_attenuation(results, path: Path, title: str = "") -> Path:
    """Figure 1: one column per model, relative (top) and absolute (bottom) distance against the
    layer index, one curve per injection layer, coloured from the lowest to the highest."""
    plt = pyplot()
    from matplotlib import cm, colors
    fig, axes = plt.subplots(2, len(results), figsize=(5 * len(results) + 1.5, 7.5), squeeze=False,
                             sharey="row")
    norm = colors.Normalize(vmin=0, vmax=max(len(att.clean_norm) - 1 for _, att in results))
    for col, (subject, att) in enumerate(results):
        L = len(att.clean_norm) - 1
        for row, (values, label) in enumerate([(att.relative, r"$\|\tilde h_r - h_r\| \,/\, \|h_r\|$"),
                                               (att.absolute, r"$\|\tilde h_r - h_r\|$")]):
            ax = axes[row][col]
            for k in range(L + 1):
                ax.plot(range(k, L + 1), values[k, k:], marker="o", markersize=3, color=cm.viridis(norm(k)))
            if row == 0:
                ax.axhline(att.noise_ratio, color="grey", linestyle=":", linewidth=1)
                heading = f"{subject.kind}: {subject.name}"
                ax.set_title(heading + (f"\n({subject.dev_score})" if subject.dev_score else ""), fontsize=9)
            ax.set_xlabel("layer r (0 = embedding output)")
            if col == 0:
                ax.set_ylabel(label)
            ax.set_xticks(range(0, L + 1, max(1, (L + 1) // 12)))
            ax.grid(alpha=0.3)
    fig.colorbar(cm.ScalarMappable(norm=norm, cmap="viridis"), ax=axes.ravel().tolist(),
                 label="injection layer k (noise on its output)")
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


MAX_FIGURE_INCHES = 13.3         # x 120 dpi: at most 1600 pixels wide, readable on one screen


def plot_boxplot(groups, metrics: dict, path: Path, title: str = ""):
    """Figures 2 and 5: per task a box plot of the main metric for each method, seeds as dots.
    Returns the figure (the caller closes it): its dots carry the data drawn.

    One row of panels per task, so that the figure grows downwards with the tasks and stays at
    most 1600 pixels wide; a long row label (a method's differing options) is wrapped onto lines
    of its own under its box, so that neighbouring labels never overlap."""
    plt = pyplot()
    width = min(MAX_FIGURE_INCHES, max(5.0, 1.5 * max(len(g) for g in groups.values()) + 1.5))
    fig, axes = plt.subplots(len(groups), 1, figsize=(width, 3.4 * len(groups)), squeeze=False)
    for ax, (task, by_label) in zip(axes[:, 0], groups.items()):
        labels = list(by_label)
        ax.boxplot([by_label[m] for m in labels], widths=0.5, showfliers=False)
        jitter = np.random.default_rng(0)               # dots spread sideways, same picture every time
        for i, m in enumerate(labels, start=1):
            x = i + jitter.uniform(-0.12, 0.12, len(by_label[m]))
            ax.plot(x, by_label[m], "o", markersize=3, alpha=0.6, color="tab:blue", label=m)
        ax.set_xticks(range(1, len(labels) + 1))
        ax.set_xticklabels([textwrap.fill(m, BOX_LABEL_CHARS, break_on_hyphens=False) for m in labels], fontsize=8)
        ax.set_ylabel(f"{task} {metrics.get(task, '')} (%)")
        ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path, title)


BOX_LABEL_CHARS = 22             # a box plot's labels wrap at this many characters a line


def close(fig):
    pyplot().close(fig)


def plot_curves(groups, metrics: dict, path: Path, title: str = ""):
    """Figure 3: per task, the main metric at each epoch's end, mean over seeds (line) and the
    range of the seeds (band), the scored set solid and the training sample dashed, one color
    per row label. Returns the figure (the caller closes it): its lines carry the data drawn."""
    plt = pyplot()
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(len(groups), 1, figsize=(7.5, 3.4 * len(groups)), squeeze=False)
    every_label = list(dict.fromkeys(label for by_label in groups.values() for label in by_label))
    for ax, (task, by_label) in zip(axes[:, 0], groups.items()):
        for label, sets in by_label.items():
            color = colors[every_label.index(label) % len(colors)]      # one color per arm in every panel
            for name, by_epoch in sets.items():
                epochs = sorted(by_epoch)
                values = [np.asarray(by_epoch[e], dtype=float) for e in epochs]
                train = name == "train_sample"
                shown = "train sample" if train else name.replace("_", "-")
                ax.plot(epochs, [v.mean() for v in values], "--" if train else "-", marker="o", markersize=3,
                        color=color, label=f"{label}, {shown}")
                ax.fill_between(epochs, [v.min() for v in values], [v.max() for v in values], color=color,
                                alpha=0.12, linewidth=0)
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        finish_panel(ax, f"{task} {metrics.get(task, '')} (%)")
    return save_figure(fig, path, title)


def finish_panel(ax, ylabel):
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    labels = ax.get_legend_handles_labels()[1]
    if len(labels) > 6 or max(map(len, labels), default=0) > 30:   # a big legend would cover the lines
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.legend(fontsize=7, loc="best")


def save_figure(fig, path, title):
    """Title, layout and the PNG; the figure is returned open (its lines carry the data drawn)."""
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")                 # legends beside a panel too
    return fig


def plot_dose(groups, metrics: dict, path: Path, title: str = "", baseline: str = "ft"):
    """Per task, each run's score (dots) against its penalty/loss ratio at the start (log scale),
    and per strength the mean of its seeds (squares, joined in order of ratio), one color per
    method and reading; the baseline's mean as a horizontal line. Returns the figure (the caller
    closes it): its lines carry the data drawn."""
    plt = pyplot()
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(len(groups), 1, figsize=(7.5, 3.4 * len(groups)), squeeze=False)
    for ax, (task, by_series) in zip(axes[:, 0], groups.items()):
        for i, (series, points) in enumerate(by_series.items()):
            color = colors[i % len(colors)]
            scores = np.array([score for _, score, _, _ in points])
            if series == baseline:
                ax.axhline(scores.mean(), color="black", linestyle=":", label=f"{baseline} mean (n={len(points)})")
                continue
            ratios = np.array([ratio for ratio, _, _, _ in points])
            ax.plot(ratios, scores, "o", color=color, alpha=0.4, markersize=3)
            # One point per strength: the mean ratio and mean score of its seeds, joined in order.
            levels = {}
            for ratio, score, _, strength in points:
                levels.setdefault(strength, []).append((ratio, score))
            means = sorted((np.mean([r for r, _ in v]), np.mean([s for _, s in v])) for v in levels.values())
            ax.plot([m[0] for m in means], [m[1] for m in means], "-s", color=color, markersize=5, label=series)
        ax.set_xscale("log")
        ax.set_xlabel("penalty / task loss at the start of training")
        finish_panel(ax, f"{task} {metrics.get(task, '')} (%)")
    return save_figure(fig, path, title)
