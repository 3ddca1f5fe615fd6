"""export.decode_image gives the pixels training's PIL decoding gives; a call
runs on the first canvas that holds all its images."""
import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from mrcnn.data import decode, pipeline
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


@pytest.mark.parametrize("sizes,want", [
    ([(40, 100), (64, 128)], (64, 128)),     # landscape resizes: landscape canvas
    ([(128, 64), (100, 30)], (128, 64)),     # portrait ones: portrait canvas
    ([(64, 128), (128, 64)], (128, 128)),    # both: the bound
    ([(64, 64), (30, 50)], (64, 128)),       # square fits landscape first
])
def test_call_runs_on_first_canvas_holding_all_its_images(sizes, want):
    # Resized sizes at MIN_SIZE 64 / MAX_SIZE 128 and the canvases export uses.
    canvases = list(pipeline.orientation_canvases(64, 128, (128, 128), 64)) + [(128, 128)]
    assert canvases == [(64, 128), (128, 64), (128, 128)]
    rng = np.random.default_rng(0)
    images = np.zeros((len(sizes), 128, 128, 3), np.uint8)
    for i, (h, w) in enumerate(sizes):
        images[i, :h, :w] = rng.integers(1, 256, (h, w, 3))
    info = np.array([[h, w, h, w, 1.0] for h, w in sizes], np.float32)

    def fn(cut, info):
        return {"cut": cut, "info": info}
    out = tf.function(lambda x, i: export._on_fitting_canvas(x, i, {c: fn for c in canvases}))(
        tf.constant(images), tf.constant(info))
    # Every branch is traced; only the chosen one runs, on the cut batch.
    out = {k: v.numpy() for k, v in out.items()}
    assert out["cut"].shape == (len(sizes),) + want + (3,)
    np.testing.assert_array_equal(out["cut"], images[:, :want[0], :want[1]])
    np.testing.assert_array_equal(out["info"], info)
