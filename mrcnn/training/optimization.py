"""SGD with linear warm-up and step decay (the Mask R-CNN 1x schedule) or cosine decay.

The learning rate scales linearly with the global batch from 0.02 at batch 16
(Goyal et al., "Accurate, Large Minibatch SGD", §2.1), warms up linearly from
`warmup_factor * lr` over `warmup_steps`, and drops by 10x at each boundary
(epochs 8 and 11 of 12 in the 1x recipe, as Detectron2's 60k/80k of 90k at
batch 16). Weight decay is L2 regularisation coupled to the gradient, as in
Detectron2 and torch.optim.SGD (`g += wd * w` before momentum), which with
momentum 0.9 decays ~10x more than Keras' decoupled `weight_decay`; it skips
biases and normalisation parameters. `schedule='cosine'` decays instead from
the base rate to `end_factor` of it along half a cosine over the run
(Detectron2's WarmupCosineLR with SOLVER.BASE_LR_END), the same warm-up first.
"""

import collections
import math

import gin
import keras
import tensorflow as tf

# Variables whose names contain these get no weight decay: biases and the
# affine parameters of normalisation layers (Keras names them gamma/beta).
NO_DECAY_NAMES = ("bias", "gamma", "beta")


Optimization = collections.namedtuple(
    "Optimization", ["optimizer", "schedule", "weight_decay"])


def decays(variable):
    """Whether L2 weight decay applies to a variable (not biases, not norms)."""
    name = variable.name.split("/")[-1].split(":")[0]
    return not any(n in name for n in NO_DECAY_NAMES)


def l2_penalty(variables, weight_decay):
    """float32 scalar `0.5 * weight_decay * sum(w**2)` over decayed variables.

    Added to the loss, its gradient is `weight_decay * w`: coupled decay.
    """
    squares = [tf.reduce_sum(tf.square(tf.cast(v, tf.float32)))
               for v in variables if decays(v)]
    if not squares or not weight_decay:
        return tf.constant(0.0, tf.float32)
    return 0.5 * weight_decay * tf.add_n(squares)


def _warmup(step, warmup_steps, warmup_factor):
    """float32 factor rising linearly from `warmup_factor` to 1 over `warmup_steps`."""
    if warmup_steps <= 0:
        return 1.0
    alpha = tf.minimum(step / warmup_steps, 1.0)
    return warmup_factor * (1.0 - alpha) + alpha


class WarmupStepDecay(keras.optimizers.schedules.LearningRateSchedule):
    """lr(step): linear warm-up from `base_lr * warmup_factor`, then x`decay_rate` at each boundary."""

    def __init__(self, base_lr, boundaries, warmup_steps=1000, warmup_factor=0.001,
                 decay_rate=0.1):
        self.base_lr = float(base_lr)
        self.boundaries = [int(b) for b in boundaries]
        self.warmup_steps = int(warmup_steps)
        self.warmup_factor = float(warmup_factor)
        self.decay_rate = float(decay_rate)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        lr = tf.constant(self.base_lr, tf.float32)
        for boundary in self.boundaries:
            lr = tf.where(step >= boundary, lr * self.decay_rate, lr)
        return lr * _warmup(step, self.warmup_steps, self.warmup_factor)

    def get_config(self):
        return {"base_lr": self.base_lr, "boundaries": self.boundaries,
                "warmup_steps": self.warmup_steps,
                "warmup_factor": self.warmup_factor, "decay_rate": self.decay_rate}


class WarmupCosineDecay(keras.optimizers.schedules.LearningRateSchedule):
    """lr(step): the same linear warm-up, times a half cosine from `base_lr` at
    step 0 to `base_lr * end_factor` at `total_steps` (flat after it)."""

    def __init__(self, base_lr, total_steps, warmup_steps=1000, warmup_factor=0.001,
                 end_factor=0.0):
        self.base_lr = float(base_lr)
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.warmup_factor = float(warmup_factor)
        self.end_factor = float(end_factor)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        progress = tf.minimum(step / max(self.total_steps, 1), 1.0)
        cosine = 0.5 * (1.0 + tf.cos(math.pi * progress))
        lr = self.base_lr * (self.end_factor + (1.0 - self.end_factor) * cosine)
        return lr * _warmup(step, self.warmup_steps, self.warmup_factor)

    def get_config(self):
        return {"base_lr": self.base_lr, "total_steps": self.total_steps,
                "warmup_steps": self.warmup_steps,
                "warmup_factor": self.warmup_factor, "end_factor": self.end_factor}


_SCHEDULES = ("step", "cosine")


@gin.configurable(denylist=["global_batch", "steps_per_epoch", "total_steps"])
def build_optimizer(global_batch, steps_per_epoch, total_steps, *,
                    base_learning_rate=0.02, base_batch_size=16, momentum=0.9,
                    weight_decay=1e-4, warmup_steps=1000, warmup_factor=0.001,
                    decay_epochs=(8, 11), decay_steps=None, clip_norm=None,
                    precision="float32", schedule="step", end_factor=0.0):
    """SGD-momentum for the 1x recipe, scaled to `global_batch`.

    Args:
      global_batch: int, images per step over all replicas.
      steps_per_epoch: int, to turn `decay_epochs` into steps.
      total_steps: int, warm-up is capped at a tenth of a short run.
      base_learning_rate: float, lr at `base_batch_size` images per step.
      base_batch_size: int, the batch `base_learning_rate` belongs to.
      momentum: float.
      weight_decay: float, L2 coefficient (coupled, see module docstring);
        the train step adds `l2_penalty` to the loss.
      warmup_steps, warmup_factor: linear warm-up length and starting factor.
      decay_epochs: epochs at which lr drops 10x; ignored if `decay_steps`
        (both are for `schedule='step'`).
      decay_steps: explicit step boundaries.
      clip_norm: optional global gradient-norm clip.
      precision: 'float32', 'bfloat16' or 'float16'; float16 wraps the
        optimizer in dynamic loss scaling.
      schedule: 'step' (WarmupStepDecay, the 1x recipe's) or 'cosine'
        (WarmupCosineDecay over `total_steps`).
      end_factor: float, with 'cosine', the last step's lr over the base lr.

    Returns:
      Optimization(optimizer, schedule, weight_decay).
    """
    if schedule not in _SCHEDULES:
        raise ValueError(f"build_optimizer: schedule={schedule!r} must be one of "
                         f"{_SCHEDULES}")
    lr = base_learning_rate * global_batch / base_batch_size
    warmup = min(int(warmup_steps), max(total_steps // 10, 1))
    if schedule == "cosine":
        lr_schedule = WarmupCosineDecay(lr, total_steps, warmup, warmup_factor, end_factor)
    else:
        if decay_steps is None:
            decay_steps = [int(e * steps_per_epoch) for e in decay_epochs]
        lr_schedule = WarmupStepDecay(lr, decay_steps, warmup, warmup_factor)
    # clip_norm applies to each replica's share of the gradient (Keras clips
    # before the cross-replica sum).
    optimizer = keras.optimizers.SGD(
        learning_rate=lr_schedule, momentum=momentum, global_clipnorm=clip_norm)
    if precision == "float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return Optimization(optimizer, lr_schedule, float(weight_decay))
