"""Cascade R-CNN heads: stage targets against NumPy, one stage equal to the plain
heads, gradients, inference eager and under XLA, and a falling loss."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from mrcnn.modeling import roi_heads as heads_lib
from mrcnn.modeling.fpn import FPN
from mrcnn.modeling.mask_rcnn import MaskRCNN, build_mask_rcnn
from mrcnn.modeling.resnet import ResNet
from mrcnn.modeling.roi_heads import BoxHead, CascadeRoiHeads, MaskHead, RoiHeads
from mrcnn.modeling.rpn import RpnHead
from mrcnn.ops.boxes import encode_boxes
from tests.modeling.test_mask_rcnn import (_NUM_CLASSES, _SMALL, best_ious, overfit,
                                         synthetic_batch)

_LOSSES = sorted(["mask", "rpn_box", "rpn_objectness"] + [
    f"rcnn_{kind}_stage{k}" for k in (1, 2, 3) for kind in ("box", "class")])


_STEPS = 150


def _iou_matrix(a, b):
    a, b = a.astype(np.float64)[:, None], b.astype(np.float64)[None]
    h = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    w = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    area = lambda x: (x[..., 2] - x[..., 0]) * (x[..., 3] - x[..., 1])  # noqa: E731
    return h * w / (area(a) + area(b) - h * w)


class CascadeTest(tf.test.TestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        keras.utils.set_random_seed(0)
        cls.model = build_mask_rcnn(cascade_stages=3, **_SMALL)
        cls.batch = synthetic_batch()
        cls.model(cls.batch, training=False)

    def test_stage_targets_against_numpy(self):
        rng = np.random.default_rng(0)
        gt = np.array([[[10, 10, 50, 60], [40, 30, 90, 100], [0, 0, 0, 0]]], np.float32)
        gt_classes = np.array([[2, 3, 0]], np.int32)
        raw = gt[0, rng.integers(0, 2, 40)] + rng.normal(0, 8, (40, 4))
        y, x = np.sort(raw[:, [0, 2]], 1), np.sort(raw[:, [1, 3]], 1)
        boxes = np.stack([y[:, 0], x[:, 0], y[:, 1], x[:, 1]], 1)[None].astype(np.float32)
        valid = rng.uniform(size=(1, 40)) < 0.9
        heads = self.model.roi_heads
        for stage in (1, 2):
            classes, targets = heads._stage_targets(
                tf.constant(boxes), tf.constant(valid), tf.constant(gt),
                tf.constant(gt_classes), tf.constant(gt_classes > 0), stage)
            iou = _iou_matrix(boxes[0], gt[0, :2])
            best, index = iou.max(1), iou.argmax(1)
            positive = (best >= heads.stage_ious[stage]) & valid[0]
            want = np.where(positive, gt_classes[0, index], np.where(valid[0], 0, -1))
            np.testing.assert_array_equal(classes.numpy()[0], want)
            want_targets = encode_boxes(tf.constant(gt[0, index]), tf.constant(boxes[0]),
                                        heads.stage_box_weights[stage]).numpy()
            np.testing.assert_allclose(targets.numpy()[0],
                                       np.where(positive[:, None], want_targets, 0), atol=1e-5)
            self.assertGreater(positive.sum(), 3)
            self.assertGreater((valid[0] & ~positive).sum(), 3)

    def test_losses_and_gradients_reach_every_trainable_variable(self):
        with tf.GradientTape() as tape:
            losses = self.model(self.batch, training=True)
            total = tf.add_n(list(losses.values()))
        self.assertEqual(sorted(losses), _LOSSES)
        for name, value in losses.items():
            self.assertTrue(np.isfinite(value.numpy()), name)
        variables = self.model.trainable_variables
        grads = tape.gradient(total, variables)
        missing = [v.path for v, g in zip(variables, grads)
                   if g is None or not np.any(g.numpy())]
        self.assertEqual(missing, [])
        ids = {id(v) for v in variables}
        self.assertEqual(len(variables), len(ids))
        for head in self.model.roi_heads.box_heads:   # every stage's head is trained
            self.assertTrue(all(id(v) in ids for v in head.trainable_variables))

    def test_gradient_scale(self):
        x = tf.constant([1.0, -2.0])
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = tf.reduce_sum(heads_lib._scaled_gradient(x, 1 / 3) * 3.0)
        self.assertAllClose(tape.gradient(y, x), [1.0, 1.0])
        self.assertAllClose(heads_lib._scaled_gradient(x, 0.5), x)

    def test_inference_eager_and_xla(self):
        eager = self.model(self.batch, training=False)
        xla = tf.function(lambda b: self.model(b, training=False), jit_compile=True)(self.batch)
        self.assertEqual(eager["detection_boxes"].shape, (2, 100, 4))
        self.assertEqual(eager["detection_masks"].shape, (2, 100, 28, 28))
        self.assertGreater(int(eager["num_detections"].numpy().min()), 0)
        # An untrained head scores many boxes alike: near-equal scores may swap
        # order between the two compilations, so the scores are compared as
        # sorted values and the rest on the first 20, well separated here.
        self.assertAllClose(np.sort(eager["detection_scores"]), np.sort(xla["detection_scores"]),
                            atol=1e-5)
        for k in eager:
            first = (slice(None), slice(0, 20)) if eager[k].shape.rank > 1 else slice(None)
            self.assertAllClose(eager[k][first], xla[k][first], atol=2e-4, msg=k)

    def test_one_stage_is_the_plain_heads_with_a_class_agnostic_box_head(self):
        keras.utils.set_random_seed(3)
        box_head = BoxHead(num_classes=_NUM_CLASSES, fc_dim=64, class_agnostic=True)
        mask_head = MaskHead(num_classes=_NUM_CLASSES, channels=16)
        parts = dict(backbone=ResNet(depth=18, width=32), fpn=FPN(channels=32),
                     rpn_head=RpnHead(channels=32, pre_nms_topk_train=100,
                                      post_nms_topk_train=100, pre_nms_topk_test=100,
                                      post_nms_topk_test=100))
        plain = MaskRCNN(roi_heads=RoiHeads(box_head=box_head, mask_head=mask_head,
                                            num_samples=64), **parts)
        cascade = MaskRCNN(roi_heads=CascadeRoiHeads(
            box_heads=[box_head], mask_head=mask_head, stage_ious=(0.5,),
            stage_box_weights=((10.0, 10.0, 5.0, 5.0),), num_samples=64), **parts)
        out = []
        for model in (plain, cascade):
            tf.random.set_seed(5)   # the same samples for both
            out.append((model(self.batch, training=True),
                        model(self.batch, training=False)))
        (plain_losses, plain_det), (cascade_losses, cascade_det) = out
        self.assertAllClose(cascade_losses.pop("rcnn_class_stage1"),
                            plain_losses.pop("rcnn_class"))
        self.assertAllClose(cascade_losses.pop("rcnn_box_stage1"),
                            plain_losses.pop("rcnn_box"))
        self.assertAllClose(cascade_losses, plain_losses)
        self.assertGreater(int(plain_det["num_detections"].numpy().min()), 0)
        for k in plain_det:
            self.assertAllClose(cascade_det[k], plain_det[k], atol=1e-5, msg=k)

    def test_bad_arguments(self):
        head = BoxHead(num_classes=3, class_agnostic=True)
        with self.assertRaisesRegex(ValueError, "as many"):
            CascadeRoiHeads(box_heads=[head], mask_head=None, stage_ious=(0.5, 0.6))
        with self.assertRaisesRegex(ValueError, "class_agnostic"):
            CascadeRoiHeads(box_heads=[BoxHead(num_classes=3)], mask_head=None,
                            stage_ious=(0.5,), stage_box_weights=((10, 10, 5, 5),))

    def test_config_round_trip(self):
        heads = self.model.roi_heads
        clone = CascadeRoiHeads.from_config(heads.get_config())
        self.assertEqual(clone.stage_ious, heads.stage_ious)
        self.assertEqual(clone.stage_box_weights, heads.stage_box_weights)
        self.assertEqual(len(clone.box_heads), 3)
        self.assertTrue(all(h.class_agnostic for h in clone.box_heads))

    @pytest.mark.slow   # 50-95 s here; the plain model's twin runs in CI
    def test_overfit_two_images(self):
        """As the plain model's test: the losses fall, and the detections (the
        last stage's boxes) find every gt box of its class. The later stages'
        box losses are left out: they are summed over their positives, which
        grow in number as the earlier stages learn to regress (0.23 -> 0.29 at
        stage 2 here)."""
        keras.utils.set_random_seed(0)
        model = build_mask_rcnn(cascade_stages=3, **{**_SMALL, "freeze_at": 0, "width": 32})
        history = overfit(model, self.batch, _STEPS)
        for name in set(_LOSSES) - {"rcnn_box_stage2", "rcnn_box_stage3"}:
            first = np.mean([h[name] for h in history[:10]])
            last = np.mean([h[name] for h in history[-10:]])
            self.assertLess(last, 0.7 * first, (name, first, last))
        best = best_ious(self.batch, model(self.batch, training=False), 0.5)
        self.assertTrue((best > 0.7).all(), best)

    def test_test_time_augmentation_runs_the_cascade(self):
        from mrcnn.modeling.tta import TestTimeAugmentation
        plain = self.model(self.batch, training=False)
        out = TestTimeAugmentation(min_sizes=(128,), flip=False)(self.model, self.batch, 128)
        for k in plain:
            self.assertAllClose(out[k], plain[k], atol=1e-6, msg=k)

    def test_bfloat16_step_and_box_only(self):
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
        try:
            keras.utils.set_random_seed(2)
            model = build_mask_rcnn(cascade_stages=2, masks=False, **_SMALL)
            batch = {k: v for k, v in self.batch.items() if k != "gt_masks"}
            with tf.GradientTape() as tape:
                losses = model(batch, training=True)
                total = tf.add_n(list(losses.values()))
            grads = tape.gradient(total, model.trainable_variables)
            detections = model(batch, training=False)
        finally:
            keras.mixed_precision.set_global_policy("float32")
        self.assertNotIn("mask", losses)
        self.assertTrue(all(g is not None and np.isfinite(g.numpy()).all() for g in grads))
        self.assertNotIn("detection_masks", detections)
        self.assertEqual(detections["detection_boxes"].dtype, tf.float32)
