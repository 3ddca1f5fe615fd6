#!/usr/bin/env python3
"""torchvision's Mask R-CNN on the work `bin/bench --what=train|infer` measures.

Same synthetic batch shape (canvas, images per step, ~10 random boxes with
elliptic masks per image), precision by autocast, warm-up excluded, median
over timed steps, peak CUDA memory; prints JSON. torch and torchvision are
not dependencies of mrcnn: install them beside it only to run this.

  python benchmarks/peers/torchvision_maskrcnn.py --what=train --batch=8 --precision=bfloat16

Notes that keep the comparison fair:
- The model is built with min_size/max_size that leave an 800x1216 input at
  scale 1, so both see the same images. Each pads them as it must: torchvision
  to a multiple of 32 (800x1216 as is), ours to a multiple of 64 for its P6
  (832x1216, `bin/bench` reports the `canvas`), 4% more pixels.
- A linear warm-up (as torchvision's reference recipe) keeps random-init
  training from diverging during the timed steps.
- cudnn.benchmark stays off: the mask head sees a different RoI count every
  step, and autotuning would re-run for each new shape.
- `maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)` trains its
  BatchNorm and all five backbone stages (torchvision only freezes with
  pretrained weights), more work than our recipe's frozen BN with the stem
  and res2 frozen. `--frozen_backbone` builds the same model with
  FrozenBatchNorm2d and three trainable stages, as torchvision trains from
  ImageNet weights and as ours does.
- In inference, random weights score below the default 0.05 threshold, so
  torchvision's mask head may see no box, where ours always runs on its 100
  static detections: `--box_score_thresh=0` keeps 100 boxes per image.
"""

import argparse
import gc
import json
import statistics
import sys
import time
import traceback

import numpy as np
import torch
import torchvision

SERVE_MARK = "@@bench "

def synthetic(batch, h, w, num_gt, device, seed=0):
    rng = np.random.default_rng(seed)
    images, targets = [], []
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    for _ in range(batch):
        centre = rng.uniform([0.1 * h, 0.1 * w], [0.9 * h, 0.9 * w], (num_gt, 2))
        size = rng.uniform(24, 0.4 * min(h, w), (num_gt, 2))
        y1x1 = np.clip(centre - size / 2, 0, None)
        y2x2 = np.minimum(centre + size / 2, [h, w])
        boxes = np.concatenate([y1x1[:, ::-1], y2x2[:, ::-1]], 1)  # x1 y1 x2 y2
        masks = np.zeros((num_gt, h, w), np.uint8)
        for k in range(num_gt):
            cy, cx = (y1x1[k] + y2x2[k]) / 2
            ry, rx = np.maximum((y2x2[k] - y1x1[k]) / 2, 1)
            masks[k] = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        images.append(torch.tensor(rng.uniform(0, 1, (3, h, w)), dtype=torch.float32,
                                   device=device))
        targets.append({
            "boxes": torch.tensor(boxes, dtype=torch.float32, device=device),
            "labels": torch.tensor(rng.integers(1, 81, num_gt), device=device),
            "masks": torch.tensor(masks, device=device)})
    return images, targets


def parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--what", choices=["train", "infer"], default="train")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--image_size", default="800,1216")
    p.add_argument("--precision", choices=["float32", "bfloat16", "float16"],
                   default="bfloat16")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--num_gt", type=int, default=10)
    p.add_argument("--frozen_backbone", action="store_true",
                   help="FrozenBatchNorm2d, stem and res2 frozen (our recipe's backbone)")
    p.add_argument("--box_score_thresh", type=float, default=0.05)
    p.add_argument("--json", default=None)
    p.add_argument("--serve", action="store_true",
                   help="measure many cases in this process (torch starts once): read one "
                        "JSON list of flags per stdin line, apply it over the command "
                        "line's, measure, answer one stdout line '@@bench {\"json\": ...}' "
                        "or '@@bench {\"error\": ...}' (benchmarks/gpu_matrix.py drives it)")
    return p


def measure(args):
    """Measures one case; returns the report (see the module docstring)."""
    h, w = (int(v) for v in args.image_size.split(","))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cudnn.benchmark = False
    sizes = dict(min_size=min(h, w), max_size=max(h, w),
                 box_score_thresh=args.box_score_thresh)
    if args.frozen_backbone:
        from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
        from torchvision.ops import misc
        resnet = torchvision.models.resnet50(weights=None, norm_layer=misc.FrozenBatchNorm2d)
        model = torchvision.models.detection.MaskRCNN(
            _resnet_fpn_extractor(resnet, 3), num_classes=91, **sizes)
    else:
        model = torchvision.models.detection.maskrcnn_resnet50_fpn(
            weights=None, weights_backbone=None, **sizes)
    model = model.to(device)
    images, targets = synthetic(args.batch, h, w, args.num_gt, device)
    dtype = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[
        args.precision]
    scaler = torch.amp.GradScaler(enabled=args.precision == "float16")
    opt = torch.optim.SGD(model.parameters(), lr=0.02 * args.batch / 16, momentum=0.9,
                          weight_decay=1e-4)
    warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.001, total_iters=1000)

    def step():
        with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
            if args.what == "train":
                losses = model(images, targets)
                loss = sum(losses.values())
            else:
                with torch.no_grad():
                    model(images)
                return
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        warm.step()

    model.train(args.what == "train")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    start = time.perf_counter()
    step()
    sync()
    first = time.perf_counter() - start
    for _ in range(args.warmup):
        step()
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    report = {"peer": "torchvision maskrcnn_resnet50_fpn", "what": args.what,
              "frozen_backbone": args.frozen_backbone,
              "box_score_thresh": args.box_score_thresh,
              "batch": args.batch, "image_size": [h, w], "precision": args.precision,
              "first_step_s": round(first, 2), "median_s": round(median, 4),
              "peak_memory_bytes": torch.cuda.max_memory_allocated() if device == "cuda"
              else None, "device": torch.cuda.get_device_name() if device == "cuda"
              else "cpu", "torch": torch.__version__,
              "torchvision": torchvision.__version__}
    if args.what == "train":
        report["images_per_s"] = round(args.batch / median, 2)
    else:
        report["ms_per_image"] = round(1e3 * median / args.batch, 2)
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


def serve(argv):
    """Measures the cases that arrive on stdin (see --serve) until it closes."""
    served = 0
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            extra = json.loads(line)
            if not isinstance(extra, list) or not all(isinstance(a, str) for a in extra):
                raise ValueError(f"expected a JSON list of flags, got {line.strip()!r}")
            args = parser().parse_args(argv + extra)
            measure(args)
            served += 1
            answer = {"json": args.json, "case_in_process": served}
        except (Exception, SystemExit) as e:  # noqa: BLE001  (argparse exits on a bad flag)
            traceback.print_exc()
            answer = {"error": f"{type(e).__name__}: {e}"[-1500:]}
        finally:
            # The next case's peak memory is its own, and the memory this one
            # cached goes back to the device for the process beside this one.
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        print(SERVE_MARK + json.dumps(answer), flush=True)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser().parse_args(argv)
    if args.serve:
        serve(argv)
    else:
        measure(args)


if __name__ == "__main__":
    main()
