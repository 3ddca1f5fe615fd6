"""Normalisation after a convolution, with Detectron2's conventions.

One place for what the backbone, the FPN and the heads share: batch norm
with epsilon 1e-5 and momentum 0.9 (PyTorch's momentum 0.1), GroupNorm with
32 groups (Detectron2 `get_norm`; Wu & He 2018). The ResNet adds its frozen
batch norm (`resnet.FrozenBatchNorm`) on top of these.

Names (`norm=`): None or '' (no norm: the conv keeps its bias), 'bn' (Keras
BatchNormalization, batch statistics in training), 'sync_bn' (the same,
synchronised across replicas), 'gn' (GroupNormalization). A conv followed by
a norm has no bias, as in Detectron2 (`bias=not norm`).

The RoI heads' batch norms are `MaskedBatchNorm` (`make_norm(...,
masked=True)`): a head's static-shape batch holds padded slots (and, for the
mask head, negatives) that must not count in the statistics.
"""

import keras
import tensorflow as tf

BN_EPSILON = 1e-5
# Keras momentum 0.9 is PyTorch's BatchNorm momentum 0.1 (Detectron2's).
BN_MOMENTUM = 0.9
GN_GROUPS = 32

NORMS = ("bn", "sync_bn", "gn")


def check(norm, owner, allowed=NORMS):
    """`norm` as a layer's config keeps it: None (for None or '') or one of
    `allowed`; a ValueError naming `owner` ('FPN', 'BoxHead', ...) otherwise."""
    if norm in (None, ""):
        return None
    if norm not in allowed:
        raise ValueError(f"{owner}: norm={norm!r} must be None or one of {tuple(allowed)}")
    return norm


def make_norm(norm, name, channels=None, masked=False):
    """A new normalisation layer for `norm` in NORMS, named `name`.

    `channels`, when given, must split into GN_GROUPS groups with 'gn'.
    `masked`: the batch norms are `MaskedBatchNorm` (called with `valid`).
    """
    if norm in ("bn", "sync_bn") and masked:
        return MaskedBatchNorm(synchronized=norm == "sync_bn", name=name)
    if norm in ("bn", "sync_bn"):
        return keras.layers.BatchNormalization(
            momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
            synchronized=norm == "sync_bn", name=name)
    if norm == "gn":
        if channels is not None and channels % GN_GROUPS:
            raise ValueError(f"{name}: {channels} channels do not split into "
                             f"GroupNorm's {GN_GROUPS} groups")
        return keras.layers.GroupNormalization(groups=GN_GROUPS, epsilon=BN_EPSILON,
                                               name=name)
    raise ValueError(f"{name}: norm={norm!r} must be one of {NORMS}")


@keras.saving.register_keras_serializable(package="mrcnn")
class MaskedBatchNorm(keras.layers.Layer):
    """Batch norm whose training statistics count only the rows `valid` selects.

    `y = (x - mean) / sqrt(var + eps) * gamma + beta` per channel. In
    training, mean and (biased) variance are over the valid rows of the
    batch, and with `synchronized` over those of every replica (one
    all-reduce of count, sum and sum of squares): Detectron2's
    `NaiveSyncBatchNorm(stats_mode='N')` for its heads, where each GPU
    holds only its real rois. The moving statistics follow them with
    `momentum` (PyTorch's 1 - momentum), and stay when no row anywhere is
    valid. At inference they replace the batch's. gamma, beta and the
    statistics are float32; the arithmetic too, the output in x's dtype.

    Args:
      momentum, epsilon: floats (0.9, 1e-5: PyTorch's and Detectron2's).
      synchronized: bool, statistics over all replicas.

    Call:
      x: [N, ..., C], rows along the first axis.
      valid: bool [N] or None (every row), the rows that count.
      training: bool.
    """

    def __init__(self, *, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, synchronized=False,
                 **kwargs):
        super().__init__(**kwargs)
        self.momentum = float(momentum)
        self.epsilon = float(epsilon)
        self.synchronized = bool(synchronized)

    def build(self, input_shape, valid_shape=None):
        channels = (input_shape[-1],)
        self.gamma = self.add_weight(name="gamma", shape=channels, initializer="ones",
                                     autocast=False)
        self.beta = self.add_weight(name="beta", shape=channels, initializer="zeros",
                                    autocast=False)
        self.moving_mean = self.add_weight(
            name="moving_mean", shape=channels, initializer="zeros", trainable=False,
            autocast=False, aggregation="mean")
        self.moving_variance = self.add_weight(
            name="moving_variance", shape=channels, initializer="ones", trainable=False,
            autocast=False, aggregation="mean")

    def _statistics(self, x, valid):
        """(count, mean [C], variance [C]) of x's valid rows, float32."""
        rank = x.shape.rank
        weight = (tf.ones(tf.shape(x)[:1], tf.float32) if valid is None
                  else tf.cast(valid, tf.float32))
        weight = tf.reshape(weight, [-1] + [1] * (rank - 1))
        axes = list(range(rank - 1))
        per_row = tf.cast(tf.reduce_prod(tf.shape(x)[1:-1]), tf.float32)
        count = tf.reduce_sum(weight) * per_row
        total = tf.reduce_sum(weight * x, axes)  # [C]
        squares = tf.reduce_sum(weight * tf.square(x), axes)  # [C]
        context = tf.distribute.get_replica_context()
        if self.synchronized and context is not None and context.num_replicas_in_sync > 1:
            count, total, squares = context.all_reduce(
                tf.distribute.ReduceOp.SUM, [count, total, squares])
        n = tf.maximum(count, 1.0)
        mean = total / n
        return count, mean, tf.maximum(squares / n - tf.square(mean), 0.0)

    def call(self, x, valid=None, training=None):
        dtype = x.dtype
        x = tf.cast(x, tf.float32)
        if training:
            count, mean, variance = self._statistics(x, valid)
            some = count > 0
            for moving, value in ((self.moving_mean, mean),
                                  (self.moving_variance, variance)):
                old = tf.convert_to_tensor(moving.value)
                moving.assign(tf.where(some, old * self.momentum
                                       + value * (1.0 - self.momentum), old))
        else:
            mean = tf.convert_to_tensor(self.moving_mean.value)
            variance = tf.convert_to_tensor(self.moving_variance.value)
        scale = self.gamma.value * tf.math.rsqrt(variance + self.epsilon)
        return tf.cast((x - mean) * scale + self.beta.value, dtype)

    def get_config(self):
        return {**super().get_config(), "momentum": self.momentum,
                "epsilon": self.epsilon, "synchronized": self.synchronized}
