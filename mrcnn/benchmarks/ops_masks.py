"""Mask ops: targets from cropped gt masks, and pasting into the image.

`mask_targets` runs in the form the model uses: gt masks cropped to their gt
boxes at 112 x 112 (`crop_boxes=gt_boxes`), rois = the positive slots of the
sampled proposals (`num_rois // 4`, the 25 % positive fraction). Its baseline
is `tf.image.crop_and_resize` of the matched crop at the target size, one
sample per cell (Model Garden style), thresholded at 0.5.

`paste_masks` pastes `num_gt` (100, the detections kept per image) masks of
`mask_size` into a `canvas x canvas` image for ONE image (the bool output of
the whole batch would be `B * 100 * canvas**2` bytes). Its baseline is
crop_and_resize of each mask with the inverse box (the image frame expressed in
mask-cell coordinates) at the image size, then the in-box test.
`CropAndResize` has no XLA kernel, so the baselines run as graphs.

`coco_rle` is the host side of COCO evaluation for one image: `num_gt`
masks pasted at a `canvas x canvas` original size and COCO-RLE encoded, by
`evaluation.coco.paste_masks_rle` (inside each box only) beside the op's
whole-image paste then pycocotools' encoder. Both run eagerly, as
evaluation does; the masks are smooth blobs, so the run counts are those of
real masks rather than of noise.
"""

import numpy as np
import tensorflow as tf
from pycocotools import mask as mask_util

from mrcnn.benchmarks.common import BenchConfig, Entry, random_boxes
from mrcnn.evaluation import coco as coco_eval
from mrcnn.ops import masks as mask_ops

# Side of the gt mask crops the data pipeline stores (one per instance).
_CROP_SIZE = 112
# The mask head sees the first 25 % of the 512 sampled slots (positives).
_POSITIVE_FRACTION = 0.25


def bench_mask_targets(cfg: BenchConfig):
    rng = np.random.default_rng(cfg.seed)
    num_rois = max(1, int(cfg.num_rois * _POSITIVE_FRACTION))
    gt_boxes = random_boxes(rng, (cfg.batch, cfg.num_gt), cfg.canvas,
                            min_size=16.0, max_size=512.0)
    crops = tf.constant(rng.uniform(size=(cfg.batch, cfg.num_gt, _CROP_SIZE,
                                          _CROP_SIZE)) < 0.5, tf.uint8)
    matched = rng.integers(-1, cfg.num_gt, size=(cfg.batch, num_rois))
    base = np.take_along_axis(gt_boxes, np.maximum(matched, 0)[..., None], 1)
    side = np.concatenate([base[..., 2:] - base[..., :2]] * 2, -1)
    rois = (base + rng.uniform(-0.2, 0.2, size=base.shape) * side).astype(np.float32)
    matched = tf.constant(matched, tf.int32)
    rois, gt_boxes = tf.constant(rois), tf.constant(gt_boxes)
    size = (cfg.mask_size, cfg.mask_size)

    def ours():
        return mask_ops.mask_targets(crops, rois, matched, size,
                                     crop_boxes=gt_boxes)

    def baseline():
        safe = tf.maximum(matched, 0)
        image = tf.reshape(tf.cast(crops, tf.float32),
                           [-1, _CROP_SIZE, _CROP_SIZE, 1])  # [B*M, S, S, 1]
        index = tf.reshape(tf.range(cfg.batch)[:, None] * cfg.num_gt + safe,
                           [-1])  # [B*K]
        crop = tf.gather(gt_boxes, safe, batch_dims=1)  # [B, K, 4]
        cy1, cx1, cy2, cx2 = tf.unstack(crop, 4, -1)
        y1, x1, y2, x2 = tf.unstack(rois, 4, -1)
        sy = _CROP_SIZE / (cy2 - cy1)
        sx = _CROP_SIZE / (cx2 - cx1)
        # First/last cell centres of the roi in crop-cell index units.
        step_y = (y2 - y1) * sy / cfg.mask_size
        step_x = (x2 - x1) * sx / cfg.mask_size
        norm = tf.stack([(y1 - cy1) * sy + 0.5 * step_y - 0.5,
                         (x1 - cx1) * sx + 0.5 * step_x - 0.5,
                         (y2 - cy1) * sy - 0.5 * step_y - 0.5,
                         (x2 - cx1) * sx - 0.5 * step_x - 0.5],
                        -1) / (_CROP_SIZE - 1)  # [B, K, 4]
        out = tf.image.crop_and_resize(image, tf.reshape(norm, [-1, 4]), index,
                                       size)  # [B*K, oh, ow, 1]
        out = tf.reshape(out, [cfg.batch, num_rois] + list(size))
        keep = tf.logical_and(out >= 0.5, (matched >= 0)[..., None, None])
        return tf.cast(keep, tf.float32)

    return [
        Entry("mrcnn mask_targets (112 crops)", ours, cfg.xla,
              f"{num_rois} positive rois/image, 2x2 samples per cell"),
        Entry("crop_and_resize of matched crop", baseline, False,
              "1 sample per cell; no XLA kernel for CropAndResize"),
    ]


def bench_paste_masks(cfg: BenchConfig):
    rng = np.random.default_rng(cfg.seed)
    num, canvas, size = cfg.num_gt, cfg.canvas, cfg.mask_size
    boxes = tf.constant(random_boxes(rng, (1, num), canvas, min_size=16.0,
                                     max_size=512.0))
    masks = tf.constant(rng.uniform(size=(1, num, size, size)), tf.float32)

    def ours():
        return mask_ops.paste_masks(masks, boxes, (canvas, canvas))

    def baseline():
        y1, x1, y2, x2 = tf.unstack(boxes[0], 4, -1)  # each [K]
        # Pixel centres 0.5 and canvas - 0.5 in mask-cell index units.
        first_y = (0.5 - y1) / (y2 - y1) * size - 0.5
        last_y = (canvas - 0.5 - y1) / (y2 - y1) * size - 0.5
        first_x = (0.5 - x1) / (x2 - x1) * size - 0.5
        last_x = (canvas - 0.5 - x1) / (x2 - x1) * size - 0.5
        norm = tf.stack([first_y, first_x, last_y, last_x], -1) / (size - 1)
        out = tf.image.crop_and_resize(
            tf.reshape(masks, [num, size, size, 1]), norm, tf.range(num),
            (canvas, canvas))[..., 0]  # [K, H, W]
        centres = tf.range(canvas, dtype=tf.float32) + 0.5
        in_y = (centres >= y1[:, None]) & (centres < y2[:, None])  # [K, H]
        in_x = (centres >= x1[:, None]) & (centres < x2[:, None])  # [K, W]
        keep = (out >= 0.5) & in_y[:, :, None] & in_x[:, None, :]
        return keep[None]

    return [
        Entry("mrcnn paste_masks (1 image)", ours, cfg.xla,
              f"{num} masks into {canvas}x{canvas}; two separable matmuls"),
        Entry("crop_and_resize with inverse boxes", baseline, False,
              "image-size crop per mask, then in-box test; no XLA kernel"),
    ]


def bench_coco_rle(cfg: BenchConfig):
    rng = np.random.default_rng(cfg.seed)
    num, canvas, size = cfg.num_gt, cfg.canvas, cfg.mask_size
    boxes = random_boxes(rng, (num,), canvas, min_size=16.0, max_size=512.0)
    cells = (np.arange(size) + 0.5) / size - 0.5
    blob = np.exp(-(cells[:, None] ** 2 + cells ** 2) / 0.1)  # [size, size]
    masks = (blob * rng.uniform(0.6, 1.4, (num, 1, 1))).astype(np.float32)

    def ours():
        return coco_eval.paste_masks_rle(masks, boxes, (canvas, canvas))

    def baseline():
        pasted = mask_ops.paste_masks(masks[None], boxes[None],
                                      (canvas, canvas)).numpy()[0]
        return mask_util.encode(np.asfortranarray(
            np.transpose(pasted, (1, 2, 0)).astype(np.uint8)))

    return [
        Entry("mrcnn paste_masks_rle (1 image)", ours, None,
              f"{num} masks at {canvas}x{canvas}, inside each box; NumPy"),
        Entry("paste_masks + pycocotools encode", baseline, None,
              "whole-image paste, then encode of [H, W, K]"),
    ]
