"""Test-wide setup: quiet TensorFlow logs; oneDNN kernels; XLA compiles without
LLVM optimisation and through a cache shared by the run's processes; two
logical CPUs for strategy tests.

Logical devices can only be configured before TensorFlow initialises its
runtime, so it happens here, at collection, once per test process.
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow leaves its oneDNN CPU kernels off on CPUs without AVX-512 (this
# project's AMD EPYC) unless asked; `make demo` asks too. The overfit test's
# step: 0.19 s without, 0.14 s with them; the suite: 958 s, then 911-971 s.
# Inherited by the tests' subprocesses. Their OpenMP threads spin-wait after
# each op, which slows NumPy work between TF calls (a pipeline test: 11 s
# without oneDNN, 45 s alone with it); OMP_WAIT_POLICY=PASSIVE fixed that
# test, but two contending processes stepped 6% slower and the suite took
# 1034 s, so the threads spin.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

# Many tests compile the same small XLA programs (the model's RoI islands at
# the tiny shapes, in every program test's subprocess). TensorFlow's
# persistent cache lets each be compiled once per test run: the first process
# (this one, or the pytest-xdist controller, which starts the workers) makes
# an empty directory, its workers and their subprocesses inherit it through
# the environment, and the owner deletes it at exit, so no run ever reads
# another run's programs. An entry is used only when its HLO matches.
# Most of an XLA:CPU compile of a test's small program is LLVM optimising its
# fused loops, which then run for microseconds: level 0 skips that (a
# RetinaNet loss compile 8.6 -> 4.9 s). Convolutions and matmuls are library
# calls either way, and no pass that changes float results is involved
# (fast math stays off), so eager-vs-XLA checks compare the same numbers.
# Inherited by the tests' subprocesses.
_OPT_FLAG = "--xla_backend_optimization_level"
if _OPT_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_OPT_FLAG}=0".strip()

_XLA_CACHE_VAR = "MRCNN_TESTS_XLA_CACHE"
if _XLA_CACHE_VAR not in os.environ:
    os.environ[_XLA_CACHE_VAR] = tempfile.mkdtemp(prefix="mrcnn-tests-xla-")
    atexit.register(shutil.rmtree, os.environ[_XLA_CACHE_VAR], ignore_errors=True)

from mrcnn import programs  # noqa: E402  (no TensorFlow import)

programs.use_xla_cache(os.environ[_XLA_CACHE_VAR])

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
