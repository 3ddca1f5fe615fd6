"""The training loop on a toy model: resume, NaN guard, schedule, strategies, precision."""

import collections
import contextlib
import os
import signal
import subprocess
import sys
from unittest import mock

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from mrcnn.data import CocoInput
from mrcnn.training import optimization, trainer
from tests.data import fixtures
from tests.training.recording import recorded_calls, recorded_train_steps


def _logical_cpus(n=2):
    cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration()] * n)
    except RuntimeError:
        pass  # already initialised by an earlier test in this process
    return [d.name for d in tf.config.list_logical_devices("CPU")][:n]


_TWO_CPUS = []


def _two_cpu_mirrored(devices):
    """One MirroredStrategy over two CPUs for the whole process: with two
    such strategies, the second model's gradient all-reduce failed here on
    a collective instance the first one had used ("Shape mismatch in the
    collective instance 100", TF 2.21)."""
    if not _TWO_CPUS:
        _TWO_CPUS.append(tf.distribute.MirroredStrategy(devices))
    return _TWO_CPUS[0]


class ToyDetector(keras.Model):
    """Regresses a per-image target from an image: two named losses, like the detector."""

    def __init__(self):
        # Targets must stay float32 under mixed precision, as gt boxes do.
        super().__init__(autocast=False)
        self.conv = keras.layers.Conv2D(4, 3, padding="same")
        self.norm = keras.layers.GroupNormalization(groups=2)
        self.head = keras.layers.Dense(2)

    def call(self, batch, training=False):
        x = self.norm(self.conv(tf.cast(batch["images"], self.compute_dtype)))
        pred = self.head(tf.reduce_mean(x, axis=[1, 2]))
        pred = tf.cast(pred, tf.float32)
        err = pred - batch["target"]
        return {"a": tf.reduce_mean(tf.square(err[:, 0])),
                "b": tf.reduce_mean(tf.abs(err[:, 1]))}


class CanvasToy(keras.Model):
    """Fits the mean gt box from the image; notes each canvas it is traced on
    (in a graph: not the eager calls that build it)."""

    def __init__(self):
        super().__init__(autocast=False)
        self.conv = keras.layers.Conv2D(4, 3, padding="same")
        self.head = keras.layers.Dense(1)
        self.canvases = []

    def call(self, batch, training=False):
        if not tf.executing_eagerly():
            self.canvases.append(tuple(batch["images"].shape[1:3]))
        images = tf.cast(batch["images"], tf.float32) / 255.0   # uint8 from CocoInput
        pred = self.head(tf.reduce_mean(self.conv(images), axis=[1, 2]))
        target = tf.reduce_mean(batch["gt_boxes"], axis=[1, 2])[:, None]
        return {"a": tf.reduce_mean(tf.square(pred - target / 40.0))}


def _dataset_fn(nan_from=None, global_batch=4):
    def fn(ctx):
        batch = ctx.get_per_replica_batch_size(global_batch)
        rng = np.random.default_rng(ctx.input_pipeline_id)
        images = rng.normal(size=(32, 8, 8, 3)).astype(np.float32)
        target = np.stack([images.mean((1, 2, 3)), images.std((1, 2, 3))], 1)
        ds = tf.data.Dataset.from_tensor_slices(
            {"images": images, "target": target.astype(np.float32)})
        ds = ds.repeat().batch(batch, drop_remainder=True)
        if nan_from is not None:
            ds = ds.enumerate().map(lambda i, b: {
                "images": b["images"],
                "target": tf.where(i + 1 >= nan_from, np.nan, b["target"])})
        return ds
    return fn


def _seeded_dataset_fn(calls, global_batch=4, fixed_seed=None):
    """A shuffled stream that honours the trainer's `start` and `seed`.

    `fixed_seed`, when given, wins over the trainer's, as `CocoInput.seed` does.
    """
    def fn(ctx, start=0, seed=None):
        calls.append((start, seed))
        seed = fixed_seed if fixed_seed is not None else seed
        rng = np.random.default_rng(0)
        images = rng.normal(size=(12, 8, 8, 3)).astype(np.float32)
        target = np.stack([images.mean((1, 2, 3)), images.std((1, 2, 3))], 1)
        ds = tf.data.Dataset.from_tensor_slices(
            {"images": images, "target": target.astype(np.float32)})
        ds = ds.shuffle(12, seed=seed, reshuffle_each_iteration=True).repeat()
        return ds.skip(start).batch(ctx.get_per_replica_batch_size(global_batch),
                                    drop_remainder=True)
    return fn


def _weights(model):
    return [v.numpy().copy() for v in model.weights]


class TrainerTest(tf.test.TestCase, parameterized.TestCase):

    def _train(self, model_dir, holder, init_seed=None, **kw):
        def model_fn():
            if init_seed is not None:
                keras.utils.set_random_seed(init_seed)
            holder["model"] = ToyDetector()
            return holder["model"]
        args = dict(model_fn=model_fn, dataset_fn=_dataset_fn(), num_train_images=32,
                    total_steps=12, xla=False, checkpoint_every=4, log_every=4,
                    strategy=tf.distribute.OneDeviceStrategy("/cpu:0"))
        args.update(kw)
        return trainer.train(model_dir, **args)

    def test_resume_after_interruption_matches_uninterrupted_weights(self):
        d = self.get_temp_dir()
        first, again = {}, {}
        out = self._train(os.path.join(d, "run"), first, stop_after=8)
        self.assertEqual(out["step"], 8)
        done = os.path.join(d, "run", trainer.DONE_FILE)
        self.assertFalse(os.path.exists(done))   # not at its end yet
        saved = _weights(first["model"])
        # A rerun of the same command picks up at step 8 with the same weights.
        out = self._train(os.path.join(d, "run"), again, stop_after=0)
        self.assertEqual(out["step"], 8)
        for a, b in zip(saved, _weights(again["model"])):
            self.assertAllEqual(a, b)
        out = self._train(os.path.join(d, "run"), again)
        self.assertEqual(out["step"], 12)
        self.assertEqual(trainer.finished_step(os.path.join(d, "run")), 12)
        # Taken further, the run is not done until its new end.
        self._train(os.path.join(d, "run"), again, total_steps=16, stop_after=2)
        self.assertFalse(os.path.exists(done))
        self.assertTrue(os.path.exists(os.path.join(d, "run", "operative_config.gin")))
        self.assertTrue(tf.io.gfile.glob(os.path.join(d, "run", "train", "events.*")))

    def test_a_run_directory_on_an_object_store_resumes(self):
        # A file:// URL stands in for gs://: checkpoints, the operative
        # config and summaries go through TensorFlow's filesystems.
        from tests.data.fixtures import remote_dir
        run, first, again = remote_dir(self.get_temp_dir()), {}, {}
        self.assertEqual(self._train(run, first, stop_after=8)["step"], 8)
        out = self._train(run, again, stop_after=0)
        self.assertEqual(out["step"], 8)
        for a, b in zip(_weights(first["model"]), _weights(again["model"])):
            self.assertAllEqual(a, b)
        self.assertTrue(tf.io.gfile.exists(f"{run}/operative_config.gin"))
        self.assertTrue(tf.io.gfile.glob(f"{run}/train/events.*"))

    def test_eval_fn_runs_on_the_checkpoints_of_its_steps(self):
        d = os.path.join(self.get_temp_dir(), "run")
        calls = []

        def eval_fn(model_dir, checkpoint):
            # The checkpoint exists, and the training precision is restored after.
            self.assertTrue(tf.io.gfile.exists(checkpoint + ".index"))
            keras.mixed_precision.set_global_policy("mixed_bfloat16")
            calls.append((model_dir, os.path.basename(checkpoint)))
            return {"bbox": {"AP": 0.5}}

        out = self._train(d, {}, eval_fn=eval_fn, eval_every=5, stop_after=11)
        # Steps 5 and 10 (5 is no checkpoint step of its own: saved for it), and
        # the last step of this call.
        self.assertEqual(calls, [(d, "ckpt-5"), (d, "ckpt-10"), (d, "ckpt-11")])
        self.assertEqual(out["metrics"], {"bbox": {"AP": 0.5}})
        self.assertEqual(keras.mixed_precision.global_policy().name, "float32")
        out = self._train(d, {})
        self.assertIsNone(out["metrics"])
        # An eval_fn that takes `reuse` (runner.evaluate) gets one dict for
        # the run, where it keeps its model between evaluations.
        reuses = []

        def eval_with_reuse(model_dir, checkpoint, reuse):
            reuses.append(reuse)
            reuse["calls"] = reuse.get("calls", 0) + 1

        self._train(os.path.join(self.get_temp_dir(), "reused"), {},
                    eval_fn=eval_with_reuse, eval_every=5, stop_after=10)
        self.assertEqual(len(reuses), 2)
        self.assertIs(reuses[0], reuses[1])
        self.assertEqual(reuses[0]["calls"], 2)
        with self.assertRaisesRegex(ValueError, "eval_every"):
            self._train(os.path.join(self.get_temp_dir(), "bad"), {}, eval_fn=eval_fn,
                        eval_every=0)

    def test_the_best_evaluations_checkpoint_is_kept_across_resumes(self):
        d = os.path.join(self.get_temp_dir(), "best")
        ap = {2: 0.3, 4: 0.5, 6: 0.4, 8: 0.45, 10: 0.6, 12: 0.1}
        weights = {}

        def eval_fn(model_dir, checkpoint):
            step = int(checkpoint.rsplit("-", 1)[1])
            weights[step] = _weights(holder["model"])
            return {"bbox": {"AP": 0.0}, "segm": {"AP": ap[step]}}

        holder = {}
        # keep_checkpoints=1: the best outlives the run's own pruning.
        out = self._train(d, holder, eval_fn=eval_fn, eval_every=2, stop_after=8,
                          keep_checkpoints=1, best_metric="segm/AP")
        self.assertEqual(out["best"]["step"], 4)
        self.assertAllClose(out["best"]["value"], 0.5)
        self.assertEqual(tf.train.latest_checkpoint(os.path.join(d, "best")),
                         os.path.join(d, "best", "ckpt-4"))
        self.assertFalse(tf.io.gfile.exists(os.path.join(d, "ckpt-4.index")))
        # Resumed: 0.45 at step 8 was no better; 0.6 at step 10 is, 0.1 is not.
        out = self._train(d, holder, eval_fn=eval_fn, eval_every=2,
                          keep_checkpoints=1, best_metric="segm/AP")
        self.assertEqual(out["best"]["step"], 10)
        best_dir = os.path.join(d, "best")
        self.assertEqual(sorted(tf.io.gfile.listdir(best_dir)), [
            "best.json", "checkpoint", "ckpt-10.data-00000-of-00001", "ckpt-10.index"])
        restored = ToyDetector()
        restored(next(iter(_dataset_fn()(tf.distribute.InputContext()))))
        tf.train.Checkpoint(model=restored).restore(
            tf.train.latest_checkpoint(best_dir)).expect_partial()
        for a, b in zip(weights[10], _weights(restored)):
            self.assertAllEqual(a, b)
        # 'min' keeps the lowest; a metric the evaluation lacks is named.
        out = self._train(os.path.join(self.get_temp_dir(), "low"), {}, eval_fn=eval_fn,
                          eval_every=4, best_metric="segm/AP", best_mode="min")
        self.assertEqual(out["best"]["step"], 12)
        with self.assertRaisesRegex(ValueError, r"'segm/AR'.*\['bbox/AP', 'segm/AP'\]"):
            self._train(os.path.join(self.get_temp_dir(), "wrong"), {}, eval_fn=eval_fn,
                        eval_every=4, best_metric="segm/AR")
        with self.assertRaisesRegex(ValueError, "needs train.eval_fn"):
            self._train(d, {}, best_metric="segm/AP")
        # A checkpoint pruned before bin/eval --watch could keep it: nothing kept.
        self.assertFalse(trainer.keep_best(d, os.path.join(d, "ckpt-3"), 3,
                                           {"segm": {"AP": 0.9}}, "segm/AP"))
        self.assertEqual(trainer.read_best(d)["step"], 10)
        with self.assertRaisesRegex(ValueError, "'group/name'"):
            self._train(d, {}, eval_fn=eval_fn, best_metric="AP")

    def test_resumed_run_reads_on_with_the_checkpointed_seed(self):
        d = os.path.join(self.get_temp_dir(), "cut")
        calls = []
        self._train(d, {}, dataset_fn=_seeded_dataset_fn(calls), stop_after=5)
        self._train(d, {}, dataset_fn=_seeded_dataset_fn(calls))
        # Calls with a seed build the stream; the others only read its spec.
        streams = [c for c in calls if c[1] is not None]
        self.assertEqual([start for start, _ in streams], [0, 5 * 4])  # 5 steps of 4
        self.assertEqual(streams[0][1], streams[1][1])
        other = []
        self._train(os.path.join(self.get_temp_dir(), "other"), {}, total_steps=1,
                    dataset_fn=_seeded_dataset_fn(other))
        self.assertNotEqual(other[-1][1], streams[0][1])  # each run draws its own

    def test_interrupted_run_ends_with_the_uninterrupted_weights(self):
        d = self.get_temp_dir()
        whole, cut = {}, {}
        self._train(os.path.join(d, "whole"), whole, init_seed=1,
                    dataset_fn=_seeded_dataset_fn([], fixed_seed=7))
        self._train(os.path.join(d, "cut"), cut, stop_after=5, init_seed=1,
                    dataset_fn=_seeded_dataset_fn([], fixed_seed=7))
        out = self._train(os.path.join(d, "cut"), cut,
                          dataset_fn=_seeded_dataset_fn([], fixed_seed=7))
        self.assertEqual(out["step"], 12)
        for a, b in zip(_weights(whole["model"]), _weights(cut["model"])):
            self.assertAllClose(a, b, rtol=1e-6, atol=1e-7)

    def test_init_fn_runs_on_fresh_start_only(self):
        d = os.path.join(self.get_temp_dir(), "init")
        calls = []

        def init_fn(model):
            calls.append(model)
            model.head.kernel.assign(tf.fill(model.head.kernel.shape, 0.25))

        first = {}
        self._train(d, first, init_fn=init_fn, total_steps=0)
        self.assertLen(calls, 1)
        self.assertAllClose(first["model"].head.kernel, np.full((4, 2), 0.25))
        self._train(d, first, init_fn=init_fn, total_steps=4)
        self._train(d, {}, init_fn=init_fn, total_steps=8)
        self.assertLen(calls, 2)  # the second fresh start; never over a resume

    def test_loss_falls(self):
        holder = {}
        d = os.path.join(self.get_temp_dir(), "fall")
        out = self._train(d, holder, total_steps=60, log_every=60, checkpoint_every=60)
        self.assertLess(out["losses"]["total"], 1.0)

    @parameterized.named_parameters(("between_checkpoints", 7), ("at_a_checkpoint", 8))
    def test_nan_guard_keeps_last_good_checkpoint(self, nan_from):
        # Step 7's loss is read once step 8 is dispatched; step 8's (a
        # checkpoint step) before its checkpoint is written.
        d = os.path.join(self.get_temp_dir(), "nan")
        holder = {}
        with self.assertRaisesRegex(trainer.NonFiniteLossError, f"at step {nan_from}:"):
            self._train(d, holder, dataset_fn=_dataset_fn(nan_from=nan_from))
        self.assertEqual(tf.train.latest_checkpoint(d), os.path.join(d, "ckpt-4"))

    def _signalling_steps(self, at_step, signum, times=1):
        """Patches make_train_step: step `at_step` sends `signum` to this process."""
        real = trainer.make_train_step

        def make(*args, **kw):
            step, calls = real(*args, **kw), []

            def signalling(batch):
                out = step(batch)
                calls.append(None)
                if len(calls) == at_step:
                    for _ in range(times):
                        os.kill(os.getpid(), signum)
                return out
            return signalling
        return mock.patch.object(trainer, "make_train_step", make)

    @parameterized.named_parameters(("sigterm", signal.SIGTERM), ("sigint", signal.SIGINT))
    def test_a_signal_stops_the_run_with_a_checkpoint_of_its_step(self, signum):
        d = self.get_temp_dir()
        handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
        whole, cut = {}, {}
        data = lambda: _seeded_dataset_fn([], fixed_seed=7)  # noqa: E731
        self._train(os.path.join(d, "whole"), whole, init_seed=1, dataset_fn=data())
        with self._signalling_steps(6, signum):
            out = self._train(os.path.join(d, "cut"), cut, init_seed=1, dataset_fn=data())
        self.assertEqual((out["step"], out["stopped_by"]), (6, signal.Signals(signum).name))
        self.assertEqual(tf.train.latest_checkpoint(os.path.join(d, "cut")),
                         os.path.join(d, "cut", "ckpt-6"))   # between the periodic 4 and 8
        self.assertEqual((signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)),
                         handlers)
        out = self._train(os.path.join(d, "cut"), cut, dataset_fn=data())
        self.assertEqual((out["step"], out["stopped_by"]), (12, None))
        for a, b in zip(_weights(whole["model"]), _weights(cut["model"])):
            self.assertAllClose(a, b, rtol=1e-6, atol=1e-7)

    @parameterized.named_parameters(("sigterm", signal.SIGTERM, SystemExit),
                                    ("sigint", signal.SIGINT, KeyboardInterrupt))
    def test_a_second_signal_stops_at_once(self, signum, error):
        d = os.path.join(self.get_temp_dir(), "twice")
        handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
        with self._signalling_steps(6, signum, times=2), self.assertRaises(error) as cm:
            self._train(d, {})
        if error is SystemExit:
            self.assertEqual(cm.exception.code, 128 + signal.SIGTERM)
        self.assertEqual(tf.train.latest_checkpoint(d), os.path.join(d, "ckpt-4"))
        self.assertEqual((signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)),
                         handlers)

    @parameterized.named_parameters(("first_step_one_replica", 1, 1),
                                    ("first_step_two_replicas", 1, 2),
                                    ("later_step", 3, 1))
    def test_a_run_stopped_by_an_exception_exits(self, stop_at, replicas):
        # Stopped at its first step, while the input pipeline is still filling
        # its buffers, the process hung at exit when the traceback kept the
        # iterator alive (numpy_function decoders and interpreter finalisation).
        root = self.get_temp_dir()
        fixtures.write_orientations(root)
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                              "interrupted_run.py")
        try:
            proc = subprocess.run(
                [sys.executable, script, root, os.path.join(root, "run"), str(stop_at),
                 str(replicas)], capture_output=True, text=True, timeout=180)
        except subprocess.TimeoutExpired:
            self.fail("the interrupted run did not exit within 180 s")
        self.assertNotEqual(proc.returncode, 0)
        self.assertIn(f"KeyboardInterrupt: stopped at step {stop_at}", proc.stderr)
        if stop_at > 2:
            self.assertEqual(tf.train.latest_checkpoint(os.path.join(root, "run")),
                             os.path.join(root, "run", "ckpt-2"))

    @parameterized.named_parameters(("bf16", "bfloat16"), ("fp16", "float16"))
    def test_mixed_precision_runs(self, precision):
        d = os.path.join(self.get_temp_dir(), precision)
        try:
            with self.assertLogs("absl", level="INFO") as logs:
                out = self._train(d, {}, total_steps=3, precision=precision, xla=True)
        finally:
            keras.mixed_precision.set_global_policy("float32")
        self.assertTrue(np.isfinite(out["losses"]["total"]))
        self.assertIn(f"precision {precision}, XLA: the whole step", "\n".join(logs.output))

    @parameterized.named_parameters(
        ("one_device", lambda: tf.distribute.OneDeviceStrategy("/cpu:0")),
        ("mirrored_one_cpu", lambda: tf.distribute.MirroredStrategy(["/cpu:0"])))
    def test_one_replica_xla_step_includes_the_update(self, make_strategy):
        # With one replica the optimizer update joins the XLA program; it
        # must train exactly as the graph step with the update outside.
        holder = {}
        self._train(os.path.join(self.get_temp_dir(), "init"), holder,
                    init_seed=3, total_steps=5, stop_after=0)
        start = _weights(holder["model"])
        runs = {}
        for xla in (False, True):
            holder = {}
            split = mock.patch.object(trainer, "_split_step",
                                      side_effect=AssertionError("split step"))
            with split if xla else contextlib.nullcontext():
                out = self._train(os.path.join(self.get_temp_dir(), f"xla{xla}"),
                                  holder, init_seed=3, total_steps=5,
                                  xla=xla, strategy=make_strategy())
            self.assertEqual(out["step"], 5)
            runs[xla] = _weights(holder["model"])
        moved = max(float(np.abs(w - w0).max()) for w, w0 in zip(runs[True], start))
        self.assertGreater(moved, 1e-3)
        for graph, whole, w0 in zip(runs[False], runs[True], start):
            self.assertAllClose(whole - w0, graph - w0, rtol=1e-3, atol=1e-6)

    @parameterized.named_parameters(("graph", False), ("xla", True))
    def test_step_traces_once(self, xla):
        strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
        with strategy.scope():
            model = ToyDetector()
            optimizer, _, _ = optimization.build_optimizer(4, 8, 8)
        batches = iter(_dataset_fn()(tf.distribute.InputContext()))
        with strategy.scope():
            model(next(batches), training=True)
            optimizer.build(model.trainable_variables)
        step = trainer.make_train_step(model, optimizer, strategy, xla)
        for _ in range(4):
            losses = step(next(batches))
        self.assertTrue(np.isfinite(float(losses["total"])))
        self.assertEqual(step.experimental_get_tracing_count(), 1)

    def test_traced_functions_get_aligned_names_once_per_signature(self):
        # bin/eval and bin/predict trace through `with_aligned_names`: each new
        # input signature first moves the name counter to a round value, so
        # their XLA programs have the same names (the persistent cache's key)
        # whatever ran before them in the process.
        fn = tf.function(lambda batch: {"y": batch["x"] * 2.0}, autograph=False)
        wrapped = trainer.with_aligned_names(fn)
        with mock.patch.object(trainer, "align_function_names",
                               side_effect=trainer.align_function_names) as align:
            for shape in ([2], [2], [3], [2]):
                wrapped({"x": tf.ones(shape)})
        self.assertEqual(align.call_count, 2)   # [2] and [3], once each
        for shape in ([2], [3]):
            name = fn.get_concrete_function(
                {"x": tf.TensorSpec(shape, tf.float32)}).name.decode()
            # Traced just after an alignment: just above a multiple of 2**20.
            self.assertLess(int(name.rsplit("_", 1)[1]) % (1 << 20), 100, name)

    def _two_cpus_and_start(self):
        """The two-CPU MirroredStrategy and the trainable weights a seed-5 run starts from."""
        devices = _logical_cpus(2)
        if len(devices) < 2:
            self.skipTest("logical CPUs could not be configured in this process")
        holder = {}
        self._train(os.path.join(self.get_temp_dir(), "start"), holder,
                    init_seed=5, total_steps=1, stop_after=0)
        start = [w.numpy() for w in holder["model"].trainable_weights]
        return _two_cpu_mirrored(devices), start

    def test_xla_refuses_synchronized_norms_on_several_replicas(self):
        devices = _logical_cpus(2)
        if len(devices) < 2:
            self.skipTest("logical CPUs could not be configured in this process")
        strategy = _two_cpu_mirrored(devices)
        with strategy.scope():
            model = ToyDetector()
            model.norm = keras.layers.BatchNormalization(synchronized=True, name="sync")
        with self.assertRaisesRegex(ValueError, r"\(sync, \.\.\.\).*train.xla = False"):
            trainer.make_train_step(model, None, strategy, xla=True)

    @parameterized.named_parameters(("float32", "float32", 1e-4),
                                    ("float16_loss_scaled", "float16", 1e-2))
    def test_mirrored_two_cpus_fused_update_trains_as_keras(self, precision, tol):
        # With XLA each device's update is one program (trainer._fuse_updates);
        # it must train as Keras' per-variable update of the graph step.
        strategy, start = self._two_cpus_and_start()
        runs, fused = {}, {}
        for xla in (False, True):
            holder = {}
            with recorded_calls(optimization, "build_optimizer") as optimizers:
                try:
                    out = self._train(os.path.join(self.get_temp_dir(), f"{precision}{xla}"),
                                      holder, init_seed=5, strategy=strategy,
                                      total_steps=4, xla=xla, precision=precision,
                                      dataset_fn=_dataset_fn(global_batch=8))
                finally:
                    keras.mixed_precision.set_global_policy("float32")
            self.assertEqual(out["step"], 4)
            runs[xla] = holder["model"]
            optimizer = optimizers[0].optimizer
            update = getattr(optimizer, "inner_optimizer", optimizer)._distributed_tf_update_step
            fused[xla] = getattr(update, "programs", None)
        self.assertIsNone(fused[False])
        self.assertEqual(sorted(fused[True]), [0, 1])   # one program per device
        moved = max(float(np.abs(w.numpy() - w0).max())
                    for w, w0 in zip(runs[True].trainable_weights, start))
        self.assertGreater(moved, 1e-3)
        for graph, xla, w0 in zip(runs[False].trainable_weights,
                                  runs[True].trainable_weights, start):
            copies = [v.numpy() for v in getattr(xla, "_value", xla).values]
            self.assertLen(copies, 2)
            self.assertAllEqual(copies[0], copies[1])
            self.assertAllClose(copies[0] - w0, graph.numpy() - w0, rtol=tol, atol=1e-6)

    @parameterized.named_parameters(("graph", False), ("xla", True))
    def test_loss_scale_overflow_on_one_replica_skips_the_step_on_all(self, xla):
        # Keras' LossScaleOptimizer checks each replica's own gradients and
        # follows the first replica: an overflow on the second alone would
        # reach the weights through the gradient sum.
        strategy, start = self._two_cpus_and_start()

        def overflowing(ctx):
            # Replicas take consecutive batches: batch 1 is replica 1's of step 1.
            return _dataset_fn(global_batch=8)(ctx).enumerate().map(lambda i, b: {
                "images": b["images"],
                "target": tf.where(i == 1, 1e6, b["target"])})

        holder = {}
        try:
            out = self._train(os.path.join(self.get_temp_dir(), f"overflow{xla}"), holder,
                              init_seed=5, strategy=strategy, total_steps=1, xla=xla,
                              precision="float16", dataset_fn=overflowing)
        finally:
            keras.mixed_precision.set_global_policy("float32")
        self.assertEqual(out["step"], 1)
        for w, w0 in zip(holder["model"].trainable_weights, start):
            copies = [v.numpy() for v in getattr(w, "_value", w).values]
            self.assertAllEqual(copies[0], w0)
            self.assertAllEqual(copies[1], w0)

    @parameterized.named_parameters(("two_replicas_graph", 2, False),
                                    ("one_replica_whole_step_xla", 1, True))
    def test_grouped_canvases_one_trace_each(self, replicas, xla):
        devices = _logical_cpus(2)
        if len(devices) < 2:
            self.skipTest("logical CPUs could not be configured in this process")
        strategy = (_two_cpu_mirrored(devices) if replicas == 2
                    else tf.distribute.OneDeviceStrategy("/cpu:0"))
        root = self.get_temp_dir()
        fixtures.write_orientations(root)
        data = CocoInput(root, batch_size=1, min_size=32, max_size=40,
                         canvas_size=(64, 64), size_divisor=8, max_instances=4,
                         mask_size=8, group_by_orientation=True)
        holder = {}

        def model_fn():
            holder["model"] = CanvasToy()
            return holder["model"]

        with recorded_train_steps() as steps:
            out = trainer.train(
                os.path.join(root, "run"), model_fn=model_fn, dataset_fn=data,
                total_steps=16, xla=xla, checkpoint_every=16, log_every=8,
                strategy=strategy)
        self.assertEqual(out["step"], 16)
        self.assertTrue(np.isfinite(out["losses"]["total"]))
        # Traced once per canvas, each time with every replica on it (what
        # comes before is Keras building the model on the zero batch).
        self.assertEqual(steps[0].experimental_get_tracing_count(), 2)
        traced = holder["model"].canvases[-2 * replicas:]
        self.assertEqual(collections.Counter(traced),
                         {(32, 40): replicas, (40, 32): replicas})
        for k in range(0, len(traced), replicas):
            self.assertLen(set(traced[k:k + replicas]), 1)


class AccumulationTest(tf.test.TestCase, parameterized.TestCase):
    """`train.accumulate_steps`: k batches per update train as one k times larger."""

    def _train(self, model_dir, holder, **kw):
        def model_fn():
            keras.utils.set_random_seed(7)
            holder["model"] = ToyDetector()
            return holder["model"]
        args = dict(model_fn=model_fn, num_train_images=32, total_steps=4, xla=False,
                    checkpoint_every=2, log_every=2,
                    strategy=tf.distribute.OneDeviceStrategy("/cpu:0"))
        args.update(kw)
        return trainer.train(model_dir, **args)

    def _same_training(self, strategy, global_batch, xla, precision="float32", tol=1e-5):
        # ToyDetector's losses are batch means and GroupNorm is per image, so
        # two batches of b images averaged are one batch of 2b: the same
        # images in the same order (the toy stream is not shuffled), the
        # same learning rate (it scales with the images of a step).
        d, runs, outs = self.get_temp_dir(), {}, {}
        try:
            for accumulate in (1, 2):
                holder = {}
                batch = global_batch * 2 // accumulate
                with self.assertLogs("absl", level="INFO") as logs:
                    outs[accumulate] = self._train(
                        os.path.join(d, f"{xla}{precision}{accumulate}"), holder, xla=xla,
                        strategy=strategy, precision=precision, accumulate_steps=accumulate,
                        dataset_fn=_dataset_fn(global_batch=batch), ema_decay=0.5)
                runs[accumulate] = _weights(holder["model"])
                runs[accumulate, "ema"] = _weights(outs[accumulate]["average"])
        finally:
            keras.mixed_precision.set_global_policy("float32")
        self.assertIn("x 2 batches accumulated", "\n".join(logs.output))
        if xla:
            self.assertIn("XLA: forward and backward per batch", "\n".join(logs.output))
        self.assertEqual(outs[2]["step"], 4)
        keras.utils.set_random_seed(7)
        start = ToyDetector()
        start({"images": tf.zeros([1, 8, 8, 3]), "target": tf.zeros([1, 2])})
        moved = max(float(np.abs(w - w0).max()) for w, w0 in zip(runs[2], _weights(start)))
        self.assertGreater(moved, 1e-3)
        # The weight average too: it moves once per step, not per batch.
        for whole, accumulated in zip(runs[1] + runs[1, "ema"], runs[2] + runs[2, "ema"]):
            self.assertAllClose(accumulated, whole, rtol=tol, atol=tol)
        for name in ("a", "b", "total"):
            self.assertAllClose(outs[2]["losses"][name], outs[1]["losses"][name], rtol=tol)

    @parameterized.named_parameters(("graph", False), ("xla", True))
    def test_one_replica_trains_as_the_larger_batch(self, xla):
        self._same_training(tf.distribute.OneDeviceStrategy("/cpu:0"), 2, xla)

    @parameterized.named_parameters(("graph", False), ("xla", True))
    def test_two_replicas_train_as_the_larger_batch(self, xla):
        devices = _logical_cpus(2)
        if len(devices) < 2:
            self.skipTest("logical CPUs could not be configured in this process")
        self._same_training(_two_cpu_mirrored(devices), 4, xla)

    def test_loss_scaled_float16_trains_as_the_larger_batch(self):
        self._same_training(tf.distribute.OneDeviceStrategy("/cpu:0"), 2, True,
                            precision="float16", tol=1e-2)

    @parameterized.named_parameters(("graph", False), ("xla", True))
    def test_an_overflow_in_one_batch_skips_the_update(self, xla):
        def overflowing(ctx):
            # Batch 1 is the second batch of step 1.
            return _dataset_fn(global_batch=2)(ctx).enumerate().map(lambda i, b: {
                "images": b["images"],
                "target": tf.where(i == 1, 1e6, b["target"])})

        d, holder = self.get_temp_dir(), {}
        self._train(os.path.join(d, f"start{xla}"), holder, total_steps=1, stop_after=0,
                    accumulate_steps=2, dataset_fn=overflowing)
        start = _weights(holder["model"])
        try:
            self._train(os.path.join(d, f"overflow{xla}"), holder, total_steps=1, xla=xla,
                        precision="float16", accumulate_steps=2, dataset_fn=overflowing)
        finally:
            keras.mixed_precision.set_global_policy("float32")
        for w, w0 in zip(_weights(holder["model"]), start):
            self.assertAllEqual(w, w0)

    def test_resumed_run_reads_on_where_its_steps_stopped(self):
        # Each step reads 2 batches: a resume at step 2 starts at image 8.
        # (A fixed shuffle seed: each fresh run draws its own.)
        calls, d = [], self.get_temp_dir()
        first, again = {}, {}
        self._train(os.path.join(d, "run"), first, stop_after=2, accumulate_steps=2,
                    dataset_fn=_seeded_dataset_fn(calls, global_batch=2, fixed_seed=3))
        self.assertEqual(calls[-1][0], 0)
        whole = {}
        self._train(os.path.join(d, "whole"), whole, accumulate_steps=2,
                    dataset_fn=_seeded_dataset_fn([], global_batch=2, fixed_seed=3))
        self._train(os.path.join(d, "run"), again, accumulate_steps=2,
                    dataset_fn=_seeded_dataset_fn(calls, global_batch=2, fixed_seed=3))
        self.assertEqual(calls[-1][0], 8)
        for a, b in zip(_weights(again["model"]), _weights(whole["model"])):
            self.assertAllClose(a, b, rtol=1e-6, atol=1e-6)

    def test_bad_counts(self):
        with self.assertRaisesRegex(ValueError, r"accumulate_steps=0 must be an int >= 1"):
            self._train(os.path.join(self.get_temp_dir(), "bad"), {}, accumulate_steps=0,
                        dataset_fn=_dataset_fn())
        strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
        with self.assertRaisesRegex(ValueError, r"accumulate=1.5 must be an int >= 1"):
            trainer.make_train_step(ToyDetector(), None, strategy, False, accumulate=1.5)


class ScheduleTest(tf.test.TestCase):

    def test_warmup_and_steps(self):
        s = optimization.WarmupStepDecay(0.02, [80, 110], warmup_steps=10,
                                         warmup_factor=0.001)
        self.assertAllClose(s(0), 0.02 * 0.001)
        self.assertAllClose(s(5), 0.02 * (0.001 * 0.5 + 0.5))
        self.assertAllClose(s(50), 0.02)
        self.assertAllClose(s(80), 0.002)
        self.assertAllClose(s(115), 0.0002, rtol=1e-4)

    def test_warmup_and_cosine(self):
        # Detectron2 WarmupCosineLR: base * (end + (1 - end) * (1 + cos(pi t / T)) / 2),
        # times the linear warm-up factor.
        base, total, end = 0.04, 200, 0.05
        s = optimization.WarmupCosineDecay(base, total, warmup_steps=10,
                                           warmup_factor=0.001, end_factor=end)
        for step in (0, 5, 10, 50, 100, 199, 200, 250):
            cosine = (1 + np.cos(np.pi * min(step / total, 1.0))) / 2
            warm = 0.001 * (1 - min(step / 10, 1)) + min(step / 10, 1)
            self.assertAllClose(s(step), base * (end + (1 - end) * cosine) * warm,
                                rtol=1e-5, atol=1e-9, msg=step)
        _, sched, _ = optimization.build_optimizer(32, 100, 1200, schedule="cosine")
        self.assertAllClose(sched(600), 0.04 * 0.5)  # halfway, no end floor
        self.assertEqual(sched.total_steps, 1200)
        with self.assertRaisesRegex(ValueError, "schedule='poly'"):
            optimization.build_optimizer(32, 100, 1200, schedule="poly")

    def test_lr_scales_with_batch_and_decay_skips_norms(self):
        _, sched, wd = optimization.build_optimizer(32, 100, 1200)
        self.assertAllClose(sched(500), 0.04)
        self.assertEqual(sched.boundaries, [800, 1100])
        self.assertEqual(wd, 1e-4)
        dense = keras.layers.Dense(2)
        dense.build((None, 3))
        norm = keras.layers.BatchNormalization()
        norm.build((None, 2))
        self.assertTrue(optimization.decays(dense.kernel))
        self.assertFalse(optimization.decays(dense.bias))
        self.assertFalse(optimization.decays(norm.gamma))
        self.assertFalse(optimization.decays(norm.beta))

    def test_coupled_weight_decay_matches_detectron2_sgd(self):
        # torch.optim.SGD / Detectron2: g' = g + wd * w; v = m * v + g'; w -= lr * v.
        lr, m, wd = 0.1, 0.9, 0.01
        w = tf.Variable([1.0, -2.0], name="kernel")
        b = tf.Variable([0.5], name="bias")
        opt = keras.optimizers.SGD(lr, momentum=m)
        ref_w, ref_v = np.array([1.0, -2.0]), np.zeros(2)
        for _ in range(3):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(w) + tf.reduce_sum(b) + optimization.l2_penalty(
                    [w, b], wd)
            opt.apply(tape.gradient(loss, [w, b]), [w, b])
            ref_v = m * ref_v + (1.0 + wd * ref_w)
            ref_w = ref_w - lr * ref_v
        self.assertAllClose(w.numpy(), ref_w, rtol=1e-5)
        self.assertAllClose(b.numpy(), [0.5 - lr * (1 + 1.9 + 2.71)], rtol=1e-5)
