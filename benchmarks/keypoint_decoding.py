#!/usr/bin/env python3
"""How far decoded keypoints land from the point a heatmap peaks at:
`mrcnn.ops.keypoints.heatmaps_to_keypoints` (the highest cell moved to a
parabola's peak) beside Detectron2's decoding (each heatmap resized
bicubically to its box's size in pixels, PyTorch's `interpolate(mode=
"bicubic", align_corners=False)`, written here in NumPy from its definition,
then the highest pixel) and the plain highest cell.

Synthetic 56 x 56 heatmaps, one blob each at a random sub-cell point, in
three shapes of logit (quadratic: a Gaussian's log; cone; bump: a Gaussian
itself), width 1-3 cells, noise 0.05; boxes of 30-300 pixels a side. Errors
in heatmap cells (a cell is the box side / 56). These are not a trained
network's heatmaps: the figures compare the decoders' resolution, not AP.

  python benchmarks/keypoint_decoding.py [--trials=200]
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mrcnn.ops import keypoints as keypoint_ops   # noqa: E402

SIZE = 56


def _cubic(t, a=-0.75):
    """PyTorch's bicubic kernel (a = -0.75)."""
    t = abs(t)
    if t <= 1:
        return ((a + 2) * t - (a + 3)) * t * t + 1
    if t < 2:
        return ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return 0.0


def _resize_axis(values, out, axis):
    """Bicubic resize of `values` along `axis` to `out` samples
    (align_corners=False, borders clamped)."""
    n = values.shape[axis]
    rows = []
    for o in range(out):
        src = (o + 0.5) * n / out - 0.5
        first = int(np.floor(src))
        t = src - first
        rows.append(sum(_cubic(k - t) * np.take(values, min(max(first + k, 0), n - 1), axis)
                        for k in range(-1, 3)))
    return np.stack(rows, axis=axis)


def detectron2_decode(heatmap, box):
    """(y, x) of Detectron2's `heatmaps_to_keypoints` for one heatmap."""
    y1, x1, y2, x2 = box
    h, w = max(y2 - y1, 1.0), max(x2 - x1, 1.0)
    out_h, out_w = int(np.ceil(h)), int(np.ceil(w))
    resized = _resize_axis(_resize_axis(heatmap, out_h, 0), out_w, 1)
    row, col = divmod(int(np.argmax(resized)), out_w)
    return y1 + (row + 0.5) * h / out_h, x1 + (col + 0.5) * w / out_w


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=200)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    print(f"{'logits':<10}{'decoder':<14}{'mean cells':>12}{'p95 cells':>12}")
    for shape in ("quadratic", "cone", "bump"):
        errors = {"mrcnn": [], "detectron2": [], "argmax": []}
        for _ in range(args.trials):
            side = rng.uniform(30, 300, 2)
            y1, x1 = rng.uniform(0, 100, 2)
            box = (y1, x1, y1 + side[0], x1 + side[1])
            fy, fx = rng.uniform(0.1, 0.9, 2)
            width = rng.uniform(1.0, 3.0)
            d = np.hypot(yy - (fy * SIZE - 0.5), xx - (fx * SIZE - 0.5))   # cell centres
            logits = {"quadratic": -2 * d ** 2 / width ** 2, "cone": -4 * d / width,
                      "bump": 8 * np.exp(-d ** 2 / (2 * width ** 2))}[shape]
            logits = logits + rng.normal(0, 0.05, logits.shape)
            true = np.array([y1 + fy * side[0], x1 + fx * side[1]])
            ours = keypoint_ops.heatmaps_to_keypoints(
                logits[None, None, None].astype(np.float32),
                np.array([[box]], np.float32)).numpy()[0, 0, 0, :2]
            row, col = divmod(int(np.argmax(logits)), SIZE)
            peak = (y1 + (row + 0.5) * side[0] / SIZE, x1 + (col + 0.5) * side[1] / SIZE)
            for name, point in (("mrcnn", ours), ("detectron2", detectron2_decode(logits, box)),
                                ("argmax", peak)):
                errors[name].append(np.hypot(*((np.asarray(point) - true) / (side / SIZE))))
        for name, values in errors.items():
            print(f"{shape:<10}{name:<14}{np.mean(values):>12.3f}"
                  f"{np.percentile(values, 95):>12.3f}")


if __name__ == "__main__":
    main()
