"""A tiny hand-written COCO dataset for reader tests (not a test module)."""

import copy
import json
import os

import numpy as np
from PIL import Image

HEIGHT, WIDTH = 32, 40
CATEGORIES = [{"id": 5, "name": "cat"}, {"id": 2, "name": "dog"}]


def _square(x, y, w, h):
    return [float(v) for v in (x, y, x + w, y, x + w, y + h, x, y + h)]


def base_dataset():
    """3 images (ids 11, 12, 13), 4 annotations, categories 2 and 5."""
    images = [{"id": i, "file_name": f"{i:06d}.jpg", "height": HEIGHT,
               "width": WIDTH} for i in (11, 12, 13)]
    boxes = {101: (11, 5, (4, 6, 10, 8)), 102: (11, 2, (20, 10, 12, 16)),
             103: (12, 2, (0, 0, 40, 32)), 104: (13, 5, (30, 20, 8, 9))}
    annotations = [
        {"id": ann_id, "image_id": image_id, "category_id": cat,
         "bbox": list(map(float, box)), "area": float(box[2] * box[3]),
         "iscrowd": 0, "segmentation": [_square(*box)]}
        for ann_id, (image_id, cat, box) in boxes.items()]
    return {"images": images, "annotations": annotations,
            "categories": copy.deepcopy(CATEGORIES)}


def write_dataset(root, dataset=None, split="train2017"):
    """Writes json and solid-colour JPEGs; returns (annotation_file, image_dir)."""
    dataset = base_dataset() if dataset is None else dataset
    image_dir = os.path.join(root, split)
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    for image in dataset.get("images", []):
        if isinstance(image, dict) and "file_name" in image:
            pixels = np.full((image.get("height", HEIGHT), image.get("width", WIDTH), 3),
                             (image.get("id", 0) * 37) % 256, np.uint8)
            Image.fromarray(pixels).save(os.path.join(image_dir, image["file_name"]))
    path = os.path.join(root, "annotations", f"instances_{split}.json")
    with open(path, "w") as f:
        json.dump(dataset, f)
    return path, image_dir
