"""bin/bench --op=coco_eval: its two entries score the same COCO-like data."""

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
