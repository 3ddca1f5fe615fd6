"""mrcnn.evaluation.visualize: drawing changes the right pixels, PNG round-trips."""

import os
import tempfile

import numpy as np
import tensorflow as tf
from absl.testing import parameterized
from PIL import Image

from mrcnn.evaluation import visualize

_NAMES = {1: "square", 2: "diamond"}


def _scene():
    """A 60 x 80 grey image, two boxes, one low-score box and one padded slot."""
    image = np.full((60, 80, 3), 100, np.uint8)
    boxes = np.array([[20, 10, 50, 40],   # drawn
                      [25, 50, 55, 75],   # drawn
                      [2, 60, 12, 78],    # score below threshold
                      [0, 0, 60, 80]],    # padded slot (class -1)
                     np.float32)
    classes = np.array([1, 2, 1, -1], np.int32)
    scores = np.array([0.9, 0.6, 0.3, 0.0], np.float32)
    masks = np.zeros((4, 60, 80), bool)
    for k, (y1, x1, y2, x2) in enumerate(boxes.astype(int)):
        masks[k, y1 + 5:y2 - 5, x1 + 5:x2 - 5] = True
    return image, boxes, classes, scores, masks


class DrawDetectionsTest(tf.test.TestCase, parameterized.TestCase):

    @parameterized.named_parameters(('with_masks', True), ('boxes_only', False))
    def test_changes_pixels_inside_drawn_boxes_only(self, with_masks):
        image, boxes, classes, scores, masks = _scene()
        out = visualize.draw_detections(
            image, boxes, classes, scores, masks if with_masks else None,
            _NAMES)
        self.assertEqual(out.dtype, np.uint8)
        self.assertEqual(out.shape, image.shape)
        self.assertAllEqual(image, _scene()[0])  # input untouched
        changed = np.any(out != image, axis=-1)  # [H, W]
        # Outlines of the two drawn boxes: left edge column x1, rows inside.
        self.assertTrue(np.all(changed[22:48, 10]))
        self.assertTrue(np.all(changed[27:53, 50]))
        # Mask interiors are tinted, and only with masks.
        self.assertEqual(bool(np.all(changed[30:40, 20:30])), with_masks)
        # Low-score box (its interior and right edge) and the padded
        # full-image slot are not drawn: a pixel outside every drawn box and
        # label stays as it was.
        self.assertFalse(np.any(changed[5:10, 70:77]))
        self.assertFalse(np.any(changed[56:60, 0:8]))

    def test_translucent_mask_blend(self):
        image, boxes, classes, scores, masks = _scene()
        out = visualize.draw_detections(image, boxes, classes, scores, masks,
                                        _NAMES, mask_alpha=0.5)
        colour = np.array(visualize.instance_color(0), np.float32)
        expected = np.round(0.5 * 100 + 0.5 * colour)
        self.assertAllClose(out[35, 25].astype(np.float32), expected, atol=1)

    def test_score_threshold_and_determinism(self):
        image, boxes, classes, scores, masks = _scene()
        strict = visualize.draw_detections(image, boxes, classes, scores, masks,
                                           _NAMES, score_threshold=0.95)
        self.assertAllEqual(strict, image)  # nothing reaches 0.95
        loose = visualize.draw_detections(image, boxes, classes, scores, masks,
                                          _NAMES, score_threshold=0.2)
        self.assertTrue(np.any(loose[5:10, 70:77] != image[5:10, 70:77]))
        again = visualize.draw_detections(image, boxes, classes, scores, masks,
                                          _NAMES, score_threshold=0.2)
        self.assertAllEqual(loose, again)

    def test_ground_truth_without_scores(self):
        # scores=None draws every slot with a class (the low-score one too),
        # labels without a score: narrower than the scored labels.
        image, boxes, classes, scores, _ = _scene()
        gt = visualize.draw_detections(image, boxes, classes, None, None, _NAMES)
        scored = visualize.draw_detections(image, boxes, classes, np.ones(4), None, _NAMES)
        self.assertTrue((gt[2:12, 60:78] != 100).any())   # the third box is drawn
        self.assertFalse((gt[:, :, 0] == 100).all())
        self.assertLess((gt != image).any(-1).sum(), (scored != image).any(-1).sum())

    def test_palette_distinct_and_deterministic(self):
        colours = [visualize.instance_color(i) for i in range(20)]
        self.assertLen(set(colours), 20)
        self.assertEqual(colours, [visualize.instance_color(i)
                                   for i in range(20)])
        for c in colours:
            self.assertTrue(all(0 <= v <= 255 for v in c))

    def test_no_detections_and_unknown_class_name(self):
        image = np.zeros((8, 8, 3), np.uint8)
        out = visualize.draw_detections(image, np.zeros((0, 4)), [], [], None,
                                        _NAMES)
        self.assertAllEqual(out, image)
        image = np.zeros((40, 40, 3), np.uint8)
        out = visualize.draw_detections(image, [[5, 5, 30, 30]], [9], [0.8],
                                        None, _NAMES)
        self.assertTrue(np.any(out != 0))

    def test_bad_shapes_raise(self):
        image, boxes, classes, scores, masks = _scene()
        with self.assertRaisesRegex(ValueError, "image"):
            visualize.draw_detections(image[..., 0], boxes, classes, scores,
                                      None, _NAMES)
        with self.assertRaisesRegex(ValueError, "masks"):
            visualize.draw_detections(image, boxes, classes, scores,
                                      masks[:, :30], _NAMES)

    def test_save_png_round_trip(self):
        image, boxes, classes, scores, masks = _scene()
        out = visualize.draw_detections(image, boxes, classes, scores, masks,
                                         _NAMES)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "sub", "det.png")
            visualize.save_png(path, out)
            with Image.open(path) as png:
                self.assertEqual(png.format, "PNG")
                self.assertAllEqual(np.asarray(png.convert("RGB")), out)


if __name__ == "__main__":
    tf.test.main()


class KeypointDrawingTest(tf.test.TestCase):

    def test_points_and_skeleton_of_drawn_detections(self):
        image, boxes, classes, scores, _ = _scene()
        keypoints = np.zeros((4, 3, 3), np.float32)
        keypoints[0] = [[25, 15, 0.9], [45, 35, 0.9], [45, 15, 0.01]]   # third: too low
        keypoints[2] = [[5, 65, 0.9]] * 3                               # box not drawn
        out = visualize.draw_detections(image, boxes, classes, scores, None, _NAMES,
                                        keypoints=keypoints, skeleton=((0, 1), (1, 2)))
        plain = visualize.draw_detections(image, boxes, classes, scores, None, _NAMES)
        changed = np.any(out != plain, axis=-1)
        self.assertTrue(changed[25, 15] and changed[45, 35])   # the two dots
        self.assertTrue(changed[35, 25])                       # the line between them
        self.assertFalse(changed[45, 15])                      # a point under threshold
        self.assertFalse(changed[42:48, 18:30].any())          # and its edge to point 1
        self.assertFalse(changed[3:8, 62:68].any())            # an undrawn detection's
