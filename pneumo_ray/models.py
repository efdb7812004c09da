"""``build_model(name, ...)``: the seed baselines plus any timm model, with freezing by stage.

Freezing is generic: timm models describe their own stages through
``group_matcher(coarse=True)`` (group 0 = stem, 1..n = stages, last = head), so
``freeze_depth`` works for ResNets, EfficientNets, ViTs and the rest without
per-architecture code.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

BASELINES = ("mlp", "cnn", "cnn_bn")
HEAD_PREFIX = "head"  # name of the classifier in the baselines, so head warm-up finds it


class MLP(nn.Module):
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
    """The seed notebooks' CNN: conv-pool x3 then a dense head; ``bn`` adds BatchNorm (cnn_bn)."""

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


def check_model_name(name: str) -> str | None:
    """None when ``name`` is buildable, else a message saying what would be."""
    import timm

    if name in BASELINES or timm.is_model(name):
        return None
    close = timm.list_models(f"*{name[:4]}*")[:5] if len(name) >= 2 else []
    hint = f"; close timm names: {', '.join(close)}" if close else ""
    return f"unknown model {name!r}: use {', '.join(BASELINES)} or a timm model name{hint}"


def build_model(name: str, image_size: int, num_classes: int = 2, head_dropout: float = 0.0,
                pretrained: bool = False, weights_file: str | None = None) -> nn.Module:
    if name == "mlp":
        return MLP(image_size, num_classes, head_dropout)
    if name in ("cnn", "cnn_bn"):
        return SmallCNN(num_classes, head_dropout, bn=name == "cnn_bn")
    import timm

    kwargs = dict(pretrained=pretrained, num_classes=num_classes, in_chans=1, drop_rate=head_dropout)
    if pretrained and weights_file:
        # timm's own loader reads a local file (offline), adapts the stem to 1 channel and drops the old head.
        kwargs["pretrained_cfg_overlay"] = dict(file=str(Path(weights_file).expanduser()))
    try:
        return timm.create_model(name, img_size=image_size, **kwargs)  # ViT-like models need the input size
    except TypeError:  # CNNs take no img_size argument
        return timm.create_model(name, **kwargs)


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


def set_train_mode(model: nn.Module, body_frozen: bool = False) -> None:
    """``model.train()``, except BatchNorm layers that are not being trained keep their running stats:
    those whose parameters are frozen, and (during head-only warm-up) every one outside the head."""
    model.train()
    prefix = head_prefix(model)
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            params = list(module.parameters(recurse=False))
            frozen = bool(params) and not any(p.requires_grad for p in params)
            if frozen or (body_frozen and not is_head_param(name, prefix)):
                module.eval()


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside a DistributedDataParallel wrapper, if any. Not timm's ``unwrap_model``:
    importing ``timm.utils`` would cost every trial of a baseline model (which never needs timm) its
    import time at start-up."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
