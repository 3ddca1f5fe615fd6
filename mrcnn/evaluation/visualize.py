"""Draw detections (boxes, labels, translucent masks) on an image.

Shape letters: `H, W` the image's height and width (original pixels, as the
model's detections are), `K` detection slots. Host-side numpy + PIL only.
"""

import colorsys

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mrcnn.data import files

# Weight of the instance colour over the image inside a mask: 0.5 keeps the
# object's texture readable under the colour.
DEFAULT_MASK_ALPHA = 0.5
# Detections below this score are not drawn (a common demo threshold).
DEFAULT_SCORE_THRESHOLD = 0.5
# Keypoints scoring below this are not drawn (Detectron2's Visualizer
# threshold, on the same spatial-softmax score).
DEFAULT_KEYPOINT_THRESHOLD = 0.05
# Box outline width in pixels.
_LINE_WIDTH = 2
# Keypoint dot radius in pixels.
_KEYPOINT_RADIUS = 2
# Hue step of the palette: the golden-ratio conjugate spreads consecutive
# hues as far apart as possible for any number of instances.
_GOLDEN_RATIO_CONJUGATE = 0.618033988749895


def instance_color(index):
    """Deterministic, saturated RGB colour of the `index`-th drawn instance.

    Returns:
      tuple of 3 Python ints in [0, 255].
    """
    hue = (0.1 + index * _GOLDEN_RATIO_CONJUGATE) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_detections(image, boxes, classes, scores, masks, class_names,
                    score_threshold=DEFAULT_SCORE_THRESHOLD,
                    mask_alpha=DEFAULT_MASK_ALPHA, keypoints=None,
                    keypoint_threshold=DEFAULT_KEYPOINT_THRESHOLD, skeleton=()):
    """Draws one image's detections; returns a new image.

    Detection `k` is drawn when `classes[k] > 0` (padded slots hold -1 or 0)
    and `scores[k] >= score_threshold`. Each drawn instance gets the next
    colour of `instance_color`, used for its mask (blended with weight
    `mask_alpha`), its box outline and its label background; the label is
    "<class name> <score>" at the box's top-left corner (inside the image).

    Args:
      image: uint8 [H, W, 3] RGB.
      boxes: float [K, 4] (y1, x1, y2, x2) in the image's pixels.
      classes: int [K], contiguous 1..C; padded slots -1 or 0.
      scores: float [K]; padded slots 0. None (ground truth): every slot
        with a class is drawn, labelled by its name alone.
      masks: bool [K, H, W] full-image instance masks (as `paste_masks`
        gives for one image), or None to draw boxes only.
      class_names: dict[int, str], class 1..C -> name; a class missing from
        it is labelled by its number.
      score_threshold: Python float, the lowest score drawn.
      mask_alpha: Python float in [0, 1], mask colour weight.
      keypoints: float [K, P, 3] (y, x, score) in the image's pixels, or
        None: each drawn instance's points scoring above
        `keypoint_threshold` become dots of its colour, outlined in black
        (for ground truth pass v and a threshold of 0: labelled points).
      keypoint_threshold: Python float.
      skeleton: (i, j) pairs of keypoint indices joined by a line of the
        instance's colour where both points are drawn (the COCO
        category's `skeleton`, 0-based: `CocoInput.keypoint_skeleton`).

    Returns:
      uint8 [H, W, 3], a copy of `image` with the detections drawn.

    Raises:
      ValueError: `image` is not [H, W, 3], or `masks` is not [K, H, W].
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must be [H, W, 3], got {image.shape}")
    height, width = image.shape[:2]
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)  # [K, 4]
    classes = np.asarray(classes).reshape(-1)
    labelled = scores is not None
    scores = (np.asarray(scores, np.float32).reshape(-1) if labelled
              else np.full(classes.shape, np.inf, np.float32))
    if masks is not None:
        masks = np.asarray(masks).astype(bool)
        if masks.shape != (boxes.shape[0], height, width):
            raise ValueError(
                f"masks must be [K, H, W] = {(boxes.shape[0], height, width)}, "
                f"got {masks.shape}")
    drawn = [k for k in range(boxes.shape[0])
             if classes[k] > 0 and scores[k] >= score_threshold]
    colors = [instance_color(i) for i in range(len(drawn))]

    # 1. Masks, blended in float so overlapping masks mix.
    out = image.astype(np.float32)
    if masks is not None:
        for k, color in zip(drawn, colors):
            m = masks[k]
            out[m] = (1.0 - mask_alpha) * out[m] + mask_alpha * np.asarray(
                color, np.float32)
    canvas = Image.fromarray(np.clip(np.round(out), 0, 255).astype(np.uint8))

    # 2. Box outlines, then labels on top so no box hides a label.
    draw = ImageDraw.Draw(canvas)
    for k, color in zip(drawn, colors):
        y1, x1, y2, x2 = (float(v) for v in boxes[k])
        # PIL's rectangle includes its far corner: [x1, x2) ends at x2 - 1.
        draw.rectangle([x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)],
                       outline=color, width=_LINE_WIDTH)
    if keypoints is not None:
        keypoints = np.asarray(keypoints, np.float32).reshape(boxes.shape[0], -1, 3)
        r = _KEYPOINT_RADIUS
        for k, color in zip(drawn, colors):
            shown = keypoints[k, :, 2] > keypoint_threshold
            for i, j in skeleton:
                if shown[i] and shown[j]:
                    draw.line([(keypoints[k, i, 1], keypoints[k, i, 0]),
                               (keypoints[k, j, 1], keypoints[k, j, 0])], fill=color, width=1)
        for k, color in zip(drawn, colors):
            for y, x, score in keypoints[k]:
                if score > keypoint_threshold:
                    draw.ellipse([x - r, y - r, x + r, y + r], fill=color, outline=(0, 0, 0))
    font = ImageFont.load_default()
    for k, color in zip(drawn, colors):
        y1, x1 = float(boxes[k, 0]), float(boxes[k, 1])
        name = class_names.get(int(classes[k]), str(int(classes[k])))
        text = f"{name} {scores[k]:.2f}" if labelled else name
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tw, th = right - left + 2, bottom - top + 2
        # Above the box when there is room, else just inside its top edge.
        tx = min(max(x1, 0.0), max(width - tw, 0))
        ty = y1 - th if y1 - th >= 0 else max(y1, 0.0)
        draw.rectangle([tx, ty, tx + tw - 1, ty + th - 1], fill=color)
        draw.text((tx + 1 - left, ty + 1 - top), text, fill=(0, 0, 0),
                  font=font)
    return np.asarray(canvas, np.uint8).copy()


def save_png(path, image):
    """Writes uint8 [H, W, 3] (or [H, W]) `image` as a PNG, making parent dirs
    (on any filesystem of `mrcnn.data.files`)."""
    files.make_parent(path)
    with files.open_file(path, "wb") as f:
        Image.fromarray(np.asarray(image, np.uint8)).save(f, format="PNG")
