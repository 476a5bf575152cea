"""The interface every fine-tuning method implements: a penalty added to the task loss.

The training loop (train.py) does, for every batch,

    outputs = model(**inputs)                     # one clean forward pass
    penalty = method.penalty(model, batch, outputs)                   # a tensor, or None
    loss = task_loss(outputs.logits, labels) + penalty                # or the task loss alone
    loss.backward(); clip; optimizer.step(); method.after_step(model); scheduler.step()

and calls `method.setup(model, seed)` once before the first step. Beyond these calls it reads
only the class attributes below (`name`, `Options`, `reads_hidden_states`, `needs_fp32`), so a
new method is one new file with a `Regularizer` subclass and one line in
regularizers/__init__.py.

What a method gets and what it may change:
- `setup` gets the model with its pretrained weights and new head, in training mode, and a
  seed for the method's own random stream (derived from the run's seed, and from the rank in a
  data-parallel run). It may register hooks on the model's modules (FT+Noise adds its noise
  with one; regularizers/replay.py records the clean pass's dropout state with one) and keep
  generators and modules of its own (saved in checkpoints, see below). It adds no tensors or
  attributes to the model (hooks are allowed); a hook may choose how a layer computes where
  bert/speed.py offers a choice (LNSR's jvp estimator has layers b..L written out as plain
  tensor operations, bert/speed.py::write_out).
- `penalty` gets the batch and the clean pass's outputs (logits, every hidden state, the
  attention mask). It may run the model or some of its layers again. A gradient with respect
  to a hidden state should be taken at a tensor the method adds itself (SMART's delta, added
  in a hook): on a CPU the intermediate hidden states are side outputs of autograd's graph
  (bert/model.py::BertOutput), so their own gradients miss what reaches them through later
  layers. A second pass that should
  see the clean pass's dropout masks runs inside a `DropoutReplay` (regularizers/replay.py),
  which also leaves the global random generator where the clean pass left it; a pass with
  fresh masks draws from that generator like any forward pass.
- `after_step` runs after the optimizer's step, with gradients still on the weights.
- `reads_hidden_states` tells train.py that the penalty reads the last layer at every position.

A method's hyperparameters live in a dataclass named by its `Options` attribute. train.py turns
each field into a typed command-line flag `--<method>-<field>` (underscores become dashes) with
the field's `help` metadata as its --help text, and records the values in the run's config.json.
Validate values in the dataclass's `__post_init__` and raise `InputError` with one clear line.
"""
import torch


class Regularizer:
    name = "ft"           # the name used on the command line and in run folders
    Options = None        # a dataclass type holding the method's hyperparameters, or None
    # True if `penalty` reads outputs.hidden_states, the last layer's included, at every
    # position. Otherwise the model's last layer computes the [CLS] position only (all the
    # logits need; see BertModel.cls_only_last_layer) and hidden_states[L] is (B, 1, H).
    reads_hidden_states = False
    # True if the method perturbs inputs or hidden states by amounts below the resolution of
    # bf16 and TF32 (LNSR, FT+Noise, SMART, R3F): train.py then runs every arm of the command in
    # full fp32 (see numerics.numeric_recipe), since in those formats the noise is rounded away.
    needs_fp32 = False

    def __init__(self, options=None):
        self.options = options

    def check(self, config) -> None:
        """Called with the model's BertConfig before any run of a command starts: raise
        InputError for options that do not fit this model (a layer it does not have, say), so
        that a grid of runs stops before the first one instead of at the first run of this method.
        """

    def setup(self, model, seed: int) -> None:
        """Called once, after the pretrained model is loaded and before training.

        `seed` seeds the method's own random stream (noise, masks): train.py derives it from
        the run's seed (and the rank of a data-parallel run), apart from the other streams.
        """

    def penalty(self, model, batch: dict, outputs) -> torch.Tensor | None:
        """The term added to the task loss for this batch (None: nothing to add).

        `batch` holds the batch's tensors (input_ids, token_type_ids, attention_mask, labels);
        `outputs` is what the clean forward pass returned (logits, hidden_states, ...), so a
        method can reuse it instead of running the model again.
        """
        return None

    def after_step(self, model) -> None:
        """Called after each optimizer step (e.g. to update a moving-average teacher)."""

    # A mid-run checkpoint (checkpoint.py) saves what a method changes while training, so that a
    # stopped run goes on with the same bits. The defaults find it among the method's attributes:
    # every torch.Generator (its random stream) and every nn.Module (SMART's teacher). A method
    # that keeps other changing state overrides these.

    def generators(self) -> dict:
        """The method's own random streams by attribute name (saved per data-parallel rank)."""
        return {name: g for name, g in vars(self).items() if isinstance(g, torch.Generator)}

    def state_dict(self) -> dict:
        """The weights of every module the method holds, by attribute name."""
        return {name: m.state_dict() for name, m in vars(self).items() if isinstance(m, torch.nn.Module)}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != set(self.state_dict()):
            raise KeyError(f"method state {sorted(state)} is not {sorted(self.state_dict())}")
        for name, module_state in state.items():
            getattr(self, name).load_state_dict(module_state)


class FineTune(Regularizer):
    """Plain fine-tuning (Devlin et al., 2019): the task loss alone."""
    name = "ft"

