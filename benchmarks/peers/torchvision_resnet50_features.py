#!/usr/bin/env python3
"""A torchvision ResNet-50 (or `--arch`) as a Detectron2 weights file, with its features.

Writes, for the side-by-side check of `load_detectron2_resnet_weights`
(tests/modeling/test_resnet.py, `TorchvisionParityTest`):
  OUT/r50.pkl       the network's state dict under Detectron2's names, as
                    Detectron2's tools/convert-torchvision-to-d2.py renames
                    torchvision weights: {'model': {name: array},
                    '__author__': 'torchvision', 'matching_heuristics': True}
  OUT/features.npz  `input` [2, H, W, 3] (already normalised) and its
                    `c2`..`c5` [2, H / 2**l, W / 2**l, C] (NHWC, float32),
                    torchvision's layer1..layer4 outputs in eval mode.
The network is randomly initialised (seeded) with random BatchNorm
statistics and affines, so that every array matters. torch and torchvision
are not dependencies of mrcnn: run this with a Python that has them.

  python benchmarks/peers/torchvision_resnet50_features.py --out=/tmp/tv
"""

import argparse
import os
import pickle
import re

import numpy as np
import torch
import torchvision


def detectron2_name(name):
    """torchvision's state-dict name -> Detectron2's ResNet name."""
    if not name.startswith("layer"):
        name = "stem." + name  # conv1, bn1 (and fc, which Detectron2 keeps)
    name = re.sub(r"layer(\d)", lambda m: f"res{int(m.group(1)) + 1}", name)
    name = re.sub(r"bn(\d)", r"conv\1.norm", name)
    return name.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--size", default="64,96", help="H,W, multiples of 32")
    parser.add_argument("--arch", default="resnet50",
                        help="a torchvision ResNet: resnet50, resnet101, resnext50_32x4d, "
                             "resnext101_32x8d (the file is OUT/r50.pkl whichever)")
    args = parser.parse_args()
    height, width = (int(v) for v in args.size.split(","))
    torch.manual_seed(0)
    net = getattr(torchvision.models, args.arch)(weights=None).eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.3, 0.8)
                m.bias.uniform_(-0.1, 0.1)
        x = torch.randn(2, 3, height, width)
        y = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        features = {}
        for level, layer in zip(range(2, 6), (net.layer1, net.layer2, net.layer3,
                                              net.layer4)):
            y = layer(y)
            features[f"c{level}"] = y.permute(0, 2, 3, 1).numpy()
    model = {detectron2_name(k): v.numpy() for k, v in net.state_dict().items()}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "r50.pkl"), "wb") as f:
        pickle.dump({"model": model, "__author__": "torchvision",
                     "matching_heuristics": True}, f)
    np.savez(os.path.join(args.out, "features.npz"),
             input=x.permute(0, 2, 3, 1).numpy(), **features)
    print(f"wrote {args.out}/r50.pkl ({len(model)} arrays) and features.npz "
          f"(torch {torch.__version__}, torchvision {torchvision.__version__})")


if __name__ == "__main__":
    main()
