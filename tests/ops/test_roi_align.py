"""Tests of mrcnn.ops.roi_align against a float64 NumPy ROIAlign written here.

The reference follows docs/OPS_CONTRACT.md one box, bin and sample at a time
(Detectron2's ROIAlignV2 `bilinear_interpolate`), never calling the code under
test. Shape letters as in the module: B, K, H, W, C, oh, ow.
"""

import math

import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from mrcnn.ops import roi_align as ra


def bilinear_neighbours(height, width, y, x):
    """[((row, col), weight)] of one bilinear sample (contract rules)."""
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return []
    y = min(max(y, 0.0), height - 1.0)
    x = min(max(x, 0.0), width - 1.0)
    y0, x0 = int(math.floor(y)), int(math.floor(x))
    y1, x1 = min(y0 + 1, height - 1), min(x0 + 1, width - 1)
    ly, lx = y - y0, x - x0
    return [((y0, x0), (1 - ly) * (1 - lx)), ((y0, x1), (1 - ly) * lx),
            ((y1, x0), ly * (1 - lx)), ((y1, x1), ly * lx)]


def bilinear_reference(fmap, y, x):
    """float64 [C]: one bilinear sample of fmap [H, W, C]."""
    total = np.zeros(fmap.shape[-1])
    for cell, weight in bilinear_neighbours(*fmap.shape[:2], y, x):
        total += weight * fmap[cell]
    return total


def box_samples(box, output_size, spatial_scale, sampling_ratio, aligned,
                max_sampling_ratio=ra.MAX_SAMPLING_RATIO):
    """Yields (i, j, y, x, share): bin (i, j), the feature coordinates of each
    of its samples, for one box in image pixels, and the sample's share of
    the bin average. `sampling_ratio` 0 is adaptive (Detectron2's and
    torchvision's `roi_bin_grid = ceil(roi / bins)` per axis, here at most
    `max_sampling_ratio`, and `count = max(grid_h * grid_w, 1)`)."""
    oh, ow = output_size
    offset = 0.5 if aligned else 0.0
    y1, x1, y2, x2 = [float(v) * spatial_scale - offset for v in box]
    roi_h, roi_w = y2 - y1, x2 - x1
    if not aligned:
        roi_h, roi_w = max(roi_h, 1.0), max(roi_w, 1.0)
    bin_h, bin_w = roi_h / oh, roi_w / ow
    if sampling_ratio > 0:
        grid_h = grid_w = sampling_ratio
    else:
        grid_h = min(max(math.ceil(roi_h / oh), 0), max_sampling_ratio)
        grid_w = min(max(math.ceil(roi_w / ow), 0), max_sampling_ratio)
    share = 1.0 / max(grid_h * grid_w, 1)
    for i in range(oh):
        for j in range(ow):
            for s in range(grid_h):
                for t in range(grid_w):
                    yield (i, j, y1 + (i + (s + 0.5) / grid_h) * bin_h,
                           x1 + (j + (t + 0.5) / grid_w) * bin_w, share)


def roi_align_one_box(fmap, box, output_size, spatial_scale, sampling_ratio,
                      aligned):
    """float64 [oh, ow, C]: ROIAlign of one box over fmap [H, W, C]."""
    out = np.zeros(tuple(output_size) + (fmap.shape[-1],))
    for i, j, y, x, share in box_samples(box, output_size, spatial_scale,
                                         sampling_ratio, aligned):
        out[i, j] += bilinear_reference(fmap, y, x) * share
    return out


def roi_align_one_box_capped(fmap, box, max_sampling_ratio):
    """Adaptive [2, 2, C] ROIAlign (aligned, scale 1) with another bound."""
    out = np.zeros((2, 2, fmap.shape[-1]))
    for i, j, y, x, share in box_samples(box, (2, 2), 1.0, 0, True, max_sampling_ratio):
        out[i, j] += bilinear_reference(fmap.astype(np.float64), y, x) * share
    return out


def roi_align_one_box_adjoint(grad_map, box, upstream, spatial_scale,
                              sampling_ratio, aligned):
    """Adds d<roi_align_one_box(fmap, box), upstream>/d fmap into grad_map.

    ROIAlign is linear in the features, so its gradient is its adjoint:
    every sample hands its share of `upstream[i, j]` back to its four
    neighbours with the same bilinear weights.
    """
    for i, j, y, x, share in box_samples(box, upstream.shape[:2], spatial_scale,
                                         sampling_ratio, aligned):
        for cell, weight in bilinear_neighbours(*grad_map.shape[:2], y, x):
            grad_map[cell] += weight * upstream[i, j] * share


def roi_align_reference(features, boxes, output_size=(7, 7), spatial_scale=1.0,
                        sampling_ratio=2, aligned=True):
    """float64 [B, K, oh, ow, C], one box at a time."""
    features = np.asarray(features, np.float64)
    boxes = np.asarray(boxes, np.float64)
    return np.stack([
        np.stack([roi_align_one_box(features[b], box, output_size,
                                    spatial_scale, sampling_ratio, aligned)
                  for box in boxes[b]])
        for b in range(boxes.shape[0])])


def assign_levels_reference(boxes, min_level=2, max_level=5):
    """int [B, K]: FPN Eq. 1 in float64."""
    boxes = np.asarray(boxes, np.float64)
    area = (np.maximum(boxes[..., 2] - boxes[..., 0], 0)
            * np.maximum(boxes[..., 3] - boxes[..., 1], 0))
    level = np.floor(4 + np.log2(np.sqrt(area) / 224 + 1e-8))
    return np.clip(level, min_level, max_level).astype(np.int64)


def random_boxes(rng, shape, low, high, min_size=0.5, max_size=12.0):
    """float32 [..., 4] boxes with corners in [low, high] (may cross edges)."""
    y = rng.uniform(low, high, size=shape)
    x = rng.uniform(low, high, size=shape)
    h = rng.uniform(min_size, max_size, size=shape)
    w = rng.uniform(min_size, max_size, size=shape)
    return np.stack([y, x, y + h, x + w], -1).astype(np.float32)


class RoiAlignTest(tf.test.TestCase, parameterized.TestCase):

    def test_literal_5x5(self):
        # 5x5 arange map, box [1, 3) x [1, 3), 2x2 bins. aligned: the box
        # spans cells 0.5..2.5; bin (0, 0) averages samples at y, x in
        # {0.75, 1.25}, i.e. the value at (1, 1) = 6 since the map is linear.
        # Not aligned: samples at {1.25, 1.75} -> (1.5, 1.5) = 9.
        features = np.arange(25, dtype=np.float32).reshape(1, 5, 5, 1)
        boxes = np.array([[[1.0, 1.0, 3.0, 3.0]]], np.float32)
        aligned = ra.roi_align(features, boxes, (2, 2))[0, 0, ..., 0]
        self.assertAllClose(aligned, [[6.0, 7.0], [11.0, 12.0]], atol=1e-6)
        plain = ra.roi_align(features, boxes, (2, 2), aligned=False)
        self.assertAllClose(plain[0, 0, ..., 0], [[9.0, 10.0], [14.0, 15.0]],
                            atol=1e-6)
        # A box at the bottom-right corner: the samples at y, x = 4.25 and
        # 4.75 are clamped to 4, the last row/column (24).
        corner = np.array([[[4.0, 4.0, 6.0, 6.0]]], np.float32)
        out = ra.roi_align(features, corner, (1, 1))[0, 0, 0, 0, 0]
        # y' in [3.5, 5.5]: samples at 4.0 and 5.0 -> 4 (clamped) for both.
        self.assertAllClose(out, 24.0, atol=1e-6)

    @parameterized.named_parameters(
        ("aligned_sr2", True, 2, 1.0, (7, 7)),
        ("aligned_sr1_scale_half", True, 1, 0.5, (3, 4)),
        ("not_aligned_sr2", False, 2, 1.0, (7, 7)),
        ("not_aligned_sr3_scale_quarter", False, 3, 0.25, (2, 3)),
        ("aligned_adaptive", True, 0, 1.0, (2, 2)),
        ("aligned_adaptive_scale_half", True, 0, 0.5, (7, 7)),
        ("not_aligned_adaptive", False, 0, 1.0, (3, 2)),
    )
    def test_matches_reference(self, aligned, sampling_ratio, scale, size):
        rng = np.random.default_rng(0)
        features = rng.normal(size=(2, 9, 11, 3)).astype(np.float32)
        extent = 11 / scale
        # Boxes inside, across the edges, wholly outside, tiny, empty and
        # inverted (the contract's formula applies to them as given).
        boxes = random_boxes(rng, (2, 6), -0.3 * extent, 1.1 * extent,
                             max_size=0.8 * extent)
        boxes[0, 0] = [40.0 / scale, 40.0 / scale, 50.0 / scale, 50.0 / scale]
        boxes[0, 1] = [3.0, 3.0, 3.0, 3.0]
        boxes[1, 0] = [5.0, 6.0, 2.0, 1.0]
        boxes[1, 1] = 0.0
        expected = roi_align_reference(features, boxes, size, scale,
                                       sampling_ratio, aligned)
        got = ra.roi_align(features, boxes, size, scale, sampling_ratio,
                           aligned)
        self.assertEqual(got.dtype, tf.float32)
        self.assertAllClose(got, expected, atol=1e-5)
        self.assertAllClose(got[0, 0], np.zeros_like(got[0, 0]))  # outside

    def test_adaptive_count_is_bounded(self):
        # A 30-cell box wants ceil(30 / 2) = 15 samples per bin side; at most 3.
        rng = np.random.default_rng(3)
        features = rng.normal(size=(1, 32, 32, 2)).astype(np.float32)
        boxes = np.array([[[1.0, 1.0, 31.0, 31.0], [2.0, 3.0, 5.0, 4.0]]], np.float32)
        got = ra.roi_align(features, boxes, (2, 2), sampling_ratio=0, max_sampling_ratio=3)
        want = np.stack([roi_align_one_box_capped(features[0], b, 3) for b in boxes[0]])
        self.assertAllClose(got[0], want, atol=1e-5)
        self.assertAllClose(got[0, 0], ra.roi_align(features, boxes, (2, 2),
                                                    sampling_ratio=3)[0, 0], atol=1e-6)
        with self.assertRaisesRegex(ValueError, "max_sampling_ratio >= 1"):
            ra.roi_align(features, boxes, sampling_ratio=0, max_sampling_ratio=0)

    def test_xla_matches_eager(self):
        rng = np.random.default_rng(1)
        features = tf.constant(rng.normal(size=(2, 8, 8, 4)), tf.float32)
        boxes = tf.constant(random_boxes(rng, (2, 5), -2, 9, max_size=8))
        fn = lambda f, b: ra.roi_align(f, b, (3, 3), 0.75)  # noqa: E731
        eager = fn(features, boxes)
        xla = tf.function(fn, jit_compile=True)(features, boxes)
        self.assertAllClose(xla, eager, atol=1e-6)

    @parameterized.named_parameters(
        ("fp16", tf.float16, 1e-2), ("bf16", tf.bfloat16, 6e-2))
    def test_low_precision_features(self, dtype, atol):
        rng = np.random.default_rng(2)
        features = tf.constant(rng.normal(size=(1, 6, 6, 2)), dtype)
        boxes = random_boxes(rng, (1, 3), -1, 6, max_size=6)
        got = ra.roi_align(features, boxes, (2, 2))
        self.assertEqual(got.dtype, dtype)
        # Geometry stays float32: compare with the float64 reference of the
        # rounded features, up to the output rounding.
        expected = roi_align_reference(tf.cast(features, tf.float64), boxes,
                                       (2, 2))
        self.assertAllClose(tf.cast(got, tf.float64), expected, atol=atol)

    def test_gradient_matches_finite_differences(self):
        rng = np.random.default_rng(3)
        features = tf.constant(rng.normal(size=(1, 4, 5, 2)), tf.float32)
        boxes = tf.constant([[[0.3, 0.6, 3.1, 4.2], [-1.0, 2.0, 2.5, 6.0]]],
                            tf.float32)
        fn = lambda f: ra.roi_align(f, boxes, (2, 2), 1.0, 2)  # noqa: E731
        theoretical, numerical = tf.test.compute_gradient(fn, [features])
        self.assertAllClose(theoretical[0], numerical[0], atol=2e-3)
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(boxes)
            out = ra.roi_align(features, boxes, (2, 2))
        self.assertIsNone(tape.gradient(out, boxes))

    @parameterized.named_parameters(('aligned', True, 2, 0.5),
                                    ('unaligned', False, 1, 0.25),
                                    ('adaptive', True, 0, 1.0))
    def test_gradient_matches_adjoint_reference(self, aligned, sr, scale):
        rng = np.random.default_rng(11)
        features = tf.constant(rng.normal(size=(2, 9, 11, 3)), tf.float32)
        boxes = random_boxes(rng, (2, 6), -6, 26, max_size=20)
        boxes[1, 0] = 0.0  # a padded slot
        upstream = rng.normal(size=(2, 6, 3, 2, 3))
        expected = np.zeros((2, 9, 11, 3))
        for b in range(2):
            for k in range(6):
                roi_align_one_box_adjoint(expected[b], boxes[b, k],
                                          upstream[b, k], scale, sr, aligned)

        def grad(f):
            with tf.GradientTape() as tape:
                tape.watch(f)
                out = ra.roi_align(f, boxes, (3, 2), scale, sr, aligned)
                total = tf.reduce_sum(out * tf.constant(upstream, tf.float32))
            return tape.gradient(total, f)

        self.assertAllClose(grad(features), expected, atol=1e-5)
        self.assertAllClose(tf.function(grad, jit_compile=True)(features),
                            expected, atol=1e-5)

    def test_linear_map_downscale_property(self):
        # On a linear map, bilinear sampling is exact and 2x2 average pooling
        # gives the map at each stride-2 cell centre, so pooling a box from
        # the pooled map at spatial_scale/2 matches the full-resolution one.
        yy, xx = np.meshgrid(np.arange(16.0), np.arange(16.0), indexing="ij")
        fine = (3.0 * yy - 2.0 * xx + 1.0)[None, :, :, None]
        coarse = fine.reshape(1, 8, 2, 8, 2, 1).mean(axis=(2, 4))
        rng = np.random.default_rng(4)
        boxes = random_boxes(rng, (1, 5), 1.5, 8.0, min_size=1, max_size=5)
        full = ra.roi_align(fine.astype(np.float32), boxes, (3, 3), 1.0)
        half = ra.roi_align(coarse.astype(np.float32), boxes, (3, 3), 0.5)
        self.assertAllClose(half, full, atol=1e-4)

    def test_padded_rows_change_nothing(self):
        rng = np.random.default_rng(5)
        features = rng.normal(size=(1, 6, 6, 2)).astype(np.float32)
        boxes = random_boxes(rng, (1, 3), 0, 5, max_size=4)
        padded = np.concatenate([boxes, np.zeros((1, 4, 4), np.float32)], 1)
        self.assertAllClose(ra.roi_align(features, padded)[:, :3],
                            ra.roi_align(features, boxes), atol=1e-6)


class AssignLevelsTest(tf.test.TestCase):

    def test_literal_levels(self):
        # sqrt(area): 0 -> 2 (clamped), 56 -> 2, 111.9 -> 2, 112 -> 3,
        # 224 -> 4, 447 -> 4, 448 -> 5, 2000 -> 5 (clamped).
        sides = [0.0, 56.0, 111.9, 112.0, 224.0, 447.0, 448.0, 2000.0]
        boxes = np.array([[[10.0, 20.0, 10.0 + s, 20.0 + s] for s in sides]],
                         np.float32)
        self.assertAllEqual(ra.assign_levels(boxes), [[2, 2, 2, 3, 4, 4, 5, 5]])
        self.assertAllEqual(ra.assign_levels(boxes, min_level=3, max_level=6),
                            [[3, 3, 3, 3, 4, 4, 5, 6]])

    def test_matches_reference(self):
        rng = np.random.default_rng(6)
        boxes = random_boxes(rng, (3, 50), 0, 800, min_size=1, max_size=900)
        self.assertAllEqual(ra.assign_levels(boxes),
                            assign_levels_reference(boxes))


class MultilevelRoiAlignTest(tf.test.TestCase, parameterized.TestCase):

    def _pyramid(self, rng, canvas=256, channels=3, dtype=np.float32):
        return {lvl: rng.normal(size=(2, canvas // 2 ** lvl, canvas // 2 ** lvl,
                                      channels)).astype(dtype)
                for lvl in range(2, 7)}  # P6 present and ignored

    def _boxes(self, rng):
        # Sides from 8 to 700 px so that every level 2..5 is used.
        scale = np.exp(rng.uniform(np.log(8), np.log(700), size=(2, 12, 1)))
        side = scale * rng.uniform(0.7, 1.4, size=(2, 12, 2))
        corner = rng.uniform(-20, 240, size=(2, 12, 2))
        return np.concatenate([corner, corner + side], -1).astype(np.float32)

    @parameterized.parameters((2, True), (0, True), (2, False))
    def test_matches_reference(self, sampling_ratio, aligned):
        rng = np.random.default_rng(7)
        features = self._pyramid(rng)
        boxes = self._boxes(rng)
        levels = assign_levels_reference(boxes)
        self.assertEqual(set(levels.ravel()), {2, 3, 4, 5})
        expected = np.zeros((2, 12, 7, 7, 3))
        for b in range(2):
            for k in range(12):
                lvl = levels[b, k]
                expected[b, k] = roi_align_one_box(
                    features[lvl][b].astype(np.float64), boxes[b, k], (7, 7),
                    2.0 ** -lvl, sampling_ratio, aligned)
        got = ra.multilevel_roi_align(features, boxes, sampling_ratio=sampling_ratio,
                                      aligned=aligned)
        self.assertAllClose(got, expected, atol=1e-5)
        if sampling_ratio == 0:   # the boxes take 1 to 5 samples per bin side
            xla = tf.function(lambda f, b: ra.multilevel_roi_align(
                f, b, sampling_ratio=0), jit_compile=True)
            self.assertAllClose(xla(features, boxes), expected, atol=1e-5)

    def test_equals_roi_align_on_assigned_level_xla(self):
        rng = np.random.default_rng(8)
        features = self._pyramid(rng, channels=2)
        boxes = self._boxes(rng)
        fn = lambda f, b: ra.multilevel_roi_align(f, b, (2, 3))  # noqa: E731
        got = tf.function(fn, jit_compile=True)(features, boxes)
        self.assertAllClose(got, fn(features, boxes), atol=2e-5)
        levels = ra.assign_levels(boxes).numpy()
        for lvl in range(2, 6):
            single = ra.roi_align(features[lvl], boxes, (2, 3), 2.0 ** -lvl)
            self.assertAllClose(got.numpy()[levels == lvl],
                                single.numpy()[levels == lvl], atol=2e-5)

    def test_bf16_and_gradient_flow(self):
        rng = np.random.default_rng(9)
        features = {k: tf.cast(v, tf.bfloat16)
                    for k, v in self._pyramid(rng, canvas=64).items()}
        boxes = self._boxes(rng) / 4
        out = ra.multilevel_roi_align(features, boxes, (2, 2))
        self.assertEqual(out.dtype, tf.bfloat16)
        f32 = {k: tf.Variable(tf.cast(v, tf.float32)) for k, v in features.items()}
        with tf.GradientTape() as tape:
            total = tf.reduce_sum(ra.multilevel_roi_align(f32, boxes, (2, 2)))
        grads = tape.gradient(total, [f32[lvl] for lvl in range(2, 7)])
        # Each box spreads a total weight of oh*ow (times valid samples) over
        # its own level only; P6 is never read.
        self.assertIsNone(grads[-1])
        used = sum(float(tf.reduce_sum(tf.convert_to_tensor(g)))
                   for g in grads[:-1])
        self.assertGreater(used, 0.0)
        self.assertAllClose(tf.cast(out, tf.float32),
                            ra.multilevel_roi_align(f32, boxes, (2, 2)),
                            atol=6e-2)

    @parameterized.named_parameters(('f32', tf.float32, 1e-5),
                                    ('bf16', tf.bfloat16, 3e-2))
    def test_gradient_matches_adjoint_reference(self, dtype, atol):
        rng = np.random.default_rng(12)
        features = self._pyramid(rng, canvas=64, channels=2)
        boxes = self._boxes(rng) / 4
        boxes[0, 0] = 0.0  # a padded slot
        levels = assign_levels_reference(boxes)
        upstream = rng.normal(size=(2, 12, 2, 3, 2))
        expected = {lvl: np.zeros(f.shape) for lvl, f in features.items()}
        for b in range(2):
            for k in range(12):
                lvl = levels[b, k]
                roi_align_one_box_adjoint(expected[lvl][b], boxes[b, k],
                                          upstream[b, k], 2.0 ** -lvl, 2, True)
        inputs = {lvl: tf.cast(f, dtype) for lvl, f in features.items()}

        def grad(f):
            with tf.GradientTape() as tape:
                tape.watch(f)
                out = ra.multilevel_roi_align(f, boxes, (2, 3))
                total = tf.reduce_sum(tf.cast(out, tf.float32)
                                      * tf.constant(upstream, tf.float32))
            return tape.gradient(total, f)

        for got in (grad(inputs), tf.function(grad, jit_compile=True)(inputs)):
            self.assertIsNone(got[6])  # P6 is present but never read
            for lvl in range(2, 6):
                self.assertEqual(got[lvl].dtype, dtype)
                self.assertAllClose(tf.cast(got[lvl], tf.float64),
                                    expected[lvl], atol=atol, rtol=atol)

    def test_batch_index_pools_each_box_from_its_image(self):
        """One [1, T] list of boxes, each with its image (the mask head's
        gathered positives): values and gradients of the float64 reference
        on that image, eagerly and under XLA."""
        rng = np.random.default_rng(13)
        features = self._pyramid(rng, canvas=64, channels=2)
        boxes = (self._boxes(rng) / 4).reshape(1, 24, 4)
        image = rng.integers(0, 2, size=(1, 24)).astype(np.int32)
        image[0, :2] = [1, 0]   # both images read
        levels = assign_levels_reference(boxes)
        upstream = rng.normal(size=(1, 24, 2, 3, 2))
        expected = np.zeros((1, 24, 2, 3, 2))
        expected_grad = {lvl: np.zeros(f.shape) for lvl, f in features.items()}
        for k in range(24):
            lvl, b = levels[0, k], image[0, k]
            expected[0, k] = roi_align_one_box(features[lvl][b].astype(np.float64),
                                               boxes[0, k], (2, 3), 2.0 ** -lvl, 2, True)
            roi_align_one_box_adjoint(expected_grad[lvl][b], boxes[0, k], upstream[0, k],
                                      2.0 ** -lvl, 2, True)
        inputs = {lvl: tf.constant(f) for lvl, f in features.items()}

        def run(f):
            with tf.GradientTape() as tape:
                tape.watch(f)
                out = ra.multilevel_roi_align(f, boxes, (2, 3), batch_index=image)
                total = tf.reduce_sum(out * tf.constant(upstream, tf.float32))
            return out, tape.gradient(total, [f[lvl] for lvl in range(2, 6)])

        for out, grads in (run(inputs), tf.function(run, jit_compile=True)(inputs)):
            self.assertEqual(out.shape, (1, 24, 2, 3, 2))
            self.assertAllClose(out, expected, atol=1e-5)
            for lvl, got in zip(range(2, 6), grads):
                self.assertAllClose(got, expected_grad[lvl], atol=1e-5)

    def test_missing_level_raises(self):
        with self.assertRaisesRegex(ValueError, "lacks levels"):
            ra.multilevel_roi_align({2: tf.zeros([1, 4, 4, 1])},
                                    tf.zeros([1, 1, 4]))


if __name__ == "__main__":
    tf.test.main()
