"""ROIAlign: our 4-neighbour gather ops beside `tf.image.crop_and_resize` baselines.

The baselines are what a TF user writes without a ROIAlign kernel: crop and
resize each box at `output_size * sampling_ratio` samples, then 2 x 2 (sr x sr)
average pool, with the boxes moved by the aligned half-pixel transform so the
samples land exactly where ROIAlignV2 puts them (only samples in (-1, 0) or
(H - 1, H) differ: crop_and_resize extrapolates 0 there, ROIAlign clamps).
`CropAndResize` has no XLA kernel, so the baselines run as graphs
(`jit_compile=False`).
"""

import numpy as np
import tensorflow as tf

from mrcnn.benchmarks.common import BenchConfig, Entry, random_boxes
from mrcnn.ops import roi_align as ra

_SAMPLING_RATIO = 2
# Single-level case: P2 (stride 4), where most rois of an R50-FPN land.
_SINGLE_LEVEL = 2
_MIN_LEVEL, _MAX_LEVEL = 2, 5
# Box sides 16..512 px spread the rois over P2..P5.
_MIN_BOX, _MAX_BOX = 16.0, 512.0


def crop_and_resize_roi_align(features, boxes, box_indices, output_size,
                              spatial_scale, sampling_ratio=_SAMPLING_RATIO):
    """Aligned ROIAlign built on crop_and_resize.

    Args:
      features: [B, H, W, C]; boxes: float32 [N, 4] image pixels;
      box_indices: int32 [N] image of each box.

    Returns:
      float32 [N, oh, ow, C].
    """
    oh, ow = output_size
    height, width = features.shape[1], features.shape[2]
    y1, x1, y2, x2 = tf.unstack(boxes * spatial_scale - 0.5, 4, axis=-1)
    step_y = (y2 - y1) / (oh * sampling_ratio)
    step_x = (x2 - x1) / (ow * sampling_ratio)
    # crop_and_resize puts its first and last samples on the normalized box
    # corners (in units of H - 1): move them to the first/last sub-bin centres.
    norm = tf.stack([(y1 + 0.5 * step_y) / (height - 1),
                     (x1 + 0.5 * step_x) / (width - 1),
                     (y2 - 0.5 * step_y) / (height - 1),
                     (x2 - 0.5 * step_x) / (width - 1)], axis=-1)  # [N, 4]
    crops = tf.image.crop_and_resize(
        features, norm, box_indices,
        (oh * sampling_ratio, ow * sampling_ratio))  # [N, oh*sr, ow*sr, C]
    crops = tf.reshape(crops, [-1, oh, sampling_ratio, ow, sampling_ratio,
                               crops.shape[-1]])  # [N, oh, sr, ow, sr, C]
    return tf.reduce_mean(crops, axis=[2, 4])  # [N, oh, ow, C]


def _inputs(cfg: BenchConfig):
    rng = np.random.default_rng(cfg.seed)
    boxes = random_boxes(rng, (cfg.batch, cfg.num_rois), cfg.canvas,
                         min_size=_MIN_BOX, max_size=_MAX_BOX,
                         clustered=cfg.distribution == "clustered")
    features = {}
    for level in range(_MIN_LEVEL, _MAX_LEVEL + 1):
        side = -(-cfg.canvas // 2 ** level)
        features[level] = tf.cast(tf.random.stateless_normal(
            [cfg.batch, side, side, cfg.channels], [cfg.seed, level]),
            cfg.tf_dtype)
    box_indices = tf.repeat(tf.range(cfg.batch), cfg.num_rois)  # [B*K]
    return features, tf.constant(boxes), box_indices


def bench_roi_align(cfg: BenchConfig):
    features, boxes, box_indices = _inputs(cfg)
    fmap = features[_SINGLE_LEVEL]
    scale = 2.0 ** -_SINGLE_LEVEL
    size = (cfg.output_size, cfg.output_size)
    flat_boxes = tf.reshape(boxes, [-1, 4])  # [B*K, 4]

    def ours():
        return ra.roi_align(fmap, boxes, size, scale, _SAMPLING_RATIO)

    def baseline():
        pooled = crop_and_resize_roi_align(fmap, flat_boxes, box_indices, size,
                                           scale)  # [B*K, oh, ow, C]
        return tf.reshape(pooled, [cfg.batch, cfg.num_rois] + list(size) + [-1])

    return [
        Entry("mrcnn roi_align (P2)", ours, cfg.xla,
              "4-neighbour gathers into a float32 accumulator"),
        Entry("crop_and_resize x2 + avg pool (P2)", baseline, False,
              "aligned boxes; no XLA kernel for CropAndResize"),
    ]


def bench_multilevel_roi_align(cfg: BenchConfig):
    features, boxes, box_indices = _inputs(cfg)
    size = (cfg.output_size, cfg.output_size)
    levels = list(range(_MIN_LEVEL, _MAX_LEVEL + 1))

    def ours():
        return ra.multilevel_roi_align(features, boxes, size, _SAMPLING_RATIO,
                                       _MIN_LEVEL, _MAX_LEVEL)

    def ours_adaptive():
        return ra.multilevel_roi_align(features, boxes, size, 0, _MIN_LEVEL, _MAX_LEVEL)

    def per_level_where():
        # Matterport-style PyramidROIAlign: tf.where picks each level's boxes
        # (dynamic count), crop_and_resize them, then scatter back in order.
        flat = tf.reshape(boxes, [-1, 4])  # [B*K, 4]
        level_of = tf.reshape(ra.assign_levels(boxes, _MIN_LEVEL, _MAX_LEVEL),
                              [-1])  # [B*K]
        pooled, order = [], []
        for level in levels:
            ix = tf.where(tf.equal(level_of, level))[:, 0]  # [n_l]
            pooled.append(crop_and_resize_roi_align(
                features[level], tf.gather(flat, ix), tf.gather(box_indices, ix),
                size, 2.0 ** -level))
            order.append(ix)
        pooled = tf.concat(pooled, 0)  # [B*K, oh, ow, C], level order
        out = tf.scatter_nd(tf.concat(order, 0)[:, None], pooled,
                            tf.shape(pooled, out_type=tf.int64))
        return tf.reshape(out, [cfg.batch, cfg.num_rois] + list(size) + [-1])

    def every_level_select():
        # Static-shape variant: pool all boxes from every level, keep the
        # assigned one (4x the sampling work).
        flat = tf.reshape(boxes, [-1, 4])
        level_of = tf.reshape(ra.assign_levels(boxes, _MIN_LEVEL, _MAX_LEVEL),
                              [-1, 1, 1, 1])
        out = None
        for level in levels:
            pooled = crop_and_resize_roi_align(features[level], flat,
                                               box_indices, size, 2.0 ** -level)
            out = pooled if out is None else tf.where(level_of == level, pooled,
                                                      out)
        return tf.reshape(out, [cfg.batch, cfg.num_rois] + list(size) + [-1])

    return [
        Entry("mrcnn multilevel_roi_align", ours, cfg.xla,
              "each box gathered once from its own level of one flat table"),
        Entry("mrcnn multilevel_roi_align, sr=0 adaptive", ours_adaptive, cfg.xla,
              "sampling_ratio=0 (Detectron2's), <= 6 x 6 slots per bin"),
        Entry("crop_and_resize per level, tf.where + scatter", per_level_where,
              False, "Matterport PyramidROIAlign style; dynamic shapes, no XLA"),
        Entry("crop_and_resize every level, then select", every_level_select,
              False, "static shapes but 4x the samples; no XLA kernel"),
    ]
