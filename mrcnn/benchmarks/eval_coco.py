"""Benchmark cases of COCO evaluation's host work: scoring (`coco_eval`) and
converting model output to results (`eval_host`, `bench_eval_host`, which
also reports the bytes the evaluator holds per result).

`coco_eval` scores `cfg.num_images` COCO-like images of 480 x 640: 1 to 14
gt boxes each (COCO averages 7.3), 1% crowds, over `cfg.num_classes`
categories, and 100 detections per image (COCO's limit): two jittered
copies of each gt, the rest at random. Both entries compute the same 12
numbers (checked before timing); the time is the whole evaluation, from
the results list to the summary (pycocotools' loadRes, evaluate,
accumulate, summarize).
"""

from concurrent import futures
import contextlib
import gc
import io
import os
import tracemalloc

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mrcnn.benchmarks.common import Entry
from mrcnn.evaluation import coco as coco_eval
from mrcnn.evaluation import cocoeval, runner
from mrcnn.evaluation.results import ResultsTable

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


def _coco_like_detections(rng, batch, height=_HEIGHT, width=_WIDTH):
    """(detections, image_ids, image_info) of a batch as the model returns
    them: 100 detections per image, box sides log-uniform in 8..400 pixels,
    28 x 28 masks shaped as blurred discs (real masks' run counts)."""
    shape = (batch, _DETECTIONS)
    y1, x1 = rng.uniform(0, height - 20, shape), rng.uniform(0, width - 20, shape)
    h = np.exp(rng.uniform(np.log(8), np.log(400), shape))
    w = h * np.exp(rng.uniform(-0.7, 0.7, shape))
    boxes = np.stack([y1, x1, np.minimum(y1 + h, height), np.minimum(x1 + w, width)], -1)
    cells = (np.arange(28) + 0.5) / 28 - 0.5
    cy, cx = rng.uniform(-0.15, 0.15, (2,) + shape + (1, 1))
    radius = np.sqrt((cells[:, None] - cy) ** 2 + (cells[None, :] - cx) ** 2)
    masks = 1 / (1 + np.exp((radius - 0.35) * 20 + rng.normal(0, 0.5, radius.shape)))
    detections = {"detection_boxes": boxes.astype(np.float32),
                  "detection_scores": rng.uniform(size=shape).astype(np.float32),
                  "detection_classes": rng.integers(1, 81, shape).astype(np.int32),
                  "num_detections": np.full((batch,), _DETECTIONS, np.int32),
                  "detection_masks": masks.astype(np.float32)}
    info = np.tile(np.float32([[height, width, height, width, 1.0]]), (batch, 1))
    return detections, np.arange(1, batch + 1), info


def bench_eval_host(cfg):
    """`eval_host`: a batch of `cfg.batch` COCO-like images' detections to
    COCO results (boxes, masks pasted and RLE-encoded), as `bin/eval`'s host
    threads do it (each a slice of the batch's images), against one thread."""
    detections, image_ids, info = _coco_like_detections(np.random.default_rng(cfg.seed),
                                                        cfg.batch)
    classes = {c: c for c in range(1, 81)}
    threads = min(8, os.cpu_count() or 1, cfg.batch)
    pool = futures.ThreadPoolExecutor(threads)

    def convert(images):
        return coco_eval.detections_to_table(
            {k: v[images] for k, v in detections.items()}, image_ids[images],
            info[images], classes)

    def threaded():
        parts = [pool.submit(convert, images)
                 for images in runner.image_slices(cfg.batch, threads)]
        return ResultsTable.concat(part.result() for part in parts)

    def one_thread():
        return convert(slice(None))

    if list(threaded()) != list(one_thread()):
        raise AssertionError("eval_host: threads changed the results")
    # What the evaluator holds per result: the table, against the same
    # entries as dicts (as it held them before the table).
    table, table_bytes = _allocated(one_thread)
    _, dict_bytes = _allocated(lambda: list(one_thread()))
    note = (f"{cfg.batch} images of {_HEIGHT}x{_WIDTH} x {_DETECTIONS} detections with "
            f"28x28 masks; held per result: {table_bytes / len(table):.0f} B as a "
            f"ResultsTable, {dict_bytes / len(table):.0f} B as dicts")
    return [
        Entry(f"detections_to_table, {threads} threads", threaded, None, note),
        Entry("detections_to_table, 1 thread", one_thread, None, ""),
    ]


def _allocated(fn):
    """(`fn()`, the bytes its value holds): tracemalloc, after the call."""
    gc.collect()
    tracemalloc.start()
    try:
        value = fn()
        return value, tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
