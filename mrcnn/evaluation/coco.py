"""Model detections -> COCO results entries, and COCO box/mask evaluation.

Shape letters: `B` images in a batch, `D` detection slots per image (100 for
the R50-FPN recipe), `oh, ow` the mask head's output size (28 x 28), `H, W`
one image's ORIGINAL height and width. Classes are contiguous `1..C`; COCO
category ids are whatever the annotation file uses (non-contiguous for COCO
2017), and `class_to_category` maps one to the other.

The model's inference output for one batch is a dict of numpy arrays or
tensors:

- `detection_boxes`: float32 [B, D, 4] (y1, x1, y2, x2) in original-image
  pixels; padded slots 0.
- `detection_scores`: float32 [B, D]; padded slots 0.
- `detection_classes`: int32 [B, D] in 1..C; padded slots -1 or 0.
- `detection_masks`: float32 [B, D, oh, ow] mask probabilities inside each
  box; padded slots 0.
- `detection_keypoints` (Keypoint R-CNN): float32 [B, D, K, 3] (y, x,
  score) in original-image pixels, continuous (pixel i's centre at i + 0.5);
  padded slots 0.
- `num_detections`: int32 [B]; slots `>= num_detections[b]` are padding.

and the batch carries `image_id`: int64 [B] (-1 for a padded image slot) and
`image_info`: float32 [B, 5] (original_height, original_width,
resized_height, resized_width, scale).

This module runs eagerly on the host, one image at a time: it is the glue
between the batched graph and pycocotools, not an op.
"""

import contextlib
import copy
import io
import json
import os

import numpy as np
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mrcnn.data import files
from mrcnn.evaluation import cocoeval
# The 12 numbers COCOeval.summarize() prints, in its order (stats[0..11]),
# and the IoU types.
from mrcnn.evaluation.cocoeval import IOU_TYPES, STAT_NAMES
from mrcnn.evaluation.results import ResultsTable
from mrcnn.ops import masks as mask_ops

# `CocoEvaluator` engines: this package's `cocoeval.coco_evaluate` (the same
# numbers, ~10x faster) or pycocotools' COCOeval itself.
ENGINES = ("mrcnn", "pycocotools")

# Mask probability at or above which a pasted pixel belongs to the instance
# (Mask R-CNN §3, "binarized at a threshold of 0.5").
DEFAULT_MASK_THRESHOLD = 0.5

# COCOeval's names of its 10 keypoint numbers (stats[0..9], 20 detections
# per image), and the per-keypoint OKS sigmas of COCO's 17 person keypoints
# (pycocotools' `Params.kpt_oks_sigmas`).
KEYPOINT_STAT_NAMES = ("AP", "AP50", "AP75", "APm", "APl",
                       "AR", "AR50", "AR75", "ARm", "ARl")
COCO_PERSON_OKS_SIGMAS = tuple(np.array(
    [.26, .25, .25, .35, .35, .79, .79, .72, .72, .62, .62, 1.07, 1.07, .87, .87,
     .89, .89]) / 10.0)


def _to_numpy(x):
    """A tensor or array-like as a numpy array (tensors via `.numpy()`)."""
    return x.numpy() if hasattr(x, "numpy") else np.asarray(x)


def _paste_axes(boxes, height, width, cells):
    """`mask_ops.paste_coordinates` of K boxes along both axes, as numpy.

    Args:
      boxes: float32 [K, 4] (y1, x1, y2, x2) pixels.
      height, width: Python ints, pixels sampled along each axis (a pixel's
        coordinates do not depend on the image size, so one call can serve
        images up to this size, each reading its first rows / columns).
      cells: (oh, ow) Python ints, the masks' size.

    Returns:
      ((y_low, y_high, y_frac, y_inside), (x_low, ...)): numpy [K, height]
      and [K, width] (`paste_coordinates`' outputs without the batch axis).
    """
    return tuple(
        tuple(t.numpy()[0] for t in mask_ops.paste_coordinates(
            boxes[None, :, lo], boxes[None, :, hi], size, n))
        for lo, hi, size, n in ((0, 2, height, cells[0]), (1, 3, width, cells[1])))


# Box columns pasted at once (each `oh` float32 values and a few temporaries
# of that size): bounds host memory for many detections on a large image.
_PASTE_CHUNK_COLUMNS = 1 << 16


def _window_runs(masks, axes, height, width, threshold):
    """COCO uncompressed RLE counts of K masks pasted inside their boxes.

    A mask is 0 outside its box's window (the rows and columns whose pixel
    centres lie in the box, `paste_coordinates`' `inside`). Each window
    column first interpolates between two of the mask's columns (a vector of
    `oh` values); down the column, a pixel's value is that vector's
    piecewise-linear interpolation at the row's cell coordinate, so the rows
    at or above `threshold` are read off where the vector crosses it, by a
    search among the rows' (sorted) coordinates. The host work scales with
    the windows' widths times `oh`, not with their areas. A pixel can
    differ from `paste_masks` only where its value is within float32
    rounding of `threshold`.

    COCO RLE runs over pixels in column-major order and starts with a run of
    zeros (possibly empty); the runs are the distances between the positions
    where the value changes, where changes that meet at one position (a run
    that crosses from one column into the next, an interval between two
    crossings holding no row) cancel in pairs.

    Args:
      masks: float32 [K, oh, ow] probabilities.
      axes: `_paste_axes` of the K boxes, at least `height` x `width`.
      height, width: Python ints, the image size.
      threshold: Python float; a pixel is in the mask at value >= threshold.

    Returns:
      list of K int64 arrays of run lengths, each summing to height * width.
    """
    (y_low, _, y_frac, y_in), (x_low, x_high, x_frac, x_in) = (
        tuple(a[:, :size] for a in axis) for axis, size in zip(axes, (height, width)))
    num, oh, ow = masks.shape
    rows, cols = y_in.sum(1), x_in.sum(1)  # window height, width [K]
    top = y_in.argmax(1)                   # window's first row [K]
    pixels = height * width
    runs = [np.array([pixels])] * num      # an empty window: all zeros
    chunks = np.split(np.arange(num),
                      np.flatnonzero(np.diff(np.cumsum(cols) // _PASTE_CHUNK_COLUMNS)) + 1)
    for det in chunks:
        det = det[(rows[det] > 0) & (cols[det] > 0)]
        if det.size == 0:
            continue
        n = det.size
        # Window rows' cell coordinates, sorted within each box and offset
        # by box, so that one search serves all boxes ([sum of rows]).
        spacing = oh + 1.0
        box_of_row, row = np.nonzero(y_in[det])
        coords = (box_of_row * spacing + y_low[det][box_of_row, row]
                  + y_frac[det][box_of_row, row].astype(np.float64))
        first_row = np.concatenate([[0], np.cumsum(rows[det])[:-1]])
        # Each window column across the mask's rows: [C, oh] float32.
        box, column = np.nonzero(x_in[det])
        frac = x_frac[det][box, column][:, None]
        mask_columns = masks[det].transpose(0, 2, 1).reshape(n * ow, oh)
        values = (mask_columns[box * ow + x_low[det][box, column]] * (1.0 - frac)
                  + mask_columns[box * ow + x_high[det][box, column]] * frac)
        on = values >= threshold
        # Crossings between cells i and i + 1, at t = i + u in cell units.
        at, cell = np.nonzero(on[:, 1:] != on[:, :-1])
        low = values[at, cell].astype(np.float64)
        high = values[at, cell + 1].astype(np.float64)
        t = box[at] * spacing + cell + (threshold - low) / (high - low)
        rising = on[at, cell + 1]
        # A rising crossing's first row in has t_row >= t; a falling one's
        # first row out has t_row > t.
        rho = np.where(rising, np.searchsorted(coords, t, "left"),
                       np.searchsorted(coords, t, "right")) - first_row[box[at]]
        column_start = column * height + top[det][box]  # [C] position of row 0
        starts_on = np.flatnonzero(on[:, 0])
        ends_on = np.flatnonzero(on[:, -1])
        which = np.concatenate([box[starts_on], box[at], box[ends_on]])
        position = np.concatenate([
            column_start[starts_on],
            column_start[at] + rho,
            column_start[ends_on] + rows[det][box[ends_on]]])
        key, repeats = np.unique(which * (pixels + 1) + position, return_counts=True)
        key = key[repeats % 2 == 1]
        which, position = np.divmod(key, pixels + 1)
        # Run lengths: each change's distance from the one before (from 0
        # for a box's first change), then the zeros to the image's end
        # (a mask that reaches the image's last pixel ends on its run).
        counts = np.bincount(which, minlength=n)
        ends = np.cumsum(counts)
        previous = np.concatenate([[0], position[:-1]])
        previous[(ends - counts)[counts > 0]] = 0
        last = np.full(n, pixels)
        last[counts > 0] -= position[ends[counts > 0] - 1]
        tail = last > 0
        lengths = np.insert(position - previous, ends[tail], last[tail])
        for i, window in zip(det, np.split(lengths, np.cumsum(counts + tail)[:-1])):
            runs[i] = window
    return runs


def paste_masks_rle(masks, boxes, image_shape, threshold=DEFAULT_MASK_THRESHOLD,
                    axes=None):
    """COCO RLEs of `mrcnn.ops.masks.paste_masks`, pasting only inside boxes.

    The op resamples every mask over the whole image (`K x H x W` work and a
    float `[K, H, W]` tensor); a COCO result needs each mask only inside its
    box, everything else is 0. Here the pixel model comes from the op's own
    `paste_coordinates`, and NumPy finds where each box column's
    interpolated values cross `threshold` (`_window_runs`): host time scales
    with the boxes' widths times `oh`, not with `K x H x W` or the boxes'
    areas. Pixels agree with `paste_masks`
    except where the interpolated value is within float32 rounding of
    `threshold` (`tests/evaluation/test_coco.py`).

    Args:
      masks: float [K, oh, ow] probabilities.
      boxes: float [K, 4] (y1, x1, y2, x2) in pixels of the `H x W` image.
      image_shape: (H, W) Python ints.
      threshold: Python float.
      axes: optional `_paste_axes` of `boxes` at least H x W (computed here
        if None): a batch's images can share one call of the op.

    Returns:
      K COCO RLE dicts `{size: [H, W], counts: str}` (JSON-safe).
    """
    masks = np.asarray(masks, np.float32)
    boxes = np.asarray(boxes, np.float32)
    height, width = (int(v) for v in image_shape)
    if masks.shape[0] == 0:
        return []
    if axes is None:
        axes = _paste_axes(boxes, height, width, masks.shape[1:])
    rles = _encode_rles(masks, axes, height, width, threshold)
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def _encode_rles(masks, axes, height, width, threshold):
    """pycocotools RLE dicts `{size, counts: bytes}` of K pasted masks."""
    objects = [{"counts": runs.tolist(), "size": [height, width]}
               for runs in _window_runs(masks, axes, height, width, threshold)]
    return mask_util.frPyObjects(objects, height, width)


def detections_to_coco(detections, image_ids, image_info, class_to_category,
                       mask_threshold=DEFAULT_MASK_THRESHOLD,
                       include_masks=True, include_keypoints=False):
    """COCO results entries for one batch of model output, as dicts:
    `list(detections_to_table(...))` (arguments and entries there)."""
    return list(detections_to_table(detections, image_ids, image_info, class_to_category,
                                    mask_threshold, include_masks, include_keypoints))


def detections_to_table(detections, image_ids, image_info, class_to_category,
                        mask_threshold=DEFAULT_MASK_THRESHOLD,
                        include_masks=True, include_keypoints=False):
    """COCO results entries for one batch of model output, as a `ResultsTable`.

    Padded image slots (`image_id < 0`), padded detection slots
    (`k >= num_detections[b]`) and slots whose class is `<= 0` are skipped.
    Masks are pasted at each image's original size by `paste_masks_rle`
    (`mrcnn.ops.masks.paste_masks`' pixels, computed only inside each box),
    per image, because original image sizes differ within a batch.

    Args:
      detections: dict of the model's inference output (module docstring):
        `detection_boxes` float32 [B, D, 4] (y1, x1, y2, x2) original pixels,
        `detection_scores` float32 [B, D], `detection_classes` int32 [B, D]
        (padded -1 or 0), `num_detections` int32 [B], and with
        `include_masks` also `detection_masks` float32 [B, D, oh, ow].
      image_ids: int64 [B]; -1 marks a padded image slot.
      image_info: float32 [B, 5] (original_height, original_width,
        resized_height, resized_width, scale); only the first two are read.
      class_to_category: dict[int, int], contiguous class 1..C -> COCO
        category id.
      mask_threshold: Python float; a pasted pixel is in the mask where the
        resampled probability is `>= mask_threshold`.
      include_masks: whether to paste masks and add `segmentation`.
      include_keypoints: whether to add `keypoints` from
        `detection_keypoints` [B, D, K, 3].

    Returns:
      a `ResultsTable` of the kept slots, image by image in slot order:
      bbox [x, y, w, h] in original pixels, score, category id and, with
      `include_masks`, each mask's compressed RLE at its image's size.
      Its entries are dicts `{image_id: int, category_id: int, bbox: [x,
      y, w, h] (floats), score: float}` plus, with `include_masks`,
      `segmentation: {size: [H, W], counts: str}` (COCO RLE); with
      `include_keypoints`, `keypoints: [x, y, score] * K`, x and y as COCO
      annotations hold them, pixel indices (the continuous coordinate less
      0.5, as Detectron2 writes them).

    Raises:
      ValueError: a valid detection has a class missing from
        `class_to_category`, or `include_masks` (`include_keypoints`) is set
        and `detection_masks` (`detection_keypoints`) is missing.
    """
    if include_masks and "detection_masks" not in detections:
        raise ValueError(
            "include_masks=True but detections has no 'detection_masks'")
    if include_keypoints and "detection_keypoints" not in detections:
        raise ValueError(
            "include_keypoints=True but detections has no 'detection_keypoints'")
    boxes = _to_numpy(detections["detection_boxes"]).astype(np.float32)
    scores = _to_numpy(detections["detection_scores"]).astype(np.float32)
    classes = _to_numpy(detections["detection_classes"]).astype(np.int64)
    num_detections = _to_numpy(detections["num_detections"]).astype(np.int64)
    masks = (_to_numpy(detections["detection_masks"]).astype(np.float32)
             if include_masks else None)
    image_ids = _to_numpy(image_ids).astype(np.int64).reshape(-1)
    image_info = _to_numpy(image_info).astype(np.float32)

    keeps = {}  # b -> indices [K] of its valid detection slots
    for b, image_id in enumerate(image_ids):
        if image_id < 0:
            continue
        in_count = np.arange(boxes.shape[1]) < num_detections[b]
        keep = np.nonzero(in_count & (classes[b] > 0))[0]  # [K]
        if keep.size == 0:
            continue
        unknown = sorted({int(c) for c in classes[b, keep]} -
                         set(class_to_category))
        if unknown:
            raise ValueError(
                f"detection_classes {unknown} of image_id {int(image_id)} "
                f"are not in class_to_category (classes "
                f"{sorted(class_to_category)})")
        keeps[b] = keep
    sizes = {b: (int(round(float(image_info[b, 0]))), int(round(float(image_info[b, 1]))))
             for b in keeps}
    if include_masks and keeps:
        # One call of the op for the batch, at its largest image size.
        batch_axes = _paste_axes(
            np.concatenate([boxes[b, keep] for b, keep in keeps.items()]),
            max(h for h, _ in sizes.values()), max(w for _, w in sizes.values()),
            masks.shape[2:])
        offsets = np.cumsum([0] + [keep.size for keep in keeps.values()])

    columns = {"image_id": [], "category_id": [], "bbox": [], "score": [],
               "mask_size": [], "mask_counts": [], "keypoints": []}
    if include_keypoints:
        points = _to_numpy(detections["detection_keypoints"]).astype(np.float64)
        # (y, x, score) -> COCO's (x, y, score) in pixel indices.
        points = np.stack([points[..., 1] - 0.5, points[..., 0] - 0.5, points[..., 2]],
                          axis=-1)  # [B, D, K, 3]
    for i, (b, keep) in enumerate(keeps.items()):
        image_boxes = boxes[b, keep].astype(np.float64)  # [K, 4]
        y1, x1, y2, x2 = image_boxes.T
        columns["image_id"].append(np.full(keep.size, image_ids[b]))
        columns["category_id"].append(
            np.array([class_to_category[int(c)] for c in classes[b, keep]], np.int64))
        columns["bbox"].append(np.stack([x1, y1, x2 - x1, y2 - y1], axis=-1))
        columns["score"].append(scores[b, keep])
        if include_keypoints:
            columns["keypoints"].append(points[b, keep].reshape(keep.size, -1))
        if include_masks:
            axes = tuple(tuple(a[offsets[i]:offsets[i + 1]] for a in axis)
                         for axis in batch_axes)
            columns["mask_size"].append(np.tile(sizes[b], (keep.size, 1)))
            columns["mask_counts"] += [
                rle["counts"] for rle in _encode_rles(
                    masks[b, keep], axes, *sizes[b], mask_threshold)]
    num_keypoints = (_to_numpy(detections["detection_keypoints"]).shape[2]
                     if include_keypoints else 0)
    if not keeps:
        return ResultsTable.empty(masks=include_masks, keypoints=num_keypoints)
    return ResultsTable(
        *(np.concatenate(columns[k]) for k in ("image_id", "category_id", "bbox", "score")),
        np.concatenate(columns["mask_size"]) if include_masks else None,
        columns["mask_counts"] if include_masks else None,
        np.concatenate(columns["keypoints"]) if include_keypoints else None)


def load_coco(path):
    """pycocotools' `COCO` of an annotation file on any filesystem.

    `COCO(path)` opens local files only; this reads the json through
    `mrcnn.data.files` (local, `gs://`, ...) and indexes it, quietly.

    Args:
      path: str or PathLike, a COCO-format annotation json.

    Returns:
      pycocotools.coco.COCO.
    """
    coco = COCO()
    dataset = files.read_json(path)
    if not isinstance(dataset, dict):
        raise ValueError(f"{os.fspath(path)}: not a COCO annotation file (top level "
                         f"is {type(dataset).__name__}, not an object)")
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _empty_results(coco_gt):
    """A results COCO with no annotations: `loadRes([])` would fail."""
    coco_dt = COCO()
    coco_dt.dataset = {
        "images": copy.deepcopy(coco_gt.dataset["images"]),
        "categories": copy.deepcopy(coco_gt.dataset.get("categories", [])),
        "annotations": [],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt.createIndex()
    return coco_dt


class CocoEvaluator:
    """Accumulates detections over batches and scores them with COCO's AP.

    Evaluation is restricted to the image ids seen by `update` (padded slots
    excluded), so evaluating a subset of the annotation file gives that
    subset's numbers; seen images without any detection still count (their
    ground truth becomes misses).

    Example:
      evaluator = CocoEvaluator('instances_val2017.json', class_to_category)
      for batch in dataset:
        evaluator.update(model(batch, training=False), batch)
      print(format_metrics(evaluator.evaluate()))
    """

    # Which metrics `evaluate` computes (reports carry it as 'evaluator').
    kind = "coco"

    def __init__(self, annotations, class_to_category,
                 mask_threshold=DEFAULT_MASK_THRESHOLD, include_masks=True,
                 verbose=False, engine="mrcnn", include_keypoints=False,
                 keypoint_oks_sigmas=None):
        """Args:
          annotations: path to a COCO instances json, or a loaded `COCO`.
          class_to_category: dict[int, int], contiguous class 1..C -> COCO
            category id; every category id must be in the annotation file.
          mask_threshold: Python float, see `detections_to_coco`.
          include_masks: whether `update` pastes masks (needed for 'segm').
          verbose: let pycocotools print its own progress and tables.
          engine: 'mrcnn' (`cocoeval.coco_evaluate`: COCOeval's numbers,
            within 1e-12 in the tests, ~10x faster) or 'pycocotools'
            (COCOeval itself, the reference).
          include_keypoints: whether `update` keeps `detection_keypoints`
            (needed for 'keypoints', which pycocotools' COCOeval scores by
            OKS on the categories that name keypoints, whatever `engine`).
          keypoint_oks_sigmas: K floats, each keypoint's OKS sigma
            (Detectron2's `TEST.KEYPOINT_OKS_SIGMAS`); None: COCO's person
            sigmas, which need K = 17.

        Raises:
          ValueError: a category id of `class_to_category` is not in the
            annotation file, or an unknown engine.
        """
        if engine not in ENGINES:
            raise ValueError(f"CocoEvaluator: engine={engine!r}; expected one of {ENGINES}")
        self.engine = engine
        if isinstance(annotations, COCO):
            self._coco_gt = annotations
        else:
            self._coco_gt = load_coco(annotations)
        missing = sorted(set(class_to_category.values()) -
                         set(self._coco_gt.getCatIds()))
        if missing:
            raise ValueError(
                f"class_to_category maps to category ids {missing} that the "
                f"annotation file does not define")
        self._class_to_category = dict(class_to_category)
        self._known_image_ids = set(self._coco_gt.getImgIds())
        self._mask_threshold = mask_threshold
        self._include_masks = include_masks
        self._include_keypoints = bool(include_keypoints)
        self._keypoint_oks_sigmas = (None if keypoint_oks_sigmas is None
                                     else tuple(float(v) for v in keypoint_oks_sigmas))
        self._verbose = verbose
        self.reset()

    @staticmethod
    def _quiet(verbose):
        if verbose:
            return contextlib.nullcontext()
        return contextlib.redirect_stdout(io.StringIO())

    @property
    def coco_gt(self):
        return self._coco_gt

    @property
    def results(self):
        """The accumulated COCO results entries, as a new list of dicts on
        each call (about 950 bytes for each entry with a mask, 3x what
        the evaluator holds: `write_results` streams them instead)."""
        return [entry for part in self._parts for entry in part]

    @property
    def num_results(self):
        """How many results entries the evaluator holds."""
        return sum(len(part) for part in self._parts)

    @property
    def image_ids(self):
        """Sorted list of the image ids seen so far."""
        return sorted(self._image_ids)

    def reset(self):
        """Forgets all accumulated detections and seen images."""
        # The `ResultsTable`s of `add` and `add_results`, in order.
        self._parts = []
        self._image_ids = set()
        # Entries of `add_results` so far, and the first without a
        # segmentation (None: none), which 'segm' then names.
        self._num_added = 0
        self._without_segmentation = None
        # {iou_type: {category name: AP}} of the last `evaluate`.
        self.per_category = {}

    def add_results(self, results, image_ids=None):
        """Adds COCO results entries made elsewhere (a results json of
        another run or library) instead of model output.

        A file's entries may come in parts (`runner.evaluate_results` adds
        them 50,000 at a time): entries are numbered in the order of all
        `add_results` calls since `reset`, so an error names an entry by its
        position in the file. They are kept as a `ResultsTable`, with masks
        when the evaluator includes masks and every entry of the call has a
        `segmentation` (polygons and uncompressed RLEs become compressed RLEs
        at their image's size, as COCOeval makes them; `results` gives them
        back so).

        Args:
          results: sequence of dicts {image_id, category_id, score, bbox
            [x, y, w, h]} with `segmentation` for 'segm'.
          image_ids: the images they cover (an image without detections
            is still scored); None: every image of the annotation file.

        Raises:
          ValueError: an entry is not a dict or lacks a key, names an image
            or a category the annotation file does not have, or has a
            segmentation that is no polygon list or RLE of its image.
        """
        known_categories = set(self._coco_gt.getCatIds())
        first = self._num_added
        for i, r in enumerate(results, first):
            if not isinstance(r, dict):
                raise ValueError(f"results entry #{i} is not a JSON object: {r!r:.80}")
            missing = [k for k in ("image_id", "category_id", "score", "bbox")
                       if k not in r]
            if missing:
                raise ValueError(f"results entry #{i} lacks {missing}")
            if r["image_id"] not in self._known_image_ids:
                raise ValueError(f"results entry #{i}: image_id {r['image_id']} is not "
                                 f"in the annotation file")
            if r["category_id"] not in known_categories:
                raise ValueError(f"results entry #{i}: category_id {r['category_id']} "
                                 f"is not in the annotation file")
        ids = self._known_image_ids if image_ids is None else {int(i) for i in image_ids}
        unknown = sorted(ids - self._known_image_ids)
        if unknown:
            raise ValueError(f"image ids {unknown[:10]} are not in the annotation file")
        if self._include_masks and self._without_segmentation is None:
            self._without_segmentation = next(
                (i for i, r in enumerate(results, first) if "segmentation" not in r), None)
        masks = self._include_masks and self._without_segmentation is None
        table = ResultsTable.from_entries(results, self._coco_gt.annToRLE if masks else None,
                                          first_index=first)
        self._num_added += len(table)
        self._image_ids |= ids | set(table.image_id.tolist())
        if len(table):
            self._parts.append(table)

    def update(self, detections, batch):
        """Adds one batch of model output (`add(convert(detections, batch))`).

        Args:
          detections: the model's inference output dict (module docstring).
          batch: dict holding at least `image_id` int64 [B] (-1 = padded
            slot) and `image_info` float32 [B, 5].

        Raises:
          ValueError: an image id is not in the annotation file.
        """
        self.add(self.convert(detections, batch))

    def convert(self, detections, batch):
        """One batch of model output as results entries, adding nothing.

        The host's share of evaluation (masks pasted and encoded): it only
        reads the evaluator, so threads may convert batches at once and
        `add` them in order.

        Args:
          detections, batch: as `update`'s (numpy arrays or tensors); any
            subset of a batch's images (the same slots of both).

        Returns:
          (`ResultsTable` of the batch's entries, set of the batch's image
          ids), for `add`.

        Raises:
          ValueError: an image id is not in the annotation file.
        """
        image_ids = _to_numpy(batch["image_id"]).astype(np.int64).reshape(-1)
        seen = {int(i) for i in image_ids if i >= 0}
        unknown = sorted(seen - self._known_image_ids)
        if unknown:
            raise ValueError(
                f"image ids {unknown[:10]} are not in the annotation file")
        return detections_to_table(
            detections, image_ids, batch["image_info"],
            self._class_to_category, mask_threshold=self._mask_threshold,
            include_masks=self._include_masks,
            include_keypoints=self._include_keypoints), seen

    def add(self, converted):
        """Adds the output of `convert` (not thread-safe: one thread adds)."""
        results, image_ids = converted
        self._image_ids |= image_ids
        if len(results):
            self._parts.append(results)

    def evaluate(self, iou_types=IOU_TYPES):
        """COCO AP and AR of the seen images for each IoU type (`engine`).

        Args:
          iou_types: subset of ('bbox', 'segm', 'keypoints').

        Returns:
          {iou_type: {name: float}} with the 12 names of `STAT_NAMES`
          ('keypoints': the 10 of `KEYPOINT_STAT_NAMES`). A metric with no
          ground truth in its range is -1 (pycocotools' convention); with
          no detections at all, APs and ARs are 0.

        Raises:
          ValueError: no image seen yet, an unknown IoU type, or 'segm'
            asked of an evaluator built with `include_masks=False`
            ('keypoints': results without keypoints).
        """
        iou_types = self._check_evaluate(iou_types)
        metrics, self.per_category = {}, {}
        for iou_type in iou_types:
            if iou_type == "keypoints":
                metrics[iou_type], precision, category_ids = self._keypoint_metrics()
            elif self.engine == "mrcnn":
                metrics[iou_type], precision = cocoeval.coco_evaluate(
                    self._coco_gt, self._table(iou_type), iou_type, self._image_ids)
                category_ids = sorted(self._coco_gt.getCatIds())
            else:
                metrics[iou_type], precision, category_ids = self._pycocotools(iou_type)
            self.per_category[iou_type] = self._per_category_ap(precision, category_ids)
        return metrics

    def _pycocotools(self, iou_type):
        """(metrics, precision [T, R, K, A, M], category ids) from COCOeval."""
        # loadRes adds keys (id, area, ...) to the entries it is given:
        # hand it copies so that `results` stays what `update` made.
        # Without 'bbox', loadRes takes each detection's area from its
        # mask, which is what the small/medium/large split must use for
        # segm (Detectron2 does the same).
        drop = "bbox" if iou_type == "segm" else None
        results = [{k: v for k, v in r.items() if k != drop}
                   for r in self.results]
        with self._quiet(self._verbose):
            coco_dt = (self._coco_gt.loadRes(results) if results
                       else _empty_results(self._coco_gt))
            coco_eval = COCOeval(self._coco_gt, coco_dt, iouType=iou_type)
            coco_eval.params.imgIds = sorted(self._image_ids)
            coco_eval.evaluate()
            coco_eval.accumulate()
            coco_eval.summarize()
        metrics = {name: float(value) for name, value in zip(STAT_NAMES, coco_eval.stats)}
        return metrics, coco_eval.eval["precision"], coco_eval.params.catIds

    def _keypoint_metrics(self):
        """(metrics, precision [T, R, K, A, M], category ids) of COCOeval's
        keypoint evaluation on the categories that name keypoints."""
        table = self._table("keypoints")
        categories = [c for c in self._coco_gt.loadCats(self._coco_gt.getCatIds())
                      if c.get("keypoints")]
        if not categories:
            raise ValueError("'keypoints': no category of the annotation file names "
                             "keypoints")
        num_keypoints = len(categories[0]["keypoints"])
        sigmas = self._keypoint_oks_sigmas
        if sigmas is None and num_keypoints == len(COCO_PERSON_OKS_SIGMAS):
            sigmas = COCO_PERSON_OKS_SIGMAS
        if sigmas is None or len(sigmas) != num_keypoints:
            raise ValueError(
                f"'keypoints': the annotation file's categories name {num_keypoints} "
                f"keypoints; set their OKS sigmas (evaluate.keypoint_oks_sigmas, "
                f"{num_keypoints} floats{'' if sigmas is None else f', not {len(sigmas)}'})")
        if len(table) and table.keypoints.shape[1] != 3 * num_keypoints:
            raise ValueError(f"'keypoints': results hold {table.keypoints.shape[1] // 3} "
                             f"keypoints, the annotation file {num_keypoints}")
        category_ids = sorted(c["id"] for c in categories)
        for ann in self._coco_gt.loadAnns(self._coco_gt.getAnnIds(catIds=category_ids)):
            # COCOeval reads both of every gt of a scored category; an
            # annotation without them (a crowd region, say) has no keypoint.
            ann.setdefault("keypoints", [0] * (3 * num_keypoints))
            ann.setdefault("num_keypoints", int(np.count_nonzero(
                np.asarray(ann["keypoints"])[2::3])))
        results = list(table.entries(masks=False))
        with self._quiet(self._verbose):
            coco_dt = (self._coco_gt.loadRes(results) if results
                       else _empty_results(self._coco_gt))
            coco_eval = COCOeval(self._coco_gt, coco_dt, iouType="keypoints")
            coco_eval.params.kpt_oks_sigmas = np.asarray(sigmas, np.float64)
            coco_eval.params.imgIds = sorted(self._image_ids)
            coco_eval.params.catIds = category_ids
            coco_eval.evaluate()
            coco_eval.accumulate()
            coco_eval.summarize()
        metrics = {name: float(v) for name, v in zip(KEYPOINT_STAT_NAMES, coco_eval.stats)}
        return metrics, coco_eval.eval["precision"], category_ids

    def _check_evaluate(self, iou_types):
        """`iou_types` as a tuple, once checked against this evaluator."""
        iou_types = tuple(iou_types)
        for iou_type in iou_types:
            if iou_type not in IOU_TYPES + ("keypoints",):
                raise ValueError(
                    f"iou_types holds {iou_type!r}; expected a subset of "
                    f"{IOU_TYPES + ('keypoints',)}")
        if "segm" in iou_types and not self._include_masks:
            raise ValueError("iou_types has 'segm' but include_masks=False")
        if not self._image_ids:
            raise ValueError("evaluate() before any update() with a real image")
        return iou_types

    def _per_category_ap(self, precision, category_ids):
        """{category name: AP at IoU .50:.95, all areas, 100 detections}, -1
        for a category without ground truth in the seen images.

        COCO's AP is the mean of these over the categories that have ground
        truth. `precision` is [T iou, R recall, K category, A area, M max
        detections], -1 where undefined; K follows `category_ids`.
        """
        names = {c["id"]: c["name"] for c in self._coco_gt.loadCats(category_ids)}
        out = {}
        for k, category in enumerate(category_ids):
            p = precision[:, :, k, 0, -1]
            p = p[p > -1]
            out[names[category]] = float(p.mean()) if p.size else -1.0
        return out

    def write_results(self, path):
        """Writes the accumulated results as a COCO results JSON list."""
        files.make_parent(path)
        # Entry by entry: the same bytes as json.dump of the list, without
        # the list.
        with files.open_file(path, "w") as f:
            f.write("[")
            separator = ""
            for part in self._parts:
                for entry in part:
                    f.write(separator + json.dumps(entry))
                    separator = ", "
            f.write("]")

    def _table(self, iou_type):
        """All results as one `ResultsTable` for scoring `iou_type`."""
        if iou_type == "segm" and self._without_segmentation is not None:
            raise ValueError(f"results entry #{self._without_segmentation} has no "
                             f"segmentation: 'segm' needs one in every entry")
        table = ResultsTable.concat(self._parts)
        if iou_type == "keypoints" and self._parts and not table.has_keypoints:
            raise ValueError("'keypoints' needs keypoints in every results entry")
        return table


def format_metrics(metrics, digits=3):
    """The metrics of `CocoEvaluator.evaluate` as a fixed-width text table.

    One header line with the stat names (the 12 of `STAT_NAMES` for COCO,
    LVIS's 13 for `LvisEvaluator`, in the evaluator's order), then one row
    per IoU type; -1 (no ground truth in that range) prints as '-'.

    Args:
      metrics: {iou_type: {name: float}}.
      digits: Python int, decimals per value.

    Returns:
      str, lines joined by newlines, no trailing newline.
    """
    names = list(dict.fromkeys(n for stats in metrics.values() for n in stats))
    names = names or list(STAT_NAMES)
    width = max(digits + 3, max(len(n) for n in names)) + 1
    label = max([4] + [len(t) for t in metrics]) + 1
    lines = [" " * label + "".join(n.rjust(width) for n in names)]
    for iou_type, stats in metrics.items():
        cells = []
        for name in names:
            value = stats.get(name, -1.0)
            cells.append(("-" if value < 0 else f"{value:.{digits}f}")
                         .rjust(width))
        lines.append(iou_type.ljust(label) + "".join(cells))
    return "\n".join(lines)


def format_per_category(per_category, digits=3):
    """`CocoEvaluator.per_category` as a text table: one row per category,
    one AP column per IoU type, '-' where a category has no ground truth.

    Args:
      per_category: {iou_type: {category name: AP}}.
      digits: Python int, decimals per value.

    Returns:
      str, lines joined by newlines, no trailing newline.
    """
    types = list(per_category)
    names = list(dict.fromkeys(n for t in types for n in per_category[t]))
    columns = [f"{t} AP" for t in types]
    label = max([len("category")] + [len(n) for n in names]) + 1
    width = max([digits + 3] + [len(c) for c in columns]) + 2
    lines = ["category".ljust(label) + "".join(c.rjust(width) for c in columns)]
    for name in names:
        cells = []
        for t in types:
            value = per_category[t].get(name, -1.0)
            cells.append(("-" if value < 0 else f"{value:.{digits}f}").rjust(width))
        lines.append(name.ljust(label) + "".join(cells))
    return "\n".join(lines)
