"""Second stage: box head, mask head, roi sampling and inference post-processing.

Shape letters: `B` batch, `K` rois per image (512 sampled in training, the
P proposals at inference), `Kp` the slots that can hold positives
(`int(512 * 0.25) = 128`), `T` the rois the mask head trains on when
they are gathered into one list (`mask_loss`), `M` gt boxes,
`C` foreground classes (80 for COCO), `F` FPN channels, `S` the mask
resolution (28), `D` detections per image (100), `H` x `W` the canvas.

Box and mask heads follow Detectron2's `FastRCNNConvFCHead` (2 x FC-1024)
+ `FastRCNNOutputLayers` (class-specific boxes) and `MaskRCNNConvUpsampleHead`
(4 x conv 256, deconv 2x, 1x1 per-class predictor); `CascadeRoiHeads` is
Detectron2's `CascadeROIHeads` (Cai & Vasconcelos 2018). One default differs:
RoIAlign takes 2 x 2 samples per bin (`sampling_ratio=2`, torchvision's and
the TF reference's); `sampling_ratio=0` is Detectron2's adaptive
`ceil(roi / bin)` per axis (`POOLER_SAMPLING_RATIO = 0`), at 9x the gathers.
"""

import math

import keras
import tensorflow as tf

from mrcnn.modeling import losses as loss_lib
from mrcnn.modeling import norms as norm_lib
from mrcnn.modeling._config import BuiltByParts, checkpointed, configurable_layer
from mrcnn.modeling._xla import compiled, in_xla_context
from mrcnn.modeling.detector import to_original_pixels

from mrcnn.ops import boxes as box_ops
from mrcnn.ops import keypoints as keypoint_ops
from mrcnn.ops import masks as mask_ops
from mrcnn.ops import nms as nms_ops
from mrcnn.ops import roi_align as roi_ops
from mrcnn.ops import targets as target_ops


# Granularity of the mask head's trimmed slots outside XLA (`_leading_slots`).
_MASK_SLOT_STEP = 16


def _leading_slots(used):
    """How many leading slots of `used` bool [B, K] the mask head must run on.

    Under XLA (static shapes) all K, a Python int. Otherwise up to the
    batch's last used slot, rounded up to a multiple of `_MASK_SLOT_STEP` (an
    XLA island then compiles for a few shapes only), at least one step and
    at most K: an int32 scalar.
    """
    slots = used.shape[1]
    if in_xla_context():
        return slots
    last = tf.reduce_max(tf.where(used, tf.range(1, slots + 1)[None, :], 0))
    step = min(_MASK_SLOT_STEP, slots)
    return tf.minimum(-(-tf.maximum(last, 1) // step) * step, slots)


def _xavier_fill():
    """Detectron2 `c2_xavier_fill`: kaiming_uniform(a=1)."""
    return keras.initializers.VarianceScaling(1.0, mode="fan_in",
                                              distribution="uniform")


def _msra_fill():
    """Detectron2 `c2_msra_fill`: He normal over fan-out."""
    return keras.initializers.VarianceScaling(
        2.0, mode="fan_out", distribution="untruncated_normal")


# Batch norms in a head are `norms.MaskedBatchNorm`: the static-shape batch
# holds padded slots (and negatives, in the mask head's) that must not count.
_HEAD_NORMS = ("gn", "bn", "sync_bn")


def _conv_norm_layers(owner, num_convs, channels, norm, name="conv"):
    """`num_convs` 3x3 convs (`name`1, 2, ...) and their norms (`name`1_norm,
    ...), held by `owner`. Without `norm`: biased convs with their relu, and
    None norms; with it, bias-free convs (the relu follows the norm)."""
    convs = checkpointed(owner, [
        keras.layers.Conv2D(channels, 3, padding="same", use_bias=norm is None,
                            activation="relu" if norm is None else None,
                            kernel_initializer=_msra_fill(), name=f"{name}{i + 1}")
        for i in range(num_convs)])
    if norm is None:
        return convs, [None] * num_convs
    return convs, checkpointed(owner, [
        norm_lib.make_norm(norm, f"{name}{i + 1}_norm", channels, masked=True)
        for i in range(num_convs)])


def _run_convs(convs, norms, x, valid=None, training=None):
    """relu(norm(conv(x))) through each conv (Detectron2's order); the
    convs of no norm apply their relu themselves. `valid` bool [N] or None:
    the rows of x [N, h, w, F] a batch norm's training statistics count."""
    for conv, norm in zip(convs, norms):
        x = conv(x)
        if isinstance(norm, norm_lib.MaskedBatchNorm):
            # training explicit: Keras loses an outer call's on a first, building call.
            x = tf.nn.relu(norm(x, valid, training=training))
        elif norm is not None:
            x = tf.nn.relu(norm(x))
    return x


def _rows(valid):
    """bool [B, K] or None -> [B * K] or None."""
    return None if valid is None else tf.reshape(valid, [-1])


def _build_convs(convs, norms, shape, channels):
    """Builds `convs` and `norms` for an input of [N, h, w, F] `shape`."""
    height, width, depth = shape
    for conv, norm in zip(convs, norms):
        conv.build((None, height, width, depth))
        if norm is not None:
            norm.build((None, height, width, channels))
        depth = channels
    return depth


@configurable_layer
@keras.saving.register_keras_serializable(package="mrcnn")
class BoxHead(keras.layers.Layer):
    """`num_conv` x conv3x3 (+ norm) + relu -> flatten -> `num_fc` x FC(fc_dim)
    + relu -> class logits and box deltas (Detectron2 `FastRCNNConvFCHead`).

    Args (keyword-only, R50-FPN defaults: no convs, 2 FCs, "2fc"):
      num_classes: int, C foreground classes (80 for COCO).
      fc_dim: int, width of each FC layer (1024).
      num_fc: int, FC layers (2).
      num_conv: int, 3x3 convs before the FCs (0; 4 with num_fc 1 is
        Detectron2's "4conv1fc" head of its GN and LSJ baselines).
      conv_dim: int, channels of those convs (256).
      norm: None (default), 'gn', 'bn' or 'sync_bn' after each conv (no bias
        then). The batch norms' statistics count the `valid` rois only
        (`norms.MaskedBatchNorm`; Detectron2's `NaiveSyncBatchNorm` with
        stats_mode 'N' for 'sync_bn').
      class_agnostic: bool, one set of deltas for every class (Detectron2's
        `CLS_AGNOSTIC_BBOX_REG`, the cascade's heads) instead of one per class.

    Call:
      pooled: [B, K, 7, 7, F] RoIAligned features.
      valid: bool [B, K] or None (all), the rois a batch norm's training
        statistics count (the sampled ones, not the padding).
      training: bool, batch statistics (True) or moving ones.

    Returns:
      class_logits: float32 [B, K, C + 1], column 0 background.
      box_deltas: float32 [B, K, C, 4] (dy, dx, dh, dw), box weights
        (10, 10, 5, 5); [B, K, 1, 4] when `class_agnostic`.
    """

    def __init__(self, *, num_classes=80, fc_dim=1024, num_fc=2, num_conv=0, conv_dim=256,
                 norm=None, class_agnostic=False, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.fc_dim = fc_dim
        self.num_fc = num_fc
        self.num_conv = int(num_conv)
        self.conv_dim = conv_dim
        self.norm = norm_lib.check(norm, "BoxHead", _HEAD_NORMS)
        self.convs, self.conv_norms = _conv_norm_layers(self, self.num_conv, conv_dim,
                                                        self.norm)
        self.class_agnostic = bool(class_agnostic)
        self.num_box_classes = 1 if self.class_agnostic else num_classes
        self.fcs = checkpointed(self, [
            keras.layers.Dense(fc_dim, activation="relu",
                               kernel_initializer=_xavier_fill(), name=f"fc{i + 1}")
            for i in range(num_fc)])
        # Detectron2 FastRCNNOutputLayers: std 0.01 scores, 0.001 deltas.
        self.class_logits = keras.layers.Dense(
            num_classes + 1, name="class_logits",
            kernel_initializer=keras.initializers.RandomNormal(stddev=0.01))
        self.box_deltas = keras.layers.Dense(
            4 * self.num_box_classes, name="box_deltas",
            kernel_initializer=keras.initializers.RandomNormal(stddev=0.001))

    def build(self, input_shape):
        """Creates the FC layers' variables for `pooled` of `input_shape`
        [B, K, 7, 7, F], so that a head restored from its config (with its
        build config, as `RoiHeads.from_config` restores it) holds them."""
        depth = _build_convs(self.convs, self.conv_norms, input_shape[2:], self.conv_dim)
        width = math.prod(input_shape[2:4]) * depth
        for fc in self.fcs:
            fc.build((input_shape[0], input_shape[1], width))
            width = self.fc_dim
        self.class_logits.build((input_shape[0], input_shape[1], width))
        self.box_deltas.build((input_shape[0], input_shape[1], width))

    def call(self, pooled, valid=None, training=None):
        batch, rois, height, width, channels = pooled.shape
        if rois is None:   # a count known when run (outside XLA)
            rois = tf.shape(pooled)[1]
        x = pooled
        if self.convs:
            x = tf.reshape(x, [batch * rois, height, width, channels])
            x = _run_convs(self.convs, self.conv_norms, x, _rows(valid),
                           training)  # [B * K, 7, 7, conv_dim]
        x = tf.reshape(x, [batch, rois, -1])  # [B, K, 7 * 7 * (F | conv_dim)]
        for fc in self.fcs:
            x = fc(x)
        logits = tf.cast(self.class_logits(x), tf.float32)  # [B, K, C + 1]
        deltas = tf.reshape(tf.cast(self.box_deltas(x), tf.float32),
                            [batch, rois, self.num_box_classes, 4])  # [B, K, C|1, 4]
        return logits, deltas

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes,
                "fc_dim": self.fc_dim, "num_fc": self.num_fc, "num_conv": self.num_conv,
                "conv_dim": self.conv_dim, "norm": self.norm,
                "class_agnostic": self.class_agnostic}


@configurable_layer
@keras.saving.register_keras_serializable(package="mrcnn")
class MaskHead(keras.layers.Layer):
    """`num_convs` x conv3x3 (+ norm) + relu, 2x2/2 deconv + relu, 1x1 conv
    to C masks (Detectron2 `MaskRCNNConvUpsampleHead`), of which each roi
    needs one: the 1x1 conv is computed for that class only. With
    `class_agnostic`, one mask serves every class.

    Args (keyword-only, R50-FPN defaults):
      num_classes: int, C (80).
      channels: int, width of the convs and the deconv (256).
      num_convs: int, 3x3 convs before the deconv (4).
      norm: None (default), 'gn', 'bn' or 'sync_bn' after each 3x3 conv (no
        bias then; the deconv keeps its bias and no norm, as Detectron2's);
        batch norms count the `valid` rois (`BoxHead`).
      class_agnostic: bool, one mask channel whatever the class
        (Detectron2's `ROI_MASK_HEAD.CLS_AGNOSTIC_MASK`, MMDetection's
        `class_agnostic`): the predictor has 1 output, not C, and `classes`
        is not needed. False (default): the recipes' per-class masks.

    Call:
      pooled: [B, N, 14, 14, F] RoIAligned features (N = D at inference;
        in training B = 1 and N = T, the batch's gathered positives).
      classes: int32 [B, N], the class column 0..C-1 whose mask is wanted
        (the gt class - 1 in training, the detected class - 1 at inference).
      valid: bool [B, N] or None (all), the rois a batch norm's training
        statistics count (the positives).
      training: bool, batch statistics (True) or moving ones.

    Returns:
      float32 [B, N, 28, 28] mask logits of the given class.
    """

    def __init__(self, *, num_classes=80, channels=256, num_convs=4, norm=None,
                 class_agnostic=False, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.channels = channels
        self.num_convs = num_convs
        self.class_agnostic = bool(class_agnostic)
        # Predictor outputs: one per class, or one for all.
        self.num_masks = 1 if self.class_agnostic else num_classes
        self.norm = norm_lib.check(norm, "MaskHead", _HEAD_NORMS)
        self.convs, self.conv_norms = _conv_norm_layers(self, num_convs, channels, self.norm)
        self.deconv = keras.layers.Conv2DTranspose(
            channels, 2, strides=2, activation="relu",
            kernel_initializer=_msra_fill(), name="deconv")
        # Detectron2 mask predictor: normal(std=0.001).
        self.predictor = keras.layers.Conv2D(
            self.num_masks, 1, name="predictor",
            kernel_initializer=keras.initializers.RandomNormal(stddev=0.001))

    def build(self, pooled_shape, classes_shape=None):
        """Creates the convs' variables for `pooled` of `pooled_shape`
        [B, N, h, w, F] (`classes` adds none), as `BoxHead.build` does."""
        height, width = pooled_shape[2:4]
        channels = _build_convs(self.convs, self.conv_norms, pooled_shape[2:], self.channels)
        self.deconv.build((None, height, width, channels))
        self.predictor.build((None, 2 * height, 2 * width, self.channels))

    def call(self, pooled, classes, valid=None, training=None):
        batch, rois, height, width, channels = pooled.shape
        if rois is None:   # a count known when run (outside XLA)
            rois = tf.shape(pooled)[1]
        x = tf.reshape(pooled, [batch * rois, height, width, channels])
        x = _run_convs(self.convs, self.conv_norms, x, _rows(valid), training)
        x = self.deconv(x)  # [B * Kp, 2h, 2w, channels]
        # The 1x1 predictor only for each roi's class: its kernel column and
        # bias picked by a one-hot matmul (a dense gradient), then a dot
        # product per pixel. All C masks then a gather is C times the work
        # and a [B, Kp, S, S, C] tensor: 1.1 GB per image for LVIS's 300
        # detections x 1203 classes.
        if self.class_agnostic:
            classes = tf.zeros_like(classes)
        index = tf.clip_by_value(tf.reshape(classes, [-1]), 0, self.num_masks - 1)
        pick = tf.one_hot(index, self.num_masks, dtype=x.dtype)  # [B * Kp, C]
        kernel = tf.cast(tf.reshape(self.predictor.kernel, [self.channels, self.num_masks]),
                         x.dtype)  # [channels, C]
        weights = tf.matmul(pick, kernel, transpose_b=True)  # [B * Kp, channels]
        bias = tf.linalg.matvec(pick, tf.cast(self.predictor.bias, x.dtype))  # [B * Kp]
        x = tf.einsum("nyxf,nf->nyx", x, weights) + bias[:, None, None]
        return tf.reshape(tf.cast(x, tf.float32),
                          [batch, rois, 2 * height, 2 * width])  # [B, Kp, S, S]

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes,
                "channels": self.channels, "num_convs": self.num_convs, "norm": self.norm,
                "class_agnostic": self.class_agnostic}


@configurable_layer
@keras.saving.register_keras_serializable(package="mrcnn")
class KeypointHead(keras.layers.Layer):
    """`num_convs` x conv3x3 + relu, a 4x4/2 deconv to K heatmaps, bilinear
    2x: Detectron2's `KRCNNConvDeconvUpsampleHead` (Keypoint R-CNN), class
    agnostic (every detection gets K keypoints).

    Args (keyword-only, Detectron2's keypoint_rcnn_R_50_FPN defaults):
      num_keypoints: int, K (17 for COCO persons).
      channels: int, width of the convs (512).
      num_convs: int, 3x3 convs before the deconv (8).

    Weights are He normal over fan-out, biases 0, the deconv's too
    (Detectron2's `kaiming_normal_(mode="fan_out")`). The deconv is
    PyTorch's `ConvTranspose2d(kernel 4, stride 2, padding 1)`: the full
    transposed convolution (2h + 2 cells) less one cell on each side.

    Call:
      pooled: [B, N, h, w, F] RoIAligned features (14 x 14).
      training: unused (no norms), for the callers' uniformity.

    Returns:
      float32 [B, N, K, 4h, 4w] heatmap logits (56 x 56).
    """

    def __init__(self, *, num_keypoints=17, channels=512, num_convs=8, **kwargs):
        super().__init__(**kwargs)
        self.num_keypoints = int(num_keypoints)
        self.channels = int(channels)
        self.num_convs = int(num_convs)
        if self.num_keypoints < 1:
            raise ValueError(f"KeypointHead: num_keypoints={num_keypoints} must be >= 1")
        self.convs, self.conv_norms = _conv_norm_layers(self, self.num_convs, self.channels,
                                                        None, name="conv_fcn")
        self.deconv = keras.layers.Conv2DTranspose(
            self.num_keypoints, 4, strides=2, padding="valid",
            kernel_initializer=_msra_fill(), name="score_lowres")

    def build(self, pooled_shape):
        """Creates the variables for `pooled` of `pooled_shape` [B, N, h, w, F]."""
        height, width = pooled_shape[2:4]
        channels = _build_convs(self.convs, self.conv_norms, pooled_shape[2:], self.channels)
        self.deconv.build((None, height, width, channels))

    def call(self, pooled, training=None):
        del training
        batch, rois, height, width, channels = pooled.shape
        if rois is None:   # a count known when run (outside XLA)
            rois = tf.shape(pooled)[1]
        x = tf.reshape(pooled, [batch * rois, height, width, channels])
        x = _run_convs(self.convs, self.conv_norms, x)
        x = self.deconv(x)[:, 1:-1, 1:-1]  # [B * N, 2h, 2w, K]
        x = tf.image.resize(tf.cast(x, tf.float32), [4 * height, 4 * width],
                            method="bilinear")
        x = tf.transpose(x, [0, 3, 1, 2])  # [B * N, K, 4h, 4w]
        return tf.reshape(x, [batch, rois, self.num_keypoints, 4 * height, 4 * width])

    def get_config(self):
        return {**super().get_config(), "num_keypoints": self.num_keypoints,
                "channels": self.channels, "num_convs": self.num_convs}


@configurable_layer
@keras.saving.register_keras_serializable(package="mrcnn")
class RoiHeads(BuiltByParts, keras.layers.Layer):
    """The second stage around a built `BoxHead` and `MaskHead`.

    Owns roi sampling (`ops.targets.sample_proposals`), multilevel RoIAlign,
    mask targets and inference post-processing. Boxes are float32 throughout;
    features may be any float dtype.

    Args (keyword-only, R50-FPN 1x defaults):
      box_head: a built `BoxHead`.
      mask_head: a built `MaskHead`, or None for a box-only second stage
        (Faster R-CNN, Detectron2's `MASK_ON = False`): no mask loss, and
        the detections hold no masks.
      keypoint_head: None (default), or a built `KeypointHead` (Keypoint
        R-CNN, Detectron2's `KEYPOINT_ON`): a `keypoint` loss on the
        positives with a labelled keypoint inside, and `detection_keypoints`.
      keypoint_pool_size: int, the keypoint head's RoIAlign output (14;
        its heatmaps are 4x that side, 56).
      keypoint_loss_weight: float, the keypoint loss's factor (1.0,
        Detectron2's `ROI_KEYPOINT_HEAD.LOSS_WEIGHT`).
      num_samples: int, K rois sampled per image in training (512).
      positive_fraction: float, largest positive share (0.25);
        `sample_proposals` puts all positives in the first
        `int(num_samples * positive_fraction)` slots (Kp).
      iou_threshold: float, roi foreground IoU (0.5; below is background).
      box_weights: (wy, wx, wh, ww), delta weights (10, 10, 5, 5).
      box_pool_size, mask_pool_size: ints, RoIAlign outputs (7, 14).
      sampling_ratio: int, RoIAlign samples per bin side (2); 0 adaptive
        (`ops.roi_align.roi_align`), at most `max_sampling_ratio` (6).
      aligned: bool, RoIAlign's half-cell shift (True, Detectron2's
        ROIAlignV2; torchvision's models pool with False).
      min_level, max_level: ints, FPN levels pooled from (2, 5).
      mask_size: int, S, the mask target resolution (28 = 2 x 14).
      score_threshold: float, inference score threshold (0.05).
      nms_iou: float, per-class NMS IoU at inference (0.5).
      max_detections: int, D, detections per image (100).
      box_loss_beta: float, smooth-L1 beta of the box loss (0: L1).
      mask_buckets: int >= 1, the mask head's training capacities under
        XLA (`mask_capacities`). 1 (default): all B * Kp slots, no
        conditional in the program. n > 1: B * Kp, half, a quarter, ...
        (4: 1024, 512, 256, 128 rois at batch 8), and the step runs the head
        on the smallest that holds the batch's positives, a `tf.switch_case`
        branch. Not for XLA:CPU, which runs convolutions inside a
        conditional as generated loops instead of its library calls: on
        this project's CPU a branch was 166x slower than the same
        convolutions outside one. Meant for a GPU, and not measured there
        yet (issue 7).
      class_loss: 'softmax' (default: cross-entropy over background and
        the C classes, scores the softmax) or 'sigmoid' (Detectron2's
        `USE_SIGMOID_CE`: C independent binary cross-entropies, background
        rois all-negative, scores the sigmoids; column 0 unused).
      fed_loss_classes: None, or an int with `class_loss='sigmoid'`: the
        federated loss (Detectron2's `USE_FED_LOSS`, `FED_LOSS_NUM_CLASSES`
        50 for LVIS) scores only the classes of the step's rois plus ones
        drawn by training image frequency up to this many
        (`losses.federated_classes`). The frequencies live in the
        non-trainable variable `class_image_counts` [C] (checkpointed),
        which the trainer sets from the training records.
      fed_loss_power: float, the draw weights are `class_image_counts **
        fed_loss_power` (0.5, `FED_LOSS_FREQ_WEIGHT_POWER`).
      paste_masks: bool; when True the detections also hold
        `detection_masks_canvas`, bool [B, D, H, W], the masks pasted with
        `ops.masks.paste_masks` onto the padded canvas in resized-image
        coordinates (crop to [:resized_h, :resized_w] and resize by 1/scale
        for the original image). False (default): only the 28x28
        probabilities, which evaluation pastes at the original size.
    """

    def __init__(self, *, box_head, mask_head, num_samples=512,
                 positive_fraction=0.25, iou_threshold=0.5,
                 box_weights=(10.0, 10.0, 5.0, 5.0), box_pool_size=7,
                 mask_pool_size=14, sampling_ratio=2, max_sampling_ratio=6,
                 aligned=True, min_level=2,
                 max_level=5, mask_size=28, score_threshold=0.05,
                 nms_iou=0.5, max_detections=100, box_loss_beta=0.0,
                 mask_buckets=1, paste_masks=False, class_loss="softmax",
                 fed_loss_classes=None, fed_loss_power=0.5, keypoint_head=None,
                 keypoint_pool_size=14, keypoint_loss_weight=1.0, **kwargs):
        super().__init__(**kwargs)
        if class_loss not in ("softmax", "sigmoid"):
            raise ValueError(f"RoiHeads: class_loss={class_loss!r} must be 'softmax' or "
                             f"'sigmoid'")
        if fed_loss_classes is not None and (class_loss != "sigmoid"
                                             or int(fed_loss_classes) < 1):
            raise ValueError(f"RoiHeads: fed_loss_classes={fed_loss_classes} needs "
                             f"class_loss='sigmoid' and a count >= 1")
        if mask_size != 2 * mask_pool_size:
            raise ValueError(
                f"RoiHeads: mask_size={mask_size} must be 2 * mask_pool_size"
                f"={2 * mask_pool_size} (the mask head upsamples by 2)")
        if mask_head is not None and box_head.num_classes != mask_head.num_classes:
            raise ValueError(
                f"RoiHeads: box_head.num_classes={box_head.num_classes} != "
                f"mask_head.num_classes={mask_head.num_classes}")
        if int(mask_buckets) < 1:
            raise ValueError(f"RoiHeads: mask_buckets={mask_buckets} must be >= 1")
        # Boxes must not be cast to the compute dtype on the way in.
        self._convert_input_args = False
        self.box_head = box_head
        self.mask_head = mask_head
        self.keypoint_head = keypoint_head
        self.keypoint_pool_size = int(keypoint_pool_size)
        self.keypoint_loss_weight = float(keypoint_loss_weight)
        self.num_classes = box_head.num_classes
        self.num_samples = num_samples
        self.positive_fraction = positive_fraction
        self.iou_threshold = iou_threshold
        self.box_weights = tuple(box_weights)
        self.box_pool_size = box_pool_size
        self.mask_pool_size = mask_pool_size
        self.sampling_ratio = sampling_ratio
        self.max_sampling_ratio = max_sampling_ratio
        self.aligned = bool(aligned)
        self.min_level = min_level
        self.max_level = max_level
        self.mask_size = mask_size
        self.score_threshold = score_threshold
        self.nms_iou = nms_iou
        self.max_detections = max_detections
        self.box_loss_beta = box_loss_beta
        self.mask_buckets = int(mask_buckets)
        self.paste_masks = paste_masks
        self.class_loss = class_loss
        self.fed_loss_classes = None if fed_loss_classes is None else int(fed_loss_classes)
        self.fed_loss_power = float(fed_loss_power)
        self.class_image_counts = None
        if self.fed_loss_classes is not None:
            # Until the trainer sets them, every class is drawn alike.
            self.class_image_counts = self.add_weight(
                name="class_image_counts", shape=(self.num_classes,),
                initializer="ones", trainable=False, dtype="float32")

    def class_scores(self, class_logits):
        """float32 [B, K, C] class probabilities of classes 1..C from
        `class_logits` [B, K, C + 1] (softmax or sigmoid, `class_loss`)."""
        class_logits = tf.cast(class_logits, tf.float32)
        if self.class_loss == "sigmoid":
            return tf.sigmoid(class_logits[..., 1:])
        return tf.nn.softmax(class_logits, axis=-1)[..., 1:]

    def classification_loss(self, class_logits, classes, valid):
        """float32 scalar: this head's `class_loss` on sampled rois (`classes`
        int32 [B, K] 0..C or -1, `valid` bool [B, K]), federated when
        `fed_loss_classes` is set."""
        if self.class_loss == "softmax":
            return loss_lib.rcnn_class_loss(class_logits, classes, valid)
        scored = None
        if self.fed_loss_classes is not None:
            weights = tf.pow(tf.convert_to_tensor(self.class_image_counts), self.fed_loss_power)
            scored = loss_lib.federated_classes(classes, valid, weights,
                                                self.fed_loss_classes)
        return loss_lib.rcnn_sigmoid_class_loss(class_logits, classes, valid, scored)

    @property
    def num_mask_rois(self):
        """Kp in training: the slots that can hold positives."""
        return int(self.num_samples * self.positive_fraction)

    def mask_capacities(self, batch):
        """The mask head's training capacities under XLA, Python ints, ascending.

        `B * Kp` (every slot that can hold a positive), then halved
        `mask_buckets - 1` times; e.g. [128, 256, 512, 1024] at batch 8.
        A compiled step holds one branch per capacity (`mask_loss`).
        """
        full = batch * self.num_mask_rois
        return sorted({max(full >> i, 1) for i in range(self.mask_buckets)})

    def mask_capacity(self, positive):
        """How many gathered rois the mask head trains on outside XLA.

        The batch's positives rounded up to a multiple of `B * 16` (at least
        one step, at most `B * Kp`), so an XLA island compiles for at most
        `Kp / 16` shapes: an int32 scalar.

        Args:
          positive: bool [B, Kp], the positives among the first Kp slots.
        """
        batch, slots = positive.shape
        total = tf.reduce_sum(tf.cast(positive, tf.int32))
        step = batch * min(_MASK_SLOT_STEP, slots)
        return tf.minimum(-(-tf.maximum(total, 1) // step) * step, batch * slots)

    def _gather_leading(self, used, capacity):
        """The flat indices, positives first, of the first Kp slots' rois that
        a head trains on when they are gathered into one list.

        Args:
          used: bool [B, Kp], the rois the head trains on.
          capacity: int or int32 scalar, T.

        Returns:
          (order int32 [T] into the flattened [B * Kp] slots, the used ones
          first, each image's in slot order; image int32 [T], each one's
          image; used bool [T]).
        """
        flat = tf.reshape(used, [-1])
        order = tf.argsort(tf.cast(~flat, tf.int32), stable=True)[:capacity]
        return order, order // used.shape[1], tf.gather(flat, order)

    def _capacity_index(self, positive):
        """int32 scalar: which of `mask_capacities` is the smallest that holds
        the positives of `positive` bool [B, Kp] (the `tf.switch_case` branch)."""
        total = tf.reduce_sum(tf.cast(positive, tf.int32))
        capacities = tf.constant(self.mask_capacities(positive.shape[0]), tf.int32)
        return tf.reduce_sum(tf.cast(capacities < total, tf.int32))

    def mask_loss(self, features, rois, gt_masks, gt_boxes):
        """The mask loss, float32 scalar, on the positives of `sample`'s `rois`
        (`ProposalTargets`), targets from `gt_masks` [B, M, S_m, S_m] cropped
        to `gt_boxes` [B, M, 4].

        Outside XLA the head runs on the batch's positives gathered into one
        [1, T] list, `T` = `mask_capacity`, as Detectron2's and
        torchvision's run on the positives only (bench's synthetic batch of
        8, 10 gt per image: about 80 positives among 1024 slots). Under XLA,
        by default, it runs on all B * Kp slots where they lie (gathering
        them all bought nothing and cost 21% of an R50 step on this CPU);
        with `mask_buckets > 1` each of `mask_capacities` is a branch of one
        `tf.switch_case`. The gathered slots past the positives are padding
        whose loss weight is 0, so the loss and its gradients equal those of
        the head on all slots.
        """
        positive = rois.classes[:, :self.num_mask_rois] > 0  # [B, Kp]
        if not in_xla_context():
            return self._gathered_mask_loss(features, rois, gt_masks, gt_boxes,
                                            self.mask_capacity(positive))
        capacities = self.mask_capacities(positive.shape[0])
        if len(capacities) == 1:   # all slots: nothing to gather
            return self._slot_mask_loss(features, rois, gt_masks, gt_boxes)
        branches = [
            (lambda t=t: self._gathered_mask_loss(features, rois, gt_masks, gt_boxes, t))
            for t in capacities]
        return tf.switch_case(self._capacity_index(positive), branches)

    def _slot_mask_loss(self, features, rois, gt_masks, gt_boxes):
        """`mask_loss` with the head on all B x Kp slots, image by image."""
        kp = self.num_mask_rois
        classes = rois.classes[:, :kp]
        logits = self.mask_outputs(features, rois.rois[:, :kp], tf.maximum(classes, 1),
                                   valid=classes > 0, training=True)
        targets = self.mask_targets(gt_masks, rois.rois[:, :kp], rois.matched_index[:, :kp],
                                    gt_boxes)
        return loss_lib.mask_loss(logits, targets, classes > 0)

    def _gathered_mask_loss(self, features, rois, gt_masks, gt_boxes, capacity):
        """`mask_loss` with the head on `capacity` (int, or int32 scalar)
        gathered rois, positives first."""
        kp = self.num_mask_rois
        order, image, positive = self._gather_leading(rois.classes[:, :kp] > 0,
                                                      capacity)  # [T] each
        classes = tf.gather(tf.reshape(rois.classes[:, :kp], [-1]), order)  # [T]
        boxes = tf.gather(tf.reshape(rois.rois[:, :kp], [-1, 4]), order)  # [T, 4]
        matched = tf.gather(tf.reshape(rois.matched_index[:, :kp], [-1]), order)  # [T]
        num_gt = tf.shape(gt_masks)[1]
        # Indices into the batch's gt flattened to one image of B * M.
        matched = tf.where(positive & (matched >= 0), image * num_gt + matched, -1)
        logits = self.mask_outputs(features, boxes[None], tf.maximum(classes, 1)[None],
                                   batch_index=image[None], valid=positive[None],
                                   training=True)  # [1, T, S, S]
        flat_masks = tf.reshape(gt_masks, [1, -1, *gt_masks.shape[2:]])  # [1, B * M, S_m, S_m]
        flat_boxes = tf.reshape(gt_boxes, [1, -1, 4])  # [1, B * M, 4]
        targets = self.mask_targets(flat_masks, boxes[None], matched[None], flat_boxes)
        return loss_lib.mask_loss(logits, targets, positive[None])

    @property
    def heatmap_size(self):
        """The keypoint heatmaps' side, 4 x `keypoint_pool_size` (56)."""
        return 4 * self.keypoint_pool_size

    def keypoint_loss(self, features, rois, gt_keypoints):
        """The keypoint loss, float32 scalar (`keypoint_loss_weight` x
        `losses.keypoint_loss`), on the positives of `sample`'s `rois` that
        hold a labelled keypoint of their gt instance (Detectron2's
        `select_proposals_with_visible_keypoints`); targets from
        `gt_keypoints` float32 [B, M, K, 3] (y, x, v) in resized-image pixels.

        The head runs on those rois as `mask_loss` runs the mask head: gathered
        into one list outside XLA, on all B x Kp slots under XLA (or the
        `mask_buckets` capacities). Rois without a target weigh 0, so the
        loss is the same either way.
        """
        kp = self.num_mask_rois
        boxes = rois.rois[:, :kp]
        positive = rois.classes[:, :kp] > 0
        targets = keypoint_ops.keypoint_targets(
            boxes, gt_keypoints, tf.where(positive, rois.matched_index[:, :kp], -1),
            heatmap_size=self.heatmap_size)  # [B, Kp, K] each
        used = tf.reduce_any(targets.valid, axis=-1)  # [B, Kp]

        def slots():
            logits = self.keypoint_outputs(features, boxes)
            return loss_lib.keypoint_loss(logits, targets.indices, targets.valid)

        def gathered(capacity):
            order, image, _ = self._gather_leading(used, capacity)
            k = self.keypoint_head.num_keypoints
            logits = self.keypoint_outputs(features, tf.gather(tf.reshape(boxes, [-1, 4]),
                                                               order)[None],
                                           batch_index=image[None])  # [1, T, K, S, S]
            return loss_lib.keypoint_loss(
                logits, tf.gather(tf.reshape(targets.indices, [-1, k]), order)[None],
                tf.gather(tf.reshape(targets.valid, [-1, k]), order)[None])

        if not in_xla_context():
            loss = gathered(self.mask_capacity(used))
        else:
            capacities = self.mask_capacities(used.shape[0])
            if len(capacities) == 1:
                loss = slots()
            else:
                loss = tf.switch_case(self._capacity_index(used),
                                      [(lambda t=t: gathered(t)) for t in capacities])
        return self.keypoint_loss_weight * loss

    def keypoint_outputs(self, features, rois, batch_index=None):
        """Heatmap logits float32 [N, T, K, S, S] (S = `heatmap_size`) for
        `rois` float32 [N, T, 4]; N = B, or any N with `batch_index`
        (`mask_outputs`)."""
        pooled = self._pool(features, rois, self.keypoint_pool_size, batch_index=batch_index)
        return self.keypoint_head(pooled)

    def detect_keypoints(self, features, boxes, classes, image_info):
        """float32 [B, D, K, 3] (y, x, score) keypoints of the detections, in
        original image pixels (`ops.keypoints.heatmaps_to_keypoints`, then
        divided by the resize scale); padded slots 0.

        Args:
          features: {l: [B, H_l, W_l, F]}.
          boxes: float32 [B, D, 4] in resized-image pixels.
          classes: int32 [B, D]; 0 marks a padded slot.
          image_info: float32 [B, 5].
        """
        batch, slots = classes.shape
        n = _leading_slots(classes > 0)
        used = boxes[:, :n]
        points = keypoint_ops.heatmaps_to_keypoints(self.keypoint_outputs(features, used),
                                                    used)  # [B, n, K, 3]
        scale = image_info[:, 4][:, None, None, None]
        points = tf.concat([points[..., :2] / scale, points[..., 2:]], axis=-1)
        points = tf.where((classes[:, :n] > 0)[..., None, None], points, 0.0)
        if isinstance(n, int):
            return points
        points = tf.pad(points, [[0, 0], [0, slots - n], [0, 0], [0, 0]])
        return tf.ensure_shape(points, [batch, slots, self.keypoint_head.num_keypoints, 3])

    def sample(self, proposals, proposal_valid, gt_boxes, gt_classes,
               gt_valid):
        """`ops.targets.sample_proposals` with this head's settings."""
        return target_ops.sample_proposals(
            proposals, proposal_valid, gt_boxes, gt_classes, gt_valid,
            num_samples=self.num_samples,
            positive_fraction=self.positive_fraction,
            positive_iou=self.iou_threshold, negative_iou=self.iou_threshold,
            weights=self.box_weights)

    @compiled
    def _pool(self, features, rois, size, batch_index=None):
        return roi_ops.multilevel_roi_align(
            features, rois, output_size=(size, size),
            sampling_ratio=self.sampling_ratio, min_level=self.min_level,
            max_level=self.max_level, max_sampling_ratio=self.max_sampling_ratio,
            aligned=self.aligned, batch_index=batch_index)

    def box_outputs(self, features, rois, valid=None, training=False):
        """Box head on `rois` float32 [B, K, 4]: logits [B, K, C+1], deltas
        [B, K, C|1, 4]; `valid` bool [B, K]: the rois its batch norms count
        when `training`."""
        return self.box_head(self._pool(features, rois, self.box_pool_size), valid,
                             training=training)

    def box_losses(self, features, rois, gt_boxes, gt_classes, gt_valid, image_info):
        """{rcnn_class, rcnn_box}: float32 scalars on the sampled `rois`
        (`sample`'s `ProposalTargets`); the gt and image_info serve a cascade."""
        del gt_boxes, gt_classes, gt_valid, image_info
        class_logits, box_deltas = self.box_outputs(features, rois.rois, rois.valid,
                                                    training=True)
        return {
            "rcnn_class": self.classification_loss(class_logits, rois.classes, rois.valid),
            "rcnn_box": loss_lib.rcnn_box_loss(box_deltas, rois.box_targets, rois.classes,
                                               rois.valid, self.box_loss_beta),
        }

    def mask_outputs(self, features, rois, classes, batch_index=None, valid=None,
                     training=False):
        """Mask logits float32 [N, T, S, S] for `rois` float32 [N, T, 4] and
        classes int32 [N, T] 1..C; N = B, or any N with `batch_index` int32
        [N, T], the image of each roi (`ops.roi_align.multilevel_roi_align`);
        `valid` bool [N, T]: the rois the head's batch norms count when
        `training`."""
        pooled = self._pool(features, rois, self.mask_pool_size, batch_index=batch_index)
        return self.mask_head(pooled, classes - 1, valid, training=training)

    @compiled
    def mask_targets(self, gt_masks, rois, matched_index, gt_boxes):
        """float32 [N, T, S, S] for `rois` [N, T, 4] and `matched_index`
        int32 [N, T] into `gt_masks` [N, M, S_m, S_m] cropped to `gt_boxes`
        [N, M, 4]."""
        return mask_ops.mask_targets(
            gt_masks, rois, matched_index, (self.mask_size, self.mask_size),
            crop_boxes=gt_boxes)

    def detect(self, features, proposals, proposal_valid, image_info,
               canvas_size):
        """Inference: box head, decode, per-class NMS, mask head, rescale.

        Algorithm:
          1. Box head on all proposals; decode class-specific deltas with
             (10, 10, 5, 5), clip to the resized image.
          2. Softmax in float32; drop the background column; proposals that
             are padding or whose box is empty get score 0.
          3. `multiclass_nms` (score > 0.05, IoU 0.5, D per image).
          4. Mask head on the kept boxes with their classes; sigmoid.
          5. Boxes divided by `scale` and clipped to the original image.

        Args:
          features: {l: [B, H_l, W_l, F]}.
          proposals: float32 [B, P, 4]; valid: bool [B, P].
          image_info: float32 [B, 5] (orig h, orig w, resized h, resized w,
            scale).
          canvas_size: (H, W) Python ints.

        Returns:
          dict: detection_boxes float32 [B, D, 4] (y1, x1, y2, x2) in
          original image pixels, detection_scores float32 [B, D],
          detection_classes int32 [B, D] (1..C), detection_masks float32
          [B, D, S, S] probabilities (not without a mask head),
          num_detections int32 [B]; padded slots: boxes, scores and masks
          0, classes 0. With `paste_masks`, also detection_masks_canvas bool
          [B, D, H, W]. With a keypoint head, also detection_keypoints float32
          [B, D, K, 3] (y, x, score) in original image pixels
          (`detect_keypoints`).
        """
        image_info = tf.cast(image_info, tf.float32)
        boxes, scores, classes, num_valid = self.detect_boxes(
            features, proposals, proposal_valid, image_info)
        slot_valid = tf.range(self.max_detections)[None, :] < num_valid[:, None]
        original = to_original_pixels(boxes, image_info)  # 5.
        detections = {
            "detection_boxes": tf.where(slot_valid[..., None], original, 0.0),
            "detection_scores": scores,
            "detection_classes": classes,
            "num_detections": num_valid,
        }
        if self.keypoint_head is not None:
            detections["detection_keypoints"] = self.detect_keypoints(
                features, boxes, classes, image_info)
        if self.mask_head is None:
            return detections
        # 4.
        masks = self.detect_masks(features, boxes, classes)
        detections["detection_masks"] = masks
        if self.paste_masks:
            detections["detection_masks_canvas"] = mask_ops.paste_masks(
                masks, boxes, canvas_size)
        return detections

    def detect_boxes(self, features, proposals, proposal_valid, image_info):
        """Steps 1-3 of `detect`: the kept boxes in resized-image pixels.

        Returns:
          (boxes float32 [B, D, 4] in resized-image pixels, scores float32
          [B, D], classes int32 [B, D] 1..C, num_valid int32 [B]); padded
          slots: boxes and scores 0, classes 0.
        """
        image_info = tf.cast(image_info, tf.float32)
        # 1.
        class_logits, deltas = self.box_outputs(features, proposals)
        return self._kept(self._decode(deltas, proposals, self.box_weights, image_info),
                          self.class_scores(class_logits), proposal_valid)

    def _decode(self, deltas, boxes, weights, image_info):
        """float32 [B, P, C|1, 4]: `deltas` [B, P, C|1, 4] applied to `boxes`
        [B, P, 4], clipped to the resized images."""
        batch, num, columns = deltas.shape[0], deltas.shape[1], deltas.shape[2]
        decoded = box_ops.decode_boxes(deltas, boxes[:, :, None, :], weights)
        return tf.reshape(box_ops.clip_boxes(
            tf.reshape(decoded, [batch, num * columns, 4]), image_info[:, 2:4]),
            [batch, num, columns, 4])

    def _kept(self, boxes, scores, proposal_valid):
        """Steps 2-3 of `detect` on decoded boxes [B, P, C|1, 4] and
        foreground scores [B, P, C]: `detect_boxes`' tuple."""
        if boxes.shape[2] == 1:   # class-agnostic deltas: one box for all classes
            boxes = boxes[:, :, 0]   # [B, P, 4], which multiclass_nms shares
        # 2.
        nonempty = tf.logical_and(boxes[..., 2] > boxes[..., 0],
                                  boxes[..., 3] > boxes[..., 1])  # [B, P, C|]
        if boxes.shape.rank == 3:
            nonempty = nonempty[..., None]
        scores = tf.where(nonempty & proposal_valid[..., None], scores, 0.0)
        # 3.
        kept = nms_ops.multiclass_nms(
            boxes, scores, max_per_class=self.max_detections,
            max_total=self.max_detections, iou_threshold=self.nms_iou,
            score_threshold=self.score_threshold)
        slot_valid = (tf.range(self.max_detections)[None, :]
                      < kept.num_valid[:, None])  # [B, D]
        return (kept.boxes, tf.where(slot_valid, kept.scores, 0.0),
                tf.where(slot_valid, kept.classes + 1, 0), kept.num_valid)

    def detect_masks(self, features, boxes, classes):
        """Step 4 of `detect`: float32 [B, D, S, S] mask probabilities.

        Args:
          features: {l: [B, H_l, W_l, F]}.
          boxes: float32 [B, D, 4] in resized-image pixels.
          classes: int32 [B, D], 1..C; 0 marks a padded slot (its mask is 0).
        """
        # Outside XLA the head runs on the slots up to the last detection
        # (`_leading_slots`); the others are 0 either way.
        batch, slots = classes.shape
        n = _leading_slots(classes > 0)
        classes = classes[:, :n]
        mask_logits = self.mask_outputs(features, boxes[:, :n], tf.maximum(classes, 1))
        masks = tf.where((classes > 0)[..., None, None], tf.sigmoid(mask_logits), 0.0)
        if isinstance(n, int):
            return masks
        masks = tf.pad(masks, [[0, 0], [0, slots - n], [0, 0], [0, 0]])
        return tf.ensure_shape(masks, [batch, slots, self.mask_size, self.mask_size])

    def get_config(self):
        return {
            **super().get_config(),
            "box_head": keras.saving.serialize_keras_object(self.box_head),
            "mask_head": (None if self.mask_head is None
                          else keras.saving.serialize_keras_object(self.mask_head)),
            "num_samples": self.num_samples,
            "positive_fraction": self.positive_fraction,
            "iou_threshold": self.iou_threshold,
            "box_weights": list(self.box_weights),
            "box_pool_size": self.box_pool_size,
            "mask_pool_size": self.mask_pool_size,
            "sampling_ratio": self.sampling_ratio,
            "max_sampling_ratio": self.max_sampling_ratio,
            "aligned": self.aligned,
            "min_level": self.min_level, "max_level": self.max_level,
            "mask_size": self.mask_size,
            "score_threshold": self.score_threshold,
            "nms_iou": self.nms_iou, "max_detections": self.max_detections,
            "box_loss_beta": self.box_loss_beta,
            "mask_buckets": self.mask_buckets,
            "paste_masks": self.paste_masks,
            "class_loss": self.class_loss,
            "fed_loss_classes": self.fed_loss_classes,
            "fed_loss_power": self.fed_loss_power,
            "keypoint_head": (None if self.keypoint_head is None
                              else keras.saving.serialize_keras_object(self.keypoint_head)),
            "keypoint_pool_size": self.keypoint_pool_size,
            "keypoint_loss_weight": self.keypoint_loss_weight,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["box_head"] = keras.saving.deserialize_keras_object(
            config["box_head"])
        return cls(**_deserialized_heads(config))


def _deserialized_heads(config):
    """`config` with its optional mask and keypoint heads deserialized."""
    for key in ("mask_head", "keypoint_head"):
        if config.get(key) is not None:
            config[key] = keras.saving.deserialize_keras_object(config[key])
    return config


# Detectron2's CASCADE_ROI_HEADS.IOUS and BBOX_REG_WEIGHTS.
CASCADE_IOUS = (0.5, 0.6, 0.7)
CASCADE_BOX_WEIGHTS = ((10.0, 10.0, 5.0, 5.0), (20.0, 20.0, 10.0, 10.0),
                       (30.0, 30.0, 15.0, 15.0))


def _scaled_gradient(x, scale):
    """`x`, with its gradient multiplied by the Python float `scale`."""
    @tf.custom_gradient
    def identity(x):
        return tf.identity(x), lambda dy: dy * tf.cast(scale, dy.dtype)
    return identity(x)


@configurable_layer
@keras.saving.register_keras_serializable(package="mrcnn")
class CascadeRoiHeads(RoiHeads):
    """Cascade R-CNN's second stage: box heads in series at rising IoUs.

    Detectron2's `CascadeROIHeads` (`cascade_mask_rcnn_R_50_FPN_1x`): stage
    1 is `RoiHeads`' box head on the sampled proposals; stage k + 1 pools the
    boxes stage k regressed (clipped to the image, gradients stopped) and
    labels them afresh against the gt at its own IoU, without sampling
    (boxes left empty are dropped from its losses). Every stage has
    class-agnostic deltas and its own box weights, and its pooled features
    pass `1 / stages` of their gradient back (Detectron2's `_ScaleGradient`).
    At inference each stage runs on the previous stage's boxes; the scores
    are the mean of the stages' softmaxes, the boxes the last stage's; NMS
    and the mask head are `RoiHeads`'. The mask head trains on the stage-1
    samples.

    Args (keyword-only, besides `RoiHeads`' own but for box_head,
    iou_threshold and box_weights):
      box_heads: the built `BoxHead`s, stage by stage, `class_agnostic`.
      stage_ious: floats, each stage's foreground IoU ((0.5, 0.6, 0.7)).
      stage_box_weights: each stage's (wy, wx, wh, ww) ((10, 10, 5, 5),
        (20, 20, 10, 10), (30, 30, 15, 15)).

    `box_losses` returns rcnn_class_stage1, rcnn_box_stage1, ... per stage.
    """

    def __init__(self, *, box_heads, mask_head, stage_ious=CASCADE_IOUS,
                 stage_box_weights=CASCADE_BOX_WEIGHTS, **kwargs):
        box_heads = list(box_heads)
        stage_ious = tuple(float(v) for v in stage_ious)
        stage_box_weights = tuple(tuple(float(v) for v in w) for w in stage_box_weights)
        if not box_heads or not len(box_heads) == len(stage_ious) == len(stage_box_weights):
            raise ValueError(
                f"CascadeRoiHeads: {len(box_heads)} box_heads, {len(stage_ious)} "
                f"stage_ious and {len(stage_box_weights)} stage_box_weights must be "
                f"as many, at least one")
        for k, head in enumerate(box_heads):
            if not head.class_agnostic or head.num_classes != box_heads[0].num_classes:
                raise ValueError(
                    f"CascadeRoiHeads: box_heads[{k}] must be class_agnostic with "
                    f"num_classes={box_heads[0].num_classes}")
        super().__init__(box_head=box_heads[0], mask_head=mask_head,
                         iou_threshold=stage_ious[0], box_weights=stage_box_weights[0],
                         **kwargs)
        for k, head in enumerate(box_heads[1:], start=2):
            setattr(self, f"box_head_stage{k}", head)   # tracked for checkpoints
        self.box_heads = box_heads
        self.stage_ious = stage_ious
        self.stage_box_weights = stage_box_weights

    def _stage_targets(self, boxes, valid, gt_boxes, gt_classes, gt_valid, stage):
        """Classes int32 [B, K] (-1 where not valid) and box targets [B, K, 4] of
        the boxes a stage pools, matched at its IoU."""
        iou = self.stage_ious[stage]
        matched, labels = target_ops.match_boxes(boxes, gt_boxes, gt_valid, iou, iou,
                                                 allow_low_quality=False)
        positive = (labels == 1) & valid
        index = tf.maximum(matched, 0)
        classes = tf.where(positive, tf.gather(gt_classes, index, batch_dims=1),
                           tf.where(valid, 0, -1))
        targets = box_ops.encode_boxes(tf.gather(gt_boxes, index, batch_dims=1), boxes,
                                       self.stage_box_weights[stage])
        return classes, tf.where(positive[..., None], targets, 0.0)

    def box_losses(self, features, rois, gt_boxes, gt_classes, gt_valid, image_info):
        boxes, valid = rois.rois, rois.valid
        classes, targets = rois.classes, rois.box_targets
        losses, stages, deltas = {}, len(self.box_heads), None
        for k, head in enumerate(self.box_heads):
            if k:
                boxes = tf.stop_gradient(self._decode(
                    deltas, boxes, self.stage_box_weights[k - 1], image_info)[:, :, 0])
                valid = valid & (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])
                classes, targets = self._stage_targets(boxes, valid, gt_boxes, gt_classes,
                                                       gt_valid, k)
            pooled = _scaled_gradient(self._pool(features, boxes, self.box_pool_size),
                                      1.0 / stages)
            logits, deltas = head(pooled, valid, training=True)
            losses[f"rcnn_class_stage{k + 1}"] = self.classification_loss(
                logits, classes, valid)
            losses[f"rcnn_box_stage{k + 1}"] = loss_lib.rcnn_box_loss(
                deltas, targets, classes, valid, self.box_loss_beta)
        return losses

    def detect_boxes(self, features, proposals, proposal_valid, image_info):
        image_info = tf.cast(image_info, tf.float32)
        boxes, total, deltas = proposals, 0.0, None
        for k, head in enumerate(self.box_heads):
            if k:
                boxes = self._decode(deltas, boxes, self.stage_box_weights[k - 1],
                                     image_info)[:, :, 0]
            logits, deltas = head(self._pool(features, boxes, self.box_pool_size),
                                  training=False)
            total += self.class_scores(logits)
        scores = total / float(len(self.box_heads))
        return self._kept(self._decode(deltas, boxes, self.stage_box_weights[-1],
                                       image_info), scores, proposal_valid)

    def get_config(self):
        config = super().get_config()
        for key in ("box_head", "iou_threshold", "box_weights"):
            config.pop(key)
        return {**config,
                "box_heads": [keras.saving.serialize_keras_object(h) for h in self.box_heads],
                "stage_ious": list(self.stage_ious),
                "stage_box_weights": [list(w) for w in self.stage_box_weights]}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["box_heads"] = [keras.saving.deserialize_keras_object(h)
                               for h in config["box_heads"]]
        return cls(**_deserialized_heads(config))
