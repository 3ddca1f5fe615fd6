"""RetinaNet: its head, FPN top block, focal loss and inference against NumPy
references, and the model end to end on synthetic batches."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from mrcnn.modeling import losses
from mrcnn.modeling.fpn import FPN
from mrcnn.modeling.resnet import ResNet
from mrcnn.modeling.retinanet import RetinaNet, RetinaNetHead, build_retinanet
from mrcnn.ops import anchors as anchor_ops
from tests.modeling.test_mask_rcnn import best_ious, overfit, synthetic_batch
from tests.ops.test_nms import _np_nms

_NUM_CLASSES = 3
# Small enough to train 120 steps in 25-40 s on 2 CPU cores.
_SMALL = dict(num_classes=_NUM_CLASSES, depth=18, width=32, norm="gn", freeze_at=0,
              fpn_channels=32, head_convs=2, anchor_sizes=(16, 32, 64, 128, 256),
              topk_candidates=300, max_detections=20)


# ---------------------------------------------------------------------------
# NumPy references (float64), from the papers and Detectron2's documented rules.

def _np_focal(logits, classes, normalizer, alpha, gamma):
    """Sigmoid focal loss summed over anchors with class >= 0, / normalizer."""
    logits = np.asarray(logits, np.float64)
    total = 0.0
    for index in np.ndindex(*logits.shape[:-1]):
        if classes[index] < 0:
            continue
        for c in range(logits.shape[-1]):
            t = 1.0 if classes[index] == c + 1 else 0.0
            p = 1.0 / (1.0 + math.exp(-logits[index][c]))
            p_t = p if t else 1.0 - p
            a_t = 1.0 if alpha < 0 else (alpha if t else 1.0 - alpha)
            total += -a_t * (1.0 - p_t) ** gamma * math.log(p_t)
    return total / normalizer


def _np_decode(d, a):
    """R-CNN decoding, weights 1, log scales clipped at log(1000 / 16)."""
    ha, wa = a[2] - a[0], a[3] - a[1]
    cy, cx = a[0] + ha / 2 + d[0] * ha, a[1] + wa / 2 + d[1] * wa
    h = math.exp(min(d[2], math.log(1000 / 16))) * ha
    w = math.exp(min(d[3], math.log(1000 / 16))) * wa
    return [cy - h / 2, cx - w / 2, cy + h / 2, cx + w / 2]


def _np_detect(class_logits, deltas, anchors, image_info, topk, threshold, nms_iou,
               max_detections):
    """Detectron2's `RetinaNet.inference_single_image`, one image at a time."""
    batch = image_info.shape[0]
    out = []
    for b in range(batch):
        boxes, scores, classes = [], [], []
        for level in sorted(anchors):
            probs = 1.0 / (1.0 + np.exp(-np.asarray(class_logits[level][b], np.float64)))
            flat = probs.reshape(-1)
            kept = [i for i in np.argsort(-flat, kind="stable") if flat[i] > threshold]
            for i in kept[:topk]:
                anchor, c = divmod(int(i), probs.shape[1])
                boxes.append(_np_decode(np.float64(deltas[level][b, anchor]),
                                        np.float64(anchors[level][anchor])))
                scores.append(flat[i])
                classes.append(c)
        keep = _np_nms(np.array(boxes).reshape(-1, 4), np.array(scores), max_detections,
                       nms_iou, groups=classes)
        oh, ow, _, _, scale = image_info[b]
        dets = []
        for i in keep:
            y1, x1, y2, x2 = (v / scale for v in boxes[i])
            dets.append(([min(max(y1, 0), oh), min(max(x1, 0), ow),
                          min(max(y2, 0), oh), min(max(x2, 0), ow)], scores[i],
                         classes[i] + 1))
        out.append(dets)
    return out


# ---------------------------------------------------------------------------

class RetinaNetHeadTest(tf.test.TestCase):

    def test_outputs_and_prior(self):
        keras.utils.set_random_seed(0)
        head = RetinaNetHead(num_classes=5, channels=16, num_convs=2)
        features = {3: tf.random.normal([2, 8, 6, 16]), 4: tf.random.normal([2, 4, 3, 16])}
        logits, deltas = head(features)
        self.assertEqual(logits[3].shape, (2, 8 * 6 * 9, 5))
        self.assertEqual(deltas[4].shape, (2, 4 * 3 * 9, 4))
        self.assertEqual(logits[3].dtype, tf.float32)
        # Every anchor starts near probability 0.01 for every class.
        self.assertAllClose(tf.reduce_mean(tf.sigmoid(logits[3])), 0.01, atol=2e-3)
        bias = head.class_logits.bias.numpy()
        self.assertAllClose(bias, np.full(45, -math.log(99.0)), atol=1e-6)
        # The towers are shared by the levels: one set of weights.
        self.assertLen(head.trainable_variables, 2 * 2 * 2 + 2 * 2)  # kernels and biases

    def test_rows_are_cells_then_anchors(self):
        # The class logit of (cell i, j; anchor a; class c) is channel a * C + c
        # of the conv output at (i, j): row (i * W + j) * A + a, column c.
        head = RetinaNetHead(num_classes=2, channels=4, num_convs=0, num_anchors=3)
        x = tf.random.normal([1, 2, 3, 4])
        logits, _ = head({3: x})
        raw = head.class_logits(x).numpy()  # [1, 2, 3, 6]
        self.assertAllClose(logits[3][0, (1 * 3 + 2) * 3 + 1], raw[0, 1, 2, 2:4])

    def test_group_norm_towers(self):
        head = RetinaNetHead(num_classes=2, channels=32, num_convs=2, norm="gn")
        logits, deltas = head({3: tf.random.normal([2, 4, 4, 32])})
        self.assertEqual(logits[3].shape, (2, 4 * 4 * 9, 2))
        paths = [v.path for v in head.trainable_variables]
        self.assertLen(paths, 2 * 2 * 4 + 2 * 2)  # conv kernel, bias, GN gamma, beta
        self.assertIn("retina_net_head_", paths[0])
        self.assertTrue(any("class_conv2_norm" in p for p in paths))
        # relu(GN(conv)): each tower's output is non-negative, GN-normalised.
        x = tf.random.normal([1, 4, 4, 32])
        y = head.class_norms[0](head.class_convs[0](x))
        self.assertAllClose(tf.reduce_mean(y), 0.0, atol=1e-4)

    def test_bad_arguments(self):
        with self.assertRaisesRegex(ValueError, "prior_prob"):
            RetinaNetHead(prior_prob=1.0)
        with self.assertRaisesRegex(ValueError, "norm"):
            RetinaNetHead(norm="bn")


class FpnTopBlockTest(tf.test.TestCase):

    def _features(self):
        rng = np.random.default_rng(0)
        return {level: tf.constant(rng.normal(size=(2, 64 // 2 ** level, 32 // 2 ** level, 8)),
                                   tf.float32) for level in (2, 3, 4, 5)}

    def test_p6p7_from_c5_is_symmetrically_padded_strided_convs(self):
        keras.utils.set_random_seed(0)
        fpn = FPN(channels=16, min_level=3, max_level=7, top_block="p6p7")
        features = self._features()
        out = fpn(features)
        self.assertEqual(sorted(out), [3, 4, 5, 6, 7])
        self.assertEqual(out[6].shape, (2, 1, 1, 16))
        self.assertEqual(out[7].shape, (2, 1, 1, 16))

        def torch_conv(x, conv):  # PyTorch's Conv2d(3, stride 2, padding 1)
            return tf.nn.conv2d(x, conv.kernel, 2, [[0, 0], [1, 1], [1, 1], [0, 0]]) + conv.bias

        p6 = torch_conv(features[5], fpn.p6)
        self.assertAllClose(out[6], p6, atol=1e-5)
        self.assertAllClose(out[7], torch_conv(tf.nn.relu(p6), fpn.p7), atol=1e-5)
        # A larger grid, where Keras 'same' would pad one side only.
        features = {l: tf.tile(f, [1, 4, 4, 1]) for l, f in features.items()}
        self.assertAllClose(fpn(features)[6], torch_conv(features[5], fpn.p6), atol=1e-4)

    def test_p6p7_from_p5(self):
        fpn = FPN(channels=16, min_level=3, max_level=7, top_block="p6p7",
                  top_block_input="p5")
        out = fpn(self._features())
        self.assertEqual(fpn.p6.kernel.shape, (3, 3, 16, 16))  # reads P5, not C5 (8)
        self.assertEqual(out[7].shape, (2, 1, 1, 16))
        with self.assertRaisesRegex(ValueError, "top_block"):
            FPN(top_block="conv")


class FocalLossTest(tf.test.TestCase):

    def test_against_reference(self):
        rng = np.random.default_rng(1)
        logits = rng.normal(0, 3, size=(2, 7, 4)).astype(np.float32)
        classes = rng.integers(-1, 5, size=(2, 7)).astype(np.int32)
        for alpha, gamma in ((0.25, 2.0), (0.5, 1.5), (-1.0, 0.0)):
            got = losses.focal_loss(logits, classes, 3.0, alpha, gamma)
            self.assertEqual(got.dtype, tf.float32)
            self.assertAllClose(got, _np_focal(logits, classes, 3.0, alpha, gamma),
                                rtol=1e-5)
        # gamma 0, no alpha: plain sigmoid cross-entropy over counted anchors.
        targets = tf.one_hot(classes - 1, 4)
        bce = tf.nn.sigmoid_cross_entropy_with_logits(targets, logits)
        self.assertAllClose(losses.focal_loss(logits, classes, 1.0, -1.0, 0.0),
                            tf.reduce_sum(bce * tf.cast(classes >= 0, tf.float32)[..., None]))

    def test_dense_box_loss(self):
        rng = np.random.default_rng(2)
        deltas = rng.normal(size=(2, 5, 4)).astype(np.float32)
        targets = rng.normal(size=(2, 5, 4)).astype(np.float32)
        labels = np.array([[1, 0, -1, 1, 0], [0, 0, 1, -1, -1]], np.int32)
        diff = np.abs(deltas - targets).astype(np.float64)
        want = np.where(diff < 0.1, 0.5 * diff ** 2 / 0.1, diff - 0.05)
        want = np.sum(want * (labels == 1)[..., None]) / 3.0
        self.assertAllClose(losses.dense_box_loss(deltas, targets, labels, 3.0, 0.1), want,
                            rtol=1e-5)


class DetectBoxesTest(tf.test.TestCase):
    """`RetinaNet.detect_boxes` against Detectron2's inference, re-done in NumPy."""

    def test_against_reference_eager_and_xla(self):
        model = RetinaNet(backbone=ResNet(depth=18), fpn=FPN(min_level=3, max_level=5,
                                                             top_block="p6p7"),
                          head=RetinaNetHead(num_classes=4), anchor_sizes=(16, 32, 64),
                          topk_candidates=50, max_detections=30, score_threshold=0.3)
        anchors = model.anchors((64, 96))
        rng = np.random.default_rng(3)
        logits = {l: tf.constant(rng.normal(-1.5, 1.5, size=(2, len(a), 4)), tf.float32)
                  for l, a in anchors.items()}
        deltas = {l: tf.constant(rng.normal(0, 0.3, size=(2, len(a), 4)), tf.float32)
                  for l, a in anchors.items()}
        # Every level has more than 50 (anchor, class) pairs (level 5: 2 x 3
        # cells x 9 anchors x 4 classes), so top-k cuts each; image 1 is at scale 0.5.
        image_info = np.array([[64, 96, 64, 96, 1.0], [128, 150, 64, 75, 0.5]], np.float32)
        want = _np_detect({l: v.numpy() for l, v in logits.items()},
                          {l: v.numpy() for l, v in deltas.items()},
                          {l: v.numpy() for l, v in anchors.items()}, image_info, 50, 0.3,
                          0.5, 30)
        xla = tf.function(model.detect_boxes, jit_compile=True)
        for out in (model.detect_boxes(logits, deltas, anchors, image_info),
                    xla(logits, deltas, anchors, image_info)):
            for b, dets in enumerate(want):
                n = len(dets)
                self.assertEqual(int(out["num_detections"][b]), n)
                self.assertGreater(n, 5)
                self.assertAllClose(out["detection_boxes"][b, :n], [d[0] for d in dets],
                                    atol=1e-3)
                self.assertAllClose(out["detection_scores"][b, :n], [d[1] for d in dets],
                                    atol=1e-6)
                self.assertAllEqual(out["detection_classes"][b, :n], [d[2] for d in dets])
                self.assertAllEqual(out["detection_classes"][b, n:], np.zeros(30 - n))
                self.assertAllEqual(out["detection_boxes"][b, n:], np.zeros((30 - n, 4)))

    def test_anchor_counts_must_match_the_head(self):
        with self.assertRaisesRegex(ValueError, "num_anchors"):
            RetinaNet(backbone=ResNet(depth=18), fpn=FPN(min_level=3, max_level=7,
                                                         top_block="p6p7"),
                      head=RetinaNetHead(num_anchors=3))
        with self.assertRaisesRegex(ValueError, "anchor_sizes"):
            RetinaNet(backbone=ResNet(depth=18), fpn=FPN(), head=RetinaNetHead(),
                      anchor_sizes=(32, 64))


class RetinaNetModelTest(tf.test.TestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        keras.utils.set_random_seed(0)
        cls.model = build_retinanet(**_SMALL)
        cls.batch = synthetic_batch()
        cls.model(cls.batch, training=True)  # build eagerly

    def test_losses_eager_and_xla(self):
        eager = self.model.compute_losses(self.batch)
        self.assertEqual(sorted(eager), ["retinanet_box", "retinanet_class"])
        xla = tf.function(self.model.compute_losses, jit_compile=True)(self.batch)
        for name, value in eager.items():
            self.assertEqual(value.dtype, tf.float32)
            self.assertTrue(np.isfinite(value.numpy()), name)
            self.assertAllClose(value, xla[name], rtol=1e-4, msg=name)
        # The prior makes the first focal loss about that of probability 0.01
        # everywhere, of order 1 (Detectron2 starts at ~1.1), not the ~100s
        # of a 0.5 prior.
        self.assertBetween(float(eager["retinanet_class"]), 0.3, 3.0)

    def test_gradients_reach_every_trainable_variable(self):
        with tf.GradientTape() as tape:
            total = tf.add_n(list(self.model.compute_losses(self.batch).values()))
        grads = tape.gradient(total, self.model.trainable_variables)
        paths = [v.path for v in self.model.trainable_variables]
        self.assertTrue(any("p7" in p for p in paths) and any("box_deltas" in p for p in paths))
        for var, grad in zip(self.model.trainable_variables, grads):
            self.assertIsNotNone(grad, var.path)
            self.assertGreater(float(tf.reduce_max(tf.abs(grad))), 0.0, var.path)

    def test_inference_outputs(self):
        # Under XLA: the head's in test_losses_eager_and_xla, the rest in
        # DetectBoxesTest (a whole-model compile here cost 8 s).
        want = {"detection_boxes": ((2, 20, 4), tf.float32),
                "detection_scores": ((2, 20), tf.float32),
                "detection_classes": ((2, 20), tf.int32),
                "num_detections": ((2,), tf.int32)}
        out = self.model.detect(self.batch)
        self.assertEqual({k: (tuple(v.shape), v.dtype) for k, v in out.items()}, want)
        self.assertEqual(self.model.num_classes, _NUM_CLASSES)
        self.assertFalse(self.model.has_masks or self.model.has_keypoints)

    def test_bfloat16_losses_and_detections(self):
        # The layers compute in bfloat16; heads, losses and boxes stay float32.
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
        try:
            keras.utils.set_random_seed(1)
            model = build_retinanet(**_SMALL)
            losses = model.compute_losses(self.batch)
            out = model.detect(self.batch)
        finally:
            keras.mixed_precision.set_global_policy("float32")
        self.assertEqual(model.head.class_convs[0].compute_dtype, "bfloat16")
        for name, value in losses.items():
            self.assertEqual(value.dtype, tf.float32)
            self.assertTrue(np.isfinite(value.numpy()), name)
        self.assertEqual(out["detection_boxes"].dtype, tf.float32)

    def test_test_time_augmentation_is_refused(self):
        from mrcnn.evaluation import runner
        from mrcnn.modeling.tta import TestTimeAugmentation
        with self.assertRaisesRegex(ValueError, "RetinaNet has none"):
            runner._inference_fn(self.model, TestTimeAugmentation(min_sizes=(128,)), 128)

    @pytest.mark.slow   # 25-40 s here; the Mask R-CNN twin runs in CI
    def test_overfit_two_images(self):
        keras.utils.set_random_seed(0)
        model = build_retinanet(**_SMALL)
        batch = synthetic_batch()
        history = overfit(model, batch, 120)
        for name in ("retinanet_class", "retinanet_box"):
            first = np.mean([h[name] for h in history[:10]])
            last = np.mean([h[name] for h in history[-10:]])
            self.assertLess(last, 0.5 * first, (name, first, last))
        best = best_ious(batch, model.detect(batch), 0.3)
        self.assertTrue((best > 0.7).all(), best)

    def test_anchors_are_the_ops_anchors(self):
        anchors = self.model.anchors((128, 128))
        want = anchor_ops.multilevel_anchors((128, 128), 3, 7, (16, 32, 64, 128, 256),
                                             (0.5, 1.0, 2.0), 3)
        self.assertEqual(sorted(anchors), [3, 4, 5, 6, 7])
        for level in want:
            self.assertAllEqual(anchors[level], want[level])
