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
    # oneDNN (on by default on CPUs with AVX-512) renames MatMul _MklMatMul.
    assert any("MatMul" in t for t in types) or "dot" in types or "fusion" in types, types
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


def _gpu_space():
    """An XSpace as a GPU run writes it: kernels on device stream lines, the
    same kernels again on derived lines, host ops, and the HLO protos."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2
    try:
        from tensorflow.compiler.xla.service import hlo_pb2
    except ImportError:  # pragma: no cover
        from xla.service import hlo_pb2
    space = xplane_pb2.XSpace()

    hlo = hlo_pb2.HloProto()
    hlo.hlo_module.name = "cluster_7"
    body = hlo.hlo_module.computations.add(id=2, name="fused_body", root_id=21)
    body.instructions.add(id=21, name="mul.3", opcode="multiply").metadata.op_name = (
        "mask_rcnn/box_head/fc1/MatMul")
    entry = hlo.hlo_module.computations.add(id=1, name="entry", root_id=11)
    fusion = entry.instructions.add(id=11, name="fusion.1", opcode="fusion")
    fusion.called_computation_ids.append(2)
    conv = entry.instructions.add(id=12, name="conv.5", opcode="convolution")
    conv.metadata.op_name = "gradient_tape/mask_rcnn/fpn/output_p2/Conv2D"
    conv.metadata.op_type = "Conv2DBackpropInput"
    meta = space.planes.add(name="/host:metadata")
    meta.stat_metadata[1].name = "hlo_proto"
    meta.event_metadata[1].stats.add(metadata_id=1,
                                     bytes_value=hlo.SerializeToString())

    gpu = space.planes.add(name="/device:GPU:0")
    for i, name in enumerate(["hlo_module", "hlo_op", "tf_op"], 1):
        gpu.stat_metadata[i].name = name
    for i, name in enumerate(["fusion_1", "conv_kernel", "sgemm_kernel",
                              "memcpy"], 1):
        gpu.event_metadata[i].name = name
    stream = gpu.lines.add(name="Stream #13(Compute)")
    for meta_id, stats, ps in [
            (1, [(1, "cluster_7"), (2, "fusion.1")], 3e9),
            (2, [(1, "cluster_7"), (2, "conv.5")], 5e9),
            (3, [(3, "mask_rcnn/rpn_head/conv/Conv2D:Conv2D")], 2e9),
            (4, [], 1e9)]:
        event = stream.events.add(metadata_id=meta_id, duration_ps=int(ps))
        for stat_id, value in stats:
            event.stats.add(metadata_id=stat_id, str_value=value)
    derived = gpu.lines.add(name="XLA Ops")
    derived.events.add(metadata_id=2, duration_ps=int(5e9))

    host = space.planes.add(name="/host:CPU")
    host.event_metadata[1].name = "mask_rcnn/rpn_head/conv/Conv2D:Conv2D"
    host.lines.add(name="tf_Compute").events.add(metadata_id=1,
                                                 duration_ps=int(9e9))
    return space


def test_gpu_trace_counts_device_streams_only(tmp_path):
    run_dir = tmp_path / "plugins" / "profile" / "run"
    run_dir.mkdir(parents=True)
    (run_dir / "gpu.xplane.pb").write_bytes(_gpu_space().SerializeToString())
    summary = profile.summarize(str(tmp_path), steps=1, depth=3, top=10)
    # 3 + 5 + 2 + 1 ms on the stream; the derived line and the host launch
    # of the same kernels are not counted again.
    assert summary["op_ms_per_step"] == pytest.approx(11.0)
    scopes = {name: ms for name, ms, _ in summary["by_scope"]}
    assert scopes == pytest.approx({
        "mask_rcnn/fpn/output_p2 [backward]": 5.0,  # HLO op metadata
        "mask_rcnn/box_head/fc1": 3.0,  # a fusion, named from its body
        "mask_rcnn/rpn_head/conv": 2.0,  # a graph-mode kernel's tf_op
        "(top level)": 1.0})  # a kernel with no TF op
    types = {name: ms for name, ms, _ in summary["by_type"]}
    assert types == pytest.approx({"Conv2DBackpropInput": 5.0, "multiply": 3.0,
                                   "Conv2D": 2.0, "kernel": 1.0})


def test_roi_align_gradient_is_filed_under_its_backward_scope():
    # Its hand-written gradient is built outside the op's scope; it reopens
    # it, so a profile counts the scatter-add as roi_align [backward].
    features = tf.zeros([1, 8, 8, 4])
    boxes = tf.constant([[[0.0, 0.0, 4.0, 4.0]]])

    def grad(f):
        with tf.GradientTape() as tape:
            tape.watch(f)
            out = roi_align_ops.roi_align(f, boxes, (2, 2))
        return tape.gradient(out, f)

    graph = tf.function(grad).get_concrete_function(features).graph
    sums = [op.name for op in graph.get_operations()
            if op.type == "UnsortedSegmentSum"]
    assert sums and all(profile._scope(n, depth=1) == "roi_align [backward]"
                        for n in sums), sums
