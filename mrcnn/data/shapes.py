"""Synthetic "shapes" scenes written as a COCO 2017-layout dataset.

`make_shapes(out_dir)` writes

    out_dir/annotations/instances_train2017.json
    out_dir/annotations/instances_val2017.json
    out_dir/train2017/000000000001.jpg ...
    out_dir/val2017/000000100001.jpg ...

Each image is a textured, noisy background (colour gradient, sine stripes,
Gaussian noise) with 1..`max_instances` circles, squares and triangles of
random size, rotation and colour. Shapes may leave the image at its border and
overlap; later shapes occlude earlier ones. Category ids are non-contiguous on
purpose (circle 1, square 3, triangle 7), as in COCO, so readers must map them.

How masks stay consistent with the pixels. Each shape is a convex polygon (a
circle is a 48-gon), clipped to the image and rounded to 0.01 px, the very
coordinates written to the json. It is rasterised with pycocotools, the
rasteriser every COCO reader uses, and the image is painted from those
rasters: pixel `p` takes the colour of the last shape covering it. An
instance's mask is its visible part (the pixels it colours). An unoccluded
instance is annotated with its own polygon; an occluded one with the outline of
its visible pixels traced along pixel edges, which pycocotools rasterises back
to exactly those pixels (checked for every instance; a placement that fails the
check, or leaves an earlier instance less than 35 % visible, is re-drawn).
`bbox` (x, y, w, h) and `area` come from `pycocotools.mask.toBbox` / `area` of
that same mask.

Keypoints (for Keypoint R-CNN, as COCO person keypoints): every category
lists `KEYPOINT_NAMES` = ("top", "left", "bottom", "right") with a
`skeleton` joining them in a ring, and every instance's points are the
extreme vertices of its whole (unclipped) polygon: smallest y, smallest x,
largest y, largest x, in continuous image coordinates. They are written in
COCO's pixel-index convention, `x - 0.5, y - 0.5` rounded to 0.01 (a reader
adding 0.5, as Detectron2 and mrcnn/data/coco.py do, gets the point back),
with v = 2 when the instance's visible mask covers the pixel holding the
written point or one of its 8 neighbours (a corner's own pixel is often
outside the raster, whose pixels count by their centres), 1 when the point
is in the image but none of those is in that mask (occluded), and 0 with
x = y = 0 outside the image;
`num_keypoints` counts v > 0. Crowd regions have all zeros. Keypoints take
no random draw: images and every other field are those of a dataset without
them.

Fixed, documented variety (so that even a 10-image split has every case):
image index `i` of a split has no instance when `i % 20 == 7`, and one
`iscrowd=1` region (a cluster of small shapes of one category, encoded as
compressed RLE with `counts` a str) painted first, under the instances, when
`i % 10 == 3`. Everything else is drawn from `np.random.default_rng((seed,
split, i))`, so image `i` does not depend on how many images are made.

Default size: 128 x 128 images, 500 train / 100 val, 1-4 instances. A
ResNet-50-FPN demo at this size trains on 2 CPU cores in minutes; 1000 images
are written in a few seconds.
"""

import json
import os

import numpy as np
from PIL import Image
from pycocotools import mask as mask_util

from mrcnn.data import files

# COCO-style, deliberately non-contiguous ids (COCO 2017 skips 12, 26, ...).
CATEGORIES = (
    {"id": 1, "name": "circle", "supercategory": "shape"},
    {"id": 3, "name": "square", "supercategory": "shape"},
    {"id": 7, "name": "triangle", "supercategory": "shape"},
)
_VERTICES = {"circle": 48, "square": 4, "triangle": 3}
# Every category's keypoints, COCO style (the skeleton's ids are 1-based):
# the flip map swaps left and right (`mrcnn.data.coco.keypoint_flip_map`).
KEYPOINT_NAMES = ("top", "left", "bottom", "right")
KEYPOINT_SKELETON = ((1, 2), (2, 3), (3, 4), (4, 1))
# A 48-gon departs from its circle by r * (1 - cos(pi / 48)) = 0.002 r: under
# a third of a pixel for r = 150 px.

SPLITS = ("train2017", "val2017")
# Image ids: train 1.., val 100001.. (distinct across splits, like COCO's).
_FIRST_IMAGE_ID = {"train2017": 1, "val2017": 100001}
_EMPTY_EVERY, _EMPTY_AT = 20, 7     # index % 20 == 7: image with no instance
_CROWD_EVERY, _CROWD_AT = 10, 3     # index % 10 == 3: one iscrowd=1 region

_MIN_RADIUS, _MAX_RADIUS = 0.10, 0.30   # shape circumradius / shorter side
_MIN_VISIBLE = 0.35                     # fraction of an instance left visible
_MIN_AREA_PX = 16                       # smallest visible instance, pixels
_MIN_SIDE_PX = 3                        # smallest visible bbox side, pixels
_PLACEMENT_TRIES = 20                   # re-draws before giving up a shape
_JPEG_QUALITY = 92


def make_shapes(out_dir, num_train=500, num_val=100, image_size=(128, 128),
                max_instances=4, seed=0):
    """Writes a synthetic COCO-format dataset (see the module docstring).

    Args:
      out_dir: str, created if missing; existing files of the same names are
        overwritten.
      num_train, num_val: int, images per split (0 writes an empty split).
      image_size: (height, width) ints, pixels of every image.
      max_instances: int >= 1, the most shapes per image (not counting crowd
        regions); each non-empty image has 1..max_instances.
      seed: int; equal seeds give byte-identical json and images.

    Returns:
      dict: split -> path of its annotation json.
    """
    height, width = (int(s) for s in image_size)
    if min(height, width) < 16:
        raise ValueError(f"make_shapes: image_size={image_size} must be >= 16")
    if max_instances < 1:
        raise ValueError(f"make_shapes: max_instances={max_instances} < 1")
    files.makedirs(os.path.join(out_dir, "annotations"))
    paths = {}
    for split, count in zip(SPLITS, (num_train, num_val)):
        image_dir = os.path.join(out_dir, split)
        files.makedirs(image_dir)
        images, annotations = [], []
        for index in range(int(count)):
            image_id = _FIRST_IMAGE_ID[split] + index
            rng = np.random.default_rng((seed, SPLITS.index(split), index))
            pixels, instances = _draw_scene(
                rng, height, width,
                num_instances=(0 if index % _EMPTY_EVERY == _EMPTY_AT
                               else int(rng.integers(1, max_instances + 1))),
                with_crowd=index % _CROWD_EVERY == _CROWD_AT)
            file_name = f"{image_id:012d}.jpg"
            with files.open_file(os.path.join(image_dir, file_name), "wb") as f:
                Image.fromarray(pixels).save(f, format="JPEG", quality=_JPEG_QUALITY)
            images.append({"id": image_id, "file_name": file_name,
                           "height": height, "width": width})
            for inst in instances:
                inst.update(id=len(annotations) + 1 + 10**6 * SPLITS.index(split),
                            image_id=image_id)
                annotations.append(inst)
        dataset = {
            "info": {"description": "mrcnn synthetic shapes", "version": "1.0",
                     "year": 2017},
            "licenses": [],
            "images": images,
            "annotations": annotations,
            "categories": [dict(c, keypoints=list(KEYPOINT_NAMES),
                                skeleton=[list(e) for e in KEYPOINT_SKELETON])
                           for c in CATEGORIES],
        }
        path = os.path.join(out_dir, "annotations", f"instances_{split}.json")
        with files.open_file(path, "w") as f:
            json.dump(dataset, f)
        paths[split] = path
    return paths


def _shape_polygon(kind, cy, cx, radius, angle):
    """float64 [V, 2] (x, y) vertices of a convex shape, counter-clockwise."""
    n = _VERTICES[kind]
    t = angle + 2.0 * np.pi * np.arange(n) / n
    return np.stack([cx + radius * np.cos(t), cy + radius * np.sin(t)], axis=1)


def _clip_polygon(poly, height, width):
    """Sutherland-Hodgman clip of a convex polygon [V, 2] (x, y) to the image."""
    for axis, limit, keep_below in ((0, 0.0, False), (0, width, True),
                                    (1, 0.0, False), (1, height, True)):
        if len(poly) == 0:
            break
        out = []
        for i in range(len(poly)):
            p, q = poly[i - 1], poly[i]
            p_in = p[axis] <= limit if keep_below else p[axis] >= limit
            q_in = q[axis] <= limit if keep_below else q[axis] >= limit
            if p_in != q_in:
                t = (limit - p[axis]) / (q[axis] - p[axis])
                out.append(p + t * (q - p))
            if q_in:
                out.append(q)
        poly = np.array(out)
    return poly


def _rasterise(polygons, height, width):
    """uint8 [H, W] union of COCO flat polygons, as pycocotools draws them."""
    rles = mask_util.frPyObjects(polygons, height, width)
    return mask_util.decode(mask_util.merge(rles))


def _shape_mask(rng, kind, cy, cx, radius, height, width):
    """(flat polygon rounded to 0.01 px or None, its uint8 [H, W] raster or
    None, the whole polygon float64 [V, 2] (x, y) before clipping)."""
    whole = _shape_polygon(kind, cy, cx, radius, rng.uniform(0, 2 * np.pi))
    poly = _clip_polygon(whole, height, width)
    if len(poly) < 3:
        return None, None, whole
    flat = [round(float(v), 2) for v in poly.reshape(-1)]
    return flat, _rasterise([flat], height, width), whole


def _keypoints(vertices, visible):
    """COCO `keypoints` (flat x, y, v for `KEYPOINT_NAMES`) and `num_keypoints`
    of a polygon's extreme vertices (module docstring).

    Args:
      vertices: float64 [V, 2] (x, y), the whole polygon, continuous pixels.
      visible: uint8 [H, W], the instance's visible mask.
    """
    height, width = visible.shape
    extremes = (vertices[np.argmin(vertices[:, 1])], vertices[np.argmin(vertices[:, 0])],
                vertices[np.argmax(vertices[:, 1])], vertices[np.argmax(vertices[:, 0])])
    flat = []
    for x, y in extremes:
        # Visibility of the point as written: a reader's x + 0.5 lands in
        # the same pixel as this one.
        x, y = round(float(x) - 0.5, 2), round(float(y) - 0.5, 2)
        i, j = int(np.floor(y + 0.5)), int(np.floor(x + 0.5))
        if not (0 <= i < height and 0 <= j < width):
            flat += [0, 0, 0]
        else:
            near = visible[max(i - 1, 0):i + 2, max(j - 1, 0):j + 2]
            flat += [x, y, 2 if near.any() else 1]
    return flat, sum(v > 0 for v in flat[2::3])


def _trace_outline(mask):
    """COCO polygons following the pixel edges of a binary mask.

    Every edge between a mask pixel and a non-mask pixel becomes a directed
    unit edge, clockwise around its pixel (y down), so the mask lies on the
    right of travel. Edges are chained into cycles; where two cycles touch at
    a corner (diagonal pixels) the walk turns right, hugging the pixel it
    came from. Straight runs collapse to their end points. A mask with holes
    traces a hole cycle that pycocotools would fill; callers check the
    rasterised result and re-draw such scenes.

    Returns:
      list of flat [x0, y0, x1, y1, ...] float polygons at integer corners.
    """
    m = np.pad(mask.astype(bool), 1)
    inner = m[1:-1, 1:-1]
    sides = (  # (pixels with that side open, start corner offset, direction)
        (inner & ~m[:-2, 1:-1], (0, 0), 0),   # top edge, heading east
        (inner & ~m[1:-1, 2:], (1, 0), 1),    # right edge, heading south
        (inner & ~m[2:, 1:-1], (1, 1), 2),    # bottom edge, heading west
        (inner & ~m[1:-1, :-2], (0, 1), 3),   # left edge, heading north
    )
    step = ((1, 0), (0, 1), (-1, 0), (0, -1))  # (dx, dy) per direction
    out_edges = {}
    for open_side, (ox, oy), direction in sides:
        ys, xs = np.nonzero(open_side)
        for x, y in zip((xs + ox).tolist(), (ys + oy).tolist()):
            out_edges.setdefault((x, y), []).append(direction)
    polygons = []
    while out_edges:
        # The top-left corner of the first pixel in raster order is never a
        # touching corner, so a walk from it closes on its own cycle.
        start = min((v for v, ds in out_edges.items() if 0 in ds),
                    key=lambda v: (v[1], v[0]))
        vertex, direction = start, 0
        corners = []
        while True:
            dirs = out_edges[vertex]
            if (direction + 1) % 4 in dirs:
                turn = (direction + 1) % 4
            elif direction in dirs:
                turn = direction
            else:
                turn = (direction + 3) % 4
            if turn != direction or not corners:
                corners.append(vertex)
            dirs.remove(turn)
            if not dirs:
                del out_edges[vertex]
            direction = turn
            vertex = (vertex[0] + step[turn][0], vertex[1] + step[turn][1])
            if vertex == start:
                break
        polygons.append([float(c) for xy in corners for c in xy])
    return polygons


def _encode(mask):
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _pick_colour(rng, avoid, min_distance=110.0):
    for _ in range(50):
        colour = rng.uniform(0, 255, size=3)
        if np.linalg.norm(colour - avoid) >= min_distance:
            return colour
    return 255.0 - avoid


def _draw_scene(rng, height, width, num_instances, with_crowd):
    """Paints one scene.

    Steps: 1. background; 2. the crowd cluster (if any) as layer 0;
    3. instances, each placed by up to `_PLACEMENT_TRIES` draws and accepted
    only if every earlier layer stays visible enough and traceable;
    4. paint layers in order from the label map; 5. annotations.

    Returns:
      (uint8 [H, W, 3] pixels, list of annotation dicts without ids).
    """
    short = min(height, width)
    # 1. Background: base colour + gradient + sine stripes + noise.
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(40, 215, size=3)
    grad = rng.uniform(-40, 40, size=(2, 3))
    theta, freq = rng.uniform(0, np.pi), rng.uniform(2, 12) / short
    stripes = np.sin(2 * np.pi * freq * (np.cos(theta) * xx + np.sin(theta) * yy))
    background = (base + grad[0] * (yy / height)[..., None]
                  + grad[1] * (xx / width)[..., None]
                  + rng.uniform(5, 25) * stripes[..., None]
                  + rng.normal(0, 8, size=(height, width, 3)))

    labels = np.full((height, width), -1, np.int32)   # layer covering each px
    layers = []   # dicts: category_id, colour, full (raster), polygon, crowd
    # 2. Crowd: 5-8 small shapes of one category around one point.
    if with_crowd:
        kind = rng.integers(len(CATEGORIES))
        cy, cx = rng.uniform(0.25, 0.75) * height, rng.uniform(0.25, 0.75) * width
        full = np.zeros((height, width), np.uint8)
        for _ in range(int(rng.integers(5, 9))):
            _, raster, _ = _shape_mask(
                rng, CATEGORIES[kind]["name"],
                cy + rng.normal(0, 0.08 * short), cx + rng.normal(0, 0.08 * short),
                rng.uniform(0.03, 0.06) * short + 1.0, height, width)
            if raster is not None:
                full |= raster
        if full.sum() >= _MIN_AREA_PX:
            labels[full > 0] = 0
            layers.append(dict(category_id=CATEGORIES[kind]["id"], full=full,
                               polygons=None, crowd=True,
                               colour=_pick_colour(rng, base)))
    # 3. Instances.
    outlines = {}
    for _ in range(num_instances):
        for _ in range(_PLACEMENT_TRIES):
            kind = rng.integers(len(CATEGORIES))
            radius = rng.uniform(_MIN_RADIUS, _MAX_RADIUS) * short
            flat, full, whole = _shape_mask(rng, CATEGORIES[kind]["name"],
                                     rng.uniform(0, height), rng.uniform(0, width),
                                     radius, height, width)
            if full is None or not _big_enough(full):
                continue
            k = len(layers)
            trial = np.where(full > 0, k, labels)
            new_outlines = _check_occluded(trial, layers)
            if new_outlines is None:
                continue
            labels = trial
            outlines.update(new_outlines)
            layers.append(dict(category_id=CATEGORIES[kind]["id"], full=full,
                               polygons=[flat], crowd=False, vertices=whole,
                               colour=_pick_colour(rng, base)))
            break
    # 4. Paint: each pixel takes the colour (plus a little noise) of its layer.
    image = background
    for k, layer in enumerate(layers):
        visible = labels == k
        image[visible] = layer["colour"] + rng.normal(0, 6, size=(visible.sum(), 3))
    pixels = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    # 5. Annotations: visible masks; bbox and area from the same RLE.
    annotations = []
    for k, layer in enumerate(layers):
        visible = (labels == k).astype(np.uint8)
        if layer["crowd"]:
            segmentation = _encode(visible)
            rle = segmentation
            keypoints, num_keypoints = [0] * 3 * len(KEYPOINT_NAMES), 0
        else:
            segmentation = outlines.get(k, layer["polygons"])
            rle = mask_util.merge(mask_util.frPyObjects(segmentation, height, width))
            keypoints, num_keypoints = _keypoints(layer["vertices"], visible)
        annotations.append({
            "category_id": layer["category_id"],
            "segmentation": segmentation,
            "area": float(mask_util.area(rle)),
            "bbox": [float(v) for v in mask_util.toBbox(rle)],
            "iscrowd": int(layer["crowd"]),
            "keypoints": keypoints,
            "num_keypoints": num_keypoints,
        })
    return pixels, annotations


def _big_enough(mask):
    ys, xs = np.nonzero(mask)
    return (len(ys) >= _MIN_AREA_PX and ys.max() - ys.min() + 1 >= _MIN_SIDE_PX
            and xs.max() - xs.min() + 1 >= _MIN_SIDE_PX)


def _check_occluded(trial, layers):
    """Outlines of the layers `trial` occludes, or None if one is spoilt.

    A layer is spoilt when less than `_MIN_VISIBLE` of it (or too few pixels)
    stays visible, or when its traced outline does not rasterise back to its
    visible pixels exactly (a hole). Crowd layers are RLE: only size counts.
    """
    height, width = trial.shape
    outlines = {}
    for k, layer in enumerate(layers):
        visible = (trial == k).astype(np.uint8)
        full_area = int(layer["full"].sum())
        area = int(visible.sum())
        if area == full_area:
            continue
        if area < _MIN_VISIBLE * full_area or not _big_enough(visible):
            return None
        if layer["crowd"]:
            continue
        polygons = _trace_outline(visible)
        if not np.array_equal(_rasterise(polygons, height, width), visible):
            return None
        outlines[k] = polygons
    return outlines
