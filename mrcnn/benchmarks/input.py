"""Input pipeline benchmark: training images/s and host bytes of one batch.

`bench_input` is what `bin/bench --what=input` calls. Run this module to
measure the two reference settings on fresh synthetic data:

    python -m mrcnn.benchmarks.input [--workdir=/tmp/bench_input]

  - shapes at its default size (128 x 128 images, canvas 128 x 128);
  - a COCO-like setting: 640 x 480 shapes images resized to 800 / 1333 on
    the 1344 x 1344 canvas, batch 4.
"""

import os
import tempfile
import time

from mrcnn.data import pipeline, shapes

_SIZE_DIVISOR = 64   # 2**max_level with P6


def bench_input(data_dir, split="train2017", batch=4, min_size=800,
                max_size=1333, canvas=None, num_batches=20, warmup=3,
                seed=0):
    """Times the training pipeline of `CocoInput` on a COCO-layout dataset.

    Args:
      data_dir: str, root of a COCO 2017-layout dataset.
      split: str, the split to read.
      batch: int, images per batch.
      min_size, max_size: int, the resize (shorter side, longer side cap).
      canvas: int (square) or (H, W), or None for the smallest multiple of 64
        that holds `max_size` on both sides.
      num_batches: int, timed batches (after `warmup` untimed ones, which fill
        the prefetch buffers and trace the graph).
      seed: int, the pipeline seed.

    Returns:
      dict: images_per_s, seconds (timed), num_images, batch_bytes (bytes of
      one batch as NumPy arrays), bytes_per_key, canvas, setting.
    """
    if canvas is None:
        side = -(-max_size // _SIZE_DIVISOR) * _SIZE_DIVISOR
        canvas = (side, side)
    elif isinstance(canvas, int):
        canvas = (canvas, canvas)
    builder = pipeline.CocoInput(
        data_dir, split=split, training=True, batch_size=batch,
        min_size=min_size, max_size=max_size, canvas_size=tuple(canvas),
        seed=seed)
    iterator = iter(builder())
    try:
        for _ in range(warmup):
            first = next(iterator)
        arrays = {k: v.numpy() for k, v in first.items()}
        start = time.perf_counter()
        for _ in range(num_batches):
            out = next(iterator)
        out["images"].numpy()   # the last batch is really there
        seconds = time.perf_counter() - start
    finally:
        del iterator   # not kept to exit by a traceback (trainer.train says why)
    return {
        "setting": f"{split} batch {batch}, {min_size}/{max_size}, canvas "
                   f"{canvas[0]}x{canvas[1]}",
        "images_per_s": batch * num_batches / seconds,
        "seconds": seconds,
        "num_images": batch * num_batches,
        "batch_bytes": int(sum(a.nbytes for a in arrays.values())),
        "bytes_per_key": {k: int(a.nbytes) for k, a in arrays.items()},
        "canvas": tuple(canvas),
    }


def main(workdir=None):
    """Both reference measurements on freshly made shapes data."""
    workdir = workdir or tempfile.mkdtemp(prefix="bench_input_")
    small = os.path.join(workdir, "shapes_128")
    coco_like = os.path.join(workdir, "shapes_640x480")
    if not os.path.exists(small):
        shapes.make_shapes(small, num_train=200, num_val=0)
    if not os.path.exists(coco_like):
        shapes.make_shapes(coco_like, num_train=100, num_val=0,
                           image_size=(480, 640), max_instances=8)
    results = [
        bench_input(small, batch=4, min_size=128, max_size=128, canvas=128,
                    num_batches=100),
        bench_input(coco_like, batch=4, min_size=800, max_size=1333,
                    num_batches=20),
    ]
    for r in results:
        print(f"{r['setting']}: {r['images_per_s']:.1f} images/s, "
              f"{r['batch_bytes'] / 2**20:.1f} MiB per batch "
              f"({', '.join(f'{k} {v / 2**20:.2f}' for k, v in r['bytes_per_key'].items())})")
    return results


if __name__ == "__main__":
    import sys
    main(sys.argv[1].split("=", 1)[1] if len(sys.argv) > 1 else None)
