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


def write_orientations(root):
    """train2017 and val2017 of 10 images, one box each: ids 1-5 landscape
    (32 x 40), 6 square (36 x 36, landscape by the rule w >= h), 7-10
    portrait (40 x 32); each image the solid colour `id * 37 % 256`."""
    sizes = {i: (32, 40) for i in range(1, 6)}
    sizes[6] = (36, 36)
    sizes.update({i: (40, 32) for i in range(7, 11)})
    dataset = {"images": [], "annotations": [], "categories": copy.deepcopy(CATEGORIES)}
    for i, (h, w) in sorted(sizes.items()):
        dataset["images"].append({"id": i, "file_name": f"{i:06d}.jpg",
                                  "height": h, "width": w})
        dataset["annotations"].append({
            "id": 100 + i, "image_id": i, "category_id": 5,
            "bbox": [4.0, 6.0, 10.0, 8.0], "area": 80.0, "iscrowd": 0,
            "segmentation": [_square(4, 6, 10, 8)]})
    for split in ("train2017", "val2017"):
        write_dataset(root, dataset, split)
