"""mrcnn.ops.targets against float64 NumPy references written from the contract.

The references below loop over one box and one gt at a time and never call
the code under test. Random ops are checked through their properties (exact
counts, never drawing label -1, uniform frequencies over many seeds) and
through determinism: a given seed gives the same result eagerly and under XLA.
"""

import math
import re

import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from mrcnn.ops import anchors as anchor_ops
from mrcnn.ops import targets


# ----------------------------------------------------------------------------
# NumPy references (float64, loops, from docs/OPS_CONTRACT.md).

_TIE_RTOL = 1e-4  # low-quality ties: relative tolerance match_boxes documents

def _ref_iou(a, b):
    """One pair: boxes cover [x1, x2) x [y1, y2); empty boxes give 0."""
    area_a = max(a[2] - a[0], 0.0) * max(a[3] - a[1], 0.0)
    area_b = max(b[2] - b[0], 0.0) * max(b[3] - b[1], 0.0)
    ih = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
    iw = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
    inter = ih * iw
    union = area_a + area_b - inter
    return inter / union if union > 0 else 0.0


def _ref_encode(b, a, w):
    h, wd = b[2] - b[0], b[3] - b[1]
    ha, wa = a[2] - a[0], a[3] - a[1]
    cy, cx = b[0] + h / 2, b[1] + wd / 2
    cya, cxa = a[0] + ha / 2, a[1] + wa / 2
    return [w[0] * (cy - cya) / ha, w[1] * (cx - cxa) / wa,
            w[2] * math.log(h / ha), w[3] * math.log(wd / wa)]


def _ref_match_image(boxes, gt, valid, pos_iou, neg_iou, low_quality):
    """match_boxes for one image, straight from the contract."""
    boxes = np.asarray(boxes, np.float64)
    gt = np.asarray(gt, np.float64)
    n, m = len(boxes), len(gt)
    if not any(valid):
        return [-1] * n, [0] * n
    iou = [[_ref_iou(boxes[i], gt[j]) for j in range(m)] for i in range(n)]
    matched, labels = [], []
    for i in range(n):
        best, best_j = -1.0, -1
        for j in range(m):
            if valid[j] and iou[i][j] > best:  # strict: lowest index on ties
                best, best_j = iou[i][j], j
        matched.append(best_j)
        labels.append(1 if best >= pos_iou else (0 if best < neg_iou else -1))
    if low_quality:
        for j in range(m):  # ascending, so the highest claiming index wins
            if not valid[j]:
                continue
            gt_best = max(iou[i][j] for i in range(n))
            if gt_best <= 0:
                continue
            for i in range(n):
                # "Equals", up to the documented relative 1e-4 that absorbs
                # float32 rounding between geometrically tied boxes.
                if iou[i][j] >= gt_best * (1 - _TIE_RTOL):
                    labels[i], matched[i] = 1, j
    return matched, labels


def _ref_match(boxes, gt, valid, pos_iou, neg_iou, low_quality):
    batch = len(gt)
    if np.ndim(boxes) == 2:
        boxes = [boxes] * batch
    out = [_ref_match_image(boxes[b], gt[b], valid[b], pos_iou, neg_iou,
                            low_quality) for b in range(batch)]
    return (np.array([o[0] for o in out], np.int32),
            np.array([o[1] for o in out], np.int32))


def _random_boxes(rng, shape, canvas=64.0, lo=4.0, hi=40.0):
    c = rng.uniform(-8, canvas + 8, size=shape + (2,))  # some leave the image
    hw = rng.uniform(lo, hi, size=shape + (2,))
    return np.concatenate([c - hw / 2, c + hw / 2], -1).astype(np.float32)


def _jit(fn, **kwargs):
    return tf.function(lambda *args: fn(*args, **kwargs), jit_compile=True)


# ----------------------------------------------------------------------------

class MatchBoxesTest(tf.test.TestCase, parameterized.TestCase):

    def _data(self, shared):
        """3 images: mixed validity + a degenerate gt, half invalid, none valid."""
        rng = np.random.default_rng(7)
        n, m = 60, 6
        boxes = _random_boxes(rng, (n,) if shared else (3, n))
        per_image = np.broadcast_to(boxes, (3, n, 4))
        # Most gt are jittered copies of boxes, so there are positives.
        pick = rng.integers(0, n, size=(3, m))
        gt = np.take_along_axis(per_image, pick[..., None], axis=1)
        gt = (gt + rng.normal(0, 2.0, size=gt.shape)).astype(np.float32)
        gt[0, 1] = [20, 20, 20, 30]  # degenerate (zero height), valid
        gt[1, 0] = per_image[1, 3]  # exact copy of a box, but invalid
        valid = np.ones((3, m), bool)
        valid[1, [0, 2, 4]] = False
        valid[2] = False
        return boxes, gt, valid

    @parameterized.named_parameters(
        ('shared_low_quality', True, True),
        ('shared_plain', True, False),
        ('batched_low_quality', False, True),
        ('batched_plain', False, False))
    def test_matches_reference(self, shared, low_quality):
        boxes, gt, valid = self._data(shared)
        ref_idx, ref_lab = _ref_match(boxes, gt, valid, 0.5, 0.3, low_quality)
        idx, lab = targets.match_boxes(boxes, gt, valid, 0.5, 0.3, low_quality)
        self.assertEqual(idx.dtype, tf.int32)
        self.assertEqual(lab.dtype, tf.int32)
        self.assertAllEqual(idx, ref_idx)
        self.assertAllEqual(lab, ref_lab)
        # The data must exercise all three labels and invalid gt.
        self.assertTrue({-1, 0, 1} <= set(np.unique(ref_lab[:2]).tolist()))
        self.assertNotIn(0, np.asarray(idx)[1])  # invalid gt 0 never matched
        self.assertAllEqual(lab[2], np.zeros(60))  # no valid gt
        self.assertAllEqual(idx[2], -np.ones(60))
        xla_idx, xla_lab = _jit(targets.match_boxes, positive_iou=0.5,
                                negative_iou=0.3,
                                allow_low_quality=low_quality)(boxes, gt, valid)
        self.assertAllEqual(xla_idx, idx)
        self.assertAllEqual(xla_lab, lab)

    def test_literal(self):
        # Anchors 10x10; IoUs typed out by hand (rows: boxes, cols: gt):
        #   box0 [0,0,10,10]:  gt0 1.0,  gt1 0.0
        #   box1 [0,5,10,15]:  gt0 1/3,  gt1 0.0   (50 / 150)
        #   box2 [20,20,30,30]: gt0 0.0, gt1 0.25  (25 / 100: gt1 inside)
        #   box3 [40,40,50,50]: 0, 0
        boxes = np.array([[0, 0, 10, 10], [0, 5, 10, 15], [20, 20, 30, 30],
                          [40, 40, 50, 50]], np.float32)
        gt = np.array([[[0, 0, 10, 10], [22, 22, 27, 27]]], np.float32)
        valid = np.array([[True, True]])
        idx, lab = targets.match_boxes(boxes, gt, valid, 0.7, 0.3, False)
        self.assertAllEqual(idx, [[0, 0, 1, 0]])
        self.assertAllEqual(lab, [[1, -1, 0, 0]])
        # Low quality: gt1's best IoU (0.25 at box2) makes box2 positive.
        idx, lab = targets.match_boxes(boxes, gt, valid, 0.7, 0.3, True)
        self.assertAllEqual(idx, [[0, 0, 1, 0]])
        self.assertAllEqual(lab, [[1, -1, 1, 0]])

    def test_iou_exactly_at_thresholds(self):
        box = np.array([[0, 0, 10, 10]], np.float32)
        # gt of width 7, 3, 2.9 inside the box: IoU 0.7, 0.3, 0.29.
        for width, expected in ((7, 1), (3, -1), (2.9, 0), (6.9, -1)):
            gt = np.array([[[0, 0, 10, width]]], np.float32)
            _, lab = targets.match_boxes(box, gt, [[True]], 0.7, 0.3, False)
            self.assertAllEqual(lab, [[expected]], msg=f"width {width}")

    def test_argmax_tie_takes_lowest_gt_index(self):
        # box0 has IoU 0.5 with gt1 and gt2 (both halves of it); gt0 misses.
        boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 5], [0, 5, 10, 10]],
                         np.float32)
        gt = np.array([[[50, 50, 60, 60], [0, 0, 10, 5], [0, 5, 10, 10]]],
                      np.float32)
        idx, lab = targets.match_boxes(boxes, gt, [[True] * 3], 0.7, 0.3, True)
        self.assertAllEqual(idx, [[1, 1, 2]])
        self.assertAllEqual(lab, [[-1, 1, 1]])

    def test_low_quality_claim_by_two_gt_takes_highest_index(self):
        # The only box has IoU 0.5 with both gt: both claim it, gt1 wins.
        boxes = np.array([[0, 0, 10, 10]], np.float32)
        gt = np.array([[[0, 0, 10, 5], [0, 5, 10, 10]]], np.float32)
        idx, lab = targets.match_boxes(boxes, gt, [[True, True]], 0.7, 0.3,
                                       True)
        self.assertAllEqual(idx, [[1]])
        self.assertAllEqual(lab, [[1]])
        idx, lab = targets.match_boxes(boxes, gt, [[True, True]], 0.7, 0.3,
                                       False)
        self.assertAllEqual(idx, [[0]])
        self.assertAllEqual(lab, [[-1]])

    def test_low_quality_ties_over_boxes_all_positive(self):
        # gt [0,0,10,10] has IoU 0.25 with two boxes: both become positive.
        boxes = np.array([[0, 0, 10, 40], [0, 0, 40, 10], [0, 0, 10, 50]],
                         np.float32)
        gt = np.array([[[0, 0, 10, 10]]], np.float32)
        idx, lab = targets.match_boxes(boxes, gt, [[True]], 0.7, 0.3, True)
        self.assertAllEqual(idx, [[0, 0, 0]])
        self.assertAllEqual(lab, [[1, 1, 0]])

    def test_low_quality_tie_tolerance(self):
        # gt best IoU 0.5 (box0). box1 is 5e-5 below it (relative), within
        # the 1e-4 tie tolerance; box2 is 5e-4 below, outside it.
        boxes = np.array([[0, 0, 10, 20], [0, 0, 10, 20.001],
                          [0, 0, 10, 20.01]], np.float32)
        gt = np.array([[[0, 0, 10, 10]]], np.float32)
        _, lab = targets.match_boxes(boxes, gt, [[True]], 0.7, 0.3, True)
        self.assertAllEqual(lab, [[1, 1, -1]])

    def test_anchor_grid_eager_xla_reference(self):
        # Real anchors hold many ties that exact arithmetic makes equal and
        # float32 rounding does not: eager, XLA and the reference must agree.
        levels = anchor_ops.multilevel_anchors((128, 128))
        anchors = tf.concat([levels[l] for l in sorted(levels)], 0).numpy()
        rng = np.random.default_rng(5)
        gt = _random_boxes(rng, (2, 4), canvas=128.0, lo=6.0, hi=100.0)
        gt[0, 0] = [8, 8, 40, 40]  # aligned with the grid: many ties
        valid = np.ones((2, 4), bool)
        ref_idx, ref_lab = _ref_match(anchors, gt, valid, 0.7, 0.3, True)
        idx, lab = targets.match_boxes(anchors, gt, valid, 0.7, 0.3)
        xla_idx, xla_lab = _jit(targets.match_boxes, positive_iou=0.7,
                                negative_iou=0.3)(anchors, gt, valid)
        self.assertAllEqual(idx, ref_idx)
        self.assertAllEqual(lab, ref_lab)
        self.assertAllEqual(xla_idx, idx)
        self.assertAllEqual(xla_lab, lab)

    def test_degenerate_and_invalid_gt(self):
        boxes = np.array([[0, 0, 10, 10], [20, 20, 30, 30]], np.float32)
        # gt0 empty but valid; gt1 matches box0 exactly but is invalid.
        gt = np.array([[[5, 5, 5, 9], [0, 0, 10, 10]]], np.float32)
        idx, lab = targets.match_boxes(boxes, gt, [[True, False]], 0.7, 0.3,
                                       True)
        self.assertAllEqual(idx, [[0, 0]])  # the only valid gt, IoU 0
        self.assertAllEqual(lab, [[0, 0]])

    @parameterized.named_parameters(('zero_gt', 0), ('all_padding', 3))
    def test_no_valid_gt(self, num_gt):
        boxes = np.array([[0, 0, 10, 10], [20, 20, 30, 30]], np.float32)
        gt = np.tile(np.array([[[0, 0, 10, 10]]], np.float32), (2, num_gt, 1))
        idx, lab = targets.match_boxes(boxes, gt.reshape(2, num_gt, 4),
                                       np.zeros((2, num_gt), bool), 0.7, 0.3)
        self.assertAllEqual(idx, -np.ones((2, 2)))
        self.assertAllEqual(lab, np.zeros((2, 2)))

    @parameterized.named_parameters(('fp16', tf.float16), ('bf16', tf.bfloat16))
    def test_low_precision_inputs(self, dtype):
        boxes = tf.constant([[0, 0, 16, 16], [0, 8, 16, 24]], dtype)
        gt = tf.constant([[[0, 0, 16, 16]]], dtype)
        idx, lab = targets.match_boxes(boxes, gt, [[True]], 0.7, 0.3)
        self.assertAllEqual(idx, [[0, 0]])
        self.assertAllEqual(lab, [[1, -1]])  # IoU 1 and 1/3


    def test_xla_keeps_no_pairwise_iou(self):
        """Compiled, the only [B, N, M]-sized buffers are the ones each
        reduction reads: at most 12 bytes per (box, gt) pair in all (an IoU
        shared by both reductions kept 16: IoU, masked IoU, int64 key), the
        [B, N, M] matching memory of an LVIS image with 300 gt."""
        b, n, m = 2, 1031, 37
        rng = np.random.default_rng(3)
        boxes = _random_boxes(rng, (n,), canvas=256.0)
        gt = _random_boxes(rng, (b, m), canvas=256.0)
        fn = _jit(targets.match_boxes, positive_iou=0.7, negative_iou=0.3)
        hlo = fn.experimental_get_compiler_ir(
            boxes, gt, np.ones((b, m), bool))(stage='optimized_hlo')
        entry = hlo[hlo.index('ENTRY'):]
        sizes = {'f32': 4, 's32': 4, 's64': 8, 'pred': 1, 'u32': 4}
        pairwise = [sizes[t] for t, dims in re.findall(
            r'= (\w+)\[([\d,]+)\]', entry)
                    if sorted(map(int, dims.split(','))) == sorted((b, n, m))]
        self.assertNotEmpty(pairwise)  # XLA:CPU keeps a reduction's input
        self.assertLessEqual(sum(pairwise), 12, pairwise)


class SampleBalancedTest(tf.test.TestCase, parameterized.TestCase):

    # Rows of one batch: (#positives, #negatives), rest ignored; N = 40.
    _CONFIGS = [(0, 0), (0, 40), (40, 0), (2, 30), (30, 2), (8, 8), (3, 4),
                (20, 20), (1, 39), (5, 0)]

    def _labels(self, seed=0):
        rng = np.random.default_rng(seed)
        rows = []
        for n_pos, n_neg in self._CONFIGS:
            row = np.array([1] * n_pos + [0] * n_neg + [-1] * (40 - n_pos - n_neg))
            rows.append(rng.permutation(row))
        return np.array(rows, np.int32)

    def _check_counts(self, labels, selected, num_samples, fraction):
        selected = np.asarray(selected)
        self.assertEqual(selected.dtype, bool)
        for row, sel in zip(labels, selected):
            n_pos, n_neg = np.sum(row == 1), np.sum(row == 0)
            pos_taken = min(int(num_samples * fraction), n_pos)
            self.assertFalse(np.any(sel & (row == -1)))
            self.assertEqual(np.sum(sel & (row == 1)), pos_taken)
            self.assertEqual(np.sum(sel), min(num_samples, pos_taken + n_neg))

    @parameterized.named_parameters(
        ('s8_half', 8, 0.5), ('s16_quarter', 16, 0.25), ('s5_odd', 5, 0.5),
        ('s64_more_than_n', 64, 0.5), ('no_positives', 10, 0.0),
        ('all_positive', 10, 1.0), ('s1', 1, 0.5))
    def test_exact_counts(self, num_samples, fraction):
        for seed in range(3):
            labels = self._labels(seed)
            sel = targets.sample_balanced(labels, num_samples, fraction,
                                          seed=seed)
            self._check_counts(labels, sel, num_samples, fraction)

    def test_xla_equals_eager_for_a_seed(self):
        labels = self._labels()
        fn = tf.function(lambda l, s: targets.sample_balanced(l, 8, 0.5, s),
                         jit_compile=True)
        for seed in (0, 12345, -3, 2**40 + 1):
            eager = targets.sample_balanced(labels, 8, 0.5, seed=seed)
            self.assertAllEqual(fn(labels, tf.constant(seed, tf.int64)), eager)
            self._check_counts(labels, eager, 8, 0.5)
        # Python-int seed inside XLA too.
        xla = _jit(targets.sample_balanced, num_samples=8,
                   positive_fraction=0.5, seed=5)(labels)
        self.assertAllEqual(xla, targets.sample_balanced(labels, 8, 0.5, 5))

    def test_seeds(self):
        labels = self._labels()
        a = targets.sample_balanced(labels, 8, 0.5, seed=1)
        self.assertAllEqual(a, targets.sample_balanced(labels, 8, 0.5, seed=1))
        self.assertNotAllEqual(a, targets.sample_balanced(labels, 8, 0.5, seed=2))
        # seed=None: fresh draws, still exact counts, eager and XLA.
        b = targets.sample_balanced(labels, 8, 0.5)
        c = targets.sample_balanced(labels, 8, 0.5)
        self.assertNotAllEqual(b, c)
        fn = _jit(targets.sample_balanced, num_samples=8, positive_fraction=0.5)
        d, e = fn(labels), fn(labels)
        self.assertNotAllEqual(d, e)
        for sel in (b, c, d, e):
            self._check_counts(labels, sel, 8, 0.5)

    def test_uniform_over_positions(self):
        # 400 draws (20 seeds x 20 images) of 4 positives out of 10 and 6
        # negatives out of 20 (10 ignored): each positive is taken with
        # probability 0.4, each negative 0.3. Binomial std over 400 draws is
        # ~9.8 / ~9.2; the bounds are 6 std per position and a chi-square
        # whose 1e-6 upper quantile (29 and 19 dof) lies below the bound.
        row = np.array([1] * 10 + [0] * 20 + [-1] * 10, np.int32)
        labels = np.tile(row, (20, 1))
        counts = np.zeros(40)
        for seed in range(20):
            sel = targets.sample_balanced(labels, 10, 0.4, seed=seed).numpy()
            counts += sel.sum(0)
        self.assertAllEqual(counts[30:], np.zeros(10))
        for lo, hi, p in ((0, 10, 0.4), (10, 30, 0.3)):
            expected = 400 * p
            std = math.sqrt(400 * p * (1 - p))
            self.assertLess(np.max(np.abs(counts[lo:hi] - expected)), 6 * std)
            chi2 = np.sum((counts[lo:hi] - expected) ** 2 / (expected * (1 - p)))
            self.assertLess(chi2, 60.0)

    def test_one_box(self):
        for label, expected in ((1, True), (0, True), (-1, False)):
            sel = targets.sample_balanced(np.array([[label]], np.int32), 4,
                                          0.5, seed=0)
            self.assertAllEqual(sel, [[expected]])

    def test_literal(self):
        # Quota 2 positives; 3 positives exist, 1 negative: 3 selected.
        labels = np.array([[1, -1, 1, 0, 1, -1]], np.int32)
        sel = targets.sample_balanced(labels, 4, 0.5, seed=0).numpy()[0]
        self.assertEqual(sel[[0, 2, 4]].sum(), 2)
        self.assertTrue(sel[3])
        self.assertFalse(sel[1] or sel[5])

    def test_bad_fraction(self):
        with self.assertRaisesRegex(ValueError, "positive_fraction"):
            targets.sample_balanced(np.zeros((1, 4), np.int32), 2, 1.5)


class RpnTargetsTest(tf.test.TestCase, parameterized.TestCase):

    def _data(self):
        anchors = anchor_ops.multilevel_anchors(
            (64, 64), min_level=3, max_level=5, sizes=(16, 32, 64))
        anchors = tf.concat([anchors[l] for l in (3, 4, 5)], 0).numpy()
        rng = np.random.default_rng(3)
        gt = _random_boxes(rng, (3, 5), lo=10, hi=48)
        gt[0, 0] = anchors[5] + [1, -1, 1, 2]  # a close match
        valid = np.ones((3, 5), bool)
        valid[0, 4] = False
        valid[2] = False  # image without gt
        return anchors, gt, valid

    def test_against_reference(self):
        anchors, gt, valid = self._data()
        n = len(anchors)  # 64 + 16 + 4 cells, 3 anchors each = 252
        out = targets.rpn_targets(anchors, gt, valid, num_samples=32, seed=4)
        self.assertIsInstance(out, targets.RpnTargets)
        labels, deltas, idx = (np.asarray(t) for t in out)
        self.assertEqual(labels.shape, (3, n))
        self.assertEqual(deltas.shape, (3, n, 4))
        self.assertEqual(out.box_targets.dtype, tf.float32)
        ref_idx, ref_lab = _ref_match(anchors, gt, valid, 0.7, 0.3, True)
        self.assertAllEqual(idx, ref_idx)
        for b in range(3):
            sampled = labels[b] != -1
            self.assertAllEqual(labels[b][sampled], ref_lab[b][sampled])
            pos_taken = min(16, np.sum(ref_lab[b] == 1))
            self.assertEqual(np.sum(labels[b] == 1), pos_taken)
            self.assertEqual(np.sum(sampled),
                             min(32, pos_taken + np.sum(ref_lab[b] == 0)))
            for i in range(n):
                if labels[b, i] == 1:
                    ref = _ref_encode(gt[b, ref_idx[b, i]].astype(np.float64),
                                      anchors[i].astype(np.float64), (1, 1, 1, 1))
                    self.assertAllClose(deltas[b, i], ref, atol=1e-5)
                else:
                    self.assertAllEqual(deltas[b, i], np.zeros(4))
        self.assertGreater(np.sum(labels[:2] == 1), 0)
        self.assertAllEqual(idx[2], -np.ones(n))
        self.assertTrue(np.all(labels[2] <= 0))
        self.assertEqual(np.sum(labels[2] == 0), 32)
        # XLA, same seed: identical.
        xla = _jit(targets.rpn_targets, num_samples=32, seed=4)(anchors, gt,
                                                                 valid)
        self.assertAllEqual(xla.labels, labels)
        self.assertAllEqual(xla.matched_index, idx)
        self.assertAllClose(xla.box_targets, deltas, atol=1e-6)

    def test_zero_gt_slots(self):
        anchors, _, _ = self._data()
        out = targets.rpn_targets(anchors, np.zeros((2, 0, 4), np.float32),
                                  np.zeros((2, 0), bool), num_samples=16,
                                  seed=0)
        self.assertAllEqual(out.matched_index, -np.ones((2, len(anchors))))
        self.assertAllEqual(np.sum(out.labels.numpy() == 0, axis=1), [16, 16])
        self.assertAllEqual(np.sum(out.labels.numpy() == 1), 0)
        self.assertAllEqual(out.box_targets, np.zeros((2, len(anchors), 4)))

    def test_batched_anchors_and_fp16(self):
        anchors, gt, valid = self._data()
        shared = targets.rpn_targets(anchors, gt, valid, seed=1)
        batched = targets.rpn_targets(np.broadcast_to(anchors, (3,) + anchors.shape),
                                      gt, valid, seed=1)
        for a, b in zip(shared, batched):
            self.assertAllEqual(a, b)
        half = targets.rpn_targets(tf.constant(anchors, tf.float16),
                                   tf.constant(gt[:, :1], tf.float16),
                                   valid[:, :1], seed=1)
        self.assertEqual(half.box_targets.dtype, tf.float32)
        self.assertTrue(np.all(np.isfinite(half.box_targets.numpy())))


class AnchorTargetsTest(tf.test.TestCase):
    """RetinaNet's targets: every anchor labelled (IoU 0.5 / 0.4), none sampled."""

    def _data(self):
        anchors = anchor_ops.multilevel_anchors(
            (64, 64), min_level=3, max_level=5, sizes=(16, 32, 64),
            scales_per_octave=3)
        anchors = tf.concat([anchors[l] for l in (3, 4, 5)], 0).numpy()
        rng = np.random.default_rng(5)
        gt = _random_boxes(rng, (3, 5), lo=10, hi=48)
        gt[0, 0] = anchors[7] + [1, -1, 1, 2]  # a close match
        gt[1, 1] = [70, 70, 90, 90]  # outside the image: low-quality only
        gt[1, 2] = [20, 20, 20, 30]  # empty: never matched
        valid = np.ones((3, 5), bool)
        valid[0, 4] = False
        valid[2] = False  # image without gt
        classes = rng.integers(1, 5, size=(3, 5)).astype(np.int32)
        return anchors, gt, classes, valid

    def _check(self, out, anchors, gt, classes, valid, pos_iou, neg_iou, low_quality):
        ref_idx, ref_lab = _ref_match(anchors, gt, valid, pos_iou, neg_iou, low_quality)
        self.assertAllEqual(out.matched_index, ref_idx)
        self.assertAllEqual(out.labels, ref_lab)
        for b in range(len(gt)):
            for i in range(len(anchors)):
                label = ref_lab[b, i]
                want = classes[b, ref_idx[b, i]] if label == 1 else label  # 0 or -1
                self.assertEqual(out.classes[b, i], want, msg=(b, i))
                if label == 1:
                    ref = _ref_encode(gt[b, ref_idx[b, i]].astype(np.float64),
                                      anchors[i].astype(np.float64), (1, 1, 1, 1))
                    self.assertAllClose(out.box_targets[b, i], ref, atol=1e-5)
                else:
                    self.assertAllEqual(out.box_targets[b, i], np.zeros(4))

    def test_against_reference_eager_and_xla(self):
        anchors, gt, classes, valid = self._data()
        out = targets.anchor_targets(anchors, gt, classes, valid)
        self.assertIsInstance(out, targets.AnchorTargets)
        self.assertEqual(out.classes.dtype, tf.int32)
        self._check(out, anchors, gt, classes, valid, 0.5, 0.4, True)
        labels = out.labels.numpy()
        self.assertGreater(np.sum(labels == -1), 0)  # the 0.4-0.5 band is ignored
        self.assertGreater(np.sum(labels[1] == 1), 0)
        self.assertAllEqual(labels[2], np.zeros(len(anchors)))  # no gt: background
        xla = _jit(targets.anchor_targets)(anchors, gt, classes, valid)
        for name, a, b in zip(out._fields, out, xla):
            self.assertAllClose(a, b, atol=1e-6, msg=name)

    def test_other_thresholds_and_no_low_quality(self):
        anchors, gt, classes, valid = self._data()
        out = targets.anchor_targets(anchors, gt, classes, valid, positive_iou=0.6,
                                     negative_iou=0.3, allow_low_quality=False)
        self._check(out, anchors, gt, classes, valid, 0.6, 0.3, False)

    def test_zero_gt_slots_and_fp16(self):
        anchors, gt, classes, valid = self._data()
        out = targets.anchor_targets(anchors, np.zeros((2, 0, 4), np.float32),
                                     np.zeros((2, 0), np.int32), np.zeros((2, 0), bool))
        self.assertAllEqual(out.labels, np.zeros((2, len(anchors))))
        self.assertAllEqual(out.classes, np.zeros((2, len(anchors))))
        self.assertAllEqual(out.matched_index, -np.ones((2, len(anchors))))
        half = targets.anchor_targets(tf.constant(anchors, tf.float16),
                                      tf.constant(gt, tf.float16), classes, valid)
        self.assertEqual(half.box_targets.dtype, tf.float32)
        self.assertTrue(np.all(np.isfinite(half.box_targets.numpy())))


class SampleProposalsTest(tf.test.TestCase, parameterized.TestCase):

    def _data(self):
        rng = np.random.default_rng(11)
        b, p, m = 2, 40, 4
        gt = _random_boxes(rng, (b, m), lo=10, hi=40)
        # Half the proposals jitter around gt boxes, half are random.
        near = np.repeat(gt, p // (2 * m), axis=1)
        near = near + rng.normal(0, 3.0, size=near.shape)
        proposals = np.concatenate(
            [near, _random_boxes(rng, (b, p // 2))], 1).astype(np.float32)
        proposal_valid = np.ones((b, p), bool)
        proposal_valid[:, -5:] = False  # padding
        proposals[:, -5:] = gt[:, :1]  # would be positive if ever drawn
        gt_classes = rng.integers(1, 6, size=(b, m)).astype(np.int32)
        gt_valid = np.ones((b, m), bool)
        gt_valid[1, 3] = False
        return proposals, proposal_valid, gt, gt_classes, gt_valid

    def _reference_labels(self, proposals, proposal_valid, gt, gt_valid,
                          append_gt):
        cands = np.concatenate([proposals, gt], 1) if append_gt else proposals
        cvalid = (np.concatenate([proposal_valid, gt_valid], 1) if append_gt
                  else proposal_valid)
        idx, lab = _ref_match(cands, gt, gt_valid, 0.5, 0.5, False)
        lab = np.where(cvalid, lab, -1)
        return cands, idx, lab

    def _check(self, out, inputs, num_samples, fraction, append_gt,
               weights=(10.0, 10.0, 5.0, 5.0)):
        proposals, proposal_valid, gt, gt_classes, gt_valid = inputs
        cands, ref_idx, ref_lab = self._reference_labels(
            proposals, proposal_valid, gt, gt_valid, append_gt)
        rois, classes, deltas, idx, valid = (np.asarray(t) for t in out)
        batch = len(gt)
        self.assertEqual(rois.shape, (batch, num_samples, 4))
        self.assertEqual(deltas.shape, (batch, num_samples, 4))
        for t in (classes, idx, valid):
            self.assertEqual(t.shape, (batch, num_samples))
        quota = int(num_samples * fraction)
        for b in range(batch):
            n_pos = min(quota, np.sum(ref_lab[b] == 1))
            n_sel = min(num_samples, n_pos + np.sum(ref_lab[b] == 0))
            # Slot order: positives, negatives, padding.
            self.assertAllEqual(valid[b], np.arange(num_samples) < n_sel)
            is_pos = classes[b] > 0
            self.assertAllEqual(is_pos, np.arange(num_samples) < n_pos)
            self.assertAllEqual(classes[b, n_pos:n_sel], np.zeros(n_sel - n_pos))
            # Padding.
            self.assertAllEqual(classes[b, n_sel:], -np.ones(num_samples - n_sel))
            self.assertAllEqual(idx[b, n_pos:], -np.ones(num_samples - n_pos))
            self.assertAllEqual(rois[b, n_sel:], np.zeros((num_samples - n_sel, 4)))
            self.assertAllEqual(deltas[b, n_pos:], np.zeros((num_samples - n_pos, 4)))
            # Each sampled slot is a distinct candidate of the right label.
            used = set()
            for s in range(n_sel):
                hits = np.flatnonzero(np.all(cands[b] == rois[b, s], axis=1)
                                      & (ref_lab[b] != -1))
                self.assertNotEmpty(hits, msg=f"image {b} slot {s}")
                c = hits[0]
                used.add(c)
                self.assertEqual(ref_lab[b, c], 1 if s < n_pos else 0)
                if s < n_pos:
                    j = ref_idx[b, c]
                    self.assertEqual(idx[b, s], j)
                    self.assertEqual(classes[b, s], gt_classes[b, j])
                    ref = _ref_encode(gt[b, j].astype(np.float64),
                                      rois[b, s].astype(np.float64), weights)
                    self.assertAllClose(deltas[b, s], ref, atol=1e-4)
            self.assertLen(used, n_sel)

    @parameterized.named_parameters(
        ('append_gt', True, 16, 0.25), ('no_append', False, 16, 0.25),
        ('more_slots_than_candidates', True, 64, 0.5),
        ('no_append_padded', False, 48, 0.25))
    def test_against_reference(self, append_gt, num_samples, fraction):
        inputs = self._data()
        out = targets.sample_proposals(*inputs, num_samples=num_samples,
                                       positive_fraction=fraction,
                                       append_gt=append_gt, seed=2)
        self.assertIsInstance(out, targets.ProposalTargets)
        self.assertEqual(out.rois.dtype, tf.float32)
        self.assertEqual(out.classes.dtype, tf.int32)
        self.assertEqual(out.matched_index.dtype, tf.int32)
        self.assertEqual(out.valid.dtype, tf.bool)
        self._check(out, inputs, num_samples, fraction, append_gt)

    def test_xla_equals_eager(self):
        inputs = self._data()
        eager = targets.sample_proposals(*inputs, num_samples=16, seed=9)
        xla = _jit(targets.sample_proposals, num_samples=16, seed=9)(*inputs)
        for a, b in zip(eager, xla):
            self.assertAllClose(a, b, atol=1e-6)

    def test_slot_order(self):
        # Many positives: the quota fills exactly the first slots.
        inputs = self._data()
        out = targets.sample_proposals(*inputs, num_samples=8,
                                       positive_fraction=0.25, seed=0)
        self.assertAllEqual(out.classes[:, :2] > 0, np.ones((2, 2), bool))
        self.assertAllEqual(out.classes[:, 2:], np.zeros((2, 6)))
        self._check(out, inputs, 8, 0.25, True)

    def test_gt_only_and_no_gt(self):
        proposals, _, gt, gt_classes, gt_valid = self._data()
        no_props = np.zeros(proposals.shape[:2], bool)
        out = targets.sample_proposals(proposals, no_props, gt, gt_classes,
                                       gt_valid, num_samples=8,
                                       positive_fraction=1.0, seed=0)
        # Only the valid gt boxes are candidates, each its own positive match,
        # in gt order, with zero deltas.
        self.assertAllEqual(out.valid, [[True] * 4 + [False] * 4,
                                        [True] * 3 + [False] * 5])
        self.assertAllEqual(out.matched_index[0, :4], [0, 1, 2, 3])
        self.assertAllEqual(out.classes[0, :4], gt_classes[0])
        self.assertAllEqual(out.classes[1], list(gt_classes[1, :3]) + [-1] * 5)
        self.assertAllEqual(out.rois[0, :4], gt[0])
        self.assertAllClose(out.box_targets, np.zeros((2, 8, 4)))
        # No valid gt anywhere: everything drawn is background.
        out = targets.sample_proposals(proposals, np.ones_like(no_props), gt,
                                       gt_classes, np.zeros_like(gt_valid),
                                       num_samples=8, seed=0)
        self.assertAllEqual(out.classes, np.zeros((2, 8)))
        self.assertAllEqual(out.matched_index, -np.ones((2, 8)))
        self.assertAllEqual(out.valid, np.ones((2, 8), bool))

    def test_zero_gt_slots(self):
        proposals, pvalid, _, _, _ = self._data()
        out = targets.sample_proposals(
            proposals, pvalid, np.zeros((2, 0, 4), np.float32),
            np.zeros((2, 0), np.int32), np.zeros((2, 0), bool),
            num_samples=64, seed=0)
        n_valid = int(pvalid[0].sum())  # 35 background, then padding
        self.assertAllEqual(out.valid, np.tile(np.arange(64) < n_valid, (2, 1)))
        self.assertAllEqual(out.classes,
                            np.tile(np.where(np.arange(64) < n_valid, 0, -1),
                                    (2, 1)))
        self.assertAllEqual(out.matched_index, -np.ones((2, 64)))

    def test_fp16_inputs(self):
        proposals, pvalid, gt, gt_classes, gt_valid = self._data()
        out = targets.sample_proposals(
            tf.constant(proposals, tf.float16), pvalid,
            tf.constant(gt, tf.float16), gt_classes, gt_valid,
            num_samples=16, seed=1)
        self.assertEqual(out.rois.dtype, tf.float32)
        self.assertEqual(out.box_targets.dtype, tf.float32)
        self.assertTrue(np.all(np.isfinite(out.box_targets.numpy())))


if __name__ == "__main__":
    tf.test.main()
