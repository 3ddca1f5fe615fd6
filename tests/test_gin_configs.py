"""The recipes in gin/ parse and build the model they describe."""

import os

import gin
import pytest
import tensorflow as tf

from mrcnn import programs

GIN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gin")


# The model is built by one eager call at 64 x 64: 50 proposals instead of
# the recipes' 1000 keep it to seconds (a Detectron2 recipe's adaptive
# RoIAlign, op by op, took 30 s of the cascade's call on 1000).
FEW_PROPOSALS = ["RpnHead.post_nms_topk_test = 50"]


@pytest.fixture
def parsed():
    def parse(path):
        programs.parse_gin_files([os.path.join(GIN, path)], FEW_PROPOSALS, finalize=False)
        # The model the recipe trains (MaskRCNN or RetinaNet), on its smallest canvas.
        model = gin.query_parameter("train.model_fn").scoped_configurable_fn()
        side = 2 ** model.fpn.max_level
        model({"images": tf.zeros([1, side, side, 3], tf.uint8),
               "image_info": tf.constant([[side, side, side, side, 1.0]], tf.float32)},
              training=False)
        return model
    yield parse
    gin.clear_config()


def test_r50_fpn_1x(parsed):
    model = parsed("r50_fpn_1x.gin")
    assert model.num_classes == 80 and model.backbone.depth == 50
    assert model.backbone.stride_in_1x1 and model.rpn_head.anchor_offset == 0.5
    assert gin.query_parameter("train.epochs") == 12
    assert gin.query_parameter("%TRAIN_MIN_SIZE") == (640, 672, 704, 736, 768, 800)


def test_r50_fpn_3x(parsed):
    model = parsed("r50_fpn_3x.gin")
    assert model.num_classes == 80 and model.backbone.depth == 50
    assert gin.query_parameter("train.epochs") == 36.5
    assert gin.query_parameter("build_optimizer.decay_epochs") == (28.4, 33.8)
    assert gin.query_parameter("%TRAIN_MIN_SIZE") == (640, 672, 704, 736, 768, 800)


def test_faster_rcnn_r50_fpn_1x(parsed):
    model = parsed("faster_rcnn_r50_fpn_1x.gin")
    assert not model.has_masks and model.num_classes == 80
    assert gin.query_parameter("CocoInput.with_masks") is False


def test_detectron2_r50_fpn(parsed):
    model = parsed("detectron2_r50_fpn.gin")
    assert model.num_classes == 80 and model.backbone.depth == 50
    assert model.pixel_mean == (123.675, 116.28, 103.53) and model.pixel_std == (1, 1, 1)
    assert model.rpn_head.anchor_offset == 0.0 and model.backbone.stride_in_1x1
    assert model.roi_heads.sampling_ratio == 0
    assert gin.query_parameter("import_detectron2.model_fn").selector == "MaskRCNN"


def test_torchvision_r50_fpn(parsed):
    model = parsed("torchvision_r50_fpn.gin")
    assert not model.backbone.stride_in_1x1 and model.rpn_head.round_anchors
    assert model.rpn_head.anchor_offset == 0.0 and not model.roi_heads.aligned
    assert gin.query_parameter("load_detectron2_weights.source_format") == "RGB"


def test_torchvision_r50_fpn_v2(parsed):
    model = parsed("torchvision_r50_fpn_v2.gin")
    assert not model.backbone.stride_in_1x1 and model.rpn_head.round_anchors
    assert not model.roi_heads.aligned and len(model.rpn_head.convs) == 2
    box, mask = model.roi_heads.box_head, model.roi_heads.mask_head
    assert model.backbone.norm == "frozen_bn"
    assert model.fpn.norm == box.norm == mask.norm == "bn"
    assert len(box.convs) == 4 and box.num_fc == 1


def test_r50_fpn_lsj(parsed):
    parsed("r50_fpn_lsj.gin")
    assert gin.query_parameter("train/CocoInput.scale_jitter") == (0.1, 2.0)
    assert gin.query_parameter("CocoInput.group_by_orientation") is False


def test_cascade_mask_rcnn_r50_fpn_1x(parsed):
    from mrcnn.modeling.roi_heads import CascadeRoiHeads
    model = parsed("cascade_mask_rcnn_r50_fpn_1x.gin")
    heads = model.roi_heads
    assert isinstance(heads, CascadeRoiHeads) and model.num_classes == 80
    assert len({id(h) for h in heads.box_heads}) == 3
    assert all(h.class_agnostic and h.num_classes == 80 for h in heads.box_heads)
    assert heads.stage_ious == (0.5, 0.6, 0.7) and heads.mask_head is not None


def test_detectron2_cascade_r50_fpn(parsed):
    model = parsed("detectron2_cascade_r50_fpn.gin")
    assert len(model.roi_heads.box_heads) == 3 and model.roi_heads.sampling_ratio == 0
    assert model.rpn_head.anchor_offset == 0.0 and model.pixel_std == (1.0, 1.0, 1.0)
    assert model.rpn_head.post_nms_topk_train == 2000


def test_shapes_cascade_demo(parsed):
    model = parsed("shapes_cascade_demo.gin")
    heads = model.roi_heads
    assert len(heads.box_heads) == 3 and heads.num_samples == 64
    assert heads.max_detections == 20 and model.num_classes == 3


def test_x101_32x8d_fpn_3x(parsed):
    model = parsed("x101_32x8d_fpn_3x.gin")
    net = model.backbone
    assert (net.depth, net.groups, net.width_per_group, net.stride_in_1x1) == (101, 32, 8, False)
    conv2 = net.blocks[0].convs[1].conv
    assert conv2.groups == 32 and tuple(conv2.kernel.shape) == (3, 3, 8, 256)
    assert gin.query_parameter("%BACKBONE_WEIGHTS").endswith("X-101-32x8d.pkl")
    assert gin.query_parameter("train.epochs") == 36.5


def test_r101_fpn_3x(parsed):
    model = parsed("r101_fpn_3x.gin")
    net = model.backbone
    assert (net.depth, net.groups, net.stride_in_1x1) == (101, 1, True)
    assert len(net.blocks) == 3 + 4 + 23 + 3
    assert gin.query_parameter("%BACKBONE_WEIGHTS").endswith("R-101.pkl")
    assert gin.query_parameter("load_backbone_weights.file_format") == "detectron2"
    assert gin.query_parameter("train.epochs") == 36.5


def test_detectron2_r101_fpn(parsed):
    model = parsed("detectron2_r101_fpn.gin")
    assert model.backbone.depth == 101 and model.backbone.stride_in_1x1
    assert model.pixel_std == (1.0, 1.0, 1.0) and model.rpn_head.anchor_offset == 0.0
    assert model.roi_heads.sampling_ratio == 0


def test_detectron2_x101_32x8d_fpn(parsed):
    model = parsed("detectron2_x101_32x8d_fpn.gin")
    assert model.backbone.groups == 32 and not model.backbone.stride_in_1x1
    assert model.pixel_std == (58.395, 57.12, 57.375) and model.rpn_head.anchor_offset == 0.0
    assert model.pixel_mean == (123.675, 116.28, 103.53)


def test_r50_fpn_gn_3x(parsed):
    model = parsed("r50_fpn_gn_3x.gin")
    box, mask = model.roi_heads.box_head, model.roi_heads.mask_head
    assert model.backbone.norm == model.fpn.norm == box.norm == mask.norm == "gn"
    assert (box.num_conv, box.num_fc, box.conv_dim) == (4, 1, 256)
    assert not model.backbone.stride_in_1x1
    assert gin.query_parameter("%BACKBONE_WEIGHTS").endswith("R-50-GN.pkl")
    assert gin.query_parameter("load_backbone_weights.file_format") == "detectron2"
    assert gin.query_parameter("train.epochs") == 36.5


def test_detectron2_r50_fpn_gn(parsed):
    model = parsed("detectron2_r50_fpn_gn.gin")
    assert model.backbone.norm == "gn" and not model.backbone.stride_in_1x1
    assert model.pixel_mean == (123.675, 116.28, 103.53) and model.pixel_std == (1, 1, 1)
    assert model.rpn_head.anchor_offset == 0.0 and model.roi_heads.box_head.num_conv == 4


def test_r50_fpn_lsj_100ep(parsed):
    model = parsed("r50_fpn_lsj_100ep.gin")
    heads = model.roi_heads
    assert model.backbone.norm == model.fpn.norm == "sync_bn" and model.backbone.freeze_at == 0
    assert heads.box_head.norm == heads.mask_head.norm == "sync_bn"
    assert (heads.box_head.num_conv, heads.box_head.num_fc) == (4, 1)
    assert model.rpn_head.num_convs == 2 and len(model.rpn_head.convs) == 2
    assert gin.query_parameter("train.init_fn") is None
    assert gin.query_parameter("train/CocoInput.scale_jitter") == (0.1, 2.0)
    assert gin.query_parameter("build_optimizer.base_batch_size") == 64
    # Trained on 1024 x 1024, evaluated at Detectron2's 800 / 1333.
    assert gin.query_parameter("train/CocoInput.canvas_size") == (1024, 1024)
    assert gin.query_parameter("%MIN_SIZE") == 800 and gin.query_parameter("%CANVAS") == (
        1344, 1344)


def test_lvis_r50_fpn_1x():
    # 300 detections x 1203 classes of 28 x 28 masks: slow on a CPU, so 20.
    programs.parse_gin_files([os.path.join(GIN, "lvis_r50_fpn_1x.gin")],
                             ["RoiHeads.max_detections = 20"], finalize=False)
    try:
        from mrcnn.modeling.mask_rcnn import MaskRCNN
        model = MaskRCNN()
        out = model({"images": tf.zeros([1, 64, 64, 3], tf.uint8),
                     "image_info": tf.constant([[64.0, 64.0, 64.0, 64.0, 1.0]])},
                    training=False)
        assert model.num_classes == 1203 and out["detection_boxes"].shape == (1, 20, 4)
        assert model.roi_heads.score_threshold == 0.0001
        assert gin.query_parameter("evaluate.evaluator") == "lvis"
        assert gin.query_parameter("train/CocoInput.repeat_threshold") == 0.001
        assert gin.query_parameter("train/CocoInput.annotation_file").endswith(
            "lvis_v1_train.json")
        assert str(gin.query_parameter("eval/CocoInput.image_dir")) == "%DATA_DIR"
        assert gin.query_parameter("train.epochs") == 28.75
    finally:
        gin.clear_config()


def test_a_gin_file_behind_a_url_includes_the_recipes(tmp_path):
    # file:// stands in for gs://: gin opens local files itself, and reads
    # the others through tf.io.gfile (as gin.tf registers it).
    (tmp_path / "mine.gin").write_text("include 'gin/r50_fpn_1x.gin'\ntrain.epochs = 3\n")
    programs.parse_gin_files([f"file://{tmp_path}/mine.gin"], [], finalize=False)
    try:
        assert gin.query_parameter("train.epochs") == 3
        assert gin.query_parameter("%TRAIN_MIN_SIZE") == (640, 672, 704, 736, 768, 800)
    finally:
        gin.clear_config()


def test_keypoint_rcnn_r50_fpn_1x(parsed):
    model = parsed("keypoint_rcnn_r50_fpn_1x.gin")
    assert model.has_keypoints and not model.has_masks and model.num_classes == 1
    head = model.roi_heads.keypoint_head
    assert (head.num_keypoints, head.channels, head.num_convs) == (17, 512, 8)
    assert model.roi_heads.heatmap_size == 56 and model.roi_heads.box_loss_beta == 0.5
    assert gin.query_parameter("CocoInput.annotation_prefix") == "person_keypoints"


def test_shapes_keypoint_demo(parsed):
    model = parsed("shapes_keypoint_demo.gin")
    assert model.num_keypoints == 4 and not model.has_masks and model.num_classes == 3
    assert gin.query_parameter("evaluate.keypoint_oks_sigmas") == (0.05,) * 4


def test_torchvision_keypoint_r50_fpn(parsed):
    model = parsed("torchvision_keypoint_r50_fpn.gin")
    assert model.num_keypoints == 17 and model.num_classes == 1 and not model.has_masks
    assert not model.backbone.stride_in_1x1 and model.rpn_head.round_anchors
    assert not model.roi_heads.aligned


def test_retinanet_r50_fpn_1x(parsed):
    model = parsed("retinanet_r50_fpn_1x.gin")
    assert type(model).__name__ == "RetinaNet" and model.num_classes == 80
    assert (model.fpn.min_level, model.fpn.max_level, model.fpn.top_block) == (3, 7, "p6p7")
    assert model.head.num_anchors == 9 and model.head.num_convs == 4
    assert model.backbone.depth == 50 and not model.has_masks
    assert gin.query_parameter("build_optimizer.base_learning_rate") == 0.01
    assert gin.query_parameter("%SIZE_DIVISOR") == 128
    assert gin.query_parameter("%CANVAS") == (1408, 1408)
    for program in ("evaluate", "predict", "export_saved_model"):
        assert gin.query_parameter(f"{program}.model_fn").selector == "RetinaNet"


def test_shapes_retinanet_demo(parsed):
    model = parsed("shapes_retinanet_demo.gin")
    assert model.num_classes == 3 and model.head.norm == "gn" and model.head.channels == 64
    assert model.anchor_sizes == (16, 32, 64, 128, 256)


def test_detectron2_retinanet_r50_fpn():
    # The recipe's network (built by the test above) with Detectron2's conventions.
    programs.parse_gin_files([os.path.join(GIN, "detectron2_retinanet_r50_fpn.gin")], [],
                             finalize=False)
    try:
        assert gin.query_parameter("RetinaNet.anchor_offset") == 0.0
        assert gin.query_parameter("RetinaNet.pixel_std") == (1.0, 1.0, 1.0)
        assert gin.query_parameter("RetinaNet.pixel_mean") == (123.675, 116.28, 103.53)
        assert gin.query_parameter("ResNet.stride_in_1x1") is True
        assert gin.query_parameter("import_detectron2.model_fn").selector == "RetinaNet"
    finally:
        gin.clear_config()
