"""torchvision detectors: Faster/Mask/Keypoint R-CNN, RetinaNet, FCOS, SSD, SSDLite prune backbone, FPN and heads.

One case table, shared invariants (PEFT style): random init at a small input size, `pk.Structured(ratio=0.3)`;
the number of classes, keypoints and anchors of every predictor stays; backbone, FPN and head lose channels;
verification ran on the raw head outputs (the inputs of top-k / NMS / roi_align, since random weights leave the
post-processed detections empty) and was exact, or approximate with the normalizations that explain it; save
-> pk.load gives bit-identical weights and raw head outputs. The fast cases use ResNet-18 / MobileNetV3
backbones (Faster R-CNN and Mask R-CNN in `make test`, the others and the builders' ResNet-50 versions and
SSD300-VGG16 under the slow marker, `make test-all`)."""
import warnings

import pytest
import torch
import torch.nn as nn

import prunekit as pk

torchvision = pytest.importorskip("torchvision", reason="torchvision is not installed")
D = torchvision.models.detection
SMALL = dict(min_size=64, max_size=64)
RCNN = dict(SMALL, rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50)     # 50 boxes into the box head


def _r18(**kw):
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    return resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5, **kw)


def _p6p7():
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7
    return _r18(returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256))


RCNN_KEEP = {"roi_heads.box_predictor.cls_score": ("out_features", 91),
             "roi_heads.box_predictor.bbox_pred": ("out_features", 4 * 91)}


def _rpn_keep(anchors):
    return {"rpn.head.cls_logits": ("out_channels", anchors), "rpn.head.bbox_pred": ("out_channels", 4 * anchors)}


def _ssd_keep(model, classes):
    """Every SSD/SSDLite predictor conv keeps anchors x classes (or anchors x 4) output channels."""
    keep = {}
    for head, per in (("classification_head", classes), ("regression_head", 4)):
        for i, block in enumerate(getattr(model.head, head).module_list):
            name, conv = f"head.{head}.module_list.{i}", block
            if isinstance(block, nn.Sequential):                  # SSDLite: depthwise block, then the 1x1 conv
                name, conv = f"{name}.{len(block) - 1}", block[-1]
            keep[name] = ("out_channels", conv.out_channels)
            assert conv.out_channels % per == 0
    return keep


# name: (build() -> model, input size, {module: (attribute, value kept)}, module prefixes that must shrink)
CASES = {
    "fasterrcnn_mobilenet_v3_320_fpn": (
        lambda: D.fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None, num_classes=91,
                                                        **RCNN),
        64, {**RCNN_KEEP, **_rpn_keep(15)}, ["backbone.body", "backbone.fpn", "roi_heads.box_head"]),
    "maskrcnn_r18_fpn": (
        lambda: D.MaskRCNN(_r18(), num_classes=91, **RCNN), 64,
        {**RCNN_KEEP, **_rpn_keep(3), "roi_heads.mask_predictor.mask_fcn_logits": ("out_channels", 91)},
        ["backbone.body", "backbone.fpn", "roi_heads.box_head", "roi_heads.mask_head"]),
    "keypointrcnn_r18_fpn": (
        lambda: D.KeypointRCNN(_r18(), num_classes=2, num_keypoints=17, **RCNN), 64,
        {"roi_heads.box_predictor.cls_score": ("out_features", 2), **_rpn_keep(3),
         "roi_heads.keypoint_predictor.kps_score_lowres": ("out_channels", 17)},
        ["backbone.body", "backbone.fpn", "roi_heads.box_head", "roi_heads.keypoint_head"]),
    "retinanet_r18_fpn": (
        lambda: D.RetinaNet(_p6p7(), num_classes=91, **SMALL), 64,
        {"head.classification_head.cls_logits": ("out_channels", 9 * 91),
         "head.regression_head.bbox_reg": ("out_channels", 9 * 4)},
        ["backbone.body", "backbone.fpn", "head.classification_head.conv"]),
    "fcos_r18_fpn": (
        lambda: D.FCOS(_p6p7(), num_classes=91, **SMALL), 64,
        {"head.classification_head.cls_logits": ("out_channels", 91),
         "head.regression_head.bbox_reg": ("out_channels", 4),
         "head.regression_head.bbox_ctrness": ("out_channels", 1)},
        ["backbone.body", "backbone.fpn", "head.classification_head.conv"]),
    "ssdlite320_mobilenet_v3": (
        lambda: D.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=91), 320,
        "ssd", ["backbone.features", "head.classification_head", "head.regression_head"]),
}
SLOW_CASES = {
    "fasterrcnn_resnet50_fpn": (lambda: D.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, **RCNN),
                                64, {**RCNN_KEEP, **_rpn_keep(3)}, ["backbone.body", "backbone.fpn"]),
    "maskrcnn_resnet50_fpn": (lambda: D.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, **RCNN), 64,
                              {**RCNN_KEEP, "roi_heads.mask_predictor.mask_fcn_logits": ("out_channels", 91)},
                              ["backbone.body", "backbone.fpn", "roi_heads.mask_head"]),
    "keypointrcnn_resnet50_fpn": (
        lambda: D.keypointrcnn_resnet50_fpn(weights=None, weights_backbone=None, **RCNN), 64,
        {"roi_heads.keypoint_predictor.kps_score_lowres": ("out_channels", 17)}, ["backbone.body"]),
    "retinanet_resnet50_fpn": (lambda: D.retinanet_resnet50_fpn(weights=None, weights_backbone=None, **SMALL), 64,
                               {"head.classification_head.cls_logits": ("out_channels", 9 * 91)},
                               ["backbone.body", "backbone.fpn", "head.classification_head.conv"]),
    "fcos_resnet50_fpn": (lambda: D.fcos_resnet50_fpn(weights=None, weights_backbone=None, **SMALL), 64,
                          {"head.classification_head.cls_logits": ("out_channels", 91)},
                          ["backbone.body", "backbone.fpn", "head.classification_head.conv"]),
    "ssd300_vgg16": (lambda: D.ssd300_vgg16(weights=None, weights_backbone=None, num_classes=91), 300, "ssd",
                     ["backbone.features"]),
}


def build(make):
    torch.manual_seed(0)
    return make().eval()


def raw_head_outputs(model, x, names):
    """Outputs of the predictor modules: what the post-processing reads (detections are empty here)."""
    got, hooks = [], []
    for n in names:
        hooks.append(model.get_submodule(n).register_forward_hook(lambda m, a, o: got.append(o.detach())))
    try:
        with torch.no_grad():
            model(*x)
    finally:
        for h in hooks:
            h.remove()
    return got


def run_case(case, tmp_path):
    make, size, keep, shrink = case
    model = build(make)
    x = ([torch.rand(3, size, size, generator=torch.Generator().manual_seed(0))],)
    keep = _ssd_keep(model, 91) if keep == "ssd" else keep
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")            # modules whose forward breaks are left alone, with a warning
        r = pk.prune(model, pk.Structured(ratio=0.3), example_inputs=x)
    for name, (attr, value) in keep.items():
        assert getattr(r.model.get_submodule(name), attr) == value, f"{name}.{attr} must stay {value}"
    before = {n: p.shape for n, p in model.named_parameters()}
    for prefix in shrink:
        assert any(p.shape != before[n] for n, p in r.model.named_parameters() if n.startswith(prefix + ".")), \
            f"nothing pruned under {prefix}"
    v = r.stats["verification"]
    assert v["data_inputs_compared"] > 0 and v["modules_compared"] > 0
    assert v["max_rel_diff"] <= v["tolerance"] and v["max_module_rel_diff"] <= v["tolerance"]
    if v["mode"] == "approximate":                 # only normalizations over pruned channels may explain it
        assert v["approximate_modules"]
        for name in v["approximate_modules"]:
            assert isinstance(model.get_submodule(name), (nn.GroupNorm, nn.LayerNorm)), name
    else:
        assert v["mode"] == "exact" and not v["approximate_modules"]
    pk.save(r, tmp_path)
    loaded = pk.load(tmp_path, model=build(make))
    sd, sd2 = r.model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    for a, b in zip(raw_head_outputs(r.model, x, keep), raw_head_outputs(loaded.eval(), x, keep)):
        assert torch.equal(a, b)
    return r


FAST = {"fasterrcnn_mobilenet_v3_320_fpn", "maskrcnn_r18_fpn"}      # the quickest two; the rest: make test-all


@pytest.mark.parametrize("name", [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in sorted(CASES)])
def test_detector(name, tmp_path):
    run_case(CASES[name], tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SLOW_CASES))
def test_detector_builders(name, tmp_path):
    run_case(SLOW_CASES[name], tmp_path)
