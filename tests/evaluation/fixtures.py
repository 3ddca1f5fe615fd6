"""Shared test data for tests/evaluation: a tiny COCO ground truth written from
scratch, "perfect" detections made from it in the model's output format, and
a float64 NumPy reference of `paste_masks` written from docs/OPS_CONTRACT.md.

Shape letters as in mrcnn/evaluation/coco.py: `B` images, `D` detection slots,
`oh, ow` mask cells (28 x 28), `H, W` an image's original size.

The reference `paste_masks` also stands in for `mrcnn.ops.masks.paste_masks`
when that module cannot be imported (it was written in parallel), so these
tests run either way; `install_paste_masks_stand_in` says which one is live.
"""

import json
import os
import sys
import types

import numpy as np
from pycocotools import mask as mask_util

MASK_SIZE = 28

# Non-contiguous COCO category ids, as in COCO 2017.
CATEGORIES = [
    {"id": 3, "name": "square", "supercategory": "shape"},
    {"id": 7, "name": "diamond", "supercategory": "shape"},
    {"id": 12, "name": "ell", "supercategory": "shape"},
]
CLASS_TO_CATEGORY = {1: 3, 2: 7, 3: 12}
CLASS_NAMES = {1: "square", 2: "diamond", 3: "ell"}

# Image ids evaluated; 40 is in the file but never shown to the evaluator,
# so an evaluator that does not restrict to seen images scores its gt as misses.
IMAGES = [
    {"id": 11, "height": 120, "width": 160, "file_name": "a.png"},
    {"id": 25, "height": 140, "width": 150, "file_name": "b.png"},
    {"id": 37, "height": 80, "width": 80, "file_name": "empty.png"},
    {"id": 40, "height": 64, "width": 64, "file_name": "unseen.png"},
]
SEEN_IMAGE_IDS = (11, 25, 37)

# (image_id, category_id, polygon [x0, y0, x1, y1, ...]); sizes cover the
# small (< 32^2), medium and large (> 96^2) COCO area ranges.
_POLYGONS = [
    (11, 3, [10, 20, 70, 20, 70, 80, 10, 80]),  # 60 x 60 square, medium
    (11, 7, [115, 25, 150, 60, 115, 95, 80, 60]),  # diamond, medium
    (25, 12, [5, 10, 25, 10, 25, 30, 5, 30]),  # 20 x 20 square, small
    # L shape: 120 x 120 minus a 40 x 40 corner, large and concave.
    (25, 3, [20, 10, 140, 10, 140, 90, 100, 90, 100, 130, 20, 130]),
    (40, 7, [10, 10, 40, 10, 40, 40, 10, 40]),
]


def _rle(polygon, height, width):
    return mask_util.merge(mask_util.frPyObjects([polygon], height, width))


def make_gt_dataset():
    """The ground-truth dict (COCO instances format)."""
    sizes = {im["id"]: (im["height"], im["width"]) for im in IMAGES}
    annotations = []
    for ann_id, (image_id, category_id, poly) in enumerate(_POLYGONS, 1):
        xs, ys = poly[0::2], poly[1::2]
        annotations.append({
            "id": ann_id, "image_id": image_id, "category_id": category_id,
            "segmentation": [list(map(float, poly))],
            "area": float(mask_util.area(_rle(poly, *sizes[image_id]))),
            "bbox": [float(min(xs)), float(min(ys)),
                     float(max(xs) - min(xs)), float(max(ys) - min(ys))],
            "iscrowd": 0,
        })
    return {"images": IMAGES, "annotations": annotations,
            "categories": CATEGORIES}


def write_gt_json(directory):
    path = os.path.join(directory, "instances_tiny.json")
    with open(path, "w") as f:
        json.dump(make_gt_dataset(), f)
    return path


def _bilinear(image, y, x):
    """float64 bilinear sample of a 2-D array at (y, x), edges clamped."""
    y = min(max(y, 0.0), image.shape[0] - 1.0)
    x = min(max(x, 0.0), image.shape[1] - 1.0)
    y0, x0 = int(np.floor(y)), int(np.floor(x))
    y1, x1 = min(y0 + 1, image.shape[0] - 1), min(x0 + 1, image.shape[1] - 1)
    fy, fx = y - y0, x - x0
    return ((1 - fy) * (1 - fx) * image[y0, x0] + (1 - fy) * fx * image[y0, x1]
            + fy * (1 - fx) * image[y1, x0] + fy * fx * image[y1, x1])


def crop_mask(full_mask, box, size=MASK_SIZE):
    """float64 [size, size]: the full mask sampled at the box's cell centres.

    Cell (u, v) of box (y1, x1, y2, x2) is centred at image point
    (y1 + (u + .5) h / size, x1 + (v + .5) w / size); pixel (i, j) is centred
    at (i + .5, j + .5), hence the -0.5 into array coordinates.
    """
    y1, x1, y2, x2 = box
    out = np.zeros((size, size))
    for u in range(size):
        for v in range(size):
            y = y1 + (u + 0.5) * (y2 - y1) / size - 0.5
            x = x1 + (v + 0.5) * (x2 - x1) / size - 0.5
            out[u, v] = _bilinear(full_mask.astype(np.float64), y, x)
    return out


def ref_paste_masks(masks, boxes, image_shape, threshold=0.5):
    """float64, one box and one pixel at a time, from the contract's text."""
    masks = np.asarray(masks, np.float64)
    boxes = np.asarray(boxes, np.float64)
    num_images, num_boxes, oh, ow = masks.shape
    height, width = (int(v) for v in image_shape)
    out = np.zeros((num_images, num_boxes, height, width), bool)
    for b in range(num_images):
        for k in range(num_boxes):
            y1, x1, y2, x2 = boxes[b, k]
            if y2 <= y1 or x2 <= x1:
                continue
            for i in range(height):
                cy = i + 0.5
                if not y1 <= cy < y2:
                    continue
                for j in range(width):
                    cx = j + 0.5
                    if not x1 <= cx < x2:
                        continue
                    my = (cy - y1) / (y2 - y1) * oh - 0.5
                    mx = (cx - x1) / (x2 - x1) * ow - 0.5
                    out[b, k, i, j] = _bilinear(masks[b, k], my, mx) >= threshold
    return out


def install_paste_masks_stand_in():
    """Makes `mrcnn.ops.masks.paste_masks` importable; True if it is the real one."""
    try:
        from mrcnn.ops import masks  # noqa: F401
        if hasattr(masks, "paste_masks"):
            return True
    except ImportError:
        pass
    import mrcnn.ops
    module = types.ModuleType("mrcnn.ops.masks")
    module.paste_masks = ref_paste_masks
    sys.modules["mrcnn.ops.masks"] = module
    mrcnn.ops.masks = module
    return False


def perfect_detections(coco_gt, slots, num_slots=4, score_base=0.9):
    """Model-format detections equal to the gt, for a batch of image slots.

    Args:
      coco_gt: the loaded ground truth COCO.
      slots: list of image ids, -1 for a padded image slot.
      num_slots: Python int D.

    Returns:
      (detections dict of numpy arrays, batch dict). Padded detection slots
      and padded image slots hold junk (confident, valid-looking boxes) that
      must be skipped by the code under test.
    """
    category_to_class = {v: k for k, v in CLASS_TO_CATEGORY.items()}
    num_images = len(slots)
    boxes = np.zeros((num_images, num_slots, 4), np.float32)
    scores = np.zeros((num_images, num_slots), np.float32)
    classes = np.zeros((num_images, num_slots), np.int32)
    masks = np.zeros((num_images, num_slots, MASK_SIZE, MASK_SIZE), np.float32)
    num = np.zeros((num_images,), np.int32)
    info = np.zeros((num_images, 5), np.float32)
    junk_box = np.array([0, 0, 30, 30], np.float32)
    for b, image_id in enumerate(slots):
        # Junk everywhere first; real detections overwrite the first slots.
        boxes[b] = junk_box
        scores[b] = 0.99
        classes[b] = 1
        masks[b] = 1.0
        if image_id < 0:
            num[b] = 2  # a padded image slot must be skipped whatever it says
            continue
        image = coco_gt.imgs[image_id]
        info[b] = [image["height"], image["width"], 800, 800, 1.0]
        anns = coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=[image_id]))
        num[b] = len(anns)
        for k, ann in enumerate(anns):
            x, y, w, h = ann["bbox"]
            box = (y, x, y + h, x + w)
            boxes[b, k] = box
            scores[b, k] = score_base - 0.1 * k
            classes[b, k] = category_to_class[ann["category_id"]]
            masks[b, k] = crop_mask(coco_gt.annToMask(ann), box)
    detections = {
        "detection_boxes": boxes, "detection_scores": scores,
        "detection_classes": classes, "detection_masks": masks,
        "num_detections": num,
    }
    batch = {"image_id": np.asarray(slots, np.int64), "image_info": info}
    return detections, batch
