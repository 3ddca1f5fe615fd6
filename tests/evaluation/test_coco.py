"""mrcnn.evaluation.coco: results entries, COCOeval wrapper, text table.

References are written here from the task's contract: "perfect" detections
made from the gt must score AP 1, the pasted masks must equal a float64
loop-by-loop paste, and a literal box/mask case is typed out by hand.
"""

import json
import os
import tempfile
from unittest import mock

import numpy as np
import tensorflow as tf
from absl.testing import parameterized
from pycocotools import mask as mask_util
from pycocotools.coco import COCO

from tests.evaluation import fixtures

REAL_PASTE_MASKS = fixtures.install_paste_masks_stand_in()

from mrcnn.evaluation import coco as coco_eval  # noqa: E402
from mrcnn.ops import masks as mask_ops  # noqa: E402

_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl",
          "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
_SLOTS = [11, 25, -1, 37]  # a padded image slot, and an image without gt


class _GtTestCase(tf.test.TestCase, parameterized.TestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls._dir = tempfile.TemporaryDirectory()
        cls.gt_path = fixtures.write_gt_json(cls._dir.name)
        cls.coco_gt = COCO(cls.gt_path)
        cls.perfect = fixtures.perfect_detections(cls.coco_gt, _SLOTS)

    @classmethod
    def tearDownClass(cls):
        cls._dir.cleanup()
        super().tearDownClass()

    def evaluator(self, **kwargs):
        return coco_eval.CocoEvaluator(self.gt_path, fixtures.CLASS_TO_CATEGORY,
                                       **kwargs)


class DetectionsToCocoTest(_GtTestCase):

    def test_literal_box_and_full_mask(self):
        # One box (y1, x1, y2, x2) = (10, 20, 30, 60) on a 50 x 80 image with
        # an all-ones mask: bbox [x, y, w, h] = [20, 10, 40, 20], and the mask
        # covers rows 10..29, columns 20..59 (pixel centres in the box).
        detections = {
            "detection_boxes": np.array([[[10, 20, 30, 60], [0, 0, 5, 5]]],
                                        np.float32),
            "detection_scores": np.array([[0.75, 0.5]], np.float32),
            "detection_classes": np.array([[2, 1]], np.int32),
            "detection_masks": np.ones((1, 2, 28, 28), np.float32),
            "num_detections": np.array([1], np.int32),
        }
        info = np.array([[50, 80, 800, 1280, 16.0]], np.float32)
        results = coco_eval.detections_to_coco(
            detections, np.array([11]), info, fixtures.CLASS_TO_CATEGORY)
        self.assertLen(results, 1)
        r = results[0]
        self.assertEqual(r["image_id"], 11)
        self.assertEqual(r["category_id"], 7)
        self.assertAllClose(r["bbox"], [20.0, 10.0, 40.0, 20.0])
        self.assertAllClose(r["score"], 0.75)
        self.assertIsInstance(r["segmentation"]["counts"], str)
        expected = np.zeros((50, 80), np.uint8)
        expected[10:30, 20:60] = 1
        self.assertAllEqual(mask_util.decode(r["segmentation"]), expected)
        json.dumps(results)  # plain Python types only

    @parameterized.named_parameters(('numpy', False), ('tensors', True))
    def test_masks_match_reference_paste(self, as_tensors):
        detections, batch = self.perfect
        if as_tensors:
            detections = {k: tf.constant(v) for k, v in detections.items()}
            batch = {k: tf.constant(v) for k, v in batch.items()}
        results = coco_eval.detections_to_coco(
            detections, batch["image_id"], batch["image_info"],
            fixtures.CLASS_TO_CATEGORY, mask_threshold=0.4)
        by_image = {}
        for r in results:
            by_image.setdefault(r["image_id"], []).append(r)
        det = self.perfect[0]
        for b, image_id in enumerate(_SLOTS):
            if image_id < 0 or image_id not in by_image:
                continue
            n = len(by_image[image_id])
            h, w = (int(v) for v in self.perfect[1]["image_info"][b, :2])
            ref = fixtures.ref_paste_masks(
                det["detection_masks"][b:b + 1, :n],
                det["detection_boxes"][b:b + 1, :n], (h, w), threshold=0.4)[0]
            got = np.stack([mask_util.decode(r["segmentation"])
                            for r in by_image[image_id]]).astype(bool)
            # Float32 matmul interpolation vs float64: allow a pixel or two
            # whose value sits on the threshold.
            self.assertLessEqual(np.sum(got != ref), 2)
            self.assertEqual(got.shape[1:], (h, w))

    def test_skips_padded_images_and_slots(self):
        detections, batch = self.perfect
        results = coco_eval.detections_to_coco(
            detections, batch["image_id"], batch["image_info"],
            fixtures.CLASS_TO_CATEGORY)
        # 2 gt in image 11, 2 in image 25, none in 37; the padded image slot
        # and the slots past num_detections (junk boxes, score 0.99) skipped.
        self.assertLen(results, 4)
        self.assertEqual(sorted({r["image_id"] for r in results}), [11, 25])
        self.assertNotIn(0.99, [round(r["score"], 2) for r in results])

    @parameterized.named_parameters(('zero', 0), ('minus_one', -1))
    def test_skips_padded_classes(self, pad_class):
        detections = {k: v.copy() for k, v in self.perfect[0].items()}
        detections["detection_classes"][0, 1] = pad_class
        results = coco_eval.detections_to_coco(
            detections, self.perfect[1]["image_id"],
            self.perfect[1]["image_info"], fixtures.CLASS_TO_CATEGORY)
        self.assertLen(results, 3)

    def test_no_masks(self):
        detections = dict(self.perfect[0])
        del detections["detection_masks"]
        results = coco_eval.detections_to_coco(
            detections, self.perfect[1]["image_id"],
            self.perfect[1]["image_info"], fixtures.CLASS_TO_CATEGORY,
            include_masks=False)
        self.assertLen(results, 4)
        self.assertNotIn("segmentation", results[0])
        with self.assertRaisesRegex(ValueError, "detection_masks"):
            coco_eval.detections_to_coco(
                detections, self.perfect[1]["image_id"],
                self.perfect[1]["image_info"], fixtures.CLASS_TO_CATEGORY)

    def test_unknown_class_raises(self):
        detections = {k: v.copy() for k, v in self.perfect[0].items()}
        detections["detection_classes"][0, 0] = 9
        with self.assertRaisesRegex(ValueError, r"\[9\]"):
            coco_eval.detections_to_coco(
                detections, self.perfect[1]["image_id"],
                self.perfect[1]["image_info"], fixtures.CLASS_TO_CATEGORY)

    def test_pastes_each_image_at_its_size(self):
        detections, batch = self.perfect
        with mock.patch.object(coco_eval, "_encode_rles",
                               wraps=coco_eval._encode_rles) as encode:
            table = coco_eval.detections_to_table(
                detections, batch["image_id"], batch["image_info"],
                fixtures.CLASS_TO_CATEGORY, mask_threshold=0.3)
        # Images 11 and 25 have detections; 37 and the padded slot do not.
        self.assertEqual(encode.call_count, 2)
        for call, size in zip(encode.call_args_list, [(120, 160), (140, 150)]):
            masks, axes, height, width, threshold = call.args
            self.assertEqual((height, width), size)
            self.assertEqual(masks.shape, (2, 28, 28))
            self.assertEqual([len(a) for axis in axes for a in axis], [2] * 8)
            self.assertEqual(threshold, 0.3)
        self.assertEqual(table.mask_size.tolist(), [[120, 160]] * 2 + [[140, 150]] * 2)


def _edge_boxes(height, width):
    """float32 [8, 4]: whole image, beyond it, corners, empty, thin, subpixel."""
    return np.array([
        [0, 0, height, width],
        [-7.5, -3.2, height + 4.1, width + 9.0],
        [0, 0, 3.3, 2.7],                            # first pixel in
        [height - 2.2, width - 4.6, height, width],  # last pixel in
        [5, 5, 5, 12],                               # empty
        [2.4, 0.3, 2.6, width],                      # no pixel centre inside
        [1.2, 6.7, height - 0.4, 7.6],               # one column
        [height + 3, 2, height + 9, 8],              # below the image
    ], np.float32)


class PasteMasksRleTest(tf.test.TestCase, parameterized.TestCase):
    """`paste_masks_rle` against the op it stands in for, `paste_masks`."""

    def decoded(self, masks, boxes, shape, threshold=0.5):
        rles = coco_eval.paste_masks_rle(masks, boxes, shape, threshold)
        for rle in rles:
            self.assertEqual(rle["size"], list(shape))
            self.assertIsInstance(rle["counts"], str)
        return np.stack([mask_util.decode(r) for r in rles]).astype(bool)

    @parameterized.parameters((17, 23), (1, 9), (9, 1), (40, 31))
    def test_full_masks_give_the_ops_rle_exactly(self, height, width):
        # All-ones masks interpolate to exactly 1 (no rounding near the
        # threshold), so the RLE strings must equal pycocotools' encoding of
        # the op's pixels, edge cases of the run layout included.
        boxes = _edge_boxes(height, width)
        masks = np.ones((len(boxes), 28, 28), np.float32)
        expected = mask_ops.paste_masks(masks[None], boxes[None],
                                        (height, width)).numpy()[0]
        encoded = mask_util.encode(np.asfortranarray(
            np.transpose(expected, (1, 2, 0)).astype(np.uint8)))
        got = coco_eval.paste_masks_rle(masks, boxes, (height, width))
        self.assertEqual([r["counts"] for r in got],
                         [r["counts"].decode("ascii") for r in encoded])

    @parameterized.parameters((0.5, 0), (0.3, 1), (0.7, 2))
    def test_random_masks_match_the_op_off_the_threshold(self, threshold,
                                                          seed):
        rng = np.random.default_rng(seed)
        height, width = 37, 52
        corners = rng.uniform(-10, 60, (24, 2, 2)).astype(np.float32)
        corners.sort(axis=1)
        boxes = np.concatenate([
            _edge_boxes(height, width),
            corners.transpose(0, 2, 1).reshape(-1, 4)[:, [0, 2, 1, 3]]])
        masks = rng.uniform(0, 1, (len(boxes), 28, 14)).astype(np.float32)
        got = self.decoded(masks, boxes, (height, width), threshold)

        def op(t):
            return mask_ops.paste_masks(masks[None], boxes[None],
                                        (height, width), t).numpy()[0]

        # Float32 interpolation in NumPy and in the op's matmuls may round
        # one ulp apart: a pixel may differ only where its value is within
        # 1e-5 of the threshold.
        above, below = op(threshold + 1e-5), op(threshold - 1e-5)
        self.assertFalse(np.any(above & ~got))
        self.assertFalse(np.any(got & ~below))
        self.assertLess(np.sum(below & ~above), 5)
        self.assertGreater(got.sum(), 1000)

    @parameterized.parameters((0.5, 3), (0.25, 4), (0.75, 5))
    def test_exact_ties_match_the_op_exactly(self, threshold, seed):
        # Cell values on a quarter grid and boxes whose rows and columns
        # fall on dyadic cell coordinates: every pasted value is exact in
        # float32 in both paths, many equal the threshold and many
        # crossings fall exactly on a row, so the pixels must be equal.
        rng = np.random.default_rng(seed)
        height, width = 70, 90
        masks = rng.choice(np.float32([0, 0.25, 0.5, 0.75, 1]), (12, 28, 14))
        sides = np.array([[28, 14], [56, 28], [14, 7], [7, 56]] * 3, np.float32)
        corners = rng.integers(-4, 40, (12, 2)).astype(np.float32)
        boxes = np.concatenate([corners, corners + sides], 1)
        expected = mask_ops.paste_masks(masks[None], boxes[None], (height, width),
                                        threshold).numpy()[0]
        got = self.decoded(masks, boxes, (height, width), threshold)
        self.assertAllEqual(got, expected)
        self.assertGreater(got.sum(), 1000)

    def test_columns_in_chunks_give_the_same_runs(self):
        rng = np.random.default_rng(6)
        boxes = np.concatenate([_edge_boxes(37, 52),
                                rng.uniform(0, 30, (20, 2)).repeat(2, 1)
                                + [0, 0, 9, 14]]).astype(np.float32)
        masks = rng.uniform(0, 1, (len(boxes), 28, 28)).astype(np.float32)
        whole = coco_eval.paste_masks_rle(masks, boxes, (37, 52))
        with mock.patch.object(coco_eval, "_PASTE_CHUNK_COLUMNS", 16):
            self.assertEqual(coco_eval.paste_masks_rle(masks, boxes, (37, 52)), whole)

    def test_no_masks(self):
        self.assertEqual(coco_eval.paste_masks_rle(
            np.zeros((0, 28, 28)), np.zeros((0, 4)), (5, 6)), [])


class CocoEvaluatorTest(_GtTestCase):

    def test_perfect_detections_score_one(self):
        evaluator = self.evaluator()
        evaluator.update(*self.perfect)
        self.assertEqual(evaluator.image_ids, [11, 25, 37])
        metrics = evaluator.evaluate()
        self.assertEqual(sorted(metrics), ["bbox", "segm"])
        for iou_type in ("bbox", "segm"):
            stats = metrics[iou_type]
            self.assertEqual(tuple(stats), _NAMES)
            for name in ("AP", "AP50", "AP75", "APs", "APm", "APl",
                         "AR100", "ARs", "ARm", "ARl"):
                self.assertAllClose(stats[name], 1.0, atol=1e-6,
                                    msg=f"{iou_type} {name}")

    def test_batches_accumulate(self):
        # The same detections fed as two single-image batches.
        detections, batch = self.perfect
        evaluator = self.evaluator()
        for b in (0, 1):
            evaluator.update({k: v[b:b + 1] for k, v in detections.items()},
                             {k: v[b:b + 1] for k, v in batch.items()})
        self.assertLen(evaluator.results, 4)
        metrics = evaluator.evaluate(iou_types=("bbox",))
        self.assertEqual(list(metrics), ["bbox"])
        self.assertAllClose(metrics["bbox"]["AP"], 1.0, atol=1e-6)

    def test_evaluate_leaves_results_unchanged(self):
        for include_masks in (True, False):
            evaluator = self.evaluator(include_masks=include_masks)
            detections = dict(self.perfect[0])
            evaluator.update(detections, self.perfect[1])
            before = json.dumps(evaluator.results, sort_keys=True)
            first = evaluator.evaluate(("bbox", "segm") if include_masks
                                       else ("bbox",))
            self.assertEqual(json.dumps(evaluator.results, sort_keys=True),
                             before)
            self.assertEqual(evaluator.evaluate(tuple(first)), first)

    def test_wrong_classes_score_zero(self):
        detections = {k: v.copy() for k, v in self.perfect[0].items()}
        classes = detections["detection_classes"]
        classes[:] = classes % 3 + 1  # every class replaced by another
        evaluator = self.evaluator()
        evaluator.update(detections, self.perfect[1])
        metrics = evaluator.evaluate()
        for iou_type in ("bbox", "segm"):
            self.assertAllClose(metrics[iou_type]["AP"], 0.0, atol=1e-6)

    def _swapped_image_11(self):
        """Evaluator and metrics with image 11's two classes swapped."""
        detections = {k: v.copy() for k, v in self.perfect[0].items()}
        detections["detection_classes"][0, :2] = (
            detections["detection_classes"][0, 1::-1])
        evaluator = self.evaluator()
        evaluator.update(detections, self.perfect[1])
        return evaluator, evaluator.evaluate()

    def test_shuffled_classes_score_lower(self):
        # Swap the two classes of image 11 only: half right, half wrong.
        _, metrics = self._swapped_image_11()
        for iou_type in ("bbox", "segm"):
            self.assertBetween(metrics[iou_type]["AP"], 0.05, 0.95)

    def test_per_category_ap_averages_to_ap(self):
        # Image 11's square and diamond swap classes: diamond (gt in image
        # 11 only) scores 0, ell is untouched, square is half right.
        evaluator, metrics = self._swapped_image_11()
        for iou_type in ("bbox", "segm"):
            per = evaluator.per_category[iou_type]
            self.assertEqual(sorted(per), ["diamond", "ell", "square"])
            self.assertAllClose(per["ell"], 1.0, atol=1e-6)
            self.assertAllClose(per["diamond"], 0.0, atol=1e-6)
            self.assertBetween(per["square"], 0.05, 0.95)
            # COCOeval's AP is the mean over categories with ground truth.
            self.assertAllClose(np.mean(list(per.values())), metrics[iou_type]["AP"],
                                atol=1e-9)
        table = coco_eval.format_per_category(evaluator.per_category).splitlines()
        self.assertEqual(table[0].split(), ["category", "bbox", "AP", "segm", "AP"])
        self.assertEqual([r.split()[0] for r in table[1:]], ["square", "diamond", "ell"])
        self.assertEqual(table[3].split()[1:], ["1.000", "1.000"])

    def test_per_category_without_gt_is_minus_one(self):
        # Only image 37 (no gt) seen: every category is undefined.
        detections, batch = self.perfect
        evaluator = self.evaluator()
        evaluator.update({k: v[3:4] for k, v in detections.items()},
                         {k: v[3:4] for k, v in batch.items()})
        evaluator.evaluate(("bbox",))
        self.assertEqual(evaluator.per_category["bbox"],
                         {"square": -1.0, "diamond": -1.0, "ell": -1.0})
        self.assertIn("-", coco_eval.format_per_category(evaluator.per_category))

    def test_zero_detections_give_zero_ap(self):
        detections = {k: v.copy() for k, v in self.perfect[0].items()}
        detections["num_detections"][:] = 0
        evaluator = self.evaluator()
        evaluator.update(detections, self.perfect[1])
        self.assertEqual(evaluator.results, [])
        metrics = evaluator.evaluate()
        for iou_type in ("bbox", "segm"):
            self.assertEqual(metrics[iou_type]["AP"], 0.0)
            self.assertEqual(metrics[iou_type]["AR100"], 0.0)

    def test_write_results_loads_with_coco(self):
        evaluator = coco_eval.CocoEvaluator(self.coco_gt,
                                            fixtures.CLASS_TO_CATEGORY)
        evaluator.update(*self.perfect)
        path = os.path.join(self._dir.name, "out", "results.json")
        evaluator.write_results(path)
        coco_dt = self.coco_gt.loadRes(path)
        self.assertLen(coco_dt.getAnnIds(), 4)
        self.assertEqual(sorted(coco_dt.getCatIds()), [3, 7, 12])
        # Streamed entry by entry: json.dump's bytes of the whole list.
        with open(path) as f:
            self.assertEqual(f.read(), json.dumps(evaluator.results))
        self.assertEqual(evaluator.num_results, 4)

    def test_annotations_and_results_on_an_object_store(self):
        # A file:// URL stands in for gs://: pycocotools opens local files only.
        from tests.data.fixtures import remote_dir
        root = remote_dir(self._dir.name)
        tf.io.gfile.makedirs(root)
        tf.io.gfile.copy(self.gt_path, f"{root}/instances.json")
        evaluator = coco_eval.CocoEvaluator(f"{root}/instances.json",
                                            fixtures.CLASS_TO_CATEGORY)
        evaluator.update(*self.perfect)
        self.assertAllClose(evaluator.evaluate()["segm"]["AP"], 1.0, atol=1e-6)
        evaluator.write_results(f"{root}/eval/results.json")
        with tf.io.gfile.GFile(f"{root}/eval/results.json") as f:
            self.assertEqual(f.read(), json.dumps(evaluator.results))
        with self.assertRaisesRegex(FileNotFoundError, f"{root}/missing.json"):
            coco_eval.load_coco(f"{root}/missing.json")

    def test_segm_needs_masks(self):
        evaluator = self.evaluator(include_masks=False)
        detections = dict(self.perfect[0])
        del detections["detection_masks"]
        evaluator.update(detections, self.perfect[1])
        self.assertAllClose(evaluator.evaluate(("bbox",))["bbox"]["AP"], 1.0)
        with self.assertRaisesRegex(ValueError, "segm"):
            evaluator.evaluate()

    def test_errors_name_the_problem(self):
        with self.assertRaisesRegex(ValueError, r"\[99\]"):
            coco_eval.CocoEvaluator(self.gt_path, {1: 3, 2: 99})
        evaluator = self.evaluator()
        with self.assertRaisesRegex(ValueError, "update"):
            evaluator.evaluate()
        detections, batch = self.perfect
        bad = dict(batch, image_id=np.array([11, 25, -1, 1234]))
        with self.assertRaisesRegex(ValueError, "1234"):
            evaluator.update(detections, bad)
        evaluator.update(detections, batch)
        with self.assertRaisesRegex(ValueError, "keypoints"):
            evaluator.evaluate(("keypoints",))

    def test_reset(self):
        evaluator = self.evaluator()
        evaluator.update(*self.perfect)
        evaluator.reset()
        self.assertEqual(evaluator.results, [])
        self.assertEqual(evaluator.image_ids, [])


class FormatMetricsTest(tf.test.TestCase):

    def test_table(self):
        metrics = {
            "bbox": dict(zip(_NAMES, [0.5] * 12)),
            "segm": dict(zip(_NAMES, [0.25] * 11 + [-1.0])),
        }
        text = coco_eval.format_metrics(metrics)
        lines = text.split("\n")
        self.assertLen(lines, 3)
        self.assertEqual(lines[0].split(), list(_NAMES))
        self.assertEqual(lines[1].split(), ["bbox"] + ["0.500"] * 12)
        self.assertEqual(lines[2].split(), ["segm"] + ["0.250"] * 11 + ["-"])
        self.assertLen({len(line) for line in lines}, 1)  # aligned columns


if __name__ == "__main__":
    tf.test.main()
