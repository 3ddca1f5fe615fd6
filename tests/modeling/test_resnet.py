"""ResNet backbone, FrozenBatchNorm and the two weight loaders."""

import os
import tempfile
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
        # Keras 2 layout (groups named by layer), as the downloadable files.
        import h5py
        from keras.src.legacy.saving import legacy_h5_format
        path = os.path.join(self.get_temp_dir(), 'legacy.h5')
        with h5py.File(path, 'w') as f:
            legacy_h5_format.save_weights_to_hdf5_group(f, self.keras_model)
        net = resnet_lib.ResNet(depth=50)
        resnet_lib.load_keras_resnet50_weights(net, path)
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
        resnet_lib.load_tensorpack_resnet_weights(net, path)
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
