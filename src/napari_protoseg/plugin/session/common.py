"""What every part of the session shares: its error, the layer names and roles, a region's type."""

from __future__ import annotations

from napari_protoseg.plugin.layers import BOXES_LAYER, MASKS_LAYER, POINTS_LAYER, TAGS_LAYER

PREDICTION_SEMANTIC = "Prediction: semantic"
PREDICTION_INSTANCES = "Prediction: instances"
PREDICTION_CONFIDENCE = "Prediction: confidence"
PREDICTION_LAYERS = (PREDICTION_SEMANTIC, PREDICTION_INSTANCES, PREDICTION_CONFIDENCE)
ANNOTATION_ROLES = {"masks": MASKS_LAYER, "boxes": BOXES_LAYER, "points": POINTS_LAYER, "tags": TAGS_LAYER}
ROLE_LAYER_TYPES = {"masks": "Labels", "boxes": "Shapes", "points": "Points", "tags": "Shapes"}

Region = tuple[int, int, int, int]  # (y0, x0, y1, x1), half-open pixel range of a plane


class SessionError(Exception):
    """Something the user can fix; ``str(err)`` is the message for a notification."""


def is_layer_of_role(layer, role: str) -> bool:
    """Whether ``layer`` has the napari layer type of an annotation role."""
    import napari.layers

    return isinstance(layer, getattr(napari.layers, ROLE_LAYER_TYPES[role]))


def problem_lines(problems) -> str:
    return "\n".join(f"- {p}" for p in problems)


def layer_named(viewer, name: str):
    """The viewer's layer called ``name``, or None."""
    return viewer.layers[name] if name in viewer.layers else None


def add_keeping_selection(viewer, layer):
    """Add a layer without taking the active layer away from what the user works on."""
    selection = viewer.layers.selection
    active, selected = selection.active, set(selection)
    if active is None:
        viewer.add_layer(layer)  # as napari does: the new layer becomes the active one
        return layer
    # napari makes a new layer the active one; the user's layer is put back at once. Meanwhile the
    # selection stays silent: napari would rebuild the layer controls and canvas overlays twice for
    # nothing (a few hundred ms of its event loop with software OpenGL).
    with selection.events.blocker_all():
        viewer.add_layer(layer)
        selection.active = active
        selection.update(selected)
    return layer
