"""XLA islands: the RoI sampling ops compiled on their own inside a graph step.

A step that is not compiled by XLA as a whole (`train.xla = False`, as the
CPU demo trains; `evaluate` and `Predictor` by default) runs the model op by
op. There, RoIAlign's bilinear gathers (`ops.roi_align._weighted_gather`:
16 output-sized gathers, casts, products and sums per call, then a
scatter-add gradient) each write and read a `[B, K, oh, ow, C]` tensor,
which XLA fuses into one loop. `compiled` runs such a method as an XLA
cluster of its own inside the graph step, and the convolutions stay with
the graph's kernels (oneDNN on a CPU, faster there than XLA's). Measured on
this project's CPU (`bin/bench`, graph mode): the shapes demo's training
step 0.313 -> 0.236 s, R50-FPN training at 512 x 512 batch 2 6.01 -> 5.26 s
(float32) and 2.51 -> 1.86 s (bfloat16), R50-FPN inference 1059 -> 872 ms.

Inside a step compiled as a whole (the COCO recipe, `train.xla = True`) the
method runs as written, part of that program. Run eagerly (no graph being
traced), the method runs op by op as written. `compile_ops(False)` turns
islands off while tracing, e.g. for a SavedModel that must not require XLA
wherever it is served (`bin/export` does).
"""

import contextlib
import functools

import tensorflow as tf

from mrcnn.ops._context import in_xla_context

# Read when a graph is traced, from whichever thread traces it (MirroredStrategy
# traces each replica in a thread of its own): a plain module flag.
_enabled = True


@contextlib.contextmanager
def compile_ops(enabled):
    """Islands on (`True`, the default) or off for graphs traced inside."""
    global _enabled
    previous, _enabled = _enabled, bool(enabled)
    try:
        yield
    finally:
        _enabled = previous


def compiled(method):
    """Runs `method` as an XLA cluster of its own when a graph is traced.

    The method must create no variables (it runs inside a nested
    `tf.function`); its tensor arguments, captured from the calling graph,
    receive gradients as usual (custom gradients included, compiled too).
    """

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        if tf.executing_eagerly() or not _enabled or in_xla_context():
            return method(*args, **kwargs)

        def island():
            return method(*args, **kwargs)

        island.__name__ = method.__name__  # names the graph's function
        with tf.name_scope(method.__name__.lstrip("_")):
            return tf.function(island, jit_compile=True, autograph=False)()

    return wrapper
