"""A tiny hand-written COCO dataset for reader tests, and URLs standing in
for object stores (not a test module)."""

import copy
import json
import os
import uuid

import numpy as np
import tensorflow as tf
from PIL import Image
from pycocotools import mask as mask_util

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


def transpose_odd_images(data, split="train2017"):
    """Turns every other image of a split (a pathlib.Path root) into its
    transpose, annotations with it: landscape images become portrait ones."""
    path = data / "annotations" / f"instances_{split}.json"
    dataset = json.loads(path.read_text())
    odd = {im["id"] for im in dataset["images"][1::2]}
    for im in dataset["images"]:
        if im["id"] in odd:
            file = data / split / im["file_name"]
            Image.open(file).transpose(Image.Transpose.TRANSPOSE).save(file)
            im["height"], im["width"] = im["width"], im["height"]
    for ann in dataset["annotations"]:
        if ann["image_id"] not in odd:
            continue
        x, y, w, h = ann["bbox"]
        ann["bbox"] = [y, x, h, w]
        seg = ann["segmentation"]
        if isinstance(seg, list):
            ann["segmentation"] = [
                [v for pair in zip(p[1::2], p[0::2]) for v in pair] for p in seg]
        else:
            rle = dict(seg, counts=seg["counts"].encode()) if isinstance(
                seg["counts"], str) else mask_util.frPyObjects(seg, *seg["size"])
            full = np.asfortranarray(mask_util.decode(rle).T)
            out = mask_util.encode(full)
            ann["segmentation"] = {"size": list(out["size"]),
                                   "counts": out["counts"].decode()}
    path.write_text(json.dumps(dataset))


def remote_dir(local_dir):
    """A fresh `file://` URL under `local_dir`, standing in for gs:// and s3://:
    TensorFlow's filesystems read it as they read an object store, while
    Python's `open`, PIL, h5py and pycocotools cannot, so a read or write
    that bypasses tf.io.gfile fails. (`ram://`, TensorFlow's in-memory
    filesystem, calls every prefix of a file name a directory, which
    TensorFlow's own checkpoint utilities then misread.)"""
    return "file://" + os.path.join(os.path.abspath(str(local_dir)), uuid.uuid4().hex)


def copy_tree(src, dst):
    """Copies local directory `src` to `dst` (any filesystem), file by file."""
    for parent, _, names in tf.io.gfile.walk(src):
        target = parent.replace(src, dst, 1)
        tf.io.gfile.makedirs(target)
        for name in names:
            tf.io.gfile.copy(os.path.join(parent, name), f"{target}/{name}")
