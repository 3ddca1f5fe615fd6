"""init_from_checkpoint: a trained run's weights start a run on other classes."""

import os

import gin
import keras
import numpy as np
import pytest
import tensorflow as tf

from mrcnn import programs
from mrcnn.evaluation import runner
from mrcnn.modeling.mask_rcnn import build_mask_rcnn
from mrcnn.training import initialization

_TINY = dict(depth=18, width=16, fpn_channels=16, fc_dim=32, mask_channels=16,
             num_samples=16, pre_nms_topk_train=50, pre_nms_topk_test=50,
             post_nms_topk_train=20, post_nms_topk_test=20, rpn_num_samples=32,
             max_detections=5)
# Variables whose shape follows the class count: the box head's class
# logits and class-specific deltas, the mask predictor.
_CLASS_LAYERS = ("roi_heads/box_head/class_logits/", "roi_heads/box_head/box_deltas/",
                 "roi_heads/mask_head/predictor/")


def _model(num_classes, seed):
    keras.utils.set_random_seed(seed)
    model = build_mask_rcnn(num_classes=num_classes, **_TINY)
    model(runner._zero_inference_batch((64, 64)), training=False)
    return model


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A 3-class model saved as `train` saves it: beside an optimizer that
    tracks the same variables, so the checkpoint keys are the optimizer's."""
    model = _model(3, seed=1)
    optimizer = keras.optimizers.SGD(0.1, momentum=0.9)
    optimizer.build(model.trainable_variables)
    step = tf.Variable(7, dtype=tf.int64)
    directory = str(tmp_path_factory.mktemp("source"))
    manager = tf.train.CheckpointManager(
        tf.train.Checkpoint(model=model, optimizer=optimizer, step=step), directory, 2)
    manager.save(checkpoint_number=7)
    return {"model": model, "dir": directory,
            "values": [v.numpy() for v in model.variables]}


def test_other_class_count_loads_all_but_the_class_layers(source):
    target = _model(5, seed=2)
    fresh = [v.numpy() for v in target.variables]
    report = initialization.init_from_checkpoint(target, path=source["dir"])
    assert report["missing"] == []
    mismatched = sorted(m.split(" ")[0] for m in report["mismatched"])
    assert mismatched and all(m.startswith(_CLASS_LAYERS) for m in mismatched)
    assert {m.rsplit("/", 1)[0] for m in mismatched} == {c.rstrip("/") for c in _CLASS_LAYERS}
    assert len(report["loaded"]) + len(mismatched) == len(target.variables)
    # Both models list their variables in one order (one config, built
    # alike), so values compare one to one.
    for variable, want, initial in zip(target.variables, source["values"], fresh):
        if variable.shape != want.shape:
            np.testing.assert_array_equal(variable.numpy(), initial, err_msg=variable.path)
        else:
            np.testing.assert_array_equal(variable.numpy(), want, err_msg=variable.path)


def test_same_class_count_loads_every_variable_and_detects_alike(source):
    target = _model(3, seed=2)
    report = initialization.init_from_checkpoint(
        target, path=os.path.join(source["dir"], "ckpt-7"))
    assert report["mismatched"] == [] and report["missing"] == []
    assert len(report["loaded"]) == len(target.variables)
    rng = np.random.default_rng(0)
    batch = {"images": tf.constant(rng.normal(size=(1, 64, 64, 3)), tf.float32),
             "image_info": tf.constant([[64, 64, 64, 64, 1.0]], tf.float32)}
    ours, theirs = target(batch, training=False), source["model"](batch, training=False)
    for k in ("detection_boxes", "detection_scores", "detection_masks"):
        np.testing.assert_allclose(ours[k].numpy(), theirs[k].numpy(), atol=1e-5, err_msg=k)


def test_modules_limit_what_is_loaded(source):
    target = _model(3, seed=2)
    fresh = [v.numpy() for v in target.variables]
    report = initialization.init_from_checkpoint(target, path=source["dir"],
                                                 modules=("backbone", "fpn"))
    assert report["loaded"] and all(p.split("/")[0] in ("backbone", "fpn")
                                    for p in report["loaded"])
    loaded = {id(v) for v in target.backbone.variables + target.fpn.variables}
    for variable, want, initial in zip(target.variables, source["values"], fresh):
        expected = want if id(variable) in loaded else initial
        np.testing.assert_array_equal(variable.numpy(), expected, err_msg=variable.path)


def test_errors_name_the_problem(source, tmp_path):
    target = _model(3, seed=2)
    with pytest.raises(FileNotFoundError, match="no checkpoint at .*nowhere"):
        initialization.init_from_checkpoint(target, path=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="unknown modules \\['heads'\\]"):
        initialization.init_from_checkpoint(target, path=source["dir"], modules=("heads",))
    other = str(tmp_path / "other" / "ckpt")
    tf.train.Checkpoint(model=tf.train.Checkpoint(w=tf.Variable([1.0]))).write(other)
    with pytest.raises(ValueError, match="holds none of the .* variables"):
        initialization.init_from_checkpoint(target, path=other)


def test_gin_binds_it_as_the_training_init():
    gin.clear_config()
    try:
        programs.parse_gin_files(
            [os.path.join(programs.__file__.rsplit("/mrcnn/", 1)[0], "gin",
                          "shapes_demo.gin")],
            ["train.init_fn = @init_from_checkpoint",
             "init_from_checkpoint.path = 'runs/coco'",
             "init_from_checkpoint.modules = ('backbone', 'fpn')"])
        assert gin.query_parameter("init_from_checkpoint.modules") == ("backbone", "fpn")
        assert gin.query_parameter("train.init_fn").selector == "init_from_checkpoint"
    finally:
        gin.clear_config()
