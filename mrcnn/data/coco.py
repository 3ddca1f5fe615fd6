"""COCO annotation files: loading, validation, category mapping.

Pure Python and NumPy (no TensorFlow): `load_split` reads one
`instances_*.json`, checks every image and annotation once, and returns the
per-image records the input pipeline decodes. Checks are cheap and happen at
load time, so a bad box or segmentation is reported with its file and ids
before any training step, never as a TensorFlow stack trace.

Shape letters: `n` annotations of one image, `K` keypoints per instance.

Keypoints (`with_keypoints`, COCO person keypoints): every category with a
non-empty `keypoints` list of names must list the same names (K of them);
categories without one are allowed, and their instances have no labelled
point. An annotation's `keypoints` is the flat `[x1, y1, v1, ...]` of K
points, x, y pixel indices, v 0 = not labelled, 1 = labelled but not
visible, 2 = visible; an annotation without it has no labelled point.
Records hold them as continuous coordinates, `+ 0.5` (pixel i's centre is
at i + 0.5, as Detectron2 reads them), so that they resize and flip with the
boxes.

What counts as bad, and what happens to it (`on_bad`):
  - file not JSON, or missing a top-level key (`images`, `annotations`,
    `categories`): always a `DataError`.
  - image entry missing `id`/`file_name`/`height`/`width`, or its file missing
    on disk: a bad image. An LVIS image has no `file_name` but a `coco_url`
    (`http://images.cocodataset.org/train2017/000000391895.jpg`): its file is
    the URL's last two parts (`train2017/000000391895.jpg`) under
    `image_dir`, which is then the COCO root, as in Detectron2.
  - annotation missing `image_id`, `category_id` or `bbox`; unknown
    `category_id`; bbox not 4 finite numbers, width or height <= 0, more than
    `BOX_TOLERANCE_PX` outside the image, or empty once clipped to it;
    segmentation missing, empty or malformed (polygon with an odd count or
    fewer than 3 points, RLE of the wrong size); with keypoints, `keypoints`
    of a non-crowd annotation of a category with keypoints not 3K finite
    numbers with every v in {0, 1, 2}: a bad annotation.
  - with keypoints, no category with a keypoint list, or two categories with
    different lists: always a `DataError`.
  - annotation whose `image_id` is not in `images`: an orphan annotation.
  `on_bad="raise"` raises a `DataError` naming the json, the image file and
  the ids on the first problem. `"skip_image"` (training) drops every image
  with a bad annotation, and bad images, so no object is silently turned into
  background. `"skip_annotation"` (evaluation, which must see every image)
  keeps the image and drops the bad annotation, whose gt is not used by COCO
  metrics anyway (they read the json); a bad image still raises there. Skips are counted in `counts` and
  listed in `problems`; the caller logs them once.
"""

import collections
import dataclasses
import functools
import gc
import math
import os
from typing import List, Optional, Tuple

import numpy as np

from mrcnn.data import files

# COCO boxes come from float polygons and can overhang the image by a
# fraction of a pixel; more than one pixel means a wrong coordinate frame.
BOX_TOLERANCE_PX = 1.0
ON_BAD = ("raise", "skip_image", "skip_annotation")
_IMAGE_KEYS = ("id", "file_name", "height", "width")
_ANNOTATION_KEYS = ("image_id", "category_id", "bbox")


class DataError(ValueError):
    """A dataset problem, with the file and image / annotation id in the message."""


@dataclasses.dataclass(frozen=True)
class CategoryMap:
    """COCO category ids <-> contiguous class ids 1..C (0 is background).

    Contiguous ids follow ascending COCO id, as Detectron2 and the COCO API's
    `getCatIds()` order them.

    Attributes:
      coco_ids: tuple of int, `coco_ids[c - 1]` is the COCO id of class c.
      names: tuple of str, `names[c - 1]` is the name of class c.
    """
    coco_ids: Tuple[int, ...]
    names: Tuple[str, ...]

    @classmethod
    def from_categories(cls, categories):
        """From the `categories` list of a COCO json."""
        pairs = sorted((int(c["id"]), str(c["name"])) for c in categories)
        return cls(tuple(p[0] for p in pairs), tuple(p[1] for p in pairs))

    @property
    def num_classes(self):
        """C, the number of foreground classes."""
        return len(self.coco_ids)

    def to_contiguous(self, coco_id):
        """Contiguous class 1..C of a COCO category id (KeyError if unknown)."""
        return self._index[int(coco_id)]

    def to_coco(self, class_id):
        """COCO category id of a contiguous class 1..C."""
        if not 1 <= int(class_id) <= self.num_classes:
            raise KeyError(f"class id {class_id} not in 1..{self.num_classes}")
        return self.coco_ids[int(class_id) - 1]

    def coco_id_table(self):
        """int64 [C + 1]: `table[c]` is the COCO id of class c, `table[0] = -1`.

        For vectorised mapping of predicted classes: `table[classes]`.
        """
        return np.array((-1,) + self.coco_ids, np.int64)

    @functools.cached_property
    def _index(self):
        return {coco_id: c + 1 for c, coco_id in enumerate(self.coco_ids)}


@dataclasses.dataclass
class ImageRecord:
    """One image and its kept annotations, in original image pixels.

    Attributes:
      image_id: int, the COCO image id.
      path: str, the image file.
      height, width: int, the size the json gives.
      boxes: float32 [n, 4] (y1, x1, y2, x2), clipped to the image.
      classes: int32 [n], contiguous 1..C.
      segmentations: list of n COCO segmentations: polygons as a list of
        float64 [2k] arrays (x0, y0, x1, y1, ...), or the json's RLE dict.
      is_crowd: bool [n]; the pipeline drops crowd annotations.
      annotation_ids: int64 [n], for messages.
      keypoints: float32 [n, K, 3] (x, y, v), continuous original image
        pixels (the json's pixel indices + 0.5), v in {0, 1, 2}; x = y = 0
        where v = 0, and every v = 0 for crowd annotations, annotations
        without `keypoints` and those of categories without keypoints. None
        unless loaded `with_keypoints`.
    """
    image_id: int
    path: str
    height: int
    width: int
    boxes: np.ndarray
    classes: np.ndarray
    segmentations: list
    is_crowd: np.ndarray
    annotation_ids: np.ndarray
    keypoints: Optional[np.ndarray] = None


@dataclasses.dataclass
class CocoSplit:
    """What `load_split` returns.

    Attributes:
      records: list of ImageRecord, ordered by image id.
      category_map: CategoryMap.
      counts: collections.Counter of problems and drops: `bad_images`,
        `bad_annotations`, `orphan_annotations`, `skipped_images`,
        `skipped_annotations`, `crowd_annotations`.
      problems: list of str, one message per problem (file and ids named).
      keypoint_names: tuple of K str, the categories' keypoint names; empty
        unless loaded `with_keypoints`.
      keypoint_skeleton: tuple of (i, j) keypoint index pairs (0-based) that
        pictures join: the first keypoint category's COCO `skeleton`
        (1-based there); empty without one.
    """
    records: List[ImageRecord]
    category_map: CategoryMap
    counts: collections.Counter
    problems: List[str]
    keypoint_names: Tuple[str, ...] = ()
    keypoint_skeleton: Tuple[Tuple[int, int], ...] = ()

    @property
    def keypoint_flip_map(self):
        """tuple of K int, `keypoint_flip_map(self.keypoint_names)`."""
        return keypoint_flip_map(self.keypoint_names)


def keypoint_flip_map(names):
    """The permutation of keypoints a horizontal flip applies.

    After a flip, keypoint i takes the values of keypoint `flip_map[i]`: a
    name containing "left" swaps with the name that has "right" in its
    place, and a name containing "right" with its "left" name, when that
    name is there (COCO: left_eye <-> right_eye; shapes: left <-> right);
    every other name maps to itself. Only mutual pairs swap, so the result
    is always a permutation (a name such as "left_of_right" stays put).

    Args:
      names: sequence of K str.

    Returns:
      tuple of K int.
    """
    names = [str(n) for n in names]
    index = {name: i for i, name in enumerate(names)}

    def partner(name):
        if "left" in name:
            return index.get(name.replace("left", "right"))
        if "right" in name:
            return index.get(name.replace("right", "left"))
        return None

    pairs = [partner(n) for n in names]
    return tuple(j if j is not None and pairs[j] == i else i
                 for i, j in enumerate(pairs))


def load_split(annotation_file, image_dir, on_bad="skip_image",
               check_files=True, with_masks=True, with_keypoints=False):
    """Reads and validates one COCO instances json (see the module docstring).

    Args:
      annotation_file: str, path of `instances_<split>.json` (local, or any
        filesystem `tf.io.gfile` knows: `mrcnn.data.files`).
      image_dir: str, the directory `file_name` is relative to (likewise).
      on_bad: "raise", "skip_image" or "skip_annotation".
      check_files: bool, check that every image file exists (one `stat` per
        image: about a second for COCO train2017; on an object store one
        listing per directory).
      with_masks: bool; False reads box-only annotations: `segmentation` is
        neither needed nor checked (records hold None for it).
      with_keypoints: bool, read and check `keypoints` (module docstring):
        records hold them, the split their names.

    Returns:
      CocoSplit.

    Raises:
      DataError: unreadable or non-COCO json, duplicate ids, with keypoints
        no or disagreeing keypoint lists among the categories, or any
        problem when `on_bad="raise"`.
    """
    if on_bad not in ON_BAD:
        raise ValueError(f"on_bad={on_bad!r} must be one of {ON_BAD}")
    # Reading COCO train2017 makes tens of millions of objects and no
    # garbage cycles: Python's cycle collector, run again and again as they
    # grow, took a third of the time (27 -> 18 s on a COCO-sized json).
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _load_split(annotation_file, image_dir, on_bad, check_files, with_masks,
                           with_keypoints)
    finally:
        if collecting:
            gc.enable()


def load_splits(sources, on_bad="skip_image", check_files=True, with_masks=True,
                with_keypoints=False):
    """Reads several COCO instances jsons as one split: training on their union.

    Args:
      sources: sequence of (annotation_file, image_dir), as `load_split`
        takes them.
      on_bad, check_files, with_masks, with_keypoints: as `load_split`'s,
        for every file.

    Returns:
      CocoSplit: each file's records in turn (image ids may repeat across
      files: each record keeps its own `path`), the first file's category
      map and keypoint names, counts summed, and problems prefixed with
      their file when there are several.

    Raises:
      DataError: a file's categories differ from the first file's (ids or
        names: their contiguous class ids would mean different things), or
        its keypoint names do (keypoint k would be another point), or any
        error of `load_split`.
    """
    sources = list(sources)
    if not sources:
        raise ValueError("load_splits: no (annotation_file, image_dir) given")
    if len(sources) == 1:
        return load_split(*sources[0], on_bad=on_bad, check_files=check_files,
                          with_masks=with_masks, with_keypoints=with_keypoints)
    records, counts, problems, first = [], collections.Counter(), [], None
    for annotation_file, image_dir in sources:
        loaded = load_split(annotation_file, image_dir, on_bad=on_bad,
                            check_files=check_files, with_masks=with_masks,
                            with_keypoints=with_keypoints)
        if first is None:
            first = (annotation_file, loaded.category_map, loaded.keypoint_names)
            skeleton = loaded.keypoint_skeleton
        elif loaded.category_map != first[1]:
            raise DataError(_category_difference(first[0], first[1], annotation_file,
                                                 loaded.category_map))
        elif loaded.keypoint_names != first[2]:
            raise DataError(
                f"{annotation_file}: its keypoint names {list(loaded.keypoint_names)} "
                f"differ from those of {first[0]} {list(first[2])}; splits trained "
                f"together must name the same keypoints in the same order")
        records += loaded.records
        counts.update(loaded.counts)
        problems += [f"{os.fspath(annotation_file)}: {p}" for p in loaded.problems]
    return CocoSplit(records, first[1], counts, problems, first[2], skeleton)


def _category_difference(first_file, first, other_file, other):
    """The message for two files whose categories differ: the first difference."""
    first_names = dict(zip(first.coco_ids, first.names))
    other_names = dict(zip(other.coco_ids, other.names))
    only_first = sorted(set(first_names) - set(other_names))
    only_other = sorted(set(other_names) - set(first_names))
    if only_first or only_other:
        detail = (f"category ids {only_first[:10]} only in {first_file}, "
                  f"{only_other[:10]} only in {other_file}")
    else:
        cat = next(c for c in first.coco_ids if first_names[c] != other_names[c])
        detail = (f"category id {cat} is {first_names[cat]!r} in {first_file} and "
                  f"{other_names[cat]!r} in {other_file}")
    return (f"{other_file}: its categories differ from those of {first_file} "
            f"({detail}); splits trained together must define the same categories")


def _load_split(annotation_file, image_dir, on_bad, check_files, with_masks,
                with_keypoints=False):
    try:
        dataset = files.read_json(annotation_file)
    except (*files.READ_ERRORS, ValueError) as e:
        raise DataError(f"{annotation_file}: cannot read COCO json: {e}") from None
    if not isinstance(dataset, dict):
        raise DataError(f"{annotation_file}: not a COCO json (top level is "
                        f"{type(dataset).__name__}, not an object)")
    for key in ("images", "annotations", "categories"):
        if not isinstance(dataset.get(key), list):
            raise DataError(f"{annotation_file}: not a COCO instances json: "
                            f"key {key!r} missing or not a list")
    counts = collections.Counter()
    problems = []

    def problem(kind, message):
        if on_bad == "raise":
            raise DataError(f"{annotation_file}: {message}")
        counts[kind] += 1
        problems.append(message)

    categories = dataset["categories"]
    for i, c in enumerate(categories):
        if not isinstance(c, dict) or "id" not in c or "name" not in c:
            raise DataError(f"{annotation_file}: category #{i} lacks 'id' or 'name'")
    category_map = CategoryMap.from_categories(categories)
    if len(set(category_map.coco_ids)) != category_map.num_classes:
        raise DataError(f"{annotation_file}: duplicate category ids")
    keypoint_names, keypoint_categories = (
        _keypoint_names(annotation_file, categories) if with_keypoints else ((), frozenset()))
    skeleton = (_keypoint_skeleton(annotation_file, categories, keypoint_categories,
                                   len(keypoint_names)) if with_keypoints else ())
    keypoints = (len(keypoint_names), keypoint_categories)

    # Images.
    checker = files.FileChecker()
    images = {}
    bad_image_ids = {}   # image id -> message
    for i, image in enumerate(dataset["images"]):
        image = _with_file_name(image)
        missing = [k for k in _IMAGE_KEYS if not isinstance(image, dict) or k not in image]
        if missing:
            problem("bad_images", f"image #{i} (id {_get(image, 'id')}) lacks {missing}")
            continue
        image_id = int(image["id"])
        if image_id in images:
            raise DataError(f"{annotation_file}: duplicate image id {image_id}")
        path = os.path.join(image_dir, image["file_name"])
        images[image_id] = image
        if not (int(image["height"]) > 0 and int(image["width"]) > 0):
            bad_image_ids[image_id] = (f"image id {image_id} ({path}): size "
                                       f"{image['height']}x{image['width']} is not positive")
        elif check_files and not checker.isfile(path):
            bad_image_ids[image_id] = f"image id {image_id}: file {path} is missing"
        if image_id in bad_image_ids:
            if on_bad == "skip_annotation":   # evaluation needs every image
                raise DataError(f"{annotation_file}: {bad_image_ids[image_id]}")
            problem("bad_images", bad_image_ids[image_id])

    # Annotations.
    kept = collections.defaultdict(list)
    for i, ann in enumerate(dataset["annotations"]):
        ann_id = _get(ann, "id")
        image_id = _get(ann, "image_id")
        if image_id is not None and image_id not in images:
            problem("orphan_annotations", f"annotation id {ann_id} points at "
                    f"unknown image id {image_id}")
            continue
        image = images.get(image_id)
        reason = _check_annotation(ann, image, category_map, with_masks, keypoints)
        if reason:
            where = (f"annotation id {ann_id} (image id {image_id}, "
                     f"{os.path.join(image_dir, image['file_name']) if image else '?'})")
            problem("bad_annotations", f"{where}: {reason}")
            if image_id is not None:
                if on_bad == "skip_image":
                    bad_image_ids[image_id] = problems[-1]
                else:
                    counts["skipped_annotations"] += 1
            continue
        kept[image_id].append(ann)

    # Records.
    records = []
    for image_id in sorted(images):
        if image_id in bad_image_ids:
            counts["skipped_images"] += 1
            continue
        records.append(_record(images[image_id], kept[image_id], image_dir,
                               category_map, counts, keypoints if with_keypoints else None))
    return CocoSplit(records, category_map, counts, problems, keypoint_names, skeleton)


def _keypoint_names(annotation_file, categories):
    """(tuple of K str, frozenset of the int ids of the categories with them).

    Every category with a non-empty `keypoints` list must give the same one.
    """
    names, first, ids = None, None, set()
    for c in categories:
        listed = c.get("keypoints")
        if listed is None or (isinstance(listed, list) and not listed):
            continue
        described = f"category id {c['id']} ({c['name']!r})"
        if (not isinstance(listed, list) or not all(isinstance(n, str) for n in listed)
                or len(set(listed)) != len(listed)):
            raise DataError(f"{annotation_file}: {described} has keypoints "
                            f"{str(listed)[:200]}, not a list of distinct names")
        if names is None:
            names, first = tuple(listed), described
        elif tuple(listed) != names:
            raise DataError(
                f"{annotation_file}: {described} has keypoints {listed} but {first} "
                f"has {list(names)}; every category with keypoints must name the same "
                f"keypoints in the same order")
        ids.add(int(c["id"]))
    if names is None:
        raise DataError(f"{annotation_file}: no category has a 'keypoints' list of "
                        f"names; a keypoint dataset (COCO person_keypoints_*.json) "
                        f"is needed for keypoints")
    return names, frozenset(ids)


def _keypoint_skeleton(annotation_file, categories, keypoint_categories, num_keypoints):
    """The first keypoint category's `skeleton` as 0-based (i, j) pairs; ()
    without one. A malformed one (not pairs of 1..K) is a DataError."""
    for c in categories:
        if int(c["id"]) not in keypoint_categories or "skeleton" not in c:
            continue
        edges = c["skeleton"]
        ok = isinstance(edges, list) and all(
            isinstance(e, list) and len(e) == 2
            and all(isinstance(v, int) and 1 <= v <= num_keypoints for v in e)
            for e in edges)
        if not ok:
            raise DataError(f"{annotation_file}: category id {c['id']} ({c['name']!r}) "
                            f"has skeleton {str(edges)[:200]}, not a list of [i, j] "
                            f"keypoint numbers 1..{num_keypoints}")
        return tuple((a - 1, b - 1) for a, b in edges)
    return ()


def _with_file_name(image):
    """An LVIS image entry with the `file_name` its `coco_url` implies."""
    if not isinstance(image, dict) or "file_name" in image:
        return image
    url = image.get("coco_url")
    if not isinstance(url, str) or url.count("/") < 1:
        return image
    return dict(image, file_name="/".join(url.rstrip("/").split("/")[-2:]))


def _get(obj, key):
    return obj.get(key) if isinstance(obj, dict) else None


def _check_annotation(ann, image, category_map, with_masks=True, keypoints=(0, ())):
    """Why an annotation is bad (str), or None when it is fine.

    `keypoints`: (K, the ids of the categories with keypoints); K = 0 checks
    no keypoints.
    """
    if not isinstance(ann, dict):
        return "not an object"
    missing = [k for k in _ANNOTATION_KEYS if k not in ann]
    if missing:
        return f"lacks {missing}"
    if ann["category_id"] not in category_map._index:
        return f"unknown category id {ann['category_id']}"
    bbox = ann["bbox"]
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not _finite_numbers(bbox):
        return f"bbox {bbox!r} is not 4 finite numbers (x, y, w, h)"
    x, y, w, h = bbox
    if w <= 0 or h <= 0:
        return f"bbox {bbox} has zero or negative width or height"
    height, width = image["height"], image["width"]
    tol = BOX_TOLERANCE_PX
    if x < -tol or y < -tol or x + w > width + tol or y + h > height + tol:
        return (f"bbox {bbox} (x, y, w, h) lies outside the {width}x{height} "
                f"image by more than {tol} px")
    if min(x + w, width) - max(x, 0) <= 0 or min(y + h, height) - max(y, 0) <= 0:
        return f"bbox {bbox} is empty once clipped to the {width}x{height} image"
    if with_masks:
        reason = _check_segmentation(ann.get("segmentation"), height, width)
        if reason:
            return reason
    if _reads_keypoints(ann, keypoints):
        return _check_keypoints(ann["keypoints"], keypoints[0])
    return None


def _reads_keypoints(ann, keypoints):
    """Whether an annotation's keypoints are read (else all v = 0)."""
    num, categories = keypoints
    return (num > 0 and ann.get("keypoints") is not None and not ann.get("iscrowd", 0)
            and ann["category_id"] in categories)


def _check_keypoints(values, num):
    if not isinstance(values, list) or len(values) != 3 * num or not _finite_numbers(values):
        return (f"keypoints {str(values)[:80]} are not {3 * num} finite numbers "
                f"(x, y, v for each of the {num} keypoints)")
    bad = [v for v in values[2::3] if v not in (0, 1, 2)]
    if bad:
        return f"keypoint visibility {bad[0]!r} is not 0, 1 or 2"
    return None


def _finite_numbers(values):
    """Whether a json list holds only finite numbers.

    `sum` adds in C (COCO train2017 has 21M polygon coordinates: testing
    each in Python cost seconds); it raises TypeError for a string, None or
    list among them, and a NaN or infinity makes the sum non-finite (so do
    numbers whose sum overflows, beyond 1e307: no image is that large).
    """
    try:
        return math.isfinite(sum(values))
    except (TypeError, OverflowError):
        return False


def _check_segmentation(segm, height, width):
    if segm is None:
        return "no segmentation"
    if isinstance(segm, list):
        if not segm:
            return "empty segmentation"
        for poly in segm:
            if (not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2
                    or not _finite_numbers(poly)):
                return ("malformed polygon: needs an even number >= 6 of "
                        f"finite coordinates, got {str(poly)[:80]}")
        return None
    if isinstance(segm, dict):
        size, counts = segm.get("size"), segm.get("counts")
        if list(size or ()) != [height, width]:
            return f"RLE size {size} differs from the image size [{height}, {width}]"
        if isinstance(counts, list):
            if not counts or sum(counts) != height * width:
                return "uncompressed RLE counts do not sum to height * width"
            return None
        if isinstance(counts, (str, bytes)) and counts:
            return None
        return "RLE without counts"
    return f"segmentation of type {type(segm).__name__} is neither polygons nor RLE"


def _record(image, anns, image_dir, category_map, counts, keypoints=None):
    height, width = int(image["height"]), int(image["width"])
    xywh = np.array([a["bbox"] for a in anns], np.float64).reshape(-1, 4)
    x, y, w, h = xywh.T
    boxes = np.stack([np.maximum(y, 0.0), np.maximum(x, 0.0), np.minimum(y + h, height),
                      np.minimum(x + w, width)], 1).astype(np.float32)
    is_crowd = np.array([bool(a.get("iscrowd", 0)) for a in anns], bool)
    counts["crowd_annotations"] += int(is_crowd.sum())
    return ImageRecord(
        image_id=int(image["id"]),
        path=os.path.join(image_dir, image["file_name"]),
        height=height, width=width, boxes=boxes,
        classes=np.array([category_map.to_contiguous(a["category_id"]) for a in anns],
                         np.int32),
        segmentations=[_compact(a.get("segmentation")) for a in anns],
        is_crowd=is_crowd,
        annotation_ids=np.array([int(a.get("id", -1)) for a in anns], np.int64),
        keypoints=None if keypoints is None else _record_keypoints(anns, keypoints))


def _record_keypoints(anns, keypoints):
    """float32 [n, K, 3] (x, y, v) of checked annotations (`ImageRecord`)."""
    num = keypoints[0]
    out = np.zeros((len(anns), num, 3), np.float64)
    for i, a in enumerate(anns):
        if _reads_keypoints(a, keypoints):
            out[i] = np.asarray(a["keypoints"], np.float64).reshape(num, 3)
    out[..., :2] += 0.5   # pixel indices -> continuous, the pixel's centre
    out[out[..., 2] == 0] = 0.0
    return out.astype(np.float32)


def _compact(segmentation):
    """Polygons as float64 arrays, RLE as it is.

    A COCO train2017-sized split's 21M coordinates as Python floats held
    1 GB more of the process's memory, and Python's cycle collector visits
    each of them: a full collection took 2.4-4.5 s instead of 0.5 (at load,
    and now and then in training, holding the lock the input pipeline's
    decoders need).
    """
    if isinstance(segmentation, list):
        return [np.asarray(polygon, np.float64) for polygon in segmentation]
    return segmentation


def split_paths(data_dir, split, annotation_file: Optional[str] = None,
                image_dir: Optional[str] = None, prefix: str = "instances"):
    """(annotation_file, image_dir) of a split in the COCO 2017 layout:
    `data_dir/annotations/{prefix}_{split}.json` ('person_keypoints' for
    COCO's keypoint files) and `data_dir/{split}`, unless given."""
    return (annotation_file or os.path.join(data_dir, "annotations",
                                            f"{prefix}_{split}.json"),
            image_dir or os.path.join(data_dir, split))
