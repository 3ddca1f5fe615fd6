"""Keypoint R-CNN: the keypoint head against NumPy (PyTorch's transposed
convolution and bilinear upsampling, written from their definitions), the
keypoint loss, its gathered and per-slot forms, and the model's outputs."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from mrcnn.modeling import losses as loss_lib
from mrcnn.modeling.mask_rcnn import build_mask_rcnn
from mrcnn.modeling.roi_heads import BoxHead, KeypointHead, RoiHeads
from mrcnn.ops import targets as target_ops
from tests.modeling.test_mask_rcnn import _B, _SMALL, synthetic_batch

_K = 4


def conv_transpose_reference(x, kernel, stride, padding):
    """PyTorch `ConvTranspose2d` on x [h, w, c_in] with `kernel` [kh, kw,
    c_out, c_in] (Keras' layout): every input cell adds kernel x value at
    (i * stride + a, j * stride + b) of the full output, less `padding` cells
    on each side."""
    h, w, _ = x.shape
    kh, kw, c_out, _ = kernel.shape
    full = np.zeros(((h - 1) * stride + kh, (w - 1) * stride + kw, c_out))
    for i in range(h):
        for j in range(w):
            full[i * stride:i * stride + kh, j * stride:j * stride + kw] += np.einsum(
                "aboc,c->abo", kernel, x[i, j])
    return full[padding:full.shape[0] - padding, padding:full.shape[1] - padding]


def upsample2_reference(x):
    """PyTorch `interpolate(scale_factor=2, mode="bilinear",
    align_corners=False)` of x [h, w, c]."""
    h, w, _ = x.shape

    def taps(n):
        src = np.maximum((np.arange(2 * n) + 0.5) / 2 - 0.5, 0.0)
        lo = np.minimum(np.floor(src).astype(int), n - 1)
        return lo, np.minimum(lo + 1, n - 1), src - lo

    y0, y1, fy = taps(h)
    x0, x1, fx = taps(w)
    top = x[y0][:, x0] * (1 - fx)[None, :, None] + x[y0][:, x1] * fx[None, :, None]
    bottom = x[y1][:, x0] * (1 - fx)[None, :, None] + x[y1][:, x1] * fx[None, :, None]
    return top * (1 - fy)[:, None, None] + bottom * fy[:, None, None]


class KeypointHeadTest(tf.test.TestCase):

    def test_against_numpy(self):
        head = KeypointHead(num_keypoints=3, channels=6, num_convs=2)
        rng = np.random.default_rng(0)
        pooled = rng.normal(size=(2, 3, 5, 5, 4)).astype(np.float32)
        out = head(tf.constant(pooled))
        self.assertEqual(out.shape, (2, 3, 3, 20, 20))
        self.assertEqual(out.dtype, tf.float32)
        for layer in [*head.convs, head.deconv]:   # biases start at 0: give them values
            layer.bias.assign(rng.normal(size=layer.bias.shape))
        out = head(tf.constant(pooled)).numpy()
        for b, n in ((0, 0), (1, 2)):
            x = pooled[b, n].astype(np.float64)
            for conv in head.convs:
                k = conv.kernel.numpy().astype(np.float64)
                padded = np.pad(x, [(1, 1), (1, 1), (0, 0)])
                x = np.maximum(sum(np.einsum("hwc,cd->hwd", padded[a:a + 5, c:c + 5], k[a, c])
                                   for a in range(3) for c in range(3))
                               + conv.bias.numpy(), 0.0)
            x = conv_transpose_reference(x, head.deconv.kernel.numpy().astype(np.float64),
                                         2, 1) + head.deconv.bias.numpy()
            self.assertEqual(x.shape, (10, 10, 3))
            want = upsample2_reference(x).transpose(2, 0, 1)
            self.assertAllClose(out[b, n], want, atol=1e-4, rtol=1e-4)

    def test_keypoint_loss_against_numpy(self):
        rng = np.random.default_rng(1)
        logits = rng.normal(size=(2, 3, _K, 6, 6)).astype(np.float32)
        index = rng.integers(0, 36, (2, 3, _K)).astype(np.int32)
        valid = rng.random((2, 3, _K)) < 0.6
        got = loss_lib.keypoint_loss(logits, index, valid)
        flat = logits.reshape(2, 3, _K, 36).astype(np.float64)
        lse = np.log(np.exp(flat).sum(-1))
        ce = lse - np.take_along_axis(flat, index[..., None], -1)[..., 0]
        self.assertAllClose(got, (ce * valid).sum() / valid.sum(), rtol=1e-6)
        self.assertEqual(float(loss_lib.keypoint_loss(logits, index, valid & False)), 0.0)


class KeypointModelTest(tf.test.TestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        keras.utils.set_random_seed(0)
        cls.model = build_mask_rcnn(**_SMALL, masks=False, keypoints=_K,
                                    keypoint_channels=16, keypoint_convs=2)
        cls.batch = synthetic_batch()

    def test_losses_and_gradients(self):
        with tf.GradientTape() as tape:
            losses = self.model(self.batch, training=True)
            total = tf.add_n(list(losses.values()))
        self.assertIn("keypoint", losses)
        self.assertNotIn("mask", losses)
        # An untrained head spreads each heatmap: about log(56 * 56) or more.
        self.assertBetween(float(losses["keypoint"]), 0.9 * np.log(56 * 56),
                           1.5 * np.log(56 * 56))
        head_vars = [v for v in self.model.trainable_variables if "keypoint_head" in v.path]
        self.assertLen(head_vars, 6)
        grads = tape.gradient(total, self.model.trainable_variables)
        for var, grad in zip(self.model.trainable_variables, grads):
            self.assertIsNotNone(grad, var.path)
            self.assertGreater(float(tf.reduce_max(tf.abs(grad))), 0.0, var.path)
        batch = {k: v for k, v in self.batch.items() if k != "gt_keypoints"}
        with self.assertRaisesRegex(ValueError, "no gt_keypoints"):
            self.model(batch, training=True)

    def _sampled_rois(self):
        """The model's RoI heads, features and sampled rois of the batch."""
        heads = self.model.roi_heads
        features, proposals, valid = self.model.proposals(self.batch)
        b = self.batch
        rois = target_ops.sample_proposals(
            proposals, valid, b["gt_boxes"], b["gt_classes"], b["gt_valid"],
            num_samples=heads.num_samples, seed=3)
        return heads, features, rois

    def test_gathered_loss_equals_slot_loss(self):
        """Outside XLA the head runs on the gathered rois with keypoint
        targets; under XLA on every slot (and on capacities with
        mask_buckets): the same loss."""
        heads, features, rois = self._sampled_rois()
        b = self.batch
        eager = heads.keypoint_loss(features, rois, b["gt_keypoints"])
        xla = tf.function(heads.keypoint_loss, jit_compile=True)(
            features, rois, b["gt_keypoints"])
        self.assertAllClose(eager, xla, rtol=1e-5)
        graph = tf.function(heads.keypoint_loss)(features, rois, b["gt_keypoints"])
        self.assertAllClose(eager, graph, rtol=1e-5)
        # Only positives with a labelled keypoint inside count: none labelled, 0.
        unlabelled = tf.zeros_like(b["gt_keypoints"])
        self.assertEqual(float(heads.keypoint_loss(features, rois, unlabelled)), 0.0)

    @pytest.mark.slow   # its XLA switch_case compiles each capacity, as the mask head's twin
    def test_gathered_loss_over_capacities_under_xla(self):
        heads, features, rois = self._sampled_rois()
        b = self.batch
        bucketed = RoiHeads(box_head=heads.box_head, mask_head=None,
                            keypoint_head=heads.keypoint_head,
                            num_samples=heads.num_samples, mask_buckets=2)
        got = tf.function(bucketed.keypoint_loss, jit_compile=True)(
            features, rois, b["gt_keypoints"])
        self.assertAllClose(heads.keypoint_loss(features, rois, b["gt_keypoints"]), got,
                            rtol=1e-5)

    def test_detections(self):
        out = self.model.detect(self.batch)
        points = out["detection_keypoints"].numpy()
        self.assertEqual(points.shape, (_B, 100, _K, 3))
        n = out["num_detections"].numpy()
        boxes = out["detection_boxes"].numpy()
        self.assertGreater(n[0], 0)
        for i in range(_B):
            self.assertTrue((points[i, n[i]:] == 0).all())
            live = points[i, :n[i]]
            # Each keypoint lies in its box (image pixels), scores in (0, 1].
            lo, hi = boxes[i, :n[i], None, :2], boxes[i, :n[i], None, 2:]
            self.assertTrue(((live[..., :2] >= lo - 1e-3) & (live[..., :2] <= hi + 1e-3)).all())
            self.assertTrue(((live[..., 2] > 0) & (live[..., 2] <= 1)).all())

    def test_detect_keypoints_eager_graph_and_xla(self):
        """The head on the detections (a graph trims them to the leading
        slots, a count known when run; XLA runs all), scaled to the original
        image."""
        heads = self.model.roi_heads
        features, _, _ = self.model.proposals(self.batch)
        boxes = tf.constant(np.tile([[[8, 10, 60, 50], [30, 70, 100, 122], [0, 0, 0, 0]]],
                                    (_B, 7, 1))[:, :20], tf.float32)   # [B, 20, 4]
        classes = tf.constant(np.tile([[1, 2, 0]], (_B, 7))[:, :20], tf.int32)
        classes = tf.concat([classes[:, :5], tf.zeros([_B, 15], tf.int32)], axis=1)
        info = tf.constant([[64, 64, 128, 128, 2.0]] * _B, tf.float32)
        eager = heads.detect_keypoints(features, boxes, classes, info)
        graph = tf.function(heads.detect_keypoints)(features, boxes, classes, info)
        xla = tf.function(heads.detect_keypoints, jit_compile=True)(
            features, boxes, classes, info)
        for out in (graph, xla):
            self.assertAllClose(eager, out, atol=1e-4)
        points = eager.numpy()
        self.assertTrue((points[classes.numpy() == 0] == 0).all())
        # In the original image's pixels: the resized boxes halved.
        live = points[0, :5][classes.numpy()[0, :5] > 0]
        lo = boxes.numpy()[0, :5][classes.numpy()[0, :5] > 0, None, :2] / 2
        hi = boxes.numpy()[0, :5][classes.numpy()[0, :5] > 0, None, 2:] / 2
        self.assertTrue(((live[..., :2] >= lo) & (live[..., :2] <= hi)).all())

    def test_with_a_mask_head_too(self):
        """Masks and keypoints in one model (the Mask R-CNN paper's joint
        model): both losses, both outputs."""
        model = build_mask_rcnn(**_SMALL, keypoints=_K, keypoint_channels=8,
                                keypoint_convs=1)
        losses = model(self.batch, training=True)
        self.assertIn("mask", losses)
        self.assertIn("keypoint", losses)
        out = model.detect(self.batch)
        self.assertEqual(out["detection_masks"].shape[:2], out["detection_keypoints"].shape[:2])

    def test_config_round_trip(self):
        heads = self.model.roi_heads
        clone = RoiHeads.from_config(heads.get_config())
        self.assertIsInstance(clone.keypoint_head, KeypointHead)
        self.assertEqual(clone.keypoint_head.num_keypoints, _K)
        self.assertEqual(clone.heatmap_size, 56)
        plain = RoiHeads(box_head=BoxHead(num_classes=3), mask_head=None)
        self.assertIsNone(RoiHeads.from_config(plain.get_config()).keypoint_head)
