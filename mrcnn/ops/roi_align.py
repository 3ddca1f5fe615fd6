"""ROIAlign (Mask R-CNN §3) on one feature map or on an FPN pyramid.

Shape letters: `B` batch, `K` rois per image, `H`, `W` feature map height and
width, `C` channels, `L` pyramid levels, `oh`, `ow` output bins.

Pixel model (Detectron2's ROIAlignV2, `aligned=True`): feature cell `(i, j)`
of a map with stride `s` covers image pixels `[j * s, (j + 1) * s)` and its
value sits at the cell centre, so an image coordinate `x` is the continuous
feature index `x / s - 0.5`. Without that half-pixel shift (`aligned=False`,
the original paper's ROIAlign) every box is sampled half a cell off. Pinned
by `RoiAlignTest.test_literal_5x5` and `test_matches_reference`.

All sampling goes through one private core, `_pool_boxes`, which gathers the
four bilinear neighbours of each sample from a flat `[rows, C]` table: the
work and the memory scale with the number of samples, never with `H * W` per
box. `roi_align`, `multilevel_roi_align` and `masks.mask_targets` differ only
in how they build that table and each box's row offset and map size.
"""

import tensorflow as tf

from mrcnn.ops import boxes as box_ops
from mrcnn.ops._scope import scoped

# Eq. 1 of the FPN paper (Lin et al. 2017): a 224 x 224 box, the ImageNet
# pre-training size, goes to level 4 (P4); each halving of the box side goes
# one level down.
CANONICAL_SIZE = 224
CANONICAL_LEVEL = 4
# Keeps log2 finite for empty (zero-area) boxes; they land on min_level.
_LOG_EPS = 1e-8


def _axis_samples(coords, size):
    """Bilinear neighbour indices and weights along one axis.

    A sample outside `[-1, size]` contributes 0; otherwise it is clamped to
    `[0, size - 1]` (Detectron2's `bilinear_interpolate`).

    Args:
      coords: float32 [B, K, P] continuous feature indices of the samples.
      size: int32 [B, K] or Python int, the map's extent along this axis.

    Returns:
      (low, high): int32 [B, K, P] neighbour indices in [0, size - 1];
      (w_low, w_high): float32 [B, K, P] weights, both 0 for dropped samples.
    """
    size_f = tf.cast(size, tf.float32)
    if isinstance(size_f, tf.Tensor) and size_f.shape.rank:
        size_f = size_f[..., None]  # [B, K, 1]
    valid = tf.logical_and(coords >= -1.0, coords <= size_f)
    # Dropped samples (NaN boxes included) read element 0 with weight 0, so
    # every gather index stays in range.
    clamped = tf.where(valid, tf.clip_by_value(coords, 0.0, size_f - 1.0), 0.0)
    low_f = tf.floor(clamped)
    frac = clamped - low_f
    low = tf.cast(low_f, tf.int32)
    high = tf.minimum(low + 1, tf.cast(size_f, tf.int32) - 1)
    valid_f = tf.cast(valid, tf.float32)
    return (low, high), ((1.0 - frac) * valid_f, frac * valid_f)


def _split_bins(t, bins, sr):
    """[B, K, bins * sr] -> [B, K, bins, sr]."""
    return tf.reshape(t, tf.concat([tf.shape(t)[:2], [bins, sr]], 0))


def _pool_boxes(table, row_offset, height, width, boxes, output_size,
                sampling_ratio, aligned, max_sampling_ratio=None):
    """Shared ROIAlign core: averages bilinear samples gathered from a table.

    Algorithm:
      1. Shift each box by -0.5 cell (`aligned`) or grow it to >= 1 x 1 cell
         (not `aligned`); cut it into `oh x ow` bins and place
         `sampling_ratio` samples per bin and axis at sub-grid centres.
      2. Per axis, turn each sample into two neighbour indices and two
         weights (`_axis_samples`); the 2-D bilinear weight is their product.
      3. For each of the `sampling_ratio**2` samples of a bin and each of its
         four neighbours, gather `[B, K, oh, ow, C]` rows of the table at
         `row_offset + y * width + x` and add them, weighted, to a float32
         accumulator: no forward intermediate is larger than the output
         (`_weighted_gather`, which also gives the scatter-add gradient).
      4. Divide by `sampling_ratio**2` (the bin average).
    With `sampling_ratio = 0` (adaptive), box `k` takes `n = ceil(roi / bins)`
    samples per bin along each axis, at most `max_sampling_ratio`: every box
    gathers `max_sampling_ratio**2` sample slots (static shapes), those past
    its own `n` with weight 0, and step 4 divides by its `n_y * n_x`.

    Args:
      table: any float dtype [T, C], the feature maps flattened row-major;
        box `k` of image `b` reads the `height[b, k] x width[b, k]` map whose
        element (0, 0) is row `row_offset[b, k]`.
      row_offset: int32 [B, K].
      height: int32 [B, K] or Python int.
      width: int32 [B, K] or Python int.
      boxes: float32 [B, K, 4] (y1, x1, y2, x2) in that map's cell units
        (image pixels times the map's spatial scale), before any shift.
      output_size: (oh, ow) Python ints.
      sampling_ratio: Python int >= 1, samples per bin along each axis, or
        0 for adaptive.
      aligned: Python bool, see the module docstring.
      max_sampling_ratio: Python int >= 1, the adaptive count's bound.

    Returns:
      float32 [B, K, oh, ow, C].
    """
    oh, ow = output_size
    adaptive = int(sampling_ratio) == 0
    sr = int(max_sampling_ratio or 0) if adaptive else int(sampling_ratio)
    if sr < 1:
        raise ValueError(f"sampling_ratio must be >= 1, or 0 (adaptive) with "
                         f"max_sampling_ratio >= 1; got {sampling_ratio}, "
                         f"{max_sampling_ratio}")
    y1, x1, y2, x2 = tf.unstack(boxes, 4, axis=-1)  # each [B, K]
    if aligned:
        y1, x1, y2, x2 = y1 - 0.5, x1 - 0.5, y2 - 0.5, x2 - 0.5
        roi_h, roi_w = y2 - y1, x2 - x1
    else:
        roi_h = tf.maximum(y2 - y1, 1.0)
        roi_w = tf.maximum(x2 - x1, 1.0)
    # Step 1: sample n = bin * sr + s sits at (bin + (s + 0.5) / sr) bins
    # (adaptive: / the box's own count, slots past it weighted 0).
    def grid(start, extent, bins):
        """Sample coordinates [B, K, bins*sr]; adaptive: also the slots taken
        (float 0/1, same shape) and the per-box count [B, K]."""
        slot = tf.tile(tf.range(sr, dtype=tf.float32), [bins])  # [bins*sr]
        cell = tf.repeat(tf.range(bins, dtype=tf.float32), sr)  # [bins*sr]
        bin_size = (extent / bins)[..., None]  # [B, K, 1]
        if not adaptive:
            return start[..., None] + (cell + (slot + 0.5) / sr) * bin_size, None, None
        count = tf.clip_by_value(tf.math.ceil(extent / bins), 0.0, float(sr))  # [B, K]
        per = tf.maximum(count, 1.0)[..., None]
        coords = start[..., None] + (cell + (slot + 0.5) / per) * bin_size
        return coords, tf.cast(slot < count[..., None], tf.float32), count

    ys, y_take, y_count = grid(y1, roi_h, oh)  # [B, K, oh*sr]
    xs, x_take, x_count = grid(x1, roi_w, ow)  # [B, K, ow*sr]
    # Step 2.
    y_idx, y_wts = _axis_samples(ys, height)
    x_idx, x_wts = _axis_samples(xs, width)
    if adaptive:
        y_wts = tuple(w * y_take for w in y_wts)
        x_wts = tuple(w * x_take for w in x_wts)
    width_t = tf.cast(width, tf.int32)
    if width_t.shape.rank:
        width_t = width_t[..., None]  # [B, K, 1]
    y_rows = [_split_bins(i * width_t + row_offset[..., None], oh, sr)
              for i in y_idx]  # [B, K, oh, sr] flat row of (y, x = 0)
    y_wts = [_split_bins(w, oh, sr) for w in y_wts]  # [B, K, oh, sr]
    x_idx = [_split_bins(i, ow, sr) for i in x_idx]  # [B, K, ow, sr]
    x_wts = [_split_bins(w, ow, sr) for w in x_wts]  # [B, K, ow, sr]
    # Step 3: 4 * sr**2 (index, weight) pairs per bin (static Python loop
    # over sample slots, not over data).
    index, weight = [], []
    for s in range(sr):
        for t in range(sr):
            for rows, wy in zip(y_rows, y_wts):
                for cols, wx in zip(x_idx, x_wts):
                    index.append(rows[..., :, None, s]
                                 + cols[..., None, :, t])  # [B, K, oh, ow]
                    weight.append(wy[..., :, None, s]
                                  * wx[..., None, :, t])  # [B, K, oh, ow]
    acc = _weighted_gather(table, index, weight)  # [B, K, oh, ow, C]
    # Step 4.
    if adaptive:
        count = tf.maximum(y_count * x_count, 1.0)  # [B, K]
        return acc / count[..., None, None, None]
    return acc * (1.0 / (sr * sr))


def _weighted_gather(table, index, weight):
    """`sum_j weight[..., j] * table[index[..., j]]`, differentiable in `table`.

    The forward pass adds one output-sized gather at a time into a float32
    accumulator. The gradient is written by hand: autodiff of those gathers
    gives one IndexedSlices per neighbour and sample, which TF concatenates
    (a copy of all of them) and sums in the table's dtype; here the updates
    are formed in one broadcast multiply and summed in float32 by a single
    `unsorted_segment_sum`: with bf16 features its error against the float32
    gradient was 5x smaller, and forward plus backward of
    `multilevel_roi_align` at the R50-FPN head sizes ran 1.3-1.4x faster on
    CPU, graph and XLA. (In the whole R50 step in graph mode on CPU, Grappler
    then turns the forward sum into in-place accumulation and the step was
    no faster; the demo step was 4-7% faster.)

    Args:
      table: any float dtype [T, C].
      index: J int32 [...] tensors, rows of `table`, all in [0, T).
      weight: J float32 [...] tensors.

    Returns:
      float32 [..., C]; its gradient reaches `table` only.
    """
    channels = table.shape[-1]
    # The gradient is built outside this op's name scope; open it again, under
    # gradient_tape/ as autodiff would, so profiles file it as this op's
    # backward pass.
    scope = tf.get_current_name_scope()
    grad_scope = f"gradient_tape/{scope}/" if scope else "gradient_tape/"

    @tf.custom_gradient
    def gather(table):
        acc = None
        for rows, w in zip(index, weight):
            term = tf.cast(tf.gather(table, rows), tf.float32) * w[..., None]
            acc = term if acc is None else acc + term  # [..., C]

        def grad(upstream):  # float32 [..., C]
            with tf.name_scope(grad_scope):
                updates = (upstream[..., None, :]
                           * tf.stack(weight, -1)[..., None])  # [..., J, C]
                dtable = tf.math.unsorted_segment_sum(
                    tf.reshape(updates, [-1, channels]),
                    tf.reshape(tf.stack(index, -1), [-1]),
                    tf.shape(table)[0])  # [T, C]
                return tf.cast(dtable, table.dtype)

        return acc, grad

    return gather(table)


# The adaptive sample count's bound: exact for every R50-FPN RoI on a 1344
# canvas (the largest, at P5, is 42 cells: 6 per 7-bin side).
MAX_SAMPLING_RATIO = 6


@scoped
def roi_align(features, boxes, output_size=(7, 7), spatial_scale=1.0,
              sampling_ratio=2, aligned=True, *,
              max_sampling_ratio=MAX_SAMPLING_RATIO):
    """ROIAlign of each box over one feature map (Mask R-CNN §3).

    Each box, mapped to feature cells by `spatial_scale` (and, with `aligned`,
    shifted by -0.5 cell), is cut into `oh x ow` bins; each bin averages
    `sampling_ratio x sampling_ratio` bilinear samples at the centres of an
    even sub-grid. A sample with y < -1 or y > H (likewise x) contributes 0,
    others are clamped to [0, H - 1] x [0, W - 1]. With `aligned=False` there
    is no shift and each box is at least 1 x 1 cell. Interpolation runs in
    float32; gradients flow to `features`, not to `boxes`.

    Args:
      features: float32, float16 or bfloat16 [B, H, W, C].
      boxes: float [B, K, 4] (y1, x1, y2, x2) in image pixels; padded slots
        (any value, e.g. 0) give finite outputs that callers ignore.
      output_size: (oh, ow) Python ints; 7 x 7 for the box head.
      spatial_scale: Python float, 1 / stride of `features`.
      sampling_ratio: Python int >= 1; 2 as in torchvision's Mask R-CNN and
        the contract. 0 (beyond the contract) is adaptive, Detectron2's
        `POOLER_SAMPLING_RATIO = 0` and torchvision's `sampling_ratio <= 0`:
        `ceil(roi_h / oh) x ceil(roi_w / ow)` samples per bin for each box,
        with at most `max_sampling_ratio` per axis (static shapes: every
        box gathers `max_sampling_ratio**2` slots, 9x the work of 2 at 6).
      aligned: Python bool; True is Detectron2's ROIAlignV2.
      max_sampling_ratio: Python int, the adaptive count's bound per axis.

    Returns:
      [B, K, oh, ow, C] in the dtype of `features`.
    """
    features = tf.convert_to_tensor(features)
    boxes = tf.stop_gradient(tf.cast(boxes, tf.float32))
    _, height, width, channels = features.shape
    batch = tf.shape(features)[0]
    num_boxes = tf.shape(boxes)[1]
    table = tf.reshape(features, [-1, channels])  # [B*H*W, C]
    row_offset = tf.broadcast_to(
        tf.range(batch)[:, None] * (height * width), [batch, num_boxes])  # [B, K]
    pooled = _pool_boxes(table, row_offset, height, width,
                         boxes * spatial_scale, output_size, sampling_ratio,
                         aligned, max_sampling_ratio)
    return tf.cast(pooled, features.dtype)


@scoped
def assign_levels(boxes, min_level=2, max_level=5,
                  canonical_size=CANONICAL_SIZE,
                  canonical_level=CANONICAL_LEVEL):
    """FPN level of each box (Eq. 1 of the FPN paper).

    `level = floor(canonical_level + log2(sqrt(area) / canonical_size + 1e-8))`
    clamped to `[min_level, max_level]`; empty boxes get `min_level`.

    Args:
      boxes: float [B, K, 4] (y1, x1, y2, x2) in image pixels.
      min_level, max_level: Python ints, the pyramid levels pooled from.
      canonical_size: box side (pixels) that maps to `canonical_level`.
      canonical_level: Python int.

    Returns:
      int32 [B, K].
    """
    area = box_ops.box_area(boxes)  # [B, K]
    level = tf.floor(canonical_level + tf.math.log(
        tf.sqrt(area) / canonical_size + _LOG_EPS) / tf.math.log(2.0))
    level = tf.clip_by_value(level, float(min_level), float(max_level))
    return tf.cast(level, tf.int32)


@scoped
def multilevel_roi_align(features, boxes, output_size=(7, 7), sampling_ratio=2,
                         min_level=2, max_level=5,
                         canonical_size=CANONICAL_SIZE,
                         canonical_level=CANONICAL_LEVEL, *,
                         max_sampling_ratio=MAX_SAMPLING_RATIO, aligned=True,
                         batch_index=None):
    """ROIAlign of each box from its own FPN level (`assign_levels`).

    Each box is pooled once, by `roi_align(aligned=True)` semantics (unless
    `aligned=False`) with
    `spatial_scale = 2**-level`, from the level it is assigned to; no box is
    pooled from the other levels.

    Algorithm:
      1. Flatten levels `min_level..max_level` into one `[B * R, C]` table,
         `R = sum_l H_l * W_l`, and keep each level's row offset, height,
         width and scale in small `[L]` constant vectors.
      2. `assign_levels` each box and gather its level's offset, size and
         scale from those vectors.
      3. Run the shared 4-neighbour gather core (`_pool_boxes`) once.

    Args:
      features: {level: float32, float16 or bfloat16 [B, H_l, W_l, C]} with
        stride `2**level`; levels outside `[min_level, max_level]` are
        ignored.
      boxes: float [B, K, 4] (y1, x1, y2, x2) in image pixels; padded slots
        give finite outputs that callers ignore.
      output_size: (oh, ow) Python ints; 7 x 7 box head, 14 x 14 mask head.
      sampling_ratio: Python int >= 1, or 0 for adaptive (`roi_align`).
      min_level, max_level, canonical_size, canonical_level: as in
        `assign_levels`.
      max_sampling_ratio: as in `roi_align`.
      aligned: Python bool (beyond the contract): False pools as
        `roi_align(aligned=False)`, torchvision's `MultiScaleRoIAlign`.
      batch_index: optional int32 [N, K] in [0, B) (beyond the contract),
        the image each box is pooled from; `boxes` is then [N, K, 4] for any
        N, e.g. a batch's positives gathered into one [1, T] list (the mask
        head in training) as torchvision's `MultiScaleRoIAlign` takes one
        list with an image index per box. None: box `[b, k]` reads image b.

    Returns:
      [B, K, oh, ow, C] in the dtype of the features ([N, K, ...] with
      `batch_index`).
    """
    levels = list(range(min_level, max_level + 1))
    missing = [lvl for lvl in levels if lvl not in features]
    if missing:
        raise ValueError(f"features lacks levels {missing}; it has "
                         f"{sorted(features)} and min_level={min_level}, "
                         f"max_level={max_level}")
    maps = [tf.convert_to_tensor(features[lvl]) for lvl in levels]
    dtype = maps[0].dtype
    channels = maps[0].shape[-1]
    boxes = tf.stop_gradient(tf.cast(boxes, tf.float32))
    # Step 1.
    heights = [m.shape[1] for m in maps]
    widths = [m.shape[2] for m in maps]
    sizes = [h * w for h, w in zip(heights, widths)]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    rows_per_image = sum(sizes)
    batch = tf.shape(maps[0])[0]
    table = tf.concat([tf.reshape(tf.cast(m, dtype), [batch, s, channels])
                       for m, s in zip(maps, sizes)], axis=1)  # [B, R, C]
    table = tf.reshape(table, [-1, channels])  # [B*R, C]
    # Step 2.
    level_index = assign_levels(boxes, min_level, max_level, canonical_size,
                                canonical_level) - min_level  # [B, K]
    height = tf.gather(tf.constant(heights, tf.int32), level_index)  # [B, K]
    width = tf.gather(tf.constant(widths, tf.int32), level_index)  # [B, K]
    scale = tf.gather(tf.constant([2.0 ** -lvl for lvl in levels], tf.float32),
                      level_index)  # [B, K]
    if batch_index is None:
        batch_index = tf.range(batch)[:, None]  # [B, 1]
    row_offset = (tf.gather(tf.constant(starts, tf.int32), level_index)
                  + tf.cast(batch_index, tf.int32) * rows_per_image)  # [B|N, K]
    # Step 3.
    pooled = _pool_boxes(table, row_offset, height, width,
                         boxes * scale[..., None], output_size,
                         sampling_ratio, aligned=aligned,
                         max_sampling_ratio=max_sampling_ratio)
    return tf.cast(pooled, dtype)
