"""LVIS federated evaluation (mrcnn/evaluation/lvis.py).

Three references:
- pycocotools' COCOeval, on files where federated and COCO evaluation must
  agree (every image lists every category as present or negative, nothing
  is not-exhaustive, no image over 300 detections);
- hand-built cases for what only LVIS does (negative, unlisted and
  not-exhaustive categories, the per-image cap, frequency groups);
- the official `lvis` package, run in the Python that `MRCNN_LVIS_PYTHON`
  names (it needs an old NumPy or the `np.float` alias; skipped otherwise),
  on random federated files with ignored gt, ties and more than 300
  detections per image.
"""

import contextlib
import io
import json
import os
import subprocess
import tempfile
import textwrap

import numpy as np
import pytest
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mrcnn.evaluation import coco as coco_eval
from mrcnn.evaluation import lvis
from mrcnn.evaluation.results import ResultsTable
from tests.evaluation import fixtures


def _load(dataset):
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _polygon_of_box(x, y, w, h):
    return [x, y, x + w, y, x + w, y + h, x, y + h]


def _random_case(seed, num_images=6, num_categories=5, federated=True,
                 max_results=40, ignore=False):
    """A random LVIS-style gt dict and a results list.

    Gt are rectangles and triangles; detections are gt jittered (some
    exact), boxes at random places, of present, negative and unlisted
    categories, with scores rounded to 0.05 so that ties happen. With
    `federated=False` every category absent from an image is negative and
    none is not exhaustive, so COCO and LVIS evaluation agree.
    """
    rng = np.random.default_rng(seed)
    categories = [{"id": 2 * c + 3, "name": f"cat{c}",
                   "frequency": lvis.FREQUENCIES[c % 3]}
                  for c in range(num_categories)]
    category_ids = [c["id"] for c in categories]
    images, annotations, results = [], [], []
    for i in range(num_images):
        image_id = 10 + 3 * i
        height, width = int(rng.integers(60, 200)), int(rng.integers(60, 200))
        present = set(rng.choice(category_ids, int(rng.integers(0, 4)), replace=False).tolist())
        absent = [c for c in category_ids if c not in present]
        if federated:
            negative = [c for c in absent if rng.random() < 0.5]
            not_exhaustive = [c for c in present if rng.random() < 0.4]
        else:
            negative, not_exhaustive = absent, []
        images.append({"id": image_id, "height": height, "width": width,
                       "file_name": f"{image_id}.jpg",
                       "neg_category_ids": negative,
                       "not_exhaustive_category_ids": not_exhaustive})
        boxes = []
        for category_id in sorted(present):
            for _ in range(int(rng.integers(1, 4))):
                if boxes and boxes[-1][0] == category_id and rng.random() < 0.5:
                    # next to the previous one: detections overlap both
                    _, x, y, w, h = boxes[-1]
                    x = float(np.clip(x + rng.normal(0, 3), 0, width - w))
                    y = float(np.clip(y + rng.normal(0, 3), 0, height - h))
                else:
                    w = float(rng.uniform(4, width * 0.8))
                    h = float(rng.uniform(4, height * 0.8))
                    x = float(rng.uniform(0, width - w))
                    y = float(rng.uniform(0, height - h))
                polygon = _polygon_of_box(x, y, w, h)
                if rng.random() < 0.3:   # a triangle: mask and box IoU differ
                    polygon = [x, y, x + w, y, x, y + h]
                rle = mask_util.merge(mask_util.frPyObjects([polygon], height, width))
                ann = {"id": len(annotations) + 1, "image_id": image_id,
                       "category_id": category_id, "segmentation": [polygon],
                       "bbox": [x, y, w, h], "area": float(mask_util.area(rle)),
                       "iscrowd": 0}
                if ignore and rng.random() < 0.15:
                    ann["ignore"] = 1
                annotations.append(ann)
                boxes.append((category_id, x, y, w, h))
        for _ in range(int(rng.integers(0, max_results + 1))):
            if boxes and rng.random() < 0.6:
                category_id, x, y, w, h = boxes[int(rng.integers(len(boxes)))]
                if rng.random() < 0.7:
                    x, y = x + rng.normal(0, 2), y + rng.normal(0, 2)
                    w, h = w * rng.uniform(0.8, 1.2), h * rng.uniform(0.8, 1.2)
                if rng.random() < 0.2:
                    category_id = int(rng.choice(category_ids))
            else:
                category_id = int(rng.choice(category_ids))
                w, h = rng.uniform(3, width / 2), rng.uniform(3, height / 2)
                x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
            x, y = max(float(x), 0.0), max(float(y), 0.0)
            w, h = min(float(w), width - x), min(float(h), height - y)
            rle = mask_util.frPyObjects([_polygon_of_box(x, y, w, h)], height, width)[0]
            rle["counts"] = rle["counts"].decode("ascii")
            results.append({"image_id": image_id, "category_id": int(category_id),
                            "bbox": [x, y, w, h], "segmentation": rle,
                            "score": round(float(rng.uniform(0.05, 1.0)) * 20) / 20})
    dataset = {"images": images, "annotations": annotations, "categories": categories}
    return dataset, results


def _for_type(results, iou_type):
    drop = "bbox" if iou_type == "segm" else "segmentation"
    return [{k: v for k, v in r.items() if k != drop} for r in results]


def _cocoeval(coco_gt, results, iou_type, max_dets=lvis.MAX_DETECTIONS):
    """COCOeval's stats and per-category AP at (1, 10, max_dets) detections."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(_for_type(results, iou_type))
        ev = COCOeval(coco_gt, coco_dt, iouType=iou_type)
        ev.params.maxDets = [1, 10, max_dets]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    per_category = {}
    for k, c in enumerate(ev.params.catIds):
        p = ev.eval["precision"][:, :, k, 0, -1]
        per_category[c] = float(p[p > -1].mean()) if (p > -1).any() else -1.0
    stats = ev.stats.copy()
    # summarize() reads its AP at 100 detections, not at maxDets[-1].
    p = ev.eval["precision"][..., 0, -1]
    stats[0] = p[p > -1].mean() if (p > -1).any() else -1.0
    return stats, per_category


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_cocoeval_when_every_category_is_listed(iou_type, seed):
    dataset, results = _random_case(seed, federated=False)
    coco_gt = _load(dataset)
    image_ids = [im["id"] for im in dataset["images"]]
    stats, per_category = lvis.federated_evaluate(coco_gt, _for_type(results, iou_type),
                                                  iou_type, image_ids)
    expected, expected_per_category = _cocoeval(coco_gt, results, iou_type)
    names = ("AP", "AP50", "AP75", "APs", "APm", "APl")
    got = [stats[n] for n in names] + [stats[n] for n in ("AR@300", "ARs@300",
                                                          "ARm@300", "ARl@300")]
    np.testing.assert_allclose(got, list(expected[:6]) + list(expected[8:]), atol=1e-12)
    assert per_category == pytest.approx(expected_per_category, abs=1e-12)
    assert stats["AP"] > 0.05   # the case is not degenerate


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_results_table_scores_as_its_dicts(iou_type, seed):
    # Federated cases (negative, unlisted and not exhaustive categories,
    # tied scores, a cap of 10 per image), the entries as the dicts of a
    # results file and as the columns the evaluator holds.
    dataset, results = _random_case(seed)
    coco_gt = _load(dataset)
    image_ids = [im["id"] for im in dataset["images"]][1:]
    to_rle = coco_gt.annToRLE if iou_type == "segm" else None
    table = ResultsTable.from_entries(results, to_rle)
    assert len(table) == len(results) > 50
    expected = lvis.federated_evaluate(coco_gt, _for_type(results, iou_type), iou_type,
                                       image_ids, max_dets=10)
    assert lvis.federated_evaluate(coco_gt, table, iou_type, image_ids,
                                   max_dets=10) == expected
    assert 0.05 < expected[0]["AP"] < 0.95


def test_hundreds_of_masks_of_one_category_in_one_image():
    # More than 255 detections of a category in an image (pycocotools'
    # area() of a list fails there), scored as COCOeval scores them.
    image = dict(_image(1), height=200, width=200)
    gt = [dict(_gt(k + 1, 1, 3, box), iscrowd=0)
          for k, box in enumerate([(10.0, 10.0, 40.0, 40.0), (100.0, 50.0, 60.0, 90.0),
                                   (5.0, 150.0, 20.0, 20.0)])]
    categories = [dict(c, id=3) for c in _CATEGORIES[:1]]
    coco_gt = _load({"images": [image], "annotations": gt, "categories": categories})
    height, width = 200, 200
    rng = np.random.default_rng(5)
    results = []
    for k in range(290):
        if k % 10 == 0:   # near a gt
            x, y, w, h = np.array(gt[k % 3]["bbox"]) + rng.normal(0, 2, 4)
        else:
            w, h = rng.uniform(3, width / 2), rng.uniform(3, height / 2)
            x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
        rle = mask_util.frPyObjects([_polygon_of_box(x, y, w, h)], height, width)[0]
        rle["counts"] = rle["counts"].decode("ascii")
        results.append({"image_id": image["id"], "category_id": 3, "segmentation": rle,
                        "bbox": [x, y, w, h], "score": float(rng.uniform())})
    stats, _ = lvis.federated_evaluate(coco_gt, _for_type(results, "segm"), "segm",
                                       [image["id"]])
    expected, _ = _cocoeval(coco_gt, results, "segm")
    np.testing.assert_allclose([stats["AP"], stats["APs"], stats["AR@300"]],
                               [expected[0], expected[3], expected[8]], atol=1e-12)
    assert stats["AP"] > 0.1


def _image(image_id, neg=(), not_exhaustive=()):
    return {"id": image_id, "height": 100, "width": 100, "file_name": f"{image_id}.jpg",
            "neg_category_ids": list(neg), "not_exhaustive_category_ids": list(not_exhaustive)}


def _gt(ann_id, image_id, category_id, box):
    return {"id": ann_id, "image_id": image_id, "category_id": category_id,
            "bbox": list(box), "area": float(box[2] * box[3]),
            "segmentation": [_polygon_of_box(*box)]}


def _det(image_id, category_id, box, score):
    return {"image_id": image_id, "category_id": category_id, "bbox": list(box),
            "score": score}


_CATEGORIES = [{"id": 1, "name": "a", "frequency": "r"},
               {"id": 2, "name": "b", "frequency": "c"},
               {"id": 3, "name": "c", "frequency": "f"}]
_BOX = (10.0, 10.0, 40.0, 40.0)
_ELSEWHERE = (60.0, 60.0, 30.0, 30.0)


def _ap(images, annotations, results, category_id=1, **kwargs):
    coco_gt = _load({"images": images, "annotations": annotations,
                     "categories": _CATEGORIES})
    image_ids = [im["id"] for im in images]
    stats, per_category = lvis.federated_evaluate(coco_gt, results, "bbox", image_ids, **kwargs)
    # The evaluator's own form of the same entries scores them the same.
    assert lvis.federated_evaluate(coco_gt, ResultsTable.from_entries(results), "bbox",
                                   image_ids, **kwargs) == (stats, per_category)
    return per_category[category_id], stats


def test_detections_of_negative_categories_are_false_positives():
    gt = [_gt(1, 1, 1, _BOX)]
    results = [_det(1, 1, _BOX, 0.5), _det(2, 1, _BOX, 0.9)]
    listed, _ = _ap([_image(1), _image(2, neg=[1])], gt, results)
    unlisted, _ = _ap([_image(1), _image(2)], gt, results)
    # Ranked: FP (0.9) then TP (0.5): precision 1/2 at every recall.
    assert listed == pytest.approx(0.5, abs=1e-9)
    assert unlisted == pytest.approx(1.0, abs=1e-9)


def test_unmatched_detections_of_not_exhaustive_categories_are_ignored():
    gt = [_gt(1, 1, 1, _BOX)]
    results = [_det(1, 1, _BOX, 0.5), _det(1, 1, _ELSEWHERE, 0.9)]
    exhaustive, _ = _ap([_image(1)], gt, results)
    partial, _ = _ap([_image(1, not_exhaustive=[1])], gt, results)
    assert exhaustive == pytest.approx(0.5, abs=1e-9)
    assert partial == pytest.approx(1.0, abs=1e-9)
    # A not-exhaustive category still needs its gt found.
    missed, _ = _ap([_image(1, not_exhaustive=[1])], gt, results[1:])
    assert missed == 0.0


def test_the_cap_is_per_image_over_all_categories():
    # 300 better-scored detections of a negative category push the only
    # true positive out of the image's 300.
    gt = [_gt(1, 1, 1, _BOX)]
    results = [_det(1, 2, _ELSEWHERE, 0.9) for _ in range(300)] + [_det(1, 1, _BOX, 0.1)]
    images = [_image(1, neg=[2])]
    capped, stats = _ap(images, gt, results)
    assert capped == 0.0
    assert stats["AR@300"] == 0.0
    kept, _ = _ap(images, gt, results, max_dets=301)
    assert kept == pytest.approx(1.0, abs=1e-9)
    assert "AR@301" in lvis.federated_evaluate(
        _load({"images": images, "annotations": gt, "categories": _CATEGORIES}),
        results, "bbox", [1], max_dets=301)[0]


def test_ties_at_the_cap_keep_the_earlier_results():
    gt = [_gt(1, 1, 1, _BOX)]
    images = [_image(1, neg=[2])]
    junk = [_det(1, 2, _ELSEWHERE, 0.5) for _ in range(2)]
    first, _ = _ap(images, gt, [_det(1, 1, _BOX, 0.5)] + junk, max_dets=2)
    last, _ = _ap(images, gt, junk + [_det(1, 1, _BOX, 0.5)], max_dets=2)
    assert (first, last) == (pytest.approx(1.0, abs=1e-9), 0.0)


def test_frequency_groups_average_their_categories():
    images = [_image(1), _image(2, neg=[3])]
    gt = [_gt(1, 1, 1, _BOX), _gt(2, 1, 2, _ELSEWHERE), _gt(3, 2, 2, _BOX)]
    results = [_det(1, 1, _BOX, 0.9),                     # rare: AP 1
               _det(1, 2, _ELSEWHERE, 0.4), _det(2, 2, _BOX, 0.8),
               _det(2, 2, _ELSEWHERE, 0.9),               # common: 2 of 3
               _det(2, 3, _BOX, 0.7)]                     # frequent: no gt
    coco_gt = _load({"images": images, "annotations": gt, "categories": _CATEGORIES})
    stats, per_category = lvis.federated_evaluate(coco_gt, results, "bbox", [1, 2])
    assert stats["APr"] == pytest.approx(per_category[1]) == pytest.approx(1.0)
    assert stats["APc"] == pytest.approx(per_category[2])
    assert 0.0 < per_category[2] < 1.0
    assert stats["APf"] == per_category[3] == -1.0
    assert stats["AP"] == pytest.approx((per_category[1] + per_category[2]) / 2)


def test_a_detection_prefers_gt_that_is_not_ignored():
    # The detection is the ignored gt exactly (IoU 1) and overlaps the
    # other one at IoU 1520 / 1680 = 0.905: it is a true positive of the
    # latter up to IoU threshold 0.9, and matches the ignored one (neither
    # TP nor FP) at 0.95, where the other gt is missed.
    gt = [_gt(1, 1, 1, _BOX), dict(_gt(2, 1, 1, (12.0, 10.0, 40.0, 40.0)), ignore=1)]
    ap, _ = _ap([_image(1)], gt, [_det(1, 1, (12.0, 10.0, 40.0, 40.0), 0.9)])
    assert ap == pytest.approx(0.9, abs=1e-9)


def test_ignored_gt_and_areas_out_of_range():
    gt = [_gt(1, 1, 1, _BOX), dict(_gt(2, 1, 1, _ELSEWHERE), ignore=1)]
    results = [_det(1, 1, _ELSEWHERE, 0.9), _det(1, 1, _BOX, 0.5)]
    ap, stats = _ap([_image(1)], gt, results)
    assert ap == pytest.approx(1.0, abs=1e-9)   # the match on the ignored gt is neither
    assert stats["APs"] == -1.0                 # no small gt at all
    assert stats["APl"] == -1.0                 # 40 x 40 is medium


def test_empty_results_and_images_without_gt():
    coco_gt = _load({"images": [_image(1), _image(2, neg=[1])],
                     "annotations": [_gt(1, 1, 1, _BOX)], "categories": _CATEGORIES})
    stats, per_category = lvis.federated_evaluate(coco_gt, [], "segm", [1, 2])
    assert stats["AP"] == 0.0 and stats["AR@300"] == 0.0
    assert per_category == {1: 0.0, 2: -1.0, 3: -1.0}
    stats, _ = lvis.federated_evaluate(coco_gt, [], "bbox", [2])
    assert set(stats.values()) == {-1.0}
    with pytest.raises(ValueError, match="iou_type"):
        lvis.federated_evaluate(coco_gt, [], "keypoints", [1])


def _lvis_file(tmp_path, dataset):
    data = dict(dataset)
    data["images"] = [{k: v for k, v in im.items() if k != "file_name"}
                      | {"coco_url": f"http://images.cocodataset.org/val2017/{im['id']:012d}.jpg"}
                      for im in dataset["images"]]
    path = tmp_path / "lvis_val.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_evaluator_on_model_output(tmp_path):
    """LvisEvaluator takes the model's batches, as CocoEvaluator does, and
    build_evaluator picks it for an LVIS file."""
    coco_dataset = fixtures.make_gt_dataset()
    images = [dict(im, neg_category_ids=[], not_exhaustive_category_ids=[])
              for im in coco_dataset["images"]]
    categories = [dict(c, frequency="f") for c in coco_dataset["categories"]]
    path = _lvis_file(tmp_path, dict(coco_dataset, images=images, categories=categories))
    evaluator = lvis.build_evaluator(path, fixtures.CLASS_TO_CATEGORY)
    assert isinstance(evaluator, lvis.LvisEvaluator)
    assert type(lvis.build_evaluator(path, fixtures.CLASS_TO_CATEGORY, kind="coco")) \
        is coco_eval.CocoEvaluator
    coco_path = tmp_path / "coco.json"
    coco_path.write_text(json.dumps(coco_dataset))
    assert type(lvis.build_evaluator(str(coco_path), fixtures.CLASS_TO_CATEGORY)) \
        is coco_eval.CocoEvaluator
    with pytest.raises(ValueError, match="kind"):
        lvis.build_evaluator(path, fixtures.CLASS_TO_CATEGORY, kind="voc")
    with pytest.raises(ValueError, match=r"images \[11, 25, 37, 40\].*neg_category_ids"):
        lvis.build_evaluator(str(coco_path), fixtures.CLASS_TO_CATEGORY, kind="lvis")
    no_area = json.loads(open(path).read())
    del no_area["annotations"][1]["area"]
    no_area_path = tmp_path / "no_area.json"
    no_area_path.write_text(json.dumps(no_area))
    with pytest.raises(ValueError, match=r"annotations \[2\] \(1 in all\) have no 'area'"):
        lvis.build_evaluator(str(no_area_path), fixtures.CLASS_TO_CATEGORY)

    fixtures.install_paste_masks_stand_in()
    detections, batch = fixtures.perfect_detections(evaluator.coco_gt, [11, 25, -1, 37])
    evaluator.update(detections, batch)
    metrics = evaluator.evaluate()
    for iou_type in ("bbox", "segm"):
        stats = metrics[iou_type]
        assert tuple(stats) == lvis.stat_names()
        for name in ("AP", "AP50", "AP75", "APs", "APm", "APl", "APf", "AR@300"):
            assert stats[name] == pytest.approx(1.0, abs=1e-6), (iou_type, name)
        assert stats["APr"] == stats["APc"] == -1.0
        assert evaluator.per_category[iou_type]["square"] == pytest.approx(1.0, abs=1e-6)
    # The same entries added as a results file's are scored the same.
    again = lvis.build_evaluator(path, {})
    again.add_results(evaluator.results, image_ids=[11, 25, 37])
    assert again.evaluate() == metrics and again.image_ids == [11, 25, 37]
    for bad, message in (({"image_id": 11, "category_id": 3, "score": 1.0}, "lacks"),
                         ({"image_id": 5, "category_id": 3, "score": 1.0,
                           "bbox": [0, 0, 1, 1]}, "image_id 5"),
                         ({"image_id": 11, "category_id": 4, "score": 1.0,
                           "bbox": [0, 0, 1, 1]}, "category_id 4")):
        with pytest.raises(ValueError, match=message):
            lvis.build_evaluator(path, {}).add_results([bad])
    table = coco_eval.format_metrics(metrics)
    assert "APr" in table.splitlines()[0] and "AR@300" in table.splitlines()[0]
    assert "AR1" not in table


_OFFICIAL = textwrap.dedent("""
    import json, sys
    import numpy as np
    np.float = float   # the lvis package still uses the removed alias
    from lvis import LVIS, LVISEval, LVISResults
    gt_path, results_path, max_dets = sys.argv[1], sys.argv[2], int(sys.argv[3])
    gt = LVIS(gt_path)
    out = {}
    for iou_type in ("bbox", "segm"):
        results = json.load(open(results_path))[iou_type]
        ev = LVISEval(gt, LVISResults(gt, results, max_dets=max_dets), iou_type)
        ev.params.max_dets = max_dets
        ev.run()
        precision = ev.eval["precision"][:, :, :, 0]
        per_category = {}
        for k, c in enumerate(ev.params.cat_ids):
            p = precision[:, :, k]
            per_category[c] = float(p[p > -1].mean()) if (p > -1).any() else -1.0
        out[iou_type] = {"stats": {k: float(v) for k, v in ev.results.items()},
                         "per_category": per_category}
    print(json.dumps(out))
""")


@pytest.mark.skipif(not os.environ.get("MRCNN_LVIS_PYTHON"),
                    reason="MRCNN_LVIS_PYTHON names no Python with the lvis package")
@pytest.mark.parametrize("seed,max_dets", [(0, 300), (1, 300), (2, 300), (3, 12)])
def test_matches_the_official_lvis_package(tmp_path, seed, max_dets):
    dataset, results = _random_case(seed, num_images=8, max_results=400 if seed == 2 else 40,
                                    ignore=True)
    gt_path = tmp_path / "gt.json"
    gt_path.write_text(json.dumps(dataset))
    results_path = tmp_path / "results.json"
    by_type = {t: _for_type(results, t) for t in ("bbox", "segm")}
    results_path.write_text(json.dumps(by_type))
    done = subprocess.run([os.environ["MRCNN_LVIS_PYTHON"], "-c", _OFFICIAL, str(gt_path),
                           str(results_path), str(max_dets)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    official = json.loads(done.stdout.strip().splitlines()[-1])
    coco_gt = _load(dataset)
    for iou_type in ("bbox", "segm"):
        stats, per_category = lvis.federated_evaluate(
            coco_gt, by_type[iou_type], iou_type,
            [im["id"] for im in dataset["images"]], max_dets=max_dets)
        assert stats == pytest.approx(official[iou_type]["stats"], abs=1e-12), iou_type
        assert {str(c): v for c, v in per_category.items()} == pytest.approx(
            official[iou_type]["per_category"], abs=1e-12), iou_type
