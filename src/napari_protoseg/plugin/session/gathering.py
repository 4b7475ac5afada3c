"""Gathering the annotation layers into an :class:`AnnotationSet`, and saying what is wrong with them."""

from __future__ import annotations

import numpy as np

from napari_protoseg.annotations.project import AnnotationSet, ProjectError
from napari_protoseg.plugin.layers import annotations_from_layers
from napari_protoseg.plugin.session.annotation_layers import AnnotationLayers
from napari_protoseg.plugin.session.common import SessionError, problem_lines
from napari_protoseg.training.engine import check_training_input


def _layer_shape_problems(layers: AnnotationLayers, image_name: str, shape: tuple[int, ...]) -> list[str]:
    messages = []
    masks = layers.layer("masks")
    if masks is not None and tuple(masks.data.shape) != shape:
        messages.append(f"The '{masks.name}' layer has shape {tuple(masks.data.shape)} but the image '{image_name}' "
                        f"has shape {shape}.")
    for role in ("boxes", "points", "tags"):
        layer = layers.layer(role)
        if layer is not None and len(layer.data) and layer.ndim != len(shape):
            messages.append(f"The '{layer.name}' layer is {layer.ndim}-D but the image '{image_name}' is "
                            f"{len(shape)}-D.")
    if messages:
        messages.append("Annotation layers must match the image they annotate: choose the image they "
                        "were drawn on, or delete (or rename) these layers and create new ones for this "
                        "image in the Annotate section.")
    return messages


def _features(layer) -> dict[str, list]:
    return {name: list(layer.features[name]) for name in layer.features}


def gather_annotations(layers: AnnotationLayers) -> tuple[np.ndarray, AnnotationSet]:
    """The chosen image and everything drawn on it; ``SessionError`` listing what is wrong."""
    image = layers.image.data()
    shape = tuple(int(s) for s in np.shape(image))
    messages = _layer_shape_problems(layers, layers.image.layer().name, shape)
    if messages:
        raise SessionError("\n".join(messages))

    def shapes_part(role):
        layer = layers.layer(role)
        if layer is None or len(layer.data) == 0:
            return None
        return list(layer.data), _features(layer)

    masks_layer = layers.layer("masks")
    boxes_layer = layers.layer("boxes")
    points_layer = layers.layer("points")
    points = None
    if points_layer is not None and len(points_layer.data):
        points = (np.asarray(points_layer.data), _features(points_layer))
    try:
        annotations = annotations_from_layers(
            shape, layers.classes,
            masks=np.asarray(masks_layer.data) if masks_layer is not None else None,
            boxes=shapes_part("boxes"),
            box_shape_types=list(boxes_layer.shape_type) if boxes_layer is not None and len(boxes_layer.data)
            else None,
            points=points,
            tags=shapes_part("tags"),
        )
    except ProjectError as err:
        raise SessionError("Some annotations cannot be used:\n" + problem_lines(err.problems)) from None
    return image, annotations


def gather_training_input(layers: AnnotationLayers) -> tuple[np.ndarray, AnnotationSet]:
    """Image and annotations ready to train on, or ``SessionError`` saying what to do."""
    image, annotations = gather_annotations(layers)
    problems = check_training_input(image, annotations)
    if problems:
        raise SessionError("Cannot train yet:\n" + problem_lines(problems))
    return image, annotations
