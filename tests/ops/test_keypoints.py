"""mrcnn.ops.keypoints against float64 NumPy references written from the
module's contract (one roi and one keypoint at a time), eagerly and under XLA.
Shape letters as in the module: B, N, M, K, S."""

import math

import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from mrcnn.ops import keypoints as keypoint_ops


def targets_reference(rois, gt_keypoints, matched_index, size):
    """(indices int64 [B, N, K], valid bool [B, N, K]) in float64."""
    rois = np.asarray(rois, np.float64)
    gt_keypoints = np.asarray(gt_keypoints, np.float64)
    batch, num = matched_index.shape
    k_count = gt_keypoints.shape[2]
    indices = np.zeros((batch, num, k_count), np.int64)
    valid = np.zeros((batch, num, k_count), bool)
    for b in range(batch):
        for n in range(num):
            m = matched_index[b, n]
            y1, x1, y2, x2 = rois[b, n]
            if m < 0 or y2 - y1 <= 0 or x2 - x1 <= 0:
                continue
            for k in range(k_count):
                y, x, v = gt_keypoints[b, m, k]
                if v <= 0:
                    continue
                row = size - 1 if y == y2 else math.floor((y - y1) * size / (y2 - y1))
                col = size - 1 if x == x2 else math.floor((x - x1) * size / (x2 - x1))
                if 0 <= row < size and 0 <= col < size:
                    valid[b, n, k] = True
                    indices[b, n, k] = row * size + col
    return indices, valid


def decode_reference(heatmaps, boxes):
    """float64 [B, N, K, 3] (y, x, score)."""
    heatmaps = np.asarray(heatmaps, np.float64)
    boxes = np.asarray(boxes, np.float64)
    batch, num, k_count, sy, sx = heatmaps.shape
    out = np.zeros((batch, num, k_count, 3))
    for b in range(batch):
        for n in range(num):
            y1, x1, y2, x2 = boxes[b, n]
            h, w = max(y2 - y1, 1.0), max(x2 - x1, 1.0)
            for k in range(k_count):
                m = heatmaps[b, n, k]
                best = m.max()
                first = int(np.flatnonzero(m.ravel() == best)[0])
                r, c = divmod(first, sx)

                def refine(before, after):
                    curv = before - 2 * best + after
                    return 0.0 if curv == 0 else (before - after) / (2 * curv)

                dy = refine(m[r - 1, c], m[r + 1, c]) if 0 < r < sy - 1 else 0.0
                dx = refine(m[r, c - 1], m[r, c + 1]) if 0 < c < sx - 1 else 0.0
                out[b, n, k] = (y1 + (r + 0.5 + dy) * h / sy,
                                x1 + (c + 0.5 + dx) * w / sx,
                                1.0 / np.exp(m - best).sum())
    return out


def _away_from_cell_edges(rng, lo, hi, size, count):
    """Floats in [lo, hi) whose position in `size` cells over [lo, hi) is
    at least 0.01 cell from an edge: float32 and float64 agree on the cell."""
    cells = rng.integers(0, size, count) + rng.uniform(0.01, 0.99, count)
    return lo + cells * (hi - lo) / size


class KeypointTargetsTest(parameterized.TestCase):

    def _case(self, seed=0, size=8):
        rng = np.random.default_rng(seed)
        batch, num, m_count, k_count = 2, 6, 3, 5
        rois = np.zeros((batch, num, 4), np.float32)
        for b in range(batch):
            for n in range(num):
                y1, x1 = rng.uniform(0, 50, 2)
                rois[b, n] = (y1, x1, y1 + rng.uniform(5, 40), x1 + rng.uniform(5, 40))
        matched = rng.integers(-1, m_count, (batch, num)).astype(np.int32)
        keypoints = np.zeros((batch, m_count, k_count, 3), np.float32)
        for b in range(batch):
            for n in range(num):
                m = matched[b, n]
                if m < 0:
                    continue
                y1, x1, y2, x2 = rois[b, n].astype(np.float64)
                # Inside the roi (away from cell edges), some outside, some
                # unlabelled; later rois overwrite an instance shared earlier.
                keypoints[b, m, :, 0] = _away_from_cell_edges(rng, y1, y2, size, k_count)
                keypoints[b, m, :, 1] = _away_from_cell_edges(rng, x1, x2, size, k_count)
                keypoints[b, m, :, 2] = rng.integers(0, 3, k_count)
                keypoints[b, m, 0, 1] = x1 - 3.0        # left of the roi
                keypoints[b, m, 1, 0] = y2              # on the bottom edge
                keypoints[b, m, 1, 2] = 2
                keypoints[b, m, 2, 1] = x2              # on the right edge
                keypoints[b, m, 2, 2] = 1               # labelled, occluded: counts
        return rois, keypoints, matched

    @parameterized.parameters(0, 1, 2)
    def test_matches_reference_eager_and_xla(self, seed):
        size = 8
        rois, keypoints, matched = self._case(seed, size)
        want_index, want_valid = targets_reference(rois, keypoints, matched, size)
        self.assertGreater(want_valid.sum(), 5)
        self.assertTrue((~want_valid).any())
        got = keypoint_ops.keypoint_targets(rois, keypoints, matched, heatmap_size=size)
        np.testing.assert_array_equal(got.valid.numpy(), want_valid)
        np.testing.assert_array_equal(got.indices.numpy(), want_index)
        xla = tf.function(lambda *a: keypoint_ops.keypoint_targets(*a, heatmap_size=size),
                          jit_compile=True)(rois, keypoints, matched)
        np.testing.assert_array_equal(xla.valid.numpy(), want_valid)
        np.testing.assert_array_equal(xla.indices.numpy(), want_index)

    def test_edges_empty_rois_and_no_gt(self):
        size = 4
        rois = np.array([[[0, 0, 8, 8], [0, 0, 8, 8], [2, 2, 2, 6], [0, 0, 8, 8]]],
                        np.float32)
        keypoints = np.array([[[[8, 8, 2], [0, 0, 2], [7.999, 0, 1], [4, 4, 0]]]],
                             np.float32)
        matched = np.array([[0, -1, 0, 0]], np.int32)
        got = keypoint_ops.keypoint_targets(rois, keypoints, matched, heatmap_size=size)
        # Roi 0: the far corner takes the last cell, the near corner the
        # first; 7.999 the last row; v = 0 is no target.
        np.testing.assert_array_equal(got.valid.numpy()[0, 0], [True, True, True, False])
        np.testing.assert_array_equal(got.indices.numpy()[0, 0], [15, 0, 12, 0])
        # Unmatched and zero-height rois have no target, and index 0.
        self.assertFalse(got.valid.numpy()[0, 1:3].any())
        self.assertFalse(got.indices.numpy()[0, 1:3].any())
        # An image with no instances at all (M = 0 is padded to one empty slot).
        none = keypoint_ops.keypoint_targets(rois, np.zeros((1, 1, 4, 3), np.float32),
                                             np.full((1, 4), -1, np.int32), heatmap_size=size)
        self.assertFalse(none.valid.numpy().any())

    def test_half_precision_inputs(self):
        rois, keypoints, matched = self._case(3, 8)
        # Integer-valued coordinates are exact in float16.
        rois, keypoints = np.round(rois), np.round(keypoints)
        want_index, want_valid = targets_reference(rois, keypoints, matched, 8)
        got = keypoint_ops.keypoint_targets(tf.constant(rois, tf.float16),
                                            tf.constant(keypoints, tf.bfloat16), matched,
                                            heatmap_size=8)
        np.testing.assert_array_equal(got.valid.numpy(), want_valid)
        np.testing.assert_array_equal(got.indices.numpy(), want_index)


class HeatmapsToKeypointsTest(parameterized.TestCase):

    @parameterized.parameters((0, tf.float32), (1, tf.float32), (2, tf.bfloat16),
                              (3, tf.float16))
    def test_matches_reference_eager_and_xla(self, seed, dtype):
        rng = np.random.default_rng(seed)
        heatmaps = rng.normal(0, 2, (2, 3, 4, 7, 9)).astype(np.float32)
        heatmaps[0, 0, 0] = 0.0                      # flat: first cell, no move
        heatmaps[0, 0, 1, 3, 4] = heatmaps[0, 0, 1, 5, 2] = 50.0   # tie: first wins
        heatmaps[0, 1, 2, 0, 8] = 60.0               # on the corner: no move
        heatmaps[1, 2, 3, 6, 1] = 40.0
        boxes = rng.uniform(0, 40, (2, 3, 4)).astype(np.float32)
        boxes[..., 2:] = boxes[..., :2] + rng.uniform(2, 60, (2, 3, 2))
        boxes[1, 0, 2] = boxes[1, 0, 0] + 0.25       # under a pixel: taken as 1
        heatmaps = tf.cast(heatmaps, dtype)
        want = decode_reference(tf.cast(heatmaps, tf.float32).numpy(), boxes)
        got = keypoint_ops.heatmaps_to_keypoints(heatmaps, boxes)
        self.assertEqual(got.dtype, tf.float32)
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-4)
        xla = tf.function(keypoint_ops.heatmaps_to_keypoints, jit_compile=True)(
            heatmaps, boxes)
        np.testing.assert_allclose(xla.numpy(), want, rtol=1e-5, atol=1e-4)
        # The special cases decode as described.
        b = boxes.astype(np.float64)
        np.testing.assert_allclose(got.numpy()[0, 0, 0, :2],
                                   [b[0, 0, 0] + 0.5 * (b[0, 0, 2] - b[0, 0, 0]) / 7,
                                    b[0, 0, 1] + 0.5 * (b[0, 0, 3] - b[0, 0, 1]) / 9],
                                   rtol=1e-5)
        np.testing.assert_allclose(got.numpy()[0, 0, 0, 2], 1 / 63, rtol=1e-5)
        row = (got.numpy()[0, 0, 1, 0] - b[0, 0, 0]) / (b[0, 0, 2] - b[0, 0, 0]) * 7
        self.assertTrue(3 <= row < 4, row)

    def test_targets_round_trip(self):
        """A heatmap peaked on a keypoint's target cell decodes into that cell."""
        size = 56
        rng = np.random.default_rng(7)
        rois = np.array([[[10, 20, 90, 60], [0, 0, 300, 120]]], np.float32)
        keypoints = np.zeros((1, 2, 17, 3), np.float32)
        for m in range(2):
            y1, x1, y2, x2 = rois[0, m]
            keypoints[0, m, :, 0] = rng.uniform(y1, y2, 17)
            keypoints[0, m, :, 1] = rng.uniform(x1, x2, 17)
            keypoints[0, m, :, 2] = 2
        targets = keypoint_ops.keypoint_targets(rois, keypoints, np.array([[0, 1]], np.int32))
        self.assertTrue(targets.valid.numpy().all())
        logits = tf.one_hot(targets.indices, size * size, on_value=10.0, off_value=0.0)
        decoded = keypoint_ops.heatmaps_to_keypoints(
            tf.reshape(logits, [1, 2, 17, size, size]), rois).numpy()
        cell = (rois[0, :, 2:] - rois[0, :, :2]) / size  # [2, (h, w)]
        error = np.abs(decoded[0, :, :, :2] - keypoints[0, :, :, :2])
        self.assertTrue((error <= cell[:, None, :] * 0.5 + 1e-3).all(), error.max())

    def test_quadratic_logits_decode_to_their_vertex(self):
        """On logits quadratic in y and x (a Gaussian's log) the parabola
        through the highest cell's neighbours peaks at the vertex: the
        point comes back to float32 rounding, not to the cell."""
        size = 56
        rng = np.random.default_rng(11)
        vertex = rng.uniform(3, size - 4, (6, 2))   # in cell-centre coordinates
        yy, xx = np.mgrid[0:size, 0:size]
        logits = np.stack([-((yy - cy) ** 2 / 3.0 + (xx - cx) ** 2 / 5.0) for cy, cx in vertex])
        boxes = np.array([[[10, 20, 122, 76]] * 6], np.float32)   # cells 2 x 1 pixels
        got = keypoint_ops.heatmaps_to_keypoints(logits[None, :, None].astype(np.float32),
                                                 boxes).numpy()[0, :, 0, :2]
        want = boxes[0, :, :2] + (vertex + 0.5) * np.array([2.0, 1.0])
        np.testing.assert_allclose(got, want, atol=2e-3)
