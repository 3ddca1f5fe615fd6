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


import pytest  # noqa: E402
from absl import logging as absl_logging  # noqa: E402


@pytest.fixture(autouse=True)
def _keep_absl_logger_level():
    """Undoes TensorFlow's change of absl's logger level within a test.

    `tf.saved_model.save` lowers absl's verbosity to FATAL while it lists a
    module's attributes and then sets back the flag's value, -1 (WARNING)
    outside `app.run`, so every later `logging.info` in that test process
    was dropped: a test that asserts an INFO log then failed or passed by
    test order.
    """
    level = absl_logging.get_absl_logger().level
    yield
    absl_logging.get_absl_logger().setLevel(level)
