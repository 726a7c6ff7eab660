"""Every torchvision classification family: prune at 0.5 with all structural invariants.

`make test` runs one model per family (FAMILY_CASES); the whole zoo runs under the slow marker (`make test-all`)."""
import warnings

import pytest
import torch
import torchvision
from helpers import check_prunes, check_ratio_zero_identical, check_save_load, check_zero_channel_equivalence

ALL = torchvision.models.list_models(module=torchvision.models)

# image size per model: small where the architecture allows (fast), native where it does not
SIZE = {"vit": 224, "maxvit": 224, "inception": 96, "swin": 64, "googlenet": 64}


def size_for(name):
    for k, v in SIZE.items():
        if name.startswith(k):
            return v
    return 64


FAMILY_CASES = [
    "alexnet", "convnext_tiny", "densenet121", "efficientnet_b0", "efficientnet_v2_s", "googlenet",
    "inception_v3", "maxvit_t", "mnasnet0_5", "mobilenet_v2", "mobilenet_v3_small", "regnet_x_400mf",
    "regnet_y_400mf", "resnet18", "resnext50_32x4d", "shufflenet_v2_x0_5", "squeezenet1_1", "swin_t",
    "swin_v2_t", "vgg11_bn", "vit_b_16", "wide_resnet50_2",
]


def build(name):
    torch.manual_seed(0)
    kw = {"aux_logits": False, "init_weights": False} if name in ("googlenet", "inception_v3") else {}
    m = torchvision.models.get_model(name, weights=None, **kw).eval()
    # random init leaves BN at identity; perturb running stats and affine params so BN handling is exercised
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                mod.running_mean.normal_(0, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.normal_(0, 0.1)
    s = size_for(name)
    return m, torch.randn(1, 3, s, s)


def run_invariants(name, tmp_path):
    m, x = build(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_ratio_zero_identical(m, x)
        r = check_prunes(m, x, ratio=0.5)
        check_zero_channel_equivalence(m, x, rtol=1e-4 if name.startswith(("vit", "swin", "maxvit")) else 1e-5)
        fresh, _ = build(name)
        with torch.no_grad():
            for p in fresh.parameters():
                p.add_(1.0)     # the loaded weights must come from the file, not the fresh model
        check_save_load(r, fresh, x, tmp_path)


def test_family_list_covers_every_family():
    fams = {n.split("_")[0].rstrip("0123456789") for n in ALL}
    covered = {n.split("_")[0].rstrip("0123456789") for n in FAMILY_CASES}
    assert fams <= covered | {"wide"}, fams - covered


@pytest.mark.parametrize("name", FAMILY_CASES)
def test_family(name, tmp_path):
    run_invariants(name, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in ALL if n not in FAMILY_CASES])
def test_zoo(name, tmp_path):
    run_invariants(name, tmp_path)
