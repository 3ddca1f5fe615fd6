"""What a benchmark case is, and the shape flags every case reads.

A case builder takes a `BenchConfig` and returns a list of `Entry`: the first
is ours, the others the baselines measured in the same run. Each entry's `fn`
is a zero-argument callable over tensors the builder already made (inputs are
created once, outside the timed region). The harness in `bin/bench` wraps `fn`
in `tf.function(jit_compile=entry.jit_compile)`, or runs it as is when
`jit_compile` is None (a Python loop of eager kernels, say), warms it up, then
times it.
"""

import dataclasses
from typing import Callable, Optional

import tensorflow as tf


@dataclasses.dataclass
class BenchConfig:
    """Shape and mode flags shared by all cases (bin/bench flags)."""
    batch: int = 8
    num_boxes: int = 2000          # N candidates (nms) or anchors-like boxes
    max_output: int = 1000         # K kept by nms
    iou_threshold: float = 0.7
    num_classes: int = 80
    num_rois: int = 512            # K rois (roi_align, mask targets)
    num_gt: int = 100              # M gt boxes
    num_images: int = 200          # images scored by coco_eval
    canvas: int = 1024             # square padded canvas, pixels
    channels: int = 256
    output_size: int = 7
    mask_size: int = 28
    dtype: str = "float32"
    xla: bool = True
    distribution: str = "random"   # random | clustered boxes
    seed: int = 0

    @property
    def tf_dtype(self):
        return tf.as_dtype(self.dtype)


@dataclasses.dataclass
class Entry:
    label: str
    fn: Callable[[], object]
    jit_compile: Optional[bool]
    note: str = ""


def random_boxes(rng, shape, canvas, min_size=4.0, max_size=256.0,
                 clustered=False):
    """float32 numpy boxes (y1, x1, y2, x2) inside a square canvas.

    With `clustered`, centres gather around a few points so that many boxes
    overlap heavily, the hard case for NMS.
    """
    import numpy as np
    shape = tuple(shape)
    if clustered:
        centres = rng.uniform(0.2 * canvas, 0.8 * canvas, size=shape[:-1] + (8, 2))
        pick = rng.integers(0, 8, size=shape)
        c = np.take_along_axis(centres, pick[..., None], axis=-2)
        c = c + rng.normal(0, 8.0, size=c.shape)
    else:
        c = rng.uniform(0, canvas, size=shape + (2,))
    hw = rng.uniform(min_size, max_size, size=shape + (2,))
    boxes = np.concatenate([c - hw / 2, c + hw / 2], axis=-1)
    return np.clip(boxes, 0, canvas).astype(np.float32)
