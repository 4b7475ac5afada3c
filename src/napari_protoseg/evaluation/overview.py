"""A one-picture overview of a run: image, annotations, prediction (and ground truth) per plane.

Used by ``protoseg demo --headless``. Drawn with Matplotlib's Agg canvas through the object
interface (no pyplot, no GUI backend), so it works on machines without a display and never
changes the Matplotlib backend of a process that also runs napari.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from napari_protoseg.annotations.project import NO_REGION, AnnotationSet, ClassInfo

__all__ = ["describe_plane", "label_overlay", "pick_annotated_plane", "summarize_annotations", "write_overview"]

_PANEL_INCHES = 4.2
_DPI = 125


def _rgb(color: str) -> np.ndarray:
    color = color.lstrip("#")
    return np.array([int(color[i:i + 2], 16) for i in (0, 2, 4)], np.float32) / 255.0


def _gray(plane: np.ndarray) -> np.ndarray:
    """A plane scaled to [0, 1] between its 0.5 and 99.5 percentiles."""
    plane = np.asarray(plane, np.float32)
    lo, hi = np.percentile(plane, (0.5, 99.5))
    if hi <= lo:
        hi = lo + 1.0
    return np.clip((plane - lo) / (hi - lo), 0.0, 1.0)


def label_overlay(gray: np.ndarray, labels: np.ndarray | None, classes: Sequence[ClassInfo],
                  alpha: float) -> np.ndarray:
    """An RGB image: the grey plane with every labelled pixel tinted in its class colour."""
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    if labels is None:
        return rgb
    for c in classes:
        where = labels == c.id
        if np.any(where):
            rgb[where] = (1.0 - alpha) * rgb[where] + alpha * _rgb(c.display_color())
    return rgb


def _plane_rows(table: np.ndarray, z: int) -> np.ndarray:
    return table[table["z"] == z] if len(table) else table


def describe_plane(annotations: AnnotationSet, z: int) -> str:
    """What is annotated on plane ``z``, in a few words ("scribbles, 12 boxes", "nothing")."""
    parts = []
    mask = annotations.mask_plane(z)
    if mask is not None and np.any(mask):
        parts.append(f"scribbles, {int(np.count_nonzero(mask))} px")
    for table, word in ((annotations.boxes, "box"), (annotations.points, "point"), (annotations.tags, "tag")):
        n = len(_plane_rows(table, z))
        if n:
            parts.append(f"{n} {word}{'es' if word == 'box' and n != 1 else 's' if n != 1 else ''}")
    return ", ".join(parts) if parts else "nothing annotated"


def _plane_list(planes) -> str:
    planes = sorted({int(z) for z in planes})
    parts, start = [], None
    for i, z in enumerate(planes):
        start = z if start is None else start
        if i + 1 == len(planes) or planes[i + 1] != z + 1:
            parts.append(str(start) if start == z else f"{start}-{z}")
            start = None
    return ("plane " if len(planes) == 1 else "planes ") + ", ".join(parts)


def summarize_annotations(annotations: AnnotationSet) -> str:
    """Every annotation type with its count and planes, e.g. "2222 mask px (plane 0), 98 boxes
    (planes 3-4)"."""
    parts = []
    if annotations.masks is not None and np.any(annotations.masks):
        masks = annotations.masks if annotations.is_stack else annotations.masks[None]
        planes = np.flatnonzero(masks.reshape(len(masks), -1).any(axis=1))
        parts.append(f"{int(np.count_nonzero(masks))} scribbled mask px ({_plane_list(planes)})")
    for table, word in ((annotations.boxes, "boxes"), (annotations.points, "points"), (annotations.tags, "tags")):
        if len(table):
            parts.append(f"{len(table)} {word} ({_plane_list(table['z'])})")
    return ", ".join(parts) if parts else "nothing"


def pick_annotated_plane(annotations: AnnotationSet) -> int:
    """The annotated plane that shows the most: most annotation types, then most mask pixels,
    then most boxes and points; the first such plane."""
    best, best_key = 0, None
    for z in range(annotations.n_planes):
        mask = annotations.mask_plane(z)
        mask_px = int(np.count_nonzero(mask)) if mask is not None else 0
        counts = [mask_px] + [len(_plane_rows(t, z)) for t in
                              (annotations.boxes, annotations.points, annotations.tags)]
        key = (sum(1 for n in counts if n), mask_px > 0, counts[1] + counts[2])
        if best_key is None or key > best_key:
            best, best_key = z, key
    return best


def _draw_annotations(ax, annotations: AnnotationSet, z: int, colors: Mapping[int, str]) -> None:
    from matplotlib.patches import Rectangle

    for b in _plane_rows(annotations.boxes, z):
        color = colors.get(int(b["class"]), "#ffffff")
        ax.add_patch(Rectangle((b["x0"] - 0.5, b["y0"] - 0.5), b["x1"] - b["x0"], b["y1"] - b["y0"],
                               fill=False, edgecolor=color, linewidth=1.1,
                               linestyle="-" if b["exhaustive"] else "--"))
    points = _plane_rows(annotations.points, z)
    if len(points):
        ax.scatter(points["x"], points["y"], s=22, c=[colors.get(int(c), "#ffffff") for c in points["class"]],
                   edgecolors="white", linewidths=0.7, zorder=3)
    tags = _plane_rows(annotations.tags, z)
    regions: dict[tuple, list[str]] = {}
    for t in tags:
        region = tuple(int(t[f]) for f in ("y0", "x0", "y1", "x1"))
        regions.setdefault(region, []).append(("+" if t["present"] else "\u2212") + str(int(t["class"])))
    h, w = annotations.plane_shape
    for (y0, x0, y1, x1), words in regions.items():
        if y0 == NO_REGION:
            y0, x0, y1, x1 = 0, 0, h, w
        else:
            ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor="white",
                                   linewidth=0.8, linestyle=":"))
        ax.text(x0 + 4, y0 + 4, "tags " + " ".join(words), color="white", fontsize=6.5, va="top",
                ha="left", bbox={"facecolor": "black", "alpha": 0.55, "pad": 1.5, "linewidth": 0})


def _scale_bar(ax, width: int, height: int, pixel_size_nm: float) -> None:
    """A white bar of a round length near 1/5 of the panel, bottom right."""
    target = width * pixel_size_nm / 5
    length_nm = min((m * 10 ** e for e in range(0, 7) for m in (1, 2, 5)), key=lambda v: abs(v - target))
    length_px = length_nm / pixel_size_nm
    x1, y = width - 0.05 * width, height - 0.06 * height
    ax.plot([x1 - length_px, x1], [y, y], color="white", linewidth=3, solid_capstyle="butt")
    label = f"{length_nm / 1000:g} \u00b5m" if length_nm >= 1000 else f"{length_nm:g} nm"
    ax.text(x1 - length_px / 2, y - 0.015 * height, label, color="white", fontsize=8, ha="center", va="bottom",
            bbox={"facecolor": "black", "alpha": 0.45, "pad": 1.2, "linewidth": 0})


def write_overview(path: str | os.PathLike, *, image: np.ndarray, annotations: AnnotationSet,
                   prediction: np.ndarray, planes: Sequence[int], classes: Sequence[ClassInfo],
                   ground_truth: np.ndarray | None = None, title: str = "", caption: str = "",
                   notes: Mapping[int, str] | None = None, pixel_size_nm: float | None = None) -> Path:
    """Write a PNG with one row per plane of ``planes``: the image, its annotations, the prediction
    and (if given) the ground truth, the last two tinted in the class colours, with a legend,
    ``title`` above and ``caption`` below. ``notes[z]`` is added to the prediction's panel title;
    ``pixel_size_nm`` adds a scale bar to the image panels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    image = np.asarray(image)
    if image.ndim == 2:
        image, prediction = image[None], np.asarray(prediction)[None]
        ground_truth = None if ground_truth is None else np.asarray(ground_truth)[None]
    notes = dict(notes or {})
    colors = {int(c.id): c.display_color() for c in classes}
    annotated = set(annotations.summary()["planes_annotated"])
    columns = ["image", "annotations", "prediction"] + (["ground truth"] if ground_truth is not None else [])
    n_rows, n_cols = len(planes), len(columns)
    height, width = image.shape[-2:]
    panel_w = _PANEL_INCHES
    panel_h = _PANEL_INCHES * height / width
    top, bottom = 0.75, 1.05
    fig = Figure(figsize=(panel_w * n_cols + 0.5, panel_h * n_rows + 0.35 * n_rows + top + bottom))
    FigureCanvasAgg(fig)
    fig_h = fig.get_figheight()
    grid = fig.add_gridspec(n_rows, n_cols, left=0.5 / fig.get_figwidth(), right=0.995,
                            top=1 - top / fig_h, bottom=bottom / fig_h, wspace=0.03, hspace=0.12)
    for row, z in enumerate(planes):
        gray = _gray(image[z])
        is_annotated = z in annotated
        for col, name in enumerate(columns):
            ax = fig.add_subplot(grid[row, col])
            ax.set_xticks([])
            ax.set_yticks([])
            label = name
            if name == "image":
                ax.imshow(gray, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
                if pixel_size_nm:
                    _scale_bar(ax, width, height, pixel_size_nm)
                ax.set_ylabel(f"plane {z}\n" + ("annotated" if is_annotated else "not annotated (held out)"),
                              fontsize=10)
            elif name == "annotations":
                ax.imshow(label_overlay(gray, annotations.mask_plane(z), classes, 0.8), interpolation="nearest")
                _draw_annotations(ax, annotations, z, colors)
                label = f"annotations: {describe_plane(annotations, z)}"
                if not is_annotated:
                    ax.text(width / 2, height / 2, "no annotations on this plane\n(never seen in training)",
                            color="white", fontsize=10, ha="center", va="center",
                            bbox={"facecolor": "black", "alpha": 0.6, "pad": 4, "linewidth": 0})
            elif name == "prediction":
                ax.imshow(label_overlay(gray, prediction[z], classes, 0.45), interpolation="nearest")
                if z in notes:
                    label += f" ({notes[z]})"
            else:
                ax.imshow(label_overlay(gray, ground_truth[z], classes, 0.45), interpolation="nearest")
            ax.set_xlim(-0.5, width - 0.5)
            ax.set_ylim(height - 0.5, -0.5)
            ax.set_title(label, fontsize=9.5)
    if title:
        fig.suptitle(title, fontsize=12, y=1 - 0.22 / fig_h, va="top")
    handles = [Patch(facecolor=colors[int(c.id)], edgecolor="none", label=f"{c.id} {c.name}") for c in classes]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, fontsize=9.5,
               bbox_to_anchor=(0.5, (bottom - 0.42) / fig_h))
    text = caption
    if any(len(_plane_rows(t, z)) for t in (annotations.boxes, annotations.points) for z in planes):
        text += ("\nBoxes: solid = every object of that class in the section is boxed, dashed = only some. "
                 "Points: dots in the class colour.")
    if text:
        fig.text(0.5, 0.1 / fig_h, text, ha="center", va="bottom", fontsize=9, wrap=True)
    path = Path(path)
    fig.savefig(path, dpi=_DPI, facecolor="white")
    return path
