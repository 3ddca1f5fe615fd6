"""Tests of mrcnn.ops.masks against float64 NumPy references.

`mask_targets` is checked against the ROIAlign reference of
tests/ops/test_roi_align.py (written from the contract, not from the code) and
`paste_masks` against a per-pixel loop written here. Shape letters as in the
module: B, K, M, H, W, S, oh, ow.
"""

import math

import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from mrcnn.ops import masks as mask_ops
from tests.ops.test_roi_align import roi_align_one_box


def mask_targets_reference(gt_masks, rois, matched_index, output_size):
    """float64 [B, K, oh, ow] and the unthresholded values, one roi at a time."""
    batch, num_rois = matched_index.shape
    values = np.zeros((batch, num_rois) + tuple(output_size))
    for b in range(batch):
        for k in range(num_rois):
            m = matched_index[b, k]
            if m < 0:
                continue
            fmap = np.asarray(gt_masks[b, m], np.float64)[..., None]
            values[b, k] = roi_align_one_box(fmap, rois[b, k], output_size,
                                             1.0, 2, True)[..., 0]
    targets = (values >= 0.5).astype(np.float64)
    targets[matched_index < 0] = 0.0
    return targets, values


def paste_reference(masks, boxes, image_shape, threshold):
    """bool [B, K, H, W]: the contract's paste rule, one pixel at a time."""
    masks = np.asarray(masks, np.float64)
    batch, num_boxes, oh, ow = masks.shape
    height, width = image_shape
    out = np.zeros((batch, num_boxes, height, width), bool)
    values = np.zeros(out.shape)
    for b in range(batch):
        for k in range(num_boxes):
            y1, x1, y2, x2 = [float(v) for v in boxes[b, k]]
            for i in range(height):
                for j in range(width):
                    py, px = i + 0.5, j + 0.5
                    if not (y1 <= py < y2 and x1 <= px < x2):
                        continue
                    u = min(max((py - y1) / (y2 - y1) * oh - 0.5, 0), oh - 1)
                    v = min(max((px - x1) / (x2 - x1) * ow - 0.5, 0), ow - 1)
                    u0, v0 = int(math.floor(u)), int(math.floor(v))
                    u1, v1 = min(u0 + 1, oh - 1), min(v0 + 1, ow - 1)
                    lu, lv = u - u0, v - v0
                    m = masks[b, k]
                    val = ((1 - lu) * (1 - lv) * m[u0, v0] + (1 - lu) * lv * m[u0, v1]
                           + lu * (1 - lv) * m[u1, v0] + lu * lv * m[u1, v1])
                    values[b, k, i, j] = val
                    out[b, k, i, j] = val >= threshold
    return out, values


def random_blob_masks(rng, shape):
    """uint8 [B, M, H, W] 0/1 masks: random ellipses."""
    batch, num, height, width = shape
    yy, xx = np.meshgrid(np.arange(height) + 0.5, np.arange(width) + 0.5,
                         indexing="ij")
    out = np.zeros(shape, np.uint8)
    for b in range(batch):
        for m in range(num):
            cy, cx = rng.uniform(0.2, 0.8) * height, rng.uniform(0.2, 0.8) * width
            ry, rx = rng.uniform(2, height / 3), rng.uniform(2, width / 3)
            out[b, m] = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    return out


def in_ellipse(y, x, shape):
    """bool: whether points (y, x) lie in the ellipse (cy, cx, ry, rx)."""
    cy, cx, ry, rx = shape
    return ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1.0


def jittered_rois(rng, boxes, index, jitter=0.15):
    """float32 [B, K, 4]: the matched box, shifted and scaled a little."""
    base = np.take_along_axis(boxes, np.maximum(index, 0)[..., None], axis=1)
    h = base[..., 2] - base[..., 0]
    w = base[..., 3] - base[..., 1]
    noise = rng.uniform(-jitter, jitter, size=base.shape)
    size = np.stack([h, w, h, w], -1)
    return (base + noise * size).astype(np.float32)


class MaskTargetsTest(tf.test.TestCase, parameterized.TestCase):

    def test_literal_half_mask(self):
        # 4x4 mask whose left half is 1; roi = whole image, 2x2 output. Bin
        # (0, 0) samples x in {0.0, 1.0} (cell units after the -0.5 shift):
        # all inside the ones -> 1; bin (0, 1) samples x in {2.0, 3.0} -> 0.
        # A roi on the boundary column x in [1, 3) averages to 0.5 -> 1.
        gt = np.zeros((1, 1, 4, 4), np.uint8)
        gt[..., :2] = 1
        rois = np.array([[[0, 0, 4, 4], [0, 1, 4, 3]]], np.float32)
        got = mask_ops.mask_targets(gt, rois, np.array([[0, 0]], np.int32),
                                    output_size=(2, 2))
        self.assertAllEqual(got[0, 0], [[1.0, 0.0], [1.0, 0.0]])
        self.assertAllEqual(got[0, 1], [[1.0, 0.0], [1.0, 0.0]])

    @parameterized.named_parameters(
        ("uint8", np.uint8), ("bool", bool), ("float32", np.float32))
    def test_matches_reference(self, dtype):
        rng = np.random.default_rng(0)
        gt = random_blob_masks(rng, (2, 3, 20, 24))
        gt_boxes = rng.uniform(0, 18, size=(2, 3, 2))
        gt_boxes = np.concatenate([gt_boxes, gt_boxes + rng.uniform(
            3, 14, size=(2, 3, 2))], -1).astype(np.float32)
        index = np.array([[0, 2, -1, 1, 1], [2, -1, 0, 0, 1]], np.int32)
        rois = jittered_rois(rng, gt_boxes, index, jitter=0.4)
        expected, values = mask_targets_reference(gt, rois, index, (6, 5))
        got = mask_ops.mask_targets(gt.astype(dtype), rois, index, (6, 5))
        self.assertEqual(got.dtype, tf.float32)
        self.assertEqual(got.shape, (2, 5, 6, 5))
        # Only values within float32 rounding of the 0.5 threshold may differ.
        differ = got.numpy() != expected
        self.assertFalse(np.any(differ & (np.abs(values - 0.5) > 1e-5)))
        self.assertAllEqual(got[index < 0], np.zeros((2, 6, 5)))

    def test_unmatched_gives_zeros(self):
        gt = np.ones((2, 2, 8, 8), np.float32)
        rois = np.tile(np.array([[[0, 0, 8, 8]]], np.float32), (2, 3, 1))
        index = np.full((2, 3), -1, np.int32)
        got = mask_ops.mask_targets(gt, rois, index, (4, 4))
        self.assertAllEqual(got, np.zeros((2, 3, 4, 4)))
        got = mask_ops.mask_targets(
            gt, rois, index, (4, 4), crop_boxes=np.zeros((2, 2, 4), np.float32))
        self.assertAllEqual(got, np.zeros((2, 3, 4, 4)))

    def test_crop_form_matches_full_form(self):
        # Smooth shapes (ellipses): the full mask is the ellipse at pixel
        # centres; the 112 x 112 crop is the ellipse at crop-cell centres
        # over the tight gt box. Targets of jittered rois must agree.
        rng = np.random.default_rng(1)
        height = width = 96
        crop = 112
        batch, num = 2, 3
        full = np.zeros((batch, num, height, width), np.uint8)
        crops = np.zeros((batch, num, crop, crop), np.uint8)
        gt_boxes = np.zeros((batch, num, 4), np.float32)
        yy, xx = np.meshgrid(np.arange(height) + 0.5, np.arange(width) + 0.5,
                             indexing="ij")
        for b in range(batch):
            for m in range(num):
                shape = tuple(rng.uniform(30, 66, size=2)) + tuple(
                    rng.uniform(8, 28, size=2))  # (cy, cx, ry, rx)
                full[b, m] = in_ellipse(yy, xx, shape)
                rows, cols = np.nonzero(full[b, m])
                box = [rows.min(), cols.min(), rows.max() + 1, cols.max() + 1]
                gt_boxes[b, m] = box
                cyy = box[0] + (np.arange(crop) + 0.5) * (box[2] - box[0]) / crop
                cxx = box[1] + (np.arange(crop) + 0.5) * (box[3] - box[1]) / crop
                crops[b, m] = in_ellipse(cyy[:, None], cxx[None, :], shape)
        index = np.tile(np.arange(num, dtype=np.int32), (batch, 4))  # [B, 12]
        rois = jittered_rois(rng, gt_boxes, index, jitter=0.1)
        fn = lambda g, r, i, c: mask_ops.mask_targets(g, r, i, (28, 28), c)  # noqa: E731
        want = fn(full, rois, index, None).numpy()
        got = tf.function(fn, jit_compile=True)(crops, rois, index,
                                                gt_boxes).numpy()
        eager = fn(crops, rois, index, gt_boxes).numpy()
        self.assertAllEqual(got, eager)
        inter = (got * want).sum(axis=(2, 3))
        union = np.maximum(got, want).sum(axis=(2, 3))
        iou = inter / union
        self.assertGreater(iou.min(), 0.95)
        self.assertGreater(iou.mean(), 0.97)

    def test_xla_matches_eager_full_form(self):
        rng = np.random.default_rng(2)
        gt = random_blob_masks(rng, (2, 2, 16, 16))
        index = np.array([[0, 1, -1], [1, 1, 0]], np.int32)
        rois = rng.uniform(-2, 18, size=(2, 3, 4)).astype(np.float32)
        rois[..., 2:] = rois[..., :2] + rng.uniform(1, 10, size=(2, 3, 2))
        fn = lambda g, r, i: mask_ops.mask_targets(g, r, i, (7, 7))  # noqa: E731
        self.assertAllEqual(tf.function(fn, jit_compile=True)(gt, rois, index),
                            fn(gt, rois, index))


class PasteMasksTest(tf.test.TestCase, parameterized.TestCase):

    def _inputs(self, rng, batch=2, num=4, size=(5, 6)):
        masks = rng.uniform(0, 1, size=(batch, num) + size).astype(np.float32)
        corner = rng.uniform(-6, 20, size=(batch, num, 2))
        side = rng.uniform(2, 16, size=(batch, num, 2))
        boxes = np.concatenate([corner, corner + side], -1).astype(np.float32)
        boxes[0, 0] = [3.0, 4.0, 9.5, 13.25]  # inside, fractional edges
        boxes[1, 0] = [-5.0, 15.0, 8.0, 40.0]  # crosses two image edges
        boxes[1, 1] = 0.0  # padding
        return masks, boxes

    @parameterized.named_parameters(("thr_half", 0.5), ("thr_low", 0.3))
    def test_matches_reference(self, threshold):
        rng = np.random.default_rng(3)
        masks, boxes = self._inputs(rng)
        expected, values = paste_reference(masks, boxes, (18, 22), threshold)
        got = mask_ops.paste_masks(masks, boxes, (18, 22), threshold).numpy()
        self.assertEqual(got.dtype, bool)
        self.assertEqual(got.shape, (2, 4, 18, 22))
        differ = got != expected
        self.assertFalse(np.any(differ & (np.abs(values - threshold) > 1e-5)))
        self.assertFalse(got[1, 1].any())  # empty box
        self.assertTrue(got[0, 0].any())

    def test_literal_constant_mask(self):
        # An all-ones 2x2 mask on box [1, 3.5) x [2, 4): pixel centres
        # y in {1.5, 2.5}, x in {2.5, 3.5} are inside; y = 3.5 is not.
        masks = np.ones((1, 1, 2, 2), np.float32)
        boxes = np.array([[[1.0, 2.0, 3.5, 4.0]]], np.float32)
        got = mask_ops.paste_masks(masks, boxes, (5, 6))[0, 0]
        want = np.zeros((5, 6), bool)
        want[1:3, 2:4] = True
        self.assertAllEqual(got, want)
        # A 2x1 mask [1, 0] over box [0, 4) x [0, 2) on a 4x2 image: rows at
        # y = 0.5, 1.5, 2.5, 3.5 map to cell coords 0, 0.25, 0.75, 1 (after
        # -0.5, clamped): values 1, 0.75, 0.25, 0.
        masks = np.array([[[[1.0], [0.0]]]], np.float32)
        boxes = np.array([[[0.0, 0.0, 4.0, 2.0]]], np.float32)
        got = mask_ops.paste_masks(masks, boxes, (4, 2))[0, 0, :, 0]
        self.assertAllEqual(got, [True, True, False, False])

    def test_xla_matches_eager_and_fp16(self):
        rng = np.random.default_rng(4)
        masks, boxes = self._inputs(rng, num=3)
        fn = lambda m, b: mask_ops.paste_masks(m, b, (16, 20))  # noqa: E731
        eager = fn(masks, boxes)
        self.assertAllEqual(tf.function(fn, jit_compile=True)(masks, boxes),
                            eager)
        half = fn(tf.constant(masks, tf.float16), boxes).numpy()
        _, values = paste_reference(masks.astype(np.float16), boxes, (16, 20),
                                    0.5)
        differ = half != eager.numpy()
        self.assertFalse(np.any(differ & (np.abs(values - 0.5) > 1e-3)))


if __name__ == "__main__":
    tf.test.main()


def paste_coordinates_reference(starts, ends, size, cells):
    """float64 (low, high, frac, inside) [B, K, size], one pixel at a time."""
    shape = starts.shape + (size,)
    low, high = np.zeros(shape, np.int64), np.zeros(shape, np.int64)
    frac, inside = np.zeros(shape), np.zeros(shape, bool)
    for idx in np.ndindex(starts.shape):
        s, e = float(starts[idx]), float(ends[idx])
        extent = e - s if e > s else 1.0
        for i in range(size):
            c = min(max((i + 0.5 - s) * cells / extent - 0.5, 0.0), cells - 1.0)
            low[idx + (i,)] = math.floor(c)
            high[idx + (i,)] = min(math.floor(c) + 1, cells - 1)
            frac[idx + (i,)] = c - math.floor(c)
            inside[idx + (i,)] = s <= i + 0.5 < e
    return low, high, frac, inside


class PasteCoordinatesTest(tf.test.TestCase, parameterized.TestCase):

    @parameterized.named_parameters(("eager", False), ("xla", True))
    def test_matches_reference(self, xla):
        rng = np.random.default_rng(5)
        starts = rng.uniform(-8, 20, (2, 6)).astype(np.float32)
        ends = (starts + rng.uniform(0.3, 15, (2, 6))).astype(np.float32)
        starts[0, 0], ends[0, 0] = 4.0, 4.0      # empty
        starts[0, 1], ends[0, 1] = -3.0, 40.0    # beyond both ends
        starts[1, 0], ends[1, 0] = 2.25, 2.4     # no pixel centre inside
        fn = tf.function(lambda s, e: mask_ops.paste_coordinates(s, e, 17, 7),
                         jit_compile=xla)
        low, high, frac, inside = (t.numpy() for t in fn(starts, ends))
        ref = paste_coordinates_reference(starts, ends, 17, 7)
        self.assertEqual(low.dtype, np.int32)
        self.assertEqual(frac.dtype, np.float32)
        self.assertAllEqual(inside, ref[3])
        # A coordinate within float32 rounding of an integer may floor to
        # either side; the interpolated value is the same either way.
        near = np.abs(ref[2] - np.round(ref[2])) < 1e-5
        self.assertAllEqual(np.where(near, 0, low), np.where(near, 0, ref[0]))
        self.assertAllEqual(np.where(near, 0, high), np.where(near, 0, ref[1]))
        self.assertAllClose(np.where(near, 0, frac), np.where(near, 0, ref[2]),
                            atol=1e-5)
        self.assertFalse(inside[0, 0].any() or inside[1, 0].any())
        self.assertTrue(inside[0, 1].all())
