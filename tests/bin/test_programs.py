"""The programs end to end on a tiny shapes dataset: train, kill -9 and resume,
switches, eval, predict, export (loaded in a fresh process), import_detectron2,
visualize_data."""

import collections
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_util

from tests.data import fixtures

STEPS = 40   # enough for a decisive RPN: an untrained one ranks proposals by rounding noise

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.join(ROOT, "bin")

# A model small enough to build, train and evaluate in seconds.
TINY = [
    "MIN_SIZE = 64", "MAX_SIZE = 64", "CANVAS = (64, 64)", "CHANNELS = 32",
    "BoxHead.fc_dim = 64", "MaskHead.channels = 32", "MaskHead.num_convs = 1",
    "RoiHeads.num_samples = 32", "RpnHead.num_samples = 64",
    "RpnHead.pre_nms_topk_train = 100", "RpnHead.post_nms_topk_train = 50",
    "RpnHead.pre_nms_topk_test = 100", "RpnHead.post_nms_topk_test = 50",
    "RoiHeads.max_detections = 10",
    "train/CocoInput.batch_size = 2", "eval/CocoInput.batch_size = 4",
    "train.xla = False", "train.log_every = 2", "train.checkpoint_every = 2",
]


def _run(program, *args, bindings=(), check=True, env=None, gin_file="gin/shapes_demo.gin",
         **kw):
    cmd = [sys.executable, os.path.join(BIN, program), f"--gin_file={gin_file}"]
    cmd += [f"--gin_bindings={b}" for b in bindings] + list(args)
    full_env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **(env or {}))
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=full_env, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{program} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A dataset and a short training run shared by the tests of this module."""
    root = tmp_path_factory.mktemp("programs")
    data = root / "shapes"
    subprocess.run([sys.executable, os.path.join(BIN, "make_shapes"), f"--out={data}",
                    "--num_train=12", "--num_val=6", "--height=64", "--width=64"],
                   check=True, capture_output=True, cwd=ROOT)
    bindings = TINY + [f"DATA_DIR = '{data}'"]
    model_dir = root / "run"
    proc = _run("train", f"--model_dir={model_dir}",
                bindings=bindings + [f"train.total_steps = {STEPS}",
                                     "train.checkpoint_every = 20"])
    return {"root": root, "data": data, "model_dir": model_dir, "bindings": bindings,
            "train_log": proc.stderr}


def test_train_writes_checkpoints_config_and_progress(run):
    assert os.path.exists(run["model_dir"] / f"ckpt-{STEPS}.index")
    assert (run["model_dir"] / "operative_config.gin").read_text().strip()
    assert f"step {STEPS}/{STEPS}" in run["train_log"] and "img/s" in run["train_log"]
    assert "Step 1 took" in run["train_log"]   # kept out of the first window's img/s
    # Rerunning the finished command does nothing and says so.
    proc = _run("train", f"--model_dir={run['model_dir']}",
                bindings=run["bindings"] + [f"train.total_steps = {STEPS}"])
    assert "Nothing to do" in proc.stderr


def test_kill_minus_nine_then_rerun_resumes(run, tmp_path):
    model_dir = tmp_path / "killed"
    xla_cache = tmp_path / "xla_cache"   # this run's own, not the suite's
    cmd = [sys.executable, os.path.join(BIN, "train"), "--gin_file=gin/shapes_demo.gin",
           f"--model_dir={model_dir}", f"--xla_cache_dir={xla_cache}"]
    cmd += [f"--gin_bindings={b}" for b in run["bindings"] + ["train.total_steps = 400"]]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not list(model_dir.glob("ckpt-*.index")):
            time.sleep(0.5)
        time.sleep(1.0)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    saved = sorted(int(p.name.split("-")[1].split(".")[0])
                   for p in model_dir.glob("ckpt-*.index"))
    assert saved, "no checkpoint was written before the kill"
    compiled = sorted(p.name for p in xla_cache.glob("xla_compile_cache_*"))
    assert compiled, "the step's XLA islands were not kept before the kill"
    rerun = _run("train", f"--model_dir={model_dir}", f"--xla_cache_dir={xla_cache}",
                 bindings=run["bindings"] + ["train.total_steps = 400",
                                             "train.stop_after = 2"])
    resumed = re.search(r"Resumed from \S*ckpt-(\d+) at step (\d+)", rerun.stderr)
    assert resumed, rerun.stderr[-2000:]
    step = int(resumed.group(1))
    assert int(resumed.group(2)) == step
    # A kill inside a save may leave the newest files unrecorded in the
    # checkpoint state; resuming from the newest recorded one is right, and
    # nothing older than the one before it may be picked.
    assert step in saved[-2:], (step, saved)
    assert os.path.exists(model_dir / f"ckpt-{step + 2}.index"), rerun.stderr[-2000:]
    # The resumed step has the fresh one's function names, so every program
    # it compiles was found in the cache and none was added.
    assert sorted(p.name for p in xla_cache.glob("xla_compile_cache_*")) == compiled


def test_use_xla_cache_names_one_directory(tmp_path, monkeypatch):
    from mrcnn import programs
    monkeypatch.setenv("TF_XLA_FLAGS", "--tf_xla_auto_jit=0 "
                       "--tf_xla_persistent_cache_directory=/elsewhere")
    assert programs.use_xla_cache(str(tmp_path / "a" / "b")) == str(tmp_path / "a" / "b")
    assert (tmp_path / "a" / "b").is_dir()
    assert os.environ["TF_XLA_FLAGS"] == (
        f"--tf_xla_auto_jit=0 --tf_xla_persistent_cache_directory={tmp_path / 'a' / 'b'}")
    assert programs.use_xla_cache("") is None   # none asked: the environment stays
    assert os.environ["TF_XLA_FLAGS"].endswith(str(tmp_path / "a" / "b"))


@pytest.fixture(scope="module")
def evaluated(run):
    """bin/eval --watch of the fixture's run: its output (its metrics and
    results files lie under the run's eval/). --watch evaluates through the
    same `evaluate` as a plain bin/eval, once per checkpoint, starting at the
    newest; one process serves both (bin/eval without --watch: the landscape
    and portrait test)."""
    return _run("eval", f"--model_dir={run['model_dir']}", "--watch",
                bindings=run["bindings"] + ["evaluate.watch_timeout = 1",
                                            "evaluate.best_metric = 'segm/AP'"])


def test_eval_writes_coco_results_and_tables(run, evaluated):
    from pycocotools.coco import COCO
    proc = evaluated
    assert "bbox" in proc.stdout and "segm" in proc.stdout
    metrics = json.loads((run["model_dir"] / "eval" / f"metrics-{STEPS}.json").read_text())
    assert set(metrics["bbox"]) >= {"AP", "AP50", "AP75", "ARl"}
    assert metrics["num_images"] == 6
    gt = COCO(str(run["data"] / "annotations" / "instances_val2017.json"))
    names = {c["name"] for c in gt.loadCats(gt.getCatIds())}
    for iou_type in ("bbox", "segm"):
        assert set(metrics["per_category"][iou_type]) == names
    assert "category" in proc.stdout and "segm AP" in proc.stdout
    results = json.loads((run["model_dir"] / "eval" / f"results-{STEPS}.json").read_text())
    if results:  # an untrained model may keep nothing; then the file is []
        gt.loadRes(str(run["model_dir"] / "eval" / f"results-{STEPS}.json"))
        assert {r["category_id"] for r in results} <= {1, 3, 7}


def test_eval_scores_a_results_file_as_it_scored_the_model(run, evaluated, tmp_path):
    # bin/eval --results on the results json of the model's own evaluation
    # (every val image): the same numbers, without a model.
    results = tmp_path / "theirs.json"
    results.write_bytes((run["model_dir"] / "eval" / f"results-{STEPS}.json").read_bytes())
    proc = _run("eval", f"--results={results}", bindings=run["bindings"])
    scored = json.loads((tmp_path / "theirs-metrics.json").read_text())
    ours = json.loads((run["model_dir"] / "eval" / f"metrics-{STEPS}.json").read_text())
    assert scored["evaluator"] == "coco" and "AP50" in proc.stdout
    for iou_type in ("bbox", "segm") if json.loads(results.read_text()) else ("bbox",):
        assert scored[iou_type] == ours[iou_type], iou_type
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"image_id": 99999, "category_id": 1, "score": 0.5,
                                "bbox": [0, 0, 1, 1]}]))
    proc = _run("eval", f"--results={bad}", bindings=run["bindings"], check=False)
    assert proc.returncode != 0 and "image_id 99999 is not in the annotation file" in proc.stderr


def test_eval_scores_an_lvis_file_with_federated_metrics(run, evaluated, tmp_path):
    # The model's own results scored on the same images written as LVIS v1
    # writes them: the evaluator is picked from the annotation file. (The
    # model's detections reach the LVIS evaluator through the same
    # `lvis_eval.build_evaluator` in `evaluate`: tests/evaluation/
    # test_evaluate_loop.py; LVIS image paths: tests/data/test_coco.py.)
    lvis_file = _lvis_style(run["data"] / "annotations" / "instances_val2017.json",
                            "val2017", tmp_path / "lvis_v1_val.json")
    results = tmp_path / "results.json"
    results.write_bytes((run["model_dir"] / "eval" / f"results-{STEPS}.json").read_bytes())
    proc = _run("eval", f"--results={results}",
                bindings=run["bindings"] + [f"eval/CocoInput.annotation_file = '{lvis_file}'",
                                            f"eval/CocoInput.image_dir = '{run['data']}'"])
    metrics = json.loads((tmp_path / "results-metrics.json").read_text())
    assert metrics["evaluator"] == "lvis"
    for iou_type in ("bbox", "segm") if json.loads(results.read_text()) else ("bbox",):
        assert set(metrics[iou_type]) >= {"AP", "APr", "APc", "APf", "AR@300"}
    assert "APr" in proc.stdout and "AR@300" in proc.stdout


@pytest.mark.slow   # 23 s; the loss itself: tests/modeling/test_federated_loss.py (CI)
def test_train_with_the_federated_loss(run, tmp_path):
    # The shapes data has 3 classes: score 2 per step, drawn by image counts
    # that the trainer counts on the training records and checkpoints.
    model_dir = tmp_path / "fed"
    proc = _run("train", f"--model_dir={model_dir}",
                bindings=run["bindings"] + ["train.total_steps = 2",
                                            "RoiHeads.class_loss = 'sigmoid'",
                                            "RoiHeads.fed_loss_classes = 2"])
    assert "Federated loss: 2 classes per step" in proc.stderr
    import tensorflow as tf
    reader = tf.train.load_checkpoint(str(model_dir))
    name = next(n for n in reader.get_variable_to_shape_map() if "class_image_counts" in n)
    counts = reader.get_tensor(name)
    data = json.loads((run["data"] / "annotations" / "instances_train2017.json").read_text())
    ids = sorted(c["id"] for c in data["categories"])
    want = [len({a["image_id"] for a in data["annotations"] if a["category_id"] == c})
            for c in ids]
    np.testing.assert_array_equal(counts, want)


def _lvis_style(coco_file, split, out_file):
    """A shapes split rewritten as LVIS v1 writes it: images named by
    coco_url under the dataset root, absent categories negative, frequencies."""
    data = json.loads(coco_file.read_text())
    for image in data["images"]:
        image["coco_url"] = f"http://images.cocodataset.org/{split}/{image.pop('file_name')}"
        present = {a["category_id"] for a in data["annotations"]
                   if a["image_id"] == image["id"]}
        image["neg_category_ids"] = sorted({c["id"] for c in data["categories"]} - present)
        image["not_exhaustive_category_ids"] = []
    for category, frequency in zip(data["categories"], "rcf"):
        category["frequency"] = frequency
    out_file.write_text(json.dumps(data))
    return out_file


# The real R50 recipe: 70 s on this project's slower 2-core machines. The
# LVIS evaluation (test_eval_scores_an_lvis_file_with_federated_metrics) and
# the federated loss (test_train_with_the_federated_loss) stay in CI.
@pytest.mark.slow
def test_lvis_recipe_trains_and_evaluates(run, tmp_path):
    # gin/lvis_r50_fpn_1x.gin as written (R50, repeat factors, 300 detections
    # above 0.0001, LVIS metrics), with the federated loss, on LVIS-style
    # shapes files at 64 x 64.
    files = {split: _lvis_style(run["data"] / "annotations" / f"instances_{split}.json",
                                split, tmp_path / f"lvis_{split}.json")
             for split in ("train2017", "val2017")}
    bindings = [
        "NUM_CLASSES = 3", f"DATA_DIR = '{run['data']}'",
        f"train/CocoInput.annotation_file = '{files['train2017']}'",
        f"eval/CocoInput.annotation_file = '{files['val2017']}'",
        f"categories/CocoInput.annotation_file = '{files['val2017']}'",
        "MIN_SIZE = 64", "TRAIN_MIN_SIZE = 64", "MAX_SIZE = 64", "CANVAS = (64, 64)",
        "PRECISION = 'float32'", "train.xla = False", "train.init_fn = None",
        "train.total_steps = 2", "train/CocoInput.batch_size = 2",
        "eval/CocoInput.batch_size = 6", "RoiHeads.class_loss = 'sigmoid'",
        "RoiHeads.fed_loss_classes = 2", "evaluate.num_pictures = 0"]
    model_dir = tmp_path / "lvis_run"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    for program in ("train", "eval"):
        proc = subprocess.run(
            [sys.executable, os.path.join(BIN, program), "--gin_file=gin/lvis_r50_fpn_1x.gin",
             f"--model_dir={model_dir}"] + [f"--gin_bindings={b}" for b in bindings],
            cwd=ROOT, capture_output=True, text=True, env=env)
        assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = json.loads((model_dir / "eval" / "metrics-2.json").read_text())
    assert metrics["evaluator"] == "lvis" and metrics["num_images"] == 6
    assert set(metrics["segm"]) >= {"APr", "APc", "APf", "AR@300"}
    # (A randomly initialised R50 with frozen batch norms may score nothing.)
    results = json.loads((model_dir / "eval" / "results-2.json").read_text())
    assert max(collections.Counter(r["image_id"] for r in results).values(), default=0) <= 300


# 36 s on the slower machines; TTA's wiring stays in CI through
# tests/evaluation/test_predictor.py and its numbers through test_tta.py.
@pytest.mark.slow
def test_eval_with_test_time_augmentation(run):
    bindings = run["bindings"] + ["TestTimeAugmentation.min_sizes = (32, 64)",
                                  "evaluate.num_pictures = 0"]
    proc = _run("eval", f"--model_dir={run['model_dir']}", "--tta", bindings=bindings)
    assert "Test-time augmentation: 4 runs per batch" in proc.stderr
    eval_dir = run["model_dir"] / "eval"
    metrics = json.loads((eval_dir / f"metrics-{STEPS}-tta.json").read_text())
    assert metrics["test_time_augmentation"] == {"min_sizes": [32, 64], "flip": True}
    assert metrics["num_images"] == 6 and set(metrics) >= {"bbox", "segm"}
    assert isinstance(json.loads((eval_dir / f"results-{STEPS}-tta.json").read_text()),
                      list)


def test_eval_on_landscape_and_portrait_images(run, tmp_path):
    # Batched by orientation (the recipe's default) on 64 x 128 and 128 x 64.
    data = tmp_path / "mixed"
    subprocess.run([sys.executable, os.path.join(BIN, "make_shapes"), f"--out={data}",
                    "--num_train=2", "--num_val=6", "--height=64", "--width=128"],
                   check=True, capture_output=True, cwd=ROOT)
    fixtures.transpose_odd_images(data, "val2017")
    bindings = run["bindings"] + [f"DATA_DIR = '{data}'", "MIN_SIZE = 64",
                                  "MAX_SIZE = 128", "CANVAS = (128, 128)",
                                  "evaluate.num_pictures = 0"]
    model_dir = tmp_path / "run"
    model_dir.mkdir()
    for f in run["model_dir"].glob(f"ckpt-{STEPS}.*"):
        (model_dir / f.name).write_bytes(f.read_bytes())
    (model_dir / "checkpoint").write_text(
        f'model_checkpoint_path: "ckpt-{STEPS}"\n')
    _run("eval", f"--model_dir={model_dir}", bindings=bindings)
    metrics = json.loads((model_dir / "eval" / f"metrics-{STEPS}.json").read_text())
    assert metrics["num_images"] == 6
    images = {im["id"]: im for im in json.loads(
        (data / "annotations" / "instances_val2017.json").read_text())["images"]}
    assert {(im["height"], im["width"]) for im in images.values()} == {(64, 128), (128, 64)}
    results = json.loads((model_dir / "eval" / f"results-{STEPS}.json").read_text())
    assert any(images[r["image_id"]]["height"] > 64 for r in results)   # portrait ones
    for r in results:   # boxes in each image's own frame
        x, y, w, h = r["bbox"]
        im = images[r["image_id"]]
        assert x + w <= im["width"] + 1e-3 and y + h <= im["height"] + 1e-3, r


def test_predict_writes_png_and_json(run, tmp_path):
    # A square image, a landscape one, a file that is no image, a square JPEG
    # and a portrait PNG of the same stem (cut from val images; upright by
    # its EXIF orientation), and a sixth
    # that --max_images leaves out.
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    val = [np.asarray(Image.open(f)) for f in sorted((run["data"] / "val2017").glob("*.jpg"))]
    Image.fromarray(val[0]).save(inputs / "a.png")
    Image.fromarray(val[1][16:48]).save(inputs / "b.png")
    (inputs / "bad.jpg").write_bytes(b"not a JPEG")
    Image.fromarray(val[3]).save(inputs / "c.jpg")
    # The portrait PNG is stored as a phone stores it: a landscape bitmap
    # with an EXIF tag (6) saying to turn it a quarter clockwise.
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.rot90(val[2][:, 16:48], 1)).save(inputs / "c.png", exif=exif.tobytes())
    Image.fromarray(val[4]).save(inputs / "d.png")
    out = tmp_path / "pictures"
    proc = _run("predict", f"--model_dir={run['model_dir']}", f"--out_dir={out}",
                "--max_images=5", str(inputs),
                # Every image gets detections, however short the training:
                # the head's own 0.05 cut lifted too.
                bindings=run["bindings"] + ["predict.score_threshold = 0.0",
                                            "RoiHeads.score_threshold = 0.0",
                                            "MAX_SIZE = 128", "CANVAS = (128, 128)"])
    # Each orientation on its own canvas: 64 x 128 (the square images with
    # the landscape one) and 128 x 64, not the 128 x 128 bound.
    assert "Predicted 4 images: 3 on 64x128, 1 on 128x64" in proc.stderr, proc.stderr[-2000:]
    assert "1 of 5 files could not be read" in proc.stderr, proc.stderr[-2000:]
    # c.jpg and c.png each keep a picture.
    pngs = sorted(out.glob("*.png"))
    assert [p.name for p in pngs] == ["a.png", "b.png", "c.png", "c_1.png"]
    sizes = [(64, 64), (32, 64), (64, 64), (64, 32)]
    assert [np.asarray(Image.open(p)).shape[:2] for p in pngs] == sizes
    report = json.loads((out / "detections.json").read_text())
    assert report["step"] == STEPS
    assert [os.path.basename(e["file"]) for e in report["images"]] == [
        "a.png", "b.png", "c.jpg", "c.png"]
    assert [e["picture"] for e in report["images"]] == [p.name for p in pngs]
    assert [os.path.basename(u["file"]) for u in report["unreadable"]] == ["bad.jpg"]
    for entry, (h, w) in zip(report["images"], sizes):
        assert entry["detections"], entry["file"]
        for d in entry["detections"]:
            y1, x1, y2, x2 = d["box_yxyx"]
            assert 0 <= y1 <= y2 <= h and 0 <= x1 <= x2 <= w, (entry["file"], d)
            assert d["segmentation"]["size"] == [h, w], (entry["file"], d)
            mask = mask_util.decode(d["segmentation"]).astype(bool)   # [h, w]
            rows, cols = np.nonzero(mask)
            if rows.size:   # the mask lies in its box (2-decimal rounding)
                assert y1 - 0.51 <= rows.min() and rows.max() + 0.5 <= y2 + 0.01
                assert x1 - 0.51 <= cols.min() and cols.max() + 0.5 <= x2 + 0.01


def test_predict_fails_when_no_file_is_an_image(run, tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "x.jpg").write_bytes(b"")
    (inputs / "y.png").write_bytes(b"GIF89a")
    proc = _run("predict", f"--model_dir={run['model_dir']}", f"--out_dir={tmp_path / 'o'}",
                str(inputs), bindings=run["bindings"], check=False)
    assert proc.returncode != 0
    assert "none of the 2 image files could be read" in proc.stderr, proc.stderr[-2000:]
    assert "x.jpg" in proc.stderr and "y.png" in proc.stderr
    assert not (tmp_path / "o" / "detections.json").exists()


@pytest.mark.slow   # 36 s; the loader: tests/modeling/test_detectron2.py's LoaderTests (CI)
def test_import_detectron2_then_predict(run, tmp_path):
    from tests.modeling import detectron2_fixtures
    # Detectron2's R-18 at width 64 with batch norm (the demo's GN half-width
    # net has no Detectron2 counterpart), heads as TINY's.
    bindings = run["bindings"] + ["ResNet.norm = 'frozen_bn'", "ResNet.width = 64",
                                  "RpnHead.anchor_offset = 0.0"]
    model = detectron2_fixtures.small_model(num_classes=3, channels=32, fc_dim=64,
                                            mask_channels=32, mask_convs=1)
    weights = detectron2_fixtures.write(tmp_path / "model_final.pkl",
                                        detectron2_fixtures.random_state(model))
    model_dir = tmp_path / "d2"
    proc = _run("import_detectron2", f"--weights={weights}", f"--model_dir={model_dir}",
                bindings=bindings)
    assert f"-> {model_dir}/ckpt-0" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    assert "folded into the stem" in proc.stderr   # ImageNet mean/std, not Detectron2's
    assert (model_dir / "operative_config.gin").exists()
    out = tmp_path / "pictures"
    _run("predict", f"--model_dir={model_dir}", f"--out_dir={out}", "--max_images=1",
         str(run["data"] / "val2017"),
         bindings=bindings + ["predict.score_threshold = 0.0"])
    assert json.loads((out / "detections.json").read_text())["step"] == 0
    again = _run("import_detectron2", f"--weights={weights}", f"--model_dir={model_dir}",
                 bindings=bindings, check=False)
    assert again.returncode == 1 and "already holds a checkpoint" in again.stderr
    other = detectron2_fixtures.write(tmp_path / "other.pkl", detectron2_fixtures.random_state(
        model, num_classes=5))
    mismatch = _run("import_detectron2", f"--weights={other}",
                    f"--model_dir={tmp_path / 'd2_other'}", bindings=bindings, check=False)
    assert mismatch.returncode == 1 and "has 5 classes, the model 3" in mismatch.stderr


def test_box_and_keypoint_train_eval_predict_export(run, tmp_path):
    """Keypoint R-CNN (gin/shapes_keypoint_demo.gin: boxes and keypoints, no
    mask head) on annotations without masks: box and keypoint AP, no masks
    anywhere, keypoints in every program's output. Its training run also
    takes the switches a user sets on bin/train."""
    data = tmp_path / "boxes"
    (data / "annotations").mkdir(parents=True)
    for split in ("train2017", "val2017"):
        os.symlink(run["data"] / split, data / split)
        annotations = json.loads(
            (run["data"] / "annotations" / f"instances_{split}.json").read_text())
        for ann in annotations["annotations"]:
            del ann["segmentation"]
        (data / "annotations" / f"instances_{split}.json").write_text(json.dumps(annotations))
    bindings = TINY + [f"DATA_DIR = '{data}'", "KeypointHead.channels = 16",
                       "KeypointHead.num_convs = 1"]
    model_dir = tmp_path / "run"
    programs = {"gin_file": "gin/shapes_keypoint_demo.gin"}
    xla_cache = tmp_path / "xla_cache"
    # Six switches, one process: bfloat16; the masks run's weights (every
    # variable a box-only model has); --xla_cache_dir; an evaluation of the
    # last checkpoint (train.eval_fn), kept as the best (train.best_metric);
    # two batches per update (train.accumulate_steps). XLA through the same gin (train.xla)
    # is left to the trainer's tests, which train with it in every
    # precision: its CPU compile would double this run.
    proc = _run("train", f"--model_dir={model_dir}", f"--xla_cache_dir={xla_cache}",
                **programs, bindings=bindings + [
                    "train.total_steps = 4", "train.eval_fn = @evaluate",
                    "train.accumulate_steps = 2",
                    "train.best_metric = 'bbox/AP'",
                    "train.precision = 'bfloat16'", "train.init_fn = @init_from_checkpoint",
                    f"init_from_checkpoint.path = '{run['model_dir']}'"])
    assert "1 replica(s) x 2 images x 2 batches accumulated, precision bfloat16, graph " \
        "(XLA off)" in proc.stderr, proc.stderr[-2000:]
    assert f"of backbone, fpn, rpn_head, roi_heads from {run['model_dir']}/ckpt-{STEPS}" \
        in proc.stderr, proc.stderr[-2000:]
    # Every variable loaded but the keypoint head's, which the masks run has not.
    kept = re.search(r"Kept \d+ variables fresh, the checkpoint does not hold them:\n"
                     r"((?:  .*\n)+)", proc.stderr)
    assert kept and all("keypoint_head" in line for line in kept.group(1).splitlines()), \
        proc.stderr[-2000:]
    assert "their shapes differ" not in proc.stderr
    assert " keypoint " in proc.stderr   # the loss is logged
    # The step's RoI islands were compiled by XLA and kept there.
    assert list(xla_cache.glob("xla_compile_cache_*")), proc.stderr[-2000:]
    assert "Evaluated" in proc.stderr and "bbox" in proc.stdout, proc.stderr[-2000:]
    metrics = json.loads((model_dir / "eval" / "metrics-4.json").read_text())
    assert "bbox" in metrics and "segm" not in metrics and metrics["num_images"] == 6
    assert set(metrics["keypoints"]) == {"AP", "AP50", "AP75", "APm", "APl", "AR", "AR50",
                                         "AR75", "ARm", "ARl"}, metrics
    results = json.loads((model_dir / "eval" / "results-4.json").read_text())
    assert results and all(len(r["keypoints"]) == 12 and "segmentation" not in r
                           for r in results)
    best = json.loads((model_dir / "best" / "best.json").read_text())
    assert best["step"] == 4 and best["value"] == metrics["bbox"]["AP"], best
    assert f"best bbox/AP {best['value']:.4f} at step 4: --checkpoint={model_dir}/best" \
        in proc.stdout, proc.stdout
    out = tmp_path / "pictures"
    _run("predict", f"--model_dir={model_dir}", f"--out_dir={out}", "--max_images=2",
         f"--checkpoint={model_dir}/best", str(data / "val2017"), **programs,
         bindings=bindings + ["predict.score_threshold = 0.0"])
    report = json.loads((out / "detections.json").read_text())
    assert report["checkpoint"] == f"{model_dir}/best/ckpt-4", report["checkpoint"]
    assert report["keypoint_names"] == ["top", "left", "bottom", "right"]
    images = report["images"]
    assert images and all(d and "segmentation" not in d and len(d["keypoints_yxs"]) == 4
                          for d in (e["detections"][0] for e in images))
    export_dir = tmp_path / "saved_model"
    proc = _run("export", f"--model_dir={model_dir}", f"--export_dir={export_dir}",
                f"--checkpoint={model_dir}/best", bindings=bindings, **programs)
    assert f"{model_dir}/best/ckpt-4" in proc.stdout + proc.stderr
    # The signatures' outputs, read from the file (loading a SavedModel in a
    # fresh process is the export round trip's test).
    from tensorflow.core.protobuf import saved_model_pb2
    saved = saved_model_pb2.SavedModel()
    saved.ParseFromString((export_dir / "saved_model.pb").read_bytes())
    signatures = saved.meta_graphs[0].signature_def
    for name in ("serve_images", "serve_encoded"):
        outputs = set(signatures[name].outputs)
        assert "detection_boxes" in outputs and "detection_masks" not in outputs, outputs
        assert "detection_keypoints" in outputs, outputs


def test_retinanet_train_eval_export(run, tmp_path):
    """RetinaNet (gin/shapes_retinanet_demo.gin) through the programs: its
    training starts from the Mask R-CNN run's backbone and FPN and evaluates
    its last checkpoint; box AP only, and no masks in the export. (bin/predict
    runs a box-only model in the keypoint test; its threshold reaching a
    RetinaNet is test_predictor's.)"""
    bindings = TINY + [f"DATA_DIR = '{run['data']}'", "CANVAS = (128, 128)",
                       "RetinaNetHead.num_convs = 1", "RetinaNet.topk_candidates = 50",
                       "RetinaNet.max_detections = 10"]
    programs = {"gin_file": "gin/shapes_retinanet_demo.gin"}
    model_dir = tmp_path / "run"
    proc = _run("train", f"--model_dir={model_dir}", **programs, bindings=bindings + [
        "train.total_steps = 2", "train.eval_fn = @evaluate",
        "train.init_fn = @init_from_checkpoint", f"init_from_checkpoint.path = '{run['model_dir']}'",
        "init_from_checkpoint.modules = ('backbone', 'fpn')"])
    assert f"of backbone, fpn from {run['model_dir']}/ckpt-{STEPS}" in proc.stderr, \
        proc.stderr[-2000:]
    # P6 and P7 are RetinaNet's own; P2's lateral is Mask R-CNN's alone.
    kept = re.search(r"Kept \d+ variables fresh, the checkpoint does not hold them:\n"
                     r"((?:  .*\n)+)", proc.stderr)
    assert kept and {line.strip().split("/")[2] for line in kept.group(1).splitlines()} == {
        "p6", "p7"}, proc.stderr[-2000:]
    assert " retinanet_class " in proc.stderr and " retinanet_box " in proc.stderr
    metrics = json.loads((model_dir / "eval" / "metrics-2.json").read_text())
    assert "bbox" in metrics and "segm" not in metrics and metrics["num_images"] == 6
    export_dir = tmp_path / "saved_model"
    _run("export", f"--model_dir={model_dir}", f"--export_dir={export_dir}",
         bindings=bindings, **programs)
    from tensorflow.core.protobuf import saved_model_pb2
    saved = saved_model_pb2.SavedModel()
    saved.ParseFromString((export_dir / "saved_model.pb").read_bytes())
    outputs = set(saved.meta_graphs[0].signature_def["serve_images"].outputs)
    assert {"detection_boxes", "detection_scores", "detection_classes",
            "num_detections"} <= outputs and "detection_masks" not in outputs, outputs


@pytest.mark.slow   # 16 s; the batches it draws are the pipeline's, tested in CI
def test_visualize_data_draws_the_training_batches(run, tmp_path):
    plain, jittered = tmp_path / "plain", tmp_path / "jittered"
    proc = _run("visualize_data", f"--out_dir={plain}", "--num_images=3",
                bindings=run["bindings"])
    assert "3 pictures" in proc.stdout
    pictures = sorted(plain.glob("*.png"))
    assert len(pictures) == 3
    ids = {int(p.stem.split("_")[1]) for p in pictures}
    train = json.loads((run["data"] / "annotations" / "instances_train2017.json").read_text())
    assert ids <= {im["id"] for im in train["images"]}
    # Drawn: boxes and masks change pixels of the source image at the same size.
    for p in pictures:
        image_id = int(p.stem.split("_")[1])
        name = next(im["file_name"] for im in train["images"] if im["id"] == image_id)
        source = np.asarray(Image.open(run["data"] / "train2017" / name))
        drawn = np.asarray(Image.open(p))
        assert drawn.shape == source.shape
        # (the pipeline may have flipped it)
        changed = min((drawn != s).any(axis=-1).mean() for s in (source, source[:, ::-1]))
        assert changed > 0.01
    _run("visualize_data", f"--out_dir={jittered}", "--num_images=2",
         bindings=run["bindings"] + ["train/CocoInput.scale_jitter = (1.5, 2.0)",
                                     "CocoInput.group_by_orientation = False"])
    for p in jittered.glob("*.png"):
        assert np.asarray(Image.open(p)).shape == (64, 64, 3)   # cropped to the canvas


_LOAD_AND_RUN = """
import sys, numpy as np, tensorflow as tf
from PIL import Image
from pycocotools import mask as mask_util
loaded = tf.saved_model.load(sys.argv[1])
out = {}
for k, file in enumerate(sys.argv[3:]):
    image = np.asarray(Image.open(file).convert('RGB'))
    out.update({f'{k}_{name}': v.numpy() for name, v in
                loaded.serve_images(tf.constant(image[None])).items()})
    out.update({f'{k}_encoded_{name}': v.numpy() for name, v in
                loaded.serve_encoded(tf.constant([open(file, 'rb').read()])).items()})
np.savez(sys.argv[2], **out)
"""


def test_export_round_trip_in_fresh_process(run, tmp_path):
    # A model trained 40 steps may score every detection under the default
    # 0.05 and keep none; with no threshold it keeps max_detections each time.
    # MAX_SIZE 128 in a 128 x 128 bound: canvases 64 x 128 and 128 x 64.
    bindings = run["bindings"] + ["RoiHeads.score_threshold = 0.0", "MAX_SIZE = 128",
                                  "CANVAS = (128, 128)"]
    export_dir = tmp_path / "saved_model"
    _run("export", f"--model_dir={run['model_dir']}", f"--export_dir={export_dir}",
         bindings=bindings)
    # A landscape and a portrait JPEG, cut from val images.
    val = [np.asarray(Image.open(f)) for f in sorted((run["data"] / "val2017").glob("*.jpg"))]
    files = [tmp_path / "landscape.jpg", tmp_path / "portrait.jpg"]
    Image.fromarray(val[0][16:48]).save(files[0])
    Image.fromarray(val[1][:, 16:48]).save(files[1])
    out_file = tmp_path / "out.npz"
    subprocess.run([sys.executable, "-c", _LOAD_AND_RUN, str(export_dir), str(out_file)]
                   + [str(f) for f in files], check=True, cwd=ROOT, capture_output=True,
                   env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    served = np.load(out_file)
    # No function of the SavedModel needs XLA (the model's islands are off).
    from tensorflow.core.protobuf import saved_model_pb2
    saved = saved_model_pb2.SavedModel()
    saved.ParseFromString((export_dir / "saved_model.pb").read_bytes())
    functions = saved.meta_graphs[0].graph_def.library.function
    assert functions and not [f.signature.name for f in functions
                              if f.attr["_XlaMustCompile"].b]

    # The same detections from the model restored in this process, each
    # image on its orientation's canvas.
    import gin
    import tensorflow as tf
    from mrcnn import programs
    from mrcnn.data import pipeline
    from mrcnn.evaluation import runner
    from mrcnn.modeling import compile_ops
    gin.clear_config()
    programs.parse_gin_files([os.path.join(ROOT, "gin", "shapes_demo.gin")], bindings)
    ours = []
    try:
        model, _, _ = runner.restore_model(_model_fn, str(run["model_dir"]), (64, 128))
        # As served: a graph without XLA islands (eager kernels and XLA round
        # differently, and a model trained 40 steps has near-tied scores that
        # rounding reorders).
        detect = tf.function(lambda x: model(x, training=False))
        for file, canvas in zip(files, [(64, 128), (128, 64)]):
            image = np.asarray(Image.open(file).convert("RGB"))
            images, info = pipeline.preprocess_image(image, min_size=64, max_size=128,
                                                     canvas_size=canvas)
            with compile_ops(False):
                out = detect({"images": images[None], "image_info": info[None]})
            ours.append({k: v.numpy()[0] for k, v in out.items()})
    finally:
        gin.clear_config()
    for k, mine in enumerate(ours):
        assert int(mine["num_detections"]) > 0, "the fixture model detects nothing"
        # Both signatures must see the pixels bin/eval sees (PIL's JPEG decoding).
        for prefix in (f"{k}_", f"{k}_encoded_"):
            for key, atol in (("num_detections", 0), ("detection_classes", 0),
                              ("detection_scores", 1e-5), ("detection_boxes", 1e-3),
                              ("detection_masks", 1e-4)):
                np.testing.assert_allclose(served[prefix + key][0], mine[key], atol=atol,
                                           rtol=0, err_msg=prefix + key)
        n = int(served[f"{k}_num_detections"][0])
        assert set(served[f"{k}_detection_category_ids"][0, :n].tolist()) <= {1, 3, 7}


def _model_fn():
    from mrcnn.modeling.mask_rcnn import MaskRCNN
    return MaskRCNN()


@pytest.mark.parametrize("program,args,bindings,message", [
    ("eval", ["--model_dir=/nonexistent/run"], [], "no checkpoint at /nonexistent/run"),
    ("train", ["--model_dir={tmp}/x"], ["NUM_CLASSES = 5"], "has 3: set NUM_CLASSES = 3"),
    ("train", ["--model_dir={tmp}/y"], ["train.total_stepz = 3"], "total_stepz"),
])
def test_bad_input_gives_one_clear_error(run, tmp_path, program, args, bindings, message):
    args = [a.format(tmp=tmp_path) for a in args]
    proc = _run(program, *args, bindings=run["bindings"] + bindings, check=False)
    assert proc.returncode == 1
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_eval_watch_evaluates_the_newest_checkpoint_then_stops(run, evaluated):
    # The fixture keeps ckpt-20 and ckpt-40; --watch starts at the newest,
    # the run's last (done.json), and stops there.
    assert evaluated.stderr.count("Evaluating ") == 1, evaluated.stderr[-2000:]
    assert "Evaluated the run's last checkpoint: done watching" in evaluated.stderr
    assert f"ckpt-{STEPS} (step {STEPS})" in evaluated.stderr
    assert not (run["model_dir"] / "eval" / "metrics-20.json").exists()
    # evaluate.best_metric: the one evaluation is the best so far.
    metrics = json.loads((run["model_dir"] / "eval" / f"metrics-{STEPS}.json").read_text())
    best = json.loads((run["model_dir"] / "best" / "best.json").read_text())
    assert (best["step"], best["metric"]) == (STEPS, "segm/AP")
    assert best["value"] == metrics["segm"]["AP"]
    assert (run["model_dir"] / "best" / f"ckpt-{STEPS}.index").exists()


# Both cases (25-30 s each) are a benchmark's: `make test-slow`; the
# harness under them is tests/benchmarks'.
@pytest.mark.slow
@pytest.mark.parametrize("what,mode", [("train", "--eager"), ("infer", "--noxla")])
def test_bench_model_reports_speed_memory_and_parameters(tmp_path, what, mode):
    out = tmp_path / "bench.json"
    profile = ([f"--profile_dir={tmp_path / 'trace'}", "--profile_steps=2"]
               if what == "infer" else [])
    # 60 x 64 images, as 800 x 1216 ones, pad to a multiple of 64 (P6).
    proc = _run("bench", f"--what={what}", mode, "--image_size=60,64", "--batch=2",
                "--runs=1", "--warmup=0", "--dtype=float32", f"--json={out}", "--flops", *profile,
                # A training step with a weight average and two batches per
                # update (bin/train's step then).
                bindings=TINY + ["train.ema_decay = 0.99", "train.accumulate_steps = 2"])
    report = json.loads(out.read_text())
    if profile:
        scopes = [name for name, _, _ in report["profile"]["by_scope"]]
        assert any(s.startswith("mask_rcnn") and "/" in s for s in scopes), scopes
        assert "op time per step" in proc.stdout
        assert list((tmp_path / "trace").glob("plugins/profile/*/*.xplane.pb"))
    assert report["mode"] == {"--eager": "eager", "--noxla": "graph"}[mode]
    assert report["batch_per_replica"] == 2 and report["median_s"] > 0
    assert report["image_size"] == [60, 64] and report["canvas"] == [64, 64]
    assert report["images_per_s" if what == "train" else "ms_per_image"] > 0
    assert 0 < report["trainable_parameters"] <= report["parameters"]
    assert report["peak_memory_bytes"] > 0
    assert report["gflops_per_image"] > 0
    assert report["ema_decay"] == (0.99 if what == "train" else None)
    assert report["accumulate_steps"] == (2 if what == "train" else 1)


def test_xla_cache_dir_is_local(monkeypatch, tmp_path):
    from mrcnn import programs
    monkeypatch.setenv("TF_XLA_FLAGS", "--tf_xla_persistent_cache_directory=/old --other")
    with pytest.raises(ValueError, match="gs://bucket/cache: give a local directory"):
        programs.use_xla_cache("gs://bucket/cache")
    assert programs.use_xla_cache(str(tmp_path / "c")) == str(tmp_path / "c")
    assert os.environ["TF_XLA_FLAGS"] == (
        f"--other --tf_xla_persistent_cache_directory={tmp_path / 'c'}")
