"""The weight average (`train.ema_decay`): its arithmetic against a float64
NumPy reference, per step and per device, and its path through checkpoints,
resumption and `restore_model`."""

import os

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from mrcnn.evaluation import runner
from mrcnn.training import ema as ema_lib
from mrcnn.training import optimization, trainer
from tests.training.test_trainer import (ToyDetector, _dataset_fn, _logical_cpus,
                                         _seeded_dataset_fn, _two_cpu_mirrored)


def _reference(trajectory, decay, warmup):
    """float64 average after each step of `trajectory` ([steps + 1] lists of
    arrays: the weights before the first step, then after each)."""
    average = [np.asarray(w, np.float64) for w in trajectory[0]]
    for step, weights in enumerate(trajectory[1:], start=1):
        d = min(decay, (1 + step) / (10 + step)) if warmup else decay
        d = np.float64(np.float32(d))
        average = [a - (1 - d) * (a - w) for a, w in zip(average, weights)]
    return average


class WeightAverageTest(tf.test.TestCase, parameterized.TestCase):

    def _run(self, strategy, xla, decay, warmup, steps=6, global_batch=4):
        with strategy.scope():
            keras.utils.set_random_seed(1)
            model, averaged = ToyDetector(), ToyDetector()
            optimizer, _, _ = optimization.build_optimizer(global_batch, 8, 8,
                                                           base_learning_rate=0.5,
                                                           warmup_steps=0)
            step = tf.Variable(0, dtype=tf.int64, trainable=False)
        batches = iter(strategy.distribute_datasets_from_function(
            _dataset_fn(global_batch=global_batch)))
        first = next(iter(_dataset_fn(global_batch=global_batch)(
            tf.distribute.InputContext())))
        with strategy.scope():
            for m in (model, averaged):
                strategy.run(lambda m=m: m(first, training=True))
            optimizer.build(model.trainable_variables)
            average = ema_lib.WeightAverage(model, averaged, strategy, decay=decay,
                                            warmup=warmup, xla=xla)
            average.reset()
        train_step = trainer.make_train_step(model, optimizer, strategy, xla, step,
                                             average=average)
        trajectory = [[v.numpy() for v in model.variables]]
        for _ in range(steps):
            train_step(next(batches))
            trajectory.append([v.numpy() for v in model.variables])
        return model, averaged, trajectory

    @parameterized.named_parameters(("graph_warmup", False, True),
                                    ("xla_warmup", True, True),
                                    ("graph_fixed", False, False))
    def test_matches_reference(self, xla, warmup):
        strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
        _, averaged, trajectory = self._run(strategy, xla, 0.7, warmup)
        want = _reference(trajectory, 0.7, warmup)
        moved = max(float(np.abs(w - w0).max()) for w, w0 in zip(trajectory[-1],
                                                                  trajectory[0]))
        self.assertGreater(moved, 1e-2)
        for a, w, last in zip(averaged.variables, want, trajectory[-1]):
            self.assertAllClose(a.numpy(), w, rtol=1e-5, atol=1e-6)
        # Not the weights themselves: the average lags them.
        lag = max(float(np.abs(a.numpy() - last).max())
                  for a, last in zip(averaged.variables, trajectory[-1]))
        self.assertGreater(lag, 1e-3)

    def test_decay_warms_up(self):
        strategy = tf.distribute.get_strategy()
        with strategy.scope():
            model, averaged = ToyDetector(), ToyDetector()
        average = ema_lib.WeightAverage(model, averaged, strategy, decay=0.9998)
        self.assertAllClose([average.decay_at(tf.constant(s, tf.int64))
                             for s in (0, 1, 10, 10**6)],
                            [0.1, 2 / 11, 11 / 20, 0.9998])
        with self.assertRaisesRegex(ValueError, r"ema_decay=1.0 must be in \(0, 1\)"):
            ema_lib.WeightAverage(model, averaged, strategy, decay=1.0)

    def test_unpaired_models_raise(self):
        strategy = tf.distribute.get_strategy()
        model, other = ToyDetector(), ToyDetector()
        batch = next(iter(_dataset_fn()(tf.distribute.InputContext())))
        model(batch)
        other.conv = keras.layers.Conv2D(4, 5, padding="same")
        other(batch)
        with self.assertRaisesRegex(ValueError, "does not pair with"):
            ema_lib.WeightAverage(model, other, strategy, decay=0.99)

    @parameterized.named_parameters(("graph", False), ("xla", True))
    def test_mirrored_two_cpus_each_device_averages_its_copy(self, xla):
        devices = _logical_cpus(2)
        if len(devices) < 2:
            self.skipTest("logical CPUs could not be configured in this process")
        strategy = _two_cpu_mirrored(devices)
        _, averaged, trajectory = self._run(strategy, xla, 0.8, True, steps=4,
                                            global_batch=8)
        want = _reference(trajectory, 0.8, True)
        for a, w in zip(averaged.variables, want):
            copies = [c.numpy() for c in a._value.values]
            self.assertLen(copies, 2)
            self.assertAllEqual(copies[0], copies[1])
            self.assertAllClose(copies[0], w, rtol=1e-5, atol=1e-6)


class TrainWithAverageTest(tf.test.TestCase):

    def _train(self, model_dir, **kw):
        args = dict(model_fn=ToyDetector, dataset_fn=_dataset_fn(), num_train_images=32,
                    total_steps=6, xla=False, checkpoint_every=3, log_every=3,
                    strategy=tf.distribute.OneDeviceStrategy("/cpu:0"))
        args.update(kw)
        return trainer.train(model_dir, **args)

    def test_checkpoint_restore_and_resume(self):
        d = os.path.join(self.get_temp_dir(), "run")
        out = self._train(d, ema_decay=0.9, stop_after=3)
        self.assertTrue(trainer.has_weight_average(os.path.join(d, "ckpt-3")))
        out = self._train(d, ema_decay=0.9)
        self.assertEqual(out["step"], 6)
        averaged, model = out["average"], out["model"]
        # restore_model takes the average by default, the weights on request.
        with self.assertLogs("absl", level="INFO") as logs:
            restored = _restore(d)
        self.assertIn("moving average", "\n".join(logs.output))
        for r, a in zip(restored.variables, averaged.variables):
            self.assertAllEqual(r.numpy(), a.numpy())
        for r, w in zip(_restore(d, average_weights=False).variables, model.variables):
            self.assertAllEqual(r.numpy(), w.numpy())
        lag = max(float(np.abs(a.numpy() - w.numpy()).max())
                  for a, w in zip(averaged.variables, model.variables))
        self.assertGreater(lag, 1e-4)

    def test_resumed_interrupted_run_matches_uninterrupted(self):
        root = self.get_temp_dir()

        def seeded():
            keras.utils.set_random_seed(4)
            return ToyDetector()

        runs = {}
        for name, cuts in (("whole", [None]), ("cut", [3, None])):
            for stop_after in cuts:
                runs[name] = self._train(
                    os.path.join(root, name), model_fn=seeded, ema_decay=0.9,
                    stop_after=stop_after,
                    dataset_fn=_seeded_dataset_fn([], fixed_seed=7))
        self.assertEqual(runs["cut"]["step"], 6)
        for a, b in zip(runs["whole"]["average"].variables,
                        runs["cut"]["average"].variables):
            self.assertAllClose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-7)

    def test_average_starts_from_a_checkpoint_without_one(self):
        d = os.path.join(self.get_temp_dir(), "run")
        self._train(d, stop_after=3)
        self.assertFalse(trainer.has_weight_average(os.path.join(d, "ckpt-3")))
        with self.assertLogs("absl", level="WARNING") as logs:
            out = self._train(d, ema_decay=0.9, stop_after=0)
        self.assertIn("holds no weight average", "\n".join(logs.output))
        for a, w in zip(out["average"].variables, out["model"].variables):
            self.assertAllEqual(a.numpy(), w.numpy())
        # Without an average in the checkpoint, restore_model takes the weights.
        for r, w in zip(_restore(d).variables, out["model"].variables):
            self.assertAllEqual(r.numpy(), w.numpy())


def _restore(path, **kw):
    model, _, _ = runner.restore_model(_build_toy, path, (8, 8), **kw)
    return model


def _build_toy():
    return _InferenceToy()


class _InferenceToy(ToyDetector):
    """ToyDetector called as restore_model calls a detector (no targets)."""

    def call(self, batch, training=False):
        if "target" not in batch:
            batch = dict(batch, images=tf.cast(batch["images"], tf.float32),
                         target=tf.zeros([tf.shape(batch["images"])[0], 2]))
        return super().call(batch, training)


if __name__ == "__main__":
    tf.test.main()
