"""Host-side decoding of one image and its instance masks (NumPy, PIL, pycocotools).

Runs inside `tf.numpy_function` in the input pipeline, once per image. Shape
letters: `h, w` original image size, `n` kept instances, `S` mask size.

Masks are never materialised at canvas size in the batch: each instance mask
is cropped to its gt box and resampled to `S x S` (the "box frame"). Output
cell `(u, v)` of a box `(y1, x1, y2, x2)` stands for the image point
`(y1 + (u + 0.5) * (y2 - y1) / S, x1 + (v + 0.5) * (x2 - x1) / S)`:

  - polygons are mapped into the box frame and rasterised there by
    pycocotools at `S x S` (as Detectron2's `PolygonMasks.crop_and_resize`),
    which costs `S * S` per instance, not `h * w`;
  - RLE masks are decoded at `h x w` and sampled bilinearly at those points
    (pixel `(i, j)` centred at `(i + 0.5, j + 0.5)`, edges clamped), then
    thresholded at 0.5.

Flipping the image flips every box-frame mask along `v` exactly, because the
sample points are symmetric in the box.
"""

import numpy as np
from PIL import Image, ImageOps
from pycocotools import mask as mask_util

from mrcnn.data import files
from mrcnn.data.coco import DataError


# The EXIF tag saying how to turn the stored pixels upright (1: as stored;
# 5-8 turn them a quarter, swapping height and width).
_ORIENTATION_TAG = 0x0112
_QUARTER_TURNS = (5, 6, 7, 8)
# What PIL raises for a missing, unreadable, truncated or oversized file,
# and TensorFlow's filesystems for a missing or unreadable remote one.
DECODE_ERRORS = (*files.READ_ERRORS, ValueError, SyntaxError,
                 Image.DecompressionBombError)


def open_rgb(path, exif_orientation=True):
    """Decodes an image file to RGB, upright by its EXIF orientation.

    Phones and cameras store a portrait photo as a landscape bitmap plus an
    EXIF tag saying how to turn it; viewers and labelling tools (labelme,
    CVAT, VIA) show it turned, and Detectron2's `read_image` applies it.

    Args:
      path: str, any format PIL reads (grey, RGBA and CMYK become RGB), on
        any filesystem of `mrcnn.data.files` (a remote file is read whole,
        then decoded).
      exif_orientation: bool, apply the file's EXIF orientation (False: the
        stored pixels).

    Returns:
      (uint8 [h, w, 3], orientation int: the file's EXIF tag, 1 without one).

    Raises:
      one of `DECODE_ERRORS`, PIL's, for a missing, unreadable or truncated
        file.
    """
    with Image.open(files.for_reader(path)) as image:
        image.load()   # decodes everything: a truncated file raises here
        orientation = int(image.getexif().get(_ORIENTATION_TAG, 1) or 1)
        if exif_orientation and orientation != 1:
            image = ImageOps.exif_transpose(image)
        return np.asarray(image.convert("RGB")), orientation


def read_image(path, image_id, height, width, exif_orientation=True):
    """Decodes a dataset image to RGB and checks its size against the json.

    Args:
      path: str, a JPEG or PNG (any format PIL reads; grey, RGBA and CMYK are
        converted to RGB).
      image_id: int, for messages.
      height, width: int, the size the annotation file gives.
      exif_orientation: bool, see `open_rgb` (`CocoInput.exif_orientation`).

    Returns:
      uint8 [h, w, 3].

    Raises:
      DataError: missing, unreadable or truncated file, or a size other than
        the json's (boxes would be wrong), naming the file and image id, and
        the setting to change when the EXIF orientation explains the size.
    """
    try:
        pixels, orientation = open_rgb(path, exif_orientation)
    except DECODE_ERRORS as e:
        raise DataError(f"{path}: cannot decode image id {image_id}: {e}") from None
    if pixels.shape[:2] != (height, width):
        hint = ""
        if orientation in _QUARTER_TURNS and pixels.shape[:2] == (width, height):
            hint = (f"; its EXIF orientation ({orientation}) turns the stored pixels a "
                    f"quarter, " + (
                        "and the file gives the stored size: if its annotations were "
                        "drawn on the stored pixels, set CocoInput.exif_orientation = "
                        "False" if exif_orientation else
                        "and the file gives the upright size: set "
                        "CocoInput.exif_orientation = True"))
        raise DataError(
            f"{path}: image id {image_id} is {pixels.shape[0]}x{pixels.shape[1]} "
            f"(h x w) but the annotation file says {height}x{width}{hint}")
    return pixels


def box_frame_mask(segmentation, box, height, width, mask_size):
    """One instance mask cropped to its box and resampled (module docstring).

    Args:
      segmentation: COCO polygons (list of flat [x0, y0, ...] lists) or RLE
        dict (compressed or not), in original image pixels.
      box: float [4] (y1, x1, y2, x2), original image pixels, non-empty.
      height, width: int, the original image size.
      mask_size: int S.

    Returns:
      uint8 [S, S] of 0/1.
    """
    y1, x1, y2, x2 = (float(v) for v in box)
    sy, sx = mask_size / (y2 - y1), mask_size / (x2 - x1)
    if isinstance(segmentation, list):
        polygons = []
        for poly in segmentation:
            p = np.asarray(poly, np.float64).reshape(-1, 2)
            p = (p - (x1, y1)) * (sx, sy)   # into the S x S box frame
            polygons.append(p.reshape(-1).tolist())
        rles = mask_util.frPyObjects(polygons, mask_size, mask_size)
        return mask_util.decode(mask_util.merge(rles))
    rle = segmentation
    if isinstance(rle.get("counts"), list):
        rle = mask_util.frPyObjects(rle, height, width)
    full = mask_util.decode(rle)   # [h, w]
    centres = (np.arange(mask_size) + 0.5) / mask_size
    ys = y1 + centres * (y2 - y1) - 0.5   # pixel-centre coordinates
    xs = x1 + centres * (x2 - x1) - 0.5
    return (_bilinear(full, ys, xs) >= 0.5).astype(np.uint8)


def _bilinear(image, ys, xs):
    """float32 [len(ys), len(xs)] bilinear samples on a grid, edges clamped."""
    h, w = image.shape
    ys = np.clip(ys, 0, h - 1)
    xs = np.clip(xs, 0, w - 1)
    y0 = np.minimum(np.floor(ys).astype(np.int64), h - 2) if h > 1 else np.zeros(len(ys), np.int64)
    x0 = np.minimum(np.floor(xs).astype(np.int64), w - 2) if w > 1 else np.zeros(len(xs), np.int64)
    y1i, x1i = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    wy = (ys - y0)[:, None].astype(np.float32)
    wx = (xs - x0)[None, :].astype(np.float32)
    img = image.astype(np.float32)
    top = img[y0][:, x0] * (1 - wx) + img[y0][:, x1i] * wx
    bottom = img[y1i][:, x0] * (1 - wx) + img[y1i][:, x1i] * wx
    return top * (1 - wy) + bottom * wy


def kept_instances(record, max_instances, keep_crowd=False):
    """int64 [n]: the annotations of `record` that become gt slots, in
    order: the non-crowd ones (all with `keep_crowd`), the first
    `max_instances` of them (`decode_example`'s, and the keypoints'
    in mrcnn/data/pipeline.py)."""
    return np.flatnonzero(~record.is_crowd | keep_crowd)[:max_instances]


def decode_example(record, mask_size, max_instances, keep_crowd=False,
                   exif_orientation=True):
    """Image, boxes, classes and box-frame masks of one record.

    Crowd annotations are dropped unless `keep_crowd` (they are never gt
    boxes). At most `max_instances` are kept, in annotation order.

    Args:
      record: mrcnn.data.coco.ImageRecord.
      mask_size: int S; 0 decodes no mask (box-only data, evaluation).
      max_instances: int M.
      keep_crowd: bool.
      exif_orientation: bool, see `read_image`.

    Returns:
      (image uint8 [h, w, 3], boxes float32 [n, 4] (y1, x1, y2, x2) original
      pixels, classes int32 [n] 1..C, masks uint8 [n, S, S], num_dropped int:
      instances beyond M).
    """
    image = read_image(record.path, record.image_id, record.height, record.width,
                       exif_orientation)
    keep = kept_instances(record, max_instances, keep_crowd)
    num_dropped = int((~record.is_crowd | keep_crowd).sum()) - len(keep)
    masks = np.zeros((len(keep), mask_size, mask_size), np.uint8)
    for i, k in enumerate(keep if mask_size else ()):
        masks[i] = box_frame_mask(record.segmentations[k], record.boxes[k],
                                  record.height, record.width, mask_size)
    return (image, record.boxes[keep].astype(np.float32),
            record.classes[keep].astype(np.int32), masks, num_dropped)
