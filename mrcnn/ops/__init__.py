"""Pure, batched, XLA-compilable TensorFlow ops for two-stage (Mask R-CNN) and
one-stage (RetinaNet) detectors.

The public API is fixed in docs/OPS_CONTRACT.md. Every op takes a leading
batch dimension, works on static shapes with padding plus validity masks, and
computes box geometry in float32 whatever the feature dtype.
"""

from mrcnn.ops import anchors, boxes, keypoints, masks, nms, roi_align, targets

__all__ = ["anchors", "boxes", "keypoints", "masks", "nms", "roi_align", "targets"]
