"""Mask-head targets (ROIAlign of gt masks) and pasting of predicted masks.

Shape letters: `B` batch, `K` rois or detections per image, `M` gt instances
per image, `H`, `W` image (or full-mask) height and width, `S` side of a
cropped gt mask, `oh`, `ow` mask-head output size (28 x 28 in Mask R-CNN).

Pixel model: image pixel `(i, j)` covers `[j, j + 1) x [i, i + 1)` and is
represented by its centre `(i + 0.5, j + 0.5)`, as in `roi_align`
(`aligned=True`). A mask of `oh x ow` cells laid over a box puts cell `(u, v)`
at `(y1 + (u + 0.5) * h / oh, x1 + (v + 0.5) * w / ow)`; a cropped gt mask
(`crop_boxes`) follows the same model over its crop box.
"""

import tensorflow as tf

from mrcnn.ops import roi_align as roi_align_ops
from mrcnn.ops._scope import scoped

# ROIAlign settings of the mask targets (Detectron2's `mask_rcnn_loss` via
# ROIAlignV2): 2 x 2 samples per bin, half-pixel aligned, binarised at 0.5.
_TARGET_SAMPLING_RATIO = 2
_TARGET_THRESHOLD = 0.5
# Binary masks put many samples exactly on the threshold (a bin centred on a
# mask edge averages to 0.5). Eager and XLA sum the samples in different
# orders, so such ties land a float32 ulp either side; comparing against
# 0.5 - 1e-5 makes every tie count as >= 0.5 in both modes (float32 error of
# a 16-sample average is ~1e-7; moving the cut by 1e-5 changes no real target).
_TIE_TOLERANCE = 1e-5
# Keeps degenerate (padding) crop boxes from dividing by zero; such slots are
# never matched by a real roi.
_MIN_CROP_SIZE = 1e-6


@scoped
def mask_targets(gt_masks, rois, matched_index, output_size=(28, 28),
                 crop_boxes=None):
    """Binary mask-head targets: the matched gt mask ROIAligned over each roi.

    The value is `roi_align` of the matched gt mask as a 1-channel map
    (`spatial_scale=1`, `sampling_ratio=2`, `aligned=True`) over the roi,
    then 1 where `>= 0.5` (ties within float32 rounding included, so eager
    and XLA agree), else 0. Each roi reads only its own gt mask: the
    shared 4-neighbour gather core of `roi_align` runs over a flat
    `[B * M * H * W, 1]` table, so no `[B, K, H, W]` tensor is built.

    With `crop_boxes`, `gt_masks` holds each instance resampled over its crop
    box (the data pipeline crops each mask to its gt box, so the model passes
    `crop_boxes=gt_boxes`): cell `(u, v)` of the `S x S` crop sits at image
    point `(cy1 + (u + 0.5) * ch / S, cx1 + (v + 0.5) * cw / S)`. Each roi is
    mapped into that crop's cell frame and pooled there, which approximates
    the full-mask result (agreement pinned by
    `MaskTargetsTest.test_crop_form_matches_full_form`); outside the crop box
    (beyond the one-cell border of `roi_align`) the mask reads 0.

    Args:
      gt_masks: any numeric dtype (0/1) [B, M, H, W] full-image masks, or
        [B, M, S_h, S_w] crops when `crop_boxes` is given.
      rois: float [B, K, 4] (y1, x1, y2, x2) in image pixels.
      matched_index: int32 [B, K], the gt index of each roi; -1 (padding,
        background) gives an all-zero target.
      output_size: (oh, ow) Python ints, the mask-head resolution.
      crop_boxes: optional float [B, M, 4] (y1, x1, y2, x2) in image pixels,
        the box each gt mask was cropped from; padded slots may be 0.

    Returns:
      float32 [B, K, oh, ow] of 0 and 1; rows with `matched_index == -1` are 0.
    """
    gt_masks = tf.convert_to_tensor(gt_masks)
    rois = tf.stop_gradient(tf.cast(rois, tf.float32))
    matched_index = tf.cast(matched_index, tf.int32)
    _, num_gt, height, width = gt_masks.shape
    if num_gt is None:   # a variable instance count (the data pipeline's crops)
        num_gt = tf.shape(gt_masks)[1]
    batch = tf.shape(gt_masks)[0]
    matched = matched_index >= 0  # [B, K]
    safe_index = tf.maximum(matched_index, 0)  # [B, K]
    table = tf.reshape(gt_masks, [-1, 1])  # [B*M*H*W, 1]
    row_offset = ((tf.range(batch)[:, None] * num_gt + safe_index)
                  * (height * width))  # [B, K]
    if crop_boxes is not None:
        crop = tf.gather(tf.cast(crop_boxes, tf.float32), safe_index,
                         batch_dims=1)  # [B, K, 4]
        cy1, cx1, cy2, cx2 = tf.unstack(crop, 4, axis=-1)  # each [B, K]
        scale_y = height / tf.maximum(cy2 - cy1, _MIN_CROP_SIZE)
        scale_x = width / tf.maximum(cx2 - cx1, _MIN_CROP_SIZE)
        y1, x1, y2, x2 = tf.unstack(rois, 4, axis=-1)
        rois = tf.stack([(y1 - cy1) * scale_y, (x1 - cx1) * scale_x,
                         (y2 - cy1) * scale_y, (x2 - cx1) * scale_x],
                        axis=-1)  # [B, K, 4] in crop cells
    pooled = roi_align_ops._pool_boxes(  # pylint: disable=protected-access
        table, row_offset, height, width, rois, output_size,
        _TARGET_SAMPLING_RATIO, aligned=True)[..., 0]  # [B, K, oh, ow]
    keep = tf.logical_and(pooled >= _TARGET_THRESHOLD - _TIE_TOLERANCE,
                          matched[..., None, None])
    return tf.cast(keep, tf.float32)


@scoped
def paste_coordinates(starts, ends, size, cells):
    """Where each pixel centre along one axis samples a box's mask.

    `paste_masks`' pixel model along one axis, as indices and a fraction
    rather than a dense matrix, so that a caller can paste only the pixels
    inside each box (`mrcnn.evaluation.coco` does, on the host): the value of
    pixel `i` is `m[low] * (1 - frac) + m[high] * frac` along this axis.

    Args:
      starts, ends: float32 [B, K], the box extent along the axis, in pixels.
      size: Python int, image pixels along the axis.
      cells: Python int, mask cells along the axis.

    Returns:
      low, high: int32 [B, K, size], the two mask cells pixel centre
        `i + 0.5` interpolates between (edges clamped);
      frac: float32 [B, K, size], the weight of `high`;
      inside: bool [B, K, size], whether the centre lies in [start, end)
        (True on one contiguous run of pixels, or nowhere).
    """
    starts = tf.cast(starts, tf.float32)
    ends = tf.cast(ends, tf.float32)
    centres = tf.range(size, dtype=tf.float32) + 0.5  # [size]
    extent = ends - starts
    safe_extent = tf.where(extent > 0.0, extent, 1.0)
    coords = ((centres - starts[..., None]) * (cells / safe_extent)[..., None]
              - 0.5)  # [B, K, size] continuous cell index
    coords = tf.clip_by_value(coords, 0.0, cells - 1.0)
    low_f = tf.floor(coords)
    frac = coords - low_f
    low = tf.cast(low_f, tf.int32)
    high = tf.minimum(low + 1, cells - 1)
    inside = tf.logical_and(centres >= starts[..., None],
                            centres < ends[..., None])  # [B, K, size]
    return low, high, frac, inside


def _paste_weights(starts, ends, size, cells):
    """Separable interpolation matrix of pixel centres into box mask cells.

    Args:
      starts, ends: float32 [B, K], the box extent along one axis.
      size: Python int, image pixels along that axis.
      cells: Python int, mask cells along that axis.

    Returns:
      weights: float32 [B, K, size, cells], row `i` holds the two bilinear
        weights of pixel centre `i + 0.5` (`paste_coordinates`);
      inside: bool [B, K, size], whether that centre lies in [start, end).
    """
    low, high, frac, inside = paste_coordinates(starts, ends, size, cells)
    weights = (tf.one_hot(low, cells) * (1.0 - frac)[..., None]
               + tf.one_hot(high, cells) * frac[..., None])  # [B, K, size, cells]
    return weights, inside


@scoped
def paste_masks(masks, boxes, image_shape, threshold=0.5):
    """Pastes per-box mask probabilities into full-image binary masks.

    Image pixel `(i, j)` is its centre `(i + 0.5, j + 0.5)`. A pixel whose
    centre lies outside the box `[y1, y2) x [x1, x2)` is False; inside, the
    mask is sampled bilinearly at that point mapped into the `[0, oh] x
    [0, ow]` mask grid (cell centres at `+ 0.5`, edges clamped) and the pixel
    is True where the value is `>= threshold`.

    Algorithm (separable, so the only `[B, K, H, W]` float tensor is the
    sampled mask itself):
      1. Per axis, build the `[B, K, H, oh]` and `[B, K, W, ow]` matrices
         holding each pixel centre's two bilinear weights.
      2. Interpolate along x: `[B, K, oh, ow] @ [B, K, ow, W]`.
      3. Interpolate along y: `[B, K, H, oh] @ [B, K, oh, W]` -> `[B, K, H, W]`.
      4. Threshold and clear pixels whose centre is outside the box.
    Interpolation runs in float32 matmuls (on GPUs with TF32 matmuls enabled,
    values within ~1e-3 of `threshold` may flip).

    Args:
      masks: float [B, K, oh, ow] probabilities in [0, 1].
      boxes: float [B, K, 4] (y1, x1, y2, x2) in image pixels; empty boxes
        (padding, zeros) give all-False masks.
      image_shape: (H, W) Python ints, the output size.
      threshold: Python float; 0.5 as in Mask R-CNN inference.

    Returns:
      bool [B, K, H, W].
    """
    masks = tf.cast(masks, tf.float32)
    boxes = tf.cast(boxes, tf.float32)
    height, width = (int(v) for v in image_shape)
    oh, ow = masks.shape[-2], masks.shape[-1]
    y1, x1, y2, x2 = tf.unstack(boxes, 4, axis=-1)  # each [B, K]
    # Step 1.
    wy, inside_y = _paste_weights(y1, y2, height, oh)  # [B, K, H, oh]
    wx, inside_x = _paste_weights(x1, x2, width, ow)  # [B, K, W, ow]
    # Step 2.
    rows = tf.matmul(masks, wx, transpose_b=True)  # [B, K, oh, W]
    # Step 3.
    pasted = tf.matmul(wy, rows)  # [B, K, H, W]
    # Step 4.
    inside = tf.logical_and(inside_y[..., :, None],
                            inside_x[..., None, :])  # [B, K, H, W]
    return tf.logical_and(pasted >= threshold, inside)
