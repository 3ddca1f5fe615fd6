"""Region Proposal Network head and proposal generation (Faster R-CNN §3.1, FPN §4.1).

Shape letters: `B` batch, `L` pyramid levels (P2-P6), `N_l` anchors of level
`l` (`H_l * W_l * A`), `N` all anchors (sum of `N_l`), `A` anchors per
location (3), `P` proposals per image, `F` FPN channels.
"""

import keras
import tensorflow as tf

from mrcnn.modeling._config import BuiltByParts, checkpointed, configurable_layer
from mrcnn.modeling._xla import compiled

from mrcnn.ops import anchors as anchor_ops
from mrcnn.ops import boxes as box_ops
from mrcnn.ops import nms as nms_ops
from mrcnn.ops import targets as target_ops


@configurable_layer
@keras.saving.register_keras_serializable(package="mrcnn")
class RpnHead(BuiltByParts, keras.layers.Layer):
    """Shared 3x3 conv(s) + relu, then 1x1 objectness (A) and deltas (4A), on every level.

    Also owns what the RPN needs around its convs: the anchors, proposal
    generation and the anchor targets, each with the R50-FPN 1x defaults.

    Args (keyword-only; Detectron2 R50-FPN 1x defaults):
      channels: int, the shared conv's channels (256, = FPN channels).
      num_convs: int, shared 3x3 convs (1; 2 in Detectron2's LSJ baselines,
        `RPN.CONV_DIMS = [-1, -1]`, and torchvision's v2 models).
      min_level, max_level: ints, pyramid levels with anchors (2, 6).
      anchor_sizes: one anchor base size in pixels per level
        (32, 64, 128, 256, 512).
      aspect_ratios: anchor widths over heights (0.5, 1, 2).
      anchor_offset: float, anchor centres at `(i + offset) * stride` (0.5,
        cell centres; Detectron2's and torchvision's models use 0).
      round_anchors: bool, anchor half sides rounded to whole pixels
        (torchvision's models; False).
      pre_nms_topk_train, pre_nms_topk_test: ints, candidates kept per level
        by objectness before NMS (2000 / 1000, Detectron2
        `PRE_NMS_TOPK_TRAIN/TEST`).
      post_nms_topk_train, post_nms_topk_test: ints, P, proposals kept per
        image after NMS over all levels (1000 / 1000, Detectron2
        `POST_NMS_TOPK_TRAIN/TEST` in its per-image meaning).
      nms_iou: float, proposal NMS IoU threshold (0.7).
      min_size: float, pixels; boxes with a side <= this after clipping are
        marked invalid (0: only empty boxes, Detectron2 `MIN_SIZE`).
      positive_iou, negative_iou: floats, anchor matching (0.7, 0.3).
      num_samples: int, anchors sampled per image for the loss (256).
      positive_fraction: float, largest positive share of them (0.5).
      box_loss_beta: float, smooth-L1 beta of the box loss (0: L1,
        Detectron2's `SMOOTH_L1_BETA = 0.0` default).

    Call:
      features: {l: [B, H_l, W_l, F]} for l = min_level..max_level.

    Returns:
      (objectness, deltas): {l: float32 [B, N_l]} logits and
      {l: float32 [B, N_l, 4]} (dy, dx, dh, dw), ordered like
      `multilevel_anchors` (row-major over (i, j, anchor)).
    """

    def __init__(self, *, channels=256, num_convs=1, min_level=2, max_level=6,
                 anchor_sizes=(32, 64, 128, 256, 512),
                 aspect_ratios=(0.5, 1.0, 2.0), anchor_offset=0.5,
                 round_anchors=False, pre_nms_topk_train=2000,
                 pre_nms_topk_test=1000, post_nms_topk_train=1000,
                 post_nms_topk_test=1000, nms_iou=0.7, min_size=0.0,
                 positive_iou=0.7, negative_iou=0.3, num_samples=256,
                 positive_fraction=0.5, box_loss_beta=0.0, **kwargs):
        super().__init__(**kwargs)
        if len(anchor_sizes) != max_level - min_level + 1:
            raise ValueError(
                f"RpnHead: len(anchor_sizes)={len(anchor_sizes)} must equal "
                f"max_level - min_level + 1 = {max_level - min_level + 1}")
        if int(num_convs) < 1:
            raise ValueError(f"RpnHead: num_convs={num_convs} must be >= 1")
        self.channels = channels
        self.num_convs = int(num_convs)
        self.min_level = min_level
        self.max_level = max_level
        self.anchor_sizes = tuple(anchor_sizes)
        self.aspect_ratios = tuple(aspect_ratios)
        self.anchor_offset = float(anchor_offset)
        self.round_anchors = bool(round_anchors)
        self.pre_nms_topk_train = pre_nms_topk_train
        self.pre_nms_topk_test = pre_nms_topk_test
        self.post_nms_topk_train = post_nms_topk_train
        self.post_nms_topk_test = post_nms_topk_test
        self.nms_iou = nms_iou
        self.min_size = min_size
        self.positive_iou = positive_iou
        self.negative_iou = negative_iou
        self.num_samples = num_samples
        self.positive_fraction = positive_fraction
        self.box_loss_beta = box_loss_beta
        self.num_anchors = len(self.aspect_ratios)
        # Detectron2 StandardRPNHead init: normal(std=0.01), zero bias.
        init = keras.initializers.RandomNormal(stddev=0.01)
        # The first is `conv` (the one-conv head's name), then conv2, conv3, ...
        self.convs = checkpointed(self, [
            keras.layers.Conv2D(channels, 3, padding="same", activation="relu",
                                kernel_initializer=init,
                                name="conv" if i == 0 else f"conv{i + 1}")
            for i in range(self.num_convs)])
        self.objectness = keras.layers.Conv2D(
            self.num_anchors, 1, kernel_initializer=init, name="objectness")
        self.deltas = keras.layers.Conv2D(
            4 * self.num_anchors, 1, kernel_initializer=init, name="deltas")

    def call(self, features):
        objectness, deltas = {}, {}
        for level in range(self.min_level, self.max_level + 1):
            x = features[level]
            for conv in self.convs:
                x = conv(x)
            batch, height, width, _ = x.shape
            cells = height * width * self.num_anchors
            logits = self.objectness(x)  # [B, H_l, W_l, A]
            objectness[level] = tf.reshape(
                tf.cast(logits, tf.float32), [batch, cells])  # [B, N_l]
            d = self.deltas(x)  # [B, H_l, W_l, 4A]
            deltas[level] = tf.reshape(
                tf.cast(d, tf.float32), [batch, cells, 4])  # [B, N_l, 4]
        return objectness, deltas

    def anchors(self, image_size):
        """{l: float32 [N_l, 4]} for the static canvas `(H, W)`."""
        return anchor_ops.multilevel_anchors(
            image_size, self.min_level, self.max_level, self.anchor_sizes,
            self.aspect_ratios, offset=self.anchor_offset,
            round_sizes=self.round_anchors)

    def proposals(self, objectness, deltas, anchors, image_size, canvas_size,
                  training):
        """Top proposals per image: top-k per level, decode, clip, NMS.

        Algorithm (Detectron2 `find_top_rpn_proposals`):
          1. Per level, the `pre_nms_topk` anchors of highest objectness.
          2. Decode their deltas, clip to the resized image; boxes with a
             side <= `min_size` are marked invalid (kept, static shape).
          3. One `batched_nms` over all levels' candidates, each level
             shifted by its own offset so boxes of different levels never
             overlap: this is Detectron2's per-level NMS (`batched_nms` with
             the level as category) in a single call.
          4. The first `post_nms_topk` kept boxes (descending objectness).

        Args:
          objectness: {l: float32 [B, N_l]} logits.
          deltas: {l: float32 [B, N_l, 4]}.
          anchors: {l: float32 [N_l, 4]} (y1, x1, y2, x2).
          image_size: float [B, 2] (height, width) of each resized image.
          canvas_size: (H, W) Python ints of the padded canvas.
          training: Python bool, picks the train or test top-k.

        Returns:
          proposals: float32 [B, P, 4] (y1, x1, y2, x2), stop-gradient;
            padded slots 0.
          valid: bool [B, P], False in padded slots.
        """
        pre = self.pre_nms_topk_train if training else self.pre_nms_topk_test
        post = (self.post_nms_topk_train if training
                else self.post_nms_topk_test)
        # Shift between levels: larger than any clipped coordinate.
        level_offset = float(max(canvas_size) + 1)
        boxes, scores, offsets = [], [], []
        for i, level in enumerate(range(self.min_level, self.max_level + 1)):
            k = min(pre, objectness[level].shape[1])
            top, index = tf.math.top_k(objectness[level], k=k)  # [B, k]
            d = tf.gather(deltas[level], index, batch_dims=1)  # [B, k, 4]
            a = tf.gather(anchors[level], index)  # [B, k, 4]
            b = box_ops.clip_boxes(box_ops.decode_boxes(d, a), image_size)
            boxes.append(b)
            scores.append(top)
            offsets.append(tf.fill([k], i * level_offset))
        boxes = tf.concat(boxes, axis=1)  # [B, C, 4]
        scores = tf.concat(scores, axis=1)  # [B, C]
        offsets = tf.concat(offsets, axis=0)  # [C]
        height = boxes[..., 2] - boxes[..., 0]
        width = boxes[..., 3] - boxes[..., 1]
        valid = ((height > self.min_size) & (width > self.min_size)
                 & tf.math.is_finite(scores))  # [B, C]
        kept = nms_ops.batched_nms(
            boxes + offsets[None, :, None], scores, post,
            iou_threshold=self.nms_iou, valid=valid)
        proposal_valid = kept.indices >= 0  # [B, P]
        proposals = tf.gather(boxes, tf.maximum(kept.indices, 0),
                              batch_dims=1)  # [B, P, 4]
        proposals = tf.where(proposal_valid[..., None], proposals, 0.0)
        return tf.stop_gradient(proposals), proposal_valid

    @compiled
    def targets(self, anchors, gt_boxes, gt_valid):
        """`ops.targets.rpn_targets` over all levels' anchors (concatenated).

        An XLA island in a graph step (`_xla.compiled`): op by op, the
        anchor-gt matching writes its [B, N, M] IoUs and keys to memory and
        runs ~4x slower (832 x 1344, one image, 100 gt, this CPU: 203
        against 47 ms compiled)."""
        all_anchors = tf.concat(
            [anchors[l] for l in range(self.min_level, self.max_level + 1)],
            axis=0)  # [N, 4]
        return target_ops.rpn_targets(
            all_anchors, gt_boxes, gt_valid, positive_iou=self.positive_iou,
            negative_iou=self.negative_iou, num_samples=self.num_samples,
            positive_fraction=self.positive_fraction)

    def get_config(self):
        return {
            **super().get_config(),
            "channels": self.channels, "num_convs": self.num_convs,
            "min_level": self.min_level,
            "max_level": self.max_level,
            "anchor_sizes": list(self.anchor_sizes),
            "aspect_ratios": list(self.aspect_ratios),
            "anchor_offset": self.anchor_offset,
            "round_anchors": self.round_anchors,
            "pre_nms_topk_train": self.pre_nms_topk_train,
            "pre_nms_topk_test": self.pre_nms_topk_test,
            "post_nms_topk_train": self.post_nms_topk_train,
            "post_nms_topk_test": self.post_nms_topk_test,
            "nms_iou": self.nms_iou, "min_size": self.min_size,
            "positive_iou": self.positive_iou,
            "negative_iou": self.negative_iou,
            "num_samples": self.num_samples,
            "positive_fraction": self.positive_fraction,
            "box_loss_beta": self.box_loss_beta,
        }
