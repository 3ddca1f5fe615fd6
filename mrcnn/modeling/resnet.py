"""ResNet v1 backbone (He et al. 2016) with C2-C5 outputs, and weight loaders.

Shape letters: `B` batch, `H` x `W` the padded input canvas, `C_l` the
channels of stage output `C<l>` (stride `2**l`).

Architecture (Detectron2 `ResNet`):
  stem: 7x7/2 conv 64 -> norm -> relu -> 3x3/2 max-pool (padding 1)
  res2..res5: (3, 4, 6, 3) blocks for depth 50; bottleneck blocks
  (1x1 -> 3x3 -> 1x1, 4x expansion) for depth 50/101, basic blocks
  (3x3 -> 3x3) for depth 18/34. The stride of res3..res5 sits on the 3x3
  conv of the first block (ResNet "v1.5": torchvision, tensorpack), or with
  `stride_in_1x1` on its first 1x1 as in the original MSRA Caffe model
  (keras.applications' ResNet50, Detectron2's MSRA R-50.pkl and
  `RESNETS.STRIDE_IN_1X1 = True`, the R50-FPN 1x recipe's).
  Every strided conv pads symmetrically (explicit (k - 1) // 2 zeros each side,
  then 'valid'), as PyTorch and tensorpack's "AlignPadding" models do, so
  weights trained there see the same pixel grid here; Keras 'same' would pad
  0 before / 1 after on even inputs.
  Convs have no bias: each is followed by a norm layer. A frozen BN is
  folded into its conv (`conv(x, W * scale) + offset`, the kernel scaled in
  float32 each call, so its gradient still reaches `W`): exact in real
  arithmetic, and it leaves conv + bias (+ relu) for TF and XLA to fuse into
  one kernel instead of an extra pass over each activation.

Norms (`norm=`): 'frozen_bn' (default, Detectron2 `FrozenBN`: affine with
fixed statistics, all four vectors non-trainable), 'bn' (Keras
BatchNormalization, batch statistics in training), 'sync_bn' (the same,
synchronized across replicas), 'gn' (GroupNormalization, 32 groups).
`freeze_at` has Detectron2's meaning: 0 freezes nothing, 1 the stem, 2 the
stem and res2 (default), k the stem and res2..res(k).

Weight loaders and their name mapping (`s` = stage 2..5, `b` = block index
from 0, `i` = 1..3 the convs of a block in order; `shortcut` the 1x1
projection of a block's input):

  ours                         keras.applications.ResNet50      tensorpack npz
  stem_conv/kernel             conv1_conv/kernel                conv0/W
  stem_norm/{gamma,beta}       conv1_bn/{gamma,beta}            conv0/bn/{gamma,beta}
  stem_norm/moving_mean        conv1_bn/moving_mean - bias (*)  conv0/bn/mean/EMA
  stem_norm/moving_variance    conv1_bn/moving_variance (**)    conv0/bn/variance/EMA
  res<s>_block<b>_conv<i>      conv<s>_block<b+1>_<i>_conv      group<s-2>/block<b>/conv<i>/W
  res<s>_block<b>_norm<i>      conv<s>_block<b+1>_<i>_bn        group<s-2>/block<b>/conv<i>/bn/...
  res<s>_block<b>_shortcut     conv<s>_block<b+1>_0_conv        group<s-2>/block<b>/convshortcut/W
  res<s>_block<b>_shortcut_norm conv<s>_block<b+1>_0_bn         group<s-2>/block<b>/convshortcut/bn/...

  ours                         Detectron2 .pkl                  Caffe2 .pkl (MSRA)
  stem_conv/kernel             stem.conv1.weight                conv1_w
  stem_norm/{gamma,beta}       stem.conv1.norm.{weight,bias}    res_conv1_bn_{s,b}
  stem_norm/moving_{mean,var.} stem.conv1.norm.running_{mean,var} (0, 1 - eps) (***)
  res<s>_block<b>_conv<i>      res<s>.<b>.conv<i>.weight        res<s>_<b>_branch2{a,b,c}_w
  res<s>_block<b>_norm<i>      res<s>.<b>.conv<i>.norm.*        res<s>_<b>_branch2{a,b,c}_bn_*
  res<s>_block<b>_shortcut     res<s>.<b>.shortcut.weight       res<s>_<b>_branch1_w
  res<s>_block<b>_shortcut_norm res<s>.<b>.shortcut.norm.*      res<s>_<b>_branch1_bn_*

(*) Keras' ResNet50 convs carry a bias before their BN; since
`BN(Wx + bias) = gamma * (Wx - (mean - bias)) / sqrt(var + eps) + beta`, the
bias folds exactly into the moving mean. (**) Its BN epsilon is 1.001e-5,
ours 1e-5: the difference is added to the variance, which gives the same
scale (to float32 rounding). With `stride_in_1x1` the backbone is then
keras.applications' network, C2..C5 within 1e-5 relative (tested); without it the
arrays load all the same (same shapes), and fine-tuning has to absorb the
moved stride, which the loaders log. The Keras file is read with h5py, in
both the Keras 3 `.weights.h5` layout (written by `save_weights`, layer
groups named by class and creation order, which we recover from a freshly
built `keras.applications.ResNet50`) and the legacy Keras 2 `.h5` layout
(groups named by layer, as in the downloadable ImageNet files).
Tensorpack's `ImageNet-R50-AlignPadding.npz` stores TF-layout (HWIO)
kernels, so every array maps without transposition; keys may carry a `:0`
suffix. Detectron2 and Caffe2 files hold PyTorch-layout `[out, in, kh, kw]`
kernels (transposed here) and are unpickled for NumPy arrays only; a
Detectron2 file's names may sit under a prefix (`backbone.bottom_up.` in a
trained model). (***) The MSRA norms are affine only (scale `_s`, bias
`_b`): mean 0 and variance `1 - eps` make our folded scale the file's.
Every loader checks that every variable of the backbone is loaded (a
missing or mis-shaped array raises a ValueError naming our variable and the
source key) and that no backbone array of the file is left unused; they
support the batch-norm variants, the Detectron2 / Caffe2 one GroupNorm too
(`gn_s`, `gn_b` or `.norm.{weight,bias}`: GN has no statistics), and
each returns the `SourceInput` (channel order, mean, std) its network was
trained on, which `load_backbone_weights` folds into the stem.
"""

import codecs
import collections
import io
import pickle
import re
import zipfile

import gin
import keras
import numpy as np
import tensorflow as tf
from absl import logging

from mrcnn.data import files
from mrcnn.modeling import norms as norm_lib
from mrcnn.modeling._config import checkpointed, configurable_layer

# ImageNet statistics of RGB pixels in [0, 255], the ones torchvision-trained
# ResNet-50 weights expect: MaskRCNN's default input normalisation.
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)

# Blocks per stage res2..res5 and whether blocks are bottlenecks, per depth.
_DEPTHS = {
    18: ((2, 2, 2, 2), False),
    34: ((3, 4, 6, 3), False),
    50: ((3, 4, 6, 3), True),
    101: ((3, 4, 23, 3), True),
}
_NORMS = ("frozen_bn",) + norm_lib.NORMS
# Detectron2 FrozenBatchNorm2d and nn.BatchNorm2d default epsilon.
_BN_EPSILON = norm_lib.BN_EPSILON
# keras.applications.ResNet50's BatchNormalization epsilon.
_KERAS_BN_EPSILON = 1.001e-5


def _msra_fill():
    """Detectron2 `c2_msra_fill`: He normal over fan-out."""
    return keras.initializers.VarianceScaling(
        2.0, mode="fan_out", distribution="untruncated_normal")


@keras.saving.register_keras_serializable(package="mrcnn")
class FrozenBatchNorm(keras.layers.Layer):
    """Batch norm with fixed statistics: `y = (x - mean) / sqrt(var + eps) * gamma + beta`.

    gamma, beta, moving_mean and moving_variance are all non-trainable
    weights (Detectron2 `FrozenBatchNorm2d`), initialised to the identity.
    They are read in float32 under any dtype policy (no autocast), the affine
    scale and offset are computed in float32 (`affine`) and applied in the
    input's dtype. Inside `ResNet` the affine is folded into the preceding
    conv instead (`_Conv(x, norm=...)`).
    """

    def __init__(self, *, epsilon=_BN_EPSILON, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = epsilon

    def build(self, input_shape):
        channels = input_shape[-1]
        for name, init in (("gamma", "ones"), ("beta", "zeros"),
                           ("moving_mean", "zeros"),
                           ("moving_variance", "ones")):
            setattr(self, name, self.add_weight(
                name=name, shape=(channels,), initializer=init,
                trainable=False, autocast=False))

    def affine(self):
        """(scale, offset), float32 [C] each: `y = x * scale + offset`."""
        gamma = tf.cast(self.gamma.value, tf.float32)
        scale = gamma * tf.math.rsqrt(
            tf.cast(self.moving_variance.value, tf.float32) + self.epsilon)
        offset = tf.cast(self.beta.value, tf.float32) - tf.cast(
            self.moving_mean.value, tf.float32) * scale
        return scale, offset

    def call(self, x):
        scale, offset = self.affine()
        return x * tf.cast(scale, x.dtype) + tf.cast(offset, x.dtype)

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}


def _make_norm(norm, name):
    if norm == "frozen_bn":
        return FrozenBatchNorm(name=name)
    if norm in norm_lib.NORMS:
        return norm_lib.make_norm(norm, name)
    raise ValueError(f"ResNet: norm={norm!r} must be one of {_NORMS}")


class _Conv(keras.layers.Layer):
    """Bias-free conv with PyTorch-style symmetric padding.

    Call: `conv(x)`, or `conv(x, norm=frozen_bn)` for `frozen_bn(conv(x))`
    with the norm folded into the kernel (see the module docstring).
    """

    def __init__(self, filters, kernel_size, strides, name, groups=1):
        super().__init__(name=name)
        self.pad = (kernel_size - 1) // 2 if strides > 1 else 0
        self.strides = strides
        self.conv = keras.layers.Conv2D(
            filters, kernel_size, strides=strides,
            padding="valid" if strides > 1 else "same", use_bias=False,
            groups=groups, kernel_initializer=_msra_fill(), name=name)

    def build(self, input_shape):
        self.conv.build(input_shape)

    def call(self, x, norm=None):
        if self.pad:
            p = self.pad
            x = tf.pad(x, [[0, 0], [p, p], [p, p], [0, 0]])
        if norm is None:
            return self.conv(x)
        if not norm.built:
            norm.build(tuple(x.shape[:-1]) + (self.conv.filters,))
        scale, offset = norm.affine()  # float32 [filters]
        kernel = tf.cast(self.conv.kernel, tf.float32) * scale
        y = tf.nn.conv2d(x, tf.cast(kernel, x.dtype), self.strides,
                         self.conv.padding.upper())
        return tf.nn.bias_add(y, tf.cast(offset, x.dtype))


def _conv_norm(conv, norm, x, training):
    """norm(conv(x)), the norm folded into the conv when it is frozen BN."""
    if isinstance(norm, FrozenBatchNorm):
        return conv(x, norm=norm)
    return norm(conv(x), training=training)


class _Block(keras.layers.Layer):
    """One residual block: bottleneck (3 convs) or basic (2 convs)."""

    def __init__(self, *, in_channels, out_channels, bottleneck_channels,
                 stride, bottleneck, norm, name, stride_in_1x1=False, groups=1):
        super().__init__(name=name)
        if bottleneck:
            s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
            specs = [(bottleneck_channels, 1, s1, 1),
                     (bottleneck_channels, 3, s3, groups),   # ResNeXt's grouped 3x3
                     (out_channels, 1, 1, 1)]
        else:
            specs = [(out_channels, 3, stride, 1), (out_channels, 3, 1, 1)]
        self.convs = checkpointed(self, [_Conv(f, k, s, name=f"{name}_conv{i + 1}", groups=g)
                                         for i, (f, k, s, g) in enumerate(specs)])
        self.norms = checkpointed(self, [_make_norm(norm, f"{name}_norm{i + 1}")
                                         for i in range(len(specs))])
        self.shortcut = None
        self.shortcut_norm = None
        if in_channels != out_channels or stride != 1:
            self.shortcut = _Conv(out_channels, 1, stride,
                                  name=f"{name}_shortcut")
            self.shortcut_norm = _make_norm(norm, f"{name}_shortcut_norm")

    def build(self, input_shape):
        # From the channel counts, in the order the call would make them.
        channels = input_shape[-1]
        if self.shortcut is not None:
            self.shortcut.build(input_shape)
            self.shortcut_norm.build((None, None, None, self.shortcut.conv.filters))
        for conv, norm in zip(self.convs, self.norms):
            conv.build((None, None, None, channels))
            channels = conv.conv.filters
            norm.build((None, None, None, channels))

    def call(self, x, training=None):
        shortcut = x
        if self.shortcut is not None:
            shortcut = _conv_norm(self.shortcut, self.shortcut_norm, x,
                                  training)
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            x = _conv_norm(conv, norm, x, training)
            if i + 1 < len(self.convs):
                x = tf.nn.relu(x)
        return tf.nn.relu(x + shortcut)


@configurable_layer
@keras.saving.register_keras_serializable(package="mrcnn")
class ResNet(keras.layers.Layer):
    """ResNet v1 backbone returning `{2: C2, 3: C3, 4: C4, 5: C5}`.

    Args (keyword-only; defaults are Detectron2's R50-FPN 1x):
      depth: int, 18, 34, 50 (default) or 101.
      norm: str, 'frozen_bn' (default), 'bn', 'sync_bn' or 'gn'.
      freeze_at: int, stages frozen (not trainable): 0 none, 1 stem,
        2 stem and res2 (default, Detectron2 `FREEZE_AT=2`).
      width: int, stem channels and res2 bottleneck (or basic-block) width,
        doubling per stage (default 64, every published ResNet; Detectron2's
        `STEM_OUT_CHANNELS` and `WIDTH_PER_GROUP` together). Other widths
        train from scratch only: the weight loaders need 64.
      groups, width_per_group: ResNeXt (Xie et al. 2017; Detectron2's
        `RESNETS.NUM_GROUPS` and `WIDTH_PER_GROUP`): the 3x3 conv of each
        bottleneck in `groups` groups of `width_per_group` channels at res2,
        doubling per stage (X-101-32x8d: 32 and 8, bottlenecks 256..2048);
        the blocks' outputs stay those of `width`. Defaults 1 and None: the
        ResNet's `width` bottlenecks.
      stride_in_1x1: bool, put the stride of res3..res5 on the first 1x1
        conv of a bottleneck block (the original MSRA/Caffe ResNet, as
        keras.applications' and Detectron2's MSRA `R-50.pkl` weights were
        trained) instead of its 3x3 (default False: torchvision, tensorpack,
        ResNet "v1.5"; Detectron2 `RESNETS.STRIDE_IN_1X1`). Basic blocks
        (depth 18/34) ignore it. The variables are the same either way; the
        loaders warn when the file was trained the other way.

    Call:
      images: float [B, H, W, 3], H and W multiples of 32.

    Returns:
      {l: [B, H / 2**l, W / 2**l, C_l]} for l = 2..5 in the compute dtype;
      C_l = 4 * width * 2**(l - 2) for depth 50/101, width * 2**(l - 2) for
      18/34 (256 * 2**(l - 2) and 64 * 2**(l - 2) at the default width).
    """

    def __init__(self, *, depth=50, norm="frozen_bn", freeze_at=2, width=64,
                 stride_in_1x1=False, groups=1, width_per_group=None, **kwargs):
        super().__init__(**kwargs)
        if depth not in _DEPTHS:
            raise ValueError(
                f"ResNet: depth={depth} must be one of {sorted(_DEPTHS)}")
        if norm not in _NORMS:
            raise ValueError(f"ResNet: norm={norm!r} must be one of {_NORMS}")
        if not 0 <= freeze_at <= 5:
            raise ValueError(f"ResNet: freeze_at={freeze_at} must be in [0, 5]")
        if width <= 0 or (norm == "gn" and width % 32):
            # GroupNorm's 32 groups must divide every stage's channels.
            raise ValueError(
                f"ResNet: width={width} must be positive, and a multiple of 32 "
                f"with norm='gn'")
        groups = int(groups)
        if groups < 1 or (groups > 1 and not (_DEPTHS[depth][1] and width_per_group)):
            raise ValueError(
                f"ResNet: groups={groups} needs bottleneck blocks (depth 50/101) and a "
                f"width_per_group (got {width_per_group})")
        if norm == "gn" and width_per_group and (groups * int(width_per_group)) % 32:
            raise ValueError(f"ResNet: groups x width_per_group = "
                             f"{groups * int(width_per_group)} must be a multiple of 32 "
                             f"with norm='gn'")
        self.depth = depth
        self.width = width
        self.groups = groups
        self.width_per_group = None if width_per_group is None else int(width_per_group)
        res2_bottleneck = (width if self.width_per_group is None
                           else groups * self.width_per_group)
        self.norm = norm
        self.freeze_at = freeze_at
        self.stride_in_1x1 = bool(stride_in_1x1)
        num_blocks, self.bottleneck = _DEPTHS[depth]
        self.stem_conv = _Conv(width, 7, 2, name="stem_conv")
        self.stem_norm = _make_norm(norm, "stem_norm")
        if freeze_at >= 1:
            self.stem_conv.trainable = False
            self.stem_norm.trainable = False
        blocks = []
        self._stage_sizes = tuple(num_blocks)
        expansion = 4 if self.bottleneck else 1
        in_channels = width
        for stage, n in zip(range(2, 6), num_blocks):
            mult = 2 ** (stage - 2)
            out_channels = expansion * width * mult
            for b in range(n):
                block = _Block(
                    in_channels=in_channels, out_channels=out_channels,
                    bottleneck_channels=res2_bottleneck * mult,
                    stride=2 if (b == 0 and stage > 2) else 1,
                    bottleneck=self.bottleneck, norm=norm,
                    name=f"res{stage}_block{b}", stride_in_1x1=self.stride_in_1x1,
                    groups=groups)
                if freeze_at >= stage:
                    block.trainable = False
                blocks.append(block)
                in_channels = out_channels
        self.blocks = checkpointed(self, blocks)
        self.out_channels = {
            l: expansion * width * 2 ** (l - 2) for l in range(2, 6)}

    def build(self, input_shape):
        # Every weight from the channel counts, in the call's order, without
        # Keras's symbolic pass over `call` (a second trace of the backbone
        # at every first call). Inside a StatelessScope the variables are
        # made when it closes, after Keras has marked those of the frozen
        # stages non-trainable: made at once, they would stay trainable
        # tf.Variables, watched by every GradientTape.
        with keras.StatelessScope():
            self.stem_conv.build(input_shape)
            channels = self.stem_conv.conv.filters
            self.stem_norm.build((None, None, None, channels))
            for block in self.blocks:
                block.build((None, None, None, channels))
                channels = block.convs[-1].conv.filters

    def call(self, images, training=None):
        x = tf.nn.relu(_conv_norm(self.stem_conv, self.stem_norm, images,
                                  training))
        # 3x3/2 max-pool with padding 1: zeros pad like -inf after the relu.
        x = tf.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]])
        x = tf.nn.max_pool2d(x, 3, 2, "VALID")
        outputs = {}
        for stage, blocks in zip(range(2, 6), self.stages):
            for block in blocks:
                x = block(x, training=training)
            outputs[stage] = x
        return outputs

    @property
    def stages(self):
        """[[block, ...] for res2..res5], views of the flat `blocks` list."""
        out, start = [], 0
        for n in self._stage_sizes:
            out.append(self.blocks[start:start + n])
            start += n
        return out

    def get_config(self):
        return {**super().get_config(), "depth": self.depth,
                "norm": self.norm, "freeze_at": self.freeze_at,
                "width": self.width, "stride_in_1x1": self.stride_in_1x1,
                "groups": self.groups, "width_per_group": self.width_per_group}


# ---------------------------------------------------------------- loaders


def _named_units(resnet):
    """(conv, norm, stage, block, conv index or 0 for shortcut) per conv."""
    units = [(resnet.stem_conv, resnet.stem_norm, 1, 0, 1)]
    for stage, blocks in zip(range(2, 6), resnet.stages):
        for b, block in enumerate(blocks):
            for i, (conv, norm) in enumerate(zip(block.convs, block.norms)):
                units.append((conv, norm, stage, b, i + 1))
            if block.shortcut is not None:
                units.append((block.shortcut, block.shortcut_norm, stage, b, 0))
    return units


def _check_loadable(resnet, images_shape=(1, 64, 64, 3), group_norm=False):
    """Builds `resnet` if needed; ValueError unless a loader can fill it:
    width 64, and a batch-norm variant unless the format has `group_norm`."""
    if resnet.width != 64:
        raise ValueError(
            f"ResNet weight loaders need width=64 (published ResNets), not "
            f"width={resnet.width}")
    if resnet.norm == "gn" and not group_norm:
        raise ValueError(
            "this ResNet weights format holds batch-norm networks: norm in "
            "('frozen_bn', 'bn', 'sync_bn'), not 'gn' (GroupNorm ResNets load from "
            "Detectron2 / Caffe2 .pkl files, file_format='detectron2')")
    if not resnet.built or not resnet.stem_conv.conv.built:
        resnet(tf.zeros(images_shape))


def _assign(variable, array, source):
    array = np.asarray(array)
    if tuple(array.shape) != tuple(variable.shape):
        raise ValueError(
            f"ResNet weights: {variable.path} has shape {tuple(variable.shape)}"
            f" but {source} has shape {tuple(array.shape)}")
    variable.assign(array.astype(variable.dtype))


def _load_units(resnet, fetch, bias_folded, source_epsilon=_BN_EPSILON):
    """Assigns every conv kernel and norm vector from `fetch(unit_key, var)`.

    `fetch` returns (array, source_name) or raises KeyError with the source
    name. With `bias_folded`, fetch(.., 'bias') gives a conv bias that is
    subtracted from the moving mean. A source epsilon other than ours goes
    into the variance: `var + source_epsilon - ours` gives the same scale.
    """
    for conv, norm, stage, block, index in _named_units(resnet):
        key = (stage, block, index)
        group_norm = isinstance(norm, keras.layers.GroupNormalization)
        try:
            kernel, src = fetch(key, "kernel")
            _assign(conv.conv.kernel, kernel, src)
            arrays = {v: fetch(key, v) for v in
                      (("gamma", "beta") if group_norm else
                       ("gamma", "beta", "moving_mean", "moving_variance"))}
            if bias_folded:
                bias, bias_src = fetch(key, "bias")
                mean, mean_src = arrays["moving_mean"]
                arrays["moving_mean"] = (np.asarray(mean) - np.asarray(bias),
                                         f"{mean_src} - {bias_src}")
        except KeyError as e:
            raise ValueError(
                f"ResNet weights: no array {e.args[0]!r} in the file for "
                f"{conv.conv.kernel.path} / {norm.name}") from None
        if source_epsilon != _BN_EPSILON and not group_norm:
            var, var_src = arrays["moving_variance"]
            arrays["moving_variance"] = (
                np.asarray(var, np.float64) + (source_epsilon - _BN_EPSILON),
                f"{var_src} + (epsilon {source_epsilon} - {_BN_EPSILON})")
        for name, (array, src) in arrays.items():
            _assign(getattr(norm, name), array, src)


def _keras_snake(name):
    """keras.src.utils.naming.to_snake_case (the Keras 3 .weights.h5 keys)."""
    name = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub(r"([a-z])([A-Z])", r"\1_\2", name).lower()


def _read_keras_resnet50(path):
    """{'conv2_block1_1_conv/kernel': array, ...} from either h5 layout."""
    import h5py  # Keras' own dependency for .h5 files.

    arrays = {}
    with h5py.File(files.for_reader(path), "r") as f:
        if "layer_names" in f.attrs or (
                "model_weights" in f and "layer_names" in f["model_weights"].attrs):
            # Legacy Keras 2 layout: <layer>/<layer>/<var>:0.
            root = f["model_weights"] if "model_weights" in f else f
            for layer in root.attrs["layer_names"]:
                layer = layer.decode() if isinstance(layer, bytes) else layer
                g = root[layer]
                for wname in g.attrs.get("weight_names", []):
                    wname = wname.decode() if isinstance(wname, bytes) else wname
                    var = wname.split("/")[-1].split(":")[0]
                    arrays[f"{layer}/{var}"] = g[wname][()]
            return arrays
        if "layers" not in f:
            raise ValueError(f"{path}: neither a Keras 3 .weights.h5 nor a "
                             "legacy Keras .h5 weights file")
        # Keras 3 layout: layers/<snake class name>_<k>/vars/<i>, k counting
        # the layers of one class in model.layers order; rebuild that order.
        reference = keras.applications.ResNet50(
            weights=None,
            include_top=any(k.startswith("dense") for k in f["layers"]))
        counts = {}
        for layer in reference.layers:
            base = _keras_snake(type(layer).__name__)
            k = counts.get(base, 0)
            counts[base] = k + 1
            key = base if k == 0 else f"{base}_{k}"
            if not layer.weights or key not in f["layers"]:
                continue
            group = f["layers"][key]["vars"]
            for i, w in enumerate(layer.weights):
                if str(i) in group:
                    arrays[f"{layer.name}/{w.name}"] = group[str(i)][()]
    return arrays


def load_keras_resnet50_weights(resnet, path):
    """Loads a `keras.applications.ResNet50` weights file into `resnet`.

    Args:
      resnet: a `ResNet(depth=50)` with a batch-norm variant (built here if
        it is not yet).
      path: str, a Keras 3 `.weights.h5` (from `model.save_weights`) or a
        legacy Keras 2 `.h5` weights file, with or without the top.

    Returns:
      The `SourceInput` the file's network was trained on.

    Raises:
      ValueError naming our variable and the source array when an array is
      missing or mis-shaped, or when a backbone array of the file is unused.
    """
    if resnet.depth != 50:
        raise ValueError(f"load_keras_resnet50_weights: needs depth=50, the "
                         f"backbone has depth={resnet.depth}")
    _check_loadable(resnet)
    arrays = _read_keras_resnet50(path)
    used = set()
    keras_var = {"kernel": "kernel", "bias": "bias", "gamma": "gamma",
                 "beta": "beta", "moving_mean": "moving_mean",
                 "moving_variance": "moving_variance"}

    def fetch(key, var):
        stage, block, index = key
        if stage == 1:
            prefix = "conv1_" + ("conv" if var in ("kernel", "bias") else "bn")
        else:
            kind = "conv" if var in ("kernel", "bias") else "bn"
            prefix = f"conv{stage}_block{block + 1}_{index}_{kind}"
        name = f"{prefix}/{keras_var[var]}"
        if name not in arrays:
            raise KeyError(name)
        used.add(name)
        return arrays[name], name

    _load_units(resnet, fetch, bias_folded=True, source_epsilon=_KERAS_BN_EPSILON)
    unused = sorted(k for k in arrays
                    if k not in used and re.match(r"conv\d", k))
    if unused:
        raise ValueError(f"ResNet weights: arrays of {path} not loaded: "
                         f"{unused[:10]}")
    _warn_stride(resnet, path, trained_stride_in_1x1=True)
    return _SOURCES["keras"]


def load_tensorpack_resnet_weights(resnet, path):
    """Loads a tensorpack `ImageNet-R*-AlignPadding.npz` into `resnet`.

    Args:
      resnet: a `ResNet` of the file's depth, with a batch-norm variant.
      path: str, the .npz (keys `conv0/W`, `group0/block0/conv1/W`,
        `.../bn/{gamma,beta,mean/EMA,variance/EMA}`, optional `:0` suffix).
        Keys outside `conv0/` and `group*/` (a classifier, step counters)
        are ignored.

    Returns:
      The `SourceInput` the file's network was trained on.

    Raises:
      ValueError naming our variable and the source key when an array is
      missing or mis-shaped, or when a backbone array of the file is unused.
    """
    _check_loadable(resnet)
    with np.load(files.for_reader(path)) as npz:
        arrays = {k[:-2] if k.endswith(":0") else k: npz[k] for k in npz.files}
    used = set()
    suffix = {"kernel": "W", "gamma": "bn/gamma", "beta": "bn/beta",
              "moving_mean": "bn/mean/EMA",
              "moving_variance": "bn/variance/EMA"}

    def fetch(key, var):
        stage, block, index = key
        if stage == 1:
            prefix = "conv0"
        else:
            conv = f"conv{index}" if index else "convshortcut"
            prefix = f"group{stage - 2}/block{block}/{conv}"
        name = f"{prefix}/{suffix[var]}"
        if name not in arrays:
            raise KeyError(name)
        used.add(name)
        return arrays[name], name

    _load_units(resnet, fetch, bias_folded=False)
    unused = sorted(k for k in arrays if k not in used
                    and (k.startswith("conv0/") or k.startswith("group")))
    if unused:
        raise ValueError(f"ResNet weights: arrays of {path} not loaded: "
                         f"{unused[:10]}")
    _warn_stride(resnet, path, trained_stride_in_1x1=False)
    return _SOURCES["tensorpack"]


SourceInput = collections.namedtuple("SourceInput", ["channels", "pixel_mean", "pixel_std"])
SourceInput.__doc__ = """How a source network took its input: `(pixel - pixel_mean) / pixel_std`.

  channels: 'RGB' or 'BGR', the order of the three channels.
  pixel_mean, pixel_std: three floats each, in that order, pixels in [0, 255].
"""

# keras.applications' ResNet50 takes BGR minus the caffe mean with no scaling;
# tensorpack's ImageNet models take BGR normalised by the ImageNet mean and
# std (its image_preprocess reverses mean and std for BGR input); the MSRA
# Caffe ResNets (Detectron2's R-50.pkl, its default PIXEL_MEAN / PIXEL_STD)
# BGR minus a mean, unscaled; torchvision's RGB by the ImageNet mean and std.
_SOURCES = {
    "keras": SourceInput("BGR", (103.939, 116.779, 123.68), (1.0, 1.0, 1.0)),
    "tensorpack": SourceInput("BGR", (103.53, 116.28, 123.675), (57.375, 57.12, 58.395)),
    "msra": SourceInput("BGR", (103.53, 116.28, 123.675), (1.0, 1.0, 1.0)),
    "torchvision": SourceInput("RGB", IMAGENET_MEAN, IMAGENET_STD),
}


def _warn_stride(resnet, path, trained_stride_in_1x1):
    """Logs when the file's network put the stride on the other conv."""
    if resnet.bottleneck and resnet.stride_in_1x1 != trained_stride_in_1x1:
        logging.warning(
            "ResNet weights %s were trained with the stride of res3..res5 on the "
            "%s conv; this backbone has it on the %s (ResNet.stride_in_1x1 = %s): the "
            "arrays load, but the network differs from the one they were trained "
            "in until fine-tuning adapts it. Set ResNet.stride_in_1x1 = %s for the "
            "trained network.", path, "1x1" if trained_stride_in_1x1 else "3x3",
            "1x1" if resnet.stride_in_1x1 else "3x3", resnet.stride_in_1x1,
            trained_stride_in_1x1)


class _ArrayUnpickler(pickle.Unpickler):
    """Reads dicts of NumPy arrays and nothing else.

    A pickle can run any code it names; Detectron2's weight files only need
    these constructors, so any other name is refused instead of imported.
    """

    _ALLOWED = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("_codecs", "encode"): codecs.encode,  # bytes in protocol 2 pickles
    }
    for _module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        _ALLOWED[(_module, "_reconstruct")] = np.ndarray.__reduce__(np.zeros(0))[0]
        _ALLOWED[(_module, "scalar")] = np.float32(0).__reduce__()[0]
    del _module

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[(module, name)]
        raise pickle.UnpicklingError(f"holds a {module}.{name}, not only NumPy arrays")


def _read_detectron2_pickle(path):
    """({name: array}, author or None) from a Detectron2 or Caffe2 `.pkl`."""
    raw = io.BytesIO(files.read_bytes(path))
    if zipfile.is_zipfile(raw):
        raise ValueError(
            f"{path}: a PyTorch checkpoint (zip), not a Detectron2 .pkl of NumPy "
            "arrays; convert torchvision weights with Detectron2's "
            "tools/convert-torchvision-to-d2.py, or save a Detectron2 model's "
            "state_dict as {'model': {name: tensor.numpy()}} with pickle")
    try:
        raw.seek(0)
        # latin1: the Caffe2 model zoo files are Python 2 pickles.
        data = _ArrayUnpickler(raw, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise ValueError(f"{path}: cannot read as a Detectron2 weights pickle "
                         f"({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a Detectron2 weights pickle holds a dict, not "
                         f"a {type(data).__name__}")
    author = None
    if "model" in data and isinstance(data["model"], dict):
        author = data.get("__author__")
        data = data["model"]
    elif "blobs" in data:  # the Caffe2 / Detectron 1 model zoo layout
        data = data["blobs"]
    arrays = {k: np.asarray(v) for k, v in data.items() if isinstance(k, str)
              and not k.endswith("_momentum")}
    return arrays, author


# Our norm variables -> Detectron2's norm names and the Caffe2 suffixes
# (Detectron2's convert_basic_c2_names: `_bn_s` scale, `_bn_b` bias,
# `_bn_rm` running mean, `_bn_riv` running variance).
_D2_NORM = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean",
            "moving_variance": "running_var"}
_C2_NORM = {"gamma": "s", "beta": "b", "moving_mean": "rm", "moving_variance": "riv"}


def load_detectron2_resnet_weights(resnet, path):
    """Loads the ResNet of a Detectron2 or Caffe2 weights `.pkl` into `resnet`.

    Two naming schemes, told apart by their stem's name:
      Detectron2 (`{'model': {...}, '__author__': ...}`): `stem.conv1.weight`,
        `stem.conv1.norm.{weight,bias,running_mean,running_var}`,
        `res<s>.<b>.conv<i>.weight` and `.norm.*`, `res<s>.<b>.shortcut.*`,
        under any common prefix (`backbone.bottom_up.` in a trained Mask
        R-CNN's `model_final_*.pkl`: its backbone loads, the rest is left).
        `__author__ == 'torchvision'` marks torchvision ImageNet weights
        converted by Detectron2's tools/convert-torchvision-to-d2.py.
      Caffe2 (the MSRA ImageNet models, e.g. Detectron2's
        `ImageNetPretrained/MSRA/R-50.pkl`): `conv1_w`, `res_conv1_bn_{s,b}`,
        `res<s>_<b>_branch2{a,b,c}_w`, `res<s>_<b>_branch1_w` and their
        `_bn_{s,b}`. These norms are affine (scale, bias) only: the mean
        loads as 0 and the variance as 1 - epsilon, so that the folded
        scale is the file's exactly.
    A GroupNorm ResNet (`norm='gn'`) loads the same names, scale and bias
    only: Detectron2's `.norm.{weight,bias}`, Caffe2's `conv1_gn_{s,b}` and
    `res<s>_<b>_branch*_gn_{s,b}` (FAIR's R-50-GN.pkl, stride on the 3x3).
    Kernels are PyTorch's `[out, in, kh, kw]`, transposed to ours.

    Args:
      resnet: a `ResNet` of the file's depth, width 64, and norm: a
        batch-norm variant or 'gn' (built here if it is not yet).
      path: str, the `.pkl`. Only NumPy arrays are unpickled (a file that
        names anything else is refused, not run); a PyTorch `.pth` raises
        with how to convert it.

    Returns:
      The `SourceInput` the network was trained on: the MSRA models' BGR
      mean without scaling for Caffe2 files (Detectron2's default
      PIXEL_MEAN / PIXEL_STD, which its model zoo configs keep), RGB
      ImageNet mean and std for torchvision's; `None` for other Detectron2
      files, whose input convention is in their config, not the file.

    Raises:
      ValueError naming our variable and the source key when an array is
      missing or mis-shaped, or when a backbone array of the file is unused.
    """
    _check_loadable(resnet, group_norm=True)
    arrays, author = _read_detectron2_pickle(path)
    return _load_detectron2_arrays(resnet, arrays, author, path)


def _load_detectron2_arrays(resnet, arrays, author, path):
    """`load_detectron2_resnet_weights` on a file's arrays, read already."""
    stems = [k for k in arrays if k == "stem.conv1.weight"
             or k.endswith(".stem.conv1.weight")]
    if len(stems) == 1:
        prefix = stems[0][:-len("stem.conv1.weight")]
        caffe2 = False
    elif "conv1_w" in arrays:
        prefix, caffe2 = "", True
    else:
        raise ValueError(
            f"{path}: no ResNet stem in the file (a Detectron2 'stem.conv1.weight' "
            f"under one prefix, or Caffe2's 'conv1_w'; {len(stems)} Detectron2 stems "
            f"found); its first keys: {sorted(arrays)[:5]}")
    used = set()

    def fetch(key, var):
        stage, block, index = key
        if caffe2:
            unit = ("res_conv1" if stage == 1 else f"res{stage}_{block}_branch"
                    + ("1" if index == 0 else "2" + "abc"[index - 1]))
            if var == "kernel":
                name = "conv1_w" if stage == 1 else f"{unit}_w"
            elif resnet.norm == "gn":   # Detectron's GN models: conv1_gn_s, ..._gn_b
                name = f"{'conv1' if stage == 1 else unit}_gn_{_C2_NORM[var]}"
            else:
                name = f"{unit}_bn_{_C2_NORM[var]}"
            if name not in arrays and var in ("moving_mean", "moving_variance"):
                # The affine-only norm of the MSRA models.
                shape = arrays.get(f"{unit}_bn_s", np.zeros(0)).shape
                value = 0.0 if var == "moving_mean" else 1.0 - _BN_EPSILON
                return np.full(shape, value, np.float32), f"(none: {unit}_bn affine)"
        else:
            unit = prefix + ("stem.conv1" if stage == 1 else f"res{stage}.{block}."
                             + ("shortcut" if index == 0 else f"conv{index}"))
            name = f"{unit}.weight" if var == "kernel" else f"{unit}.norm.{_D2_NORM[var]}"
        if name not in arrays:
            raise KeyError(name)
        used.add(name)
        array = arrays[name]
        if var == "kernel":
            array = np.transpose(array, (2, 3, 1, 0)) if array.ndim == 4 else array
        return array, name

    _load_units(resnet, fetch, bias_folded=False)
    if caffe2:
        backbone = [k for k in arrays if re.match(r"(conv1_|res_conv1_|res\d_)", k)]
    else:
        backbone = [k for k in arrays if k.startswith(prefix) and re.match(
            r"(stem|res\d)\.", k[len(prefix):])
            and not k.endswith("num_batches_tracked")
            and not k[len(prefix):].startswith("stem.fc.")]  # torchvision's classifier
    unused = sorted(k for k in backbone if k not in used)
    if unused:
        raise ValueError(f"ResNet weights: arrays of {path} not loaded: {unused[:10]}")
    if caffe2:
        # MSRA's BN models put the stride on the 1x1, FAIR's GN models (the
        # R-50-GN.pkl of Detectron2's GN configs) on the 3x3.
        _warn_stride(resnet, path, trained_stride_in_1x1=resnet.norm != "gn")
        return _SOURCES["msra"]
    if author == "torchvision":
        _warn_stride(resnet, path, trained_stride_in_1x1=False)
        return _SOURCES["torchvision"]
    return None


_LOADERS = {"keras": load_keras_resnet50_weights,
            "tensorpack": load_tensorpack_resnet_weights,
            "detectron2": load_detectron2_resnet_weights}

def adapt_stem_to_input(resnet, source, pixel_mean=IMAGENET_MEAN,
                        pixel_std=IMAGENET_STD):
    """Folds a source network's input convention into the stem, after loading.

    Our backbone sees RGB `(pixel - pixel_mean) / pixel_std` (MaskRCNN). The
    source saw `(pixel - src_mean) / src_std` in its own channel order, which
    is `(pixel_std / src_std) * x + (pixel_mean - src_mean) / src_std` of
    ours: the channel order and scale go into the stem kernel, the constant
    into the stem norm's moving mean (exact away from the zero-padded border).
    A GroupNorm stem has no statistics to take the constant: its means must
    be the same (ValueError otherwise), as they are for the MSRA and FAIR
    models under MaskRCNN's default ImageNet mean.

    Args:
      resnet: a ResNet just loaded from `source` weights.
      source: a `SourceInput`, or the name of a known one: 'keras',
        'tensorpack', 'msra', 'torchvision'.
      pixel_mean, pixel_std: RGB, the model's input normalisation.
    """
    channels, src_mean, src_std = _SOURCES[source] if isinstance(source, str) else source
    if channels.upper() not in ("RGB", "BGR"):
        raise ValueError(f"source channels {channels!r} must be 'RGB' or 'BGR'")
    kernel = resnet.stem_conv.conv.kernel
    w = kernel.numpy().astype(np.float64)  # [7, 7, 3, 64] in source order
    src_mean = np.asarray(src_mean, np.float64)
    src_std = np.asarray(src_std, np.float64)
    if channels.upper() == "BGR":
        w, src_mean, src_std = w[:, :, ::-1, :], src_mean[::-1], src_std[::-1]
    shift = (np.asarray(pixel_mean) - src_mean) / src_std  # [3]
    const = np.einsum("hwco,c->o", w, shift)  # [64]
    norm = resnet.stem_norm
    if not hasattr(norm, "moving_mean"):
        if np.abs(shift).max() > 1e-6:
            raise ValueError(
                f"ResNet weights: the network took its input minus {tuple(src_mean)} "
                f"(RGB), this model minus {tuple(pixel_mean)}; a {type(norm).__name__} "
                f"stem cannot absorb the difference: set MaskRCNN.pixel_mean = "
                f"{tuple(float(v) for v in src_mean)}")
        const = np.zeros_like(const)
    kernel.assign((w * (np.asarray(pixel_std) / src_std)[None, None, :, None])
                  .astype(kernel.dtype))
    if not hasattr(norm, "moving_mean"):
        return
    norm.moving_mean.assign(
        (norm.moving_mean.numpy() - const).astype(norm.moving_mean.dtype))


@gin.configurable
def load_backbone_weights(model, *, path=gin.REQUIRED, file_format="keras",
                          source_format=None, source_pixel_mean=None,
                          source_pixel_std=None):
    """Initialises `model.backbone` from ImageNet weights (`train.init_fn`).

    The weights are loaded one to one, then `adapt_stem_to_input` folds the
    source's input convention (channel order, mean and std) into the stem,
    so the backbone sees our RGB images, normalised by the model's
    `pixel_mean` and `pixel_std`, as the source saw its own.

    Args:
      model: a built model with a `backbone` ResNet and RGB `pixel_mean`,
        `pixel_std` (MaskRCNN's).
      path: str, the weights file.
      file_format: 'keras' (a keras.applications.ResNet50 weights file),
        'tensorpack' (ImageNet-R50-AlignPadding.npz) or 'detectron2' (a
        Detectron2 or Caffe2 `.pkl`: MSRA's R-50.pkl, torchvision weights
        converted for Detectron2, a trained Detectron2 model's backbone).
      source_format, source_pixel_mean, source_pixel_std: the source's input
        convention, Detectron2's INPUT.FORMAT ('RGB' or 'BGR'), MODEL.PIXEL_MEAN
        and MODEL.PIXEL_STD (three floats each, in that channel order); each
        one given overrides what the file format implies. A Detectron2 file
        other than MSRA's and torchvision's carries no convention: without
        these, Detectron2's defaults (MSRA's: BGR, mean 103.53, 116.28,
        123.675, std 1) are assumed, and logged.

    Raises:
      FileNotFoundError: no such file; ValueError: see the loaders.
    """
    if file_format not in _LOADERS:
        raise ValueError(f"load_backbone_weights: file_format={file_format!r} must be "
                         f"one of {sorted(_LOADERS)}")
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(
            f"{path}: backbone weights not found (load_backbone_weights.path); "
            f"set train.init_fn = None to train from scratch")
    source = _LOADERS[file_format](model.backbone, path)
    if source is None:
        source = _SOURCES["msra"]
        if None in (source_format, source_pixel_mean, source_pixel_std):
            logging.warning(
                "%s carries no input convention; assuming Detectron2's defaults for "
                "what is not given (load_backbone_weights.source_format = 'BGR', "
                ".source_pixel_mean = %s, .source_pixel_std = %s)", path,
                source.pixel_mean, source.pixel_std)
    source = SourceInput(
        source_format or source.channels,
        tuple(source_pixel_mean) if source_pixel_mean is not None else source.pixel_mean,
        tuple(source_pixel_std) if source_pixel_std is not None else source.pixel_std)
    adapt_stem_to_input(model.backbone, source, model.pixel_mean, model.pixel_std)
