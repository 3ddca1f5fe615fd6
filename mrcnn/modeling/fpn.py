"""Feature Pyramid Network (Lin et al. 2017, §3) on ResNet C2-C5.

Shape letters: `B` batch, `H_l` x `W_l` the grid of level `l` (stride
`2**l`), `F` the FPN channels (256).
"""

import keras
import tensorflow as tf

from mrcnn.modeling import norms as norm_lib
from mrcnn.modeling._config import BuiltByParts, checkpointed, configurable_layer


def _xavier_fill():
    """Detectron2 `c2_xavier_fill`: kaiming_uniform(a=1), i.e. scale 1 fan-in."""
    return keras.initializers.VarianceScaling(1.0, mode="fan_in",
                                              distribution="uniform")


@configurable_layer
@keras.saving.register_keras_serializable(package="mrcnn")
class FPN(BuiltByParts, keras.layers.Layer):
    """Lateral 1x1 convs, top-down nearest 2x upsampling, 3x3 output convs.

    `P_l = conv3x3(lateral_l(C_l) + upsample2x(top-down_{l+1}))` for
    l = max_input_level .. min_level; `P6 = max_pool(P5, kernel 1, stride 2)`
    (FPN §4.1, Detectron2 `LastLevelMaxPool`). Convs have biases, or with
    `norm` none and a norm after each (Detectron2 `FPN.NORM`: `norm(conv(x))`,
    no activation).

    Args (keyword-only, Detectron2 R50-FPN defaults):
      channels: int, F, the channels of every output level (256).
      min_level: int, the finest output level (2).
      max_level: int, the coarsest output level (6); levels above the
        backbone's (5) come from stride-2 subsampling of the level below.
      norm: None (default), 'bn', 'sync_bn' or 'gn' (`norms`), after every
        lateral and output conv (Detectron2's GN and LSJ baselines).

    Call:
      features: {l: [B, H_l, W_l, C_l]} for l = min_level..5, with
        H_l = 2 * H_{l+1} (canvas a multiple of 2**max_level).

    Returns:
      {l: [B, H_l, W_l, F]} for l = min_level..max_level.
    """

    def __init__(self, *, channels=256, min_level=2, max_level=6,
                 backbone_max_level=5, norm=None, **kwargs):
        super().__init__(**kwargs)
        if not min_level <= backbone_max_level <= max_level:
            raise ValueError(
                f"FPN: need min_level={min_level} <= backbone_max_level="
                f"{backbone_max_level} <= max_level={max_level}")
        self.channels = channels
        self.min_level = min_level
        self.max_level = max_level
        self.backbone_max_level = backbone_max_level
        self.norm = norm_lib.check(norm, "FPN")
        levels = range(min_level, backbone_max_level + 1)
        bias = self.norm is None
        # Lists indexed by level - min_level.
        self.lateral = checkpointed(self, [
            keras.layers.Conv2D(channels, 1, kernel_initializer=_xavier_fill(),
                                use_bias=bias, name=f"lateral_p{l}") for l in levels])
        self.output_convs = checkpointed(self, [
            keras.layers.Conv2D(channels, 3, padding="same", use_bias=bias,
                                kernel_initializer=_xavier_fill(),
                                name=f"output_p{l}") for l in levels])
        self.lateral_norms = [None] * len(levels)
        self.output_norms = [None] * len(levels)
        if self.norm:
            self.lateral_norms = checkpointed(self, [
                norm_lib.make_norm(self.norm, f"lateral_p{l}_norm", channels)
                for l in levels])
            self.output_norms = checkpointed(self, [
                norm_lib.make_norm(self.norm, f"output_p{l}_norm", channels)
                for l in levels])

    def call(self, features, training=None):
        def conv_norm(conv, norm, x):
            x = conv(x)
            return x if norm is None else norm(x, training=training)

        outputs = {}
        top_down = None
        for level in range(self.backbone_max_level, self.min_level - 1, -1):
            i = level - self.min_level
            lateral = conv_norm(self.lateral[i], self.lateral_norms[i], features[level])
            if top_down is not None:
                up = tf.repeat(tf.repeat(top_down, 2, axis=1), 2, axis=2)
                lateral = lateral + up
            top_down = lateral
            outputs[level] = conv_norm(self.output_convs[i], self.output_norms[i], lateral)
        for level in range(self.backbone_max_level + 1, self.max_level + 1):
            outputs[level] = outputs[level - 1][:, ::2, ::2, :]
        return dict(sorted(outputs.items()))

    def get_config(self):
        return {**super().get_config(), "channels": self.channels,
                "min_level": self.min_level, "max_level": self.max_level,
                "backbone_max_level": self.backbone_max_level, "norm": self.norm}
