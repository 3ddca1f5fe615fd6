"""FPN, RPN head and proposals, box and mask heads."""

import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from mrcnn.modeling import norms
from mrcnn.modeling.fpn import FPN
from mrcnn.modeling.roi_heads import BoxHead, MaskHead, RoiHeads
from mrcnn.modeling.rpn import RpnHead

_B = 2
_CANVAS = 128


def _backbone_features(channels=(8, 16, 32, 64), seed=0):
    rng = np.random.default_rng(seed)
    return {l: tf.constant(rng.normal(size=(
        _B, _CANVAS // 2 ** l, _CANVAS // 2 ** l, c)), tf.float32)
        for l, c in zip(range(2, 6), channels)}


def _pyramid(channels=16, seed=0):
    rng = np.random.default_rng(seed)
    return {l: tf.constant(rng.normal(size=(
        _B, _CANVAS // 2 ** l, _CANVAS // 2 ** l, channels)), tf.float32)
        for l in range(2, 7)}


class FPNTest(tf.test.TestCase):

    def test_shapes_and_p6(self):
        fpn = FPN(channels=16)
        out = fpn(_backbone_features())
        self.assertEqual(sorted(out), [2, 3, 4, 5, 6])
        for level, x in out.items():
            side = _CANVAS // 2 ** level
            self.assertEqual(x.shape, (_B, side, side, 16))
        self.assertAllEqual(out[6], out[5][:, ::2, ::2])

    def test_top_down_reference(self):
        # NumPy reference of the top-down path with 1x1 output convs.
        fpn = FPN(channels=4)
        feats = _backbone_features((3, 3, 3, 3))
        fpn(feats)
        for conv in fpn.output_convs:
            k = np.zeros(conv.kernel.shape, np.float32)
            k[1, 1] = np.eye(4)  # 3x3 conv that copies its centre
            conv.kernel.assign(k)
        out = fpn(feats)
        top = None
        for level in range(5, 1, -1):
            lat = fpn.lateral[level - 2]
            x = np.einsum('bhwc,cd->bhwd', feats[level].numpy().astype(np.float64),
                          lat.kernel.numpy()[0, 0]) + lat.bias.numpy()
            if top is not None:
                x = x + top.repeat(2, axis=1).repeat(2, axis=2)
            top = x
            self.assertAllClose(out[level], x + fpn.output_convs[level - 2]
                                .bias.numpy(), atol=1e-4)

    def test_config_round_trip(self):
        fpn = FPN(channels=32, max_level=7)
        self.assertEqual(FPN.from_config(fpn.get_config()).get_config(),
                         fpn.get_config())

    def test_norms(self):
        """A norm after every conv, which then has no bias; batch norm uses
        the batch's statistics in training only, GroupNorm its own always."""
        feats = _backbone_features()
        for norm in ("gn", "bn", "sync_bn"):
            fpn = FPN(channels=32, norm=norm)
            infer = fpn(feats, training=False)
            train = fpn(feats, training=True)
            self.assertEqual({l: x.shape for l, x in train.items()},
                             {l: (_B, _CANVAS // 2 ** l, _CANVAS // 2 ** l, 32)
                              for l in range(2, 7)})
            self.assertFalse([w.path for w in fpn.weights if w.path.endswith("bias")])
            self.assertLen(fpn.lateral_norms + fpn.output_norms, 8)
            if norm == "gn":
                self.assertAllClose(infer[3], train[3])
                # Each of 32 groups of one channel: mean 0, variance 1 per image.
                self.assertAllClose(tf.reduce_mean(train[3], axis=[1, 2]),
                                    tf.zeros([_B, 32]), atol=1e-5)
            else:
                self.assertNotAllClose(infer[3], train[3])
            self.assertEqual(FPN.from_config(fpn.get_config()).get_config()["norm"], norm)
        self.assertIsNone(FPN(norm="").norm)
        with self.assertRaisesRegex(ValueError, "FPN: norm='frozen_bn' must be None or"):
            FPN(norm="frozen_bn")


class RpnHeadTest(tf.test.TestCase, parameterized.TestCase):

    def test_output_shapes(self):
        head = RpnHead(channels=16)
        objectness, deltas = head(_pyramid())
        anchors = head.anchors((_CANVAS, _CANVAS))
        for level in range(2, 7):
            n = anchors[level].shape[0]
            self.assertEqual(objectness[level].shape, (_B, n))
            self.assertEqual(deltas[level].shape, (_B, n, 4))
            self.assertEqual(objectness[level].dtype, tf.float32)

    def test_bf16_outputs_float32(self):
        head = RpnHead(channels=16, dtype='mixed_bfloat16')
        objectness, deltas = head(_pyramid())
        self.assertEqual(objectness[2].dtype, tf.float32)
        self.assertEqual(deltas[6].dtype, tf.float32)

    @parameterized.named_parameters(('train', True, 300), ('test', False, 100))
    def test_proposals(self, training, post):
        head = RpnHead(channels=16, pre_nms_topk_train=500,
                       pre_nms_topk_test=200, post_nms_topk_train=post,
                       post_nms_topk_test=post)
        feats = _pyramid()
        objectness, deltas = head(feats)
        anchors = head.anchors((_CANVAS, _CANVAS))
        image_size = tf.constant([[100.0, 128.0], [128.0, 90.0]])
        fn = lambda o, d: head.proposals(o, d, anchors, image_size,
                                         (_CANVAS, _CANVAS), training)
        boxes, valid = fn(objectness, deltas)
        xla_boxes, xla_valid = tf.function(fn, jit_compile=True)(
            objectness, deltas)
        self.assertEqual(boxes.shape, (_B, post, 4))
        self.assertAllEqual(valid, xla_valid)
        self.assertAllClose(boxes, xla_boxes, atol=1e-4)
        boxes, valid = boxes.numpy(), valid.numpy()
        self.assertTrue(valid.any())
        # Inside each resized image, non-empty, padding zero.
        for b in range(_B):
            v = boxes[b][valid[b]]
            self.assertTrue((v >= 0).all())
            self.assertTrue((v[:, 2] <= image_size[b, 0].numpy()).all())
            self.assertTrue((v[:, 3] <= image_size[b, 1].numpy()).all())
            self.assertTrue((v[:, 2] > v[:, 0]).all())
            self.assertAllEqual(boxes[b][~valid[b]], 0 * boxes[b][~valid[b]])
            # Valid slots come first.
            n = valid[b].sum()
            self.assertTrue(valid[b, :n].all())

    def test_nms_never_crosses_levels(self):
        # Two identical boxes from different levels both survive NMS
        # (Detectron2 runs NMS per level).
        head = RpnHead(channels=16, pre_nms_topk_test=1,
                       post_nms_topk_test=5)
        box = tf.constant([[10.0, 10.0, 50.0, 50.0]])
        anchors = {l: box for l in range(2, 7)}
        objectness = {l: tf.fill([1, 1], float(l)) for l in range(2, 7)}
        deltas = {l: tf.zeros([1, 1, 4]) for l in range(2, 7)}
        boxes, valid = head.proposals(objectness, deltas, anchors,
                                      tf.constant([[64.0, 64.0]]), (64, 64),
                                      False)
        self.assertAllEqual(valid, [[True] * 5])
        self.assertAllClose(boxes[0], tf.tile(box, [5, 1]))

    def test_config_round_trip(self):
        head = RpnHead(channels=32, pre_nms_topk_train=100, nms_iou=0.6)
        self.assertEqual(RpnHead.from_config(head.get_config()).get_config(),
                         head.get_config())

    def test_bad_sizes(self):
        with self.assertRaisesRegex(ValueError, 'anchor_sizes'):
            RpnHead(anchor_sizes=(32, 64))


class RoiHeadLayersTest(tf.test.TestCase, parameterized.TestCase):

    @parameterized.named_parameters(('fp32', 'float32'),
                                    ('bf16', 'mixed_bfloat16'))
    def test_box_head(self, policy):
        head = BoxHead(num_classes=5, fc_dim=32, dtype=policy)
        logits, deltas = head(tf.zeros([_B, 10, 7, 7, 8]))
        self.assertEqual(logits.shape, (_B, 10, 6))
        self.assertEqual(deltas.shape, (_B, 10, 5, 4))
        self.assertEqual(logits.dtype, tf.float32)
        self.assertEqual(deltas.dtype, tf.float32)

    @parameterized.named_parameters(('f32', 'float32', 1e-5),
                                    ('bf16', 'mixed_bfloat16', 0.05))
    def test_mask_head_picks_class_channel(self, policy, atol):
        head = MaskHead(num_classes=3, channels=8, dtype=policy)
        pooled = tf.random.stateless_normal([_B, 4, 14, 14, 8], seed=[0, 1])
        classes = tf.constant([[0, 1, 2, 0], [2, 2, 1, 0]])
        head(pooled, classes)
        # The predictor's init (std 0.001) would make every mask near 0.
        head.predictor.kernel.assign(tf.random.stateless_normal(
            head.predictor.kernel.shape, seed=[2, 3]))
        head.predictor.bias.assign([0.5, -1.0, 2.0])
        out = head(pooled, classes)
        self.assertEqual(out.shape, (_B, 4, 28, 28))
        self.assertEqual(out.dtype, tf.float32)
        # Reference: every class channel, then pick.
        x = tf.reshape(pooled, [-1, 14, 14, 8])
        for conv in head.convs:
            x = conv(x)
        full = tf.cast(tf.reshape(head.predictor(head.deconv(x)),
                                  [_B, 4, 28, 28, 3]), tf.float32).numpy()
        self.assertGreater(np.abs(full).std(), 10 * atol)
        for b in range(_B):
            for k in range(4):
                self.assertAllClose(out[b, k], full[b, k, :, :, classes[b, k]],
                                    atol=atol)

    def test_class_agnostic_mask_head_ignores_the_class(self):
        head = MaskHead(num_classes=3, channels=8, class_agnostic=True)
        pooled = tf.random.stateless_normal([_B, 4, 14, 14, 8], seed=[0, 1])
        head(pooled, tf.zeros([_B, 4], tf.int32))
        self.assertEqual((head.num_masks, head.predictor.kernel.shape), (1, (1, 1, 8, 1)))
        head.predictor.kernel.assign(tf.random.stateless_normal([1, 1, 8, 1], seed=[2, 3]))
        head.predictor.bias.assign([0.5])
        out = head(pooled, tf.constant([[0, 1, 2, 0], [2, 2, 1, 0]]))
        self.assertAllClose(out, head(pooled, tf.zeros([_B, 4], tf.int32)))
        x = tf.reshape(pooled, [-1, 14, 14, 8])
        for conv in head.convs:
            x = conv(x)
        full = tf.reshape(head.predictor(head.deconv(x)), [_B, 4, 28, 28])
        self.assertGreater(float(tf.math.reduce_std(full)), 1e-3)
        self.assertAllClose(out, full, atol=1e-5)
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(head(pooled, tf.constant([[0, 1, 2, 0], [2, 2, 1, 0]])))
        grads = tape.gradient(loss, head.trainable_variables)
        self.assertTrue(all(g is not None and float(tf.reduce_max(tf.abs(g))) > 0
                            for g in grads))

    def test_config_round_trip(self):
        for layer in (BoxHead(num_classes=7, fc_dim=64, num_fc=1),
                      BoxHead(num_classes=7, fc_dim=64, num_fc=1, num_conv=2, conv_dim=32,
                              norm="gn"),
                      MaskHead(num_classes=7, channels=32, num_convs=2),
                      MaskHead(num_classes=7, channels=32, num_convs=2, norm="gn"),
                      MaskHead(num_classes=7, channels=32, class_agnostic=True)):
            clone = type(layer).from_config(layer.get_config())
            self.assertEqual(clone.get_config(), layer.get_config())

    def test_conv_heads_with_group_norm(self):
        """Detectron2's 4conv1fc box head (here 2 convs) and GN mask head: shapes,
        bias-free convs, and the batch norms refused (padded slots)."""
        box = BoxHead(num_classes=3, fc_dim=32, num_fc=1, num_conv=2, conv_dim=32, norm="gn")
        mask = MaskHead(num_classes=3, channels=32, num_convs=2, norm="gn")
        pooled = tf.random.stateless_normal([_B, 5, 7, 7, 16], seed=[0, 2])
        logits, deltas = box(pooled)
        self.assertEqual((logits.shape, deltas.shape), ((_B, 5, 4), (_B, 5, 3, 4)))
        self.assertEqual(box.fcs[0].kernel.shape, (7 * 7 * 32, 32))
        masks = mask(tf.random.stateless_normal([_B, 5, 14, 14, 16], seed=[0, 3]),
                     tf.zeros([_B, 5], tf.int32))
        self.assertEqual(masks.shape, (_B, 5, 28, 28))
        for head in (box, mask):
            self.assertEqual([c.bias for c in head.convs], [None, None])
            self.assertLen(head.conv_norms, 2)
        # A roi's output is its own: GroupNorm normalises each alone.
        alone, _ = box(pooled[:, :1])
        self.assertAllClose(alone, logits[:, :1], atol=1e-5)
        for frozen in ("frozen_bn", "batch"):
            with self.assertRaisesRegex(ValueError, "BoxHead: norm='.*' must be None or"):
                BoxHead(num_conv=4, norm=frozen)
            with self.assertRaisesRegex(ValueError, "MaskHead: norm="):
                MaskHead(norm=frozen)

    def test_batch_norm_heads_count_the_valid_rois_only(self):
        """'bn' / 'sync_bn' heads (Detectron2's LSJ baselines): in training the
        statistics are those of the valid rois, whatever the others hold; at
        inference the moving ones."""
        pooled = tf.random.stateless_normal([_B, 5, 7, 7, 16], seed=[0, 4])
        valid = tf.constant([[True, True, True, False, False]] * _B)
        junk = tf.where(valid[..., None, None, None], pooled, 100.0 * pooled + 7.0)
        for bn in ("bn", "sync_bn"):
            box = BoxHead(num_classes=3, fc_dim=32, num_fc=1, num_conv=2, conv_dim=32,
                          norm=bn)
            mask = MaskHead(num_classes=3, channels=32, num_convs=2, norm=bn)
            self.assertIsInstance(box.conv_norms[0], norms.MaskedBatchNorm)
            self.assertEqual(box.conv_norms[1].synchronized, bn == "sync_bn")
            clean, _ = box(pooled, valid, training=True)
            dirty, _ = box(junk, valid, training=True)
            self.assertAllClose(clean[:, :3], dirty[:, :3], atol=1e-4)
            classes = tf.zeros([_B, 5], tf.int32)
            big = tf.image.resize(tf.reshape(pooled, [-1, 7, 7, 16]), [14, 14])
            big = tf.reshape(big, [_B, 5, 14, 14, 16])
            big_junk = tf.where(valid[..., None, None, None], big, 100.0 * big + 7.0)
            self.assertAllClose(mask(big, classes, valid, training=True)[:, :3],
                                mask(big_junk, classes, valid, training=True)[:, :3],
                                atol=1e-3)
            # Inference: moving statistics, so each roi alone gives its output.
            alone, _ = box(pooled[:, :1], training=False)
            together, _ = box(pooled, training=False)
            self.assertAllClose(alone, together[:, :1], atol=1e-5)
            self.assertNotAllClose(box.conv_norms[0].moving_mean, tf.zeros([32]))
        heads = RoiHeads(box_head=BoxHead(num_classes=7),
                         mask_head=MaskHead(num_classes=7), num_samples=64)
        clone = RoiHeads.from_config(heads.get_config())
        self.assertEqual(clone.num_samples, 64)
        self.assertEqual(clone.box_head.num_classes, 7)

    def test_class_mismatch(self):
        with self.assertRaisesRegex(ValueError, 'num_classes'):
            RoiHeads(box_head=BoxHead(num_classes=7),
                     mask_head=MaskHead(num_classes=8))
