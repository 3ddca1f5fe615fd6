"""Host decoding: image files (and their failures), box-frame masks against
slow float64 references written from the docstring's sampling rule."""

import io
import os
import tempfile

import numpy as np
import tensorflow as tf
from absl.testing import parameterized
from PIL import Image
from pycocotools import mask as mask_util

from mrcnn.data import coco, decode


def _ref_inside(px, py, poly):
    """Even-odd point in polygon, float64, one point."""
    xs, ys = poly[0::2], poly[1::2]
    inside = False
    n = len(xs)
    for i in range(n):
        xa, ya, xb, yb = xs[i - 1], ys[i - 1], xs[i], ys[i]
        if (ya > py) != (yb > py):
            x_cross = xa + (py - ya) * (xb - xa) / (yb - ya)
            if px < x_cross:
                inside = not inside
    return inside


def _ref_polygon_frame(polygons, box, s):
    """Cell (u, v) is 1 when its sample point lies in any polygon."""
    y1, x1, y2, x2 = box
    out = np.zeros((s, s), np.uint8)
    for u in range(s):
        for v in range(s):
            py = y1 + (u + 0.5) * (y2 - y1) / s
            px = x1 + (v + 0.5) * (x2 - x1) / s
            out[u, v] = any(_ref_inside(px, py, p) for p in polygons)
    return out


def _ref_bilinear_frame(mask, box, s):
    """float64 bilinear value at each cell's sample point, pixel centres at
    +0.5, edges clamped."""
    h, w = mask.shape
    y1, x1, y2, x2 = box
    out = np.zeros((s, s))
    for u in range(s):
        for v in range(s):
            y = min(max(y1 + (u + 0.5) * (y2 - y1) / s - 0.5, 0.0), h - 1.0)
            x = min(max(x1 + (v + 0.5) * (x2 - x1) / s - 0.5, 0.0), w - 1.0)
            i0, j0 = int(np.floor(y)), int(np.floor(x))
            i1, j1 = min(i0 + 1, h - 1), min(j0 + 1, w - 1)
            a, b = y - i0, x - j0
            out[u, v] = ((1 - a) * ((1 - b) * mask[i0, j0] + b * mask[i0, j1])
                         + a * ((1 - b) * mask[i1, j0] + b * mask[i1, j1]))
    return out


def _random_convex(rng, h, w):
    n = rng.integers(3, 9)
    cx, cy = rng.uniform(8, w - 8), rng.uniform(8, h - 8)
    r = rng.uniform(4, 12)
    t = np.sort(rng.uniform(0, 2 * np.pi, n))
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], 1).reshape(-1).tolist()


class BoxFrameMaskTest(tf.test.TestCase, parameterized.TestCase):

    def test_literal_polygon_left_half(self):
        # Box (y1, x1, y2, x2) = (2, 4, 10, 12); polygon = its left half.
        polygon = [[4.0, 2.0, 8.0, 2.0, 8.0, 10.0, 4.0, 10.0]]
        got = decode.box_frame_mask(polygon, (2, 4, 10, 12), 16, 16, 4)
        self.assertAllEqual(got, [[1, 1, 0, 0]] * 4)

    def test_literal_rle_block(self):
        mask = np.zeros((6, 6), np.uint8)
        mask[1:3, 2:5] = 1   # rows 1-2, columns 2-4
        rle = mask_util.encode(np.asfortranarray(mask))
        got = decode.box_frame_mask(rle, (1, 2, 3, 5), 6, 6, 2)
        self.assertAllEqual(got, [[1, 1], [1, 1]])
        # Box twice as wide as the block: the right half samples zeros.
        got = decode.box_frame_mask(rle, (1, 2, 3, 8), 6, 6, 2)
        self.assertAllEqual(got, [[1, 0], [1, 0]])

    @parameterized.named_parameters(("s8", 8, 0), ("s16", 16, 1), ("s28", 28, 2))
    def test_polygons_match_reference(self, s, seed):
        rng = np.random.default_rng(seed)
        h, w = 40, 48
        total, wrong = 0, 0
        for _ in range(10):
            polygons = [_random_convex(rng, h, w) for _ in range(rng.integers(1, 3))]
            rle = mask_util.merge(mask_util.frPyObjects(polygons, h, w))
            x, y, bw, bh = mask_util.toBbox(rle)
            if bw * bh == 0:
                continue
            box = (y, x, y + bh, x + bw)
            got = decode.box_frame_mask(polygons, box, h, w, s)
            ref = _ref_polygon_frame(polygons, box, s)
            self.assertEqual(got.dtype, np.uint8)
            total += ref.size
            wrong += int((got != ref).sum())
        # pycocotools fills a cell by its own scan-line rule, not exactly by
        # its centre: allow disagreement on a thin boundary layer.
        self.assertLess(wrong / total, 0.03)

    @parameterized.named_parameters(("s7", 7, 0), ("s16", 16, 1), ("s28", 28, 2))
    def test_rle_matches_reference(self, s, seed):
        rng = np.random.default_rng(seed)
        h, w = 30, 36
        for _ in range(10):
            mask = (rng.uniform(size=(h, w)) < 0.5).astype(np.uint8)
            y1, x1 = rng.uniform(0, h - 3), rng.uniform(0, w - 3)
            box = (y1, x1, rng.uniform(y1 + 1, h), rng.uniform(x1 + 1, w))
            rle = mask_util.encode(np.asfortranarray(mask))
            got = decode.box_frame_mask(rle, box, h, w, s)
            ref = _ref_bilinear_frame(mask.astype(np.float64), box, s)
            decided = np.abs(ref - 0.5) > 1e-4
            self.assertAllEqual(got[decided], (ref >= 0.5)[decided])

    def test_uncompressed_rle(self):
        mask = np.zeros((5, 4), np.uint8)
        mask[1:4, 1:3] = 1
        # Column-major run lengths: 5 + 1 zeros, 3 ones, 2 zeros, 3 ones, 6 zeros.
        rle = {"size": [5, 4], "counts": [6, 3, 2, 3, 6]}
        got = decode.box_frame_mask(rle, (1, 1, 4, 3), 5, 4, 3)
        self.assertAllEqual(got, np.ones((3, 3)))

    def test_flip_is_reversal(self):
        """Mirroring image and box mirrors the box-frame mask exactly."""
        rng = np.random.default_rng(4)
        h, w, s = 30, 40, 12
        for _ in range(5):
            poly = _random_convex(rng, h, w)
            flipped = list(poly)
            flipped[0::2] = [w - x for x in poly[0::2]]
            y1, x1 = rng.uniform(0, 10), rng.uniform(0, 10)
            box = (y1, x1, y1 + rng.uniform(10, 20), x1 + rng.uniform(10, 30))
            fbox = (box[0], w - box[3], box[2], w - box[1])
            mask = mask_util.decode(mask_util.merge(mask_util.frPyObjects([poly], h, w)))
            rle, frle = (mask_util.encode(np.asfortranarray(m))
                         for m in (mask, mask[:, ::-1].copy()))
            self.assertAllEqual(decode.box_frame_mask(frle, fbox, h, w, s),
                                decode.box_frame_mask(rle, box, h, w, s)[:, ::-1])


class ReadImageTest(tf.test.TestCase, parameterized.TestCase):

    def setUp(self):
        super().setUp()
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        self.dir = tmp.name
        self.pixels = np.random.default_rng(0).integers(
            0, 256, (12, 16, 3)).astype(np.uint8)

    def _write(self, name, data):
        path = os.path.join(self.dir, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def _encoded(self, fmt, mode="RGB"):
        buf = io.BytesIO()
        Image.fromarray(self.pixels).convert(mode).save(buf, format=fmt)
        return buf.getvalue()

    @parameterized.named_parameters(("jpeg", "JPEG", "RGB"), ("png", "PNG", "RGB"),
                                    ("png_rgba", "PNG", "RGBA"),
                                    ("grey", "PNG", "L"))
    def test_formats_give_rgb(self, fmt, mode):
        path = self._write("a.img", self._encoded(fmt, mode))
        got = decode.read_image(path, 5, 12, 16)
        self.assertEqual(got.shape, (12, 16, 3))
        self.assertEqual(got.dtype, np.uint8)
        if fmt == "PNG" and mode != "L":
            self.assertAllEqual(got, self.pixels)

    # What each EXIF orientation tag asks of the stored pixels [h, w, 3]
    # to show them upright (EXIF 2.3, tag 0x0112).
    _UPRIGHT = {1: lambda p: p, 2: lambda p: p[:, ::-1], 3: lambda p: p[::-1, ::-1],
                4: lambda p: p[::-1], 5: lambda p: p.transpose(1, 0, 2),
                6: lambda p: np.rot90(p, -1), 7: lambda p: p[::-1, ::-1].transpose(1, 0, 2),
                8: lambda p: np.rot90(p, 1)}

    def _tagged(self, orientation, fmt="PNG"):
        exif = Image.Exif()
        exif[0x0112] = orientation
        buf = io.BytesIO()
        Image.fromarray(self.pixels).save(buf, format=fmt, exif=exif.tobytes())
        return self._write(f"o{orientation}.{fmt.lower()}", buf.getvalue())

    @parameterized.parameters(range(1, 9))
    def test_exif_orientation_turns_images_upright(self, orientation):
        path = self._tagged(orientation)
        want = self._UPRIGHT[orientation](self.pixels)   # 12 x 16 stored
        got = decode.read_image(path, 3, *want.shape[:2])
        self.assertAllEqual(got, want)
        pixels, tag = decode.open_rgb(path, exif_orientation=False)
        self.assertEqual(tag, orientation)
        self.assertAllEqual(pixels, self.pixels)
        self.assertAllEqual(decode.read_image(path, 3, 12, 16, exif_orientation=False),
                            self.pixels)

    def test_quarter_turn_size_mismatch_names_the_setting(self):
        path = self._tagged(6, "JPEG")
        with self.assertRaisesRegex(coco.DataError, r"image id 9 is 16x12 .* says 12x16; its "
                                    r"EXIF orientation \(6\).*exif_orientation = False"):
            decode.read_image(path, 9, 12, 16)
        with self.assertRaisesRegex(coco.DataError, r"says 16x12; .*exif_orientation = True"):
            decode.read_image(path, 9, 16, 12, exif_orientation=False)

    @parameterized.named_parameters(
        ("missing", None, "cannot decode"),
        ("garbage", b"this is not an image", "cannot decode"),
        ("empty", b"", "cannot decode"),
        ("truncated_jpeg", "truncate", "cannot decode"),
        ("wrong_size", "jpeg", "annotation file says 12x17"))
    def test_bad_files_name_file_and_id(self, data, piece):
        if data == "truncate":
            data = self._encoded("JPEG")[:200]
        elif data == "jpeg":
            data = self._encoded("JPEG")
        path = (os.path.join(self.dir, "missing.jpg") if data is None
                else self._write("bad.jpg", data))
        width = 17 if piece.endswith("12x17") else 16
        with self.assertRaises(coco.DataError) as cm:
            decode.read_image(path, 4242, 12, width)
        self.assertIn(path, str(cm.exception))
        self.assertIn("image id 4242", str(cm.exception))
        self.assertIn(piece, str(cm.exception))


if __name__ == "__main__":
    tf.test.main()
