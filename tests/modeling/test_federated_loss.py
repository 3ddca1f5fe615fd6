"""Sigmoid classification and the federated loss (Detectron2's
USE_SIGMOID_CE / USE_FED_LOSS): the loss against a float64 NumPy reference,
the class draw against its probabilities, and the heads and trainer wired to
them."""

import types

import keras
import numpy as np
import pytest
import tensorflow as tf

from mrcnn.data import pipeline
from mrcnn.modeling import losses
from mrcnn.modeling.mask_rcnn import build_mask_rcnn
from mrcnn.modeling.roi_heads import BoxHead, MaskHead, RoiHeads
from mrcnn.training import trainer
from tests.modeling.test_mask_rcnn import _SMALL, synthetic_batch


def _sigmoid_reference(logits, classes, valid, scored):
    """float64: sum over scored classes 1..C of the binary cross-entropies,
    over the valid rois, divided by their number."""
    logits = logits.astype(np.float64)
    total, count = 0.0, 0
    num_classes = logits.shape[-1] - 1
    for b in range(logits.shape[0]):
        for k in range(logits.shape[1]):
            if not valid[b, k]:
                continue
            count += 1
            for c in range(1, num_classes + 1):
                if scored is not None and not scored[c - 1]:
                    continue
                x, y = logits[b, k, c], float(classes[b, k] == c)
                total += max(x, 0) - x * y + np.log1p(np.exp(-abs(x)))
    return total / max(count, 1)


@pytest.mark.parametrize("with_scored", [False, True])
@pytest.mark.parametrize("xla", [False, True])
def test_sigmoid_loss_matches_numpy(with_scored, xla):
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (2, 6, 5)).astype(np.float32)
    classes = np.array([[1, 0, 4, -1, 2, 0], [3, 3, 0, 0, -1, -1]], np.int32)
    valid = classes >= 0
    scored = np.array([True, False, True, True]) if with_scored else None
    fn = tf.function(losses.rcnn_sigmoid_class_loss, jit_compile=True) if xla \
        else losses.rcnn_sigmoid_class_loss
    got = fn(tf.constant(logits, tf.bfloat16) if xla else logits, classes, valid,
             scored)
    want = _sigmoid_reference(
        tf.cast(tf.constant(logits, tf.bfloat16), tf.float32).numpy() if xla else logits,
        classes, valid, scored)
    assert got.dtype == tf.float32
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5)
    assert float(losses.rcnn_sigmoid_class_loss(logits, classes, valid & False)) == 0.0


def _fed(classes, valid, weights, num_scored, xla=False):
    fn = tf.function(losses.federated_classes, jit_compile=xla)
    return fn(tf.constant(classes), tf.constant(valid), tf.constant(weights, tf.float32),
              num_scored).numpy()


@pytest.mark.parametrize("xla", [False, True])
def test_federated_classes_keep_the_rois_classes_and_fill_up(xla):
    classes = np.array([[2, 0, 5, -1], [2, 7, 0, 3]], np.int32)
    valid = np.array([[True, True, True, False], [True, True, True, False]])
    weights = np.ones(10, np.float32)
    weights[8] = 0.0   # class 9 is never drawn
    # Present: 2, 5, 7 and background (class 3 is padding): 4 of 8, so 4 drawn.
    for _ in range(20):
        scored = _fed(classes, valid, weights, 8, xla)
        assert scored.shape == (10,) and scored.dtype == bool
        assert scored[[1, 4, 6]].all() and not scored[8]
        assert scored.sum() == 7
    # More classes present than num_scored: those, and nothing drawn.
    assert np.flatnonzero(_fed(classes, valid, weights, 2, xla)).tolist() == [1, 4, 6]
    # Fewer classes with weight than wanted: all of them.
    assert _fed(classes, valid, np.eye(10, dtype=np.float32)[0], 8, xla).tolist() == \
        [c in (0, 1, 4, 6) for c in range(10)]


def test_federated_draw_is_without_replacement_by_weight():
    # Only background rois: num_scored 3 draws 2 of 4 classes weighted 1..4.
    # P(class 1 drawn) = 1/10 + sum_i w_i/10 * 1/(10 - w_i) over i = 2..4.
    classes = np.zeros((1, 4), np.int32)
    valid = np.ones((1, 4), bool)
    weights = tf.constant([1.0, 2.0, 3.0, 4.0])
    draw = tf.function(lambda: losses.federated_classes(classes, valid, weights, 3))
    tf.random.set_seed(1)
    n = 3000
    counts = np.zeros(4)
    for _ in range(n):
        scored = draw().numpy()
        assert scored.sum() == 2
        counts += scored
    w = np.array([1.0, 2.0, 3.0, 4.0])
    want = [w[c] / 10 + sum(w[i] / 10 * w[c] / (10 - w[i]) for i in range(4) if i != c)
            for c in range(4)]
    np.testing.assert_allclose(counts / n, want, atol=0.03)
    assert abs(counts[0] / n - 0.2345) < 0.03   # not the 0.2 with replacement


def test_heads_score_with_sigmoids_and_check_their_settings():
    def heads(**kwargs):
        return RoiHeads(box_head=BoxHead(num_classes=4, fc_dim=16),
                        mask_head=MaskHead(num_classes=4, channels=8), **kwargs)
    logits = tf.random.stateless_normal([2, 3, 5], seed=[0, 1])
    np.testing.assert_allclose(heads(class_loss="sigmoid").class_scores(logits),
                               tf.sigmoid(logits[..., 1:]), rtol=1e-6)
    np.testing.assert_allclose(heads().class_scores(logits),
                               tf.nn.softmax(logits)[..., 1:], rtol=1e-6)
    with pytest.raises(ValueError, match="class_loss="):
        heads(class_loss="focal")
    with pytest.raises(ValueError, match="fed_loss_classes=50 needs"):
        heads(fed_loss_classes=50)
    fed = heads(class_loss="sigmoid", fed_loss_classes=3, fed_loss_power=0.25)
    config = fed.get_config()
    assert (config["class_loss"], config["fed_loss_classes"], config["fed_loss_power"]) \
        == ("sigmoid", 3, 0.25)
    again = RoiHeads.from_config(config)
    assert again.fed_loss_classes == 3 and again.class_image_counts.shape == (4,)
    assert heads().class_image_counts is None


def test_model_with_the_federated_loss_trains_every_variable():
    keras.utils.set_random_seed(0)
    model = build_mask_rcnn(**{**_SMALL, "num_classes": 8}, class_loss="sigmoid",
                            fed_loss_classes=5)
    batch = synthetic_batch()
    with tf.GradientTape() as tape:
        losses_ = model.compute_losses(batch)
        total = tf.add_n(list(losses_.values()))
    grads = tape.gradient(total, model.trainable_variables)
    for var, grad in zip(model.trainable_variables, grads):
        assert grad is not None and np.isfinite(grad.numpy()).all(), var.path
    counts = model.roi_heads.class_image_counts
    assert not counts.trainable and any(v is counts for v in model.non_trainable_variables)
    # With 8 classes at bias 0, a background roi's loss is at most 5 log 2
    # (the five scored classes), far below 8 log 2.
    assert 0 < float(losses_["rcnn_class"]) < 5 * np.log(2) + 0.5
    detections = model.detect(batch)
    scores = detections["detection_scores"].numpy()
    assert ((scores >= 0) & (scores < 1)).all()


def test_trainer_gives_the_heads_the_training_image_counts():
    records = [types.SimpleNamespace(classes=np.array(c, np.int32))
               for c in ([1, 1, 3], [3], [], [2, 3])]
    np.testing.assert_array_equal(pipeline.class_image_counts(records, 4), [1, 1, 3, 0])
    keras.utils.set_random_seed(0)
    model = build_mask_rcnn(**{**_SMALL, "num_classes": 4}, class_loss="sigmoid",
                            fed_loss_classes=2)
    data = types.SimpleNamespace(class_image_counts=pipeline.class_image_counts(records, 4))
    trainer._set_class_image_counts(model, data)
    np.testing.assert_array_equal(model.roi_heads.class_image_counts.numpy(), [1, 1, 3, 0])
    with pytest.raises(ValueError, match="class_image_counts"):
        trainer._set_class_image_counts(model, types.SimpleNamespace())
    plain = build_mask_rcnn(**{**_SMALL, "num_classes": 4})
    trainer._set_class_image_counts(plain, types.SimpleNamespace())   # nothing to set
