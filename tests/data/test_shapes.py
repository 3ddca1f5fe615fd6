"""The synthetic shapes writer and bin/make_shapes: layout, determinism, masks
consistent with pixels, bbox/area consistent with masks, crowd RLE."""

import collections
import hashlib
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import tensorflow as tf
from absl.testing import parameterized
from PIL import Image
from pycocotools import mask as mask_util

from mrcnn.data import shapes

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _decode(segmentation, height, width):
    """Reference mask of a COCO segmentation, via pycocotools only."""
    if isinstance(segmentation, list):
        rle = mask_util.merge(mask_util.frPyObjects(segmentation, height, width))
    else:
        rle = segmentation
    return mask_util.decode(rle)


def _erode(mask):
    """4-neighbour erosion, slow and obvious."""
    m = np.pad(mask.astype(bool), 1)
    return (m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1]
            & m[1:-1, :-2] & m[1:-1, 2:])


def _digest(root):
    h = hashlib.sha256()
    for dirpath, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            with open(os.path.join(dirpath, name), "rb") as f:
                h.update(name.encode() + f.read())
    return h.hexdigest()


class MakeShapesTest(tf.test.TestCase, parameterized.TestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.tmp = tempfile.TemporaryDirectory()
        cls.root = os.path.join(cls.tmp.name, "shapes")
        cls.paths = shapes.make_shapes(cls.root, num_train=24, num_val=4,
                                       image_size=(48, 64), seed=3)
        with open(cls.paths["train2017"]) as f:
            cls.train = json.load(f)

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()
        super().tearDownClass()

    def test_coco_2017_layout(self):
        for split, count in (("train2017", 24), ("val2017", 4)):
            self.assertTrue(os.path.isfile(os.path.join(
                self.root, "annotations", f"instances_{split}.json")))
            self.assertLen(os.listdir(os.path.join(self.root, split)), count)
        for image in self.train["images"]:
            path = os.path.join(self.root, "train2017", image["file_name"])
            with Image.open(path) as im:
                self.assertEqual(im.format, "JPEG")
                self.assertEqual(im.size, (64, 48))
            self.assertEqual((image["height"], image["width"]), (48, 64))

    def test_categories_are_non_contiguous(self):
        cats = {c["id"]: c["name"] for c in self.train["categories"]}
        self.assertEqual(cats, {1: "circle", 3: "square", 7: "triangle"})
        used = {a["category_id"] for a in self.train["annotations"]}
        self.assertTrue(used <= set(cats))

    def test_ids_unique(self):
        ids = [a["id"] for a in self.train["annotations"]]
        self.assertLen(set(ids), len(ids))
        image_ids = {i["id"] for i in self.train["images"]}
        self.assertTrue({a["image_id"] for a in self.train["annotations"]} <= image_ids)

    def test_empty_and_crowd_images_at_documented_indices(self):
        per_image = collections.defaultdict(list)
        for a in self.train["annotations"]:
            per_image[a["image_id"]].append(a)
        for index, image in enumerate(self.train["images"]):
            anns = per_image[image["id"]]
            crowd = [a for a in anns if a["iscrowd"]]
            if index % 20 == 7:
                self.assertEmpty([a for a in anns if not a["iscrowd"]])
            else:
                self.assertNotEmpty([a for a in anns if not a["iscrowd"]])
            self.assertLen(crowd, 1 if index % 10 == 3 else 0, msg=index)
            for a in crowd:   # compressed RLE, counts a str
                self.assertIsInstance(a["segmentation"], dict)
                self.assertIsInstance(a["segmentation"]["counts"], str)
                self.assertEqual(a["segmentation"]["size"], [48, 64])
            for a in anns:
                if not a["iscrowd"]:
                    self.assertIsInstance(a["segmentation"], list)

    def test_bbox_and_area_match_mask(self):
        for a in self.train["annotations"]:
            mask = _decode(a["segmentation"], 48, 64)
            ys, xs = np.nonzero(mask)
            self.assertEqual(a["area"], mask.sum())
            self.assertAllClose(a["bbox"], [xs.min(), ys.min(),
                                            xs.max() + 1 - xs.min(),
                                            ys.max() + 1 - ys.min()])

    def test_masks_are_visible_parts_and_match_pixels(self):
        """Visible masks never overlap, and each covers one solid colour."""
        per_image = collections.defaultdict(list)
        for a in self.train["annotations"]:
            per_image[a["image_id"]].append(a)
        checked = 0
        for image in self.train["images"]:
            path = os.path.join(self.root, "train2017", image["file_name"])
            pixels = np.asarray(Image.open(path), np.float64)
            cover = np.zeros((48, 64), int)
            for a in per_image[image["id"]]:
                mask = _decode(a["segmentation"], 48, 64)
                cover += mask
                core = _erode(_erode(mask))
                if a["iscrowd"] or core.sum() < 10:
                    continue
                # Solid colour + N(0, 6) noise + JPEG: small spread inside;
                # a background or another shape in the mask would be far off.
                spread = np.abs(pixels[core] - np.median(pixels[core], 0)).mean()
                self.assertLess(spread, 12.0, msg=(image["id"], a["id"]))
                checked += 1
            self.assertLessEqual(cover.max(), 1)
        self.assertGreater(checked, 10)

    def test_occluded_instances_exist(self):
        traced = [a for a in self.train["annotations"] if not a["iscrowd"]
                  and all(float(v).is_integer() for p in a["segmentation"] for v in p)]
        self.assertNotEmpty(traced)

    def test_deterministic_for_seed(self):
        with tempfile.TemporaryDirectory() as tmp:
            shapes.make_shapes(os.path.join(tmp, "a"), 6, 2, (32, 32), seed=5)
            # b through a URL (file:// stands in for gs://): the same bytes.
            shapes.make_shapes("file://" + os.path.join(tmp, "b"), 6, 2, (32, 32), seed=5)
            shapes.make_shapes(os.path.join(tmp, "c"), 6, 2, (32, 32), seed=6)
            self.assertEqual(_digest(os.path.join(tmp, "a")),
                             _digest(os.path.join(tmp, "b")))
            self.assertNotEqual(_digest(os.path.join(tmp, "a")),
                                _digest(os.path.join(tmp, "c")))

    def test_bin_make_shapes(self):
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "d")
            subprocess.run(
                [sys.executable, os.path.join(_REPO, "bin", "make_shapes"),
                 f"--out={out}", "--num_train=3", "--num_val=2", "--height=32",
                 "--width=40", "--seed=1"],
                check=True, capture_output=True, cwd=tmp)
            with open(os.path.join(out, "annotations", "instances_val2017.json")) as f:
                val = json.load(f)
            self.assertLen(val["images"], 2)
            self.assertEqual(val["images"][0]["width"], 40)


class TraceOutlineTest(tf.test.TestCase, parameterized.TestCase):

    def test_literal_square(self):
        mask = np.zeros((4, 5), np.uint8)
        mask[1:3, 2:4] = 1
        self.assertEqual(shapes._trace_outline(mask),
                         [[2.0, 1.0, 4.0, 1.0, 4.0, 3.0, 2.0, 3.0]])

    @parameterized.named_parameters(("seed0", 0), ("seed1", 1), ("seed2", 2))
    def test_rasterises_back_exactly(self, seed):
        """Unions of random rectangles (no holes by construction: each touches
        the top row) trace to polygons pycocotools fills back exactly."""
        rng = np.random.default_rng(seed)
        for _ in range(20):
            mask = np.zeros((20, 24), np.uint8)
            for _ in range(rng.integers(1, 5)):
                x0, x1 = sorted(rng.integers(0, 25, 2))
                mask[:rng.integers(1, 21), x0:x1 + 1] = 1
            polygons = shapes._trace_outline(mask)
            back = _decode(polygons, 20, 24)
            self.assertAllEqual(back, mask)


if __name__ == "__main__":
    tf.test.main()
