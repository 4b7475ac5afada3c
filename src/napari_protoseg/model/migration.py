"""ONE migration for every stored configuration: model files, checkpoints and benchmark results.

Configurations are stored as dicts of JSON types. Each is written with :data:`CONFIG_VERSION`
(``TrainConfig.to_dict`` holds it under :data:`VERSION_KEY`; a model file's JSON and a checkpoint
hold it beside the network's ``ModelConfig`` dict), and reading one upgrades it, version by
version, to today's layout, so an old file means what it meant when it was written:

* version 1 (no version recorded; everything written up to commit 3746550): the training
  configuration is flat (the network's fields at its top level, its 2.5D input as ``context``),
  and a field that a file lacks was added after the file was written: it takes the value in
  effect before the field existed (:data:`MODEL_V1_MISSING`, :data:`TRAIN_V1_MISSING`);
* version 2: the training configuration nests the network's fields under ``"model"`` (without
  the project's ``n_classes`` and ``n_instance_classes``, which training fills in);
* version 3: the training configuration has ``encoder``, the pretrained weights a network starts
  from (files of version 2 and older started from random weights: None), and
  ``encoder_learning_rate``. Every field is present.

Adding a field: raise :data:`CONFIG_VERSION`, and add an upgrade step from the previous version
that gives the field, where a file lacks it, the value in effect before it existed. A file of a
newer version than this release reads is refused with :class:`ConfigVersionError`.

This module works on plain dicts; ``ModelConfig.from_dict`` and ``TrainConfig.from_dict`` call it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CONFIG_VERSION", "ConfigVersionError", "MODEL_V1_MISSING", "TRAIN_V1_MISSING", "VERSION_KEY",
           "check_version", "upgrade_model_config", "upgrade_train_config"]

CONFIG_VERSION = 3  # the newest version this release reads, and the one it writes
VERSION_KEY = "config_version"

# A version-1 network configuration (a model file's "model", a checkpoint's "model_config"): what
# it means by a field it lacks: the plain full-resolution network without instance heads.
MODEL_V1_MISSING: dict[str, Any] = {
    "in_channels": 1, "base_width": 8, "depth": 4, "embed_dim": 32, "prototypes_per_class": 5,
    "temperature": 0.05, "norm": "group", "n_instance_classes": 0, "instance_embed_dim": 64,
    "filter_sigmas": [], "localization_context": 0, "input_scale": 1, "embedding_context": 0,
    "instance_coordinates": 0.0,
}

# The network's fields that a version-1 (flat) training configuration holds at its top level.
_FLAT_MODEL_FIELDS = ("base_width", "depth", "embed_dim", "prototypes_per_class", "temperature",
                      "instance_embed_dim", "filter_sigmas", "localization_context", "input_scale",
                      "embedding_context", "instance_coordinates")

# A version-1 training configuration: what it means by a field it lacks (the value in effect
# before the field existed; for the fields every such file holds, the default of then). Keys
# outside this table were ignored then and are ignored now.
TRAIN_V1_MISSING: dict[str, Any] = {
    "steps": 1800, "batch_size": 4, "crop_size": 192, "learning_rate": 3e-3, "weight_decay": 1e-4,
    "max_grad_norm": 5.0, "context": 0, "tag_pooling": "mean", "negative_eps": 1e-6,
    "negative_only_weight": 1.0, "mask_share": None, "balance_classes": 0.0, "weight_contrastive": 0.1,
    "weight_ce": 1.0, "weight_pseudo_label": 0.0, "pseudo_label_threshold": 0.8, "pseudo_label_warmup": 120,
    "seed": 0, "device": "auto", "checkpoint_every": 100, "instance_heads": False, "weight_localization": 1.0,
    "weight_embedding": 1.0, "instance_backbone_grad": 1.0, "unpointed_negatives": False, "point_spread": 0,
    "point_spread_tolerance": 0.1, "point_spread_halfway": False, "time_limit": None,
    **{name: MODEL_V1_MISSING[name] for name in _FLAT_MODEL_FIELDS},
}


class ConfigVersionError(ValueError):
    """A configuration written by a newer napari-protoseg, or with a version that is no version."""


def check_version(version: Any) -> int:
    """``version`` as stored (None: version 1, written before versions were recorded), checked."""
    if version is None:
        return 1
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ConfigVersionError(f"its configuration version {version!r} is not a whole number >= 1; "
                                 "the file is damaged")
    if version > CONFIG_VERSION:
        from napari_protoseg import __version__

        raise ConfigVersionError(f"its configuration was written by a newer napari-protoseg (configuration "
                                 f"version {version}; napari-protoseg {__version__} reads up to version "
                                 f"{CONFIG_VERSION}). Update napari-protoseg to use it")
    return version


def upgrade_model_config(data: dict[str, Any], version: Any) -> dict[str, Any]:
    """A network configuration stored with ``version`` (None: 1) in today's layout."""
    version = check_version(version)
    data = dict(data)
    if version < 2:
        data = {**MODEL_V1_MISSING, **data}
    return data


def upgrade_train_config(data: dict[str, Any]) -> dict[str, Any]:
    """A training configuration as stored (its version under :data:`VERSION_KEY`; none: version 1,
    unless it nests a ``"model"``, which only today's layout does) in today's layout, without the
    version key; its ``"model"`` is a network configuration in today's layout."""
    data = dict(data)
    stored = data.pop(VERSION_KEY, None)
    if stored is None and isinstance(data.get("model"), dict):
        stored = CONFIG_VERSION
    version = check_version(stored)
    if version < 2:
        data = _nest_v1_train_config(data)
    if version < 3:
        data.setdefault("encoder", None)
        data.setdefault("encoder_learning_rate", 1.0)
    if not isinstance(data.get("model"), dict):
        raise ValueError("its training configuration lacks the network's fields ('model')")
    return data


def _nest_v1_train_config(flat: dict[str, Any]) -> dict[str, Any]:
    data = {**TRAIN_V1_MISSING, **{k: v for k, v in flat.items() if k in TRAIN_V1_MISSING}}
    context = data.pop("context")
    if isinstance(context, bool) or not isinstance(context, int) or context < 0:
        raise ValueError(f"its 2.5D context {context!r} must be a whole number >= 0")
    model = {**MODEL_V1_MISSING, **{name: data.pop(name) for name in _FLAT_MODEL_FIELDS}}
    # The project's part: training takes it from the project's classes.
    model.update(in_channels=2 * context + 1, n_classes=None, n_instance_classes=None)
    return {**data, "model": model}
