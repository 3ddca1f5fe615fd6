"""Losses against float64 NumPy references written from the issue's definitions."""

import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from mrcnn.modeling import losses


def _sigmoid_ce(logit, label):
    return np.maximum(logit, 0) - logit * label + np.log1p(np.exp(-np.abs(logit)))


def _smooth_l1(x, beta):
    ax = np.abs(x)
    return ax if beta == 0 else np.where(ax < beta, 0.5 * ax * ax / beta,
                                         ax - 0.5 * beta)


def _rpn_reference(logits, deltas, targets, labels, num_samples, beta):
    obj = box = 0.0
    for b in range(logits.shape[0]):
        for n in range(logits.shape[1]):
            if labels[b, n] >= 0:
                obj += _sigmoid_ce(logits[b, n], float(labels[b, n] == 1))
            if labels[b, n] == 1:
                box += _smooth_l1(deltas[b, n] - targets[b, n], beta).sum()
    norm = num_samples * logits.shape[0]
    return obj / norm, box / norm


def _rcnn_reference(logits, deltas, targets, classes, valid, beta):
    ce, box, count = 0.0, 0.0, 0
    for b in range(logits.shape[0]):
        for k in range(logits.shape[1]):
            if not valid[b, k]:
                continue
            count += 1
            z = logits[b, k] - logits[b, k].max()
            ce += -(z[classes[b, k]] - np.log(np.exp(z).sum()))
            if classes[b, k] > 0:
                box += _smooth_l1(deltas[b, k, classes[b, k] - 1]
                                  - targets[b, k], beta).sum()
    return ce / max(count, 1), box / max(count, 1)


def _mask_reference(logits, targets, positive):
    total, pixels = 0.0, 0
    for b in range(logits.shape[0]):
        for k in range(logits.shape[1]):
            if positive[b, k]:
                total += _sigmoid_ce(logits[b, k], targets[b, k]).sum()
                pixels += logits[b, k].size
    return total / max(pixels, 1)


class LossesTest(tf.test.TestCase, parameterized.TestCase):

    @parameterized.named_parameters(('l1', 0.0), ('smooth', 1.0 / 9))
    def test_rpn(self, beta):
        rng = np.random.default_rng(0)
        logits = rng.normal(size=(2, 50))
        deltas = rng.normal(size=(2, 50, 4))
        targets = rng.normal(size=(2, 50, 4)) * 0.1
        labels = rng.integers(-1, 2, size=(2, 50)).astype(np.int32)
        targets = np.where((labels == 1)[..., None], targets, 0)
        want = _rpn_reference(logits, deltas, targets, labels, 16, beta)
        got = (losses.rpn_objectness_loss(tf.constant(logits, tf.float32),
                                          labels, 16),
               losses.rpn_box_loss(tf.constant(deltas, tf.float32),
                                   tf.constant(targets, tf.float32), labels,
                                   16, beta))
        self.assertAllClose(got, want, atol=1e-5)

    @parameterized.named_parameters(('l1', 0.0), ('smooth', 1.0))
    def test_rcnn(self, beta):
        rng = np.random.default_rng(1)
        logits = rng.normal(size=(2, 12, 4))
        deltas = rng.normal(size=(2, 12, 3, 4))
        targets = rng.normal(size=(2, 12, 4))
        classes = rng.integers(-1, 4, size=(2, 12)).astype(np.int32)
        valid = classes >= 0
        want = _rcnn_reference(logits, deltas, targets, classes, valid, beta)
        got = (losses.rcnn_class_loss(tf.constant(logits, tf.float32),
                                      classes, valid),
               losses.rcnn_box_loss(tf.constant(deltas, tf.float32),
                                    tf.constant(targets, tf.float32),
                                    classes, valid, beta))
        self.assertAllClose(got, want, atol=1e-5)

    @parameterized.named_parameters(('fp32', tf.float32), ('bf16', tf.bfloat16))
    def test_mask(self, dtype):
        rng = np.random.default_rng(2)
        logits = rng.normal(size=(2, 5, 6, 6))
        targets = rng.integers(0, 2, size=(2, 5, 6, 6)).astype(np.float32)
        positive = rng.integers(0, 2, size=(2, 5)).astype(bool)
        logits = tf.cast(tf.cast(logits, dtype), tf.float32).numpy()
        want = _mask_reference(logits, targets, positive)
        got = losses.mask_loss(tf.constant(logits, dtype), targets, positive)
        self.assertEqual(got.dtype, tf.float32)
        self.assertAllClose(got, want, atol=1e-5)

    def test_literal(self):
        # One positive anchor (logit 0: ln 2), one negative (logit 0: ln 2),
        # one ignored; 2 samples per image -> (2 ln 2) / 2.
        labels = tf.constant([[1, 0, -1]])
        self.assertAllClose(
            losses.rpn_objectness_loss(tf.zeros([1, 3]), labels, 2),
            np.log(2.0))
        # L1 |0.5| + |-1| over 2 samples.
        deltas = tf.constant([[[0.5, -1.0, 0.0, 0.0]] * 3])
        self.assertAllClose(
            losses.rpn_box_loss(deltas, tf.zeros([1, 3, 4]), labels, 2), 0.75)

    def test_empty(self):
        # No sampled roi and no positive mask: zero, not NaN.
        self.assertAllEqual(losses.rcnn_class_loss(
            tf.zeros([1, 3, 2]), tf.fill([1, 3], -1), tf.zeros([1, 3], bool)),
            0.0)
        self.assertAllEqual(losses.mask_loss(
            tf.zeros([1, 2, 4, 4]), tf.zeros([1, 2, 4, 4]),
            tf.zeros([1, 2], bool)), 0.0)
