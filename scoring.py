"""A model's outputs on a set of examples: the task loss, predictions in eval mode, and the
scores of a learning curve (--curves)."""
import math

import numpy as np
import torch
import torch.nn.functional as F

import glue
from numerics import autocast

MODEL_INPUTS = ("input_ids", "token_type_ids", "attention_mask")
CURVE_TRAIN_SAMPLE = 512  # training examples scored at each epoch's end with --curves


def task_loss(logits, labels, is_regression):
    if is_regression:          # STS-B: MSE between a (B,) prediction and a (B,) target
        return F.mse_loss(logits.squeeze(-1).float(), labels.float())
    return F.cross_entropy(logits.float(), labels)


def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def logits_of(model, features, batch_size, device, precision, on_batch=None):
    """(example_ids, logits) per batch, in eval mode, longest examples first: batches of similar
    lengths waste the least padding. on_batch(done, total), if given, is called before each
    batch (progress lines). Leaves the model in eval mode."""
    model.eval()
    cls_only = model.bert.cls_only_last_layer
    model.bert.cls_only_last_layer = True                 # only the logits are read here
    n_batches = math.ceil(len(features.input_ids) / batch_size)
    try:
        for i, batch in enumerate(glue.batches(features, batch_size, seed=None, bucket=True)):
            if on_batch is not None:
                on_batch(i, n_batches)
            batch = to_device(batch, device)
            with autocast(device, precision):
                logits = model(*(batch[k] for k in MODEL_INPUTS)).logits.float()      # (B, labels)
            yield batch["example_ids"].tolist(), logits
    finally:
        model.bert.cls_only_last_layer = cls_only


def predict(model, features, batch_size, device, precision, on_batch=None):
    """Predictions in the order of `features`: class ids, or scores for regression."""
    out = [None] * len(features.input_ids)
    for ids, logits in logits_of(model, features, batch_size, device, precision, on_batch):
        preds = logits.squeeze(-1) if model.num_labels == 1 else logits.argmax(-1)
        for i, p in zip(ids, preds.tolist()):
            out[i] = p
    return out


def score_set(model, features, spec, batch_size, device, precision) -> dict:
    """The task's main metric (in percent) and mean task loss of the model on `features`: one
    point of a learning curve."""
    out, loss_sum = [None] * len(features.input_ids), 0.0
    for ids, logits in logits_of(model, features, batch_size, device, precision):
        labels = torch.tensor([features.labels[i] for i in ids], device=logits.device,
                              dtype=torch.float32 if spec.is_regression else torch.long)
        loss_sum += task_loss(logits, labels, spec.is_regression).item() * len(ids)
        preds = logits.squeeze(-1) if model.num_labels == 1 else logits.argmax(-1)
        for i, p in zip(ids, preds.tolist()):
            out[i] = p
    metric = glue.compute_metrics(spec.name, out, features.labels)[spec.main_metric]
    return {"metric": 100.0 * metric, "loss": loss_sum / len(out)}


def curve_point(model, spec, scored_features, scored, train_sample, step, steps_per_epoch, batch_size,
                device, precision) -> dict:
    """A log.jsonl line of the learning curves: metric (percent) and mean task loss on the scored
    set and on the fixed training sample, at this step (the end of an epoch)."""
    return {"step": step, "epoch": round(step / steps_per_epoch, 3),
            "curves": {scored: score_set(model, scored_features, spec, batch_size, device, precision),
                       "train_sample": score_set(model, train_sample, spec, batch_size, device, precision)}}


def prediction_spread(predictions, is_regression) -> dict:
    """How the dev predictions spread, to tell a run that collapsed to one answer: how many
    examples each class got (classification), or the scores' standard deviation (regression)."""
    if is_regression:
        return {"std": float(np.std(np.asarray(predictions, dtype=np.float64)))}
    classes, counts = np.unique(np.asarray(predictions), return_counts=True)
    return {"class_counts": {str(int(c)): int(n) for c, n in zip(classes, counts)}}
