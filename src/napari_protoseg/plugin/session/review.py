"""The review layers: predictions written into "Prediction: semantic / instances / confidence", the
user's edits of them tracked, and corrected predictions accepted into the Masks annotation."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from napari_protoseg.plugin.layers import METADATA_KEY, axis_labels, labels_colormap
from napari_protoseg.plugin.session.annotation_layers import AnnotationLayers
from napari_protoseg.plugin.session.common import (
    PREDICTION_CONFIDENCE,
    PREDICTION_INSTANCES,
    PREDICTION_LAYERS,
    PREDICTION_SEMANTIC,
    SessionError,
    add_keeping_selection,
    layer_named,
)
from napari_protoseg.prediction.pipeline import PredictionPiece


class PredictionLayers:
    """The three review layers of the chosen image. ``edited()`` is called when accepting changed
    the Masks annotation."""

    def __init__(self, viewer, annotation_layers: AnnotationLayers, edited: Callable[[], None]):
        self.viewer = viewer
        self.annotation_layers = annotation_layers
        self.image = annotation_layers.image
        self.class_table = annotation_layers.class_table
        self._edited = edited
        self._edited_predictions: set[str] = set()
        self._next_instance_id = 1
        self._unshown: set[str] = set()  # review layers made hidden, not shown yet

    # ------------------------------------------------------------------------ creating

    def creation_steps(self, names: Sequence[str] = PREDICTION_LAYERS) -> list[Callable[[], None]]:
        """The work of creating the missing review layers (of ``names``) in small steps: per layer,
        make it (hidden), then add it to the viewer. The panel runs one step per turn of napari's event
        loop, so that napari repaints in between; :meth:`ensure` runs them at once. The layers stay
        hidden until their first prediction is redrawn (:meth:`redraw`) or :meth:`showing_steps` runs."""
        return [step for name in names for step in self._creation_steps(name)]

    def absent(self) -> list[str]:
        """The review layers not in the viewer."""
        return [name for name in PREDICTION_LAYERS if layer_named(self.viewer, name) is None]

    def showing_steps(self) -> list[Callable[[], None]]:
        """One step per review layer: show it if it was made hidden and never shown since (a layer
        holds nothing before; confidence stays hidden, as when it is made)."""
        return [lambda name=name: self._show_new(name) for name in PREDICTION_LAYERS]

    def _show_new(self, name: str) -> None:
        layer = layer_named(self.viewer, name)
        if name in self._unshown and layer is not None:
            self._unshown.discard(name)
            if name != PREDICTION_CONFIDENCE:
                layer.visible = True

    def _creation_steps(self, name: str) -> list[Callable[[], None]]:
        made = {}

        def make():
            made["layer"] = self._make(name)

        def add():
            layer = made.get("layer")
            if layer is not None and layer_named(self.viewer, name) is None:
                add_keeping_selection(self.viewer, layer)
                self._track_edits(name, layer)
                self._unshown.add(name)

        return [make, add]

    def _make(self, name: str):
        """A new, hidden review layer of the image's shape; None when a fitting one is there already
        (one of another shape is removed)."""
        from napari.layers import Image, Labels

        shape = self.image.shape()
        layer = layer_named(self.viewer, name)
        if layer is not None and (tuple(layer.data.shape) != shape or not self._holds_class_ids(layer)):
            self.viewer.layers.remove(layer)
            self._edited_predictions.discard(name)
            self._unshown.discard(name)
            layer = None
        if layer is not None:
            return None
        ndim = len(shape)
        # Made hidden: napari then neither slices nor draws it until it is shown (a later step).
        meta = {"name": name, **self.image.place_like_image(ndim), "axis_labels": axis_labels(ndim),
                "metadata": {METADATA_KEY: {"role": "prediction"}}, "visible": False}
        if name == PREDICTION_SEMANTIC:
            return Labels(np.zeros(shape, self._class_dtype()), colormap=labels_colormap(self.class_table.classes),
                          opacity=0.5, **meta)
        if name == PREDICTION_INSTANCES:
            return Labels(np.zeros(shape, np.uint32), opacity=0.6, **meta)
        return Image(np.zeros(shape, np.float32), colormap="magma", contrast_limits=(0.0, 1.0), opacity=0.6,
                     blending="additive", **meta)

    def _class_dtype(self) -> np.dtype:
        """uint8 where the class ids fit (napari then colours the layer through a 256-entry table; for
        uint16 it builds one of 65536 entries in Python, about 0.3 s of its event loop), else uint16."""
        return np.dtype(np.uint8 if max(self.class_table.ids, default=0) <= 255 else np.uint16)

    def _holds_class_ids(self, layer) -> bool:
        if layer.name != PREDICTION_SEMANTIC:
            return True
        return np.iinfo(layer.data.dtype).max >= max(self.class_table.ids, default=0)

    def _track_edits(self, name: str, layer) -> None:
        if name == PREDICTION_CONFIDENCE:
            return
        if name == PREDICTION_INSTANCES:
            self._next_instance_id = 1
            layer.events.paint.connect(lambda *args: self._instance_painted(layer))
        layer.events.paint.connect(lambda *args: self._prediction_edited(name))
        layer.events.data.connect(lambda *args: self._prediction_edited(name))

    def ensure(self, name: str):
        """One review layer, created with the image's shape when missing (or of another shape)."""
        for step in self._creation_steps(name):
            step()
        self._show_new(name)
        return self.viewer.layers[name]

    def ensure_all(self) -> dict[str, object]:
        """The three review layers, created with the image's shape when missing."""
        return {name: self.ensure(name) for name in PREDICTION_LAYERS}

    def apply_classes(self) -> None:
        layer = layer_named(self.viewer, PREDICTION_SEMANTIC)
        if layer is not None:
            layer.colormap = labels_colormap(self.class_table.classes)

    # ------------------------------------------------------------------------- writing

    def edited(self) -> list[str]:
        """Prediction layers the user painted in since they were last predicted."""
        return [name for name in PREDICTION_LAYERS if name in self._edited_predictions and name in self.viewer.layers]

    def _prediction_edited(self, name: str, *_args) -> None:
        self._edited_predictions.add(name)

    def _instance_painted(self, layer) -> None:
        # A label the user painted is taken: later predictions number their instances above it.
        self._next_instance_id = max(self._next_instance_id, int(layer.selected_label) + 1)

    def _in_view(self, z: int | None) -> bool:
        """Whether plane ``z`` of the image is on the canvas (then its layers must be redrawn)."""
        if z is None or self.viewer.dims.ndisplay == 3:
            return True
        try:
            return self.image.current_plane() == z
        except SessionError:
            return True

    def write(self, piece: PredictionPiece, redraw: bool = True) -> list[str]:
        """Put a predicted plane, region or the linked instance stack into the review layers.

        Returns the names of the layers to redraw (those whose plane in view changed; napari slices
        other planes afresh when they come into view). With ``redraw`` they are redrawn here; without,
        the caller redraws each with :meth:`redraw` (the panel, one per turn of napari's event loop).
        """
        for step in self.creation_steps():
            step()
        semantic, instances, confidence = (self.viewer.layers[n] for n in PREDICTION_LAYERS)
        if piece.linked_instances is not None:
            instances.data[...] = piece.linked_instances
            self._next_instance_id = int(piece.linked_instances.max(initial=0)) + 1
            changed = [PREDICTION_INSTANCES]
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
            changed = list(PREDICTION_LAYERS) if self._in_view(piece.z) else []
        self._edited_predictions.difference_update({PREDICTION_SEMANTIC, PREDICTION_INSTANCES})
        if redraw:
            for name in changed:
                self.redraw(name)
            return []
        return changed

    def redraw(self, name: str) -> None:
        """Show a review layer's new data: a layer never shown yet is shown (napari slices it then),
        a shown one refreshed."""
        layer = layer_named(self.viewer, name)
        if layer is None:
            return
        if name in self._unshown:
            self._show_new(name)
        else:
            layer.refresh()

    # ------------------------------------------------------------------------ accepting

    def accept(self, selected_only: bool = False, instance_ids: Sequence[int] | None = None) -> int:
        """Copy the corrected prediction of the plane in view into the Masks annotation.

        The whole plane: each pixel gets the class of "Prediction: semantic"; pixels of an instance in
        "Prediction: instances" get that instance's class; pixels of an instance class outside every
        instance (an object erased from the instances) are left unannotated. ``selected_only``: only the
        instances ``instance_ids`` (default: the label selected in the instances layer). Masks pixels
        where the prediction is empty keep their annotation. Returns the number of pixels written.
        """
        semantic_layer = layer_named(self.viewer, PREDICTION_SEMANTIC)
        if semantic_layer is None:
            raise SessionError("There is no prediction to accept yet. Predict the plane first (Predict section).")
        instances_layer = layer_named(self.viewer, PREDICTION_INSTANCES)
        z = self.image.current_plane()
        plane = (lambda data: np.asarray(data[z])) if z is not None else (lambda data: np.asarray(data))
        semantic = plane(semantic_layer.data).astype(np.int64)
        instances = plane(instances_layer.data).astype(np.int64) if instances_layer is not None else None
        classes = self.class_table.classes
        instance_classes = [c.id for c in classes if c.instances]
        if instances is not None:
            instance_class = _instance_classes(semantic, instances, instance_classes)
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
        accepted[~np.isin(accepted, self.class_table.ids)] = 0
        if not np.any(accepted):
            raise SessionError(f"The prediction of {where} is empty; predict this plane first.")
        masks = self.annotation_layers.ensure("masks")
        rows, cols = np.nonzero(accepted)
        values = accepted[rows, cols].astype(masks.data.dtype)
        indices = (rows, cols) if z is None else (np.full(len(rows), z), rows, cols)
        masks.data_setitem(indices, values)
        masks.refresh()
        self._edited()
        if not selected_only:
            self._edited_predictions.difference_update({PREDICTION_SEMANTIC, PREDICTION_INSTANCES})
        return len(rows)


def _instance_classes(semantic: np.ndarray, instances: np.ndarray, instance_classes: list[int]) -> np.ndarray:
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
