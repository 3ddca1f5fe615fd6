"""norms.MaskedBatchNorm against a NumPy reference of masked batch statistics."""

import numpy as np
import tensorflow as tf

from mrcnn.modeling import norms
from tests.training.test_trainer import _two_cpu_mirrored


def _reference(x, valid, gamma, beta, eps=1e-5):
    """float64 batch norm over the valid rows of x [N, H, W, C]."""
    rows = x[valid].reshape(-1, x.shape[-1])
    mean, var = rows.mean(0), rows.var(0)
    return (x - mean) / np.sqrt(var + eps) * gamma + beta, mean, var


class MaskedBatchNormTest(tf.test.TestCase):

    def setUp(self):
        super().setUp()
        rng = np.random.default_rng(0)
        self.x = rng.normal(2.0, 3.0, (6, 3, 3, 8))
        self.valid = np.array([True, False, True, True, False, True])
        self.x[~self.valid] = 1e3   # padded rows: far off, must not count
        self.gamma = rng.uniform(0.5, 1.5, 8)
        self.beta = rng.uniform(-0.5, 0.5, 8)

    def _layer(self, **kwargs):
        layer = norms.MaskedBatchNorm(**kwargs)
        layer.build(self.x.shape)
        layer.gamma.assign(self.gamma)
        layer.beta.assign(self.beta)
        return layer

    def test_training_statistics_of_the_valid_rows_eager_and_xla(self):
        want, mean, var = _reference(self.x, self.valid, self.gamma, self.beta)
        x = tf.constant(self.x, tf.float32)
        valid = tf.constant(self.valid)
        for run in ("eager", "xla"):
            layer = self._layer()
            call = (layer if run == "eager" else
                    tf.function(lambda x, v: layer(x, v, training=True), jit_compile=True))
            got = call(x, valid, training=True) if run == "eager" else call(x, valid)
            self.assertAllClose(got.numpy()[self.valid], want[self.valid], atol=1e-4, msg=run)
            self.assertAllClose(layer.moving_mean, 0.1 * mean, rtol=1e-4, msg=run)
            self.assertAllClose(layer.moving_variance, 0.9 + 0.1 * var, rtol=1e-4, msg=run)
        # Inference: the moving statistics, whatever the batch.
        out = layer(x, valid, training=False)
        moving = (self.x - 0.1 * mean) / np.sqrt(0.9 + 0.1 * var + 1e-5) * self.gamma + self.beta
        self.assertAllClose(out, moving, rtol=1e-4, atol=1e-3)

    def test_no_valid_row_keeps_the_moving_statistics(self):
        layer = self._layer()
        layer.moving_mean.assign(np.full(8, 0.5))
        out = layer(tf.constant(self.x, tf.float32), tf.zeros([6], tf.bool), training=True)
        self.assertAllClose(layer.moving_mean, np.full(8, 0.5))
        self.assertAllClose(layer.moving_variance, np.ones(8))
        self.assertTrue(np.isfinite(out.numpy()).all())
        # All rows when no mask is given.
        full, mean, _ = _reference(self.x, np.ones(6, bool), self.gamma, self.beta)
        self.assertAllClose(self._layer()(tf.constant(self.x, tf.float32), training=True),
                            full, atol=1e-4)

    def test_bfloat16_policy(self):
        layer = self._layer(dtype="mixed_bfloat16")
        self.assertEqual(layer.gamma.dtype, "float32")
        x = tf.constant(self.x, tf.bfloat16)
        out = layer(x, tf.constant(self.valid), training=True)
        self.assertEqual(out.dtype, tf.bfloat16)
        want, _, _ = _reference(x.numpy().astype(np.float64), self.valid, self.gamma, self.beta)
        self.assertAllClose(out.numpy().astype(np.float64)[self.valid], want[self.valid],
                            atol=0.05)

    def test_synchronized_replicas_share_the_statistics_of_all_valid_rows(self):
        strategy = _two_cpu_mirrored(["/cpu:0", "/cpu:1"])
        with strategy.scope():
            layer = self._layer(synchronized=True)
        halves = (slice(0, 3), slice(3, 6))

        @tf.function
        def step():
            def replica():
                i = tf.distribute.get_replica_context().replica_id_in_sync_group
                x = tf.gather(tf.constant(self.x, tf.float32),
                              tf.range(3) + 3 * i)
                valid = tf.gather(tf.constant(self.valid), tf.range(3) + 3 * i)
                return layer(x, valid, training=True)
            return strategy.run(replica)

        outs = strategy.experimental_local_results(step())
        want, mean, _ = _reference(self.x, self.valid, self.gamma, self.beta)
        for out, rows in zip(outs, halves):
            valid = self.valid[rows]
            self.assertAllClose(out.numpy()[valid], want[rows][valid], atol=1e-4)
        self.assertAllClose(layer.moving_mean, 0.1 * mean, rtol=1e-4)
        config = layer.get_config()
        self.assertTrue(config["synchronized"])
        self.assertEqual(norms.MaskedBatchNorm.from_config(config).momentum, 0.9)
