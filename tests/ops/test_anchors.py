"""mrcnn.ops.anchors against a loop-by-loop float64 reference of the contract."""

import math

import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from mrcnn.ops import anchors as anchor_ops


def _ref_anchors(image_size, min_level, max_level, sizes, ratios, n, offset=0.5):
    out = {}
    for level in range(min_level, max_level + 1):
        s = 2 ** level
        rows = []
        for i in range(math.ceil(image_size[0] / s)):
            for j in range(math.ceil(image_size[1] / s)):
                cy, cx = (i + offset) * s, (j + offset) * s
                for k in range(n):
                    c = 2 ** (k / n)
                    for r in ratios:
                        b = sizes[level - min_level]
                        w, h = b * c * math.sqrt(r), b * c / math.sqrt(r)
                        rows.append([cy - h / 2, cx - w / 2, cy + h / 2, cx + w / 2])
        out[level] = np.array(rows)
    return out


class MultilevelAnchorsTest(tf.test.TestCase, parameterized.TestCase):

    @parameterized.named_parameters(
        ('default', (128, 192), 2, 6, (32, 64, 128, 256, 512), (0.5, 1.0, 2.0), 1),
        ('not_divisible', (100, 70), 3, 5, (24, 48, 96), (1.0, 2.0), 2),
    )
    def test_matches_reference(self, size, lo, hi, sizes, ratios, n):
        got = anchor_ops.multilevel_anchors(size, lo, hi, sizes, ratios, n)
        ref = _ref_anchors(size, lo, hi, sizes, ratios, n)
        self.assertEqual(sorted(got), sorted(ref))
        for level in ref:
            self.assertEqual(got[level].dtype, tf.float32)
            self.assertAllClose(got[level], ref[level], atol=1e-4)

    def test_literal_first_cell(self):
        a = anchor_ops.multilevel_anchors((64, 64), 2, 2, (32,), (1.0,))[2]
        self.assertAllClose(a[0], [2 - 16, 2 - 16, 2 + 16, 2 + 16])
        self.assertAllClose(a[1], [2 - 16, 6 - 16, 2 + 16, 6 + 16])
        self.assertEqual(a.shape, (16 * 16, 4))

    @parameterized.parameters(0.0, 0.25)
    def test_offset(self, offset):
        got = anchor_ops.multilevel_anchors((96, 64), 3, 4, (24, 48), (0.5, 1.0, 2.0),
                                            offset=offset)
        ref = _ref_anchors((96, 64), 3, 4, (24, 48), (0.5, 1.0, 2.0), 1, offset)
        for level in ref:
            self.assertAllClose(got[level], ref[level], atol=1e-4)
        # Detectron2's first anchor of P3 at offset 0: centred on (0, 0).
        if offset == 0.0:
            self.assertAllClose(got[3][1], [-12, -12, 12, 12])

    def test_round_sizes(self):
        # torchvision's base anchors for size 32, heights over widths 0.5, 1, 2
        # (ours: widths over heights 2, 1, 0.5): [-23, -11, 23, 11], [-16, -16,
        # 16, 16], [-11, -23, 11, 23] as (x1, y1, x2, y2).
        got = anchor_ops.multilevel_anchors((64, 64), 2, 2, (32,), (2.0, 1.0, 0.5),
                                            offset=0.0, round_sizes=True)[2]
        self.assertAllEqual(got[:3], [[-11, -23, 11, 23], [-16, -16, 16, 16],
                                      [-23, -11, 23, 11]])
        self.assertAllEqual(got[3:6] - got[:3], np.tile([0, 4, 0, 4], (3, 1)))

    def test_bad_sizes_raise(self):
        with self.assertRaisesRegex(ValueError, "len\\(sizes\\)"):
            anchor_ops.multilevel_anchors((64, 64), 2, 6, (32, 64))


if __name__ == "__main__":
    tf.test.main()
