"""Keras layers of Mask R-CNN R50-FPN and the model built from them.

One module per part: `resnet` (backbone and weight loaders), `fpn`, `rpn`,
`roi_heads` (box and mask heads, sampling, post-processing), `losses`,
`mask_rcnn` (the model and the `build_mask_rcnn` factory), `retinanet`
(RetinaNet on the same backbone, FPN and ops: `build_retinanet`),
`detector` (what both models share), `detectron2` (a
trained Detectron2 Mask R-CNN's weights), `tta` (test-time augmentation). Every constructor
is gin-configurable with the R50-FPN 1x recipe as defaults. `compile_ops(False)`
traces the model without its XLA islands (RoI sampling compiled on its own
inside graph-mode steps; see `_xla`).
"""

from mrcnn.modeling._xla import compile_ops
from mrcnn.modeling.detectron2 import load_detectron2_weights
from mrcnn.modeling.fpn import FPN
from mrcnn.modeling.mask_rcnn import MaskRCNN, build_mask_rcnn
from mrcnn.modeling.retinanet import RetinaNet, RetinaNetHead, build_retinanet
from mrcnn.modeling.resnet import (FrozenBatchNorm, ResNet, SourceInput,
                                   load_detectron2_resnet_weights,
                                   load_keras_resnet50_weights,
                                   load_tensorpack_resnet_weights)
from mrcnn.modeling.roi_heads import (BoxHead, CascadeRoiHeads, KeypointHead, MaskHead,
                                      RoiHeads)
from mrcnn.modeling.rpn import RpnHead

__all__ = ["compile_ops", "FPN", "MaskRCNN", "build_mask_rcnn", "FrozenBatchNorm", "ResNet",
           "SourceInput", "load_detectron2_resnet_weights", "load_detectron2_weights",
           "load_keras_resnet50_weights", "load_tensorpack_resnet_weights",
           "BoxHead", "CascadeRoiHeads", "KeypointHead", "MaskHead", "RoiHeads",
           "RetinaNet", "RetinaNetHead", "build_retinanet", "RpnHead"]
