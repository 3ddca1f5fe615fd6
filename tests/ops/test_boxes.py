"""mrcnn.ops.boxes against float64 NumPy references written from the contract."""

import math

import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from mrcnn.ops import boxes as box_ops


def _ref_area(b):
    return max(b[2] - b[0], 0.0) * max(b[3] - b[1], 0.0)


def _ref_iou(a, b):
    """One pair at a time: [x1, x2) x [y1, y2), empty boxes give 0."""
    ih = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
    iw = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
    inter = ih * iw
    union = _ref_area(a) + _ref_area(b) - inter
    return inter / union if union > 0 else 0.0


def _ref_encode(b, a, w):
    h, wd = b[2] - b[0], b[3] - b[1]
    ha, wa = a[2] - a[0], a[3] - a[1]
    cy, cx = b[0] + h / 2, b[1] + wd / 2
    cya, cxa = a[0] + ha / 2, a[1] + wa / 2
    return [w[0] * (cy - cya) / ha, w[1] * (cx - cxa) / wa,
            w[2] * math.log(h / ha), w[3] * math.log(wd / wa)]


def _random_boxes(rng, shape, canvas=100.0):
    c = rng.uniform(0, canvas, size=shape + (2,))
    hw = rng.uniform(1, 40, size=shape + (2,))
    return np.concatenate([c - hw / 2, c + hw / 2], -1).astype(np.float32)


class BoxIouTest(tf.test.TestCase, parameterized.TestCase):

    def test_literal_table(self):
        a = np.array([[0, 0, 10, 10], [0, 0, 10, 20]], np.float32)
        b = np.array([[0, 0, 10, 10], [5, 5, 15, 15], [20, 20, 30, 30],
                      [0, 0, 0, 10]], np.float32)
        expected = [[1.0, 25 / 175, 0.0, 0.0], [0.5, 50 / 250, 0.0, 0.0]]
        self.assertAllClose(box_ops.box_iou(a, b), expected, atol=1e-6)

    @parameterized.named_parameters(('unbatched', ()), ('batched', (3,)))
    def test_matches_reference(self, lead):
        rng = np.random.default_rng(0)
        a = _random_boxes(rng, lead + (7,))
        b = _random_boxes(rng, lead + (5,))
        b[..., 0, 2] = b[..., 0, 0]  # an empty box
        a[..., 1, :] = [50, 50, 40, 60]  # an inverted box
        got = box_ops.box_iou(a, b)
        flat_a = a.reshape(-1, 7, 4).astype(np.float64)
        flat_b = b.reshape(-1, 5, 4).astype(np.float64)
        ref = np.array([[[_ref_iou(x, y) for y in fb] for x in fa]
                        for fa, fb in zip(flat_a, flat_b)]).reshape(lead + (7, 5))
        self.assertAllClose(got, ref, atol=1e-6)
        self.assertEqual(got.dtype, tf.float32)
        xla = tf.function(box_ops.box_iou, jit_compile=True)(a, b)
        self.assertAllClose(xla, got, atol=1e-6)

    def test_symmetric_and_bounded(self):
        rng = np.random.default_rng(1)
        a = _random_boxes(rng, (2, 9))
        b = _random_boxes(rng, (2, 6))
        ab = box_ops.box_iou(a, b).numpy()
        ba = box_ops.box_iou(b, a).numpy()
        self.assertAllClose(ab, np.swapaxes(ba, -1, -2))
        self.assertTrue(np.all((ab >= 0) & (ab <= 1)))

    @parameterized.named_parameters(('fp16', tf.float16), ('bf16', tf.bfloat16))
    def test_low_precision_inputs_give_float32(self, dtype):
        a = tf.constant([[0, 0, 10, 10]], dtype)
        self.assertEqual(box_ops.box_iou(a, a).dtype, tf.float32)
        self.assertEqual(box_ops.box_area(a).dtype, tf.float32)


class BoxCodingTest(tf.test.TestCase, parameterized.TestCase):

    @parameterized.named_parameters(('unit', (1.0, 1.0, 1.0, 1.0)),
                                    ('rcnn', (10.0, 10.0, 5.0, 5.0)))
    def test_encode_matches_reference_and_round_trips(self, weights):
        rng = np.random.default_rng(2)
        b = _random_boxes(rng, (2, 6))
        a = _random_boxes(rng, (2, 6))
        deltas = box_ops.encode_boxes(b, a, weights)
        ref = np.array([[_ref_encode(x.astype(np.float64), y.astype(np.float64), weights)
                         for x, y in zip(bb, aa)] for bb, aa in zip(b, a)])
        self.assertAllClose(deltas, ref, atol=1e-4, rtol=1e-5)
        self.assertAllClose(box_ops.decode_boxes(deltas, a, weights), b,
                            atol=1e-3)
        xla = tf.function(box_ops.decode_boxes, jit_compile=True)(deltas, a, weights)
        self.assertAllClose(xla, b, atol=1e-3)

    def test_broadcast_anchors(self):
        rng = np.random.default_rng(3)
        b = _random_boxes(rng, (2, 6))
        a = _random_boxes(rng, (6,))
        deltas = box_ops.encode_boxes(b, a)
        self.assertEqual(deltas.shape, (2, 6, 4))
        self.assertAllClose(box_ops.decode_boxes(deltas, a), b, atol=1e-3)

    def test_scale_clamp(self):
        anchor = tf.constant([[0.0, 0.0, 16.0, 16.0]])
        huge = tf.constant([[0.0, 0.0, 100.0, 100.0]])
        out = box_ops.decode_boxes(huge, anchor).numpy()
        side = 16.0 * 1000.0 / 16.0
        self.assertAllClose(out[0, 2] - out[0, 0], side, rtol=1e-5)
        self.assertTrue(np.all(np.isfinite(out)))


class ClipAndAreaTest(tf.test.TestCase):

    def test_clip_shared_and_per_image(self):
        b = tf.constant([[[-5.0, -5.0, 50.0, 70.0]], [[10.0, 20.0, 30.0, 200.0]]])
        shared = box_ops.clip_boxes(b, [40, 60])
        self.assertAllClose(shared, [[[0, 0, 40, 60]], [[10, 20, 30, 60]]])
        per_image = box_ops.clip_boxes(b, tf.constant([[40, 60], [100, 100]]))
        self.assertAllClose(per_image, [[[0, 0, 40, 60]], [[10, 20, 30, 100]]])
        xla = tf.function(box_ops.clip_boxes, jit_compile=True)(
            b, tf.constant([[40.0, 60.0], [100.0, 100.0]]))
        self.assertAllClose(xla, per_image)

    def test_area(self):
        b = tf.constant([[0.0, 0.0, 2.0, 3.0], [5.0, 5.0, 4.0, 9.0]])
        self.assertAllClose(box_ops.box_area(b), [6.0, 0.0])


if __name__ == "__main__":
    tf.test.main()
