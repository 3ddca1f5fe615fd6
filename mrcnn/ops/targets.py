"""Training targets: box-to-gt matching, balanced sampling, RPN, RoI and
dense-detector (RetinaNet) anchor targets.

Shape letters: `B` batch, `N` boxes to label (anchors or candidate rois),
`M` gt boxes (padded, with `gt_valid`), `P` proposals, `S` sampled rois per
image (`num_samples`). Boxes are `(y1, x1, y2, x2)` in image pixels; all box
geometry goes through `mrcnn.ops.boxes` and is float32.

Randomness: `sample_balanced` ranks candidates by integer keys from a
counter-based hash of `(seed, image, position)` (plain uint32 arithmetic), so a
given seed gives bit-identical samples eagerly and under
`tf.function(jit_compile=True)` (integer arithmetic is exact on any device).
TF's stateless Philox kernels do not promise that (eager and XLA differ on
CPU), hence the hash.
"""

import collections

import tensorflow as tf

from mrcnn.ops import boxes as box_ops
from mrcnn.ops._context import in_xla_context
from mrcnn.ops._scope import scoped

# Mixing constants of Chris Wellons' `lowbias32` integer hash (bias ~0.17,
# near the best known for two multiply rounds) and the 32-bit golden ratio
# used to spread the seed words.
_HASH_MUL1 = 0x7FEB352D
_HASH_MUL2 = 0x846CA68B
_GOLDEN32 = 0x9E3779B9
# match_boxes packs (IoU bits, gt index) into int64 keys: the index takes the
# low 32 bits; low-quality claims start at 2**62, above any IoU key (the
# float32 bits of 1.0 shifted left by 32 stay below 2**62).
_LOW_WORD = 2**32
_CLAIM = 2**62
# A box "reaches" a gt box's best IoU when within this relative distance of
# it. Geometrically tied anchors (same overlap, another grid cell) differ by
# float32 rounding of their coordinates (ulp(1024) ~ 1.2e-4 px, ~1e-5
# relative for a 16 px box), and XLA may recompute IoU a few ulps away from
# eager kernels; exact equality would keep an arbitrary subset of the ties
# and differ between eager and XLA.
_TIE_RTOL = 1e-4
# Random sampling keys are integers below 2**24, exact in float32. Equal keys
# (about N**2 / 2**25 pairs per image) are broken towards the lower index by
# top_k, a bias only at the cut-off and of order N / 2**24 there.
_KEY_BITS = 24

RpnTargets = collections.namedtuple(
    "RpnTargets", ["labels", "box_targets", "matched_index"])
RpnTargets.__doc__ = """Targets of the RPN for every anchor.

Fields:
  labels: int32 [B, N]; 1 sampled positive, 0 sampled negative, -1 not
    sampled or ignored.
  box_targets: float32 [B, N, 4] (dy, dx, dh, dw), `encode_boxes(matched gt,
    anchor, weights)`; 0 where `labels != 1`.
  matched_index: int32 [B, N], the gt index `match_boxes` gives (also for
    unsampled anchors); -1 in images with no valid gt.
"""

AnchorTargets = collections.namedtuple(
    "AnchorTargets", ["labels", "classes", "box_targets", "matched_index"])
AnchorTargets.__doc__ = """Targets of a dense (one-stage) detector for every anchor.

Fields:
  labels: int32 [B, N]; 1 positive, 0 negative (background), -1 ignored.
  classes: int32 [B, N], the matched gt class (1..C) where `labels == 1`,
    0 where `labels == 0`, -1 where ignored.
  box_targets: float32 [B, N, 4] (dy, dx, dh, dw), `encode_boxes(matched gt,
    anchor, weights)` where `labels == 1`, 0 elsewhere.
  matched_index: int32 [B, N], the gt index `match_boxes` gives; -1 in
    images with no valid gt.
"""

ProposalTargets = collections.namedtuple(
    "ProposalTargets",
    ["rois", "classes", "box_targets", "matched_index", "valid"])
ProposalTargets.__doc__ = """Sampled second-stage rois and their targets.

Slot order per image: sampled positives, then sampled negatives, then padding.

Fields:
  rois: float32 [B, S, 4] (y1, x1, y2, x2); padded slots 0.
  classes: int32 [B, S], gt class (1..C) for positives, 0 for negatives,
    -1 in padded slots.
  box_targets: float32 [B, S, 4] (dy, dx, dh, dw), `encode_boxes(matched gt,
    roi, weights)` for positives, 0 elsewhere.
  matched_index: int32 [B, S], gt index for positives, -1 elsewhere.
  valid: bool [B, S], True in sampled (positive or negative) slots.
"""


@scoped
def match_boxes(boxes, gt_boxes, gt_valid, positive_iou, negative_iou,
                allow_low_quality=True):
    """Matches each box to the valid gt box of highest IoU and labels it.

    A box takes the valid gt box of highest IoU, the lowest gt index on ties.
    Its label is 1 where that IoU is `>= positive_iou`, 0 where it is
    `< negative_iou`, -1 (ignored) in between.

    Low-quality matches (Faster R-CNN §3.1.2, condition (i); Detectron2's
    `set_low_quality_matches_`): with `allow_low_quality`, each valid gt box
    whose highest IoU over all boxes is > 0 also makes positive every box that
    reaches that IoU with it, so no gt is left without an anchor; such a box
    is matched to that gt box, the highest gt index winning when several
    claim one box. "Reaches" means within a relative `_TIE_RTOL` (1e-4) of
    the highest IoU: anchors tied in exact arithmetic differ by float32
    rounding, and so do eager and XLA IoUs (see `_TIE_RTOL`). Pinned by
    `MatchBoxesTest.test_low_quality_*`.

    Images with no valid gt give labels 0 and index -1 everywhere; invalid gt
    boxes are never matched. Degenerate (empty) gt boxes have IoU 0 with all
    boxes, so they never make a positive.

    Algorithm:
      1. IoU of every box with every gt box, invalid gt set to -1.
      2. Pack (IoU, gt index) into one int64 key per pair, ordered by IoU,
         then by lower index.
      3. Low-quality: best IoU per gt over boxes; pairs that reach it get a
         key above all IoU keys, ordered by higher index. One max over gt
         then gives each box its match; thresholds give labels.
      4. Images without a valid gt: labels 0, index -1.

    Args:
      boxes: float [N, 4] shared by all images (anchors), or [B, N, 4]
        (y1, x1, y2, x2).
      gt_boxes: float [B, M, 4] (y1, x1, y2, x2); padded slots any value.
      gt_valid: bool [B, M], False in padded slots.
      positive_iou: Python float, IoU at or above which a box is positive.
      negative_iou: Python float, IoU below which a box is negative.
      allow_low_quality: Python bool, add the low-quality matches above.

    Returns:
      (matched_index, labels): int32 [B, N] gt index (-1 in images with no
      valid gt), and int32 [B, N] labels in {1, 0, -1}.
    """
    gt_boxes = tf.cast(gt_boxes, tf.float32)
    gt_valid = tf.cast(gt_valid, tf.bool)
    num_gt = gt_boxes.shape[1]
    boxes = tf.cast(boxes, tf.float32)
    if boxes.shape.rank == 2:
        boxes = tf.broadcast_to(
            boxes[None], tf.stack([tf.shape(gt_boxes)[0], tf.shape(boxes)[0], 4]))

    # 1. IoU, with invalid gt below any real IoU so they are never the best.
    # Laid out [B, N, M] so the per-box reductions below run over the last
    # axis; see step 3 for why the per-gt best IoU computes its own.
    iou = box_ops.box_iou(boxes, gt_boxes)  # [B, N, M]
    iou = tf.where(gt_valid[:, None, :], iou, -1.0)
    gt_ids = tf.range(num_gt, dtype=tf.int64)  # [M]

    # 2. One int64 key per (box, gt) whose max over gt gives the best IoU and
    # its lowest index in a single reduction (tf.argmax leaves ties
    # unspecified): the float32 bits of an IoU >= 0 order like the IoU, so
    # key = bits << 32 | (2**32 - 1 - m). Invalid gt (IoU -1) give negative
    # keys, below all valid ones.
    bits = tf.cast(tf.bitcast(iou, tf.int32), tf.int64)  # [B, N, M]
    key = bits * _LOW_WORD + (_LOW_WORD - 1 - gt_ids)  # [B, N, M]

    # 3. Low-quality claims outrank any IoU key: _CLAIM + m, so the highest
    # claiming gt index wins the same reduction.
    # Under XLA the best IoU per gt is a reduction of its own over an IoU of
    # its own ([B, M, N]): sharing `iou` made XLA keep it, its masked copy
    # and the int64 keys in memory together (16 bytes a pair, 1.3 GB for an
    # 832 x 1344 image with LVIS's 300 gt). Apart, each reduction reads only
    # its own elementwise producers: XLA:CPU keeps 4 + 8 bytes a pair, one
    # after the other (`MatchBoxesTest.test_xla_keeps_no_pairwise_iou`;
    # rpn_targets there 137 -> 47 ms, one image, 100 gt); a GPU's reduction
    # fusions need keep none. The two IoUs may differ by float32 rounding
    # (`_TIE_RTOL`). Op by op, `iou` is in memory anyway: reduce it.
    if allow_low_quality:
        if in_xla_context():
            gt_best = tf.reduce_max(
                tf.where(gt_valid[:, :, None],
                         box_ops.box_iou(gt_boxes, boxes), -1.0),
                axis=2)[:, None, :]  # [B, 1, M]
        else:
            gt_best = tf.reduce_max(iou, axis=1, keepdims=True)  # [B, 1, M]
        claims = tf.logical_and(iou >= gt_best * (1.0 - _TIE_RTOL),
                                gt_best > 0.0)  # [B, N, M]
        key = tf.where(claims, _CLAIM + gt_ids, key)
    best = tf.reduce_max(key, axis=2)  # [B, N]
    claimed = best >= _CLAIM
    best_iou = tf.bitcast(
        tf.cast(tf.bitwise.right_shift(best, tf.constant(32, tf.int64)),
                tf.int32), tf.float32)  # [B, N]; meaningless where claimed
    matched = tf.where(claimed, best - _CLAIM,
                       _LOW_WORD - 1 - tf.bitwise.bitwise_and(
                           best, tf.constant(_LOW_WORD - 1, tf.int64)))
    labels = tf.where(best_iou >= positive_iou, 1,
                      tf.where(best_iou < negative_iou, 0, -1))
    labels = tf.where(claimed, 1, labels)

    # 4. Images with no valid gt.
    has_gt = tf.reduce_any(gt_valid, axis=1)[:, None]  # [B, 1]
    labels = tf.where(has_gt, labels, 0)
    matched = tf.where(has_gt, matched, -1)
    return tf.cast(matched, tf.int32), tf.cast(labels, tf.int32)


def _hash32(x):
    """`lowbias32`: a bijective uint32 -> uint32 mixer."""
    x = x ^ tf.bitwise.right_shift(x, tf.constant(16, tf.uint32))
    x = x * tf.constant(_HASH_MUL1, tf.uint32)
    x = x ^ tf.bitwise.right_shift(x, tf.constant(15, tf.uint32))
    x = x * tf.constant(_HASH_MUL2, tf.uint32)
    return x ^ tf.bitwise.right_shift(x, tf.constant(16, tf.uint32))


def _random_keys(shape, seed):
    """float32 [B, N] pseudo-random integers in [0, 2**24), a function of `seed`.

    `seed` None draws the seed from `tf.random.uniform` (fresh every call, in
    eager and XLA alike); otherwise it is a Python int or an integer scalar
    tensor (e.g. the training step), and the keys are a deterministic hash of
    (seed, flat position) that XLA and eager compute identically.
    """
    if seed is None:
        seed = tf.random.uniform([], minval=0, maxval=2**31 - 1, dtype=tf.int32)
    if isinstance(seed, int):
        seed_lo = tf.constant(seed & 0xFFFFFFFF, tf.uint32)
        seed_hi = tf.constant((seed >> 32) & 0xFFFFFFFF, tf.uint32)
    else:
        seed = tf.cast(seed, tf.int64)
        seed_lo = tf.cast(seed & 0xFFFFFFFF, tf.uint32)
        seed_hi = tf.cast(tf.bitwise.right_shift(seed, 32) & 0xFFFFFFFF,
                          tf.uint32)
    key = _hash32(seed_lo ^ _hash32(seed_hi + tf.constant(_GOLDEN32, tf.uint32)))
    counter = tf.reshape(
        tf.range(shape[0] * shape[1], dtype=tf.int32), shape)  # [B, N]
    counter = tf.cast(counter, tf.uint32)
    bits = _hash32(_hash32(counter + key) ^ key)  # [B, N]
    # The top 24 bits, exact in float32: XLA lowers top_k of float32 to a
    # partial sort but of int32 to a full sort (100x slower on CPU).
    top = tf.bitwise.right_shift(bits, tf.constant(32 - _KEY_BITS, tf.uint32))
    return tf.cast(top, tf.float32)


@scoped
def sample_balanced(labels, num_samples, positive_fraction, seed=None):
    """Draws a fixed-size, class-balanced random subset of labelled boxes.

    Per image: up to `int(num_samples * positive_fraction)` boxes drawn
    uniformly without replacement from label 1, then the rest of
    `num_samples` drawn uniformly from label 0; label -1 is never drawn.
    Exactly `min(num_samples, #pos_taken + #neg)` boxes are selected (the
    sampler of Faster R-CNN §3.1.3 and Detectron2's `subsample_labels`).

    Algorithm:
      1. A random non-negative key per box (`_random_keys`), set to -1 where
         the box is not of the class being drawn.
      2. Per image, `top_k` of the positive keys: the first
         `int(num_samples * positive_fraction)` that are positives.
      3. `top_k` of the negative keys, keeping the first
         `num_samples - #positives taken` that are negatives.
      4. Scatter the taken indices into a [B, N] mask.

    Args:
      labels: int [B, N] in {1, 0, -1}.
      num_samples: Python int, boxes per image.
      positive_fraction: Python float in [0, 1].
      seed: None (fresh randomness each call), a Python int, or an integer
        scalar tensor. A given seed gives the same subset eagerly and under
        XLA; vary it per step (e.g. pass the step) for fresh samples.

    Returns:
      bool [B, N], True for the selected boxes.
    """
    if not 0.0 <= positive_fraction <= 1.0:
        raise ValueError(
            f"sample_balanced: positive_fraction={positive_fraction} must lie "
            "in [0, 1]")
    labels = tf.cast(labels, tf.int32)
    batch, num = labels.shape[0], labels.shape[1]
    if batch is None or num is None:
        raise ValueError(f"sample_balanced: labels need a static shape, got "
                         f"{labels.shape}")
    num_pos_max = min(int(num_samples * positive_fraction), num)
    num_draw = min(num_samples, num)

    # 1. Random keys.
    keys = _random_keys((batch, num), seed)  # [B, N]
    batch_ids = tf.broadcast_to(tf.range(batch)[:, None], [batch, num_draw])

    # 2. Positives.
    if num_pos_max > 0:
        pos_keys, pos_idx = tf.math.top_k(
            tf.where(tf.equal(labels, 1), keys, -1.0), k=num_pos_max)  # [B, Kp]
        pos_taken = pos_keys >= 0  # [B, Kp]
        num_pos = tf.reduce_sum(tf.cast(pos_taken, tf.int32), axis=1)  # [B]
    else:
        num_pos = tf.zeros([batch], tf.int32)

    # 3. Negatives fill the rest.
    neg_keys, neg_idx = tf.math.top_k(
        tf.where(tf.equal(labels, 0), keys, -1.0), k=num_draw)  # [B, Kn]
    slot = tf.range(num_draw, dtype=tf.int32)[None, :]  # [1, Kn]
    neg_taken = tf.logical_and(neg_keys >= 0,
                               slot < (num_samples - num_pos)[:, None])  # [B, Kn]

    # 4. Scatter; top_k indices are distinct per row and a box is positive or
    # negative, never both, so each selected box receives exactly one 1.
    indices = tf.stack([batch_ids, neg_idx], axis=-1)  # [B, Kn, 2]
    updates = tf.cast(neg_taken, tf.int32)
    if num_pos_max > 0:
        indices = tf.concat(
            [indices, tf.stack([batch_ids[:, :num_pos_max], pos_idx], -1)],
            axis=1)  # [B, Kn + Kp, 2]
        updates = tf.concat([updates, tf.cast(pos_taken, tf.int32)], axis=1)
    selected = tf.scatter_nd(indices, updates, [batch, num])  # [B, N]
    return selected > 0


def _pad_empty_gt(gt_boxes, gt_valid, gt_classes):
    """Gives a batch with M = 0 gt slots one invalid slot, so gathers work."""
    if gt_boxes.shape[1] != 0:
        return gt_boxes, gt_valid, gt_classes
    return (tf.pad(gt_boxes, [[0, 0], [0, 1], [0, 0]]),  # [B, 1, 4]
            tf.pad(gt_valid, [[0, 0], [0, 1]]),  # [B, 1], False
            tf.pad(gt_classes, [[0, 0], [0, 1]]))


def _encode_matched(gt_boxes, matched_index, boxes, positive, weights):
    """encode_boxes(matched gt, box) where `positive`, exactly 0 elsewhere.

    Non-positive boxes are encoded against themselves (0 deltas), so no
    empty gt box ever reaches the log.
    """
    gt = tf.gather(gt_boxes, tf.maximum(matched_index, 0), batch_dims=1)  # [B, N, 4]
    gt = tf.where(positive[..., None], gt, boxes)
    deltas = box_ops.encode_boxes(gt, boxes, weights)  # [B, N, 4]
    return tf.where(positive[..., None], deltas, 0.0)


@scoped
def rpn_targets(anchors, gt_boxes, gt_valid, positive_iou=0.7,
                negative_iou=0.3, num_samples=256, positive_fraction=0.5,
                weights=(1.0, 1.0, 1.0, 1.0), allow_low_quality=True,
                seed=None):
    """RPN objectness labels and box deltas for all anchors of a batch.

    Anchors are matched with `match_boxes` (IoU >= 0.7 positive, < 0.3
    negative, low-quality matches on: Faster R-CNN §3.1.2) and 256 per image
    are sampled, at most half positive (§3.1.3), with `sample_balanced`.
    Anchors crossing the image border are kept (Detectron2's default
    `BOUNDARY_THRESH = -1`).

    Args:
      anchors: float [N, 4] (y1, x1, y2, x2), all levels concatenated in
        ascending level order (as the model concatenates
        `multilevel_anchors`); or [B, N, 4].
      gt_boxes: float [B, M, 4] (y1, x1, y2, x2); padded slots any value.
      gt_valid: bool [B, M], False in padded slots.
      positive_iou, negative_iou: Python floats, matching thresholds.
      num_samples: Python int, anchors sampled per image.
      positive_fraction: Python float, largest share of positives.
      weights: (wy, wx, wh, ww) of `encode_boxes`; (1, 1, 1, 1) for the RPN.
      allow_low_quality: Python bool, see `match_boxes`.
      seed: see `sample_balanced`.

    Returns:
      RpnTargets(labels int32 [B, N], box_targets float32 [B, N, 4],
      matched_index int32 [B, N]); see `RpnTargets`.
    """
    anchors = tf.cast(anchors, tf.float32)
    gt_boxes, gt_valid, _ = _pad_empty_gt(
        tf.cast(gt_boxes, tf.float32), tf.cast(gt_valid, tf.bool),
        tf.zeros(tf.shape(gt_valid), tf.int32))
    matched, labels = match_boxes(anchors, gt_boxes, gt_valid, positive_iou,
                                  negative_iou, allow_low_quality)
    sampled = sample_balanced(labels, num_samples, positive_fraction, seed)
    labels = tf.where(sampled, labels, -1)  # [B, N]
    if anchors.shape.rank == 2:
        anchors = anchors[None]  # [1, N, 4], broadcast against [B, N, 4]
    box_targets = _encode_matched(gt_boxes, matched, anchors,
                                  tf.equal(labels, 1), weights)
    return RpnTargets(labels=labels,
                      box_targets=tf.stop_gradient(box_targets),
                      matched_index=matched)


@scoped
def anchor_targets(anchors, gt_boxes, gt_classes, gt_valid, positive_iou=0.5,
                   negative_iou=0.4, weights=(1.0, 1.0, 1.0, 1.0),
                   allow_low_quality=True):
    """Class, box and label targets of every anchor, none sampled away.

    The targets of a one-stage detector (RetinaNet, Lin et al. 2017 §4:
    IoU >= 0.5 foreground, < 0.4 background, in between ignored; Detectron2's
    `RETINANET.IOU_THRESHOLDS = [0.4, 0.5]` with low-quality matches on).
    Every anchor keeps its label: a focal loss weighs the easy negatives
    down instead of sampling them out.

    Args:
      anchors: float [N, 4] (y1, x1, y2, x2), all levels concatenated in
        ascending level order; or [B, N, 4].
      gt_boxes: float [B, M, 4] (y1, x1, y2, x2); padded slots any value.
      gt_classes: int [B, M], 1..C; padded slots any value.
      gt_valid: bool [B, M], False in padded slots.
      positive_iou, negative_iou: Python floats, `match_boxes` thresholds.
      weights: (wy, wx, wh, ww) of `encode_boxes`; (1, 1, 1, 1) in RetinaNet.
      allow_low_quality: Python bool, see `match_boxes`.

    Returns:
      AnchorTargets(labels int32 [B, N], classes int32 [B, N], box_targets
      float32 [B, N, 4], matched_index int32 [B, N]); see `AnchorTargets`.
    """
    anchors = tf.cast(anchors, tf.float32)
    gt_boxes, gt_valid, gt_classes = _pad_empty_gt(
        tf.cast(gt_boxes, tf.float32), tf.cast(gt_valid, tf.bool),
        tf.cast(gt_classes, tf.int32))
    matched, labels = match_boxes(anchors, gt_boxes, gt_valid, positive_iou,
                                  negative_iou, allow_low_quality)
    positive = tf.equal(labels, 1)
    matched_class = tf.gather(gt_classes, tf.maximum(matched, 0), batch_dims=1)
    classes = tf.where(positive, matched_class, tf.where(tf.equal(labels, 0), 0, -1))
    if anchors.shape.rank == 2:
        anchors = anchors[None]  # [1, N, 4], broadcast against [B, N, 4]
    box_targets = _encode_matched(gt_boxes, matched, anchors, positive, weights)
    return AnchorTargets(labels=labels, classes=classes,
                         box_targets=tf.stop_gradient(box_targets),
                         matched_index=matched)


@scoped
def sample_proposals(proposals, proposal_valid, gt_boxes, gt_classes,
                     gt_valid, num_samples=512, positive_fraction=0.25,
                     positive_iou=0.5, negative_iou=0.5,
                     weights=(10.0, 10.0, 5.0, 5.0), append_gt=True,
                     seed=None):
    """Samples the second-stage rois of a batch and gives their targets.

    The Fast R-CNN sampler as Detectron2's `ROIHeads.label_and_sample_proposals`
    runs it: the valid gt boxes join the proposals (`append_gt`), candidates
    are matched with IoU >= 0.5 positive and < 0.5 background, without
    low-quality matches, and 512 per image are drawn, at most 25 % positive.

    Slots are ordered: all sampled positives first (at most
    `int(num_samples * positive_fraction)`, so they always lie in that many
    first slots; the mask head reads only those), in candidate order, then
    the sampled negatives in candidate order, then padding. Pinned by
    `SampleProposalsTest.test_slot_order`.

    Algorithm:
      1. Candidates: proposals, then (with `append_gt`) the gt boxes; invalid
         ones take label -1 so they are never drawn.
      2. `match_boxes` without low-quality matches, `sample_balanced`.
      3. One `top_k` over a unique key (positive > negative > unsampled, then
         lower candidate index first) gives the slot order.
      4. Gather boxes, labels and matched gt; classes and deltas for positives.

    Args:
      proposals: float [B, P, 4] (y1, x1, y2, x2); padded slots any value.
      proposal_valid: bool [B, P], False in padded slots.
      gt_boxes: float [B, M, 4] (y1, x1, y2, x2); padded slots any value.
      gt_classes: int [B, M], classes 1..C; padded slots any value.
      gt_valid: bool [B, M], False in padded slots.
      num_samples: Python int S, rois per image.
      positive_fraction: Python float, largest share of positives.
      positive_iou: Python float, IoU at or above which a roi is foreground.
      negative_iou: Python float, IoU below which a roi is background.
      weights: (wy, wx, wh, ww) of `encode_boxes`; (10, 10, 5, 5) for the box
        head (Fast R-CNN's target normalisation).
      append_gt: Python bool, add the valid gt boxes to the candidates.
      seed: see `sample_balanced`.

    Returns:
      ProposalTargets(rois float32 [B, S, 4], classes int32 [B, S],
      box_targets float32 [B, S, 4], matched_index int32 [B, S],
      valid bool [B, S]); padded slots hold rois 0, classes -1, box_targets
      0, matched_index -1, valid False. See `ProposalTargets`.
    """
    proposals = tf.cast(proposals, tf.float32)
    proposal_valid = tf.cast(proposal_valid, tf.bool)
    gt_boxes = tf.cast(gt_boxes, tf.float32)
    gt_valid = tf.cast(gt_valid, tf.bool)
    gt_classes = tf.cast(gt_classes, tf.int32)
    gt_boxes, gt_valid, gt_classes = _pad_empty_gt(gt_boxes, gt_valid,
                                                   gt_classes)

    # 1. Candidates.
    if append_gt:
        candidates = tf.concat([proposals, gt_boxes], axis=1)  # [B, P + M, 4]
        cand_valid = tf.concat([proposal_valid, gt_valid], axis=1)  # [B, P + M]
    else:
        candidates, cand_valid = proposals, proposal_valid
    num = cand_valid.shape[1]

    # 2. Match and sample.
    matched, labels = match_boxes(candidates, gt_boxes, gt_valid, positive_iou,
                                  negative_iou, allow_low_quality=False)
    labels = tf.where(cand_valid, labels, -1)  # [B, N]
    sampled = sample_balanced(labels, num_samples, positive_fraction, seed)

    # 3. Slot order: key = rank * (N + 1) + (N - index) is unique per row, so
    # the order does not rest on top_k's tie-breaking; float32 (XLA's fast
    # top_k) holds it exactly for N < 5e6.
    rank = tf.where(sampled, tf.where(tf.equal(labels, 1), 2, 1), 0)  # [B, N]
    order_key = rank * (num + 1) + (num - tf.range(num, dtype=tf.int32))[None]
    order_key = tf.cast(order_key, tf.float32)  # [B, N]
    k = min(num_samples, num)
    order_key, idx = tf.math.top_k(order_key, k=k)  # [B, k]
    slot_valid = order_key > num  # rank >= 1

    # 4. Gather per slot.
    rois = tf.gather(candidates, idx, batch_dims=1)  # [B, k, 4]
    slot_labels = tf.gather(labels, idx, batch_dims=1)  # [B, k]
    slot_matched = tf.gather(matched, idx, batch_dims=1)  # [B, k]
    positive = tf.logical_and(slot_valid, tf.equal(slot_labels, 1))
    rois = tf.where(slot_valid[..., None], rois, 0.0)
    box_targets = _encode_matched(gt_boxes, slot_matched, rois, positive,
                                  weights)  # [B, k, 4]
    matched_gt_class = tf.gather(gt_classes, tf.maximum(slot_matched, 0),
                                 batch_dims=1)  # [B, k]
    classes = tf.where(positive, matched_gt_class,
                       tf.where(slot_valid, 0, -1))
    matched_index = tf.where(positive, slot_matched, -1)

    if k < num_samples:  # fewer candidates than slots: pad statically
        pad = num_samples - k
        rois = tf.pad(rois, [[0, 0], [0, pad], [0, 0]])
        box_targets = tf.pad(box_targets, [[0, 0], [0, pad], [0, 0]])
        classes = tf.pad(classes, [[0, 0], [0, pad]], constant_values=-1)
        matched_index = tf.pad(matched_index, [[0, 0], [0, pad]],
                               constant_values=-1)
        slot_valid = tf.pad(slot_valid, [[0, 0], [0, pad]])
    return ProposalTargets(
        rois=tf.stop_gradient(rois), classes=classes,
        box_targets=tf.stop_gradient(box_targets),
        matched_index=matched_index, valid=slot_valid)
