"""Anchors: ours are built once per canvas on the host, as graph constants.

The baseline is the in-graph meshgrid generation many TF detectors run inside
every step; comparing the two shows what precomputing saves per step.
"""

import tensorflow as tf

from mrcnn.benchmarks.common import BenchConfig, Entry
from mrcnn.ops import anchors as anchor_ops

_SIZES = (32, 64, 128, 256, 512)
_RATIOS = (0.5, 1.0, 2.0)


def _graph_anchors(canvas):
    out = []
    for level, base in zip(range(2, 7), _SIZES):
        stride = 2 ** level
        n = -(-canvas // stride)
        c = (tf.range(n, dtype=tf.float32) + 0.5) * stride
        cy, cx = tf.meshgrid(c, c, indexing="ij")
        centres = tf.reshape(tf.stack([cy, cx], -1), [-1, 1, 2])
        r = tf.sqrt(tf.constant(_RATIOS))
        half = tf.stack([0.5 * base / r, 0.5 * base * r], -1)[None]  # [1, A, 2]
        out.append(tf.reshape(tf.concat([centres - half, centres + half], -1), [-1, 4]))
    return tf.concat(out, 0)


def bench_anchors(cfg: BenchConfig):
    canvas = cfg.canvas
    return [
        Entry("mrcnn multilevel_anchors (host, once)",
              lambda: anchor_ops.multilevel_anchors((canvas, canvas)), None,
              "built once per canvas; a training step then pays nothing"),
        Entry("in-graph meshgrid anchors per step",
              lambda: _graph_anchors(canvas), cfg.xla),
    ]
