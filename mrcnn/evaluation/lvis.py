"""LVIS federated box and mask evaluation (Gupta et al., CVPR 2019).

LVIS annotates each image exhaustively for only some categories, so its AP
differs from COCO's in what counts as a false positive:

- each image keeps its `max_dets` (300) best-scored detections over all
  categories, not 100 per category;
- a detection of a category that the image neither contains (no gt) nor
  lists in its `neg_category_ids` is dropped: nobody checked whether it is
  there;
- an unmatched detection of a category in the image's
  `not_exhaustive_category_ids` is ignored: some of its instances were not
  annotated;
- APr, APc and APf average AP over the rare, common and frequent categories
  (the `frequency` field of each category: 'r', 'c', 'f'); AR is at 300
  detections per image; there is no crowd, a gt `ignore` flag is honoured.

The numbers follow the official `lvis` package (`LVISEval`), which pins an
old NumPy (it uses `np.float`): its matching and accumulation are COCOeval's
with the rules above, so they run in `cocoeval.score_results` (vectorized
over all image-category pairs) and only the filter and the summaries are
here. The tests check the code against pycocotools' COCOeval where the two
must agree and, given `MRCNN_LVIS_PYTHON`, against the `lvis` package itself.

The model's output goes through the same `detections_to_table` as COCO's, so
`LvisEvaluator` is a drop-in `CocoEvaluator`; `build_evaluator` picks one
from the annotation file.
"""

import numpy as np
from pycocotools.coco import COCO

from mrcnn.evaluation import coco as coco_eval
from mrcnn.evaluation import cocoeval
from mrcnn.evaluation.results import ResultsTable

# LVIS's limit on detections per image (its challenge rules and LVISEval).
MAX_DETECTIONS = 300
# Category `frequency` groups of APr, APc, APf: in < 10, 10..99, >= 100
# training images.
FREQUENCIES = ("r", "c", "f")
# COCOeval's IoU thresholds, which LVISEval shares.
IOU_THRESHOLDS = cocoeval.IOU_THRESHOLDS


def stat_names(max_dets=MAX_DETECTIONS):
    """The 13 names `LvisEvaluator.evaluate` reports, in LVISEval's order."""
    return ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf",
            f"AR@{max_dets}", f"ARs@{max_dets}", f"ARm@{max_dets}",
            f"ARl@{max_dets}")


def is_federated(coco_gt):
    """Whether a loaded annotation file is LVIS-style (its images carry
    `neg_category_ids`), so that `build_evaluator` picks LVIS metrics."""
    images = coco_gt.dataset.get("images", [])
    return bool(images) and all("neg_category_ids" in image for image in images)


def _top_per_image(image_id, score, max_dets):
    """bool [N]: the entries among each image's `max_dets` best-scored (ties
    at the cap keep the earlier entries), of int64 image ids [N] and float
    scores [N]."""
    order = np.lexsort((np.arange(len(image_id)), -score, image_id))
    keep = np.zeros(len(image_id), bool)
    keep[order[cocoeval.group_ranks(image_id[order]) < max_dets]] = True
    return keep


def federated_evaluate(coco_gt, results, iou_type, image_ids,
                       max_dets=MAX_DETECTIONS):
    """LVIS's federated AP and AR of `results` on `image_ids`.

    Args:
      coco_gt: a loaded `COCO` of an LVIS-style file: images with
        `neg_category_ids` (and optionally `not_exhaustive_category_ids`),
        annotations with `area` (and optionally `ignore`), categories with
        `frequency` ('r', 'c' or 'f'; a category without one is in no group).
      results: a `ResultsTable`, or a list of COCO results dicts
        (`image_id`, `category_id`, `score`, and `bbox` [x, y, w, h] or
        `segmentation` RLE).
      iou_type: 'bbox' or 'segm'. For 'segm' a detection's area is its mask
        area (for 'bbox' its box area).
      image_ids: the images to evaluate.
      max_dets: int, detections kept per image.

    Returns:
      (stats, per_category): stats {name: float} with the names of
      `stat_names(max_dets)`; per_category {category id: AP over IoUs .5:.95
      and all areas}. Both are -1 where no category has gt in range (and a
      category's AP is -1 without gt in the images).
    """
    if iou_type not in coco_eval.IOU_TYPES:
        raise ValueError(f"iou_type={iou_type!r}; expected one of {coco_eval.IOU_TYPES}")
    image_ids = sorted({int(i) for i in image_ids})
    category_ids = sorted(coco_gt.getCatIds())
    category_index = {c: k for k, c in enumerate(category_ids)}
    num_k = len(category_ids)
    # (image, category) pairs as image position * K + category position.
    listed, not_exhaustive = [], []
    for n, image_id in enumerate(image_ids):
        image = coco_gt.imgs[image_id]
        known = {int(a["category_id"]) for a in coco_gt.imgToAnns.get(image_id, [])}
        known |= {int(c) for c in image.get("neg_category_ids", [])}
        listed += [n * num_k + category_index[c] for c in known if c in category_index]
        not_exhaustive += [n * num_k + category_index[int(c)]
                           for c in image.get("not_exhaustive_category_ids", [])
                           if int(c) in category_index]
    # Dicts: their boxes and scores first; masks only of the entries kept.
    table = results if isinstance(results, ResultsTable) else ResultsTable.from_entries(results)
    keep = np.flatnonzero(np.isin(table.image_id, image_ids))
    keep = keep[_top_per_image(table.image_id[keep], table.score[keep], max_dets)]
    # The federated filter: only categories known present or absent.
    # (A category outside the file gets position K: `known` drops it.)
    image_id, category_id = table.image_id[keep], table.category_id[keep]
    pair = (np.searchsorted(image_ids, image_id) * num_k
            + np.searchsorted(category_ids, category_id))
    listed = np.isin(category_id, category_ids) & np.isin(pair, np.array(listed, np.int64))
    keep, pair = keep[listed], pair[listed]
    if isinstance(results, ResultsTable) or iou_type == "bbox":
        table = table.take(keep)
    else:
        table = ResultsTable.from_entries([results[i] for i in keep], coco_gt.annToRLE)
    # COCOeval's matching and accumulation at max_dets per image, without
    # crowds, with gt `ignore` flags, and unmatched detections of categories
    # not exhaustively annotated ignored.
    precision, recall = cocoeval.score_results(
        coco_gt, table, iou_type, image_ids, max_dets=(max_dets,), pair_cap=None,
        crowds=False, zero_id_unmatched=False,
        unmatched_ignored=np.isin(pair, np.array(not_exhaustive, np.int64)))
    precision, recall = precision[..., 0], recall[..., 0]   # [T, R, K, A], [T, K, A]
    num_a = precision.shape[-1]

    def mean(values):
        values = values[values > -1]
        return float(values.mean()) if values.size else -1.0

    frequency = np.array([coco_gt.cats[c].get("frequency") for c in category_ids])
    t50 = int(np.argmin(np.abs(IOU_THRESHOLDS - 0.5)))
    t75 = int(np.argmin(np.abs(IOU_THRESHOLDS - 0.75)))
    names = stat_names(max_dets)
    values = [mean(precision[..., 0]), mean(precision[t50, ..., 0]),
              mean(precision[t75, ..., 0]), mean(precision[..., 1]),
              mean(precision[..., 2]), mean(precision[..., 3])]
    values += [mean(precision[:, :, frequency == f, 0]) for f in FREQUENCIES]
    values += [mean(recall[..., a]) for a in range(num_a)]
    stats = dict(zip(names, values))
    per_category = {c: mean(precision[:, :, k, 0]) for c, k in category_index.items()}
    return stats, per_category


class LvisEvaluator(coco_eval.CocoEvaluator):
    """`CocoEvaluator` with LVIS's federated metrics (module docstring).

    Example:
      evaluator = LvisEvaluator('lvis_v1_val.json', class_to_category)
      for batch in dataset:
        evaluator.update(model(batch, training=False), batch)
      print(format_metrics(evaluator.evaluate()))
    """

    kind = "lvis"

    def __init__(self, annotations, class_to_category, max_dets=MAX_DETECTIONS,
                 **kwargs):
        """Args: those of `CocoEvaluator`, and `max_dets`, the detections kept
        per image (300 for LVIS)."""
        super().__init__(annotations, class_to_category, **kwargs)
        self._max_dets = int(max_dets)
        dataset = self._coco_gt.dataset
        unlisted = [im.get("id") for im in dataset.get("images", [])
                    if "neg_category_ids" not in im]
        if unlisted:
            raise ValueError(
                f"LVIS evaluation: images {unlisted[:5]} ({len(unlisted)} in all) list no "
                f"neg_category_ids, so no detection of an absent category could count "
                f"as a false positive: not an LVIS-style file (evaluate.evaluator = "
                f"'coco' scores it with COCO's metrics)")
        no_area = [a.get("id") for a in dataset.get("annotations", []) if "area" not in a]
        if no_area:
            raise ValueError(f"LVIS evaluation: annotations {no_area[:5]} "
                             f"({len(no_area)} in all) have no 'area'")

    def evaluate(self, iou_types=coco_eval.IOU_TYPES):
        """Federated evaluation over the seen images for each IoU type.

        Args:
          iou_types: subset of ('bbox', 'segm').

        Returns:
          {iou_type: {name: float}} with the 13 names of `stat_names()`
          (AP, AP50, AP75, APs, APm, APl, APr, APc, APf, AR@300, ARs@300,
          ARm@300, ARl@300); -1 where no category has gt in range.

        Raises:
          ValueError: as `CocoEvaluator.evaluate`.
        """
        iou_types = self._check_evaluate(iou_types)
        names = {c["id"]: c["name"] for c in self._coco_gt.loadCats(self._coco_gt.getCatIds())}
        metrics, self.per_category = {}, {}
        for iou_type in iou_types:
            stats, per_category = federated_evaluate(
                self._coco_gt, self._table(iou_type), iou_type, self._image_ids,
                self._max_dets)
            metrics[iou_type] = stats
            self.per_category[iou_type] = {names[c]: ap for c, ap in per_category.items()}
        return metrics


def build_evaluator(annotations, class_to_category, kind="auto", **kwargs):
    """The evaluator for an annotation file.

    Args:
      annotations: path of a COCO-format json, or a loaded `COCO`.
      class_to_category: dict[int, int], class 1..C -> category id.
      kind: 'coco', 'lvis', or 'auto': LVIS when every image of the file
        lists `neg_category_ids` (`is_federated`), else COCO; or
        'pycocotools': COCO metrics from pycocotools' COCOeval itself (the
        reference of 'coco', ~10x slower).
      **kwargs: passed to the evaluator (`include_masks`, `mask_threshold`,
        `verbose`; COCO's `include_keypoints`, `keypoint_oks_sigmas`).

    Returns:
      a `CocoEvaluator` or `LvisEvaluator`.
    """
    if kind not in ("auto", "coco", "lvis", "pycocotools"):
        raise ValueError(f"evaluator kind={kind!r}; expected 'auto', 'coco', 'lvis' "
                         f"or 'pycocotools'")
    if kind == "pycocotools":
        kwargs["engine"] = "pycocotools"
    if not isinstance(annotations, COCO):
        annotations = coco_eval.load_coco(annotations)
    if kind == "auto":
        kind = "lvis" if is_federated(annotations) else "coco"
    if kind == "lvis" and kwargs.get("include_keypoints"):
        raise ValueError("the LVIS evaluator scores no keypoints (LVIS has none)")
    if kind == "lvis":
        kwargs = {k: v for k, v in kwargs.items()
                  if k not in ("include_keypoints", "keypoint_oks_sigmas")}
    cls = LvisEvaluator if kind == "lvis" else coco_eval.CocoEvaluator
    return cls(annotations, class_to_category, **kwargs)
