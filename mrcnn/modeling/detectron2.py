"""A trained Detectron2 Mask R-CNN (`model_final_*.pkl`) into `MaskRCNN`, or a
RetinaNet into `RetinaNet`.

Detectron2's R50-FPN Mask R-CNN and ours are the same network (Detectron2
`GeneralizedRCNN` with `build_resnet_fpn_backbone`, `StandardRPNHead`,
`FastRCNNConvFCHead` + `FastRCNNOutputLayers`, `MaskRCNNConvUpsampleHead`);
what differs is layout and convention, converted here array by array:

  kernels       PyTorch `[out, in, kh, kw]` -> `[kh, kw, in, out]`;
                `ConvTranspose2d` `[in, out, kh, kw]` -> `[kh, kw, out, in]`;
                `Linear` `[out, in]` -> `[in, out]`.
  box fc1       its input is the RoI feature flattened `(C, 7, 7)`; ours
                flattens `(7, 7, C)`: the kernel's rows are reordered.
  deltas        Detectron2 `(dx, dy, dw, dh)`, ours `(dy, dx, dh, dw)`
                (both with weights (1, 1, 1, 1) in the RPN, (10, 10, 5, 5)
                in the box head, whose values read the same in both orders).
  classes       Detectron2's background score is the last of `C + 1`, ours
                the first; class-agnostic box or mask predictors (one set)
                are repeated per class for a class-specific head of ours,
                which computes the same.
  norms         a conv with a norm (`FPN.NORM`, the heads' `NORM`: Detectron2's GN
                models) has no bias; `.norm.{weight,bias}` are GroupNorm's
                gamma and beta, and a batch norm's running statistics load too.
  cascade       a Cascade Mask R-CNN's stages (`roi_heads.box_head.K.*`,
                `roi_heads.box_predictor.K.*`) go to `CascadeRoiHeads`'
                box heads in order.
  anchors       Detectron2's aspect ratios are heights over widths, ours
                widths over heights: the RPN's per-anchor channels are
                reordered to the model's `RpnHead.aspect_ratios`. Its anchors
                sit at cell corners (`ANCHOR_GENERATOR.OFFSET = 0.0`): the
                model needs `RpnHead.anchor_offset = 0.0` for the proposals
                the weights were trained for (logged otherwise).
  input         the model zoo's BGR pixels, mean (103.53, 116.28, 123.675),
                std 1 (or the file's `pixel_mean` / `pixel_std` buffers):
                the stem is flipped to RGB; with `MaskRCNN.pixel_mean =
                (123.675, 116.28, 103.53)` and `pixel_std = (1, 1, 1)` this
                is exact, otherwise the difference is folded into the stem
                (`adapt_stem_to_input`, exact away from the padded border).

  retinanet     `backbone.top_block.p6/p7` are `FPN`'s 'p6p7' convs;
                `head.cls_subnet.N` / `bbox_subnet.N` the towers (a conv
                every 2 modules, or 3 with a norm); `head.cls_score` rows
                `anchor * C + class` and `head.bbox_pred` rows `anchor * 4 +
                coordinate` are reordered to our anchors and (dy, dx, dh, dw).

`gin/detectron2_r50_fpn.gin` sets the model up this way. One difference is
left: our RoIAlign samples 2 x 2 points per bin (`RoiHeads.sampling_ratio`),
Detectron2's ROIAlignV2 `ceil(roi / bin)` (its `POOLER_SAMPLING_RATIO = 0`).
"""

import re

import gin
import numpy as np
import tensorflow as tf
from absl import logging

from mrcnn.modeling import resnet as resnet_lib

# Detectron2's defaults for what a model_final file does not say.
_D2_ASPECT_RATIOS = (0.5, 1.0, 2.0)   # ANCHOR_GENERATOR.ASPECT_RATIOS, h / w
# Keys of a Detectron2 state dict that are no weights of ours.
# A federated-loss model's fed_loss_cls_weights is a fact of its training
# data, which the trainer counts again (RoiHeads.class_image_counts).
_NOT_WEIGHTS = re.compile(r"(^|\.)(num_batches_tracked|pixel_mean|pixel_std"
                          r"|fed_loss_cls_weights)$"
                          r"|^(proposal_generator\.)?anchor_generator\.")
# Our norm variables (those a norm layer has) and Detectron2's names for them.
_NORM_ARRAYS = (("gamma", "weight"), ("beta", "bias"), ("moving_mean", "running_mean"),
                ("moving_variance", "running_var"))
# (dx, dy, dw, dh) -> (dy, dx, dh, dw)
_XY_TO_YX = np.array([1, 0, 3, 2])


def _is_retinanet(model):
    return hasattr(model, "head")


def _build(model):
    last = (model.head if _is_retinanet(model) else model.roi_heads.box_head).class_logits
    if not last.built:
        height, width = model.build_canvas((64, 64))
        model({"images": tf.zeros([1, height, width, 3], tf.uint8),
               "image_info": tf.constant([[height, width, height, width, 1.0]], tf.float32)},
              training=False)


def _conv(array):
    return np.transpose(array, (2, 3, 1, 0))   # [out, in, kh, kw] -> HWIO


class _Plan(list):
    """(variable, array) pairs, shape-checked when added, assigned at the end,
    so that a file that fails a check leaves the heads as they were."""

    def add(self, variable, array, source):
        array = np.asarray(array)
        if tuple(array.shape) != tuple(variable.shape):
            raise ValueError(
                f"Detectron2 weights: {variable.path} has shape {tuple(variable.shape)} "
                f"but {source} converts to {tuple(array.shape)}")
        self.append((variable, array))

    def assign(self):
        for variable, array in self:
            variable.assign(array.astype(variable.dtype))


def _anchor_order(model_ratios, source_ratios):
    """For each of our anchors (w / h), the index of Detectron2's (h / w) one."""
    order = []
    for ratio in model_ratios:
        match = [j for j, r in enumerate(source_ratios) if abs(r * ratio - 1.0) < 1e-6]
        if not match:
            raise ValueError(
                f"Detectron2 weights: RpnHead.aspect_ratios {tuple(model_ratios)} "
                f"(width / height) are not the file's ANCHOR_GENERATOR.ASPECT_RATIOS "
                f"{tuple(source_ratios)} (height / width) inverted")
        order.append(match[0])
    return np.array(order)


@gin.configurable
def load_detectron2_weights(model, *, path=gin.REQUIRED, allow_class_mismatch=False,
                            source_aspect_ratios=_D2_ASPECT_RATIOS,
                            source_format="BGR", source_pixel_mean=None,
                            source_pixel_std=None):
    """Loads a Detectron2 R50-FPN Mask R-CNN (Faster, Cascade, Keypoint R-CNN) or
    RetinaNet weights file into `model`.

    Every variable of the model is assigned, and every weight array of the
    file is used, or ValueError names the one that is not. As `train.init_fn`
    it fine-tunes from a Detectron2 model; `bin/import_detectron2` writes it
    as a checkpoint that `bin/eval`, `bin/predict` and `bin/export` read.

    Args:
      model: a `MaskRCNN` with a width-64 ResNet (built here if it is not
        yet) of the file's norm: a batch-norm variant, or 'gn' with `FPN.norm`,
        the heads' `norm` and `BoxHead.num_conv` as the file's (its
        mask_rcnn_R_50_FPN_3x_gn: gin/detectron2_r50_fpn_gn.gin);
        `ResNet.stride_in_1x1 = True` for the model zoo's BN R50s.
        Without a mask head (`RoiHeads.mask_head = None`) it takes a Faster
        R-CNN file, or a Mask R-CNN file whose mask head it leaves (logged).
        A `RetinaNet` (FPN 'p6p7' top block from C5, towers of the file's
        depth and `RetinaNetHead.norm`) takes Detectron2's RetinaNet files
        (gin/detectron2_retinanet_r50_fpn.gin).
      path: str, the `.pkl` (`{'model': {name: array}}`, Detectron2's
        `model_final_*.pkl`; see `load_detectron2_resnet_weights` for what
        is read and refused).
      allow_class_mismatch: bool; when the file has another number of
        classes than the model, False raises, True keeps the model's
        class-specific layers (box scores, box deltas, mask predictor) as
        initialised and loads the rest (fine-tuning on other classes).
      source_aspect_ratios: the file's ANCHOR_GENERATOR.ASPECT_RATIOS
        (heights over widths, in its order).
      source_format, source_pixel_mean, source_pixel_std: its INPUT.FORMAT,
        MODEL.PIXEL_MEAN and MODEL.PIXEL_STD (in that channel order); the
        means default to the file's `pixel_mean` / `pixel_std` arrays if
        it has them, else to Detectron2's defaults (103.53, 116.28,
        123.675) and (1, 1, 1).

    Returns:
      list of str, the model variables left as initialised (empty unless
      `allow_class_mismatch` skipped the class layers).

    Raises:
      FileNotFoundError: no such file. ValueError: a missing, unused or
      mis-shaped array, or a class count mismatch not allowed.
    """
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"{path}: Detectron2 weights not found "
                                f"(load_detectron2_weights.path)")
    _build(model)
    arrays, author = resnet_lib._read_detectron2_pickle(path)
    used, plan = set(), _Plan()

    def take(name):
        if name not in arrays:
            raise ValueError(f"Detectron2 weights: {path} has no array {name!r}")
        used.add(name)
        return np.asarray(arrays[name], np.float64)

    # The backbone, by the ResNet loader (which also checks its arrays).
    if "backbone.bottom_up.stem.conv1.weight" not in arrays:
        raise ValueError(
            f"{path}: not a Detectron2 R-CNN with an FPN backbone (no "
            f"'backbone.bottom_up.stem.conv1.weight'); its first keys: "
            f"{sorted(arrays)[:5]}")
    used.update(k for k in arrays if k.startswith("backbone.bottom_up."))

    def conv_norm(conv, norm, theirs):
        """A conv and its norm: Detectron2's `Conv2d(bias=not norm, norm=...)`."""
        plan.add(conv.kernel, _conv(take(f"{theirs}.weight")), f"{theirs}.weight")
        if norm is None:
            plan.add(conv.bias, take(f"{theirs}.bias"), f"{theirs}.bias")
            return
        for ours, name in _NORM_ARRAYS:
            if hasattr(norm, ours):
                plan.add(getattr(norm, ours), take(f"{theirs}.norm.{name}"),
                         f"{theirs}.norm.{name}")

    fpn = model.fpn
    for i, level in enumerate(range(fpn.min_level, fpn.backbone_max_level + 1)):
        conv_norm(fpn.lateral[i], fpn.lateral_norms[i], f"backbone.fpn_lateral{level}")
        conv_norm(fpn.output_convs[i], fpn.output_norms[i], f"backbone.fpn_output{level}")

    if _is_retinanet(model):
        skipped = _load_retinanet(model, take, plan, path, allow_class_mismatch,
                                  source_aspect_ratios)
    else:
        skipped = _load_rcnn_heads(model, arrays, used, take, plan, path,
                                   allow_class_mismatch, source_aspect_ratios, conv_norm)

    unused = sorted(k for k in arrays if k not in used and not _NOT_WEIGHTS.search(k))
    if unused:
        raise ValueError(
            f"Detectron2 weights: arrays of {path} with no place in this "
            f"{type(model).__name__} (another architecture?), {len(unused)}: {unused[:10]}")
    # The ResNet loader checks its own arrays, then assigns.
    resnet_lib._check_loadable(model.backbone, group_norm=True)
    resnet_lib._load_detectron2_arrays(model.backbone, arrays, author, path)
    plan.assign()

    source_mean = (tuple(arrays["pixel_mean"].reshape(-1)) if source_pixel_mean is None
                   and "pixel_mean" in arrays else source_pixel_mean)
    source_std = (tuple(arrays["pixel_std"].reshape(-1)) if source_pixel_std is None
                  and "pixel_std" in arrays else source_pixel_std)
    default = resnet_lib._SOURCES["msra"]
    source = resnet_lib.SourceInput(
        source_format, tuple(float(v) for v in (source_mean or default.pixel_mean)),
        tuple(float(v) for v in (source_std or default.pixel_std)))
    rgb = (lambda v: tuple(v[::-1])) if source_format.upper() == "BGR" else tuple
    if (not np.allclose(rgb(source.pixel_mean), model.pixel_mean)
            or not np.allclose(rgb(source.pixel_std), model.pixel_std)):
        logging.warning(
            "Detectron2 weights %s: the network normalised its input by mean %s, std %s "
            "(%s); this model by %s, %s (RGB). The difference is folded into the stem, "
            "which is exact except near the padded border; set %s.pixel_mean = %s "
            "and pixel_std = %s for the trained network.", path,
            source.pixel_mean, source.pixel_std, source_format, model.pixel_mean,
            model.pixel_std, type(model).__name__, rgb(source.pixel_mean),
            rgb(source.pixel_std))
    resnet_lib.adapt_stem_to_input(model.backbone, source, model.pixel_mean,
                                   model.pixel_std)
    logging.info("Loaded Detectron2 weights %s (%d arrays)%s", path, len(used),
                 f"; kept as initialised: {skipped}" if skipped else "")
    return skipped


def _load_rcnn_heads(model, arrays, used, take, plan, path, allow_class_mismatch,
                     source_aspect_ratios, conv_norm):
    """A Mask R-CNN's RPN and RoI heads (box, mask, keypoint); the variables
    left as initialised."""
    rpn = model.rpn_head
    name = "proposal_generator.rpn_head"
    order = _anchor_order(rpn.aspect_ratios, source_aspect_ratios)
    # StandardRPNHead: one conv is `conv`, more are `conv.conv0`, `conv.conv1`, ...
    for k, conv in enumerate(rpn.convs):
        conv_norm(conv, None, f"{name}.conv" + (f".conv{k}" if len(rpn.convs) > 1 else ""))
    w, b = take(f"{name}.objectness_logits.weight"), take(f"{name}.objectness_logits.bias")
    plan.add(rpn.objectness.kernel, _conv(w[order]), f"{name}.objectness_logits.weight")
    plan.add(rpn.objectness.bias, b[order], f"{name}.objectness_logits.bias")
    w, b = take(f"{name}.anchor_deltas.weight"), take(f"{name}.anchor_deltas.bias")
    deltas = (order[:, None] * 4 + _XY_TO_YX[None, :]).reshape(-1)
    if w.shape[0] != deltas.size:
        raise ValueError(f"Detectron2 weights: {name}.anchor_deltas has {w.shape[0]} "
                         f"outputs, the model's RPN {deltas.size}")
    plan.add(rpn.deltas.kernel, _conv(w[deltas]), f"{name}.anchor_deltas.weight")
    plan.add(rpn.deltas.bias, b[deltas], f"{name}.anchor_deltas.bias")
    if rpn.anchor_offset != 0.0:
        logging.warning(
            "Detectron2 weights %s: its RPN was trained with anchors at cell corners "
            "(ANCHOR_GENERATOR.OFFSET = 0.0); this model's are at offset %s, which moves "
            "each proposal by that many strides. Set RpnHead.anchor_offset = 0.0 for "
            "the trained network.", path, rpn.anchor_offset)

    pool = model.roi_heads.box_pool_size
    for box_head, head_name, _ in _box_stages(model):
        for i, (conv, norm) in enumerate(zip(box_head.convs, box_head.conv_norms)):
            conv_norm(conv, norm, f"{head_name}.conv{i + 1}")
        for i, fc in enumerate(box_head.fcs):
            theirs = f"{head_name}.fc{i + 1}"
            w = take(f"{theirs}.weight")   # [out, in]
            if i == 0 and w.shape[1] % (pool * pool) == 0:   # inputs (c, y, x) theirs, (y, x, c) ours
                w = w.reshape(w.shape[0], -1, pool, pool).transpose(0, 2, 3, 1).reshape(
                    w.shape[0], -1)
            plan.add(fc.kernel, w.T, f"{theirs}.weight")
            plan.add(fc.bias, take(f"{theirs}.bias"), f"{theirs}.bias")

    mask_head = model.roi_heads.mask_head   # None: Faster R-CNN, MASK_ON False
    for i, (conv, norm) in enumerate(zip(mask_head.convs, mask_head.conv_norms)
                                     if mask_head is not None else ()):
        conv_norm(conv, norm, f"roi_heads.mask_head.mask_fcn{i + 1}")
    if mask_head is None:
        left = [k for k in arrays if k.startswith("roi_heads.mask_head.")]
        used.update(left)
        if left:
            logging.info("Detectron2 weights %s: the model has no mask head; the file's "
                         "%d mask head arrays are left", path, len(left))
    else:
        w = take("roi_heads.mask_head.deconv.weight")   # [in, out, kh, kw]
        plan.add(mask_head.deconv.kernel, np.transpose(w, (2, 3, 1, 0)),
                 "roi_heads.mask_head.deconv.weight")
        plan.add(mask_head.deconv.bias, take("roi_heads.mask_head.deconv.bias"),
                 "roi_heads.mask_head.deconv.bias")

    keypoint_head = model.roi_heads.keypoint_head   # KEYPOINT_ON
    name = "roi_heads.keypoint_head"
    if keypoint_head is None:
        left = [k for k in arrays if k.startswith(f"{name}.")]
        used.update(left)
        if left:
            logging.info("Detectron2 weights %s: the model has no keypoint head; the "
                         "file's %d keypoint head arrays are left", path, len(left))
    else:
        # KRCNNConvDeconvUpsampleHead: conv_fcn1.. then score_lowres, a
        # ConvTranspose2d [in, K, 4, 4] whose padding the head reproduces.
        for i, conv in enumerate(keypoint_head.convs):
            conv_norm(conv, None, f"{name}.conv_fcn{i + 1}")
        w = take(f"{name}.score_lowres.weight")
        if w.shape[1] != keypoint_head.num_keypoints:
            raise ValueError(
                f"Detectron2 weights: {path} predicts {w.shape[1]} keypoints, the model's "
                f"keypoint head {keypoint_head.num_keypoints} (KeypointHead.num_keypoints)")
        plan.add(keypoint_head.deconv.kernel, np.transpose(w, (2, 3, 1, 0)),
                 f"{name}.score_lowres.weight")
        plan.add(keypoint_head.deconv.bias, take(f"{name}.score_lowres.bias"),
                 f"{name}.score_lowres.bias")

    return _load_class_layers(model, take, plan, path, allow_class_mismatch)


def _load_retinanet(model, take, plan, path, allow_class_mismatch, source_aspect_ratios):
    """RetinaNet's P6 / P7 convs and head (Detectron2 `LastLevelP6P7`,
    `RetinaNetHead`); the variables left as initialised."""
    fpn, head = model.fpn, model.head
    for conv, level in zip(fpn.top_convs, range(fpn.backbone_max_level + 1, fpn.max_level + 1)):
        theirs = f"backbone.top_block.p{level}"
        plan.add(conv.kernel, _conv(take(f"{theirs}.weight")), f"{theirs}.weight")
        plan.add(conv.bias, take(f"{theirs}.bias"), f"{theirs}.bias")
    # Subnets are Sequential([conv, (norm,) relu] * n): conv k at k * step.
    step = 3 if head.norm else 2
    for tower, convs, norms in (("cls_subnet", head.class_convs, head.class_norms),
                                ("bbox_subnet", head.box_convs, head.box_norms)):
        for k, (conv, norm) in enumerate(zip(convs, norms)):
            theirs = f"head.{tower}.{k * step}"
            plan.add(conv.kernel, _conv(take(f"{theirs}.weight")), f"{theirs}.weight")
            plan.add(conv.bias, take(f"{theirs}.bias"), f"{theirs}.bias")
            if norm is not None:   # GroupNorm: gamma, beta
                theirs = f"head.{tower}.{k * step + 1}"
                plan.add(norm.gamma, take(f"{theirs}.weight"), f"{theirs}.weight")
                plan.add(norm.beta, take(f"{theirs}.bias"), f"{theirs}.bias")
    # Anchors: theirs sizes-major then aspect ratios (h / w), as ours
    # (scales, then w / h): reorder within each scale.
    ratios = _anchor_order(model.aspect_ratios, source_aspect_ratios)
    anchors = (np.arange(model.scales_per_octave)[:, None] * len(ratios)
               + ratios[None, :]).reshape(-1)   # ours -> theirs
    classes = head.num_classes
    w, b = take("head.bbox_pred.weight"), take("head.bbox_pred.bias")
    if w.shape[0] != 4 * anchors.size:
        raise ValueError(f"Detectron2 weights: head.bbox_pred has {w.shape[0]} outputs, "
                         f"the model's head {4 * anchors.size} (4 per anchor)")
    order = (anchors[:, None] * 4 + _XY_TO_YX[None, :]).reshape(-1)
    plan.add(head.box_deltas.kernel, _conv(w[order]), "head.bbox_pred.weight")
    plan.add(head.box_deltas.bias, b[order], "head.bbox_pred.bias")
    w, b = take("head.cls_score.weight"), take("head.cls_score.bias")   # [A C, ...]
    file_classes = w.shape[0] // anchors.size
    if file_classes != classes:
        if not allow_class_mismatch:
            raise ValueError(
                f"Detectron2 weights: {path} has {file_classes} classes, the model "
                f"{classes} (RetinaNetHead.num_classes); set "
                f"load_detectron2_weights.allow_class_mismatch = True to fine-tune on "
                f"other classes from its other layers")
        skipped = [v.path for v in head.class_logits.weights]
        logging.warning("Detectron2 weights %s: %d classes, the model %d: its class "
                        "layer is not loaded (%s)", path, file_classes, classes, skipped)
        return skipped
    order = (anchors[:, None] * classes + np.arange(classes)[None, :]).reshape(-1)
    plan.add(head.class_logits.kernel, _conv(w[order]), "head.cls_score.weight")
    plan.add(head.class_logits.bias, b[order], "head.cls_score.bias")
    if model.anchor_offset != 0.0:
        logging.warning(
            "Detectron2 weights %s: its RetinaNet was trained with anchors at cell "
            "corners (ANCHOR_GENERATOR.OFFSET = 0.0); this model's are at offset %s. Set "
            "RetinaNet.anchor_offset = 0.0 for the trained network.", path,
            model.anchor_offset)
    return []


def _box_stages(model):
    """(box head, Detectron2's box head prefix, its box predictor prefix) per
    stage: one stage unless the model is a cascade."""
    if not hasattr(model.roi_heads, "box_heads"):
        return [(model.roi_heads.box_head, "roi_heads.box_head", "roi_heads.box_predictor")]
    return [(head, f"roi_heads.box_head.{k}", f"roi_heads.box_predictor.{k}")
            for k, head in enumerate(model.roi_heads.box_heads)]


def _load_class_layers(model, take, plan, path, allow_class_mismatch):
    """Box scores, box deltas and mask predictor; the variables skipped."""
    stages = [(head, predictor) for head, _, predictor in _box_stages(model)]
    mask_head = model.roi_heads.mask_head
    classes = stages[0][0].num_classes
    score_w = [take(f"{p}.cls_score.weight") for _, p in stages]   # [C' + 1, fc]
    file_classes = score_w[0].shape[0] - 1
    names = [f"{p}.{n}" for _, p in stages
             for n in ("bbox_pred.weight", "bbox_pred.bias", "cls_score.bias")]
    # A class-agnostic mask predictor holds no class: it loads whatever the
    # class count, from a file whose predictor is class-agnostic too.
    agnostic_masks = (mask_head is not None and mask_head.class_agnostic
                      and take("roi_heads.mask_head.predictor.weight").shape[0] == 1)
    if mask_head is not None and not agnostic_masks:
        names += ["roi_heads.mask_head.predictor.weight",
                  "roi_heads.mask_head.predictor.bias"]
    if file_classes != classes:
        if not allow_class_mismatch:
            raise ValueError(
                f"Detectron2 weights: {path} has {file_classes} classes, the model "
                f"{classes} (BoxHead/MaskHead.num_classes); set "
                f"load_detectron2_weights.allow_class_mismatch = True to fine-tune on "
                f"other classes from its other layers")
        for n in names:
            take(n)
        layers = [layer for head, _ in stages
                  for layer in (head.class_logits, head.box_deltas)] + (
            [mask_head.predictor] if mask_head is not None and not agnostic_masks else [])
        skipped = [v.path for layer in layers for v in layer.weights]
        logging.warning("Detectron2 weights %s: %d classes, the model %d: its class "
                        "layers are not loaded (%s)", path, file_classes, classes, skipped)
        if agnostic_masks:
            _load_mask_predictor(mask_head, take, plan, classes)
        return skipped
    # Background last in theirs, first in ours.
    score_order = np.concatenate([[classes], np.arange(classes)])
    for (box_head, prefix), scores in zip(stages, score_w):
        plan.add(box_head.class_logits.kernel, scores[score_order].T,
                 f"{prefix}.cls_score.weight")
        plan.add(box_head.class_logits.bias,
                 take(f"{prefix}.cls_score.bias")[score_order], f"{prefix}.cls_score.bias")
        name = f"{prefix}.bbox_pred"
        w, b = take(f"{name}.weight"), take(f"{name}.bias")   # [4 C or 4, fc]
        columns = box_head.num_box_classes
        if w.shape[0] == 4 and columns > 1:   # CLS_AGNOSTIC_BBOX_REG into per-class
            w, b = np.tile(w, (columns, 1)), np.tile(b, columns)
        order = (np.arange(columns)[:, None] * 4 + _XY_TO_YX[None, :]).reshape(-1)
        if w.shape[0] != order.size:
            raise ValueError(
                f"Detectron2 weights: {name} has {w.shape[0]} outputs, the model's "
                f"{'class-agnostic ' if columns == 1 else ''}box head {order.size}")
        plan.add(box_head.box_deltas.kernel, w[order].T, f"{name}.weight")
        plan.add(box_head.box_deltas.bias, b[order], f"{name}.bias")
    if mask_head is not None:
        _load_mask_predictor(mask_head, take, plan, classes)
    return []


def _load_mask_predictor(mask_head, take, plan, classes):
    name = "roi_heads.mask_head.predictor"
    w, b = take(f"{name}.weight"), take(f"{name}.bias")   # [C or 1, F, 1, 1]
    if w.shape[0] == 1 and not mask_head.class_agnostic:   # CLS_AGNOSTIC_MASK
        w, b = np.tile(w, (classes, 1, 1, 1)), np.tile(b, classes)
    if w.shape[0] != mask_head.num_masks:
        raise ValueError(
            f"Detectron2 weights: {name} has {w.shape[0]} outputs, the model's "
            f"{'class-agnostic ' if mask_head.class_agnostic else ''}mask head "
            f"{mask_head.num_masks} (MaskHead.class_agnostic)")
    plan.add(mask_head.predictor.kernel, _conv(w), f"{name}.weight")
    plan.add(mask_head.predictor.bias, b, f"{name}.bias")


@gin.configurable(denylist=["weights", "model_dir"])
def import_detectron2(weights, model_dir, *, model_fn=gin.REQUIRED):
    """Writes a Detectron2 model's weights as a checkpoint (step 0) in `model_dir`.

    `bin/eval`, `bin/predict` and `bin/export` then read `model_dir` as they
    read a training run's. To fine-tune instead, set `train.init_fn =
    @load_detectron2_weights` (a training run resumes only from its own
    checkpoints, which hold the optimizer too).

    Args:
      weights: str, the Detectron2 `.pkl` (see `load_detectron2_weights`,
        whose gin bindings apply).
      model_dir: str, a directory without a checkpoint.
      model_fn: () -> MaskRCNN.

    Returns:
      (checkpoint path, the variables left as initialised).

    Raises:
      ValueError: `model_dir` already holds a checkpoint; see the loader.
    """
    latest = tf.train.latest_checkpoint(model_dir)
    if latest:
        raise ValueError(f"{model_dir} already holds a checkpoint ({latest}); import "
                         f"into a new directory")
    model = model_fn()
    skipped = load_detectron2_weights(model, path=weights)
    checkpoint = tf.train.Checkpoint(model=model, step=tf.Variable(0, dtype=tf.int64))
    path = tf.train.CheckpointManager(checkpoint, model_dir, max_to_keep=1).save(
        checkpoint_number=0)
    logging.info("Wrote %s from %s", path, weights)
    return path, skipped
