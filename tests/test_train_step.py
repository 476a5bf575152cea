"""train.py's step against one written out here: Algorithm 1's lines 13-14 as plain torch.

    g = clip( grad [ L(f(x; theta), y) + R ] )        clip: torch.nn.utils.clip_grad_norm_
    theta <- optimizer step with g at the scheduled lr

The reference below starts from the model train.py starts from (`train.initial_model`, line 1),
walks the same batches with the same dropout masks, computes the task loss with torch's own
functions (cross-entropy, or MSE on STS-B's one output), adds the method's penalty, clips and
steps. train.py's saved weights must equal it, and must differ from the same loop without the
penalty and without the clipping: the test would see either one dropped. The scores are checked
the same way: STS-B's dev Pearson and Spearman from the reference model's raw outputs, one
example at a time (no batching or padding), through scipy."""
import json

import numpy as np
import pytest
import scipy.stats
import torch
import torch.nn.functional as F

import glue
import optim
import tiny
import train
from bert.model import BertClassifier
from cli import build_parser, method_options, run_settings
from numerics import native_bf16, numeric_recipe
from progress import StatusLine
from scoring import MODEL_INPUTS
from sweep import check_command, load_data

GLUE_DIR = tiny.GLUE_DIR
pytestmark = tiny.NEEDS_RTE_AND_EMBEDDED_MODEL

MAX_GRAD_NORM = 0.01              # below every step's gradient norm: the clipping acts at every step
LR = 1e-3                         # large enough that a dropped term moves the weights far past rounding


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny.tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model")


def flags(model_dir, task, method):
    return ["--task", task, "--model", str(model_dir), "--data-dir", str(GLUE_DIR), "--max-train-samples", "24",
            "--max-eval-samples", "16", "--batch-size", "8", "--epochs", "1", "--max-seq-length", "32",
            "--threads", "1", "--seed", "2", "--precision", "fp32", "--warmup", "0", "--lr", str(LR), "--weight-decay", "0",
            "--max-grad-norm", str(MAX_GRAD_NORM), *method]


def reference_steps(argv, penalty=True, clip=True):
    """theta after one epoch, stepped here; and the gradient norm before clipping at each step."""
    args = build_parser(train.TrainConfig()).parse_args(argv)
    spec, device, _ = check_command(args)
    data = load_data(args, spec, device, StatusLine(), argv)
    method_cls, options = method_options(args.method, args)
    method = method_cls(options)
    args.recipe = numeric_recipe(args.precision, [method], device.type, native_bf16(device))
    assert args.recipe.precision == "fp32"                 # no autocast in the loop below
    settings = run_settings(args, spec, args.method, args.seed)
    model = train.initial_model(data, spec, method, args.seed, settings["init_seed"], device)
    model.train()
    train_set = data.train.subset(args.max_train_samples, None, train.stream_seed(settings["data_seed"], "subset"))
    batches = glue.batches(train_set, args.batch_size, seed=train.stream_seed(settings["data_seed"], "order"), epoch=0)
    optimizer = optim.make_optimizer(model, args.optimizer, args.lr, args.weight_decay)
    norms = []
    for step, batch in enumerate(batches):
        for group in optimizer.param_groups:          # linear decay from LR to 0, no warm-up
            group["lr"] = args.lr * (len(batches) - step) / len(batches)
        torch.manual_seed(train.stream_seed(args.seed, "dropout", step))
        outputs = model(*(batch[k] for k in MODEL_INPUTS))
        if spec.is_regression:
            loss = F.mse_loss(outputs.logits[:, 0], batch["labels"].float())
        else:
            loss = F.cross_entropy(outputs.logits, batch["labels"])
        R = method.penalty(model, batch, outputs)
        total = loss + R if (penalty and R is not None) else loss
        total.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM if clip else float("inf")))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model, norms, data, spec


def trained(tmp_path, argv):
    assert train.main(argv + ["--save-model", "--output-dir", str(tmp_path)]) == 0
    run = next(tmp_path.glob("*/*/seed2"))
    results = json.loads((run / "results.json").read_text())
    return BertClassifier.from_pretrained(run / "model", num_labels=1 if "STS" in run.parts[-3] else 2,
                                          verbose=False), results


def largest_difference(a, b):
    return max((p - q).abs().max().item() for p, q in zip(a.state_dict().values(), b.state_dict().values()))


CASES = {
    "lnsr on RTE": ("rte", ["--method", "lnsr", "--lnsr-sigma", "0.05"]),
    "lnsr on STS-B": ("sts-b", ["--method", "lnsr", "--lnsr-sigma", "0.05"]),
    "l2sp on RTE (its penalty's gradient is 0 at step 1 only)": ("rte", ["--method", "l2sp", "--l2sp-alpha", "10"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_train_py_steps_theta_by_the_clipped_gradient_of_loss_plus_penalty(model_dir, tmp_path, case):
    task, method = CASES[case]
    argv = flags(model_dir, task, method)
    model, results = trained(tmp_path, argv)
    reference, norms, _, _ = reference_steps(argv)
    assert all(norm > MAX_GRAD_NORM for norm in norms)           # the clipping acted at every step
    assert largest_difference(model, reference) <= 1e-7
    # The test can fail: the loop without the penalty, or without the clipping, lands elsewhere.
    without_penalty, _, _, _ = reference_steps(argv, penalty=False)
    without_clipping, _, _, _ = reference_steps(argv, clip=False)
    assert largest_difference(model, without_penalty) > 1e-5
    assert largest_difference(model, without_clipping) > 1e-5


def test_sts_b_is_scored_on_the_raw_outputs_by_pearson_and_spearman(model_dir, tmp_path):
    argv = flags(model_dir, "sts-b", ["--method", "ft"])
    _, results = trained(tmp_path, argv)
    reference, _, data, spec = reference_steps(argv)
    assert spec.is_regression and results["metric"] == "pearson_and_spearman"
    reference.eval()
    dev = data.dev.subset(16, None, train.EVAL_SUBSET_SEED)
    scores = []
    with torch.no_grad():
        for ids, types in zip(dev.input_ids, dev.token_type_ids):        # one example, no padding
            ids, types = torch.tensor([ids]), torch.tensor([types])
            scores.append(reference(ids, types, torch.ones_like(ids)).logits[0, 0].item())
    pearson = scipy.stats.pearsonr(scores, dev.labels)[0]
    spearman = scipy.stats.spearmanr(scores, dev.labels)[0]
    assert results["dev"]["pearson"] == pytest.approx(pearson, abs=1e-5)
    assert results["dev"]["spearman"] == pytest.approx(spearman, abs=1e-5)
    assert results["dev"]["pearson_and_spearman"] == pytest.approx((pearson + spearman) / 2, abs=1e-5)
    spread = results["dev_predictions"]
    assert spread["std"] == pytest.approx(float(np.std(scores)), rel=1e-4)       # a spread, not one answer
