"""Keypoints on the data side: the COCO reader (parse, + 0.5, v = 0 zeroed,
bad keypoints named by file and ids, category lists), the flip map, CocoInput's
gt_keypoints against a NumPy reference (resize, flip and permutation, jitter
crop, dropped instances, padding, min_keypoints), and the shapes writer's
extreme-point keypoints."""

import collections
import json
import os
import tempfile

import numpy as np
import tensorflow as tf
from absl.testing import parameterized
from PIL import Image
from pycocotools import mask as mask_util

from mrcnn.data import CocoInput, DataError, coco, make_shapes, shapes
from tests.data import fixtures
from tests.data.test_pipeline import _locate_crop, _ref_resize

COCO_NAMES = ("nose", "left_eye", "right_eye", "left_ear", "right_ear",
              "left_shoulder", "right_shoulder", "left_elbow", "right_elbow",
              "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee",
              "right_knee", "left_ankle", "right_ankle")
# Detectron2's COCO_PERSON_KEYPOINT_FLIP_MAP as indices.
COCO_FLIP = (0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15)
NAMES = ["nose", "left_eye", "right_eye"]


class FlipMapTest(tf.test.TestCase):

    def test_coco_and_shapes(self):
        self.assertEqual(coco.keypoint_flip_map(COCO_NAMES), COCO_FLIP)
        self.assertEqual(coco.keypoint_flip_map(shapes.KEYPOINT_NAMES), (0, 3, 2, 1))
        self.assertEqual(coco.keypoint_flip_map(()), ())

    def test_unpaired_names_stay(self):
        # No right_hand: left_hand stays; "left_of_right" has no mutual partner.
        self.assertEqual(coco.keypoint_flip_map(
            ["left_hand", "right_foot", "left_foot", "left_of_right", "right_of_right"]),
            (0, 2, 1, 3, 4))


def _keypoint_dataset():
    """fixtures' dataset with 3 keypoints on both categories: ann 101 (image
    11) labelled, 102 without `keypoints`, 103 (image 12) with a v = 0 point
    at a non-zero place, 104 (image 13) a crowd with points."""
    d = fixtures.base_dataset()
    for c in d["categories"]:
        c["keypoints"] = list(NAMES)
    kps = {101: [5, 7, 2, 0, 0, 0, 8.25, 9, 1],
           103: [3, 4, 0, 10, 11.5, 2, 0, 0, 0],
           104: [31, 21, 2, 32, 22, 2, 33, 23, 1]}
    for a in d["annotations"]:
        if a["id"] in kps:
            a["keypoints"] = kps[a["id"]]
    d["annotations"][3]["iscrowd"] = 1
    return d


class LoadKeypointsTest(tf.test.TestCase, parameterized.TestCase):

    def setUp(self):
        super().setUp()
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        self.root = tmp.name

    def _write(self, mutate=None, split="train2017"):
        d = _keypoint_dataset()
        if mutate:
            mutate(d)
        return fixtures.write_dataset(self.root, d, split)

    def _ann(self, d, ann_id):
        return next(a for a in d["annotations"] if a["id"] == ann_id)

    def test_records(self):
        path, image_dir = self._write()
        split = coco.load_split(path, image_dir, on_bad="raise", with_keypoints=True)
        self.assertEqual(split.keypoint_names, tuple(NAMES))
        self.assertEqual(split.keypoint_flip_map, (0, 2, 1))
        by_id = {r.image_id: r for r in split.records}
        kp = by_id[11].keypoints
        self.assertEqual(kp.dtype, np.float32)
        self.assertAllEqual(kp.shape, [2, 3, 3])
        # + 0.5 to labelled points; v = 0 points and the annotation without
        # keypoints (102) all zeros.
        self.assertAllEqual(kp[0], [[5.5, 7.5, 2], [0, 0, 0], [8.75, 9.5, 1]])
        self.assertAllEqual(kp[1], np.zeros((3, 3)))
        self.assertAllEqual(by_id[12].keypoints[0], [[0, 0, 0], [10.5, 12, 2], [0, 0, 0]])
        self.assertAllEqual(by_id[13].keypoints, np.zeros((1, 3, 3)))   # crowd
        self.assertTrue(by_id[13].is_crowd[0])
        # Without with_keypoints: nothing read.
        plain = coco.load_split(path, image_dir, on_bad="raise")
        self.assertEqual(plain.keypoint_names, ())
        self.assertTrue(all(r.keypoints is None for r in plain.records))

    def test_skeleton(self):
        def with_skeleton(edges):
            def mutate(d):
                d["categories"][0]["skeleton"] = edges
            return mutate
        path, image_dir = self._write()
        self.assertEqual(coco.load_split(path, image_dir, with_keypoints=True)
                         .keypoint_skeleton, ())
        path, image_dir = self._write(with_skeleton([[1, 2], [3, 1]]))
        self.assertEqual(coco.load_split(path, image_dir, with_keypoints=True)
                         .keypoint_skeleton, ((0, 1), (2, 0)))
        path, image_dir = self._write(with_skeleton([[1, 4]]))
        with self.assertRaisesRegex(coco.DataError, r"category id 5 .*skeleton \[\[1, 4\]\], "
                                    r"not a list of \[i, j\] keypoint numbers 1..3"):
            coco.load_split(path, image_dir, with_keypoints=True)

    def test_category_without_keypoints_reads_zeros(self):
        def mutate(d):
            del d["categories"][1]["keypoints"]   # dog (2): ann 102, 103
            self._ann(d, 103)["keypoints"] = "not even a list"
        path, image_dir = self._write(mutate)
        split = coco.load_split(path, image_dir, on_bad="raise", with_keypoints=True)
        by_id = {r.image_id: r for r in split.records}
        self.assertAllEqual(by_id[12].keypoints, np.zeros((1, 3, 3)))
        self.assertAllEqual(by_id[11].keypoints[0, 0], [5.5, 7.5, 2])

    @parameterized.named_parameters(
        ("short", [1, 2, 2] * 2, "not 9 finite numbers"),
        ("long", [1, 2, 2] * 4, "not 9 finite numbers"),
        ("nan", [1, float("nan"), 2] * 3, "not 9 finite numbers"),
        ("string", [1, "2", 2] * 3, "not 9 finite numbers"),
        ("not_a_list", {"x": 1}, "not 9 finite numbers"),
        ("visibility_3", [1, 2, 2, 1, 2, 3, 1, 2, 0], "visibility 3 is not 0, 1 or 2"),
        ("visibility_half", [1, 2, 0.5] * 3, "visibility 0.5 is not"))
    def test_bad_keypoints(self, keypoints, message):
        path, image_dir = self._write(
            lambda d: self._ann(d, 103).update(keypoints=keypoints))
        with self.assertRaisesRegex(
                DataError, rf"instances_train2017.json: annotation id 103 \(image id 12, "
                rf".*000012.jpg\): (keypoint )?.*{message}"):
            coco.load_split(path, image_dir, on_bad="raise", with_keypoints=True)
        split = coco.load_split(path, image_dir, on_bad="skip_image", with_keypoints=True)
        self.assertEqual([r.image_id for r in split.records], [11, 13])
        self.assertEqual(split.counts["bad_annotations"], 1)
        self.assertIn("annotation id 103", split.problems[0])
        # Not checked without keypoints.
        self.assertLen(coco.load_split(path, image_dir, on_bad="raise").records, 3)

    def test_category_lists_must_agree(self):
        def mutate(d):
            d["categories"][1]["keypoints"] = ["nose", "right_eye", "left_eye"]
        path, image_dir = self._write(mutate)
        with self.assertRaisesRegex(
                DataError, r"instances_train2017.json: category id 2 \('dog'\) has "
                r"keypoints .* but category id 5 \('cat'\) has"):
            coco.load_split(path, image_dir, with_keypoints=True)
        coco.load_split(path, image_dir)   # not read without keypoints

    def test_no_keypoint_category(self):
        path, image_dir = fixtures.write_dataset(self.root)
        with self.assertRaisesRegex(DataError, r"instances_train2017.json: no category "
                                    r"has a 'keypoints' list"):
            coco.load_split(path, image_dir, with_keypoints=True)

    def test_splits_must_name_the_same_keypoints(self):
        first = self._write()

        def rename(d):
            for c in d["categories"]:
                c["keypoints"] = ["nose", "left_eye", "right_ear"]
        second = self._write(rename, split="extra")
        with self.assertRaisesRegex(DataError, r"instances_extra.json: its keypoint names "
                                    r".*right_ear.* differ from those of .*train2017"):
            coco.load_splits([first, second], with_keypoints=True)
        self._write(split="extra")
        both = coco.load_splits([first, second], with_keypoints=True)
        self.assertEqual(both.keypoint_names, tuple(NAMES))
        self.assertLen(both.records, 6)


# The shapes dataset the pipeline and shapes tests share (module scope: made once).
H, W = 48, 64
M = 3   # fewer than the most shapes per image: the first M non-crowd kept
_data = {}


def setUpModule():
    tmp = tempfile.TemporaryDirectory()
    _data["tmp"] = tmp
    root = os.path.join(tmp.name, "shapes")
    make_shapes(root, num_train=10, num_val=2, image_size=(H, W), seed=11)
    with open(os.path.join(root, "annotations", "instances_train2017.json")) as f:
        train = json.load(f)
    anns = collections.defaultdict(list)
    for a in train["annotations"]:
        anns[a["image_id"]].append(a)
    _data.update(root=root, train=train, anns=anns)


def tearDownModule():
    _data.pop("tmp").cleanup()


def _builder(**kwargs):
    args = dict(batch_size=4, min_size=56, max_size=80, canvas_size=(64, 80),
                size_divisor=16, max_instances=M, mask_size=8, seed=4,
                with_keypoints=True, flip_probability=0.5)
    args.update(kwargs)
    return CocoInput(_data["root"], **args)


def _expected(anns, rh, rw, flipped, offset, visible):
    """NumPy reference of one example's gt_keypoints [M, 4, 3] (y, x, v): the
    first M non-crowd annotations, scaled per axis, flipped (x -> rw - x,
    left <-> right), shifted by the crop offset, outside points and
    instances whose boxes the crop empties dropped."""
    oy, ox = offset
    vh, vw = visible
    out = np.zeros((M, 4, 3))
    n = 0
    for a in [a for a in anns if not a["iscrowd"]][:M]:
        x, y, w, h = a["bbox"]
        box = np.array([y * rh / H, x * rw / W, (y + h) * rh / H, (x + w) * rw / W])
        if flipped:
            box = np.array([box[0], rw - box[3], box[2], rw - box[1]])
        crop = np.clip(box - [oy, ox, oy, ox], 0, [vh, vw, vh, vw])
        if not (crop[2] > crop[0] and crop[3] > crop[1]):
            continue
        kp = np.array(a["keypoints"], np.float64).reshape(4, 3)
        yxv = np.stack([(kp[:, 1] + 0.5) * rh / H, (kp[:, 0] + 0.5) * rw / W, kp[:, 2]], 1)
        if flipped:
            yxv[:, 1] = rw - yxv[:, 1]
            yxv = yxv[[0, 3, 2, 1]]
        yxv[:, :2] -= [oy, ox]
        inside = ((yxv[:, 2] > 0) & (yxv[:, 0] >= 0) & (yxv[:, 0] < vh)
                  & (yxv[:, 1] >= 0) & (yxv[:, 1] < vw))
        out[n] = np.where(inside[:, None], yxv, 0.0)
        n += 1
    return out, n


class PipelineKeypointsTest(tf.test.TestCase):

    def _check(self, builder, batches, jitter):
        """Every slot against `_expected`; returns the (flips, dropped points)
        seen. Crop place and flip come from the pixels (`_locate_crop`)."""
        flips, outside = set(), 0
        for batch in batches:
            self.assertEqual(batch["gt_keypoints"].dtype, np.float32)
            for b in range(len(batch["image_id"])):
                image_id = int(batch["image_id"][b])
                info = batch["image_info"][b]
                if jitter:
                    rh, rw = round(H * float(info[4])), round(W * float(info[4]))
                else:
                    rh, rw = int(info[2]), int(info[3])
                vh, vw = int(info[2]), int(info[3])
                pixels = np.asarray(Image.open(os.path.join(
                    _data["root"], "train2017", f"{image_id:012d}.jpg")))
                error, oy, ox, flipped = _locate_crop(
                    _ref_resize(pixels, rh, rw), batch["images"][b, :vh, :vw].astype(float))
                self.assertLess(error, 1.0, msg=image_id)
                flips.add(bool(flipped))
                want, n = _expected(_data["anns"][image_id], rh, rw, flipped, (oy, ox),
                                    (vh, vw))
                got = batch["gt_keypoints"][b]
                self.assertAllEqual(batch["gt_valid"][b], np.arange(M) < n)
                self.assertAllClose(got, want, atol=2e-4, msg=image_id)
                self.assertAllEqual(got[..., 2] > 0, want[..., 2] > 0, msg=image_id)
                self.assertTrue(set(np.unique(got[..., 2])) <= {0.0, 1.0, 2.0})
                labelled = [a for a in _data["anns"][image_id] if not a["iscrowd"]][:M]
                outside += sum(v > 0 for a in labelled for v in a["keypoints"][2::3]) - int(
                    (got[..., 2] > 0).sum())
        return flips, outside

    def test_resize_and_flip_against_the_json(self):
        builder = _builder()
        self.assertEqual(builder.keypoint_names, shapes.KEYPOINT_NAMES)
        self.assertEqual((builder.num_keypoints, builder.keypoint_flip_map), (4, (0, 3, 2, 1)))
        ds = builder()
        self.assertEqual(ds.element_spec["gt_keypoints"].shape.as_list(), [4, M, 4, 3])
        self.assertEqual(ds.element_spec["gt_keypoints"].dtype, tf.float32)
        batches = [{k: v.numpy() for k, v in b.items()} for b in ds.take(3)]
        flips, outside = self._check(builder, batches, jitter=False)
        self.assertEqual(flips, {False, True})
        self.assertEqual(outside, 0)   # the plain resize keeps every point

    def test_scale_jitter_crop_against_the_json(self):
        # Canvas 64 x 64 and scale s * min(64 / 48, 64 / 64) = s: 48 x 64
        # images resize to 62-86 x 83-115, cropped to at most 64 x 64.
        builder = _builder(scale_jitter=(1.3, 1.8), canvas_size=(64, 64))
        batches = [{k: v.numpy() for k, v in b.items()} for b in builder().take(3)]
        flips, outside = self._check(builder, batches, jitter=True)
        self.assertEqual(flips, {False, True})
        self.assertGreater(outside, 3)   # points the crops cut away

    def test_min_keypoints_and_modes(self):
        anns = _data["anns"]

        def labelled(image_id):
            return sum(v > 0 for a in anns[image_id] for v in a["keypoints"][2::3])

        ids = [im["id"] for im in _data["train"]["images"]]
        for threshold in (1, 9):
            builder = _builder(filter_empty=False, min_keypoints=threshold)
            kept = [i for i in ids if labelled(i) >= threshold]
            self.assertEqual([r.image_id for r in builder.records], kept)
            self.assertEqual(builder.counts["few_keypoints_images"], len(ids) - len(kept))
            self.assertNotEmpty(kept)
        self.assertLess(len(_builder(filter_empty=False, min_keypoints=9).records), 9)
        self.assertLen(_builder(filter_empty=False, min_keypoints=0).records, 10)
        # Evaluation batches hold no keypoints but the names are known; no
        # with_keypoints, nothing.
        evaluation = _builder(split="val2017", training=False)
        self.assertEqual(evaluation.num_keypoints, 4)
        self.assertNotIn("gt_keypoints", evaluation().element_spec)
        # Box-only keypoint data (Detectron2's Keypoint R-CNN has no mask head).
        spec = _builder(with_masks=False)().element_spec
        self.assertNotIn("gt_masks", spec)
        self.assertEqual(spec["gt_keypoints"].shape.as_list(), [4, M, 4, 3])
        plain = _builder(with_keypoints=False)
        self.assertEqual((plain.keypoint_names, plain.num_keypoints,
                          plain.keypoint_flip_map), ((), 0, ()))
        self.assertNotIn("gt_keypoints", plain().element_spec)
        self.assertIsNone(plain.records[0].keypoints)


def _mask(segmentation):
    if isinstance(segmentation, list):
        return mask_util.decode(mask_util.merge(mask_util.frPyObjects(segmentation, H, W)))
    return mask_util.decode(segmentation)


class ShapesKeypointsTest(tf.test.TestCase):

    def test_categories(self):
        for c in _data["train"]["categories"]:
            self.assertEqual(c["keypoints"], ["top", "left", "bottom", "right"])
            self.assertEqual(c["skeleton"], [[1, 2], [2, 3], [3, 4], [4, 1]])

    def test_visibility_and_extreme_points(self):
        seen = collections.Counter()
        extremes = 0
        for a in _data["train"]["annotations"]:
            kp = np.array(a["keypoints"], np.float64).reshape(4, 3)
            self.assertEqual(a["num_keypoints"], int((kp[:, 2] > 0).sum()))
            if a["iscrowd"]:
                self.assertEqual(a["keypoints"], [0] * 12)
                continue
            mask = _mask(a["segmentation"])
            for (x, y, v) in kp:
                seen[v] += 1
                if v == 0:
                    self.assertEqual((x, y), (0, 0))
                    continue
                i, j = int(np.floor(y + 0.5)), int(np.floor(x + 0.5))
                self.assertTrue(0 <= i < H and 0 <= j < W, (a["id"], x, y))
                near = mask[max(i - 1, 0):i + 2, max(j - 1, 0):j + 2]
                self.assertEqual(v == 2, bool(near.any()), (a["id"], x, y, v))
            traced = all(float(c).is_integer() for p in a["segmentation"] for c in p)
            if traced:   # occluded: the json holds the visible outline only
                continue
            # Unoccluded: a point in the image is the extreme vertex of the
            # (clipped) polygon the json holds.
            poly = np.array(a["segmentation"][0]).reshape(-1, 2)
            for k, (axis, pick) in enumerate(((1, np.argmin), (0, np.argmin),
                                              (1, np.argmax), (0, np.argmax))):
                if kp[k, 2] > 0:
                    self.assertAllClose(kp[k, :2] + 0.5, poly[pick(poly[:, axis])],
                                        atol=0.011, msg=(a["id"], k))
                    extremes += 1
        self.assertGreater(extremes, 15)
        self.assertTrue(seen[0] and seen[1] and seen[2], seen)

    def test_loads_with_keypoints(self):
        path = os.path.join(_data["root"], "annotations", "instances_train2017.json")
        split = coco.load_split(path, os.path.join(_data["root"], "train2017"),
                                on_bad="raise", with_keypoints=True)
        self.assertEqual(split.keypoint_names, shapes.KEYPOINT_NAMES)
        self.assertEqual(split.keypoint_skeleton, ((0, 1), (1, 2), (2, 3), (3, 0)))
        for r in split.records:
            anns = _data["anns"][r.image_id]
            want = np.array([a["keypoints"] for a in anns], np.float64).reshape(-1, 4, 3)
            want[..., :2] = np.where(want[..., 2:] > 0, want[..., :2] + 0.5, 0.0)
            self.assertAllClose(r.keypoints, want, atol=1e-5)


if __name__ == "__main__":
    tf.test.main()
