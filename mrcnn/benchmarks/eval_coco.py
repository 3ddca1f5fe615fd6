"""Benchmark case: scoring COCO results, ours against pycocotools' COCOeval.

`coco_eval` scores `cfg.num_images` COCO-like images of 480 x 640: 1 to 14
gt boxes each (COCO averages 7.3), 1% crowds, over `cfg.num_classes`
categories, and 100 detections per image (COCO's limit): two jittered
copies of each gt, the rest at random. Both entries compute the same 12
numbers (checked before timing); the time is the whole evaluation, from
the results list to the summary (pycocotools' loadRes, evaluate,
accumulate, summarize).
"""

import contextlib
import io

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mrcnn.benchmarks.common import Entry
from mrcnn.evaluation import cocoeval

_HEIGHT, _WIDTH = 480, 640
_DETECTIONS = 100


def _coco_like(rng, num_images, num_classes):
    """(COCO gt, results list) as the module docstring says."""
    images, annotations, results = [], [], []
    for image_id in range(1, num_images + 1):
        images.append({"id": image_id, "height": _HEIGHT, "width": _WIDTH})
        gts = []
        for _ in range(int(rng.integers(1, 15))):
            w, h = rng.uniform(4, 300, 2)
            x, y = rng.uniform(0, _WIDTH - w), rng.uniform(0, _HEIGHT - h)
            category = int(rng.integers(1, num_classes + 1))
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": category, "bbox": [x, y, w, h],
                                "area": w * h, "iscrowd": int(rng.random() < 0.01)})
            gts.append((x, y, w, h, category))
        for d in range(_DETECTIONS):
            if d < 2 * len(gts):
                x, y, w, h, category = gts[d % len(gts)]
                j = rng.normal(0, 0.1 * max(w, h) ** 0.5, 4)
                box = [x + j[0], y + j[1], max(w + j[2], 1.0), max(h + j[3], 1.0)]
            else:
                w, h = rng.uniform(4, 300, 2)
                box = [rng.uniform(0, _WIDTH - w), rng.uniform(0, _HEIGHT - h), w, h]
                category = int(rng.integers(1, num_classes + 1))
            results.append({"image_id": image_id, "category_id": category,
                            "bbox": [float(v) for v in box], "score": float(rng.random())})
    coco = COCO()
    coco.dataset = {"images": images, "annotations": annotations,
                    "categories": [{"id": c, "name": str(c)}
                                   for c in range(1, num_classes + 1)]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco, results


def bench_coco_eval(cfg):
    coco_gt, results = _coco_like(np.random.default_rng(cfg.seed), cfg.num_images,
                                  cfg.num_classes)
    image_ids = coco_gt.getImgIds()

    def ours():
        return cocoeval.coco_evaluate(coco_gt, results, "bbox", image_ids)[0]

    def pycocotools():
        with contextlib.redirect_stdout(io.StringIO()):
            evaluator = COCOeval(coco_gt, coco_gt.loadRes(results), "bbox")
            evaluator.params.imgIds = image_ids
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        return dict(zip(cocoeval.STAT_NAMES, evaluator.stats))

    got, want = ours(), pycocotools()
    if max(abs(got[k] - want[k]) for k in want) > 1e-12:
        raise AssertionError(f"coco_eval: ours {got} != pycocotools {want}")
    note = (f"{cfg.num_images} images x {_DETECTIONS} detections, "
            f"{cfg.num_classes} categories, bbox")
    return [
        Entry("mrcnn.evaluation.cocoeval.coco_evaluate", ours, None, note),
        Entry("pycocotools COCOeval", pycocotools, None, "loadRes, evaluate, "
              "accumulate, summarize"),
    ]
