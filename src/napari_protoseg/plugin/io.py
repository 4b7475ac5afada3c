"""napari reader and writer for annotation project folders (npe2 contributions)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from napari_protoseg.plugin.layers import (
    BOXES_LAYER,
    MASKS_LAYER,
    METADATA_KEY,
    POINTS_LAYER,
    TAGS_LAYER,
    annotation_layers,
    axis_labels,
    annotations_from_layers,
    classes_from_metadata,
)
from napari_protoseg.annotations.project import ClassInfo, Problem, ProjectError, is_project_folder, read_project, write_project


def get_reader(path):
    """Return a reader for a project folder, or None for anything else."""
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    if not is_project_folder(path):
        return None
    return read_project_layers


def read_project_layers(path) -> list[tuple]:
    """Layers of a project folder: the image, then Masks, Boxes, Points and Tags."""
    from napari.utils.notifications import show_error

    path = Path(path[0] if isinstance(path, list) else path)
    try:
        project = read_project(path)
    except ProjectError as err:
        show_error(f"Cannot open {path.name} as an annotation project.\n{err}")
        return [(None,)]
    image_layer = (project.image, {
        "name": path.name,
        "axis_labels": axis_labels(project.image.ndim),
        "metadata": {METADATA_KEY: {"role": "image", "project": str(path.resolve())}},
    }, "image")
    return [image_layer] + annotation_layers(project.annotations)


def _role(attributes: dict) -> str | None:
    entry = (attributes.get("metadata") or {}).get(METADATA_KEY) or {}
    return entry.get("role")


def _classes_from_layers(layer_data: list[tuple], used_ids: set[int]) -> list[ClassInfo]:
    for _, attributes, _ in layer_data:
        classes = classes_from_metadata(attributes.get("metadata") or {})
        if classes:
            known = {c.id for c in classes}
            return classes + [ClassInfo(i, f"class {i}") for i in sorted(used_ids - known)]
    return [ClassInfo(i, f"class {i}") for i in sorted(used_ids)]


def _features(attributes: dict):
    features = attributes.get("features")
    if features is None:
        return None
    return {name: list(features[name]) for name in features}


def layers_to_project(layer_data: list[tuple]):
    """Image and ``AnnotationSet`` from the layers napari hands to a writer."""
    by_type: dict[str, list[tuple]] = {}
    for data, attributes, layer_type in layer_data:
        by_type.setdefault(layer_type, []).append((data, attributes))
    images = by_type.get("image", [])
    if len(images) != 1:
        raise ProjectError([Problem("layers", f"select exactly one image layer to save a project "
                                    f"(got {len(images)}).")])
    image = np.asarray(images[0][0])
    labels = by_type.get("labels", [])
    points = by_type.get("points", [])
    if len(labels) > 1 or len(points) > 1:
        raise ProjectError([Problem("layers", f"select at most one {MASKS_LAYER} (Labels) and one "
                                    f"{POINTS_LAYER} layer to save a project.")])
    boxes, tags = [], []
    for data, attributes in by_type.get("shapes", []):
        features = _features(attributes) or {}
        is_tags = _role(attributes) == "tags" or attributes.get("name") == TAGS_LAYER or "present" in features
        (tags if is_tags else boxes).append((data, attributes))
    if len(boxes) > 1 or len(tags) > 1:
        raise ProjectError([Problem("layers", f"select at most one {BOXES_LAYER} and one {TAGS_LAYER} "
                                    "Shapes layer to save a project.")])

    masks = np.asarray(labels[0][0]) if labels else None
    used: set[int] = set()
    if masks is not None:
        used.update(int(v) for v in np.unique(masks) if v != 0)
    for data, attributes in boxes + tags + points:
        used.update(int(c) for c in (_features(attributes) or {}).get("class", []))
    classes = _classes_from_layers(layer_data, used)
    annotations = annotations_from_layers(
        image.shape, classes,
        masks=masks,
        boxes=(boxes[0][0], _features(boxes[0][1])) if boxes else None,
        box_shape_types=boxes[0][1].get("shape_type") if boxes else None,
        points=(points[0][0], _features(points[0][1])) if points else None,
        tags=(tags[0][0], _features(tags[0][1])) if tags else None,
    )
    return image, annotations


def write_project_layers(path: str, layer_data: list[tuple]) -> list[str]:
    """Write the selected layers as a project folder at ``path``; returns the folder path."""
    image, annotations = layers_to_project(layer_data)
    folder = write_project(path, image, annotations)
    return [str(folder)]
