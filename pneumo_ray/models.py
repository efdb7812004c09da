"""``build_model(name, ...)``: this project's small baselines, the networks of the notebook studies it
replaces (``study000_*``, ``study003_cnn``: docs/studies.md), and any timm model, with freezing by stage.

Freezing is generic: timm models describe their own stages through
``group_matcher(coarse=True)`` (group 0 = stem, 1..n = stages, last = head), so
``freeze_depth`` works for ResNets, EfficientNets, ViTs and the rest without
per-architecture code.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

BASELINES = ("mlp", "cnn", "cnn_bn")
STUDY_NETWORKS = ("study000_mlp", "study000_cnn", "study000_cnn_advanced", "study003_cnn")
HEAD_PREFIX = "head"  # name of the classifier in the baselines and study networks, so head warm-up finds it


class MLP(nn.Module):
    """This project's MLP baseline (not a study's network): two hidden layers of 256 and 128."""

    def __init__(self, image_size: int, num_classes: int, dropout: float):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(image_size * image_size, 256), nn.ReLU(inplace=True),
                                  nn.Dropout(dropout), nn.Linear(256, 128), nn.ReLU(inplace=True))
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(128, num_classes))

    def forward(self, x):
        return self.head(self.body(x))


def _conv_block(c_in: int, c_out: int, bn: bool) -> nn.Sequential:
    layers = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=not bn)]
    layers += [nn.BatchNorm2d(c_out)] if bn else []
    layers += [nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class SmallCNN(nn.Module):
    """This project's small CNN baseline (not a study's network): conv-pool x3, global average pooling and a
    linear head, so it takes any size; ``bn`` adds a second conv and BatchNorm per block (cnn_bn)."""

    def __init__(self, num_classes: int, dropout: float, bn: bool):
        super().__init__()
        widths = (32, 64, 128)
        blocks, c_in = [], 1
        for w in widths:
            blocks += [_conv_block(c_in, w, bn), _conv_block(w, w, bn) if bn else nn.Identity(), nn.MaxPool2d(2)]
            c_in = w
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)  # any input size works: 28 to 224 px
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(c_in, num_classes))

    def forward(self, x):
        return self.head(self.pool(self.features(x)))


class Sequential2(nn.Module):
    """``body`` then ``head``, as the study networks are written. A one-unit head is a sigmoid output, as
    in the Keras studies; it is returned as the two logits (0, z), whose softmax is (1 - sigmoid(z),
    sigmoid(z)), so the same cross-entropy loss trains it exactly as binary cross-entropy would."""

    def __init__(self, body: nn.Module, head: nn.Module):
        super().__init__()
        self.body, self.head = body, head

    def forward(self, x):
        z = self.head(self.body(x))
        return torch.cat([torch.zeros_like(z), z], dim=1) if z.shape[1] == 1 else z


def study_network(name: str, size: int, num_classes: int) -> nn.Module:
    """The studies' own networks, layer for layer as docs/studies.md lists them. Where a listing names no
    activation after a hidden dense layer, ReLU is assumed (it has no parameters, so the counts the tests
    check are the studies'). They keep the studies' own dropout: model.head_dropout does not apply."""
    smallest = {"study000_cnn": 10, "study000_cnn_advanced": 4, "study003_cnn": 32}.get(name, 1)  # its poolings
    if size < smallest:
        raise ValueError(f"{name} needs images of at least {smallest} px, got {size}")
    relu = nn.ReLU(inplace=True)
    if name == "study000_mlp":  # Flatten -> Linear(H*W, 128) -> Linear(128, 2)
        return Sequential2(nn.Sequential(nn.Flatten(), nn.Linear(size * size, 128), relu),
                           nn.Linear(128, num_classes))
    if name == "study000_cnn":  # Conv16 3x3, ReLU, MaxPool, Conv32 3x3, ReLU, MaxPool, FC 128, FC 2 (no padding)
        side = ((size - 2) // 2 - 2) // 2
        return Sequential2(nn.Sequential(nn.Conv2d(1, 16, 3), relu, nn.MaxPool2d(2), nn.Conv2d(16, 32, 3), relu,
                                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * side * side, 128), relu),
                           nn.Linear(128, num_classes))
    if name == "study000_cnn_advanced":  # Conv32 (pad 1), BN, ReLU, Pool, Conv64, BN, ReLU, Pool, FC 256 + Dropout 0.5
        side = size // 4
        return Sequential2(nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), relu, nn.MaxPool2d(2),
                                         nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), relu, nn.MaxPool2d(2),
                                         nn.Flatten(), nn.Linear(64 * side * side, 256), relu, nn.Dropout(0.5)),
                           nn.Linear(256, num_classes))
    if name == "study003_cnn":  # Keras: 5 x (Conv 'same' + ReLU, BN, MaxPool, Dropout 0.2), Dense 512, Dense 1
        blocks, c_in = [], 1
        for width in (32, 64, 64, 128, 256):
            blocks += [nn.Conv2d(c_in, width, 3, padding=1), relu, nn.BatchNorm2d(width), nn.MaxPool2d(2),
                       nn.Dropout(0.2)]
            c_in = width
        side = size // 32
        return Sequential2(nn.Sequential(*blocks, nn.Flatten(), nn.Linear(256 * side * side, 512), relu),
                           nn.Linear(512, 1))
    raise ValueError(f"not a study network: {name}")


def check_model_name(name: str) -> str | None:
    """None when ``name`` is buildable, else a message saying what would be."""
    if name in BASELINES or name in STUDY_NETWORKS:
        return None  # before importing timm, which costs seconds on every command that checks a config
    import timm

    if timm.is_model(name):
        return None
    close = timm.list_models(f"*{name[:4]}*")[:5] if len(name) >= 2 else []
    hint = f"; close timm names: {', '.join(close)}" if close else ""
    return f"unknown model {name!r}: use {', '.join(BASELINES + STUDY_NETWORKS)} or a timm model name{hint}"


def build_model(name: str, image_size: int, num_classes: int = 2, head_dropout: float = 0.0,
                pretrained: bool = False, weights_file: str | None = None,
                head_hidden: list | None = None) -> nn.Module:
    if name == "mlp":
        return MLP(image_size, num_classes, head_dropout)
    if name in ("cnn", "cnn_bn"):
        return SmallCNN(num_classes, head_dropout, bn=name == "cnn_bn")
    if name in STUDY_NETWORKS:
        return study_network(name, image_size, num_classes)
    import timm

    kwargs = dict(pretrained=pretrained, num_classes=num_classes, in_chans=1, drop_rate=head_dropout)
    if pretrained and weights_file:
        # timm's own loader reads a local file (offline), adapts the stem to 1 channel and drops the old head.
        kwargs["pretrained_cfg_overlay"] = dict(file=str(Path(weights_file).expanduser()))
    try:
        model = timm.create_model(name, img_size=image_size, **kwargs)  # ViT-like models need the input size
    except TypeError:  # CNNs take no img_size argument
        model = timm.create_model(name, **kwargs)
    if head_hidden:
        replace_head(model, head_hidden, num_classes)
    return model


def replace_head(model: nn.Module, hidden: list, num_classes: int) -> None:
    """A timm model's linear classifier -> an MLP head (Linear + ReLU per hidden width, then the classifier),
    as the Keras studies put Dense 512 -> Dense 128 on a pretrained base. It stays under the classifier's
    name, so head warm-up, the head's LR and freezing treat it as the head."""
    prefix = head_prefix(model)
    classifier = model.get_submodule(prefix)
    if not isinstance(classifier, nn.Linear):
        raise ValueError(f"head_hidden: {type(model).__name__}'s classifier {prefix} is not a linear layer")
    layers, width = [], classifier.in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
        width = h
    parent, _, child = prefix.rpartition(".")
    head = nn.Sequential(*layers, nn.Linear(width, num_classes))
    setattr(model.get_submodule(parent) if parent else model, child, head)


def offline_weights_problem(name: str) -> str | None:
    """Why timm could not load ``name``'s pretrained weights on this machine, or None: they are in the local
    Hugging Face cache, or the Hub can be reached (HF_HUB_OFFLINE unset). Checked before Ray starts, because
    timm offline retries for about a minute and then fails every trial."""
    import os
    import socket

    from huggingface_hub import try_to_load_from_cache
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        return f"timm has no pretrained weights for {name}"
    if cfg.hf_hub_id and any(isinstance(try_to_load_from_cache(cfg.hf_hub_id, f), str)
                             for f in ("model.safetensors", "pytorch_model.bin")):
        return None
    if os.environ.get("HF_HUB_OFFLINE", "").lower() not in ("1", "true", "yes", "on"):
        try:
            socket.getaddrinfo("huggingface.co", 443)
            return None  # online: timm downloads them
        except OSError:
            pass
    return (f"no pretrained weights for {name} on this machine, and the Hugging Face Hub cannot be reached; "
            f"download them where there is internet (timm.create_model('{name}', pretrained=True) fills "
            f"~/.cache/huggingface), or save them as a file and set weights_file: /path/to/{name}.safetensors")


def head_prefix(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    classifier = cfg.get("classifier", HEAD_PREFIX)
    return classifier[0] if isinstance(classifier, (list, tuple)) else classifier


def is_head_param(param_name: str, prefix: str) -> bool:
    return param_name == prefix or param_name.startswith(prefix + ".")


def stage_groups(model: nn.Module) -> dict[str, int]:
    """Parameter name -> stage index (0 = stem). Baselines count as one stage."""
    if not hasattr(model, "group_matcher"):
        return {n: 0 for n, _ in model.named_parameters()}
    from timm.models import group_parameters

    groups = group_parameters(model, model.group_matcher(coarse=True))
    return {param: index for index, names in groups.items() for param in names}


def max_freeze_depth(model: nn.Module) -> int:
    prefix = head_prefix(model)
    stages = {i for n, i in stage_groups(model).items() if not is_head_param(n, prefix)}
    return len(stages)


def freeze(model: nn.Module, depth: int) -> list[str]:
    """Freeze the stem and the first ``depth - 1`` stages (never the head). Returns the frozen names."""
    if depth == 0:
        return []
    limit = max_freeze_depth(model)
    if depth > limit:
        raise ValueError(f"freeze_depth {depth} exceeds the {limit} stem/stage groups of this model")
    prefix, stage_of = head_prefix(model), stage_groups(model)
    frozen = []
    for name, param in model.named_parameters():
        if stage_of.get(name, limit) < depth and not is_head_param(name, prefix):
            param.requires_grad_(False)
            frozen.append(name)
    return frozen


def set_train_mode(model: nn.Module, body_frozen: bool = False, freeze_bn: bool = False) -> None:
    """``model.train()``, except BatchNorm layers that are not being trained keep their running stats:
    those whose parameters are frozen, (during head-only warm-up) every one outside the head, and with
    ``freeze_bn`` all of them, as Keras fine-tuning keeps pretrained BatchNorm layers."""
    model.train()
    prefix = head_prefix(model)
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            params = list(module.parameters(recurse=False))
            frozen = bool(params) and not any(p.requires_grad for p in params)
            if freeze_bn or frozen or (body_frozen and not is_head_param(name, prefix)):
                module.eval()


def init_weights(model: nn.Module, scheme: str) -> None:
    """Re-initialise a scratch model: ``xavier_uniform`` (Glorot) for every conv and linear weight, biases
    zero, as study 001 initialised its ResNet-34 and as Keras layers start by default."""
    if scheme != "xavier_uniform":
        raise ValueError(f"unknown init {scheme!r}")  # config validation makes this unreachable
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside a DistributedDataParallel wrapper, if any. Not timm's ``unwrap_model``:
    importing ``timm.utils`` would cost every trial of a baseline model (which never needs timm) its
    import time at start-up."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
