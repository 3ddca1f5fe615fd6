"""ResNet backbone, FrozenBatchNorm and the weight loaders."""

import os
import subprocess
import tempfile
import unittest
from unittest import mock

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from mrcnn.modeling import resnet as resnet_lib

_CANVAS = 64  # smallest canvas that keeps C5 at 2 x 2


def _frozen_bn_reference(x, gamma, beta, mean, var, eps):
    x = x.astype(np.float64)
    return (x - mean) / np.sqrt(var + eps) * gamma + beta


class FrozenBatchNormTest(tf.test.TestCase, parameterized.TestCase):

    @parameterized.named_parameters(
        ('fp32', 'float32', tf.float32, 1e-5),
        ('bf16', 'mixed_bfloat16', tf.bfloat16, 5e-2),
        ('fp16', 'mixed_float16', tf.float16, 5e-3))
    def test_matches_reference(self, policy, dtype, atol):
        rng = np.random.default_rng(0)
        layer = resnet_lib.FrozenBatchNorm(dtype=policy)
        x = rng.normal(size=(2, 3, 3, 4)).astype(np.float32)
        layer.build(x.shape)
        params = [rng.uniform(0.5, 2.0, 4) for _ in range(4)]
        for var, value in zip(
                (layer.gamma, layer.beta, layer.moving_mean,
                 layer.moving_variance), params):
            var.assign(value.astype(np.float32))
        got = layer(tf.cast(x, dtype))
        self.assertEqual(got.dtype, dtype)
        want = _frozen_bn_reference(x, *params, eps=1e-5)
        self.assertAllClose(tf.cast(got, tf.float32), want, atol=atol,
                            rtol=atol)
        self.assertEmpty(layer.trainable_variables)

    def test_literal(self):
        layer = resnet_lib.FrozenBatchNorm(epsilon=0.0)
        layer.build((1, 1))
        layer.gamma.assign([2.0])
        layer.beta.assign([1.0])
        layer.moving_mean.assign([3.0])
        layer.moving_variance.assign([4.0])
        # (5 - 3) / 2 * 2 + 1 = 3
        self.assertAllClose(layer(tf.constant([[5.0]])), [[3.0]])


class ResNetTest(tf.test.TestCase, parameterized.TestCase):

    @parameterized.named_parameters(
        ('r18', 18, 'frozen_bn', 64), ('r34_gn', 34, 'gn', 64),
        ('r50', 50, 'frozen_bn', 256), ('r50_bn', 50, 'bn', 256),
        ('r18_gn_half', 18, 'gn', 32, 32), ('r50_half', 50, 'bn', 128, 32),
        ('r18_w16', 18, 'bn', 16, 16))
    def test_output_shapes(self, depth, norm, c2, width=64):
        net = resnet_lib.ResNet(depth=depth, norm=norm, width=width)
        out = net(tf.zeros([2, _CANVAS, _CANVAS, 3]))
        self.assertEqual(sorted(out), [2, 3, 4, 5])
        for level, x in out.items():
            side = _CANVAS // 2 ** level
            self.assertEqual(x.shape, (2, side, side, c2 * 2 ** (level - 2)))
            self.assertEqual(net.out_channels[level], x.shape[-1])
        self.assertEqual(net.stem_conv.conv.kernel.shape, (7, 7, 3, width))

    def _frozen_bn_nets(self, policies):
        """ResNet-18s, one per dtype policy, with equal random weights."""
        nets = []
        for policy in policies:
            keras.mixed_precision.set_global_policy(policy)
            try:
                net = resnet_lib.ResNet(depth=18, freeze_at=0)
                net(tf.zeros([1, _CANVAS, _CANVAS, 3]))
            finally:
                keras.mixed_precision.set_global_policy('float32')
            nets.append(net)
        rng = np.random.default_rng(4)
        for weights in zip(*(net.weights for net in nets)):
            path = weights[0].path
            if 'kernel' in path:
                value = weights[0].numpy()
            elif 'variance' in path:
                value = rng.uniform(0.5, 1.5, weights[0].shape)
            else:
                value = rng.normal(0, 0.3, weights[0].shape)
            for v in weights:
                self.assertEqual(v.dtype, 'float32')  # no autocast of stats
                v.assign(value.astype(np.float32))
        return nets

    @staticmethod
    def _outputs_and_grads(net):
        images = tf.random.stateless_normal([2, _CANVAS, _CANVAS, 3], [1, 2])
        with tf.GradientTape() as tape:
            out = net(images)
            total = sum(tf.reduce_sum(tf.cast(x, tf.float32) ** 2)
                        for x in out.values())
        grads = tape.gradient(total, net.trainable_variables)
        return [tf.cast(out[k], tf.float64) for k in sorted(out)], [
            tf.cast(g, tf.float64) for g in grads]

    def test_frozen_bn_folded_into_conv(self):
        # float32: the folded conv (kernel * scale, then + offset) equals the
        # conv and the norm run one after the other, outputs and every
        # kernel gradient. bfloat16: as close to float32 as the unfolded
        # layers are (measured relative errors 0.0035 and 0.046).
        net, net_bf16 = self._frozen_bn_nets(['float32', 'mixed_bfloat16'])
        folded = self._outputs_and_grads(net)
        plain = lambda conv, norm, x, training: norm(conv(x))  # noqa: E731
        with mock.patch.object(resnet_lib, '_conv_norm', plain):
            want = self._outputs_and_grads(net)
        self.assertLen(folded[1], len(net.trainable_variables))
        rel = lambda a, b: float(tf.norm(a - b) / tf.norm(b))  # noqa: E731
        bf16 = self._outputs_and_grads(net_bf16)
        for got, ref, low in zip(folded[0] + folded[1], want[0] + want[1],
                                 bf16[0] + bf16[1]):
            self.assertLess(rel(got, ref), 1e-5)
            self.assertLess(rel(low, ref), 0.1)
        self.assertLess(max(rel(a, b) for a, b in zip(bf16[0], want[0])), 0.01)

    def test_parameter_count_r50(self):
        net = resnet_lib.ResNet(depth=50)
        net(tf.zeros([1, _CANVAS, _CANVAS, 3]))
        # torchvision resnet50 without fc: 23,508,032 params incl. BN stats
        # (23,454,912 weights + 53,120 BN running mean/var).
        self.assertEqual(net.count_params(), 23_561_152)

    def test_resnext(self):
        # torchvision resnext50_32x4d without fc: 22,979,904 weights + 68,224
        # BN running mean/var.
        net = resnet_lib.ResNet(depth=50, groups=32, width_per_group=4)
        out = net(tf.zeros([1, _CANVAS, _CANVAS, 3]))
        self.assertEqual(net.count_params(), 23_048_128)
        self.assertEqual({k: v.shape[-1] for k, v in out.items()},
                         {2: 256, 3: 512, 4: 1024, 5: 2048})
        conv2 = net.stages[3][0].convs[1].conv   # res5's grouped 3x3: 1024 wide
        self.assertEqual((conv2.groups, tuple(conv2.kernel.shape)), (32, (3, 3, 32, 1024)))
        # The frozen-BN fold holds for grouped kernels too.
        images = tf.random.stateless_normal([1, _CANVAS, _CANVAS, 3], [3, 4])
        small = resnet_lib.ResNet(depth=50, width=16, groups=4, width_per_group=8,
                                  freeze_at=0)
        small(images)
        rng = np.random.default_rng(5)
        for v in small.weights:   # the kernels keep their init: deep nets blow up otherwise
            if 'kernel' not in v.path:
                v.assign(rng.uniform(0.5, 1.5, v.shape) if 'variance' in v.path
                         else rng.normal(0, 0.3, v.shape))
        folded = small(images)
        plain = lambda conv, norm, x, training: norm(conv(x))  # noqa: E731
        with mock.patch.object(resnet_lib, '_conv_norm', plain):
            want = small(images)
        for level in range(2, 6):
            self.assertLess(_rel(folded[level], want[level]), 1e-5)
        with self.assertRaisesRegex(ValueError, 'groups=32 needs bottleneck'):
            resnet_lib.ResNet(depth=18, groups=32, width_per_group=4)
        with self.assertRaisesRegex(ValueError, 'width_per_group'):
            resnet_lib.ResNet(groups=32)
        with self.assertRaisesRegex(ValueError, "multiple of 32 with norm='gn'"):
            resnet_lib.ResNet(norm='gn', groups=3, width_per_group=5)

    @parameterized.named_parameters(('none', 0, 0), ('stem', 1, 1),
                                    ('res2', 2, 2), ('res4', 4, 4))
    def test_freeze_at(self, freeze_at, frozen_stages):
        net = resnet_lib.ResNet(depth=18, norm='bn', freeze_at=freeze_at)
        net(tf.zeros([1, _CANVAS, _CANVAS, 3]))
        trainable = {v.path.split('/')[1] for v in net.trainable_variables}
        self.assertEqual('stem_conv' in trainable, frozen_stages < 1)
        for stage in range(2, 6):
            self.assertEqual(f'res{stage}_block0' in trainable,
                             stage > frozen_stages, (stage, trainable))

    def test_strided_conv_pads_symmetrically(self):
        # A 1-channel impulse at (1, 1) through the 7x7/2 stem conv with a
        # kernel that is 1 only at its centre: symmetric padding 3 maps
        # output (i, j) to input (2i, 2j), so the impulse never shows;
        # Keras 'same' (pad 2 before) would map it to (2i + 1, 2j + 1).
        conv = resnet_lib._Conv(1, 7, 2, name='c')
        x = np.zeros((1, 8, 8, 1), np.float32)
        x[0, 2, 2, 0] = 1.0
        conv(tf.constant(x))
        kernel = np.zeros((7, 7, 1, 1), np.float32)
        kernel[3, 3] = 1.0
        conv.conv.kernel.assign(kernel)
        out = conv(tf.constant(x))[0, :, :, 0].numpy()
        want = np.zeros((4, 4))
        want[1, 1] = 1.0
        self.assertAllEqual(out, want)

    def test_config_round_trip(self):
        net = resnet_lib.ResNet(depth=34, norm='gn', freeze_at=3, width=96)
        clone = resnet_lib.ResNet.from_config(net.get_config())
        self.assertEqual((clone.depth, clone.norm, clone.freeze_at, clone.width),
                         (34, 'gn', 3, 96))

    def test_gin_binding(self):
        import gin
        with gin.unlock_config():
            gin.parse_config(['ResNet.depth = 18', "ResNet.norm = 'gn'"])
        try:
            net = resnet_lib.ResNet()
        finally:
            gin.clear_config()
        self.assertEqual((net.depth, net.norm), (18, 'gn'))
        self.assertEqual(net.get_config()['depth'], 18)

    def test_bad_args(self):
        with self.assertRaisesRegex(ValueError, 'depth=42'):
            resnet_lib.ResNet(depth=42)
        with self.assertRaisesRegex(ValueError, 'norm'):
            resnet_lib.ResNet(norm='ln')
        with self.assertRaisesRegex(ValueError, 'width=0'):
            resnet_lib.ResNet(width=0)
        with self.assertRaisesRegex(ValueError, "width=48.*'gn'"):
            resnet_lib.ResNet(depth=18, norm='gn', width=48)


def _randomise(variables, rng):
    for v in variables:
        value = rng.normal(size=v.shape).astype(np.float32)
        if 'variance' in v.path:
            value = np.abs(value) + 0.5
        v.assign(value)


class KerasLoaderTest(tf.test.TestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.tmp = tempfile.mkdtemp()
        cls.path = os.path.join(cls.tmp, 'r50.weights.h5')
        cls.keras_model = keras.applications.ResNet50(weights=None)
        _randomise(cls.keras_model.weights, np.random.default_rng(1))
        cls.keras_model.save_weights(cls.path)
        cls.source = {f'{layer.name}/{w.name}': w.numpy()
                      for layer in cls.keras_model.layers
                      for w in layer.weights}

    def test_every_variable_loaded(self):
        net = resnet_lib.ResNet(depth=50)
        resnet_lib.load_keras_resnet50_weights(net, self.path)
        src = self.source
        units = resnet_lib._named_units(net)
        self.assertLen(units, 53)  # 1 stem + 16 blocks x 3 + 4 shortcuts
        for conv, norm, stage, block, index in units:
            prefix = ('conv1' if stage == 1 else
                      f'conv{stage}_block{block + 1}_{index}')
            self.assertAllEqual(conv.conv.kernel, src[f'{prefix}_conv/kernel'])
            for name in ('gamma', 'beta', 'moving_variance'):
                self.assertAllEqual(getattr(norm, name),
                                    src[f'{prefix}_bn/{name}'])
            self.assertAllClose(norm.moving_mean,
                                src[f'{prefix}_bn/moving_mean']
                                - src[f'{prefix}_conv/bias'], atol=1e-6)
        # Every variable of the backbone was assigned: none kept its init.
        self.assertLen(net.weights, 53 * 5)

    def test_folded_bias_gives_keras_block_output(self):
        # Stem conv + BN of Keras (with bias) equals ours (bias folded),
        # up to the epsilon difference (1.001e-5 vs 1e-5).
        net = resnet_lib.ResNet(depth=50)
        resnet_lib.load_keras_resnet50_weights(net, self.path)
        x = tf.random.stateless_normal([1, 32, 32, 3], seed=[1, 2])
        km = self.keras_model
        ref = km.get_layer('conv1_bn')(
            km.get_layer('conv1_conv')(km.get_layer('conv1_pad')(x)))
        ours = net.stem_norm(net.stem_conv(x))
        self.assertAllClose(ours, ref, atol=1e-3, rtol=1e-3)

    def test_legacy_h5_layout(self):
        # Keras 2 layout (groups named by layer), as the downloadable files,
        # read from a URL (file:// stands in for gs://; h5py opens local
        # paths only).
        import h5py
        from keras.src.legacy.saving import legacy_h5_format
        path = os.path.join(self.get_temp_dir(), 'legacy.h5')
        with h5py.File(path, 'w') as f:
            legacy_h5_format.save_weights_to_hdf5_group(f, self.keras_model)
        net = resnet_lib.ResNet(depth=50)
        resnet_lib.load_keras_resnet50_weights(net, 'file://' + path)
        self.assertAllEqual(net.stages[3][2].convs[2].conv.kernel,
                            self.source['conv5_block3_3_conv/kernel'])

    def test_mismatched_file_names_the_variable(self):
        other = keras.applications.ResNet50(
            weights=None, include_top=False, input_shape=(64, 64, 1))
        path = os.path.join(self.get_temp_dir(), 'gray.weights.h5')
        other.save_weights(path)
        with self.assertRaisesRegex(
                ValueError, r'stem_conv/kernel.*\(7, 7, 3, 64\).*'
                r'conv1_conv/kernel.*\(7, 7, 1, 64\)'):
            resnet_lib.load_keras_resnet50_weights(
                resnet_lib.ResNet(depth=50), path)

    def test_wrong_depth(self):
        with self.assertRaisesRegex(ValueError, 'depth=50'):
            resnet_lib.load_keras_resnet50_weights(
                resnet_lib.ResNet(depth=101), self.path)

    def test_wrong_width(self):
        with self.assertRaisesRegex(ValueError, 'width=64.*width=32'):
            resnet_lib.load_keras_resnet50_weights(
                resnet_lib.ResNet(depth=50, width=32), self.path)

    def test_train_init_sees_our_images_as_keras_saw_its_own(self):
        # Keras ResNet50 takes BGR minus the caffe mean; the model feeds RGB
        # (x - pixel_mean) / pixel_std, its own (here not ImageNet's) values.
        # After load_backbone_weights the stems agree.
        class Holder:
            backbone = resnet_lib.ResNet(depth=50)
            pixel_mean, pixel_std = (110.0, 120.0, 100.0), (50.0, 60.0, 55.0)
        Holder.backbone(tf.zeros([1, 64, 64, 3]))
        resnet_lib.load_backbone_weights(Holder, path=self.path)
        pixels = np.random.default_rng(3).uniform(0, 255, (1, 224, 224, 3)).astype(np.float32)
        theirs = keras.Model(self.keras_model.input,
                             self.keras_model.get_layer('conv1_relu').output)(
            keras.applications.resnet50.preprocess_input(pixels.copy()))
        net = Holder.backbone
        x = (pixels - np.array(Holder.pixel_mean, np.float32)) / np.array(
            Holder.pixel_std, np.float32)
        ours = tf.nn.relu(net.stem_norm(net.stem_conv(x)))
        # Interior only: zero padding means a different pixel in each space.
        ours, theirs = np.asarray(ours)[0, 2:-2, 2:-2], np.asarray(theirs)[0, 2:-2, 2:-2]
        self.assertAllClose(ours, theirs, rtol=1e-3, atol=1e-3 * np.abs(theirs).max())

    def test_load_backbone_weights_as_train_init(self):
        class Holder:
            backbone = resnet_lib.ResNet(depth=50)
            pixel_mean, pixel_std = resnet_lib.IMAGENET_MEAN, resnet_lib.IMAGENET_STD
        with self.assertRaisesRegex(FileNotFoundError, 'nowhere.h5.*init_fn'):
            resnet_lib.load_backbone_weights(Holder, path='/nowhere.h5')
        with self.assertRaisesRegex(ValueError, 'file_format'):
            resnet_lib.load_backbone_weights(Holder, path=self.path, file_format='caffe')
        Holder.backbone(tf.zeros([1, 64, 64, 3]))
        before = [w.numpy().copy() for w in Holder.backbone.weights]
        resnet_lib.load_backbone_weights(Holder, path=self.path)
        changed = [not np.array_equal(b, w.numpy())
                   for b, w in zip(before, Holder.backbone.weights)]
        self.assertGreater(sum(changed), 0.9 * len(changed))


class TensorpackLoaderTest(tf.test.TestCase, parameterized.TestCase):

    def _write_npz(self, net, corrupt=None, drop=None, extra=None):
        rng = np.random.default_rng(2)
        arrays = {}
        for conv, norm, stage, block, index in resnet_lib._named_units(net):
            prefix = ('conv0' if stage == 1 else
                      f'group{stage - 2}/block{block}/'
                      + (f'conv{index}' if index else 'convshortcut'))
            arrays[f'{prefix}/W'] = rng.normal(size=conv.conv.kernel.shape)
            for key in ('gamma', 'beta', 'mean/EMA', 'variance/EMA'):
                arrays[f'{prefix}/bn/{key}'] = rng.uniform(
                    0.5, 2.0, size=norm.gamma.shape)
        arrays['linear/W:0'] = np.zeros((3, 3))  # ignored: not backbone
        if corrupt:
            arrays[corrupt] = np.zeros((5,))
        if drop:
            del arrays[drop]
        if extra:
            arrays[extra] = np.zeros((1,))
        path = os.path.join(self.get_temp_dir(), 'tp.npz')
        np.savez(path, **{k: v.astype(np.float32) for k, v in arrays.items()})
        return path, arrays

    @parameterized.named_parameters(('r50', 50), ('r18', 18))
    def test_every_variable_loaded(self, depth):
        net = resnet_lib.ResNet(depth=depth)
        net(tf.zeros([1, _CANVAS, _CANVAS, 3]))
        path, arrays = self._write_npz(net)
        # From a URL: file:// stands in for gs:// (np.load opens local paths only).
        resnet_lib.load_tensorpack_resnet_weights(net, 'file://' + path)
        loaded = 0
        for conv, norm, stage, block, index in resnet_lib._named_units(net):
            prefix = ('conv0' if stage == 1 else
                      f'group{stage - 2}/block{block}/'
                      + (f'conv{index}' if index else 'convshortcut'))
            self.assertAllClose(conv.conv.kernel, arrays[f'{prefix}/W'])
            self.assertAllClose(norm.gamma, arrays[f'{prefix}/bn/gamma'])
            self.assertAllClose(norm.beta, arrays[f'{prefix}/bn/beta'])
            self.assertAllClose(norm.moving_mean,
                                arrays[f'{prefix}/bn/mean/EMA'])
            self.assertAllClose(norm.moving_variance,
                                arrays[f'{prefix}/bn/variance/EMA'])
            loaded += 5
        self.assertEqual(loaded, len(net.weights))

    def test_errors_name_the_variable(self):
        net = resnet_lib.ResNet(depth=18)
        net(tf.zeros([1, _CANVAS, _CANVAS, 3]))
        path, _ = self._write_npz(net, corrupt='group1/block0/conv2/bn/gamma')
        with self.assertRaisesRegex(
                ValueError, r'res3_block0_norm2/gamma.*group1/block0/conv2/bn/gamma'):
            resnet_lib.load_tensorpack_resnet_weights(net, path)
        path, _ = self._write_npz(net, drop='group2/block0/convshortcut/W')
        with self.assertRaisesRegex(
                ValueError, r'group2/block0/convshortcut/W.*res4_block0_shortcut'):
            resnet_lib.load_tensorpack_resnet_weights(net, path)
        path, _ = self._write_npz(net, extra='group3/block7/conv1/W')
        with self.assertRaisesRegex(ValueError, 'group3/block7/conv1/W'):
            resnet_lib.load_tensorpack_resnet_weights(net, path)

    def test_gn_rejected(self):
        with self.assertRaisesRegex(ValueError, "'gn'"):
            resnet_lib.load_tensorpack_resnet_weights(
                resnet_lib.ResNet(depth=18, norm='gn'), 'unused.npz')


def _sane(variables, rng, tiny_variance=()):
    """Random weights that keep a deep net's activations in range: kernels
    by fan-in, gammas below 1. Norms whose path contains a name in
    `tiny_variance` get variances near 1e-6, where BN epsilons matter."""
    for v in variables:
        shape = tuple(v.shape)
        if len(shape) == 4:
            value = rng.normal(size=shape) / np.sqrt(np.prod(shape[:3]))
        elif 'variance' in v.path:
            value = rng.uniform(0.5, 2.0, shape)
            if any(name in v.path for name in tiny_variance):
                value = rng.uniform(1e-7, 1e-6, shape)
        elif 'gamma' in v.path:
            value = rng.uniform(0.3, 0.8, shape)
        else:
            value = rng.normal(0.0, 0.1, shape)
        v.assign(value.astype(np.float32))


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


class KerasParityTest(tf.test.TestCase):

    def test_stride_in_1x1_backbone_is_keras_resnet50(self):
        # keras.applications' ResNet50 is the MSRA network: stride on the
        # 1x1 conv, BN epsilon 1.001e-5 (here made to matter in the stem,
        # whose variances are ~1e-6). With stride_in_1x1 the loaded backbone
        # gives its C2..C5; with the stride on the 3x3 only C2 agrees.
        km = keras.applications.ResNet50(weights=None, include_top=False,
                                         input_shape=(_CANVAS, _CANVAS, 3))
        _sane(km.weights, np.random.default_rng(5), tiny_variance=('conv1_bn',))
        path = os.path.join(self.get_temp_dir(), 'r50.weights.h5')
        km.save_weights(path)
        taps = ('conv2_block3_out', 'conv3_block4_out', 'conv4_block6_out',
                'conv5_block3_out')
        x = tf.random.stateless_normal([2, _CANVAS, _CANVAS, 3], [3, 4]) * 50.0
        want = keras.Model(km.input, [km.get_layer(t).output for t in taps])(x)
        for stride_in_1x1 in (True, False):
            net = resnet_lib.ResNet(depth=50, stride_in_1x1=stride_in_1x1)
            resnet_lib.load_keras_resnet50_weights(net, path)
            out = net(x)
            errors = [_rel(out[level], ref) for level, ref in zip(range(2, 6), want)]
            if stride_in_1x1:
                self.assertLess(max(errors), 1e-5, errors)
            else:
                self.assertLess(errors[0], 1e-5, errors)
                self.assertGreater(min(errors[1:]), 0.03, errors)

    def test_stride_placement(self):
        for stride_in_1x1, strides in ((True, (2, 1, 1)), (False, (1, 2, 1))):
            net = resnet_lib.ResNet(depth=50, stride_in_1x1=stride_in_1x1)
            first = net.stages[1][0]  # res3_block0
            self.assertEqual(tuple(c.strides for c in first.convs), strides)
            self.assertEqual(first.shortcut.strides, 2)
            out = net(tf.zeros([1, _CANVAS, _CANVAS, 3]))
            self.assertEqual(out[5].shape, (1, 2, 2, 2048))
            clone = resnet_lib.ResNet.from_config(net.get_config())
            self.assertEqual(clone.stride_in_1x1, stride_in_1x1)


def _d2_name(stage, block, index):
    if stage == 1:
        return 'stem.conv1'
    return f'res{stage}.{block}.' + ('shortcut' if index == 0 else f'conv{index}')


def _c2_name(stage, block, index):
    if stage == 1:
        return 'res_conv1'
    return f'res{stage}_{block}_branch' + ('1' if index == 0 else '2' + 'abc'[index - 1])


class Detectron2LoaderTest(tf.test.TestCase, parameterized.TestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.source = resnet_lib.ResNet(depth=50)
        cls.source(tf.zeros([1, _CANVAS, _CANVAS, 3]))
        _sane(cls.source.weights, np.random.default_rng(6))

    def _d2_arrays(self, prefix=''):
        """The source net as a Detectron2 state dict: OIHW kernels, d2 names."""
        arrays = {}
        for conv, norm, stage, block, index in resnet_lib._named_units(self.source):
            unit = prefix + _d2_name(stage, block, index)
            arrays[f'{unit}.weight'] = np.transpose(conv.conv.kernel.numpy(), (3, 2, 0, 1))
            for ours, theirs in (('gamma', 'weight'), ('beta', 'bias'),
                                 ('moving_mean', 'running_mean'),
                                 ('moving_variance', 'running_var')):
                arrays[f'{unit}.norm.{theirs}'] = getattr(norm, ours).numpy()
        return arrays

    def _c2_arrays(self):
        """The source net's kernels and gamma / beta under Caffe2 names."""
        arrays = {}
        for conv, norm, stage, block, index in resnet_lib._named_units(self.source):
            unit = _c2_name(stage, block, index)
            kernel = 'conv1_w' if stage == 1 else f'{unit}_w'
            arrays[kernel] = np.transpose(conv.conv.kernel.numpy(), (3, 2, 0, 1))
            arrays[f'{unit}_bn_s'] = norm.gamma.numpy()
            arrays[f'{unit}_bn_b'] = norm.beta.numpy()
        return arrays

    def _write(self, obj, name='w.pkl', protocol=4):
        import pickle
        path = os.path.join(self.get_temp_dir(), name)
        with open(path, 'wb') as f:
            pickle.dump(obj, f, protocol=protocol)
        return path

    def _assert_loaded(self, net, norm_stats=True):
        for (conv, norm, *_), (src_conv, src_norm, *_) in zip(
                resnet_lib._named_units(net), resnet_lib._named_units(self.source)):
            self.assertAllEqual(conv.conv.kernel, src_conv.conv.kernel)
            names = ('gamma', 'beta') + (('moving_mean', 'moving_variance')
                                         if norm_stats else ())
            for name in names:
                self.assertAllEqual(getattr(norm, name), getattr(src_norm, name))

    @parameterized.named_parameters(('plain', '', 'torchvision'),
                                    ('mask_rcnn_model_zoo', 'backbone.bottom_up.',
                                     'Detectron2 Model Zoo'))
    def test_detectron2_names(self, prefix, author):
        arrays = self._d2_arrays(prefix)
        arrays[f'{prefix}stem.conv1.norm.num_batches_tracked'] = np.array(0)
        if prefix:  # the rest of a trained Mask R-CNN is not the backbone's
            arrays['backbone.fpn_lateral2.weight'] = np.zeros((256, 256, 1, 1))
            arrays['roi_heads.box_predictor.cls_score.weight'] = np.zeros((81, 1024))
        else:  # tools/convert-torchvision-to-d2.py keeps the classifier
            arrays['stem.fc.weight'] = np.zeros((1000, 2048))
        path = self._write({'model': arrays, '__author__': author,
                            'matching_heuristics': True})
        if not prefix:   # from a URL: file:// stands in for gs://
            path = 'file://' + path
        net = resnet_lib.ResNet(depth=50)
        source = resnet_lib.load_detectron2_resnet_weights(net, path)
        self._assert_loaded(net)
        self.assertEqual(source, resnet_lib._SOURCES['torchvision'] if not prefix
                         else None)

    def test_caffe2_msra_names(self):
        # Python 2 pickle of {'blobs': ...}, as the MSRA model zoo files:
        # affine-only norms load as mean 0 and variance 1 - eps, so the
        # folded scale is the file's scale exactly.
        arrays = self._c2_arrays()
        arrays['fc1000_w'] = np.zeros((1000, 2048))
        arrays['res2_0_branch2a_w_momentum'] = np.zeros((64, 64, 1, 1))
        path = self._write({'blobs': arrays}, protocol=2)
        net = resnet_lib.ResNet(depth=50, stride_in_1x1=True)
        source = resnet_lib.load_detectron2_resnet_weights(net, path)
        self._assert_loaded(net, norm_stats=False)
        for _, norm, *_ in resnet_lib._named_units(net):
            self.assertAllEqual(norm.moving_mean, np.zeros(norm.gamma.shape))
            scale, offset = norm.affine()
            self.assertAllClose(scale, norm.gamma, rtol=1e-6, atol=0)
            self.assertAllClose(offset, norm.beta, rtol=0, atol=0)
        self.assertEqual(source, resnet_lib._SOURCES['msra'])

    def test_stride_warning(self):
        path = self._write({'blobs': self._c2_arrays()})
        with self.assertLogs('absl', 'WARNING') as logs:
            resnet_lib.load_detectron2_resnet_weights(resnet_lib.ResNet(depth=50), path)
        self.assertIn('ResNet.stride_in_1x1 = True', logs.output[0])
        with mock.patch.object(resnet_lib.logging, 'warning') as warning:
            resnet_lib.load_detectron2_resnet_weights(
                resnet_lib.ResNet(depth=50, stride_in_1x1=True), path)
        warning.assert_not_called()

    def test_errors_name_the_array(self):
        net = resnet_lib.ResNet(depth=50)
        arrays = self._d2_arrays()
        del arrays['res4.0.shortcut.norm.running_var']
        with self.assertRaisesRegex(ValueError, r"'res4.0.shortcut.norm.running_var'"
                                    r".*res4_block0_shortcut"):
            resnet_lib.load_detectron2_resnet_weights(
                net, self._write({'model': arrays}))
        arrays = self._d2_arrays()
        arrays['res5.2.conv4.weight'] = np.zeros((1,))
        with self.assertRaisesRegex(ValueError, 'not loaded.*res5.2.conv4.weight'):
            resnet_lib.load_detectron2_resnet_weights(
                net, self._write({'model': arrays}))
        arrays = self._d2_arrays()
        arrays['res3.1.conv2.weight'] = arrays['res3.1.conv2.weight'][:, :, :1, :1]
        with self.assertRaisesRegex(ValueError, r'res3_block1_conv2.*\(3, 3, 128, 128\)'
                                    r'.*res3.1.conv2.weight.*\(1, 1, 128, 128\)'):
            resnet_lib.load_detectron2_resnet_weights(
                net, self._write({'model': arrays}))
        with self.assertRaisesRegex(ValueError, "no ResNet stem.*'a.b'"):
            resnet_lib.load_detectron2_resnet_weights(
                net, self._write({'model': {'a.b': np.zeros(1)}}))
        two = {**self._d2_arrays('a.'), **self._d2_arrays('b.')}
        with self.assertRaisesRegex(ValueError, '2 Detectron2 stems'):
            resnet_lib.load_detectron2_resnet_weights(net, self._write({'model': two}))

    def test_refuses_what_is_not_arrays(self):
        net = resnet_lib.ResNet(depth=50)
        marker = os.path.join(self.get_temp_dir(), 'ran')

        class Payload:
            def __reduce__(self):
                return (os.mknod, (marker,))

        path = self._write({'model': {'stem.conv1.weight': Payload()}})
        with self.assertRaisesRegex(ValueError, f'{path}.*posix.mknod'):
            resnet_lib.load_detectron2_resnet_weights(net, path)
        self.assertFalse(os.path.exists(marker))
        import zipfile
        pth = os.path.join(self.get_temp_dir(), 'r50.pth')
        with zipfile.ZipFile(pth, 'w') as z:
            z.writestr('archive/data.pkl', b'')
        with self.assertRaisesRegex(ValueError, 'PyTorch checkpoint.*convert-torchvision'):
            resnet_lib.load_detectron2_resnet_weights(net, pth)

    @parameterized.named_parameters(('msra', False), ('model_zoo_with_overrides', True))
    def test_train_init_sees_our_images_as_the_source_saw_its_own(self, model_zoo):
        # MSRA: BGR minus a mean, unscaled. A Detectron2 file without a
        # convention takes one from load_backbone_weights' arguments (here
        # RGB with a mean and std of its own).
        class Holder:
            backbone = resnet_lib.ResNet(depth=50, stride_in_1x1=True)
            pixel_mean, pixel_std = resnet_lib.IMAGENET_MEAN, resnet_lib.IMAGENET_STD
        Holder.backbone(tf.zeros([1, _CANVAS, _CANVAS, 3]))
        pixels = np.random.default_rng(3).uniform(0, 255, (1, 64, 64, 3))
        if model_zoo:
            path = self._write({'model': self._d2_arrays('backbone.bottom_up.'),
                                '__author__': 'Detectron2 Model Zoo'})
            mean, std = (100.0, 110.0, 120.0), (50.0, 60.0, 70.0)
            resnet_lib.load_backbone_weights(
                Holder, path=path, file_format='detectron2', source_format='RGB',
                source_pixel_mean=mean, source_pixel_std=std)
            theirs_in = (pixels - mean) / std
        else:
            path = self._write({'blobs': self._c2_arrays()}, protocol=2)
            resnet_lib.load_backbone_weights(Holder, path=path, file_format='detectron2')
            theirs_in = pixels[..., ::-1] - np.array([103.53, 116.28, 123.675])
        src = self.source
        src_stem = (resnet_lib._named_units(src)[0][0].conv.kernel.numpy(),
                    src.stem_norm)
        if not model_zoo:  # the C2 norm is affine only
            src_scale, src_offset = src.stem_norm.gamma.numpy(), src.stem_norm.beta.numpy()
        else:
            src_scale, src_offset = (t.numpy() for t in src.stem_norm.affine())
        theirs = tf.nn.relu(tf.nn.conv2d(
            np.pad(theirs_in, [[0, 0], [3, 3], [3, 3], [0, 0]]).astype(np.float32),
            src_stem[0], 2, 'VALID') * src_scale + src_offset)
        net = Holder.backbone
        ours_in = (pixels - np.array(Holder.pixel_mean)) / np.array(Holder.pixel_std)
        ours = tf.nn.relu(net.stem_norm(net.stem_conv(ours_in.astype(np.float32))))
        # Interior only: zero padding means a different pixel in each space.
        ours, theirs = np.asarray(ours)[0, 2:-2, 2:-2], np.asarray(theirs)[0, 2:-2, 2:-2]
        self.assertAllClose(ours, theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max())


@unittest.skipUnless(os.environ.get('MRCNN_TORCH_PYTHON'),
                     'set MRCNN_TORCH_PYTHON to a Python with torch and torchvision')
class TorchvisionParityTest(tf.test.TestCase):
    """torchvision's own ResNet-50, through Detectron2's naming, gives our C2..C5.

    On demand (torch is not an mrcnn dependency):
      MRCNN_TORCH_PYTHON=/path/to/torch/venv/bin/python \\
        .venv/bin/python -m pytest -q tests/modeling/test_resnet.py -k Torchvision
    """

    def test_detectron2_file_of_torchvision_weights(self):
        self._check('resnet50', resnet_lib.ResNet(depth=50))

    def test_resnext(self):
        # torchvision's ResNeXt-50 32x4d: 32 groups of 4 channels at res2 (128).
        self._check('resnext50_32x4d',
                    resnet_lib.ResNet(depth=50, groups=32, width_per_group=4))

    def _check(self, arch, net):
        out = self.get_temp_dir()
        script = os.path.join(os.path.dirname(__file__), '..', '..', 'benchmarks',
                              'peers', 'torchvision_resnet50_features.py')
        subprocess.run([os.environ['MRCNN_TORCH_PYTHON'], script, f'--out={out}',
                        f'--arch={arch}'], check=True, capture_output=True, timeout=600)
        source = resnet_lib.load_detectron2_resnet_weights(
            net, os.path.join(out, 'r50.pkl'))
        self.assertEqual(source, resnet_lib._SOURCES['torchvision'])
        with np.load(os.path.join(out, 'features.npz')) as theirs:
            ours = net(tf.constant(theirs['input']))
            for level in range(2, 6):
                self.assertLess(_rel(ours[level], theirs[f'c{level}']), 1e-5, level)
