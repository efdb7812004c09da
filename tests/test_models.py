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


def conv(c_in: int, c_out: int, k: int = 3) -> int:
    return k * k * c_in * c_out + c_out


def dense(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out


# Worked out from each study's layer listing (docs/studies.md), independently of the model code.
STUDY_COUNTS = {
    ("study000_mlp", 224): dense(224 * 224, 128) + dense(128, 2),
    # no padding: 224 -conv-> 222 -pool-> 111 -conv-> 109 -pool-> 54
    ("study000_cnn", 224): conv(1, 16) + conv(16, 32) + dense(32 * 54 * 54, 128) + dense(128, 2),
    # padding 1: 224 -pool-> 112 -pool-> 56; BatchNorm: a weight and a bias per channel
    ("study000_cnn_advanced", 224): conv(1, 32) + 2 * 32 + conv(32, 64) + 2 * 64 + dense(64 * 56 * 56, 256)
    + dense(256, 2),
}


@pytest.mark.parametrize("name, size", sorted(STUDY_COUNTS))
def test_study_networks_have_the_studies_parameter_counts(name, size):
    model = build_model(name, size)
    assert sum(p.numel() for p in model.parameters()) == STUDY_COUNTS[(name, size)]
    assert model(torch.zeros(2, 1, size, size)).shape == (2, 2)


def test_study003_cnn_counts_2525121_as_keras_does_and_its_sigmoid_is_a_softmax():
    """Keras counts BatchNorm's moving mean and variance among the 2,525,121 'parameters'; torch keeps
    them as buffers. Its single sigmoid unit comes out as the logits (0, z)."""
    model = build_model("study003_cnn", 128).eval()
    params = sum(p.numel() for p in model.parameters())
    moving_stats = sum(b.numel() for n, b in model.named_buffers() if n.endswith(("running_mean", "running_var")))
    assert params + moving_stats == 2_525_121
    x = torch.randn(3, 1, 128, 128)
    logits = model(x)
    z = model.head(model.body(x))[:, 0]
    assert torch.equal(logits[:, 0], torch.zeros(3))
    assert torch.allclose(logits.softmax(1)[:, 1], torch.sigmoid(z))


@pytest.mark.parametrize("name, too_small", [("study003_cnn", 28), ("study000_cnn", 8)])
def test_study_networks_say_which_sizes_they_cannot_take(name, too_small):
    with pytest.raises(ValueError, match=f"{name} needs images of at least"):
        build_model(name, too_small)


def test_study_networks_freeze_nothing_but_train_their_head_first():
    from pneumo_ray.models import head_prefix, is_head_param, max_freeze_depth

    model = build_model("study000_cnn_advanced", 28)
    heads = [n for n, _ in model.named_parameters() if is_head_param(n, head_prefix(model))]
    assert heads == ["head.weight", "head.bias"] and max_freeze_depth(model) == 1


def test_xavier_uniform_init_and_frozen_batchnorm():
    """model.init: xavier_uniform draws every conv and linear weight from U(-b, b), b = sqrt(6 / (fan_in +
    fan_out)), biases zero; model.freeze_bn keeps every BatchNorm layer's statistics out of training."""
    import math

    from pneumo_ray.models import init_weights

    torch.manual_seed(0)
    model = build_model("study003_cnn", 128)
    init_weights(model, "xavier_uniform")
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    for layer in layers:
        w = layer.weight
        fan_in, fan_out = w.shape[1] * w[0, 0].numel(), w.shape[0] * w[0, 0].numel()
        bound = math.sqrt(6 / (fan_in + fan_out))
        assert w.abs().max() <= bound and torch.count_nonzero(layer.bias) == 0
        if w.numel() > 10_000:  # a uniform's sd is bound / sqrt(3)
            assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)

    set_train_mode(model, freeze_bn=True)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == 5 and not any(m.training for m in norms) and model.head.training
    before = [m.running_mean.clone() for m in norms]
    model(torch.randn(4, 1, 128, 128))
    assert all(torch.equal(a, m.running_mean) for a, m in zip(before, norms))
