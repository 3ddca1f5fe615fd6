"""Mask R-CNN and RetinaNet losses, each a float32 scalar, normalised as
Detectron2 does.

Shape letters: `B` batch, `N` anchors (all levels), `K` sampled rois per
image, `C` foreground classes, `Kp` rois of the mask head per image (the
positive slots, `int(K * positive_fraction)`), `S` mask-head resolution (28).

Box losses default to L1 (`beta=0`): Detectron2's default `SMOOTH_L1_BETA`
is 0.0 for both the RPN and the box head (the 1/9 of the original Faster
R-CNN is `beta=1/9`). Every input is cast to float32 first, so the losses are
float32 whatever the mixed-precision policy.
"""

import tensorflow as tf


def _f32(x):
    return tf.cast(x, tf.float32)


def smooth_l1(x, beta):
    """Elementwise smooth L1 (Huber / beta) of `x`; L1 when `beta` is 0.

    Args:
      x: float32 [...].
      beta: Python float >= 0.

    Returns:
      float32 [...], `0.5 x^2 / beta` where `|x| < beta`, else `|x| - beta/2`.
    """
    ax = tf.abs(x)
    if beta <= 0.0:
        return ax
    return tf.where(ax < beta, 0.5 * ax * ax / beta, ax - 0.5 * beta)


def rpn_objectness_loss(logits, labels, num_samples):
    """Binary cross-entropy over the sampled anchors.

    Args:
      logits: float [B, N] objectness logits.
      labels: int32 [B, N], 1 positive, 0 negative, -1 not sampled.
      num_samples: Python int, anchors sampled per image (256); the sum is
        divided by `num_samples * B` (Detectron2's normaliser).

    Returns:
      float32 scalar.
    """
    logits = _f32(logits)
    sampled = _f32(labels >= 0)
    ce = tf.nn.sigmoid_cross_entropy_with_logits(
        labels=_f32(tf.equal(labels, 1)), logits=logits)  # [B, N]
    normaliser = float(num_samples * logits.shape[0])
    return tf.reduce_sum(ce * sampled) / normaliser


def rpn_box_loss(deltas, box_targets, labels, num_samples, beta=0.0):
    """Smooth-L1 (L1 by default) of anchor deltas over positive anchors.

    Args:
      deltas: float [B, N, 4] predicted (dy, dx, dh, dw).
      box_targets: float32 [B, N, 4], `encode_boxes(matched gt, anchor)`.
      labels: int32 [B, N]; only label 1 counts.
      num_samples: Python int; the sum is divided by `num_samples * B`.
      beta: Python float, smooth-L1 beta (0: L1).

    Returns:
      float32 scalar.
    """
    return _positive_box_sum(deltas, box_targets, labels, beta) / float(
        num_samples * deltas.shape[0])


def _positive_box_sum(deltas, box_targets, labels, beta):
    """Sum of smooth L1 of `deltas` [B, N, 4] against `box_targets` over the
    anchors with label 1."""
    positive = _f32(tf.equal(labels, 1))[..., None]  # [B, N, 1]
    diff = _f32(deltas) - tf.where(positive > 0, _f32(box_targets), 0.0)
    return tf.reduce_sum(smooth_l1(diff, beta) * positive)


def focal_loss(class_logits, classes, normalizer, alpha=0.25, gamma=2.0):
    """Sigmoid focal loss over every anchor that is not ignored (RetinaNet §3).

    Per anchor and class, with `p` the sigmoid of the logit and `t` 1 for
    the anchor's gt class, else 0: `-alpha_t (1 - p_t)^gamma log(p_t)`,
    `p_t = p` and `alpha_t = alpha` where `t = 1`, `1 - p` and `1 - alpha`
    where `t = 0` (Detectron2's `sigmoid_focal_loss_jit`, fvcore). Summed,
    then divided by `normalizer`.

    Args:
      class_logits: float [B, N, C], one logit per foreground class (no
        background column).
      classes: int32 [B, N], 1..C positive, 0 background, -1 ignored
        (`ops.targets.AnchorTargets.classes`).
      normalizer: float32 scalar, e.g. the positive anchors of the batch
        (at least 1).
      alpha: Python float in [0, 1], the weight of the positive term (0.25);
        < 0 for no weighting.
      gamma: Python float >= 0, the focusing exponent (2; 0 is plain
        cross-entropy).

    Returns:
      float32 scalar.
    """
    logits = _f32(class_logits)
    targets = tf.one_hot(classes - 1, logits.shape[-1], dtype=tf.float32)  # [B, N, C]
    ce = tf.nn.sigmoid_cross_entropy_with_logits(labels=targets, logits=logits)
    p = tf.sigmoid(logits)
    p_t = p * targets + (1.0 - p) * (1.0 - targets)
    loss = ce * tf.pow(1.0 - p_t, gamma) if gamma else ce
    if alpha >= 0:
        loss = loss * (alpha * targets + (1.0 - alpha) * (1.0 - targets))
    counted = _f32(classes >= 0)[..., None]  # [B, N, 1]
    return tf.reduce_sum(loss * counted) / _f32(normalizer)


def dense_box_loss(deltas, box_targets, labels, normalizer, beta=0.1):
    """Smooth L1 of every positive anchor's deltas, divided by `normalizer`
    (RetinaNet's box loss; Detectron2's `SMOOTH_L1_LOSS_BETA = 0.1`).

    Args:
      deltas: float [B, N, 4] predicted (dy, dx, dh, dw).
      box_targets: float32 [B, N, 4], `encode_boxes(matched gt, anchor)`.
      labels: int32 [B, N]; only label 1 counts.
      normalizer: float32 scalar, as `focal_loss`'s.
      beta: Python float, smooth-L1 beta (0: L1).

    Returns:
      float32 scalar.
    """
    return _positive_box_sum(deltas, box_targets, labels, beta) / _f32(normalizer)


def rcnn_class_loss(class_logits, classes, valid):
    """Softmax cross-entropy, mean over the sampled rois.

    Args:
      class_logits: float [B, K, C + 1], column 0 background.
      classes: int32 [B, K], 0 background, 1..C foreground, -1 padding.
      valid: bool [B, K], True on sampled slots.

    Returns:
      float32 scalar (0 when no roi is sampled).
    """
    weight = _f32(valid)
    ce = tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=tf.maximum(classes, 0), logits=_f32(class_logits))  # [B, K]
    return tf.reduce_sum(ce * weight) / tf.maximum(tf.reduce_sum(weight), 1.0)


def rcnn_sigmoid_class_loss(class_logits, classes, valid, scored=None):
    """Per-class sigmoid cross-entropy (Detectron2's `USE_SIGMOID_CE`),
    summed over the scored classes, mean over the sampled rois.

    A roi's target is 1 for its class and 0 for every other; a background
    roi has all targets 0; the background column 0 is not used.

    Args:
      class_logits: float [B, K, C + 1], column 0 background.
      classes: int32 [B, K], 0 background, 1..C foreground, -1 padding.
      valid: bool [B, K], True on sampled slots.
      scored: optional bool [C], the classes 1..C that count (the federated
        loss's, `federated_classes`); None: all.

    Returns:
      float32 scalar (0 when no roi is sampled).
    """
    num_classes = class_logits.shape[-1] - 1
    targets = tf.one_hot(tf.maximum(classes, 0), num_classes + 1)[..., 1:]  # [B, K, C]
    bce = tf.nn.sigmoid_cross_entropy_with_logits(
        labels=targets, logits=_f32(class_logits)[..., 1:])  # [B, K, C]
    weight = _f32(valid)[..., None]
    if scored is not None:
        weight = weight * _f32(scored)
    return tf.reduce_sum(bce * weight) / tf.maximum(tf.reduce_sum(_f32(valid)), 1.0)


def federated_classes(classes, valid, class_weights, num_scored):
    """bool [C]: the classes a federated loss scores in one step (Zhou et al.,
    "Probabilistic two-stage detection", 2021; Detectron2's
    `get_fed_loss_classes`).

    Every class of a sampled roi counts; when fewer than `num_scored` do
    (background counting as one when a sampled roi is background), the rest
    are drawn without replacement with probability proportional to
    `class_weights` (a class of weight 0 is never drawn). The draw is
    Gumbel-top-k: the largest `log(w) + Gumbel noise` keys are a sample
    without replacement in proportion to w, with static shapes.

    Args:
      classes: int32 [B, K], 0 background, 1..C foreground, -1 padding.
      valid: bool [B, K].
      class_weights: float [C] >= 0, for classes 1..C (Detectron2: each
        class's training image count to the power 0.5).
      num_scored: Python int.

    Returns:
      bool [C] for classes 1..C.
    """
    num_classes = class_weights.shape[0]
    present = tf.math.unsorted_segment_sum(
        tf.reshape(_f32(valid), [-1]), tf.reshape(tf.where(valid, classes, 0), [-1]),
        num_classes + 1) > 0  # [C + 1]
    wanted = tf.maximum(num_scored - tf.reduce_sum(tf.cast(present, tf.int32)), 0)
    weights = _f32(class_weights)
    noise = -tf.math.log(-tf.math.log(tf.random.uniform([num_classes], 1e-12, 1.0)))
    keys = tf.where(present[1:] | (weights <= 0), -float("inf"),
                    tf.math.log(tf.maximum(weights, 1e-30)) + noise)  # [C]
    draws = min(int(num_scored), num_classes)
    top, index = tf.math.top_k(keys, k=draws)
    chosen = (tf.range(draws) < wanted) & (top > -float("inf"))
    drawn = tf.scatter_nd(index[:, None], tf.cast(chosen, tf.int32), [num_classes]) > 0
    return present[1:] | drawn


def rcnn_box_loss(box_deltas, box_targets, classes, valid, beta=0.0):
    """Class-specific box regression on positive rois.

    The deltas of each roi's gt class are compared with its targets; the sum
    over positives is divided by the number of sampled rois (Detectron2
    `box_reg_loss`, which normalises by all sampled rois, not positives).

    Args:
      box_deltas: float [B, K, C, 4] (dy, dx, dh, dw) per foreground class,
        or [B, K, 1, 4] class-agnostic.
      box_targets: float32 [B, K, 4], 0 unless positive.
      classes: int32 [B, K], 1..C on positives.
      valid: bool [B, K], sampled slots.
      beta: Python float, smooth-L1 beta (0: L1).

    Returns:
      float32 scalar.
    """
    positive = _f32(classes > 0)  # [B, K]
    # Class-agnostic deltas ([B, K, 1, 4]) serve every class.
    index = tf.maximum(classes - 1, 0) if box_deltas.shape[2] > 1 else tf.zeros_like(classes)
    deltas = tf.gather(_f32(box_deltas), index, batch_dims=2)  # [B, K, 4]
    loss = tf.reduce_sum(
        smooth_l1(deltas - _f32(box_targets), beta), axis=-1) * positive
    num_sampled = tf.reduce_sum(_f32(valid))
    return tf.reduce_sum(loss) / tf.maximum(num_sampled, 1.0)


def mask_loss(mask_logits, mask_targets, positive):
    """Per-pixel binary cross-entropy of the gt-class mask, mean over positives.

    Args:
      mask_logits: float [B, Kp, S, S], the channel of each roi's gt class.
      mask_targets: float32 [B, Kp, S, S] of 0/1.
      positive: bool [B, Kp], rois that carry a mask target.

    Returns:
      float32 scalar, the mean over the positive rois' S x S pixels (0 when
      there is none).
    """
    logits = _f32(mask_logits)
    ce = tf.nn.sigmoid_cross_entropy_with_logits(
        labels=_f32(mask_targets), logits=logits)  # [B, Kp, S, S]
    weight = _f32(positive)
    pixels = float(logits.shape[2] * logits.shape[3])
    total = tf.reduce_sum(tf.reduce_sum(ce, axis=[2, 3]) * weight)
    return total / tf.maximum(tf.reduce_sum(weight) * pixels, 1.0)


def keypoint_loss(heatmap_logits, target_indices, valid):
    """Softmax cross-entropy over each keypoint's heatmap cells, mean over the
    labelled keypoints (Detectron2's `keypoint_rcnn_loss` with
    `NORMALIZE_LOSS_BY_VISIBLE_KEYPOINTS`, its default).

    Args:
      heatmap_logits: float [B, N, K, S, S], one map per roi and keypoint.
      target_indices: int32 [B, N, K], the target cell `row * S + col`
        (`ops.keypoints.keypoint_targets`).
      valid: bool [B, N, K], the keypoints that carry a target.

    Returns:
      float32 scalar: the summed cross-entropy over `valid` keypoints divided
      by their count (0 when there is none).
    """
    logits = _f32(heatmap_logits)
    cells = logits.shape[-2] * logits.shape[-1]
    flat = tf.reshape(logits, tf.concat([tf.shape(target_indices), [cells]], 0))
    ce = tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=tf.clip_by_value(target_indices, 0, cells - 1), logits=flat)  # [B, N, K]
    weight = _f32(valid)
    return tf.reduce_sum(ce * weight) / tf.maximum(tf.reduce_sum(weight), 1.0)
