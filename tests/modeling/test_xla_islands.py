"""XLA islands (`mrcnn.modeling._xla`): RoI sampling compiled inside graph steps;
outside XLA, the mask head on the slots that can hold positives."""

from unittest import mock

import keras
import numpy as np
import tensorflow as tf

from mrcnn.modeling import _xla, roi_heads
from mrcnn.modeling.mask_rcnn import build_mask_rcnn
from tests.modeling.test_mask_rcnn import _SMALL, synthetic_batch


def _islands(graph_def):
    """Names of the functions in `graph_def` that XLA must compile."""
    return sorted(f.signature.name for f in graph_def.library.function
                  if f.attr["_XlaMustCompile"].b)


class _SmallModelTest(tf.test.TestCase):
    """test_mask_rcnn's small model (with `_OVERRIDES`), built eagerly once."""

    _OVERRIDES = {}

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        keras.utils.set_random_seed(0)
        cls.model = build_mask_rcnn(**dict(_SMALL, **cls._OVERRIDES))
        cls.batch = synthetic_batch()
        cls.model(cls.batch, training=True)  # variables made eagerly


class XlaIslandsTest(_SmallModelTest):

    def _traced(self, fn, enabled, jit_compile=False):
        with _xla.compile_ops(enabled):
            concrete = tf.function(fn, jit_compile=jit_compile).get_concrete_function()
        return concrete, _islands(concrete.graph.as_graph_def())

    def test_pooling_and_gradient_match_without_islands(self):
        """Box and mask RoIAlign, their gradients and mask targets: the same
        numbers as op-by-op graph mode (the islands only regroup the work)."""
        heads = self.model.roi_heads
        rng = np.random.default_rng(1)
        features = {l: tf.constant(rng.normal(size=(2, 128 // 2 ** l, 128 // 2 ** l, 64)),
                                   tf.float32) for l in range(2, 7)}
        rois = tf.constant(np.sort(rng.uniform(-8, 136, (2, 40, 2, 2)), axis=2)
                           .transpose(0, 1, 3, 2).reshape(2, 40, 4), tf.float32)
        matched = tf.constant(rng.integers(0, 4, (2, 40)), tf.int32)

        def run():
            with tf.GradientTape() as tape:
                tape.watch(features)
                box = heads._pool(features, rois, 7)
                mask = heads._pool(features, rois[:, :16], 14)
                loss = tf.reduce_sum(box ** 2) + tf.reduce_sum(tf.sin(mask))
            grads = tape.gradient(loss, features)
            targets = heads.mask_targets(self.batch['gt_masks'], rois[:, :16],
                                         matched[:, :16], self.batch['gt_boxes'])
            return box, mask, [grads[l] for l in range(2, 6)], targets

        plain, none = self._traced(run, False)
        islands, names = self._traced(run, True)
        self.assertEqual(none, [])
        # Compiled as a whole: the ops are part of the one program, no island.
        whole, nested = self._traced(run, True, jit_compile=True)
        self.assertEqual([n for n in nested if 'pool' in n or 'mask_targets' in n], [])
        # Two poolings and the mask targets, the poolings' backward passes
        # (compiled too) and their forward passes as the gradient calls them.
        self.assertLen([n for n in names if n.startswith('__inference__pool_')], 2)
        self.assertLen([n for n in names if n.startswith('__inference_mask_targets_')], 1)
        self.assertLen([n for n in names if n.startswith('__inference___backward__pool_')], 2)
        want, got = plain(), islands()
        for other in (got, whole()):
            for w, g in zip(tf.nest.flatten(want), tf.nest.flatten(other)):
                # Scatter-add gradients sum in another order: float32 rounding.
                self.assertAllClose(w, g, rtol=1e-4, atol=1e-4)
        self.assertGreater(float(tf.reduce_max(tf.abs(got[2][0]))), 0.0)

    def test_model_step_in_graph_mode(self):
        """Inference equals eager; a training graph gets gradients into every
        trainable variable through the islands."""
        model, batch = self.model, self.batch
        infer, names = self._traced(lambda: model(batch, training=False), True)
        self.assertNotEmpty(names)
        eager = model(batch, training=False)
        got = infer()
        self.assertAllEqual(eager['num_detections'], got['num_detections'])
        self.assertAllEqual(eager['detection_classes'], got['detection_classes'])
        for key in ('detection_boxes', 'detection_scores', 'detection_masks'):
            self.assertAllClose(eager[key], got[key], rtol=1e-4, atol=1e-4)

        def grads():
            with tf.GradientTape() as tape:
                total = tf.add_n(list(model.compute_losses(batch).values()))
            return tape.gradient(total, model.trainable_variables)

        step, names = self._traced(grads, True)
        self.assertNotEmpty(names)
        for var, grad in zip(model.trainable_variables, step()):
            self.assertIsNotNone(grad, var.path)
            self.assertGreater(float(tf.reduce_max(tf.abs(grad))), 0.0, var.path)

    def test_eager_calls_and_compile_ops_false_run_plain(self):
        self.assertTrue(_xla._enabled)
        with _xla.compile_ops(False):
            self.assertFalse(_xla._enabled)
            with _xla.compile_ops(True):
                self.assertTrue(_xla._enabled)
            self.assertFalse(_xla._enabled)
        self.assertTrue(_xla._enabled)
        calls = []

        @_xla.compiled
        def op(x):
            calls.append(tf.executing_eagerly())
            return x * 2.0

        self.assertAllEqual(op(tf.constant([1.0])), [2.0])
        self.assertEqual(calls, [True])   # eager: the method itself, no function


class MaskSlotsTest(_SmallModelTest):
    """Outside XLA the mask head trains on the slots that can hold positives."""

    _OVERRIDES = {"num_samples": 512}   # Kp = 128

    def test_trimmed_slots_give_the_loss_and_gradients_of_all_slots(self):
        model, batch = self.model, self.batch
        heads = model.roi_heads
        features, _, _, _, proposals, valid = model._first_stage(batch, True)
        rois = heads.sample(proposals, valid, batch['gt_boxes'], batch['gt_classes'],
                            batch['gt_valid'])
        variables = heads.mask_head.trainable_variables

        def loss_and_grads():
            with tf.GradientTape() as tape:
                tape.watch(features)
                loss = heads.mask_loss(features, rois, batch['gt_masks'], batch['gt_boxes'])
            return loss, tape.gradient(loss, [variables, [features[l] for l in range(2, 6)]])

        positives = tf.reduce_sum(tf.cast(rois.classes > 0, tf.int32), axis=1).numpy()
        kp = int(heads.mask_slots(rois.classes))
        self.assertEqual(kp, min(-(-max(positives.max(), 1) // 16) * 16, 128))
        self.assertLess(kp, heads.num_mask_rois)
        self.assertGreater(positives.min(), 0)
        trimmed = loss_and_grads()
        with mock.patch.object(roi_heads, 'in_xla_context', return_value=True):
            self.assertEqual(heads.mask_slots(rois.classes), heads.num_mask_rois)
            full = loss_and_grads()
        self.assertGreater(float(trimmed[0]), 0.0)
        for want, got in zip(tf.nest.flatten(full), tf.nest.flatten(trimmed)):
            self.assertAllClose(want, got, rtol=1e-5, atol=1e-7)

    def test_all_slots_under_xla_and_the_rounding(self):
        heads = self.model.roi_heads
        classes = tf.constant([[1] * 17 + [0] * 495, [2] * 3 + [-1] * 509], tf.int32)
        traced = tf.function(lambda c: tf.constant(heads.mask_slots(c)), jit_compile=True)
        self.assertEqual(int(traced(classes)), 128)
        self.assertEqual(int(heads.mask_slots(classes)), 32)
        self.assertEqual(int(tf.function(heads.mask_slots)(classes)), 32)
        self.assertEqual(int(heads.mask_slots(tf.zeros_like(classes))), 16)
        self.assertEqual(int(heads.mask_slots(tf.ones_like(classes))), 128)
        # Up to the last used slot, wherever the others are.
        self.assertEqual(int(heads.mask_slots(tf.constant([[0] * 33 + [1] + [0] * 478] * 2))),
                         48)

    def test_detection_masks_on_the_slots_up_to_the_last_detection(self):
        """Inference outside XLA runs the mask head up to the batch's last
        detection; the masks are those of all D slots (0 in the others)."""
        heads = self.model.roi_heads
        rng = np.random.default_rng(3)
        features = {l: tf.constant(rng.normal(size=(2, 128 // 2 ** l, 128 // 2 ** l, 64)),
                                   tf.float32) for l in range(2, 7)}
        boxes = tf.constant(np.sort(rng.uniform(0, 128, (2, 100, 2, 2)), axis=2)
                            .transpose(0, 1, 3, 2).reshape(2, 100, 4), tf.float32)
        classes = np.zeros((2, 100), np.int32)
        classes[0, :5] = [1, 2, 3, 1, 2]
        classes[1, [0, 1, 2, 20]] = 3   # a padded slot before a detection
        classes = tf.constant(classes)
        masks = heads.detect_masks(features, boxes, classes)
        graph = tf.function(heads.detect_masks).get_concrete_function(features, boxes, classes)
        self.assertEqual(graph.output_shapes, (2, 100, 28, 28))
        with mock.patch.object(roi_heads, 'in_xla_context', return_value=True):
            full = heads.detect_masks(features, boxes, classes)
        self.assertAllClose(full, masks, rtol=1e-6, atol=1e-7)
        self.assertAllEqual(tf.reduce_max(masks, axis=[2, 3]) > 0, classes > 0)
