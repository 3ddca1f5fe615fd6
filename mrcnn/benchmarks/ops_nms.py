"""Benchmark cases for `mrcnn.ops.nms` beside the TF built-ins users would use.

Shape letters: `B` batch (`cfg.batch`), `N` candidates per image
(`cfg.num_boxes`), `K` kept per image (`cfg.max_output`), `C` classes
(`cfg.num_classes`).
"""

import numpy as np
import tensorflow as tf

from mrcnn.benchmarks.common import Entry, random_boxes
from mrcnn.ops import nms

# Mask R-CNN test-time detection settings (Detectron2 R50-FPN defaults):
# at most 100 boxes per class and per image, class-score threshold 0.05,
# box-head NMS at IoU 0.5.
_MAX_PER_CLASS = 100
_MAX_TOTAL = 100
_SCORE_THRESHOLD = 0.05
_CLASS_IOU = 0.5
# Class logits ~ N(0, 3^2) over C + 1 classes: after softmax a few classes
# per box pass 0.05, as in a trained head, rather than all of them.
_LOGIT_STD = 3.0


def _inputs(cfg, shape):
    rng = np.random.default_rng(cfg.seed)
    boxes = random_boxes(rng, shape, cfg.canvas,
                         clustered=cfg.distribution == "clustered")
    return rng, tf.constant(boxes, cfg.tf_dtype)


def bench_nms(cfg):
    """batched_nms vs a per-image tf.image.non_max_suppression loop and
    batched tf.image.non_max_suppression_padded, [B, N] -> K per image."""
    rng, boxes = _inputs(cfg, (cfg.batch, cfg.num_boxes))  # [B, N, 4]
    scores = tf.constant(rng.uniform(size=(cfg.batch, cfg.num_boxes)),
                         cfg.tf_dtype)  # [B, N]
    k, iou = cfg.max_output, cfg.iou_threshold

    def ours():
        return nms.batched_nms(boxes, scores, k, iou).indices

    # The C++ kernel one image at a time, traced once into a graph (no XLA:
    # the kernel has none); faster than the same loop run eagerly.
    @tf.function(jit_compile=False)
    def per_image_loop():
        return [tf.image.non_max_suppression(boxes[b], scores[b], k, iou)
                for b in range(cfg.batch)]

    def padded():
        return tf.image.non_max_suppression_padded(
            boxes, scores, k, iou, pad_to_max_output_size=True,
            canonicalized_coordinates=True)[0]

    return [
        Entry("mrcnn.ops.nms.batched_nms", ours, cfg.xla),
        Entry("tf.image.non_max_suppression per-image loop", per_image_loop,
              None, "tf.function without XLA around a Python loop over B"),
        Entry("tf.image.non_max_suppression_padded", padded, True,
              "batched, XLA, canonicalized_coordinates=True"),
    ]


def bench_multiclass_nms(cfg):
    """multiclass_nms vs tf.image.combined_non_max_suppression on
    class-specific boxes [B, N, C, 4] and softmax scores [B, N, C]."""
    rng, boxes = _inputs(cfg, (cfg.batch, cfg.num_boxes, cfg.num_classes))
    logits = rng.normal(0.0, _LOGIT_STD,
                        size=(cfg.batch, cfg.num_boxes, cfg.num_classes + 1))
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    scores = tf.constant(probs[..., 1:], cfg.tf_dtype)  # [B, N, C], no bg

    def ours():
        return nms.multiclass_nms(boxes, scores, _MAX_PER_CLASS, _MAX_TOTAL,
                                  _CLASS_IOU, _SCORE_THRESHOLD)

    def combined():
        return tf.image.combined_non_max_suppression(
            boxes, scores, _MAX_PER_CLASS, _MAX_TOTAL, _CLASS_IOU,
            _SCORE_THRESHOLD, clip_boxes=False)

    return [
        Entry("mrcnn.ops.nms.multiclass_nms", ours, cfg.xla),
        Entry("tf.image.combined_non_max_suppression", combined, False,
              "C++ kernel, no XLA lowering"),
    ]
