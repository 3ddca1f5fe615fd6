"""Random Detectron2 Mask R-CNN and RetinaNet state dicts, in Detectron2's
names and layouts."""

import pickle

import numpy as np
import tensorflow as tf

from mrcnn.modeling import resnet as resnet_lib
from mrcnn.modeling.fpn import FPN
from mrcnn.modeling.mask_rcnn import MaskRCNN
from mrcnn.modeling.retinanet import RetinaNet, RetinaNetHead
from mrcnn.modeling.roi_heads import (CASCADE_BOX_WEIGHTS, CASCADE_IOUS, BoxHead,
                                      CascadeRoiHeads, KeypointHead, MaskHead, RoiHeads)
from mrcnn.modeling.rpn import RpnHead


def small_model(num_classes=3, depth=18, channels=32, fc_dim=64, mask_channels=16,
                mask_convs=2, masks=True, cascade_stages=0, norm=None, heads_kwargs=None,
                class_agnostic_masks=False, keypoints=0, **rpn_kwargs):
    """A MaskRCNN with small heads (no mask head unless `masks`; a cascade of
    class-agnostic box heads with `cascade_stages`). `norm` ('gn', 'bn',
    'sync_bn'): that norm in the backbone, FPN and heads and a 2conv1fc box
    head, as Detectron2's GN models and LSJ baselines. `heads_kwargs`: more
    `RoiHeads` arguments; `class_agnostic_masks`: `MaskHead.class_agnostic`;
    `keypoints` K > 0: a `KeypointHead` of K keypoints (2 convs of 16)."""
    if keypoints:
        heads_kwargs = dict(heads_kwargs or {}, keypoint_head=KeypointHead(
            num_keypoints=keypoints, channels=16, num_convs=2))
    box_kwargs = dict(num_conv=2, num_fc=1, conv_dim=channels, norm=norm) if norm else {}
    mask_head = (MaskHead(num_classes=num_classes, channels=mask_channels,
                          num_convs=mask_convs, norm=norm,
                          class_agnostic=class_agnostic_masks) if masks else None)
    if cascade_stages:
        roi_heads = CascadeRoiHeads(
            box_heads=[BoxHead(num_classes=num_classes, fc_dim=fc_dim, class_agnostic=True)
                       for _ in range(cascade_stages)],
            stage_ious=CASCADE_IOUS[:cascade_stages],
            stage_box_weights=CASCADE_BOX_WEIGHTS[:cascade_stages],
            mask_head=mask_head, max_detections=10)
    else:
        roi_heads = RoiHeads(box_head=BoxHead(num_classes=num_classes, fc_dim=fc_dim,
                                              **box_kwargs),
                             mask_head=mask_head, max_detections=10, **(heads_kwargs or {}))
    model = MaskRCNN(
        backbone=resnet_lib.ResNet(depth=depth, norm=norm or "frozen_bn"),
        fpn=FPN(channels=channels, norm=norm),
        rpn_head=RpnHead(channels=channels, pre_nms_topk_test=50,
                         post_nms_topk_test=20, **rpn_kwargs),
        roi_heads=roi_heads)
    model({"images": tf.zeros([1, 64, 64, 3], tf.uint8),
           "image_info": tf.constant([[64.0, 64.0, 64.0, 64.0, 1.0]])}, training=False)
    return model


def small_retinanet(num_classes=3, depth=18, channels=32, num_convs=2, norm=None,
                    **kwargs):
    """A RetinaNet with small towers (`norm` 'gn': GN in them), built at 128 x 128."""
    model = RetinaNet(
        backbone=resnet_lib.ResNet(depth=depth, norm="frozen_bn"),
        fpn=FPN(channels=channels, min_level=3, max_level=7, top_block="p6p7"),
        head=RetinaNetHead(num_classes=num_classes, channels=channels, num_convs=num_convs,
                           norm=norm),
        topk_candidates=50, max_detections=10, **kwargs)
    model({"images": tf.zeros([1, 128, 128, 3], tf.uint8),
           "image_info": tf.constant([[128.0, 128.0, 128.0, 128.0, 1.0]])}, training=False)
    return model


def _unit_name(stage, block, index):
    if stage == 1:
        return "stem.conv1"
    return f"res{stage}.{block}." + ("shortcut" if index == 0 else f"conv{index}")


def random_state(model, seed=0, num_classes=None):
    """{name: float32 array} of a Detectron2 Mask R-CNN with `model`'s sizes.

    Shapes follow Detectron2 (OIHW kernels, Linear [out, in], background
    score last, 4 C box deltas, C mask predictors); `num_classes` overrides
    the model's C.
    """
    rng = np.random.default_rng(seed)
    out = {}

    def put(name, *shape, scale=None):
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        s = scale if scale is not None else 1.0 / np.sqrt(fan_in)
        out[name] = rng.normal(0.0, s, shape).astype(np.float32)

    def norm(unit, channels, statistics=True):
        out[f"{unit}.norm.weight"] = rng.uniform(0.3, 0.8, channels).astype(np.float32)
        out[f"{unit}.norm.bias"] = rng.uniform(-0.1, 0.1, channels).astype(np.float32)
        if statistics:
            out[f"{unit}.norm.running_mean"] = rng.uniform(
                -0.1, 0.1, channels).astype(np.float32)
            out[f"{unit}.norm.running_var"] = rng.uniform(
                0.5, 2.0, channels).astype(np.float32)

    def conv(unit, cout, cin, k, norm_name):
        put(f"{unit}.weight", cout, cin, k, k)
        if norm_name is None:
            put(f"{unit}.bias", cout, scale=0.1)
        else:   # Detectron2: Conv2d(bias=not norm); GN has no statistics
            norm(unit, cout, statistics=norm_name != "gn")

    gn = model.backbone.norm == "gn"
    for conv_layer, _, stage, block, index in resnet_lib._named_units(model.backbone):
        unit = "backbone.bottom_up." + _unit_name(stage, block, index)
        kh, kw, cin, cout = conv_layer.conv.kernel.shape
        put(f"{unit}.weight", cout, cin, kh, kw)
        norm(unit, cout, statistics=not gn)
    f = model.fpn.channels
    inputs = [int(layer.kernel.shape[2]) for layer in model.fpn.lateral]
    for level, cin in zip(range(model.fpn.min_level, 6), inputs):
        conv(f"backbone.fpn_lateral{level}", f, cin, 1, model.fpn.norm)
        conv(f"backbone.fpn_output{level}", f, f, 3, model.fpn.norm)
    if isinstance(model, RetinaNet):
        _retinanet_state(model, put, num_classes)
        return out
    a = model.rpn_head.num_anchors
    rpn = "proposal_generator.rpn_head"
    convs = model.rpn_head.num_convs
    for k in range(convs):
        conv(f"{rpn}.conv" + (f".conv{k}" if convs > 1 else ""), f, f, 3, None)
    put(f"{rpn}.objectness_logits.weight", a, f, 1, 1)
    put(f"{rpn}.objectness_logits.bias", a, scale=0.1)
    put(f"{rpn}.anchor_deltas.weight", 4 * a, f, 1, 1)
    put(f"{rpn}.anchor_deltas.bias", 4 * a, scale=0.1)
    box = model.roi_heads.box_head
    c = box.num_classes if num_classes is None else num_classes
    pool = model.roi_heads.box_pool_size
    stages = getattr(model.roi_heads, "box_heads", None)
    suffixes = [""] if stages is None else [f".{k}" for k in range(len(stages))]
    for suffix in suffixes:   # Detectron2's cascade names its stages 0, 1, 2
        cin = f
        for i in range(box.num_conv):
            conv(f"roi_heads.box_head{suffix}.conv{i + 1}", box.conv_dim, cin, 3, box.norm)
            cin = box.conv_dim
        width = cin * pool * pool
        for i in range(box.num_fc):
            put(f"roi_heads.box_head{suffix}.fc{i + 1}.weight", box.fc_dim, width)
            put(f"roi_heads.box_head{suffix}.fc{i + 1}.bias", box.fc_dim, scale=0.1)
            width = box.fc_dim
        deltas = 4 if box.class_agnostic else 4 * c
        put(f"roi_heads.box_predictor{suffix}.cls_score.weight", c + 1, width)
        put(f"roi_heads.box_predictor{suffix}.cls_score.bias", c + 1, scale=0.1)
        put(f"roi_heads.box_predictor{suffix}.bbox_pred.weight", deltas, width)
        put(f"roi_heads.box_predictor{suffix}.bbox_pred.bias", deltas, scale=0.1)
    keypoint = model.roi_heads.keypoint_head
    if keypoint is not None:
        cin = f
        for i in range(keypoint.num_convs):
            conv(f"roi_heads.keypoint_head.conv_fcn{i + 1}", keypoint.channels, cin, 3, None)
            cin = keypoint.channels
        put("roi_heads.keypoint_head.score_lowres.weight", cin, keypoint.num_keypoints, 4, 4)
        put("roi_heads.keypoint_head.score_lowres.bias", keypoint.num_keypoints, scale=0.1)
    mask = model.roi_heads.mask_head
    if mask is None:
        return out
    cin = f
    for i in range(mask.num_convs):
        conv(f"roi_heads.mask_head.mask_fcn{i + 1}", mask.channels, cin, 3, mask.norm)
        cin = mask.channels
    put("roi_heads.mask_head.deconv.weight", cin, mask.channels, 2, 2)
    put("roi_heads.mask_head.deconv.bias", mask.channels, scale=0.1)
    masks = 1 if mask.class_agnostic else c   # CLS_AGNOSTIC_MASK: one
    put("roi_heads.mask_head.predictor.weight", masks, mask.channels, 1, 1)
    put("roi_heads.mask_head.predictor.bias", masks, scale=0.1)
    return out


def _retinanet_state(model, put, num_classes):
    """Detectron2's `LastLevelP6P7` (from C5) and `RetinaNetHead` arrays."""
    f, head = model.fpn.channels, model.head
    c5 = int(model.fpn.lateral[-1].kernel.shape[2])
    put("backbone.top_block.p6.weight", f, c5, 3, 3)
    put("backbone.top_block.p6.bias", f, scale=0.1)
    put("backbone.top_block.p7.weight", f, f, 3, 3)
    put("backbone.top_block.p7.bias", f, scale=0.1)
    step = 3 if head.norm else 2   # Sequential([conv, (GroupNorm,) ReLU] * n)
    for tower in ("cls_subnet", "bbox_subnet"):
        for k in range(head.num_convs):
            put(f"head.{tower}.{k * step}.weight", head.channels, f, 3, 3)
            put(f"head.{tower}.{k * step}.bias", head.channels, scale=0.1)
            if head.norm:
                put(f"head.{tower}.{k * step + 1}.weight", head.channels, scale=0.3)
                put(f"head.{tower}.{k * step + 1}.bias", head.channels, scale=0.1)
    c = head.num_classes if num_classes is None else num_classes
    put("head.cls_score.weight", head.num_anchors * c, head.channels, 3, 3)
    put("head.cls_score.bias", head.num_anchors * c, scale=0.1)
    put("head.bbox_pred.weight", head.num_anchors * 4, head.channels, 3, 3)
    put("head.bbox_pred.bias", head.num_anchors * 4, scale=0.1)


def write(path, arrays, **extra):
    """A Detectron2 `model_final_*.pkl`: {'model': arrays, '__author__': ...}."""
    with open(path, "wb") as f:
        pickle.dump({"model": arrays, "__author__": "Detectron2 Model Zoo", **extra}, f,
                    protocol=4)
    return str(path)
