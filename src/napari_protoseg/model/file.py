"""Trained models on disk: ONE file holding the weights and a JSON configuration.

Pure Python/PyTorch, no Qt. A model file (suggested extension ``.protoseg.pt``, any name works) is a
``torch.save`` of a plain dict::

    {"format": "napari-protoseg model", "format_version": 1 or 2,
     "config": "<JSON text>", "state_dict": {name: tensor, ...}}

Version 2 marks a network with WISE-Net instance heads (``ModelConfig.n_instance_classes > 0``;
their weights are part of the state dict, channel ``k`` belongs to the ``k``-th class flagged
``instances``); models without heads are still written as version 1, which older releases read.

The JSON configuration holds the napari-protoseg version that wrote it, the network configuration
(:meth:`ModelConfig.to_dict`) and its format version (``config_version``; files without one are
version 1, read as they were meant by :mod:`napari_protoseg.model.migration`), the class table (``ClassInfo.to_json``, colours included; output
index ``i`` of the network is ``classes[i]``), the intensity normalisation, the 2.5D context and free
``training_info`` written by the trainer. Files are read with ``torch.load(weights_only=True)``, so
loading a file never runs code from it; every way a file can be unusable raises
:class:`ModelFileError` with a message saying what is wrong and what to do.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from napari_protoseg.model.inputs import Normalization
from napari_protoseg.model.migration import CONFIG_VERSION, VERSION_KEY, ConfigVersionError
from napari_protoseg.model.network import ModelConfig, ProtoSegNet, pick_device
from napari_protoseg.annotations.project import ClassInfo, atomic_write, classes_from_json

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MODEL_SUFFIX",
    "ModelFileError",
    "TrainedModel",
    "check_model_classes",
    "load_model",
    "save_model",
]

FORMAT = "napari-protoseg model"
FORMAT_VERSION = 2  # the newest version this release reads and writes
_SEMANTIC_ONLY_VERSION = 1
MODEL_SUFFIX = ".protoseg.pt"
_REQUIRED_CONFIG_KEYS = ("model", "classes", "normalization", "context")


class ModelFileError(ValueError):
    """A model file that cannot be used; the message says what is wrong and what to do."""


@dataclass
class TrainedModel:
    """A trained network with everything needed to apply it.

    ``classes[i]`` is the class of the network's output ``i``; ``normalization`` maps raw image
    intensities to the network's input range; ``context`` is the number of neighbouring sections
    on each side fed as extra channels (``in_channels = 2 * context + 1``); ``training_info`` is
    free JSON written by the trainer (annotation counts, steps, losses, ...).
    """

    net: ProtoSegNet
    classes: list[ClassInfo]
    normalization: Normalization
    context: int = 0
    training_info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.classes = list(self.classes)
        config = self.net.config
        if len(self.classes) != config.n_classes:
            raise ValueError(f"the network has {config.n_classes} outputs but {len(self.classes)} "
                             "classes were given; give one class per output")
        if isinstance(self.context, bool) or not isinstance(self.context, (int, np.integer)) or self.context < 0:
            raise ValueError(f"context must be a non-negative integer, got {self.context!r}")
        self.context = int(self.context)
        if config.in_channels != 2 * self.context + 1:
            raise ValueError(f"the network takes {config.in_channels} input channel(s), but context "
                             f"{self.context} needs {2 * self.context + 1}")
        if not isinstance(self.training_info, dict):
            raise ValueError(f"training_info must be a dict, got {type(self.training_info).__name__}")
        flagged = sum(bool(c.instances) for c in self.classes)
        if config.n_instance_classes and config.n_instance_classes != flagged:
            raise ValueError(f"the network has instance heads for {config.n_instance_classes} class(es) but "
                             f"{flagged} class(es) are flagged 'instances'; the heads belong to the classes "
                             "flagged when the model was trained")

    @property
    def class_ids(self) -> list[int]:
        """The class ids in output order (index i of the network's outputs = ``class_ids[i]``)."""
        return [int(c.id) for c in self.classes]

    @property
    def config(self) -> ModelConfig:
        return self.net.config

    @property
    def instance_class_ids(self) -> list[int]:
        """Ids of the classes flagged ``instances``, in the order of the localization channels."""
        return [int(c.id) for c in self.classes if c.instances]

    @property
    def has_instance_heads(self) -> bool:
        """True when the network has WISE-Net localization and embedding heads."""
        return self.net.config.n_instance_classes > 0

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device


# --------------------------------------------------------------------------------- saving


def _json_default(value: Any):
    """NumPy scalars and arrays (as trainers like to put into training_info) as plain JSON."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, (Path, os.PathLike)):
        return os.fspath(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def model_config_json(model: TrainedModel) -> str:
    """The JSON configuration stored in a model file."""
    from napari_protoseg import __version__

    doc = {
        "napari_protoseg_version": __version__,
        "model": model.net.config.to_dict(),
        VERSION_KEY: CONFIG_VERSION,
        "classes": [c.to_json() for c in model.classes],
        "normalization": model.normalization.to_dict(),
        "context": int(model.context),
        "training_info": model.training_info,
    }
    try:
        return json.dumps(doc, default=_json_default, indent=1)
    except (TypeError, ValueError) as err:
        raise ValueError(f"training_info cannot be stored as JSON: {err}") from err


def save_model(path: str | os.PathLike, model: TrainedModel) -> Path:
    """Write ``model`` to ONE file at ``path`` (atomically: a temporary file beside it, then a rename).

    Returns the path written. The folder must exist. Any file name works; ``.protoseg.pt`` is
    the suggested extension.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder; give a file name such as {path / ('model' + MODEL_SUFFIX)}")
    if not path.parent.is_dir():
        raise ValueError(f"folder {path.parent} does not exist; create it first")
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION if model.net.config.n_instance_classes else _SEMANTIC_ONLY_VERSION,
        "config": model_config_json(model),
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.net.state_dict().items()},
    }
    atomic_write(path, lambda f: torch.save(payload, f))
    return path


# -------------------------------------------------------------------------------- loading


def _fail(path: Path, message: str) -> ModelFileError:
    return ModelFileError(f"Cannot use model file {path}: {message}")


def first_line(err: BaseException) -> str:
    """The exception's type and the first line of its message, for a message saying why a file failed."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


# What torch.load raises for a file that is not a PyTorch file, is damaged (e.g. truncated), or
# holds Python objects that ``weights_only=True`` refuses to unpickle (see holds_python_objects).
TORCH_LOAD_ERRORS = (pickle.UnpicklingError, RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError,
                     KeyError, AttributeError, ImportError, IndexError, TypeError, UnicodeDecodeError, MemoryError)


def holds_python_objects(err: BaseException) -> bool:
    """Whether ``torch.load(weights_only=True)`` raised ``err`` because the file holds Python objects
    besides tensors and plain values (loading them could run code from the file)."""
    return isinstance(err, pickle.UnpicklingError) and "global" in str(err).lower()  # "Unsupported global: ..."


def _read_payload(path: Path) -> Any:
    if not path.exists():
        raise _fail(path, "the file does not exist. Check the path, or train and save a model first.")
    if path.is_dir():
        raise _fail(path, "this is a folder, not a model file. Choose the model file (*.protoseg.pt) itself.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except TORCH_LOAD_ERRORS as err:
        if holds_python_objects(err):
            raise _fail(path, "the file holds Python objects besides weights, which napari-protoseg "
                        "does not load (model files are plain weights and JSON). It was not written "
                        "by napari-protoseg; choose a file saved by napari-protoseg.") from None
        if isinstance(err, pickle.UnpicklingError):
            raise _fail(path, "the file is not a PyTorch file or it is damaged (its data cannot be "
                        "unpickled). Choose a model file saved by napari-protoseg, or save the model "
                        "again.") from None
        if isinstance(err, PermissionError):
            raise _fail(path, "permission denied; check that you may read the file.") from None
        raise _fail(path, f"the file is not a PyTorch file or it is damaged, e.g. truncated by an "
                    f"interrupted copy ({first_line(err)}). Choose a model file saved by "
                    "napari-protoseg, or save the model again.") from None


def _check_envelope(path: Path, payload: Any) -> str:
    """The configuration JSON text, after checking format and version."""
    if not isinstance(payload, dict):
        raise _fail(path, f"it is a PyTorch file holding a {type(payload).__name__}, not a "
                    "napari-protoseg model. Choose a model file saved by napari-protoseg.")
    if "format" not in payload:
        if payload and all(isinstance(v, torch.Tensor) for v in payload.values()):
            raise _fail(path, "it holds bare network weights (a state dict) without the "
                        "napari-protoseg configuration (classes, normalisation). Save models with "
                        "napari_protoseg.model.file.save_model.")
        raise _fail(path, "it is a PyTorch file but not a napari-protoseg model (no 'format' entry). "
                    "Choose a model file saved by napari-protoseg.")
    if payload["format"] != FORMAT:
        raise _fail(path, f"it is not a napari-protoseg model (format {payload['format']!r}, expected "
                    f"{FORMAT!r}).")
    version = payload.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise _fail(path, f"its format version {version!r} is invalid (expected a whole number >= 1); "
                    "the file is damaged. Save the model again.")
    if version > FORMAT_VERSION:
        written_by = ""
        try:
            writer = json.loads(payload.get("config", "")).get("napari_protoseg_version")
            if writer:
                written_by = f" {writer}"
        except Exception:  # noqa: BLE001 - only used to improve the message
            pass
        from napari_protoseg import __version__

        raise _fail(path, f"it was written by a newer napari-protoseg{written_by} (model format "
                    f"version {version}; this napari-protoseg {__version__} reads up to version "
                    f"{FORMAT_VERSION}). Update napari-protoseg to load it.")
    config = payload.get("config")
    if not isinstance(config, str):
        raise _fail(path, "its configuration is missing or not text; the file is damaged. "
                    "Save the model again.")
    if "state_dict" not in payload or not isinstance(payload["state_dict"], dict):
        raise _fail(path, "it holds no network weights ('state_dict'); the file is damaged. "
                    "Save the model again.")
    return config


def _parse_config(path: Path, text: str) -> tuple[ModelConfig, list[ClassInfo], Normalization, int, dict]:
    damaged = " The file is damaged or was edited; save the model again."
    try:
        doc = json.loads(text)
    except (json.JSONDecodeError, ValueError) as err:
        raise _fail(path, f"its configuration is not valid JSON ({err}).{damaged}") from None
    if not isinstance(doc, dict):
        raise _fail(path, f"its configuration must be a JSON object, not {type(doc).__name__}.{damaged}")
    missing = [k for k in _REQUIRED_CONFIG_KEYS if k not in doc]
    if missing:
        raise _fail(path, f"its configuration lacks the key(s) {missing}.{damaged}")

    if not isinstance(doc["model"], dict):
        raise _fail(path, f"its network configuration 'model' must be an object.{damaged}")
    try:
        config = ModelConfig.from_dict(doc["model"], doc.get(VERSION_KEY))
    except ConfigVersionError as err:
        raise _fail(path, f"{err}.") from None
    except (TypeError, ValueError) as err:
        raise _fail(path, f"its network configuration is invalid ({err}).{damaged}") from None

    classes, problems = classes_from_json(doc["classes"], file="class table", allow_unknown_keys=True)
    if problems:
        raise _fail(path, "its class table is invalid: " + "; ".join(str(p) for p in problems) + damaged)

    norm = doc["normalization"]
    try:
        normalization = Normalization.from_dict(norm)
        ok = math.isfinite(normalization.low) and math.isfinite(normalization.high) \
            and normalization.high > normalization.low
    except (TypeError, ValueError, KeyError):
        ok = False
    if not ok:
        raise _fail(path, f"its intensity normalisation {norm!r} is invalid (need finite 'low' < "
                    f"'high').{damaged}")

    context = doc["context"]
    if isinstance(context, bool) or not isinstance(context, int) or context < 0:
        raise _fail(path, f"its 2.5D context {context!r} must be a whole number >= 0.{damaged}")
    if config.in_channels != 2 * context + 1:
        raise _fail(path, f"its network takes {config.in_channels} input channel(s) but its 2.5D "
                    f"context {context} needs {2 * context + 1}.{damaged}")
    if len(classes) != config.n_classes:
        raise _fail(path, f"its class table lists {len(classes)} class(es) but the network "
                    f"configuration has {config.n_classes} outputs.{damaged}")
    flagged = sum(bool(c.instances) for c in classes)
    if config.n_instance_classes and config.n_instance_classes != flagged:
        raise _fail(path, f"its network has instance heads for {config.n_instance_classes} class(es) but "
                    f"its class table flags {flagged} class(es) with 'instances'.{damaged}")

    info = doc.get("training_info", {})
    if info is None:
        info = {}
    if not isinstance(info, dict):
        raise _fail(path, f"its training_info must be an object.{damaged}")
    return config, classes, normalization, context, info


def _check_state_dict(path: Path, state: dict, net: ProtoSegNet, n_classes: int) -> None:
    damaged = " The weights do not belong to this configuration; the file is damaged or was " \
              "assembled by hand. Save the model again."
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise _fail(path, "its weights must map names to tensors." + damaged)
    protos = state.get("prototypes")
    if protos is not None and (protos.ndim != 3 or protos.shape[0] != n_classes):
        count = protos.shape[0] if protos.ndim >= 1 else "?"
        raise _fail(path, f"its weights hold prototypes for {count} class(es) but its class table "
                    f"lists {n_classes}." + damaged)
    expected = net.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} instead of {tuple(v.shape)}"
             for k, v in expected.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    if wrong:
        parts.append(f"{len(wrong)} with other shapes (e.g. {wrong[:3]})")
    if parts:
        raise _fail(path, "its weights do not match its network configuration: "
                    + ", ".join(parts) + "." + damaged)
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise _fail(path, f"its weights contain NaN or infinite values ({bad[:3]}); training "
                    "diverged. Retrain the model (e.g. with a lower learning rate).")


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> TrainedModel:
    """Read a model file written by :func:`save_model`; the network is in eval mode on ``device``.

    ``device`` is a ``torch.device`` or a name for :func:`~napari_protoseg.model.network.pick_device`
    (``"auto"``, ``"cpu"``, ``"cuda"``, ``"mps"``). Raises :class:`ModelFileError` for a file that
    is missing, not a PyTorch file, damaged, not a napari-protoseg model, from a newer version, or
    whose configuration and weights do not fit together.
    """
    path = Path(path)
    payload = _read_payload(path)
    text = _check_envelope(path, payload)
    config, classes, normalization, context, info = _parse_config(path, text)
    state = payload["state_dict"]
    # Building the net draws random prototypes; keep the caller's random stream untouched.
    with torch.random.fork_rng(devices=[]):
        net = ProtoSegNet(config)
    _check_state_dict(path, state, net, config.n_classes)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as err:  # pragma: no cover - the checks above catch what this would
        raise _fail(path, f"its weights do not fit the network ({first_line(err)}).") from None
    device = device if isinstance(device, torch.device) else pick_device(device)
    net.to(device).eval()
    return TrainedModel(net=net, classes=classes, normalization=normalization, context=context,
                        training_info=info)


# ---------------------------------------------------------------------- class compatibility


def check_model_classes(model: TrainedModel | Sequence[ClassInfo], classes: Sequence[ClassInfo]) -> list[str]:
    """Messages when a model trained for other classes is applied to a project's class table.

    Compares by class id (the model's outputs are written as ids) and name; colours, order and the
    ``instances`` flag do not matter. Empty when the model predicts exactly the project's classes.
    """
    model_classes = list(model.classes if isinstance(model, TrainedModel) else model)
    mine = {int(c.id): c for c in model_classes}
    theirs = {int(c.id): c for c in classes}
    messages = []
    for cid in sorted(mine.keys() & theirs.keys()):
        if mine[cid].name != theirs[cid].name:
            messages.append(f"class id {cid} is {mine[cid].name!r} in the model but "
                            f"{theirs[cid].name!r} in the project; predictions of {mine[cid].name!r} "
                            f"would be shown as {theirs[cid].name!r}.")
    for cid in sorted(mine.keys() - theirs.keys()):
        messages.append(f"the model predicts class id {cid} ({mine[cid].name!r}), which the project's "
                        "class table does not define.")
    for cid in sorted(theirs.keys() - mine.keys()):
        messages.append(f"the project's class id {cid} ({theirs[cid].name!r}) was not among the "
                        "model's classes; the model never predicts it.")
    if messages:
        messages.append("Train a new model for this project's classes, or use the model with the "
                        "project it was trained for.")
    return messages
