"""Stops `trainer.train` with an exception at a step (run as a script).

  python interrupted_run.py DATA_DIR MODEL_DIR STEP REPLICAS

Trains the canvas toy on a `CocoInput` stream (numpy_function decoders,
prefetching; each decode made to take 30 ms, a COCO image's time, so that
the pipeline is busy when the run stops) and raises KeyboardInterrupt in place of step STEP, as a
Ctrl-C, a bad batch or a NaN would stop it; REPLICAS 2 trains under
MirroredStrategy on two logical CPUs. The process must then exit with the
exception, not hang (tests/training/test_trainer.py).
"""

import os
import sys
import time
from unittest import mock

data_dir, model_dir, stop_at, replicas = sys.argv[1], sys.argv[2], int(sys.argv[3]), \
    int(sys.argv[4])
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))

import tensorflow as tf  # noqa: E402

from mrcnn.data import CocoInput  # noqa: E402
from mrcnn.training import trainer  # noqa: E402
from tests.training.test_trainer import CanvasToy, _logical_cpus  # noqa: E402

if replicas == 1:
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
else:
    strategy = tf.distribute.MirroredStrategy(_logical_cpus(replicas))
real_load = CocoInput._load


def slow_load(self, index):
    time.sleep(0.03)
    return real_load(self, index)


CocoInput._load = slow_load
data = CocoInput(data_dir, batch_size=2, min_size=32, max_size=40, canvas_size=(64, 64),
                 size_divisor=8, max_instances=4, mask_size=8)
real_make_train_step = trainer.make_train_step


def interrupted_make_train_step(*args, **kw):
    step, calls = real_make_train_step(*args, **kw), []

    def interrupted(batch):
        calls.append(None)
        if len(calls) == stop_at:
            raise KeyboardInterrupt(f"stopped at step {stop_at}")
        return step(batch)
    return interrupted


with mock.patch.object(trainer, "make_train_step", interrupted_make_train_step):
    trainer.train(model_dir, model_fn=CanvasToy, dataset_fn=data, total_steps=10,
                  xla=False, checkpoint_every=2, log_every=1, strategy=strategy)
