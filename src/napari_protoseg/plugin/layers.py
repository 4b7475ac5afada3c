"""Conversion between an ``AnnotationSet`` and napari layer data, as pure functions.

No Qt and no viewer: the functions take and return arrays, feature tables and napari
``LayerDataTuple``s, so the reader, the writer, the widgets and the command line share them.

Napari places pixel centres at integer coordinates, so a box covering pixels ``[y0, y1)`` is the
rectangle from ``y0 - 0.5`` to ``y1 - 0.5``; reading a rectangle back takes the pixels whose
centres it covers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from napari_protoseg.annotations.project import (
    BOXES_FILE,
    MASKS_FILE,
    NO_REGION,
    POINTS_FILE,
    TAGS_FILE,
    REGION_FIELDS,
    AnnotationSet,
    ClassInfo,
    Problem,
    ProjectError,
    classes_from_json,
    empty_boxes,
    empty_points,
    empty_tags,
)

MASKS_LAYER = "Masks"
BOXES_LAYER = "Boxes"
POINTS_LAYER = "Points"
TAGS_LAYER = "Tags"
# How problems found in a layer are reported: the project file they would be written to -> layer.
_LAYER_OF_FILE = {MASKS_FILE: MASKS_LAYER, BOXES_FILE: BOXES_LAYER, POINTS_FILE: POINTS_LAYER,
                  TAGS_FILE: TAGS_LAYER}
# Key of the protoseg entry in a layer's metadata: {"role": ..., "classes": [...]}.
METADATA_KEY = "protoseg"
UNKNOWN_CLASS_COLOR = "#ff00ff"


def _layer_problem(layer: str, message: str, item: int | None = None) -> Problem:
    return Problem(f"{layer} layer", message, item, row_name="item")


def class_table_to_json(classes: Sequence[ClassInfo]) -> list[dict]:
    return [c.to_json() for c in classes]


def layer_metadata(role: str, classes: Sequence[ClassInfo]) -> dict:
    """Metadata that marks a layer as a protoseg annotation layer and carries the class table."""
    return {METADATA_KEY: {"role": role, "classes": class_table_to_json(classes)}}


def classes_from_metadata(metadata: Mapping) -> list[ClassInfo] | None:
    """The class table stored in a layer's metadata, or None (also where it is not a valid table)."""
    entry = metadata.get(METADATA_KEY) if metadata else None
    if not entry or "classes" not in entry:
        return None
    classes, problems = classes_from_json(entry["classes"], "layer metadata", allow_unknown_keys=True)
    return None if problems else classes


def axis_labels(ndim: int) -> tuple[str, ...]:
    """Axis names napari shows on its sliders: ("z", "y", "x") or ("y", "x")."""
    return ("z", "y", "x")[-ndim:]


def labels_colormap(classes: Sequence[ClassInfo]) -> dict:
    """A napari direct label colormap: each class id in its colour, 0 transparent."""
    colors: dict = {0: "transparent", None: UNKNOWN_CLASS_COLOR}
    colors.update({c.id: c.display_color() for c in classes})
    return colors


def class_colors(class_ids: Sequence[int], classes: Sequence[ClassInfo]) -> np.ndarray:
    """RGBA colours (N, 4) of the given class ids; unknown ids get magenta."""
    from napari.utils.colormaps.standardize_color import transform_color

    lookup = {c.id: c.display_color() for c in classes}
    names = [lookup.get(int(i), UNKNOWN_CLASS_COLOR) for i in class_ids]
    return transform_color(names) if names else np.zeros((0, 4), dtype=np.float32)


# --------------------------------------------------------------------------------- geometry


def _rectangle(z: int | None, y0: float, x0: float, y1: float, x1: float) -> np.ndarray:
    corners = np.array([[y0, x0], [y0, x1], [y1, x1], [y1, x0]], dtype=float) - 0.5
    if z is None:
        return corners
    return np.column_stack([np.full(4, float(z)), corners])


def _rectangle_pixels(vertices: np.ndarray) -> tuple[int, int, int, int]:
    """Half-open pixel range ``(y0, x0, y1, x1)`` whose pixel centres lie inside the rectangle."""
    yx = np.asarray(vertices, dtype=float)[:, -2:]
    y_min, x_min = yx.min(axis=0)
    y_max, x_max = yx.max(axis=0)
    # Rounding first keeps float noise around the .5 borders from moving a border by a pixel.
    y0, x0 = np.ceil(np.round([y_min, x_min], 6)).astype(int)
    y1, x1 = (np.floor(np.round([y_max, x_max], 6)) + 1).astype(int)
    return int(y0), int(x0), int(y1), int(x1)


def _plane_of(vertices: np.ndarray, is_stack: bool, what: str, index: int, problems: list) -> int:
    vertices = np.asarray(vertices, dtype=float)
    if not is_stack:
        return 0
    if vertices.shape[1] < 3:
        problems.append(_layer_problem(what, "has no plane coordinate although the image is a stack.", index + 1))
        return -1
    z = vertices[:, -3]
    if not np.allclose(z, z[0]):
        problems.append(_layer_problem(what, "spans several planes; draw it within one plane.", index + 1))
        return -1
    return int(round(float(z[0])))


# ------------------------------------------------------------------------------------ masks


def masks_to_labels(annotations: AnnotationSet, dtype=np.uint16) -> np.ndarray:
    """The Labels data of the masks (zeros where nothing is annotated)."""
    if annotations.masks is None:
        return np.zeros(annotations.image_shape, dtype=dtype)
    return annotations.masks.astype(dtype, copy=True)


def labels_to_masks(labels: np.ndarray | None, image_shape: Sequence[int]) -> np.ndarray | None:
    """Masks from Labels data; None if nothing is painted. Raises on a shape mismatch."""
    if labels is None:
        return None
    labels = np.asarray(labels)
    if tuple(labels.shape) != tuple(image_shape):
        raise ProjectError([_layer_problem(MASKS_LAYER, f"has shape {tuple(labels.shape)} but the image "
                                    f"has shape {tuple(image_shape)}; draw masks on a Labels layer of "
                                    "the image's shape.")])
    if not np.any(labels):
        return None
    return labels.copy()


# ------------------------------------------------------------------------------------ boxes


def boxes_to_shapes(boxes: np.ndarray, is_stack: bool) -> tuple[list[np.ndarray], dict]:
    """Rectangles (napari Shapes data) and their features (``class``, ``exhaustive``)."""
    data = [
        _rectangle(int(b["z"]) if is_stack else None, b["y0"], b["x0"], b["y1"], b["x1"])
        for b in boxes
    ]
    features = {"class": boxes["class"].astype(int).tolist(),
                "exhaustive": boxes["exhaustive"].astype(bool).tolist()}
    return data, features


def _feature_column(features, name: str, n: int, default, what: str) -> list:
    if features is None or name not in features:
        if default is None:
            raise ProjectError([_layer_problem(what, f"has no '{name}' feature; each shape or point "
                                        "needs the class it belongs to.")])
        return [default] * n
    column = features[name]
    values = column.tolist() if hasattr(column, "tolist") else list(column)
    if len(values) != n:
        raise ProjectError([_layer_problem(what, f"'{name}' feature has {len(values)} values for {n} "
                                    "items.")])
    return values


def _class_value(value, what: str, index: int, problems: list) -> int:
    try:
        f = float(value)
    except (TypeError, ValueError):
        problems.append(_layer_problem(what, f"class {value!r} is not a class id.", index + 1))
        return -1
    if np.isnan(f) or f != int(f):
        problems.append(_layer_problem(what, f"class {value!r} is not a class id.", index + 1))
        return -1
    return int(f)


def shapes_to_boxes(data: Sequence[np.ndarray], features, image_shape: Sequence[int],
                    shape_types: Sequence[str] | None = None, what: str = BOXES_LAYER) -> np.ndarray:
    """Boxes from rectangles of a Shapes layer; raises ``ProjectError`` naming each bad shape."""
    is_stack = len(image_shape) == 3
    n = len(data)
    classes = _feature_column(features, "class", n, None, what)
    exhaustive = _feature_column(features, "exhaustive", n, True, what)
    problems: list[Problem] = []
    rows = []
    for i, vertices in enumerate(data):
        if shape_types is not None and shape_types[i] != "rectangle":
            problems.append(_layer_problem(what, f"is a {shape_types[i]}; boxes must be rectangles.", i + 1))
            continue
        z = _plane_of(vertices, is_stack, what, i, problems)
        cid = _class_value(classes[i], what, i, problems)
        rows.append((z, *_rectangle_pixels(vertices), cid, bool(exhaustive[i])))
    if problems:
        raise ProjectError(problems)
    boxes = empty_boxes() if not rows else np.array(rows, dtype=empty_boxes().dtype)
    return boxes


# ----------------------------------------------------------------------------------- points


def points_to_layer(points: np.ndarray, is_stack: bool) -> tuple[np.ndarray, dict]:
    """Point coordinates (N, 2 or 3) and their features (``class``, ``exhaustive``)."""
    columns = ["z", "y", "x"] if is_stack else ["y", "x"]
    coords = np.column_stack([points[c] for c in columns]).astype(float) if len(points) else \
        np.zeros((0, len(columns)))
    features = {"class": points["class"].astype(int).tolist(),
                "exhaustive": points["exhaustive"].astype(bool).tolist()}
    return coords, features


def layer_to_points(coords: np.ndarray, features, image_shape: Sequence[int],
                    what: str = POINTS_LAYER) -> np.ndarray:
    """Points from a Points layer's data, rounded to the nearest pixel."""
    coords = np.asarray(coords, dtype=float).reshape(-1, np.shape(coords)[-1] if np.size(coords) else len(image_shape))
    n = len(coords)
    classes = _feature_column(features, "class", n, None, what)
    exhaustive = _feature_column(features, "exhaustive", n, True, what)
    problems: list[Problem] = []
    if n and coords.shape[1] != len(image_shape):
        raise ProjectError([_layer_problem(what, f"has {coords.shape[1]}-D points but the image is "
                                    f"{len(image_shape)}-D.")])
    if n and not np.all(np.isfinite(coords)):
        bad = int(np.flatnonzero(~np.isfinite(coords).all(axis=1))[0])
        raise ProjectError([_layer_problem(what, "has a coordinate that is not a number.", bad + 1)])
    pixel = np.round(coords).astype(np.int64)
    rows = []
    for i in range(n):
        cid = _class_value(classes[i], what, i, problems)
        z = int(pixel[i, 0]) if len(image_shape) == 3 else 0
        rows.append((z, int(pixel[i, -2]), int(pixel[i, -1]), cid, bool(exhaustive[i])))
    if problems:
        raise ProjectError(problems)
    return np.array(rows, dtype=empty_points().dtype) if rows else empty_points()


# ------------------------------------------------------------------------------------- tags

TAG_TABLE_COLUMNS = ("z", "class", "present", *REGION_FIELDS)


def tags_to_table(tags: np.ndarray) -> dict[str, list]:
    """Tags as a table of columns; a whole-plane tag has ``None`` in its region columns."""
    table: dict[str, list] = {c: [] for c in TAG_TABLE_COLUMNS}
    for t in tags:
        whole = all(int(t[f]) == NO_REGION for f in REGION_FIELDS)
        for c in TAG_TABLE_COLUMNS:
            if c == "present":
                table[c].append(bool(t[c]))
            elif c in REGION_FIELDS and whole:
                table[c].append(None)
            else:
                table[c].append(int(t[c]))
    return table


def table_to_tags(table: Mapping[str, Sequence]) -> np.ndarray:
    """Tags from a table of columns (see ``tags_to_table``)."""
    n = len(table.get("z", []))
    rows = []
    for i in range(n):
        region = [table.get(f, [None] * n)[i] for f in REGION_FIELDS]
        region = [NO_REGION if v is None or (isinstance(v, float) and np.isnan(v)) else int(v) for v in region]
        rows.append((int(table["z"][i]), int(table["class"][i]), bool(table["present"][i]), *region))
    return np.array(rows, dtype=empty_tags().dtype) if rows else empty_tags()


def tags_to_shapes(tags: np.ndarray, image_shape: Sequence[int],
                   classes: Sequence[ClassInfo]) -> tuple[list[np.ndarray], dict]:
    """Tags as rectangles (the region, or the whole plane) with features
    ``class``, ``present``, ``whole_plane`` and a ``label`` text such as "+ mitochondrion"."""
    is_stack = len(image_shape) == 3
    h, w = image_shape[-2:]
    names = {c.id: c.name for c in classes}
    data, whole_plane, labels = [], [], []
    for t in tags:
        whole = all(int(t[f]) == NO_REGION for f in REGION_FIELDS)
        y0, x0, y1, x1 = (0, 0, h, w) if whole else (int(t[f]) for f in REGION_FIELDS)
        data.append(_rectangle(int(t["z"]) if is_stack else None, y0, x0, y1, x1))
        whole_plane.append(whole)
        sign = "+" if t["present"] else "\u2212"
        labels.append(f"{sign} {names.get(int(t['class']), int(t['class']))}")
    features = {"class": tags["class"].astype(int).tolist(), "present": tags["present"].astype(bool).tolist(),
                "whole_plane": whole_plane, "label": labels}
    return data, features


def shapes_to_tags(data: Sequence[np.ndarray], features, image_shape: Sequence[int],
                   what: str = TAGS_LAYER) -> np.ndarray:
    """Tags from the rectangles of a Tags layer (see ``tags_to_shapes``)."""
    is_stack = len(image_shape) == 3
    n = len(data)
    classes = _feature_column(features, "class", n, None, what)
    present = _feature_column(features, "present", n, None, what)
    whole = _feature_column(features, "whole_plane", n, False, what)
    problems: list[Problem] = []
    rows = []
    for i, vertices in enumerate(data):
        z = _plane_of(vertices, is_stack, what, i, problems)
        cid = _class_value(classes[i], what, i, problems)
        region = (NO_REGION,) * 4 if whole[i] else _rectangle_pixels(vertices)
        rows.append((z, cid, bool(present[i]), *region))
    if problems:
        raise ProjectError(problems)
    return np.array(rows, dtype=empty_tags().dtype) if rows else empty_tags()


# ------------------------------------------------------------------------------- all layers


def _item_colors(class_ids: Sequence[int], classes: Sequence[ClassInfo]):
    """Colours of shapes or points by class; a plain colour for an empty layer (napari cannot
    build a Points layer from an empty colour array)."""
    return class_colors(class_ids, classes) if len(class_ids) else "white"



def annotation_layers(annotations: AnnotationSet) -> list[tuple]:
    """napari ``LayerDataTuple``s for the Masks, Boxes, Points and Tags of an annotation set."""
    classes = annotations.classes
    is_stack = annotations.is_stack
    ndim = len(annotations.image_shape)
    axes = axis_labels(ndim)

    masks = (masks_to_labels(annotations), {
        "name": MASKS_LAYER, "colormap": labels_colormap(classes), "opacity": 0.6,
        "metadata": layer_metadata("masks", classes), "axis_labels": axes}, "labels")

    box_data, box_features = boxes_to_shapes(annotations.boxes, is_stack)
    boxes = (box_data, {
        "name": BOXES_LAYER, "ndim": ndim, "shape_type": "rectangle", "features": box_features,
        "edge_color": _item_colors(box_features["class"], classes), "face_color": "transparent",
        "edge_width": 2, "metadata": layer_metadata("boxes", classes), "axis_labels": axes}, "shapes")

    point_coords, point_features = points_to_layer(annotations.points, is_stack)
    point_colors = _item_colors(point_features["class"], classes)
    points = (point_coords, {
        "name": POINTS_LAYER, "ndim": ndim, "features": point_features, "face_color": point_colors,
        "border_color": "white", "size": 9, "metadata": layer_metadata("points", classes), "axis_labels": axes}, "points")

    tag_data, tag_features = tags_to_shapes(annotations.tags, annotations.image_shape, classes)
    tags = (tag_data, {
        "name": TAGS_LAYER, "ndim": ndim, "shape_type": "rectangle", "features": tag_features,
        "edge_color": _item_colors(tag_features["class"], classes), "face_color": "transparent",
        "edge_width": 1, "opacity": 0.8,
        "text": {"string": "{label}", "anchor": "upper_left", "size": 9, "color": "white"},
        "metadata": layer_metadata("tags", classes), "axis_labels": axes}, "shapes")
    return [masks, boxes, points, tags]


def annotations_from_layers(
    image_shape: Sequence[int],
    classes: Sequence[ClassInfo],
    masks: np.ndarray | None = None,
    boxes: tuple[Sequence[np.ndarray], Mapping] | None = None,
    points: tuple[np.ndarray, Mapping] | None = None,
    tags: tuple[Sequence[np.ndarray], Mapping] | None = None,
    box_shape_types: Sequence[str] | None = None,
) -> AnnotationSet:
    """Build and validate an ``AnnotationSet`` from layer data (each part optional).

    ``boxes`` and ``tags`` are (Shapes data, features); ``points`` is (coordinates, features).
    Raises ``ProjectError`` listing every problem.
    """
    problems: list[Problem] = []
    parts = {}
    converters = {
        "masks": lambda: labels_to_masks(masks, image_shape),
        "boxes": lambda: shapes_to_boxes(boxes[0], boxes[1], image_shape, box_shape_types)
        if boxes is not None else empty_boxes(),
        "points": lambda: layer_to_points(points[0], points[1], image_shape)
        if points is not None else empty_points(),
        "tags": lambda: shapes_to_tags(tags[0], tags[1], image_shape) if tags is not None else empty_tags(),
    }
    for name, convert in converters.items():
        try:
            parts[name] = convert()
        except ProjectError as err:
            problems += err.problems
    if problems:
        raise ProjectError(problems)
    annotations = AnnotationSet(image_shape=tuple(image_shape), classes=list(classes), **parts)
    problems = [
        _layer_problem(_LAYER_OF_FILE[p.file], p.message, p.row) if p.file in _LAYER_OF_FILE else p
        for p in annotations.validate()
    ]
    if problems:
        raise ProjectError(problems)
    return annotations
