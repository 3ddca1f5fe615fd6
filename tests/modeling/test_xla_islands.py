"""XLA islands (`mrcnn.modeling._xla`): RoI sampling compiled inside graph steps;
the mask head on the batch's gathered positives in training and, outside XLA,
on the slots up to the last detection at inference."""

from unittest import mock

import keras
import numpy as np
import pytest
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
        # RPN targets (anchor matching) and RoI sampling among the islands.
        self.assertLen([n for n in names if n.startswith('__inference_targets_')], 1)
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


def _all_slots_mask_loss(heads, *args):
    """The mask loss with the head on all B x Kp slots, where `sample` put them."""
    return heads._slot_mask_loss(*args)


def _capacity_mask_loss(capacity):
    """`RoiHeads.mask_loss` on `capacity` gathered rois."""
    return lambda heads, *args: heads._gathered_mask_loss(*args, capacity)


def _positives(counts, slots=128):
    """bool [2, slots] holding `counts` positives in all, spread over both images."""
    flat = np.zeros(2 * slots, bool)
    flat[np.linspace(0, 2 * slots - 1, counts).astype(int)] = True
    return tf.constant(flat.reshape(slots, 2).T)


class MaskHeadSlotsTest(_SmallModelTest):
    """The mask head trains on the batch's positives gathered into one list
    (`RoiHeads.mask_loss`), and infers up to the last detection."""

    # Kp = 128. 16 mask channels (test_mask_rcnn's: 64): XLA:CPU runs the
    # switch_case branches' convolutions as generated loops, 16x less work.
    _OVERRIDES = {"num_samples": 512, "mask_channels": 16}

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        model, batch = cls.model, cls.batch
        # The XLA switch_case (default 1: none) with branches of 128 and 256
        # rois; each branch costs XLA:CPU ~5 s more to compile.
        model.roi_heads.mask_buckets = 2
        features, _, _, _, proposals, valid = model._first_stage(batch, True)
        cls.features = {l: features[l] for l in range(2, 6)}
        cls.rois = model.roi_heads.sample(proposals, valid, batch['gt_boxes'],
                                          batch['gt_classes'], batch['gt_valid'])

    def _loss_and_grads(self, loss_fn, heads=None, jit_compile=None):
        heads = heads or self.model.roi_heads
        features, rois, batch = self.features, self.rois, self.batch

        def run():
            with tf.GradientTape() as tape:
                tape.watch(features)
                loss = loss_fn(heads, features, rois, batch['gt_masks'], batch['gt_boxes'])
            variables = heads.mask_head.trainable_variables
            return loss, tape.gradient(loss, [variables, [features[l] for l in range(2, 6)]])

        return run() if jit_compile is None else tf.function(run, jit_compile=jit_compile)()

    def _assert_gathered_equal_all_slots(self, runs):
        positives = tf.reduce_sum(tf.cast(self.rois.classes > 0, tf.int32), axis=1).numpy()
        self.assertGreater(positives.min(), 0)
        self.assertLess(positives.sum(), 128)   # most of the 256 slots hold none
        want = self._loss_and_grads(_all_slots_mask_loss)
        self.assertGreater(float(want[0]), 0.0)
        for loss_fn, jit in runs:
            got = self._loss_and_grads(loss_fn, jit_compile=jit)
            for w, g in zip(tf.nest.flatten(want), tf.nest.flatten(got)):
                self.assertAllClose(w, g, rtol=1e-5, atol=1e-6, msg=f"{loss_fn} {jit}")

    def test_gathered_positives_give_the_loss_and_gradients_of_all_slots(self):
        mask_loss = type(self.model.roi_heads).mask_loss
        self._assert_gathered_equal_all_slots([
            (mask_loss, None), (mask_loss, False),   # eager, graph
            (_capacity_mask_loss(256), None)])       # the largest branch: 256 - 20 padding

    # The XLA switch_case of `mask_buckets > 1` (opt-in; the default, 1,
    # compiles no conditional: test_one_bucket_compiles_no_conditional):
    # 20-30 s each of XLA:CPU compiling, so `make test-slow`.
    @pytest.mark.slow
    def test_under_xla_the_switch_case_gives_the_loss_and_gradients_of_all_slots(self):
        # The 128-roi branch runs (fewer positives), not the 256.
        self._assert_gathered_equal_all_slots([(type(self.model.roi_heads).mask_loss, True)])

    def test_capacities_and_the_one_picked(self):
        heads = self.model.roi_heads
        self.assertEqual(heads.mask_capacities(2), [128, 256])
        with mock.patch.object(heads, 'mask_buckets', 1):
            self.assertEqual(heads.mask_capacities(2), [256])
        config = heads.get_config()
        self.assertEqual(config['mask_buckets'], 2)
        with self.assertRaisesRegex(ValueError, 'mask_buckets=0'):
            roi_heads.RoiHeads.from_config({**config, 'mask_buckets': 0})
        del config['mask_buckets']   # the default: no conditional under XLA
        self.assertEqual(roi_heads.RoiHeads.from_config(config).mask_buckets, 1)
        counts = [0, 1, 32, 33, 65, 129, 256]
        with mock.patch.object(heads, 'mask_buckets', 4):
            self.assertEqual(heads.mask_capacities(2), [32, 64, 128, 256])
            self.assertEqual(heads.mask_capacities(8), [128, 256, 512, 1024])
            capacities = tf.constant(heads.mask_capacities(2))
            under_xla = tf.function(
                lambda p: tf.gather(capacities, heads._capacity_index(p)), jit_compile=True)
            in_graph = tf.function(heads.mask_capacity)
            got = [(int(under_xla(_positives(n))), int(heads.mask_capacity(_positives(n))),
                    int(in_graph(_positives(n)))) for n in counts]
        # XLA: the smallest capacity that holds them; otherwise the count
        # rounded up to B * 16 = 32.
        self.assertEqual(got, [(32, 32, 32), (32, 32, 32), (32, 32, 32), (64, 64, 64),
                               (128, 96, 96), (256, 160, 160), (256, 256, 256)])

    def test_one_bucket_compiles_no_conditional(self):
        heads = self.model.roi_heads
        mask_loss = type(heads).mask_loss
        rois, features, batch = self.rois, self.features, self.batch
        ops = {}
        for buckets in (1, 2):
            with mock.patch.object(heads, 'mask_buckets', buckets):
                fn = tf.function(lambda: heads.mask_loss(features, rois, batch['gt_masks'],
                                                         batch['gt_boxes']), jit_compile=True)
                graph = fn.get_concrete_function().graph
                ops[buckets] = {op.type for op in graph.get_operations()}
                ops[buckets, 'loss'] = float(fn())
        self.assertEqual(ops[1] & {'Case', 'StatelessCase'}, set())
        self.assertNotEqual(ops[2] & {'Case', 'StatelessCase'}, set())
        self.assertAllClose(ops[1, 'loss'], ops[2, 'loss'], rtol=1e-6)
        self.assertAllClose(ops[1, 'loss'], self._loss_and_grads(mask_loss)[0], rtol=1e-5)

    @pytest.mark.slow
    def test_unbuilt_mask_head_first_called_in_a_branch_gets_its_variables(self):
        """A mask head not built yet builds inside the switch_case branches."""
        config = self.model.roi_heads.get_config()
        # Without its build config the restored head stays unbuilt.
        config["mask_head"] = {k: v for k, v in config["mask_head"].items()
                               if k != "build_config"}
        heads = roi_heads.RoiHeads.from_config(config)
        self.assertEqual(heads.mask_buckets, 2)
        self.assertEmpty(heads.mask_head.trainable_variables)
        loss, (grads, _) = self._loss_and_grads(type(heads).mask_loss, heads=heads,
                                                jit_compile=True)
        self.assertLen(grads, 12)   # 4 convs, the deconv, the predictor: kernel + bias
        for var, grad in zip(heads.mask_head.trainable_variables, grads):
            self.assertIsNotNone(grad, var.path)
        self.assertGreater(float(loss), 0.0)

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
