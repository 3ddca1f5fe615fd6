"""Normalisation after a convolution, with Detectron2's conventions.

One place for what the backbone, the FPN and the heads share: batch norm
with epsilon 1e-5 and momentum 0.9 (PyTorch's momentum 0.1), GroupNorm with
32 groups (Detectron2 `get_norm`; Wu & He 2018). The ResNet adds its frozen
batch norm (`resnet.FrozenBatchNorm`) on top of these.

Names (`norm=`): None or '' (no norm: the conv keeps its bias), 'bn' (Keras
BatchNormalization, batch statistics in training), 'sync_bn' (the same,
synchronised across replicas), 'gn' (GroupNormalization). A conv followed by
a norm has no bias, as in Detectron2 (`bias=not norm`).
"""

import keras

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


def make_norm(norm, name, channels=None):
    """A new normalisation layer for `norm` in NORMS, named `name`.

    `channels`, when given, must split into GN_GROUPS groups with 'gn'.
    """
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
