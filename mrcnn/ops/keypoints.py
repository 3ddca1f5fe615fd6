"""Keypoint-head targets and decoding (Keypoint R-CNN, He et al. 2017, sec. 5).

Shape letters: `B` batch, `N` rois or detections per image, `M` gt instances
per image, `K` keypoints per instance (17 for COCO persons), `S` side of the
keypoint heatmap (56 in Keypoint R-CNN).

Coordinates are continuous image pixels, pixel `(i, j)` covering
`[j, j + 1) x [i, i + 1)` (Heckbert's `c = d + 0.5`), as in `roi_align` and
`masks`; COCO's keypoints are pixel indices, so readers add 0.5 (Detectron2
does too). A heatmap of `S x S` cells laid over a box `(y1, x1, y2, x2)` puts
cell `(u, v)` over `[y1 + u * h / S, y1 + (u + 1) * h / S) x [x1 + v * w / S,
x1 + (v + 1) * w / S)`.
"""

import collections

import tensorflow as tf

from mrcnn.ops._scope import scoped

KeypointTargets = collections.namedtuple("KeypointTargets", ["indices", "valid"])


@scoped
def keypoint_targets(rois, gt_keypoints, matched_index, heatmap_size=56):
    """The heatmap cell of each roi's matched gt keypoints (Detectron2's
    `keypoints_to_heatmap`): the keypoint head's softmax-over-space targets.

    Keypoint `(y, x)` of a roi `(y1, x1, y2, x2)` falls in cell `(floor((y -
    y1) * S / (y2 - y1)), floor((x - x1) * S / (x2 - x1)))`; a point on the
    roi's bottom or right edge (`y == y2`, `x == x2`) takes the last cell.
    A keypoint is a target (`valid`) when it is labelled (`v > 0`: COCO's 1,
    labelled but occluded, counts as Detectron2 counts it), its cell lies in
    `[0, S)` on both axes, the roi is matched and has a positive size.

    Args:
      rois: float [B, N, 4] (y1, x1, y2, x2) in image pixels.
      gt_keypoints: float [B, M, K, 3] (y, x, v) in image pixels, v the COCO
        visibility (0 unlabelled, 1 labelled but not visible, 2 visible).
      matched_index: int32 [B, N], the gt index of each roi, -1 for none.
      heatmap_size: int, S.

    Returns:
      `KeypointTargets(indices int32 [B, N, K], valid bool [B, N, K])`:
      `indices` is the cell's flat index `u * S + v` in `[0, S * S)` where
      `valid`, 0 elsewhere.
    """
    size = int(heatmap_size)
    rois = tf.cast(rois, tf.float32)
    gt_keypoints = tf.cast(gt_keypoints, tf.float32)
    matched_index = tf.convert_to_tensor(matched_index, tf.int32)
    matched = tf.gather(gt_keypoints, tf.maximum(matched_index, 0),
                        batch_dims=1)  # [B, N, K, 3]
    y1, x1, y2, x2 = (rois[..., i:i + 1] for i in range(4))  # [B, N, 1]
    height, width = y2 - y1, x2 - x1
    positive = (matched_index >= 0)[..., None] & (height > 0) & (width > 0)  # [B, N, 1]
    # Divide by a safe size where the roi is empty; those slots are invalid.
    scale_y = size / tf.where(height > 0, height, 1.0)
    scale_x = size / tf.where(width > 0, width, 1.0)
    y, x = matched[..., 0], matched[..., 1]
    row = tf.floor((y - y1) * scale_y)
    col = tf.floor((x - x1) * scale_x)
    # Rounding can put a point on the far edge one cell out; the edge belongs
    # to the last cell (Detectron2's boundary rule).
    row = tf.where(y == y2, float(size - 1), row)
    col = tf.where(x == x2, float(size - 1), col)
    inside = (row >= 0) & (row < size) & (col >= 0) & (col < size)
    valid = inside & (matched[..., 2] > 0) & positive
    index = tf.cast(tf.clip_by_value(row, 0, size - 1), tf.int32) * size + tf.cast(
        tf.clip_by_value(col, 0, size - 1), tf.int32)
    return KeypointTargets(tf.where(valid, index, 0), valid)


def _neighbour_offset(before, centre, after):
    """Where a parabola through (-1, before), (0, centre), (1, after) peaks,
    in [-0.5, 0.5] when `centre` is the largest; 0 where it is flat."""
    curvature = before - 2.0 * centre + after
    offset = tf.math.divide_no_nan(before - after, 2.0 * curvature)
    return tf.clip_by_value(offset, -0.5, 0.5)


@scoped
def heatmaps_to_keypoints(heatmaps, boxes):
    """Keypoints from heatmap logits: the highest cell, refined within it.

    Each keypoint's location is its heatmap's highest cell (the first in
    row-major order among equals) moved by a parabola's peak through that
    cell and its two neighbours along each axis (no move on the heatmap's
    border or where the three are equal), mapped onto the box by the
    module's cell model: `x = x1 + (v + 0.5 + dv) * w / S`. The score is the
    spatial softmax at that cell, `1 / sum(exp(logits - max))`.

    Detectron2 instead resizes each heatmap bicubically to the box's size
    in pixels and takes the highest pixel; that needs a shape per box. The
    parabola gives the same sub-cell precision with static shapes.

    Args:
      heatmaps: float (any) [B, N, K, S, S] logits.
      boxes: float [B, N, 4] (y1, x1, y2, x2) in image pixels; sides under
        1 pixel are taken as 1, as Detectron2 does.

    Returns:
      float32 [B, N, K, 3] (y, x, score) in the boxes' pixels.
    """
    heatmaps = tf.cast(heatmaps, tf.float32)
    boxes = tf.cast(boxes, tf.float32)
    size_y, size_x = heatmaps.shape[-2], heatmaps.shape[-1]
    # N may be known only when run (a graph's trimmed detection slots).
    flat = tf.reshape(heatmaps, tf.concat([tf.shape(heatmaps)[:3], [size_y * size_x]],
                                          0))  # [B, N, K, S*S]
    peak = tf.reduce_max(flat, axis=-1, keepdims=True)  # [B, N, K, 1]
    # The first index of the maximum, the same eagerly and under XLA (argmax
    # leaves ties unspecified).
    cells = tf.range(size_y * size_x)
    first = tf.reduce_min(tf.where(flat >= peak, cells, size_y * size_x), axis=-1)
    row, col = first // size_x, first % size_x  # [B, N, K]

    def value(dr, dc):
        r = tf.clip_by_value(row + dr, 0, size_y - 1)
        c = tf.clip_by_value(col + dc, 0, size_x - 1)
        return tf.gather(flat, r * size_x + c, batch_dims=3)

    centre = peak[..., 0]
    dy = tf.where((row > 0) & (row < size_y - 1),
                  _neighbour_offset(value(-1, 0), centre, value(1, 0)), 0.0)
    dx = tf.where((col > 0) & (col < size_x - 1),
                  _neighbour_offset(value(0, -1), centre, value(0, 1)), 0.0)
    y1, x1 = boxes[..., 0:1], boxes[..., 1:2]  # [B, N, 1]
    height = tf.maximum(boxes[..., 2:3] - y1, 1.0)
    width = tf.maximum(boxes[..., 3:4] - x1, 1.0)
    y = y1 + (tf.cast(row, tf.float32) + 0.5 + dy) * height / size_y
    x = x1 + (tf.cast(col, tf.float32) + 0.5 + dx) * width / size_x
    score = 1.0 / tf.reduce_sum(tf.exp(flat - peak), axis=-1)
    return tf.stack([y, x, score], axis=-1)
