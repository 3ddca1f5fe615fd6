"""Multi-level anchors for FPN detectors (Faster R-CNN §3.1.1, FPN §4.1).

Anchors are built once per canvas size, as constants: with static canvases they
fold into the graph, so no step recomputes them.
"""

import math

import numpy as np
import tensorflow as tf

from mrcnn.ops._scope import scoped


@scoped
def multilevel_anchors(image_size, min_level=2, max_level=6,
                       sizes=(32, 64, 128, 256, 512),
                       aspect_ratios=(0.5, 1.0, 2.0), scales_per_octave=1, *,
                       offset=0.5, round_sizes=False):
    """Anchor boxes for every level of a feature pyramid.

    Level `l` has stride `s = 2**l` and a grid of `ceil(H / s) x ceil(W / s)`
    cells; cell `(i, j)` is centred at `((i + offset) * s, (j + offset) * s)`
    (y, x): the contract's `offset = 0.5` puts anchors at cell centres;
    `offset = 0` puts them at the cells' top-left corners, as Detectron2
    (`ANCHOR_GENERATOR.OFFSET = 0.0`) and torchvision do, which their
    trained RPNs need.
    Level `l` uses base size `sizes[l - min_level]`; scales are `2**(k / n)`
    for `k < n = scales_per_octave`; for base `b`, scale `c` and aspect ratio
    `r = width / height`, the anchor is `b*c*sqrt(r)` wide and `b*c/sqrt(r)`
    high, so every anchor of one scale has the same area.

    Args:
      image_size: (height, width) Python ints of the padded input.
      min_level, max_level: Python ints, the pyramid levels (inclusive).
      sizes: one base size in pixels per level.
      aspect_ratios: widths over heights.
      scales_per_octave: Python int n.
      offset: Python float, the anchor centre's place in its cell, in
        strides (a keyword argument beyond the contract's; default 0.5).
      round_sizes: Python bool (beyond the contract); True rounds each
        anchor's half height and half width to whole pixels (half to even),
        as torchvision's `AnchorGenerator` rounds its base anchors.

    Returns:
      {level: float32 [cells_l * A, 4] (y1, x1, y2, x2)}, `A = n *
      len(aspect_ratios)`, ordered row-major over (i, j, anchor), anchors in a
      cell ordered by scale, then aspect ratio.
    """
    if len(sizes) != max_level - min_level + 1:
        raise ValueError(
            f"multilevel_anchors: len(sizes)={len(sizes)} must equal "
            f"max_level - min_level + 1 = {max_level - min_level + 1}")
    height, width = int(image_size[0]), int(image_size[1])
    anchors = {}
    for level in range(min_level, max_level + 1):
        stride = 2 ** level
        base = sizes[level - min_level]
        half_hw = []  # [A, 2] half height, half width
        for k in range(scales_per_octave):
            scale = 2.0 ** (k / scales_per_octave)
            for ratio in aspect_ratios:
                half_hw.append((0.5 * base * scale / math.sqrt(ratio),
                                0.5 * base * scale * math.sqrt(ratio)))
        half_hw = np.asarray(half_hw, np.float64)
        if round_sizes:
            half_hw = np.round(half_hw)
        cy = (np.arange(math.ceil(height / stride)) + offset) * stride
        cx = (np.arange(math.ceil(width / stride)) + offset) * stride
        cy, cx = np.meshgrid(cy, cx, indexing="ij")
        centres = np.stack([cy, cx], axis=-1).reshape(-1, 1, 2)  # [cells, 1, 2]
        lo = centres - half_hw[None]  # [cells, A, 2]
        hi = centres + half_hw[None]
        boxes = np.concatenate([lo, hi], axis=-1).reshape(-1, 4)
        anchors[level] = tf.constant(boxes, tf.float32)
    return anchors
