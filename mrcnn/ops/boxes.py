"""Box geometry: area, pairwise IoU, R-CNN delta coding, clipping.

Boxes are `(y1, x1, y2, x2)` in absolute pixels and cover `[x1, x2) x [y1, y2)`:
width is `x2 - x1`, with no `+ 1` (Detectron2's convention, not the old
Caffe one). A box with `y2 <= y1` or `x2 <= x1` is empty: area 0, IoU 0.

Shape letters: `B` batch, `N` and `M` box counts. Every function computes in
float32 and returns float32, whatever float dtype it is given, because box
geometry in float16/bfloat16 loses whole pixels on an 800x1333 canvas.
"""

import math

import tensorflow as tf

from mrcnn.ops._scope import scoped


# dh, dw may grow a box by at most 1000/16 (a 16 px box to 1000 px): larger
# predicted scales overflow exp() in float32 early in training (Detectron2's
# _DEFAULT_SCALE_CLAMP).
DEFAULT_MAX_LOG_SCALE = math.log(1000.0 / 16)


def _f32(x):
    return tf.cast(x, tf.float32)


def box_area(boxes):
    """Area of each box, 0 for empty boxes.

    Args:
      boxes: float [..., 4] (y1, x1, y2, x2).

    Returns:
      float32 [...].
    """
    boxes = _f32(boxes)
    y1, x1, y2, x2 = tf.unstack(boxes, 4, axis=-1)
    return tf.maximum(y2 - y1, 0.0) * tf.maximum(x2 - x1, 0.0)


@scoped
def box_iou(boxes_a, boxes_b):
    """Pairwise intersection over union.

    Args:
      boxes_a: float [..., N, 4] (y1, x1, y2, x2).
      boxes_b: float [..., M, 4] with the same leading dims as `boxes_a`.

    Returns:
      float32 [..., N, M] in [0, 1]; a pair with an empty box gives 0.
    """
    a = _f32(boxes_a)[..., :, None, :]  # [..., N, 1, 4]
    b = _f32(boxes_b)[..., None, :, :]  # [..., 1, M, 4]
    inter_h = tf.maximum(
        tf.minimum(a[..., 2], b[..., 2]) - tf.maximum(a[..., 0], b[..., 0]), 0.0)
    inter_w = tf.maximum(
        tf.minimum(a[..., 3], b[..., 3]) - tf.maximum(a[..., 1], b[..., 1]), 0.0)
    inter = inter_h * inter_w  # [..., N, M]
    area_a = box_area(boxes_a)[..., :, None]
    area_b = box_area(boxes_b)[..., None, :]
    union = area_a + area_b - inter
    # Empty boxes have zero area, hence zero intersection; the guard only
    # keeps 0/0 out of the graph.
    return tf.where(union > 0.0, inter / tf.maximum(union, 1e-12), 0.0)


def _centre_size(boxes):
    y1, x1, y2, x2 = tf.unstack(boxes, 4, axis=-1)
    h = y2 - y1
    w = x2 - x1
    return y1 + 0.5 * h, x1 + 0.5 * w, h, w


@scoped
def encode_boxes(boxes, anchors, weights=(1.0, 1.0, 1.0, 1.0)):
    """R-CNN box deltas of `boxes` relative to `anchors` (Fast R-CNN eq. 6-9).

    `dy = wy * (cy - cy_a) / h_a`, `dx = wx * (cx - cx_a) / w_a`,
    `dh = wh * log(h / h_a)`, `dw = ww * log(w / w_a)`.

    Args:
      boxes: float [..., 4] (y1, x1, y2, x2), the targets; non-empty where
        the deltas are used (an empty box gives -inf/NaN scale deltas, which
        callers mask out).
      anchors: float [..., 4], broadcastable against `boxes`.
      weights: (wy, wx, wh, ww) Python floats; (10, 10, 5, 5) for the box head.

    Returns:
      float32 [..., 4] deltas (dy, dx, dh, dw).
    """
    cy, cx, h, w = _centre_size(_f32(boxes))
    cya, cxa, ha, wa = _centre_size(_f32(anchors))
    wy, wx, wh, ww = weights
    return tf.stack([
        wy * (cy - cya) / ha,
        wx * (cx - cxa) / wa,
        wh * tf.math.log(h / ha),
        ww * tf.math.log(w / wa),
    ], axis=-1)


@scoped
def decode_boxes(deltas, anchors, weights=(1.0, 1.0, 1.0, 1.0),
                 max_log_scale=DEFAULT_MAX_LOG_SCALE):
    """Inverse of `encode_boxes`.

    Args:
      deltas: float [..., 4] (dy, dx, dh, dw).
      anchors: float [..., 4] (y1, x1, y2, x2), broadcastable against deltas.
      weights: (wy, wx, wh, ww) Python floats, as given to `encode_boxes`.
      max_log_scale: `dh / wh` and `dw / ww` are clipped to this before exp(),
        so a box grows by at most 1000/16 per side length by default.

    Returns:
      float32 [..., 4] boxes (y1, x1, y2, x2).
    """
    deltas = _f32(deltas)
    cya, cxa, ha, wa = _centre_size(_f32(anchors))
    wy, wx, wh, ww = weights
    dy, dx, dh, dw = tf.unstack(deltas, 4, axis=-1)
    dh = tf.minimum(dh / wh, max_log_scale)
    dw = tf.minimum(dw / ww, max_log_scale)
    cy = dy / wy * ha + cya
    cx = dx / wx * wa + cxa
    h = tf.exp(dh) * ha
    w = tf.exp(dw) * wa
    return tf.stack([cy - 0.5 * h, cx - 0.5 * w, cy + 0.5 * h, cx + 0.5 * w],
                    axis=-1)


@scoped
def clip_boxes(boxes, image_shape):
    """Clamps coordinates to the image.

    Args:
      boxes: float [B, N, 4] or [N, 4] (y1, x1, y2, x2).
      image_shape: (height, width): a `[2]` tensor or sequence for all boxes,
        or `[B, 2]` per image (then `boxes` is `[B, N, 4]`).

    Returns:
      float32, the shape of `boxes`, with y in [0, height] and x in [0, width].
    """
    boxes = _f32(boxes)
    image_shape = _f32(tf.convert_to_tensor(image_shape))
    if image_shape.shape.rank == 2:
        image_shape = image_shape[:, None, :]  # [B, 1, 2]
    height = image_shape[..., 0]
    width = image_shape[..., 1]
    y1, x1, y2, x2 = tf.unstack(boxes, 4, axis=-1)
    return tf.stack([
        tf.clip_by_value(y1, 0.0, height), tf.clip_by_value(x1, 0.0, width),
        tf.clip_by_value(y2, 0.0, height), tf.clip_by_value(x2, 0.0, width),
    ], axis=-1)
