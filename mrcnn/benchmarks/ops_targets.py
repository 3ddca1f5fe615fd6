"""Benchmark case for `mrcnn.ops.targets`: RPN targets for a whole canvas.

Shape letters: `B` batch (`cfg.batch`), `N` anchors of levels P2-P6 on a
`cfg.canvas` square (261,888 for 1024 px, 3 aspect ratios), `M` gt boxes per
image (`cfg.num_gt`, all valid: the worst case of a padded batch).
"""

import numpy as np
import tensorflow as tf

from mrcnn.benchmarks.common import Entry, random_boxes
from mrcnn.ops import anchors as anchor_ops
from mrcnn.ops import targets

# gt boxes from 16 px to 512 px a side: the range the five anchor sizes
# (32..512) cover, so every level has positives.
_GT_MIN_SIZE = 16.0
_GT_MAX_SIZE = 512.0


def bench_match(cfg):
    """rpn_targets (match + sample + encode) for all anchors of a batch vs
    the same op called per image in a Python loop."""
    levels = anchor_ops.multilevel_anchors((cfg.canvas, cfg.canvas))
    anchors = tf.concat([levels[l] for l in sorted(levels)], axis=0)  # [N, 4]
    rng = np.random.default_rng(cfg.seed)
    gt_boxes = tf.constant(random_boxes(
        rng, (cfg.batch, cfg.num_gt), cfg.canvas, _GT_MIN_SIZE, _GT_MAX_SIZE,
        clustered=cfg.distribution == "clustered"))  # [B, M, 4]
    gt_valid = tf.ones([cfg.batch, cfg.num_gt], tf.bool)  # [B, M]

    def ours():
        return targets.rpn_targets(anchors, gt_boxes, gt_valid)

    # What a TF user writes without batched ops: one image at a time, traced
    # once into a graph (no XLA), the per-image results stacked at the end.
    @tf.function(jit_compile=False)
    def per_image_loop():
        outs = [targets.rpn_targets(anchors, gt_boxes[b:b + 1],
                                    gt_valid[b:b + 1])
                for b in range(cfg.batch)]
        return [tf.concat(t, axis=0) for t in zip(*outs)]

    return [
        Entry("mrcnn.ops.targets.rpn_targets", ours, cfg.xla,
              f"N={int(anchors.shape[0])} anchors, M={cfg.num_gt} valid gt"),
        Entry("rpn_targets per-image loop", per_image_loop, None,
              "tf.function without XLA around a Python loop over B"),
        Entry("mrcnn.ops.targets.rpn_targets, no XLA", ours, False,
              "the batched op in graph mode"),
    ]
