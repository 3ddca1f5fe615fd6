"""The input pipeline: a COCO split -> fixed-shape tf.data batches.

Shape letters: `B` images per batch (per replica), `H, W` the static canvas,
`M` gt slots per image, `S` the mask size, `K` keypoints per instance.

A batch is a dict:
  images: uint8 [B, H, W, 3] RGB pixels, the resized image (bilinear,
    rounded) at the top left, zeros below and right of it. The model
    normalises them on the device (`MaskRCNN.pixel_mean`, `pixel_std`):
    uint8 is a quarter of float32's bytes to pad, batch, buffer and copy.
  image_info: float32 [B, 5] (original_height, original_width,
    resized_height, resized_width, scale), `resized = round(original * scale)`.
  image_id: int64 [B], the COCO image id; -1 marks a padded slot of the last
    evaluation batch (all its other fields are zeros).
  gt_boxes: float32 [B, M, 4] (y1, x1, y2, x2), pixels of the resized image;
    padded slots 0.
  gt_classes: int32 [B, M], contiguous 1..C; padded slots 0.
  gt_valid: bool [B, M].
  gt_masks: uint8 [B, M, S, S] of 0/1, each instance's mask cropped to its
    own `gt_boxes` row and resampled to S x S (see mrcnn/data/decode.py);
    padded slots 0. Training only (evaluation scores against the annotation
    file), and not with `with_masks=False` (box-only data).
  gt_keypoints: float32 [B, M, K, 3] (y, x, v), pixels of the resized image
    (continuous: pixel i spans [i, i + 1)), v 1 = labelled but not visible,
    2 = visible, 0 = not labelled, with y = x = 0; padded slots 0. Training
    with `with_keypoints` only.

Boxes are scaled per axis by `resized / original` (the factor the image
pixels were resized by; it differs from `scale` by under half a pixel over
the image), then flipped as `x -> resized_width - x` with the image.
Keypoints (the json's pixel indices + 0.5, mrcnn/data/coco.py) are scaled
and flipped alike, and on a flip permuted by `CocoInput.keypoint_flip_map`
(the left eye of the flipped image is the old right eye); a point that ends
outside the image (outside a large-scale jitter crop) is no longer labelled.
"""

import os
import threading

import gin
import numpy as np
import tensorflow as tf
from absl import logging

from mrcnn.data import coco, decode
from mrcnn.ops import masks as mask_ops

# Random bits per element: the low 24 give the flip draw, the rest the scale.
_FLIP_BITS = 24


def resize_image(image, min_size, max_size):
    """Resizes so the shorter side is `min_size` and the longer at most `max_size`.

    Bilinear (half-pixel centres, no antialiasing), then rounded back to
    uint8 pixels: at most half a grey level from the float resize.

    Args:
      image: uint8 [h, w, 3].
      min_size: float scalar (Python or tensor), target shorter side.
      max_size: float, cap on the longer side.

    Returns:
      (image uint8 [h', w', 3], size float64 [2] (h, w), resized float64 [2]
      (h', w') = round(size * scale), scale float64 scalar).
    """
    size = tf.cast(tf.shape(image)[:2], tf.float64)
    min_size = tf.cast(min_size, tf.float64)
    scale = tf.minimum(min_size / tf.reduce_min(size),
                       tf.cast(max_size, tf.float64) / tf.reduce_max(size))
    resized = tf.round(size * scale)
    image = tf.image.resize(image, tf.cast(resized, tf.int32), method="bilinear")
    return tf.saturate_cast(tf.round(image), tf.uint8), size, resized, scale


def recrop_masks(masks, boxes, new_boxes):
    """Box-frame masks of `boxes`, cut to `new_boxes` (inside them) and resampled.

    The mask head's targets do the same (`ops.masks.mask_targets` with
    `crop_boxes`: each new box ROIAligned in its old box's cell frame,
    thresholded at 0.5); a box kept whole gives its mask back unchanged.

    Args:
      masks: uint8 [n, S, S] of 0/1, each cropped to its row of `boxes`.
      boxes: float32 [n, 4] (y1, x1, y2, x2).
      new_boxes: float32 [n, 4], each within its row of `boxes`.

    Returns:
      uint8 [n, S, S] of 0/1, each cropped to its row of `new_boxes`.
    """
    s = masks.shape[-1]
    cut = mask_ops.mask_targets(masks[None], new_boxes[None],
                                tf.range(tf.shape(masks)[0])[None], (s, s),
                                crop_boxes=boxes[None])[0]
    return tf.cast(cut, tf.uint8)


def _labelled_inside(keypoints, size):
    """Keypoints [n, K, 3] (y, x, v) with v = 0 where the point lies outside
    [0, size[0]) x [0, size[1]), and y = x = v = 0 wherever v = 0."""
    y, x, v = keypoints[..., 0], keypoints[..., 1], keypoints[..., 2]
    labelled = (v > 0) & (y >= 0) & (y < size[0]) & (x >= 0) & (x < size[1])
    return tf.where(labelled[..., None], keypoints, tf.zeros_like(keypoints))


def pad_to_canvas(image, canvas_size):
    """Zero-pads [h, w, 3] bottom/right to `canvas_size` (H, W): [H, W, 3]."""
    image = tf.image.pad_to_bounding_box(image, 0, 0, *canvas_size)
    image.set_shape(tuple(canvas_size) + (3,))
    return image


def preprocess_image(image, *, min_size, max_size, canvas_size):
    """The inference transform of one image, as the eval pipeline applies it.

    Args:
      image: uint8 [h, w, 3] RGB.

    Returns:
      (images uint8 [H, W, 3], image_info float32 [5] = (original h, w,
      resized h, w, scale)).
    """
    resized_image, size, resized, scale = resize_image(image, min_size, max_size)
    images = pad_to_canvas(resized_image, canvas_size)
    info = tf.cast(tf.concat([size, resized, [scale]], 0), tf.float32)
    return images, info


def orientation_canvases(min_size, max_size, canvas_size, size_divisor=64):
    """The canvases that hold the inference resize of any image, by orientation.

    A landscape image (width >= height) resizes to at most `min_size` rows
    by `max_size` columns, a portrait one to the transpose: each gets the
    smallest multiple of `size_divisor` holding that, capped at
    `canvas_size`, the square bound that holds both. COCO at 800 / 1333 with
    divisor 64: 832 x 1344 and 1344 x 832, 38% fewer pixels than 1344 x 1344.

    Args:
      min_size, max_size: ints, the shorter-side target and the longer-side cap.
      canvas_size: (H, W) ints, the bound.
      size_divisor: int, 2**max_level of the FPN.

    Returns:
      ((H, W) landscape, (H, W) portrait) ints.
    """
    def up(v):
        return int(-(-int(v) // size_divisor) * size_divisor)
    h, w = (int(s) for s in canvas_size)
    landscape = (min(up(min_size), h), min(up(max_size), w))
    portrait = (min(up(max_size), h), min(up(min_size), w))
    return landscape, portrait


def repeat_factors(records, threshold):
    """float64 [n]: each record's repeat factor (Detectron2's
    `repeat_factors_from_category_frequency`): the largest
    `max(1, sqrt(threshold / f_c))` over its classes c (crowd annotations
    count), `f_c` the fraction of the records with class c; 1 without
    annotations."""
    owner, classes = _distinct_classes(records)
    counts = np.bincount(classes, minlength=1)[1:]   # [max class]
    per_class = np.ones(len(counts) + 1)   # [1 + max class]; index 0 unused
    seen = counts > 0
    per_class[1:][seen] = np.maximum(
        1.0, np.sqrt(threshold / (counts[seen] / len(records))))
    factors = np.ones(len(records))
    np.maximum.at(factors, owner, per_class[classes])
    return factors


def class_image_counts(records, num_classes):
    """int64 [C]: how many of the records hold class c = 1..C at index c - 1
    (crowd annotations count): LVIS's `image_count`, the federated loss's
    draw weights (`RoiHeads.fed_loss_classes`) and the repeat factors."""
    _, classes = _distinct_classes(records)
    classes = classes[(classes >= 1) & (classes <= num_classes)]
    return np.bincount(classes - 1, minlength=num_classes).astype(np.int64)


def _distinct_classes(records):
    """(record index, class) int64 [T] each: every class a record holds, once.

    Whole-split NumPy: on a COCO train2017-sized split (118k records) a
    Python set per record made the repeat factors take 1.7-8 s, most of it
    the cycle collector scanning the split's objects as the sets piled up;
    this takes 0.7 s.
    """
    lengths = [len(r.classes) for r in records]
    if not sum(lengths):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    classes = np.concatenate([np.asarray(r.classes, np.int64).reshape(-1)
                              for r in records])
    owner = np.repeat(np.arange(len(records), dtype=np.int64), lengths)
    # One key per (record, class): classes are >= 0 and below `span`.
    span = int(classes.max()) + 1
    keys = np.unique(owner * span + classes)
    return keys // span, keys % span


def _repeat_factor_epochs(indices, factors, seed):
    """The endless stream of `indices` [n] (int64), each epoch repeating index i
    floor(f_i) times and once more with probability frac(f_i), shuffled.

    Each epoch's draws and order come from (seed, epoch) by stateless random
    ops, so a stream with a seed is the same however often it is built (a
    resumed run skips into it).
    """
    if seed is None:
        seed = int(np.random.default_rng().integers(1 << 31))
    whole = tf.constant(np.floor(factors), tf.float32)
    fraction = tf.constant(factors - np.floor(factors), tf.float32)
    indices = tf.constant(indices, tf.int64)

    def epoch(e):
        key = tf.stack([tf.constant(seed, tf.int64), e])
        extra = tf.random.stateless_uniform(fraction.shape, key) < fraction
        counts = tf.cast(whole + tf.cast(extra, tf.float32), tf.int64)
        chosen = tf.repeat(indices, counts)
        return tf.data.Dataset.from_tensor_slices(
            tf.random.experimental.stateless_shuffle(chosen, key + 1))

    return tf.data.Dataset.range(1 << 62).flat_map(epoch)


def _sources(data_dir, split, annotation_file, image_dir, prefix="instances"):
    """[(annotation_file, image_dir)] of `CocoInput`'s arguments: `split`,
    `annotation_file` and `image_dir` are each one value or a sequence, and
    the sequences' lengths must agree; a single value serves every source."""
    values = {"split": split, "annotation_file": annotation_file, "image_dir": image_dir}
    lengths = {name: len(v) for name, v in values.items()
               if isinstance(v, (list, tuple))}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"CocoInput: {', '.join(f'{k} has {n}' for k, n in lengths.items())} "
                         f"entries; sequences must have one per split")
    count = next(iter(lengths.values()), 1)
    if count == 0:
        raise ValueError("CocoInput: no split given (an empty sequence)")
    columns = [v if isinstance(v, (list, tuple)) else [v] * count for v in values.values()]
    if data_dir is None and any(a is None or d is None for _, a, d in zip(*columns)):
        raise ValueError("CocoInput: give data_dir, or annotation_file and image_dir")
    return [coco.split_paths(data_dir, s, a, d, prefix) for s, a, d in zip(*columns)]


@gin.configurable
class CocoInput:
    """Builds the training or evaluation dataset of one COCO-format split
    (training: of several, concatenated).

    Call it, optionally with a `tf.distribute.InputContext`, to get a
    `tf.data.Dataset` of batches (see the module docstring), so that it can be
    passed as is to `strategy.distribute_datasets_from_function`.

    Training: the image list is sharded per input pipeline (before any file
    is read), shuffled, repeated; each image gets a random shorter side from
    `min_size` and a horizontal flip with `flip_probability`; crowd
    annotations are dropped, and so are images left without annotations when
    `filter_empty`. Evaluation: every image once, ordered by image id, at the
    largest `min_size`, no flip; the last batch is padded with `image_id -1`.

    With `group_by_orientation` (Detectron2's aspect-ratio grouping, with
    static shapes), landscape images (width >= height) and portrait ones
    are batched apart, each on the smallest canvas (multiple of
    `size_divisor`) that holds every resized image of its orientation in the
    split: COCO 2017 at 800 / 1333 pads to 832 x 1344 or 1344 x 832, 38%
    fewer pixels than the square 1344 x 1344 canvas that holds both, and the
    model compiles one program per canvas. In training, one seeded draw per
    step picks the orientation (landscape with the split's landscape
    share) for every replica of every input pipeline, so that all replicas
    of a step share one canvas. Evaluation reads the landscape images, then
    the portrait ones, each part padded to whole batches. When both
    orientations get the same canvas, they are one group.

    Bad input (see mrcnn/data/coco.py for the list): with `skip_bad` the
    training reader drops the images concerned and evaluation drops the bad
    annotations (evaluation still raises for a missing image file); each
    skip is counted in `self.counts`, listed in `self.problems`, and logged
    once when the json has been read. An image file that fails to decode in
    the pipeline is replaced in training by the next image of the same
    orientation that decodes (counted as `undecodable_images`, logged once
    per file), so that the stream keeps its length and its batches their
    canvas; elsewhere it raises, naming the file and image id.
    Without `skip_bad`, every problem raises `mrcnn.data.coco.DataError`.

    Images are decoded in `tf.numpy_function` (Python, for pycocotools and
    PIL): drop an iterator of these datasets before the interpreter exits
    (`del`, or iterate in a `for` loop or a function). One still alive at
    exit while its pipeline is decoding can hang the process, whose decoder
    threads then wait for a GIL that finalisation no longer hands out
    (tensorflow/tensorflow#21277); `trainer.train` drops its iterator
    however its loop ends.

    Args:
      data_dir: str, the root of a COCO 2017-layout dataset.
      split: str, e.g. "train2017": reads `annotations/instances_<split>.json`
        and the images in `<split>/`. Training may concatenate several, a
        tuple (Detectron2's `DATASETS.TRAIN`, e.g. ('train2017', 'extra')):
        their images are one stream, their files must define the same
        categories (ids and names), and `train.epochs` counts all of them.
      training: bool, the mode (see above).
      batch_size: int, images per replica (per GPU): every input pipeline
        batches this many, and the global batch is `batch_size` times the
        replicas in sync, so one config serves 1 or N GPUs.
        Default 16, the R50-FPN 1x recipe (2 images x 8 GPUs).
      min_size: int or tuple of int, shorter side in pixels; a tuple is the
        multi-scale training choice (one drawn per image). Default 800, COCO.
      max_size: int, the longer side is at most this. Default 1333, COCO.
      canvas_size: (H, W) ints, the static padded size; each a multiple of
        `size_divisor` and large enough for every resized image (checked at
        load). Default (1344, 1344): the smallest multiple of 64 >= 1333.
        With `group_by_orientation`, a bound: `self.canvases` are the
        canvases batches come on.
      size_divisor: int, 2**max_level of the FPN (64 for P6).
      max_instances: int M, gt slots per image (COCO's largest image has 93
        instances). Extra instances are dropped and counted.
      mask_size: int S. 112 keeps 100 masks at 1.25 MB per image, four times
        the 28 x 28 mask head output so targets can be resampled from it.
      with_masks: bool; False for box-only data (Faster R-CNN): annotations
        need no `segmentation`, and batches have no `gt_masks`.
      with_keypoints: bool, Keypoint R-CNN (Detectron2's `KEYPOINT_ON`; a
        COCO `person_keypoints_*.json`): the json's keypoints are read and
        checked (mrcnn/data/coco.py), and training batches hold
        `gt_keypoints` (module docstring). `keypoint_names`,
        `keypoint_skeleton` (for pictures),
        `num_keypoints` and `keypoint_flip_map` describe them, in
        evaluation too (whose batches hold none: it scores against the
        annotation file).
      annotation_prefix: str, the json's name in the COCO layout,
        `data_dir/annotations/{annotation_prefix}_{split}.json`: 'instances'
        (default), 'person_keypoints' for COCO's keypoint files.
      min_keypoints: int, with keypoints in training: images with fewer
        labelled points (v > 0, all annotations) are left out and counted
        as `few_keypoints_images` (Detectron2's `MIN_KEYPOINTS_PER_IMAGE`,
        default 1 as there); 0 keeps every image.
      scale_jitter: optional (low, high), training only: large-scale jitter
        (Ghiasi et al. 2021; Detectron2's `ResizeScale` + `FixedSizeCrop`
        of its LSJ baselines, `(0.1, 2.0)` there): each image is resized by
        `s * min(H / h, W / w)` for the canvas (H, W) and `s` drawn
        uniformly from the range, then cropped at a random place to the
        canvas where larger; boxes are clipped to the crop, instances left
        empty are dropped, masks are cut to their clipped boxes, keypoints
        outside the crop are no longer labelled (v = 0). It
        replaces the `min_size` / `max_size` resize in training (evaluation
        keeps it) and excludes `group_by_orientation`.
      repeat_threshold: optional float t, training only: Detectron2's
        `RepeatFactorTrainingSampler` (LVIS, Gupta et al. 2019) for
        long-tailed classes: class c, in a fraction f_c of the images, gets
        r_c = max(1, sqrt(t / f_c)), an image the largest r_c of its
        classes, and each epoch of the stream holds every image
        floor(r) times plus once more with probability r - floor(r) (one
        draw per image and epoch, from the seed). `self.repeat_factors`
        holds r. `train.epochs` still counts `len(records)` images an epoch.
      exif_orientation: bool, turn each image upright by its EXIF orientation
        tag, as viewers and labelling tools show it and Detectron2 reads it;
        False for annotations drawn on the stored pixels (a size mismatch
        names this setting when the tag explains it).
      flip_probability: float in [0, 1], training only.
      skip_bad: bool, skip (training) instead of raising on bad input.
      filter_empty: bool, drop training images without a non-crowd
        annotation (Detectron2's FILTER_EMPTY_ANNOTATIONS).
      shuffle_buffer: int or None, None shuffles the whole image list (ints,
        not images, so it is cheap).
      seed: int or None; with a seed, training order, scales and flips are
        reproducible. None leaves the choice to the caller's `seed` (the
        trainer passes one kept in its checkpoint), else draws at random.
      annotation_file, image_dir: str or None, override the layout paths;
        in training, tuples of the same length for several splits (each
        json's `file_name`s relative to its own image_dir).
      check_files: bool, check at load that every image file exists.
      group_by_orientation: bool, batch landscape and portrait images apart,
        each on its own tight canvas (see above). Several input pipelines
        need a seed, so that they draw the same orientations.
    """

    def __init__(self, data_dir=None, split="train2017", training=True,
                 batch_size=16, min_size=800, max_size=1333,
                 canvas_size=(1344, 1344), size_divisor=64, max_instances=100,
                 mask_size=112, flip_probability=0.5, skip_bad=True, filter_empty=True,
                 shuffle_buffer=None, seed=None, annotation_file=None,
                 image_dir=None, check_files=True, group_by_orientation=False,
                 with_masks=True, scale_jitter=None, repeat_threshold=None,
                 exif_orientation=True, with_keypoints=False, min_keypoints=1,
                 annotation_prefix="instances"):
        min_sizes = tuple(int(s) for s in np.atleast_1d(min_size))
        canvas_size = tuple(int(s) for s in canvas_size)
        if len(canvas_size) != 2 or any(s % size_divisor for s in canvas_size):
            raise ValueError(f"CocoInput: canvas_size={canvas_size} must be two "
                             f"multiples of size_divisor={size_divisor}")
        if not min_sizes or min(min_sizes) <= 0 or max_size < max(min_sizes):
            raise ValueError(f"CocoInput: min_size={min_size} must be positive "
                             f"and <= max_size={max_size}")
        if not 0.0 <= flip_probability <= 1.0:
            raise ValueError(f"CocoInput: flip_probability={flip_probability}")
        if scale_jitter is not None:
            scale_jitter = tuple(float(v) for v in scale_jitter)
            if len(scale_jitter) != 2 or not 0 < scale_jitter[0] <= scale_jitter[1]:
                raise ValueError(f"CocoInput: scale_jitter={scale_jitter} must be "
                                 f"(low, high) with 0 < low <= high")
            if group_by_orientation:
                raise ValueError("CocoInput: scale_jitter crops every image to the "
                                 "canvas; group_by_orientation must be False")
        if int(min_keypoints) < 0:
            raise ValueError(f"CocoInput: min_keypoints={min_keypoints} must be >= 0")
        if repeat_threshold is not None and not 0 < float(repeat_threshold) <= 1:
            raise ValueError(f"CocoInput: repeat_threshold={repeat_threshold} must be "
                             f"in (0, 1]")
        self.training = bool(training)
        self.batch_size = int(batch_size)
        self.min_sizes = min_sizes
        self.max_size = int(max_size)
        self.group_by_orientation = bool(group_by_orientation)
        self.canvas_size = canvas_size
        self.size_divisor = int(size_divisor)
        self.max_instances = int(max_instances)
        self.mask_size = int(mask_size)
        self.with_masks = bool(with_masks)
        self.with_keypoints = bool(with_keypoints)
        self.min_keypoints = int(min_keypoints)
        self.exif_orientation = bool(exif_orientation)
        # Training only: evaluation keeps the min_size / max_size resize.
        self.scale_jitter = scale_jitter if training else None
        self.flip_probability = float(flip_probability)
        self.skip_bad = bool(skip_bad)
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        sources = _sources(data_dir, split, annotation_file, image_dir, annotation_prefix)
        if len(sources) > 1 and not training:
            raise ValueError(f"CocoInput: evaluation reads one annotation file, got "
                             f"{len(sources)}: {', '.join(os.fspath(a) for a, _ in sources)}")
        # Each source's paths; `annotation_file` and `image_dir` are the
        # first's (a single split's, as before), for messages and evaluation.
        self.annotation_files = tuple(a for a, _ in sources)
        self.image_dirs = tuple(d for _, d in sources)
        self.annotation_file, self.image_dir = sources[0]
        self._described = " + ".join(os.fspath(a) for a in self.annotation_files)

        on_bad = ("raise" if not skip_bad
                  else "skip_image" if training else "skip_annotation")
        loaded = coco.load_splits(sources, on_bad=on_bad, check_files=check_files,
                                  with_masks=self.with_masks,
                                  with_keypoints=self.with_keypoints)
        self.category_map = loaded.category_map
        self.keypoint_names = loaded.keypoint_names
        self.keypoint_skeleton = loaded.keypoint_skeleton
        self.counts = loaded.counts
        self.problems = loaded.problems
        records = loaded.records
        if training and filter_empty:
            kept = [r for r in records if not r.is_crowd.all()]
            self.counts["empty_images"] += len(records) - len(kept)
            records = kept
        if training and self.with_keypoints and self.min_keypoints > 0:
            kept = [r for r in records
                    if int((r.keypoints[..., 2] > 0).sum()) >= self.min_keypoints]
            self.counts["few_keypoints_images"] += len(records) - len(kept)
            if len(kept) < len(records):
                logging.info("%s: left out %d training images with fewer than %d "
                             "labelled keypoints (min_keypoints)", self._described,
                             len(records) - len(kept), self.min_keypoints)
            records = kept
        self.records = records
        self.repeat_threshold = (float(repeat_threshold)
                                 if training and repeat_threshold is not None else None)
        self.repeat_factors = (repeat_factors(records, self.repeat_threshold)
                               if self.repeat_threshold is not None else None)
        if self.repeat_factors is not None:
            logging.info("%s: repeat factors at threshold %g: %d images above 1 (up to "
                         "%.2f); an epoch of the stream holds about %d images",
                         self._described, self.repeat_threshold,
                         int((self.repeat_factors > 1).sum()),
                         float(self.repeat_factors.max(initial=1.0)),
                         int(round(self.repeat_factors.sum())))
        # Resized (h, w) of each record at the largest min_size: int [n, 2].
        sizes = np.array([self._resized_size(r.height, r.width, max(self.min_sizes))[:2]
                          for r in records], np.int64).reshape(-1, 2)
        if self.scale_jitter is None:   # the jitter crops to the canvas
            self._check_canvas(sizes)
        self._group, self.canvases, self._group_names = self._groups(sizes)
        self._members = [np.flatnonzero(self._group == g) for g in range(len(self.canvases))]
        self._lock = threading.Lock()
        self._reported = set()
        if self.problems:
            logging.warning(
                "%s: skipped %d images and %d annotations (%s); first "
                "problems:\n  %s", self._described,
                self.counts["skipped_images"],
                self.counts["skipped_annotations"]
                + self.counts["orphan_annotations"],
                ", ".join(f"{k}={v}" for k, v in sorted(self.counts.items())),
                "\n  ".join(self.problems[:10]))
        logging.info("%s: %d images, %d classes (%s); canvases %s", self._described,
                     len(self.records), self.category_map.num_classes,
                     "training" if training else "evaluation",
                     ", ".join(f"{name} {h}x{w} ({int((self._group == g).sum())} images)"
                               for g, (name, (h, w)) in enumerate(
                                   zip(self._group_names, self.canvases))))

    @property
    def num_classes(self):
        """C, foreground classes (contiguous ids 1..C)."""
        return self.category_map.num_classes

    @property
    def num_keypoints(self):
        """K, keypoints per instance (0 without `with_keypoints`)."""
        return len(self.keypoint_names)

    @property
    def keypoint_flip_map(self):
        """tuple of K int: after a horizontal flip keypoint i is the old
        keypoint `flip_map[i]` (`mrcnn.data.coco.keypoint_flip_map`)."""
        return coco.keypoint_flip_map(self.keypoint_names)

    @property
    def class_image_counts(self):
        """int64 [C]: the records holding each class 1..C (`class_image_counts`)."""
        return class_image_counts(self.records, self.num_classes)

    def num_batches(self, input_context=None):
        """Evaluation batches per epoch of one pipeline (each group's last one padded)."""
        batch = self._per_pipeline_batch(input_context)
        groups = self._group[self._shard(input_context)]
        return sum(-(-int((groups == g).sum()) // batch) for g in range(len(self.canvases)))

    def shard_records(self, input_context=None):
        """The image records one input pipeline reads, in file-list order."""
        return [self.records[i] for i in self._shard(input_context)]

    def __call__(self, input_context=None, start=0, seed=None):
        """The dataset of one input pipeline.

        Args:
          input_context: tf.distribute.InputContext or None.
          start: int, training only: how many images of this pipeline's
            stream were already read. They are skipped on the stream of image
            indices, before anything is decoded, so that a resumed run reads
            on where the interrupted one stopped (exactly, when the order is
            seeded: an undecodable image is replaced, not dropped).
          seed: int or None, used when `self.seed` is None: the trainer's run
            seed, kept in its checkpoint, so that the order survives a restart.

        Returns:
          tf.data.Dataset of batch dicts (module docstring), static shapes;
          with `group_by_orientation` the image height and width are known
          per batch, not in the spec (one of `self.canvases`).
        """
        shard = self._shard(input_context)
        if not len(shard):
            raise ValueError(f"{self._described}: no images to read in this "
                             f"input pipeline ({len(self.records)} in total)")
        if start and not self.training:
            raise ValueError("CocoInput: start is for the training stream; "
                             "evaluation reads every image once")
        batch = self._per_pipeline_batch(input_context)
        run_seed = self.seed if self.seed is not None else seed
        seed = run_seed
        if seed is not None and input_context is not None:
            seed = seed + 1000003 * input_context.input_pipeline_id
        if self.training:
            ds = self._training_indices(shard, input_context, batch, seed, run_seed)
            ds = tf.data.Dataset.zip((ds, tf.data.Dataset.random(seed=seed)))
            # Integers only up to here: skipping an epoch of COCO costs
            # milliseconds, not a decode of 118k images.
            ds = ds.skip(int(start))
            ds = ds.map(self._example, num_parallel_calls=tf.data.AUTOTUNE,
                        deterministic=seed is not None)
        else:
            parts = []
            for g, canvas in enumerate(self.canvases):
                indices = shard[self._group[shard] == g]
                if not len(indices):
                    continue
                part = tf.data.Dataset.from_tensor_slices(tf.constant(indices, tf.int64))
                part = part.map(lambda i: (i, tf.constant(0, tf.int64)))
                part = part.map(self._example, num_parallel_calls=tf.data.AUTOTUNE,
                                deterministic=True)
                if len(indices) % batch:
                    part = part.concatenate(tf.data.Dataset.from_tensors(
                        self._padding(canvas)).repeat(batch - len(indices) % batch))
                parts.append(part)
            ds = parts[0]
            for part in parts[1:]:
                ds = ds.concatenate(part)
        ds = ds.batch(batch, drop_remainder=True,
                      num_parallel_calls=tf.data.AUTOTUNE)
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = (
            tf.data.experimental.AutoShardPolicy.OFF)   # sharded above
        return ds.with_options(options).prefetch(tf.data.AUTOTUNE)

    # -- internals ---------------------------------------------------------

    def _shard(self, input_context):
        """int64 [n], this pipeline's indices into self.records, in order.

        Each group is sharded on its own, so that every pipeline gets its
        share of every orientation.
        """
        if input_context is None:
            return np.arange(len(self.records), dtype=np.int64)
        k, n = input_context.input_pipeline_id, input_context.num_input_pipelines
        return np.sort(np.concatenate([m[k::n] for m in self._members])).astype(np.int64)

    def _training_indices(self, shard, input_context, batch, seed, run_seed):
        """The endless stream of record indices of one training pipeline.

        Ungrouped: the shard, shuffled each epoch. Grouped: each group's
        indices shuffled each epoch and cut into windows of one step's
        images (`batch` x this pipeline's replicas); a draw per step, seeded
        by the run seed alone so that every pipeline draws alike, picks the
        group whose window comes next.
        """
        def shuffled(indices, seed):
            if self.repeat_factors is not None:
                return _repeat_factor_epochs(indices, self.repeat_factors[indices], seed)
            ds = tf.data.Dataset.from_tensor_slices(tf.constant(indices, tf.int64))
            return ds.shuffle(self.shuffle_buffer or len(indices), seed=seed,
                              reshuffle_each_iteration=True).repeat()

        if len(self.canvases) == 1:
            return shuffled(shard, seed)
        pipelines = input_context.num_input_pipelines if input_context else 1
        if pipelines > 1 and run_seed is None:
            raise ValueError("CocoInput: group_by_orientation over several input "
                             "pipelines needs a seed (the trainer passes one)")
        groups = self._group[shard]
        for g in range(len(self.canvases)):
            if not (groups == g).any():
                raise ValueError(
                    f"{self._described}: input pipeline "
                    f"{input_context.input_pipeline_id} of {pipelines} has no "
                    f"{self._group_names[g]} image; use fewer pipelines or "
                    f"group_by_orientation=False")
        replicas = (input_context.num_replicas_in_sync // pipelines
                    if input_context else 1)
        window = batch * max(replicas, 1)
        windows = [shuffled(shard[groups == g], None if seed is None else seed + g)
                   .batch(window) for g in range(len(self.canvases))]
        # P(portrait step) = the portrait share of the whole split, the same
        # number in every pipeline.
        threshold = int(round(float((self._group == 1).mean()) * (1 << 32)))
        choice = tf.data.Dataset.random(
            seed=None if run_seed is None else run_seed + 7919).map(
                lambda r: tf.cast(r % (1 << 32) < threshold, tf.int64))
        return tf.data.Dataset.choose_from_datasets(windows, choice).unbatch()

    def _per_pipeline_batch(self, input_context):
        del input_context  # the batch is per replica whatever the strategy
        return self.batch_size

    def _resized_size(self, height, width, min_size):
        scale = min(min_size / min(height, width), self.max_size / max(height, width))
        return round(height * scale), round(width * scale), scale

    def _check_canvas(self, sizes):
        for r, (rh, rw) in zip(self.records, sizes):
            if rh > self.canvas_size[0] or rw > self.canvas_size[1]:
                raise ValueError(
                    f"CocoInput: image id {r.image_id} ({r.path}) resizes to "
                    f"{rh}x{rw}, larger than canvas_size={self.canvas_size}; "
                    f"raise canvas_size or lower min_size/max_size")

    def _groups(self, sizes):
        """Each record's group, the groups' canvases and names, from the
        records' resized sizes (int [n, 2]).

        Returns (int64 [len(records)] indices into the canvases, tuple of
        (H, W), tuple of str): one group on `canvas_size` unless grouping,
        else landscape then portrait (those present), each on the smallest
        multiple of size_divisor holding its resized images.
        """
        n = len(self.records)
        if not self.group_by_orientation or not n:
            return np.zeros(n, np.int64), (self.canvas_size,), ("all",)
        d = self.size_divisor
        portrait = np.array([r.height > r.width for r in self.records])
        canvases, names, group = [], [], np.zeros(n, np.int64)
        for flag, name in ((False, "landscape"), (True, "portrait")):
            if not (portrait == flag).any():
                continue
            canvas = tuple(int(-(-v // d) * d) for v in sizes[portrait == flag].max(0))
            if canvas in canvases:       # the same shape: one group
                continue
            group[portrait == flag] = len(canvases)
            canvases.append(canvas)
            names.append(name)
        return group, tuple(canvases), tuple(names)

    def _load(self, index):
        """numpy_function body: decode one record (mrcnn/data/decode.py).

        In training with `skip_bad`, a record that does not decode is replaced
        by the next one of its group (in record order, cyclically) that does.
        Returns the decoded arrays (keypoints float32 [n, K, 3] (x, y, v),
        original pixels, K = 0 when batches hold none) and the index of the
        record they are of.
        """
        index = int(index)
        members = self._members[self._group[index]]
        first = int(np.searchsorted(members, index))   # members[first] == index
        s = self._decoded_mask_size
        error = None
        for k in range(len(members)):
            i = int(members[(first + k) % len(members)])
            record = self.records[i]
            if record.path in self._reported:   # known bad: not decoded again
                if k == 0:
                    with self._lock:
                        self.counts["undecodable_images"] += 1
                continue
            try:
                image, boxes, classes, masks, dropped = decode.decode_example(
                    record, s, self.max_instances,
                    exif_orientation=self.exif_orientation)
            except coco.DataError as e:
                if not (self.training and self.skip_bad):
                    raise
                error = e
                with self._lock:
                    self.counts["undecodable_images"] += 1
                    if record.path not in self._reported:
                        self._reported.add(record.path)
                        self.problems.append(str(e))
                        logging.warning("skipping: %s", e)
                continue
            if dropped:
                with self._lock:
                    self.counts["dropped_instances"] += dropped
            return image, boxes, classes, masks, self._keypoints(record), np.int64(i)
        raise coco.DataError(
            f"{self._described}: no image decodes among the {len(members)} "
            f"that can replace image id {self.records[index].image_id}; last: {error}")

    def _keypoints(self, record):
        """float32 [n, K, 3] (x, y, v) of the instances `decode_example` keeps
        (`decode.kept_instances`); [n, 0, 3] when batches hold no keypoints."""
        keep = decode.kept_instances(record, self.max_instances)
        if not self._batch_has_keypoints:
            return np.zeros((len(keep), 0, 3), np.float32)
        return record.keypoints[keep].astype(np.float32)

    def _example(self, index, random_bits):
        """One image: decode (host), resize, flip, pad."""
        s, k = self._decoded_mask_size, self._batch_num_keypoints
        image, boxes, classes, masks, keypoints, index = tf.numpy_function(
            self._load, [index],
            [tf.uint8, tf.float32, tf.int32, tf.uint8, tf.float32, tf.int64],
            stateful=False)
        image.set_shape([None, None, 3])
        boxes.set_shape([None, 4])
        classes.set_shape([None])
        masks.set_shape([None, s, s])
        keypoints.set_shape([None, k, 3])
        index.set_shape([])
        image_ids = tf.constant([r.image_id for r in self.records], tf.int64)
        # (x, y, v) -> (y, x, v), the order of the boxes' coordinates.
        keypoints = tf.gather(keypoints, [1, 0, 2], axis=2)

        if self.scale_jitter is not None:
            return self._jittered_example(image, boxes, classes, masks, keypoints, index,
                                          random_bits, image_ids)
        # 1. Size: shorter side to min_size (drawn in training), longer <= max.
        if self.training:
            pick = (random_bits // (1 << _FLIP_BITS)) % len(self.min_sizes)
            min_size = tf.gather(tf.constant(self.min_sizes, tf.float64), pick)
        else:
            min_size = tf.constant(max(self.min_sizes), tf.float64)
        image, size, resized, scale = resize_image(image, min_size, self.max_size)
        factor = tf.cast(resized / size, tf.float32)
        boxes = boxes * tf.tile(factor, [2])[None, :]   # [n, 4]
        keypoints = keypoints * tf.concat([factor, [1.0]], 0)   # [n, K, 3]

        # 2. Flip (training): image, boxes, box-frame masks and keypoints together.
        if self.training:
            image, boxes, masks, keypoints = self._random_flip(
                image, boxes, masks, keypoints, random_bits, resized[1])
        keypoints = _labelled_inside(keypoints, tf.cast(resized, tf.float32))

        # 3. Pad bottom/right to the record's canvas.
        if len(self.canvases) == 1:
            image = pad_to_canvas(image, self.canvases[0])
        else:
            portrait = tf.gather(tf.constant(self._group, tf.int64), index) > 0
            image = tf.cond(portrait,
                            lambda: pad_to_canvas(image, self.canvases[1]),
                            lambda: pad_to_canvas(image, self.canvases[0]))

        # 4. Pad gt to M slots.
        return self._pack(image, tf.concat([size, resized, [scale]], 0),
                          tf.gather(image_ids, index), boxes, classes, masks, keypoints)

    def _pack(self, image, info, image_id, boxes, classes, masks, keypoints):
        """The example dict, its gt padded to M slots, static shapes."""
        m, s, k = self.max_instances, self._decoded_mask_size, self._batch_num_keypoints
        pad = m - tf.shape(classes)[0]
        example = {
            "images": image,
            "image_info": tf.cast(info, tf.float32),
            "image_id": image_id,
            "gt_boxes": tf.pad(boxes, [[0, pad], [0, 0]]),
            "gt_classes": tf.pad(classes, [[0, pad]]),
            "gt_valid": tf.sequence_mask(tf.shape(classes)[0], m),
        }
        example["image_info"].set_shape([5])
        example["gt_boxes"].set_shape([m, 4])
        example["gt_classes"].set_shape([m])
        if self._batch_has_masks:
            example["gt_masks"] = tf.pad(masks, [[0, pad], [0, 0], [0, 0]])
            example["gt_masks"].set_shape([m, s, s])
        if self._batch_has_keypoints:
            example["gt_keypoints"] = tf.pad(keypoints, [[0, pad], [0, 0], [0, 0]])
            example["gt_keypoints"].set_shape([m, k, 3])
        return example

    def _random_flip(self, image, boxes, masks, keypoints, random_bits, width):
        """Flips image, boxes, box-frame masks and keypoints [n, K, 3] (y, x, v)
        together, with `flip_probability`; keypoints are permuted by the
        flip map too."""
        if self.flip_probability <= 0:
            return image, boxes, masks, keypoints
        draw = tf.cast(random_bits % (1 << _FLIP_BITS), tf.float32) / (1 << _FLIP_BITS)
        flip = draw < self.flip_probability
        rw = tf.cast(width, tf.float32)
        image = tf.cond(flip, lambda: tf.reverse(image, [1]), lambda: image)
        boxes = tf.cond(
            flip,
            lambda: tf.stack([boxes[:, 0], rw - boxes[:, 3],
                              boxes[:, 2], rw - boxes[:, 1]], axis=1),
            lambda: boxes)
        masks = tf.cond(flip, lambda: tf.reverse(masks, [2]), lambda: masks)
        flip_map = tf.constant(self.keypoint_flip_map if self._batch_has_keypoints
                               else (), tf.int32)
        keypoints = tf.cond(
            flip,
            lambda: tf.gather(tf.stack([keypoints[..., 0], rw - keypoints[..., 1],
                                        keypoints[..., 2]], axis=-1), flip_map, axis=1),
            lambda: keypoints)
        return image, boxes, masks, keypoints

    def _jittered_example(self, image, boxes, classes, masks, keypoints, index,
                          random_bits, image_ids):
        """`_example` with large-scale jitter: resize by a drawn scale, flip, crop."""
        target = tf.constant(self.canvas_size, tf.float64)
        # Three uniform draws from the element's random bits: scale, crop y, x.
        u = tf.random.stateless_uniform([3], seed=tf.stack([random_bits, index]),
                                        dtype=tf.float64)
        low, high = self.scale_jitter
        size = tf.cast(tf.shape(image)[:2], tf.float64)
        scale = (low + (high - low) * u[0]) * tf.reduce_min(target / size)
        resized = tf.maximum(tf.round(size * scale), 1.0)
        image = tf.saturate_cast(tf.round(tf.image.resize(
            image, tf.cast(resized, tf.int32), method="bilinear")), tf.uint8)
        factor = tf.cast(resized / size, tf.float32)
        boxes = boxes * tf.tile(factor, [2])[None, :]
        keypoints = keypoints * tf.concat([factor, [1.0]], 0)
        image, boxes, masks, keypoints = self._random_flip(
            image, boxes, masks, keypoints, random_bits, resized[1])
        # Crop: a random window of the canvas size where the image is larger.
        offset = tf.floor(u[1:] * (tf.maximum(resized - target, 0.0) + 1.0))  # [2]
        visible = tf.minimum(resized - offset, target)  # [2]
        o, v = tf.cast(offset, tf.int32), tf.cast(visible, tf.int32)
        image = image[o[0]:o[0] + v[0], o[1]:o[1] + v[1]]
        shift = tf.tile(tf.cast(offset, tf.float32), [2])[None, :]
        limit = tf.tile(tf.cast(visible, tf.float32), [2])[None, :]
        clipped = tf.clip_by_value(boxes - shift, 0.0, limit)  # [n, 4]
        keep = tf.where((clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1]))[:, 0]
        if self.with_masks:
            masks = recrop_masks(tf.gather(masks, keep), tf.gather(boxes - shift, keep),
                                 tf.gather(clipped, keep))
        keypoints = _labelled_inside(
            keypoints - tf.concat([tf.cast(offset, tf.float32), [0.0]], 0),
            tf.cast(visible, tf.float32))
        return self._pack(pad_to_canvas(image, self.canvas_size),
                          tf.concat([size, visible, [scale]], 0), tf.gather(image_ids, index),
                          tf.gather(clipped, keep), tf.gather(classes, keep), masks,
                          tf.gather(keypoints, keep))

    @property
    def _batch_has_masks(self):
        # Evaluation scores against the annotation file, never the batch's gt
        # masks: not decoding them saves host time, and not batching them 10 MB
        # per batch of 8 (M = 100, S = 112) that would be copied to the device.
        return self.with_masks and self.training

    @property
    def _decoded_mask_size(self):
        return self.mask_size if self._batch_has_masks else 0

    @property
    def _batch_has_keypoints(self):
        # Evaluation scores keypoints against the annotation file too.
        return self.with_keypoints and self.training

    @property
    def _batch_num_keypoints(self):
        return self.num_keypoints if self._batch_has_keypoints else 0

    def _padding(self, canvas):
        """The all-zero example with image_id -1 that fills a last eval batch."""
        m = self.max_instances
        padding = {
            "images": tf.zeros(tuple(canvas) + (3,), tf.uint8),
            "image_info": tf.zeros([5], tf.float32),
            "image_id": tf.constant(-1, tf.int64),
            "gt_boxes": tf.zeros([m, 4], tf.float32),
            "gt_classes": tf.zeros([m], tf.int32),
            "gt_valid": tf.zeros([m], tf.bool),
        }
        return padding
