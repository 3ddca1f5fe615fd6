"""Batched greedy non-maximum suppression, single- and multi-class.

Shape letters: `B` batch, `N` candidate boxes per image, `K` boxes kept per
image (`max_output_size`), `C` classes, `T` tile of sorted candidates
processed at once.

The result is exactly greedy NMS as `tf.image.non_max_suppression` computes it
for each image: candidates with `score > score_threshold`, visited in
descending score order (equal scores: lower index first), a candidate dropped
when its IoU with an already kept box is `> iou_threshold`, at most `K` kept.
IoU is `mrcnn.ops.boxes.box_iou`, in float32 whatever the input dtype, so an
empty box overlaps nothing (IoU 0) and never suppresses or is suppressed.

How it runs batched and fast (the tiled scheme of TF's
`non_max_suppression_padded` and Model Garden, changed to compare each tile
only with the boxes kept so far, not with every earlier box): candidates are
sorted once, then visited `T` at a time. A tile is first suppressed by the
boxes already kept (kept boxes are packed into a `[B, K]` buffer, so heavily
suppressed images compare against few chunks), then its own greedy order is
resolved by iterating "keep = alive and not suppressed by an earlier kept box
of the tile" to its fixed point. Entry `t` of the tile is final after at most
`t + 1` iterations (it depends only on earlier entries), and the fixed point
of this triangular system is unique, so stopping at the first repeat gives
exactly the greedy answer; in practice a handful of iterations suffice. The
loop over tiles stops once every image has `K` boxes or no candidates left.
"""

import collections

import tensorflow as tf

from mrcnn.ops import boxes as box_ops
from mrcnn.ops._scope import scoped

NmsResult = collections.namedtuple(
    "NmsResult", ["indices", "boxes", "scores", "num_valid"])
MulticlassNmsResult = collections.namedtuple(
    "MulticlassNmsResult", ["boxes", "scores", "classes", "num_valid"])

# Largest tile of sorted candidates handled in one step. Each tile costs a
# [B, T, T] self-IoU plus a few fixed-point sweeps over it; 128 was the fastest
# of 64/128/256/512 on CPU with XLA for B=8, N=2000, K=1000, IoU 0.7 (random:
# 13/8/8/11 ms, clustered: 23/13/15/17 ms). Smaller problems use a tile of
# about K (rounded up to a multiple of 8), so that few tiles are wasted past
# the K-th kept box.
_MAX_TILE = 128
_TILE_ALIGN = 8
# Per-class NMS first packs each class's candidates into this many slots per
# box it may keep (rounded up to a multiple of _MAX_TILE: 128 slots for 100
# kept), and sorts only those, because XLA's CPU sort is most of the cost
# (B=8, N=1000, C=80: 25 ms with 128 slots, 52 ms with 256, 75 ms sorting all
# 1000). With the 0.05 score threshold a class rarely has more candidates;
# when one does, all N are sorted, so the result is exact either way.
_CANDIDATES_PER_KEPT = 1
# When no class can hit its own cap (max_per_class >= max_total), per-class
# NMS runs on one row per image: the best `_PAIRS_PER_TOTAL * max_total`
# (class, box) pairs, visited in score order, classes kept apart. Greedy
# order makes it exact once `max_total` are kept within them (or all
# candidates fit); else the per-class scheme above runs.
_PAIRS_PER_TOTAL = 16


def _round_up(x, multiple):
    return -(-x // multiple) * multiple


def _tile_size(num_boxes, max_output_size):
    tile = min(_MAX_TILE, _round_up(max(max_output_size, 1), _TILE_ALIGN))
    return max(1, min(tile, num_boxes))


def _check_args(iou_threshold, **counts):
    for name, value in counts.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a Python int >= 1, got {value!r}")
    if not 0.0 <= iou_threshold <= 1.0:
        raise ValueError(
            f"iou_threshold must be in [0, 1], got {iou_threshold!r}")


def _overlaps(boxes_a, boxes_b, iou_threshold, groups_a=None, groups_b=None):
    """bool [B, T, M]: IoU > threshold, and (with groups) the same group.

    Groups keep classes apart exactly, where shifting each class's boxes by
    an offset would round their float32 coordinates.
    """
    over = box_ops.box_iou(boxes_a, boxes_b) > iou_threshold  # [B, T, M]
    if groups_a is None:
        return over
    return tf.logical_and(over, tf.equal(groups_a[:, :, None], groups_b[:, None, :]))


def _suppressed_by(tile_boxes, other_boxes, iou_threshold, tile_groups=None,
                   other_groups=None):
    """bool [B, T]: tile box overlaps some box of `other_boxes` by > threshold.

    Empty (e.g. zero padding) boxes in `other_boxes` have IoU 0 with
    everything, so they never suppress (iou_threshold >= 0).
    """
    return tf.reduce_any(_overlaps(tile_boxes, other_boxes, iou_threshold,
                                   tile_groups, other_groups), axis=-1)


def _self_suppress(tile_boxes, alive, iou_threshold, tile_groups=None):
    """Greedy NMS inside one tile of score-sorted boxes.

    Args:
      tile_boxes: float32 [B, T, 4] (y1, x1, y2, x2), in descending score order.
      alive: bool [B, T], candidates not yet suppressed.
      iou_threshold: Python float.
      tile_groups: optional int32 [B, T]; boxes of different groups never
        suppress each other.

    Returns:
      bool [B, T], the boxes greedy NMS keeps among `alive`.
    """
    tile = tile_boxes.shape[1]
    rank = tf.range(tile)
    earlier = rank[None, :] < rank[:, None]  # [T, T], [t, j]: j < t
    # overlaps[b, t, j]: box j comes before box t and overlaps it (IoU is
    # symmetric, so row t of the self-IoU holds box t against every j).
    overlaps = tf.logical_and(
        _overlaps(tile_boxes, tile_boxes, iou_threshold, tile_groups, tile_groups),
        earlier[None])  # [B, T, T]

    def body(keep, _):
        suppressed = tf.reduce_any(
            tf.logical_and(overlaps, keep[:, None, :]), axis=-1)  # [B, T]
        new_keep = tf.logical_and(alive, tf.logical_not(suppressed))
        changed = tf.reduce_any(tf.not_equal(new_keep, keep))
        return new_keep, changed

    keep, _ = tf.while_loop(
        lambda keep, changed: changed, body, (alive, tf.constant(True)),
        maximum_iterations=tile + 1)
    return keep


def _greedy_nms(boxes, scores, candidate, max_output_size, iou_threshold,
                groups=None):
    """Greedy NMS of every row; the core of both public functions.

    Algorithm:
      1. Sort every row by score, candidates first, ties by lower index
         (`top_k` is stable).
      2. Pad the sorted boxes to `num_tiles * T` and view as tiles [B, nt, T].
      3. For each tile, while some row has < K kept and candidates left:
         a. alive = candidate slots of the tile;
         b. drop those overlapping any box kept so far, comparing with the
            packed kept-box buffer one chunk of T at a time, only over the
            chunks that hold kept boxes;
         c. resolve greedy order inside the tile (`_self_suppress`);
         d. append the tile's kept boxes and sorted positions to the buffers.
      4. The first min(num_kept, K) buffer slots are the result.

    Args:
      boxes: float32 [B, N, 4] (y1, x1, y2, x2); static B and N.
      scores: float32 [B, N].
      candidate: bool [B, N], the boxes that may be kept.
      max_output_size: Python int K.
      iou_threshold: Python float in [0, 1].
      groups: optional int32 [B, N]; boxes of different groups never
        suppress each other (per-class NMS of all classes in one row).

    Returns:
      indices: int32 [B, K] into N, in descending score order; padded -1.
      num_valid: int32 [B].
    """
    batch, num_boxes = boxes.shape[0], boxes.shape[1]
    grouped = groups is not None
    k = max_output_size
    tile = _tile_size(num_boxes, k)
    num_tiles = -(-num_boxes // tile)
    padded = num_tiles * tile
    # The kept-box buffer holds K slots rounded up to whole chunks, plus one
    # dump slot (the last) that absorbs writes of non-kept or beyond-K boxes.
    buffer_size = _round_up(k, tile)

    # 1. Candidates, sorted.
    sort_key = tf.where(candidate, scores, float("-inf"))
    order = tf.math.top_k(sort_key, k=num_boxes, sorted=True).indices  # [B, N]
    num_candidates = tf.reduce_sum(tf.cast(candidate, tf.int32), axis=1)  # [B]
    sorted_boxes = tf.gather(boxes, order, batch_dims=1)  # [B, N, 4]
    if grouped:
        sorted_groups = tf.pad(tf.gather(groups, order, batch_dims=1),
                               [[0, 0], [0, padded - num_boxes]])
        tiled_groups = tf.reshape(sorted_groups, [batch, num_tiles, tile])

    # 2. Tiles.
    sorted_boxes = tf.pad(sorted_boxes,
                          [[0, 0], [0, padded - num_boxes], [0, 0]])
    tiled_boxes = tf.reshape(sorted_boxes, [batch, num_tiles, tile, 4])
    batch_index = tf.tile(tf.range(batch)[:, None], [1, tile])  # [B, T]
    tile_pos = tf.range(tile)  # [T]

    # 3. Tiles in order.
    def tile_cond(i, num_kept, kept_boxes, kept_groups, kept_pos):
        active = tf.logical_and(num_kept < k, i * tile < num_candidates)
        return tf.reduce_any(active)

    def tile_body(i, num_kept, kept_boxes, kept_groups, kept_pos):
        tile_boxes = tiled_boxes[:, i]  # [B, T, 4]
        tile_groups = tiled_groups[:, i] if grouped else None  # [B, T]
        positions = i * tile + tile_pos  # [T]
        # a. Candidates of this tile; rows that are full keep nothing more.
        alive = tf.logical_and(positions[None, :] < num_candidates[:, None],
                               (num_kept < k)[:, None])  # [B, T]
        # b. Suppression by the boxes kept in earlier tiles.
        num_chunks = -(-tf.reduce_max(tf.minimum(num_kept, k)) // tile)

        def chunk_body(j, suppressed):
            chunk = tf.slice(kept_boxes, [0, j * tile, 0], [batch, tile, 4])
            chunk_groups = (tf.slice(kept_groups, [0, j * tile], [batch, tile])
                            if grouped else None)
            return j + 1, tf.logical_or(
                suppressed, _suppressed_by(tile_boxes, chunk, iou_threshold,
                                           tile_groups, chunk_groups))

        _, suppressed = tf.while_loop(
            lambda j, _: j < num_chunks, chunk_body,
            (tf.constant(0), tf.zeros([batch, tile], tf.bool)),
            maximum_iterations=buffer_size // tile)
        alive = tf.logical_and(alive, tf.logical_not(suppressed))
        # c. Greedy order inside the tile.
        keep = _self_suppress(tile_boxes, alive, iou_threshold, tile_groups)  # [B, T]
        # d. Pack the kept boxes after those of earlier tiles.
        keep_i = tf.cast(keep, tf.int32)
        slot = num_kept[:, None] + tf.cumsum(keep_i, axis=1, exclusive=True)
        slot = tf.where(tf.logical_and(keep, slot < k), slot, buffer_size)
        scatter_index = tf.stack([batch_index, slot], axis=-1)  # [B, T, 2]
        kept_boxes = tf.tensor_scatter_nd_update(
            kept_boxes, scatter_index, tile_boxes)
        if grouped:
            kept_groups = tf.tensor_scatter_nd_update(
                kept_groups, scatter_index, tile_groups)
        kept_pos = tf.tensor_scatter_nd_update(
            kept_pos, scatter_index, tf.broadcast_to(positions, [batch, tile]))
        num_kept = num_kept + tf.reduce_sum(keep_i, axis=1)
        return i + 1, num_kept, kept_boxes, kept_groups, kept_pos

    _, num_kept, _, _, kept_pos = tf.while_loop(
        tile_cond, tile_body,
        (tf.constant(0), tf.zeros([batch], tf.int32),
         tf.zeros([batch, buffer_size + 1, 4], tf.float32),
         tf.zeros([batch, buffer_size + 1 if grouped else 1], tf.int32),
         tf.zeros([batch, buffer_size + 1], tf.int32)),
        maximum_iterations=num_tiles)

    # 4. Result slots.
    num_valid = tf.minimum(num_kept, k)
    indices = tf.gather(order, kept_pos[:, :k], batch_dims=1)  # [B, K]
    slot_valid = tf.range(k)[None, :] < num_valid[:, None]  # [B, K]
    return tf.where(slot_valid, indices, -1), num_valid


def _compact(candidate, width):
    """Indices of each row's first `width` candidates, in index order.

    Args:
      candidate: bool [B, N].
      width: Python int P <= N.

    Returns:
      index: int32 [B, P] into N; slots past the row's candidates hold 0.
      valid: bool [B, P], the slots holding a candidate.
    """
    batch, num_boxes = candidate.shape
    rank = tf.cumsum(tf.cast(candidate, tf.int32), axis=1, exclusive=True)
    # Slot `width` (dropped below) absorbs non-candidates and overflow.
    slot = tf.where(tf.logical_and(candidate, rank < width), rank, width)
    row = tf.broadcast_to(tf.range(batch)[:, None], [batch, num_boxes])
    index = tf.tensor_scatter_nd_update(
        tf.zeros([batch, width + 1], tf.int32),
        tf.stack([row, slot], axis=-1),
        tf.broadcast_to(tf.range(num_boxes)[None, :], [batch, num_boxes]),
    )[:, :width]  # [B, P]
    num_candidates = tf.reduce_sum(tf.cast(candidate, tf.int32), axis=1)
    valid = tf.range(width)[None, :] < num_candidates[:, None]  # [B, P]
    return index, valid


def _nms_indices(boxes, scores, max_output_size, iou_threshold,
                 score_threshold, valid, max_candidates=None, groups=None):
    """Indices and counts of greedy NMS; see `batched_nms`.

    With `max_candidates` P < N, rows are first compacted to their first P
    candidates (index order, so score ties still go to the lower index) and
    only those are sorted and suppressed: sorting is most of the cost when
    a score threshold leaves few candidates (per-class NMS). When some row
    has more than P candidates, the full sort runs instead, so the result is
    exact either way.
    """
    batch, num_boxes = boxes.shape[0], boxes.shape[1]
    if batch is None or num_boxes is None:
        raise ValueError(
            f"NMS needs static B and N, got boxes of shape {boxes.shape}")
    boxes = tf.cast(boxes, tf.float32)
    scores = tf.cast(scores, tf.float32)
    candidate = scores > tf.constant(score_threshold, tf.float32)
    if valid is not None:
        candidate = tf.logical_and(candidate, tf.cast(valid, tf.bool))

    def full():
        return _greedy_nms(boxes, scores, candidate, max_output_size,
                           iou_threshold, groups=groups)

    if max_candidates is None or max_candidates >= num_boxes:
        return full()

    def compacted():
        index, index_valid = _compact(candidate, max_candidates)  # [B, P]
        kept, num_valid = _greedy_nms(
            tf.gather(boxes, index, batch_dims=1),  # [B, P, 4]
            tf.gather(scores, index, batch_dims=1),  # [B, P]
            index_valid, max_output_size, iou_threshold,
            groups=None if groups is None else tf.gather(groups, index, batch_dims=1))
        indices = tf.gather(index, tf.maximum(kept, 0), batch_dims=1)
        return tf.where(kept >= 0, indices, -1), num_valid  # [B, K]

    fits = tf.reduce_all(
        tf.reduce_sum(tf.cast(candidate, tf.int32), axis=1) <= max_candidates)
    return tf.cond(fits, compacted, full)


def _gather_padded(values, indices):
    """values [B, N, ...] at indices [B, K] (-1: padded, gives 0)."""
    out = tf.gather(values, tf.maximum(indices, 0), batch_dims=1)  # [B, K, ...]
    mask = tf.reshape(indices >= 0,
                      indices.shape.as_list() + [1] * (values.shape.rank - 2))
    return tf.where(mask, out, tf.zeros([], values.dtype))


@scoped
def batched_nms(boxes, scores, max_output_size, iou_threshold=0.5,
                score_threshold=float("-inf"), valid=None, groups=None):
    """Greedy NMS of every image of a batch at once.

    Equal to `tf.image.non_max_suppression` run on each image (see the
    module docstring for the rule, ties and the algorithm); pinned by
    `tests/ops/test_nms.py` against a NumPy greedy loop, including score ties
    (lower index first) and IoU exactly at the threshold (kept).

    Args:
      boxes: float [B, N, 4] (y1, x1, y2, x2), float32/bfloat16/float16;
        static B and N.
      scores: float [B, N].
      max_output_size: Python int K >= 1, boxes kept at most per image.
      iou_threshold: Python float in [0, 1]; a box is dropped when its IoU
        with a kept box is > this. 0.5 is the R50-FPN default for the box head
        (0.7 for proposals).
      score_threshold: Python float; only `score > score_threshold` are
        candidates. -inf (all boxes) by default, as `tf.image`.
      valid: optional bool [B, N]; False entries are never selected.
      groups: optional int [B, N] (a keyword beyond the contract): boxes of
        different groups never suppress each other, so one call is greedy
        NMS run per image and group, merged in score order (Detectron2's and
        torchvision's `batched_nms(boxes, scores, idxs)`; RetinaNet's
        per-class NMS). Exact, with no coordinate offsets to lose float32
        precision to.

    Returns:
      NmsResult:
        indices: int32 [B, K] into N, kept boxes in descending score order;
          padded slots -1.
        boxes: [B, K, 4] in the dtype of `boxes`; padded slots 0.
        scores: [B, K] in the dtype of `scores`; padded slots 0.
        num_valid: int32 [B], kept boxes per image (<= K).
    """
    _check_args(iou_threshold, max_output_size=max_output_size)
    boxes = tf.convert_to_tensor(boxes)
    scores = tf.convert_to_tensor(scores)
    if groups is not None:
        groups = tf.cast(groups, tf.int32)
    indices, num_valid = _nms_indices(
        boxes, scores, max_output_size, float(iou_threshold),
        float(score_threshold), valid, groups=groups)
    return NmsResult(indices, _gather_padded(boxes, indices),
                     _gather_padded(scores, indices), num_valid)


def _multiclass_one_row(boxes, scores, valid, max_total, iou_threshold,
                        score_threshold):
    """Per-class NMS with every class in one row per image.

    Needs max_per_class >= max_total (no per-class cap can bind).

    Args:
      boxes: [B, N, C, 4] or [B, N, 4]; scores [B, N, C]; valid bool [B, N]
        or None; as `multiclass_nms`.

    Returns:
      (MulticlassNmsResult, exact: bool scalar, whether every image kept
      `max_total` pairs within those visited or had no more candidates).
    """
    batch, num_boxes, num_classes = scores.shape
    num_pairs = num_classes * num_boxes
    # Class-major pairs, so equal scores go to the lower class, then to the
    # lower box index: the order the per-class scheme gives.
    pair_scores = tf.reshape(tf.transpose(scores, [0, 2, 1]), [batch, num_pairs])
    candidate = tf.cast(pair_scores, tf.float32) > tf.constant(score_threshold, tf.float32)
    if valid is not None:
        candidate = tf.logical_and(candidate, tf.tile(tf.cast(valid, tf.bool),
                                                      [1, num_classes]))
    width = min(num_pairs, _round_up(_PAIRS_PER_TOTAL * max_total, _TILE_ALIGN))
    key = tf.where(candidate, tf.cast(pair_scores, tf.float32), float("-inf"))
    pair = tf.math.top_k(key, k=width, sorted=True).indices  # [B, P], stable
    pair_class = pair // num_boxes  # [B, P]
    pair_box = pair % num_boxes
    if boxes.shape.rank == 4:
        top_boxes = tf.gather_nd(boxes, tf.stack([pair_box, pair_class], -1),
                                 batch_dims=1)  # [B, P, 4]
    else:
        top_boxes = tf.gather(boxes, pair_box, batch_dims=1)
    top_scores = tf.gather(pair_scores, pair, batch_dims=1)  # [B, P]
    kept, num_valid = _greedy_nms(
        tf.cast(top_boxes, tf.float32), tf.cast(top_scores, tf.float32),
        tf.gather(candidate, pair, batch_dims=1), max_total, iou_threshold,
        groups=pair_class)  # [B, max_total] into P
    num_candidates = tf.reduce_sum(tf.cast(candidate, tf.int32), axis=1)
    exact = tf.reduce_all(tf.logical_or(num_candidates <= width,
                                        num_valid >= max_total))
    classes = tf.where(kept >= 0, tf.gather(pair_class, tf.maximum(kept, 0),
                                            batch_dims=1), -1)
    return MulticlassNmsResult(_gather_padded(top_boxes, kept),
                               _gather_padded(top_scores, kept), classes,
                               num_valid), exact


@scoped
def multiclass_nms(boxes, scores, max_per_class, max_total, iou_threshold=0.5,
                   score_threshold=0.05, valid=None):
    """Per-class greedy NMS, then the best `max_total` detections per image.

    The result is that of greedy NMS run per image and class, then the
    `max_total` highest scores over all classes in descending order; equal
    scores go to the lower class, then to the one kept first within its
    class. No loop over images or classes runs, by one of two exact schemes:

    - `max_per_class >= max_total` (Mask R-CNN's 100 and 100): each image's
      best `16 * max_total` (class, box) pairs go through the greedy NMS of
      `batched_nms` as one row, boxes of different classes never
      suppressing each other. Visiting in score order, the first
      `max_total` kept are the answer; an image that keeps fewer with more
      candidates left switches the batch to the scheme below.
    - otherwise classes are folded into the batch (`[B * C, N]`), each
      class's candidates packed into a few slots per box it may keep, which
      makes sorting cheap (when a class has more candidates, all are sorted).

    Args:
      boxes: float [B, N, C, 4] class-specific or [B, N, 4] shared
        (y1, x1, y2, x2).
      scores: float [B, N, C]; column c is class c (no background column).
      max_per_class: Python int, boxes kept at most per image and class
        (100 in Mask R-CNN inference).
      max_total: Python int, detections per image (100 for COCO).
      iou_threshold: Python float in [0, 1] (0.5, the R50-FPN test default).
      score_threshold: Python float; only `score > score_threshold` are
        candidates (0.05, Detectron2's `SCORE_THRESH_TEST`).
      valid: optional bool [B, N]; False boxes are never selected.

    Returns:
      MulticlassNmsResult:
        boxes: [B, max_total, 4] in the dtype of `boxes`; padded slots 0.
        scores: [B, max_total] in the dtype of `scores`; padded slots 0.
        classes: int32 [B, max_total], the column of `scores`; padded -1.
        num_valid: int32 [B], detections per image.
    """
    _check_args(iou_threshold, max_per_class=max_per_class,
                max_total=max_total)
    boxes = tf.convert_to_tensor(boxes)
    scores = tf.convert_to_tensor(scores)
    args = (float(iou_threshold), float(score_threshold))
    if max_per_class < max_total:
        return _multiclass_per_class(boxes, scores, valid, max_per_class,
                                     max_total, *args)
    fast, exact = _multiclass_one_row(boxes, scores, valid, max_total, *args)
    return tf.cond(exact, lambda: fast, lambda: _multiclass_per_class(
        boxes, scores, valid, max_per_class, max_total, *args))


def _multiclass_per_class(boxes, scores, valid, max_per_class, max_total,
                          iou_threshold, score_threshold):
    """multiclass_nms with classes folded into the batch: exact in every case."""
    batch, num_boxes, num_classes = scores.shape
    if boxes.shape.rank == 3:
        boxes = tf.broadcast_to(boxes[:, :, None, :],
                                [batch, num_boxes, num_classes, 4])
    # Fold classes into the batch.
    class_boxes = tf.reshape(tf.transpose(boxes, [0, 2, 1, 3]),
                             [batch * num_classes, num_boxes, 4])  # [BC, N, 4]
    class_scores = tf.reshape(tf.transpose(scores, [0, 2, 1]),
                              [batch * num_classes, num_boxes])  # [BC, N]
    class_valid = None
    if valid is not None:
        class_valid = tf.reshape(
            tf.broadcast_to(tf.cast(valid, tf.bool)[:, None, :],
                            [batch, num_classes, num_boxes]),
            [batch * num_classes, num_boxes])  # [BC, N]
    # 1. Per-class NMS, classes folded into the batch.
    kc = max_per_class
    max_candidates = min(num_boxes, _round_up(
        _CANDIDATES_PER_KEPT * kc, _MAX_TILE))
    kept, kept_count = _nms_indices(
        class_boxes, class_scores, kc, float(iou_threshold),
        float(score_threshold), class_valid, max_candidates)  # [BC, Kc]
    # 2. The best max_total over all classes; padded slots sort last.
    kept = tf.reshape(kept, [batch, num_classes * kc])  # [B, C * Kc]
    kept_scores = tf.reshape(
        _gather_padded(class_scores, tf.reshape(kept, [-1, kc])),
        [batch, num_classes * kc])  # [B, C * Kc]
    key = tf.where(kept >= 0, tf.cast(kept_scores, tf.float32), float("-inf"))
    total = min(max_total, num_classes * kc)
    top = tf.math.top_k(key, k=total, sorted=True).indices  # [B, total]
    num_valid = tf.minimum(
        tf.reduce_sum(tf.reshape(kept_count, [batch, num_classes]), axis=1),
        total)
    slot_valid = tf.range(total)[None, :] < num_valid[:, None]  # [B, total]
    index = tf.where(slot_valid, tf.gather(kept, top, batch_dims=1), -1)
    classes = tf.where(slot_valid, top // kc, -1)  # [B, total]
    # 3. Gather boxes and scores of the selected (box, class) pairs.
    out_scores = _gather_padded(kept_scores, tf.where(slot_valid, top, -1))
    flat_boxes = tf.reshape(class_boxes, [batch, num_classes * num_boxes, 4])
    out_boxes = _gather_padded(
        flat_boxes, tf.where(slot_valid, classes * num_boxes + index, -1))
    if total < max_total:
        pad = max_total - total
        out_boxes = tf.pad(out_boxes, [[0, 0], [0, pad], [0, 0]])
        out_scores = tf.pad(out_scores, [[0, 0], [0, pad]])
        classes = tf.pad(classes, [[0, 0], [0, pad]], constant_values=-1)
    return MulticlassNmsResult(out_boxes, out_scores, classes, num_valid)
