"""float_ops: TensorFlow's profiler count on a traced graph, checked on ops
whose count is known by hand, and on the model: backward costs more than
forward, and a larger image costs more."""

import pytest
import tensorflow as tf

from mrcnn.benchmarks.model import _step_float_ops, float_ops
from mrcnn.modeling.mask_rcnn import build_mask_rcnn
from tests.modeling.test_mask_rcnn import _SMALL, synthetic_batch


def test_conv_and_matmul_count_two_per_multiply_add():
    x, kernel = tf.zeros([2, 16, 16, 8]), tf.zeros([3, 3, 8, 4])
    assert float_ops(lambda x: tf.nn.conv2d(x, kernel, 1, "SAME"), x) == 2 * 2 * 16 * 16 * 9 * 8 * 4
    a, b = tf.zeros([5, 7]), tf.zeros([7, 3])
    assert float_ops(lambda a: tf.matmul(a, b), a) == 2 * 5 * 7 * 3
    # Traced in graph mode even when tf.functions run eagerly.
    tf.config.run_functions_eagerly(True)
    try:
        assert float_ops(lambda a: tf.matmul(a, b), a) == 2 * 5 * 7 * 3
    finally:
        tf.config.run_functions_eagerly(False)
    assert tf.config.functions_run_eagerly() is False


@pytest.mark.slow   # 17 s: a benchmark's counter, on the whole model
def test_model_counts():
    model = build_mask_rcnn(**_SMALL)
    batch = synthetic_batch()
    infer = _step_float_ops(model, {k: batch[k] for k in ("images", "image_info")}, "infer")
    train = _step_float_ops(model, batch, "train")
    # The ResNet-18 stem alone: a 7x7/2 conv of 3 -> 64 channels on 128 x 128.
    stem = 2 * 2 * 64 * 64 * 49 * 3 * 64
    assert infer > 5 * stem
    assert train > 1.5 * infer
