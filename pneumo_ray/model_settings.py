"""Per-model settings: what one search.model entry trains as, given ``models.<label>``, and the check that
every entry builds at its size, before Ray starts.

A label names its architecture (``arch``, default the label), changes any field of the ``model`` section
for itself, may train at its own image ``size``, and may search its own freeze depths. Everything that
builds, trains, freezes or sizes a trial's model asks here, so the loop, the search space, the checks and
the leaderboard agree on what each label means.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from pneumo_ray.errors import ConfigError

if TYPE_CHECKING:
    from pneumo_ray.config import Config

OWN_FIELDS = ("arch", "freeze_depth", "size")  # models.<label> fields that are not the model section's


def model_variant(cfg: Config, label: str):
    """search.model entry ``label`` -> (its architecture, its model section, the freeze depths searched for
    it): ``model`` with the fields of ``models.<label>`` changed. Without such an entry: (label, model,
    search.freeze_depth)."""
    entry = cfg.models.get(label) or {}  # typed by config.py as it loaded them
    arch, depths = entry.get("arch") or label, entry.get("freeze_depth")
    settings = {name: value for name, value in entry.items() if name not in OWN_FIELDS}
    model = dataclasses.replace(cfg.model, **settings) if settings else cfg.model
    return arch, model, list(depths) if depths is not None else list(cfg.search.freeze_depth)


def own_size(cfg: Config, label: str) -> int | None:
    """The image side a search.model entry trains at when it has its own (models.<label>.size); None: the
    data's, as loaded."""
    return (cfg.models.get(label) or {}).get("size")


def trains_at(cfg: Config, label: str, loaded: int) -> int:
    """The image side ``label``'s trials train at, the data having been loaded at ``loaded`` px: its own size,
    else data.size (an npz file's images: their own size, which data.size does not change)."""
    return own_size(cfg, label) or (loaded if cfg.data.source == "npz" else cfg.data.size)


def loaded_size(cfg: Config) -> int:
    """The side the sweep loads its data at: the largest any of its models trains at, so that the others'
    images are made smaller from them, never larger. (An npz file comes at its own size.)"""
    return max([cfg.data.size] + [own_size(cfg, label) or 0 for label in cfg.search.model])


def freeze_dimensions(cfg: Config) -> dict[str, tuple[list, set]]:
    """Freeze depth's search dimensions -> (their values, the search.model entries that have them). Only
    pretrained models freeze: those that take search.freeze_depth share the dimension ``freeze_depth``; one
    with its own list (models.<label>.freeze_depth) has its own, ``<label>.freeze_depth``, as Optuna wants one
    set of choices per parameter."""
    dims: dict[str, tuple[list, set]] = {}
    for label in dict.fromkeys(cfg.search.model):
        _, model, depths = model_variant(cfg, label)
        if model.pretrained:
            own = "freeze_depth" in (cfg.models.get(label) or {})
            dims.setdefault(f"{label}.freeze_depth" if own else "freeze_depth", (depths, set()))[1].add(label)
    return dims


def check_pretrained_weights(cfg: Config, label: str) -> None:
    """Pretrained, no weights file, none cached, no Hub: one line naming where the file goes (not timm's retries)."""
    from pneumo_ray.models import offline_weights_problem

    arch, m, _ = model_variant(cfg, label)
    problem = m.pretrained and not m.weights_file and offline_weights_problem(arch)
    if problem:
        raise ConfigError(f"{f'models.{label}' if label in cfg.models else 'model'}.weights_file: {problem}")


def check_models(cfg: Config, data_size: int) -> int:
    """Build every searched model once and run a tiny batch through it, so a model that cannot take its
    image size (its own, or the data's) or freeze depth fails now rather than as a failed trial an hour in.
    Returns the largest model's weights in bytes (what its checkpoints are sized by)."""
    import torch

    from pneumo_ray.models import build_model, max_freeze_depth

    largest = 0
    for name in dict.fromkeys(cfg.search.model):
        (arch, m, depths), image_size = model_variant(cfg, name), trains_at(cfg, name, data_size)
        check_pretrained_weights(cfg, name)
        try:
            model = build_model(arch, image_size, pretrained=m.pretrained, weights_file=m.weights_file,
                                head_hidden=m.head_hidden)
            model.eval()
            with torch.no_grad():
                model(torch.zeros(2, 1, image_size, image_size))
        except Exception as err:
            raise ConfigError(f"search.model: {name!r} cannot be built for {image_size}px images "
                              f"({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None
        deepest = max_freeze_depth(model)
        if m.pretrained and max(depths) > deepest:
            where = f"models.{name}.freeze_depth" if "freeze_depth" in (cfg.models.get(name) or {}) else \
                "search.freeze_depth"
            raise ConfigError(f"{where}: {max(depths)} exceeds the {deepest} stem/stage groups of {name}; "
                              f"use values 0..{deepest}")
        largest = max(largest, sum(t.numel() * t.element_size() for t in model.state_dict().values()))
    return largest
