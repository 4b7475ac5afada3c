"""The annotation layers (Masks, Boxes, Points, Tags): finding and creating them, drawing in a class,
the image tags, and keeping their colours and metadata in step with the class table."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from napari_protoseg.annotations.project import NO_REGION, REGION_FIELDS, AnnotationSet, empty_tags
from napari_protoseg.plugin.layers import (
    METADATA_KEY,
    annotation_layers,
    class_colors,
    labels_colormap,
    layer_metadata,
    shapes_to_tags,
    tags_to_shapes,
)
from napari_protoseg.plugin.session.classes import ClassTable
from napari_protoseg.plugin.session.common import (
    ANNOTATION_ROLES,
    Region,
    add_keeping_selection,
    is_layer_of_role,
    layer_named,
)
from napari_protoseg.plugin.session.image import ImageChoice

TAG_PRESENT, TAG_ABSENT, TAG_UNKNOWN = "present", "absent", "unknown"
TAG_STATES = (TAG_PRESENT, TAG_ABSENT, TAG_UNKNOWN)
DRAWING_MODES = {"masks": "paint", "boxes": "add_rectangle", "points": "add"}


class AnnotationLayers:
    """The annotation layers of the chosen image and the class new annotations are drawn in.
    ``edited()`` is called whenever a watched layer changes."""

    def __init__(self, viewer, image: ImageChoice, class_table: ClassTable, edited: Callable[..., None]):
        self.viewer = viewer
        self.image = image
        self.class_table = class_table
        self._edited = edited
        self.drawing_class: int | None = None
        self.exhaustive = False  # new boxes and points mark every object of their class in the plane
        self._watched: set[int] = set()

    @property
    def classes(self):
        return self.class_table.classes

    # ------------------------------------------------------------------------ the layers

    def layer(self, role: str):
        """The annotation layer of a role ("masks", "boxes", "points", "tags"), or None."""
        for layer in self.viewer.layers:
            entry = layer.metadata.get(METADATA_KEY) or {}
            if entry.get("role") == role and is_layer_of_role(layer, role):
                return layer
        layer = layer_named(self.viewer, ANNOTATION_ROLES[role])
        if layer is not None and is_layer_of_role(layer, role):
            return layer
        return None

    def ensure(self, role: str):
        """The annotation layer of a role, created empty for the chosen image if missing."""
        from napari.layers import Layer

        layer = self.layer(role)
        if layer is not None:
            self.watch(layer)
            return layer
        shape = self.image.shape()  # refuses RGB images with a message
        empty = AnnotationSet(image_shape=shape, classes=self.classes)
        data, meta, kind = annotation_layers(empty)[list(ANNOTATION_ROLES).index(role)]
        meta.update(self.image.place_like_image(len(shape)))
        layer = Layer.create(data, meta, kind)
        add_keeping_selection(self.viewer, layer)
        self.watch(layer)
        self.set_drawing_class(self.drawing_class)
        return layer

    def watch(self, layer) -> None:
        """Report every change of the annotation layer to ``edited`` (the project needs saving)."""
        if id(layer) in self._watched:
            return
        self._watched.add(id(layer))
        if hasattr(layer.events, "paint"):
            layer.events.paint.connect(self._edited)
        layer.events.data.connect(self._edited)
        if hasattr(layer.events, "features"):
            layer.events.features.connect(self._edited)
        if is_layer_of_role(layer, "boxes") or is_layer_of_role(layer, "points"):
            role = (layer.metadata.get(METADATA_KEY) or {}).get(
                "role", "points" if is_layer_of_role(layer, "points") else "boxes")
            layer.events.data.connect(lambda event, layer=layer, role=role: self.recolor_items(layer, role))

    def watch_all(self) -> None:
        for role in ANNOTATION_ROLES:
            layer = self.layer(role)
            if layer is not None:
                self.watch(layer)

    def class_in_use(self, class_id: int) -> bool:
        """Whether any annotation layer holds something of the class."""
        masks = self.layer("masks")
        if masks is not None and np.any(np.asarray(masks.data) == class_id):
            return True
        for role in ("boxes", "points", "tags"):
            layer = self.layer(role)
            if layer is not None and "class" in layer.features and len(layer.features):
                if np.any(np.asarray(layer.features["class"], dtype=float) == class_id):
                    return True
        return False

    # ------------------------------------------------------------------- class colours

    def apply_classes(self) -> None:
        """Push the class table into every annotation layer: colours, metadata, the drawing class."""
        colormap = labels_colormap(self.classes)
        for role in ANNOTATION_ROLES:
            layer = self.layer(role)
            if layer is None:
                continue
            layer.metadata = {**layer.metadata, **layer_metadata(role, self.classes)}
            if role == "masks":
                layer.colormap = colormap
            else:
                self.recolor_items(layer, role)
        self.set_drawing_class(self.drawing_class)

    def recolor_items(self, layer, role: str) -> None:
        """Colour each box or point as its class."""
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

    # ------------------------------------------------------------------------- drawing

    def set_drawing_class(self, class_id: int | None) -> None:
        """New masks, boxes and points are drawn in this class (and its colour)."""
        if class_id not in self.class_table.ids:
            class_id = self.classes[0].id if self.classes else None
        self.drawing_class = class_id
        if class_id is None:
            return
        color = self.class_table.by_id(class_id).display_color()
        masks = self.layer("masks")
        if masks is not None:
            masks.selected_label = class_id
        defaults = {"class": class_id, "exhaustive": bool(self.exhaustive)}
        boxes = self.layer("boxes")
        if boxes is not None:
            boxes.feature_defaults = defaults
            boxes.current_edge_color = color
            self.recolor_items(boxes, "boxes")
        points = self.layer("points")
        if points is not None:
            points.feature_defaults = defaults
            points.current_face_color = color
            self.recolor_items(points, "points")

    def set_exhaustive(self, exhaustive: bool) -> None:
        self.exhaustive = bool(exhaustive)
        self.set_drawing_class(self.drawing_class)

    def activate(self, role: str):
        """Create or pick the layer of a role, select it and put it into its drawing mode."""
        layer = self.ensure(role)
        self.viewer.layers.selection.active = layer
        layer.visible = True
        mode = DRAWING_MODES.get(role)
        if mode is not None:
            layer.mode = mode
        self.set_drawing_class(self.drawing_class)
        return layer

    # ---------------------------------------------------------------------------- tags

    def _read_tags(self, layer) -> np.ndarray:
        if len(layer.data) == 0:
            return empty_tags()
        features = {name: list(layer.features[name]) for name in layer.features}
        return shapes_to_tags(layer.data, features, self.image.shape())

    def _write_tags(self, layer, tags: np.ndarray) -> None:
        data, features = tags_to_shapes(tags, self.image.shape(), self.classes)
        layer.selected_data = set()
        layer.data = data
        if len(data):
            layer.features = features
            layer.edge_color = class_colors(features["class"], self.classes)
        layer.refresh_text()

    def apply_tag_labels(self) -> None:
        """Rebuild the Tags layer so its text shows the current class names."""
        layer = self.layer("tags")
        if layer is not None and len(layer.data):
            self._write_tags(layer, self._read_tags(layer))

    def tag_states(self, z: int | None, region: Region | None = None) -> dict[int, str]:
        """Per class: "present", "absent" or "unknown" for plane ``z`` (or a region of it)."""
        states = {c.id: TAG_UNKNOWN for c in self.classes}
        layer = self.layer("tags")
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
        self.class_table.by_id(class_id)
        layer = self.ensure("tags")
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
        self._edited()
