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
    l = max_input_level .. min_level; the levels above come from the top
    block: `'max_pool'` gives `P6 = max_pool(P5, kernel 1, stride 2)` (FPN
    §4.1, Detectron2 `LastLevelMaxPool`), `'p6p7'` RetinaNet's `P6 =
    conv3x3/2(C5)`, `P7 = conv3x3/2(relu(P6))` (RetinaNet §4, Detectron2
    `LastLevelP6P7`; from P5 instead with `top_block_input='p5'`, as
    torchvision's v1 RetinaNet). Convs have biases, or with
    `norm` none and a norm after each (Detectron2 `FPN.NORM`: `norm(conv(x))`,
    no activation); the top block's convs always have biases and no norm.

    Args (keyword-only, Detectron2 R50-FPN defaults):
      channels: int, F, the channels of every output level (256).
      min_level: int, the finest output level (2).
      max_level: int, the coarsest output level (6); levels above the
        backbone's (5) come from the top block.
      norm: None (default), 'bn', 'sync_bn' or 'gn' (`norms`), after every
        lateral and output conv (Detectron2's GN and LSJ baselines).
      top_block: 'max_pool' (default, Mask R-CNN's P6) or 'p6p7' (strided
        convs, RetinaNet's P6 and P7: max_level 7).
      top_block_input: 'c5' (default) or 'p5', what the first 'p6p7' conv
        reads.

    Call:
      features: {l: [B, H_l, W_l, C_l]} for l = min_level..5, with
        H_l = 2 * H_{l+1} (canvas a multiple of 2**max_level).

    Returns:
      {l: [B, H_l, W_l, F]} for l = min_level..max_level.
    """

    def __init__(self, *, channels=256, min_level=2, max_level=6,
                 backbone_max_level=5, norm=None, top_block="max_pool",
                 top_block_input="c5", **kwargs):
        super().__init__(**kwargs)
        if not min_level <= backbone_max_level <= max_level:
            raise ValueError(
                f"FPN: need min_level={min_level} <= backbone_max_level="
                f"{backbone_max_level} <= max_level={max_level}")
        if top_block not in ("max_pool", "p6p7"):
            raise ValueError(f"FPN: top_block={top_block!r}, choose 'max_pool' or 'p6p7'")
        if top_block_input not in ("c5", "p5"):
            raise ValueError(
                f"FPN: top_block_input={top_block_input!r}, choose 'c5' or 'p5'")
        self.top_block = top_block
        self.top_block_input = top_block_input
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
        # Symmetric padding then 'valid', as PyTorch's Conv2d(3, 2, padding=1):
        # Keras 'same' pads stride-2 convs at the bottom and right only.
        self.top_convs = checkpointed(self, [
            keras.layers.Conv2D(channels, 3, strides=2, padding="valid",
                                kernel_initializer=_xavier_fill(), name=f"p{l}")
            for l in range(backbone_max_level + 1, max_level + 1)
        ] if top_block == "p6p7" else [])
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
        top = (features[self.backbone_max_level] if self.top_block_input == "c5"
               else outputs[self.backbone_max_level])
        for i, level in enumerate(range(self.backbone_max_level + 1, self.max_level + 1)):
            if self.top_block == "max_pool":
                outputs[level] = outputs[level - 1][:, ::2, ::2, :]
                continue
            if i:
                top = tf.nn.relu(outputs[level - 1])
            top = tf.pad(top, [[0, 0], [1, 1], [1, 1], [0, 0]])
            outputs[level] = self.top_convs[i](top)
        return dict(sorted(outputs.items()))

    def get_config(self):
        return {**super().get_config(), "channels": self.channels,
                "min_level": self.min_level, "max_level": self.max_level,
                "backbone_max_level": self.backbone_max_level, "norm": self.norm,
                "top_block": self.top_block, "top_block_input": self.top_block_input}
