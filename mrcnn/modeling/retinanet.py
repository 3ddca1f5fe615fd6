"""RetinaNet (Lin et al. 2017, "Focal Loss for Dense Object Detection"):
a one-stage detector on the same backbone, FPN and ops as Mask R-CNN.

Shape letters: `B` batch, `N_l` anchors of level `l` (`H_l * W_l * A`),
`N` all anchors (sum of `N_l`), `A` anchors per location (9), `C`
foreground classes, `M` gt boxes per image, `T` detection candidates per
image (`topk_candidates` per level, all levels), `D` detections per image,
`F` FPN channels.

The batch is `MaskRCNN`'s (`mrcnn.modeling.mask_rcnn`) without masks:
images, image_info, and for training gt_boxes, gt_classes, gt_valid.
Detections are `MaskRCNN`'s without masks, so `bin/train`, `bin/eval`,
`bin/predict` and `bin/export` run it as they run a Faster R-CNN.
"""

import math

import gin
import keras
import tensorflow as tf

from mrcnn.modeling import losses as loss_lib
from mrcnn.modeling import norms as norm_lib
from mrcnn.modeling._config import BuiltByParts, checkpointed, configurable_layer
from mrcnn.modeling._xla import compiled
from mrcnn.modeling.detector import Detector, to_original_pixels
from mrcnn.modeling.fpn import FPN
from mrcnn.modeling.resnet import IMAGENET_MEAN, IMAGENET_STD, ResNet
from mrcnn.ops import anchors as anchor_ops
from mrcnn.ops import boxes as box_ops
from mrcnn.ops import nms as nms_ops
from mrcnn.ops import targets as target_ops


@configurable_layer
@keras.saving.register_keras_serializable(package="mrcnn")
class RetinaNetHead(BuiltByParts, keras.layers.Layer):
    """Two subnets of 3x3 convs shared by every level: classes and boxes.

    `num_convs` 3x3 convs of `channels` with relu, then a 3x3 conv to
    `A * C` class logits; a second tower of the same shape ends in `A * 4`
    box deltas (RetinaNet §4, Detectron2 `RetinaNetHead`). Weights
    normal(std 0.01), biases 0, except the class logits' bias
    `-log((1 - prior_prob) / prior_prob)`, so every anchor starts at
    probability `prior_prob` for each class and the many background anchors
    do not swamp the first steps' loss (§4.1, "Initialization").

    Args (keyword-only; Detectron2 defaults):
      num_classes: int, C (80).
      channels: int, the towers' channels (256, = FPN channels).
      num_convs: int, convs per tower (4).
      num_anchors: int, A (9: 3 scales x 3 aspect ratios).
      prior_prob: float in (0, 1), the initial foreground probability (0.01).
      norm: None (default) or 'gn': GroupNorm after each tower conv, before
        its relu, shared by the levels (Detectron2 `RETINANET.NORM = "GN"`,
        whose convs keep their biases). Batch norms are not offered: one
        set of statistics would mix five levels' features.

    Call:
      features: {l: [B, H_l, W_l, F]} for the levels with anchors.

    Returns:
      (class_logits, deltas): {l: float32 [B, N_l, C]} and {l: float32
      [B, N_l, 4]} (dy, dx, dh, dw), rows ordered like `multilevel_anchors`
      (row-major over (i, j, anchor)).
    """

    def __init__(self, *, num_classes=80, channels=256, num_convs=4, num_anchors=9,
                 prior_prob=0.01, norm=None, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 < prior_prob < 1.0:
            raise ValueError(f"RetinaNetHead: prior_prob={prior_prob} must be in (0, 1)")
        if int(num_convs) < 0 or int(num_classes) < 1 or int(num_anchors) < 1:
            raise ValueError(f"RetinaNetHead: num_convs={num_convs}, num_classes="
                             f"{num_classes}, num_anchors={num_anchors}")
        self.num_classes = int(num_classes)
        self.channels = int(channels)
        self.num_convs = int(num_convs)
        self.num_anchors = int(num_anchors)
        self.prior_prob = float(prior_prob)
        self.norm = norm_lib.check(norm, "RetinaNetHead", allowed=("gn",))
        init = keras.initializers.RandomNormal(stddev=0.01)

        def tower(prefix):
            convs = checkpointed(self, [
                keras.layers.Conv2D(self.channels, 3, padding="same",
                                    activation=None if self.norm else "relu",
                                    kernel_initializer=init, name=f"{prefix}_conv{i + 1}")
                for i in range(self.num_convs)])
            norms = (checkpointed(self, [
                norm_lib.make_norm(self.norm, f"{prefix}_conv{i + 1}_norm", self.channels)
                for i in range(self.num_convs)]) if self.norm else [None] * self.num_convs)
            return convs, norms

        self.class_convs, self.class_norms = tower("class")
        self.box_convs, self.box_norms = tower("box")
        self.class_logits = keras.layers.Conv2D(
            self.num_anchors * self.num_classes, 3, padding="same", kernel_initializer=init,
            bias_initializer=keras.initializers.Constant(
                -math.log((1.0 - self.prior_prob) / self.prior_prob)),
            name="class_logits")
        self.box_deltas = keras.layers.Conv2D(
            self.num_anchors * 4, 3, padding="same", kernel_initializer=init,
            name="box_deltas")

    def call(self, features):
        def run(convs, norms, x):
            for conv, norm in zip(convs, norms):
                x = conv(x) if norm is None else tf.nn.relu(norm(conv(x)))
            return x

        class_logits, deltas = {}, {}
        for level, x in sorted(features.items()):
            batch, height, width, _ = x.shape
            cells = height * width * self.num_anchors
            y = run(self.class_convs, self.class_norms, x)
            # Channel a * C + c is anchor a, class c: rows (i, j, a), columns c.
            class_logits[level] = tf.reshape(
                tf.cast(self.class_logits(y), tf.float32), [batch, cells, self.num_classes])
            y = run(self.box_convs, self.box_norms, x)
            deltas[level] = tf.reshape(tf.cast(self.box_deltas(y), tf.float32),
                                       [batch, cells, 4])
        return class_logits, deltas

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes,
                "channels": self.channels, "num_convs": self.num_convs,
                "num_anchors": self.num_anchors, "prior_prob": self.prior_prob,
                "norm": self.norm}


@configurable_layer
class RetinaNet(Detector):
    """Backbone -> FPN (P3-P7) -> dense class and box head on 9 anchors a cell.

    Training: every anchor is matched to the gt boxes (`ops.targets.
    anchor_targets`: IoU >= 0.5 foreground, < 0.4 background, in between
    ignored, low-quality matches on); the focal loss sums over all anchors
    not ignored and the smooth-L1 box loss over the positives, both divided
    by the batch's positive anchors (at least 1). Detectron2 smooths that
    count with a moving average across steps (momentum 0.9, from 100); the
    count of the batch itself keeps the model free of state the trainer
    would have to checkpoint and all-reduce.

    Inference (Detectron2 `RetinaNet.inference_single_image`), per image:
      1. Per level, the `topk_candidates` (anchor, class) pairs of highest
         sigmoid score, kept where the score is > `score_threshold`.
      2. Their anchors' deltas decoded (weights 1, 1, 1, 1).
      3. Per-class greedy NMS over all levels' candidates (`batched_nms`
         with the class as group, IoU `nms_iou`), the best `max_detections`.
      4. Boxes divided by the image's scale, clipped to the original image.

    Args (keyword-only; Detectron2 `retinanet_R_50_FPN_1x` defaults):
      backbone: a built `ResNet`.
      fpn: a built `FPN` from level 3 with the 'p6p7' top block (P3-P7).
      head: a built `RetinaNetHead`; its `num_anchors` must be
        `scales_per_octave * len(aspect_ratios)`.
      anchor_sizes: one base size per FPN level (32, 64, 128, 256, 512).
      aspect_ratios: widths over heights (0.5, 1, 2).
      scales_per_octave: int, anchor scales `2**(k/n)` per level (3).
      anchor_offset: float, anchor centres at `(i + offset) * stride` (0.5;
        Detectron2's trained models use 0, `gin/detectron2_conventions.gin`).
      positive_iou, negative_iou: floats, anchor matching (0.5, 0.4).
      focal_alpha, focal_gamma: floats, `losses.focal_loss` (0.25, 2).
      box_loss_beta: float, smooth-L1 beta of the box loss (0.1).
      score_threshold: float, candidates need a score above it (0.05).
      topk_candidates: int, candidates per level before NMS (1000).
      nms_iou: float, per-class NMS IoU threshold (0.5).
      max_detections: int, D (100).
      pixel_mean, pixel_std: the input normalisation (`Detector`).

    `call(batch, training=True)` returns the losses {retinanet_class,
    retinanet_box}, float32 scalars; `call(batch, training=False)` the
    detections dict: detection_boxes float32 [B, D, 4] (y1, x1, y2, x2) in
    original image pixels, detection_scores float32 [B, D],
    detection_classes int32 [B, D] (1..C), num_detections int32 [B];
    padded slots 0. Both run under `tf.function(jit_compile=True)`.
    """

    def __init__(self, *, backbone, fpn, head, anchor_sizes=(32, 64, 128, 256, 512),
                 aspect_ratios=(0.5, 1.0, 2.0), scales_per_octave=3, anchor_offset=0.5,
                 positive_iou=0.5, negative_iou=0.4, focal_alpha=0.25, focal_gamma=2.0,
                 box_loss_beta=0.1, score_threshold=0.05, topk_candidates=1000,
                 nms_iou=0.5, max_detections=100, pixel_mean=IMAGENET_MEAN,
                 pixel_std=IMAGENET_STD, **kwargs):
        super().__init__(pixel_mean=pixel_mean, pixel_std=pixel_std, **kwargs)
        if len(anchor_sizes) != fpn.max_level - fpn.min_level + 1:
            raise ValueError(
                f"RetinaNet: {len(anchor_sizes)} anchor_sizes for fpn levels "
                f"{fpn.min_level}..{fpn.max_level}: need one per level")
        if head.num_anchors != scales_per_octave * len(aspect_ratios):
            raise ValueError(
                f"RetinaNet: head.num_anchors={head.num_anchors} != scales_per_octave "
                f"{scales_per_octave} x {len(aspect_ratios)} aspect_ratios")
        self.backbone = backbone
        self.fpn = fpn
        self.head = head
        self.anchor_sizes = tuple(anchor_sizes)
        self.aspect_ratios = tuple(aspect_ratios)
        self.scales_per_octave = int(scales_per_octave)
        self.anchor_offset = float(anchor_offset)
        self.positive_iou = float(positive_iou)
        self.negative_iou = float(negative_iou)
        self.focal_alpha = float(focal_alpha)
        self.focal_gamma = float(focal_gamma)
        self.box_loss_beta = float(box_loss_beta)
        self.score_threshold = float(score_threshold)
        self.topk_candidates = int(topk_candidates)
        self.nms_iou = float(nms_iou)
        self.max_detections = int(max_detections)

    @property
    def num_classes(self):
        """C, foreground classes (contiguous ids 1..C)."""
        return self.head.num_classes

    def anchors(self, canvas_size):
        """{l: float32 [N_l, 4]} for the static canvas `(H, W)`."""
        return anchor_ops.multilevel_anchors(
            canvas_size, self.fpn.min_level, self.fpn.max_level, self.anchor_sizes,
            self.aspect_ratios, self.scales_per_octave, offset=self.anchor_offset)

    def outputs(self, batch, training=False):
        """The head's outputs on a batch, with the anchors and image_info.

        Returns:
          (class_logits {l: float32 [B, N_l, C]}, deltas {l: float32
          [B, N_l, 4]}, anchors {l: float32 [N_l, 4]}, image_info float32
          [B, 5]).
        """
        images = batch["images"]
        canvas = self.canvas(images)
        image_info = tf.cast(batch["image_info"], tf.float32)
        features = self.fpn(self.backbone(self.normalize_images(images, image_info),
                                          training=training), training=training)
        class_logits, deltas = self.head(features)
        return class_logits, deltas, self.anchors(canvas), image_info

    def call(self, batch, training=False):
        class_logits, deltas, anchors, image_info = self.outputs(batch, training)
        if not training:
            return self.detect_boxes(class_logits, deltas, anchors, image_info)
        levels = sorted(anchors)
        targets = self.targets(tf.concat([anchors[l] for l in levels], axis=0),
                               batch["gt_boxes"], batch["gt_classes"], batch["gt_valid"])
        normalizer = tf.maximum(
            tf.reduce_sum(tf.cast(tf.equal(targets.labels, 1), tf.float32)), 1.0)
        return {
            "retinanet_class": loss_lib.focal_loss(
                tf.concat([class_logits[l] for l in levels], axis=1), targets.classes,
                normalizer, self.focal_alpha, self.focal_gamma),
            "retinanet_box": loss_lib.dense_box_loss(
                tf.concat([deltas[l] for l in levels], axis=1), targets.box_targets,
                targets.labels, normalizer, self.box_loss_beta),
        }

    @compiled
    def targets(self, anchors, gt_boxes, gt_classes, gt_valid):
        """`ops.targets.anchor_targets` of all levels' anchors [N, 4] (an XLA
        island in a graph step, as `RpnHead.targets`)."""
        return target_ops.anchor_targets(
            anchors, gt_boxes, gt_classes, gt_valid, positive_iou=self.positive_iou,
            negative_iou=self.negative_iou)

    def detect_boxes(self, class_logits, deltas, anchors, image_info):
        """Detections from the head's outputs (steps 1-4 of the class doc).

        Args:
          class_logits: {l: float32 [B, N_l, C]}; deltas: {l: float32
            [B, N_l, 4]}; anchors: {l: float32 [N_l, 4]}.
          image_info: float32 [B, 5].

        Returns:
          The detections dict (see the class doc).
        """
        boxes, scores, classes = [], [], []
        for level in sorted(anchors):
            logits = class_logits[level]
            batch, num, num_classes = logits.shape
            k = min(self.topk_candidates, num * num_classes)
            # Sigmoid is monotonic: rank the logits, score only the top k.
            top, pair = tf.math.top_k(tf.reshape(logits, [batch, num * num_classes]), k=k)
            anchor_index = pair // num_classes  # [B, k]
            d = tf.gather(deltas[level], anchor_index, batch_dims=1)  # [B, k, 4]
            a = tf.gather(anchors[level], anchor_index)  # [B, k, 4]
            boxes.append(box_ops.decode_boxes(d, a))
            scores.append(tf.sigmoid(top))
            classes.append(pair % num_classes)
        boxes = tf.concat(boxes, axis=1)  # [B, T, 4]
        scores = tf.concat(scores, axis=1)  # [B, T]
        classes = tf.concat(classes, axis=1)  # [B, T], 0..C-1
        kept = nms_ops.batched_nms(boxes, scores, self.max_detections,
                                   iou_threshold=self.nms_iou,
                                   score_threshold=self.score_threshold,
                                   valid=tf.math.is_finite(scores), groups=classes)
        slot_valid = kept.indices >= 0  # [B, D]
        detected = tf.where(slot_valid, tf.gather(classes, tf.maximum(kept.indices, 0),
                                                  batch_dims=1) + 1, 0)
        original = to_original_pixels(kept.boxes, image_info)
        return {
            "detection_boxes": tf.where(slot_valid[..., None], original, 0.0),
            "detection_scores": kept.scores,
            "detection_classes": detected,
            "num_detections": kept.num_valid,
        }


@gin.configurable
def build_retinanet(*, num_classes=80, depth=50, width=64, norm="frozen_bn", freeze_at=2,
                    fpn_channels=256, head_convs=4, anchor_sizes=(32, 64, 128, 256, 512),
                    topk_candidates=1000, max_detections=100, top_block_input="c5",
                    head_norm=None,
                    pixel_mean=IMAGENET_MEAN, pixel_std=IMAGENET_STD):
    """Builds `RetinaNet` from primitives, without gin (tests, small configs).

    Defaults are Detectron2's `retinanet_R_50_FPN_1x`: ResNet-50, FPN P3-P7
    with P6 and P7 by strided convs from C5, four-conv towers of 256.
    Smaller values (depth=18, fpn_channels=64, head_convs=2) give a model
    that trains in seconds per step on a CPU; `head_norm` is
    `RetinaNetHead.norm`.
    """
    # Parts in model order: the order they are made in draws the initial weights.
    backbone = ResNet(depth=depth, width=width, norm=norm, freeze_at=freeze_at)
    fpn = FPN(channels=fpn_channels, min_level=3, max_level=7, top_block="p6p7",
              top_block_input=top_block_input)
    head = RetinaNetHead(num_classes=num_classes, channels=fpn_channels,
                         num_convs=head_convs, norm=head_norm)
    return RetinaNet(backbone=backbone, fpn=fpn, head=head, anchor_sizes=anchor_sizes,
                     topk_candidates=topk_candidates, max_detections=max_detections,
                     pixel_mean=pixel_mean, pixel_std=pixel_std)
