"""runner.Predictor: in-memory detections of one image against the model's own output;
its precision and the exported model's."""

import functools
import json
import os
from unittest import mock

import gin
import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from pycocotools import mask as mask_util

from mrcnn import programs
from mrcnn.data import pipeline
from mrcnn.evaluation import export, runner
from mrcnn.modeling.mask_rcnn import MaskRCNN, build_mask_rcnn

SMALL = dict(num_classes=3, depth=18, fpn_channels=16, fc_dim=32, mask_channels=8,
             num_samples=16, pre_nms_topk_test=50, post_nms_topk_test=20,
             max_detections=10)
SIZES = dict(min_size=64, max_size=128, canvas_size=(128, 128))


def _run_dir(tmp_path, masks=True):
    tf.keras.utils.set_random_seed(0)
    model = build_mask_rcnn(masks=masks, **SMALL)
    model(runner._zero_inference_batch((64, 128)), training=False)
    checkpoint = tf.train.Checkpoint(model=model, step=tf.Variable(7, dtype=tf.int64))
    tf.train.CheckpointManager(checkpoint, str(tmp_path), 1).save()
    return model


@pytest.fixture(scope="module")
def fixture_run(tmp_path_factory):
    """A run directory of the masks model, the model itself, and a Predictor
    of it that keeps every detection, shared by the tests that only read
    them: each Predictor traces its model once per canvas, a few seconds
    each on this CPU."""
    run_dir = tmp_path_factory.mktemp("predictor_run")
    model = _run_dir(run_dir)
    every = runner.Predictor(str(run_dir), model_fn=functools.partial(build_mask_rcnn, **SMALL),
                             score_threshold=0.0, **SIZES)
    return run_dir, model, every


@pytest.mark.parametrize("shape", [(48, 80, 3), (90, 40, 3)])
def test_matches_the_model_on_the_padded_image(fixture_run, shape):
    _, model, predictor = fixture_run
    assert predictor.step == 7
    image = np.random.default_rng(1).integers(0, 256, shape).astype(np.uint8)
    before = dict(predictor.canvases_used)
    out = predictor(image)
    # The model itself on the canvas the Predictor says it used.
    canvas = (64, 128) if shape[1] > shape[0] else (128, 64)
    assert predictor.canvases_used == {**before, canvas: before.get(canvas, 0) + 1}
    images, info = pipeline.preprocess_image(image, **SIZES)
    det = model.detect({"images": images[None, :canvas[0], :canvas[1]],
                        "image_info": info[None]})
    n = int(det["num_detections"][0])
    assert n > 0 and len(out["boxes"]) == n
    np.testing.assert_allclose(out["boxes"], det["detection_boxes"][0, :n], atol=1e-4)
    np.testing.assert_allclose(out["scores"], det["detection_scores"][0, :n], atol=1e-6)
    assert out["classes"].dtype == np.int32 and out["names"] == [str(c) for c in out["classes"]]
    assert out["masks"].shape == (n,) + shape[:2] and out["masks"].dtype == bool
    for mask, rle in zip(out["masks"], out["rles"]):
        np.testing.assert_array_equal(mask, mask_util.decode(rle).astype(bool))
    assert ((out["boxes"] >= 0) & (out["boxes"] <= [shape[0], shape[1]] * 2)).all()


def test_threshold_and_box_only_model(tmp_path):
    _run_dir(tmp_path, masks=False)
    model_fn = functools.partial(build_mask_rcnn, masks=False, **SMALL)
    image = np.random.default_rng(2).integers(0, 256, (64, 64, 3)).astype(np.uint8)
    every = runner.Predictor(str(tmp_path), model_fn=model_fn, score_threshold=0.0,
                             **SIZES)(image)
    assert every["masks"] is None and every["rles"] is None
    cut = float(np.median(every["scores"]))
    kept = runner.Predictor(str(tmp_path), model_fn=model_fn, score_threshold=cut,
                            **SIZES)(image)
    np.testing.assert_allclose(kept["scores"], every["scores"][every["scores"] >= cut])


def test_threshold_becomes_a_retinanets_own():
    # RetinaNet keeps its test threshold itself, not in roi_heads.
    from mrcnn.modeling.retinanet import build_retinanet
    model = build_retinanet(num_classes=3, depth=18)
    assert model.score_threshold == pytest.approx(0.05)
    runner._raise_score_threshold(model, 0.5)
    assert np.float32(model.score_threshold) == np.nextafter(np.float32(0.5), np.float32(0))
    runner._raise_score_threshold(model, 0.1)   # only ever raised
    assert model.score_threshold > 0.49


def test_threshold_becomes_the_models_with_the_same_detections(fixture_run):
    run_dir, _, every = fixture_run
    model_fn = functools.partial(build_mask_rcnn, **SMALL)
    image = np.random.default_rng(2).integers(0, 256, (64, 64, 3)).astype(np.uint8)
    assert every.model.roi_heads.score_threshold == 0.05   # not lowered
    every = every(image)
    cut = float(every["scores"][len(every["scores"]) // 2])   # attained: >= keeps it
    predictor = runner.Predictor(str(run_dir), model_fn=model_fn, score_threshold=cut,
                                 **SIZES)
    model_threshold = predictor.model.roi_heads.score_threshold
    assert np.float32(model_threshold) < np.float32(cut) and model_threshold > 0.05
    assert predictor.model.score_threshold == model_threshold   # MaskRCNN's: its heads'
    kept = predictor(image)
    n = int((every["scores"] >= cut).sum())
    assert 0 < n < len(every["scores"]) and len(kept["scores"]) == n
    np.testing.assert_array_equal(kept["classes"], every["classes"][:n])
    np.testing.assert_allclose(kept["scores"], every["scores"][:n], atol=1e-6)
    np.testing.assert_allclose(kept["boxes"], every["boxes"][:n], atol=1e-4)
    np.testing.assert_array_equal(kept["masks"], every["masks"][:n])


def test_from_gin_uses_the_predict_bindings(fixture_run):
    run_dir, _, _ = fixture_run
    bindings = ["predict.model_fn = @build_mask_rcnn", "predict.score_threshold = 0.0",
                "predict.min_size = 64", "predict.max_size = 128",
                "predict.canvas_size = (128, 128)"]
    bindings += [f"build_mask_rcnn.{k} = {v!r}" for k, v in SMALL.items()]
    programs.parse_gin_files([], bindings, finalize=False)
    try:
        predictor = runner.Predictor.from_gin(str(run_dir))
        out = predictor(np.zeros((64, 100, 3), np.uint8))
    finally:
        gin.clear_config()
    assert predictor.score_threshold == 0.0 and predictor.canvas_size == (128, 128)
    assert list(predictor.canvases_used) == [(64, 128)] and len(out["boxes"]) > 0


def test_batches_equal_single_images(fixture_run):
    """batch_size 2 over 5 images of both orientations (one padded batch each)."""
    run_dir, _, single = fixture_run
    model_fn = functools.partial(build_mask_rcnn, **SMALL)
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, shape).astype(np.uint8) for shape in
              [(48, 80, 3), (90, 40, 3), (64, 64, 3), (70, 50, 3), (30, 100, 3)]]
    batched = runner.Predictor(str(run_dir), model_fn=model_fn, score_threshold=0.0,
                               batch_size=2, **SIZES)
    outs = batched.batch(images)
    assert batched.canvases_used == {(64, 128): 3, (128, 64): 2}
    for image, out in zip(images, outs):
        want = single(image)
        np.testing.assert_array_equal(out["classes"], want["classes"])
        np.testing.assert_allclose(out["scores"], want["scores"], atol=1e-5)
        np.testing.assert_allclose(out["boxes"], want["boxes"], atol=1e-3)
        assert out["masks"].shape == want["masks"].shape == (len(want["boxes"]),) + image.shape[:2]
    with pytest.raises(ValueError, match="batch_size=0"):
        runner.Predictor(str(run_dir), model_fn=model_fn, batch_size=0, **SIZES)


def test_xla_gives_the_graphs_detections(fixture_run):
    run_dir, _, graph_predictor = fixture_run
    model_fn = functools.partial(build_mask_rcnn, **SMALL)
    image = np.random.default_rng(6).integers(0, 256, (48, 80, 3)).astype(np.uint8)
    predictors = [graph_predictor, runner.Predictor(
        str(run_dir), model_fn=model_fn, score_threshold=0.0, xla=True, **SIZES)]
    graph, xla = (p(image) for p in predictors)
    batch = runner._zero_inference_batch((64, 128))
    assert [p._infer.__wrapped__.get_concrete_function(batch)
            .function_def.attr["_XlaMustCompile"].b
            for p in predictors] == [False, True]
    # The fixture's three best scores are 1e-3 apart; XLA rounds differently.
    np.testing.assert_array_equal(xla["classes"][:3], graph["classes"][:3])
    np.testing.assert_allclose(xla["scores"][:3], graph["scores"][:3], atol=1e-5)
    np.testing.assert_allclose(xla["boxes"][:3], graph["boxes"][:3], atol=1e-3)
    assert len(xla["scores"]) == len(graph["scores"])


def test_test_time_augmentation_is_wired(fixture_run):
    """One size without flip gives the model's own detections (sizes and flips:
    tests/modeling/test_tta.py, and in a traced step the eval program test,
    make test-slow)."""
    from mrcnn.modeling.tta import TestTimeAugmentation
    run_dir, model, _ = fixture_run
    image = np.random.default_rng(4).integers(0, 256, (48, 80, 3)).astype(np.uint8)
    out = runner.Predictor(str(run_dir), model_fn=functools.partial(build_mask_rcnn, **SMALL),
                           score_threshold=0.0, **SIZES,
                           tta=TestTimeAugmentation(min_sizes=(64,), flip=False))(image)
    images, info = pipeline.preprocess_image(image, **SIZES)
    det = model.detect({"images": images[None, :64], "image_info": info[None]})
    n = int(det["num_detections"][0])
    assert n > 0 and len(out["boxes"]) == n
    np.testing.assert_allclose(out["boxes"], det["detection_boxes"][0, :n], atol=1e-4)
    np.testing.assert_allclose(out["scores"], det["detection_scores"][0, :n], atol=1e-6)


@pytest.mark.slow   # 38 s; bfloat16 trains in CI (test_mask_rcnn, test_programs)
def test_bfloat16_predictor_and_export(fixture_run, tmp_path):
    """The model computes in the precision asked for; the caller's global
    policy, the outputs' dtypes and (within bf16 rounding) the detections
    stay those of float32."""
    run_dir, model, _ = fixture_run   # float32
    model_fn = functools.partial(build_mask_rcnn, **SMALL)
    image = np.random.default_rng(5).integers(0, 256, (48, 80, 3)).astype(np.uint8)
    half = runner.Predictor(str(run_dir), model_fn=model_fn, score_threshold=0.0,
                            precision="bfloat16", **SIZES)
    assert keras.mixed_precision.global_policy().name == "float32"
    assert {layer.compute_dtype for layer in half.model.layers} == {"bfloat16"}
    assert {layer.compute_dtype for layer in model.layers} == {"float32"}
    got = half(image)
    images, info = pipeline.preprocess_image(image, **SIZES)
    want = model.detect({"images": images[None, :64], "image_info": info[None]})
    assert got["boxes"].dtype == got["scores"].dtype == np.float32
    assert len(got["scores"]) == int(want["num_detections"][0])
    # The fixture's three best scores are 1e-3 apart, bf16 moves them ~2e-4.
    scores, boxes = got["scores"][:3], got["boxes"][:3]
    np.testing.assert_array_equal(got["classes"][:3], want["detection_classes"][0, :3])
    np.testing.assert_allclose(scores, want["detection_scores"][0, :3], atol=5e-4)
    np.testing.assert_allclose(boxes, want["detection_boxes"][0, :3], atol=0.05)

    export_dir = tmp_path / "saved_model"
    calls = []
    call = MaskRCNN.call

    def counted(self, *args, **kwargs):
        calls.append(tf.executing_eagerly())
        return call(self, *args, **kwargs)

    with mock.patch.object(MaskRCNN, "call", counted):
        export.export_saved_model(str(run_dir), str(export_dir), model_fn=model_fn,
                                  precision="bfloat16", **SIZES)
    # The eager build, then one trace per canvas (64 x 128, 128 x 64), made
    # by tf.saved_model.save and shared by both signatures.
    assert calls == [True, False, False]
    assert keras.mixed_precision.global_policy().name == "float32"
    loaded = tf.saved_model.load(str(export_dir))   # kept: its functions need it
    served = {k: v.numpy()[0] for k, v in loaded.serve_images(image[None]).items()}
    n = len(got["scores"])
    assert int(served["num_detections"]) == n
    assert served["detection_scores"].dtype == served["detection_boxes"].dtype == np.float32
    np.testing.assert_allclose(served["detection_scores"][:3], scores, atol=5e-4)
    np.testing.assert_allclose(served["detection_boxes"][:3], boxes, atol=0.05)
    # The exported graph itself computes in bfloat16.
    from tensorflow.core.protobuf import saved_model_pb2
    saved = saved_model_pb2.SavedModel()
    saved.ParseFromString((export_dir / "saved_model.pb").read_bytes())
    bf16 = tf.bfloat16.as_datatype_enum
    assert any(node.op == "Conv2D" and node.attr["T"].type == bf16
               for f in saved.meta_graphs[0].graph_def.library.function
               for node in f.node_def)


def test_predict_from_and_to_an_object_store(fixture_run, tmp_path):
    """bin/predict's loop with the run, the images and the output behind a
    file:// URL (standing in for gs://): the same detections as the local
    run's Predictor, a PNG and detections.json written there. (Landscape
    images only: each canvas costs the new Predictor a trace.)"""
    from tests.data.fixtures import copy_tree, remote_dir
    run_dir, _, every = fixture_run
    root = remote_dir(tmp_path)
    copy_tree(str(run_dir), f"{root}/run")
    rng = np.random.default_rng(7)
    images = {"a.png": rng.integers(0, 256, (48, 80, 3)).astype(np.uint8),
              "b.png": rng.integers(0, 256, (60, 90, 3)).astype(np.uint8)}
    tf.io.gfile.makedirs(f"{root}/images")
    for name, image in images.items():
        with tf.io.gfile.GFile(f"{root}/images/{name}", "wb") as f:
            Image.fromarray(image).save(f, format="PNG")
    written = runner.predict(f"{root}/run", [f"{root}/images"], f"{root}/out",
                             model_fn=functools.partial(build_mask_rcnn, **SMALL),
                             score_threshold=0.0, **SIZES)
    assert [w["file"] for w in written] == [f"{root}/images/a.png", f"{root}/images/b.png"]
    with tf.io.gfile.GFile(f"{root}/out/detections.json") as f:
        report = json.load(f)
    assert report["step"] == 7 and report["images"] == written
    for entry in written:
        want = every(images[os.path.basename(entry["file"])])
        got = entry["detections"]
        assert len(got) == len(want["scores"]) > 0
        np.testing.assert_allclose([d["score"] for d in got], want["scores"], atol=1e-4)
        with tf.io.gfile.GFile(f"{root}/out/{entry['picture']}", "rb") as f:
            assert Image.open(f).size == images[os.path.basename(entry["file"])].shape[1::-1]


def test_image_files_of_folders_files_and_patterns(tmp_path):
    for name in ("b.png", "a.JPG", "c.txt", ".hidden.jpg", "d.jpeg"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "e.jpg").write_bytes(b"x")
    here = str(tmp_path)
    assert runner.image_files([here]) == [f"{here}/a.JPG", f"{here}/b.png", f"{here}/d.jpeg"]
    # Patterns are expanded here (a URL's, where no shell reaches), images only.
    url = "file://" + here
    assert runner.image_files([f"{url}/*.*p*g", f"{url}/sub/e.jpg"]) == [
        f"{url}/b.png", f"{url}/d.jpeg", f"{url}/sub/e.jpg"]
    with pytest.raises(FileNotFoundError, match=r"\*\.gif: no image file matches"):
        runner.image_files([f"{here}/*.gif"])
    with pytest.raises(FileNotFoundError, match="missing.jpg: no such image file"):
        runner.image_files([f"{here}/missing.jpg"])
