"""mrcnn.evaluation.cocoeval: COCOeval's numbers from the vectorized matching.

The reference is pycocotools' COCOeval itself, on random files built to hit
its rules: crowd gt (matched many times, IoU over the detection's area),
gt areas exactly on the range bounds, score ties within an image and across
images, more than 100 detections of one category in an image, detections
of categories without gt, images without gt, polygon gt masks, a gt of
annotation id 0, an evaluated subset of the images. Hand cases pin the
greedy matching's preferences one at a time.
"""

import contextlib
import json
import io

import numpy as np
import pytest
from pycocotools import mask as mask_util
from pycocotools.cocoeval import COCOeval

from mrcnn.evaluation import coco as coco_eval
from mrcnn.evaluation import cocoeval
from mrcnn.evaluation.results import ResultsTable
# The same COCO loading and per-IoU-type results (for segm without 'bbox',
# so that loadRes takes the area from the mask, as cocoeval does).
from tests.evaluation.test_lvis import _for_type, _load, _polygon_of_box


def _random_files(seed, num_images=24, num_categories=6):
    """A COCO gt dataset and results list exercising COCOeval's rules."""
    rng = np.random.default_rng(seed)
    height, width = 120, 160
    images, annotations, results = [], [], []
    categories = [{"id": 3 * c + 1, "name": f"c{c}"} for c in range(num_categories)]
    category_ids = [c["id"] for c in categories]
    ann_id = 0          # the first gt has id 0: COCOeval reads its matches as none
    for image_id in range(1, num_images + 1):
        images.append({"id": image_id, "height": height, "width": width,
                       "file_name": f"{image_id}.jpg"})
        boxes = []
        for _ in range(int(rng.integers(0, 9)) if image_id % 7 else 0):
            category_id = int(rng.choice(category_ids))
            w, h = rng.uniform(2, 90), rng.uniform(2, 70)
            x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
            area = float(rng.choice([32.0 ** 2, 96.0 ** 2, w * h, w * h, w * h]))
            crowd = int(rng.random() < 0.12)
            annotations.append({
                "id": ann_id, "image_id": image_id, "category_id": category_id,
                "bbox": [x, y, w, h], "area": area, "iscrowd": crowd,
                "segmentation": [_polygon_of_box(x, y, w, h)]})
            ann_id += 1
            boxes.append((category_id, x, y, w, h))
        many = image_id == 5   # 130 detections of one category in one image
        for _ in range(130 if many else int(rng.integers(0, 30))):
            if boxes and rng.random() < 0.6:
                category_id, x, y, w, h = boxes[int(rng.integers(len(boxes)))]
                x, y = x + rng.normal(0, 3), y + rng.normal(0, 3)
                w, h = w * rng.uniform(0.7, 1.3), h * rng.uniform(0.7, 1.3)
            else:
                category_id = int(rng.choice(category_ids))
                w, h = rng.uniform(2, 100), rng.uniform(2, 80)
                x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
            if many:
                category_id = category_ids[0]
            x, y = max(float(x), 0.0), max(float(y), 0.0)
            w, h = max(min(float(w), width - x), 1.0), max(min(float(h), height - y), 1.0)
            rle = mask_util.frPyObjects([_polygon_of_box(x, y, w, h)], height, width)[0]
            rle["counts"] = rle["counts"].decode("ascii")
            results.append({"image_id": image_id, "category_id": int(category_id),
                            "bbox": [x, y, w, h], "segmentation": rle,
                            # Coarse scores: ties within and across images.
                            "score": round(float(rng.uniform(0.05, 1.0)) * 10) / 10})
    dataset = {"images": images, "annotations": annotations, "categories": categories}
    return dataset, results


def _reference(coco_gt, results, iou_type, image_ids):
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(coco_gt, coco_gt.loadRes(_for_type(results, iou_type)), iou_type)
        ev.params.imgIds = sorted(image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_equals_pycocotools(seed, iou_type):
    dataset, results = _random_files(seed)
    coco_gt = _load(dataset)
    image_ids = coco_gt.getImgIds()
    if seed == 3:   # an evaluated subset: the other images' results not scored
        image_ids = image_ids[::2]
    ev = _reference(coco_gt, results, iou_type, image_ids)
    stats, precision = cocoeval.coco_evaluate(coco_gt, _for_type(results, iou_type),
                                              iou_type, image_ids)
    assert list(stats) == list(cocoeval.STAT_NAMES)
    np.testing.assert_allclose(list(stats.values()), ev.stats, rtol=0, atol=1e-12)
    np.testing.assert_allclose(precision, ev.eval["precision"], rtol=0, atol=1e-12)
    # The evaluator's columns of the same entries: the same numbers exactly.
    table = ResultsTable.from_entries(results, coco_gt.annToRLE if iou_type == "segm" else None)
    again, again_precision = cocoeval.coco_evaluate(coco_gt, table, iou_type, image_ids)
    assert again == stats and np.array_equal(again_precision, precision)
    # The data must reach what it is meant to: some AP between 0 and 1,
    # crowds, an id-0 gt, and a pair beyond 100 detections.
    assert 0.05 < stats["AP"] < 0.95
    assert any(a["iscrowd"] for a in dataset["annotations"])
    assert dataset["annotations"][0]["id"] == 0
    assert sum(r["image_id"] == 5 for r in results) == 130


def test_no_results_and_no_gt():
    dataset, _ = _random_files(0)
    coco_gt = _load(dataset)
    stats, precision = cocoeval.coco_evaluate(coco_gt, [], "bbox", coco_gt.getImgIds())
    ev = _reference(coco_gt, [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1],
                               "score": 0.0}], "bbox", coco_gt.getImgIds())
    assert stats["AP"] == 0.0 and stats["AR100"] == 0.0
    assert np.array_equal(precision > -1, ev.eval["precision"] > -1)
    # Images without gt only: every metric undefined.
    stats, _ = cocoeval.coco_evaluate(coco_gt, [], "bbox", [7, 14])
    assert set(stats.values()) == {-1.0}


def _match(ious, ignore, crowd=None, threshold=0.5):
    ious = np.asarray(ious, np.float64)
    ignore = np.asarray(ignore, bool)[None]
    crowd = np.zeros(ious.shape[1], bool) if crowd is None else np.asarray(crowd, bool)
    return cocoeval.match_greedy([(ious, ignore, crowd)], [threshold])[0][0, 0].tolist()


def test_greedy_matching_rules():
    # In score order; the second detection cannot take the first's gt.
    assert _match([[0.9, 0.6], [0.8, 0.1]], [False, False]) == [0, -1]
    # Highest IoU wins; on equal IoU the later gt.
    assert _match([[0.6, 0.7, 0.7]], [False] * 3) == [2]
    # A non-ignored gt at a lower IoU before an ignored one at a higher.
    assert _match([[0.55, 0.95]], [False, True]) == [0]
    # Only ignored gt qualify: the best of them.
    assert _match([[0.3, 0.6, 0.8]], [False, True, True]) == [2]
    # A crowd gt takes any number of detections.
    assert _match([[0.7], [0.6], [0.9]], [True], crowd=[True]) == [0, 0, 0]
    # IoU exactly at the threshold qualifies; 1 - 1e-10 bounds a threshold of 1.
    assert _match([[0.5, 0.4999999]], [False, False]) == [0]
    assert _match([[1 - 1e-11]], [False], threshold=1.0) == [0]
    # No gt or no detections.
    assert cocoeval.match_greedy([(np.zeros((2, 0)), np.zeros((4, 0), bool),
                                   np.zeros(0, bool))], [0.5, 0.7])[0].shape == (4, 2, 2)


def test_missing_area_is_named():
    dataset, results = _random_files(1)
    del dataset["annotations"][3]["area"]
    with pytest.raises(ValueError, match=r"annotation 3 of image \d+ has no 'area'"):
        cocoeval.coco_evaluate(_load(dataset), results, "bbox", [1, 2, 3, 4, 5, 6])


def test_evaluator_engines_agree():
    """CocoEvaluator: the default engine and pycocotools give the same
    metrics and per-category AP; 'pycocotools' as an evaluator kind too."""
    from mrcnn.evaluation import lvis
    dataset, results = _random_files(2)
    coco_gt = _load(dataset)
    got = {}
    for engine in coco_eval.ENGINES:
        evaluator = coco_eval.CocoEvaluator(coco_gt, {}, engine=engine)
        evaluator.add_results(results)
        got[engine] = evaluator.evaluate(), evaluator.per_category
    (metrics, per_category), (want, want_per_category) = got["mrcnn"], got["pycocotools"]
    for iou_type in ("bbox", "segm"):
        np.testing.assert_allclose(list(metrics[iou_type].values()),
                                   list(want[iou_type].values()), atol=1e-12)
        np.testing.assert_allclose(list(per_category[iou_type].values()),
                                   list(want_per_category[iou_type].values()), atol=1e-12)
    assert lvis.build_evaluator(coco_gt, {}, kind="pycocotools").engine == "pycocotools"
    assert lvis.build_evaluator(coco_gt, {}, kind="coco").engine == "mrcnn"
    with pytest.raises(ValueError, match="engine"):
        coco_eval.CocoEvaluator(coco_gt, {}, engine="fast")


@pytest.mark.parametrize("segmentation", [[[1.0, 2.0, 3.0]], {"size": [10, 10], "counts": 5},
                                          "not a mask"])
def test_bad_segmentation_of_a_results_file_is_named(tmp_path, segmentation):
    """bin/eval --results: an entry whose segmentation is neither polygons
    nor an RLE stops the scoring with the file, the entry and its image."""
    import types

    from mrcnn.evaluation import runner
    dataset, results = _random_files(0)
    gt_path = tmp_path / "gt.json"
    gt_path.write_text(json.dumps(dataset))
    results = [dict(r, segmentation=r.get("segmentation", [[0, 0, 4, 0, 4, 4]]))
               for r in results]
    results[5]["segmentation"] = segmentation
    results_path = tmp_path / "theirs.json"
    results_path.write_text(json.dumps(results))
    inputs = types.SimpleNamespace(annotation_file=str(gt_path))
    with pytest.raises(ValueError, match=rf"theirs.json: results entry #5 \(image_id "
                                         rf"{results[5]['image_id']}\): its segmentation"):
        runner.evaluate_results(str(results_path), inputs, evaluator="coco")


def test_results_file_read_in_parts_scores_as_one(tmp_path, monkeypatch):
    """bin/eval --results adds a file's entries in parts: the same metrics,
    and an error names the entry by its place in the file; a file where one
    entry has no segmentation is scored for boxes only."""
    import types

    from mrcnn.evaluation import runner
    dataset, results = _random_files(3)
    gt_path = tmp_path / "gt.json"
    gt_path.write_text(json.dumps(dataset))
    inputs = types.SimpleNamespace(annotation_file=str(gt_path))
    results_path = tmp_path / "theirs.json"
    results_path.write_text(json.dumps(results))
    whole = runner.evaluate_results(str(results_path), inputs, evaluator="coco")
    monkeypatch.setattr(runner, "_RESULTS_PART", 7)
    parts = runner.evaluate_results(str(results_path), inputs, evaluator="coco")
    assert len(results) > 30 and set(whole) >= {"bbox", "segm"}
    for iou_type in ("bbox", "segm"):
        assert parts[iou_type] == whole[iou_type], iou_type
    assert parts["per_category"] == whole["per_category"]

    bad = [dict(r) for r in results]
    bad[23]["category_id"] = 999
    results_path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"theirs.json: results entry #23: category_id 999"):
        runner.evaluate_results(str(results_path), inputs, evaluator="coco")
    results_path.write_text(json.dumps(results)[:-40])
    with pytest.raises(ValueError, match=r"theirs.json: not a JSON array"):
        runner.evaluate_results(str(results_path), inputs, evaluator="coco")

    boxes_only = [dict(r) for r in results]
    del boxes_only[20]["segmentation"]
    results_path.write_text(json.dumps(boxes_only))
    scored = runner.evaluate_results(str(results_path), inputs, evaluator="coco")
    assert "segm" not in scored and scored["bbox"] == whole["bbox"]
    evaluator = coco_eval.CocoEvaluator(_load(dataset), {})
    evaluator.add_results(boxes_only[:10])
    evaluator.add_results(boxes_only[10:])
    with pytest.raises(ValueError, match=r"results entry #20 has no segmentation"):
        evaluator.evaluate(("segm",))
    assert evaluator.evaluate(("bbox",))["bbox"] == whole["bbox"]
