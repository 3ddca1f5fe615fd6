"""Keypoint results and their COCO OKS evaluation, on an annotation file the
test writes: detections displaced by a known distance must score the AP
that OKS's formula gives."""

import json
import math
import os
import types

import numpy as np
import tensorflow as tf

from mrcnn.evaluation import coco as coco_eval
from mrcnn.evaluation.results import ResultsTable

_NAMES = ["top", "left", "bottom", "right"]
_SIGMA = 0.05
_AREA = 2000.0   # COCO's "medium" range for keypoints: 32^2 .. 96^2


def _annotations(path):
    """Two images, one instance each with 4 labelled keypoints (pixel
    indices), one crowd region without keypoints, and a category without
    keypoints."""
    anns = []
    for i, (x, y) in enumerate(((20, 30), (50, 10)), start=1):
        points = [x + 10, y, 2, x, y + 15, 2, x + 10, y + 30, 1, x + 20, y + 15, 2]
        anns.append({"id": i, "image_id": i, "category_id": 1, "iscrowd": 0,
                     "bbox": [x, y, 20, 30], "area": _AREA,
                     "segmentation": [[x, y, x + 20, y, x + 20, y + 30, x, y + 30]],
                     "keypoints": points, "num_keypoints": 4})
    anns.append({"id": 3, "image_id": 2, "category_id": 1, "iscrowd": 1,
                 "bbox": [0, 60, 10, 10], "area": 100.0,
                 "segmentation": [[0, 60, 10, 60, 10, 70, 0, 70]]})
    anns.append({"id": 4, "image_id": 1, "category_id": 2, "iscrowd": 0,
                 "bbox": [60, 60, 10, 10], "area": 100.0,
                 "segmentation": [[60, 60, 70, 60, 70, 70, 60, 70]]})
    dataset = {"images": [{"id": i, "width": 100, "height": 100, "file_name": f"{i}.jpg"}
                          for i in (1, 2)],
               "categories": [{"id": 1, "name": "thing", "keypoints": _NAMES,
                               "skeleton": [[1, 2]]},
                              {"id": 2, "name": "other"}],
               "annotations": anns}
    with open(path, "w") as f:
        json.dump(dataset, f)
    return anns[:2]


def _detections(gt, offsets):
    """The model's output for `gt`'s two instances: boxes from their bboxes,
    keypoints (y, x, score) at the gt's continuous points (index + 0.5)
    moved by `offsets` [(dy, dx)] per image."""
    boxes = np.zeros((2, 3, 4), np.float32)
    points = np.zeros((2, 3, 4, 3), np.float32)
    for b, (ann, (dy, dx)) in enumerate(zip(gt, offsets)):
        x, y, w, h = ann["bbox"]
        boxes[b, 0] = (y, x, y + h, x + w)
        kp = np.array(ann["keypoints"], np.float32).reshape(4, 3)
        points[b, 0] = np.stack([kp[:, 1] + 0.5 + dy, kp[:, 0] + 0.5 + dx,
                                 np.full(4, 0.9)], axis=-1)
    return {"detection_boxes": boxes,
            "detection_scores": np.array([[0.9, 0, 0]] * 2, np.float32),
            "detection_classes": np.array([[1, 0, 0]] * 2, np.int32),
            "detection_keypoints": points,
            "num_detections": np.array([1, 1], np.int32)}


_BATCH = {"image_id": np.array([1, 2], np.int64),
          "image_info": np.array([[100, 100, 100, 100, 1.0]] * 2, np.float32)}


class KeypointEvaluationTest(tf.test.TestCase):

    def setUp(self):
        super().setUp()
        self.path = os.path.join(self.get_temp_dir(), "kp.json")
        self.gt = _annotations(self.path)

    def _evaluate(self, offsets, **kwargs):
        evaluator = coco_eval.CocoEvaluator(
            self.path, {1: 1, 2: 2}, include_masks=False, include_keypoints=True,
            keypoint_oks_sigmas=[_SIGMA] * 4, **kwargs)
        evaluator.update(_detections(self.gt, offsets), _BATCH)
        return evaluator, evaluator.evaluate(("bbox", "keypoints"))

    def test_results_entries(self):
        table = coco_eval.detections_to_table(
            _detections(self.gt, [(0, 0), (1, -2)]), _BATCH["image_id"],
            _BATCH["image_info"], {1: 1}, include_masks=False, include_keypoints=True)
        entries = list(table)
        self.assertLen(entries, 2)
        # COCO's (x, y, score), pixel indices: the gt's own numbers back.
        want = np.array(self.gt[0]["keypoints"], np.float64).reshape(4, 3)
        want[:, 2] = 0.9
        self.assertAllClose(np.reshape(entries[0]["keypoints"], (4, 3)), want)
        self.assertAllClose(entries[1]["keypoints"][:2],
                            [self.gt[1]["keypoints"][0] - 2, self.gt[1]["keypoints"][1] + 1])
        again = ResultsTable.from_entries(entries)
        self.assertAllEqual(again.keypoints, table.keypoints)
        # A batch without detections, then one with.
        none = _detections(self.gt, [(0, 0)] * 2)
        none["num_detections"] = np.array([0, 0], np.int32)
        empty = coco_eval.detections_to_table(none, _BATCH["image_id"], _BATCH["image_info"],
                                              {1: 1}, include_masks=False,
                                              include_keypoints=True)
        self.assertEqual(empty.keypoints.shape, (0, 12))
        self.assertAllEqual(ResultsTable.concat([empty, table]).keypoints, table.keypoints)
        with self.assertRaisesRegex(ValueError, "no 'detection_keypoints'"):
            coco_eval.detections_to_table(
                {k: v for k, v in _detections(self.gt, [(0, 0)] * 2).items()
                 if k != "detection_keypoints"},
                _BATCH["image_id"], _BATCH["image_info"], {1: 1}, include_masks=False,
                include_keypoints=True)

    def test_exact_keypoints_score_one(self):
        _, metrics = self._evaluate([(0, 0), (0, 0)])
        self.assertEqual(sorted(metrics["keypoints"]), sorted(coco_eval.KEYPOINT_STAT_NAMES))
        self.assertAllClose(metrics["keypoints"]["AP"], 1.0)
        self.assertAllClose(metrics["keypoints"]["APm"], 1.0)
        self.assertEqual(metrics["keypoints"]["APl"], -1.0)
        self.assertAllClose(metrics["bbox"]["AP"], 0.5)   # 'other' is never detected

    def test_oks_of_a_known_displacement(self):
        # Every point moved by d: OKS = exp(-d^2 / (2 * area * (2 sigma)^2)).
        oks = 0.72
        d = math.sqrt(-math.log(oks) * 2 * _AREA * (2 * _SIGMA) ** 2)
        # Along x in one image and along y in the other: thresholds .50 to .70
        # are met (5 of 10), .75 and above not.
        evaluator, metrics = self._evaluate([(0, d), (d, 0)])
        self.assertAllClose(metrics["keypoints"]["AP"], 0.5, atol=1e-6)
        self.assertAllClose(metrics["keypoints"]["AP50"], 1.0)
        self.assertAllClose(metrics["keypoints"]["AP75"], 0.0)
        self.assertAllClose(evaluator.per_category["keypoints"], {"thing": 0.5}, atol=1e-6)
        # COCO's person sigmas are the default only for 17 keypoints.
        evaluator = coco_eval.CocoEvaluator(self.path, {1: 1}, include_masks=False,
                                            include_keypoints=True)
        evaluator.update(_detections(self.gt, [(0, 0), (0, 0)]), _BATCH)
        with self.assertRaisesRegex(ValueError, "4 keypoints; set their OKS sigmas"):
            evaluator.evaluate(("keypoints",))

    def test_written_results_score_the_same(self):
        evaluator, metrics = self._evaluate([(0, 1.0), (2.0, 0)])
        path = os.path.join(self.get_temp_dir(), "results.json")
        evaluator.write_results(path)
        again = coco_eval.CocoEvaluator(self.path, {}, include_masks=False,
                                        keypoint_oks_sigmas=[_SIGMA] * 4)
        with open(path) as f:
            again.add_results(json.load(f))
        self.assertAllClose(again.evaluate(("keypoints",))["keypoints"],
                            metrics["keypoints"])


class ProgramsTest(tf.test.TestCase):

    def test_test_time_augmentation_refuses_a_keypoint_model(self):
        # Its merged detections would silently lose the keypoints.
        from mrcnn.evaluation import runner
        model = types.SimpleNamespace(has_keypoints=True)
        with self.assertRaisesRegex(ValueError, "test-time augmentation of a keypoint model"):
            runner._inference_fn(model, object(), 800)

    def test_trainer_checks_the_keypoint_count(self):
        from mrcnn.training import trainer
        model = types.SimpleNamespace(num_classes=3, num_keypoints=4)
        trainer.check_num_classes(model, types.SimpleNamespace(num_classes=3, num_keypoints=4))
        with self.assertRaisesRegex(ValueError, "4 keypoints but d.json names 17: set "
                                    "NUM_KEYPOINTS = 17"):
            trainer.check_num_classes(model, types.SimpleNamespace(
                num_classes=3, num_keypoints=17, annotation_file="d.json"))
        with self.assertRaisesRegex(ValueError, "names none .*with_keypoints = True"):
            trainer.check_num_classes(model, types.SimpleNamespace(
                num_classes=3, num_keypoints=0, annotation_file="d.json"))
