"""Test-time augmentation: Detectron2's `GeneralizedRCNNWithTTA`, in one graph.

Each augmentation resizes the evaluation batch by `min_size / base_min_size`
(the batch's own resize, 800 for COCO) and optionally flips it; the box
stage runs on every augmented batch with the model's test settings (score
threshold, per-class NMS, D detections); their detections, mapped back to
original-image pixels, are merged by per-class NMS at the model's IoU into
the D best; the mask head then runs on the merged boxes in every augmented
batch, and the mask probabilities (flipped ones flipped back) are averaged.
Detectron2 does the same on the already-resized test image
(`TEST.AUG.MIN_SIZES`, `FLIP`); here the longer side scales by the same
factor as the shorter one (Detectron2 caps it at `TEST.AUG.MAX_SIZE`,
4000), so that every augmented batch has a static canvas: the batch's
scaled by the factor, rounded up to a multiple of 2**max_level.

Cost: the backbone and box head run once per augmentation (18 with the
defaults), the mask head once per augmentation on D boxes; every
augmentation's FPN features are kept until the masks are made (about
1.4 GB per COCO image at the defaults in float32, half in bfloat16), or,
with `keep_features=False`, computed again for the masks (Detectron2's
way: twice the backbone time, one augmentation's features at a time).
"""

import math

import gin
import tensorflow as tf

from mrcnn.ops import boxes as box_ops
from mrcnn.ops import masks as mask_ops
from mrcnn.ops import nms as nms_ops

DETECTRON2_MIN_SIZES = (400, 500, 600, 700, 800, 900, 1000, 1100, 1200)


def _axis_weights(in_sizes, out_sizes, out_len, in_len, taps):
    """Sampling of one axis: int32 [B, out_len, taps] indices, float32 weights.

    Output pixel `y` of an image covers input `(y + 0.5) * in / out`; it
    averages the input pixels under a triangle of radius `max(1, in / out)`
    there, those inside the image only, with weights that sum to 1
    (`tf.image.resize(method='bilinear', antialias=True)`, PIL's bilinear).
    Rows at or past an image's output size get no weight.
    """
    in_sizes = in_sizes[:, None, None]
    out_sizes = out_sizes[:, None, None]
    inv = in_sizes / tf.maximum(out_sizes, 1.0)
    radius = tf.maximum(inv, 1.0)
    centre = (tf.range(out_len, dtype=tf.float32)[None, :, None] + 0.5) * inv
    index = tf.math.ceil(centre - radius - 0.5) + tf.range(taps, dtype=tf.float32)
    weight = tf.maximum(1.0 - tf.abs(index + 0.5 - centre) / radius, 0.0)
    inside = ((index >= 0) & (index < in_sizes)
              & (tf.range(out_len, dtype=tf.float32)[None, :, None] < out_sizes))
    weight = tf.where(inside, weight, 0.0)
    weight = tf.math.divide_no_nan(weight, tf.reduce_sum(weight, -1, keepdims=True))
    index = tf.clip_by_value(tf.cast(index, tf.int32), 0, in_len - 1)
    return index, weight


def resize_images(images, image_info, factor, canvas_size):
    """Resizes each image of a padded batch by `factor` onto a new canvas.

    Args:
      images: uint8 or float [B, H, W, 3], each image at the top left
        (`image_info` columns 2, 3 its height, width).
      image_info: float32 [B, 5] (orig h, orig w, resized h, resized w, scale).
      factor: Python float > 0.
      canvas_size: (H', W') Python ints holding every `round(size * factor)`.

    Returns:
      (images [B, H', W', 3] of the input dtype (uint8: rounded), each image
      resized to `max(round(resized size * factor), 1)` with antialiased bilinear
      sampling of its own pixels only, zero around it; image_info float32
      [B, 5] with those sizes and `scale * factor`).
    """
    image_info = tf.cast(image_info, tf.float32)
    sizes = image_info[:, 2:4]
    # At least a pixel of every image; padding images (size 0) stay empty.
    new_sizes = tf.where(sizes > 0, tf.maximum(tf.round(sizes * factor), 1.0), 0.0)
    taps = int(math.ceil(2.0 * max(1.0, 1.0 / factor) * 1.01)) + 2
    h, w = images.shape[1], images.shape[2]
    rows, row_w = _axis_weights(sizes[:, 0], new_sizes[:, 0], canvas_size[0], h, taps)
    cols, col_w = _axis_weights(sizes[:, 1], new_sizes[:, 1], canvas_size[1], w, taps)
    x = tf.cast(images, tf.float32)
    x = tf.gather(x, rows, axis=1, batch_dims=1)                    # [B, H', T, W, 3]
    x = tf.einsum("bytwc,byt->bywc", x, row_w)
    x = tf.gather(x, cols, axis=2, batch_dims=1)                    # [B, H', W', T, 3]
    x = tf.einsum("byxtc,bxt->byxc", x, col_w)
    if images.dtype == tf.uint8:
        x = tf.saturate_cast(tf.round(x), tf.uint8)
    else:
        x = tf.cast(x, images.dtype)
    info = tf.concat([image_info[:, :2], new_sizes, image_info[:, 4:5] * factor], 1)
    return x, info


def flip_images(images, image_info):
    """Mirrors each image of a padded batch inside its resized width.

    Args:
      images: [B, H, W, 3]; image_info: float32 [B, 5].

    Returns:
      [B, H, W, 3]: column `x < w` holds column `w - 1 - x`; the padding
      stays where it is.
    """
    width = tf.cast(image_info[:, 3:4], tf.int32)                   # [B, 1]
    x = tf.range(images.shape[2])[None, :]
    source = tf.where(x < width, width - 1 - x, x)
    return tf.gather(images, source, axis=2, batch_dims=1)


def flip_boxes(boxes, widths):
    """float32 [B, N, 4] (y1, x1, y2, x2) mirrored as `x -> w - x`, `widths` [B]."""
    y1, x1, y2, x2 = tf.unstack(boxes, axis=-1)
    w = widths[:, None]
    return tf.stack([y1, w - x2, y2, w - x1], axis=-1)


def merge_detections(boxes, scores, classes, valid, num_classes, max_detections,
                     iou_threshold):
    """Per-class NMS over the union of every augmentation's detections.

    Detectron2's `_merge_detections`: the union goes through its test
    inference again (`fast_rcnn_inference_single_image`, score > 1e-8),
    each detection a one-class box.

    Args:
      boxes: float32 [B, N, 4] original-image pixels; scores float32 [B, N];
        classes int32 [B, N] 1..C; valid bool [B, N].
      num_classes: C; max_detections: D; iou_threshold: float.

    Returns:
      (boxes [B, D, 4], scores [B, D], classes int32 [B, D] 1..C,
      num_valid int32 [B]); padded slots boxes and scores 0, classes 0.
    """
    one_hot = tf.one_hot(classes - 1, num_classes, dtype=tf.float32)  # [B, N, C]
    class_scores = tf.where(valid[..., None], one_hot * scores[..., None], 0.0)
    kept = nms_ops.multiclass_nms(
        boxes, class_scores, max_per_class=max_detections, max_total=max_detections,
        iou_threshold=iou_threshold, score_threshold=1e-8, valid=valid)
    slot_valid = tf.range(max_detections)[None, :] < kept.num_valid[:, None]
    return (tf.where(slot_valid[..., None], kept.boxes, 0.0),
            tf.where(slot_valid, kept.scores, 0.0),
            tf.where(slot_valid, kept.classes + 1, 0), kept.num_valid)


@gin.configurable
class TestTimeAugmentation:
    """Multi-scale and flip inference around a built `MaskRCNN`.

    Args:
      min_sizes: shorter sides to run at, in pixels of the evaluation
        resize's scale (Detectron2's `TEST.AUG.MIN_SIZES`, 400..1200 by
        100); the one equal to the batch's `base_min_size` runs on the
        batch as it is.
      flip: bool, also run each size mirrored (`TEST.AUG.FLIP`).
      keep_features: bool, hold every augmentation's features for the mask
        head (default) or run the backbone again for it (less memory).

    `tta(model, batch, base_min_size)` returns the detections dict of
    `model(batch, training=False)` (same keys, shapes and coordinates);
    `base_min_size` is the shorter side the batch was resized to
    (`CocoInput.min_size`). Call it inside a `tf.function` (the evaluation
    and predict loops do): it is a static graph per canvas.
    """

    def __init__(self, min_sizes=DETECTRON2_MIN_SIZES, flip=True, keep_features=True):
        self.min_sizes = tuple(int(s) for s in min_sizes)
        if not self.min_sizes or min(self.min_sizes) <= 0:
            raise ValueError(f"TestTimeAugmentation: min_sizes={min_sizes} must be "
                             f"positive sizes")
        self.flip = bool(flip)
        self.keep_features = bool(keep_features)

    @property
    def num_augmentations(self):
        """A, the augmented batches each input batch is run as."""
        return len(self.min_sizes) * (2 if self.flip else 1)

    def augmentations(self, batch, base_min_size, divisor):
        """The augmented batches: a list of (images, image_info, flipped bool)."""
        images = batch["images"]
        info = tf.cast(batch["image_info"], tf.float32)
        out = []
        for size in self.min_sizes:
            factor = size / float(base_min_size)
            if factor == 1.0:
                resized, resized_info = images, info
            else:
                canvas = tuple(int(math.ceil(d * factor / divisor) * divisor)
                               for d in images.shape[1:3])
                resized, resized_info = resize_images(images, info, factor, canvas)
            out.append((resized, resized_info, False))
            if self.flip:
                out.append((flip_images(resized, resized_info), resized_info, True))
        return out

    def __call__(self, model, batch, base_min_size):
        heads = model.roi_heads
        divisor = 2 ** model.fpn.max_level
        augmented = self.augmentations(batch, base_min_size, divisor)
        kept_features, found = [], []
        for images, info, flipped in augmented:
            features, proposals, valid = model.proposals(
                {"images": images, "image_info": info})
            boxes, scores, classes, num_valid = heads.detect_boxes(
                features, proposals, valid, info)
            if flipped:
                boxes = flip_boxes(boxes, info[:, 3])
            boxes = box_ops.clip_boxes(boxes / info[:, 4][:, None, None], info[:, 0:2])
            slot_valid = tf.range(heads.max_detections)[None, :] < num_valid[:, None]
            found.append((boxes, scores, classes, slot_valid))
            kept_features.append(features if self.keep_features else None)
        boxes, scores, classes, num_valid = merge_detections(
            *(tf.concat(parts, axis=1) for parts in zip(*found)),
            num_classes=heads.num_classes, max_detections=heads.max_detections,
            iou_threshold=heads.nms_iou)
        detections = {"detection_boxes": boxes, "detection_scores": scores,
                      "detection_classes": classes, "num_detections": num_valid}
        if heads.mask_head is None:
            return detections
        masks = []
        for features, (images, info, flipped) in zip(kept_features, augmented):
            if features is None:
                # After the merge, so that one augmentation's features live at a time.
                with tf.control_dependencies([boxes]):
                    images = tf.identity(images)
                features = model.proposals({"images": images, "image_info": info})[0]
            aug_boxes = boxes * info[:, 4][:, None, None]
            if flipped:
                aug_boxes = flip_boxes(aug_boxes, info[:, 3])
            probabilities = heads.detect_masks(features, aug_boxes, classes)
            masks.append(tf.reverse(probabilities, [-1]) if flipped else probabilities)
        detections["detection_masks"] = tf.add_n(masks) / float(len(masks))
        if heads.paste_masks:
            info = tf.cast(batch["image_info"], tf.float32)
            detections["detection_masks_canvas"] = mask_ops.paste_masks(
                detections["detection_masks"], boxes * info[:, 4][:, None, None],
                tuple(batch["images"].shape[1:3]))
        return detections
