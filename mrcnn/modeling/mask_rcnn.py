"""Mask R-CNN (He et al. 2017) as one Keras model over a batch dict.

Shape letters: `B` batch, `H` x `W` the static padded canvas, `M` gt boxes
per image, `S_m` the side of the cropped gt masks (112), `N` anchors (all
levels), `P` proposals per image, `K` sampled rois (512), `Kp` mask rois
(128), `C` foreground classes, `D` detections per image (100).

The batch (the data pipeline's output, see `mrcnn.data`):
  images: uint8 (or float) [B, H, W, 3] RGB pixels on the [0, 255] scale,
    each resized image at the top left of the canvas. The model normalises
    them, `(pixel - pixel_mean) / pixel_std`, and zeroes everything outside
    each image's resized area (`image_info`), so the backbone sees what
    normalising then zero-padding gives, whatever the padding holds.
  image_info: float32 [B, 5] (orig h, orig w, resized h, resized w, scale).
  gt_boxes: float32 [B, M, 4] (y1, x1, y2, x2) resized-image pixels;
    padded slots 0.            (training only, as the next three)
  gt_classes: int32 [B, M], 1..C; padded slots 0.
  gt_valid: bool [B, M].
  gt_masks: uint8 [B, M, S_m, S_m], each mask cropped to its gt box (only
    with a mask head).
  gt_keypoints: float32 [B, M, K, 3] (y, x, v) in resized-image pixels, v
    COCO's visibility (only with a keypoint head, Keypoint R-CNN).

Mixed precision: the layers follow the global `keras.mixed_precision`
policy (`mixed_float16`, `mixed_bfloat16`); every head casts its outputs to
float32, and boxes, anchors, decoding, softmax and losses stay float32 (this
model never casts its input batch to the compute dtype; the backbone casts
the normalised images). Under `mixed_float16` the trainer applies loss
scaling.
"""

import gin
import tensorflow as tf

from mrcnn.modeling._config import configurable_layer

from mrcnn.modeling import losses as loss_lib
from mrcnn.modeling.detector import Detector
from mrcnn.modeling.fpn import FPN
from mrcnn.modeling.resnet import IMAGENET_MEAN, IMAGENET_STD, ResNet
from mrcnn.modeling.roi_heads import (CASCADE_BOX_WEIGHTS, CASCADE_IOUS, BoxHead,
                                      CascadeRoiHeads, KeypointHead, MaskHead, RoiHeads)
from mrcnn.modeling.rpn import RpnHead


@configurable_layer
class MaskRCNN(Detector):
    """Backbone -> FPN -> RPN -> proposals -> RoI heads, from built parts.

    Args (keyword-only):
      backbone: a built `ResNet` (images -> {2..5: C_l}).
      fpn: a built `FPN` ({2..5: C_l} -> {2..6: P_l}).
      rpn_head: a built `RpnHead`.
      roi_heads: a built `RoiHeads`.
      pixel_mean, pixel_std: the input normalisation (`Detector`).

    `call(batch, training=True)` returns the losses dict {rpn_objectness,
    rpn_box, rcnn_class, rcnn_box, mask} of float32 scalars (a cascade has
    rcnn_class_stage1, rcnn_box_stage1, ... instead; the trainer sums
    them; no `mask` and no `gt_masks` needed without a mask head: Faster
    R-CNN; `keypoint` from `gt_keypoints` with a keypoint head); `call(batch, training=False)` returns the detections dict of
    `RoiHeads.detect`. Both run under `tf.function(jit_compile=True)` for
    static batch shapes; build the model with one eager call first so that
    variables are not created inside a compiled function.
    """

    def __init__(self, *, backbone, fpn, rpn_head, roi_heads,
                 pixel_mean=IMAGENET_MEAN, pixel_std=IMAGENET_STD, **kwargs):
        super().__init__(pixel_mean=pixel_mean, pixel_std=pixel_std, **kwargs)
        if fpn.min_level != rpn_head.min_level or fpn.max_level != rpn_head.max_level:
            raise ValueError(
                f"MaskRCNN: fpn levels {fpn.min_level}..{fpn.max_level} != "
                f"rpn_head levels {rpn_head.min_level}..{rpn_head.max_level}")
        if not (fpn.min_level <= roi_heads.min_level
                and roi_heads.max_level <= fpn.max_level):
            raise ValueError(
                f"MaskRCNN: roi_heads levels {roi_heads.min_level}.."
                f"{roi_heads.max_level} outside fpn levels "
                f"{fpn.min_level}..{fpn.max_level}")
        self.backbone = backbone
        self.fpn = fpn
        self.rpn_head = rpn_head
        self.roi_heads = roi_heads

    @property
    def has_masks(self):
        """False for a box-only model (`RoiHeads.mask_head = None`, Faster R-CNN)."""
        return self.roi_heads.mask_head is not None

    @property
    def has_keypoints(self):
        """True with a keypoint head (`RoiHeads.keypoint_head`, Keypoint R-CNN)."""
        return self.roi_heads.keypoint_head is not None

    @property
    def num_keypoints(self):
        """K, keypoints per instance (0 without a keypoint head)."""
        return self.roi_heads.keypoint_head.num_keypoints if self.has_keypoints else 0

    @property
    def num_classes(self):
        """C, foreground classes of the box head (contiguous ids 1..C)."""
        return self.roi_heads.box_head.num_classes

    @property
    def score_threshold(self):
        """float, the test threshold: detections keep scores above it (the RoI
        heads'; `RetinaNet` holds its own)."""
        return self.roi_heads.score_threshold

    @score_threshold.setter
    def score_threshold(self, value):
        self.roi_heads.score_threshold = value

    def _first_stage(self, batch, training):
        images = batch["images"]
        canvas = self.canvas(images)
        image_info = tf.cast(batch["image_info"], tf.float32)
        images = self.normalize_images(images, image_info)
        # training explicit: Keras drops an outer call's on a first, building call.
        features = self.fpn(self.backbone(images, training=training), training=training)
        objectness, deltas = self.rpn_head(features)
        anchors = self.rpn_head.anchors(canvas)
        proposals, proposal_valid = self.rpn_head.proposals(
            objectness, deltas, anchors, image_info[:, 2:4], canvas, training)
        return features, objectness, deltas, anchors, proposals, proposal_valid

    def proposals(self, batch):
        """Inference up to the RPN, for callers that run the RoI heads themselves.

        Returns:
          (features {l: [B, H_l, W_l, F]} in the compute dtype, proposals
          float32 [B, P, 4] in resized-image pixels, proposal_valid bool
          [B, P]): what `RoiHeads.detect` takes (test-time augmentation
          runs its box and mask parts apart).
        """
        features, _, _, _, proposals, valid = self._first_stage(batch, False)
        return features, proposals, valid

    def call(self, batch, training=False):
        features, objectness, deltas, anchors, proposals, proposal_valid = (
            self._first_stage(batch, training))
        image_info = tf.cast(batch["image_info"], tf.float32)
        if not training:
            images = batch["images"]
            return self.roi_heads.detect(features, proposals, proposal_valid, image_info,
                                         (images.shape[1], images.shape[2]))

        gt_boxes, gt_classes, gt_valid = (
            batch["gt_boxes"], batch["gt_classes"], batch["gt_valid"])
        rpn_targets = self.rpn_head.targets(anchors, gt_boxes, gt_valid)
        rois = self.roi_heads.sample(proposals, proposal_valid, gt_boxes,
                                     gt_classes, gt_valid)
        levels = range(self.rpn_head.min_level, self.rpn_head.max_level + 1)
        losses = {
            "rpn_objectness": loss_lib.rpn_objectness_loss(
                tf.concat([objectness[l] for l in levels], axis=1),
                rpn_targets.labels, self.rpn_head.num_samples),
            "rpn_box": loss_lib.rpn_box_loss(
                tf.concat([deltas[l] for l in levels], axis=1),
                rpn_targets.box_targets, rpn_targets.labels,
                self.rpn_head.num_samples, self.rpn_head.box_loss_beta),
            **self.roi_heads.box_losses(features, rois, gt_boxes, gt_classes,
                                        gt_valid, image_info),
        }
        if self.has_keypoints:
            if "gt_keypoints" not in batch:
                raise ValueError(
                    "MaskRCNN: the batch has no gt_keypoints; a keypoint head trains on "
                    "CocoInput.with_keypoints = True")
            losses["keypoint"] = self.roi_heads.keypoint_loss(features, rois,
                                                              batch["gt_keypoints"])
        if not self.has_masks:
            return losses
        if "gt_masks" not in batch:
            raise ValueError(
                "MaskRCNN: the batch has no gt_masks (CocoInput.with_masks = False); "
                "set RoiHeads.mask_head = None for a box-only model")
        losses["mask"] = self.roi_heads.mask_loss(features, rois, batch["gt_masks"],
                                                  gt_boxes)
        return losses


@gin.configurable
def build_mask_rcnn(*, num_classes=80, depth=50, width=64, norm="frozen_bn",
                    freeze_at=2, fpn_channels=256, fc_dim=1024,
                    mask_channels=256, num_samples=512,
                    pre_nms_topk_train=2000, pre_nms_topk_test=1000,
                    post_nms_topk_train=1000, post_nms_topk_test=1000,
                    rpn_num_samples=256, max_detections=100, masks=True,
                    cascade_stages=0, fpn_norm=None, head_norm=None, box_num_conv=0,
                    rpn_num_convs=1, pixel_mean=IMAGENET_MEAN, pixel_std=IMAGENET_STD,
                    class_loss="softmax", fed_loss_classes=None, keypoints=0,
                    keypoint_channels=512, keypoint_convs=8):
    """Builds `MaskRCNN` from primitives, without gin (tests, small configs).

    Defaults are the R50-FPN 1x recipe for COCO (80 foreground classes,
    81 with background). `width` is `ResNet.width` (stem and res2
    channels, 64 in the recipe). Smaller values (depth=18, fpn_channels=64,
    fc_dim=256, num_samples=128, top-k 200) give a model that trains in
    seconds per step on a CPU. `masks=False` leaves out the mask head
    (Faster R-CNN); `cascade_stages=3` makes it Cascade Mask R-CNN
    (`CascadeRoiHeads` with its default IoUs and weights for 3 stages).
    `fpn_norm` is `FPN.norm` and `head_norm` the box and mask heads' `norm`;
    `box_num_conv` > 0 gives the box head that many convs of `fpn_channels`
    and one FC (Detectron2's "4conv1fc" at 4) instead of two FCs;
    `rpn_num_convs` is `RpnHead.num_convs`; `class_loss` and
    `fed_loss_classes` are `RoiHeads`' (sigmoid, federated loss);
    `keypoints` > 0 adds a `KeypointHead` of that many keypoints,
    `keypoint_convs` convs of `keypoint_channels` (Keypoint R-CNN).
    """
    # Parts in model order: the order they are made in draws the initial weights.
    backbone = ResNet(depth=depth, width=width, norm=norm, freeze_at=freeze_at)
    fpn = FPN(channels=fpn_channels, norm=fpn_norm)
    rpn_head = RpnHead(channels=fpn_channels, num_convs=rpn_num_convs,
                       pre_nms_topk_train=pre_nms_topk_train,
                       pre_nms_topk_test=pre_nms_topk_test,
                       post_nms_topk_train=post_nms_topk_train,
                       post_nms_topk_test=post_nms_topk_test, num_samples=rpn_num_samples)
    box_heads = [BoxHead(num_classes=num_classes, fc_dim=fc_dim, num_conv=box_num_conv,
                         num_fc=1 if box_num_conv else 2, conv_dim=fpn_channels,
                         norm=head_norm, class_agnostic=bool(cascade_stages))
                 for _ in range(max(cascade_stages, 1))]
    mask_head = (MaskHead(num_classes=num_classes, channels=mask_channels, norm=head_norm)
                 if masks else None)
    keypoint_head = (KeypointHead(num_keypoints=keypoints, channels=keypoint_channels,
                                  num_convs=keypoint_convs) if keypoints else None)
    if cascade_stages:
        roi_heads = CascadeRoiHeads(
            box_heads=box_heads, stage_ious=CASCADE_IOUS[:cascade_stages],
            stage_box_weights=CASCADE_BOX_WEIGHTS[:cascade_stages],
            mask_head=mask_head, num_samples=num_samples, max_detections=max_detections,
            class_loss=class_loss, fed_loss_classes=fed_loss_classes,
            keypoint_head=keypoint_head)
    else:
        roi_heads = RoiHeads(box_head=box_heads[0], mask_head=mask_head,
                             num_samples=num_samples, max_detections=max_detections,
                             class_loss=class_loss, fed_loss_classes=fed_loss_classes,
                             keypoint_head=keypoint_head)
    return MaskRCNN(backbone=backbone, fpn=fpn, rpn_head=rpn_head, roi_heads=roi_heads,
                    pixel_mean=pixel_mean, pixel_std=pixel_std)
