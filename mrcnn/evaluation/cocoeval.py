"""COCO box and mask AP and AR, the numbers of pycocotools' COCOeval, fast.

pycocotools matches detections to ground truth in a pure-Python loop over
every (image, category, area range, IoU threshold, detection, gt); on COCO
val2017 (5000 images, 100 detections each) that is about a minute per IoU
type of host time after every evaluation. Here the same greedy matching
runs for all (image, category) pairs at once: pairs are grouped by their
detection and gt counts, and one NumPy step per detection rank matches the
rank-r detection of every pair in the group, for all area ranges and IoU
thresholds together (Detectron2 ships a C++ COCOeval for the same reason).

The rules are COCOeval's (pycocotools 2.0, `evaluate`, `accumulate`,
`summarize`), and the tests hold the numbers to it within 1e-12:

- each (image, category) keeps its 100 best-scored detections (stable on
  ties); a detection takes the unmatched gt of highest IoU at or above the
  threshold, a non-ignored gt before an ignored one, the later gt on equal
  IoU; crowd gt can be matched again and again;
- a gt is ignored when it is a crowd (its `ignore` field is not read, as in
  COCOeval) or its `area` lies outside the range; a detection matched to an
  ignored gt, or unmatched with its area outside the range, is ignored; a
  detection's area is its box's for 'bbox' and its mask's for 'segm';
- matching runs once at 100 detections; AP and AR at 1 and 10 detections
  take each pair's first 1 or 10 (greedy matching in score order makes that
  the same as matching them alone);
- precision is interpolated at 101 recall points, -1 for a category and
  area range without non-ignored gt; the summaries average the entries
  above -1.
- a match to a gt whose annotation `id` is 0 counts as unmatched (COCOeval
  records matches by gt id and reads 0 as none).
"""

import collections

import numpy as np
from pycocotools import mask as mask_util

from mrcnn.evaluation.results import ResultsTable

IOU_TYPES = ("bbox", "segm")
# The 12 numbers COCOeval.summarize() prints, in its order.
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl",
              "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
MAX_DETS = (1, 10, 100)
# COCOeval.Params' own expressions, so the floats are the same.
IOU_THRESHOLDS = np.linspace(.5, 0.95, int(np.round((0.95 - .5) / .05)) + 1,
                             endpoint=True)
RECALL_THRESHOLDS = np.linspace(.0, 1.00, int(np.round((1.00 - .0) / .01)) + 1,
                                endpoint=True)
# (low, high) object areas in pixels, bounds inclusive: all, small, medium,
# large.
AREA_RANGES = ((0.0, 1e5 ** 2), (0.0, 32.0 ** 2), (32.0 ** 2, 96.0 ** 2),
               (96.0 ** 2, 1e5 ** 2))
_AREA_LOW = np.array([low for low, _ in AREA_RANGES])
_AREA_HIGH = np.array([high for _, high in AREA_RANGES])


def match_greedy(pairs, iou_thresholds):
    """COCOeval's greedy matching for many (image, category) pairs at once.

    Per pair and setting (area range x IoU threshold), each detection in
    score order takes the gt of highest IoU at or above the threshold that
    is not matched yet (crowd gt stay available), among the non-ignored gt
    if one qualifies, else among the ignored; on equal IoU the later gt.

    Args:
      pairs: list of (ious, gt_ignore, gt_crowd): float64 [D, G] IoUs of
        the pair's detections (sorted by decreasing score) with its gt,
        bool [A, G] gt ignored per area range, bool [G] crowd gt.
      iou_thresholds: float64 [T].

    Returns:
      list of int64 [A, T, D]: the gt index each detection matched, -1 for
      none, one array per pair.
    """
    thresholds = np.minimum(np.asarray(iou_thresholds, np.float64), 1 - 1e-10)
    out = [None] * len(pairs)
    groups = collections.defaultdict(list)
    for i, (ious, gt_ignore, _) in enumerate(pairs):
        num_dt, num_gt = ious.shape
        if num_dt == 0 or num_gt == 0:
            out[i] = np.full((gt_ignore.shape[0], len(thresholds), num_dt), -1, np.int64)
        else:
            # Groups of similar sizes keep the padding small.
            groups[_ceil_pow2(num_dt), _ceil_pow2(num_gt)].append(i)
    for (cap_dt, cap_gt), members in groups.items():
        chosen = _match_group([pairs[i] for i in members], cap_dt, cap_gt, thresholds)
        for row, i in enumerate(members):
            out[i] = chosen[row, :, :, :pairs[i][0].shape[0]]
    return out


def _ceil_pow2(n):
    return 1 << max(int(n) - 1, 0).bit_length()


def _match_group(pairs, cap_dt, cap_gt, thresholds):
    """`match_greedy` of pairs padded to [cap_dt, cap_gt]: int64 [P, A, T, cap_dt]."""
    num_p, num_a, num_t = len(pairs), pairs[0][1].shape[0], len(thresholds)
    ious = np.full((num_p, cap_dt, cap_gt), -np.inf)    # padding never qualifies
    ignore = np.ones((num_p, num_a, cap_gt), bool)
    crowd = np.zeros((num_p, cap_gt), bool)
    for p, (iou, gt_ignore, gt_crowd) in enumerate(pairs):
        ious[p, :iou.shape[0], :iou.shape[1]] = iou
        ignore[p, :, :iou.shape[1]] = gt_ignore
        crowd[p, :iou.shape[1]] = gt_crowd
    taken = np.zeros((num_p, num_a, num_t, cap_gt), bool)
    chosen = np.full((num_p, num_a, num_t, cap_dt), -1, np.int64)
    ignore = ignore[:, :, None, :]                     # [P, A, 1, G]
    crowd = crowd[:, None, None, :]                    # [P, 1, 1, G]
    max_dt = max(iou.shape[0] for iou, _, _ in pairs)
    for r in range(max_dt):
        iou = ious[:, r, None, None, :]                # [P, 1, 1, G]
        free = (iou >= thresholds[None, None, :, None]) & (~taken | crowd)  # [P, A, T, G]
        kept = free & ~ignore
        candidates = np.where(kept.any(-1, keepdims=True), kept, free & ignore)
        values = np.where(candidates, iou, -np.inf)
        last_best = cap_gt - 1 - np.argmax(values[..., ::-1], axis=-1)   # [P, A, T]
        hit = candidates.any(-1)
        chosen[..., r] = np.where(hit, last_best, -1)
        p, a, t = np.nonzero(hit)
        taken[p, a, t, last_best[p, a, t]] = True
    return chosen


def group_ranks(keys):
    """int64 [N]: each element's position in its run of equal `keys` (a
    sorted int array [N])."""
    keys = np.asarray(keys)
    if not keys.size:
        return np.zeros(0, np.int64)
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    return np.arange(keys.size) - np.repeat(starts, np.diff(np.r_[starts, keys.size]))


def _area_of(annotation):
    try:
        return float(annotation["area"])
    except KeyError:
        raise ValueError(
            f"annotation {annotation.get('id')} of image {annotation.get('image_id')} "
            f"has no 'area', which COCO evaluation needs") from None


def coco_evaluate(coco_gt, results, iou_type, image_ids):
    """COCO AP and AR of `results` on `image_ids`, as COCOeval computes them.

    Args:
      coco_gt: a loaded pycocotools `COCO`; annotations need `area`
        (`iscrowd` is 0 when absent).
      results: a `ResultsTable`, or a list of COCO results dicts
        (`image_id`, `category_id`, `score`, and `bbox` [x, y, w, h] for
        'bbox' or `segmentation` for 'segm'); results of other images or of
        unknown categories are not scored.
      iou_type: 'bbox' or 'segm'.
      image_ids: the images evaluated; each counts, detections or not.

    Returns:
      (stats, precision): stats {name: float} with the names of
      `STAT_NAMES`; precision float64 [T, R, K, A, M] (IoU thresholds,
      recall points, categories in `sorted(coco_gt.getCatIds())`, area
      ranges, `MAX_DETS`), -1 where undefined: COCOeval's `eval['precision']`.
    """
    precision, recall = score_results(
        coco_gt, results, iou_type, image_ids, max_dets=MAX_DETS,
        pair_cap=MAX_DETS[-1], crowds=True, zero_id_unmatched=True)
    return _summarize(precision, recall), precision


def score_results(coco_gt, results, iou_type, image_ids, *, max_dets, pair_cap,
                  crowds, zero_id_unmatched, unmatched_ignored=None):
    """Matching and accumulation of COCOeval, with the rules that COCO and
    LVIS (`mrcnn.evaluation.lvis`) set apart as arguments.

    Args:
      coco_gt, results, iou_type, image_ids: as `coco_evaluate`'s; the
        caller filters `results` first where its rules say so.
      max_dets: tuple of ints, the detection counts per (image, category)
        that precision and recall are given at (the M axis).
      pair_cap: int or None, detections kept per (image, category).
      crowds: bool. True: COCO's gt `iscrowd` (IoU over the detection's
        area, matched any number of times, ignored), and gt `ignore` fields
        not read; False: no crowds, and a gt `ignore` field ignores it.
      zero_id_unmatched: bool, a match to a gt of annotation id 0 counts as
        none (COCOeval).
      unmatched_ignored: optional bool [len(results)]: results also ignored
        when unmatched (LVIS's categories not exhaustively annotated).

    Returns:
      (precision float64 [T, R, K, A, M], recall float64 [T, K, A, M]), -1
      where a category and area range have no non-ignored gt.
    """
    if iou_type not in IOU_TYPES:
        raise ValueError(f"iou_type={iou_type!r}; expected one of {IOU_TYPES}")
    image_ids = sorted({int(i) for i in image_ids})
    image_index = {image_id: n for n, image_id in enumerate(image_ids)}
    category_ids = sorted(coco_gt.getCatIds())
    category_index = {c: k for k, c in enumerate(category_ids)}
    num_k, num_a, num_t = len(category_ids), len(AREA_RANGES), len(IOU_THRESHOLDS)
    low, high = _AREA_LOW[:, None], _AREA_HIGH[:, None]   # [A, 1]

    def gt_flags(gts):
        """(crowd bool [G], ignored bool [A, G]) of a pair's gt."""
        if crowds:
            crowd = np.array([bool(g.get("iscrowd", 0)) for g in gts], bool)
            flagged = crowd
        else:
            crowd = np.zeros(len(gts), bool)
            flagged = np.array([bool(g.get("ignore", 0)) for g in gts], bool)
        area = np.array([_area_of(g) for g in gts], np.float64)
        return crowd, flagged[None] | (area[None] < low) | (area[None] > high)

    # Ground truth by (image, category); non-ignored counts per category and
    # area range.
    truths = collections.defaultdict(list)
    for image_id in image_ids:
        for ann in coco_gt.imgToAnns.get(image_id, []):
            if int(ann["category_id"]) in category_index:
                truths[image_index[image_id], category_index[int(ann["category_id"])]].append(ann)
    flags = {key: gt_flags(gts) for key, gts in truths.items()}
    num_gt = np.zeros((num_k, num_a), np.int64)
    for (_, k), (_, gt_ignore) in flags.items():
        num_gt[k] += (~gt_ignore).sum(axis=1)

    # Detections, all at once: [E] arrays sorted by image, category, then
    # decreasing score (stable), each pair's first `pair_cap` kept.
    extra = (np.zeros(len(results), bool) if unmatched_ignored is None
             else np.asarray(unmatched_ignored, bool).reshape(-1))
    if isinstance(results, ResultsTable):
        if iou_type == "segm" and len(results) and not results.has_masks:
            raise ValueError("iou_type 'segm' of a ResultsTable without masks")
        known = np.flatnonzero(np.isin(results.image_id, image_ids)
                               & np.isin(results.category_id, category_ids))
        dts = results.take(known)
    else:
        known = [n for n, r in enumerate(results) if int(r["image_id"]) in image_index
                 and int(r["category_id"]) in category_index]
        # Polygons and uncompressed RLEs become compressed RLEs at the
        # image's size, as COCOeval converts them.
        dts = ResultsTable.from_entries([results[n] for n in known],
                                        coco_gt.annToRLE if iou_type == "segm" else None)
    extra = extra[known]
    image = np.searchsorted(image_ids, dts.image_id)
    category = np.searchsorted(category_ids, dts.category_id)
    scores = dts.score
    order = np.lexsort((np.arange(len(dts)), -scores, category, image))
    rank = group_ranks((image * num_k + category)[order])
    if pair_cap is not None:
        order, rank = order[rank < pair_cap], rank[rank < pair_cap]
    dts = dts.take(order)
    image, category, scores, extra = image[order], category[order], scores[order], extra[order]
    if iou_type == "bbox":
        dt_area = dts.bbox[:, 2] * dts.bbox[:, 3]

        def regions(begin, end):
            return dts.bbox[begin:end].tolist()
    else:
        def regions(begin, end):
            return dts.rles(slice(begin, end))

        # area() fails beyond 255 masks at once.
        dt_area = np.concatenate([np.zeros(0)] + [
            np.asarray(mask_util.area(regions(i, min(i + 255, len(dts)))),
                       np.float64).reshape(-1)
            for i in range(0, len(dts), 255)])

    # Unmatched until matched: a detection is ignored where its area is
    # outside the range (or `unmatched_ignored`), else a false positive.
    outside = (dt_area[None] < low) | (dt_area[None] > high) | extra[None]   # [A, E]
    true_pos = np.zeros((num_a, num_t, len(dts)), bool)
    false_pos = np.broadcast_to(~outside[:, None, :], true_pos.shape).copy()

    # Pairs with both detections and gt go through the greedy matching.
    pair = image * num_k + category
    starts = np.flatnonzero(np.r_[True, pair[1:] != pair[:-1]]) if len(dts) else np.zeros(0, int)
    ends = np.r_[starts[1:], len(dts)].astype(int)
    pairs, spans = [], []
    for begin, end in zip(starts, ends):
        key = int(image[begin]), int(category[begin])
        gts = truths.get(key)
        if not gts:
            continue
        crowd, gt_ignore = flags[key]
        gt_regions = ([list(g["bbox"]) for g in gts] if iou_type == "bbox"
                      else [coco_gt.annToRLE(g) for g in gts])
        ious = np.asarray(mask_util.iou(regions(begin, end), gt_regions,
                                        list(crowd.astype(np.uint8))),
                          np.float64).reshape(end - begin, len(gts))
        pairs.append((ious, gt_ignore, crowd))
        spans.append((begin, end, np.array([int(g["id"]) for g in gts], np.int64)))
    for chosen, (iou, gt_ignore, _), (begin, end, gt_ids) in zip(
            match_greedy(pairs, IOU_THRESHOLDS), pairs, spans):
        found = chosen >= 0                                          # [A, T, D]
        index = np.maximum(chosen, 0)
        on_ignored = found & np.take_along_axis(
            np.broadcast_to(gt_ignore[:, None, :], (num_a, num_t, gt_ids.size)),
            index, axis=-1)
        matched = found & (gt_ids[index] != 0) if zero_id_unmatched else found
        ignored = on_ignored | (~matched & outside[:, None, begin:end])
        true_pos[..., begin:end] = matched & ~ignored
        false_pos[..., begin:end] = ~matched & ~ignored

    return _accumulate(category, image, rank, scores, true_pos, false_pos, num_gt,
                       max_dets)


def _accumulate(category, image, rank, scores, true_pos, false_pos, num_gt, max_dets):
    """COCOeval.accumulate: precision [T, R, K, A, M] and recall [T, K, A,
    M], -1 where a category and area range have no non-ignored gt.

    Args: per detection [E]: category index, image index, rank in its
    (image, category), score; true_pos and false_pos bool [A, T, E];
    num_gt int [K, A] non-ignored gt; max_dets: the M axis.
    """
    num_k, num_a = num_gt.shape
    num_t, num_r, num_m = len(IOU_THRESHOLDS), len(RECALL_THRESHOLDS), len(max_dets)
    precision = -np.ones((num_t, num_r, num_k, num_a, num_m))
    recall = -np.ones((num_t, num_k, num_a, num_m))
    # COCOeval concatenates each category's detections image by image (each
    # image's in score order) and then sorts them by score, stable.
    order = np.lexsort((rank, image, -scores, category))
    category, rank = category[order], rank[order]
    true_pos, false_pos = true_pos[..., order], false_pos[..., order]
    bounds = np.searchsorted(category, np.arange(num_k + 1))
    for k in range(num_k):
        counted = num_gt[k] > 0                                      # [A]
        if not counted.any():
            continue
        span = slice(bounds[k], bounds[k + 1])
        for m, max_det in enumerate(max_dets):
            precision[:, :, k, counted, m] = 0.0
            recall[:, k, counted, m] = 0.0
            keep = np.flatnonzero(rank[span] < max_det) + bounds[k]
            if keep.size == 0:
                continue
            tp = np.cumsum(true_pos[..., keep], axis=-1).astype(float)   # [A, T, n]
            fp = np.cumsum(false_pos[..., keep], axis=-1).astype(float)
            pr = tp / (fp + tp + np.spacing(1))
            pr = np.maximum.accumulate(pr[..., ::-1], axis=-1)[..., ::-1]
            for a in np.flatnonzero(counted):
                rc = tp[a] / num_gt[k, a]                                # [T, n]
                recall[:, k, a, m] = rc[:, -1]
                for t in range(num_t):
                    at = np.searchsorted(rc[t], RECALL_THRESHOLDS, side="left")
                    inside = at < rc.shape[1]      # recall never reached: 0
                    precision[t, inside, k, a, m] = pr[a, t, at[inside]]
    return precision, recall


def _summarize(precision, recall):
    """The 12 numbers of COCOeval.summarize as {name: float}."""

    def mean(values):
        values = values[values > -1]
        return float(np.mean(values)) if values.size else -1.0

    t50 = int(np.where(IOU_THRESHOLDS == .5)[0][0])
    t75 = int(np.where(IOU_THRESHOLDS == .75)[0][0])
    last = len(MAX_DETS) - 1
    values = [mean(precision[..., 0, last]), mean(precision[t50, ..., 0, last]),
              mean(precision[t75, ..., 0, last])]
    values += [mean(precision[..., a, last]) for a in (1, 2, 3)]
    values += [mean(recall[..., 0, m]) for m in range(len(MAX_DETS))]
    values += [mean(recall[..., a, last]) for a in (1, 2, 3)]
    return dict(zip(STAT_NAMES, values))
