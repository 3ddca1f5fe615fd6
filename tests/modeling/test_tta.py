"""Test-time augmentation: the resize and flip against NumPy, the merge against
a greedy NMS reference, and the whole against the model's own inference."""

import keras
import numpy as np
import tensorflow as tf

from mrcnn.modeling import tta as tta_lib
from mrcnn.modeling.mask_rcnn import build_mask_rcnn
from mrcnn.ops.boxes import clip_boxes
from tests.modeling.test_mask_rcnn import _NUM_CLASSES, _SMALL, synthetic_batch


def _weights(in_len, out_len):
    """float64 [out_len, in_len]: the normalised triangle of radius max(1, in/out)."""
    inv = in_len / out_len
    radius = max(inv, 1.0)
    w = np.zeros((out_len, in_len))
    for y in range(out_len):
        centre = (y + 0.5) * inv
        for j in range(in_len):
            w[y, j] = max(0.0, 1.0 - abs(j + 0.5 - centre) / radius)
        w[y] /= w[y].sum()
    return w


def _reference_resize(image, out_h, out_w):
    h, w = image.shape[:2]
    return np.einsum("yh,hwc,xw->yxc", _weights(h, out_h), image.astype(np.float64),
                     _weights(w, out_w))


def _padded_batch(rng, sizes, canvas, fill=255.0):
    """float32 [B, H, W, 3] random images of `sizes` on `canvas`, padding = fill."""
    images = np.full((len(sizes),) + canvas + (3,), fill, np.float32)
    for b, (h, w) in enumerate(sizes):
        images[b, :h, :w] = rng.uniform(0, 255, (h, w, 3))
    info = np.array([[2 * h, 2 * w, h, w, 0.5] for h, w in sizes], np.float32)
    return images, info


class ResizeTest(tf.test.TestCase):

    def test_against_numpy_and_tf_image_resize(self):
        rng = np.random.default_rng(0)
        sizes = [(64, 48), (37, 64), (1, 5)]
        images, info = _padded_batch(rng, sizes, (64, 64))
        for factor in (1.5, 0.5, 0.625, 1.0):
            canvas = (int(np.ceil(64 * factor)), int(np.ceil(64 * factor)))
            for fn in (tta_lib.resize_images,
                       tf.function(tta_lib.resize_images, jit_compile=True,
                                   reduce_retracing=False)):
                out, new_info = fn(tf.constant(images), tf.constant(info), factor, canvas)
                out, new_info = out.numpy(), new_info.numpy()
                self.assertEqual(out.shape, (3,) + canvas + (3,))
                for b, (h, w) in enumerate(sizes):
                    nh, nw = max(round(h * factor), 1), max(round(w * factor), 1)
                    np.testing.assert_array_equal(new_info[b], [2 * h, 2 * w, nh, nw,
                                                                0.5 * factor])
                    want = _reference_resize(images[b, :h, :w], nh, nw)
                    np.testing.assert_allclose(out[b, :nh, :nw], want, atol=2e-3,
                                               err_msg=f"factor {factor} image {b}")
                    # TensorFlow's own antialiased bilinear resize of the image alone.
                    tf_resized = tf.image.resize(images[b, :h, :w], (nh, nw),
                                                 antialias=True).numpy()
                    np.testing.assert_allclose(out[b, :nh, :nw], tf_resized, atol=2e-2)
                    # Nothing around the image, whatever the padding held.
                    self.assertFalse(out[b, nh:].any() or out[b, :, nw:].any())

    def test_uint8_rounds_and_empty_images_stay_zero(self):
        rng = np.random.default_rng(1)
        images, info = _padded_batch(rng, [(20, 30)], (64, 64))
        info = np.concatenate([info, np.zeros((1, 5), np.float32)])   # a padding image
        images = np.concatenate([images, np.full_like(images, 7)]).astype(np.uint8)
        out, new_info = tta_lib.resize_images(tf.constant(images), tf.constant(info),
                                              1.5, (128, 128))
        self.assertEqual(out.dtype, tf.uint8)
        want = _reference_resize(images[0, :20, :30], 30, 45)
        self.assertLessEqual(np.abs(out.numpy()[0, :30, :45] - want).max(), 0.5 + 1e-3)
        self.assertFalse(out.numpy()[1].any())
        np.testing.assert_array_equal(new_info.numpy()[1], np.zeros(5))


class FlipTest(tf.test.TestCase):

    def test_images_mirror_inside_their_width(self):
        images = np.arange(2 * 2 * 6 * 1, dtype=np.float32).reshape(2, 2, 6, 1)
        images = np.repeat(images, 3, axis=-1)
        info = np.array([[2, 4, 2, 4, 1.0], [2, 6, 2, 6, 1.0]], np.float32)
        out = tta_lib.flip_images(tf.constant(images), tf.constant(info)).numpy()
        np.testing.assert_array_equal(out[0, :, :4], images[0, :, 3::-1])
        np.testing.assert_array_equal(out[0, :, 4:], images[0, :, 4:])
        np.testing.assert_array_equal(out[1], images[1, :, ::-1])

    def test_boxes_mirror_with_their_pixels(self):
        boxes = tf.constant([[[1.0, 0.0, 2.0, 1.5]], [[0.0, 2.0, 3.0, 6.0]]])
        out = tta_lib.flip_boxes(boxes, tf.constant([4.0, 6.0])).numpy()
        np.testing.assert_allclose(out, [[[1.0, 2.5, 2.0, 4.0]], [[0.0, 0.0, 3.0, 4.0]]])
        np.testing.assert_allclose(
            tta_lib.flip_boxes(tf.constant(out), tf.constant([4.0, 6.0])), boxes)


def _iou(a, b):
    a, b = a.astype(np.float64), b.astype(np.float64)
    h = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    w = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - h * w
    return h * w / union if union > 0 else 0.0


def _reference_merge(boxes, scores, classes, valid, max_detections, iou):
    """Greedy NMS per class (float64), then the best max_detections."""
    kept = []
    for c in sorted(set(classes[valid].tolist())):
        idx = [i for i in np.argsort(-scores, kind="stable")
               if valid[i] and classes[i] == c and scores[i] > 1e-8]
        chosen = []
        for i in idx:
            if all(_iou(boxes[i], boxes[j]) <= iou for j in chosen):
                chosen.append(i)
        kept += chosen
    kept.sort(key=lambda i: -scores[i])
    return kept[:max_detections]


class MergeTest(tf.test.TestCase):

    def test_against_greedy_reference(self):
        rng = np.random.default_rng(2)
        n, num_classes, d = 60, 3, 10
        centres = rng.uniform(10, 90, (6, 2))
        pick = rng.integers(0, 6, n)
        yx = centres[pick] + rng.normal(0, 3, (n, 2))
        hw = rng.uniform(10, 30, (n, 2))
        boxes = np.concatenate([yx - hw / 2, yx + hw / 2], 1).astype(np.float32)
        scores = rng.uniform(0.05, 1, n).astype(np.float32)
        classes = rng.integers(1, num_classes + 1, n).astype(np.int32)
        valid = rng.uniform(size=n) < 0.85
        out = tta_lib.merge_detections(
            tf.constant(boxes[None]), tf.constant(scores[None]), tf.constant(classes[None]),
            tf.constant(valid[None]), num_classes, d, 0.5)
        out_boxes, out_scores, out_classes, num = (t.numpy()[0] for t in out)
        want = _reference_merge(boxes, scores, classes, valid, d, 0.5)
        self.assertEqual(num, len(want))
        np.testing.assert_allclose(out_boxes[:num], boxes[want])
        np.testing.assert_allclose(out_scores[:num], scores[want])
        np.testing.assert_array_equal(out_classes[:num], classes[want])
        self.assertFalse(out_scores[num:].any() or out_classes[num:].any())


class TestTimeAugmentationTest(tf.test.TestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        keras.utils.set_random_seed(0)
        cls.model = build_mask_rcnn(**_SMALL)
        batch = synthetic_batch()
        # The second image smaller than the canvas, as most are.
        images = batch["images"].numpy()
        images[1, :, 96:] = 0
        info = np.array([[128, 128, 128, 128, 1.0], [64, 48, 128, 96, 2.0]], np.float32)
        cls.batch = {"images": tf.constant(images), "image_info": tf.constant(info)}
        cls.plain = {k: v.numpy() for k, v in cls.model(cls.batch, training=False).items()}

    def test_one_size_without_flip_is_plain_inference(self):
        tta = tta_lib.TestTimeAugmentation(min_sizes=(128,), flip=False)
        out = tta(self.model, self.batch, base_min_size=128)
        self.assertEqual(sorted(out), sorted(self.plain))
        self.assertGreater(self.plain["num_detections"].min(), 0)
        for k, v in out.items():
            np.testing.assert_allclose(v.numpy(), self.plain[k], atol=1e-6, err_msg=k)

    def test_flip_and_sizes_merge_every_augmentation(self):
        tta = tta_lib.TestTimeAugmentation(min_sizes=(64, 128), flip=True)
        self.assertEqual(tta.num_augmentations, 4)
        # Eager: tracing four augmentations takes 25 s on this CPU; the
        # evaluation test runs it in a tf.function.
        out = {k: v.numpy() for k, v in tta(self.model, self.batch, 128).items()}
        d = self.model.roi_heads.max_detections
        self.assertEqual(out["detection_boxes"].shape, (2, d, 4))
        self.assertEqual(out["detection_masks"].shape, (2, d, 28, 28))

        # Each augmentation's own detections, in original pixels, from the model.
        candidates, stages = [], []
        for images, info, flipped in tta.augmentations(self.batch, 128, 64):
            batch = {"images": images, "image_info": info}
            det = self.model(batch, training=False)
            if flipped:   # the plain model on the mirrored batch, mirrored back
                scale = info[:, 4][:, None, None]
                det = dict(det, detection_boxes=clip_boxes(tta_lib.flip_boxes(
                    det["detection_boxes"] * scale, info[:, 3]) / scale, info[:, 0:2]))
            candidates.append({k: v.numpy() for k, v in det.items()})
            stages.append((batch, flipped))
        self.assertEqual(images.shape[1:3], (128, 128))
        self.assertEqual(tta.augmentations(self.batch, 128, 64)[0][0].shape[1:3], (64, 64))
        for b in range(2):
            union = {k: np.concatenate([c[k][b, :c["num_detections"][b]] for c in candidates])
                     for k in ("detection_boxes", "detection_scores", "detection_classes")}
            want = _reference_merge(union["detection_boxes"], union["detection_scores"],
                                    union["detection_classes"],
                                    np.ones(len(union["detection_scores"]), bool), d,
                                    self.model.roi_heads.nms_iou)
            n = out["num_detections"][b]
            self.assertEqual(n, len(want))
            np.testing.assert_allclose(out["detection_boxes"][b, :n],
                                       union["detection_boxes"][want], atol=2e-4)
            np.testing.assert_allclose(out["detection_scores"][b, :n],
                                       union["detection_scores"][want], atol=1e-6)
            np.testing.assert_array_equal(out["detection_classes"][b, :n],
                                          union["detection_classes"][want])

        # Masks: the mean of the mask head on the merged boxes in each
        # augmentation, mirrored ones mirrored back.
        heads, total = self.model.roi_heads, 0.0
        for batch, flipped in stages:
            info = batch["image_info"]
            features, _, _ = self.model.proposals(batch)
            boxes = out["detection_boxes"] * info[:, 4][:, None, None]
            if flipped:
                boxes = tta_lib.flip_boxes(boxes, info[:, 3])
            probabilities = heads.detect_masks(features, boxes, out["detection_classes"])
            total += probabilities.numpy()[..., ::-1] if flipped else probabilities.numpy()
        np.testing.assert_allclose(out["detection_masks"], total / 4, atol=1e-5)

    def test_features_computed_again_give_the_same_detections(self):
        kept = tta_lib.TestTimeAugmentation(min_sizes=(64, 128), flip=True)
        again = tta_lib.TestTimeAugmentation(min_sizes=(64, 128), flip=True,
                                             keep_features=False)
        a, b = kept(self.model, self.batch, 128), again(self.model, self.batch, 128)
        for k in a:
            np.testing.assert_allclose(a[k].numpy(), b[k].numpy(), atol=1e-6, err_msg=k)

    def test_box_only_model_and_bad_sizes(self):
        keras.utils.set_random_seed(1)
        model = build_mask_rcnn(**dict(_SMALL, masks=False))
        tta = tta_lib.TestTimeAugmentation(min_sizes=(128,), flip=True)
        out = tta(model, self.batch, base_min_size=128)
        self.assertNotIn("detection_masks", out)
        self.assertLessEqual(out["detection_classes"].numpy().max(), _NUM_CLASSES)
        with self.assertRaisesRegex(ValueError, "min_sizes"):
            tta_lib.TestTimeAugmentation(min_sizes=())
