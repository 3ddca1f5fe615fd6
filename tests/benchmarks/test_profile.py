"""The profile summary names the scopes and op types that ran, in graph mode
and under XLA, and the ops carry their own name scopes."""

import numpy as np
import pytest
import tensorflow as tf

from mrcnn.benchmarks import profile
from mrcnn.ops import roi_align as roi_align_ops

STEPS = 3


def _work(jit_compile):
    w = tf.Variable(tf.random.normal([128, 128], seed=1))

    @tf.function(jit_compile=jit_compile)
    def step(x):
        with tf.GradientTape() as tape:
            with tf.name_scope("block"):
                y = tf.nn.relu(tf.matmul(x, w))
            with tf.name_scope("head"):
                loss = tf.reduce_sum(tf.matmul(y, w) ** 2)
        return loss, tape.gradient(loss, w)

    x = tf.random.normal([256, 128], seed=2)
    step(x)  # traced and compiled before the trace
    return lambda: float(step(x)[0])


@pytest.mark.parametrize("jit_compile", [False, True])
def test_summary_names_scopes_and_types(tmp_path, jit_compile):
    profile.trace(_work(jit_compile), STEPS, str(tmp_path))
    summary = profile.summarize(str(tmp_path), STEPS, depth=1, top=50)
    scopes = {name: ms for name, ms, _ in summary["by_scope"]}
    types = {name for name, _, _ in summary["by_type"]}
    assert summary["op_ms_per_step"] > 0
    # Forward and backward of each scope, named from TF ops or HLO metadata.
    assert {"block", "head", "block [backward]", "head [backward]"} <= set(scopes)
    assert "MatMul" in types or "dot" in types or "fusion" in types
    shares = [share for _, _, share in summary["by_scope"]]
    assert all(0 <= s <= 1 for s in shares) and sum(shares) <= 1 + 1e-3
    text = profile.format_summary(summary)
    assert "block [backward]" in text and "ms/step" in text


def test_summary_without_trace_says_where_it_looked(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        profile.summarize(str(tmp_path), 1)


@pytest.mark.parametrize("op_name,scope", [
    ("StatefulPartitionedCall/mask_rcnn_1/mask_head_1/conv1_1/Conv2D",
     "mask_rcnn_1/mask_head_1/conv1_1"),
    ("gradient_tape/mask_rcnn_1/multilevel_roi_align/UnsortedSegmentSum_1",
     "mask_rcnn_1/multilevel_roi_align [backward]"),
    ("mask_rcnn_1/batched_nms/while/_212/mask_rcnn_1/batched_nms/Minimum",
     "mask_rcnn_1/batched_nms/mask_rcnn_1"),
    ("concat", "(top level)"),
])
def test_scope_drops_call_wrappers(op_name, scope):
    assert profile._scope(op_name, depth=3) == scope


def test_ops_open_a_name_scope_of_their_own():
    features = tf.zeros([1, 8, 8, 4])
    boxes = tf.constant([[[0.0, 0.0, 4.0, 4.0]]])
    graph = tf.function(
        lambda f, b: roi_align_ops.roi_align(f, b, (2, 2))).get_concrete_function(
            features, boxes).graph
    names = [op.name for op in graph.get_operations() if op.type not in ("Placeholder",)]
    assert names and all(n.startswith("roi_align/") for n in names
                         if n not in ("Identity", "NoOp")), names[:10]
    # The wrapper keeps what help() and the docs show.
    assert roi_align_ops.roi_align.__name__ == "roi_align"
    assert "Args:" in roi_align_ops.roi_align.__doc__
    np.testing.assert_equal(
        roi_align_ops.roi_align(features, boxes, (2, 2)).shape, [1, 1, 2, 2, 4])
