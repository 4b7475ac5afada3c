"""The annotation project: one image and everything an expert drew on it.

Pure Python and NumPy (no Qt). The on-disk layout is described in ``docs/project_format.md``:
``image.tif``, ``classes.json`` and the optional ``masks.tif``, ``boxes.csv``, ``points.csv`` and
``tags.csv``. Coordinates are integer pixels ordered (z, y, x); a single 2D image is stored with
``z = 0`` in memory and without a ``z`` column on disk.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

IMAGE_FILE = "image.tif"
CLASSES_FILE = "classes.json"
MASKS_FILE = "masks.tif"
BOXES_FILE = "boxes.csv"
POINTS_FILE = "points.csv"
TAGS_FILE = "tags.csv"

BOX_DTYPE = np.dtype(
    [("z", np.int64), ("y0", np.int64), ("x0", np.int64), ("y1", np.int64), ("x1", np.int64),
     ("class", np.int64), ("exhaustive", np.bool_)]
)
POINT_DTYPE = np.dtype(
    [("z", np.int64), ("y", np.int64), ("x", np.int64), ("class", np.int64), ("exhaustive", np.bool_)]
)
# A tag without a region covers its whole plane; its region fields then hold NO_REGION.
TAG_DTYPE = np.dtype(
    [("z", np.int64), ("class", np.int64), ("present", np.bool_),
     ("y0", np.int64), ("x0", np.int64), ("y1", np.int64), ("x1", np.int64)]
)
NO_REGION = -1
REGION_FIELDS = ("y0", "x0", "y1", "x1")

# Columns of each table as written on disk, without the z column of 2D images.
_REQUIRED_COLUMNS = {
    BOXES_FILE: ("z", "y0", "x0", "y1", "x1", "class"),
    POINTS_FILE: ("z", "y", "x", "class"),
    TAGS_FILE: ("z", "class", "present"),
}
_OPTIONAL_COLUMNS = {
    BOXES_FILE: ("exhaustive",),
    POINTS_FILE: ("exhaustive",),
    TAGS_FILE: REGION_FIELDS,
}
_BOOLEAN_COLUMNS = {"exhaustive", "present"}
_COLOR_PATTERN = re.compile(r"^#[0-9a-fA-F]{6}$")

# Tableau-like colours that stay apart on grey EM images; used for classes without a colour.
DEFAULT_COLORS = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
    "#8c564b", "#e377c2", "#bcbd22", "#17becf", "#7f7f7f",
)


def empty_boxes() -> np.ndarray:
    """An empty box table."""
    return np.zeros(0, dtype=BOX_DTYPE)


def empty_points() -> np.ndarray:
    """An empty point table."""
    return np.zeros(0, dtype=POINT_DTYPE)


def empty_tags() -> np.ndarray:
    """An empty tag table."""
    return np.zeros(0, dtype=TAG_DTYPE)


@dataclass(frozen=True)
class ClassInfo:
    """One row of the class table. ``instances`` marks classes whose objects are separated."""

    id: int
    name: str
    instances: bool = False
    color: str | None = None

    def display_color(self) -> str:
        """The class colour, or a stable default colour chosen from its id."""
        return self.color or DEFAULT_COLORS[(self.id - 1) % len(DEFAULT_COLORS)]

    def to_json(self) -> dict:
        """The class as a JSON object of a class table (``color`` only where set)."""
        entry = {"id": self.id, "name": self.name, "instances": self.instances}
        if self.color is not None:
            entry["color"] = self.color
        return entry

    @classmethod
    def from_json(cls, entry: dict) -> ClassInfo:
        """The class a :meth:`to_json` object describes (not instances and no colour where those are
        absent); unchecked: :func:`classes_from_json` reads and checks a whole table."""
        return cls(id=entry["id"], name=entry["name"], instances=entry.get("instances", False),
                   color=entry.get("color"))


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a project: which file, which data row (1-based) and what."""

    file: str
    message: str
    row: int | None = None
    row_name: str = "row"

    def __str__(self) -> str:
        where = self.file if self.row is None else f"{self.file}, {self.row_name} {self.row}"
        return f"{where}: {self.message}"


class ProjectError(ValueError):
    """A project folder or annotation set that cannot be used, with every problem found."""

    def __init__(self, problems: Sequence[Problem]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s) in the annotation project:\n{lines}")


def find_class(classes, class_id: int) -> ClassInfo | None:
    """The class of ``classes`` with id ``class_id``, or None."""
    return next((c for c in classes if c.id == class_id), None)


@dataclass
class AnnotationSet:
    """Every annotation of one image: class table, masks, boxes, points and tags.

    ``image_shape`` is (Y, X) for a plane or (Z, Y, X) for a stack. ``masks`` is None or an
    integer array of that shape (0 = not annotated). Tables are NumPy structured arrays with the
    dtypes ``BOX_DTYPE``, ``POINT_DTYPE`` and ``TAG_DTYPE``; 2D images use ``z = 0``.
    """

    image_shape: tuple[int, ...]
    classes: list[ClassInfo]
    masks: np.ndarray | None = None
    boxes: np.ndarray = field(default_factory=empty_boxes)
    points: np.ndarray = field(default_factory=empty_points)
    tags: np.ndarray = field(default_factory=empty_tags)

    def __post_init__(self):
        self.image_shape = tuple(int(s) for s in self.image_shape)
        self.classes = list(self.classes)
        self.boxes = _as_table(self.boxes, BOX_DTYPE)
        self.points = _as_table(self.points, POINT_DTYPE)
        self.tags = _as_table(self.tags, TAG_DTYPE)

    @property
    def is_stack(self) -> bool:
        return len(self.image_shape) == 3

    @property
    def n_planes(self) -> int:
        return self.image_shape[0] if self.is_stack else 1

    @property
    def plane_shape(self) -> tuple[int, int]:
        return tuple(self.image_shape[-2:])

    @property
    def class_ids(self) -> list[int]:
        return [c.id for c in self.classes]

    def class_by_id(self, class_id: int) -> ClassInfo:
        found = find_class(self.classes, class_id)
        if found is None:
            raise KeyError(f"no class with id {class_id}")
        return found

    def has_annotations(self) -> bool:
        """True if anything at all was annotated."""
        has_mask = self.masks is not None and bool(np.any(self.masks))
        return has_mask or len(self.boxes) > 0 or len(self.points) > 0 or len(self.tags) > 0

    def mask_plane(self, z: int) -> np.ndarray | None:
        if self.masks is None:
            return None
        return self.masks[z] if self.is_stack else self.masks

    def validate(self) -> list[Problem]:
        """Every problem of this annotation set, as a list (empty when valid)."""
        problems = _check_image_shape(self.image_shape, IMAGE_FILE)
        if problems:
            return problems
        problems += check_classes(self.classes)
        known = set(self.class_ids)
        if self.masks is not None:
            problems += _check_masks(self.masks, self.image_shape, known)
        problems += _check_boxes(self.boxes, self, known)
        problems += _check_points(self.points, self, known)
        problems += _check_tags(self.tags, self, known)
        return problems

    def check(self) -> None:
        """Raise ``ProjectError`` listing every problem, if there is one."""
        problems = self.validate()
        if problems:
            raise ProjectError(problems)

    def summary(self) -> dict:
        """Counts of annotations per type and class, and the planes they touch."""
        names = {c.id: c.name for c in self.classes}
        per_class: dict[str, dict[str, int]] = {
            c.name: {"mask_pixels": 0, "boxes": 0, "points": 0, "tags_present": 0, "tags_absent": 0}
            for c in self.classes
        }
        planes: set[int] = set()
        if self.masks is not None:
            ids, counts = np.unique(self.masks, return_counts=True)
            for i, n in zip(ids.tolist(), counts.tolist()):
                if i in names:
                    per_class[names[i]]["mask_pixels"] = int(n)
            if self.is_stack:
                planes.update(np.flatnonzero(self.masks.reshape(self.n_planes, -1).any(axis=1)).tolist())
            elif np.any(self.masks):
                planes.add(0)
        for table, key in ((self.boxes, "boxes"), (self.points, "points")):
            for cid in table["class"].tolist():
                if cid in names:
                    per_class[names[cid]][key] += 1
            planes.update(table["z"].tolist())
        for cid, present in zip(self.tags["class"].tolist(), self.tags["present"].tolist()):
            if cid in names:
                per_class[names[cid]]["tags_present" if present else "tags_absent"] += 1
        planes.update(self.tags["z"].tolist())
        return {
            "image_shape": list(self.image_shape),
            "classes": per_class,
            "totals": {
                "mask_pixels": int(np.count_nonzero(self.masks)) if self.masks is not None else 0,
                "boxes": len(self.boxes),
                "points": len(self.points),
                "tags": len(self.tags),
            },
            "planes_annotated": sorted(int(p) for p in planes),
        }

    def equals(self, other: AnnotationSet) -> bool:
        """Same shape, classes and annotations (an all-zero mask equals no mask)."""
        def mask_or_none(a):
            return None if a.masks is None or not np.any(a.masks) else a.masks

        ma, mb = mask_or_none(self), mask_or_none(other)
        same_masks = (ma is None and mb is None) or (
            ma is not None and mb is not None and np.array_equal(ma, mb)
        )
        return (
            self.image_shape == other.image_shape
            and self.classes == other.classes
            and same_masks
            and _same_rows(self.boxes, other.boxes)
            and _same_rows(self.points, other.points)
            and _same_rows(self.tags, other.tags)
        )


@dataclass
class Project:
    """A project folder's content: the image and its annotations."""

    image: np.ndarray
    annotations: AnnotationSet


def _as_table(rows, dtype: np.dtype) -> np.ndarray:
    if isinstance(rows, np.ndarray) and rows.dtype == dtype:
        return rows
    if isinstance(rows, np.ndarray) and rows.dtype.names:
        out = np.zeros(len(rows), dtype=dtype)
        for name in dtype.names:
            out[name] = rows[name]
        return out
    return np.array([tuple(r) for r in rows], dtype=dtype) if len(rows) else np.zeros(0, dtype)


def _same_rows(a: np.ndarray, b: np.ndarray) -> bool:
    return len(a) == len(b) and bool(np.all(np.sort(a) == np.sort(b)))


# --------------------------------------------------------------------------------- validation


def _check_image_shape(shape: Sequence[int], file: str) -> list[Problem]:
    shape = tuple(shape)
    if len(shape) == 3 and shape[-1] in (3, 4) and shape[0] > 4:
        return [Problem(file, f"looks like an RGB/RGBA image (shape {shape}); protoseg needs a "
                        "single-channel grayscale plane (Y, X) or stack (Z, Y, X). Convert it to "
                        "grayscale, or save one channel, and try again.")]
    if len(shape) not in (2, 3):
        return [Problem(file, f"has {len(shape)} dimensions (shape {shape}); protoseg needs a "
                        "single-channel plane (Y, X) or stack (Z, Y, X). Split multichannel or "
                        "time-lapse data into single-channel stacks first.")]
    if min(shape) < 1:
        return [Problem(file, f"is empty (shape {shape}).")]
    return []


def check_image(image: np.ndarray, file: str = IMAGE_FILE) -> list[Problem]:
    """Problems that keep an image from being annotated and segmented (RGB, wrong dimensions)."""
    problems = _check_image_shape(np.shape(image), file)
    if not problems and not (np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)):
        problems.append(Problem(file, f"has dtype {image.dtype}; use an integer or float image."))
    return problems


def check_classes(classes: Sequence[ClassInfo], file: str = CLASSES_FILE) -> list[Problem]:
    """Problems of a class table: ids >= 1 and unique, names unique and non-empty, colours #rrggbb."""
    problems = []
    if not classes:
        problems.append(Problem(file, "defines no class; add at least one class."))
    seen_ids: dict[int, int] = {}
    seen_names: dict[str, int] = {}
    for i, c in enumerate(classes, start=1):
        if not isinstance(c.id, (int, np.integer)) or isinstance(c.id, bool) or c.id < 1:
            problems.append(Problem(file, f"class id {c.id!r} must be an integer >= 1 (0 means "
                                    "'not annotated').", i))
        elif c.id in seen_ids:
            problems.append(Problem(file, f"class id {c.id} is used twice (entries {seen_ids[c.id]} "
                                    f"and {i}).", i))
        else:
            seen_ids[c.id] = i
        if not isinstance(c.name, str) or not c.name.strip():
            problems.append(Problem(file, "class name must be a non-empty text.", i))
        elif c.name in seen_names:
            problems.append(Problem(file, f"class name {c.name!r} is used twice.", i))
        else:
            seen_names[c.name] = i
        if not isinstance(c.instances, bool):
            problems.append(Problem(file, f"'instances' must be true or false, not {c.instances!r}.", i))
        if c.color is not None and (not isinstance(c.color, str) or not _COLOR_PATTERN.match(c.color)):
            problems.append(Problem(file, f"colour {c.color!r} is not of the form '#rrggbb'.", i))
    return problems


def class_ids_in(masks: np.ndarray) -> np.ndarray:
    """The distinct values of an integer mask array, ascending (for 8- and 16-bit unsigned masks
    marked in a table instead of sorted: a few times faster)."""
    masks = np.asarray(masks)
    if masks.dtype in (np.uint8, np.uint16):
        seen = np.zeros(np.iinfo(masks.dtype).max + 1, dtype=bool)
        seen[masks.ravel()] = True
        return np.flatnonzero(seen).astype(masks.dtype)
    return np.unique(masks)


def _check_masks(masks: np.ndarray, image_shape: tuple[int, ...], known: set[int]) -> list[Problem]:
    if tuple(masks.shape) != tuple(image_shape):
        return [Problem(MASKS_FILE, f"has shape {tuple(masks.shape)} but the image has shape "
                        f"{tuple(image_shape)}; masks must cover the image pixel for pixel.")]
    if not np.issubdtype(masks.dtype, np.integer):
        return [Problem(MASKS_FILE, f"has dtype {masks.dtype}; masks must hold integer class ids.")]
    values = class_ids_in(masks)
    unknown = [int(v) for v in values if v != 0 and int(v) not in known]
    if unknown:
        return [Problem(MASKS_FILE, f"holds class id(s) {unknown} that {CLASSES_FILE} does not "
                        "define; add them to the class table or erase them from the masks.")]
    return []


def _plane_problems(rows: np.ndarray, ann: AnnotationSet, file: str, known: set[int]) -> dict[int, list[str]]:
    """Per-row messages shared by all tables: class id known, plane inside the stack."""
    messages: dict[int, list[str]] = {}
    for i, (z, cid) in enumerate(zip(rows["z"].tolist(), rows["class"].tolist())):
        if cid not in known:
            messages.setdefault(i, []).append(f"class {cid} is not in {CLASSES_FILE}")
        if not 0 <= z < ann.n_planes:
            hint = "the image is a single plane, so z must be 0" if not ann.is_stack else \
                f"the stack has planes 0..{ann.n_planes - 1}"
            messages.setdefault(i, []).append(f"plane z={z} is outside the image ({hint})")
    return messages


def _rect_messages(y0, x0, y1, x1, plane_shape, what) -> list[str]:
    h, w = plane_shape
    out = []
    if y1 <= y0 or x1 <= x0:
        out.append(f"{what} [{y0}, {y1}) x [{x0}, {x1}) is empty or inverted (need y0 < y1 and x0 < x1)")
    if y0 < 0 or x0 < 0 or y1 > h or x1 > w:
        out.append(f"{what} [{y0}, {y1}) x [{x0}, {x1}) reaches outside the {h} x {w} plane")
    return out


def _to_problems(file: str, messages: dict[int, list[str]]) -> list[Problem]:
    return [Problem(file, "; ".join(m) + ".", row=i + 1) for i, m in sorted(messages.items())]


def _check_boxes(boxes: np.ndarray, ann: AnnotationSet, known: set[int]) -> list[Problem]:
    messages = _plane_problems(boxes, ann, BOXES_FILE, known)
    for i, b in enumerate(boxes):
        msgs = _rect_messages(int(b["y0"]), int(b["x0"]), int(b["y1"]), int(b["x1"]), ann.plane_shape, "box")
        if msgs:
            messages.setdefault(i, []).extend(msgs)
    return _to_problems(BOXES_FILE, messages)


def _check_points(points: np.ndarray, ann: AnnotationSet, known: set[int]) -> list[Problem]:
    messages = _plane_problems(points, ann, POINTS_FILE, known)
    h, w = ann.plane_shape
    for i, (y, x) in enumerate(zip(points["y"].tolist(), points["x"].tolist())):
        if not (0 <= y < h and 0 <= x < w):
            messages.setdefault(i, []).append(f"point (y={y}, x={x}) is outside the {h} x {w} plane")
    return _to_problems(POINTS_FILE, messages)


def _check_tags(tags: np.ndarray, ann: AnnotationSet, known: set[int]) -> list[Problem]:
    messages = _plane_problems(tags, ann, TAGS_FILE, known)
    first_seen: dict[tuple, tuple[int, bool]] = {}
    for i, t in enumerate(tags):
        region = tuple(int(t[f]) for f in REGION_FIELDS)
        has_region = any(v != NO_REGION for v in region)
        if has_region:
            msgs = _rect_messages(*region, ann.plane_shape, "tag region")
            if msgs:
                messages.setdefault(i, []).extend(msgs)
        key = (int(t["z"]), int(t["class"]), region)
        present = bool(t["present"])
        if key in first_seen and first_seen[key][1] != present:
            messages.setdefault(i, []).append(
                f"says class {key[1]} is {'present' if present else 'absent'} but row "
                f"{first_seen[key][0]} says the opposite for the same plane and region")
        first_seen.setdefault(key, (i + 1, present))
    return _to_problems(TAGS_FILE, messages)


# ------------------------------------------------------------------------------------ reading


def read_classes(path: str | os.PathLike) -> tuple[list[ClassInfo], list[Problem]]:
    """Read ``classes.json``; returns the classes and the problems found."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return [], [Problem(CLASSES_FILE, "is missing; every project needs a class table.")]
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return [], [Problem(CLASSES_FILE, f"is not valid JSON ({err}).")]
    if not isinstance(doc, dict) or not isinstance(doc.get("classes"), list):
        return [], [Problem(CLASSES_FILE, 'must be an object {"classes": [{"id": 1, "name": ...}, ...]}.')]
    unknown_top = sorted(set(doc) - {"classes"})
    problems = [Problem(CLASSES_FILE, f"has unknown key(s) {unknown_top}.")] if unknown_top else []
    classes, table_problems = classes_from_json(doc["classes"])
    return classes, problems + table_problems


def classes_from_json(entries, file: str = CLASSES_FILE, *,
                      allow_unknown_keys: bool = False) -> tuple[list[ClassInfo], list[Problem]]:
    """The class table that a JSON list of :meth:`ClassInfo.to_json` objects describes, and its
    problems: entries that are not objects with at least 'id' and 'name', those of
    :func:`check_classes` and, unless ``allow_unknown_keys`` (tables that a program wrote), keys
    other than id, name, instances and color (a typo in a hand-written ``classes.json``)."""
    if not isinstance(entries, list):
        return [], [Problem(file, 'must be a list of classes [{"id": 1, "name": ...}, ...].')]
    classes, problems = [], []
    for i, entry in enumerate(entries, start=1):
        if not isinstance(entry, dict) or "id" not in entry or "name" not in entry:
            problems.append(Problem(file, "each class needs at least 'id' and 'name'.", i))
            continue
        unknown = sorted(set(entry) - {"id", "name", "instances", "color"})
        if unknown and not allow_unknown_keys:
            problems.append(Problem(file, f"unknown key(s) {unknown}; allowed are id, name, instances, color.", i))
        classes.append(ClassInfo.from_json(entry))
    return classes, problems + check_classes(classes, file)


def _parse_cell(text: str, column: str) -> tuple[int | None, str | None]:
    """Parse one CSV cell as a whole number; returns (value, error message)."""
    text = text.strip()
    if column in _BOOLEAN_COLUMNS and text.lower() in ("true", "false"):
        return int(text.lower() == "true"), None
    try:
        value = float(text)
    except ValueError:
        return None, f"column '{column}' holds {text!r}, which is not a number"
    if math.isnan(value) or math.isinf(value):
        return None, f"column '{column}' holds {text!r}; a value is needed"
    if value != int(value):
        return None, f"column '{column}' holds {text}; pixel coordinates and ids are whole numbers"
    value = int(value)
    if column in _BOOLEAN_COLUMNS and value not in (0, 1):
        return None, f"column '{column}' must be 0 or 1, not {value}"
    return value, None


def _read_table(path: Path, file: str, dtype: np.dtype, is_stack: bool) -> tuple[np.ndarray, list[Problem]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        return np.zeros(0, dtype), [Problem(file, "is not a UTF-8 text file.")]
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if header is None:
        return np.zeros(0, dtype), [Problem(file, "is empty; it needs at least a header line.")]
    header = [h.strip() for h in header]
    required = [c for c in _REQUIRED_COLUMNS[file] if is_stack or c != "z"]
    optional = list(_OPTIONAL_COLUMNS[file])
    problems = []
    missing = [c for c in required if c not in header]
    if missing:
        problems.append(Problem(file, f"lacks column(s) {missing}; the header must be "
                                f"{','.join(required + optional)}."))
    unknown = [c for c in header if c not in required + optional]
    if "z" in unknown and not is_stack:
        problems.append(Problem(file, "has a 'z' column but the image is a single 2D plane; remove it."))
        unknown.remove("z")
    if unknown:
        problems.append(Problem(file, f"has unknown column(s) {unknown}; allowed are "
                                f"{','.join(required + optional)}."))
    duplicated = sorted({c for c in header if header.count(c) > 1})
    if duplicated:
        problems.append(Problem(file, f"repeats column(s) {duplicated}."))
    if problems:
        return np.zeros(0, dtype), problems
    given_region = [c for c in REGION_FIELDS if c in header]
    if file == TAGS_FILE and given_region and len(given_region) != 4:
        return np.zeros(0, dtype), [Problem(file, "a tag region needs all four columns y0,x0,y1,x1.")]

    rows = []
    for row_number, cells in enumerate(reader, start=1):
        if not cells or all(not c.strip() for c in cells):
            continue
        if len(cells) != len(header):
            problems.append(Problem(file, f"has {len(cells)} cells but the header has {len(header)}.", row_number))
            continue
        record = dict(zip(header, cells))
        values = {"z": 0, "exhaustive": 1}
        errors = []
        if file == TAGS_FILE:
            region_cells = [record.get(c, "").strip() for c in REGION_FIELDS]
            if all(c == "" for c in region_cells):
                for c in REGION_FIELDS:
                    record.pop(c, None)
                    values[c] = NO_REGION
            elif any(c == "" for c in region_cells):
                errors.append("a tag region needs all of y0,x0,y1,x1 (leave all four empty for the whole plane)")
        for column, cell in record.items():
            value, error = _parse_cell(cell, column)
            if error:
                errors.append(error)
            else:
                values[column] = value
        if errors:
            problems.append(Problem(file, "; ".join(errors) + ".", row_number))
            continue
        rows.append(tuple(values[name] for name in dtype.names))
    table = np.array(rows, dtype=dtype) if rows else np.zeros(0, dtype)
    return table, problems


def read_image_shape(path: str | os.PathLike) -> tuple[int, ...]:
    """Shape of the image in a TIFF file, without reading its pixels."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        return tuple(tif.series[0].shape)


def read_annotations(folder: str | os.PathLike, image_shape: Sequence[int] | None = None) -> AnnotationSet:
    """Read and validate the annotations of a project folder.

    Raises ``ProjectError`` naming every file, row and problem found.
    """
    import tifffile

    folder = Path(folder)
    if not folder.is_dir():
        raise ProjectError([Problem(str(folder), "is not a folder; a project is a folder holding "
                                    f"{IMAGE_FILE} and {CLASSES_FILE}.")])
    problems: list[Problem] = []
    if image_shape is None:
        if not (folder / IMAGE_FILE).exists():
            raise ProjectError([Problem(IMAGE_FILE, f"is missing from {folder}.")])
        try:
            image_shape = read_image_shape(folder / IMAGE_FILE)
        except Exception as err:  # tifffile raises several types for broken files
            raise ProjectError([Problem(IMAGE_FILE, f"cannot be read as a TIFF ({err}).")]) from None
    image_shape = tuple(int(s) for s in image_shape)
    problems += _check_image_shape(image_shape, IMAGE_FILE)
    classes, class_problems = read_classes(folder / CLASSES_FILE)
    problems += class_problems
    if problems:
        raise ProjectError(problems)

    ann = AnnotationSet(image_shape=image_shape, classes=classes)
    if (folder / MASKS_FILE).exists():
        try:
            ann.masks = tifffile.imread(folder / MASKS_FILE)
        except Exception as err:
            problems.append(Problem(MASKS_FILE, f"cannot be read as a TIFF ({err})."))
    for file, dtype, attr in ((BOXES_FILE, BOX_DTYPE, "boxes"), (POINTS_FILE, POINT_DTYPE, "points"),
                              (TAGS_FILE, TAG_DTYPE, "tags")):
        if (folder / file).exists():
            table, table_problems = _read_table(folder / file, file, dtype, ann.is_stack)
            setattr(ann, attr, table)
            problems += table_problems
    problems += ann.validate()
    if problems:
        raise ProjectError(problems)
    return ann


def read_project(folder: str | os.PathLike) -> Project:
    """Read a project folder: its image and its validated annotations."""
    import tifffile

    folder = Path(folder)
    ann = read_annotations(folder)
    image = tifffile.imread(folder / IMAGE_FILE)
    problems = check_image(image)
    if problems:
        raise ProjectError(problems)
    return Project(image=image, annotations=ann)


def is_project_folder(path: str | os.PathLike) -> bool:
    """True if ``path`` is a folder with an image and a class table."""
    path = Path(path)
    return path.is_dir() and (path / IMAGE_FILE).is_file() and (path / CLASSES_FILE).is_file()


# ------------------------------------------------------------------------------------ writing


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, then rename it over ``path``,
    so a crash never leaves a half-written file. The file gets the usual permissions."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes owner-only files
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: readers see the old file or the new one, never half."""
    atomic_write(path, lambda f: f.write(data))


def write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    write_bytes(path, text.encode())


def write_tiff(path: Path, array: np.ndarray, compress: bool = True) -> None:
    """Write ``array`` as a greyscale TIFF (zlib-compressed unless ``compress=False``) atomically."""
    write_bytes(path, _tiff_bytes(array, compress))


def _tiff_bytes(array: np.ndarray, compress: bool) -> bytes:
    import tifffile

    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array, compression="zlib" if compress else None,
                     photometric="minisblack")
    return buffer.getvalue()


def label_dtype(max_label: int) -> np.dtype:
    """The smallest unsigned integer dtype holding labels 0 to ``max_label`` (uint8 to uint32; int64 beyond)."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if max_label <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.int64)


def _table_csv(table: np.ndarray, file: str, is_stack: bool) -> str:
    columns = [c for c in _REQUIRED_COLUMNS[file] if is_stack or c != "z"]
    if file == TAGS_FILE:
        has_region = table[list(REGION_FIELDS)].tolist()
        if any(any(v != NO_REGION for v in r) for r in has_region):
            columns += list(REGION_FIELDS)
    else:
        columns += list(_OPTIONAL_COLUMNS[file])
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for row in table:
        cells = []
        whole_plane = file == TAGS_FILE and all(int(row[f]) == NO_REGION for f in REGION_FIELDS)
        for c in columns:
            if whole_plane and c in REGION_FIELDS:
                cells.append("")
            else:
                cells.append(str(int(row[c])))
        writer.writerow(cells)
    return out.getvalue()


def write_annotations(folder: str | os.PathLike, annotations: AnnotationSet) -> None:
    """Write the class table and every annotation file atomically; remove files of empty types."""
    annotations.check()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    doc = {"classes": [c.to_json() for c in annotations.classes]}
    write_text(folder / CLASSES_FILE, json.dumps(doc, indent=1) + "\n")

    masks = annotations.masks
    if masks is not None and np.any(masks):
        masks = masks.astype(label_dtype(int(masks.max())), copy=False)
        write_tiff(folder / MASKS_FILE, masks)
    else:
        (folder / MASKS_FILE).unlink(missing_ok=True)
    for file, table in ((BOXES_FILE, annotations.boxes), (POINTS_FILE, annotations.points),
                        (TAGS_FILE, annotations.tags)):
        if len(table):
            write_text(folder / file, _table_csv(table, file, annotations.is_stack))
        else:
            (folder / file).unlink(missing_ok=True)


def write_project(folder: str | os.PathLike, image: np.ndarray, annotations: AnnotationSet,
                  write_image: bool = True) -> Path:
    """Write a whole project folder; ``write_image=False`` keeps an existing ``image.tif``."""
    problems = check_image(image)
    if tuple(np.shape(image)) != annotations.image_shape:
        problems.append(Problem(IMAGE_FILE, f"has shape {tuple(np.shape(image))} but the annotations "
                                f"were made for shape {annotations.image_shape}."))
    if problems:
        raise ProjectError(problems)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if write_image or not (folder / IMAGE_FILE).exists():
        write_tiff(folder / IMAGE_FILE, np.asarray(image), compress=False)
    write_annotations(folder, annotations)
    return folder

