"""Repeat-factor sampling (Detectron2's RepeatFactorTrainingSampler): the
factors against their formula, the stream's counts, and CocoInput reading it."""

import collections
import tempfile

import numpy as np
import tensorflow as tf

from mrcnn.data import pipeline
from mrcnn.data.coco import ImageRecord
from mrcnn.data.pipeline import CocoInput
from tests.data import fixtures


def _record(image_id, classes):
    n = len(classes)
    return ImageRecord(image_id=image_id, path="", height=8, width=8,
                       boxes=np.zeros((n, 4), np.float32),
                       classes=np.array(classes, np.int32), segmentations=[None] * n,
                       is_crowd=np.zeros(n, bool), annotation_ids=np.arange(n))


def _long_tail():
    """20 images: 16 of class 1 (cat), 2 of class 2 (dog), 1 of both, 1 empty."""
    images, annotations = [], []
    kinds = [[5]] * 16 + [[2]] * 2 + [[5, 2]] + [[]]
    for i, cats in enumerate(kinds):
        images.append({"id": i + 1, "file_name": f"{i + 1:06d}.jpg",
                       "height": fixtures.HEIGHT, "width": fixtures.WIDTH})
        for k, cat in enumerate(cats):
            box = (2 + 10 * k, 2, 8, 8)
            annotations.append({"id": 100 * (i + 1) + k, "image_id": i + 1,
                                "category_id": cat, "bbox": list(map(float, box)),
                                "area": 64.0, "iscrowd": 0,
                                "segmentation": [fixtures._square(*box)]})
    return {"images": images, "annotations": annotations,
            "categories": fixtures.CATEGORIES}


class RepeatFactorTest(tf.test.TestCase):

    def test_factors_against_the_formula(self):
        records = [_record(1, [1, 1]), _record(2, [1]), _record(3, [1, 2]),
                   _record(4, []), _record(5, [3])]
        t = 0.6
        # class 1 in 3/5 images, class 2 in 1/5, class 3 in 1/5.
        r1, r2 = max(1.0, np.sqrt(t / 0.6)), max(1.0, np.sqrt(t / 0.2))
        np.testing.assert_allclose(pipeline.repeat_factors(records, t),
                                   [r1, r1, max(r1, r2), 1.0, r2])

    def test_stream_repeats_each_index_by_its_factor(self):
        indices = np.array([4, 7, 9], np.int64)
        factors = np.array([1.0, 2.5, 1.2])
        stream = pipeline._repeat_factor_epochs(indices, factors, seed=5)
        total = 1200   # about 255 epochs of 4.7 images
        counts = collections.Counter(int(v) for v in stream.take(total))
        for index, share in zip(indices, factors / factors.sum()):
            self.assertAllClose(counts[index] / total, share, atol=0.03)
        # A seed fixes the stream.
        first = [int(v) for v in stream.take(40)]
        again = pipeline._repeat_factor_epochs(indices, factors, 5)
        other = pipeline._repeat_factor_epochs(indices, factors, 6)
        self.assertEqual(first, [int(v) for v in again.take(40)])
        self.assertNotEqual(first, [int(v) for v in other.take(40)])

    def test_coco_input_reads_the_rare_class_more_often(self):
        root = tempfile.mkdtemp()
        fixtures.write_dataset(root, _long_tail())
        builder = CocoInput(root, batch_size=1, min_size=32, max_size=48,
                            canvas_size=(64, 64), max_instances=4, mask_size=8, seed=1,
                            filter_empty=False, repeat_threshold=0.5)
        factors = dict(zip((r.image_id for r in builder.records), builder.repeat_factors))
        # dog in 3/20 images: sqrt(0.5 / 0.15); cat in 17/20: 1.
        self.assertAllClose(factors[17], np.sqrt(0.5 / 0.15))
        self.assertAllClose(factors[19], np.sqrt(0.5 / 0.15))
        self.assertEqual(factors[1], 1.0)
        self.assertEqual(factors[20], 1.0)
        ids = [int(b["image_id"][0]) for b in builder().take(400)]
        counts = collections.Counter(ids)
        rare = np.mean([counts[i] for i in (17, 18, 19)])
        common = np.mean([counts[i] for i in range(1, 17)])
        self.assertAllClose(rare / common, np.sqrt(0.5 / 0.15), rtol=0.25)
        # A resumed run reads on in the same stream.
        self.assertEqual([int(b["image_id"][0]) for b in builder(start=37).take(5)],
                         ids[37:42])
        with self.assertRaisesRegex(ValueError, "repeat_threshold"):
            CocoInput(root, repeat_threshold=0.0)
        self.assertIsNone(CocoInput(root, training=False, min_size=32, max_size=48,
                                    canvas_size=(64, 64), repeat_threshold=0.5)
                          .repeat_factors)

    def test_with_orientation_groups(self):
        data = _long_tail()
        for image in data["images"][14:]:   # ids 15-20 portrait, the dogs among them
            image["height"], image["width"] = fixtures.WIDTH, fixtures.HEIGHT
        root = tempfile.mkdtemp()
        fixtures.write_dataset(root, data)
        builder = CocoInput(root, batch_size=2, min_size=32, max_size=48,
                            canvas_size=(64, 64), max_instances=4, mask_size=8, seed=2,
                            filter_empty=False, repeat_threshold=0.5,
                            group_by_orientation=True, size_divisor=8)
        self.assertLen(builder.canvases, 2)
        counts = collections.Counter()
        for batch in builder().take(150):
            ids = batch["image_id"].numpy()
            portrait = [i >= 15 for i in ids]
            self.assertEqual(len(set(portrait)), 1)   # one canvas per batch
            counts.update(ids.tolist())
        rare = np.mean([counts[i] for i in (17, 18, 19)])
        common = np.mean([counts[i] for i in (15, 16)])   # portrait, cat only
        self.assertGreater(rare / common, 1.5)
