"""The workflow behind the napari panel, without Qt.

A :class:`Session` works on a napari viewer model (``napari.Viewer`` or the Qt-free
``napari.components.ViewerModel``): it keeps the class table, finds or creates the annotation
layers, gathers them into an :class:`~napari_protoseg.annotations.project.AnnotationSet`, checks the input
before training and says what to fix, autosaves the project folder, writes predictions into the
review layers, tracks whether the user edited them, and copies corrected predictions back into the
"Masks" annotation. The long-running parts are plain generators (:func:`training_run`, and
:func:`~napari_protoseg.prediction.pipeline.prediction_run` with :func:`prediction_settings`) that the
panel runs in napari thread workers and tests can iterate directly.

The science lives elsewhere: conversions in ``layers.py``, training in ``training.py``,
prediction in ``inference.py``, instance decoding in ``instances.py``.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from napari_protoseg._text import format_ranges
from napari_protoseg.prediction import DEFAULT_DECODER
from napari_protoseg.prediction.pipeline import DecoderSettings, PredictionPiece
from napari_protoseg.plugin.layers import (
    BOXES_LAYER,
    MASKS_LAYER,
    METADATA_KEY,
    POINTS_LAYER,
    TAGS_LAYER,
    annotation_layers,
    annotations_from_layers,
    axis_labels,
    class_colors,
    classes_from_metadata,
    labels_colormap,
    layer_metadata,
    shapes_to_tags,
    tags_to_shapes,
)
from napari_protoseg.model.file import TrainedModel, check_model_classes, save_model
from napari_protoseg.annotations.project import (
    DEFAULT_COLORS,
    IMAGE_FILE,
    NO_REGION,
    REGION_FIELDS,
    AnnotationSet,
    ClassInfo,
    ProjectError,
    check_classes,
    check_image,
    empty_tags,
    find_class,
    write_project,
)
from napari_protoseg.training.engine import PreviewRequest, TrainConfig, TrainEvent, check_training_input, default_train_config, train

PREDICTION_SEMANTIC = "Prediction: semantic"
PREDICTION_INSTANCES = "Prediction: instances"
PREDICTION_CONFIDENCE = "Prediction: confidence"
PREDICTION_LAYERS = (PREDICTION_SEMANTIC, PREDICTION_INSTANCES, PREDICTION_CONFIDENCE)
ANNOTATION_ROLES = {"masks": MASKS_LAYER, "boxes": BOXES_LAYER, "points": POINTS_LAYER, "tags": TAGS_LAYER}
ROLE_LAYER_TYPES = {"masks": "Labels", "boxes": "Shapes", "points": "Points", "tags": "Shapes"}


def _is_layer_of_role(layer, role: str) -> bool:
    import napari.layers

    return isinstance(layer, getattr(napari.layers, ROLE_LAYER_TYPES[role]))

AUTOSAVE_SECONDS = 60
# "Train on current labels" ends within this many seconds by default (TrainConfig.time_limit): the
# budget of a default run on a 2-core CPU, whatever the machine's pace that day.
PANEL_TIME_LIMIT = 300.0
CHECKPOINT_FILE = "training.ckpt"
MODEL_FILE = "model.protoseg.pt"
PROJECTS_DIR_ENV = "PROTOSEG_PROJECTS_DIR"

TAG_PRESENT, TAG_ABSENT, TAG_UNKNOWN = "present", "absent", "unknown"
TAG_STATES = (TAG_PRESENT, TAG_ABSENT, TAG_UNKNOWN)

Region = tuple[int, int, int, int]  # (y0, x0, y1, x1), half-open pixel range of a plane


class SessionError(Exception):
    """Something the user can fix; ``str(err)`` is the message for a notification."""


def default_classes() -> list[ClassInfo]:
    """The class table of an image that has none yet: background and one object class."""
    return [ClassInfo(1, "background", False, DEFAULT_COLORS[9]), ClassInfo(2, "object", True, DEFAULT_COLORS[1])]


def default_projects_dir() -> Path:
    """Where projects of images that came from no project folder are autosaved."""
    return Path(os.environ.get(PROJECTS_DIR_ENV) or Path.home() / "protoseg-projects")


def _slug(name: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")
    return slug or "image"


def _problem_lines(problems) -> str:
    return "\n".join(f"- {p}" for p in problems)


# ------------------------------------------------------------------------------ the session


class Session:
    """Workflow state of one viewer: classes, layers, model, autosave, predictions."""

    def __init__(self, viewer, train_config: TrainConfig | None = None):
        self.viewer = viewer
        self.classes: list[ClassInfo] = []
        self.image_name: str | None = None  # None: the first suitable image layer
        self.drawing_class: int | None = None
        self.exhaustive = False  # new boxes and points mark every object of their class in the plane
        self.train_config = (train_config if train_config is not None
                             else default_train_config(time_limit=PANEL_TIME_LIMIT))
        self.decoder = DEFAULT_DECODER
        self.test_time_augmentation = False  # predictions average 8 rotated/mirrored passes
        self.model: TrainedModel | None = None
        self.model_source = ""  # where the model came from, for the info text
        self.resumable_checkpoint: Path | None = None  # a stopped run that "Continue training" resumes
        self.dirty = False
        self.last_saved: float | None = None
        self._edited_predictions: set[str] = set()
        self._next_instance_id = 1
        self._watched: set[int] = set()
        if not self.load_classes_from_layers():
            self.classes = default_classes()
        self.drawing_class = self.classes[0].id if self.classes else None

    # ------------------------------------------------------------------------- the image

    def image_layers(self) -> list:
        """Image layers that can be annotated (prediction and preview layers excluded)."""
        from napari.layers import Image

        return [layer for layer in self.viewer.layers
                if isinstance(layer, Image) and layer.name != PREDICTION_CONFIDENCE]

    def image_layer(self):
        """The chosen image layer; ``SessionError`` when there is none."""
        layers = self.image_layers()
        if not layers:
            raise SessionError("There is no image. Open an EM image or stack (File > Open, or drag it "
                               "into the window), or a protoseg project folder, first.")
        if self.image_name is not None:
            for layer in layers:
                if layer.name == self.image_name:
                    return layer
        return layers[0]

    def image(self) -> np.ndarray:
        """The chosen image as an array, checked to be a single-channel plane or stack."""
        layer = self.image_layer()
        if layer.rgb:
            raise SessionError(f"The image '{layer.name}' is an RGB colour image, but protoseg segments "
                               "single-channel (grayscale) images. Convert it to grayscale, or right-click "
                               "the layer and choose 'Split RGB', then pick one channel as the image.")
        data = layer.data[0] if layer.multiscale else layer.data
        problems = check_image(data, file=f"The image '{layer.name}'")
        if problems:
            raise SessionError(_problem_lines(problems))
        return data

    def current_plane(self) -> int | None:
        """The plane of the chosen image in view (None for a 2D image)."""
        layer = self.image_layer()
        if layer.ndim < 3:
            return None
        data_point = np.asarray(layer.world_to_data(self.viewer.dims.point))
        n_planes = int(layer.data.shape[-3] if not layer.multiscale else layer.data[0].shape[-3])
        return int(np.clip(round(float(data_point[-3])), 0, n_planes - 1))

    def plane_shape(self) -> tuple[int, int]:
        layer = self.image_layer()
        shape = layer.data[0].shape if layer.multiscale else layer.data.shape
        return int(shape[-2]), int(shape[-1])

    def visible_region(self) -> Region:
        """The part of the plane shown on the canvas, in pixels of the image (whole plane at most)."""
        layer = self.image_layer()
        height, width = self.plane_shape()
        camera = self.viewer.scene.camera if hasattr(self.viewer, "scene") else self.viewer.camera
        canvas_h, canvas_w = self.viewer.canvas.size if hasattr(self.viewer, "canvas") else self.viewer._canvas_size
        center = np.asarray(self.viewer.dims.point, dtype=float).copy()
        center[-2:] = np.asarray(camera.center)[-2:]
        half = np.array([canvas_h, canvas_w], dtype=float) / 2.0 / max(camera.zoom, 1e-9)
        low, high = center.copy(), center.copy()
        low[-2:] -= half
        high[-2:] += half
        corners = np.array([layer.world_to_data(low), layer.world_to_data(high)])[:, -2:]
        y0, x0 = np.floor(corners.min(axis=0) + 0.5).astype(int)
        y1, x1 = np.ceil(corners.max(axis=0) + 0.5).astype(int)
        y0, x0 = max(0, int(y0)), max(0, int(x0))
        y1, x1 = min(height, int(y1)), min(width, int(x1))
        if y1 <= y0 or x1 <= x0:
            raise SessionError("The image is not in view; zoom out or press the 'home' button, then try again.")
        return y0, x0, y1, x1

    # ------------------------------------------------------------------------- classes

    def load_classes_from_layers(self) -> bool:
        """Take the class table from the annotation layers' metadata, if there is one."""
        for layer in self.viewer.layers:
            classes = classes_from_metadata(layer.metadata)
            if classes:
                self.classes = classes
                if self.drawing_class not in self.class_ids:
                    self.drawing_class = classes[0].id
                self.apply_classes()
                return True
        return False

    @property
    def class_ids(self) -> list[int]:
        return [c.id for c in self.classes]

    def class_by_id(self, class_id: int) -> ClassInfo:
        found = find_class(self.classes, class_id)
        if found is None:
            raise SessionError(f"There is no class with id {class_id}.")
        return found

    def _set_classes(self, classes: list[ClassInfo]) -> None:
        problems = check_classes(classes, file="class table")
        if problems:
            raise SessionError(_problem_lines(problems))
        self.classes = classes
        self.apply_classes()
        self.mark_dirty()

    def _replace_class(self, class_id: int, **changes) -> None:
        self.class_by_id(class_id)
        self._set_classes([replace(c, **changes) if c.id == class_id else c for c in self.classes])

    def add_class(self, name: str | None = None, instances: bool = False, color: str | None = None) -> ClassInfo:
        """Add a class with the next free id (and a free default name and colour)."""
        new_id = max(self.class_ids, default=0) + 1
        names = {c.name for c in self.classes}
        if name is None:
            name = f"class {new_id}"
            while name in names:
                name += "'"
        used = {c.display_color() for c in self.classes}
        if color is None:
            color = next((c for c in DEFAULT_COLORS if c not in used), DEFAULT_COLORS[(new_id - 1) % 10])
        info = ClassInfo(new_id, name, bool(instances), color)
        self._set_classes([*self.classes, info])
        if self.drawing_class is None:
            self.set_drawing_class(new_id)
        return info

    def rename_class(self, class_id: int, name: str) -> None:
        name = name.strip()
        if not name:
            raise SessionError("A class needs a name; type one in.")
        if any(c.name == name and c.id != class_id for c in self.classes):
            raise SessionError(f"There is already a class called '{name}'; choose another name.")
        self._replace_class(class_id, name=name)
        self.apply_tag_labels()

    def recolor_class(self, class_id: int, color: str) -> None:
        self._replace_class(class_id, color=str(color).lower())

    def set_instance_class(self, class_id: int, instances: bool) -> None:
        self._replace_class(class_id, instances=bool(instances))

    def remove_class(self, class_id: int) -> None:
        """Remove a class nobody drew yet; a class in use must be erased from the layers first."""
        info = self.class_by_id(class_id)
        if self._class_in_use(class_id):
            raise SessionError(f"The class '{info.name}' is used in the annotations; erase or re-class those "
                               "annotations first, or rename the class instead.")
        self._set_classes([c for c in self.classes if c.id != class_id])
        if self.drawing_class == class_id:
            self.drawing_class = self.classes[0].id if self.classes else None

    def _class_in_use(self, class_id: int) -> bool:
        masks = self.annotation_layer("masks")
        if masks is not None and np.any(np.asarray(masks.data) == class_id):
            return True
        for role in ("boxes", "points", "tags"):
            layer = self.annotation_layer(role)
            if layer is not None and "class" in layer.features and len(layer.features):
                if np.any(np.asarray(layer.features["class"], dtype=float) == class_id):
                    return True
        return False

    def apply_classes(self) -> None:
        """Push the class table into every annotation and prediction layer: colours, metadata."""
        colormap = labels_colormap(self.classes)
        for role in ANNOTATION_ROLES:
            layer = self.annotation_layer(role)
            if layer is None:
                continue
            layer.metadata = {**layer.metadata, **layer_metadata(role, self.classes)}
            if role == "masks":
                layer.colormap = colormap
            else:
                self._recolor_items(layer, role)
        layer = self._layer(PREDICTION_SEMANTIC)
        if layer is not None:
            layer.colormap = colormap
        self.set_drawing_class(self.drawing_class)

    def _recolor_items(self, layer, role: str) -> None:
        n = len(layer.data)
        if n == 0 or "class" not in layer.features or len(layer.features) != n:
            return
        class_ids = np.asarray(layer.features["class"], dtype=float)
        if not np.all(np.isfinite(class_ids)):
            return
        colors = class_colors(class_ids.astype(int), self.classes)
        if role == "points":
            layer.face_color = colors
        else:
            layer.edge_color = colors

    def apply_tag_labels(self) -> None:
        """Rebuild the Tags layer so its text shows the current class names."""
        layer = self.annotation_layer("tags")
        if layer is not None and len(layer.data):
            self._write_tags(layer, self._read_tags(layer))

    # ---------------------------------------------------------------- annotation layers

    def _layer(self, name: str):
        return self.viewer.layers[name] if name in self.viewer.layers else None

    def annotation_layer(self, role: str):
        """The annotation layer of a role ("masks", "boxes", "points", "tags"), or None."""
        name = ANNOTATION_ROLES[role]
        for layer in self.viewer.layers:
            entry = layer.metadata.get(METADATA_KEY) or {}
            if entry.get("role") == role and _is_layer_of_role(layer, role):
                return layer
        layer = self._layer(name)
        if layer is not None and _is_layer_of_role(layer, role):
            return layer
        return None

    def ensure_annotation_layer(self, role: str):
        """The annotation layer of a role, created empty for the chosen image if missing."""
        from napari.layers import Layer

        layer = self.annotation_layer(role)
        if layer is not None:
            self.watch_layer(layer)
            return layer
        image_layer = self.image_layer()
        self.image()  # refuses RGB images with a message
        shape = self._image_shape()
        empty = AnnotationSet(image_shape=shape, classes=self.classes)
        data, meta, kind = annotation_layers(empty)[list(ANNOTATION_ROLES).index(role)]
        meta["scale"] = image_layer.scale[-len(shape):]
        meta["translate"] = image_layer.translate[-len(shape):]
        layer = Layer.create(data, meta, kind)
        self._add_keeping_selection(layer)
        self.watch_layer(layer)
        self.set_drawing_class(self.drawing_class)
        return layer

    def _image_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in np.shape(self.image()))

    def watch_layer(self, layer) -> None:
        """Mark the project as edited whenever the annotation layer changes."""
        if id(layer) in self._watched:
            return
        self._watched.add(id(layer))
        if hasattr(layer.events, "paint"):
            layer.events.paint.connect(self.mark_dirty)
        layer.events.data.connect(self.mark_dirty)
        if hasattr(layer.events, "features"):
            layer.events.features.connect(self.mark_dirty)
        if _is_layer_of_role(layer, "boxes") or _is_layer_of_role(layer, "points"):
            role = (layer.metadata.get(METADATA_KEY) or {}).get(
                "role", "points" if _is_layer_of_role(layer, "points") else "boxes")
            layer.events.data.connect(lambda event, layer=layer, role=role: self._recolor_items(layer, role))

    def watch_annotation_layers(self) -> None:
        for role in ANNOTATION_ROLES:
            layer = self.annotation_layer(role)
            if layer is not None:
                self.watch_layer(layer)

    def _drawing_color(self) -> str:
        if self.drawing_class in self.class_ids:
            return self.class_by_id(self.drawing_class).display_color()
        return "#ffffff"

    def set_drawing_class(self, class_id: int | None) -> None:
        """New masks, boxes and points are drawn in this class (and its colour)."""
        if class_id not in self.class_ids:
            class_id = self.classes[0].id if self.classes else None
        self.drawing_class = class_id
        if class_id is None:
            return
        color = self._drawing_color()
        masks = self.annotation_layer("masks")
        if masks is not None:
            masks.selected_label = class_id
        defaults = {"class": class_id, "exhaustive": bool(self.exhaustive)}
        boxes = self.annotation_layer("boxes")
        if boxes is not None:
            boxes.feature_defaults = defaults
            boxes.current_edge_color = color
            self._recolor_items(boxes, "boxes")
        points = self.annotation_layer("points")
        if points is not None:
            points.feature_defaults = defaults
            points.current_face_color = color
            self._recolor_items(points, "points")

    def set_exhaustive(self, exhaustive: bool) -> None:
        self.exhaustive = bool(exhaustive)
        self.set_drawing_class(self.drawing_class)

    def activate(self, role: str):
        """Create or pick the layer of a role, select it and put it into its drawing mode."""
        layer = self.ensure_annotation_layer(role)
        self.viewer.layers.selection.active = layer
        layer.visible = True
        mode = {"masks": "paint", "boxes": "add_rectangle", "points": "add"}.get(role)
        if mode is not None:
            layer.mode = mode
        self.set_drawing_class(self.drawing_class)
        return layer

    # ---------------------------------------------------------------------------- tags

    def _read_tags(self, layer) -> np.ndarray:
        if len(layer.data) == 0:
            return empty_tags()
        features = {name: list(layer.features[name]) for name in layer.features}
        return shapes_to_tags(layer.data, features, self._image_shape())

    def _write_tags(self, layer, tags: np.ndarray) -> None:
        data, features = tags_to_shapes(tags, self._image_shape(), self.classes)
        layer.selected_data = set()
        layer.data = data
        if len(data):
            layer.features = features
            layer.edge_color = class_colors(features["class"], self.classes)
        layer.refresh_text()

    def tag_states(self, z: int | None, region: Region | None = None) -> dict[int, str]:
        """Per class: "present", "absent" or "unknown" for plane ``z`` (or a region of it)."""
        states = {c.id: TAG_UNKNOWN for c in self.classes}
        layer = self.annotation_layer("tags")
        if layer is None:
            return states
        key = tuple(region) if region is not None else (NO_REGION,) * 4
        for t in self._read_tags(layer):
            if int(t["z"]) == (z or 0) and tuple(int(t[f]) for f in REGION_FIELDS) == key:
                states[int(t["class"])] = TAG_PRESENT if t["present"] else TAG_ABSENT
        return states

    def set_tag(self, class_id: int, state: str, z: int | None, region: Region | None = None) -> None:
        """Mark a class present or absent in plane ``z`` (or a region of it), or forget the tag."""
        if state not in TAG_STATES:
            raise ValueError(f"tag state must be one of {TAG_STATES}, not {state!r}")
        self.class_by_id(class_id)
        layer = self.ensure_annotation_layer("tags")
        tags = self._read_tags(layer)
        key = tuple(region) if region is not None else (NO_REGION,) * 4
        same = (tags["z"] == (z or 0)) & (tags["class"] == class_id)
        for f, v in zip(REGION_FIELDS, key):
            same &= tags[f] == v
        tags = tags[~same]
        if state != TAG_UNKNOWN:
            row = np.array([((z or 0), class_id, state == TAG_PRESENT, *key)], dtype=tags.dtype)
            tags = np.concatenate([tags, row])
        self._write_tags(layer, tags)
        self.mark_dirty()

    # ------------------------------------------------------------------------ gathering

    def _check_layer_shapes(self, shape: tuple[int, ...]) -> list[str]:
        name = self.image_layer().name
        messages = []
        masks = self.annotation_layer("masks")
        if masks is not None and tuple(masks.data.shape) != shape:
            messages.append(f"The '{masks.name}' layer has shape {tuple(masks.data.shape)} but the image '{name}' "
                            f"has shape {shape}.")
        for role in ("boxes", "points", "tags"):
            layer = self.annotation_layer(role)
            if layer is not None and len(layer.data) and layer.ndim != len(shape):
                messages.append(f"The '{layer.name}' layer is {layer.ndim}-D but the image '{name}' is "
                                f"{len(shape)}-D.")
        if messages:
            messages.append("Annotation layers must match the image they annotate: choose the image they "
                            "were drawn on, or delete (or rename) these layers and create new ones for this "
                            "image in the Annotate section.")
        return messages

    def annotations(self) -> tuple[np.ndarray, AnnotationSet]:
        """The chosen image and everything drawn on it; ``SessionError`` listing what is wrong."""
        image = self.image()
        shape = tuple(int(s) for s in np.shape(image))
        messages = self._check_layer_shapes(shape)
        if messages:
            raise SessionError("\n".join(messages))

        def shapes_part(role):
            layer = self.annotation_layer(role)
            if layer is None or len(layer.data) == 0:
                return None
            return list(layer.data), {name: list(layer.features[name]) for name in layer.features}

        masks_layer = self.annotation_layer("masks")
        boxes_layer = self.annotation_layer("boxes")
        points_layer = self.annotation_layer("points")
        points = None
        if points_layer is not None and len(points_layer.data):
            points = (np.asarray(points_layer.data),
                      {name: list(points_layer.features[name]) for name in points_layer.features})
        try:
            annotations = annotations_from_layers(
                shape, self.classes,
                masks=np.asarray(masks_layer.data) if masks_layer is not None else None,
                boxes=shapes_part("boxes"),
                box_shape_types=list(boxes_layer.shape_type) if boxes_layer is not None and len(boxes_layer.data)
                else None,
                points=points,
                tags=shapes_part("tags"),
            )
        except ProjectError as err:
            raise SessionError("Some annotations cannot be used:\n" + _problem_lines(err.problems)) from None
        return image, annotations

    def training_input(self) -> tuple[np.ndarray, AnnotationSet]:
        """Image and annotations ready to train on, or ``SessionError`` saying what to do."""
        image, annotations = self.annotations()
        problems = check_training_input(image, annotations)
        if problems:
            raise SessionError("Cannot train yet:\n" + _problem_lines(problems))
        return image, annotations

    def check_model(self, model: TrainedModel | None = None) -> TrainedModel:
        """The model, checked to predict exactly the classes of the class table."""
        model = self.model if model is None else model
        if model is None:
            raise SessionError("There is no model yet. Click 'Train on current labels', or load a model in "
                               "the Model section.")
        messages = check_model_classes(model, self.classes)
        if messages:
            raise SessionError("The model was trained for other classes than this project's class table:\n"
                               + "\n".join(f"- {m}" for m in messages)
                               + "\nClick 'Train on current labels' to train a model for the current classes.")
        return model

    # ------------------------------------------------------------------------- autosave

    def mark_dirty(self, *_args) -> None:
        self.dirty = True

    def project_folder(self) -> Path:
        """The project folder of the chosen image: where it was opened from, else a new folder in
        :func:`default_projects_dir` named after the image (recorded in the image layer's metadata)."""
        layer = self.image_layer()
        entry = dict(layer.metadata.get(METADATA_KEY) or {})
        if entry.get("project"):
            return Path(entry["project"])
        base = default_projects_dir() / _slug(layer.name)
        folder, n = base, 1
        while folder.exists() and any(folder.iterdir()):
            n += 1
            folder = base.with_name(f"{base.name}-{n}")
        self.set_project_folder(folder)
        return folder

    def set_project_folder(self, folder: str | os.PathLike) -> None:
        layer = self.image_layer()
        entry = dict(layer.metadata.get(METADATA_KEY) or {})
        entry.update(role="image", project=str(Path(folder).resolve()))
        layer.metadata = {**layer.metadata, METADATA_KEY: entry}

    def snapshot(self, image: np.ndarray | None = None, annotations: AnnotationSet | None = None) -> ProjectSnapshot:
        """A copy of what the project folder should hold now (taken on the GUI thread; pass the image
        and annotations when they were just gathered)."""
        if image is None or annotations is None:
            image, annotations = self.annotations()
        folder = self.project_folder()
        snapshot = ProjectSnapshot(folder=folder, image=image, annotations=annotations)
        self.dirty = False
        self.last_saved = time.monotonic()
        return snapshot

    def save_project(self) -> Path:
        """Write the project folder now (on this thread)."""
        return self.snapshot().write()

    # ---------------------------------------------------------------------- predictions

    def prediction_layers_edited(self) -> list[str]:
        """Prediction layers the user painted in since they were last predicted."""
        return [name for name in PREDICTION_LAYERS if name in self._edited_predictions and name in self.viewer.layers]

    def _prediction_edited(self, name: str, *_args) -> None:
        self._edited_predictions.add(name)

    def _instance_painted(self, layer) -> None:
        # A label the user painted is taken: later predictions number their instances above it.
        self._next_instance_id = max(self._next_instance_id, int(layer.selected_label) + 1)

    def _add_keeping_selection(self, layer):
        """Add a layer without taking the active layer away from what the user works on."""
        selection = self.viewer.layers.selection
        active, selected = selection.active, set(selection)
        self.viewer.add_layer(layer)
        if active is not None and active in self.viewer.layers:
            selection.active = active
            selection.update(selected)
        return layer

    def ensure_prediction_layer(self, name: str):
        """One review layer, created with the image's shape when missing (or of another shape)."""
        from napari.layers import Image, Labels

        image_layer = self.image_layer()
        shape = self._image_shape()
        layer = self._layer(name)
        if layer is not None and tuple(layer.data.shape) != shape:
            self.viewer.layers.remove(layer)
            self._edited_predictions.discard(name)
            layer = None
        if layer is not None:
            return layer
        ndim = len(shape)
        meta = {"name": name, "scale": image_layer.scale[-ndim:], "translate": image_layer.translate[-ndim:],
                "axis_labels": axis_labels(ndim), "metadata": {METADATA_KEY: {"role": "prediction"}}}
        if name == PREDICTION_SEMANTIC:
            layer = Labels(np.zeros(shape, np.uint16), colormap=labels_colormap(self.classes), opacity=0.5, **meta)
        elif name == PREDICTION_INSTANCES:
            layer = Labels(np.zeros(shape, np.uint32), opacity=0.6, **meta)
            self._next_instance_id = 1
            layer.events.paint.connect(lambda *args: self._instance_painted(layer))
        else:
            layer = Image(np.zeros(shape, np.float32), colormap="magma", contrast_limits=(0.0, 1.0), opacity=0.6,
                          visible=False, blending="additive", **meta)
            return self._add_keeping_selection(layer)
        self._add_keeping_selection(layer)
        layer.events.paint.connect(lambda *args: self._prediction_edited(name))
        layer.events.data.connect(lambda *args: self._prediction_edited(name))
        return layer

    def ensure_prediction_layers(self) -> dict[str, object]:
        """The three review layers, created with the image's shape when missing."""
        return {name: self.ensure_prediction_layer(name) for name in PREDICTION_LAYERS}

    def write_prediction(self, piece: PredictionPiece) -> None:
        """Put a predicted plane, region or the linked instance stack into the review layers."""
        layers = self.ensure_prediction_layers()
        semantic, instances, confidence = (layers[n] for n in PREDICTION_LAYERS)
        if piece.linked_instances is not None:
            instances.data[...] = piece.linked_instances
            self._next_instance_id = int(piece.linked_instances.max(initial=0)) + 1
        else:
            h, w = piece.semantic.shape
            y0, x0 = piece.origin
            index = (() if piece.z is None else (piece.z,)) + (slice(y0, y0 + h), slice(x0, x0 + w))
            semantic.data[index] = piece.semantic
            confidence.data[index] = piece.confidence
            offset = self._next_instance_id - 1
            found = piece.instances > 0
            shifted = np.where(found, piece.instances.astype(np.uint32) + offset, 0).astype(np.uint32)
            instances.data[index] = shifted
            self._next_instance_id = max(self._next_instance_id, int(shifted.max(initial=0)) + 1)
        for layer in (semantic, instances, confidence):
            layer.refresh()
        self._edited_predictions.difference_update({PREDICTION_SEMANTIC, PREDICTION_INSTANCES})

    def preview_picture(self, z: int | None, region: Region, class_map: np.ndarray) -> np.ndarray:
        """RGB (h, w, 3) uint8 picture of a live preview: the image region in grey with the predicted
        classes in their colours on top (drawn in the panel; no layer has to be built while training)."""
        y0, x0, y1, x1 = region
        data = self.image()
        crop = np.asarray(data[(() if z is None else (z,)) + (slice(y0, y1), slice(x0, x1))], dtype=np.float32)
        low, high = np.percentile(crop, [1, 99]) if crop.size else (0.0, 1.0)
        grey = np.clip((crop - low) / max(float(high - low), 1e-6), 0, 1)
        picture = np.repeat(grey[..., None], 3, axis=2)
        classes = np.asarray(class_map)[: crop.shape[0], : crop.shape[1]]
        n = max([*self.class_ids, int(classes.max(initial=0))]) + 1
        palette = class_colors(list(range(n)), self.classes)[:, :3]
        painted = classes > 0
        picture[painted] = 0.55 * picture[painted] + 0.45 * palette[classes[painted]]
        return np.ascontiguousarray((picture * 255).round().astype(np.uint8))

    # ------------------------------------------------------------------------ accepting

    def accept(self, selected_only: bool = False, instance_ids: Sequence[int] | None = None) -> int:
        """Copy the corrected prediction of the plane in view into the Masks annotation.

        The whole plane: each pixel gets the class of "Prediction: semantic"; pixels of an instance in
        "Prediction: instances" get that instance's class; pixels of an instance class outside every
        instance (an object erased from the instances) are left unannotated. ``selected_only``: only the
        instances ``instance_ids`` (default: the label selected in the instances layer). Masks pixels
        where the prediction is empty keep their annotation. Returns the number of pixels written.
        """
        semantic_layer = self._layer(PREDICTION_SEMANTIC)
        if semantic_layer is None:
            raise SessionError("There is no prediction to accept yet. Predict the plane first (Predict section).")
        instances_layer = self._layer(PREDICTION_INSTANCES)
        z = self.current_plane()
        plane = (lambda data: np.asarray(data[z])) if z is not None else (lambda data: np.asarray(data))
        semantic = plane(semantic_layer.data).astype(np.int64)
        instances = plane(instances_layer.data).astype(np.int64) if instances_layer is not None else None
        instance_classes = [c.id for c in self.classes if c.instances]
        if instances is not None:
            instance_class = self._instance_classes(semantic, instances, instance_classes)
        where = f"plane {z}" if z is not None else "the image"
        if selected_only:
            if instances is None:
                raise SessionError("There is no 'Prediction: instances' layer; predict first.")
            ids = [int(i) for i in (instance_ids if instance_ids is not None else [instances_layer.selected_label])]
            chosen = np.isin(instances, ids) & (instances > 0)
            if not chosen.any():
                raise SessionError(f"Instance {', '.join(map(str, ids))} is not in {where}. Select the instance "
                                   "with the colour picker of the 'Prediction: instances' layer (or type its "
                                   "label), then accept again.")
            accepted = np.where(chosen, instance_class[instances], 0)
        else:
            accepted = semantic.copy()
            if instances is not None and instance_classes:
                covered = instances > 0
                accepted[covered] = instance_class[instances[covered]]
                accepted[np.isin(accepted, instance_classes) & ~covered] = 0
        accepted[~np.isin(accepted, self.class_ids)] = 0
        if not np.any(accepted):
            raise SessionError(f"The prediction of {where} is empty; predict this plane first.")
        masks = self.ensure_annotation_layer("masks")
        rows, cols = np.nonzero(accepted)
        values = accepted[rows, cols].astype(masks.data.dtype)
        indices = (rows, cols) if z is None else (np.full(len(rows), z), rows, cols)
        masks.data_setitem(indices, values)
        masks.refresh()
        self.mark_dirty()
        if not selected_only:
            self._edited_predictions.difference_update({PREDICTION_SEMANTIC, PREDICTION_INSTANCES})
        return len(rows)

    def _instance_classes(self, semantic: np.ndarray, instances: np.ndarray, instance_classes: list[int]) -> np.ndarray:
        """Lookup instance id -> class: the instance class most of its pixels have in the semantic
        prediction, else the first instance class (for objects painted where no instance class was)."""
        n = int(instances.max(initial=0)) + 1
        fallback = instance_classes[0] if instance_classes else 0
        lookup = np.full(n, fallback, dtype=np.int64)
        lookup[0] = 0
        inside = instances > 0
        if instance_classes and inside.any():
            pairs = np.stack([instances[inside], semantic[inside]])
            pairs = pairs[:, np.isin(pairs[1], instance_classes)]
            if pairs.size:
                uniq, counts = np.unique(pairs, axis=1, return_counts=True)
                order = np.lexsort((counts, uniq[0]))  # within an instance, the largest count last
                uniq = uniq[:, order]
                last = np.r_[uniq[0, 1:] != uniq[0, :-1], True]
                lookup[uniq[0, last]] = uniq[1, last]
        return lookup

    # ---------------------------------------------------------------------------- model

    def set_model(self, model: TrainedModel, source: str = "") -> None:
        self.model = model
        self.model_source = source

    def continue_plan(self) -> tuple[Path | None, TrainedModel | None]:
        """What "Continue training" starts from: (checkpoint of a stopped run, or the current model)."""
        model = self.check_model()
        if self.resumable_checkpoint is not None and Path(self.resumable_checkpoint).is_file():
            return Path(self.resumable_checkpoint), None
        return None, model

    def model_info(self) -> str:
        """What the current model was trained on, as text for the Model section."""
        return model_info_text(self.model, self.model_source)


def model_info_text(model: TrainedModel | None, source: str = "") -> str:
    """Classes, annotation counts and steps of a model, from its ``training_info``."""
    if model is None:
        return "No model yet: train one, or load a model file."
    info = model.training_info or {}
    lines = []
    if source:
        lines.append(source)
    steps = info.get("steps")
    config = info.get("train_config") or {}
    total = config.get("steps")
    if steps is not None:
        lines.append(f"Trained {steps} step(s)" + (f" of {total}" if total and total != steps else "")
                     + (f", last loss {info['last_losses']['total']:.3f}"
                        if isinstance(info.get("last_losses"), dict) and "total" in info["last_losses"] else ""))
    names = ", ".join(f"{c.name}{' (instances)' if c.instances else ''}" for c in model.classes)
    lines.append(f"Classes: {names}")
    totals = info.get("totals")
    if totals:
        lines.append(f"Annotations: {totals.get('mask_pixels', 0)} mask pixels, {totals.get('boxes', 0)} boxes, "
                     f"{totals.get('points', 0)} points, {totals.get('tags', 0)} tags")
    per_class = info.get("annotations") or {}
    for name, counts in per_class.items():
        parts = [f"{counts[k]} {label}" for k, label in
                 (("mask_pixels", "px"), ("boxes", "boxes"), ("points", "points"), ("tags_present", "tags +"),
                  ("tags_absent", "tags −")) if counts.get(k)]
        lines.append(f"  {name}: {', '.join(parts) if parts else 'nothing'}")
    planes = info.get("planes_annotated")
    if planes:
        lines.append(f"Planes annotated: {format_ranges(planes)}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------- saving


@dataclass
class ProjectSnapshot:
    """What the project folder should hold; :meth:`write` may run on any thread."""

    folder: Path
    image: np.ndarray
    annotations: AnnotationSet

    def write(self) -> Path:
        """Write the annotations (and the image, once) into the project folder."""
        folder = Path(self.folder)
        has_image = (folder / IMAGE_FILE).is_file()
        return write_project(folder, self.image, self.annotations, write_image=not has_image)


# ---------------------------------------------------------------------- background runs


class PreviewTarget:
    """Where the live preview should look; set by the GUI thread, read by the training thread."""

    def __init__(self, every_seconds: float = 3.0):
        self.every_seconds = every_seconds
        self._lock = threading.Lock()
        self._region: tuple[int | None, Region] | None = None

    def set(self, z: int | None, region: Region) -> None:
        with self._lock:
            self._region = (z, tuple(int(v) for v in region))

    def get(self) -> tuple[int | None, Region] | None:
        with self._lock:
            return self._region


@dataclass
class TrainingUpdate:
    """One message of a training run: a progress event (with the region of its preview), or a note."""

    event: TrainEvent | None = None
    preview_at: tuple[int | None, Region] | None = None
    note: str = ""
    saved: Path | None = None
    model_file: Path | None = None


def training_run(
    image: np.ndarray,
    annotations: AnnotationSet,
    config: TrainConfig,
    *,
    snapshot: ProjectSnapshot | None = None,
    resume: Path | None = None,
    initial_model: TrainedModel | None = None,
    preview: PreviewTarget | None = None,
    stop: Callable[[], bool] | None = None,
) -> Iterator[TrainingUpdate]:
    """Save the project, then train; yields :class:`TrainingUpdate`s (runs on a worker thread).

    The checkpoint and, at the end, the model file are written into the project folder. The last
    update carries the final :class:`TrainEvent` with the model (also after a stop).
    """
    folder = None
    if snapshot is not None:
        try:
            folder = snapshot.write()
            yield TrainingUpdate(saved=folder)
        except (OSError, ProjectError) as err:
            yield TrainingUpdate(note=f"The project could not be saved to {snapshot.folder} ({err}); "
                                 "training goes on. Choose another project folder in the Project section.")
            folder = None
    checkpoint = (folder / CHECKPOINT_FILE) if folder is not None else None
    request = PreviewRequest(0, 0, 0, 1, 1, every_seconds=preview.every_seconds) if preview is not None else None

    def aim_preview():
        target = preview.get() if preview is not None else None
        if target is None:
            return None
        z, (y0, x0, y1, x1) = target
        request.z, request.y0, request.x0, request.y1, request.x1 = z, y0, x0, y1, x1
        return target

    aimed = aim_preview()
    events = train(image, annotations, config, checkpoint_path=checkpoint, resume=resume,
                   initial_model=initial_model, preview=request if aimed is not None else None, stop=stop)
    try:
        for event in events:
            update = TrainingUpdate(event=event, preview_at=aimed if event.preview is not None else None)
            if event.model is not None and folder is not None:
                try:
                    save_model(folder / MODEL_FILE, event.model)
                    update.model_file = folder / MODEL_FILE
                except (OSError, ValueError) as err:
                    update.note = f"The model could not be saved into the project folder ({err})."
            yield update
            if request is not None:
                aimed = aim_preview()
    finally:
        events.close()


def prediction_settings(decoder: str = DEFAULT_DECODER, tta: bool = False) -> DecoderSettings:
    """The decoder settings the panel predicts with: the decoder chosen, test-time augmentation as
    ticked, a whole stack's objects linked from plane to plane into 3D objects, the rest as
    :class:`~napari_protoseg.prediction.pipeline.DecoderSettings` has them (as ``protoseg predict``)."""
    return DecoderSettings(decoder=decoder, tta=tta, link_3d=True)
