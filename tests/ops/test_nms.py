"""Tests for mrcnn.ops.nms against a slow float64 NumPy greedy NMS.

Shape letters: `B` batch, `N` candidate boxes, `K` kept per image, `C`
classes. The reference below is written from docs/OPS_CONTRACT.md (and the
rule of `tf.image.non_max_suppression`): candidates with score > threshold,
descending score, equal scores lower index first, drop when IoU with a kept
box > iou_threshold, at most K kept; empty boxes have IoU 0.
"""

from unittest import mock

import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from mrcnn.ops import nms


# ---------------------------------------------------------------------------
# Slow reference, one box at a time, float64.


def _np_iou(a, b):
    """IoU of two (y1, x1, y2, x2) boxes; 0 when either is empty."""
    inter_h = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
    inter_w = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
    inter = inter_h * inter_w
    area_a = max(a[2] - a[0], 0.0) * max(a[3] - a[1], 0.0)
    area_b = max(b[2] - b[0], 0.0) * max(b[3] - b[1], 0.0)
    union = area_a + area_b - inter
    return inter / union if union > 0 else 0.0


def _np_nms(boxes, scores, k, iou_threshold, score_threshold=-np.inf,
            valid=None, groups=None):
    """Greedy NMS of one image: list of kept indices in kept order; with
    `groups`, a kept box suppresses only boxes of its own group."""
    boxes = np.asarray(boxes, np.float64)
    scores = np.asarray(scores, np.float64)
    threshold = np.float64(np.float32(score_threshold))
    candidates = [i for i in range(len(scores))
                  if scores[i] > threshold and (valid is None or valid[i])]
    candidates.sort(key=lambda i: (-scores[i], i))
    keep = []
    for i in candidates:
        if len(keep) == k:
            break
        if all(_np_iou(boxes[i], boxes[j]) <= iou_threshold for j in keep
               if groups is None or groups[i] == groups[j]):
            keep.append(i)
    return keep


def _np_batched_nms(boxes, scores, k, iou_threshold,
                    score_threshold=-np.inf, valid=None, groups=None):
    """Reference NmsResult as numpy arrays (indices, boxes, scores, count)."""
    batch = boxes.shape[0]
    indices = np.full([batch, k], -1, np.int64)
    out_boxes = np.zeros([batch, k, 4], np.float64)
    out_scores = np.zeros([batch, k], np.float64)
    num_valid = np.zeros([batch], np.int64)
    for b in range(batch):
        keep = _np_nms(boxes[b], scores[b], k, iou_threshold, score_threshold,
                       None if valid is None else valid[b],
                       None if groups is None else groups[b])
        num_valid[b] = len(keep)
        indices[b, :len(keep)] = keep
        out_boxes[b, :len(keep)] = boxes[b][keep]
        out_scores[b, :len(keep)] = scores[b][keep]
    return indices, out_boxes, out_scores, num_valid


def _np_multiclass_nms(boxes, scores, max_per_class, max_total,
                       iou_threshold, score_threshold, valid=None):
    """Reference (boxes, scores, classes, num_valid) of multiclass NMS.

    Ties over classes: lower class, then earlier kept within the class.
    """
    batch, _, num_classes = scores.shape
    out_boxes = np.zeros([batch, max_total, 4], np.float64)
    out_scores = np.zeros([batch, max_total], np.float64)
    classes = np.full([batch, max_total], -1, np.int64)
    num_valid = np.zeros([batch], np.int64)
    for b in range(batch):
        dets = []
        for c in range(num_classes):
            class_boxes = boxes[b, :, c] if boxes.ndim == 4 else boxes[b]
            keep = _np_nms(class_boxes, scores[b, :, c], max_per_class,
                           iou_threshold, score_threshold,
                           None if valid is None else valid[b])
            for rank, i in enumerate(keep):
                dets.append((-float(scores[b, i, c]), c, rank,
                             class_boxes[i]))
        dets.sort(key=lambda d: d[:3])
        dets = dets[:max_total]
        num_valid[b] = len(dets)
        for slot, (neg_score, c, _, box) in enumerate(dets):
            out_boxes[b, slot] = box
            out_scores[b, slot] = -neg_score
            classes[b, slot] = c
    return out_boxes, out_scores, classes, num_valid


def _random_boxes(rng, shape, canvas=200.0, clustered=False):
    """float32 (y1, x1, y2, x2) boxes; `clustered` piles them on 3 centres."""
    shape = tuple(shape)
    if clustered:
        centres = rng.uniform(0.3 * canvas, 0.7 * canvas, size=(3, 2))
        centre = centres[rng.integers(0, 3, size=shape)]
        centre = centre + rng.normal(0.0, 3.0, size=shape + (2,))
    else:
        centre = rng.uniform(0.0, canvas, size=shape + (2,))
    size = rng.uniform(4.0, 60.0, size=shape + (2,))
    return np.concatenate([centre - size / 2, centre + size / 2],
                          axis=-1).astype(np.float32)


# One compiled function per op; tf.function retraces per shape and per Python
# argument, so cases with the same signature share a compilation.
_nms_xla = tf.function(nms.batched_nms, jit_compile=True)
_multiclass_xla = tf.function(nms.multiclass_nms, jit_compile=True)


class BatchedNmsTest(tf.test.TestCase, parameterized.TestCase):

    def _run(self, *args, **kwargs):
        """batched_nms eagerly and under XLA; asserts both agree."""
        eager = nms.batched_nms(*args, **kwargs)
        xla = _nms_xla(*args, **kwargs)
        for name, a, b in zip(eager._fields, eager, xla):
            self.assertAllEqual(a, b, msg=f"eager vs XLA differ in {name}")
        return eager

    def _assert_matches_reference(self, result, boxes, scores, k,
                                  iou_threshold, score_threshold=-np.inf,
                                  valid=None, groups=None):
        indices, ref_boxes, ref_scores, num_valid = _np_batched_nms(
            boxes, scores, k, iou_threshold, score_threshold, valid, groups)
        self.assertAllEqual(result.num_valid, num_valid)
        self.assertAllEqual(result.indices, indices)
        # Gathered values are copied, not computed: exact equality.
        self.assertAllEqual(tf.cast(result.boxes, tf.float64), ref_boxes)
        self.assertAllEqual(tf.cast(result.scores, tf.float64), ref_scores)

    def test_literal(self):
        # Box 1 overlaps box 0 by 81/119 = 0.68 > 0.5 and is dropped; box 2
        # overlaps box 0 by 25/175 = 0.14 and is kept; box 3 is below the
        # score threshold.
        boxes = tf.constant([[[0., 0., 10., 10.],
                              [1., 1., 11., 11.],
                              [5., 5., 15., 15.],
                              [20., 20., 30., 30.]]])
        scores = tf.constant([[0.9, 0.8, 0.7, 0.1]])
        result = self._run(boxes, scores, 3, iou_threshold=0.5,
                           score_threshold=0.2)
        self.assertAllEqual(result.indices, [[0, 2, -1]])
        self.assertAllEqual(result.num_valid, [2])
        self.assertAllEqual(result.scores, np.float32([[0.9, 0.7, 0.0]]))
        self.assertAllEqual(result.boxes, [[[0., 0., 10., 10.],
                                            [5., 5., 15., 15.],
                                            [0., 0., 0., 0.]]])

    @parameterized.named_parameters(
        # N=300 with K=50 runs 6 tiles of 56 (cross-tile suppression);
        # K=400 > N keeps every survivor.
        ("random_k50", False, 50, 0.5, -np.inf),
        ("clustered_k50", True, 50, 0.5, -np.inf),
        ("clustered_k400", True, 400, 0.7, -np.inf),
        ("random_k400_threshold", False, 400, 0.3, 0.5),
        ("clustered_iou0", True, 50, 0.0, 0.2),
    )
    def test_matches_reference(self, clustered, k, iou_threshold,
                               score_threshold):
        rng = np.random.default_rng(1)
        boxes = _random_boxes(rng, (3, 300), clustered=clustered)
        scores = rng.uniform(size=(3, 300)).astype(np.float32)
        result = self._run(tf.constant(boxes), tf.constant(scores), k,
                           iou_threshold, score_threshold)
        self._assert_matches_reference(result, boxes, scores, k,
                                       iou_threshold, score_threshold)

    @parameterized.named_parameters(
        ("k50", 50, -np.inf),
        ("k400_threshold", 400, 0.3),
    )
    def test_groups_suppress_only_within_their_group(self, k, score_threshold):
        # Clustered boxes in 4 groups (RetinaNet's per-class NMS), with ties.
        rng = np.random.default_rng(7)
        boxes = _random_boxes(rng, (2, 300), clustered=True)
        scores = np.round(rng.uniform(size=(2, 300)), 2).astype(np.float32)
        groups = rng.integers(0, 4, size=(2, 300)).astype(np.int32)
        result = self._run(tf.constant(boxes), tf.constant(scores), k, 0.5,
                           score_threshold, groups=tf.constant(groups))
        self._assert_matches_reference(result, boxes, scores, k, 0.5,
                                       score_threshold, groups=groups)
        # Identical boxes of two groups both survive; of one group, one does.
        same = tf.constant([[[0., 0., 10., 10.]] * 3])
        kept = self._run(same, tf.constant([[0.9, 0.8, 0.7]]), 3, 0.5,
                         groups=tf.constant([[0, 1, 0]]))
        self.assertAllEqual(kept.indices, [[0, 1, -1]])

    def test_matches_tf_image_nms(self):
        rng = np.random.default_rng(2)
        boxes = _random_boxes(rng, (4, 500), clustered=True)
        scores = rng.uniform(size=(4, 500)).astype(np.float32)
        result = self._run(tf.constant(boxes), tf.constant(scores), 200, 0.7)
        for b in range(4):
            expected = tf.image.non_max_suppression(
                boxes[b], scores[b], 200, 0.7).numpy()
            self.assertEqual(int(result.num_valid[b]), len(expected))
            self.assertAllEqual(result.indices[b, :len(expected)], expected)

    @parameterized.parameters(32, 512)
    def test_other_tile_bounds_give_the_same_result(self, max_tile):
        # The tile bound only changes how the work is cut (bin/bench --nms_tile):
        # 32 gives many tiles and kept-box chunks, 512 tiles of 512 at K=1000.
        rng = np.random.default_rng(3)
        boxes = tf.constant(_random_boxes(rng, (2, 1500), clustered=True))
        scores = tf.constant(rng.uniform(size=(2, 1500)).astype(np.float32))
        with mock.patch.object(nms, "_MAX_TILE", max_tile):
            eager = nms.batched_nms(boxes, scores, 1000, 0.7)
            xla = tf.function(nms.batched_nms, jit_compile=True)(boxes, scores, 1000, 0.7)
        for b in range(2):
            expected = tf.image.non_max_suppression(boxes[b], scores[b], 1000, 0.7).numpy()
            for result in (eager, xla):
                self.assertEqual(int(result.num_valid[b]), len(expected))
                self.assertAllEqual(result.indices[b, :len(expected)], expected)

    def test_score_ties_keep_lower_index_first(self):
        # All scores equal: disjoint boxes come out in index order; of two
        # identical boxes with equal scores the lower index is kept, as
        # tf.image.non_max_suppression does.
        boxes = np.array([[[0, 0, 5, 5], [10, 10, 15, 15], [0, 0, 5, 5],
                           [20, 20, 25, 25], [10, 10, 15, 15]]], np.float32)
        scores = np.full([1, 5], 0.5, np.float32)
        result = self._run(tf.constant(boxes), tf.constant(scores), 5, 0.5)
        self.assertAllEqual(result.indices, [[0, 1, 3, -1, -1]])
        expected = tf.image.non_max_suppression(boxes[0], scores[0], 5, 0.5)
        self.assertAllEqual(result.indices[0, :3], expected)

    @parameterized.named_parameters(
        ("at_threshold_kept", 0.5, [0, 1]),
        ("above_threshold_dropped", 0.4999, [0, -1]),
    )
    def test_iou_exactly_at_threshold(self, iou_threshold, expected):
        # IoU = 50 / 100 = 0.5 exactly in float32: dropped only when > thr.
        boxes = tf.constant([[[0., 0., 10., 10.], [0., 0., 10., 5.]]])
        scores = tf.constant([[0.9, 0.8]])
        result = self._run(boxes, scores, 2, iou_threshold)
        self.assertAllEqual(result.indices, [expected])

    def test_all_below_score_threshold(self):
        rng = np.random.default_rng(3)
        boxes = tf.constant(_random_boxes(rng, (2, 16)))
        scores = tf.constant(rng.uniform(0.0, 0.5, size=(2, 16)), tf.float32)
        result = self._run(boxes, scores, 8, 0.5, score_threshold=0.5)
        self.assertAllEqual(result.num_valid, [0, 0])
        self.assertAllEqual(result.indices, -np.ones([2, 8]))
        self.assertAllEqual(result.boxes, np.zeros([2, 8, 4]))
        self.assertAllEqual(result.scores, np.zeros([2, 8]))

    def test_k_greater_than_n(self):
        rng = np.random.default_rng(4)
        boxes = _random_boxes(rng, (2, 6), clustered=True)
        scores = rng.uniform(size=(2, 6)).astype(np.float32)
        result = self._run(tf.constant(boxes), tf.constant(scores), 10, 0.5)
        self.assertEqual(result.indices.shape, (2, 10))
        self._assert_matches_reference(result, boxes, scores, 10, 0.5)

    def test_empty_and_degenerate_boxes(self):
        # Zero-area (1, 2), inverted (3) and all-zero (4) boxes have IoU 0:
        # they neither suppress nor get suppressed, even when they coincide
        # with box 0 on an edge or corner.
        boxes = np.array([[[0, 0, 10, 10], [0, 0, 10, 0], [5, 5, 5, 5],
                           [10, 10, 0, 0], [0, 0, 0, 0], [0, 0, 10, 10]]],
                         np.float32)
        scores = np.array([[0.9, 0.95, 0.8, 0.85, 0.7, 0.6]], np.float32)
        result = self._run(tf.constant(boxes), tf.constant(scores), 6, 0.0)
        self.assertAllEqual(result.indices, [[1, 0, 3, 2, 4, -1]])
        self._assert_matches_reference(result, boxes, scores, 6, 0.0)

    def test_valid_mask(self):
        rng = np.random.default_rng(5)
        boxes = _random_boxes(rng, (2, 40), clustered=True)
        scores = rng.uniform(size=(2, 40)).astype(np.float32)
        valid = rng.uniform(size=(2, 40)) < 0.6
        result = self._run(tf.constant(boxes), tf.constant(scores), 20, 0.5,
                           valid=tf.constant(valid))
        self._assert_matches_reference(result, boxes, scores, 20, 0.5,
                                       valid=valid)
        kept = result.indices.numpy()
        self.assertTrue(np.all(valid[np.arange(2)[:, None],
                                     np.maximum(kept, 0)][kept >= 0]))

    def test_padded_rows_change_nothing(self):
        # Appending invalid rows (with high scores) leaves the result as is.
        rng = np.random.default_rng(6)
        boxes = _random_boxes(rng, (2, 30), clustered=True)
        scores = rng.uniform(size=(2, 30)).astype(np.float32)
        valid = np.arange(30)[None, :] < np.array([[20], [30]])
        result = self._run(tf.constant(boxes), tf.constant(scores), 12, 0.5,
                           valid=tf.constant(valid))
        scores_padded = np.where(valid, scores, 2.0).astype(np.float32)
        padded = self._run(tf.constant(boxes), tf.constant(scores_padded), 12,
                           0.5, valid=tf.constant(valid))
        self.assertAllEqual(result.indices, padded.indices)
        reference = _np_batched_nms(boxes[:1, :20], scores[:1, :20], 12, 0.5)
        self.assertAllEqual(result.indices[:1], reference[0])

    def test_single_box(self):
        boxes = tf.constant([[[1., 2., 3., 4.]]])
        scores = tf.constant([[0.3]])
        result = self._run(boxes, scores, 1, 0.5)
        self.assertAllEqual(result.indices, [[0]])
        self.assertAllEqual(result.num_valid, [1])
        self.assertAllEqual(result.boxes, [[[1., 2., 3., 4.]]])

    def test_greedy_properties(self):
        # Kept boxes: descending scores, pairwise IoU <= threshold; every
        # dropped candidate overlaps a kept box of higher (or equal) score.
        rng = np.random.default_rng(7)
        boxes = _random_boxes(rng, (2, 120), clustered=True)
        scores = rng.uniform(size=(2, 120)).astype(np.float32)
        result = self._run(tf.constant(boxes), tf.constant(scores), 120, 0.6)
        for b in range(2):
            kept = result.indices[b, :result.num_valid[b]].numpy()
            self.assertTrue(np.all(np.diff(scores[b][kept]) <= 0))
            for i in range(len(kept)):
                for j in range(i):
                    self.assertLessEqual(
                        _np_iou(boxes[b, kept[i]], boxes[b, kept[j]]), 0.6)
            for i in sorted(set(range(120)) - set(kept.tolist())):
                self.assertTrue(any(
                    _np_iou(boxes[b, i], boxes[b, j]) > 0.6
                    and scores[b, j] >= scores[b, i] for j in kept))

    @parameterized.named_parameters(
        ("bf16", tf.bfloat16),
        ("fp16", tf.float16),
    )
    def test_low_precision_inputs(self, dtype):
        rng = np.random.default_rng(8)
        boxes = tf.cast(_random_boxes(rng, (2, 24), clustered=True), dtype)
        scores = tf.cast(rng.uniform(size=(2, 24)), dtype)  # ties likely
        result = self._run(boxes, scores, 10, 0.5)
        self.assertEqual(result.boxes.dtype, dtype)
        self.assertEqual(result.scores.dtype, dtype)
        self.assertEqual(result.indices.dtype, tf.int32)
        # Geometry in float32 of the (exactly representable) input values.
        self._assert_matches_reference(
            result, tf.cast(boxes, tf.float64).numpy(),
            tf.cast(scores, tf.float64).numpy(), 10, 0.5)

    def test_bad_arguments(self):
        boxes = tf.zeros([1, 2, 4])
        scores = tf.zeros([1, 2])
        with self.assertRaisesRegex(ValueError, "iou_threshold"):
            nms.batched_nms(boxes, scores, 2, iou_threshold=1.5)
        with self.assertRaisesRegex(ValueError, "max_output_size"):
            nms.batched_nms(boxes, scores, 0)


class MulticlassNmsTest(tf.test.TestCase, parameterized.TestCase):

    def _run(self, *args, **kwargs):
        eager = nms.multiclass_nms(*args, **kwargs)
        xla = _multiclass_xla(*args, **kwargs)
        for name, a, b in zip(eager._fields, eager, xla):
            self.assertAllEqual(a, b, msg=f"eager vs XLA differ in {name}")
        return eager

    def _assert_matches_reference(self, result, *args, **kwargs):
        boxes, scores, classes, num_valid = _np_multiclass_nms(*args, **kwargs)
        self.assertAllEqual(result.num_valid, num_valid)
        self.assertAllEqual(result.classes, classes)
        self.assertAllEqual(tf.cast(result.scores, tf.float64), scores)
        self.assertAllEqual(tf.cast(result.boxes, tf.float64), boxes)

    def test_literal(self):
        # Class 0: box 1 (IoU 0.68 with box 0) is dropped. Class 1: box 2
        # only (box 0 is below 0.05). Then the best 3 over both classes.
        boxes = tf.constant([[[0., 0., 10., 10.],
                              [1., 1., 11., 11.],
                              [20., 20., 30., 30.]]])
        scores = tf.constant([[[0.9, 0.01], [0.8, 0.3], [0.2, 0.6]]])
        result = self._run(boxes, scores, 2, 3, iou_threshold=0.5,
                           score_threshold=0.05)
        self.assertAllEqual(result.classes, [[0, 1, 1]])
        self.assertAllEqual(result.scores, np.float32([[0.9, 0.6, 0.3]]))
        self.assertAllEqual(result.boxes, [[[0., 0., 10., 10.],
                                            [20., 20., 30., 30.],
                                            [1., 1., 11., 11.]]])
        self.assertAllEqual(result.num_valid, [3])

    @parameterized.named_parameters(
        # N=160 > 128 packed slots per class: a high score threshold leaves
        # few candidates (packed path), a low one many (full-sort path).
        ("class_specific_few", True, 0.8, 160),
        ("class_specific_many", True, 0.05, 160),
        ("shared_few", False, 0.8, 160),
        ("shared_small_n", False, 0.3, 24),
    )
    def test_matches_reference(self, class_specific, score_threshold, n):
        rng = np.random.default_rng(9)
        shape = (2, n, 3) if class_specific else (2, n)
        boxes = _random_boxes(rng, shape, canvas=100.0, clustered=True)
        scores = rng.uniform(size=(2, n, 3)).astype(np.float32)
        valid = rng.uniform(size=(2, n)) < 0.9
        result = self._run(tf.constant(boxes), tf.constant(scores), 4, 7,
                           0.5, score_threshold, tf.constant(valid))
        self._assert_matches_reference(result, boxes, scores, 4, 7, 0.5,
                                       score_threshold, valid)

    @parameterized.named_parameters(
        # max_per_class >= max_total: all classes in one row per image. N=160,
        # C=3: 480 pairs, of which the best 16 * 7 = 112 are visited first.
        ("class_specific", True, 0.05, 7, False),
        ("class_specific_cap_above_total", True, 0.3, 10, False),
        ("shared", False, 0.05, 7, False),
        ("score_ties", True, 0.05, 7, True),
    )
    def test_one_row_matches_reference(self, class_specific, score_threshold,
                                       max_per_class, ties):
        rng = np.random.default_rng(14)
        shape = (2, 160, 3) if class_specific else (2, 160)
        boxes = _random_boxes(rng, shape, canvas=100.0, clustered=True)
        scores = rng.uniform(size=(2, 160, 3)).astype(np.float32)
        if ties:
            scores = np.round(scores * 4) / 4   # five values: ties everywhere
        valid = rng.uniform(size=(2, 160)) < 0.9
        result = self._run(tf.constant(boxes), tf.constant(scores), max_per_class,
                           7, 0.5, score_threshold, tf.constant(valid))
        self._assert_matches_reference(result, boxes, scores, max_per_class, 7,
                                       0.5, score_threshold, valid)

    def test_one_row_falls_back_when_the_best_pairs_keep_too_few(self):
        # One box repeated 160 times per class: each class keeps one box, so
        # the best 112 pairs give 3 of the 7 asked, with candidates left.
        rng = np.random.default_rng(15)
        boxes = np.broadcast_to(np.float32([10, 10, 50, 60]), (2, 160, 3, 4)).copy()
        boxes[1, :, 2] += 100.0   # image 1, class 2: elsewhere, still one box
        scores = rng.uniform(0.1, 1.0, size=(2, 160, 3)).astype(np.float32)
        scores[0, :, 1] = 0.01    # image 0: class 1 has no candidate
        result = self._run(tf.constant(boxes), tf.constant(scores), 7, 7, 0.5, 0.05)
        self._assert_matches_reference(result, boxes, scores, 7, 7, 0.5, 0.05)
        self.assertAllEqual(result.num_valid, [2, 3])

    def test_matches_combined_nms(self):
        rng = np.random.default_rng(10)
        boxes = _random_boxes(rng, (2, 50, 4), clustered=True)
        scores = rng.uniform(size=(2, 50, 4)).astype(np.float32)
        for per_class, total in ((5, 12), (12, 12)):   # both schemes
            result = self._run(tf.constant(boxes), tf.constant(scores), per_class,
                               total, 0.5, 0.05)
            expected = tf.image.combined_non_max_suppression(
                boxes, scores, per_class, total, 0.5, 0.05, clip_boxes=False)
            self.assertAllEqual(result.num_valid, expected.valid_detections)
            self.assertAllEqual(result.scores, expected.nmsed_scores)
            self.assertAllEqual(tf.cast(result.classes, tf.float32),
                                expected.nmsed_classes)

    def test_nothing_above_threshold(self):
        boxes = tf.constant(_random_boxes(np.random.default_rng(11), (2, 8)))
        scores = tf.fill([2, 8, 3], 0.01)
        for per_class in (4, 5):   # both schemes
            result = self._run(boxes, scores, per_class, 5)
            self.assertAllEqual(result.num_valid, [0, 0])
            self.assertAllEqual(result.classes, -np.ones([2, 5]))
            self.assertAllEqual(result.boxes, np.zeros([2, 5, 4]))
            self.assertAllEqual(result.scores, np.zeros([2, 5]))

    def test_max_total_above_all_slots(self):
        # C * max_per_class = 4 < max_total = 6: two padded slots at the end.
        rng = np.random.default_rng(12)
        boxes = _random_boxes(rng, (1, 10, 2))
        scores = rng.uniform(size=(1, 10, 2)).astype(np.float32)
        result = self._run(tf.constant(boxes), tf.constant(scores), 2, 6,
                           0.5, 0.05)
        self.assertEqual(result.boxes.shape, (1, 6, 4))
        self._assert_matches_reference(result, boxes, scores, 2, 6, 0.5, 0.05)

    @parameterized.named_parameters(
        ("bf16", tf.bfloat16),
        ("fp16", tf.float16),
    )
    def test_low_precision_inputs(self, dtype):
        rng = np.random.default_rng(13)
        boxes = tf.cast(_random_boxes(rng, (1, 12, 2), clustered=True), dtype)
        scores = tf.cast(rng.uniform(size=(1, 12, 2)), dtype)
        for per_class in (3, 5):   # both schemes
            result = self._run(boxes, scores, per_class, 5, 0.5, 0.05)
            self.assertEqual(result.boxes.dtype, dtype)
            self.assertEqual(result.scores.dtype, dtype)
            self._assert_matches_reference(
                result, tf.cast(boxes, tf.float64).numpy(),
                tf.cast(scores, tf.float64).numpy(), per_class, 5, 0.5, 0.05)


if __name__ == "__main__":
    tf.test.main()
