"""Per-model settings: what one search.model entry trains as, given ``models.<label>``.

A label names its architecture (``arch``, default the label), changes any field of the ``model`` section
for itself, may train at its own image ``size``, and may search its own freeze depths. Everything that
builds, trains, freezes or sizes a trial's model asks here, so the loop, the search space, the checks and
the leaderboard agree on what each label means.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

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
