"""load_detectron2_weights: Detectron2's conventions against NumPy references of them,
and (on demand) torchvision's own Mask R-CNN through Detectron2's names."""

import os
import pickle
import subprocess
import tempfile
import unittest

import numpy as np
import tensorflow as tf
from absl import logging
from absl.testing import parameterized

from mrcnn.modeling import detectron2 as d2
from mrcnn.modeling import resnet as resnet_lib
from tests.modeling import detectron2_fixtures as fixtures

C = 3   # foreground classes
# Detectron2's ANCHOR_GENERATOR.ASPECT_RATIOS, heights over widths
D2_RATIOS = (0.5, 1.0, 2.0)
# The peer script that writes torchvision's models in Detectron2's layout.
PEER_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                           "benchmarks", "peers", "torchvision_maskrcnn_as_detectron2.py")


def _torchvision_into(model, *args):
    """Runs PEER_SCRIPT (random network, `args`) with MRCNN_TORCH_PYTHON, loads
    its Detectron2 file into `model` (torchvision's RGB ImageNet input) and
    returns its outputs.npz as a dict."""
    out = tempfile.mkdtemp()
    subprocess.run([os.environ["MRCNN_TORCH_PYTHON"], PEER_SCRIPT, f"--out={out}", *args],
                   check=True, capture_output=True, timeout=600)
    d2.load_detectron2_weights(
        model, path=os.path.join(out, "model_final.pkl"), source_format="RGB",
        source_pixel_mean=resnet_lib.IMAGENET_MEAN, source_pixel_std=resnet_lib.IMAGENET_STD)
    with np.load(os.path.join(out, "outputs.npz")) as o:
        return dict(o)


def _relu(x):
    return np.maximum(x, 0.0)


def _deconv_predictor(a, x):
    """Detectron2's mask head after its convs, on x [K, h, w, F] (NumPy): the
    2 x 2 / 2 deconv by its definition (output (2y + a, 2x + b)), relu, the
    1 x 1 predictor; logits [K, C, 2h, 2w]."""
    k, h, w, _ = x.shape
    up = np.einsum("kyxc,coab->kyaxbo", x, a["roi_heads.mask_head.deconv.weight"])
    up = _relu(up.reshape(k, 2 * h, 2 * w, -1) + a["roi_heads.mask_head.deconv.bias"])
    return (np.einsum("kyxo,no->knyx", up, a["roi_heads.mask_head.predictor.weight"][:, :, 0, 0])
            + a["roi_heads.mask_head.predictor.bias"][None, :, None, None])


def _rel(ours, theirs):
    theirs = np.asarray(theirs, np.float64)
    return float(np.abs(np.asarray(ours, np.float64) - theirs).max() / np.abs(theirs).max())


class _LoadedTest(tf.test.TestCase):
    """A small model (`fixtures.small_model(num_classes=C, **MODEL)`) loaded
    from a random Detectron2 state of its sizes (`SEED`), once per class."""

    MODEL, SEED = {}, 0

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        if cls is _LoadedTest:   # collected too, holds no test
            return
        cls.model = fixtures.small_model(num_classes=C, **cls.MODEL)
        cls.arrays = fixtures.random_state(cls.model, seed=cls.SEED)
        cls.path = fixtures.write(os.path.join(tempfile.mkdtemp(), "model_final.pkl"),
                                  cls.arrays)
        cls.skipped = d2.load_detectron2_weights(
            cls.model, path=cls.path, source_format="RGB",
            source_pixel_mean=resnet_lib.IMAGENET_MEAN,
            source_pixel_std=resnet_lib.IMAGENET_STD)

    def _fresh(self):
        return fixtures.small_model(num_classes=C, **self.MODEL)

    def _assert_predictor(self, x, logits, box_deltas):
        """Box scores and deltas of the last FC's output x [K, fc] (NumPy)
        against the head's [1, K, C + 1] and [1, K, C, 4]."""
        a = self.arrays
        scores = x @ a["roi_heads.box_predictor.cls_score.weight"].T \
            + a["roi_heads.box_predictor.cls_score.bias"]   # background last
        deltas = (x @ a["roi_heads.box_predictor.bbox_pred.weight"].T
                  + a["roi_heads.box_predictor.bbox_pred.bias"]).reshape(len(x), C, 4)
        self.assertAllClose(logits[0], np.concatenate([scores[:, C:], scores[:, :C]], 1),
                            atol=1e-4)
        self.assertAllClose(box_deltas[0], deltas[..., [1, 0, 3, 2]], atol=1e-4)


class ConventionsTest(_LoadedTest, parameterized.TestCase):
    """Each head's outputs against Detectron2's semantics written in NumPy."""

    MODEL = {"anchor_offset": 0.0}
    SEED = 1

    def test_every_variable_loaded(self):
        self.assertEqual(self.skipped, [])
        fresh = self._fresh()
        for ours, init in zip(self.model.weights, fresh.weights):
            self.assertNotAllClose(ours, init, msg=ours.path)

    def test_rpn_head(self):
        # 1 x 1 levels: the 3 x 3 conv sees only its centre tap.
        rng = np.random.default_rng(0)
        f = self.model.fpn.channels
        x = rng.normal(size=(2, f))
        a = self.arrays
        name = "proposal_generator.rpn_head"
        hidden = _relu(x @ a[f"{name}.conv.weight"][:, :, 1, 1].T + a[f"{name}.conv.bias"])
        objectness = hidden @ a[f"{name}.objectness_logits.weight"][:, :, 0, 0].T \
            + a[f"{name}.objectness_logits.bias"]   # [2, A] in D2_RATIOS order
        deltas = (hidden @ a[f"{name}.anchor_deltas.weight"][:, :, 0, 0].T
                  + a[f"{name}.anchor_deltas.bias"]).reshape(2, 3, 4)   # (dx, dy, dw, dh)
        ours_obj, ours_deltas = self.model.rpn_head(
            {l: tf.constant(x[:, None, None, :], tf.float32) for l in range(2, 7)})
        # Our anchor k has width / height RpnHead.aspect_ratios[k]: D2's with
        # height / width = 1 / that.
        theirs = [D2_RATIOS.index(1.0 / r) for r in self.model.rpn_head.aspect_ratios]
        for level in range(2, 7):
            self.assertAllClose(ours_obj[level], objectness[:, theirs], atol=1e-5)
            want = deltas[:, theirs][..., [1, 0, 3, 2]]   # (dy, dx, dh, dw)
            self.assertAllClose(ours_deltas[level], want, atol=1e-5)

    def test_box_head(self):
        rng = np.random.default_rng(1)
        k, f = 4, self.model.fpn.channels
        pooled = rng.normal(size=(k, 7, 7, f))
        a = self.arrays
        x = pooled.transpose(0, 3, 1, 2).reshape(k, -1)   # PyTorch's (C, 7, 7) flatten
        for i in (1, 2):
            x = _relu(x @ a[f"roi_heads.box_head.fc{i}.weight"].T
                      + a[f"roi_heads.box_head.fc{i}.bias"])
        self._assert_predictor(x, *self.model.roi_heads.box_head(
            tf.constant(pooled[None], tf.float32)))

    def test_mask_head(self):
        # 1 x 1 RoI features: centre taps, then the 2 x 2 deconv by its definition.
        rng = np.random.default_rng(2)
        k, f = 4, self.model.fpn.channels
        features = rng.normal(size=(k, f))
        a = self.arrays
        x = features
        for i in (1, 2):
            w = a[f"roi_heads.mask_head.mask_fcn{i}.weight"][:, :, 1, 1]
            x = _relu(x @ w.T + a[f"roi_heads.mask_head.mask_fcn{i}.bias"])
        logits = _deconv_predictor(a, x[:, None, None, :])
        classes = np.array([0, 1, 2, 1])   # class columns, 0..C-1
        ours = self.model.roi_heads.mask_head(tf.constant(_centre(features), tf.float32),
                                              tf.constant(classes[None]))
        self.assertAllClose(ours[0], logits[np.arange(k), classes], atol=1e-4)

    def test_fpn_top_level(self):
        # A 32 x 32 canvas: C5 is 1 x 1, so P5 = output(lateral(C5)) at the centre tap.
        images = tf.constant(np.random.default_rng(3).normal(size=(1, 32, 32, 3)),
                             tf.float32)
        c = self.model.backbone(images)
        p = self.model.fpn(c)
        a = self.arrays
        lateral = c[5].numpy()[0, 0, 0] @ a["backbone.fpn_lateral5.weight"][:, :, 0, 0].T \
            + a["backbone.fpn_lateral5.bias"]
        want = lateral @ a["backbone.fpn_output5.weight"][:, :, 1, 1].T \
            + a["backbone.fpn_output5.bias"]
        self.assertAllClose(p[5][0, 0, 0], want, atol=1e-4)
        self.assertAllClose(p[6], p[5])


class SyncBatchNormConventionsTest(_LoadedTest):
    """Detectron2's LSJ baselines (new_baselines/mask_rcnn_R_50_FPN_*ep_LSJ):
    SyncBN in the backbone, FPN and heads (running statistics loaded), two
    RPN convs (`rpn_head.conv.conv0`, `.conv1`); at inference against NumPy."""

    MODEL = {"mask_channels": 32, "norm": "sync_bn", "num_convs": 2, "anchor_offset": 0.0}
    SEED = 8

    def test_every_variable_loaded(self):
        self.assertEqual(self.skipped, [])
        fresh = self._fresh()
        self.assertEqual(len(self.model.weights), len(fresh.weights))
        for ours, init in zip(self.model.weights, fresh.weights):
            self.assertNotAllClose(ours, init, msg=ours.path)
        self.assertIn("proposal_generator.rpn_head.conv.conv1.weight", self.arrays)

    def test_rpn_head_of_two_convs(self):
        # 1 x 1 levels: each 3 x 3 conv sees only its centre tap.
        features = np.random.default_rng(9).normal(size=(2, self.model.fpn.channels))
        a, name = self.arrays, "proposal_generator.rpn_head"
        x = features
        for k in (0, 1):
            x = _relu(x @ a[f"{name}.conv.conv{k}.weight"][:, :, 1, 1].T
                      + a[f"{name}.conv.conv{k}.bias"])
        objectness = x @ a[f"{name}.objectness_logits.weight"][:, :, 0, 0].T \
            + a[f"{name}.objectness_logits.bias"]
        ours, _ = self.model.rpn_head(
            {l: tf.constant(features[:, None, None, :], tf.float32) for l in range(2, 7)})
        theirs = [D2_RATIOS.index(1.0 / r) for r in self.model.rpn_head.aspect_ratios]
        self.assertAllClose(ours[3], objectness[:, theirs], atol=1e-5)

    def test_box_head_at_inference(self):
        rng = np.random.default_rng(10)
        k, f = 3, self.model.fpn.channels
        pooled = rng.normal(size=(k, 7, 7, f))
        a, head = self.arrays, "roi_heads.box_head"
        x = pooled
        for i in (1, 2):
            unit = f"{head}.conv{i}"
            x = _conv3x3(x, a[f"{unit}.weight"])
            x = _relu((x - a[f"{unit}.norm.running_mean"])
                      / np.sqrt(a[f"{unit}.norm.running_var"] + 1e-5)
                      * a[f"{unit}.norm.weight"] + a[f"{unit}.norm.bias"])
        x = x.transpose(0, 3, 1, 2).reshape(k, -1)
        x = _relu(x @ a[f"{head}.fc1.weight"].T + a[f"{head}.fc1.bias"])
        self._assert_predictor(x, *self.model.roi_heads.box_head(
            tf.constant(pooled[None], tf.float32), training=False))


def _centre(x):
    """[K, F] -> [1, K, 1, 1, F] RoI features of one pixel."""
    return x[None, :, None, None, :]


def _conv3x3(x, w):
    """Zero-padded 3 x 3 conv of x [N, H, W, I] by PyTorch's w [O, I, 3, 3]."""
    _, h, width, _ = x.shape
    p = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return sum(np.einsum("nhwi,oi->nhwo", p[:, dy:dy + h, dx:dx + width], w[:, :, dy, dx])
               for dy in range(3) for dx in range(3))


def _group_norm(x, gamma, beta, groups=32, eps=1e-5):
    """torch.nn.GroupNorm on NHWC x: contiguous channel groups."""
    n, h, w, c = x.shape
    g = x.reshape(n, h, w, groups, c // groups)
    g = (g - g.mean(axis=(1, 2, 4), keepdims=True)) / np.sqrt(
        g.var(axis=(1, 2, 4), keepdims=True) + eps)
    return g.reshape(n, h, w, c) * gamma + beta


class GroupNormConventionsTest(_LoadedTest):
    """Detectron2's GN models (mask_rcnn_R_50_FPN_3x_gn): GroupNorm after every
    conv of the backbone, FPN and heads (no conv bias there), a box head of
    convs then one FC; its heads against NumPy references."""

    MODEL = {"mask_channels": 32, "norm": "gn"}
    SEED = 4

    def _norm(self, unit, x):
        a = self.arrays
        return _group_norm(x, a[f"{unit}.norm.weight"], a[f"{unit}.norm.bias"])

    def test_every_variable_loaded_and_no_bias_before_a_norm(self):
        self.assertEqual(self.skipped, [])
        fresh = self._fresh()
        self.assertEqual(len(self.model.weights), len(fresh.weights))
        for ours, init in zip(self.model.weights, fresh.weights):
            self.assertNotAllClose(ours, init, msg=ours.path)
        # Biases: the RPN's, the FCs', the deconv's and the predictors', no conv's
        # before a norm.
        biased = {w.path.split("/")[-2] for w in self.model.weights
                  if w.path.endswith("/bias")}
        self.assertEqual(biased, {"conv", "objectness", "deltas", "fc1", "class_logits",
                                  "box_deltas", "deconv", "predictor"})

    def test_box_head(self):
        rng = np.random.default_rng(5)
        k, f = 3, self.model.fpn.channels
        pooled = rng.normal(size=(k, 7, 7, f))
        a, head = self.arrays, "roi_heads.box_head"
        x = pooled
        for i in (1, 2):
            x = _relu(self._norm(f"{head}.conv{i}",
                                 _conv3x3(x, a[f"{head}.conv{i}.weight"])))
        x = x.transpose(0, 3, 1, 2).reshape(k, -1)   # PyTorch's (C, 7, 7) flatten
        x = _relu(x @ a[f"{head}.fc1.weight"].T + a[f"{head}.fc1.bias"])
        self._assert_predictor(x, *self.model.roi_heads.box_head(
            tf.constant(pooled[None], tf.float32)))

    def test_mask_head(self):
        rng = np.random.default_rng(6)
        k, f = 3, self.model.fpn.channels
        features = rng.normal(size=(k, 4, 4, f))
        a, head = self.arrays, "roi_heads.mask_head"
        x = features
        for i in (1, 2):
            x = _relu(self._norm(f"{head}.mask_fcn{i}",
                                 _conv3x3(x, a[f"{head}.mask_fcn{i}.weight"])))
        logits = _deconv_predictor(a, x)
        classes = np.array([2, 0, 1])
        ours = self.model.roi_heads.mask_head(tf.constant(features[None], tf.float32),
                                              tf.constant(classes[None]))
        self.assertAllClose(ours[0], logits[np.arange(k), classes], atol=1e-4)

    def test_fpn_top_level(self):
        # A 64 x 64 canvas: C5 is 2 x 2, enough for GroupNorm statistics.
        images = tf.constant(np.random.default_rng(7).normal(size=(1, 64, 64, 3)),
                             tf.float32)
        c = self.model.backbone(images)
        p = self.model.fpn(c)
        a = self.arrays
        lateral = np.einsum("nhwi,oi->nhwo", c[5].numpy(),
                            a["backbone.fpn_lateral5.weight"][:, :, 0, 0])
        lateral = self._norm("backbone.fpn_lateral5", lateral)
        want = self._norm("backbone.fpn_output5",
                          _conv3x3(lateral, a["backbone.fpn_output5.weight"]))
        self.assertAllClose(p[5], want, atol=1e-4)

    def test_caffe2_group_norm_resnet(self):
        """FAIR's R-50-GN.pkl names: conv1_gn_{s,b}, res<s>_<b>_branch*_gn_{s,b}."""
        blobs = {}
        for _, _, stage, block, index in resnet_lib._named_units(self.model.backbone):
            theirs = "backbone.bottom_up." + fixtures._unit_name(stage, block, index)
            unit = ("conv1" if stage == 1 else f"res{stage}_{block}_branch"
                    + ("1" if index == 0 else "2" + "abc"[index - 1]))
            blobs[f"{unit}_w"] = self.arrays[f"{theirs}.weight"]
            blobs[f"{unit}_gn_s"] = self.arrays[f"{theirs}.norm.weight"]
            blobs[f"{unit}_gn_b"] = self.arrays[f"{theirs}.norm.bias"]
        path = os.path.join(tempfile.mkdtemp(), "R-18-GN.pkl")
        with open(path, "wb") as f:
            pickle.dump({"blobs": blobs}, f, protocol=2)
        resnet = resnet_lib.ResNet(depth=18, norm="gn")
        source = resnet_lib.load_detectron2_resnet_weights(resnet, path)
        self.assertEqual(source.channels, "BGR")   # the MSRA / FAIR convention
        for ours, theirs in zip(resnet.weights, self.model.backbone.weights):
            self.assertAllClose(ours, theirs, msg=ours.path)
        del blobs["res3_0_branch2b_gn_s"]
        with open(path, "wb") as f:
            pickle.dump({"blobs": blobs}, f, protocol=2)
        with self.assertRaisesRegex(ValueError, "res3_0_branch2b_gn_s"):
            resnet_lib.load_detectron2_resnet_weights(resnet, path)

    def test_group_norm_stem_takes_no_other_mean(self):
        resnet = resnet_lib.ResNet(depth=18, norm="gn")
        resnet(tf.zeros([1, 64, 64, 3]))
        kernel = resnet.stem_conv.conv.kernel.numpy()
        msra = resnet_lib._SOURCES["msra"]   # BGR, the same mean, std 1
        resnet_lib.adapt_stem_to_input(resnet, msra)
        self.assertAllClose(resnet.stem_conv.conv.kernel,
                            kernel[:, :, ::-1] * np.array(resnet_lib.IMAGENET_STD)[
                                None, None, :, None])
        with self.assertRaisesRegex(ValueError, r"cannot absorb.*MaskRCNN.pixel_mean"):
            resnet_lib.adapt_stem_to_input(resnet, "keras")   # another mean


class RetinaNetConventionsTest(tf.test.TestCase, parameterized.TestCase):
    """A RetinaNet loaded from a random Detectron2 RetinaNet state: the FPN's
    P6 / P7 and the head against Detectron2's semantics written in NumPy,
    with plain and GroupNorm towers."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.models, cls.arrays, cls.skipped = {}, {}, {}
        for norm, channels in ((None, 32), ("gn", 64)):   # GN: 2 channels a group
            model = fixtures.small_retinanet(num_classes=C, channels=channels, norm=norm,
                                             anchor_offset=0.0)
            arrays = fixtures.random_state(model, seed=5)
            path = fixtures.write(os.path.join(tempfile.mkdtemp(), "model_final.pkl"), arrays)
            cls.skipped[norm] = d2.load_detectron2_weights(
                model, path=path, source_format="RGB",
                source_pixel_mean=resnet_lib.IMAGENET_MEAN,
                source_pixel_std=resnet_lib.IMAGENET_STD)
            cls.models[norm], cls.arrays[norm] = model, arrays

    @parameterized.parameters(None, "gn")
    def test_every_variable_loaded(self, norm):
        self.assertEqual(self.skipped[norm], [])
        model = self.models[norm]
        fresh = fixtures.small_retinanet(num_classes=C, channels=model.fpn.channels,
                                         norm=norm)
        self.assertLen(model.weights, len(fresh.weights))
        for ours, init in zip(model.weights, fresh.weights):
            self.assertNotAllClose(ours, init, msg=ours.path)

    @parameterized.parameters(None, "gn")
    def test_head(self, norm):
        # 1 x 1 levels: each 3 x 3 conv sees only its centre tap.
        model, a = self.models[norm], self.arrays[norm]
        rng = np.random.default_rng(6)
        x = rng.normal(size=(2, model.fpn.channels))
        step = 3 if norm else 2

        def tower(name):
            h = x
            for k in range(model.head.num_convs):
                unit = f"head.{name}.{k * step}"
                h = h @ a[f"{unit}.weight"][:, :, 1, 1].T + a[f"{unit}.bias"]
                if norm:   # GroupNorm(32) over one pixel: groups of 2 channels
                    g = h.reshape(len(h), 32, -1)
                    g = (g - g.mean(-1, keepdims=True)) / np.sqrt(
                        g.var(-1, keepdims=True) + model.head.class_norms[0].epsilon)
                    unit = f"head.{name}.{k * step + 1}"
                    h = g.reshape(h.shape) * a[f"{unit}.weight"] + a[f"{unit}.bias"]
                h = _relu(h)
            return h

        scores = (tower("cls_subnet") @ a["head.cls_score.weight"][:, :, 1, 1].T
                  + a["head.cls_score.bias"]).reshape(2, 9, C)   # [anchor theirs, class]
        deltas = (tower("bbox_subnet") @ a["head.bbox_pred.weight"][:, :, 1, 1].T
                  + a["head.bbox_pred.bias"]).reshape(2, 9, 4)   # (dx, dy, dw, dh)
        logits, ours_deltas = model.head({3: tf.constant(x[:, None, None, :], tf.float32)})
        # Both order anchors by size, then aspect ratio: ours w / h, theirs h / w.
        for size in range(3):
            for r, ratio in enumerate(model.aspect_ratios):
                ours, theirs = size * 3 + r, size * 3 + D2_RATIOS.index(1.0 / ratio)
                self.assertAllClose(logits[3][:, ours], scores[:, theirs], atol=1e-4)
                self.assertAllClose(ours_deltas[3][:, ours],
                                    deltas[:, theirs][:, [1, 0, 3, 2]], atol=1e-4)

    def test_fpn_top_block(self):
        # A 32 x 32 canvas: C5 is 1 x 1, so P6 and P7 are centre taps of it.
        model, a = self.models[None], self.arrays[None]
        images = tf.constant(np.random.default_rng(7).normal(size=(1, 32, 32, 3)),
                             tf.float32)
        c = model.backbone(images)
        p = model.fpn(c)
        p6 = (c[5].numpy()[0, 0, 0] @ a["backbone.top_block.p6.weight"][:, :, 1, 1].T
              + a["backbone.top_block.p6.bias"])
        p7 = (_relu(p6) @ a["backbone.top_block.p7.weight"][:, :, 1, 1].T
              + a["backbone.top_block.p7.bias"])
        self.assertAllClose(p[6][0, 0, 0], p6, atol=1e-4)
        self.assertAllClose(p[7][0, 0, 0], p7, atol=1e-4)

    def test_class_mismatch_and_unknown_arrays(self):
        model = fixtures.small_retinanet(num_classes=C)
        arrays = fixtures.random_state(model, num_classes=C + 2)
        path = fixtures.write(os.path.join(self.get_temp_dir(), "other.pkl"), arrays)
        with self.assertRaisesRegex(ValueError, r"has 5 classes, the model 3"):
            d2.load_detectron2_weights(model, path=path)
        before = model.head.class_logits.kernel.numpy()
        skipped = d2.load_detectron2_weights(model, path=path, allow_class_mismatch=True)
        self.assertLen(skipped, 2)
        self.assertAllEqual(model.head.class_logits.kernel, before)
        arrays["head.cls_subnet.9.weight"] = arrays["head.cls_subnet.0.weight"]
        path = fixtures.write(os.path.join(self.get_temp_dir(), "more.pkl"), arrays)
        with self.assertRaisesRegex(ValueError, r"no place in this RetinaNet.*cls_subnet\.9"):
            d2.load_detectron2_weights(model, path=path, allow_class_mismatch=True)


class LoaderTest(tf.test.TestCase):

    def _write(self, arrays, name="model_final.pkl", **extra):
        return fixtures.write(os.path.join(self.get_temp_dir(), name), arrays, **extra)

    def test_class_mismatch_raises_or_keeps_class_layers(self):
        model = fixtures.small_model(num_classes=C)
        path = self._write(fixtures.random_state(model, num_classes=C + 2))
        with self.assertRaisesRegex(ValueError, r"has 5 classes, the model 3.*"
                                    r"allow_class_mismatch"):
            d2.load_detectron2_weights(model, path=path)
        before = model.roi_heads.box_head.class_logits.kernel.numpy()
        fc1 = model.roi_heads.box_head.fcs[0].kernel.numpy()
        self.assertAllEqual(fc1, model.roi_heads.box_head.fcs[0].kernel)   # left as it was
        skipped = d2.load_detectron2_weights(model, path=path, allow_class_mismatch=True)
        self.assertLen(skipped, 6)   # kernel and bias of 3 layers
        self.assertIn("class_logits", " ".join(skipped))
        self.assertAllEqual(model.roi_heads.box_head.class_logits.kernel, before)
        self.assertNotAllClose(model.roi_heads.box_head.fcs[0].kernel, fc1)

    def test_class_agnostic_predictors_repeat(self):
        model = fixtures.small_model(num_classes=C)
        arrays = fixtures.random_state(model)
        box = "roi_heads.box_predictor.bbox_pred"
        arrays[f"{box}.weight"] = arrays[f"{box}.weight"][:4]
        arrays[f"{box}.bias"] = arrays[f"{box}.bias"][:4]
        mask = "roi_heads.mask_head.predictor"
        arrays[f"{mask}.weight"] = arrays[f"{mask}.weight"][:1]
        arrays[f"{mask}.bias"] = arrays[f"{mask}.bias"][:1]
        d2.load_detectron2_weights(model, path=self._write(arrays))
        kernel = model.roi_heads.box_head.box_deltas.kernel.numpy().reshape(-1, C, 4)
        for c in range(C):
            self.assertAllClose(kernel[:, c], arrays[f"{box}.weight"][[1, 0, 3, 2]].T)
        predictor = model.roi_heads.mask_head.predictor.kernel.numpy()   # [1, 1, M, C]
        self.assertAllClose(predictor[0, 0], np.tile(arrays[f"{mask}.weight"][:, :, 0, 0].T,
                                                     (1, C)))

    def test_class_agnostic_mask_head(self):
        # Detectron2's CLS_AGNOSTIC_MASK into MaskHead.class_agnostic: as is,
        # and kept even when the classes differ (it holds none).
        model = fixtures.small_model(num_classes=C, class_agnostic_masks=True)
        mask = "roi_heads.mask_head.predictor"
        for classes in (C, C + 2):
            arrays = fixtures.random_state(model, seed=classes, num_classes=classes)
            self.assertEqual(arrays[f"{mask}.weight"].shape[0], 1)
            skipped = d2.load_detectron2_weights(model, path=self._write(arrays),
                                                 allow_class_mismatch=classes != C)
            self.assertLen(skipped, 0 if classes == C else 4)   # box scores and deltas
            predictor = model.roi_heads.mask_head.predictor
            self.assertAllClose(predictor.kernel.numpy()[0, 0],
                                arrays[f"{mask}.weight"][:, :, 0, 0].T)
            self.assertAllClose(predictor.bias, arrays[f"{mask}.bias"])
        # A class-specific file's C masks do not fit one.
        arrays = fixtures.random_state(fixtures.small_model(num_classes=C))
        with self.assertRaisesRegex(ValueError, r"predictor has 3 outputs, the model's "
                                    r"class-agnostic mask head 1"):
            d2.load_detectron2_weights(model, path=self._write(arrays))

    def test_cascade_stages(self):
        model = fixtures.small_model(num_classes=C, cascade_stages=3)
        arrays = fixtures.random_state(model, seed=4)
        self.assertEqual(d2.load_detectron2_weights(model, path=self._write(arrays)), [])
        fresh = fixtures.small_model(num_classes=C, cascade_stages=3)
        for ours, init in zip(model.weights, fresh.weights):
            self.assertNotAllClose(ours, init, msg=ours.path)
        rng = np.random.default_rng(5)
        pooled = rng.normal(size=(4, 7, 7, model.fpn.channels))
        for k, head in enumerate(model.roi_heads.box_heads):
            x = pooled.transpose(0, 3, 1, 2).reshape(4, -1)
            for i in (1, 2):
                x = _relu(x @ arrays[f"roi_heads.box_head.{k}.fc{i}.weight"].T
                          + arrays[f"roi_heads.box_head.{k}.fc{i}.bias"])
            scores = x @ arrays[f"roi_heads.box_predictor.{k}.cls_score.weight"].T \
                + arrays[f"roi_heads.box_predictor.{k}.cls_score.bias"]
            deltas = x @ arrays[f"roi_heads.box_predictor.{k}.bbox_pred.weight"].T \
                + arrays[f"roi_heads.box_predictor.{k}.bbox_pred.bias"]   # [4, 4]
            logits, box_deltas = head(tf.constant(pooled[None], tf.float32))
            self.assertAllClose(logits[0], np.concatenate([scores[:, C:], scores[:, :C]], 1),
                                atol=1e-4)
            self.assertAllClose(box_deltas[0, :, 0], deltas[:, [1, 0, 3, 2]], atol=1e-4)
        # A plain model's file has no stages for a cascade, and the other way round.
        plain = fixtures.random_state(fixtures.small_model(num_classes=C))
        with self.assertRaisesRegex(ValueError, "box_head.0"):
            d2.load_detectron2_weights(fixtures.small_model(num_classes=C, cascade_stages=3),
                                       path=self._write(plain, "plain.pkl"))
        with self.assertRaisesRegex(ValueError, "no place|roi_heads.box_head.fc1"):
            d2.load_detectron2_weights(fixtures.small_model(num_classes=C),
                                       path=self._write(arrays))

    def test_unknown_or_missing_arrays_raise(self):
        model = fixtures.small_model(num_classes=C)
        arrays = fixtures.random_state(model)
        extra = dict(arrays, **{"roi_heads.semantic_head.conv1.weight": np.zeros(3)})
        with self.assertRaisesRegex(ValueError, r"no place .*, 1: .*semantic_head"):
            d2.load_detectron2_weights(model, path=self._write(extra))
        missing = {k: v for k, v in arrays.items() if "mask_fcn2" not in k}
        with self.assertRaisesRegex(ValueError, r"no array 'roi_heads.mask_head.mask_fcn2"):
            d2.load_detectron2_weights(model, path=self._write(missing))
        wrong = dict(arrays, **{"backbone.fpn_output3.weight": np.zeros((32, 32, 1, 1))})
        with self.assertRaisesRegex(ValueError, r"output_p3/kernel.*fpn_output3.weight"):
            d2.load_detectron2_weights(model, path=self._write(wrong))
        backbone_only = {k[len("backbone.bottom_up."):]: v for k, v in arrays.items()
                         if k.startswith("backbone.bottom_up.")}
        with self.assertRaisesRegex(ValueError, r"not a Detectron2 R-CNN with an FPN"):
            d2.load_detectron2_weights(model, path=self._write(backbone_only))
        with self.assertRaises(FileNotFoundError):
            d2.load_detectron2_weights(model, path=os.path.join(self.get_temp_dir(), "no"))

    def test_federated_loss_weights_are_data_not_weights(self):
        # A USE_FED_LOSS model's file holds fed_loss_cls_weights, a fact of its
        # training data: it loads (into a model with or without the federated
        # loss) and leaves the counts to the trainer.
        model = fixtures.small_model(num_classes=C, heads_kwargs=dict(
            class_loss="sigmoid", fed_loss_classes=2))
        arrays = fixtures.random_state(model)
        arrays["roi_heads.box_predictor.fed_loss_cls_weights"] = np.arange(C, dtype=np.float32)
        d2.load_detectron2_weights(model, path=self._write(arrays))
        self.assertAllEqual(model.roi_heads.class_image_counts, np.ones(C))
        d2.load_detectron2_weights(fixtures.small_model(num_classes=C),
                                   path=self._write(arrays))

    def test_box_only_model(self):
        """Faster R-CNN: a file without a mask head, or a Mask R-CNN file whose mask
        head is left; boxes as the Mask R-CNN's."""
        masked = fixtures.small_model(num_classes=C)
        arrays = fixtures.random_state(masked)
        d2.load_detectron2_weights(masked, path=self._write(arrays))
        boxes_only = {k: v for k, v in arrays.items() if "mask_head" not in k}
        for source in (boxes_only, arrays):
            model = fixtures.small_model(num_classes=C, masks=False)
            self.assertEqual(d2.load_detectron2_weights(model, path=self._write(source)), [])
            batch = {"images": tf.constant(np.random.default_rng(5).integers(
                0, 255, (1, 64, 64, 3)), tf.uint8),
                "image_info": tf.constant([[64.0, 64.0, 64.0, 64.0, 1.0]])}
            ours, full = model(batch, training=False), masked(batch, training=False)
            self.assertNotIn("detection_masks", ours)
            for key in ours:
                self.assertAllClose(ours[key], full[key], atol=1e-5, msg=key)

    def test_keypoint_head(self):
        """Detectron2's keypoint_rcnn files: `conv_fcn*` and `score_lowres`
        (ConvTranspose2d [in, K, 4, 4]) against NumPy references of PyTorch's
        conv and transposed conv with those arrays; a model without a keypoint
        head leaves them, one with another K refuses them."""
        from tests.modeling.test_keypoint_head import (conv_transpose_reference,
                                                       upsample2_reference)
        model = fixtures.small_model(num_classes=1, masks=False, keypoints=17)
        arrays = fixtures.random_state(model, seed=6)
        self.assertEqual(d2.load_detectron2_weights(model, path=self._write(arrays)), [])
        head = model.roi_heads.keypoint_head
        pooled = np.random.default_rng(7).normal(size=(2, 6, 6, model.fpn.channels))
        got = head(tf.constant(pooled[None], tf.float32)).numpy()[0]   # [2, 17, 24, 24]
        name = "roi_heads.keypoint_head"
        for n in range(2):
            x = pooled[n]
            for i in (1, 2):
                w, b = arrays[f"{name}.conv_fcn{i}.weight"], arrays[f"{name}.conv_fcn{i}.bias"]
                padded = np.pad(x, [(1, 1), (1, 1), (0, 0)])
                x = _relu(sum(np.einsum("hwc,oc->hwo", padded[a:a + 6, c:c + 6], w[:, :, a, c])
                              for a in range(3) for c in range(3)) + b)
            w = arrays[f"{name}.score_lowres.weight"].transpose(2, 3, 1, 0)   # [kh, kw, K, in]
            x = conv_transpose_reference(x, w, 2, 1) + arrays[f"{name}.score_lowres.bias"]
            want = upsample2_reference(x).transpose(2, 0, 1)
            self.assertLess(_rel(got[n], want), 1e-5)
        plain = fixtures.small_model(num_classes=1, masks=False)
        self.assertEqual(d2.load_detectron2_weights(plain, path=self._write(arrays)), [])
        with self.assertRaisesRegex(ValueError, r"predicts 17 keypoints, the model's "
                                    r"keypoint head 4"):
            d2.load_detectron2_weights(
                fixtures.small_model(num_classes=1, masks=False, keypoints=4),
                path=self._write(arrays))
        with self.assertRaisesRegex(ValueError, r"no array 'roi_heads.keypoint_head"):
            d2.load_detectron2_weights(model, path=self._write(
                {k: v for k, v in arrays.items() if "keypoint" not in k}))

    def test_aspect_ratios_must_match(self):
        model = fixtures.small_model(num_classes=C)
        path = self._write(fixtures.random_state(model))
        with self.assertRaisesRegex(ValueError, r"ASPECT_RATIOS \(0.25, 1, 4\)"):
            d2.load_detectron2_weights(model, path=path, source_aspect_ratios=(0.25, 1, 4))

    def test_input_convention_and_anchor_offset(self):
        """Detectron2's BGR, mean-only input: exact with its mean as ours; folded and
        logged otherwise; the anchor offset is logged."""
        matched = fixtures.small_model(num_classes=C, anchor_offset=0.0)
        matched.pixel_mean, matched.pixel_std = (123.675, 116.28, 103.53), (1.0, 1.0, 1.0)
        arrays = fixtures.random_state(matched)
        path = self._write(arrays)
        with self.assertLogs(level="WARNING") as logs:
            logging.warning("nothing else")
            d2.load_detectron2_weights(matched, path=path)
        self.assertLen(logs.records, 1)
        stem = arrays["backbone.bottom_up.stem.conv1.weight"]   # [64, 3 BGR, 7, 7]
        self.assertAllClose(matched.backbone.stem_conv.conv.kernel,
                            np.transpose(stem[:, ::-1], (2, 3, 1, 0)))
        self.assertAllClose(matched.backbone.stem_norm.moving_mean,
                            arrays["backbone.bottom_up.stem.conv1.norm.running_mean"])
        other = fixtures.small_model(num_classes=C)   # ImageNet RGB mean and std, offset 0.5
        with self.assertLogs(level="WARNING") as logs:
            d2.load_detectron2_weights(other, path=path)
        text = " ".join(r.getMessage() for r in logs.records)
        self.assertIn("RpnHead.anchor_offset = 0.0", text)
        self.assertIn("MaskRCNN.pixel_mean = (123.675, 116.28, 103.53)", text)
        # Away from the border the two models see the same network.
        image = np.random.default_rng(4).uniform(0, 255, (1, 64, 64, 3))
        info = tf.constant([[64.0, 64.0, 64.0, 64.0, 1.0]])
        feats = [m.backbone(m.normalize_images(tf.constant(image, tf.float32), info))[4]
                 for m in (matched, other)]
        self.assertLess(_rel(feats[1][:, 1:-1, 1:-1], feats[0][:, 1:-1, 1:-1]), 1e-4)

    def test_pixel_buffers_of_the_file(self):
        model = fixtures.small_model(num_classes=C)
        model.pixel_mean, model.pixel_std = (1.0, 2.0, 3.0), (4.0, 5.0, 6.0)
        arrays = fixtures.random_state(model)
        arrays["pixel_mean"] = np.array([3.0, 2.0, 1.0]).reshape(3, 1, 1)
        arrays["pixel_std"] = np.array([6.0, 5.0, 4.0]).reshape(3, 1, 1)
        with self.assertLogs("absl", level="INFO") as logs:
            d2.load_detectron2_weights(model, path=self._write(arrays))
        self.assertNotIn("folded into the stem",
                         " ".join(r.getMessage() for r in logs.records))


@unittest.skipUnless(os.environ.get("MRCNN_TORCH_PYTHON"),
                     "set MRCNN_TORCH_PYTHON to a Python with torch and torchvision")
class TorchvisionParityTest(tf.test.TestCase):
    """torchvision's Mask R-CNN, renamed to Detectron2's layout, gives our outputs:
    each head's, and the whole inference's, with torchvision's anchors not
    rounded and its RoIAlign aligned (Detectron2's conventions, ours), with
    adaptive RoIAlign sampling too, and with torchvision's own conventions.

    On demand (torch is not an mrcnn dependency):
      MRCNN_TORCH_PYTHON=/path/to/torch/venv/bin/python \\
        .venv/bin/python -m pytest -q tests/modeling/test_detectron2.py -k Torchvision
    """

    ARCH, NETWORK = "v1", "maskrcnn_resnet50_fpn"   # the peer script's --arch

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.script = PEER_SCRIPT
        cls.model = cls._model(6)
        cls.theirs = _torchvision_into(cls.model, "--num_classes=6", f"--arch={cls.ARCH}")

    @classmethod
    def _model(cls, num_classes, stock=False):
        """Our model of torchvision's `ARCH`, not yet built: with Detectron2's
        anchors and RoIAlign, or (`stock`) torchvision's own."""
        from mrcnn.modeling.fpn import FPN
        from mrcnn.modeling.mask_rcnn import MaskRCNN
        from mrcnn.modeling.roi_heads import BoxHead, MaskHead, RoiHeads
        from mrcnn.modeling.rpn import RpnHead
        v2 = cls.ARCH == "v2"
        norm = "bn" if v2 else None
        return MaskRCNN(   # torchvision's R50: stride on the 3x3 conv
            backbone=resnet_lib.ResNet(depth=50, stride_in_1x1=False), fpn=FPN(norm=norm),
            rpn_head=RpnHead(anchor_offset=0.0, round_anchors=stock, num_convs=2 if v2 else 1),
            roi_heads=RoiHeads(
                box_head=BoxHead(num_classes=num_classes, num_conv=4 if v2 else 0,
                                 num_fc=1 if v2 else 2, norm=norm),
                mask_head=MaskHead(num_classes=num_classes, norm=norm), aligned=not stock))

    def test_heads_match(self):
        model, theirs = self.model, self.theirs
        features = model.fpn(model.backbone(tf.constant(theirs["input"])))
        objectness, deltas = model.rpn_head(features)
        for level in range(2, 7):
            self.assertLess(_rel(features[level], theirs[f"p{level}"]), 1e-5, level)
            # torchvision's anchors: heights over widths (0.5, 1, 2), ours the inverse.
            want = theirs[f"objectness_{level}"][..., ::-1].reshape(2, -1)
            self.assertLess(_rel(objectness[level], want), 1e-5, level)
            b, h, w, _ = theirs[f"deltas_{level}"].shape
            want = theirs[f"deltas_{level}"].reshape(b, h, w, 3, 4)[:, :, :, ::-1]
            want = want[..., [1, 0, 3, 2]].reshape(b, -1, 4)
            self.assertLess(_rel(deltas[level], want), 1e-5, level)
        logits, box_deltas = model.roi_heads.box_head(tf.constant(theirs["box_pooled"][None]))
        self.assertLess(_rel(logits[0], theirs["class_logits"]), 1e-5)   # background first
        self.assertLess(_rel(box_deltas[0], theirs["box_deltas"][:, 1:, [1, 0, 3, 2]]), 1e-5)
        classes = np.arange(5) % 6
        masks = model.roi_heads.mask_head(tf.constant(theirs["mask_pooled"][None]),
                                          tf.constant(classes[None]))
        self.assertLess(_rel(masks[0], theirs["mask_logits"][np.arange(5), classes + 1]), 1e-5)

    def test_inference_matches(self):
        """Proposals and detections (boxes, scores, classes, 28 x 28 masks) of the
        whole model, with torchvision set to Detectron2's anchors and RoIAlign."""
        self._check_inference(self.model, "")

    def test_inference_matches_with_adaptive_sampling(self):
        from mrcnn.modeling.mask_rcnn import MaskRCNN
        from mrcnn.modeling.roi_heads import RoiHeads
        heads = self.model.roi_heads
        model = MaskRCNN(backbone=self.model.backbone, fpn=self.model.fpn,
                         rpn_head=self.model.rpn_head,
                         roi_heads=RoiHeads(box_head=heads.box_head,
                                            mask_head=heads.mask_head, sampling_ratio=0))
        self._check_inference(model, "adaptive_")

    def test_inference_matches_stock_torchvision(self):
        """torchvision's own conventions: anchors rounded, RoIAlign not aligned."""
        model = self._model(6, stock=True)
        d2._build(model)
        model.set_weights(self.model.get_weights())
        self._check_inference(model, "stock_")

    def test_convert_trained_coco_weights(self):
        """--weights --classes=coco: torchvision's 91 COCO-id labels -> our 80 classes."""
        out = tempfile.mkdtemp()
        pth = os.path.join(out, "tv.pth")
        subprocess.run([os.environ["MRCNN_TORCH_PYTHON"], "-c",
                        "import sys, torch, torchvision; torch.manual_seed(1); "
                        f"net = torchvision.models.detection.{self.NETWORK}("
                        "weights=None, weights_backbone=None, num_classes=91); "
                        "torch.save(net.state_dict(), sys.argv[1])", pth],
                       check=True, capture_output=True, timeout=600)
        subprocess.run([os.environ["MRCNN_TORCH_PYTHON"], self.script, f"--out={out}",
                        f"--weights={pth}", "--classes=coco"],
                       check=True, capture_output=True, timeout=600)
        model = self._model(80)
        with self.assertLogs("absl", level="INFO") as logs:
            d2.load_detectron2_weights(model, path=os.path.join(out, "model_final.pkl"),
                                       source_format="RGB")
        self.assertNotIn("folded", " ".join(r.getMessage() for r in logs.records))
        subprocess.run(
            [os.environ["MRCNN_TORCH_PYTHON"], "-c",
             "import sys, torch, numpy as np; s = torch.load(sys.argv[1]); np.save(sys.argv[2], "
             "s['roi_heads.box_predictor.cls_score.weight'].numpy())", pth,
             os.path.join(out, "scores.npy")], check=True, capture_output=True, timeout=600)
        theirs = np.load(os.path.join(out, "scores.npy"))   # [91, 1024]
        ours = model.roi_heads.box_head.class_logits.kernel.numpy().T   # [81, 1024]
        coco_ids = [i for i in range(1, 91)
                    if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
        self.assertAllClose(ours, theirs[[0] + coco_ids])

    def _check_inference(self, model, prefix):
        theirs = {k[len(prefix):]: v for k, v in self.theirs.items() if k.startswith(prefix)}
        x = self.theirs["input"]
        h, w = x.shape[1:3]
        images = x * np.array(resnet_lib.IMAGENET_STD) + np.array(resnet_lib.IMAGENET_MEAN)
        info = tf.constant([[h, w, h, w, 1.0]] * 2, tf.float32)
        features = model.fpn(model.backbone(model.normalize_images(
            tf.constant(images, tf.float32), info)))
        objectness, deltas = model.rpn_head(features)
        proposals, valid = model.rpn_head.proposals(
            objectness, deltas, model.rpn_head.anchors((h, w)), info[:, 2:4], (h, w), False)
        detections = model({"images": tf.constant(images, tf.float32), "image_info": info},
                           training=False)
        for i in range(2):
            ours = proposals[i].numpy()[valid[i].numpy()]
            want = theirs[f"proposals_{i}"]
            self.assertEqual(ours.shape, want.shape)
            # As sets: near-equal objectness may order two proposals either way.
            nearest = np.abs(ours[:, None] - want[None]).max(-1).min(1)
            self.assertLess(nearest.max(), 1e-3)
            n = int(detections["num_detections"][i])
            self.assertEqual(n, len(theirs[f"scores_{i}"]))
            # Detections whose scores tie within float32 rounding may come in
            # either order (v2 on 2026-12-07's AMD EPYC: two of 100): pair
            # each of ours with theirs of the nearest box.
            boxes = detections["detection_boxes"][i][:n].numpy()
            pair = np.abs(boxes[:, None] - theirs[f"boxes_{i}"][None]).max(-1).argmin(1)
            self.assertAllEqual(np.sort(pair), np.arange(n))
            scores = detections["detection_scores"][i][:n].numpy()
            self.assertAllClose(scores, theirs[f"scores_{i}"], atol=1e-5)   # as ranked
            self.assertAllClose(scores, theirs[f"scores_{i}"][pair], atol=1e-5)
            self.assertAllEqual(detections["detection_classes"][i][:n],
                                theirs[f"labels_{i}"][pair])
            self.assertAllClose(boxes, theirs[f"boxes_{i}"][pair], atol=1e-3)
            self.assertAllClose(detections["detection_masks"][i][:n],
                                theirs[f"masks_{i}"][pair], atol=1e-4)


class TorchvisionV2ParityTest(TorchvisionParityTest):
    """The same for `maskrcnn_resnet50_fpn_v2`: batch norms (eval statistics)
    in the FPN and both heads, two RPN convs, a box head of four convs and one FC."""

    ARCH, NETWORK = "v2", "maskrcnn_resnet50_fpn_v2"


@unittest.skipUnless(os.environ.get("MRCNN_TORCH_PYTHON"),
                     "set MRCNN_TORCH_PYTHON to a Python with torch and torchvision")
class TorchvisionKeypointParityTest(tf.test.TestCase):
    """torchvision's `keypointrcnn_resnet50_fpn` (random weights), renamed to
    Detectron2's layout: our keypoint head gives its logits, and the whole
    inference (Detectron2's anchors and aligned RoIAlign on both sides) its
    detections and, for them, its keypoint heatmaps. The decoded points
    differ by design (torchvision resizes each heatmap bicubically to its
    box's pixels, ours refines the highest cell)."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        from mrcnn.modeling.fpn import FPN
        from mrcnn.modeling.mask_rcnn import MaskRCNN
        from mrcnn.modeling.roi_heads import BoxHead, KeypointHead, RoiHeads
        from mrcnn.modeling.rpn import RpnHead
        cls.model = MaskRCNN(
            backbone=resnet_lib.ResNet(depth=50, stride_in_1x1=False), fpn=FPN(),
            rpn_head=RpnHead(anchor_offset=0.0),
            roi_heads=RoiHeads(box_head=BoxHead(num_classes=1), mask_head=None,
                               keypoint_head=KeypointHead(num_keypoints=17)))
        cls.theirs = _torchvision_into(cls.model, "--num_classes=1", "--arch=keypoint")

    def test_keypoint_head_matches(self):
        ours = self.model.roi_heads.keypoint_head(
            tf.constant(self.theirs["keypoint_pooled"][None]))[0]
        self.assertLess(_rel(ours, self.theirs["keypoint_logits"]), 1e-5)

    def test_convert_trained_weights(self):
        """--weights: a saved keypointrcnn_resnet50_fpn state dict (person =
        label 1) converts and loads into gin/torchvision_keypoint_r50_fpn.gin's
        model shape, every array placed."""
        from mrcnn.modeling.fpn import FPN
        from mrcnn.modeling.mask_rcnn import MaskRCNN
        from mrcnn.modeling.roi_heads import BoxHead, KeypointHead, RoiHeads
        from mrcnn.modeling.rpn import RpnHead
        out = tempfile.mkdtemp()
        pth = os.path.join(out, "tv.pth")
        python = os.environ["MRCNN_TORCH_PYTHON"]
        subprocess.run([python, "-c",
                        "import sys, torch, torchvision; torch.manual_seed(2); "
                        "net = torchvision.models.detection.keypointrcnn_resnet50_fpn("
                        "weights=None, weights_backbone=None); "
                        "torch.save(net.state_dict(), sys.argv[1]); "
                        "import numpy as np; np.save(sys.argv[2], net.roi_heads."
                        "keypoint_predictor.kps_score_lowres.weight.detach().numpy())",
                        pth, os.path.join(out, "lowres.npy")],
                       check=True, capture_output=True, timeout=600)
        script = PEER_SCRIPT
        subprocess.run([python, script, f"--out={out}", f"--weights={pth}"],
                       check=True, capture_output=True, timeout=600)
        model = MaskRCNN(
            backbone=resnet_lib.ResNet(depth=50, stride_in_1x1=False), fpn=FPN(),
            rpn_head=RpnHead(anchor_offset=0.0, round_anchors=True),
            roi_heads=RoiHeads(box_head=BoxHead(num_classes=1), mask_head=None,
                               keypoint_head=KeypointHead(num_keypoints=17), aligned=False))
        self.assertEqual(d2.load_detectron2_weights(
            model, path=os.path.join(out, "model_final.pkl"), source_format="RGB"), [])
        self.assertAllClose(model.roi_heads.keypoint_head.deconv.kernel,
                            np.load(os.path.join(out, "lowres.npy")).transpose(2, 3, 1, 0))

    def test_inference_matches(self):
        from benchmarks import keypoint_decoding as decoding
        theirs, model = self.theirs, self.model
        x = theirs["input"]
        h, w = x.shape[1:3]
        images = x * np.array(resnet_lib.IMAGENET_STD) + np.array(resnet_lib.IMAGENET_MEAN)
        info = tf.constant([[h, w, h, w, 1.0]] * 2, tf.float32)
        detections = model({"images": tf.constant(images, tf.float32), "image_info": info},
                           training=False)
        features = model.fpn(model.backbone(model.normalize_images(
            tf.constant(images, tf.float32), info)))
        distances = []
        for i in range(2):
            n = int(detections["num_detections"][i])
            self.assertEqual(n, len(theirs[f"scores_{i}"]))
            self.assertGreater(n, 0)
            boxes = detections["detection_boxes"][i][:n]
            self.assertAllClose(boxes, theirs[f"boxes_{i}"], atol=1e-3)
            self.assertAllClose(detections["detection_scores"][i][:n], theirs[f"scores_{i}"],
                                atol=1e-5)
            heatmaps = model.roi_heads.keypoint_outputs(
                {l: f[i:i + 1] for l, f in features.items()}, boxes[None])[0]
            self.assertLess(_rel(heatmaps, theirs[f"keypoint_heatmaps_{i}"]), 1e-4)
            cells = (boxes[:, 2:] - boxes[:, :2]).numpy()[:, None, :] / 56.0   # [n, 1, 2]
            points = detections["detection_keypoints"][i][:n, :, :2].numpy()
            distances.append((points - theirs[f"keypoints_{i}"]) / cells)
            # benchmarks/keypoint_decoding.py's NumPy Detectron2 decoding is
            # torchvision's (the reference its figures compare against).
            for r in range(min(n, 2)):
                for k in range(17):
                    want = decoding.detectron2_decode(
                        theirs[f"keypoint_heatmaps_{i}"][r, k].astype(np.float64),
                        theirs[f"boxes_{i}"][r].astype(np.float64))
                    self.assertAllClose(want, theirs[f"keypoints_{i}"][r, k], atol=1e-3)
        # Random heatmaps have near-tied peaks, and torchvision resamples each
        # to its box's pixels (sub-sampling those of boxes under 56 px): the
        # two decoders pick another peak for about two thirds of the points.
        # Where they pick the same one (within 3 cells), the points agree to
        # a fraction of a cell, without bias (0.2 and -0.05 cells on
        # 2026-12-07's run).
        offsets = np.concatenate(distances).reshape(-1, 2)
        same = np.abs(offsets).max(-1) < 3.0
        self.assertGreater(same.sum(), 20)
        self.assertLess(np.abs(offsets[same]).mean(), 0.5)
        self.assertLess(np.abs(offsets[same].mean(0)).max(), 0.15)


if __name__ == "__main__":
    tf.test.main()
