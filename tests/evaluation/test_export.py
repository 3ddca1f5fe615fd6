"""export.decode_image gives the pixels training's PIL decoding gives."""
import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from mrcnn.data import decode
from mrcnn.evaluation import export


def _encoded(fmt, mode, tmp_path):
    rng = np.random.default_rng(0)
    # Smooth gradients plus noise: JPEG's DCT choices show on both.
    y, x = np.mgrid[0:37, 0:53]
    base = np.stack([x * 4, y * 6, (x + y) * 2], -1) + rng.integers(0, 40, (37, 53, 3))
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).convert(mode)
    path = tmp_path / f"image.{fmt.lower()}"
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 75} if fmt == "JPEG" else {}))
    path.write_bytes(buffer.getvalue())
    return path


@pytest.mark.parametrize("fmt,mode", [("JPEG", "RGB"), ("JPEG", "L"), ("PNG", "RGB"),
                                      ("PNG", "RGBA"), ("PNG", "L")])
def test_decode_image_matches_training_decoder(tmp_path, fmt, mode):
    path = _encoded(fmt, mode, tmp_path)
    want = decode.read_image(str(path), image_id=1, height=37, width=53)
    got = tf.function(export.decode_image)(tf.constant(path.read_bytes())).numpy()
    assert got.shape == (37, 53, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, want)


def test_tf_default_jpeg_decoding_differs(tmp_path):
    # Why decode_image exists: TF's default (fast) DCT gives other pixels.
    path = _encoded("JPEG", "RGB", tmp_path)
    want = decode.read_image(str(path), image_id=1, height=37, width=53)
    fast = tf.io.decode_jpeg(path.read_bytes(), channels=3).numpy()
    assert np.abs(fast.astype(int) - want).max() > 0
