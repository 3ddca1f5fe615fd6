"""An exponential moving average of a model's weights (Model Garden's `ema`,
d2go's `MODEL_EMA`), kept in a second instance of the model.

The average lives in a model of its own, built as the trained one, so that it
is saved in the checkpoint under `ema/` with the model's own object graph:
`runner.restore_model` restores it into a fresh model by name (Keras' layer
names do not survive a second model in one process, the object graph does),
and evaluation, prediction and export use it whenever a checkpoint has one
(`restore_model.average_weights`).

Every floating-point variable is averaged, batch-norm statistics included
(as d2go and timm average the whole state dict); a variable that does not
change (a frozen stage, a frozen norm) keeps its value exactly.
"""

import tensorflow as tf
from absl import logging


def _local(variable):
    """The tf.Variable (mirrored or not) behind a Keras 3 variable."""
    # Keras 3's TF variables wrap theirs in `_value`; tf.distribute needs the
    # wrapped one to list its per-device copies.
    return getattr(variable, "_value", variable)


class WeightAverage:
    """average <- average - (1 - d) * (average - weights) after each step.

    With `warmup`, d = min(decay, (1 + step) / (10 + step)) (TensorFlow's
    ExponentialMovingAverage with `num_updates`, Model Garden's
    `dynamic_decay`): early steps, whose weights are far from the end, fade
    quickly. The form `a - (1 - d) * (a - w)` leaves an unchanged variable
    bit-exact.
    """

    def __init__(self, model, average, strategy, *, decay, warmup=True, xla=False):
        """
        Args:
          model: the trained keras.Model, built.
          average: a second instance of it, built the same way (same
            variables in the same order), in `strategy`'s scope.
          strategy: the tf.distribute.Strategy of both.
          decay: float in (0, 1), e.g. 0.9998.
          warmup: bool, the dynamic decay above.
          xla: bool, compile each device's update into one program.

        Raises:
          ValueError: `decay` out of range, or the two models' variables differ.
        """
        if not 0.0 < decay < 1.0:
            raise ValueError(f"train.ema_decay={decay} must be in (0, 1), e.g. 0.9998")
        theirs, ours = model.variables, average.variables
        if len(theirs) != len(ours):
            raise ValueError(f"the averaged model has {len(ours)} variables, the trained "
                             f"one {len(theirs)}: model_fn must build the same model")
        for w, a in zip(theirs, ours):
            if tuple(w.shape) != tuple(a.shape) or w.dtype != a.dtype:
                raise ValueError(f"averaged variable {a.path} {a.shape} {a.dtype} does "
                                 f"not pair with {w.path} {w.shape} {w.dtype}")
        self.model, self.average, self.strategy = model, average, strategy
        self.decay, self.warmup, self.xla = float(decay), bool(warmup), bool(xla)
        self._all = list(zip(ours, theirs))
        self._floats = [(a, w) for a, w in self._all if tf.as_dtype(w.dtype).is_floating]
        self._programs = {}   # device index -> its compiled update

    def decay_at(self, step):
        """float32 scalar: the decay of the update after step `step` (int64)."""
        decay = tf.constant(self.decay, tf.float32)
        if self.warmup:
            step = tf.cast(step, tf.float32)
            decay = tf.minimum(decay, (1.0 + step) / (10.0 + step))
        return decay

    def reset(self):
        """average <- weights (eagerly, in cross-replica context)."""
        for a, w in self._all:
            a.assign(w)
        logging.info("Weight average (decay %g%s) starts from the model's weights",
                     self.decay, ", warm-up (1 + step) / (10 + step)" if self.warmup else "")

    def update(self, step):
        """Moves the average towards the weights; in cross-replica context
        (the train step's tf.function, after the replicas' step)."""
        decay = self.decay_at(step)
        first = self.strategy.experimental_local_results(_local(self._floats[0][0]))

        def on_device(component, decay):
            # Once per device, with that device's copies: no transfer.
            index = next(k for k, c in enumerate(first) if c is component)
            if index not in self._programs:
                pairs = [(self.strategy.experimental_local_results(_local(a))[index],
                          self.strategy.experimental_local_results(_local(w))[index])
                         for a, w in self._floats]

                def apply(decay):
                    for a, w in pairs:
                        rate = tf.cast(1.0 - decay, a.dtype)
                        a.assign_sub(rate * (a - tf.cast(w, a.dtype)))

                self._programs[index] = tf.function(apply, jit_compile=self.xla,
                                                    autograph=False)
            return self._programs[index](decay)

        self.strategy.extended.update(_local(self._floats[0][0]), on_device,
                                      args=(decay,), group=False)
