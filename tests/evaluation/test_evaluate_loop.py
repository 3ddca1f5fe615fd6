"""runner.evaluate's loop: a batch's host work (the evaluator's update)
overlaps the model's inference on the next batch, in batch order; an error
of the host work reaches the caller."""

import threading
import types
from unittest import mock

import numpy as np
import pytest
import tensorflow as tf

from mrcnn.evaluation import runner

NUM_BATCHES = 4


class _Dataset:
    training, canvas_size, annotation_file = False, (64, 64), "instances.json"
    with_masks, min_sizes = False, (64,)
    category_map = types.SimpleNamespace(num_classes=1, names=["thing"],
                                         to_coco=lambda c: c)

    def __call__(self):
        for k in range(NUM_BATCHES):
            yield {"image_id": tf.constant([k, -1]), "images": tf.zeros([2, 8, 8, 3])}


class _Evaluator:
    """Records updates; update k waits (up to 10 s) for the model's call on k + 1."""

    kind = "coco"

    def __init__(self, inferred, fail_at=None):
        self.inferred, self.fail_at, self.updates, self.overlapped = inferred, fail_at, [], []

    def update(self, detections, batch):
        k = int(batch["image_id"][0])
        if k == self.fail_at:
            raise ValueError(f"bad detections in batch {k}")
        if k + 1 < NUM_BATCHES:
            self.overlapped.append(self.inferred[k + 1].wait(10.0))
        self.updates.append((k, int(detections["num_detections"][0]),
                             threading.current_thread().name))

    def evaluate(self, iou_types):
        return {"bbox": {"AP": 0.5}}

    per_category = {"bbox": {"thing": 0.5}}

    def write_results(self, path):
        pass


def _evaluate(tmp_path, fail_at=None):
    inferred = [threading.Event() for _ in range(NUM_BATCHES)]
    evaluator = _Evaluator(inferred, fail_at)

    def infer(batch):
        k = int(batch["image_id"][0])
        inferred[k].set()
        return {"num_detections": tf.constant([10 + k, 0])}

    coco = types.SimpleNamespace(format_metrics=str, format_per_category=str)
    lvis = types.SimpleNamespace(build_evaluator=lambda *a, **k: evaluator)
    with mock.patch.object(runner, "restore_model", return_value=(object(), 3, "ckpt-3")), \
            mock.patch.object(runner.trainer, "check_num_classes"), \
            mock.patch.object(runner, "_inference_fn", return_value=infer), \
            mock.patch.object(runner, "coco_eval", coco), \
            mock.patch.object(runner, "lvis_eval", lvis):
        report = runner.evaluate(str(tmp_path), model_fn=None, dataset_fn=_Dataset(),
                                 num_pictures=0)
    return evaluator, report


def test_host_work_overlaps_the_next_batch_in_order(tmp_path):
    evaluator, report = _evaluate(tmp_path)
    assert [(k, n) for k, n, _ in evaluator.updates] == [(k, 10 + k) for k in range(4)]
    # Sequentially, update k would wait 10 s in vain for the model's call on k + 1.
    assert evaluator.overlapped == [True] * (NUM_BATCHES - 1)
    assert {name for _, _, name in evaluator.updates} != {threading.current_thread().name}
    assert report["num_images"] == NUM_BATCHES and report["step"] == 3
    assert report["evaluator"] == "coco"
    assert np.isclose(report["bbox"]["AP"], 0.5)


def test_many_categories_go_to_the_metrics_file_only(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(_Evaluator, "per_category",
                        {"bbox": {f"c{k}": 0.5 for k in range(runner.PER_CATEGORY_LIMIT + 1)}})
    _, report = _evaluate(tmp_path)
    out = capsys.readouterr().out
    assert f"AP of each of the {runner.PER_CATEGORY_LIMIT + 1} categories" in out
    assert "metrics-3.json" in out and len(report["per_category"]["bbox"]) == 101


def test_an_error_of_the_host_work_reaches_the_caller(tmp_path):
    with pytest.raises(ValueError, match="bad detections in batch 1"):
        _evaluate(tmp_path, fail_at=1)
