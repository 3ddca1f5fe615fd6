"""Whether the graph being traced is one XLA compiles.

Some ops lay out their work differently for XLA, which fuses elementwise
producers into reductions, than for op-by-op TF, which keeps every
intermediate in memory (`targets.match_boxes`).
"""

import tensorflow as tf
# TensorFlow answers this only privately.
from tensorflow.python.ops import control_flow_util


def in_xla_context():
    """True while tracing a graph that XLA compiles (`jit_compile=True`, here
    or in an enclosing function); static shapes are then needed."""
    return (not tf.executing_eagerly()
            and control_flow_util.GraphOrParentsInXlaContext(
                tf.compat.v1.get_default_graph()))
