"""Test-wide setup: quiet TensorFlow logs; two logical CPUs for strategy tests.

Logical devices can only be configured before TensorFlow initialises its
runtime, so it happens here, at collection, once per test process.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

_cpus = tf.config.list_physical_devices("CPU")
try:
    tf.config.set_logical_device_configuration(
        _cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)
except RuntimeError:
    pass
