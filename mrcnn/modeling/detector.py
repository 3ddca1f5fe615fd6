"""What every detector model here shares: the batch dict in, normalised
pixels on a static canvas, and detections back in original image pixels.

Shape letters: `B` batch, `H` x `W` the static padded canvas, `D`
detections per image.
"""

import keras
import tensorflow as tf

from mrcnn.modeling.resnet import IMAGENET_MEAN, IMAGENET_STD
from mrcnn.ops import boxes as box_ops


class Detector(keras.Model):
    """Base of `MaskRCNN` and `RetinaNet`: input normalisation and the canvas.

    A subclass sets `self.fpn` (its `max_level` fixes the canvas multiple)
    and implements `call(batch, training)`: the losses dict when training,
    the detections dict otherwise (`detection_boxes` float32 [B, D, 4]
    (y1, x1, y2, x2) in original image pixels, `detection_scores` float32
    [B, D], `detection_classes` int32 [B, D] 1..C, `num_detections` int32
    [B]; padded slots 0). The programs in bin/ need nothing else, plus the
    `num_classes`, `has_masks` and `has_keypoints` properties and a settable
    `score_threshold` (detections keep scores above it).

    Args (keyword-only):
      pixel_mean, pixel_std: 3 floats each, the RGB input normalisation on
        the [0, 255] scale (Detectron2's MODEL.PIXEL_MEAN / PIXEL_STD);
        ImageNet's by default, which `load_backbone_weights` adapts the
        pretrained stem to.
    """

    def __init__(self, *, pixel_mean=IMAGENET_MEAN, pixel_std=IMAGENET_STD, **kwargs):
        super().__init__(**kwargs)
        if len(pixel_mean) != 3 or len(pixel_std) != 3 or min(pixel_std) <= 0:
            raise ValueError(f"{type(self).__name__}: pixel_mean={pixel_mean} and "
                             f"pixel_std={pixel_std} need 3 RGB values each, std > 0")
        self.pixel_mean = tuple(float(m) for m in pixel_mean)
        self.pixel_std = tuple(float(v) for v in pixel_std)
        # Keep gt boxes and image_info float32 under mixed precision.
        self._convert_input_args = False

    has_masks = False
    has_keypoints = False
    num_keypoints = 0

    def build_canvas(self, canvas_size=None):
        """(H, W) to build the variables on: `canvas_size` capped at two cells
        of the coarsest level (128 x 128 with P6) per side. The variables do
        not depend on the canvas, and an eager call of the R50 recipe at
        832 x 1344 took 10.4 s on a 2-core CPU against 5.3 s at 128 x 128.

        Args:
          canvas_size: optional (H, W), the canvas the model will run on.
        """
        side = 2 * 2 ** self.fpn.max_level
        if canvas_size is None:
            return (side, side)
        return tuple(min(int(c), side) for c in canvas_size)

    def build(self, batch_shape):
        # Parts build on their first call; nothing to create here.
        self.built = True

    def canvas(self, images):
        """(H, W) Python ints of `images` [B, H, W, 3]; ValueError unless a
        multiple of the coarsest level's stride."""
        canvas = (images.shape[1], images.shape[2])
        stride = 2 ** self.fpn.max_level
        if canvas[0] % stride or canvas[1] % stride:
            raise ValueError(f"{type(self).__name__}: canvas {canvas} must be a "
                             f"multiple of 2**max_level = {stride}")
        return canvas

    def normalize_images(self, images, image_info):
        """The backbone's input: normalised pixels, zero outside each image.

        On the device rather than in the input pipeline, so that the host
        pads, batches and copies uint8 (Detectron2 normalises on the GPU too).

        Args:
          images: uint8 or float [B, H, W, 3] RGB pixels in [0, 255].
          image_info: float32 [B, 5]; columns 2, 3 the resized height, width.

        Returns:
          float32 [B, H, W, 3].
        """
        x = ((tf.cast(images, tf.float32) - tf.constant(self.pixel_mean, tf.float32))
             / tf.constant(self.pixel_std, tf.float32))
        h, w = images.shape[1], images.shape[2]
        rows = tf.range(h, dtype=tf.float32)[None, :] < image_info[:, 2:3]   # [B, H]
        cols = tf.range(w, dtype=tf.float32)[None, :] < image_info[:, 3:4]   # [B, W]
        inside = rows[:, :, None, None] & cols[:, None, :, None]
        return tf.where(inside, x, tf.zeros_like(x))

    def compute_losses(self, batch):
        """The losses dict of `call(batch, training=True)`: float32 scalars."""
        return self(batch, training=True)

    def detect(self, batch):
        """The detections dict of `call(batch, training=False)`."""
        return self(batch, training=False)


def to_original_pixels(boxes, image_info):
    """Boxes in resized-image pixels -> original image pixels, clipped to it.

    Args:
      boxes: float32 [B, D, 4] (y1, x1, y2, x2) in resized-image pixels.
      image_info: float32 [B, 5] (orig h, orig w, resized h, resized w, scale).

    Returns:
      float32 [B, D, 4].
    """
    scale = image_info[:, 4][:, None, None]
    return box_ops.clip_boxes(boxes / scale, image_info[:, 0:2])
