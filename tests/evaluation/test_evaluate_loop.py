"""runner.evaluate's loop: a batch's host work (the evaluator's convert, in
threads, then its add, in batch order) overlaps the model's inference on the
next batch; an error of the host work reaches the caller; several devices
run a batch each."""

import json
import threading
import types
from unittest import mock

import gin
import keras
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
            yield {"image_id": tf.constant([k, -1]), "images": tf.zeros([2, 8, 8, 3]),
                   "image_info": tf.zeros([2, 5])}


class _Evaluator:
    """Records conversions and additions; converting batch k waits (up to
    10 s) for the model's call on k + 1."""

    kind = "coco"

    def __init__(self, inferred, fail_at=None):
        self.inferred, self.fail_at, self.updates, self.overlapped = inferred, fail_at, [], []

    def convert(self, detections, batch):
        k = int(batch["image_id"][0])
        if k == self.fail_at:
            raise ValueError(f"bad detections in batch {k}")
        if k + 1 < NUM_BATCHES and self.fail_at is None:
            self.overlapped.append(self.inferred[k + 1].wait(10.0))
        return k, int(detections["num_detections"][0]), threading.current_thread().name

    def add(self, converted):
        self.updates.append(converted)

    def evaluate(self, iou_types):
        return {"bbox": {"AP": 0.5}}

    per_category = {"bbox": {"thing": 0.5}}

    def write_results(self, path):
        pass


def _evaluate(tmp_path, fail_at=None, evaluator=None, host_threads=1):
    inferred = [threading.Event() for _ in range(NUM_BATCHES)]
    evaluator = evaluator or _Evaluator(inferred, fail_at)

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
                                 num_pictures=0, host_threads=host_threads)
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


def test_reports_go_to_a_run_directory_on_an_object_store(tmp_path):
    # A file:// URL stands in for gs://: the metrics file and TensorBoard
    # events are written through tf.io.gfile.
    from tests.data.fixtures import remote_dir
    run = remote_dir(tmp_path)
    _, report = _evaluate(run)
    with tf.io.gfile.GFile(f"{run}/eval/metrics-3.json") as f:
        assert json.load(f)["bbox"] == report["bbox"] == {"AP": 0.5}
    assert tf.io.gfile.glob(f"{run}/eval/events.out.tfevents.*")


def test_an_error_of_the_host_work_reaches_the_caller(tmp_path):
    with pytest.raises(ValueError, match="bad detections in batch 1"):
        _evaluate(tmp_path, fail_at=1)


def test_threads_convert_slices_of_a_batch_at_once(tmp_path):
    # Each batch's two image slots go to two threads, which must meet.
    class Meeting(_Evaluator):
        def __init__(self):
            self.updates, self.barrier = [], threading.Barrier(2, timeout=10.0)

        def convert(self, detections, batch):
            self.barrier.wait()   # BrokenBarrierError if the slots came one by one
            return batch["image_id"].tolist(), detections["num_detections"].tolist()

    evaluator, report = _evaluate(tmp_path, evaluator=Meeting(), host_threads=2)
    assert evaluator.updates == [(ids, n) for k in range(NUM_BATCHES)
                                 for ids, n in (([k], [10 + k]), ([-1], [0]))]
    assert report["num_images"] == NUM_BATCHES


def _images(n):
    """`fixtures.base_dataset` grown to n images (ids 11, 12, ...), varied colours."""
    from tests.data import fixtures
    dataset = fixtures.base_dataset()
    for k in range(3, n):
        image = dict(dataset["images"][k % 3], id=11 + k, file_name=f"{11 + k:06d}.jpg")
        dataset["images"].append(image)
        dataset["annotations"].append(dict(dataset["annotations"][k % 4], id=200 + k,
                                           image_id=11 + k))
    return dataset


class ToyDetector(keras.Model):
    """Detections from a convolution of the images: per-device variables."""

    def __init__(self):
        super().__init__()
        self.conv = keras.layers.Conv2D(3, 3, kernel_initializer=keras.initializers.Constant(0.1))

    def call(self, batch, training=False):
        del training
        images = tf.cast(batch["images"], tf.float32)
        score = tf.reduce_mean(self.conv(images), [1, 2])  # [B, 3]
        return {"num_detections": tf.cast(batch["image_id"], tf.int32) % 3,
                "detection_scores": score}


class _Recorder(_Evaluator):
    def __init__(self):
        self.updates = []

    def convert(self, detections, batch):
        return batch["image_id"].tolist(), detections


def test_a_kept_model_gets_the_next_checkpoints_weights(tmp_path):
    """evaluate(reuse=...): the second checkpoint is restored into the first
    call's model and run by its traced inference, with the numbers a fresh
    evaluation of it gives."""
    class Toy(ToyDetector):
        def call(self, batch, training=False):
            calls.append(tf.executing_eagerly())
            score = tf.reduce_mean(self.conv(tf.cast(batch["images"], tf.float32)), [1, 2])
            return {"num_detections": tf.ones_like(score[:, 0], tf.int32),
                    "detection_scores": score}

    class Dataset(_Dataset):
        def __call__(self):
            for k in range(NUM_BATCHES):
                yield {"image_id": tf.constant([k, -1]), "images": tf.fill([2, 8, 8, 3], k + 1.0),
                       "image_info": tf.zeros([2, 5])}

    calls = []
    model = Toy()
    model(runner._zero_inference_batch((64, 64)))
    checkpoint = tf.train.Checkpoint(model=model, step=tf.Variable(0, dtype=tf.int64))
    for step, value in ((1, 0.1), (2, 0.3)):
        model.conv.kernel.assign(tf.fill(model.conv.kernel.shape, value))
        checkpoint.step.assign(step)
        assert checkpoint.save(str(tmp_path / "ckpt")).endswith(f"ckpt-{step}")

    def run(step, reuse):
        recorder = _Recorder()
        coco = types.SimpleNamespace(format_metrics=str, format_per_category=str)
        lvis = types.SimpleNamespace(build_evaluator=lambda *a, **k: recorder)
        with mock.patch.object(runner.trainer, "check_num_classes"), \
                mock.patch.object(runner, "coco_eval", coco), \
                mock.patch.object(runner, "lvis_eval", lvis):
            report = runner.evaluate(str(tmp_path), model_fn=Toy, dataset_fn=Dataset(),
                                     checkpoint=str(tmp_path / f"ckpt-{step}"),
                                     num_pictures=0, host_threads=1, reuse=reuse)
        assert report["step"] == step
        return np.concatenate([d["detection_scores"] for _, d in recorder.updates])

    reuse = {}
    first = run(1, reuse)
    kept = reuse["model"]
    calls.clear()
    second = run(2, reuse)
    assert reuse["model"] is kept and calls == []   # no model built, no trace
    fresh = run(2, None)
    assert True in calls and False in calls   # a new model: built, then traced
    np.testing.assert_allclose(second, fresh, rtol=1e-6)
    assert not np.allclose(first, second)
    # A changed gin configuration may build another model: not reused.
    gin.parse_config("evaluate.num_pictures = 0")
    try:
        run(2, reuse)
    finally:
        gin.clear_config()
    assert reuse["model"] is not kept


@pytest.mark.parametrize("xla", [False, True])
def test_devices_run_a_batch_each_in_order(tmp_path, xla):
    # 7 batches on two logical CPUs (tests/conftest.py): 4 steps, the last
    # padded with a batch of padding slots only.
    class Dataset(_Dataset):
        def __call__(self):
            for k in range(7):
                yield {"image_id": tf.constant([2 * k, -1 if k == 6 else 2 * k + 1]),
                       "images": tf.fill([2, 8, 8, 3], float(k)),
                       "image_info": tf.zeros([2, 5])}

    records = {}
    for devices in (None, ["/cpu:0", "/cpu:1"]):
        recorder = _Recorder()
        coco = types.SimpleNamespace(format_metrics=str, format_per_category=str)
        lvis = types.SimpleNamespace(build_evaluator=lambda *a, **k: recorder)

        def restore(*args, **kwargs):
            model = ToyDetector()
            model({"images": tf.zeros([1, 8, 8, 3]), "image_id": tf.zeros([1], tf.int64)})
            return model, 3, "ckpt-3"

        with mock.patch.object(runner, "restore_model", restore), \
                mock.patch.object(runner.trainer, "check_num_classes"), \
                mock.patch.object(runner, "coco_eval", coco), \
                mock.patch.object(runner, "lvis_eval", lvis):
            report = runner.evaluate(str(tmp_path), model_fn=None, dataset_fn=Dataset(),
                                     num_pictures=0, devices=devices, xla=xla,
                                     host_threads=1)
        assert report["num_images"] == 13
        records[devices is None] = recorder.updates
    one, two = records[True], records[False]
    assert [ids for ids, _ in one] == [[2 * k, 2 * k + 1] for k in range(6)] + [[12, -1]]
    assert [ids for ids, _ in two] == [ids for ids, _ in one] + [[-1, -1]]
    for (_, ours), (_, theirs) in zip(two, one):
        np.testing.assert_array_equal(ours["num_detections"], theirs["num_detections"])
        np.testing.assert_allclose(ours["detection_scores"], theirs["detection_scores"],
                                   rtol=1e-6)


# The whole model on two devices (both evaluations ~20-35 s each here).
@pytest.mark.slow
@pytest.mark.parametrize("xla", [False, True])
def test_devices_spread_batches_and_give_one_devices_results(tmp_path, xla):
    # Two logical CPUs (tests/conftest.py) as two replicas: 5 images in
    # batches of 2 make 3 batches, so the second step pads its second device.
    from mrcnn.data.pipeline import CocoInput
    from mrcnn.modeling.mask_rcnn import build_mask_rcnn
    from tests.data import fixtures
    fixtures.write_dataset(str(tmp_path / "data"), _images(5), split="val2017")
    data = CocoInput(str(tmp_path / "data"), split="val2017", training=False,
                     batch_size=2, min_size=32, max_size=64, canvas_size=(64, 64))

    def model_fn():
        model = build_mask_rcnn(num_classes=2, depth=18, fpn_channels=16, fc_dim=32,
                                mask_channels=8, num_samples=16, pre_nms_topk_test=50,
                                post_nms_topk_test=20, max_detections=10)
        model.roi_heads.score_threshold = 0.0   # random weights: keep every detection
        return model

    tf.keras.utils.set_random_seed(0)
    model = model_fn()
    model(runner._zero_inference_batch((64, 64)), training=False)
    tf.train.CheckpointManager(tf.train.Checkpoint(model=model, step=tf.Variable(
        5, dtype=tf.int64)), str(tmp_path / "run"), 1).save()

    reports, results = [], []
    for devices in (None, ["/cpu:0", "/cpu:1"]):
        with mock.patch.object(runner, "_replicated", wraps=runner._replicated) as spread:
            reports.append(runner.evaluate(str(tmp_path / "run"), model_fn=model_fn,
                                           dataset_fn=data, devices=devices,
                                           num_pictures=5, xla=xla))
        strategy = spread.call_args.args[1]
        assert (strategy is None) == (devices is None)
        results.append(json.loads((tmp_path / "run" / "eval" / "results-5.json").read_text()))
    assert strategy.num_replicas_in_sync == 2
    assert reports[0]["num_images"] == reports[1]["num_images"] == 5
    assert len(results[0]) == 5 * 10
    assert sorted({r["image_id"] for r in results[1]}) == list(range(11, 16))
    # The same detections, image by image (in the order of the batches).
    for ours, theirs in zip(results[1], results[0]):
        assert ours["segmentation"] == theirs["segmentation"]
        np.testing.assert_allclose(ours["bbox"], theirs["bbox"], rtol=1e-5, atol=1e-3)
        assert ours["category_id"] == theirs["category_id"]
    for name in ("bbox", "segm"):
        assert reports[0][name] == pytest.approx(reports[1][name], abs=1e-6)


@pytest.mark.parametrize("finished", [True, False])
def test_watch_ends_with_the_runs_last_checkpoint(tmp_path, monkeypatch, finished):
    """--watch stops once the checkpoint of the step in done.json (written by
    train at a run's end) is evaluated; without it, after the idle timeout."""
    from mrcnn.training import trainer
    monkeypatch.setattr(runner, "_WATCH_POLL_S", 0.05)
    step = tf.Variable(0, dtype=tf.int64)
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(step=step), str(tmp_path), 3)
    for k in (1, 2):
        step.assign(k)
        manager.save(checkpoint_number=k)
    if finished:
        (tmp_path / trainer.DONE_FILE).write_text(json.dumps({"step": 2}))
    evaluated = []
    with mock.patch.object(runner.logging, "info") as info:
        for path in runner._new_checkpoints(str(tmp_path), 0.5,
                                            lambda: evaluated and evaluated[-1]):
            evaluated.append({"step": int(path.rsplit("-", 1)[1])})
    # The iterator starts at the newest checkpoint.
    assert evaluated == [{"step": 2}]
    said = [call.args[0] for call in info.call_args_list]
    assert ("Evaluated the run's last checkpoint: done watching" in said) == finished
