"""COCO json loading: category mapping, crowd, and every kind of bad input
giving an error naming file and ids, or a counted skip."""

import gc
import json
import os
import tempfile

import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from mrcnn.data import coco
from tests.data import fixtures


def _drop_key(key):
    def mutate(d):
        del d[key]
    return mutate


def _set_annotation(ann_id, **fields):
    def mutate(d):
        ann = next(a for a in d["annotations"] if a["id"] == ann_id)
        ann.update(fields)
    return mutate


def _delete_file(root):
    os.remove(os.path.join(root, "train2017", "000012.jpg"))


# (name, mutate json, mutate files, counter, message pieces). Each bad thing
# concerns image 12 (annotation 103) unless said otherwise.
_BAD_ANNOTATIONS = (
    ("unknown_category", _set_annotation(103, category_id=9), None,
     "bad_annotations", ("annotation id 103", "image id 12", "000012.jpg",
                         "unknown category id 9")),
    ("zero_width", _set_annotation(103, bbox=[3.0, 4.0, 0.0, 5.0]), None,
     "bad_annotations", ("annotation id 103", "000012.jpg", "zero or negative")),
    ("negative_height", _set_annotation(103, bbox=[3.0, 4.0, 5.0, -2.0]), None,
     "bad_annotations", ("annotation id 103", "zero or negative")),
    ("box_outside", _set_annotation(103, bbox=[30.0, 4.0, 20.0, 5.0]), None,
     "bad_annotations", ("annotation id 103", "outside")),
    ("box_far_outside", _set_annotation(103, bbox=[300.0, 4.0, 20.0, 5.0]), None,
     "bad_annotations", ("annotation id 103", "outside")),
    ("box_not_numbers", _set_annotation(103, bbox=[1.0, "a", 2.0, 2.0]), None,
     "bad_annotations", ("annotation id 103", "not 4 finite numbers")),
    ("empty_segmentation", _set_annotation(103, segmentation=[]), None,
     "bad_annotations", ("annotation id 103", "empty segmentation")),
    ("short_polygon", _set_annotation(103, segmentation=[[1.0, 2.0, 3.0, 4.0]]),
     None, "bad_annotations", ("annotation id 103", "malformed polygon")),
    ("odd_polygon", _set_annotation(103, segmentation=[[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]]),
     None, "bad_annotations", ("annotation id 103", "malformed polygon")),
    ("polygon_not_numbers", _set_annotation(103, segmentation=[[1.0, 2.0, "3", 4.0, 5.0, 6.0]]),
     None, "bad_annotations", ("annotation id 103", "malformed polygon")),
    ("polygon_nan", _set_annotation(103, segmentation=[[1.0, 2.0, float("nan"), 4.0, 5.0, 6.0]]),
     None, "bad_annotations", ("annotation id 103", "malformed polygon")),
    ("polygon_huge_int", _set_annotation(103, segmentation=[[1, 2, 10**400, 4, 5, 6]]),
     None, "bad_annotations", ("annotation id 103", "malformed polygon")),
    ("polygon_nested", _set_annotation(103, segmentation=[[1.0, 2.0, [3.0], 4.0, 5.0, 6.0]]),
     None, "bad_annotations", ("annotation id 103", "malformed polygon")),
    ("box_infinite", _set_annotation(103, bbox=[1.0, float("inf"), 2.0, 2.0]), None,
     "bad_annotations", ("annotation id 103", "not 4 finite numbers")),
    ("rle_wrong_size", _set_annotation(103, segmentation={"size": [3, 3], "counts": "abc"}),
     None, "bad_annotations", ("annotation id 103", "RLE size")),
    ("no_segmentation", _set_annotation(103, segmentation=None), None,
     "bad_annotations", ("annotation id 103", "no segmentation")),
    ("missing_bbox", lambda d: d["annotations"][2].pop("bbox"), None,
     "bad_annotations", ("annotation id 103", "lacks ['bbox']")),
    ("unknown_image", _set_annotation(103, image_id=99), None,
     "orphan_annotations", ("annotation id 103", "unknown image id 99")),
    ("missing_file", None, _delete_file,
     "bad_images", ("image id 12", "000012.jpg", "missing")),
)


class CategoryMapTest(tf.test.TestCase):

    def test_literal_mapping(self):
        cmap = coco.CategoryMap.from_categories(
            [{"id": 7, "name": "triangle"}, {"id": 1, "name": "circle"},
             {"id": 3, "name": "square"}])
        self.assertEqual(cmap.num_classes, 3)
        self.assertEqual(cmap.names, ("circle", "square", "triangle"))
        self.assertEqual([cmap.to_contiguous(i) for i in (1, 3, 7)], [1, 2, 3])
        self.assertEqual([cmap.to_coco(c) for c in (1, 2, 3)], [1, 3, 7])
        self.assertAllEqual(cmap.coco_id_table()[np.array([0, 3, 1, 2])],
                            [-1, 7, 1, 3])
        with self.assertRaises(KeyError):
            cmap.to_contiguous(2)
        with self.assertRaises(KeyError):
            cmap.to_coco(0)

    def test_round_trip(self):
        rng = np.random.default_rng(0)
        ids = sorted(rng.choice(1000, 80, replace=False).tolist())
        cmap = coco.CategoryMap.from_categories(
            [{"id": i, "name": str(i)} for i in rng.permutation(ids).tolist()])
        for c in range(1, 81):
            self.assertEqual(cmap.to_contiguous(cmap.to_coco(c)), c)
        self.assertEqual(list(cmap.coco_ids), ids)


class LoadSplitTest(tf.test.TestCase, parameterized.TestCase):

    def setUp(self):
        super().setUp()
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        self.root = tmp.name

    def _write(self, mutate_json=None, mutate_files=None):
        d = fixtures.base_dataset()
        if mutate_json:
            mutate_json(d)
        path, image_dir = fixtures.write_dataset(self.root, d)
        if mutate_files:
            mutate_files(self.root)
        return path, image_dir

    def test_good_records(self):
        path, image_dir = self._write(_set_annotation(104, iscrowd=1))
        split = coco.load_split(path, image_dir, on_bad="raise")
        self.assertEqual([r.image_id for r in split.records], [11, 12, 13])
        r11 = split.records[0]
        # bbox (x, y, w, h) (4, 6, 10, 8) -> (y1, x1, y2, x2); category 5 -> 2.
        self.assertAllClose(r11.boxes, [[6, 4, 14, 14], [10, 20, 26, 32]])
        self.assertAllEqual(r11.classes, [2, 1])
        self.assertEqual(r11.path, os.path.join(image_dir, "000011.jpg"))
        self.assertAllEqual(split.records[2].is_crowd, [True])
        self.assertEqual(split.counts["crowd_annotations"], 1)
        self.assertEmpty(split.problems)
        # Polygons come back as float64 arrays of the json's numbers.
        polygon = r11.segmentations[0][0]
        self.assertEqual(polygon.dtype, np.float64)
        self.assertAllEqual(polygon, [4, 6, 14, 6, 14, 14, 4, 14])
        self.assertFalse(gc.is_tracked(polygon))

    def test_the_cycle_collector_is_left_as_it_was(self):
        path, image_dir = self._write()
        coco.load_split(path, image_dir)
        self.assertTrue(gc.isenabled())
        gc.disable()
        try:
            coco.load_split(path, image_dir)
            self.assertFalse(gc.isenabled())
        finally:
            gc.enable()

    def test_box_slightly_outside_is_clipped(self):
        path, image_dir = self._write(_set_annotation(103, bbox=[-0.5, 0.0, 40.9, 32.5]))
        split = coco.load_split(path, image_dir, on_bad="raise")
        self.assertAllClose(split.records[1].boxes, [[0, 0, 32, 40]])

    @parameterized.named_parameters(*[(c[0], c) for c in _BAD_ANNOTATIONS])
    def test_bad_input_raises_naming_it(self, case):
        _, mutate_json, mutate_files, _, pieces = case
        path, image_dir = self._write(mutate_json, mutate_files)
        with self.assertRaises(coco.DataError) as cm:
            coco.load_split(path, image_dir, on_bad="raise")
        message = str(cm.exception)
        self.assertIn(path, message)
        for piece in pieces:
            self.assertIn(piece, message)

    @parameterized.named_parameters(*[(c[0], c) for c in _BAD_ANNOTATIONS])
    def test_bad_input_skips_image_in_training(self, case):
        _, mutate_json, mutate_files, counter, pieces = case
        path, image_dir = self._write(mutate_json, mutate_files)
        split = coco.load_split(path, image_dir, on_bad="skip_image")
        self.assertEqual(split.counts[counter], 1)
        self.assertLen(split.problems, 1)
        self.assertIn(pieces[0], split.problems[0])
        ids = [r.image_id for r in split.records]
        if counter == "orphan_annotations":   # the annotation had no image
            self.assertEqual(ids, [11, 12, 13])
            self.assertEmpty(split.records[1].classes)
        else:
            self.assertEqual(ids, [11, 13])
            self.assertEqual(split.counts["skipped_images"], 1)

    @parameterized.named_parameters(
        *[(c[0], c) for c in _BAD_ANNOTATIONS if c[3] == "bad_annotations"])
    def test_bad_annotation_skipped_alone_in_eval(self, case):
        _, mutate_json, mutate_files, _, _ = case
        path, image_dir = self._write(mutate_json, mutate_files)
        split = coco.load_split(path, image_dir, on_bad="skip_annotation")
        self.assertEqual([r.image_id for r in split.records], [11, 12, 13])
        self.assertEmpty(split.records[1].classes)
        self.assertEqual(split.counts["skipped_annotations"], 1)

    def test_missing_file_raises_in_eval(self):
        path, image_dir = self._write(None, _delete_file)
        with self.assertRaisesRegex(coco.DataError, "image id 12.*000012.jpg"):
            coco.load_split(path, image_dir, on_bad="skip_annotation")

    @parameterized.named_parameters(
        ("no_annotations", _drop_key("annotations"), "'annotations'"),
        ("no_images", _drop_key("images"), "'images'"),
        ("no_categories", _drop_key("categories"), "'categories'"),
        ("list_not_dict", None, "top level is list"))
    def test_not_coco_always_raises(self, mutate, piece):
        path, image_dir = self._write(mutate)
        if mutate is None:
            with open(path, "w") as f:
                json.dump([1, 2], f)
        for on_bad in coco.ON_BAD:
            with self.assertRaises(coco.DataError) as cm:
                coco.load_split(path, image_dir, on_bad=on_bad)
            self.assertIn(path, str(cm.exception))
            self.assertIn(piece, str(cm.exception))

    def test_not_json_raises(self):
        path, image_dir = self._write()
        with open(path, "w") as f:
            f.write("{not json")
        with self.assertRaisesRegex(coco.DataError, "cannot read COCO json"):
            coco.load_split(path, image_dir)

    def test_image_entry_without_size_is_skipped(self):
        def mutate(d):
            del d["images"][1]["height"]
        path, image_dir = self._write(mutate)
        split = coco.load_split(path, image_dir, on_bad="skip_image")
        self.assertEqual(split.counts["bad_images"], 1)
        # Its annotation now points at an image that is not in the index.
        self.assertEqual(split.counts["orphan_annotations"], 1)
        self.assertEqual([r.image_id for r in split.records], [11, 13])
        with self.assertRaisesRegex(coco.DataError, r"image #1 \(id 12\)"):
            coco.load_split(path, image_dir, on_bad="raise")

    def test_lvis_images_name_their_file_by_coco_url(self):
        # LVIS v1: no file_name, a coco_url into train2017 or val2017, no
        # iscrowd; image_dir is the COCO root (Detectron2's layout).
        path, image_dir = self._write()
        with open(path) as f:
            d = json.load(f)
        for image in d["images"]:
            name = image.pop("file_name")
            image["coco_url"] = f"http://images.cocodataset.org/train2017/{name}"
            image["neg_category_ids"], image["not_exhaustive_category_ids"] = [], []
        for ann in d["annotations"]:
            ann.pop("iscrowd", None)
        with open(path, "w") as f:
            json.dump(d, f)
        split = coco.load_split(path, self.root, on_bad="raise")
        self.assertEqual([r.image_id for r in split.records], [11, 12, 13])
        self.assertEqual(split.records[0].path, os.path.join(image_dir, "000011.jpg"))
        self.assertFalse(any(r.is_crowd.any() for r in split.records))
        os.remove(os.path.join(image_dir, "000012.jpg"))
        with self.assertRaisesRegex(coco.DataError, "image id 12.*train2017/000012.jpg"):
            coco.load_split(path, self.root, on_bad="raise")


if __name__ == "__main__":
    tf.test.main()
