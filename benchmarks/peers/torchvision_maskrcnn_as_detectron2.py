#!/usr/bin/env python3
"""torchvision's Mask R-CNN R50-FPN as a Detectron2 weights file, with its outputs.

Writes, for the side-by-side check of `load_detectron2_weights`
(tests/modeling/test_detectron2.py, `TorchvisionParityTest`):
  OUT/model_final.pkl  the network under Detectron2's names and layouts
                       ({'model': {name: array}}): background class last,
                       no background box and mask predictors (as
                       Detectron2's own model_final_*.pkl files).
  OUT/outputs.npz      (NHWC, float32, eval mode)
                       `input` [2, H, W, 3], already normalised;
                       `p2`..`p6` the FPN levels;
                       `objectness_l` [2, H_l, W_l, A], `deltas_l`
                       [2, H_l, W_l, 4A] the RPN head's raw outputs, per
                       anchor torchvision's (= Detectron2's) aspect ratios
                       (0.5, 1, 2 heights over widths) and (dx, dy, dw, dh);
                       `box_pooled` [K, 7, 7, 256] random RoI features and
                       their `class_logits` [K, C + 1] (background first),
                       `box_deltas` [K, C + 1, 4];
                       `mask_pooled` [K, 14, 14, 256] and `mask_logits`
                       [K, C + 1, 28, 28];
                       per image i, the whole inference on `input`:
                       `proposals_i` [P, 4], `boxes_i` [N, 4] (y1, x1, y2,
                       x2), `scores_i` [N], `labels_i` [N] (1..C) and
                       `masks_i` [N, 28, 28] probabilities, with
                       Detectron2's conventions where torchvision's differ:
                       anchors not rounded to whole pixels, RoIAlign with
                       `aligned=True` (ROIAlignV2); the same with adaptive
                       RoIAlign sampling (`sampling_ratio=0`, Detectron2's
                       POOLER_SAMPLING_RATIO) as `adaptive_<name>_i`; and
                       torchvision's own (rounded anchors, `aligned=False`)
                       as `stock_<name>_i`.
With `--weights`, a trained torchvision Mask R-CNN's state dict (`.pth`) is
converted instead, and only the `.pkl` is written, with the input convention
torchvision's models use (`pixel_mean` / `pixel_std`, RGB, 0-255 scale) for
`bin/import_detectron2 --gin_file=gin/torchvision_r50_fpn.gin`:

  python benchmarks/peers/torchvision_maskrcnn_as_detectron2.py --out=/tmp/tv \
      --weights=maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth --classes=coco

`keypointrcnn_resnet50_fpn` (`--arch=keypoint`) converts too: its keypoint
head and predictor become Detectron2's `conv_fcn*` and `score_lowres`, and
outputs.npz holds `keypoint_pooled` and `keypoint_logits` [K, 17, 56, 56]
instead of the mask head's pair, and per image `keypoints_i` [N, 17, 2] (y,
x: torchvision's decoding) and `keypoint_heatmaps_i` [N, 17, 56, 56], the
keypoint head on its detections.
Both torchvision Mask R-CNN models convert: `maskrcnn_resnet50_fpn` (v1) and
`maskrcnn_resnet50_fpn_v2` (batch norms in the FPN and both heads, two RPN
convs, a box head of four convs and one FC: Detectron2's names for the same
layers, as its LSJ baselines'), told apart by their arrays; `--arch` picks the
random network. v2's COCO weights (box AP 47.4, mask 41.8 in torchvision's
table) import with gin/torchvision_r50_fpn_v2.gin.
The network is randomly initialised (seeded), biases and BatchNorm
statistics included, so that every array and every permutation matters.
torch and torchvision are not dependencies of mrcnn: run this with a Python
that has them.

  python benchmarks/peers/torchvision_maskrcnn_as_detectron2.py --out=/tmp/tvm
"""

import argparse
import os
import pickle
import re
import sys

import numpy as np
import torch
import torchvision

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torchvision_resnet50_features import detectron2_name as resnet_name  # noqa: E402


# torchvision's COCO models predict 91 labels, the COCO category ids (ten of
# them unused); our classes 1..80 are the 80 used ids in ascending order.
COCO_CATEGORY_IDS = [i for i in range(1, 91)
                     if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
ARCHS = {"v1": "maskrcnn_resnet50_fpn", "v2": "maskrcnn_resnet50_fpn_v2",
         "keypoint": "keypointrcnn_resnet50_fpn"}
# A conv's or a norm's arrays (`num_batches_tracked` is dropped).
_ARRAYS = "weight|bias|running_mean|running_var"


def detectron2_arrays(state, classes):
    """torchvision's Mask R-CNN state dict -> Detectron2's {name: array}.

    `classes`: the torchvision labels that become classes 1..C, in order.
    """
    out = {}
    classes = np.asarray(classes)
    rpn_convs = sum(bool(re.match(r"rpn\.head\.conv\.\d+\.0\.weight$", n)) for n in state)
    box_convs = sum(bool(re.match(r"roi_heads\.box_head\.\d+\.0\.weight$", n))
                    for n in state)
    for name, value in state.items():
        v = value.numpy()
        if name.startswith("backbone.body."):
            out["backbone.bottom_up." + resnet_name(name[len("backbone.body."):])] = v
            continue
        # Conv2dNormActivation wraps a conv as `<name>.0` in torchvision >= 0.13,
        # and its norm (the v2 models' BatchNorm2d) as `<name>.1`: Detectron2's
        # `<name>.norm`.
        m = re.match(r"backbone\.fpn\.(inner|layer)_blocks\.(\d)\.(?:([01])\.)?"
                     rf"({_ARRAYS})$", name)
        if m:
            kind = "lateral" if m.group(1) == "inner" else "output"
            norm = ".norm" if m.group(3) == "1" else ""
            out[f"backbone.fpn_{kind}{int(m.group(2)) + 2}{norm}.{m.group(4)}"] = v
            continue
        m = re.match(r"rpn\.head\.(conv(?:\.(\d+)\.0)?|cls_logits|bbox_pred)\.(weight|bias)$",
                     name)
        if m:
            part = {"cls_logits": "objectness_logits", "bbox_pred": "anchor_deltas"}.get(
                m.group(1), "conv")
            if part == "conv" and rpn_convs > 1:   # Detectron2's RPN.CONV_DIMS = [-1, -1]
                part = f"conv.conv{m.group(2)}"
            out[f"proposal_generator.rpn_head.{part}.{m.group(3)}"] = v
            continue
        m = re.match(r"roi_heads\.box_head\.fc([67])\.(weight|bias)$", name)
        if m:
            out[f"roi_heads.box_head.fc{int(m.group(1)) - 5}.{m.group(2)}"] = v
            continue
        # The v2 models' FastRCNNConvFCHead: convs with norms, Flatten, then
        # Linear / ReLU pairs (Detectron2's conv1.. and fc1..).
        m = re.match(rf"roi_heads\.box_head\.(\d+)\.(?:([01])\.)?({_ARRAYS})$", name)
        if m:
            index = int(m.group(1))
            if m.group(2) is None:   # a Linear
                part = f"fc{(index - box_convs - 1) // 2 + 1}"
            else:
                part = f"conv{index + 1}" + (".norm" if m.group(2) == "1" else "")
            out[f"roi_heads.box_head.{part}.{m.group(3)}"] = v
            continue
        m = re.match(r"roi_heads\.box_predictor\.(cls_score|bbox_pred)\.(weight|bias)$", name)
        if m:
            if m.group(1) == "cls_score":   # background first -> last
                v = np.concatenate([v[classes], v[:1]])
            else:   # Detectron2 has no background box regressor
                v = v.reshape(-1, 4, *v.shape[1:])[classes].reshape(-1, *v.shape[1:])
            out[f"roi_heads.box_predictor.{m.group(1)}.{m.group(2)}"] = v
            continue
        m = re.match(rf"roi_heads\.mask_head\.(?:mask_fcn)?(\d)\.(?:([01])\.)?({_ARRAYS})$",
                     name)
        if m:
            index = int(m.group(1)) + (1 if "mask_fcn" not in name else 0)
            norm = ".norm" if m.group(2) == "1" else ""
            out[f"roi_heads.mask_head.mask_fcn{index}{norm}.{m.group(3)}"] = v
            continue
        # keypointrcnn_resnet50_fpn: KeypointRCNNHeads is a Sequential of
        # conv / ReLU pairs (Detectron2's conv_fcn1..), its predictor's
        # ConvTranspose2d is Detectron2's score_lowres.
        m = re.match(r"roi_heads\.keypoint_head\.(\d+)\.(weight|bias)$", name)
        if m:
            out[f"roi_heads.keypoint_head.conv_fcn{int(m.group(1)) // 2 + 1}.{m.group(2)}"] = v
            continue
        m = re.match(r"roi_heads\.keypoint_predictor\.kps_score_lowres\.(weight|bias)$", name)
        if m:
            out[f"roi_heads.keypoint_head.score_lowres.{m.group(1)}"] = v
            continue
        m = re.match(r"roi_heads\.mask_predictor\.(conv5_mask|mask_fcn_logits)\.(weight|bias)$",
                     name)
        if m:
            if m.group(1) == "mask_fcn_logits":
                out[f"roi_heads.mask_head.predictor.{m.group(2)}"] = v[classes]   # no background
            else:
                out[f"roi_heads.mask_head.deconv.{m.group(2)}"] = v
            continue
        if name.endswith("num_batches_tracked"):
            continue
        raise ValueError(f"no Detectron2 name for torchvision's {name}")
    return out


def inference(net, x, features, detectron2=True):
    """torchvision's RPN and RoI heads on `features`: as they are, or with
    Detectron2's anchors (not rounded) and RoIAlign (`aligned=True`)."""
    from torchvision.models.detection.image_list import ImageList
    from torchvision.ops import poolers, roi_align
    generator = net.rpn.anchor_generator
    rounded, original = generator.cell_anchors, poolers.roi_align
    if detectron2:
        generator.cell_anchors = [   # generate_anchors rounds its result; Detectron2 does not
            _unrounded_anchors(sizes, ratios) for sizes, ratios
            in zip(generator.sizes, generator.aspect_ratios)]
        poolers.roi_align = lambda *args, **kwargs: roi_align(*args, aligned=True, **kwargs)
    try:
        sizes = [tuple(x.shape[-2:])] * x.shape[0]
        proposals, _ = net.rpn(ImageList(x, sizes), features)
        detections, _ = net.roi_heads(features, proposals, sizes)
        heatmaps = None
        if net.roi_heads.keypoint_head is not None:   # the heatmaps of its detections
            pooled = net.roi_heads.keypoint_roi_pool(features, [d["boxes"] for d in detections],
                                                     sizes)
            heatmaps = net.roi_heads.keypoint_predictor(net.roi_heads.keypoint_head(pooled))
            heatmaps = heatmaps.split([len(d["boxes"]) for d in detections])
    finally:
        generator.cell_anchors, poolers.roi_align = rounded, original
    yxyx = lambda b: b[:, [1, 0, 3, 2]].numpy()   # noqa: E731
    out = {}
    for i, (p, d) in enumerate(zip(proposals, detections)):
        out.update({f"proposals_{i}": yxyx(p), f"boxes_{i}": yxyx(d["boxes"]),
                    f"scores_{i}": d["scores"].numpy(), f"labels_{i}": d["labels"].numpy()})
        if "masks" in d:
            out[f"masks_{i}"] = d["masks"][:, 0].numpy()
        if "keypoints" in d:   # (x, y, 1) -> (y, x)
            out[f"keypoints_{i}"] = d["keypoints"][..., [1, 0]].numpy()
            out[f"keypoint_heatmaps_{i}"] = heatmaps[i].numpy()
    return out


def _unrounded_anchors(sizes, ratios):
    """torchvision's `AnchorGenerator.generate_anchors` without its `round()`."""
    scales = torch.as_tensor(sizes, dtype=torch.float32)
    h_ratios = torch.sqrt(torch.as_tensor(ratios, dtype=torch.float32))
    ws = (1 / h_ratios[:, None] * scales[None, :]).view(-1)
    hs = (h_ratios[:, None] * scales[None, :]).view(-1)
    return torch.stack([-ws, -hs, ws, hs], dim=1) / 2


def convert(weights, classes, out):
    """Writes OUT/model_final.pkl from a torchvision Mask R-CNN state dict."""
    state = torch.load(weights, map_location="cpu", weights_only=True)
    state = state.get("model", state)
    labels = state["roi_heads.box_predictor.cls_score.weight"].shape[0]
    keep = (COCO_CATEGORY_IDS if classes == "coco" else range(1, labels) if classes == "all"
            else [int(c) for c in classes.split(",")])
    model = detectron2_arrays(state, keep)
    # torchvision's GeneralizedRCNNTransform: RGB in [0, 1], ImageNet mean / std.
    model["pixel_mean"] = np.array([123.675, 116.28, 103.53], np.float32).reshape(3, 1, 1)
    model["pixel_std"] = np.array([58.395, 57.12, 57.375], np.float32).reshape(3, 1, 1)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "model_final.pkl"), "wb") as f:
        pickle.dump({"model": model, "__author__": f"torchvision {weights}"}, f)
    print(f"wrote {out}/model_final.pkl: {len(keep)} classes of {labels - 1} labels")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--size", default="128,192", help="H,W, multiples of 64")
    parser.add_argument("--num_classes", type=int, default=6, help="foreground classes")
    parser.add_argument("--rois", type=int, default=5)
    parser.add_argument("--arch", choices=sorted(ARCHS), default="v1",
                        help="the random network: maskrcnn_resnet50_fpn (v1), "
                        "maskrcnn_resnet50_fpn_v2 (batch norms in the FPN and heads, two "
                        "RPN convs, a box head of four convs and one FC) or "
                        "keypointrcnn_resnet50_fpn (keypoint: 17 keypoints, no masks)")
    parser.add_argument("--weights", help="a trained torchvision Mask R-CNN state dict "
                        "(.pth) to convert, instead of the random network and outputs")
    parser.add_argument("--classes", default="all", help="with --weights: the labels "
                        "that become classes 1..C, comma-separated; 'coco' for the 80 COCO "
                        "category ids of torchvision's COCO models; 'all' for 1..C")
    args = parser.parse_args()
    if args.weights:
        convert(args.weights, args.classes, args.out)
        return
    height, width = (int(v) for v in args.size.split(","))
    torch.manual_seed(0)
    net = getattr(torchvision.models.detection, ARCHS[args.arch])(
        weights=None, weights_backbone=None, num_classes=args.num_classes + 1).eval()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("bias"):
                p.uniform_(-0.1, 0.1)
        # Spread the scores, so that rankings do not hang on float rounding.
        net.rpn.head.cls_logits.weight.mul_(30.0)
        net.roi_heads.box_predictor.cls_score.weight.mul_(30.0)
        if net.roi_heads.keypoint_predictor is not None:   # heatmaps with distinct peaks
            net.roi_heads.keypoint_predictor.kps_score_lowres.weight.mul_(30.0)
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.3, 0.8)
        x = torch.randn(2, 3, height, width)
        features = net.backbone(x)   # {'0'..'3', 'pool'}: P2..P6
        levels = list(features.values())
        objectness, deltas = net.rpn.head(levels)
        k = args.rois
        box_pooled = torch.randn(k, 256, 7, 7)
        box_x = net.roi_heads.box_head(box_pooled)
        class_logits, box_deltas = net.roi_heads.box_predictor(box_x)
        mask_pooled = torch.randn(k, 256, 14, 14)
        keypoints = args.arch == "keypoint"
        head, predictor = ((net.roi_heads.keypoint_head, net.roi_heads.keypoint_predictor)
                           if keypoints else
                           (net.roi_heads.mask_head, net.roi_heads.mask_predictor))
        mask_logits = predictor(head(mask_pooled))   # keypoints: [K, 17, 56, 56]
        results = inference(net, x, features)
        results.update({f"stock_{k}": v for k, v in
                        inference(net, x, features, detectron2=False).items()})
        for pool in (net.roi_heads.box_roi_pool, net.roi_heads.mask_roi_pool,
                     net.roi_heads.keypoint_roi_pool):
            if pool is not None:
                pool.sampling_ratio = 0
        results.update({f"adaptive_{k}": v for k, v in
                        inference(net, x, features).items()})
    nhwc = lambda t: t.permute(0, 2, 3, 1).numpy()   # noqa: E731
    outputs = {"input": nhwc(x), "box_pooled": nhwc(box_pooled),
               "class_logits": class_logits.numpy(),
               "box_deltas": box_deltas.reshape(k, -1, 4).numpy(),
               "mask_pooled": nhwc(mask_pooled), "mask_logits": mask_logits.numpy()}
    if keypoints:   # the same random features through the keypoint head
        outputs["keypoint_pooled"] = outputs.pop("mask_pooled")
        outputs["keypoint_logits"] = outputs.pop("mask_logits")
    outputs.update(results)
    for level, (p, o, d) in enumerate(zip(levels, objectness, deltas), start=2):
        outputs.update({f"p{level}": nhwc(p), f"objectness_{level}": nhwc(o),
                        f"deltas_{level}": nhwc(d)})
    model = detectron2_arrays(net.state_dict(), range(1, args.num_classes + 1))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "model_final.pkl"), "wb") as f:
        pickle.dump({"model": model, "__author__": f"torchvision {ARCHS[args.arch]}"}, f)
    np.savez(os.path.join(args.out, "outputs.npz"), **outputs)
    print(f"wrote {args.out}/model_final.pkl ({len(model)} arrays) and outputs.npz "
          f"(torch {torch.__version__}, torchvision {torchvision.__version__})")


if __name__ == "__main__":
    main()
