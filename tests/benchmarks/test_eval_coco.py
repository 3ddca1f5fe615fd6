"""bin/bench --op=coco_eval and --op=eval_host: their entries compute the same."""

import dataclasses

from mrcnn.benchmarks import harness
from mrcnn.benchmarks.common import BenchConfig
from mrcnn.evaluation import cocoeval


def test_entries_agree_and_run():
    cfg = dataclasses.replace(BenchConfig(), num_images=6, num_classes=5)
    ours, pycocotools = harness.build_entries("coco_eval", cfg)   # checks equality
    got, want = ours.fn(), pycocotools.fn()
    assert list(got) == list(cocoeval.STAT_NAMES) == list(want)
    assert 0.0 < got["AP"] < 1.0
    assert "6 images x 100 detections" in ours.note


def test_eval_host_entries_give_the_same_results():
    cfg = dataclasses.replace(BenchConfig(), batch=3)
    threaded, one_thread = harness.build_entries("eval_host", cfg)   # checks equality
    results = list(threaded.fn())
    assert len(results) == 3 * 100 and results == list(one_thread.fn())
    assert {r["image_id"] for r in results} == {1, 2, 3}
    assert all("segmentation" in r for r in results)
    assert "B as a ResultsTable" in threaded.note
