"""build_model, generic freeze_depth through timm's group matcher, and the offline pretrained path."""

from __future__ import annotations

import pytest
import timm
import torch

from pneumo_ray.models import build_model, freeze, set_train_mode


def trainable_prefixes(model, frozen):
    return {n for n, p in model.named_parameters() if p.requires_grad}, set(frozen)


@pytest.mark.parametrize("name", ["mlp", "cnn", "cnn_bn", "resnet18"])
def test_models_take_one_channel_and_give_two_logits(name):
    model = build_model(name, image_size=28, head_dropout=0.1)
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 2)


def test_freeze_depth_resnet18():
    model = build_model("resnet18", 28)
    frozen = set(freeze(model, 2))  # stem + layer1
    expected = {n for n, _ in model.named_parameters() if n.startswith(("conv1.", "bn1.", "layer1."))}
    assert frozen == expected and len(expected) == 3 + 12
    for name, p in model.named_parameters():
        assert p.requires_grad == (name not in expected), name
    set_train_mode(model)
    assert not model.bn1.training and not model.layer1[0].bn1.training  # frozen BN keeps running stats
    assert model.layer2[0].bn1.training and model.training


def test_freeze_depth_efficientnet_b0():
    model = build_model("efficientnet_b0", 32)
    frozen = set(freeze(model, 1))  # stem only
    assert frozen == {"conv_stem.weight", "bn1.weight", "bn1.bias"}
    assert all(p.requires_grad for n, p in model.named_parameters() if n.startswith(("blocks.", "classifier.")))
    frozen3 = set(freeze(build_model("efficientnet_b0", 32), 3))
    assert {n.split(".")[1] for n in frozen3 if n.startswith("blocks.")} == {"0", "1"}


def test_freeze_depth_vit():
    model = build_model("vit_tiny_patch16_224", 32)
    frozen = set(freeze(model, 3))  # cls/pos/patch embedding + blocks 0 and 1
    expected = {n for n, _ in model.named_parameters()
                if n.startswith(("cls_token", "pos_embed", "patch_embed.", "blocks.0.", "blocks.1."))}
    assert frozen == expected
    assert model.head.weight.requires_grad and model.blocks[2].attn.qkv.weight.requires_grad


def test_freeze_depth_beyond_the_model_is_an_error():
    with pytest.raises(ValueError, match="exceeds the 5 stem/stage groups"):
        freeze(build_model("resnet18", 28), 6)


def test_pretrained_loads_a_local_timm_weights_file(tmp_path):
    """The real timm loading path, offline: a weights file the test writes itself (3 channels, 1000 classes)."""
    torch.manual_seed(0)
    source = timm.create_model("resnet18", pretrained=False)
    weights = tmp_path / "resnet18_imagenet_like.pth"
    torch.save(source.state_dict(), weights)

    model = build_model("resnet18", 28, pretrained=True, weights_file=str(weights))
    # timm adapts the RGB stem to one channel by summing over the input channels.
    assert torch.allclose(model.conv1.weight, source.conv1.weight.sum(dim=1, keepdim=True))
    assert torch.equal(model.layer3[1].conv2.weight, source.layer3[1].conv2.weight)
    assert model.fc.out_features == 2  # the 1000-class head is replaced
    scratch = build_model("resnet18", 28)
    assert not torch.equal(scratch.layer3[1].conv2.weight, source.layer3[1].conv2.weight)
